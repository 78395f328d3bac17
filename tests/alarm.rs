//! A RabbitMQ memory alarm, for real (`rabbitmqctl set_vm_memory_high_watermark`): the broker
//! blocks every connection that publishes. No await on the broker may hang, and the consumer must
//! go on storing and acknowledging readings, since acks are not publishes and a draining queue is
//! what clears an alarm. In a test binary of its own: the alarm is the whole node's, and cargo
//! runs test binaries one after another, so no other test publishes meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use sistema_mensajes::consumer;
use sistema_mensajes::producer::{self, Mode};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().unwrap();
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A memory alarm for as long as it lives; the watermark is put back when it is dropped, also
/// when the test fails.
struct MemoryAlarm(String);

impl MemoryAlarm {
    fn raise() -> Self {
        let before = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let before = match before.parse::<f64>() {
            Ok(_) => before,
            Err(_) => "0.4".to_owned(),
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0001"]);
        Self(before)
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.0]);
    }
}

/// Closes, from the broker's side, the connection whose client named itself `name`.
fn close_connection_named(name: &str) {
    let list = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"]);
    let pid = list
        .lines()
        .find(|l| l.contains(&format!("\"{name}\"")))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection named {name}: {list}"));
    rabbitmqctl(&["close_connection", pid, "closed by the test"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_alarm_neither_wedges_the_consumer_nor_stalls_the_producer() {
    let names = Names::new("alarm");
    let client = names.prepare().await;
    let mut ids = publish_readings(&client, &names, 100).await;
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(b"not-json".to_vec(), props())],
        )
        .await;
    ids.extend(publish_readings(&client, &names, 100).await);
    drop(client);

    let alarm = MemoryAlarm::raise();
    let observer = Client::connect().await;
    let running = start_consumer(names.consumer_config());
    let (deps, _, _) = &running;
    // Every valid reading stored and acknowledged during the alarm; the invalid one held, since
    // its dead-letter publish is blocked, and said so.
    names.assert_stored_exactly(ids.clone(), LIMIT).await;
    wait_until(
        LIMIT,
        "the queue drained, the invalid message held",
        || async {
            observer.ready(&names.queue).await == 0
                && deps.metrics.pending.get() == 1
                && deps.metrics.dead_letters_held.get() == 1
                && deps.metrics.blocked.get() == 1
        },
    )
    .await;
    let status = consumer::status_line(&deps.metrics, &deps.health);
    assert!(status.contains("RabbitMQ blocks publishers"), "{status}");

    // The blocked dead-letter connection dies (a broker restart would do the same). lapin keeps
    // a dead connection's `blocked` flag: taken at its word, dead-lettering stopped for good.
    close_connection_named("sistema-mensajes consumer dead letters");

    // The producer waits, healthily: its loop keeps beating and its status says why.
    let producing = producer::Deps::default();
    let token = CancellationToken::new();
    let run = tokio::spawn(producer::run(
        names.producer_config_via(&amqp_url()),
        Mode::Count(20),
        producing.clone(),
        token.clone(),
    ));
    wait_until(LIMIT, "the producer sees the block", || async {
        producing.metrics.blocked.get() == 1
    })
    .await;
    // Nothing-happens check, over a documented 4 s: the heartbeat never goes stale (the
    // watchdog withholds pings after a stall; the shipped WatchdogSec is 30 s).
    for _ in 0..40 {
        let since = producing.health.since_beat();
        assert!(
            since < Duration::from_secs(2),
            "no beat for {since:?} while blocked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = producer::status_line(&producing.metrics, &producing.health);
    assert!(status.contains("RabbitMQ blocks publishers"), "{status}");
    assert_eq!(producing.metrics.confirmed.get(), 0);

    drop(alarm);
    let summary = tokio::time::timeout(LIMIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_all_confirmed(summary, 20);
    assert_eq!(producing.metrics.blocked.get(), 0);
    names.wait_rows(220, LIMIT).await;
    // Dead-lettered exactly once: the publish that met the alarm first (the broker says
    // `connection.blocked` only then) is kept across attempts, not made again.
    wait_until(LIMIT, "the invalid message dead-lettered", || async {
        observer.ready(&names.dead_letter_queue).await >= 1 && deps.metrics.pending.get() == 0
    })
    .await;
    let dead = observer.drain(&names.dead_letter_queue).await;
    assert_eq!(dead.len(), 1, "one copy");
    assert_eq!(
        (dead[0].0.as_slice(), dead[0].1.as_str()),
        (&b"not-json"[..], "malformed_json")
    );
    assert_eq!(deps.metrics.dead_letters_held.get(), 0);
    assert_eq!(deps.metrics.blocked.get(), 0);
    stop_consumer(running).await;
}
