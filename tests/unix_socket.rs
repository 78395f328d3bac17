//! The consumer reaches PostgreSQL through its Unix socket with a host-less URL, the form the
//! NixOS module uses for peer authentication: `postgres:///weather?host=/run/postgresql`.
//! `TEST_PG_SOCKET_URL` overrides the URL (database and user included); the default is the
//! Debian server's socket directory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::path::Path;

use common::*;
use sistema_mensajes::config::{self, ConsumerConfig};
use sistema_mensajes::db::Db;

#[tokio::test]
async fn consumer_connects_through_the_unix_socket_with_a_hostless_url() {
    let names = Names::new("pg-socket");
    let url = std::env::var("TEST_PG_SOCKET_URL")
        .unwrap_or_else(|_| "postgres:///postgres?host=/var/run/postgresql&user=postgres".into());
    let dir = std::env::temp_dir().join(unique_name("socket-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("consumer.toml");
    std::fs::write(
        &file,
        format!(
            "[postgres]\nurl = \"{url}\"\nschema = \"{}\"\n",
            names.schema
        ),
    )
    .unwrap();

    // The config layer accepts the URL as the daemon would load it...
    let cfg: ConsumerConfig = config::load(Some(Path::new(&file))).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(cfg.postgres.url.host_str().unwrap_or(""), "");

    // ...and the database layer connects with it and applies the migrations in our schema.
    let _db = Db::connect(&cfg.postgres, None).await.unwrap();
    let tables: i64 = pg_client(&pg_url())
        .await
        .query_one(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema = $1 AND table_name = 'weather_logs'",
            &[&names.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);
}
