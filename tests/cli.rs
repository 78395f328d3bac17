//! The binaries as operators use them: --help, --version, --check-config, exit codes, one-shot sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::process::{Command, Output};

use common::*;

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

const CONSUMER: &str = env!("CARGO_BIN_EXE_consumer");
const PRODUCER: &str = env!("CARGO_BIN_EXE_producer");

/// `producer --send` against a "broker" that accepts TCP and never says a word, returned once it
/// has connected, with that connection (keep it open): the send stays unconfirmed until stopped.
fn producer_on_a_silent_broker(
    stderr: std::process::Stdio,
) -> (std::process::Child, std::net::TcpStream) {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", silent.local_addr().unwrap());
    let child = Command::new(PRODUCER)
        .args(["--send", r#"{"station_id": "S-1"}"#])
        .env("PRODUCER_AMQP__URL", &url)
        .env_remove("CREDENTIALS_DIRECTORY")
        .stderr(stderr)
        .spawn()
        .unwrap();
    let (conn, _) = silent.accept().unwrap();
    (child, conn)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn version_and_help() {
    for (bin, name) in [(CONSUMER, "consumer"), (PRODUCER, "producer")] {
        let out = run(bin, &["--version"], &[]);
        assert!(out.status.success());
        assert_eq!(
            text(&out.stdout).trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
        let help = text(&run(bin, &["--help"], &[]).stdout);
        assert!(
            help.contains("--config <PATH>") && help.contains("--check-config"),
            "{help}"
        );
    }
    assert!(text(&run(PRODUCER, &["--help"], &[]).stdout).contains("--send <JSON>"));
    assert_eq!(
        run(CONSUMER, &["--no-such-flag"], &[]).status.code(),
        Some(2)
    );
}

#[test]
fn check_config_prints_the_effective_config_without_passwords() {
    let dir = std::env::temp_dir().join(unique_name("cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let pw = dir.join("pg-password");
    std::fs::write(&pw, "file-secret-123\n").unwrap();
    let out = run(
        CONSUMER,
        &["--check-config"],
        &[
            (
                "CONSUMER_AMQP__URL",
                "amqp://bob:inline-secret-456@rabbit:5672/%2f",
            ),
            ("CONSUMER_POSTGRES__PASSWORD_FILE", pw.to_str().unwrap()),
            (
                "CONSUMER_POSTGRES__URL",
                "postgres://weather@db/weather?password=query-secret-789&sslmode=disable",
            ),
            ("CONSUMER_BATCH__MAX_SIZE", "250"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("max_size = 250"), "{stdout}");
    assert!(
        stdout.contains("amqp://bob:REDACTED@rabbit:5672/%2f"),
        "{stdout}"
    );
    assert!(
        stdout.contains("password=REDACTED&sslmode=disable"),
        "{stdout}"
    );
    for secret in ["inline-secret-456", "file-secret-123", "query-secret-789"] {
        assert!(!stdout.contains(secret), "{secret} in {stdout}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_url_that_does_not_parse_is_named_not_echoed() {
    for (bin, key, url) in [
        (
            CONSUMER,
            "CONSUMER_POSTGRES__URL",
            "postgres://u:pg-secret-1@[db/x",
        ),
        (
            CONSUMER,
            "CONSUMER_AMQP__URL",
            "amqp://u:amqp-secret-2@h:99999/%2f",
        ),
        (
            PRODUCER,
            "PRODUCER_AMQP__URL",
            "amqp://u:amqp-secret-3@[::1/%2f",
        ),
    ] {
        for args in [&["--check-config"][..], &[]] {
            let out = run(bin, args, &[(key, url)]);
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            assert_eq!(out.status.code(), Some(78), "{stderr}");
            assert!(stderr.contains("not a valid URL"), "{stderr}");
            let key = key
                .split_once('_')
                .unwrap()
                .1
                .replace("__", ".")
                .to_lowercase();
            assert!(
                stderr.to_lowercase().contains(&key),
                "{key} not named: {stderr}"
            );
            assert!(
                !stderr.contains("-secret-") && !stdout.contains("-secret-"),
                "{stderr}"
            );
        }
    }
}

#[test]
fn a_running_daemon_cannot_dump_core() {
    // Kept running by a broker that never answers, while we look.
    let (mut child, _conn) = producer_on_a_silent_broker(std::process::Stdio::null());
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<_> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "soft and hard limits: {core}");
}

#[test]
fn configuration_errors_name_the_key_and_exit_78() {
    let dir = std::env::temp_dir().join(unique_name("cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("consumer.toml");
    std::fs::write(&file, "[batch]\nmax_sise = 10\n").unwrap();
    let out = run(CONSUMER, &["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("max_sise"),
        "{}",
        text(&out.stderr)
    );

    let out = run(
        CONSUMER,
        &["--check-config"],
        &[("CONSUMER_AMQP__PREFETCH", "lots")],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).to_lowercase().contains("amqp.prefetch"),
        "{}",
        text(&out.stderr)
    );

    let out = run(
        PRODUCER,
        &["--check-config"],
        &[("PRODUCER_SIMULATION__STATIONS", "0")],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("simulation.stations"),
        "{}",
        text(&out.stderr)
    );

    let out = run(
        CONSUMER,
        &["--config", dir.join("absent.toml").to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        text(&out.stderr).contains("absent.toml"),
        "{}",
        text(&out.stderr)
    );

    let out = run(
        CONSUMER,
        &["--check-config"],
        &[("CONSUMER_AMQP__PASSWORD_FILE", "/nonexistent/pw")],
    );
    assert!(
        out.status.success(),
        "the password is read at start, not by --check-config"
    );
    // At start, a password file that is missing is a configuration error (exit 78, so systemd's
    // RestartPreventExitStatus=78 stops the restart loop), naming the key.
    for (bin, key) in [
        (CONSUMER, "CONSUMER_POSTGRES__PASSWORD_FILE"),
        (CONSUMER, "CONSUMER_AMQP__PASSWORD_FILE"),
        (PRODUCER, "PRODUCER_AMQP__PASSWORD_FILE"),
    ] {
        let out = run(bin, &[], &[(key, "/nonexistent/pw")]);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{bin} {key}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("password_file"),
            "{}",
            text(&out.stderr)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn producer_count_and_one_shot_send_publish_and_confirm() {
    let names = Names::new("cli-send");
    let env = [
        ("PRODUCER_AMQP__URL", amqp_url()),
        ("PRODUCER_AMQP__EXCHANGE", names.exchange.clone()),
        ("PRODUCER_AMQP__QUEUE", names.queue.clone()),
        ("PRODUCER_AMQP__ROUTING_KEY", names.routing_key.clone()),
        ("PRODUCER_METRICS__LISTEN", "127.0.0.1:0".to_owned()),
        ("PRODUCER_SIMULATION__RATE", "0".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = run(PRODUCER, &["--count", "25"], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let body = r#"{"station_id": "HAND-1", "temperature": 3.5, "humidity": 40, "pressure": 990}"#;
    let out = run(PRODUCER, &["--send", body], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let client = Client::connect().await;
    wait_until(
        std::time::Duration::from_secs(10),
        "26 messages queued",
        || async { client.ready(&names.queue).await == 26 },
    )
    .await;
    let msgs = client.drain(&names.queue).await;
    assert_eq!(
        msgs.last().unwrap().0,
        body.as_bytes(),
        "sent exactly as given"
    );
}

#[test]
fn timeouts_that_outlast_the_watchdog_are_a_config_error() {
    // The defaults fit the shipped units' WatchdogSec=30s: 5 s + 20 s + 2 s.
    let fits = run(
        CONSUMER,
        &["--check-config"],
        &[("WATCHDOG_USEC", "30000000")],
    );
    assert!(fits.status.success(), "{}", text(&fits.stderr));
    let out = run(
        CONSUMER,
        &["--check-config"],
        &[
            ("WATCHDOG_USEC", "30000000"),
            ("CONSUMER_POSTGRES__STATEMENT_TIMEOUT", "30s"),
        ],
    );
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("postgres.statement_timeout") && err.contains("WatchdogSec=30s"),
        "{err}"
    );
}

#[test]
fn shipped_units_leave_room_for_the_default_timeouts() {
    use sistema_mensajes::config::{ConsumerConfig, ProducerConfig};
    let seconds = |unit: &str, key: &str| -> f64 {
        let text =
            std::fs::read_to_string(format!("{}/systemd/{unit}", env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{unit} sets no {key}"));
        value.trim_end_matches('s').parse().unwrap()
    };
    let consumer = ConsumerConfig::default();
    assert!(
        consumer.shutdown_timeout.as_secs_f64() < seconds("consumer.service", "TimeoutStopSec"),
        "shutdown_timeout must end before systemd's TimeoutStopSec kills the consumer"
    );
    assert!(
        consumer.postgres.attempt_limit().as_secs_f64()
            < seconds("consumer.service", "WatchdogSec"),
        "one attempt at storing a batch must end before the watchdog fires"
    );
    assert!(
        consumer.retry.longest_pause().as_secs_f64() < seconds("consumer.service", "WatchdogSec"),
        "the pause between two attempts must end before the watchdog fires"
    );
    assert!(
        ProducerConfig::default().shutdown_timeout.as_secs_f64()
            < seconds("producer.service", "TimeoutStopSec")
    );
}

#[test]
fn a_send_interrupted_before_its_confirm_exits_non_zero() {
    // The send cannot be confirmed; once it has connected, stop it as systemd or Ctrl-C would.
    let (mut child, _conn) = producer_on_a_silent_broker(std::process::Stdio::piped());
    sigterm(Some(child.id()));
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "an unconfirmed send must not exit 0"
    );
}

/// A TLS file that cannot be used stops either daemon at start (exit 78), naming the URL's key,
/// the parameter and the path, never the file's content.
#[test]
fn a_tls_file_that_cannot_be_used_is_a_configuration_error() {
    let dir = std::env::temp_dir().join(unique_name("cli-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = "not-a-key-but-secret-4711";
    let garbage = dir.join("garbage.pem");
    write_key(&garbage, secret);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, other_key) = (dir.join("cert.pem"), dir.join("other.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    write_key(
        &other_key,
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let loose_key = dir.join("loose.key");
    std::fs::write(
        &loose_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let loose_key = loose_key.display().to_string();
    let (garbage, cert_file, other_key) = (
        garbage.display().to_string(),
        cert_file.display().to_string(),
        other_key.display().to_string(),
    );
    let amqps = |query: &str| format!("amqps://guest@127.0.0.1:1/%2f?{query}");
    let cases = [
        (
            amqps("cacertfile=/nonexistent/ca.pem"),
            "cacertfile=/nonexistent/ca.pem: cannot read it",
        ),
        (
            amqps(&format!("cacertfile={garbage}")),
            "holds no certificate",
        ),
        (
            amqps(&format!(
                "cacertfile={cert_file}&certfile={cert_file}&keyfile={garbage}"
            )),
            "holds no private key",
        ),
        (
            amqps(&format!(
                "cacertfile={cert_file}&certfile={cert_file}&keyfile={other_key}"
            )),
            "does not go with certfile",
        ),
        (
            amqps(&format!(
                "cacertfile={cert_file}&certfile={cert_file}&keyfile={loose_key}"
            )),
            "is readable by others (mode 0644)",
        ),
    ];
    for (url, expected) in &cases {
        for (bin, var) in [
            (CONSUMER, "CONSUMER_AMQP__URL"),
            (PRODUCER, "PRODUCER_AMQP__URL"),
        ] {
            let out = run(bin, &[], &[(var, url)]);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{bin} {url}: {stderr}");
            assert!(
                stderr.contains("amqp.url") && stderr.contains(expected),
                "{bin} {url}: {stderr}"
            );
            assert!(!stderr.contains(secret), "{stderr}");
        }
    }
    let out = run(
        CONSUMER,
        &[],
        &[(
            "CONSUMER_POSTGRES__URL",
            &format!("postgres://u@127.0.0.1:1/db?sslmode=verify-full&sslrootcert={garbage}"),
        )],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("postgres.url")
            && stderr.contains("sslrootcert=")
            && stderr.contains("holds no certificate"),
        "{stderr}"
    );
    assert!(!stderr.contains(secret), "{stderr}");
    // The metrics endpoint's web configuration, for both daemons.
    for (bin, var) in [
        (CONSUMER, "CONSUMER_METRICS__WEB_CONFIG_FILE"),
        (PRODUCER, "PRODUCER_METRICS__WEB_CONFIG_FILE"),
    ] {
        let out = run(bin, &[], &[(var, &garbage)]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{bin}: {stderr}");
        assert!(stderr.contains("metrics.web_config_file"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
