//! Faults of issue 17, each a member of a class and injected for real: a table change that refuses
//! every reading (a fault of the system, not of one row), a broker alarm that blocks publishers,
//! a dead-letter path that can never succeed, and a message whose headers exceed our frame size.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::time::Duration;

use common::*;
use sistema_mensajes::consumer;
use sistema_mensajes::producer::{self, Mode};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

/// A running consumer on `names`' schema and on queues declared as the older system did, with a
/// broker and a database client beside it.
async fn consumer_on_the_old_topology(names: &Names) -> (Client, tokio_postgres::Client, Running) {
    let client = names.prepare().await;
    let running = start_running(names.consumer_config()).await;
    (client, pg_client(&pg_url()).await, running)
}

/// The issue's example (a NOT NULL column added, 50 readings published) and the class: the
/// readings are held and retried, none dead-lettered, the status line and a gauge say why, and
/// once the column is dropped every one is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_change_that_refuses_every_reading_holds_them_until_it_is_undone() {
    let names = Names::new("refuse-all");
    let (client, pg, running) = consumer_on_the_old_topology(&names).await;
    let (deps, _, _) = &running;
    let table = format!("{}.weather_logs", names.schema);
    pg.batch_execute(&format!(
        "ALTER TABLE {table} ADD COLUMN site text NOT NULL"
    ))
    .await
    .unwrap();

    let ids = publish_readings(&client, &names, 50).await;
    wait_until(LIMIT, "the refusal taken as systematic", || async {
        deps.metrics.refusing_all.get() == 1 && deps.metrics.insert_errors_total() >= 3
    })
    .await;
    let status = consumer::status_line(&deps.metrics, &deps.health);
    assert!(status.contains("refuses every reading"), "{status}");
    assert_eq!(client.ready(&names.dead_letter_queue).await, 0);
    let rejected: u64 = ["database_rejected"]
        .iter()
        .map(|r| deps.metrics.rejected.with_label_values(&[r]).get())
        .sum();
    assert_eq!(rejected, 0, "nothing dead-lettered");
    assert_eq!(names.rows().await, 0);

    pg.batch_execute(&format!("ALTER TABLE {table} DROP COLUMN site"))
        .await
        .unwrap();
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "the gauge back to 0", || async {
        deps.metrics.refusing_all.get() == 0
    })
    .await;
    assert_eq!(client.ready(&names.dead_letter_queue).await, 0);
    stop_consumer(running).await;
}

/// PostgreSQL out of disk space (SQLSTATE 53100, raised for real by the server: a trigger raises it
/// as a failed file extension would): the readings are held and retried, not dead-lettered, each
/// attempt is counted under `error_type="disk_full"` and the status line says why; once space is
/// back every one is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_counted_as_disk_full_and_the_readings_are_held() {
    let names = Names::new("disk-full");
    let (client, pg, running) = consumer_on_the_old_topology(&names).await;
    let (deps, _, _) = &running;
    let schema = &names.schema;
    pg.batch_execute(&format!(
        "CREATE FUNCTION {schema}.no_space() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = 'disk_full';
         END $$;
         CREATE TRIGGER no_space BEFORE INSERT ON {schema}.weather_logs
           FOR EACH STATEMENT EXECUTE FUNCTION {schema}.no_space()"
    ))
    .await
    .unwrap();

    let ids = publish_readings(&client, &names, 20).await;
    let disk_full = || {
        deps.metrics
            .insert_errors
            .with_label_values(&["disk_full"])
            .get()
    };
    wait_until(LIMIT, "insert errors counted as disk_full", || async {
        disk_full() >= 2
    })
    .await;
    assert_eq!(
        deps.metrics.insert_errors_total(),
        disk_full(),
        "every error is disk_full"
    );
    let status = consumer::status_line(&deps.metrics, &deps.health);
    assert!(status.contains("disk is full"), "{status}");
    assert_eq!(client.ready(&names.dead_letter_queue).await, 0);
    assert_eq!(names.rows().await, 0);

    pg.batch_execute(&format!("DROP TRIGGER no_space ON {schema}.weather_logs"))
        .await
        .unwrap();
    names.assert_stored_exactly(ids, LIMIT).await;
    assert_eq!(client.ready(&names.dead_letter_queue).await, 0);
    stop_consumer(running).await;
}

/// A queue that exists with other arguments (PRECONDITION_FAILED at declare) is a refusal, not
/// an outage: the status line names the queue and its arguments, not "broker unreachable".
#[tokio::test(flavor = "multi_thread")]
async fn a_queue_declared_with_other_arguments_is_named_not_called_unreachable() {
    let names = Names::new("precondition");
    names.create_schema().await;
    let client = Client::connect().await;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    client
        .channel
        .queue_declare(
            names.queue.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    let running = start_consumer(names.consumer_config());
    let (deps, _, _) = &running;
    wait_until(LIMIT, "the refusal in the status line", || async {
        deps.health.problem().is_some_and(|p| {
            p.contains("refuses our topology")
                && p.contains(&names.queue)
                && p.contains("PRECONDITION_FAILED")
        })
    })
    .await;
    stop_consumer(running).await;
}

/// An IP-literal broker address is that address, not `localhost` (where the password used to
/// go): an unreachable IPv6 address fails to connect and confirms nothing, and so does an IPv4 one.
#[tokio::test(flavor = "multi_thread")]
async fn an_ip_literal_broker_address_is_not_replaced_by_localhost() {
    let names = Names::new("ip-literal");
    for url in [
        "amqp://guest:guest@[2001:db8::1]:5672/%2f",
        "amqp://guest:guest@192.0.2.1:5672/%2f",
    ] {
        let deps = producer::Deps::default();
        let token = CancellationToken::new();
        let mut cfg = names.producer_config_via(url);
        cfg.shutdown_timeout = Duration::from_secs(5);
        let run = tokio::spawn(producer::run(
            cfg,
            Mode::Count(1),
            deps.clone(),
            token.clone(),
        ));
        // The address is unreachable: the attempt fails (at once, or after the 10 s connect
        // bound). Were it replaced by localhost, the local broker would confirm instead, and no
        // attempt would fail.
        wait_until(LIMIT, &format!("a failed attempt at {url}"), || {
            let failed = deps.metrics.amqp_connection_errors.get();
            async move { failed >= 1 }
        })
        .await;
        token.cancel();
        let summary = tokio::time::timeout(LIMIT, run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(summary.confirmed, 0, "{url} reached a broker");
        assert_eq!(deps.metrics.confirmed.get(), 0, "{url}");
    }
}

/// The same class for PostgreSQL: an IP-literal database address (IPv6 and IPv4) is where the
/// consumer connects, seen by a listener there.
#[tokio::test(flavor = "multi_thread")]
async fn an_ip_literal_database_address_is_the_one_connected_to() {
    let names = Names::new("pg-ip-literal");
    for (bind, host) in [("[::1]:0", "[::1]"), ("127.0.0.1:0", "127.0.0.1")] {
        let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
            eprintln!("skipping {bind}: this host cannot listen there");
            continue;
        };
        let port = listener.local_addr().unwrap().port();
        let url = format!("postgres://postgres@{host}:{port}/postgres");
        let running = start_consumer(names.consumer_config_via(&amqp_url(), &url));
        let accepted = tokio::time::timeout(LIMIT, listener.accept()).await;
        assert!(
            accepted.is_ok_and(|a| a.is_ok()),
            "{url}: no connection arrived"
        );
        stop_consumer(running).await;
    }
}

/// A message another client published with 20 KB of headers (more than our 16 KiB frames; the
/// broker never splits a content header) is stored like any other, the consumer reconnecting
/// once with larger frames, and does not hold up the 100 behind it; an invalid one with such
/// headers is dead-lettered, its headers dropped so the copy fits our frames.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_with_large_headers_neither_blocks_the_queue_nor_the_dead_letter() {
    let names = Names::new("big-headers");
    let client = names.prepare().await;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-trace".into(),
        lapin::types::AMQPValue::LongString("t".repeat(20_000).into()),
    );
    let big = props().with_headers(headers);
    let first = uuid::Uuid::now_v7();
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[
                (reading_with_id(first), big.clone()),
                (b"not-json".to_vec(), big),
            ],
        )
        .await;
    let mut ids = vec![first];
    ids.extend(publish_readings(&client, &names, 100).await);
    let running = start_consumer(names.consumer_config());
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "the invalid one dead-lettered", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    let (deps, _, _) = &running;
    assert_eq!(deps.metrics.amqp_connection_errors.get(), 0);
    stop_consumer(running).await;
}

/// A batch that stored nothing (only a dead letter) is no commit: the gauge an alert uses to see
/// a consumer that stopped storing does not move.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_dead_letters_only_is_not_a_commit() {
    let names = Names::new("no-commit");
    let client = names.prepare().await;
    let running = start_running(names.consumer_config()).await;
    let (deps, _, _) = &running;
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(b"{}".to_vec(), props())],
        )
        .await;
    wait_until(LIMIT, "the message dead-lettered and acked", || async {
        client.ready(&names.dead_letter_queue).await == 1 && deps.metrics.pending.get() == 0
    })
    .await;
    assert_eq!(deps.metrics.last_commit.get(), 0.0);
    publish_readings(&client, &names, 1).await;
    wait_until(LIMIT, "a reading stored, a commit", || async {
        deps.metrics.last_commit.get() > 0.0
    })
    .await;
    stop_consumer(running).await;
}

/// No log level and no format shows the broker password: at TRACE, lapin and amq-protocol log
/// every frame, the login frame as a byte array. A user of its own with a random password, the
/// producer at `RUST_LOG=trace` in both formats, and the log searched for the password as text,
/// as the decimal byte list Rust's `Debug` prints, and as hex.
#[tokio::test(flavor = "multi_thread")]
async fn the_broker_password_is_in_no_log_at_any_level() {
    let names = Names::new("trace-secret");
    let user = unique_name("user");
    let password = unique_name("pw");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    };
    ctl(&["add_user", &user, &password]);
    ctl(&["set_permissions", &user, ".*", ".*", ".*"]);
    let dir = std::env::temp_dir().join(unique_name("secret"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pw");
    std::fs::write(&file, &password).unwrap();
    let decimal = password
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let hex: String = password.bytes().map(|b| format!("{b:02x}")).collect();
    let url = amqp_url().replace("guest:guest@", &format!("{user}@"));
    for format in ["text", "json"] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_producer"))
            .args(["--count", "1"])
            .env("RUST_LOG", "trace")
            .env("PRODUCER_LOG__FORMAT", format)
            .env("PRODUCER_AMQP__URL", &url)
            .env("PRODUCER_AMQP__PASSWORD_FILE", &file)
            .env("PRODUCER_AMQP__EXCHANGE", &names.exchange)
            .env("PRODUCER_AMQP__QUEUE", &names.queue)
            .env("PRODUCER_AMQP__ROUTING_KEY", &names.routing_key)
            .env("PRODUCER_METRICS__LISTEN", "127.0.0.1:0")
            .output()
            .await
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{format}: the producer ran: {log}");
        assert!(log.contains("DEBUG"), "{format}: verbose logging is on");
        for (what, needle) in [("text", &password), ("bytes", &decimal), ("hex", &hex)] {
            assert!(
                !log.contains(needle.as_str()),
                "{format}: the password as {what} is in the log"
            );
        }
    }
    ctl(&["delete_user", &user]);
    std::fs::remove_dir_all(dir).unwrap();
}

/// Dead letters replayed once their cause is mended: only the reason asked for, each stored
/// once, the others left in place; a second replay finds nothing more of that reason.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_one_reason_are_replayed_once_the_cause_is_mended() {
    use sistema_mensajes::consumer::replay::{self, Replayed};
    let names = Names::new("replay");
    let client = names.prepare().await;
    let cfg = names.consumer_config();
    let running = start_running(cfg.clone()).await;
    let table = format!("{}.weather_logs", names.schema);
    let pg = pg_client(&pg_url()).await;
    pg.batch_execute(&format!(
        "ALTER TABLE {table} ADD CONSTRAINT no_bad CHECK (station_id <> 'BAD')"
    ))
    .await
    .unwrap();
    let bad: Vec<uuid::Uuid> = (0..2).map(|_| uuid::Uuid::now_v7()).collect();
    let mut msgs: Vec<_> = bad
        .iter()
        .map(|id| {
            let body = format!(r#"{{"station_id":"BAD","temperature":1,"humidity":1,"pressure":1000,"message_id":"{id}"}}"#);
            (body.into_bytes(), props())
        })
        .collect();
    msgs.push((b"not-json".to_vec(), props()));
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;
    let mut ids = publish_readings(&client, &names, 3).await;
    wait_until(
        LIMIT,
        "two refused rows and one malformed message dead-lettered",
        || async { client.ready(&names.dead_letter_queue).await == 3 },
    )
    .await;
    names.wait_rows(3, LIMIT).await;

    pg.batch_execute(&format!("ALTER TABLE {table} DROP CONSTRAINT no_bad"))
        .await
        .unwrap();
    let done = replay::run(&cfg.amqp, Some("database_rejected"))
        .await
        .unwrap();
    assert_eq!(
        done,
        Replayed {
            replayed: 2,
            skipped: 1,
            ..Default::default()
        }
    );
    ids.extend(bad);
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "only the malformed message left", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    let again = replay::run(&cfg.amqp, Some("database_rejected"))
        .await
        .unwrap();
    assert_eq!(
        again,
        Replayed {
            replayed: 0,
            skipped: 1,
            ..Default::default()
        }
    );
    // Back in the queue once the replay's connection has closed (the broker requeues it then).
    wait_until(LIMIT, "the malformed message back in the queue", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    let left = client.drain(&names.dead_letter_queue).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, b"not-json".to_vec());
    stop_consumer(running).await;
}

/// A body over `validation.max_message_bytes` is held (until dead-lettered) and dead-lettered cut
/// to that size, not whole: the prefetch counts messages, and the broker takes up to 128 MiB each.
#[tokio::test(flavor = "multi_thread")]
async fn a_too_large_message_is_held_and_dead_lettered_cut_to_the_limit() {
    let names = Names::new("too-large");
    let client = names.prepare().await;
    let cfg = names.consumer_config();
    let limit = cfg.validation.max_message_bytes;
    let running = start_running(cfg).await;
    let body = vec![b'{'; 1 << 20];
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(body.clone(), props())],
        )
        .await;
    wait_until(LIMIT, "the message dead-lettered", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    let dead = client.drain(&names.dead_letter_queue).await;
    assert_eq!(dead[0].1, "too_large");
    assert_eq!(dead[0].0, body[..limit].to_vec(), "cut to {limit} bytes");
    stop_consumer(running).await;
}

/// A dead-letter exchange redeclared as `direct` under a running consumer: our fanout declare
/// gets PRECONDITION_FAILED on every attempt. Valid readings flow on; the invalid message is
/// held, and the gauge and the status line say so (they used to say "database ok"); once the
/// exchange is mended it is dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_exchange_of_the_wrong_type_holds_the_message_visibly() {
    let names = Names::new("dlx-direct");
    let client = names.prepare().await;
    let running = start_running(names.consumer_config()).await;
    let (deps, _, _) = &running;
    let dlx = names.dead_letter_exchange.as_str();
    let ch = client.conn.create_channel().await.unwrap();
    ch.exchange_delete(dlx.into(), Default::default())
        .await
        .unwrap();
    ch.exchange_declare(
        dlx.into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(b"not-json".to_vec(), props())],
        )
        .await;
    let ids = publish_readings(&client, &names, 200).await;
    names.assert_stored_exactly(ids, LIMIT).await;
    wait_until(LIMIT, "the invalid message held, visibly", || async {
        deps.metrics.dead_letters_held.get() == 1
            && consumer::status_line(&deps.metrics, &deps.health).contains("1 held")
    })
    .await;
    assert_eq!(deps.metrics.pending.get(), 1);
    ch.exchange_delete(dlx.into(), Default::default())
        .await
        .unwrap();
    wait_until(LIMIT, "dead-lettered once the exchange is gone", || async {
        client.ready(&names.dead_letter_queue).await == 1 && deps.metrics.pending.get() == 0
    })
    .await;
    assert_eq!(deps.metrics.dead_letters_held.get(), 0);
    stop_consumer(running).await;
}

/// What cannot be replayed stays in place and is said: a dead letter whose body was cut
/// (`too_large`), and those the broker returns (unroutable). The run is reported incomplete. And
/// every letter goes to our exchange, whatever exchange its headers name.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_leaves_cut_and_unroutable_dead_letters_in_place_and_sends_the_rest_to_our_exchange_only(
) {
    use sistema_mensajes::consumer::replay;
    let names = Names::new("replay-partial");
    let client = names.prepare().await;
    let cfg = names.consumer_config();
    let running = start_running(cfg.clone()).await;
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(vec![b'x'; 5000], props())],
        )
        .await;
    wait_until(LIMIT, "the large message dead-lettered", || async {
        client.ready(&names.dead_letter_queue).await == 1
    })
    .await;
    let dead_letter = |exchange: &str| {
        let mut h = lapin::types::FieldTable::default();
        let text = |s: &str| lapin::types::AMQPValue::LongString(s.into());
        h.insert("x-rejection-reason".into(), text("database_rejected"));
        h.insert("x-original-exchange".into(), text(exchange));
        h.insert("x-original-routing-key".into(), text(&names.routing_key));
        props().with_headers(h)
    };
    let (id, forged) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let elsewhere = format!("{}-elsewhere", names.exchange);
    client
        .publish_all(
            "",
            &names.dead_letter_queue,
            &[
                (reading_with_id(forged), dead_letter(&elsewhere)),
                (reading_with_id(id), dead_letter(&names.exchange)),
            ],
        )
        .await;
    // Unroutable (the queue unbound): the broker returns both, the run says so.
    names.unbind(&client.channel).await;
    let done = replay::run(&cfg.amqp, None).await.unwrap();
    assert_eq!(
        (done.replayed, done.truncated, done.failed, done.unexamined),
        (0, 1, 2, 0),
        "{done}"
    );
    assert!(!done.complete());
    wait_until(LIMIT, "the three left in place", || async {
        client.ready(&names.dead_letter_queue).await == 3
    })
    .await;
    // Bound again: both go to our exchange, the one whose headers name another exchange too
    // (whoever writes dead letters writes their headers).
    names.bind(&client.channel).await;
    let done = replay::run(&cfg.amqp, None).await.unwrap();
    assert_eq!(
        (done.replayed, done.truncated, done.failed),
        (2, 1, 0),
        "{done}"
    );
    names.assert_stored_exactly(vec![id, forged], LIMIT).await;
    stop_consumer(running).await;
}

/// The command itself: it needs only the broker's password (a PostgreSQL password file that is
/// missing does not stop it), prints its summary and exits 0 when everything was replayed.
#[tokio::test(flavor = "multi_thread")]
async fn the_replay_command_prints_its_summary() {
    let names = Names::new("replay-cli");
    let client = Client::connect().await;
    client
        .channel
        .queue_declare(
            names.dead_letter_queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_consumer"))
        .arg("replay-dead-letters")
        .envs(names.consumer_env())
        .env("CONSUMER_POSTGRES__PASSWORD_FILE", "/nonexistent/pw")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("0 replayed, 0 of other reasons left in place"),
        "{stdout}"
    );
}
