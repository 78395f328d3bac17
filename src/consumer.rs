//! The consumer: RabbitMQ → validate → batch → PostgreSQL → ack.
//!
//! Two tasks. The *reader* takes deliveries, validates them and groups them into batches (by
//! count, or when the oldest has waited `batch.max_wait`). The *writer* settles each batch in
//! order: stores the valid readings (one multi-row INSERT … ON CONFLICT DO NOTHING), republishes
//! the invalid ones to the dead-letter exchange with their reason and waits for the broker's
//! confirm, and only then acks everything up to the batch's last delivery tag (`multiple`).
//! A crash before the ack means redelivery, and redelivered rows are skipped, so every confirmed
//! message is stored exactly once. While PostgreSQL is away the writer keeps its batch and
//! retries; the bounded channel and the prefetch limit stop further deliveries meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::amqp;
use crate::config::ConsumerConfig;
use crate::db::{Db, DbError, Stored};
use crate::health::{Health, Phase};
use crate::metrics::{ConsumerMetrics, RateWindow, RATE_WINDOW};
use crate::reading::{self, Reading, RejectReason, Rejection};
use crate::retry;
use crate::secret::Secret;
use crate::telemetry::LogLimiter;

/// How often the reader wakes up when idle, so its heartbeat stays fresh (well inside
/// [`crate::systemd::MIN_STALL`]).
const IDLE_TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot read a password: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("the writer task failed: {0}")]
    Writer(#[from] tokio::task::JoinError),
}

/// What the consumer needs from outside: metrics and health are shared with the binary.
#[derive(Clone, Default)]
pub struct Deps {
    pub metrics: Arc<ConsumerMetrics>,
    pub health: Arc<Health>,
}

/// The bytes and properties of a delivery, kept until it is settled (to dead-letter it).
struct Raw {
    data: Vec<u8>,
    properties: BasicProperties,
    exchange: ShortString,
    routing_key: ShortString,
}

impl Raw {
    fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }
}

/// Deliveries of one channel, settled together.
struct Batch {
    channel: Channel,
    dead_letter: Channel,
    rows: Vec<Reading>,
    row_raw: Vec<Raw>,
    invalid: Vec<(Raw, Rejection)>,
    last_tag: u64,
    /// Some delivery was delivered before, so its row may already be stored.
    redelivered: bool,
}

impl Batch {
    fn new(channel: Channel, dead_letter: Channel, capacity: usize) -> Self {
        Self {
            channel,
            dead_letter,
            rows: Vec::with_capacity(capacity),
            row_raw: Vec::with_capacity(capacity),
            invalid: Vec::new(),
            last_tag: 0,
            redelivered: false,
        }
    }

    fn len(&self) -> usize {
        self.rows.len() + self.invalid.len()
    }
}

/// Runs until `token` is cancelled, then stores and acks what it holds and returns.
pub async fn run(
    cfg: ConsumerConfig,
    deps: Deps,
    token: CancellationToken,
) -> Result<(), ConsumerError> {
    let amqp_password = cfg.amqp.password()?;
    let pg_password = cfg.postgres.password()?;
    for (what, source) in [("amqp", &amqp_password), ("postgres", &pg_password)] {
        if let Some((_, source)) = source {
            info!(message = "Using a password from a file.", what, source = ?source);
        }
    }
    let amqp_uri = cfg.amqp.connect_uri(amqp_password.as_ref().map(|(s, _)| s));
    let pg_password = pg_password.map(|(s, _)| s);
    let Deps { metrics, health } = deps;

    health.set_phase(Phase::WaitingForDatabase);
    let Some(db) = connect_db(&cfg, pg_password.as_ref(), &metrics, &health, &token).await else {
        return Ok(());
    };
    info!(
        message = "Connected to PostgreSQL; schema is up to date.",
        schema = cfg.postgres.schema.as_str()
    );

    let tracker = TaskTracker::new();
    let (tx, rx) = mpsc::channel::<Batch>(1);
    let writer = tracker.spawn(
        Writer {
            db: Some(db),
            cfg: cfg.clone(),
            password: pg_password,
            metrics: metrics.clone(),
            health: health.clone(),
            token: token.clone(),
            error_log: LogLimiter::new(5, Duration::from_secs(10)),
        }
        .run(rx)
        .instrument(info_span!("insert_batch")),
    );
    tracker.spawn(rate_gauge(metrics.clone(), token.clone()));
    tracker.close();

    let conn = read(&cfg, &amqp_uri, &tx, &metrics, &health, &token)
        .instrument(info_span!("consume"))
        .await;
    health.set_phase(Phase::Stopping);
    drop(tx);
    writer.await?;
    tracker.wait().await;
    // Only now, with the last batch acked: unacked deliveries still buffered go back to the queue.
    if let Some(conn) = conn {
        amqp::close(&conn, "consumer stopping").await;
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
            health.set_problem(Some(format!("database unreachable: {e}")));
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

/// One broker connection after another until cancelled; returns the last one, still open.
async fn read(
    cfg: &ConsumerConfig,
    uri: &Secret,
    tx: &mpsc::Sender<Batch>,
    metrics: &ConsumerMetrics,
    health: &Health,
    token: &CancellationToken,
) -> Option<Connection> {
    let mut delays = retry::delays(&cfg.retry);
    loop {
        health.set_phase(Phase::WaitingForBroker);
        let connected = retry::until_ok(
            "rabbitmq",
            &cfg.retry,
            token,
            || {
                health.beat();
                open(cfg, uri)
            },
            |_| {
                metrics.amqp_connection_errors.inc();
            },
        )
        .await;
        let (conn, channel, dead_letter) = connected?;
        info!(
            message = "Consuming.",
            queue = cfg.amqp.queue.as_str(),
            prefetch = cfg.amqp.prefetch
        );
        health.set_problem(None);
        health.set_phase(Phase::Running);
        let result = consume(cfg, channel, dead_letter, tx, metrics, health, token).await;
        match result {
            Ok(()) => return Some(conn),
            Err(e) => {
                metrics.amqp_connection_errors.inc();
                health.set_problem(Some(format!("broker connection lost: {e}")));
                warn!(message = "Lost the RabbitMQ connection; reconnecting.", error = %e, error_type = "connection_lost", stage = "receiving");
                if !retry::pause(&mut delays, token).await {
                    return None;
                }
            }
        }
    }
}

async fn open(cfg: &ConsumerConfig, uri: &Secret) -> lapin::Result<(Connection, Channel, Channel)> {
    let conn = amqp::connect(uri, "sistema-mensajes consumer").await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(cfg.amqp.prefetch, BasicQosOptions::default())
        .await?;
    amqp::declare_topology(&channel, &cfg.amqp, true).await?;
    let dead_letter = amqp::confirm_channel(&conn).await?;
    Ok((conn, channel, dead_letter))
}

/// Reads one channel until cancelled (`Ok`) or the channel fails (`Err`).
async fn consume(
    cfg: &ConsumerConfig,
    channel: Channel,
    dead_letter: Channel,
    tx: &mpsc::Sender<Batch>,
    metrics: &ConsumerMetrics,
    health: &Health,
    token: &CancellationToken,
) -> lapin::Result<()> {
    let tag = format!("sistema-mensajes-{}", uuid::Uuid::now_v7());
    let mut deliveries = channel
        .basic_consume(
            cfg.amqp.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max = cfg.batch.max_size;
    let new_batch = || Batch::new(channel.clone(), dead_letter.clone(), max);
    let mut batch = new_batch();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut idle = tokio::time::interval(IDLE_TICK);
    loop {
        let flush = tokio::select! {
            biased;
            _ = token.cancelled() => {
                if let Err(e) = amqp::bounded(channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default())).await {
                    debug!(message = "Cancelling the consumer failed.", error = %e);
                }
                // Deliveries already buffered stay unacked and go back to the queue on close.
                let rest = tokio::time::timeout(amqp::BROKER_TIMEOUT, (&mut deliveries).count()).await;
                debug!(message = "Consumer cancelled.", returned_to_queue = rest.unwrap_or(0));
                send(tx, batch, health).await;
                return Ok(());
            }
            _ = sleep_until(deadline) => true,
            delivery = deliveries.next() => match delivery {
                Some(Ok(delivery)) => {
                    add(&mut batch, delivery, cfg.validation.max_message_bytes);
                    metrics.pending.inc();
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + cfg.batch.max_wait);
                    batch.len() >= max
                }
                Some(Err(e)) => {
                    send(tx, batch, health).await;
                    return Err(e);
                }
                None => {
                    send(tx, batch, health).await;
                    return Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                        lapin::ChannelState::Closed,
                        "the broker cancelled the consumer",
                    )));
                }
            },
            _ = idle.tick() => false,
        };
        health.beat();
        if flush {
            send(tx, std::mem::replace(&mut batch, new_batch()), health).await;
            deadline = None;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Hands a batch to the writer. Waiting for room is healthy backpressure, so it keeps beating;
/// a writer that is stuck shows up in its own busy time instead.
async fn send(tx: &mpsc::Sender<Batch>, batch: Batch, health: &Health) {
    if batch.len() == 0 {
        return;
    }
    let permit = loop {
        tokio::select! {
            permit = tx.reserve() => break permit,
            _ = tokio::time::sleep(IDLE_TICK) => health.beat(),
        }
    };
    match permit {
        Ok(permit) => permit.send(batch),
        // The writer has stopped, so nothing will be acked: the broker redelivers these.
        Err(_) => debug!("Writer is gone; leaving the batch unacknowledged."),
    }
}

fn add(batch: &mut Batch, delivery: Delivery, max_bytes: usize) {
    let Delivery {
        delivery_tag,
        exchange,
        routing_key,
        redelivered,
        properties,
        data,
        ..
    } = delivery;
    batch.last_tag = delivery_tag;
    batch.redelivered |= redelivered;
    let raw = Raw {
        data,
        properties,
        exchange,
        routing_key,
    };
    match reading::decode(&raw.data, raw.message_id(), max_bytes) {
        Ok(row) => {
            batch.rows.push(row);
            batch.row_raw.push(raw);
        }
        Err(rejection) => batch.invalid.push((raw, rejection)),
    }
}

struct Writer {
    /// `None` after a failed reconnect.
    db: Option<Db>,
    cfg: ConsumerConfig,
    password: Option<Secret>,
    metrics: Arc<ConsumerMetrics>,
    health: Arc<Health>,
    token: CancellationToken,
    error_log: LogLimiter,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        let mut reject_log = LogLimiter::new(10, Duration::from_secs(10));
        loop {
            self.health.work_done();
            let Some(mut batch) = rx.recv().await else {
                break;
            };
            self.health.work_started();
            let size = batch.len();
            let started = Instant::now();
            let Some(rejected_rows) = self.store(&batch.rows, batch.redelivered).await else {
                warn!(
                    message =
                        "Shutting down with a batch not stored; the broker will redeliver it.",
                    batch_size = size
                );
                continue;
            };
            let elapsed = started.elapsed();
            // Rows PostgreSQL refused join the invalid messages, in reverse so indexes stay valid.
            let mut stored_rows = batch.rows.len();
            for (index, message) in rejected_rows.into_iter().rev() {
                stored_rows -= 1;
                let raw = batch.row_raw.swap_remove(index);
                batch
                    .invalid
                    .push((raw, Rejection::new(RejectReason::DatabaseRejected, message)));
            }
            if let Err(e) = dead_letter(
                &batch,
                self.cfg.amqp.dead_letter_exchange.as_str(),
                &self.metrics,
                &mut reject_log,
            )
            .await
            {
                error!(message = "Cannot dead-letter rejected messages; leaving the batch unacknowledged.", error = %e, error_type = "dead_letter_failed", stage = "sending", batch_size = size);
                continue;
            }
            if let Err(e) = batch
                .channel
                .basic_ack(batch.last_tag, BasicAckOptions { multiple: true })
                .await
            {
                // The channel is gone, so the broker redelivers; the stored rows are then skipped.
                warn!(message = "Stored a batch but could not acknowledge it; it will be redelivered.", error = %e, batch_size = size);
                continue;
            }
            let m = &self.metrics;
            m.processed.inc_by(stored_rows as u64);
            m.pending.sub(size as i64);
            m.batch_size.observe(size as f64);
            m.insert_duration.observe(elapsed.as_secs_f64());
            let committed = time::OffsetDateTime::now_utc();
            m.observe_end_to_end(&batch.rows, committed);
            m.last_commit.set(committed.unix_timestamp() as f64);
            m.last_batch.store(size as u64, Ordering::Relaxed);
            m.last_batch_micros
                .store(elapsed.as_micros() as u64, Ordering::Relaxed);
            debug!(
                message = "Stored a batch.",
                batch_size = size,
                stored = stored_rows,
                rejected = batch.invalid.len(),
                elapsed_ms = elapsed.as_millis() as u64
            );
            batch.rows.clear();
        }
    }

    /// Stores rows, retrying until it works. Returns the rows PostgreSQL refused, or `None` if
    /// shutdown came while PostgreSQL was unavailable. Every failed attempt counts in
    /// `postgres_insert_errors_total`, reconnects included.
    async fn store(
        &mut self,
        rows: &[Reading],
        maybe_stored: bool,
    ) -> Option<Vec<(usize, String)>> {
        if rows.is_empty() {
            return Some(Vec::new());
        }
        let mut delays = retry::delays(&self.cfg.retry);
        loop {
            self.health.work_started();
            match self.try_store(rows, maybe_stored).await {
                Ok(stored) => {
                    let accepted = (rows.len() - stored.rejected.len()) as u64;
                    self.metrics
                        .duplicates
                        .inc_by(accepted.saturating_sub(stored.inserted));
                    self.health.set_problem(None);
                    return Some(stored.rejected);
                }
                Err(e) => {
                    self.metrics.insert_errors.inc();
                    self.health
                        .set_problem(Some(format!("database unavailable: {e}")));
                    if let Some(suppressed) = self.error_log.allow(Instant::now()) {
                        warn!(message = "Failed to insert batch; will retry.", error = %e, error_type = e.error_type(), stage = "sending", batch_size = rows.len(), suppressed);
                    }
                    if self.token.is_cancelled() || !retry::pause(&mut delays, &self.token).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn try_store(&mut self, rows: &[Reading], maybe_stored: bool) -> Result<Stored, DbError> {
        let db = match self.db.take() {
            Some(db) if !db.is_closed() => db,
            _ => {
                let db = Db::connect(&self.cfg.postgres, self.password.as_ref())
                    .await
                    .inspect_err(|_| {
                        self.metrics.postgres_connection_errors.inc();
                    })?;
                info!("Connected to PostgreSQL again.");
                db
            }
        };
        let result = db.insert_isolating(rows, maybe_stored).await;
        self.db = Some(db);
        result
    }
}

/// Republishes each invalid message to the dead-letter exchange and waits for the confirms.
async fn dead_letter(
    batch: &Batch,
    exchange: &str,
    metrics: &ConsumerMetrics,
    log: &mut LogLimiter,
) -> Result<(), DeadLetterError> {
    if batch.invalid.is_empty() {
        return Ok(());
    }
    let mut confirms = Vec::with_capacity(batch.invalid.len());
    for (raw, rejection) in &batch.invalid {
        let props = amqp::dead_letter_properties(
            &raw.properties,
            rejection,
            &raw.exchange,
            &raw.routing_key,
        );
        let confirm = batch
            .dead_letter
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                &raw.data,
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        if let Confirmation::Nack(_) = amqp::bounded(confirm).await? {
            return Err(DeadLetterError::Nacked);
        }
    }
    let now = Instant::now();
    for (raw, rejection) in &batch.invalid {
        metrics
            .rejected
            .with_label_values(&[rejection.reason.as_str()])
            .inc();
        if let Some(suppressed) = log.allow(now) {
            warn!(
                message = "Rejected a message; it is in the dead-letter queue.",
                reason = rejection.reason.as_str(),
                detail = %rejection.detail,
                reading_id = raw.message_id().unwrap_or(""),
                bytes = raw.data.len(),
                suppressed,
            );
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error(transparent)]
    Amqp(#[from] amqp::AmqpError),
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("the broker refused (nacked) a dead-letter message")]
    Nacked,
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
            "stored {} readings, {:.0}/s, last batch {} in {} ms, {} pending, {} rejected, {}",
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
        ),
    }
}
