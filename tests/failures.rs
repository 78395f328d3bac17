//! Real failures: the consumer killed or stopped mid-stream, PostgreSQL and RabbitMQ cut off
//! through a proxy. Nothing confirmed may be lost or stored twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use sistema_mensajes::consumer::{self, Deps};
use sistema_mensajes::producer::{self, Mode};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(60);

fn spawn_consumer_binary(names: &Names) -> Child {
    Command::new(env!("CARGO_BIN_EXE_consumer"))
        .envs(names.consumer_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Publishes `n` readings with known ids, in chunks, from a background task.
fn publish_known(names: &Names, n: usize) -> (Vec<Uuid>, tokio::task::JoinHandle<()>) {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let (exchange, key, to_send) = (
        names.exchange.clone(),
        names.routing_key.clone(),
        ids.clone(),
    );
    let task = tokio::spawn(async move {
        let client = Client::connect().await;
        for chunk in to_send.chunks(500) {
            let msgs: Vec<_> = chunk
                .iter()
                .map(|id| (reading_with_id(*id), props()))
                .collect();
            client.publish_all(&exchange, &key, &msgs).await;
        }
    });
    (ids, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_killed_mid_stream_and_restarted_stores_every_reading_once() {
    let names = Names::new("sigkill");
    let client = names.prepare().await;
    let (ids, publishing) = publish_known(&names, 20_000);

    let mut first = spawn_consumer_binary(&names);
    wait_until(LIMIT, "some rows stored", || async {
        names.stored_so_far().await > 2_000
    })
    .await;
    first.kill().await.unwrap(); // SIGKILL: no chance to flush or ack
    let stored_at_kill = names.rows().await;
    assert!(
        stored_at_kill < 20_000,
        "killed too late to prove anything ({stored_at_kill})"
    );

    let mut second = spawn_consumer_binary(&names);
    publishing.await.unwrap();
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "queue empty", || async {
        client.ready(&names.queue).await == 0
    })
    .await;
    second.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_exits_0_and_loses_nothing() {
    let names = Names::new("sigterm");
    let client = names.prepare().await;
    let (ids, publishing) = publish_known(&names, 20_000);

    let mut child = spawn_consumer_binary(&names);
    wait_until(LIMIT, "some rows stored", || async {
        names.stored_so_far().await > 1_000
    })
    .await;
    sigterm(child.id());
    let status = tokio::time::timeout(Duration::from_secs(25), child.wait())
        .await
        .expect("exits within the shutdown timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");

    // What it did not store is back in the queue, ready for the next consumer.
    publishing.await.unwrap();
    let stored = names.rows().await;
    wait_until(LIMIT, "unstored readings requeued", || async {
        client.ready(&names.queue).await as i64 + stored == 20_000
    })
    .await;
    let token = CancellationToken::new();
    let next = tokio::spawn(consumer::run(
        names.consumer_config(),
        Deps::default(),
        token.clone(),
    ));
    names.assert_stored_exactly(ids, LIMIT).await;
    token.cancel();
    next.await.unwrap().unwrap();
}

/// While the writer waits on a slow database, a batch that comes due is held and keeps filling,
/// instead of being cut every `batch.max_wait` into many small inserts that wait in line anyway.
#[tokio::test(flavor = "multi_thread")]
async fn batches_that_come_due_while_the_database_is_slow_keep_filling() {
    let names = Names::new("slow-db-batches");
    names.create_schema().await;
    let proxy = Proxy::start(target_of(&pg_url())).await;
    let deps = Deps::default();
    let token = CancellationToken::new();
    let mut cfg = names.consumer_config_via(&amqp_url(), &proxy.url(&pg_url()));
    cfg.batch.max_size = 100;
    let consumer = tokio::spawn(consumer::run(cfg, deps.clone(), token.clone()));
    wait_running(&deps.health).await;
    let (mut ids, publishing) = publish_known(&names, 1);
    publishing.await.unwrap();
    names.wait_rows(1, LIMIT).await;
    let batches_before = deps.metrics.batch_size.get_sample_count();

    // PostgreSQL goes silent: the next batch (one reading) is stuck in its insert.
    proxy.pause();
    let (stuck, publishing) = publish_known(&names, 1);
    publishing.await.unwrap();
    ids.extend(stuck);
    // Then 250 readings in 25 groups, each group coming due (5 ms) well before the next.
    let client = Client::connect().await;
    for _ in 0..25 {
        ids.extend(publish_readings(&client, &names, 10).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(LIMIT, "all 251 received and unsettled", || async {
        deps.metrics.pending.get() == 251
    })
    .await;

    proxy.restore();
    names.assert_stored_exactly(ids, LIMIT).await;
    // The stuck batch of one, then 250 readings in full batches of 100: 100, 100, 50.
    let batches = deps.metrics.batch_size.get_sample_count() - batches_before;
    assert!(
        batches <= 4,
        "{batches} batches for 251 readings that came while the database was slow"
    );
    token.cancel();
    consumer.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn database_cut_off_keeps_messages_unacked_then_stores_them_all() {
    let names = Names::new("db-cut");
    names.create_schema().await;
    let proxy = Proxy::start(target_of(&pg_url())).await;
    let deps = Deps::default();
    let token = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(
        names.consumer_config_via(&amqp_url(), &proxy.url(&pg_url())),
        deps.clone(),
        token.clone(),
    ));
    wait_running(&deps.health).await;

    proxy.cut();
    const N: usize = 300;
    let (ids, publishing) = publish_known(&names, N);
    publishing.await.unwrap();
    wait_until(LIMIT, "inserts failing", || async {
        deps.metrics.insert_errors_total() >= 3
    })
    .await;
    // The broker itself says: all delivered, none acknowledged.
    wait_until(LIMIT, "all unacked at the broker", || async {
        unacked(&names.queue) == Some(N as u64)
    })
    .await;
    assert_eq!(names.rows().await, 0);
    assert_eq!(deps.metrics.processed.get(), 0);

    proxy.restore();
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "all acked", || async {
        unacked(&names.queue) == Some(0)
    })
    .await;
    assert_eq!(deps.metrics.processed.get(), N as u64);
    token.cancel();
    consumer.await.unwrap().unwrap();
}

type Running<T> = tokio::task::JoinHandle<T>;

/// The producer finishes with all `n` readings confirmed, the consumer stores each once and stops.
async fn all_confirmed_and_stored_once(
    names: &Names,
    n: u64,
    producing: Running<Result<producer::Summary, producer::ProducerError>>,
    (consumer, token): (
        Running<Result<(), consumer::ConsumerError>>,
        CancellationToken,
    ),
) {
    let summary = tokio::time::timeout(LIMIT, producing)
        .await
        .expect("producer finishes")
        .unwrap()
        .unwrap();
    assert_all_confirmed(summary, n);
    names.wait_rows(n, LIMIT).await;
    token.cancel();
    tokio::time::timeout(LIMIT, consumer)
        .await
        .expect("consumer stops")
        .unwrap()
        .unwrap();
}

/// Readings in a cut test: `STREAM` published at 2,000/s (ten seconds: a cut lands mid-stream),
/// returned once they flow (confirmed and stored).
const STREAM: u64 = 20_000;

async fn stream_flowing(
    names: &Names,
    mut pcfg: sistema_mensajes::config::ProducerConfig,
) -> (
    producer::Deps,
    Running<Result<producer::Summary, producer::ProducerError>>,
) {
    pcfg.simulation.rate = Some(2_000.0);
    let pdeps = producer::Deps::default();
    let producing = tokio::spawn(producer::run(
        pcfg,
        Mode::Count(STREAM),
        pdeps.clone(),
        CancellationToken::new(),
    ));
    wait_until(LIMIT, "stream flowing", || async {
        pdeps.metrics.confirmed.get() > 2_000 && names.stored_so_far().await > 1_000
    })
    .await;
    (pdeps, producing)
}

/// `urls` as `amqp.url`, a list of brokers.
fn brokers(urls: &[&str]) -> sistema_mensajes::config::BrokerUrls {
    let urls: Vec<url::Url> = urls.iter().map(|u| url::Url::parse(u).unwrap()).collect();
    urls.try_into().unwrap()
}

/// Two brokers (two proxies to the one RabbitMQ, standing for two nodes of a cluster that share the
/// queue). The link to the first is cut for good mid-stream: both daemons must go on through the
/// second, trying it first (not the broker just lost), the producer republishing what was
/// unconfirmed, and lose nothing.
#[tokio::test(flavor = "multi_thread")]
async fn when_one_broker_is_cut_both_daemons_go_on_through_the_next() {
    let names = Names::new("failover");
    names.create_schema().await;
    let first = Proxy::start(target_of(&amqp_url())).await;
    let second = Proxy::start(target_of(&amqp_url())).await;
    let list = brokers(&[&first.url(&amqp_url()), &second.url(&amqp_url())]);
    let mut ccfg = names.consumer_config();
    ccfg.amqp.url = list.clone();
    let cdeps = Deps::default();
    let token = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(ccfg, cdeps.clone(), token.clone()));
    wait_running(&cdeps.health).await;
    assert_eq!(second.connections(), 0, "both start on the first broker");

    let mut pcfg = names.producer_config_via(&amqp_url());
    pcfg.amqp.url = list;
    let (_, producing) = stream_flowing(&names, pcfg).await;
    let tried = first.attempts();
    first.cut(); // and never restored
    all_confirmed_and_stored_once(&names, STREAM, producing, (consumer, token)).await;
    // After a lost link the next broker is tried first, not the one just lost.
    assert_eq!(
        first.attempts(),
        tried,
        "a daemon tried the cut broker again"
    );
    assert!(
        second.connections() >= 2,
        "the consumer and the producer went on through the second broker ({} connections)",
        second.connections()
    );
}

/// A first broker that refuses connections is skipped at start by both daemons and by the
/// consumer's dead-letter link, each failed attempt counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_refuses_connections_is_skipped() {
    let names = Names::new("skip-broker");
    names.create_schema().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("amqp://guest@127.0.0.1:{closed}/%2f");
    let list = brokers(&[&dead, &amqp_url()]);
    let mut ccfg = names.consumer_config();
    ccfg.amqp.url = list.clone();
    let cdeps = Deps::default();
    let token = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(ccfg, cdeps.clone(), token.clone()));
    wait_running(&cdeps.health).await;

    const N: u64 = 2_000;
    let mut pcfg = names.producer_config_via(&amqp_url());
    pcfg.amqp.url = list;
    let pdeps = producer::Deps::default();
    let producing = tokio::spawn(producer::run(
        pcfg,
        Mode::Count(N),
        pdeps.clone(),
        CancellationToken::new(),
    ));
    // A malformed message, for the dead-letter link.
    let client = Client::connect().await;
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(b"{".to_vec(), props())],
        )
        .await;
    wait_until(LIMIT, "the malformed message dead-lettered", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    all_confirmed_and_stored_once(&names, N, producing, (consumer, token)).await;
    assert!(cdeps.metrics.amqp_connection_errors.get() >= 1);
    assert!(pdeps.metrics.amqp_connection_errors.get() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_connection_cut_both_daemons_reconnect_and_nothing_is_lost() {
    let names = Names::new("broker-cut");
    names.create_schema().await;
    let proxy = Proxy::start(target_of(&amqp_url())).await;
    let via_proxy = proxy.url(&amqp_url());
    let cdeps = Deps::default();
    let token = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(
        names.consumer_config_via(&via_proxy, &pg_url()),
        cdeps.clone(),
        token.clone(),
    ));
    wait_running(&cdeps.health).await;

    let (pdeps, producing) = stream_flowing(&names, names.producer_config_via(&via_proxy)).await;
    proxy.cut();
    wait_until(LIMIT, "both saw the cut", || async {
        cdeps.metrics.amqp_connection_errors.get() > 0
            && pdeps.metrics.amqp_connection_errors.get() > 0
    })
    .await;
    proxy.restore();

    all_confirmed_and_stored_once(&names, STREAM, producing, (consumer, token)).await;
}

/// The producer queues a burst of publishes before awaiting their writes: a cut while it publishes
/// as fast as it can fails writes in the middle of a burst. The reading that failed and those
/// behind it must go back to be republished, or they would never be confirmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_cut_while_publishing_unpaced_republishes_every_unwritten_reading() {
    let names = Names::new("publish-cut");
    names.create_schema().await;
    let proxy = Proxy::start(target_of(&amqp_url())).await;
    let cdeps = Deps::default();
    let token = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run(
        names.consumer_config(),
        cdeps.clone(),
        token.clone(),
    ));
    wait_running(&cdeps.health).await;

    const N: u64 = 60_000;
    let pdeps = producer::Deps::default();
    let producing = tokio::spawn(producer::run(
        names.producer_config_via(&proxy.url(&amqp_url())),
        Mode::Count(N),
        pdeps.clone(),
        CancellationToken::new(),
    ));
    for cut in 1..=3 {
        wait_until(LIMIT, "publishing again", || async {
            pdeps.metrics.confirmed.get() > cut * N / 5
        })
        .await;
        proxy.cut();
        wait_until(LIMIT, "the producer saw the cut", || async {
            pdeps.metrics.amqp_connection_errors.get() >= cut
        })
        .await;
        proxy.restore();
    }

    all_confirmed_and_stored_once(&names, N, producing, (consumer, token)).await;
    assert!(
        pdeps.metrics.republished.get() > 0,
        "nothing was republished"
    );
}
