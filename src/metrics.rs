//! Prometheus metrics of both daemons. One struct per daemon, one field per metric, each with its
//! own registry: passed around in an `Arc`, never global, so tests can run many daemons at once.
//!
//! The consumer keeps the older system's names: `messages_processed_total`,
//! `messages_per_second`, `consumer_memory_usage_bytes`, `postgres_insert_errors_total`.
//!
//! Both also export the standard `process_*` metrics ([`crate::process`]) and
//! `sistema_mensajes_ready{phase}`, computed at each scrape from the daemon's [`Phase`].

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::health::Phase;
use crate::process::ProcessMetrics;
use crate::reading::RejectReason;

/// The window `messages_per_second` averages over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, name, Box::new(c.clone()));
    c
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, name, Box::new(g.clone()));
    g
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, name, Box::new(g.clone()));
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, name, Box::new(h.clone()));
    h
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])
        .unwrap_or_else(|e| unreachable_metric(name, e));
    register(registry, name, Box::new(c.clone()));
    c
}

fn blocked_gauge(registry: &Registry) -> IntGauge {
    int_gauge(
        registry,
        "amqp_connection_blocked",
        "1 while RabbitMQ blocks our publishing connection (a memory or disk alarm).",
    )
}

fn register(registry: &Registry, name: &str, c: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(c) {
        unreachable_metric(name, e)
    }
}

/// Metric construction fails only for an invalid or duplicate name; names are literals in this
/// file and every registry is fresh, which the unit tests exercise.
#[allow(clippy::panic)]
fn unreachable_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} cannot be registered: {e}")
}

fn build_info(registry: &Registry, daemon: &str) {
    let g = prometheus::IntGaugeVec::new(
        Opts::new(
            "sistema_mensajes_build_info",
            "Always 1; labels name the running build.",
        ),
        &["daemon", "version"],
    )
    .unwrap_or_else(|e| unreachable_metric("sistema_mensajes_build_info", e));
    g.with_label_values(&[daemon, env!("CARGO_PKG_VERSION")])
        .set(1);
    register(registry, "sistema_mensajes_build_info", Box::new(g));
}

/// Resident set size of this process in bytes, read from `/proc/self/statm`.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = procfs::process::Process::myself().ok()?.statm().ok()?;
    Some(statm.resident * procfs::page_size())
}

/// Buckets of `consumer_end_to_end_latency_seconds`: 1 ms, doubling, up to about 70 min (a
/// backlog drained after an outage is minutes late), plus 5 s, the alert's threshold
/// (`SistemaEndToEndLatencyHigh`), which would otherwise fall between 4.1 s and 8.2 s.
fn end_to_end_buckets() -> Vec<f64> {
    with_bucket(
        prometheus::exponential_buckets(0.001, 2.0, 23).unwrap_or_default(),
        5.0,
    )
}

/// `buckets` with `extra` added in order.
fn with_bucket(mut buckets: Vec<f64>, extra: f64) -> Vec<f64> {
    buckets.push(extra);
    buckets.sort_by(f64::total_cmp);
    buckets
}

/// `sistema_mensajes_ready{phase}`: exactly one series, labelled with the current phase; 1 only
/// while running. Built fresh at each scrape, so two scrapes never see each other's half-update.
fn readiness(phase: Phase) -> Vec<prometheus::proto::MetricFamily> {
    let opts = Opts::new(
        "sistema_mensajes_ready",
        "1 while the daemon is running normally, else 0; the phase label says what it is doing.",
    )
    .const_label("phase", phase.as_str());
    match IntGauge::with_opts(opts) {
        Ok(g) => {
            g.set(i64::from(phase == Phase::Running));
            prometheus::core::Collector::collect(&g)
        }
        Err(_) => Vec::new(),
    }
}

fn encode(registry: &Registry, process: &ProcessMetrics, phase: Phase) -> String {
    let mut families = registry.gather();
    families.extend(process.families());
    families.extend(readiness(phase));
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on metric families that could not have been registered.
    let _ = TextEncoder::new().encode(&families, &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

pub struct ConsumerMetrics {
    registry: Registry,
    pub processed: IntCounter,
    pub per_second: Gauge,
    pub memory: IntGauge,
    pub insert_errors: IntCounterVec,
    pub rejected: IntCounterVec,
    pub duplicates: IntCounter,
    pub conflicting: IntCounter,
    pub rows_inserted: IntCounter,
    pub pending: IntGauge,
    pub insert_duration: Histogram,
    pub batch_size: Histogram,
    pub amqp_connection_errors: IntCounter,
    pub postgres_connection_errors: IntCounter,
    pub last_commit: Gauge,
    pub end_to_end: Histogram,
    pub from_future: IntCounter,
    pub refusing_all: IntGauge,
    pub dead_letters_held: IntGauge,
    pub blocked: IntGauge,
    stations_known: IntGauge,
    stations_silent: IntGauge,
    /// The stations heard from (updated by the writer, counted at each rendering).
    stations: std::sync::Mutex<crate::silent_stations::Stations>,
    process: ProcessMetrics,
    /// Size and duration of the last batch, for the systemd status line (not exported).
    pub last_batch: AtomicU64,
    pub last_batch_micros: AtomicU64,
}

impl ConsumerMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            processed: counter(&r, "messages_processed_total", "Readings stored in PostgreSQL and acknowledged (redeliveries of stored readings included)."),
            per_second: gauge(&r, "messages_per_second", "Deprecated, the older system's name: use rate(messages_processed_total[1m]). Readings stored per second, averaged over the last 10 seconds."),
            memory: int_gauge(&r, "consumer_memory_usage_bytes", "Deprecated, the older system's name: use process_resident_memory_bytes (the same figure). Resident memory of the consumer process (procfs), in bytes."),
            insert_errors: counter_vec(&r, "postgres_insert_errors_total", "Failed attempts to insert a batch into PostgreSQL, by error_type (the journal's ERROR_TYPE).", "error_type"),
            rejected: counter_vec(&r, "messages_rejected_total", "Messages dead-lettered, by reason.", "reason"),
            duplicates: counter(&r, "messages_duplicate_total", "Readings acknowledged without a new row because their message_id was already stored."),
            conflicting: counter(&r, "messages_conflicting_total", "Readings acknowledged without a new row because a different reading with their message_id was stored first (kept); not counted as duplicates."),
            rows_inserted: counter(&r, "sistema_consumer_rows_inserted_total", "Rows inserted into weather_logs, counted at the commit (a redelivered or republished reading already stored adds none): what the completeness rule compares with the readings confirmed."),
            pending: int_gauge(&r, "consumer_pending_messages", "Messages received and not yet acknowledged."),
            // 0.5 ms, doubling, to about 65 s: above the 20 s statement_timeout.
            insert_duration: histogram(&r, "postgres_insert_duration_seconds", "Time to store one batch, including isolating refused rows.", prometheus::exponential_buckets(0.0005, 2.0, 18).unwrap_or_default()),
            batch_size: histogram(&r, "consumer_batch_size_messages", "Messages per batch (stored and dead-lettered).", vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0]),
            amqp_connection_errors: counter(&r, "amqp_connection_errors_total", "RabbitMQ connections lost or attempts that failed."),
            postgres_connection_errors: counter(&r, "postgres_connection_errors_total", "PostgreSQL connections lost or attempts that failed."),
            last_commit: gauge(&r, "consumer_last_commit_timestamp_seconds", "Unix time of the last batch stored and acknowledged."),
            end_to_end: histogram(&r, "consumer_end_to_end_latency_seconds", "Time from a reading's measured_at to the commit that stored it.", end_to_end_buckets()),
            from_future: counter(&r, "consumer_readings_from_future_total", "Readings stored whose measured_at was later than the commit that stored them: a station whose clock runs ahead (their latency is observed as 0)."),
            refusing_all: int_gauge(&r, "consumer_database_refusing_all", "1 while PostgreSQL refuses every reading of a batch and a reading it accepted before (a change to the table); the readings are held and retried."),
            dead_letters_held: int_gauge(&r, "consumer_dead_letters_held", "Rejected messages that could not be dead-lettered yet; held unacknowledged and retried."),
            blocked: blocked_gauge(&r),
            stations_known: int_gauge(&r, "consumer_stations_known", "Stations the consumer has stored readings of since it started (at most stations.max_tracked)."),
            stations_silent: int_gauge(&r, "consumer_stations_silent", "Of those, the stations not heard from for stations.silent_after."),
            stations: std::sync::Mutex::new(crate::silent_stations::Stations::new(
                crate::config::StationsConfig::default().silent_after,
                crate::config::StationsConfig::default().max_tracked,
            )),
            process: ProcessMetrics::new(),
            last_batch: AtomicU64::new(0),
            last_batch_micros: AtomicU64::new(0),
            registry: r,
        };
        for reason in RejectReason::ALL {
            m.rejected.with_label_values(&[reason.as_str()]);
        }
        for error_type in crate::db::DbError::ERROR_TYPES {
            m.insert_errors.with_label_values(&[error_type]);
        }
        build_info(&m.registry, "consumer");
        m
    }

    /// `postgres_insert_errors_total` over every `error_type`.
    pub fn insert_errors_total(&self) -> u64 {
        crate::db::DbError::ERROR_TYPES
            .iter()
            .map(|t| self.insert_errors.with_label_values(&[t]).get())
            .sum()
    }

    /// Uses `cfg` for the silent stations (forgetting those seen so far).
    pub fn configure_stations(&self, cfg: &crate::config::StationsConfig) {
        *self.stations_lock() =
            crate::silent_stations::Stations::new(cfg.silent_after, cfg.max_tracked);
    }

    /// The stations of readings just stored were heard from now.
    pub fn stations_heard<'a>(&self, stations: impl IntoIterator<Item = &'a str>) {
        let now = std::time::Instant::now();
        let mut s = self.stations_lock();
        for station in stations {
            s.seen(station, now);
        }
    }

    fn stations_lock(&self) -> std::sync::MutexGuard<'_, crate::silent_stations::Stations> {
        // Poisoned only by a panic, which aborts the process (panic = "abort").
        self.stations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Observes `measured_at` → `committed` for each row that has a `measured_at` (older-style
    /// messages have none). A clock running ahead at the station counts as 0.
    pub fn observe_end_to_end(
        &self,
        measured: impl IntoIterator<Item = time::OffsetDateTime>,
        committed: time::OffsetDateTime,
    ) {
        for measured in measured {
            let latency = (committed - measured).as_seconds_f64();
            if latency < 0.0 {
                self.from_future.inc();
            }
            self.end_to_end.observe(latency.max(0.0));
        }
    }

    /// Text exposition, with the memory and process metrics read fresh and the readiness of
    /// `phase` (the daemon's [`crate::health::Health::phase`]).
    pub fn render(&self, phase: Phase) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.memory.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        {
            let s = self.stations_lock();
            let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.stations_known.set(count(s.known()));
            self.stations_silent
                .set(count(s.silent(std::time::Instant::now())));
        }
        encode(&self.registry, &self.process, phase)
    }
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

pub struct ProducerMetrics {
    registry: Registry,
    pub published: IntCounter,
    pub confirmed: IntCounter,
    pub returned: IntCounter,
    pub nacked: IntCounter,
    pub republished: IntCounter,
    pub unconfirmed: IntGauge,
    pub confirm_duration: Histogram,
    pub memory: IntGauge,
    pub amqp_connection_errors: IntCounter,
    pub blocked: IntGauge,
    process: ProcessMetrics,
}

impl ProducerMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            published: counter(
                &r,
                "messages_published_total",
                "Publishes sent to RabbitMQ, retries included.",
            ),
            confirmed: counter(
                &r,
                "messages_confirmed_total",
                "Readings the broker confirmed (routed and stored).",
            ),
            returned: counter(
                &r,
                "messages_returned_total",
                "Publishes returned by the broker as unroutable; they are retried.",
            ),
            nacked: counter(
                &r,
                "messages_nacked_total",
                "Publishes the broker refused (nack); they are retried.",
            ),
            republished: counter(
                &r,
                "messages_republished_total",
                "Publishes of readings sent before without a positive confirm.",
            ),
            unconfirmed: int_gauge(
                &r,
                "producer_unconfirmed_messages",
                "Readings published and awaiting their confirm, or waiting to be retried.",
            ),
            confirm_duration: histogram(
                &r,
                "publish_confirm_duration_seconds",
                "Time from publish to the broker's confirm.",
                // 0.1 ms, doubling, to about 52 s: a blocked or restarting broker confirms late.
                prometheus::exponential_buckets(0.0001, 2.0, 20).unwrap_or_default(),
            ),
            memory: int_gauge(
                &r,
                "producer_memory_usage_bytes",
                "Deprecated, not bound by the older system and to be removed: use process_resident_memory_bytes (the same figure). Resident memory of the producer process (procfs), in bytes.",
            ),
            amqp_connection_errors: counter(
                &r,
                "amqp_connection_errors_total",
                "RabbitMQ connections lost or attempts that failed.",
            ),
            blocked: blocked_gauge(&r),
            process: ProcessMetrics::new(),
            registry: r,
        };
        build_info(&m.registry, "producer");
        m
    }

    /// Text exposition, as [`ConsumerMetrics::render`].
    pub fn render(&self, phase: Phase) -> String {
        if let Some(rss) = resident_memory_bytes() {
            self.memory.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        encode(&self.registry, &self.process, phase)
    }
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Average rate of a growing count over a sliding window of samples.
#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records `count` at `now`; returns the rate per second over the window (0 until two samples).
    pub fn observe(&mut self, now: Instant, count: u64) -> f64 {
        self.samples.push_back((now, count));
        while let Some(&(t, _)) = self.samples.front() {
            if now.duration_since(t) > self.window && self.samples.len() > 2 {
                self.samples.pop_front();
            } else {
                break;
            }
        }
        match (self.samples.front(), self.samples.back()) {
            (Some(&(t0, c0)), Some(&(t1, c1))) if t1 > t0 => {
                c1.saturating_sub(c0) as f64 / t1.duration_since(t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_averages_over_the_window_only() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        assert_eq!(w.observe(t0, 0), 0.0);
        for s in 1..=10 {
            w.observe(t0 + Duration::from_secs(s), s * 100);
        }
        assert_eq!(w.observe(t0 + Duration::from_secs(10), 1000), 100.0);
        // Stalls: after 10 s without progress the rate falls to zero.
        let r = w.observe(t0 + Duration::from_secs(21), 1000);
        assert!(r < 1.0, "{r}");
    }

    /// Fails with the whole exposition unless every one of `parts` is in it.
    fn assert_contains(text: &str, parts: &[&str]) {
        for part in parts {
            assert!(text.contains(part), "{part} missing in\n{text}");
        }
    }

    #[test]
    fn consumer_exposition_has_the_old_names_and_memory() {
        let m = ConsumerMetrics::new();
        m.processed.inc_by(3);
        assert_contains(
            &m.render(Phase::Running),
            &[
                "messages_processed_total 3",
                "messages_per_second ",
                "consumer_memory_usage_bytes ",
                "postgres_insert_errors_total{error_type=\"connection\"} 0",
                "postgres_insert_errors_total{error_type=\"disk_full\"} 0",
                "messages_rejected_total{reason=\"malformed_json\"} 0",
            ],
        );
        assert!(m.memory.get() > 1_000_000, "RSS {}", m.memory.get());
    }

    #[test]
    fn producer_exposition_renders() {
        let text = ProducerMetrics::new().render(Phase::Running);
        assert!(text.contains("messages_confirmed_total 0"), "{text}");
        assert!(text.contains("producer_memory_usage_bytes "), "{text}");
    }

    #[test]
    fn both_daemons_export_process_metrics() {
        for text in [
            ConsumerMetrics::new().render(Phase::Running),
            ProducerMetrics::new().render(Phase::Running),
        ] {
            assert_contains(
                &text,
                &[
                    "process_cpu_seconds_total ",
                    "process_resident_memory_bytes ",
                    "process_virtual_memory_bytes ",
                    "process_open_fds ",
                    "process_max_fds ",
                    "process_start_time_seconds ",
                ],
            );
        }
    }

    /// The lines of `sistema_mensajes_ready`, without HELP and TYPE.
    fn ready_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("sistema_mensajes_ready"))
            .collect()
    }

    #[test]
    fn readiness_has_one_series_labelled_with_the_phase() {
        let consumer = ConsumerMetrics::new();
        let producer = ProducerMetrics::new();
        for phase in Phase::ALL {
            let want = format!(
                "sistema_mensajes_ready{{phase=\"{}\"}} {}",
                phase.as_str(),
                u8::from(phase == Phase::Running)
            );
            for text in [consumer.render(phase), producer.render(phase)] {
                assert_eq!(ready_lines(&text), [want.as_str()], "{phase:?}");
            }
        }
    }

    #[test]
    fn end_to_end_latency_is_observed_per_row_with_a_measured_at() {
        let m = ConsumerMetrics::new();
        let committed = time::OffsetDateTime::now_utc();
        let row = |ago_ms: i64, measured: bool| crate::reading::Reading {
            message_id: uuid::Uuid::nil(),
            station_id: "S-1".into(),
            temperature: 20.0,
            humidity: 50.0,
            pressure: 1000.0,
            measured_at: measured.then(|| committed - time::Duration::milliseconds(ago_ms)),
        };
        // 3 ms, 1.5 s, no measured_at (not observed), and a station clock 2 s ahead (0).
        let rows = [
            row(3, true),
            row(1500, true),
            row(0, false),
            row(-2000, true),
        ];
        m.observe_end_to_end(rows.iter().filter_map(|r| r.measured_at), committed);
        assert_eq!(m.end_to_end.get_sample_count(), 3);
        assert!((m.end_to_end.get_sample_sum() - 1.503).abs() < 1e-6);
        assert_contains(
            &m.render(Phase::Running),
            &[
                "consumer_end_to_end_latency_seconds_bucket{le=\"0.001\"} 1",
                "consumer_end_to_end_latency_seconds_bucket{le=\"0.004\"} 2",
                "consumer_end_to_end_latency_seconds_bucket{le=\"2.048\"} 3",
                "consumer_end_to_end_latency_seconds_bucket{le=\"5\"} 3",
                "consumer_end_to_end_latency_seconds_bucket{le=\"4194.304\"} 3",
                "consumer_end_to_end_latency_seconds_count 3",
                "consumer_readings_from_future_total 1",
            ],
        );
    }
}
