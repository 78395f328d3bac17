//! The producer: simulated readings → RabbitMQ, with publisher confirms.
//!
//! Up to `simulation.confirm_window` publishes await their confirm at once; they are written in
//! bursts of up to [`PUBLISH_BURST`], queued together rather than one after the other. A nack, a
//! return (unroutable; we publish `mandatory`) or a lost connection puts the reading back in a
//! retry queue, republished after a backoff or on the next connection, with the same message id,
//! so the consumer stores it once however often it is sent. Nothing is forgotten: a reading leaves
//! the producer's memory only on a positive confirm, and one whose return comes after that confirm
//! is rebuilt from the return and sent again (see `inflight`).

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::amqp;
use crate::broker;
use crate::config::ProducerConfig;
use crate::health::{Health, Phase};
use crate::metrics::ProducerMetrics;
use crate::secret::Secret;
use crate::telemetry::LogLimiter;

mod inflight;
mod retries;
mod source;

use inflight::{Inflight, Outcome};
use retries::Retries;
use source::{Outgoing, Pacer, Source};

/// Most publishes queued at once before their writes are awaited (see [`Publisher::publish`]).
const PUBLISH_BURST: usize = 64;

/// How often the pacer wakes up to publish what is due.
const PACE_TICK: Duration = Duration::from_millis(5);

/// What to publish.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Simulated readings until stopped.
    Simulate,
    /// Exactly this many simulated readings, then stop.
    Count(u64),
    /// One message with exactly these bytes (a hand-written reading, valid or not).
    Send(Vec<u8>),
}

impl Mode {
    /// From `--send JSON|-` and `--count N`; `-` reads the message from `stdin`.
    pub fn from_args(
        send: Option<&str>,
        count: Option<u64>,
        mut stdin: impl std::io::Read,
    ) -> std::io::Result<Self> {
        Ok(match (send, count) {
            (Some("-"), _) => {
                let mut body = Vec::new();
                stdin.read_to_end(&mut body)?;
                Mode::Send(body)
            }
            (Some(s), _) => Mode::Send(s.as_bytes().to_vec()),
            (None, Some(n)) => Mode::Count(n),
            (None, None) => Mode::Simulate,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Readings the broker confirmed as routed and stored.
    pub confirmed: u64,
    /// Readings still without a positive confirm when the producer stopped, including those of
    /// `--count` or `--send` not published at all.
    pub unconfirmed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    #[error("cannot read a password: {0}")]
    Config(#[from] crate::config::ConfigError),
}

pub type Deps = crate::daemon::Deps<ProducerMetrics>;

/// What a write needs to wait well: the connection's state (blocked or not) and shutdown.
struct Writing<'a> {
    conn: &'a lapin::ConnectionStatus,
    token: &'a CancellationToken,
}

/// The state that outlives a connection: what to publish ([`Source`], [`Pacer`]) and what to
/// publish again ([`Retries`]). What one channel has in flight is its [`Inflight`].
struct Publisher {
    cfg: ProducerConfig,
    metrics: Arc<ProducerMetrics>,
    source: Source,
    pacer: Pacer,
    retry: Retries,
    summary: Summary,
    log: LogLimiter,
    health: Arc<Health>,
}

/// Runs until the mode's readings are all confirmed or `token` is cancelled.
pub async fn run(
    cfg: ProducerConfig,
    mode: Mode,
    deps: Deps,
    token: CancellationToken,
) -> Result<Summary, ProducerError> {
    let password = crate::secret::loaded("amqp", cfg.amqp.password()?);
    let mut brokers = cfg.amqp.brokers(password.as_ref());
    let source = Source::new(mode, cfg.simulation.stations);
    let rate = cfg.simulation.total_rate().filter(|_| source.paced());
    let mut publisher = Publisher {
        retry: Retries::new(&cfg.retry),
        cfg,
        metrics: deps.metrics,
        source,
        pacer: Pacer::new(rate),
        summary: Summary::default(),
        log: LogLimiter::new(5, Duration::from_secs(10)),
        health: deps.health.clone(),
    };
    let (retry_cfg, metrics) = (publisher.cfg.retry.clone(), publisher.metrics.clone());
    let around = broker::Around {
        retry: &retry_cfg,
        health: &deps.health,
        errors: &metrics.amqp_connection_errors,
        stage: "sending",
        token: &token,
    };
    if let Some((conn, _)) = broker::run(&mut publisher, &mut brokers, around)
        .instrument(info_span!("publish"))
        .await
    {
        amqp::close(&conn, "producer stopping").await;
    }
    publisher.summary.unconfirmed = publisher.retry.len() as u64 + publisher.source.unsent();
    Ok(publisher.summary)
}

async fn open(
    cfg: &ProducerConfig,
    uri: &Secret,
) -> Result<(Connection, Channel), amqp::AmqpError> {
    amqp::bounded(async {
        let conn = amqp::connect(uri, "sistema-mensajes producer", None).await?;
        let channel = amqp::confirm_channel(&conn).await?;
        amqp::declare_topology(&channel, &cfg.amqp, false).await?;
        Ok::<_, amqp::AmqpError>((conn, channel))
    })
    .await
}

impl broker::Session for Publisher {
    type Link = (Connection, Channel);

    async fn open(&mut self, uri: &Secret) -> Result<Self::Link, amqp::AmqpError> {
        open(&self.cfg, uri).await
    }

    fn started(&mut self, broker: &str) {
        info!(
            message = "Publishing.",
            exchange = self.cfg.amqp.exchange.as_str(),
            routing_key = self.cfg.amqp.routing_key.as_str(),
            confirm_window = self.cfg.simulation.confirm_window,
            retrying = self.retry.len(),
            broker
        );
    }

    async fn work(
        &mut self,
        (conn, channel): &Self::Link,
        broker: &str,
        token: &CancellationToken,
    ) -> Result<(), broker::Lost> {
        let health = self.health.clone();
        self.session(conn, channel, &health, token)
            .await
            .map_err(|e| {
                self.metrics.blocked.set(0);
                warn!(message = "Lost the RabbitMQ connection; unconfirmed readings will be republished.", error = %e, error_type = "connection_lost", stage = "sending", retrying = self.retry.len(), broker);
                broker::Lost {
                    reason: e.to_string(),
                    failure: true,
                }
            })
    }

    /// Dropped, not closed: a close waits for the broker's answer (up to [`amqp::BROKER_TIMEOUT`])
    /// on a link that is lost, often because the broker is silent; lapin closes a dropped
    /// connection without waiting. Unconfirmed readings are republished whatever became of them.
    async fn close(&mut self, link: Self::Link) {
        drop(link);
    }
}

impl Publisher {
    /// Publishes on one channel until done (`Ok`) or the channel fails (`Err`); then every
    /// unconfirmed reading is back in the retry queue, oldest first.
    async fn session(
        &mut self,
        conn: &Connection,
        channel: &Channel,
        health: &Health,
        token: &CancellationToken,
    ) -> Result<(), amqp::AmqpError> {
        let mut inflight = Inflight::new(self.cfg.simulation.confirm_window);
        let result = self
            .confirm_loop(conn, channel, health, token, &mut inflight)
            .await;
        // Confirms already in but not read (the loop ended at an error or a stop) go through
        // `settle` too: one may carry the return of a reading already taken for stored
        // (inflight.rs). A few turns, in case lapin's thread is enqueueing one just then.
        for _ in 0..3 {
            self.settle_run(&mut inflight, None);
            tokio::task::yield_now().await;
        }
        self.retry.put_back(inflight.into_unconfirmed());
        result
    }

    /// Settles `first` and every confirm already in: the broker confirms in runs (`multiple`),
    /// so all of a run are settled before publishing again, not one per turn of the loop. A
    /// confirm that failed (its channel is gone) leaves its reading in flight; the first such
    /// error is returned once every confirm already in was read.
    fn settle_run(
        &mut self,
        inflight: &mut Inflight,
        first: Option<inflight::Settled>,
    ) -> Option<lapin::Error> {
        let mut failed = None;
        let mut next = first.or_else(|| inflight.ready());
        while let Some((confirmed, outcome)) = next.take() {
            match outcome {
                Ok(outcome) => {
                    self.metrics
                        .confirm_duration
                        .observe(confirmed.sent.elapsed().as_secs_f64());
                    self.settle(confirmed.msg, outcome);
                    while let Some((msg, returned)) = inflight.late() {
                        if let Some(suppressed) = self.log.allow(Instant::now()) {
                            warn!(message = "A reading taken for stored came back unroutable after its confirm; it will be republished.", reading_id = msg.id, suppressed);
                        }
                        self.summary.confirmed = self.summary.confirmed.saturating_sub(1);
                        self.settle(msg, returned);
                    }
                }
                Err(e) => {
                    inflight.restore(confirmed);
                    failed.get_or_insert(e);
                }
            }
            next = inflight.ready();
        }
        failed
    }

    async fn confirm_loop(
        &mut self,
        conn: &Connection,
        channel: &Channel,
        health: &Health,
        token: &CancellationToken,
        inflight: &mut Inflight,
    ) -> Result<(), amqp::AmqpError> {
        let mut tick = tokio::time::interval(PACE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = token.is_cancelled();
            let blocked = conn.status().blocked();
            report_blocked(&self.metrics, health, blocked);
            // While the broker blocks us, publishing would only queue frames lapin cannot send.
            if !(stopping || blocked) {
                let writing = Writing {
                    conn: conn.status(),
                    token,
                };
                match self.fill(channel, &writing, inflight).await {
                    // Shutdown while the broker blocks us: stop, the rest unconfirmed.
                    Err(amqp::AmqpError::Blocked) if token.is_cancelled() => return Ok(()),
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
            }
            self.metrics
                .unconfirmed
                .set((inflight.len() + self.retry.len()) as i64);
            if inflight.is_empty()
                && (stopping || (self.source.exhausted() && self.retry.is_empty()))
            {
                return Ok(());
            }
            if stopping && blocked {
                // No confirm can come while the broker blocks us: stop with them unconfirmed.
                return Ok(());
            }
            tokio::select! {
                // Confirms first: at shutdown, one already in must not be taken for missing.
                biased;
                Some(first) = inflight.next() => {
                    if let Some(e) = self.settle_run(inflight, Some(first)) {
                        return Err(e.into());
                    }
                }
                _ = tick.tick() => {
                    // A confirm may never resolve on a dead connection: notice it here.
                    if !channel.status().connected() {
                        return Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
                            lapin::ChannelState::Closed,
                            "the channel closed with confirms outstanding",
                        )).into());
                    }
                }
                _ = token.cancelled(), if !stopping => {
                    info!(message = "Stopping: waiting for outstanding confirms.", unconfirmed = inflight.len());
                }
            }
            health.beat();
        }
    }

    /// Publishes retries that are due, then new readings that are due, while the window has room.
    async fn fill(
        &mut self,
        channel: &Channel,
        writing: &Writing<'_>,
        inflight: &mut Inflight,
    ) -> Result<(), amqp::AmqpError> {
        let mut room = self
            .cfg
            .simulation
            .confirm_window
            .saturating_sub(inflight.len());
        let mut retrying = self.retry.due();
        // While readings come back unroutable or nacked, the simulation pauses: only the
        // readings already made are retried, so memory stays within the confirm window.
        let mut new = match self.retry.paused() {
            true => 0,
            false => self
                .pacer
                .due(Instant::now(), room.saturating_sub(retrying)),
        };
        while room > 0 {
            let size = room.min(PUBLISH_BURST);
            let mut burst = Vec::with_capacity(size);
            while burst.len() < size {
                let msg = if retrying > 0 {
                    retrying -= 1;
                    self.retry.pop()
                } else if new > 0 {
                    new -= 1;
                    self.source.next()
                } else {
                    None
                };
                let Some(msg) = msg else { break };
                burst.push(msg);
            }
            if burst.is_empty() {
                break;
            }
            room -= burst.len();
            self.publish(channel, writing, burst, inflight).await?;
        }
        Ok(())
    }

    /// Publishes `burst` in order. lapin resolves a publish once its io-loop thread has written
    /// the frames, so awaiting each publish before starting the next costs a round trip between
    /// the two threads per reading. Instead each is polled once, in order, which queues its frames
    /// and takes its confirm sequence number in publishing order; then all are awaited together.
    /// On failure the reading that failed and those behind it go back to the front of the retry
    /// queue, in order.
    async fn publish(
        &mut self,
        channel: &Channel,
        writing: &Writing<'_>,
        burst: Vec<Outgoing>,
        inflight: &mut Inflight,
    ) -> Result<(), amqp::AmqpError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut writes = Vec::with_capacity(burst.len());
        for msg in &burst {
            let mut write = Box::pin(channel.basic_publish(
                self.cfg.amqp.exchange.as_str().into(),
                self.cfg.amqp.routing_key.as_str().into(),
                options,
                &msg.body,
                amqp::reading_properties(&msg.id),
            ));
            let polled = futures_util::poll!(write.as_mut());
            writes.push((write, polled));
        }
        let mut written = Vec::with_capacity(writes.len());
        let (health, metrics) = (self.health.clone(), self.metrics.clone());
        let alive = || {
            report_blocked(&metrics, &health, true);
            health.beat();
        };
        for (write, polled) in writes {
            let result = match polled {
                Poll::Ready(result) => result.map_err(amqp::AmqpError::from),
                // Bounded; while the broker blocks the connection, waiting is healthy.
                Poll::Pending => amqp::write(writing.conn, write, alive, writing.token).await,
            };
            let failed = result.is_err();
            written.push(result);
            if failed {
                // The connection is gone or silent: the rest would each wait out the bound too.
                // They go back to the retry queue with the failed one (below).
                break;
            }
        }
        // Shorter than `burst` after a failure: the rest were not awaited.
        let mut written = written.into_iter();
        let mut burst = burst.into_iter();
        for msg in burst.by_ref() {
            match written.next() {
                Some(Ok(confirm)) => {
                    self.metrics.published.inc();
                    if msg.published_before {
                        self.metrics.republished.inc();
                    }
                    inflight.track(msg, confirm);
                }
                failed => {
                    self.retry.put_back(std::iter::once(msg).chain(burst));
                    return match failed {
                        Some(Err(e)) => Err(e),
                        // `written` ends early only after a failure, returned above.
                        _ => Ok(()),
                    };
                }
            }
        }
        Ok(())
    }

    fn settle(&mut self, msg: Outgoing, outcome: Outcome) {
        let (unroutable, problem) = match outcome {
            Outcome::Stored => {
                self.summary.confirmed += 1;
                if !msg.counted {
                    self.metrics.confirmed.inc();
                }
                if self.retry.accepted() {
                    self.health.set_problem(None);
                    info!(
                        message = "Readings are accepted again; the simulation resumes.",
                        retrying = self.retry.len()
                    );
                }
                return;
            }
            Outcome::Returned(returned) => {
                self.metrics.returned.inc();
                let why = format!(
                    "returned as unroutable ({} {})",
                    returned.reply_code, returned.reply_text
                );
                (true, why)
            }
            Outcome::Nacked => {
                self.metrics.nacked.inc();
                (false, "nacked by the broker".to_owned())
            }
        };
        if !self.retry.paused() {
            let amqp = &self.cfg.amqp;
            let why = match unroutable {
                true => format!(
                    "readings are unroutable: is `{}` bound to `{}` with key `{}`?",
                    amqp.queue.as_str(),
                    amqp.exchange.as_str(),
                    amqp.routing_key.as_str()
                ),
                false => "the broker refuses readings (nack): is it out of disk or memory?".into(),
            };
            warn!(message = "Pausing the simulation until readings are accepted again.", why = %why, retrying = self.retry.len() + 1);
            self.health.set_problem(Some(why));
        }
        let id = msg.id.clone();
        let delay = self.retry.refused(msg);
        if let Some(suppressed) = self.log.allow(Instant::now()) {
            warn!(
                message = "A reading was not accepted; it will be republished.",
                problem,
                reading_id = id,
                retry_in_ms = delay.as_millis() as u64,
                suppressed
            );
        }
    }
}

/// Whether RabbitMQ blocks the connection (`connection.blocked`), in the gauge, the status line
/// and the log; does nothing if that is known already.
fn report_blocked(metrics: &ProducerMetrics, health: &Health, blocked: bool) {
    if (metrics.blocked.get() == 1) == blocked {
        return;
    }
    metrics.blocked.set(i64::from(blocked));
    if blocked {
        warn!(
            message = "RabbitMQ blocks publishers (a memory or disk alarm); publishing waits.",
            error_type = "blocked",
            stage = "sending"
        );
        health.set_problem(Some(
            "RabbitMQ blocks publishers: memory or disk alarm".into(),
        ));
    } else {
        info!("RabbitMQ accepts publishes again.");
        health.set_problem(None);
    }
}

/// The `STATUS=` line `systemctl status producer` shows.
pub fn status_line(metrics: &ProducerMetrics, health: &Health) -> String {
    let problem = health.problem();
    match health.phase() {
        Phase::Running => format!(
            "confirmed {} readings, {} unconfirmed, {} returned, {} nacked, {}",
            metrics.confirmed.get(),
            metrics.unconfirmed.get(),
            metrics.returned.get(),
            metrics.nacked.get(),
            problem.as_deref().unwrap_or("broker ok"),
        ),
        Phase::Stopping => "stopping: waiting for outstanding confirms".into(),
        _ => format!(
            "waiting for RabbitMQ: {}",
            problem.as_deref().unwrap_or("connecting")
        ),
    }
}
