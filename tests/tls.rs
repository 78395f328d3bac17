//! TLS to RabbitMQ and PostgreSQL, against a private RabbitMQ node with a TLS listener and a
//! private PostgreSQL with `ssl = on` (scripts/private-servers), with certificates made here:
//! readings stored over TLS (client certificates and RabbitMQ's EXTERNAL login included), and
//! every failed check refused with its name: a wrong CA, a name mismatch, an expired certificate,
//! a plain-text server where TLS is required. One test: the failures swap the servers'
//! certificates, which parallel tests would see.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sistema_mensajes::secret::Secret;
use time::OffsetDateTime;
use tokio_postgres::NoTls;

const CLIENT: &str = "sistema_tls_client";

/// A CA, and what it signs, written as PEM files into `dir`.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).unwrap();
        Self {
            dir: dir.to_owned(),
            ca,
        }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// `stem.pem` and `stem.key`: a server certificate for `names`, or a client's with CN
    /// `client`, valid over `days` (negative: expired).
    fn issue(&self, stem: &str, names: &[&str], client: Option<&str>, days: (i64, i64)) -> PathBuf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let now = OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days.0);
        params.not_after = now + time::Duration::days(days.1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        match client {
            Some(cn) => {
                params.distinguished_name.push(DnType::CommonName, cn);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            None => {
                params.distinguished_name.push(DnType::CommonName, names[0]);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        std::fs::write(self.dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
        write_key(&self.dir.join(format!("{stem}.key")), &key.serialize_pem());
        self.dir.join(stem)
    }
}

/// A port `p` with `p + 1` (the TLS listener) and `p + 20000` (Erlang distribution) free too.
fn free_ports() -> u16 {
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p < 40000
            && [p + 1, p + 20000]
                .iter()
                .all(|q| TcpListener::bind(("127.0.0.1", *q)).is_ok())
        {
            return p;
        }
    }
}

/// The private servers, removed when dropped.
struct Servers {
    dir: PathBuf,
    pg: u16,
    amqp: u16,
}

impl Servers {
    /// scripts/private-servers on our directory.
    fn script(&self) -> Command {
        let mut cmd = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/private-servers"
        ));
        cmd.arg(&self.dir);
        cmd
    }

    fn run(&self, args: &[&str]) {
        let status = self.script().args(args).status().unwrap();
        assert!(status.success(), "private-servers {args:?}");
    }

    fn rabbitmqctl(&self, args: &[&str]) -> String {
        let out = self
            .script()
            .arg("rabbitmqctl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A plain-text session as postgres (trust), for checks.
    async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
                self.pg
            ),
            NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
    }

    /// Serves `stem.pem`/`stem.key` from now on, on PostgreSQL (`pg`) or RabbitMQ (`rabbit`).
    fn serve(&self, server: &str, stem: &Path) {
        let dir = match server {
            "pg" => "pg",
            _ => "rabbit/tls",
        };
        for ext in ["pem", "key"] {
            std::fs::copy(
                stem.with_extension(ext),
                self.dir.join(format!("{dir}/server.{ext}")),
            )
            .unwrap();
        }
        self.run(&["tls", "reload"]);
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.script().arg("down").status();
    }
}

struct RemovedAtEnd(PathBuf);

impl Drop for RemovedAtEnd {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn path(p: &Path, ext: &str) -> String {
    p.with_extension(ext).display().to_string()
}

/// The TLS check an AMQP connection to `url` failed (it must fail).
async fn amqp_refusal(url: &str) -> String {
    match sistema_mensajes::amqp::connect(&Secret::new(url.to_owned()), "tls test", None).await {
        Ok(_) => panic!("connected to {url}"),
        Err(e) => sistema_mensajes::amqp::lapin_tls_check(&e)
            .unwrap_or_else(|| panic!("{url}: not a TLS failure: {e}"))
            .to_owned(),
    }
}

/// The error of a PostgreSQL connection to `url` (it must fail, as a TLS failure).
async fn pg_refusal(cfg: &sistema_mensajes::config::PostgresConfig, url: &str) -> String {
    let mut cfg = cfg.clone();
    cfg.url = url::Url::parse(url).unwrap();
    match sistema_mensajes::db::Db::connect(&cfg, None).await {
        Ok(_) => panic!("connected to {url}"),
        Err(e) => {
            assert_eq!(e.error_type(), "tls", "{url}: {e}");
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readings_go_over_tls_and_every_failed_check_is_refused_by_name() {
    let names = Names::new("tls");
    let dir = std::env::temp_dir().join(format!("sistema-{}", names.schema));
    let _removed = RemovedAtEnd(dir.clone());
    std::fs::create_dir_all(dir.join("pki")).unwrap();
    let pki_dir = dir.join("pki");
    let pki = Pki::new(&pki_dir, "ca");
    let other = Pki::new(&pki_dir, "other-ca");
    let server = pki.issue("server", &["localhost"], None, (-1, 30));
    let expired = pki.issue("expired", &["localhost"], None, (-30, -1));
    let client = pki.issue("client", &[], Some(CLIENT), (-1, 30));
    let stranger = other.issue("stranger", &[], Some(CLIENT), (-1, 30));
    for (from, to) in [
        ("server.pem", "tls/server.pem"),
        ("server.key", "tls/server.key"),
        ("ca.pem", "tls/ca.pem"),
    ] {
        std::fs::create_dir_all(pki_dir.join("tls")).unwrap();
        std::fs::copy(pki_dir.join(from), pki_dir.join(to)).unwrap();
    }
    let servers = Servers {
        dir: dir.join("servers"),
        pg: free_ports(),
        amqp: free_ports(),
    };
    let status = servers
        .script()
        .args(["up", &servers.pg.to_string(), &servers.amqp.to_string()])
        .env("PRIVATE_TLS", pki_dir.join("tls"))
        .status()
        .unwrap();
    assert!(status.success(), "private servers with TLS");
    let tls_port = servers.amqp + 1;
    let ca = pki.ca_file("ca").display().to_string();
    let wrong_ca = other.ca_file("other-ca").display().to_string();

    // The client's accounts: a RabbitMQ user without a password (EXTERNAL logs in by the
    // certificate's CN), and a PostgreSQL role that may log in by certificate only.
    servers.rabbitmqctl(&["add_user", CLIENT, "unused"]);
    servers.rabbitmqctl(&["clear_password", CLIENT]);
    servers.rabbitmqctl(&["set_permissions", "-p", "/", CLIENT, ".*", ".*", ".*"]);
    servers
        .sql()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {CLIENT} LOGIN; GRANT CREATE ON DATABASE postgres TO {CLIENT}"
        ))
        .await
        .unwrap();

    // Readings over TLS both ways: the producer with a password, the consumer by certificate
    // (EXTERNAL on RabbitMQ, `cert` on PostgreSQL), each server checked in full.
    let producer_url =
        format!("amqps://guest:guest@localhost:{tls_port}/%2f?cacertfile={ca}&verify=verify_peer");
    let consumer_url = format!(
        "amqps://localhost:{tls_port}/%2f?cacertfile={ca}&certfile={}&keyfile={}&auth_mechanism=external",
        path(&client, "pem"),
        path(&client, "key")
    );
    let pg_url = format!(
        "postgres://{CLIENT}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        servers.pg,
        path(&client, "pem"),
        path(&client, "key")
    );
    let cfg = names.consumer_config_via(&consumer_url, &pg_url);
    let running = start_consumer(cfg.clone());
    let n = 200;
    produce_confirmed_via(&names, &producer_url, n).await;
    let check = servers.sql().await;
    let count_sql = format!("SELECT count(*) FROM {}.weather_logs", names.schema);
    wait_until(
        Duration::from_secs(60),
        "200 readings stored over TLS",
        || async {
            check
                .query_one(&count_sql, &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == n as i64)
        },
    )
    .await;
    let row = check
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = $1 AND ssl AND client_dn LIKE '%' || $1",
            &[&CLIENT],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, i64>(0) >= 1,
        "the consumer's PostgreSQL session is TLS with its certificate"
    );
    let connections = servers.rabbitmqctl(&["list_connections", "user", "ssl", "auth_mechanism"]);
    // (The producer's connection is closed by now; it published on the TLS port, nothing else.)
    assert!(
        connections.contains(&format!("{CLIENT}\ttrue\tEXTERNAL")),
        "the consumer's RabbitMQ connection is TLS, logged in by its certificate: {connections}"
    );

    // Each failed check, by name, on both servers. A wrong CA:
    let refusal = amqp_refusal(&producer_url.replace(&ca, &wrong_ca)).await;
    assert!(
        refusal.contains("not signed by the configured CA"),
        "{refusal}"
    );
    let refusal = pg_refusal(&cfg.postgres, &pg_url.replace(&ca, &wrong_ca)).await;
    assert!(
        refusal.contains("not signed by the configured CA"),
        "{refusal}"
    );
    // A name the certificate is not for (it is for localhost only):
    let refusal = amqp_refusal(&producer_url.replace("localhost", "127.0.0.1")).await;
    assert!(refusal.contains("not issued for the name"), "{refusal}");
    let refusal = amqp_refusal(&format!(
        "{producer_url}&server_name_indication=broker.example"
    ))
    .await;
    assert!(refusal.contains("not issued for the name"), "{refusal}");
    let refusal = pg_refusal(&cfg.postgres, &pg_url.replace("localhost", "127.0.0.1")).await;
    assert!(refusal.contains("not issued for the name"), "{refusal}");
    // ... which verify-ca, as libpq, does not check:
    let mut chain_only = cfg.postgres.clone();
    chain_only.url = url::Url::parse(
        &pg_url
            .replace("localhost", "127.0.0.1")
            .replace("verify-full", "verify-ca"),
    )
    .unwrap();
    sistema_mensajes::db::Db::connect(&chain_only, None)
        .await
        .expect("verify-ca accepts another name");
    // A client certificate from another CA: the servers refuse it.
    let stranger_url = consumer_url
        .replace(&path(&client, "pem"), &path(&stranger, "pem"))
        .replace(&path(&client, "key"), &path(&stranger, "key"));
    // (With TLS 1.3 the server checks it after our side of the handshake is done: its alert
    // may come as a reset instead, which is not ours to name.)
    match sistema_mensajes::amqp::connect(&Secret::new(stranger_url.clone()), "tls test", None)
        .await
    {
        Ok(_) => panic!("RabbitMQ accepted a client certificate of another CA"),
        Err(e) => {
            if let Some(check) = sistema_mensajes::amqp::lapin_tls_check(&e) {
                assert!(check.contains("refused the handshake"), "{check}");
            }
        }
    }
    // A plain-text server where TLS is required: RabbitMQ's plain port.
    let refusal =
        amqp_refusal(&producer_url.replace(&tls_port.to_string(), &servers.amqp.to_string())).await;
    assert!(refusal.contains("does not speak TLS"), "{refusal}");

    // An expired certificate, served from now on: refused at once by a new connection, and, in
    // the running consumer, at its next reconnection: named in its status line and counted.
    servers.serve("rabbit", &expired);
    let refusal = amqp_refusal(&producer_url).await;
    assert!(refusal.contains("expired"), "{refusal}");
    let deps = running.0.clone();
    let errors_before = deps.metrics.amqp_connection_errors.get();
    servers.rabbitmqctl(&["close_all_connections", "test: certificate renewal"]);
    wait_until(
        Duration::from_secs(30),
        "the consumer names RabbitMQ's expired certificate",
        || async {
            deps.health
                .problem()
                .is_some_and(|p| p.contains("TLS to RabbitMQ failed") && p.contains("expired"))
                && deps.metrics.amqp_connection_errors.get() > errors_before
        },
    )
    .await;
    // The certificate renewed: the consumer reconnects by itself.
    servers.serve("rabbit", &server);
    wait_until(
        Duration::from_secs(30),
        "the consumer back on RabbitMQ over TLS",
        || async { deps.health.problem().is_none() },
    )
    .await;

    // PostgreSQL, the same way: its session cut, the writer meets the expired certificate with a
    // batch in hand, counts a `tls` insert error, names it, keeps the batch, and stores it once
    // the certificate is renewed.
    servers.serve("pg", &expired);
    // `pg_ctl reload` only signals the server: wait until new sessions see the new certificate.
    wait_until(
        Duration::from_secs(10),
        "PostgreSQL serving the expired certificate",
        || async {
            let mut cfg = cfg.postgres.clone();
            cfg.url = url::Url::parse(&pg_url).unwrap();
            sistema_mensajes::db::Db::connect(&cfg, None).await.is_err()
        },
    )
    .await;
    let refusal = pg_refusal(&cfg.postgres, &pg_url).await;
    assert!(refusal.contains("expired"), "{refusal}");
    let tls_errors = || deps.metrics.insert_errors.with_label_values(&["tls"]).get();
    let before = tls_errors();
    check
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&CLIENT],
        )
        .await
        .unwrap();
    produce_confirmed_via(&names, &producer_url, 10).await;
    wait_until(
        Duration::from_secs(30),
        "the writer names PostgreSQL's expired certificate",
        || async {
            tls_errors() > before
                && deps.health.problem().is_some_and(|p| {
                    p.contains("TLS to PostgreSQL failed") && p.contains("expired")
                })
        },
    )
    .await;
    servers.serve("pg", &server);
    wait_until(
        Duration::from_secs(60),
        "the 10 readings stored after the renewal",
        || async {
            check
                .query_one(&count_sql, &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == n as i64 + 10)
        },
    )
    .await;
    stop_consumer(running).await;

    // A plain-text PostgreSQL where TLS is required: refused by name; `prefer` goes on in plain
    // text, as libpq does.
    check
        .batch_execute("ALTER SYSTEM SET ssl = off")
        .await
        .unwrap();
    check
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let plain = pg_url.replace("verify-full", "require");
    let mut prefer = cfg.postgres.clone();
    prefer.url = url::Url::parse(&format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=prefer",
        servers.pg
    ))
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "PostgreSQL without TLS",
        || async {
            let row = servers
                .sql()
                .await
                .query_one("SHOW ssl", &[])
                .await
                .unwrap();
            row.get::<_, String>(0) == "off"
        },
    )
    .await;
    sistema_mensajes::db::Db::connect(&prefer, None)
        .await
        .expect("sslmode=prefer goes on without TLS");
    let refusal = pg_refusal(&cfg.postgres, &plain).await;
    assert!(refusal.contains("does not speak TLS"), "{refusal}");
}
