//! The fault paths of issue 8, each injected for real: a database cut off during shutdown, a
//! dead-letter exchange deleted under a running consumer, broker links lost with deliveries in
//! hand, a database connection that goes silent, a broker that never finishes its handshake,
//! an unbound queue under the producer, and PostgreSQL refusing us for reasons an outage is not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::time::Duration;

use common::*;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sistema_mensajes::producer::{self, Mode};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

async fn publish_raw(client: &Client, names: &Names, body: &[u8]) {
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(body.to_vec(), props())],
        )
        .await;
}

/// Issue 8, loss 1: SIGTERM while the database is away, with an invalid message queued behind
/// the batch that could not be stored. The later ack must not cover the unstored readings.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_database_outage_leaves_the_unstored_batch_in_the_queue() {
    let names = Names::new("term-outage");
    let client = names.prepare().await;
    let proxy = Proxy::start(target_of(&pg_url())).await;
    let mut cfg = names.consumer_config_via(&amqp_url(), &proxy.url(&pg_url()));
    cfg.batch.max_size = 10; // the 10 readings are one batch, the invalid message the next
    let first = start_running(cfg).await;

    proxy.cut();
    let ids = publish_readings(&client, &names, 10).await;
    wait_until(LIMIT, "the writer failing to store the batch", || async {
        first.0.metrics.insert_errors_total() >= 1
    })
    .await;
    publish_raw(&client, &names, b"not-json").await;
    wait_until(LIMIT, "the invalid message received too", || async {
        first.0.metrics.pending.get() == 11
    })
    .await;
    let metrics = first.0.metrics.clone();
    stop_consumer(first).await;

    assert_eq!(names.rows().await, 0);
    assert_eq!(metrics.pending.get(), 0, "nothing pending once stopped");
    // The invalid message is dead-lettered if it was a batch of its own; if the reader cut the
    // readings into two batches (a pause of a millisecond under load does), it may share the
    // second with some of them, and is then back in the queue with them, unsettled.
    wait_until(LIMIT, "the 10 readings back in the queue", || async {
        let queued = client.ready(&names.queue).await;
        queued >= 10 && queued + client.ready(&names.dead_letter_queue).await == 11
    })
    .await;

    proxy.restore();
    let second = start_consumer(names.consumer_config());
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "the invalid message dead-lettered once", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    stop_consumer(second).await;
}

/// Issue 8, loss 2: the dead-letter exchange (then its queue) disappears under a running
/// consumer. Invalid messages are held and dead-lettered once it is redeclared; valid readings
/// behind them are stored meanwhile, and nothing is acked that was not settled.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_dead_letter_exchange_or_queue_is_redeclared_and_nothing_is_lost() {
    let names = Names::new("dlx-gone");
    let client = names.prepare().await;
    let running = start_running(names.consumer_config()).await;
    let metrics = running.0.metrics.clone();
    let mut ids = Vec::new();

    publish_raw(&client, &names, b"not-json #1").await;
    wait_until(LIMIT, "the first dead letter", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;

    client
        .channel
        .exchange_delete(
            names.dead_letter_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    publish_raw(&client, &names, b"not-json #2").await;
    ids.extend(publish_readings(&client, &names, 20).await);
    wait_until(
        LIMIT,
        "the second dead letter, after redeclaring",
        || async { client.ready(&names.dead_letter_queue).await == 2 },
    )
    .await;

    client
        .channel
        .queue_delete(
            names.dead_letter_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    publish_raw(&client, &names, b"not-json #3").await;
    ids.extend(publish_readings(&client, &names, 20).await);
    names.assert_stored_exactly(ids.clone(), LIMIT).await;
    // The exchange routed #3 nowhere: the return makes the consumer redeclare the queue.
    wait_until(
        LIMIT,
        "the third dead letter in a redeclared queue",
        || async {
            unacked(&names.dead_letter_queue).is_some()
                && client.ready(&names.dead_letter_queue).await == 1
        },
    )
    .await;
    wait_until(LIMIT, "everything settled", || async {
        unacked(&names.queue) == Some(0) && metrics.pending.get() == 0
    })
    .await;
    assert_eq!(client.ready(&names.queue).await, 0);
    assert_eq!(metrics.processed.get(), ids.len() as u64);
    stop_consumer(running).await;
}

/// `consumer_pending_messages` counts deliveries received and not settled on a live channel:
/// through a database outage, a broker link lost with deliveries in hand (a bad message among
/// them), the redelivery, and shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn pending_is_exact_through_outages_reconnects_and_shutdown() {
    let names = Names::new("pending");
    let client = names.prepare().await;
    let pg = Proxy::start(target_of(&pg_url())).await;
    let broker = Proxy::start(target_of(&amqp_url())).await;
    let running =
        start_consumer(names.consumer_config_via(&broker.url(&amqp_url()), &pg.url(&pg_url())));
    let metrics = running.0.metrics.clone();
    wait_running(&running.0.health).await;

    let mut ids = publish_readings(&client, &names, 100).await;
    names.wait_rows(100, LIMIT).await;
    wait_until(LIMIT, "nothing pending", || async {
        metrics.pending.get() == 0
    })
    .await;

    pg.cut();
    ids.extend(publish_readings(&client, &names, 50).await);
    publish_raw(&client, &names, b"{\"station_id\": 5}").await;
    wait_until(LIMIT, "51 pending while the database is away", || async {
        metrics.pending.get() == 51
    })
    .await;

    // The broker link goes: everything in hand returns to the queue, and comes back.
    broker.cut();
    wait_until(LIMIT, "the link lost", || async {
        metrics.amqp_connection_errors.get() >= 1
    })
    .await;
    broker.restore();
    wait_until(
        LIMIT,
        "redelivered and pending again, not twice",
        || async { metrics.pending.get() == 51 && unacked(&names.queue) == Some(51) },
    )
    .await;

    pg.restore();
    names.wait_rows(150, LIMIT).await;
    wait_until(LIMIT, "all settled", || async {
        metrics.pending.get() == 0 && unacked(&names.queue) == Some(0)
    })
    .await;
    names.assert_stored_exactly(ids, LIMIT).await;
    assert_eq!(client.ready(&names.dead_letter_queue).await, 1);

    // Shutdown during an outage: what is in hand goes back, and nothing stays "pending".
    pg.cut();
    publish_readings(&client, &names, 30).await;
    wait_until(LIMIT, "30 pending", || async {
        metrics.pending.get() == 30
    })
    .await;
    stop_consumer(running).await;
    assert_eq!(metrics.pending.get(), 0);
    wait_until(LIMIT, "the 30 back in the queue", || async {
        client.ready(&names.queue).await == 30
    })
    .await;
}

/// A database connection that goes silent (no RST, no answer) times out, is dropped and a new
/// one is opened; the old one is never waited on again.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_connection_that_timed_out_is_replaced() {
    let names = Names::new("pg-silent");
    let client = names.prepare().await;
    let pg = Proxy::start(target_of(&pg_url())).await;
    let mut cfg = names.consumer_config_via(&amqp_url(), &pg.url(&pg_url()));
    cfg.postgres.statement_timeout = Duration::from_millis(500);
    let running = start_running(cfg).await;
    let before = pg.connections();

    pg.hang_open_connections();
    let ids = publish_readings(&client, &names, 10).await;
    // One timeout (0.6 s) and a reconnect; reusing the silent connection would never store.
    names.assert_stored_exactly(ids, LIMIT).await;
    assert!(
        running.0.metrics.insert_errors_total() >= 1,
        "the insert timed out first"
    );
    assert!(pg.connections() > before, "a new connection was opened");
    stop_consumer(running).await;
}

/// A broker that accepts TCP but never answers the AMQP handshake (and never closes: no real
/// broker behind it, whose own handshake timeout would end it) fails the attempt after
/// `BROKER_TIMEOUT`, and the consumer tries again instead of hanging.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_never_finishes_the_handshake_does_not_hang_the_consumer() {
    let names = Names::new("amqp-silent");
    names.create_schema().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn); // accepted, never answered, never closed
        }
    });
    let running = start_consumer(names.consumer_config_via(&url, &pg_url()));
    wait_until(LIMIT, "a failed, timed-out attempt", || async {
        running.0.metrics.amqp_connection_errors.get() >= 1
    })
    .await;
    assert_eq!(
        running.0.health.phase(),
        sistema_mensajes::health::Phase::WaitingForBroker
    );
    stop_consumer(running).await;
    held.abort();
}

/// With the queue unbound, every reading comes back unroutable: the producer pauses its
/// simulation, holds no more than its confirm window, and says why; once bound again, every
/// reading it retried is confirmed and in the queue.
#[tokio::test(flavor = "multi_thread")]
async fn an_unbound_queue_pauses_the_producer_with_bounded_memory_until_it_is_bound_again() {
    let names = Names::new("unbound");
    let client = Client::connect().await;
    names.predeclare_like_the_old_system(&client.channel).await;
    let mut cfg = names.producer_config_via(&amqp_url());
    cfg.simulation.rate = Some(5_000.0);
    cfg.simulation.confirm_window = 64;
    // Republish cycles of at most 0.5 s. Only the readings in flight when the binding goes come
    // back (the simulation pauses meanwhile), a handful or up to the window as timing has it, so
    // with the default backoff 500 returns took 57 s of the 60 s limit in one CI run and more
    // in the next.
    cfg.retry = fast_retry();
    let deps = producer::Deps::default();
    let token = CancellationToken::new();
    let run = tokio::spawn(producer::run(
        cfg,
        Mode::Simulate,
        deps.clone(),
        token.clone(),
    ));
    wait_until(LIMIT, "readings confirmed", || async {
        deps.metrics.confirmed.get() >= 100
    })
    .await;
    // The producer declares the binding when it connects: remove it only now.
    names.unbind(&client.channel).await;
    let peak = std::sync::atomic::AtomicI64::new(0);
    wait_until(
        LIMIT,
        "many returns, with the retry queue bounded",
        || async {
            peak.fetch_max(
                deps.metrics.unconfirmed.get(),
                std::sync::atomic::Ordering::Relaxed,
            );
            deps.metrics.returned.get() >= 200
        },
    )
    .await;
    let peak = peak.into_inner();
    assert!(
        peak <= 64,
        "held {peak} readings: more than the confirm window"
    );
    let status = producer::status_line(&deps.metrics, &deps.health);
    assert!(
        status.contains("unroutable") && status.contains(&names.queue),
        "{status}"
    );

    names.bind(&client.channel).await;
    wait_until(LIMIT, "readings confirmed again", || async {
        deps.metrics.confirmed.get() > 1_000 && deps.health.problem().is_none()
    })
    .await;
    token.cancel();
    let summary = run.await.unwrap().unwrap();
    assert_eq!(summary.unconfirmed, 0);
    assert_eq!(
        u64::from(client.ready(&names.queue).await),
        summary.confirmed,
        "every confirmed reading is in the queue"
    );
}

/// While the binding comes and goes, routed and unroutable readings are confirmed in the same
/// runs, and lapin hands each `basic.return` to whichever confirm of the run it completes first
/// (lapin's `Acknowledgements::complete_pending`): a routed reading may carry another's return,
/// and the unroutable one a plain ack. Every reading the producer counts as confirmed must still
/// be in the queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_return_handed_to_another_readings_confirm_still_republishes_its_own_reading() {
    const N: u64 = 20_000;
    let names = Names::new("returns");
    let client = Client::connect().await;
    names.predeclare_like_the_old_system(&client.channel).await;
    let mut cfg = names.producer_config_via(&amqp_url());
    cfg.simulation.rate = Some(0.0);
    cfg.retry = fast_retry();
    let deps = producer::Deps::default();
    let run = tokio::spawn(producer::run(
        cfg,
        Mode::Count(N),
        deps.clone(),
        CancellationToken::new(),
    ));
    // The producer declares the binding when it connects: toggle it once that is done.
    wait_until(LIMIT, "readings confirmed", || async {
        deps.metrics.confirmed.get() >= 1
    })
    .await;
    let mut toggles = 0;
    while !run.is_finished() && toggles < 2_000 {
        names.unbind(&client.channel).await;
        tokio::time::sleep(Duration::from_millis(3)).await;
        names.bind(&client.channel).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        toggles += 1;
    }
    names.bind(&client.channel).await;
    let summary = tokio::time::timeout(LIMIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_all_confirmed(summary, N);
    assert_eq!(
        deps.metrics.confirmed.get(),
        N,
        "each reading counted once in producer_messages_confirmed_total, a late return's too"
    );
    assert!(
        deps.metrics.returned.get() > 0,
        "no reading came back: the binding never went while readings were in flight"
    );
    let mut ids = std::collections::HashSet::new();
    while let Some(msg) = client
        .channel
        .basic_get(
            names.queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        ids.insert(msg.delivery.properties.message_id().clone().unwrap());
    }
    assert_eq!(
        ids.len() as u64,
        N,
        "confirmed readings missing from the queue ({} returns over {toggles} unbinds)",
        deps.metrics.returned.get()
    );
}

/// PostgreSQL refusing our role, or a database that does not exist, is not an outage: the
/// status names the cause. The consumer keeps retrying, and starts once the role exists.
#[tokio::test(flavor = "multi_thread")]
async fn errors_a_retry_cannot_fix_are_named_and_a_role_created_later_is_picked_up() {
    let names = Names::new("roles");
    let role = names.schema.clone();
    let mut url = url::Url::parse(&pg_url()).unwrap();
    url.set_username(&role).unwrap();
    let running = start_consumer(names.consumer_config_via(&amqp_url(), url.as_str()));
    wait_until(LIMIT, "a status naming the credentials", || async {
        running
            .0
            .health
            .problem()
            .unwrap_or_default()
            .contains("refused our credentials")
    })
    .await;

    let mut missing_db = url::Url::parse(&pg_url()).unwrap();
    missing_db.set_path(&format!("/{}", names.schema));
    let other = start_consumer(names.consumer_config_via(&amqp_url(), missing_db.as_str()));
    wait_until(LIMIT, "a status naming the missing database", || async {
        other
            .0
            .health
            .problem()
            .unwrap_or_default()
            .contains("database does not exist")
    })
    .await;
    stop_consumer(other).await;

    let admin = pg_client(&pg_url()).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE postgres TO {role};"
        ))
        .await
        .unwrap();
    wait_running(&running.0.health).await;
    stop_consumer(running).await;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {s} CASCADE; REVOKE CREATE ON DATABASE postgres FROM {role}; DROP ROLE {role};",
            s = names.schema
        ))
        .await
        .unwrap();
}

/// A schema named like an SQL keyword is valid config, and works: identifiers are quoted.
#[tokio::test(flavor = "multi_thread")]
async fn a_schema_named_like_a_keyword_works() {
    let names = Names::new("keyword");
    let client = Client::connect().await;
    names.predeclare_like_the_old_system(&client.channel).await;
    let mut cfg = names.consumer_config();
    cfg.postgres.schema = "user".to_owned().try_into().unwrap();
    let running = start_running(cfg).await;
    publish_readings(&client, &names, 3).await;
    let pg = pg_client(&pg_url()).await;
    wait_until(LIMIT, "rows in schema \"user\"", || async {
        let row = pg
            .query_one("SELECT count(*) FROM \"user\".weather_logs", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0) >= 3
    })
    .await;
    stop_consumer(running).await;
    pg.batch_execute("DROP SCHEMA \"user\" CASCADE")
        .await
        .unwrap();
}

/// `GET /metrics` on a fresh connection; `None` if it fails.
async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

/// Idle connections to `/metrics` hold neither the consumer's file descriptors nor the next
/// real scrape: beyond a small limit, each new connection closes the oldest.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_idle_metrics_connections_starves_neither_a_scrape_nor_the_pipeline() {
    let names = Names::new("scrape-flood");
    let client = names.prepare().await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let mut env = names.consumer_env();
    env.retain(|(k, _)| k != "CONSUMER_METRICS__LISTEN");
    env.push(("CONSUMER_METRICS__LISTEN".into(), addr.clone()));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_consumer"));
    cmd.envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // A small descriptor limit, as `LimitNOFILE=` might set: idle scrapers must not use it up.
    // SAFETY: setrlimit is async-signal-safe, and nothing else runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 128,
                rlim_max: 128,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_until(LIMIT, "metrics served", || async {
        scrape(&addr).await.is_some()
    })
    .await;

    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let body = tokio::time::timeout(Duration::from_secs(3), scrape(&addr))
        .await
        .expect("a scrape answers within 3 s during the flood")
        .expect("a scrape succeeds during the flood");
    assert!(body.contains("messages_processed_total"), "{body}");
    let ids = publish_readings(&client, &names, 100).await;
    names.assert_stored_exactly(ids, LIMIT).await;
    drop(idle);
    child.kill().await.unwrap();
}
