//! The benchmark: each figure is a ratio to a ceiling measured in the same run, on the same
//! broker and database, because this machine is shared and noisy.
//!
//! `cargo bench --bench pipeline -- --n 100000 --reps 3 [--queue-type quorum] [--json PATH]`
//!
//! Per repetition:
//! 1. broker ceiling: a bare lapin consumer drains a prefilled durable queue of N persistent
//!    readings (same prefetch, acking every 500 with `multiple`), no database;
//! 2. our consumer (the release binary) drains the same N readings into PostgreSQL, until
//!    `messages_processed_total` = N (counted after commit and ack);
//! 3. database ceiling: the same N rows loaded with COPY into the same table definition;
//! 4. our producer (`producer --count N`) against a bare lapin publisher with the same confirm window;
//! 5. end-to-end latency (measured_at → row written) at fixed rates: p50, p99, max;
//! 6. peak resident memory (VmHWM, sampled from /proc while it runs) of each daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A benchmark run fails loudly.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio_postgres::NoTls;

const CONSUMER: &str = env!("CARGO_BIN_EXE_consumer");
const PRODUCER: &str = env!("CARGO_BIN_EXE_producer");

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Readings per measurement.
    #[arg(long, default_value_t = 100_000)]
    n: usize,
    /// Repetitions (min, median and max are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// `classic` or `quorum`.
    #[arg(long, default_value = "classic")]
    queue_type: String,
    /// Confirm window of both publishers.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Prefetch of both consumers.
    #[arg(long, default_value_t = 2000)]
    prefetch: u16,
    /// Rates (readings/s) for the latency runs.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    rates: Vec<u64>,
    /// Seconds per latency run.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench/pipeline.json")]
    json: String,
    #[arg(
        long,
        env = "TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp: String,
    #[arg(
        long,
        env = "TEST_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg: String,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Names {
    base: String,
}

impl Names {
    fn new(what: &str) -> Self {
        Self {
            base: format!("bench_{what}_{}", uuid::Uuid::now_v7().simple()).to_lowercase(),
        }
    }
    fn exchange(&self) -> String {
        format!("{}-x", self.base)
    }
    fn queue(&self) -> String {
        format!("{}-q", self.base)
    }
    fn key(&self) -> String {
        format!("{}-k", self.base)
    }
    fn schema(&self) -> &str {
        &self.base
    }
}

fn queue_args(queue_type: &str) -> FieldTable {
    let mut args = FieldTable::default();
    if queue_type == "quorum" {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

async fn declare(ch: &lapin::Channel, names: &Names, queue_type: &str) {
    ch.exchange_declare(
        names.exchange().into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        names.queue().into(),
        QueueDeclareOptions::durable(),
        queue_args(queue_type),
    )
    .await
    .unwrap();
    ch.queue_bind(
        names.queue().into(),
        names.exchange().into(),
        names.key().into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn cleanup(conn: &Connection, pg: &tokio_postgres::Client, names: &Names) {
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(names.queue().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(names.exchange().into(), Default::default())
        .await;
    let _ = pg
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", names.schema()))
        .await;
}

fn body(i: usize) -> Vec<u8> {
    format!(
        r#"{{"station_id":"STATION-{:03}","temperature":{:.2},"humidity":55.5,"pressure":1013.25,"message_id":"{}","measured_at":"{}"}}"#,
        i % 50 + 1,
        15.0 + (i % 100) as f64 / 10.0,
        uuid::Uuid::now_v7(),
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap()
    )
    .into_bytes()
}

/// The bare publisher: N persistent readings with at most `window` unconfirmed. Returns readings/s.
async fn bare_publish(conn: &Connection, names: &Names, n: usize, window: usize) -> f64 {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..n).map(body).collect();
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::<lapin::PublisherConfirm>::new();
    for b in &bodies {
        if pending.len() >= window {
            assert!(pending.next().await.unwrap().unwrap().is_ack());
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let confirm = ch
            .basic_publish(
                names.exchange().into(),
                names.key().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b,
                props,
            )
            .await
            .unwrap();
        pending.push(confirm);
    }
    while let Some(c) = pending.next().await {
        assert!(c.unwrap().is_ack());
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// The broker's ceiling: a bare consumer drains the queue, acking every 500. Returns readings/s.
async fn bare_drain(amqp: &str, names: &Names, n: usize, prefetch: u16) -> f64 {
    let started = Instant::now();
    let conn = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            names.queue().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = 0;
    while seen < n {
        let d = consumer.next().await.unwrap().unwrap();
        seen += 1;
        if seen % 500 == 0 || seen == n {
            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await
                .unwrap();
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    conn.close(200, "".into()).await.unwrap();
    rate
}

/// VmHWM (peak resident memory) of a running process, in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Waits for a child, sampling its VmHWM every 5 ms (wait4's ru_maxrss would also count the
/// benchmark's own pages the child had between fork and exec). Returns (exit code, peak RSS).
fn wait_peak(mut child: std::process::Child) -> (i32, u64) {
    let mut peak = 0;
    loop {
        if let Some(hwm) = vm_hwm(child.id()) {
            peak = peak.max(hwm);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), peak);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn daemon_env(args: &Args, names: &Names) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for p in ["CONSUMER", "PRODUCER"] {
        v.push((format!("{p}_AMQP__URL"), args.amqp.clone()));
        v.push((format!("{p}_AMQP__EXCHANGE"), names.exchange()));
        v.push((format!("{p}_AMQP__QUEUE"), names.queue()));
        v.push((format!("{p}_AMQP__ROUTING_KEY"), names.key()));
        v.push((
            format!("{p}_AMQP__DEAD_LETTER_EXCHANGE"),
            format!("{}-dlx", names.base),
        ));
        v.push((
            format!("{p}_AMQP__DEAD_LETTER_QUEUE"),
            format!("{}-dlq", names.base),
        ));
        v.push((format!("{p}_AMQP__QUEUE_TYPE"), args.queue_type.clone()));
        v.push((format!("{p}_AMQP__PREFETCH"), args.prefetch.to_string()));
        v.push((format!("{p}_LOG__LEVEL"), "warn".into()));
    }
    v.push(("CONSUMER_POSTGRES__URL".into(), args.pg.clone()));
    v.push((
        "CONSUMER_POSTGRES__SCHEMA".into(),
        names.schema().to_owned(),
    ));
    v.push((
        "PRODUCER_SIMULATION__CONFIRM_WINDOW".into(),
        args.window.to_string(),
    ));
    v
}

/// Our producer publishes N readings as fast as confirms allow. Returns (readings/s, peak RSS).
fn our_publish(args: &Args, names: &Names, n: usize, rate: Option<u64>) -> (f64, u64) {
    let started = Instant::now();
    let child = Command::new(PRODUCER)
        .args(["--count", &n.to_string()])
        .envs(daemon_env(args, names))
        .env("PRODUCER_SIMULATION__RATE", rate.unwrap_or(0).to_string())
        .env("PRODUCER_METRICS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (code, rss) = wait_peak(child);
    assert_eq!(code, 0, "producer failed");
    (n as f64 / started.elapsed().as_secs_f64(), rss)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn processed(port: u16) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("messages_processed_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Starts our consumer; returns the child and its metrics port once /metrics answers.
fn start_consumer(args: &Args, names: &Names) -> (std::process::Child, u16, Instant) {
    let port = free_port();
    let started = Instant::now();
    let child = Command::new(CONSUMER)
        .envs(daemon_env(args, names))
        .env("CONSUMER_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, port, started)
}

fn wait_processed(port: u16, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while processed(port) != Some(n) {
        assert!(
            Instant::now() < deadline,
            "consumer did not store {n} readings within {limit:?} (at {:?})",
            processed(port)
        );
        // Each scrape costs the consumer a little; 20 ms is under 1 % of a run at N=100,000.
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(child: std::process::Child) -> u64 {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let (code, rss) = wait_peak(child);
    assert_eq!(code, 0, "daemon exited {code}");
    rss
}

/// COPY of N rows into the same table definition. Returns rows/s.
async fn copy_ceiling(pg: &tokio_postgres::Client, names: &Names, n: usize) -> f64 {
    use futures_util::SinkExt;
    let migration = sistema_mensajes::db::MIGRATIONS[0].1;
    pg.batch_execute(&format!(
        "CREATE SCHEMA {s}; SET search_path = {s}; {migration} RESET search_path;",
        s = names.schema()
    ))
    .await
    .unwrap();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut csv = String::with_capacity(n * 90);
    for i in 0..n {
        csv.push_str(&format!(
            "{},STATION-{:03},{:.2},55.5,1013.25,{now}\n",
            uuid::Uuid::now_v7(),
            i % 50 + 1,
            15.0 + (i % 100) as f64 / 10.0
        ));
    }
    let started = Instant::now();
    let sink = pg
        .copy_in(&format!("COPY {}.weather_logs (message_id, station_id, temperature, humidity, pressure, measured_at) FROM STDIN (FORMAT csv)", names.schema()))
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(csv)).await.unwrap();
    sink.finish().await.unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

#[derive(Default)]
struct Series(BTreeMap<&'static str, Vec<f64>>);

impl Series {
    fn push(&mut self, k: &'static str, v: f64) {
        self.0.entry(k).or_default().push(v);
    }
    fn stats(&self, k: &str) -> (f64, f64, f64) {
        let mut v = self.0.get(k).cloned().unwrap_or_default();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if v.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        (v[0], v[v.len() / 2], v[v.len() - 1])
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let (pg, conn) = tokio_postgres::connect(&args.pg, NoTls).await.unwrap();
    tokio::spawn(conn);
    let amqp = Connection::connect(&args.amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let n = args.n;
    let mut s = Series::default();
    eprintln!(
        "benchmark: N={n}, {} repetitions, {} queues, window {}, prefetch {}",
        args.reps, args.queue_type, args.window, args.prefetch
    );
    for rep in 1..=args.reps {
        let names = Names::new("drain");
        let ch = amqp.create_channel().await.unwrap();
        declare(&ch, &names, &args.queue_type).await;
        let bare_pub = bare_publish(&amqp, &names, n, args.window).await;
        let broker = bare_drain(&args.amqp, &names, n, args.prefetch).await;
        let (our_pub, producer_rss) = our_publish(&args, &names, n, None);
        let (child, port, started) = start_consumer(&args, &names);
        wait_processed(port, n as u64, Duration::from_secs(600));
        let ours = n as f64 / started.elapsed().as_secs_f64();
        let consumer_rss = stop(child);
        cleanup(&amqp, &pg, &names).await;
        let names = Names::new("copy");
        let copy = copy_ceiling(&pg, &names, n).await;
        cleanup(&amqp, &pg, &names).await;
        for (k, v) in [
            ("broker_drain_per_s", broker),
            ("consumer_drain_per_s", ours),
            ("consumer_vs_broker", ours / broker),
            ("copy_per_s", copy),
            ("consumer_vs_copy", ours / copy),
            ("bare_publish_per_s", bare_pub),
            ("producer_publish_per_s", our_pub),
            ("producer_vs_bare", our_pub / bare_pub),
            ("consumer_peak_rss_mib", consumer_rss as f64 / 1048576.0),
            ("producer_peak_rss_mib", producer_rss as f64 / 1048576.0),
        ] {
            s.push(k, v);
        }
        eprintln!("rep {rep}: consumer {ours:.0}/s vs broker {broker:.0}/s ({:.2}); producer {our_pub:.0}/s vs bare {bare_pub:.0}/s ({:.2}); COPY {copy:.0}/s", ours / broker, our_pub / bare_pub);
    }
    let mut latency = Vec::new();
    for &rate in &args.rates {
        let names = Names::new("latency");
        let ch = amqp.create_channel().await.unwrap();
        declare(&ch, &names, &args.queue_type).await;
        let (child, port, _) = start_consumer(&args, &names);
        let count = (rate * args.latency_secs) as usize;
        let (achieved, _) = our_publish(&args, &names, count, Some(rate));
        wait_processed(port, count as u64, Duration::from_secs(120));
        stop(child);
        let row = pg
            .query_one(
                &format!(
                    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY l), percentile_cont(0.99) WITHIN GROUP (ORDER BY l), max(l)
                     FROM (SELECT extract(epoch FROM received_at - measured_at)::float8 * 1000 AS l FROM {}.weather_logs) x",
                    names.schema()
                ),
                &[],
            )
            .await
            .unwrap();
        let (p50, p99, max): (f64, f64, f64) = (row.get(0), row.get(1), row.get(2));
        latency.push(json!({"rate_per_s": rate, "achieved_per_s": achieved, "readings": count, "p50_ms": p50, "p99_ms": p99, "max_ms": max}));
        eprintln!("latency at {rate}/s: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms");
        cleanup(&amqp, &pg, &names).await;
    }

    let keys = [
        (
            "consumer_vs_broker",
            "consumer drain / broker drain ceiling",
            "≥ 0.90",
        ),
        (
            "producer_vs_bare",
            "producer / bare lapin publisher",
            "≥ 0.90",
        ),
        ("consumer_vs_copy", "consumer drain / COPY", ""),
        (
            "broker_drain_per_s",
            "broker drain ceiling (readings/s)",
            "",
        ),
        ("consumer_drain_per_s", "consumer drain (readings/s)", ""),
        ("copy_per_s", "COPY ceiling (rows/s)", ""),
        ("bare_publish_per_s", "bare publisher (readings/s)", ""),
        ("producer_publish_per_s", "producer (readings/s)", ""),
        ("consumer_peak_rss_mib", "consumer peak RSS (MiB)", "≤ 20"),
        ("producer_peak_rss_mib", "producer peak RSS (MiB)", "≤ 12"),
    ];
    println!(
        "\n| figure ({} queue, N={n}, {} reps) | min | median | max | target |",
        args.queue_type, args.reps
    );
    println!("|---|---|---|---|---|");
    let mut figures = serde_json::Map::new();
    for (k, label, target) in keys {
        let (min, med, max) = s.stats(k);
        let fmt = |v: f64| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        println!(
            "| {label} | {} | {} | {} | {target} |",
            fmt(min),
            fmt(med),
            fmt(max)
        );
        figures.insert(
            k.to_owned(),
            json!({"min": min, "median": med, "max": max, "values": s.0.get(k)}),
        );
    }
    println!(
        "\n| end-to-end latency (measured_at → row written) | p50 ms | p99 ms | max ms | target |"
    );
    println!("|---|---|---|---|---|");
    for l in &latency {
        let target = if l["rate_per_s"] == 1000 {
            "p99 ≤ 25"
        } else {
            ""
        };
        println!(
            "| {} readings/s | {:.1} | {:.1} | {:.1} | {target} |",
            l["rate_per_s"],
            l["p50_ms"].as_f64().unwrap(),
            l["p99_ms"].as_f64().unwrap(),
            l["max_ms"].as_f64().unwrap()
        );
    }
    let machine = format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_owned())
            )
            .unwrap_or_default()
    );
    let out = json!({"n": n, "reps": args.reps, "queue_type": args.queue_type, "window": args.window, "prefetch": args.prefetch, "machine": machine, "figures": figures, "latency": latency});
    if let Some(dir) = std::path::Path::new(&args.json).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nmachine: {machine}\nfigures written to {}", args.json);
}
