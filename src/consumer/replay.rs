//! Replaying dead letters: once the cause is mended (a constraint dropped, a producer fixed),
//! `consumer replay-dead-letters [--reason R]` moves the messages of the dead-letter queue back to
//! the exchange they came from, with their original routing key and properties, less our
//! `x-rejection-*` and `x-original-*` headers.
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
use tracing::info;

use crate::amqp::{self, AmqpError};
use crate::config::{AmqpConfig, ConfigError};

/// Most dead letters held unacknowledged at once (those of other reasons are held to the end).
const PREFETCH: u16 = 10_000;

/// With nothing more delivered for this long, the queue is taken to be read through.
const QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Moved back to their exchange (confirmed, then acknowledged in the dead-letter queue).
    pub replayed: u64,
    /// Of another reason, left in the dead-letter queue.
    pub skipped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read a password: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("the broker did not take a replayed message ({0}); it stays in the dead-letter queue")]
    Refused(String),
}

/// Moves the dead letters of `reason` (all, if `None`) back; see the module's doc.
pub async fn run(cfg: &AmqpConfig, reason: Option<&str>) -> Result<Replayed, ReplayError> {
    let password = crate::secret::loaded("amqp", cfg.password()?);
    let uri = cfg.connect_uri(password.as_ref());
    let conn = amqp::bounded(amqp::connect(
        &uri,
        "sistema-mensajes replay",
        amqp::LARGE_FRAME_MAX,
    ))
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
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        Ok::<_, AmqpError>((ch, u64::from(q.message_count())))
    })
    .await?;
    let writer = amqp::bounded(amqp::confirm_channel(conn)).await?;
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
    while done.replayed + done.skipped < total {
        let delivery = match tokio::time::timeout(QUIET, deliveries.next()).await {
            Ok(Some(d)) => d.map_err(AmqpError::from)?,
            Ok(None) | Err(_) => break,
        };
        let props = &delivery.properties;
        if reason.is_some_and(|r| amqp::header_str(props, "x-rejection-reason") != Some(r)) {
            done.skipped += 1;
            continue;
        }
        let exchange =
            amqp::header_str(props, "x-original-exchange").unwrap_or(cfg.exchange.as_str());
        let key =
            amqp::header_str(props, "x-original-routing-key").unwrap_or(cfg.routing_key.as_str());
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
        let confirm = amqp::bounded(publish).await?;
        match amqp::bounded(confirm).await? {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(returned)) => {
                return Err(ReplayError::Refused(format!(
                    "returned as unroutable from `{exchange}` with key `{key}`: {} {}",
                    returned.reply_code, returned.reply_text
                )))
            }
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                return Err(ReplayError::Refused("nacked".into()))
            }
        }
        amqp::bounded(delivery.acker.ack(BasicAckOptions::default())).await?;
        done.replayed += 1;
    }
    info!(
        message = "Replayed dead letters.",
        replayed = done.replayed,
        left_in_place = done.skipped
    );
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
