//! Dead-lettering: invalid messages (and rows PostgreSQL refused) are republished to the
//! dead-letter exchange with their reason, `mandatory`, on a confirm channel. Only a message the
//! broker confirmed as routed is settled. When that fails (the exchange or its queue deleted, a
//! nack, a closed channel) the messages are held, unacknowledged, and retried with backoff on a
//! reopened channel after redeclaring the dead-letter exchange and queue; valid readings keep
//! flowing meanwhile, since settlement acknowledges only exact tags behind a held one.
//!
//! Dead letters go out on a connection of their own. RabbitMQ blocks a connection that publishes
//! during a memory or disk alarm, and lapin then writes nothing on it, acknowledgements included:
//! publishing on the consuming connection would stop the acks that drain the queue, which is
//! what clears the alarm. Every publish and the confirms are bounded; while the broker blocks
//! the dead-letter connection, nothing is tried and the messages stay held (visible in
//! `consumer_dead_letters_held`, `amqp_connection_blocked` and the status line).

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tracing::{error, info, warn};

use super::settle::Link;
use crate::amqp::{self, AmqpError};
use crate::broker::Brokers;
use crate::config::{AmqpConfig, RetryConfig};
use crate::metrics::ConsumerMetrics;
use crate::reading::Rejection;
use crate::retry;
use crate::telemetry::LogLimiter;

/// The bytes and properties of a delivery, kept until it is settled (to dead-letter it).
pub struct Raw {
    pub data: Vec<u8>,
    pub properties: BasicProperties,
    pub exchange: ShortString,
    pub routing_key: ShortString,
    /// The body's size before it was cut (a `too_large` body is kept only in part).
    pub truncated_from: Option<usize>,
}

impl Raw {
    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }
}

/// A message on its way to the dead-letter queue.
pub struct Invalid {
    pub tag: u64,
    pub raw: Raw,
    pub rejection: Rejection,
}

#[derive(Debug, thiserror::Error)]
enum DeadLetterError {
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Lapin(#[from] lapin::Error),
    #[error("the broker refused (nacked) a dead-letter message")]
    Nacked,
    #[error("the dead-letter exchange routed a message to no queue ({0})")]
    Unroutable(String),
}

/// A dead-letter publish under way: the publish, then its confirm.
type Publishing = BoxFuture<'static, Result<Confirmation, AmqpError>>;

/// A message waiting for the dead-letter queue, with its publish if one is still under way: one
/// that met a broker alarm (RabbitMQ says `connection.blocked` only when a publish arrives) is
/// kept for the next attempt, not given up, since lapin would send its frames once unblocked
/// anyway, and a second publish would put the message in the dead-letter queue twice. (If its
/// link closes meanwhile, the broker requeues the original and the kept publish is dropped: the
/// dead-letter queue may then get a second copy, with the same message id.)
struct Held {
    item: Invalid,
    publishing: Option<Publishing>,
}

pub struct DeadLetter {
    cfg: AmqpConfig,
    retry_cfg: RetryConfig,
    brokers: Brokers,
    /// The dead-letter connection, and its confirm channel.
    conn: Option<Connection>,
    channel: Option<Channel>,
    /// Messages not yet in the dead-letter queue, all of one link, unacknowledged.
    held: Vec<Held>,
    held_link: Option<Arc<Link>>,
    retry_at: Option<tokio::time::Instant>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    failing: bool,
    reject_log: LogLimiter,
    error_log: LogLimiter,
}

impl DeadLetter {
    pub fn new(cfg: AmqpConfig, retry_cfg: RetryConfig, brokers: Brokers) -> Self {
        Self {
            delays: Box::new(retry::delays(&retry_cfg)),
            cfg,
            retry_cfg,
            brokers,
            conn: None,
            channel: None,
            held: Vec::new(),
            held_link: None,
            retry_at: None,
            failing: false,
            reject_log: LogLimiter::new(10, Duration::from_secs(10)),
            error_log: LogLimiter::new(5, Duration::from_secs(10)),
        }
    }

    /// Messages held after a failure, waiting for [`retry`](Self::retry).
    pub fn holding(&self) -> usize {
        self.held.len()
    }

    /// When held messages are due for another attempt; `None` while none are held.
    pub fn retry_at(&self) -> Option<tokio::time::Instant> {
        match self.held.is_empty() {
            true => None,
            false => Some(self.retry_at.unwrap_or_else(tokio::time::Instant::now)),
        }
    }

    /// Dead-letters `invalid`, all received on `link`, together with what is held from before.
    /// Returns the tags now confirmed in the dead-letter queue, to be settled.
    pub async fn send(
        &mut self,
        link: &Arc<Link>,
        invalid: Vec<Invalid>,
        metrics: &ConsumerMetrics,
    ) -> Vec<u64> {
        self.forget_released(metrics);
        if self
            .held_link
            .as_ref()
            .is_some_and(|l| !Arc::ptr_eq(l, link))
        {
            // Held messages of an older link: it was closed and the broker has requeued them.
            self.held.clear();
        }
        self.held.extend(invalid.into_iter().map(|item| Held {
            item,
            publishing: None,
        }));
        self.held_link = Some(link.clone());
        metrics.dead_letters_held.set(self.held.len() as i64);
        let backing_off = self
            .retry_at
            .is_some_and(|at| at > tokio::time::Instant::now());
        if self.held.is_empty() || backing_off {
            return Vec::new();
        }
        self.attempt(metrics).await
    }

    /// Tries the held messages again. Returns their link and the tags to settle.
    pub async fn retry(&mut self, metrics: &ConsumerMetrics) -> Option<(Arc<Link>, Vec<u64>)> {
        self.forget_released(metrics);
        let link = self.held_link.clone()?;
        let tags = self.attempt(metrics).await;
        Some((link, tags))
    }

    fn forget_released(&mut self, metrics: &ConsumerMetrics) {
        if self.held_link.as_ref().is_some_and(|l| l.is_released()) {
            self.held.clear();
            self.held_link = None;
            metrics.dead_letters_held.set(0);
            metrics.blocked.set(0);
        }
    }

    async fn attempt(&mut self, metrics: &ConsumerMetrics) -> Vec<u64> {
        let items = std::mem::take(&mut self.held);
        let (done, failed, error) = self.publish(items).await;

        let now = Instant::now();
        for item in &done {
            metrics
                .rejected
                .with_label_values(&[item.rejection.reason.as_str()])
                .inc();
            if let Some(suppressed) = self.reject_log.allow(now) {
                warn!(
                    message = "Rejected a message; it is in the dead-letter queue.",
                    reason = item.rejection.reason.as_str(),
                    detail = %item.rejection.detail,
                    reading_id = item.raw.message_id().unwrap_or(""),
                    bytes = item.raw.data.len(),
                    suppressed,
                );
            }
        }
        self.held = failed;
        metrics.dead_letters_held.set(self.held.len() as i64);
        // Whether RabbitMQ blocks us while we have something to publish: with nothing held, a
        // block does not matter, and nothing would refresh the gauge until the next dead letter.
        let blocked = self
            .conn
            .as_ref()
            .is_some_and(|c| c.status().connected() && c.status().blocked());
        metrics
            .blocked
            .set(i64::from(blocked && !self.held.is_empty()));
        match error {
            None => {
                if self.failing {
                    info!("Dead-lettering works again.");
                    self.failing = false;
                    self.delays = Box::new(retry::delays(&self.retry_cfg));
                }
                self.retry_at = None;
            }
            Some(e) => {
                if !matches!(e, DeadLetterError::Amqp(AmqpError::Blocked)) {
                    // Blocked, the connection is fine and will be unblocked; anything else may
                    // have left the channel unusable.
                    self.channel = None;
                }
                self.failing = true;
                let delay = self.delays.next().unwrap_or(Duration::from_secs(1));
                self.retry_at = Some(tokio::time::Instant::now() + delay);
                if let Some(suppressed) = self.error_log.allow(now) {
                    error!(message = "Cannot dead-letter rejected messages; they stay unacknowledged and will be retried.", error = %e, error_type = "dead_letter_failed", stage = "sending", held = self.held.len(), retry_in_ms = delay.as_millis() as u64, suppressed);
                }
            }
        }
        done.into_iter().map(|i| i.tag).collect()
    }

    /// Publishes what is held (or goes on with a publish under way) and waits for the confirms,
    /// all within one bound: (confirmed, still held, first error). While the broker blocks the
    /// connection nothing is tried; a publish the bound cut short on a blocked connection is
    /// kept for the next attempt.
    async fn publish(
        &mut self,
        held: Vec<Held>,
    ) -> (Vec<Invalid>, Vec<Held>, Option<DeadLetterError>) {
        if self.conn.as_ref().is_some_and(|c| !c.status().connected()) {
            // Gone (a broker restart, say): lapin keeps a dead connection's `blocked` flag, so
            // forget it here, or it would look blocked forever. Publishes kept from it have
            // failed with it, and are made again below.
            self.conn = None;
            self.channel = None;
        }
        let blocked = |conn: &Option<Connection>| {
            conn.as_ref()
                .is_some_and(|c| c.status().connected() && c.status().blocked())
        };
        if blocked(&self.conn) {
            return (Vec::new(), held, Some(AmqpError::Blocked.into()));
        }
        let fresh = held.iter().any(|h| h.publishing.is_none());
        let channel = match fresh {
            true => match self.channel().await {
                Ok(ch) => Some(ch),
                Err(e) => return (Vec::new(), held, Some(e)),
            },
            false => None,
        };
        let mut items = Vec::with_capacity(held.len());
        let mut publishing = Vec::with_capacity(held.len());
        for h in held {
            let fut = match (h.publishing, &channel) {
                (Some(fut), _) => fut,
                (None, Some(ch)) => self.publishing(ch, &h.item),
                (None, None) => Box::pin(async { Err(AmqpError::Timeout(amqp::BROKER_TIMEOUT)) }),
            };
            items.push(h.item);
            publishing.push(fut);
        }
        let mut outcomes: Vec<Option<Result<Confirmation, AmqpError>>> =
            publishing.iter().map(|_| None).collect();
        let deadline = tokio::time::sleep(amqp::BROKER_TIMEOUT);
        tokio::pin!(deadline);
        std::future::poll_fn(|cx| {
            for (fut, outcome) in publishing.iter_mut().zip(outcomes.iter_mut()) {
                if outcome.is_none() {
                    if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                        *outcome = Some(r);
                    }
                }
            }
            match outcomes.iter().all(Option::is_some) || deadline.as_mut().poll(cx).is_ready() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await;
        let keep = blocked(&self.conn);
        let (mut done, mut failed, mut error) = (Vec::new(), Vec::new(), None);
        for ((item, fut), outcome) in items.into_iter().zip(publishing).zip(outcomes) {
            let outcome = match outcome {
                Some(Ok(Confirmation::Ack(None))) => {
                    done.push(item);
                    continue;
                }
                Some(Ok(Confirmation::Ack(Some(returned)))) => DeadLetterError::Unroutable(
                    format!("{} {}", returned.reply_code, returned.reply_text),
                ),
                Some(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => {
                    DeadLetterError::Nacked
                }
                Some(Err(e)) => e.into(),
                None if keep => {
                    failed.push(Held {
                        item,
                        publishing: Some(fut),
                    });
                    error.get_or_insert(AmqpError::Blocked.into());
                    continue;
                }
                None => AmqpError::Timeout(amqp::BROKER_TIMEOUT).into(),
            };
            failed.push(Held {
                item,
                publishing: None,
            });
            error.get_or_insert(outcome);
        }
        (done, failed, error)
    }

    /// One dead-letter publish and its confirm, as a future of its own (it may outlive an
    /// attempt; see [`Held`]).
    fn publishing(&self, channel: &Channel, item: &Invalid) -> Publishing {
        let props = amqp::dead_letter_properties(
            &item.raw.properties,
            &item.rejection,
            &item.raw.exchange,
            &item.raw.routing_key,
        );
        let props = match item.raw.truncated_from {
            Some(bytes) => amqp::mark_truncated(props, bytes),
            None => props,
        };
        let (channel, data) = (channel.clone(), item.raw.data.clone());
        let exchange = self.cfg.dead_letter_exchange.as_str().to_owned();
        Box::pin(async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let confirm = channel
                .basic_publish(exchange.as_str().into(), "".into(), options, &data, props)
                .await?;
            Ok(confirm.await?)
        })
    }

    /// The confirm channel on the dead-letter connection, opened (with the connection if it is
    /// gone, and the dead-letter exchange and queue declared) if there is none or it failed.
    async fn channel(&mut self) -> Result<Channel, DeadLetterError> {
        if let Some(ch) = &self.channel {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        if !self.conn.as_ref().is_some_and(|c| c.status().connected()) {
            let name = "sistema-mensajes consumer dead letters";
            self.conn = Some(self.brokers.connect_next(name, None).await?);
        }
        let conn = self
            .conn
            .as_ref()
            .ok_or(AmqpError::Timeout(amqp::BROKER_TIMEOUT))?;
        let cfg = &self.cfg;
        let ch = amqp::bounded(async {
            let ch = amqp::confirm_channel(conn).await?;
            amqp::declare_dead_letter(&ch, cfg).await?;
            Ok::<_, AmqpError>(ch)
        })
        .await?;
        self.channel = Some(ch.clone());
        Ok(ch)
    }

    /// Closes the dead-letter connection (bounded).
    pub async fn close(&mut self) {
        self.channel = None;
        if let Some(conn) = self.conn.take() {
            amqp::close(&conn, "consumer stopping").await;
        }
    }
}
