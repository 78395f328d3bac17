//! The smaller sections: `[batch]`, `[validation]`, `[retry]`, `[metrics]`, `[log]`,
//! `[stations]` (consumer) and `[simulation]` (producer).

use super::*;

/// How valid readings are grouped into one INSERT per transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Flush when this many messages are waiting.
    pub max_size: usize,
    /// Flush when the oldest waiting message has waited this long, unless more messages are
    /// already buffered (a backlog): those are read into the batch first, up to `max_size`.
    /// Sooner if nothing arrives for a millisecond and the previous batch is written.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_size: 500,
            max_wait: Duration::from_millis(5),
        }
    }
}

impl BatchConfig {
    /// `prefetch`: the deliveries in flight (`amqp.prefetch`), which a batch cannot outgrow.
    pub(super) fn validate(&self, prefetch: u16) -> Result<(), ConfigError> {
        if self.max_size == 0 || self.max_size > usize::from(prefetch) {
            return Err(invalid(
                "batch.max_size",
                format!(
                    "{} must be between 1 and amqp.prefetch ({prefetch}), or a batch could never fill",
                    self.max_size
                ),
            ));
        }
        if self.max_wait.is_zero() {
            return Err(invalid("batch.max_wait", "must be above zero"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Larger message bodies are dead-lettered as `too_large`.
    pub max_message_bytes: usize,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4096,
        }
    }
}

impl ValidationConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_message_bytes == 0 {
            return Err(invalid(
                "validation.max_message_bytes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Capped exponential backoff for reconnecting to RabbitMQ and PostgreSQL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.min_delay.is_zero() || self.min_delay > self.max_delay {
            return Err(invalid(
                "retry.min_delay",
                "must be above zero and at most retry.max_delay",
            ));
        }
        Ok(())
    }

    /// The longest pause between two attempts: `max_delay` plus up to as much again of jitter.
    pub fn longest_pause(&self) -> Duration {
        self.max_delay * 2
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address `/metrics` is served on when systemd does not pass a socket.
    pub listen: SocketAddr,
    /// TLS and basic authentication for `/metrics`, in the Prometheus exporters' web
    /// configuration format ([`crate::web`]). Read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_config_file: Option<PathBuf>,
}

impl MetricsConfig {
    /// The web configuration, read and checked (a configuration error at start).
    pub fn web(&self) -> Result<Option<std::sync::Arc<crate::web::Web>>, ConfigError> {
        let Some(path) = &self.web_config_file else {
            return Ok(None);
        };
        crate::web::Web::load(path)
            .map(|w| Some(std::sync::Arc::new(w)))
            .map_err(|e| invalid("metrics.web_config_file", e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// journald when started by systemd with a journal, text on stderr otherwise.
    Auto,
    Text,
    Json,
    Journald,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,sistema_mensajes=debug`; `RUST_LOG` overrides it.
    /// The default silences `lapin::channels`, which logs an error on every orderly close; the
    /// daemons log connection losses themselves.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            level: "info,tokio_postgres=warn,lapin::channels=off".into(),
        }
    }
}

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = self.level.parse::<tracing_subscriber::filter::Targets>() {
            return Err(invalid("log.level", e.to_string()));
        }
        Ok(())
    }
}

/// Silent stations (`consumer_stations_silent`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StationsConfig {
    /// A station not heard from for this long counts as silent.
    #[serde(with = "humantime_serde")]
    pub silent_after: Duration,
    /// Stations remembered at most; past it, the one heard from longest ago is forgotten (an id
    /// a sender makes up costs one entry, not unbounded memory).
    pub max_tracked: usize,
}

impl Default for StationsConfig {
    fn default() -> Self {
        Self {
            silent_after: Duration::from_secs(300),
            max_tracked: 10_000,
        }
    }
}

impl StationsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.silent_after.is_zero() {
            return Err(invalid("stations.silent_after", "must be above zero"));
        }
        if self.max_tracked == 0 {
            return Err(invalid("stations.max_tracked", "must be at least 1"));
        }
        Ok(())
    }
}

/// What the producer simulates.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulationConfig {
    /// Number of simulated stations, named `STATION-001`, `STATION-002`, …
    pub stations: u32,
    /// Each station sends one reading this often (the older system's default was 5 s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Total readings per second across all stations; overrides `interval` when set.
    /// `0` means as fast as the confirm window allows.
    pub rate: Option<f64>,
    /// Published messages that may await their broker confirm at once.
    pub confirm_window: usize,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            stations: 5,
            interval: Duration::from_secs(5),
            rate: None,
            confirm_window: 1024,
        }
    }
}

impl SimulationConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.stations == 0 || self.stations > 999_999 {
            return Err(invalid(
                "simulation.stations",
                "must be between 1 and 999999",
            ));
        }
        if self.interval.is_zero() {
            return Err(invalid("simulation.interval", "must be above zero"));
        }
        if let Some(r) = self.rate {
            if !r.is_finite() || r < 0.0 {
                return Err(invalid(
                    "simulation.rate",
                    format!("{r} is not a rate >= 0"),
                ));
            }
        }
        if self.confirm_window == 0 {
            return Err(invalid("simulation.confirm_window", "must be at least 1"));
        }
        Ok(())
    }

    /// Readings per second, `None` for unlimited.
    pub fn total_rate(&self) -> Option<f64> {
        match self.rate {
            Some(0.0) => None,
            Some(r) => Some(r),
            None => Some(f64::from(self.stations) / self.interval.as_secs_f64()),
        }
    }
}
