//! The insert path against a real PostgreSQL: the plain insert for new readings, and the fallback
//! that skips readings already stored, with or without a hint that some may be.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use common::*;
use sistema_mensajes::db::{reference_reading, Db, DbError};
use sistema_mensajes::reading::Reading;
use uuid::Uuid;

fn readings(n: usize) -> Vec<Reading> {
    (0..n)
        .map(|i| Reading {
            message_id: Uuid::now_v7(),
            station_id: format!("STATION-{:03}", i % 7 + 1),
            temperature: 20.0 + i as f64 / 10.0,
            humidity: 50.0,
            pressure: 1013.0,
            measured_at: Some(time::OffsetDateTime::now_utc()),
        })
        .collect()
}

#[tokio::test]
async fn rows_already_stored_are_skipped_whichever_insert_runs_first() {
    let names = Names::new("db-insert");
    let cfg = names.consumer_config().postgres;
    let db = Db::connect(&cfg, None).await.unwrap();
    let rows = readings(30);

    // New rows: the plain insert stores them all.
    let stored = db
        .insert_isolating(&rows[..10], false, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (10, 0));

    // Ten of these are stored already, and nothing says so (a republished reading, not a
    // redelivery): the plain insert fails on the primary key and the skipping insert takes over.
    let stored = db
        .insert_isolating(&rows[..20], false, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (10, 0));

    // A redelivered batch goes straight to the skipping insert.
    let stored = db
        .insert_isolating(&rows, true, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (10, 0));

    // The same reading twice in one batch: stored once.
    let fresh = readings(1).remove(0);
    let twice = vec![fresh.clone(), fresh];
    let stored = db
        .insert_isolating(&twice, false, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!(stored.inserted, 1);
    assert_eq!(names.rows().await, 31);
}

/// The class of faults that come from the table, not the readings: every change below refuses
/// every reading. Each must be reported as systematic (held and retried by the consumer), with
/// nothing stored and nothing marked as a bad row; once undone, the same batch is stored.
#[tokio::test]
async fn a_table_that_refuses_every_reading_is_a_systematic_fault() {
    let names = Names::new("db-systematic");
    let cfg = names.consumer_config().postgres;
    let db = Db::connect(&cfg, None).await.unwrap();
    let pg = pg_client(&pg_url()).await;
    let t = format!("{}.weather_logs", names.schema);
    let f = format!("{}.refuse", names.schema);
    let faults = [
        // First, while the table is empty: no stored pressure fits either.
        (format!("ALTER TABLE {t} ALTER COLUMN pressure TYPE numeric(3,0)"), format!("ALTER TABLE {t} ALTER COLUMN pressure TYPE double precision")),
        (format!("ALTER TABLE {t} ADD COLUMN site text NOT NULL DEFAULT 'old'; ALTER TABLE {t} ALTER COLUMN site DROP DEFAULT"), format!("ALTER TABLE {t} DROP COLUMN site")),
        (format!("ALTER TABLE {t} ADD CONSTRAINT c CHECK (temperature > 1000) NOT VALID"), format!("ALTER TABLE {t} DROP CONSTRAINT c")),
        (format!("CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'closed for maintenance'; END$$; \
                  CREATE TRIGGER refuse BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {f}()"),
         format!("DROP TRIGGER refuse ON {t}; DROP FUNCTION {f}()")),
    ];
    let mut expected = 0;
    for (break_it, mend_it) in faults {
        pg.batch_execute(&break_it).await.unwrap();
        for (rows, maybe_stored) in [(readings(5), false), (readings(1), true)] {
            match db
                .insert_isolating(&rows, maybe_stored, &[&reference_reading()], || ())
                .await
            {
                Err(DbError::Systematic(_)) => {}
                other => panic!("{break_it}: {other:?}"),
            }
        }
        assert_eq!(
            names.rows().await,
            expected,
            "{break_it}: nothing stored, the probe neither"
        );
        pg.batch_execute(&mend_it).await.unwrap();
        let stored = db
            .insert_isolating(&readings(5), false, &[&reference_reading()], || ())
            .await
            .unwrap();
        assert_eq!(
            (stored.inserted, stored.rejected.len()),
            (5, 0),
            "{mend_it}"
        );
        expected += 5;
    }
}

/// A rule that refuses some readings only is their fault: they alone are refused (to be
/// dead-lettered), the rest stored, also when the one refused reading is a batch on its own.
#[tokio::test]
async fn a_rule_that_refuses_some_readings_isolates_them() {
    let names = Names::new("db-one-row");
    let cfg = names.consumer_config().postgres;
    let db = Db::connect(&cfg, None).await.unwrap();
    let pg = pg_client(&pg_url()).await;
    let t = format!("{}.weather_logs", names.schema);
    pg.batch_execute(&format!(
        "ALTER TABLE {t} ADD CONSTRAINT no_bad CHECK (station_id <> 'BAD')"
    ))
    .await
    .unwrap();
    let mut rows = readings(9);
    rows[4].station_id = "BAD".into();
    let stored = db
        .insert_isolating(&rows, false, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!(stored.inserted, 8);
    assert_eq!(
        stored.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![4]
    );
    let alone = vec![rows[4].clone()];
    let stored = db
        .insert_isolating(&alone, true, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (0, 1));
    // Every reading of a batch bad, the reference good: still each row's fault.
    let mut all_bad = readings(3);
    all_bad.iter_mut().for_each(|r| r.station_id = "BAD".into());
    let stored = db
        .insert_isolating(&all_bad, false, &[&reference_reading()], || ())
        .await
        .unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (0, 3));
    assert_eq!(names.rows().await, 8);
}

/// The references must not share the batch's fault, either way. A refusal by time (new readings
/// refused, as when the current month's partition is missing) is systematic although the last
/// stored reading, with its own time, would pass; a rule that refuses the built-in reference's
/// station or the last reading's value is not, when another reference or half is accepted.
#[tokio::test]
async fn references_tell_a_fault_of_time_or_of_one_value_apart() {
    let names = Names::new("db-references");
    let cfg = names.consumer_config().postgres;
    let db = Db::connect(&cfg, None).await.unwrap();
    let pg = pg_client(&pg_url()).await;
    let t = format!("{}.weather_logs", names.schema);
    let f = format!("{}.refuse", names.schema);
    let built_in = reference_reading();

    // Stored two hours ago; then recent readings are refused (a missing partition, say).
    let mut old = readings(1).remove(0);
    old.measured_at = Some(time::OffsetDateTime::now_utc() - time::Duration::hours(2));
    db.insert_isolating(&[old.clone()], false, &[&built_in], || ())
        .await
        .unwrap();
    pg.batch_execute(&format!(
        "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS \
         $$BEGIN IF NEW.measured_at > now() - interval '1 hour' THEN RAISE EXCEPTION 'no partition'; END IF; RETURN NEW; END$$; \
         CREATE TRIGGER refuse BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {f}()"
    ))
    .await
    .unwrap();
    for batch in [readings(4), readings(1)] {
        match db
            .insert_isolating(&batch, false, &[&old, &built_in], || ())
            .await
        {
            Err(DbError::Systematic(_)) => {}
            other => panic!("a refusal of every new reading: {other:?}"),
        }
    }
    pg.batch_execute(&format!("DROP TRIGGER refuse ON {t}"))
        .await
        .unwrap();

    // Only registered stations: the built-in reference's is not, nor is one reading's.
    pg.batch_execute(&format!(
        "ALTER TABLE {t} ADD CONSTRAINT registered CHECK (station_id LIKE 'STATION-%') NOT VALID"
    ))
    .await
    .unwrap();
    let mut batch = readings(4);
    batch[2].station_id = "UNREGISTERED".into();
    let stored = db
        .insert_isolating(&batch, false, &[&built_in], || ())
        .await
        .unwrap();
    assert_eq!(
        (stored.inserted, stored.rejected.len()),
        (3, 1),
        "a half was accepted"
    );
    let alone = vec![batch[2].clone()];
    let stored = db
        .insert_isolating(&alone, true, &[&batch[0], &built_in], || ())
        .await
        .unwrap();
    assert_eq!(
        stored.rejected.len(),
        1,
        "the last stored reading is accepted: the row's fault"
    );

    // The last stored reading had a value a new rule refuses; the built-in one does not.
    pg.batch_execute(&format!("ALTER TABLE {t} DROP CONSTRAINT registered"))
        .await
        .unwrap();
    let mut hot = readings(1).remove(0);
    hot.temperature = 55.0;
    db.insert_isolating(&[hot.clone()], false, &[&built_in], || ())
        .await
        .unwrap();
    pg.batch_execute(&format!(
        "ALTER TABLE {t} ADD CONSTRAINT cool CHECK (temperature < 50) NOT VALID"
    ))
    .await
    .unwrap();
    let mut again = readings(1).remove(0);
    again.temperature = 56.0;
    let stored = db
        .insert_isolating(&[again], false, &[&hot, &built_in], || ())
        .await
        .unwrap();
    assert_eq!(
        stored.rejected.len(),
        1,
        "the built-in reference is accepted: the row's fault"
    );
    assert_eq!(names.rows().await, 1 + 3 + 1);
}
