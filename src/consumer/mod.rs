//! The consumer: RabbitMQ → validate → batch → PostgreSQL → settle.
//!
//! Split the way Vector splits a source from its sink:
//! * the *reader* (this file) takes deliveries from one link (a connection and its channel) at a
//!   time, decodes and validates each, and groups them with a [`Batcher`] (by count, or when the
//!   oldest has waited `batch.max_wait`; a batch that comes due while the writer is still busy
//!   keeps filling until the writer is free). While a batch is open it takes what has arrived
//!   every millisecond rather than being woken for each delivery, and it cuts the batch early
//!   when nothing came in that millisecond and the writer is free (the flow paused);
//! * the *writer* ([`writer`]) stores each batch's valid readings in PostgreSQL, retrying while
//!   it is away, and hands the invalid ones to [`dead_letter`];
//! * *settlement* ([`settle`]) acknowledges exactly the deliveries that were stored or
//!   dead-lettered, and nothing that was not, whatever happens in between.
//!
//! A crash before the acknowledgement means redelivery, and redelivered rows are skipped, so
//! every confirmed message is stored exactly once. While PostgreSQL is away the writer keeps its
//! batch and retries; the one-batch channel between the two and the prefetch limit stop further
//! deliveries meanwhile.

pub mod admin;
mod dead_letter;
pub mod replay;
pub mod settle;
mod writer;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use self::dead_letter::{DeadLetter, Raw};
use self::settle::Link;
use self::writer::{Batch, Delivered, Writer};
use crate::amqp;
use crate::batch::Batcher;
use crate::broker::{self, Brokers};
use crate::config::{ConfigError, ConsumerConfig, QueueType};
use crate::db::{Db, DbError};
use crate::health::{Health, Phase};
use crate::metrics::{ConsumerMetrics, RateWindow, RATE_WINDOW};
use crate::reading::{self, RejectReason};
use crate::retry;
use crate::secret::Secret;
use crate::telemetry::LogLimiter;

/// How often the reader wakes up when idle, so its heartbeat stays fresh (well inside
/// [`crate::systemd::MIN_STALL`]).
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Most deliveries the reader takes in one go when they are already buffered: as many as tokio's
/// own cooperative budget, so the writer (on the same thread) still gets its turn promptly.
const READ_BURST: usize = 128;

/// While a batch is open, how often the reader takes what has arrived, instead of being woken for
/// each delivery. lapin receives on a thread of its own, and waking ours costs both threads a
/// system call and a context switch. Under a backlog the reader was woken once per three
/// deliveries or so; reading every millisecond instead cut the consumer's CPU by about a quarter.
/// A millisecond with nothing new means the flow has paused: the open batch is cut then if the
/// writer is free, instead of waiting out `batch.max_wait` (at 1,000 readings/s, five readings
/// arrive together every 5 ms and used to wait the whole 5 ms).
const GATHER: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot read a password: {0}")]
    Config(#[from] ConfigError),
    #[error("the writer task failed: {0}")]
    Writer(#[from] tokio::task::JoinError),
}

/// What the consumer needs from outside: metrics and health are shared with the binary.
pub type Deps = crate::daemon::Deps<ConsumerMetrics>;

/// Runs until `token` is cancelled, then stores and acks what it holds and returns.
pub async fn run(
    cfg: ConsumerConfig,
    deps: Deps,
    token: CancellationToken,
) -> Result<(), ConsumerError> {
    let amqp_password = crate::secret::loaded("amqp", cfg.amqp.password()?);
    let pg_password = crate::secret::loaded("postgres", cfg.postgres.password()?);
    let mut brokers = cfg.amqp.brokers(amqp_password.as_ref());
    let crate::daemon::Deps { metrics, health } = deps;
    if cfg.amqp.queue_type == QueueType::Quorum
        && cfg.amqp.dead_letter_queue_type == QueueType::Classic
    {
        warn!(message = "The queue is a quorum queue, its dead-letter queue a classic one: on a RabbitMQ cluster, while the node that holds the dead-letter queue is down no consumer can start; set amqp.dead_letter_queue_type = \"quorum\" (for a new queue).", queue = cfg.amqp.queue.as_str(), dead_letter_queue = cfg.amqp.dead_letter_queue.as_str());
    }
    metrics.configure_stations(&cfg.stations);

    health.set_phase(Phase::WaitingForDatabase);
    let Some(db) = connect_db(&cfg, pg_password.as_ref(), &metrics, &health, &token).await else {
        return Ok(());
    };
    info!(
        message = "Connected to PostgreSQL; schema is up to date.",
        schema = cfg.postgres.schema.as_str()
    );

    let last_stored = db.latest().await;
    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel::<Batch>(1);
    let writer = tracker.spawn(
        Writer {
            db: Some(db),
            dead_letter: DeadLetter::new(cfg.amqp.clone(), cfg.retry.clone(), brokers.clone()),
            cfg: cfg.clone(),
            password: pg_password,
            metrics: metrics.clone(),
            health: health.clone(),
            token: token.clone(),
            error_log: LogLimiter::new(5, Duration::from_secs(10)),
            last_stored,
        }
        .run(rx)
        .instrument(info_span!("insert_batch")),
    );
    tracker.spawn(rate_gauge(metrics.clone(), token.clone()));
    tracker.close();

    let link = read(&cfg, &mut brokers, &tx, &metrics, &health, &token)
        .instrument(info_span!("consume"))
        .await;
    health.set_phase(Phase::Stopping);
    drop(tx);
    writer.await?;
    tracker.wait().await;
    // Only now, with the last batch settled: what is still unsettled goes back to the queue.
    if let Some(link) = link {
        link.close("consumer stopping").await;
    }
    info!("Stopped.");
    Ok(())
}

async fn connect_db(
    cfg: &ConsumerConfig,
    password: Option<&Secret>,
    metrics: &ConsumerMetrics,
    health: &Health,
    token: &CancellationToken,
) -> Option<Db> {
    let db = retry::until_ok(
        "postgres",
        &cfg.retry,
        token,
        || {
            health.beat();
            Db::connect(&cfg.postgres, password)
        },
        |e: &DbError| {
            metrics.postgres_connection_errors.inc();
            health.set_problem(Some(e.problem()));
            if !e.is_outage() {
                error!(message = "PostgreSQL refuses us, and not because it is away; retrying in case it is being set up.", error = %e, error_type = e.error_type(), stage = "receiving");
            }
        },
    )
    .await?;
    health.set_problem(None);
    Some(db)
}

/// Updates `messages_per_second` once a second.
async fn rate_gauge(metrics: Arc<ConsumerMetrics>, token: CancellationToken) {
    let mut window = RateWindow::new(RATE_WINDOW);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {
                metrics.per_second.set(window.observe(Instant::now(), metrics.processed.get()));
            }
        }
    }
}

/// One link after another until cancelled; returns the last one, still open.
async fn read(
    cfg: &ConsumerConfig,
    brokers: &mut Brokers,
    tx: &mpsc::Sender<Batch>,
    metrics: &ConsumerMetrics,
    health: &Health,
    token: &CancellationToken,
) -> Option<Arc<Link>> {
    let mut reader = Reader {
        cfg,
        tx,
        metrics,
        health,
        frame_max: None,
    };
    let around = broker::Around {
        retry: &cfg.retry,
        health,
        errors: &metrics.amqp_connection_errors,
        stage: "receiving",
        token,
    };
    broker::run(&mut reader, brokers, around).await
}

/// The consumer's work on a link: consume, gather batches and hand them to the writer.
struct Reader<'a> {
    cfg: &'a ConsumerConfig,
    tx: &'a mpsc::Sender<Batch>,
    metrics: &'a ConsumerMetrics,
    health: &'a Health,
    /// Small frames keep memory small (see [`amqp::FRAME_MAX`]) until a message's headers need
    /// more: RabbitMQ never splits them, and lapin closes a connection that receives a larger
    /// frame; that message would come back at the head of the queue forever.
    frame_max: Option<u32>,
}

impl broker::Session for Reader<'_> {
    type Link = Arc<Link>;

    async fn open(&mut self, uri: &Secret) -> Result<Arc<Link>, amqp::AmqpError> {
        open(self.cfg, uri, self.metrics, self.frame_max)
            .await
            .map(Arc::new)
    }

    fn started(&mut self, broker: &str) {
        info!(
            message = "Consuming.",
            queue = self.cfg.amqp.queue.as_str(),
            prefetch = self.cfg.amqp.prefetch,
            broker
        );
    }

    async fn work(
        &mut self,
        link: &Arc<Link>,
        broker: &str,
        token: &CancellationToken,
    ) -> Result<(), broker::Lost> {
        match consume(self.cfg, link, self.tx, self.health, token).await {
            Ok(()) => Ok(()),
            Err(e) if amqp::is_frame_too_large(&e) && self.frame_max.is_none() => {
                warn!(message = "A message's headers do not fit in our frames; reconnecting with larger ones.", error = %e, error_type = "frame_too_large", stage = "receiving", frame_max = amqp::LARGE_FRAME_MAX);
                self.frame_max = Some(amqp::LARGE_FRAME_MAX);
                Err(broker::Lost {
                    reason: e.to_string(),
                    failure: false,
                })
            }
            Err(e) => {
                warn!(message = "Lost the RabbitMQ connection; reconnecting.", error = %e, error_type = "connection_lost", stage = "receiving", broker);
                Err(broker::Lost {
                    reason: e.to_string(),
                    failure: true,
                })
            }
        }
    }

    /// Closed for good, so that whatever it had not settled is requeued now.
    async fn close(&mut self, link: Arc<Link>) {
        link.close("consumer reconnecting").await;
    }
}

/// Connects, declares the topology and sets the prefetch, all within [`amqp::BROKER_TIMEOUT`]:
/// a broker that accepts TCP but never finishes the handshake must not hang the reconnect loop.
async fn open(
    cfg: &ConsumerConfig,
    uri: &Secret,
    metrics: &ConsumerMetrics,
    frame_max: Option<u32>,
) -> Result<Link, amqp::AmqpError> {
    amqp::bounded(async {
        let conn = amqp::connect(uri, "sistema-mensajes consumer", frame_max).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(cfg.amqp.prefetch, BasicQosOptions::default())
            .await?;
        amqp::declare_topology(&channel, &cfg.amqp, true).await?;
        Ok::<_, amqp::AmqpError>(Link::new(conn, channel, metrics.pending.clone()))
    })
    .await
}

/// Reads one link until cancelled (`Ok`) or its channel fails (`Err`).
async fn consume(
    cfg: &ConsumerConfig,
    link: &Arc<Link>,
    tx: &mpsc::Sender<Batch>,
    health: &Health,
    token: &CancellationToken,
) -> lapin::Result<()> {
    let tag = format!("sistema-mensajes-{}", uuid::Uuid::now_v7());
    let mut deliveries = link
        .channel
        .basic_consume(
            cfg.amqp.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut batcher = Batcher::new(cfg.batch.max_size, cfg.batch.max_wait);
    // Batches formed and not yet taken by the writer. Reading goes on while the writer is busy,
    // so every delivery the broker handed over is counted at once; the prefetch bounds them.
    let mut formed: VecDeque<Vec<Delivered>> = VecDeque::new();
    let mut idle = tokio::time::interval(IDLE_TICK);
    let mut gather = tokio::time::interval(GATHER);
    gather.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let max_bytes = cfg.validation.max_message_bytes;
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => {
                let cancel = link.channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                if let Err(e) = amqp::bounded(cancel).await {
                    debug!(message = "Cancelling the consumer failed.", error = %e);
                }
                // Deliveries already buffered stay unsettled and go back to the queue on close.
                let rest = tokio::time::timeout(amqp::BROKER_TIMEOUT, (&mut deliveries).count()).await;
                debug!(message = "Consumer cancelled.", returned_to_queue = rest.unwrap_or(0));
                formed.push_back(batcher.take());
                for items in formed {
                    send(tx, link, items, health).await;
                }
                return Ok(());
            }
            permit = tx.reserve(), if !formed.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(items) = formed.pop_front() {
                        permit.send(Batch { link: link.clone(), items });
                    }
                }
                // The writer has stopped, so nothing will be settled: the broker redelivers.
                Err(_) => formed.clear(),
            },
            _ = batcher.due() => {
                // `max_wait` bounds the wait on a quiet queue. Under a backlog the next
                // deliveries are already here: read them into the batch instead of cutting it
                // short (read without waiting, until the batch is full), so that a backlog is
                // stored in full batches, as few inserts and commits as possible. Then the batch
                // is held until the writer is free: it could not be written sooner, and it
                // goes on filling meanwhile.
                if read_buffered(&mut deliveries, READ_BURST, link, &mut batcher, &mut formed, max_bytes)? == 0 {
                    batcher.hold();
                }
            }
            _ = health.idle(), if batcher.is_held() && formed.is_empty() => {
                formed.push_back(batcher.take());
            }
            _ = gather.tick(), if !batcher.is_empty() => {
                match read_buffered(&mut deliveries, READ_BURST, link, &mut batcher, &mut formed, max_bytes)? {
                    // More may be waiting: the next turn reads on.
                    READ_BURST => gather.reset_immediately(),
                    // Nothing came for a millisecond: the flow has paused, and waiting out
                    // `max_wait` would only delay what is here. Cut the batch if the writer can
                    // take it now (if not, it keeps filling meanwhile).
                    0 if formed.is_empty() && health.is_idle() => formed.push_back(batcher.take()),
                    _ => {}
                }
            }
            // Only with no batch open is the reader woken by a delivery; see [`GATHER`].
            delivery = deliveries.next(), if batcher.is_empty() => {
                // Then whatever else is already buffered, up to [`READ_BURST`], before the other
                // arms are polled again: under a backlog, one turn of this loop per delivery (a
                // timer and a cancellation waiter registered and dropped each time) costs about
                // as much as decoding the delivery.
                accept(delivery, link, &mut batcher, &mut formed, max_bytes)?;
                read_buffered(&mut deliveries, READ_BURST - 1, link, &mut batcher, &mut formed, max_bytes)?;
                gather.reset();
            }
            _ = idle.tick() => {}
        }
        health.beat();
    }
}

/// Counts and decodes one delivery into the open batch. An error, or the end of the stream, means
/// the link is lost: what it had not settled goes back to the queue (the caller closes it),
/// formed batches included. They are not handed to the writer, which may be busy for as long as
/// PostgreSQL is away: reconnecting must not wait for that.
fn accept(
    delivery: Option<lapin::Result<Delivery>>,
    link: &Link,
    batcher: &mut Batcher<Delivered>,
    formed: &mut VecDeque<Vec<Delivered>>,
    max_bytes: usize,
) -> lapin::Result<()> {
    match delivery {
        Some(Ok(delivery)) => {
            link.received();
            formed.extend(batcher.push(decode(delivery, max_bytes)));
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "the broker cancelled the consumer",
        ))),
    }
}

/// [`accept`]s up to `budget` deliveries that are already buffered, without waiting; returns how
/// many there were.
fn read_buffered(
    deliveries: &mut lapin::Consumer,
    budget: usize,
    link: &Link,
    batcher: &mut Batcher<Delivered>,
    formed: &mut VecDeque<Vec<Delivered>>,
    max_bytes: usize,
) -> lapin::Result<usize> {
    let mut taken = 0;
    while taken < budget {
        let Some(delivery) = deliveries.next().now_or_never() else {
            break;
        };
        accept(delivery, link, batcher, formed, max_bytes)?;
        taken += 1;
    }
    Ok(taken)
}

/// Hands a batch to the writer. Waiting for room is healthy backpressure, so it keeps beating;
/// a writer that is stuck shows up in its own busy time instead.
async fn send(tx: &mpsc::Sender<Batch>, link: &Arc<Link>, items: Vec<Delivered>, health: &Health) {
    if items.is_empty() {
        return;
    }
    let permit = loop {
        tokio::select! {
            permit = tx.reserve() => break permit,
            _ = tokio::time::sleep(IDLE_TICK) => health.beat(),
        }
    };
    match permit {
        Ok(permit) => permit.send(Batch {
            link: link.clone(),
            items,
        }),
        // The writer has stopped, so nothing will be settled: the broker redelivers these.
        Err(_) => debug!("Writer is gone; leaving the batch unsettled."),
    }
}

fn decode(delivery: Delivery, max_bytes: usize) -> Delivered {
    let Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        ..
    } = delivery;
    let mut raw = Raw {
        data,
        properties,
        exchange,
        routing_key,
        truncated_from: None,
    };
    let reading = reading::decode(&raw.data, raw.message_id(), max_bytes);
    if matches!(&reading, Err(r) if r.reason == RejectReason::TooLarge) {
        // Held until dead-lettered, perhaps for long: keep what an operator needs to see, not
        // the whole body (the broker accepts up to 128 MiB a message, and the prefetch counts
        // messages, not bytes). The dead letter says it was cut, and from what size.
        raw.truncated_from = Some(raw.data.len());
        raw.data.truncate(max_bytes);
        raw.data.shrink_to_fit();
    }
    Delivered {
        tag: delivery_tag,
        redelivered,
        raw,
        reading,
    }
}

/// The `STATUS=` line `systemctl status consumer` shows.
pub fn status_line(metrics: &ConsumerMetrics, health: &Health) -> String {
    let problem = health.problem();
    match health.phase() {
        Phase::Starting => "starting".into(),
        Phase::WaitingForDatabase => format!(
            "waiting for PostgreSQL: {}",
            problem.as_deref().unwrap_or("connecting")
        ),
        Phase::WaitingForBroker => format!(
            "waiting for RabbitMQ: {}",
            problem.as_deref().unwrap_or("connecting")
        ),
        Phase::Stopping => "stopping: storing and acknowledging what is in hand".into(),
        Phase::Running => format!(
            "stored {} readings, {:.0}/s, last batch {} in {} ms, {} pending, {} rejected, {}{}",
            metrics.processed.get(),
            metrics.per_second.get(),
            metrics.last_batch.load(Ordering::Relaxed),
            metrics.last_batch_micros.load(Ordering::Relaxed) / 1000,
            metrics.pending.get(),
            RejectReason::ALL
                .iter()
                .map(|r| metrics.rejected.with_label_values(&[r.as_str()]).get())
                .sum::<u64>(),
            problem.as_deref().unwrap_or("database ok"),
            match (metrics.dead_letters_held.get(), metrics.blocked.get()) {
                (0, _) => String::new(),
                (held, 1) => format!(
                    ", {held} held for the dead-letter queue: RabbitMQ blocks publishers (memory or disk alarm)"
                ),
                (held, _) => format!(", {held} held: dead-lettering fails"),
            },
        ),
    }
}
