//! Replaying dead letters: once the cause is mended (a constraint dropped, a producer fixed),
//! `consumer replay-dead-letters [--reason R]` moves the messages of the dead-letter queue back to
//! our exchange with our routing key (`amqp.exchange`, `amqp.routing_key`), never where their
//! `x-original-*` headers point (whoever may dead-letter writes those), with their properties,
//! less our `x-rejection-*` and `x-original-*` headers.
//!
//! Each one is republished with publisher confirms, `mandatory`, and only a positive, routed
//! confirm acknowledges it in the dead-letter queue. A crash between the two leaves it in both
//! queues; the copy in the main queue then carries the same message id (the property, or the
//! body's own), so the consumer stores it once all the same. Messages of another reason are left
//! unacknowledged, and go back to the dead-letter queue in place when the replay closes.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use tracing::{info, warn};

use crate::amqp::{self, AmqpError};
use crate::config::{AmqpConfig, ConfigError};

/// With nothing more delivered for this long, the queue is taken to be read through.
const QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Moved back to their exchange (confirmed, then acknowledged in the dead-letter queue).
    pub replayed: u64,
    /// Of another reason, left in the dead-letter queue.
    pub skipped: u64,
    /// Left in place because their body was cut when they were dead-lettered (`too_large`).
    pub truncated: u64,
    /// Left in place because the broker did not take them (returned as unroutable, nacked, or
    /// their exchange gone).
    pub failed: u64,
    /// Not looked at: the run ended first (the queue went quiet, or RabbitMQ stopped taking
    /// publishes). Run it again.
    pub unexamined: u64,
}

impl Replayed {
    /// Whether every message of the reason asked for was replayed.
    pub fn complete(&self) -> bool {
        self.failed == 0 && self.unexamined == 0
    }

    /// Prints the summary; `Err` if the run left messages of the reason asked for behind.
    pub fn finished(self) -> Result<(), ReplayError> {
        println!("{self}");
        match self.complete() {
            true => Ok(()),
            false => Err(ReplayError::Incomplete(self)),
        }
    }
}

impl std::fmt::Display for Replayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} replayed, {} of other reasons left in place, {} truncated left in place, {} refused by the broker left in place, {} not examined",
            self.replayed, self.skipped, self.truncated, self.failed, self.unexamined
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read a password: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("not every dead letter was replayed ({0}); run it again once the cause is found")]
    Incomplete(Replayed),
}

/// Moves the dead letters of `reason` (all, if `None`) back; see the module's doc.
pub async fn run(cfg: &AmqpConfig, reason: Option<&str>) -> Result<Replayed, ReplayError> {
    let password = crate::secret::loaded("amqp", cfg.password()?);
    let (conn, _) = cfg
        .brokers(password.as_ref())
        .connect("sistema-mensajes replay", Some(amqp::LARGE_FRAME_MAX))
        .await?;
    let result = replay(&conn, cfg, reason).await;
    // Closing returns whatever was not acknowledged (other reasons) to the dead-letter queue.
    amqp::close(&conn, "replay done").await;
    result
}

async fn replay(
    conn: &lapin::Connection,
    cfg: &AmqpConfig,
    reason: Option<&str>,
) -> Result<Replayed, ReplayError> {
    let queue = cfg.dead_letter_queue.as_str();
    let (reader, total) = amqp::bounded(async {
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = ch
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        ch.basic_qos(0, BasicQosOptions::default()).await?;
        Ok::<_, AmqpError>((ch, u64::from(q.message_count())))
    })
    .await?;
    let mut writer = amqp::bounded(amqp::confirm_channel(conn)).await?;
    let mut deliveries = amqp::bounded(reader.basic_consume(
        queue.into(),
        "sistema-mensajes-replay".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await?;
    info!(
        message = "Replaying dead letters.",
        queue,
        waiting = total,
        reason = reason.unwrap_or("any")
    );
    let mut done = Replayed::default();
    // Only what was there at the start: what the consumer dead-letters again meanwhile is not
    // replayed in a loop.
    let mut seen = 0;
    while seen < total {
        let delivery = match tokio::time::timeout(QUIET, deliveries.next()).await {
            Ok(Some(d)) => d.map_err(AmqpError::from)?,
            Ok(None) | Err(_) => break,
        };
        seen += 1;
        let props = &delivery.properties;
        if reason.is_some_and(|r| amqp::header_str(props, "x-rejection-reason") != Some(r)) {
            done.skipped += 1;
            continue;
        }
        // Cut when dead-lettered: marked so since the cut was made; `too_large` ones from before
        // carry no mark, but were cut all the same.
        let cut = props
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key("x-body-truncated"));
        if cut || amqp::header_str(props, "x-rejection-reason") == Some("too_large") {
            done.truncated += 1;
            continue;
        }
        // Always to our exchange and key, never where the letter's headers point: anyone who
        // may write to the dead-letter exchange (the consumer's user) writes those headers.
        let (exchange, key) = (cfg.exchange.as_str(), cfg.routing_key.as_str());
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let publish = writer.basic_publish(
            exchange.into(),
            key.into(),
            options,
            &delivery.data,
            original_properties(props),
        );
        let outcome = match amqp::bounded(publish).await {
            Ok(confirm) => amqp::bounded(confirm).await,
            Err(e) => Err(e),
        };
        if matches!(outcome, Err(AmqpError::Timeout(_))) || conn.status().blocked() {
            // No answer, or RabbitMQ blocks our publishes (an alarm): the publish may still go
            // out once unblocked, so it is neither failed nor retried; stop here, and it goes back
            // to the dead-letter queue unacknowledged with the rest.
            warn!(
                message = "RabbitMQ does not take publishes now (an alarm?); stopping the replay.",
                exchange,
                routing_key = key
            );
            seen -= 1;
            break;
        }
        let refused = match outcome {
            Ok(Confirmation::Ack(None)) => None,
            Ok(Confirmation::Ack(Some(returned))) => Some(format!(
                "returned as unroutable ({} {})",
                returned.reply_code, returned.reply_text
            )),
            Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => Some("nacked".to_owned()),
            // A missing exchange closes the channel (NOT_FOUND): open another and go on.
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = refused {
            warn!(message = "The broker did not take a replayed message; it stays in the dead-letter queue.", exchange, routing_key = key, why);
            done.failed += 1;
            if !writer.status().connected() {
                writer = amqp::bounded(amqp::confirm_channel(conn)).await?;
            }
            continue;
        }
        amqp::bounded(delivery.acker.ack(BasicAckOptions::default())).await?;
        done.replayed += 1;
    }
    done.unexamined = total - seen;
    info!(message = "Replayed dead letters.", summary = %done);
    Ok(done)
}

/// The properties the message had before it was dead-lettered: ours removed from its headers.
fn original_properties(dead: &BasicProperties) -> BasicProperties {
    let mut props = dead.clone();
    if let Some(headers) = dead.headers() {
        let mut kept = FieldTable::default();
        for (k, v) in headers.inner() {
            let ours = ["x-rejection-", "x-original-", "x-rejected-at"]
                .iter()
                .any(|p| k.as_str().starts_with(p));
            if !ours {
                kept.insert(ShortString::from(k.as_str()), v.clone());
            }
        }
        props = props.with_headers(kept);
    }
    props
}
