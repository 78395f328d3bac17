//! Faults of issue 17, each a member of a class and injected for real: a table change that refuses
//! every reading (a fault of the system, not of one row), a broker alarm that blocks publishers,
//! a dead-letter path that can never succeed, and a message whose headers exceed our frame size.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::time::Duration;

use common::*;
use sistema_mensajes::consumer;

const LIMIT: Duration = Duration::from_secs(60);

/// The example (a NOT NULL column added, 50 readings published) and the class: the
/// readings are held and retried, none dead-lettered, the status line and a gauge say why, and
/// once the column is dropped every one is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_change_that_refuses_every_reading_holds_them_until_it_is_undone() {
    let names = Names::new("refuse-all");
    names.create_schema().await;
    let client = Client::connect().await;
    names.predeclare_like_the_old_system(&client.channel).await;
    let running = start_consumer(names.consumer_config());
    let (deps, _, _) = &running;
    wait_running(&deps.health).await;
    let pg = pg_client(&pg_url()).await;
    let table = format!("{}.weather_logs", names.schema);
    pg.batch_execute(&format!(
        "ALTER TABLE {table} ADD COLUMN site text NOT NULL"
    ))
    .await
    .unwrap();

    let ids = publish_readings(&client, &names, 50).await;
    wait_until(LIMIT, "the refusal taken as systematic", || async {
        deps.metrics.refusing_all.get() == 1 && deps.metrics.insert_errors.get() >= 3
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
