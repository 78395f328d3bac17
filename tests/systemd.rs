//! The daemons as systemd runs them: a metrics socket passed in (LISTEN_FDS), the notify protocol
//! on a socket the test owns (NOTIFY_SOCKET), the watchdog, and where logs go.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Tests fail by panicking.

mod common;

use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(30);
const CONSUMER: &str = env!("CARGO_BIN_EXE_consumer");
const PRODUCER: &str = env!("CARGO_BIN_EXE_producer");

/// Starts `bin` the way systemd does with a socket unit: `listener` as fd 3, `LISTEN_FDS=1`,
/// `LISTEN_FDNAMES=metrics` and `LISTEN_PID` set to the daemon's own pid (the shell's `$$`, kept
/// by `exec`).
fn spawn_with_socket(bin: &str, fd: std::os::fd::RawFd, env: &[(String, String)]) -> Child {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\"", bin])
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "metrics")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn producer_env(names: &Names) -> Vec<(String, String)> {
    [
        ("PRODUCER_AMQP__URL", amqp_url()),
        ("PRODUCER_AMQP__EXCHANGE", names.exchange.clone()),
        ("PRODUCER_AMQP__QUEUE", names.queue.clone()),
        ("PRODUCER_AMQP__ROUTING_KEY", names.routing_key.clone()),
        ("PRODUCER_METRICS__LISTEN", "127.0.0.1:1".into()), // must not be used: the socket is passed
        ("PRODUCER_SIMULATION__RATE", "200".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn both_daemons_serve_metrics_on_a_socket_passed_by_systemd() {
    let names = Names::new("socket");
    names.create_schema().await;
    for (bin, mut env, expect) in [
        (CONSUMER, names.consumer_env(), "messages_processed_total"),
        (PRODUCER, producer_env(&names), "messages_confirmed_total"),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        env.retain(|(k, _)| !k.ends_with("METRICS__LISTEN"));
        env.push((
            if bin == CONSUMER {
                "CONSUMER_METRICS__LISTEN"
            } else {
                "PRODUCER_METRICS__LISTEN"
            }
            .into(),
            "127.0.0.1:1".into(),
        ));
        let child = spawn_with_socket(bin, listener.as_raw_fd(), &env);
        drop(listener); // the daemon holds its own copy
        let text = scrape(addr).await;
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains(expect),
            "{bin}: {text}"
        );
        sigterm(child.id());
        let out = tokio::time::timeout(LIMIT, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{bin}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr)
            .contains("Serving metrics on the socket systemd passed"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passed_socket_that_is_not_a_tcp_listener_is_a_startup_error() {
    let names = Names::new("bad-socket");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let child = spawn_with_socket(CONSUMER, udp.as_raw_fd(), &names.consumer_env());
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not a listening TCP stream socket"),
        "{stderr}"
    );
}

/// Collects every notify datagram with the time it arrived.
struct NotifyListener {
    path: std::path::PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifyListener {
    fn start() -> Self {
        let path = std::env::temp_dir().join(format!("{}.sock", unique_name("notify")));
        let sock = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let now = Instant::now();
                let mut seen = sink.lock().unwrap();
                for line in text.lines() {
                    seen.push((now, line.to_owned()));
                }
            }
        });
        Self { path, seen }
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.seen.lock().unwrap().clone()
    }

    fn has(&self, prefix: &str) -> bool {
        self.lines().iter().any(|(_, l)| l.starts_with(prefix))
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_ready_only_once_the_database_is_reachable_then_status_watchdog_and_stopping() {
    let names = Names::new("notify");
    names.create_schema().await;
    let proxy = Proxy::start(target_of(&pg_url())).await;
    proxy.cut();
    let notify = NotifyListener::start();
    let mut env = names.consumer_env();
    env.retain(|(k, _)| k != "CONSUMER_POSTGRES__URL");
    env.push(("CONSUMER_POSTGRES__URL".into(), proxy.url(&pg_url())));
    env.push((
        "NOTIFY_SOCKET".into(),
        notify.path.to_string_lossy().into_owned(),
    ));
    // Timeouts must fit within the watchdog (checked at start): 0.5 + 1 + 0.1 s < 2 s.
    env.push(("WATCHDOG_USEC".into(), "2000000".into()));
    env.push(("CONSUMER_POSTGRES__CONNECT_TIMEOUT".into(), "500ms".into()));
    env.push(("CONSUMER_POSTGRES__STATEMENT_TIMEOUT".into(), "1s".into()));
    let child = Command::new(CONSUMER)
        .envs(env)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    wait_until(LIMIT, "a status saying it waits for PostgreSQL", || async {
        notify.has("STATUS=waiting for PostgreSQL")
    })
    .await;
    wait_until(LIMIT, "watchdog pings while waiting", || async {
        notify.has("WATCHDOG=1")
    })
    .await;
    assert!(
        !notify.has("READY=1"),
        "READY=1 while the database is unreachable: {:?}",
        notify.lines()
    );

    proxy.restore();
    wait_until(LIMIT, "READY=1", || async { notify.has("READY=1") }).await;
    let ready_at = notify
        .lines()
        .iter()
        .find(|(_, l)| l == "READY=1")
        .unwrap()
        .0;
    wait_until(LIMIT, "a running status line", || async {
        notify.has("STATUS=stored 0 readings")
    })
    .await;
    wait_until(LIMIT, "watchdog pings after READY", || async {
        notify
            .lines()
            .iter()
            .filter(|(t, l)| *t > ready_at && l == "WATCHDOG=1")
            .count()
            >= 3
    })
    .await;
    let pings: Vec<Instant> = notify
        .lines()
        .iter()
        .filter(|(t, l)| *t > ready_at && l == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    for pair in pings.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(500) && gap < Duration::from_millis(2000),
            "ping gap {gap:?} for WATCHDOG_USEC=2s"
        );
    }

    sigterm(child.id());
    let status = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .unwrap()
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(0));
    assert!(notify.has("STOPPING=1"), "{:?}", notify.lines());
    let sequence: Vec<String> = notify
        .lines()
        .into_iter()
        .map(|(_, l)| l)
        .filter(|l| !l.starts_with("WATCHDOG"))
        .collect();
    let position = |line: &str| sequence.iter().position(|l| l == line);
    let ready = position("READY=1").expect("READY=1 sent");
    let stopping = position("STOPPING=1").expect("STOPPING=1 sent");
    assert_eq!(
        sequence.iter().filter(|l| *l == "READY=1").count(),
        1,
        "READY=1 once: {sequence:#?}"
    );
    assert!(ready < stopping, "READY=1 before STOPPING=1: {sequence:#?}");
    assert!(
        sequence[stopping + 1..]
            .iter()
            .all(|l| l == "STATUS=stopping"),
        "nothing but the stopping status after STOPPING=1: {sequence:#?}"
    );
}

/// Timeouts agree with the watchdog: a database that goes silent (connections open, no answer)
/// fails each attempt within `postgres.connect_timeout + statement_timeout + slack`, and the
/// pause between attempts is at most twice `retry.max_delay`; both below the watchdog, so the
/// pings go on without a gap and systemd does not kill a consumer that recovers by itself once
/// the database answers again. Run at the shipped defaults' proportions, a tenth of each
/// (WatchdogSec=30s, statement_timeout 20 s, connect_timeout 5 s, retry 100 ms to 10 s), for long
/// enough that the backoff reaches its cap. (Timed from the start of an attempt, an attempt and
/// the pause after it together outlasted the watchdog: a 30.0 s gap in the pings at full scale.)
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_database_times_out_within_the_watchdog_and_pings_go_on() {
    let names = Names::new("silent-db");
    names.create_schema().await;
    let proxy = Proxy::start(target_of(&pg_url())).await;
    let notify = NotifyListener::start();
    let mut env = names.consumer_env();
    let tenth = [
        ("CONSUMER_POSTGRES__URL", proxy.url(&pg_url())),
        ("CONSUMER_POSTGRES__STATEMENT_TIMEOUT", "2s".into()),
        ("CONSUMER_POSTGRES__CONNECT_TIMEOUT", "500ms".into()),
        ("CONSUMER_RETRY__MIN_DELAY", "100ms".into()),
        ("CONSUMER_RETRY__MAX_DELAY", "1s".into()),
        ("WATCHDOG_USEC", "3000000".into()),
    ];
    env.retain(|(k, _)| !tenth.iter().any(|(t, _)| t == k));
    env.extend(tenth.map(|(k, v)| (k.to_owned(), v)));
    env.push((
        "NOTIFY_SOCKET".into(),
        notify.path.to_string_lossy().into_owned(),
    ));
    let mut child = Command::new(CONSUMER)
        .envs(env)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            sink.lock().unwrap().push_str(&(l + "\n"));
        }
    });
    wait_until(LIMIT, "READY=1", || async { notify.has("READY=1") }).await;

    // PostgreSQL goes silent: connections stay open, nothing gets an answer.
    proxy.pause();
    let client = Client::connect().await;
    client
        .publish_all(
            &names.exchange,
            &names.routing_key,
            &[(old_reading("S-1", 1.0), props())],
        )
        .await;
    let silent_since = Instant::now();
    let pings = || {
        notify
            .lines()
            .into_iter()
            .filter(|(t, l)| *t > silent_since && l == "WATCHDOG=1")
            .map(|(t, _)| t)
            .collect::<Vec<_>>()
    };
    // 24 pings at 1.5 s: 36 s, past the backoff's cap (about 7 failed attempts in).
    wait_until(
        Duration::from_secs(90),
        "24 pings while the database is silent",
        || async { pings().len() >= 24 },
    )
    .await;
    let gaps: Vec<Duration> = pings().windows(2).map(|w| w[1] - w[0]).collect();
    let widest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        widest < Duration::from_millis(2500),
        "a gap of {widest:?} between pings (watchdog 3 s): {gaps:?}"
    );
    let failures = log
        .lock()
        .unwrap()
        .matches("Failed to insert batch")
        .count();
    assert!(failures >= 3, "several failed attempts, not {failures}");
    assert!(
        !log.lock().unwrap().contains("The pipeline is stuck"),
        "the watchdog would have fired"
    );
    proxy.restore();
    names.wait_rows(1, LIMIT).await;
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_fall_back_to_stderr_without_a_journal() {
    let names = Names::new("stderr-logs");
    for (format, expect) in [
        ("journald", "Journald requested but unavailable"),
        ("auto", "log_target=Stderr"),
    ] {
        let mut env = names.consumer_env();
        env.retain(|(k, _)| k != "CONSUMER_POSTGRES__URL");
        env.push((
            "CONSUMER_POSTGRES__URL".into(),
            "postgres://postgres@127.0.0.1:1/postgres".into(),
        ));
        env.push(("CONSUMER_LOG__FORMAT".into(), format.into()));
        let mut child = Command::new(CONSUMER)
            .envs(env)
            .env_remove("JOURNAL_STREAM")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        tokio::time::timeout(LIMIT, async {
            while !(seen.contains(expect) && seen.contains("Cannot reach a dependency; retrying."))
            {
                let line = lines.next_line().await.unwrap().expect("stderr open");
                seen.push_str(&line);
                seen.push('\n');
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{format}: expected {expect:?} on stderr, got:\n{seen}"));
        assert!(
            seen.contains(" WARN ") && seen.contains("what=\"postgres\""),
            "{seen}"
        );
        child.kill().await.unwrap();
    }
}

/// Receives journald's native protocol on a datagram socket and prints one JSON object per entry.
const JOURNAL_RECEIVER: &str = r#"
import json, os, socket, struct, sys
path, out = sys.argv[1], open(sys.argv[2], "w", buffering=1)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
open(path + ".ready", "w").close()
while True:
    data, i, entry = s.recv(65536), 0, {}
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k, (n,) = line, struct.unpack("<Q", data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        entry[k.decode()] = v.decode("utf-8", "replace")
    if entry:
        out.write(json.dumps(entry) + "\n")
"#;

#[tokio::test(flavor = "multi_thread")]
async fn journald_gets_native_entries_with_priority_and_fields() {
    if !std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success())
    {
        panic!("this test needs `unshare -m` (root or CAP_SYS_ADMIN)");
    }
    let dir = std::env::temp_dir().join(unique_name("journal"));
    std::fs::create_dir_all(&dir).unwrap();
    let receiver = dir.join("receiver.py");
    std::fs::write(&receiver, JOURNAL_RECEIVER).unwrap();
    let entries = dir.join("entries.jsonl");
    // In a private mount namespace, a tmpfs over /run/systemd holds our own journal socket; the
    // consumer (database unreachable, so it logs a warning) runs there for two seconds.
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run/systemd; mkdir -p /run/systemd/journal
         python3 {receiver} /run/systemd/journal/socket {entries} & r=$!
         while [ ! -e /run/systemd/journal/socket.ready ]; do sleep 0.05; done
         CONSUMER_LOG__FORMAT=journald CONSUMER_POSTGRES__URL=postgres://postgres@127.0.0.1:1/postgres \
           CONSUMER_METRICS__LISTEN=127.0.0.1:0 timeout -s TERM 2 {bin} || true
         timeout 10 sh -c 'until grep -q \"Shutting down\" {entries}; do sleep 0.05; done'; kill $r",
        receiver = receiver.display(),
        entries = entries.display(),
        bin = CONSUMER,
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env_remove("JOURNAL_STREAM")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&entries).unwrap();
    let entries: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let find = |msg: &str| {
        entries
            .iter()
            .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.starts_with(msg)))
            .unwrap_or_else(|| panic!("no {msg:?} in {text}"))
    };
    let start = find("Starting.");
    assert_eq!(start["SYSLOG_IDENTIFIER"], "consumer");
    assert_eq!(start["PRIORITY"], "5", "info is notice");
    let warn = find("Cannot reach a dependency; retrying.");
    assert_eq!(warn["PRIORITY"], "4", "warn is warning");
    assert_eq!(warn["WHAT"], "postgres", "structured field: {warn}");
    assert!(
        warn["ERROR"].as_str().unwrap().contains("connect"),
        "{warn}"
    );
    let stop = find("Shutting down.");
    assert_eq!(stop["SIGNAL"], "SIGTERM");
    eprintln!("journald entry: {warn}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_is_logged_and_ignored_sigterm_still_stops() {
    let names = Names::new("sighup");
    let mut child = Command::new(CONSUMER)
        .envs(names.consumer_env())
        .env(
            "CONSUMER_POSTGRES__URL",
            "postgres://postgres@127.0.0.1:1/postgres",
        )
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let mut read_until = async |needle: &str, seen: &mut String| {
        tokio::time::timeout(LIMIT, async {
            while !seen.contains(needle) {
                let line = lines.next_line().await.unwrap().expect("stderr open");
                seen.push_str(&line);
                seen.push('\n');
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {needle:?} on stderr, got:\n{seen}"));
    };
    read_until("Cannot reach a dependency", &mut seen).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    read_until("SIGHUP ignored", &mut seen).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not end the daemon"
    );
    sigterm(child.id());
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{seen}");
}
