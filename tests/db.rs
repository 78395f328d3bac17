//! The insert path against a real PostgreSQL: the plain insert for new readings, and the fallback
//! that skips readings already stored, with or without a hint that some may be.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use common::*;
use sistema_mensajes::db::Db;
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
    let stored = db.insert_isolating(&rows[..10], false).await.unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (10, 0));

    // Ten of these are stored already, and nothing says so (a republished reading, not a
    // redelivery): the plain insert fails on the primary key and the skipping insert takes over.
    let stored = db.insert_isolating(&rows[..20], false).await.unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (10, 0));

    // A redelivered batch goes straight to the skipping insert.
    let stored = db.insert_isolating(&rows, true).await.unwrap();
    assert_eq!((stored.inserted, stored.rejected.len()), (10, 0));

    // The same reading twice in one batch: stored once.
    let fresh = readings(1).remove(0);
    let twice = vec![fresh.clone(), fresh];
    let stored = db.insert_isolating(&twice, false).await.unwrap();
    assert_eq!(stored.inserted, 1);
    assert_eq!(names.rows().await, 31);
}
