//! PostgreSQL least privilege against the real server: `consumer migrate` runs as the owner
//! role and grants the consumer's role only what it needs; that role then stores readings and
//! can do nothing else to the table; a reading that reuses another's id is told from a
//! redelivery. Roles and schema are unique per test and removed at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use tokio_postgres::error::SqlState;
use url::Url;

/// Login roles, dropped (with what they own and were granted) when the test ends.
struct Roles(Vec<String>);

impl Drop for Roles {
    fn drop(&mut self) {
        let roles = self.0.clone();
        cleanup(async move {
            let client = pg_client(&pg_url()).await;
            for r in roles {
                let _ = client
                    .batch_execute(&format!("DROP OWNED BY \"{r}\" CASCADE; DROP ROLE \"{r}\""))
                    .await;
            }
        });
    }
}

fn url_as(role: &str) -> Url {
    let mut url = Url::parse(&pg_url()).unwrap();
    url.set_username(role).unwrap();
    url
}

fn migrate(names: &Names, writer: &Url, owner: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_consumer"))
        .arg("migrate")
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(names.consumer_env())
        .env("CONSUMER_POSTGRES__URL", writer.as_str())
        .env("CONSUMER_POSTGRES__OWNER_URL", owner)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_consumers_role_may_only_insert_and_migrations_run_apart() {
    let names = Names::new("leastpriv");
    let (owner, writer) = (
        format!("{}_owner", names.schema),
        format!("{}_writer", names.schema),
    );
    let _roles = Roles(vec![writer.clone(), owner.clone()]);
    let admin = pg_client(&pg_url()).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{owner}\" LOGIN; CREATE ROLE \"{writer}\" LOGIN;
             GRANT CREATE ON DATABASE {db} TO \"{owner}\";",
            db = url_as("x").path().trim_start_matches('/'),
        ))
        .await
        .unwrap();

    // The consumer, least-privileged and told not to migrate, waits for `consumer migrate`.
    let mut cfg = names.consumer_config_via(&amqp_url(), url_as(&writer).as_str());
    cfg.postgres.migrate = false;
    let running = start_consumer(cfg);
    let health = running.0.health.clone();
    wait_until(
        Duration::from_secs(30),
        "the consumer names the missing step",
        || {
            let problem = health.problem().unwrap_or_default();
            async move { problem.contains("consumer migrate") }
        },
    )
    .await;

    // Unreachable owner: 75, a unit may retry; a bad owner URL: 78.
    let out = migrate(
        &names,
        &url_as(&writer),
        "postgres://x@127.0.0.1:1/postgres",
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    let out = migrate(&names, &url_as(&writer), "mysql://x@127.0.0.1/db");
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("postgres.owner_url"), "{}", text(&out));

    // Twice: idempotent.
    for _ in 0..2 {
        let out = migrate(&names, &url_as(&writer), url_as(&owner).as_str());
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("role `{writer}` may insert")),
            "{}",
            text(&out)
        );
    }

    // The consumer goes on by itself; a redelivered reading is a duplicate, a different reading
    // with a stored id a conflict, counted apart (and the stored row is kept).
    wait_running(&health).await;
    let client = Client::connect().await;
    let ids = publish_readings(&client, &names, 3).await;
    names
        .assert_stored_exactly(ids.clone(), Duration::from_secs(30))
        .await;
    let metrics = running.0.metrics.clone();
    let to = (&names.exchange, &names.routing_key);
    client
        .publish_all(to.0, to.1, &[(reading_with_id(ids[0]), props())])
        .await;
    let conflicting = format!(
        r#"{{"station_id": "IMPOSTOR", "temperature": 1.0, "humidity": 1.0, "pressure": 1000.0, "message_id": "{}"}}"#,
        ids[1]
    );
    client
        .publish_all(to.0, to.1, &[(conflicting.into_bytes(), props())])
        .await;
    wait_until(
        Duration::from_secs(30),
        "one duplicate and one conflict",
        || {
            let m = metrics.clone();
            async move { m.duplicates.get() + m.conflicting.get() == 2 }
        },
    )
    .await;
    assert_eq!(
        (metrics.duplicates.get(), metrics.conflicting.get()),
        (1, 1)
    );
    let kept: i64 = admin
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.weather_logs WHERE station_id = 'IMPOSTOR'",
                names.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 0);
    stop_consumer(running).await;

    // Everything but INSERT is refused to the consumer's role.
    let mut as_writer = url_as(&writer);
    as_writer.set_query(Some(&format!(
        "options=-c%20search_path%3D{}",
        names.schema
    )));
    let w = pg_client(as_writer.as_str()).await;
    for sql in [
        "CREATE TABLE t (i int)",
        "ALTER TABLE weather_logs ADD COLUMN z int",
        "DROP TABLE weather_logs",
        "TRUNCATE weather_logs",
        "DELETE FROM weather_logs",
        "UPDATE weather_logs SET temperature = 0",
        "SELECT * FROM weather_logs",
        "SELECT station_id FROM weather_logs",
        "CREATE INDEX ON weather_logs (pressure)",
        "DROP FUNCTION weather_logs_conflicts",
        "DELETE FROM schema_migrations",
        "CREATE TABLE public.t (i int)",
    ] {
        let err = w.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    names.wait_rows(3, Duration::from_secs(5)).await;

    // What a grant cannot take back makes `consumer migrate` fail, naming it: CREATE in the schema
    // (as PUBLIC has on `public` in databases from before PostgreSQL 15), or objects of its own.
    let s = &names.schema;
    for (break_it, mend, says) in [
        (
            format!("GRANT CREATE ON SCHEMA {s} TO \"{writer}\""),
            format!("REVOKE CREATE ON SCHEMA {s} FROM \"{writer}\""),
            "may CREATE in schema",
        ),
        (
            format!(
                "CREATE TABLE {s}.planted (i int); ALTER TABLE {s}.planted OWNER TO \"{writer}\""
            ),
            format!("DROP TABLE {s}.planted"),
            "owns 1 objects",
        ),
    ] {
        admin.batch_execute(&break_it).await.unwrap();
        let out = migrate(&names, &url_as(&writer), url_as(&owner).as_str());
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(says), "{}", text(&out));
        admin.batch_execute(&mend).await.unwrap();
        let out = migrate(&names, &url_as(&writer), url_as(&owner).as_str());
        assert!(out.status.success(), "{}", text(&out));
    }
}
