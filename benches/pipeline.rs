//! The benchmark: each figure is a ratio to a ceiling measured in the same run, on the same
//! broker and database, because this machine is shared and noisy.
//!
//! `cargo bench --bench pipeline -- --n 100000 --reps 3 [--queue-type quorum] [--json PATH]`
//! `cargo bench --bench pipeline -- --n 1000000 --reps 5 --drain-only --skip-bare` (a large backlog)
//!
//! Every message is a reading exactly as our producer makes it (same generator, same body, same
//! AMQP properties), so ceilings and daemons move the same bytes. Per repetition, each ceiling is
//! measured just before and just after our daemon, and the daemon is compared with their mean.
//! Ceilings run on a thread of their own with a single-threaded tokio runtime, like the daemons.
//! 1. publishing: a bare lapin publisher (bodies built before its clock starts) and our producer
//!    (`producer --count N`, the release binary) each publish N readings to a fresh queue, with
//!    the same confirm window;
//! 2. draining: a fresh queue is filled with the same N readings (untimed) before each drain.
//!    Two ceilings run just before and just after our consumer (bare, minimal, ours, minimal,
//!    bare): a bare lapin consumer (same prefetch, acking every 500 with `multiple`, no database)
//!    is the broker's ceiling, and a minimal RabbitMQ → PostgreSQL pipeline (typed decode, no
//!    validation, one plain `INSERT … UNNEST` per 500 rows, then `ack(multiple)`) is the
//!    pipeline's, and the headline. Our consumer and the minimal pipeline are timed from their
//!    start until the last row is written (`max(received_at)`), into a schema migrated
//!    beforehand, as on every start but the first;
//! 3. database ceiling: the same N rows loaded with COPY into the same table definition;
//!
//! Before each timed phase the harness waits for the machine to go idle (the broker keeps writing
//! a queue to disk after the last confirm). Then end-to-end latency (measured_at → row written) at fixed rates: p50, p99, max. Peak resident
//! memory (VmHWM, sampled from /proc) of each daemon, and CPU time of the broker, PostgreSQL, the
//! daemons and the harness in each phase, come with the figures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // A benchmark run fails loudly.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
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
    /// Only the drains (ceilings and our consumer): no publishing, COPY or latency runs. For
    /// large backlogs (`--n 1000000`), where each publishing phase takes minutes.
    #[arg(long)]
    drain_only: bool,
    /// Without the broker ceiling (the bare drain, context only): each repetition drains
    /// minimal, ours, minimal. Saves two of five fills, for large backlogs.
    #[arg(long)]
    skip_bare: bool,
    /// Connections that scrape our consumer's `/metrics` back to back, keep-alive, during its
    /// drain: what a scrape flood costs the pipeline (compare its ratio with a run without).
    #[arg(long, default_value_t = 0)]
    metrics_flood: usize,
    /// Consumers that drain the queue together (competing consumers, issue 22): the rate is
    /// theirs together, their CPU summed, the RSS the largest. Compare the ratio to the minimal
    /// pipeline (one connection, as always) across runs with 1, 2 and 3.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Each repetition also drains into an unpartitioned `weather_logs` (as before issue 23:
    /// the schema of migrations 0001 to 0004 without the conversion, the consumer with
    /// `postgres.migrate = false`): minimal, ours, minimal again. Reports both ratios and
    /// partitioned / unpartitioned for each pipeline.
    #[arg(long)]
    unpartitioned: bool,
    /// `random`: every reading gets an id derived from its body (v5, in no order) instead of our
    /// producer's time-ordered UUIDv7, as older clients' content-derived ids are.
    #[arg(long, default_value = "v7", value_parser = ["v7", "random"])]
    ids: String,
    /// Our daemons over TLS (`.ci/tls-bench` passes both): each repetition then drains with our
    /// consumer and publishes with our producer over plain text, over TLS, and over plain text
    /// again, on the same servers, and reports TLS against the mean of the two plain runs. No
    /// ceilings, COPY or latency runs.
    #[arg(long, requires = "tls_pg")]
    tls_amqp: Option<String>,
    #[arg(long, requires = "tls_amqp")]
    tls_pg: Option<String>,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone)]
struct Names {
    base: String,
    /// The consumer's table is partitioned (the default), or as before (`--unpartitioned`).
    partitioned: bool,
}

impl Names {
    fn new(what: &str) -> Self {
        Self {
            base: format!("bench_{what}_{}", uuid::Uuid::now_v7().simple()).to_lowercase(),
            partitioned: true,
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
    fn dead_letter_exchange(&self) -> String {
        format!("{}-dlx", self.base)
    }
    fn dead_letter_queue(&self) -> String {
        format!("{}-dlq", self.base)
    }
    fn schema(&self) -> &str {
        &self.base
    }
}

/// The exchange, the queue and its binding, declared exactly as our daemons declare them.
async fn declare(ch: &lapin::Channel, names: &Names, queue_type: &str) {
    let cfg = sistema_mensajes::config::AmqpConfig {
        exchange: names.exchange().try_into().unwrap(),
        queue: names.queue().try_into().unwrap(),
        routing_key: names.key().try_into().unwrap(),
        queue_type: serde_json::from_value(json!(queue_type)).unwrap(),
        ..Default::default()
    };
    sistema_mensajes::amqp::declare_topology(ch, &cfg, false)
        .await
        .unwrap();
}

async fn cleanup(conn: &Connection, pg: &tokio_postgres::Client, names: &Names) {
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(names.queue().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(
            names.dead_letter_queue().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    for exchange in [names.exchange(), names.dead_letter_exchange()] {
        let _ = ch
            .exchange_delete(exchange.into(), Default::default())
            .await;
    }
    let _ = pg
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", names.schema()))
        .await;
}

/// N readings exactly as our producer makes them: (message id, body); with `random`, each id
/// replaced by one derived from the body.
fn readings(n: usize, random: bool) -> Vec<(String, Vec<u8>)> {
    let stations = sistema_mensajes::config::ProducerConfig::default()
        .simulation
        .stations;
    let mut stations = sistema_mensajes::station::Stations::new(stations);
    (0..n)
        .map(|_| {
            let (id, body) = stations.sample();
            if !random {
                return (id.to_string(), body);
            }
            // Derived from the body (v5), as the consumer derives older clients' ids: not ordered.
            let other = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &body).to_string();
            let body = String::from_utf8(body)
                .unwrap()
                .replace(&id.to_string(), &other);
            (other, body.into_bytes())
        })
        .collect()
}

/// The bare publisher: the readings, persistent, with our producer's properties and at most
/// `window` unconfirmed. Returns readings/s.
async fn bare_publish(
    amqp: String,
    names: Names,
    readings: Arc<Vec<(String, Vec<u8>)>>,
    window: usize,
) -> f64 {
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::<lapin::PublisherConfirm>::new();
    for (id, body) in readings.iter() {
        if pending.len() >= window {
            assert!(pending.next().await.unwrap().unwrap().is_ack());
        }
        let confirm = ch
            .basic_publish(
                names.exchange().into(),
                names.key().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                sistema_mensajes::amqp::reading_properties(id),
            )
            .await
            .unwrap();
        pending.push(confirm);
    }
    while let Some(c) = pending.next().await {
        assert!(c.unwrap().is_ack());
    }
    let rate = readings.len() as f64 / started.elapsed().as_secs_f64();
    conn.close(200, "".into()).await.unwrap();
    rate
}

/// Runs a ceiling on a thread of its own with a single-threaded runtime, as our daemons run, so
/// that the ceilings do not pay for the harness's multi-threaded runtime.
fn alone<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

/// A ceiling's consumer: connected, with the prefetch set, consuming the queue.
async fn consume(
    amqp: &str,
    names: &Names,
    prefetch: u16,
) -> (Connection, lapin::Channel, lapin::Consumer) {
    let conn = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let consumer = ch
        .basic_consume(
            names.queue().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, ch, consumer)
}

/// The broker's ceiling: a bare consumer drains the queue, acking every 500. Returns readings/s.
async fn bare_drain(amqp: String, names: Names, n: usize, prefetch: u16) -> f64 {
    let started = Instant::now();
    let (conn, ch, mut consumer) = consume(&amqp, &names, prefetch).await;
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

/// Rows per insert and acknowledgement in the minimal pipeline, as in our consumer's default.
const MINIMAL_BATCH: usize = 500;

/// A reading as the minimal pipeline reads it: typed, no validation.
#[derive(serde::Deserialize)]
struct MinimalReading {
    station_id: String,
    temperature: f64,
    humidity: f64,
    pressure: f64,
    message_id: uuid::Uuid,
    #[serde(with = "time::serde::rfc3339")]
    measured_at: time::OffsetDateTime,
}

/// One insert's rows, column by column, and the delivery tag that acknowledges them all.
#[derive(Default)]
struct MinimalBatch {
    ids: Vec<uuid::Uuid>,
    stations: Vec<String>,
    temperatures: Vec<f64>,
    humidities: Vec<f64>,
    pressures: Vec<f64>,
    measured: Vec<time::OffsetDateTime>,
    last_tag: u64,
}

impl MinimalBatch {
    fn push(&mut self, r: MinimalReading, tag: u64) {
        self.ids.push(r.message_id);
        self.stations.push(r.station_id);
        self.temperatures.push(r.temperature);
        self.humidities.push(r.humidity);
        self.pressures.push(r.pressure);
        self.measured.push(r.measured_at);
        self.last_tag = tag;
    }
}

/// The pipeline's ceiling: the least a RabbitMQ → PostgreSQL consumer built from the same crates
/// does. Same prefetch; each body deserialized into a typed struct (no validation); one plain
/// `INSERT … SELECT FROM UNNEST` per 500 rows, each its own transaction, then `ack(multiple)`;
/// a writer task overlapping with reading; no dead-lettering, no idempotency fallback. Returns
/// when the last batch is acknowledged; it is timed like our consumer, by the rows' `received_at`.
async fn minimal_drain(amqp: String, pg: String, names: Names, n: usize, prefetch: u16) {
    let (client, pg_conn) = tokio_postgres::connect(&pg, NoTls).await.unwrap();
    tokio::spawn(pg_conn);
    let insert = client
        .prepare(&format!(
            "INSERT INTO {}.weather_logs (message_id, station_id, temperature, humidity, pressure, measured_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::float8[], $4::float8[], $5::float8[], $6::timestamptz[])",
            names.schema()
        ))
        .await
        .unwrap();
    let (conn, ch, mut consumer) = consume(&amqp, &names, prefetch).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<MinimalBatch>(1);
    let writer = tokio::spawn({
        let ch = ch.clone();
        async move {
            while let Some(b) = rx.recv().await {
                client
                    .execute(
                        &insert,
                        &[
                            &b.ids,
                            &b.stations,
                            &b.temperatures,
                            &b.humidities,
                            &b.pressures,
                            &b.measured,
                        ],
                    )
                    .await
                    .unwrap();
                ch.basic_ack(b.last_tag, BasicAckOptions { multiple: true })
                    .await
                    .unwrap();
            }
        }
    });
    let mut batch = MinimalBatch::default();
    for seen in 1..=n {
        let d = consumer.next().await.unwrap().unwrap();
        let reading: MinimalReading = serde_json::from_slice(&d.data).unwrap();
        batch.push(reading, d.delivery_tag);
        if batch.ids.len() == MINIMAL_BATCH || seen == n {
            tx.send(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    drop(tx);
    writer.await.unwrap();
    conn.close(200, "".into()).await.unwrap();
}

/// The ways a queue is drained.
#[derive(Clone, Copy, PartialEq)]
enum Drain {
    /// The broker's ceiling: [`bare_drain`].
    Bare,
    /// The pipeline's ceiling: [`minimal_drain`].
    Minimal,
    /// Our consumer.
    Ours,
    /// Our consumer over TLS (`--tls-amqp`, `--tls-pg`).
    OursTls,
}

/// How long our consumer may take to store `n` readings before the run fails: 10 minutes, or
/// 1,000 readings/s if that is longer.
fn drain_limit(n: usize) -> Duration {
    Duration::from_secs(600.max(n as u64 / 1000))
}

/// CPU seconds used so far by each process of interest, and by the whole machine.
///
/// PostgreSQL counts all its processes, and through the postmaster's `cutime` also backends that
/// have exited; the broker is `beam.smp`; the daemons are the harness's own children.
const PROCESSES: [&str; 5] = ["broker", "postgres", "consumer", "producer", "bench"];
const PHASES: [(&str, &str); 7] = [
    ("bare_drain", "broker ceiling: bare drain"),
    ("minimal_drain", "pipeline ceiling: minimal pipeline"),
    ("consumer_drain", "our consumer drain"),
    ("bare_publish", "bare publisher"),
    ("producer", "our producer"),
    ("consumer_tls_drain", "our consumer drain over TLS"),
    ("producer_tls", "our producer over TLS"),
];

#[derive(Clone, Default)]
struct Cpu {
    by_process: BTreeMap<&'static str, f64>,
    machine_busy: f64,
    machine_total: f64,
}

impl Cpu {
    fn now() -> Self {
        use procfs::CurrentSI;
        let tps = procfs::ticks_per_second() as f64;
        let me = std::process::id() as i32;
        let mut by_process = BTreeMap::new();
        for p in procfs::process::all_processes().unwrap().flatten() {
            let Ok(st) = p.stat() else { continue };
            let name = match st.comm.as_str() {
                "beam.smp" => "broker",
                "postgres" => "postgres",
                // Ours only, the harness's children: others may run these binaries meanwhile.
                "consumer" if st.ppid == me => "consumer",
                "producer" if st.ppid == me => "producer",
                // Its reaped children: only the producer exits inside a measured phase.
                _ if st.pid == me => {
                    let children = (st.cutime + st.cstime).max(0) as f64 / tps;
                    *by_process.entry("producer").or_default() += children;
                    *by_process.entry("bench").or_default() += (st.utime + st.stime) as f64 / tps;
                    continue;
                }
                _ => continue,
            };
            let ticks = st.utime + st.stime + (st.cutime + st.cstime).max(0) as u64;
            *by_process.entry(name).or_default() += ticks as f64 / tps;
        }
        let total = procfs::KernelStats::current().unwrap().total;
        let idle = total.idle + total.iowait.unwrap_or(0);
        let all = total.user
            + total.nice
            + total.system
            + idle
            + total.irq.unwrap_or(0)
            + total.softirq.unwrap_or(0)
            + total.steal.unwrap_or(0);
        Self {
            by_process,
            machine_busy: (all - idle) as f64 / tps,
            machine_total: all as f64 / tps,
        }
    }

    /// CPU seconds since `earlier`; `machine_busy` as a fraction of the machine's capacity.
    fn since(&self, earlier: &Cpu) -> Cpu {
        let mut by_process = self.by_process.clone();
        for (k, v) in by_process.iter_mut() {
            *v -= earlier.by_process.get(k).copied().unwrap_or(0.0);
        }
        Cpu {
            by_process,
            machine_busy: self.machine_busy - earlier.machine_busy,
            machine_total: self.machine_total - earlier.machine_total,
        }
    }

    fn get(&self, k: &str) -> f64 {
        self.by_process.get(k).copied().unwrap_or(0.0)
    }

    fn busy_fraction(&self) -> f64 {
        self.machine_busy / self.machine_total
    }
}

/// Waits (up to 10 s) until the broker and PostgreSQL have been mostly idle for 250 ms, so that a
/// phase does not pay for their background work left over from the one before (a fresh queue is
/// still being written to disk after its last confirm). Only those two: on a machine shared with
/// other work, the whole machine may never go idle.
fn quiesce() {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = Cpu::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        let now = Cpu::now();
        let d = now.since(&before);
        if (d.get("broker") + d.get("postgres")) / d.machine_total < 0.15 {
            return;
        }
        before = now;
    }
    eprintln!("the broker and PostgreSQL did not become idle within 10 s; measuring anyway");
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

/// The daemons' environment; `tls`: with the `--tls-*` URLs.
fn daemon_env(args: &Args, names: &Names, tls: bool) -> Vec<(String, String)> {
    let (amqp, pg) = match (tls, &args.tls_amqp, &args.tls_pg) {
        (true, Some(amqp), Some(pg)) => (amqp.clone(), pg.clone()),
        _ => (args.amqp.clone(), args.pg.clone()),
    };
    let mut v = Vec::new();
    for p in ["CONSUMER", "PRODUCER"] {
        v.push((format!("{p}_AMQP__URL"), amqp.clone()));
        v.push((format!("{p}_AMQP__EXCHANGE"), names.exchange()));
        v.push((format!("{p}_AMQP__QUEUE"), names.queue()));
        v.push((format!("{p}_AMQP__ROUTING_KEY"), names.key()));
        v.push((
            format!("{p}_AMQP__DEAD_LETTER_EXCHANGE"),
            names.dead_letter_exchange(),
        ));
        v.push((
            format!("{p}_AMQP__DEAD_LETTER_QUEUE"),
            names.dead_letter_queue(),
        ));
        v.push((format!("{p}_AMQP__QUEUE_TYPE"), args.queue_type.clone()));
        v.push((format!("{p}_AMQP__PREFETCH"), args.prefetch.to_string()));
        v.push((format!("{p}_LOG__LEVEL"), "warn,lapin::channels=off".into()));
    }
    v.push(("CONSUMER_POSTGRES__URL".into(), pg));
    v.push((
        "CONSUMER_POSTGRES__SCHEMA".into(),
        names.schema().to_owned(),
    ));
    if !names.partitioned {
        // The bench applied the migrations and left the table as it was; the consumer only checks.
        v.push(("CONSUMER_POSTGRES__MIGRATE".into(), "false".into()));
    }
    v.push((
        "PRODUCER_SIMULATION__CONFIRM_WINDOW".into(),
        args.window.to_string(),
    ));
    v
}

/// Our producer publishes N readings as fast as confirms allow. Returns (readings/s, peak RSS).
fn our_publish(args: &Args, names: &Names, n: usize, rate: Option<u64>, tls: bool) -> (f64, u64) {
    let started = Instant::now();
    let child = Command::new(PRODUCER)
        .args(["--count", &n.to_string()])
        .envs(daemon_env(args, names, tls))
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
fn start_consumer(args: &Args, names: &Names, tls: bool) -> (std::process::Child, u16, SystemTime) {
    let port = free_port();
    let started = SystemTime::now();
    let child = Command::new(CONSUMER)
        .envs(daemon_env(args, names, tls))
        .env("CONSUMER_METRICS__LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, port, started)
}

/// `--metrics-flood`: threads scraping `/metrics` back to back until dropped.
struct Flood {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Flood {
    fn start(port: u16, connections: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..connections)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    use std::io::{BufRead, Read, Write};
                    let mut scrapes = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        };
                        let mut w = s.try_clone().unwrap();
                        let mut r = std::io::BufReader::new(s);
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let sent = w.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n");
                            let (mut line, mut length) = (String::new(), 0usize);
                            let mut ok = sent.is_ok();
                            while ok {
                                line.clear();
                                ok = r.read_line(&mut line).is_ok_and(|n| n > 0);
                                if line == "\r\n" {
                                    break;
                                }
                                if let Some(v) =
                                    line.to_ascii_lowercase().strip_prefix("content-length:")
                                {
                                    length = v.trim().parse().unwrap_or(0);
                                }
                            }
                            let mut body = vec![0; length];
                            if !ok || r.read_exact(&mut body).is_err() {
                                break;
                            }
                            scrapes += 1;
                        }
                    }
                    scrapes
                })
            })
            .collect();
        Self { stop, threads }
    }

    /// Stops the threads; how many scrapes they made.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.into_iter().map(|t| t.join().unwrap()).sum()
    }
}

/// Until the consumers on `ports` have stored `n` readings together.
fn wait_processed_by(ports: &[u16], n: u64, limit: Duration) {
    if let [port] = ports {
        return wait_processed(*port, n, limit);
    }
    let deadline = Instant::now() + limit;
    let total = || {
        ports
            .iter()
            .map(|p| processed(*p).unwrap_or(0))
            .sum::<u64>()
    };
    while total() < n {
        assert!(
            Instant::now() < deadline,
            "the consumers did not store {n} readings within {limit:?} (at {})",
            total()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_processed(port: u16, n: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while processed(port) != Some(n) {
        assert!(
            Instant::now() < deadline,
            "consumer did not store {n} readings within {limit:?} (at {:?})",
            processed(port)
        );
        // Each scrape costs the consumer's one thread a render of every metric, which the
        // minimal pipeline does not pay; the rate is timed by the rows' `received_at`, so a
        // coarser poll only delays the end of the phase, not the figure.
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop(child: std::process::Child) -> u64 {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let (code, rss) = wait_peak(child);
    assert_eq!(code, 0, "daemon exited {code}");
    rss
}

/// Applies our migrations to the consumer's schema, as its first start would; unpartitioned, the
/// files of `sql/` only, recorded, so that the table stays as it was before the conversion.
async fn migrate(args: &Args, names: &Names) {
    if !names.partitioned {
        let (pg, conn) = tokio_postgres::connect(&args.pg, NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut sql = format!(
            "CREATE SCHEMA {s}; SET search_path = {s}; CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());",
            s = names.schema()
        );
        for (version, migration) in sistema_mensajes::db::MIGRATIONS {
            sql += &format!(
                "{migration}; INSERT INTO schema_migrations (version) VALUES ('{version}');"
            );
        }
        pg.batch_execute(&sql).await.unwrap();
        return;
    }
    let cfg = sistema_mensajes::config::PostgresConfig {
        url: args.pg.parse().unwrap(),
        schema: names.schema().to_owned().try_into().unwrap(),
        ..Default::default()
    };
    sistema_mensajes::db::Db::connect(&cfg, None).await.unwrap();
}

/// When the first and the last row were written (their `received_at`).
async fn commits(pg: &tokio_postgres::Client, names: &Names) -> (SystemTime, SystemTime) {
    let row = pg
        .query_one(
            &format!(
                "SELECT extract(epoch FROM min(received_at))::float8, extract(epoch FROM max(received_at))::float8 FROM {}.weather_logs",
                names.schema()
            ),
            &[],
        )
        .await
        .unwrap();
    let at = |i: usize| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(row.get(i));
    (at(0), at(1))
}

/// Rows per second from the first commit to the last: the drain rate without the start-up (process,
/// connections, topology, the first batch), as context for the headline, which includes it.
fn steady_rate(n: usize, first: SystemTime, last: SystemTime) -> f64 {
    (n - 1) as f64 / last.duration_since(first).unwrap().as_secs_f64()
}

/// COPY of N rows into the same table definition. Returns rows/s.
async fn copy_ceiling(
    pg: &tokio_postgres::Client,
    names: &Names,
    readings: &[(String, Vec<u8>)],
) -> f64 {
    use futures_util::SinkExt;
    // Every migration, so the COPY table has the same indexes as the consumer's.
    let migration: String = sistema_mensajes::db::MIGRATIONS
        .iter()
        .map(|(_, sql)| *sql)
        .collect();
    pg.batch_execute(&format!(
        "CREATE SCHEMA {s}; SET search_path = {s}; {migration} RESET search_path;",
        s = names.schema()
    ))
    .await
    .unwrap();
    let mut csv = String::with_capacity(readings.len() * 120);
    for (_, body) in readings {
        let r = sistema_mensajes::reading::decode(body, None, usize::MAX).unwrap();
        let measured = r
            .measured_at
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        csv.push_str(&format!(
            "{},{},{},{},{},{measured}\n",
            r.message_id, r.station_id, r.temperature, r.humidity, r.pressure
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
    readings.len() as f64 / started.elapsed().as_secs_f64()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[derive(Default)]
struct Series(BTreeMap<String, Vec<f64>>);

impl Series {
    /// Adds a figure; one that was not measured (NaN: the mean of no runs) is left out.
    fn push(&mut self, k: impl Into<String>, v: f64) {
        if v.is_nan() {
            return;
        }
        self.0.entry(k.into()).or_default().push(v);
    }

    /// CPU of one phase: milliseconds per 1,000 readings for each process, and how busy the
    /// machine was (a fraction of all its cores).
    /// Returns the CPU milliseconds per 1,000 readings of all the processes together.
    fn phase_cpu(&mut self, phase: &str, before: Cpu, n: usize) -> f64 {
        let cpu = Cpu::now().since(&before);
        let per_1000 = |seconds: f64| seconds * 1e6 / n as f64;
        for k in PROCESSES {
            self.push(format!("cpu_{phase}_{k}"), per_1000(cpu.get(k)));
        }
        self.push(format!("cpu_{phase}_machine_busy"), cpu.busy_fraction());
        per_1000(cpu.by_process.values().sum())
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
        let readings = Arc::new(readings(n, args.ids == "random"));
        let ch = amqp.create_channel().await.unwrap();
        // Draining: each ceiling just before and just after our consumer (bare, minimal, ours,
        // minimal, bare), each from a queue just filled with the same readings.
        let mut bare = Vec::new();
        let (mut minimal, mut minimal_steady) = (Vec::new(), Vec::new());
        let (mut ours_rate, mut ours_steady, mut consumer_rss) = (0.0, 0.0, 0);
        let (mut bare_cpu, mut minimal_cpu, mut our_cpu) = (Vec::new(), Vec::new(), 0.0);
        let (mut plain_rates, mut tls_rate) = (Vec::new(), 0.0);
        let tls = args.tls_amqp.is_some();
        let drains: &[Drain] = if tls {
            &[Drain::Ours, Drain::OursTls, Drain::Ours]
        } else if args.skip_bare {
            &[Drain::Minimal, Drain::Ours, Drain::Minimal]
        } else {
            &[
                Drain::Bare,
                Drain::Minimal,
                Drain::Ours,
                Drain::Minimal,
                Drain::Bare,
            ]
        };
        // With --unpartitioned, minimal, ours and minimal again into a table as before.
        let unpartitioned: &[Drain] = if args.unpartitioned && !tls {
            &[Drain::Minimal, Drain::Ours, Drain::Minimal]
        } else {
            &[]
        };
        let (mut minimal_u, mut ours_u) = (Vec::new(), 0.0);
        let runs = drains
            .iter()
            .map(|&d| (d, true))
            .chain(unpartitioned.iter().map(|&d| (d, false)));
        for (drain, partitioned) in runs {
            let mut names = Names::new("drain");
            names.partitioned = partitioned;
            declare(&ch, &names, &args.queue_type).await;
            alone(bare_publish(
                args.amqp.clone(),
                names.clone(),
                readings.clone(),
                args.window,
            ));
            migrate(&args, &names).await;
            quiesce();
            let cpu = Cpu::now();
            match drain {
                Drain::Bare => {
                    bare.push(alone(bare_drain(
                        args.amqp.clone(),
                        names.clone(),
                        n,
                        args.prefetch,
                    )));
                    bare_cpu.push(s.phase_cpu("bare_drain", cpu, n));
                }
                Drain::Minimal => {
                    let started = SystemTime::now();
                    alone(minimal_drain(
                        args.amqp.clone(),
                        args.pg.clone(),
                        names.clone(),
                        n,
                        args.prefetch,
                    ));
                    minimal_cpu.push(s.phase_cpu("minimal_drain", cpu, n));
                    let (first_commit, last_commit) = commits(&pg, &names).await;
                    let elapsed = last_commit.duration_since(started).unwrap();
                    if !partitioned {
                        minimal_u.push(n as f64 / elapsed.as_secs_f64());
                        cleanup(&amqp, &pg, &names).await;
                        continue;
                    }
                    minimal.push(n as f64 / elapsed.as_secs_f64());
                    minimal_steady.push(steady_rate(n, first_commit, last_commit));
                }
                Drain::Ours | Drain::OursTls => {
                    let over_tls = drain == Drain::OursTls;
                    let (child, port, started) = start_consumer(&args, &names, over_tls);
                    // With --consumers K, K - 1 more, started at once.
                    let others: Vec<_> = (1..args.consumers.max(1))
                        .map(|_| start_consumer(&args, &names, over_tls))
                        .collect();
                    let flood = Flood::start(port, args.metrics_flood);
                    let ports: Vec<u16> = std::iter::once(port)
                        .chain(others.iter().map(|o| o.1))
                        .collect();
                    wait_processed_by(&ports, n as u64, drain_limit(n));
                    let scrapes = flood.stop();
                    if args.metrics_flood > 0 {
                        s.push("metrics_flood_scrapes", scrapes as f64);
                    }
                    let phase = if over_tls {
                        "consumer_tls_drain"
                    } else {
                        "consumer_drain"
                    };
                    let cpu = s.phase_cpu(phase, cpu, n);
                    let (first_commit, last_commit) = commits(&pg, &names).await;
                    let elapsed = last_commit.duration_since(started).unwrap();
                    s.push(
                        "consumer_first_commit_ms",
                        first_commit.duration_since(started).unwrap().as_secs_f64() * 1e3,
                    );
                    let rate = n as f64 / elapsed.as_secs_f64();
                    let rss = others
                        .into_iter()
                        .map(|o| stop(o.0))
                        .fold(stop(child), u64::max);
                    if !partitioned {
                        ours_u = rate;
                    } else if over_tls {
                        tls_rate = rate;
                        s.push("consumer_tls_drain_per_s", rate);
                        s.push("consumer_tls_peak_rss_mib", rss as f64 / 1048576.0);
                    } else {
                        plain_rates.push(rate);
                        (our_cpu, ours_rate, consumer_rss) = (cpu, rate, rss);
                        ours_steady = steady_rate(n, first_commit, last_commit);
                    }
                }
            }
            cleanup(&amqp, &pg, &names).await;
        }
        if tls {
            s.push("consumer_tls_vs_plain", tls_rate / mean(&plain_rates));
            s.push("consumer_drain_per_s", mean(&plain_rates));
            s.push("consumer_peak_rss_mib", consumer_rss as f64 / 1048576.0);
            eprintln!(
                "rep {rep}: consumer over TLS {tls_rate:.0}/s vs plain {:.0}/s ({:.2})",
                mean(&plain_rates),
                tls_rate / mean(&plain_rates)
            );
            let (mut plain, mut over_tls) = (Vec::new(), 0.0);
            for tls in [false, true, false] {
                let names = Names::new("publish");
                declare(&ch, &names, &args.queue_type).await;
                quiesce();
                let cpu = Cpu::now();
                let (rate, rss) = our_publish(&args, &names, n, None, tls);
                s.phase_cpu(if tls { "producer_tls" } else { "producer" }, cpu, n);
                match tls {
                    true => {
                        over_tls = rate;
                        s.push("producer_tls_peak_rss_mib", rss as f64 / 1048576.0);
                    }
                    false => {
                        plain.push(rate);
                        s.push("producer_peak_rss_mib", rss as f64 / 1048576.0);
                    }
                }
                cleanup(&amqp, &pg, &names).await;
            }
            s.push("producer_tls_vs_plain", over_tls / mean(&plain));
            s.push("producer_publish_per_s", mean(&plain));
            eprintln!(
                "rep {rep}: producer over TLS {over_tls:.0}/s vs plain {:.0}/s ({:.2})",
                mean(&plain),
                over_tls / mean(&plain)
            );
            continue;
        }
        let (bare, minimal, ours) = (mean(&bare), mean(&minimal), ours_rate);
        s.push("consumer_cpu_ratio", mean(&bare_cpu) / our_cpu);
        s.push("consumer_minimal_cpu_ratio", mean(&minimal_cpu) / our_cpu);
        for (k, v) in [
            ("broker_drain_per_s", bare),
            ("minimal_drain_per_s", minimal),
            ("consumer_drain_per_s", ours),
            ("consumer_vs_minimal", ours / minimal),
            ("consumer_vs_broker", ours / bare),
            ("minimal_vs_broker", minimal / bare),
            (
                "consumer_vs_minimal_steady",
                ours_steady / mean(&minimal_steady),
            ),
            ("consumer_peak_rss_mib", consumer_rss as f64 / 1048576.0),
        ] {
            s.push(k, v);
        }
        eprintln!(
            "rep {rep}: consumer {ours:.0}/s vs minimal pipeline {minimal:.0}/s ({:.2}) vs bare drain {bare:.0}/s ({:.2})",
            ours / minimal,
            ours / bare
        );
        if !minimal_u.is_empty() {
            let minimal_u = mean(&minimal_u);
            for (k, v) in [
                ("unpartitioned_minimal_drain_per_s", minimal_u),
                ("unpartitioned_consumer_drain_per_s", ours_u),
                ("unpartitioned_consumer_vs_minimal", ours_u / minimal_u),
                ("consumer_partitioned_vs_unpartitioned", ours / ours_u),
                ("minimal_partitioned_vs_unpartitioned", minimal / minimal_u),
            ] {
                s.push(k, v);
            }
            eprintln!(
                "rep {rep}: unpartitioned: consumer {ours_u:.0}/s vs minimal {minimal_u:.0}/s ({:.2}); partitioned / unpartitioned: consumer {:.2}, minimal {:.2}",
                ours_u / minimal_u,
                ours / ours_u,
                minimal / minimal_u
            );
        }
        if args.drain_only {
            continue;
        }

        // Publishing: bare, ours, bare again, each to a queue of its own; the ceiling is the mean
        // of the two bare runs around ours, so drift during the repetition cancels out.
        let mut bare_pub = Vec::new();
        let (mut our_pub, mut producer_rss) = (0.0, 0);
        let (mut bare_cpu, mut our_cpu) = (Vec::new(), 0.0);
        for ours in [false, true, false] {
            let names = Names::new("publish");
            declare(&ch, &names, &args.queue_type).await;
            quiesce();
            let cpu = Cpu::now();
            if ours {
                (our_pub, producer_rss) = our_publish(&args, &names, n, None, false);
                our_cpu = s.phase_cpu("producer", cpu, n);
            } else {
                bare_pub.push(alone(bare_publish(
                    args.amqp.clone(),
                    names.clone(),
                    readings.clone(),
                    args.window,
                )));
                bare_cpu.push(s.phase_cpu("bare_publish", cpu, n));
            }
            cleanup(&amqp, &pg, &names).await;
        }
        let bare_pub = mean(&bare_pub);
        s.push("producer_cpu_ratio", mean(&bare_cpu) / our_cpu);

        let names = Names::new("copy");
        let copy = copy_ceiling(&pg, &names, &readings).await;
        cleanup(&amqp, &pg, &names).await;
        for (k, v) in [
            ("copy_per_s", copy),
            ("consumer_vs_copy", ours / copy),
            ("bare_publish_per_s", bare_pub),
            ("producer_publish_per_s", our_pub),
            ("producer_vs_bare", our_pub / bare_pub),
            ("producer_peak_rss_mib", producer_rss as f64 / 1048576.0),
        ] {
            s.push(k, v);
        }
        eprintln!(
            "rep {rep}: producer {our_pub:.0}/s vs bare {bare_pub:.0}/s ({:.2}); COPY {copy:.0}/s",
            our_pub / bare_pub
        );
    }
    let mut latency = Vec::new();
    let rates: &[u64] = if args.drain_only || args.tls_amqp.is_some() {
        &[]
    } else {
        &args.rates
    };
    for &rate in rates {
        let names = Names::new("latency");
        let ch = amqp.create_channel().await.unwrap();
        declare(&ch, &names, &args.queue_type).await;
        let (child, port, _) = start_consumer(&args, &names, false);
        let count = (rate * args.latency_secs) as usize;
        let (achieved, _) = our_publish(&args, &names, count, Some(rate), false);
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
            "consumer_vs_minimal",
            "consumer drain / minimal pipeline",
            "≥ 0.95",
        ),
        (
            "producer_vs_bare",
            "producer / bare lapin publisher",
            "≥ 0.95",
        ),
        (
            "consumer_minimal_cpu_ratio",
            "CPU per reading, all processes: minimal pipeline / consumer drain",
            "",
        ),
        (
            "consumer_cpu_ratio",
            "CPU per reading, all processes: broker drain ceiling / consumer drain",
            "",
        ),
        (
            "producer_cpu_ratio",
            "CPU per reading, all processes: bare publisher / producer",
            "",
        ),
        (
            "consumer_vs_broker",
            "consumer drain / broker drain ceiling",
            "",
        ),
        (
            "minimal_vs_broker",
            "minimal pipeline / broker drain ceiling",
            "",
        ),
        (
            "consumer_vs_minimal_steady",
            "consumer / minimal pipeline, first row → last row (context)",
            "",
        ),
        ("consumer_vs_copy", "consumer drain / COPY", ""),
        (
            "broker_drain_per_s",
            "broker drain ceiling (readings/s)",
            "",
        ),
        ("minimal_drain_per_s", "minimal pipeline (readings/s)", ""),
        ("consumer_drain_per_s", "consumer drain (readings/s)", ""),
        ("copy_per_s", "COPY ceiling (rows/s)", ""),
        ("bare_publish_per_s", "bare publisher (readings/s)", ""),
        ("producer_publish_per_s", "producer (readings/s)", ""),
        (
            "consumer_first_commit_ms",
            "consumer start → first row written (ms)",
            "",
        ),
        ("consumer_peak_rss_mib", "consumer peak RSS (MiB)", "≤ 12"),
        ("producer_peak_rss_mib", "producer peak RSS (MiB)", "≤ 10"),
        (
            "consumer_tls_vs_plain",
            "consumer drain over TLS / plain text",
            "≥ 0.85",
        ),
        (
            "producer_tls_vs_plain",
            "producer over TLS / plain text",
            "≥ 0.85",
        ),
        (
            "consumer_tls_drain_per_s",
            "consumer drain over TLS (readings/s)",
            "",
        ),
        (
            "consumer_tls_peak_rss_mib",
            "consumer peak RSS over TLS (MiB)",
            "≤ 12",
        ),
        (
            "producer_tls_peak_rss_mib",
            "producer peak RSS over TLS (MiB)",
            "≤ 10",
        ),
    ];
    println!(
        "\n| figure ({} queue, N={n}, {} reps) | min | median | max | target |",
        args.queue_type, args.reps
    );
    println!("|---|---|---|---|---|");
    let mut figures = serde_json::Map::new();
    for (k, label, target) in keys {
        if !s.0.contains_key(k) {
            continue; // a phase not run (`--drain-only`)
        }
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
            "p99 ≤ 10"
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
    println!("\n| CPU ms per 1,000 readings (median) | broker | postgres | consumer | producer | harness and ceiling clients | machine busy |");
    println!("|---|---|---|---|---|---|---|");
    let mut cpu = serde_json::Map::new();
    for (phase, label) in PHASES {
        let med = |k: &str| s.stats(&format!("cpu_{phase}_{k}")).1;
        if med("machine_busy").is_nan() {
            continue; // a phase not run (`--drain-only`)
        }
        let cells: Vec<String> = PROCESSES.iter().map(|k| format!("{:.0}", med(k))).collect();
        println!(
            "| {label} | {} | {:.0} % |",
            cells.join(" | "),
            med("machine_busy") * 100.0
        );
        let mut row: serde_json::Map<String, serde_json::Value> = PROCESSES
            .iter()
            .map(|k| (k.to_string(), json!(med(k))))
            .collect();
        row.insert("machine_busy".into(), json!(med("machine_busy")));
        cpu.insert(phase.to_owned(), row.into());
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
    let out = json!({"n": n, "reps": args.reps, "consumers": args.consumers, "queue_type": args.queue_type, "window": args.window, "prefetch": args.prefetch, "machine": machine, "figures": figures, "latency": latency, "cpu_ms_per_1000": cpu});
    if let Some(dir) = std::path::Path::new(&args.json).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("\nmachine: {machine}\nfigures written to {}", args.json);
}
