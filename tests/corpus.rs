//! The corpus in `tests/corpus/`: malformed messages in `<reason>/`, each to be rejected with the
//! reason its folder names, by the decoder and by a running consumer (in the dead-letter queue);
//! and in `valid/`, the edges of every field's domain, each to be stored by a running consumer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::time::Duration;

use common::*;
use sistema_mensajes::consumer::{self, Deps};
use sistema_mensajes::reading::{decode, RejectReason};
use tokio_util::sync::CancellationToken;

const VALID: &str = "valid";

/// (reason, file name, bytes) for every malformed file in the corpus.
fn corpus() -> Vec<(String, String, Vec<u8>)> {
    files(|folder| folder != VALID)
}

/// (file name, bytes) of the accepted edge cases.
fn valid() -> Vec<(String, Vec<u8>)> {
    let valid: Vec<_> = files(|folder| folder == VALID)
        .into_iter()
        .map(|(_, name, body)| (name, body))
        .collect();
    assert!(
        valid.len() >= 10,
        "too few valid edge cases: {}",
        valid.len()
    );
    valid
}

fn files(folders: impl Fn(&str) -> bool) -> Vec<(String, String, Vec<u8>)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(root).unwrap() {
        let dir = dir.unwrap();
        if !dir.file_type().unwrap().is_dir() {
            continue;
        }
        let reason = dir.file_name().to_string_lossy().into_owned();
        if !folders(&reason) {
            continue;
        }
        assert!(
            reason == VALID || RejectReason::ALL.iter().any(|r| r.as_str() == reason),
            "folder {reason} is not a reason"
        );
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let file = file.unwrap();
            out.push((
                reason.clone(),
                file.file_name().to_string_lossy().into_owned(),
                std::fs::read(file.path()).unwrap(),
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn the_decoder_gives_each_file_its_reason() {
    let corpus = corpus();
    assert!(corpus.len() >= 40, "corpus too small: {}", corpus.len());
    for (reason, name, body) in corpus {
        let got = decode(&body, None, 4096)
            .map(|r| r.station_id)
            .unwrap_err()
            .reason;
        assert_eq!(got.as_str(), reason, "{reason}/{name}");
    }
}

#[test]
fn the_decoder_accepts_each_edge_case() {
    for (name, body) in valid() {
        if let Err(e) = decode(&body, None, 4096) {
            panic!("valid/{name}: {e:?}");
        }
    }
}

/// Whatever `decode` accepts must be storable: the edges of every field's domain go through a
/// running consumer into PostgreSQL, none dead-lettered, and the consumer keeps running. (A
/// timestamp in year 9999 with a negative offset used to abort the consumer in postgres-types.)
#[tokio::test(flavor = "multi_thread")]
async fn a_running_consumer_stores_each_edge_case() {
    let names = Names::new("corpus-valid");
    names.create_schema().await;
    let deps = Deps::default();
    let token = CancellationToken::new();
    let running = tokio::spawn(consumer::run(
        names.consumer_config(),
        deps.clone(),
        token.clone(),
    ));
    wait_running(&deps.health).await;
    let valid = valid();
    let client = Client::connect().await;
    let msgs: Vec<_> = valid.iter().map(|(_, b)| (b.clone(), props())).collect();
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;
    names
        .wait_rows(valid.len() as u64, Duration::from_secs(30))
        .await;
    let mut want: Vec<_> = valid
        .iter()
        .map(|(_, b)| decode(b, None, 4096).unwrap().message_id)
        .collect();
    want.sort();
    assert_eq!(names.stored_ids().await, want);
    assert_eq!(client.ready(&names.dead_letter_queue).await, 0);
    assert!(!running.is_finished());
    token.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_consumer_dead_letters_each_file_with_its_reason() {
    let names = Names::new("corpus");
    names.create_schema().await;
    let deps = Deps::default();
    let token = CancellationToken::new();
    let running = tokio::spawn(consumer::run(
        names.consumer_config(),
        deps.clone(),
        token.clone(),
    ));
    wait_running(&deps.health).await;
    let corpus = corpus();
    let client = Client::connect().await;
    let msgs: Vec<_> = corpus
        .iter()
        .map(|(_, _, b)| (b.clone(), props()))
        .collect();
    client
        .publish_all(&names.exchange, &names.routing_key, &msgs)
        .await;
    wait_until(
        Duration::from_secs(30),
        "every file dead-lettered",
        || async { client.ready(&names.dead_letter_queue).await as usize == corpus.len() },
    )
    .await;
    let mut got: Vec<(Vec<u8>, String)> = client
        .drain(&names.dead_letter_queue)
        .await
        .into_iter()
        .map(|(b, r, _)| (b, r))
        .collect();
    got.sort();
    // A body over the limit is dead-lettered cut to it (and marked so).
    let limit = names.consumer_config().validation.max_message_bytes;
    let mut want: Vec<(Vec<u8>, String)> = corpus
        .into_iter()
        .map(|(r, _, mut b)| {
            if r == "too_large" {
                b.truncate(limit);
            }
            (b, r)
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(names.rows().await, 0);
    assert!(!running.is_finished());
    token.cancel();
    running.await.unwrap().unwrap();
}
