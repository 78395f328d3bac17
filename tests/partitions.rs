//! Daily partitions of `weather_logs` against the real PostgreSQL (src/partition.rs): readings
//! redelivered and republished across a partition boundary, and older clients' readings, stored
//! once; retention dropping partitions; and the conversion of a table of a million rows while
//! readings keep arriving, none lost and none duplicated.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sistema_mensajes::db::{reference_reading, Db};
use sistema_mensajes::reading::Reading;
use time::OffsetDateTime;
use uuid::Uuid;

/// The start of the UTC day `days` after today.
fn midnight(days: i64) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_time(time::Time::MIDNIGHT) + time::Duration::days(days)
}

fn reading(station: &str, measured_at: Option<OffsetDateTime>) -> Reading {
    Reading {
        message_id: Uuid::now_v7(),
        station_id: station.into(),
        temperature: 20.5,
        humidity: 50.0,
        pressure: 1013.0,
        measured_at,
    }
}

/// How many rows each partition holds, by partition name.
async fn per_partition(names: &Names) -> Vec<(String, i64)> {
    let pg = pg_client(&pg_url()).await;
    let sql = format!(
        "SELECT tableoid::regclass::text, count(*) FROM {}.weather_logs GROUP BY 1 ORDER BY 1",
        names.schema
    );
    pg.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            (name.rsplit('.').next().unwrap().to_owned(), r.get(1))
        })
        .collect()
}

/// Rows stored per (message_id, measured_at): each reading must be there once.
async fn copies(names: &Names) -> Vec<i64> {
    let pg = pg_client(&pg_url()).await;
    let sql = format!(
        "SELECT count(*) FROM {}.weather_logs GROUP BY message_id ORDER BY 1 DESC",
        names.schema
    );
    pg.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Runs `consumer COMMAND` with the test's configuration and `env` on top; returns its exit code
/// and everything it printed.
fn run_consumer(names: &Names, command: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_consumer"))
        .arg(command)
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(names.consumer_env())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A schema of its own, partitioned from today (the consumer's connect converts the empty table),
/// with the consumer's insert path and a superuser's client.
async fn partitioned(what: &str) -> (Names, Db, tokio_postgres::Client) {
    let names = Names::new(what);
    let db = Db::connect(&names.consumer_config().postgres, None)
        .await
        .unwrap();
    (names, db, pg_client(&pg_url()).await)
}

/// A schema of its own with `weather_logs` as earlier versions made it (migrations 0001 to
/// 0003, unpartitioned), empty, and a superuser's client.
async fn unpartitioned(what: &str) -> (Names, tokio_postgres::Client) {
    let names = Names::new(what);
    let pg = pg_client(&pg_url()).await;
    let old_schema: String = sistema_mensajes::db::MIGRATIONS[..3]
        .iter()
        .map(|(_, sql)| *sql)
        .collect();
    let s = &names.schema;
    pg.batch_execute(&format!(
        "CREATE SCHEMA {s}; SET search_path = {s}; {old_schema}; RESET search_path"
    ))
    .await
    .unwrap();
    (names, pg)
}

fn day(t: OffsetDateTime) -> String {
    format!(
        "weather_logs_p{:04}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day()
    )
}

/// The insert path on the partitioned table: readings on both sides of midnight (the boundary
/// between today's and tomorrow's partitions) and without a time, inserted, then again as a
/// republish (plain insert first) and as a redelivery (skipping insert): each stored once, in
/// the partition of its `measured_at`.
#[tokio::test]
async fn readings_inserted_again_across_a_partition_boundary_are_stored_once() {
    let names = Names::new("part-boundary");
    let cfg = names.consumer_config().postgres;
    let db = Db::connect(&cfg, None).await.unwrap();
    let boundary = midnight(1);
    let rows = vec![
        reading("S-1", Some(boundary - time::Duration::milliseconds(1))),
        reading("S-1", Some(boundary)),
        reading("S-2", Some(boundary - time::Duration::nanoseconds(1_000))),
        reading("S-2", Some(boundary + time::Duration::microseconds(1))),
        reading("S-3", None),
        reading("S-3", None),
    ];
    let refs = [&reference_reading()];
    let first = db
        .insert_isolating(&rows, false, &refs, || ())
        .await
        .unwrap();
    assert_eq!((first.inserted, first.rejected.len()), (6, 0));
    // Republished: nothing says they are stored; the plain insert fails and the skipping one
    // finds each in its partition.
    let again = db
        .insert_isolating(&rows, false, &refs, || ())
        .await
        .unwrap();
    assert_eq!(
        (
            again.inserted,
            again.rejected.len(),
            again.conflicting.len()
        ),
        (0, 0, 0)
    );
    // Redelivered, mixed with new ones, in another order.
    let mut mixed: Vec<Reading> = rows.iter().rev().cloned().collect();
    mixed.push(reading("S-4", Some(boundary)));
    let redelivered = db
        .insert_isolating(&mixed, true, &refs, || ())
        .await
        .unwrap();
    assert_eq!((redelivered.inserted, redelivered.rejected.len()), (1, 0));

    assert_eq!(
        copies(&names).await,
        vec![1; 7],
        "each reading exactly once"
    );
    assert_eq!(
        per_partition(&names).await,
        vec![
            ("weather_logs_default".to_owned(), 2),
            (day(midnight(0)), 2),
            (day(midnight(1)), 3),
        ]
    );
}

/// Through the broker: older clients' readings (no id, so one derived from the content; with and
/// without a time) and ours, each published twice, around the boundary: each stored once.
#[tokio::test(flavor = "multi_thread")]
async fn older_clients_readings_published_twice_are_stored_once() {
    let names = Names::new("part-old");
    let consumer = start_running(names.consumer_config()).await;
    let client = Client::connect().await;
    let boundary = midnight(1);
    let at = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for (i, t) in [boundary - time::Duration::milliseconds(1), boundary]
        .into_iter()
        .enumerate()
    {
        // An older client's reading with a time: its id is derived from the body.
        bodies.push(format!(r#"{{"station_id": "OLD-{i}", "temperature": 1.5, "humidity": 2, "pressure": 1000, "measured_at": "{}"}}"#, at(t)).into_bytes());
        // Ours: a UUIDv7 and a time.
        bodies.push(format!(r#"{{"station_id": "NEW-{i}", "temperature": 1.5, "humidity": 2, "pressure": 1000, "message_id": "{}", "measured_at": "{}"}}"#, Uuid::now_v7(), at(t)).into_bytes());
    }
    // The older system's four fields only.
    bodies.push(old_reading("OLD-untimed", 3.25));
    let twice: Vec<_> = bodies
        .iter()
        .chain(bodies.iter())
        .map(|b| (b.clone(), props()))
        .collect();
    client
        .publish_all(&names.exchange, &names.routing_key, &twice)
        .await;
    names.wait_rows(5, Duration::from_secs(30)).await;
    // The second copies are settled too (acknowledged, not dead-lettered), and add nothing.
    wait_until(Duration::from_secs(30), "all ten settled", || async {
        client.ready(&names.queue).await == 0 && unacked(&names.queue).unwrap_or(1) == 0
    })
    .await;
    assert_eq!(client.ready(&names.dead_letter_queue).await, 0);
    assert_eq!(copies(&names).await, vec![1; 5]);
    assert_eq!(
        per_partition(&names).await,
        vec![
            ("weather_logs_default".to_owned(), 1),
            (day(midnight(0)), 2),
            (day(midnight(1)), 2),
        ]
    );
    stop_consumer(consumer).await;
}

/// Retention: `consumer maintain` with `postgres.retention = "1d"` drops a partition of three
/// days ago; then the SQL maintenance, run as of a day 20 days ahead with 10 days, drops every
/// partition whose day ended more than 10 days before it and keeps the others and the default
/// partition; a reading of a dropped day is still accepted (weather_logs_expired), and is gone
/// after the next run.
#[tokio::test(flavor = "multi_thread")]
async fn retention_drops_old_partitions_and_keeps_the_rest() {
    let (names, db, pg) = partitioned("part-retention").await;
    let s = &names.schema;
    let refs = [&reference_reading()];
    let rfc = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };

    // The binary, with a partition of three days ago made by hand (nothing in the default
    // partition belongs to it, so PostgreSQL allows it).
    let old = midnight(-3);
    pg.batch_execute(&format!(
        "CREATE TABLE {s}.{} PARTITION OF {s}.weather_logs FOR VALUES FROM ('{}') TO ('{}')",
        day(old),
        rfc(old),
        rfc(old + time::Duration::days(1)),
    ))
    .await
    .unwrap();
    db.insert_isolating(&[reading("S", Some(old))], false, &refs, || ())
        .await
        .unwrap();
    let maintain = || {
        run_consumer(
            &names,
            "maintain",
            &[("CONSUMER_POSTGRES__RETENTION", "1d")],
        )
    };
    let (code, text) = maintain();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains(&format!("dropped {}", day(old))), "{text}");
    assert_eq!(names.rows().await, 0);
    // A late reading of that day: accepted, held until the next run.
    db.insert_isolating(
        &[reading("S", Some(old + time::Duration::hours(1)))],
        false,
        &refs,
        || (),
    )
    .await
    .unwrap();
    assert_eq!(
        per_partition(&names).await,
        vec![("weather_logs_expired".to_owned(), 1)]
    );
    assert_eq!(maintain().0, Some(0));
    assert_eq!(names.rows().await, 0);

    let created: i64 = pg
        .query_one(&format!("SELECT count(*) FROM {s}.weather_logs_maintain(now() + interval '20 days', 7, NULL)"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 20, "partitions up to 27 days ahead; 8 existed");
    // One reading on each of the next 25 days, one without a time, one in year 9999.
    let mut rows: Vec<Reading> = (0..25)
        .map(|d| reading("S", Some(midnight(d) + time::Duration::hours(12))))
        .collect();
    rows.push(reading("S", None));
    rows.push(reading(
        "S",
        Some(OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap()),
    ));
    let stored = db
        .insert_isolating(&rows, false, &refs, || ())
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (27, 0));
    let dropped: Vec<String> = pg
        .query(&format!("SELECT partition FROM {s}.weather_logs_maintain(now() + interval '20 days', 7, interval '10 days') WHERE action = 'dropped'"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Day d ends at midnight(d + 1), which is at most (today's time + 10 days) for d < 10.
    let expected: Vec<String> = (0..10).map(|d| day(midnight(d))).collect();
    assert_eq!(dropped, expected);
    let left = per_partition(&names).await;
    assert_eq!(
        left.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
        std::iter::once("weather_logs_ahead".to_owned())
            .chain(std::iter::once("weather_logs_default".to_owned()))
            .chain((10..25).map(|d| day(midnight(d))))
            .collect::<Vec<_>>(),
    );
    assert_eq!(names.rows().await, 17);
}

/// A retention under a day is a configuration error that names the key (no server needed: it runs
/// in the Nix build's sandbox too).
#[test]
fn a_retention_under_a_day_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_consumer"))
        .args(["--check-config"])
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("CONSUMER_POSTGRES__RETENTION", "12h")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("postgres.retention"), "{text}");
}

/// The conversion of an existing, unpartitioned table of a million rows (as earlier versions
/// made it: migrations 0001 to 0003) by `consumer migrate`, while a consumer stores a stream of
/// readings: afterwards the table is partitioned, every old row and every confirmed reading is
/// there exactly once, and the time writers waited is printed.
#[tokio::test(flavor = "multi_thread")]
async fn a_million_rows_are_partitioned_while_readings_keep_arriving() {
    const OLD: i64 = 1_000_000;
    const NEW: u64 = 20_000;
    let (names, pg) = unpartitioned("part-migrate").await;
    let s = &names.schema;
    pg.batch_execute(&format!("CREATE TABLE {s}.schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO {s}.schema_migrations (version) VALUES ('0001_weather_logs'), ('0002_weather_logs_station_index'), ('0003_weather_logs_conflicts');
        -- Random ids, as older clients' content-derived ones are; 30 days of readings; some without a time.
        INSERT INTO {s}.weather_logs (message_id, station_id, temperature, humidity, pressure, measured_at)
        SELECT gen_random_uuid(), 'STATION-' || (i % 1000), 15, 50, 1013,
               CASE WHEN i % 100 = 0 THEN NULL ELSE now() - (i * interval '2.592 seconds') END
          FROM generate_series(1, {OLD}) i"))
        .await
        .unwrap();

    // The consumer applies 0004 (functions) but leaves a table with rows unpartitioned.
    let consumer = start_running(names.consumer_config()).await;
    let kind = || async {
        let pg = pg_client(&pg_url()).await;
        let k: i8 = pg.query_one(&format!("SELECT relkind::\"char\" FROM pg_class WHERE oid = '{s}.weather_logs'::regclass"), &[]).await.unwrap().get(0);
        k as u8 as char
    };
    assert_eq!(kind().await, 'r');

    // A stream of readings throughout, from our producer (1,000/s for 20 s, confirmed).
    let mut producer_cfg = names.producer_config_via(&amqp_url());
    producer_cfg.simulation.rate = Some(1000.0);
    let stream = tokio::spawn(sistema_mensajes::producer::run(
        producer_cfg,
        sistema_mensajes::producer::Mode::Count(NEW),
        Default::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    wait_until(Duration::from_secs(30), "the stream flowing", || async {
        names.stored_so_far().await > OLD + 200
    })
    .await;

    let started = Instant::now();
    let (code, text) = run_consumer(&names, "migrate", &[]);
    assert_eq!(code, Some(0), "{text}");
    eprintln!(
        "consumer migrate on {OLD} rows under load, {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        text
    );
    assert!(text.contains("weather_logs partitioned by day"), "{text}");
    assert_eq!(kind().await, 'p');
    let before_end = names.stored_so_far().await;
    assert!(
        before_end < OLD + NEW as i64,
        "the stream outlasted the conversion ({before_end} rows)"
    );

    assert_all_confirmed(stream.await.unwrap().unwrap(), NEW);
    names
        .wait_rows(OLD as u64 + NEW, Duration::from_secs(60))
        .await;
    assert_eq!(copies(&names).await.first(), Some(&1), "no reading twice");
    // The old rows stayed where they were, in the default partition; the new ones of today too
    // (before the cutover).
    let parts = per_partition(&names).await;
    assert_eq!(parts.iter().map(|p| p.1).sum::<i64>(), OLD + NEW as i64);
    assert_eq!(parts[0].0, "weather_logs_default");
    stop_consumer(consumer).await;
}

/// Maintenance that did not run for longer than the days made ahead: readings of days without a
/// partition (here days 10 and 12, with days made up to 7) wait, stored, in weather_logs_ahead.
/// The next run (as of 5 days later) detaches it as weather_logs_catchup and makes the days; a
/// redelivery of one of them meanwhile is stored in its new day; `consumer maintain` then moves
/// the others into their days (the redelivered one is not stored twice) and drops the table, and a
/// reading of year 9999 goes back to weather_logs_ahead.
#[tokio::test(flavor = "multi_thread")]
async fn readings_that_waited_in_ahead_are_moved_into_their_days() {
    let (names, db, pg) = partitioned("part-catchup").await;
    let s = &names.schema;
    let refs = [&reference_reading()];
    let late = [
        reading("S", Some(midnight(10) + time::Duration::hours(1))),
        reading("S", Some(midnight(12))),
        reading(
            "S",
            Some(OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap()),
        ),
    ];
    db.insert_isolating(&late, false, &refs, || ())
        .await
        .unwrap();
    assert_eq!(
        per_partition(&names).await,
        vec![("weather_logs_ahead".to_owned(), 3)]
    );
    let changes: Vec<(String, String)> = pg
        .query(
            &format!("SELECT action, partition FROM {s}.weather_logs_maintain(now() + interval '5 days', 7, NULL)"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        changes[0],
        ("detached".to_owned(), "weather_logs_catchup".to_owned())
    );
    assert_eq!(changes.len(), 1 + 5, "days 8 to 12 made: {changes:?}");
    // Meanwhile, a redelivery of the first: stored in its new day.
    let again = db
        .insert_isolating(&late[..1], true, &refs, || ())
        .await
        .unwrap();
    assert_eq!(again.inserted, 1);

    let (code, text) = run_consumer(&names, "maintain", &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("moved 2 readings back"), "{text}");
    assert_eq!(
        per_partition(&names).await,
        vec![
            ("weather_logs_ahead".to_owned(), 1),
            (day(midnight(10)), 1),
            (day(midnight(12)), 1),
        ]
    );
    assert_eq!(copies(&names).await, vec![1; 3]);
    let left: Option<String> = pg
        .query_one(
            &format!("SELECT to_regclass('{s}.weather_logs_catchup')::text"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, None);
}

/// A conversion that fails after it constrained the table (here: a table already named
/// weather_logs_default, so the switch cannot rename) removes its constraint: readings measured
/// after the cutover, which it would refuse, are still stored, and the table is as it was.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_conversion_leaves_no_constraint_behind() {
    let (names, pg) = unpartitioned("part-fail").await;
    let s = &names.schema;
    pg.batch_execute(&format!(
        "INSERT INTO {s}.weather_logs (message_id, station_id, temperature, humidity, pressure, measured_at)
         VALUES (gen_random_uuid(), 'S', 1, 1, 1000, now());
         CREATE TABLE {s}.weather_logs_default (x int)"
    ))
    .await
    .unwrap();
    let (code, text) = run_consumer(&names, "maintain", &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("weather_logs_default"), "{text}");
    let constraints: i64 = pg
        .query_one(
            &format!("SELECT count(*) FROM pg_constraint WHERE conrelid = '{s}.weather_logs'::regclass AND conname = 'weather_logs_default_range'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(constraints, 0);
    let cfg = names.consumer_config().postgres;
    let db = Db::connect(&cfg, None).await.unwrap();
    let stored = db
        .insert_isolating(
            &[reading("S", Some(midnight(5)))],
            false,
            &[&reference_reading()],
            || (),
        )
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (1, 0));
}

/// A conversion killed after it constrained the table leaves the constraint (no process is left
/// to remove it): the next migration (here a consumer's connect) removes it, and a reading
/// measured after the cutover is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_conversions_constraint_is_removed_by_the_next_migration() {
    let (names, pg) = unpartitioned("part-killed").await;
    let s = &names.schema;
    pg.batch_execute(&format!(
        "CREATE TABLE {s}.schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO {s}.weather_logs (message_id, station_id, temperature, humidity, pressure, measured_at)
         VALUES (gen_random_uuid(), 'S', 1, 1, 1000, now());
         ALTER TABLE {s}.weather_logs ADD CONSTRAINT weather_logs_default_range
             CHECK (measured_at IS NULL OR measured_at < now() + interval '2 days') NOT VALID"
    ))
    .await
    .unwrap();
    let db = Db::connect(&names.consumer_config().postgres, None)
        .await
        .unwrap();
    let stored = db
        .insert_isolating(
            &[reading("S", Some(midnight(5)))],
            false,
            &[&reference_reading()],
            || (),
        )
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (1, 0));
}
