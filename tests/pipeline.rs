//! The pipeline against real RabbitMQ and PostgreSQL: readings in, rows out, bad input contained.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use sistema_mensajes::consumer::{self, Deps};
use sistema_mensajes::producer::{self, Mode};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LIMIT: Duration = Duration::from_secs(30);

/// Starts the consumer in-process; returns its deps (metrics) and a handle.
fn start_consumer(
    cfg: sistema_mensajes::config::ConsumerConfig,
) -> (
    Deps,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), consumer::ConsumerError>>,
) {
    let deps = Deps::default();
    let token = CancellationToken::new();
    let handle = tokio::spawn(consumer::run(cfg, deps.clone(), token.clone()));
    (deps, token, handle)
}

#[tokio::test(flavor = "multi_thread")]
async fn n_readings_in_give_n_rows_out_and_an_empty_queue() {
    let names = Names::new("n-in-n-out");
    names.create_schema().await;
    let (deps, token, consumer) = start_consumer(names.consumer_config());
    const N: u64 = 3000;
    produce_confirmed(&names, N).await;
    names.wait_rows(N, LIMIT).await;
    let client = Client::connect().await;
    wait_until(LIMIT, "queue empty and acked", || async {
        deps.metrics.pending.get() == 0 && client.ready(&names.queue).await == 0
    })
    .await;
    assert_eq!(deps.metrics.processed.get(), N);
    token.cancel();
    consumer.await.unwrap().unwrap();
    assert_eq!(names.rows().await, N as i64, "nothing more after shutdown");
    assert!(client.drain(&names.dead_letter_queue).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn old_four_field_messages_from_a_plain_client_are_stored() {
    let names = Names::new("old-client");
    let client = names.prepare().await;
    let bodies: Vec<_> = (0..5)
        .map(|i| {
            (
                old_reading(&format!("STATION-00{i}"), 20.0 + f64::from(i)),
                lapin::BasicProperties::default(),
            )
        })
        .collect();
    client
        .publish_all(&names.exchange, &names.routing_key, &bodies)
        .await;

    let (_deps, token, consumer) = start_consumer(names.consumer_config());
    names.wait_rows(5, LIMIT).await;
    let pg = pg_client(&pg_url()).await;
    let row = pg
        .query_one(
            &format!("SELECT temperature, humidity, pressure, measured_at IS NULL, received_at IS NOT NULL FROM {}.weather_logs WHERE station_id = 'STATION-003'", names.schema),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, f64>(0), 23.0);
    assert_eq!(row.get::<_, f64>(1), 55.02);
    assert_eq!(row.get::<_, f64>(2), 1012.33);
    assert!(row.get::<_, bool>(3) && row.get::<_, bool>(4));
    token.cancel();
    consumer.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_twice_gives_one_row() {
    let names = Names::new("twice");
    names.create_schema().await;
    let (deps, token, consumer) = start_consumer(names.consumer_config());
    let client = Client::connect().await;
    wait_running(&deps.health).await;
    let id = Uuid::now_v7();
    let old = old_reading("STATION-009", 1.5);
    let msgs = vec![
        (reading_with_id(id), props()),
        (reading_with_id(id), props()),
        (old.clone(), props()),
        (old, props()),
    ];
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;
    wait_until(LIMIT, "four messages acked", || async {
        deps.metrics.processed.get() == 4
    })
    .await;
    assert_eq!(names.rows().await, 2);
    assert_eq!(deps.metrics.duplicates.get(), 2);
    // The completeness rule's count of new rows: the duplicates add none.
    assert_eq!(deps.metrics.rows_inserted.get(), 2);
    assert!(names.stored_ids().await.contains(&id));
    token.cancel();
    consumer.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_dead_lettered_with_their_reason_and_block_nothing() {
    let names = Names::new("malformed");
    names.create_schema().await;
    let (deps, token, consumer) = start_consumer(names.consumer_config());
    let client = Client::connect().await;
    wait_running(&deps.health).await;

    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"station_id\": \"S\", ".to_vec(), "malformed_json"),
        (
            br#"{"station_id":"S","temperature":"warm","humidity":1,"pressure":1000}"#.to_vec(),
            "wrong_type",
        ),
        (
            br#"{"station_id":"S","humidity":1,"pressure":1000}"#.to_vec(),
            "missing_field",
        ),
        (
            br#"{"station_id":"S","temperature":75.5,"humidity":1,"pressure":1000}"#.to_vec(),
            "out_of_range",
        ),
        (
            br#"{"station_id":"S","temperature":1e400,"humidity":1,"pressure":1000}"#.to_vec(),
            "non_finite",
        ),
        (vec![b'x'; 10_000], "too_large"),
        (vec![0xff, 0xfe, b'{', b'}'], "not_utf8"),
        (Vec::new(), "empty"),
        (b"[1, 2, 3]".to_vec(), "not_object"),
    ];
    // Valid and invalid interleaved: every valid one must get through.
    let mut msgs = Vec::new();
    let mut valid_ids = Vec::new();
    for (body, _) in &bad {
        let id = Uuid::now_v7();
        valid_ids.push(id);
        msgs.push((reading_with_id(id), props()));
        msgs.push((body.clone(), props()));
    }
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;

    wait_until(LIMIT, "all valid rows", || async {
        names.stored_so_far().await == bad.len() as i64
    })
    .await;
    wait_until(LIMIT, "dead letters", || async {
        client.ready(&names.dead_letter_queue).await == bad.len() as u32
    })
    .await;
    let mut got: Vec<_> = client.drain(&names.dead_letter_queue).await;
    got.sort();
    // A body over the limit is dead-lettered cut to it (and marked so).
    let limit = names.consumer_config().validation.max_message_bytes;
    let mut want: Vec<_> = bad
        .iter()
        .map(|(b, r)| (b[..b.len().min(limit)].to_vec(), r.to_string()))
        .collect();
    want.sort();
    assert_eq!(
        got.iter()
            .map(|(b, r, _)| (b.clone(), r.clone()))
            .collect::<Vec<_>>(),
        want
    );
    assert!(got.iter().all(|(_, _, detail)| !detail.is_empty()));
    let mut stored = names.stored_ids().await;
    stored.sort();
    valid_ids.sort();
    assert_eq!(stored, valid_ids);
    for (_, reason) in &bad {
        assert_eq!(
            deps.metrics.rejected.with_label_values(&[reason]).get(),
            1,
            "{reason}"
        );
    }
    wait_until(LIMIT, "main queue empty", || async {
        client.ready(&names.queue).await == 0 && deps.metrics.pending.get() == 0
    })
    .await;

    // Still running, and still storing.
    assert!(!consumer.is_finished());
    let id = Uuid::now_v7();
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(reading_with_id(id), props())],
        )
        .await;
    wait_until(LIMIT, "one more row", || async {
        names.stored_ids().await.contains(&id)
    })
    .await;
    token.cancel();
    consumer.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_the_database_refuses_is_isolated_and_the_rest_of_its_batch_stored() {
    let names = Names::new("refused-row");
    let client = names.prepare().await;
    // The operator added a rule the consumer does not know about.
    let pg = pg_client(&pg_url()).await;
    pg.batch_execute(&format!(
        "SET search_path = {s}; {sql} ALTER TABLE weather_logs ADD CONSTRAINT no_poison CHECK (station_id <> 'POISON');
         CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO schema_migrations (version) VALUES ('0001_weather_logs');",
        s = names.schema,
        sql = sistema_mensajes::db::MIGRATIONS[0].1
    ))
    .await
    .unwrap();
    let mut msgs: Vec<_> = (0..40)
        .map(|i| (old_reading(&format!("GOOD-{i}"), 10.0), props()))
        .collect();
    msgs.insert(17, (old_reading("POISON", 10.0), props()));
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;

    let mut cfg = names.consumer_config();
    cfg.batch.max_wait = Duration::from_millis(500); // one batch holds them all
    let (deps, token, consumer) = start_consumer(cfg);
    names.wait_rows(40, LIMIT).await;
    wait_until(LIMIT, "one dead letter", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    let dead = client.drain(&names.dead_letter_queue).await;
    assert_eq!(dead[0].1, "database_rejected");
    assert!(dead[0].2.contains("no_poison"), "{}", dead[0].2);
    assert_eq!(
        String::from_utf8_lossy(&dead[0].0),
        String::from_utf8_lossy(&old_reading("POISON", 10.0))
    );
    // Counted once the broker confirmed the dead letter, which may come after we saw it.
    let rejected = deps
        .metrics
        .rejected
        .with_label_values(&["database_rejected"]);
    wait_until(LIMIT, "the dead letter counted", || {
        let n = rejected.get();
        async move { n == 1 }
    })
    .await;
    token.cancel();
    consumer.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_serves_the_old_names_and_they_move() {
    let names = Names::new("metrics");
    names.create_schema().await;
    let (deps, token, consumer) = start_consumer(names.consumer_config());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (metrics, health) = (deps.metrics.clone(), deps.health.clone());
    let server = tokio::spawn(sistema_mensajes::http::serve(
        listener,
        Arc::new(move || metrics.render(health.phase())),
        None,
        token.clone(),
    ));

    let scrape = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing"))
            .parse()
            .unwrap()
    };
    let before = scrape("/metrics").await;
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert_eq!(value(&before, "messages_processed_total"), 0.0);
    assert_eq!(
        value(
            &before,
            "postgres_insert_errors_total{error_type=\"connection\"}"
        ),
        0.0
    );
    assert!(value(&before, "consumer_memory_usage_bytes") > 1e6);
    assert!(scrape("/other").await.starts_with("HTTP/1.1 404"));

    const N: u64 = 500;
    let mut pcfg = names.producer_config_via(&amqp_url());
    pcfg.simulation.rate = Some(250.0); // two seconds of traffic, so the rate gauge sees it
    producer::run(
        pcfg,
        Mode::Count(N),
        Default::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    wait_until(
        LIMIT,
        "processed moves to N and the rate above zero",
        || async {
            let text = scrape("/metrics").await;
            value(&text, "messages_processed_total") == N as f64
                && value(&text, "messages_per_second") > 0.0
                && value(&text, "consumer_end_to_end_latency_seconds_count") == N as f64
                && value(&text, "sistema_mensajes_ready{phase=\"running\"}") == 1.0
        },
    )
    .await;
    token.cancel();
    consumer.await.unwrap().unwrap();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn two_consumers_starting_together_on_an_empty_schema_both_work() {
    let names = Names::new("two-consumers");
    names.create_schema().await;
    let (a, token_a, run_a) = start_consumer(names.consumer_config());
    let (b, token_b, run_b) = start_consumer(names.consumer_config());
    // Both reach Running: the migrations were serialised, not fought over.
    wait_running(&a.health).await;
    wait_running(&b.health).await;
    let pg = pg_client(&pg_url()).await;
    let applied: i64 = pg
        .query_one(
            &format!("SELECT count(*) FROM {}.schema_migrations", names.schema),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The files of sql/, and the conversion of the (empty) table to partitions.
    assert_eq!(
        applied,
        sistema_mensajes::db::MIGRATIONS.len() as i64 + 1,
        "each migration recorded once"
    );
    const N: u64 = 1000;
    produce_confirmed(&names, N).await;
    names.wait_rows(N, LIMIT).await;
    // A row is visible at its commit; `processed` counts it only after the ack that follows.
    wait_until(LIMIT, "both consumers together counted N", || async {
        a.metrics.processed.get() + b.metrics.processed.get() == N
    })
    .await;
    token_a.cancel();
    token_b.cancel();
    run_a.await.unwrap().unwrap();
    run_b.await.unwrap().unwrap();
}

/// Migrations of a schema are serialised by an advisory lock: while another session holds it,
/// a starting consumer waits for it, applies nothing, and does not report Running.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_waits_for_the_migration_lock_before_migrating() {
    use sistema_mensajes::db::MIGRATION_LOCK;
    let names = Names::new("migration-lock");
    names.create_schema().await;
    let mut holder = pg_client(&pg_url()).await;
    let key: i32 = holder
        .query_one("SELECT hashtext($1)", &[&names.schema])
        .await
        .unwrap()
        .get(0);
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&MIGRATION_LOCK, &key],
    )
    .await
    .unwrap();

    let mut cfg = names.consumer_config();
    cfg.postgres.statement_timeout = Duration::from_secs(60); // wait, do not time out
    let (deps, token, run) = start_consumer(cfg);
    let observer = pg_client(&pg_url()).await;
    wait_until(
        LIMIT,
        "the consumer waiting for the migration lock",
        || async {
            let row = observer
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND classid = $1 AND objid = $2 AND objsubid = 2",
                    &[&(MIGRATION_LOCK as u32), &(key as u32)],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) == 1
        },
    )
    .await;
    let migrated: Option<String> = observer
        .query_one(
            &format!(
                "SELECT to_regclass('{}.schema_migrations')::text",
                names.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        migrated, None,
        "migrated while another session held the lock"
    );
    assert_ne!(
        deps.health.phase(),
        sistema_mensajes::health::Phase::Running
    );

    tx.commit().await.unwrap();
    wait_running(&deps.health).await;
    token.cancel();
    run.await.unwrap().unwrap();
}

/// A batch is cut as soon as the flow pauses (nothing new for a millisecond) and the writer is
/// free, not when `batch.max_wait` runs out: at a low rate every reading would otherwise wait the
/// whole of it.
#[tokio::test(flavor = "multi_thread")]
async fn readings_are_stored_when_the_flow_pauses_not_after_max_wait() {
    let names = Names::new("pause-cut");
    names.create_schema().await;
    let mut cfg = names.consumer_config();
    cfg.batch.max_wait = Duration::from_secs(120);
    let (deps, token, consumer) = start_consumer(cfg);
    wait_running(&deps.health).await;
    let client = Client::connect().await;
    for round in 1..=2 {
        let msgs: Vec<_> = (0..5)
            .map(|_| (reading_with_id(Uuid::now_v7()), props()))
            .collect();
        client
            .publish_all(&names.exchange, &names.routing_key, &msgs)
            .await;
        names.wait_rows(5 * round, LIMIT).await;
    }
    token.cancel();
    consumer.await.unwrap().unwrap();
}

/// The stations heard from are counted, and fall silent after `stations.silent_after`.
#[tokio::test(flavor = "multi_thread")]
async fn stations_not_heard_from_are_counted_as_silent() {
    let names = Names::new("silent-stations");
    let client = names.prepare().await;
    let mut cfg = names.consumer_config();
    cfg.stations.silent_after = Duration::from_secs(1);
    let (deps, token, consumer) = start_consumer(cfg);
    let msgs: Vec<_> = [("S-1", 10.0), ("S-2", 11.0), ("S-3", 12.0), ("S-1", 13.0)]
        .iter()
        .map(|(s, t)| (old_reading(s, *t), props()))
        .collect();
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;
    names.wait_rows(4, LIMIT).await;
    let metrics = deps.metrics.clone();
    let gauge = move |name: &str| {
        let text = metrics.render(sistema_mensajes::health::Phase::Running);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<i64>().ok())
    };
    assert_eq!(gauge("consumer_stations_known"), Some(3));
    wait_until(LIMIT, "three silent stations", || {
        let silent = gauge("consumer_stations_silent");
        async move { silent == Some(3) }
    })
    .await;
    token.cancel();
    consumer.await.unwrap().unwrap();
}
