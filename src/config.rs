//! Configuration: built-in defaults, then an optional TOML file, then `PRODUCER_*` / `CONSUMER_*`
//! environment variables (`__` separates nesting: `CONSUMER_AMQP__PREFETCH=500`).
//!
//! Passwords never live here. They come from `*.password_file` or from a systemd credential
//! (`amqp-password`, `postgres-password` in `$CREDENTIALS_DIRECTORY`), see [`crate::secret`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::secret::{self, Secret, SecretError, SecretSource};

/// Exit code for a configuration error (sysexits `EX_CONFIG`); the units stop restarting on it.
pub const EXIT_CONFIG: u8 = 78;

/// What replaces a password when a URL is printed.
const REDACTED: &str = "REDACTED";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}", without_source_lines(.0))]
    Parse(Box<figment::Error>),
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// A figment error without the lines of the file a TOML parse error quotes (`2 | url = "…`):
/// a line that does not parse may hold an inline password. The line and column stay.
fn without_source_lines(e: &figment::Error) -> String {
    let text = e.to_string();
    let quoted = |l: &str| {
        let l = l.trim_start();
        l.starts_with('|')
            || l.split_once(" |")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
    };
    text.lines()
        .filter(|l| !quoted(l))
        .collect::<Vec<_>>()
        .join(" ")
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A RabbitMQ exchange, queue or routing key name: at most 255 bytes (an AMQP short string).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AmqpName(String);

impl TryFrom<String> for AmqpName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 255 {
            return Err(format!("`{s}` must be 1 to 255 bytes long"));
        }
        Ok(Self(s))
    }
}

impl From<AmqpName> for String {
    fn from(n: AmqpName) -> String {
        n.0
    }
}

impl AmqpName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AmqpName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PostgreSQL schema name safe to use unquoted: `[a-z_][a-z0-9_]*`, at most 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Identifier(String);

impl TryFrom<String> for Identifier {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !first_ok || !rest_ok || s.len() > 63 {
            return Err(format!(
                "`{s}` is not a plain identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
            ));
        }
        Ok(Self(s))
    }
}

impl From<Identifier> for String {
    fn from(n: Identifier) -> String {
        n.0
    }
}

impl Identifier {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Declared with no arguments, as the older Python system did.
    Classic,
    /// Declared with `x-queue-type: quorum` (a new queue only: RabbitMQ refuses to change a queue's type).
    Quorum,
}

/// RabbitMQ connection and topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// AMQP URI without the password, e.g. `amqp://guest@127.0.0.1:5672/%2f`; or a list of them,
    /// one per node of a RabbitMQ cluster, tried in turn.
    pub url: BrokerUrls,
    /// File holding the password. Without it, the credential `amqp-password` is used if present.
    pub password_file: Option<PathBuf>,
    /// Durable direct exchange readings are published to.
    pub exchange: AmqpName,
    pub routing_key: AmqpName,
    /// Durable queue the consumer reads, bound to `exchange` with `routing_key`.
    pub queue: AmqpName,
    pub queue_type: QueueType,
    /// Fanout exchange and queue that rejected messages are republished to, with their reason.
    pub dead_letter_exchange: AmqpName,
    pub dead_letter_queue: AmqpName,
    /// The dead-letter queue's type (a new queue only, as `queue_type`). On a RabbitMQ cluster
    /// both should be `quorum`: a classic queue lives on one node, and while that node is down
    /// it cannot be declared, so no consumer could start.
    pub dead_letter_queue_type: QueueType,
    /// Unacknowledged deliveries the broker may push to the consumer (`basic.qos`).
    pub prefetch: u16,
    /// Declare the exchanges, queues and bindings at start, which needs RabbitMQ's `configure`
    /// permission on them. With `false`, only check that they exist (passive declares, which need
    /// no permission) and wait until they do: a provisioning step owns the topology
    /// (`consumer declare-topology`), and the daemons' users need no `configure` at all.
    pub declare: bool,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: local_url("amqp://guest@127.0.0.1:5672/%2f").into(),
            password_file: None,
            exchange: AmqpName("weather".into()),
            routing_key: AmqpName("weather_key".into()),
            queue: AmqpName("weather_queue".into()),
            queue_type: QueueType::Classic,
            dead_letter_exchange: AmqpName("weather_dead_letter".into()),
            dead_letter_queue: AmqpName("weather_dead_letter".into()),
            dead_letter_queue_type: QueueType::Classic,
            prefetch: 2000,
            declare: true,
        }
    }
}

/// `amqp.url`: one broker URL, or a list of the nodes of a RabbitMQ cluster
/// (`url = ["amqp://sistema@rabbit1:5672/%2f", "amqp://sistema@rabbit2:5672/%2f"]`). A daemon
/// connects to the first that answers, and after a lost connection tries the next one first.
/// Never empty. One URL is written back as a string, several as a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrls {
    first: Url,
    rest: Vec<Url>,
}

impl From<Url> for BrokerUrls {
    fn from(first: Url) -> Self {
        Self {
            first,
            rest: Vec::new(),
        }
    }
}

impl TryFrom<Vec<Url>> for BrokerUrls {
    type Error = &'static str;

    fn try_from(urls: Vec<Url>) -> Result<Self, Self::Error> {
        let mut urls = urls.into_iter();
        let first = urls
            .next()
            .ok_or("an empty list: name at least one broker")?;
        Ok(Self {
            first,
            rest: urls.collect(),
        })
    }
}

impl BrokerUrls {
    pub fn first(&self) -> &Url {
        &self.first
    }

    pub fn first_mut(&mut self) -> &mut Url {
        &mut self.first
    }

    pub fn iter(&self) -> impl Iterator<Item = &Url> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always `false`: there is at least one URL. (Clippy asks for it beside `len`.)
    pub fn is_empty(&self) -> bool {
        false
    }

    fn map(&self, f: impl Fn(&Url) -> Url) -> Self {
        Self {
            first: f(&self.first),
            rest: self.rest.iter().map(f).collect(),
        }
    }

    /// Error `e` of entry `i`: as is for a single URL, with "entry i (counting from 0)" in a list.
    fn describe(&self, i: usize, e: impl std::fmt::Display) -> String {
        if self.rest.is_empty() {
            e.to_string()
        } else {
            format!("entry {i} (counting from 0): {e}")
        }
    }
}

impl Serialize for BrokerUrls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.rest.is_empty() {
            s.serialize_str(self.first.as_str())
        } else {
            s.collect_seq(self.iter().map(Url::as_str))
        }
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        // As `quiet_url`: the error never quotes the text, which may hold a password.
        let parse = |text: &str| {
            Url::parse(text).map_err(|e| serde::de::Error::custom(format!("not a valid URL ({e})")))
        };
        let texts = match OneOrMany::deserialize(d)
            .map_err(|_: D::Error| serde::de::Error::custom("expected a URL or a list of URLs"))?
        {
            OneOrMany::One(text) => vec![text],
            OneOrMany::Many(texts) => texts,
        };
        let mut urls = texts.iter().map(|t| parse(t));
        let Some(first) = urls.next() else {
            return Err(serde::de::Error::custom(
                "an empty list: name at least one broker",
            ));
        };
        Ok(Self {
            first: first?,
            rest: urls.collect::<Result<_, _>>()?,
        })
    }
}

/// PostgreSQL connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/dbname` without the password.
    #[serde(deserialize_with = "quiet_url")]
    pub url: Url,
    /// File holding the password. Without it, the credential `postgres-password` is used if present.
    pub password_file: Option<PathBuf>,
    /// Schema holding `weather_logs` and `schema_migrations`; created if missing.
    pub schema: Identifier,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Server-side limit for one statement, so a hung insert fails instead of stalling.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Apply pending migrations at start, as the consumer's own role (which must then own the
    /// schema: one role for everything, as on a development machine). With `false` the consumer
    /// only checks that `consumer migrate` has applied them, and waits until it has: its role
    /// needs no more than INSERT (docs/security.md, "Least privilege").
    pub migrate: bool,
    /// The role `consumer migrate` connects as, without the password: the owner of the schema
    /// and of `weather_logs`. Default: `url`.
    #[serde(
        default,
        deserialize_with = "quiet_url_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub owner_url: Option<Url>,
    /// File holding the owner's password. Without it, the credential `postgres-owner-password`
    /// is used if present.
    pub owner_password_file: Option<PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: local_url("postgres://postgres@127.0.0.1:5432/postgres"),
            password_file: None,
            schema: Identifier("public".into()),
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(20),
            migrate: true,
            owner_url: None,
            owner_password_file: None,
        }
    }
}

impl PostgresConfig {
    /// How much longer than the server's `statement_timeout` the client waits for an answer
    /// before it gives the connection up as dead: a tenth of it, between 100 ms and 2 s.
    pub fn statement_slack(&self) -> Duration {
        (self.statement_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// Client-side bound on one statement: `statement_timeout` plus its slack, so a connection
    /// that went silent (no RST, no answer) fails instead of hanging.
    pub fn statement_limit(&self) -> Duration {
        self.statement_timeout + self.statement_slack()
    }

    /// The longest one attempt at storing a batch can go without progress: connecting (and
    /// migrating), or one statement. It must stay below the systemd watchdog.
    pub fn attempt_limit(&self) -> Duration {
        self.connect_timeout + self.statement_limit()
    }
}

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

/// The consumer daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// How long a graceful shutdown may take before the daemon gives up and exits non-zero.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub amqp: AmqpConfig,
    pub postgres: PostgresConfig,
    pub batch: BatchConfig,
    pub validation: ValidationConfig,
    pub retry: RetryConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub stations: StationsConfig,
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

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(20),
            amqp: AmqpConfig::default(),
            postgres: PostgresConfig::default(),
            batch: BatchConfig::default(),
            validation: ValidationConfig::default(),
            retry: RetryConfig::default(),
            metrics: MetricsConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 9102)),
                web_config_file: None,
            },
            log: LogConfig::default(),
            stations: StationsConfig::default(),
        }
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
    /// Readings per second, `None` for unlimited.
    pub fn total_rate(&self) -> Option<f64> {
        match self.rate {
            Some(0.0) => None,
            Some(r) => Some(r),
            None => Some(f64::from(self.stations) / self.interval.as_secs_f64()),
        }
    }
}

/// The producer daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    pub amqp: AmqpConfig,
    pub simulation: SimulationConfig,
    pub retry: RetryConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: Duration::from_secs(20),
            amqp: AmqpConfig::default(),
            simulation: SimulationConfig::default(),
            retry: RetryConfig::default(),
            metrics: MetricsConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
                web_config_file: None,
            },
            log: LogConfig::default(),
        }
    }
}

#[allow(clippy::expect_used)] // Called only with the URL literals above; a unit test parses each default.
fn local_url(s: &str) -> Url {
    Url::parse(s).expect("built-in default URL parses")
}

/// Both daemons' configs: loaded the same way, checked for what serde cannot check.
pub trait DaemonConfig: Default + Serialize + DeserializeOwned {
    /// `PRODUCER_` or `CONSUMER_`.
    const ENV_PREFIX: &'static str;
    fn validate(&self) -> Result<(), ConfigError>;
    /// Reads every password once (files or credentials), so that a missing or unreadable one is
    /// a configuration error at start (exit 78) rather than a failure systemd restarts forever.
    fn check_secrets(&self) -> Result<(), ConfigError>;
    fn log(&self) -> &LogConfig;
    /// Copy with every URL's password replaced, for printing.
    fn redacted(&self) -> Self;
}

fn validate_url(key: &'static str, url: &Url, schemes: &[&str]) -> Result<(), ConfigError> {
    check_url(url, schemes).map_err(|e| invalid(key, e))
}

fn check_url(url: &Url, schemes: &[&str]) -> Result<(), String> {
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "scheme `{}` is not one of {}",
            url.scheme(),
            schemes.join(", ")
        ));
    }
    // PostgreSQL URLs may name the host in the query instead, as libpq does: a Unix socket
    // directory such as `postgres:///weather?host=/run/postgresql` (peer authentication).
    let host_param = url.scheme().starts_with("postgres")
        && url.query_pairs().any(|(k, v)| k == "host" && !v.is_empty());
    if url.fragment().is_some() {
        // libpq and tokio-postgres read `#` as part of a value (`password=ab#cd`); here it would
        // start a fragment, and be neither redacted nor passed on as written.
        return Err("the URL has a `#`: percent-encode it as %23".into());
    }
    if url.host_str().is_none_or(str::is_empty) && !host_param {
        return Err("the URL names no host".into());
    }
    Ok(())
}

fn validate_common(
    amqp: &AmqpConfig,
    retry: &RetryConfig,
    log: &LogConfig,
) -> Result<(), ConfigError> {
    for (i, url) in amqp.url.iter().enumerate() {
        let describe = |e| invalid("amqp.url", amqp.url.describe(i, e));
        check_url(url, &["amqp", "amqps"]).map_err(describe)?;
        crate::amqp::tls_client(url).map_err(describe)?;
    }
    if amqp.prefetch == 0 {
        return Err(invalid("amqp.prefetch", "must be at least 1"));
    }
    if retry.min_delay.is_zero() || retry.min_delay > retry.max_delay {
        return Err(invalid(
            "retry.min_delay",
            "must be above zero and at most retry.max_delay",
        ));
    }
    if let Err(e) = log.level.parse::<tracing_subscriber::filter::Targets>() {
        return Err(invalid("log.level", e.to_string()));
    }
    Ok(())
}

/// A URL from the config. `Url`'s own `Deserialize` quotes the text it cannot parse, and that
/// text may hold a password; this error says only what is wrong (figment adds the key).
fn quiet_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    Url::parse(&text).map_err(|e| serde::de::Error::custom(format!("not a valid URL ({e})")))
}

fn quiet_url_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
    quiet_url(d).map(Some)
}

/// `url` with its password replaced: the one after the user name, and any query parameter named
/// `password` (libpq reads one there).
fn redact_url(url: &Url) -> Url {
    let mut url = url.clone();
    if url.password().is_some() {
        // set_password only fails for URLs that cannot have one, which then have none to hide.
        let _ = url.set_password(Some(REDACTED));
    }
    if url
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| match k.eq_ignore_ascii_case("password") {
                true => (k.into_owned(), REDACTED.to_owned()),
                false => (k.into_owned(), v.into_owned()),
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url
}

impl DaemonConfig for ConsumerConfig {
    const ENV_PREFIX: &'static str = "CONSUMER_";

    fn check_secrets(&self) -> Result<(), ConfigError> {
        self.amqp.password()?;
        self.amqp.check_tls_files()?;
        self.metrics.web()?;
        self.postgres.password()?;
        check_pg_tls_files("postgres.url", &self.postgres.url)?;
        if let Some(url) = &self.postgres.owner_url {
            check_pg_tls_files("postgres.owner_url", url)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_common(&self.amqp, &self.retry, &self.log)?;
        validate_url(
            "postgres.url",
            &self.postgres.url,
            &["postgres", "postgresql"],
        )?;
        crate::db::check_host_counts(&self.postgres.url).map_err(|e| invalid("postgres.url", e))?;
        if let Some(url) = &self.postgres.owner_url {
            validate_url("postgres.owner_url", url, &["postgres", "postgresql"])?;
            crate::db::check_host_counts(url).map_err(|e| invalid("postgres.owner_url", e))?;
        }
        if self.stations.silent_after.is_zero() {
            return Err(invalid("stations.silent_after", "must be above zero"));
        }
        if self.stations.max_tracked == 0 {
            return Err(invalid("stations.max_tracked", "must be at least 1"));
        }
        if self.batch.max_size == 0 || self.batch.max_size > usize::from(self.amqp.prefetch) {
            return Err(invalid(
                "batch.max_size",
                format!(
                    "{} must be between 1 and amqp.prefetch ({}), or a batch could never fill",
                    self.batch.max_size, self.amqp.prefetch
                ),
            ));
        }
        if self.batch.max_wait.is_zero() {
            return Err(invalid("batch.max_wait", "must be above zero"));
        }
        if self.validation.max_message_bytes == 0 {
            return Err(invalid(
                "validation.max_message_bytes",
                "must be at least 1",
            ));
        }
        // Under systemd, the watchdog must outlast any single attempt of the writer and any pause
        // between two, or systemd would kill a consumer that was waiting healthily.
        if let Some(watchdog) = sd_notify::watchdog_enabled() {
            if self.retry.longest_pause() >= watchdog {
                return Err(invalid(
                    "retry.max_delay",
                    format!(
                        "{}s, twice with jitter, must stay below the systemd watchdog (WatchdogSec={}s); lower it or raise WatchdogSec",
                        self.retry.max_delay.as_secs_f64(),
                        watchdog.as_secs_f64()
                    ),
                ));
            }
            let attempt = self.postgres.attempt_limit();
            if attempt >= watchdog {
                return Err(invalid(
                    "postgres.statement_timeout",
                    format!(
                        "{}s plus postgres.connect_timeout ({}s) and {}s of slack must stay below the systemd watchdog (WatchdogSec={}s); lower them or raise WatchdogSec",
                        self.postgres.statement_timeout.as_secs_f64(),
                        self.postgres.connect_timeout.as_secs_f64(),
                        self.postgres.statement_slack().as_secs_f64(),
                        watchdog.as_secs_f64()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.amqp.url = c.amqp.url.map(redact_url);
        c.postgres.url = redact_url(&c.postgres.url);
        c.postgres.owner_url = c.postgres.owner_url.as_ref().map(redact_url);
        c
    }
}

impl DaemonConfig for ProducerConfig {
    const ENV_PREFIX: &'static str = "PRODUCER_";

    fn check_secrets(&self) -> Result<(), ConfigError> {
        self.amqp.password()?;
        self.amqp.check_tls_files()?;
        self.metrics.web().map(|_| ())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_common(&self.amqp, &self.retry, &self.log)?;
        let sim = &self.simulation;
        if sim.stations == 0 || sim.stations > 999_999 {
            return Err(invalid(
                "simulation.stations",
                "must be between 1 and 999999",
            ));
        }
        if sim.interval.is_zero() {
            return Err(invalid("simulation.interval", "must be above zero"));
        }
        if let Some(r) = sim.rate {
            if !r.is_finite() || r < 0.0 {
                return Err(invalid(
                    "simulation.rate",
                    format!("{r} is not a rate >= 0"),
                ));
            }
        }
        if sim.confirm_window == 0 {
            return Err(invalid("simulation.confirm_window", "must be at least 1"));
        }
        Ok(())
    }

    fn log(&self) -> &LogConfig {
        &self.log
    }

    fn redacted(&self) -> Self {
        let mut c = self.clone();
        c.amqp.url = c.amqp.url.map(redact_url);
        c
    }
}

/// Defaults, then the TOML file at `path` (which must exist if given), then the environment.
pub fn load<C: DaemonConfig>(path: Option<&Path>) -> Result<C, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(path) = path {
        figment = figment.merge(Toml::file_exact(path));
    }
    let config: C = figment
        .merge(Env::prefixed(C::ENV_PREFIX).split("__"))
        .extract()
        .map_err(|e| ConfigError::Parse(Box::new(e)))?;
    config.validate()?;
    Ok(config)
}

/// Effective config as TOML with passwords redacted, for `--check-config`.
pub fn render<C: DaemonConfig>(config: &C) -> String {
    toml::to_string(&config.redacted()).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

/// A password and where it came from.
pub type Password = Option<(Secret, SecretSource)>;

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

/// The TLS files a PostgreSQL URL names can be read and used (at start: a configuration error).
fn check_pg_tls_files(key: &'static str, url: &Url) -> Result<(), ConfigError> {
    let (_, client) = crate::db::tls_client(url).map_err(|e| invalid(key, e))?;
    client.config().map_err(|e| invalid(key, e.to_string()))?;
    Ok(())
}

impl AmqpConfig {
    /// With `amqps://`, the CA, certificate and key files can be read and used.
    pub fn check_tls_files(&self) -> Result<(), ConfigError> {
        for (i, url) in self.url.iter().enumerate() {
            let describe = |e| invalid("amqp.url", self.url.describe(i, e));
            if let Some(client) = crate::amqp::tls_client(url).map_err(describe)? {
                client
                    .config
                    .config()
                    .map_err(|e| describe(e.to_string()))?;
            }
        }
        Ok(())
    }

    pub fn password(&self) -> Result<Password, ConfigError> {
        let dir = credentials_dir();
        Ok(secret::load(
            "amqp.password_file",
            self.password_file.as_deref(),
            "amqp-password",
            dir.as_deref(),
        )?)
    }

    /// The brokers lapin connects to, in order, each URI with the password filled in.
    pub fn brokers(&self, password: Option<&Secret>) -> crate::broker::Brokers {
        crate::broker::Brokers::new(
            self.url
                .iter()
                .map(|url| {
                    // The url crate knows no default port for amqp(s); lapin's are 5672 and 5671.
                    let port = url.port().unwrap_or(match url.scheme() {
                        "amqps" => 5671,
                        _ => 5672,
                    });
                    let address = format!("{}:{port}", url.host_str().unwrap_or_default());
                    (
                        address,
                        Secret::new(with_password(url, password).to_string()),
                    )
                })
                .collect(),
        )
    }
}

impl PostgresConfig {
    pub fn password(&self) -> Result<Password, ConfigError> {
        let dir = credentials_dir();
        Ok(secret::load(
            "postgres.password_file",
            self.password_file.as_deref(),
            "postgres-password",
            dir.as_deref(),
        )?)
    }

    /// The owner's URL and password, for `consumer migrate`: `owner_url` and its password, or
    /// `url` and the consumer's own password.
    pub fn owner(&self) -> Result<(Url, Password), ConfigError> {
        let Some(url) = &self.owner_url else {
            return Ok((self.url.clone(), self.password()?));
        };
        let dir = credentials_dir();
        let password = secret::load(
            "postgres.owner_password_file",
            self.owner_password_file.as_deref(),
            "postgres-owner-password",
            dir.as_deref(),
        )?;
        Ok((url.clone(), password))
    }

    /// The role the consumer logs in as, as tokio-postgres reads the URL (its user, or a `user`
    /// parameter, which wins). `None` when it names neither (libpq then takes the operating
    /// system user's name).
    pub fn role(&self) -> Option<String> {
        // tokio-postgres knows neither libpq's file parameters nor sslmode's verify-*: the URL
        // it reads is the one the TLS client leaves.
        let (url, _) = crate::db::tls_client(&self.url).ok()?;
        let pg: tokio_postgres::Config = url.as_str().parse().ok()?;
        pg.get_user().map(str::to_owned)
    }
}

fn with_password(url: &Url, password: Option<&Secret>) -> Url {
    let mut url = url.clone();
    if let Some(p) = password {
        // Fails only for URLs without a host, which validation rejects.
        let _ = url.set_password(Some(p.expose()));
    }
    url
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid_and_match_the_older_system() {
        let c = ConsumerConfig::default();
        c.validate().unwrap();
        ProducerConfig::default().validate().unwrap();
        assert_eq!(c.amqp.exchange.as_str(), "weather");
        assert_eq!(c.amqp.queue.as_str(), "weather_queue");
        assert_eq!(c.amqp.routing_key.as_str(), "weather_key");
        assert_eq!(
            c.amqp.url.first().as_str(),
            "amqp://guest@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            c.postgres.url.as_str(),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
    }

    #[test]
    fn file_then_env_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[amqp]\nprefetch = 3000\nqueue = \"q1\"\n[batch]\nmax_wait = \"50ms\"\n",
            )?;
            jail.set_env("CONSUMER_AMQP__QUEUE", "from_env");
            let c: ConsumerConfig = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.amqp.prefetch, 3000);
            assert_eq!(c.amqp.queue.as_str(), "from_env");
            assert_eq!(c.batch.max_wait, Duration::from_millis(50));
            assert_eq!(c.batch.max_size, 500);
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_named() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[amqp]\nprefetchh = 3\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(e.to_string().contains("prefetchh"), "{e}");
            Ok(())
        });
    }

    /// Each TLS parameter that cannot be honoured is refused at start, by name, and never
    /// silently dropped (which would connect in plain text or unverified).
    #[test]
    fn tls_parameters_that_cannot_be_honoured_are_refused_by_name() {
        let amqp = [
            ("amqps://h/%2f", "cacertfile"),
            (
                "amqps://h/%2f?cacertfile=/ca&verify=verify_none",
                "verify=verify_none",
            ),
            ("amqps://h/%2f?cacertfile=/ca&certfile=/c", "keyfile"),
            ("amqps://h/%2f?cacertfile=/ca&keyfile=/k", "certfile"),
            ("amqps://h/%2f?cacertfile=/ca&password=x", "password"),
            (
                "amqps://h/%2f?cacertfile=/ca&server_name_indication=disable",
                "server_name_indication",
            ),
            (
                "amqps://h/%2f?cacertfile=/ca&auth_mechanism=external",
                "auth_mechanism=external",
            ),
            ("amqp://h/%2f?cacertfile=/ca", "cacertfile"),
            ("amqp://h/%2f?auth_mechanism=external", "amqps"),
            (
                "amqps://h/%2f?cacertfile=/ca&auth_mechanism=external&auth_mechanism=plain",
                "twice",
            ),
        ];
        for (url, named) in amqp {
            let e = crate::amqp::tls_client(&Url::parse(url).unwrap()).unwrap_err();
            assert!(e.contains(named), "{url}: {e}");
        }
        let ok = crate::amqp::tls_client(
            &Url::parse("amqps://u@[::1]:5671/%2f?cacertfile=/ca&verify=verify_peer").unwrap(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (ok.server_name.as_str(), ok.config.verify),
            ("::1", crate::tls::Verify::Full)
        );
        assert!(
            crate::amqp::tls_client(&Url::parse("amqp://h/%2f?heartbeat=5").unwrap())
                .unwrap()
                .is_none()
        );

        let pg = [
            ("postgres://h/db?sslmode=allow", "sslmode=allow"),
            ("postgres://h/db?sslmode=verify-full", "sslrootcert"),
            ("postgres://h/db?sslmode=verify-ca", "sslrootcert"),
            ("postgres://h/db?sslmode=require&sslcert=/c", "sslkey"),
            (
                "postgres://h/db?sslrootcert=system&sslmode=verify-full",
                "sslrootcert=system",
            ),
            ("postgres://h/db?sslpassword=x", "sslpassword"),
            (
                "postgres://h/db?sslnegotiation=direct&sslmode=require",
                "sslnegotiation=direct",
            ),
            ("postgres://h/db?sslmode=require&sslmode=disable", "twice"),
        ];
        for (url, named) in pg {
            let e = crate::db::tls_client(&Url::parse(url).unwrap()).unwrap_err();
            assert!(e.contains(named), "{url}: {e}");
        }
        use crate::tls::Verify;
        for (url, verify, passed_on) in [
            ("postgres://h/db", Verify::Nothing, "sslmode=prefer"),
            (
                "postgres://h/db?sslmode=disable",
                Verify::Nothing,
                "sslmode=disable",
            ),
            (
                "postgres:///db?host=/run/postgresql&sslmode=require",
                Verify::Nothing,
                "host=/run/postgresql&sslmode=disable",
            ),
            // A TCP address beside the socket, or a host tokio-postgres finds where the URL
            // parser sees a path: TLS as asked, never turned off.
            (
                "postgres:///db?host=/run/postgresql&hostaddr=10.0.0.5&sslmode=verify-full&sslrootcert=/ca",
                Verify::Full,
                "host=/run/postgresql&hostaddr=10.0.0.5&sslmode=require",
            ),
            (
                "postgres:///we@ther?host=/run/postgresql&sslmode=verify-full&sslrootcert=/ca",
                Verify::Full,
                "host=/run/postgresql&sslmode=require",
            ),
            // Other parameters pass as written (`+` is not a space to libpq).
            (
                "postgres://h/db?application_name=a+b&user=w%20x&sslmode=require",
                Verify::Nothing,
                "application_name=a+b&user=w%20x&sslmode=require",
            ),
            (
                "postgres://h/db?sslmode=require",
                Verify::Nothing,
                "sslmode=require",
            ),
            (
                "postgres://h/db?sslmode=require&sslrootcert=/ca",
                Verify::Chain,
                "sslmode=require",
            ),
            (
                "postgres://h/db?sslmode=verify-ca&sslrootcert=/ca",
                Verify::Chain,
                "sslmode=require",
            ),
            (
                "postgres://h/db?sslmode=verify-full&sslrootcert=/ca&application_name=x",
                Verify::Full,
                "application_name=x&sslmode=require",
            ),
        ] {
            let (out, client) = crate::db::tls_client(&Url::parse(url).unwrap()).unwrap();
            assert_eq!(client.verify, verify, "{url}");
            assert_eq!(out.query(), Some(passed_on), "{url}");
        }
        // The role is read past the parameters tokio-postgres does not know.
        let pg = PostgresConfig {
            url: Url::parse(
                "postgres://w@h/db?sslmode=verify-full&sslrootcert=/ca&sslcert=/c&sslkey=/k",
            )
            .unwrap(),
            ..PostgresConfig::default()
        };
        assert_eq!(pg.role().as_deref(), Some("w"));
    }

    #[test]
    fn bad_values_are_named() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[amqp]\nprefetch = \"many\"\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(e.to_string().contains("prefetch"), "{e}");
            jail.create_file("c.toml", "[batch]\nmax_size = 5000\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(e.to_string().contains("batch.max_size"), "{e}");
            jail.create_file("c.toml", "[postgres]\nurl = \"mysql://x@h/db\"\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(e.to_string().contains("postgres.url"), "{e}");
            jail.create_file("c.toml", "[postgres]\nschema = \"x; drop\"\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(e.to_string().contains("schema"), "{e}");
            jail.create_file("c.toml", "[amqp]\nurl = \"amqps://broker/%2f\"\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(
                e.to_string().contains("amqp.url") && e.to_string().contains("cacertfile"),
                "{e}"
            );
            jail.create_file("c.toml", "[log]\nlevel = \"info,lapin=loud\"\n")?;
            let e = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            assert!(e.to_string().contains("log.level"), "{e}");
            jail.create_file("p.toml", "[simulation]\nrate = -1.0\n")?;
            let e = load::<ProducerConfig>(Some(Path::new("p.toml"))).unwrap_err();
            assert!(e.to_string().contains("simulation.rate"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn missing_file_is_an_error() {
        Jail::expect_with(|_| {
            assert!(load::<ConsumerConfig>(Some(Path::new("absent.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn postgres_url_may_name_a_unix_socket_instead_of_a_host() {
        let mut c = ConsumerConfig::default();
        c.postgres.url = Url::parse("postgres:///weather?host=/run/postgresql").unwrap();
        c.validate().unwrap();
        c.postgres.url = Url::parse("postgres:///weather").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("postgres.url"));
        c.amqp.url = Url::parse("amqp:///%2f?host=/run/rabbitmq").unwrap().into();
        c.postgres.url = Url::parse("postgres:///weather?host=/run/postgresql").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("amqp.url"));
    }

    #[test]
    fn rendered_config_hides_inline_passwords() {
        let mut c = ConsumerConfig::default();
        c.amqp.url = Url::parse("amqp://u:topsecret@h:5672/%2f").unwrap().into();
        c.postgres.url = Url::parse("postgres://u:topsecret@h/db").unwrap();
        let text = render(&c);
        assert!(!text.contains("topsecret"), "{text}");
        assert!(text.contains("REDACTED"), "{text}");
        c.postgres.url =
            Url::parse("postgres://u@h/db?sslmode=disable&Password=topsecret&host=h").unwrap();
        let text = render(&c);
        assert!(!text.contains("topsecret"), "{text}");
        assert!(
            text.contains("sslmode=disable&Password=REDACTED&host=h"),
            "{text}"
        );
    }

    #[test]
    fn a_url_that_does_not_parse_is_not_echoed() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[postgres]\nurl = \"postgres://u:topsecret@[::1/db\"\n",
            )?;
            let err = load::<ConsumerConfig>(Some(Path::new("c.toml"))).unwrap_err();
            let text = err.to_string();
            assert!(!text.contains("topsecret"), "{text}");
            assert!(text.contains("postgres.url"), "{text}");
            assert!(text.contains("not a valid URL"), "{text}");
            // A line that is not TOML at all is not quoted either, only placed.
            jail.create_file(
                "d.toml",
                "[postgres]\nurl = \"postgres://u:topsecret@h/db\n",
            )?;
            let text = load::<ConsumerConfig>(Some(Path::new("d.toml")))
                .unwrap_err()
                .to_string();
            assert!(!text.contains("topsecret"), "{text}");
            assert!(text.contains("line 2"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn a_fragment_in_a_url_is_refused_not_half_redacted() {
        let mut c = ConsumerConfig::default();
        c.postgres.url = Url::parse("postgres://u@h/db?password=ab#cd").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("postgres.url") && e.contains("%23"), "{e}");
    }

    #[test]
    fn the_role_is_the_one_tokio_postgres_logs_in_as() {
        let mut c = PostgresConfig::default();
        for (url, role) in [
            ("postgres://a@h/db", Some("a")),
            ("postgres://a@h/db?user=b", Some("b")),
            ("postgres:///db?host=/run/postgresql&user=w+x", Some("w+x")),
            ("postgres://h/db", None),
        ] {
            c.url = Url::parse(url).unwrap();
            assert_eq!(c.role().as_deref(), role, "{url}");
        }
    }

    #[test]
    fn brokers_fill_in_the_password() {
        let c = AmqpConfig::default();
        let mut brokers = c.brokers(Some(&Secret::new("p@ss")));
        let (address, uri) = brokers.advance().unwrap();
        assert_eq!(address, "127.0.0.1:5672");
        assert_eq!(uri.expose(), "amqp://guest:p%40ss@127.0.0.1:5672/%2f");
    }

    #[test]
    fn amqp_url_takes_a_list_of_brokers_tried_in_turn() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"[amqp]
url = ["amqp://u:topsecret@rabbit1/%2f", "amqps://u@[2001:db8::2]:5671/%2f?cacertfile=/ca.pem", "amqp://u@rabbit3:5673/%2f"]
"#,
            )?;
            let c: ConsumerConfig = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.amqp.url.len(), 3);
            let mut brokers = c.amqp.brokers(Some(&Secret::new("pw")));
            let order: Vec<String> = (0..4)
                .map(|_| brokers.advance().unwrap().0.to_owned())
                .collect();
            assert_eq!(
                order,
                [
                    "rabbit1:5672",
                    "[2001:db8::2]:5671",
                    "rabbit3:5673",
                    "rabbit1:5672"
                ]
            );
            // Rendered back as a list, each password redacted.
            let text = render(&c);
            assert!(!text.contains("topsecret"), "{text}");
            assert!(
                text.contains("url = [\"amqp://u:REDACTED@rabbit1/%2f\""),
                "{text}"
            );
            // One URL stays a string.
            assert!(render(&ConsumerConfig::default()).contains("url = \"amqp://guest@"));
            Ok(())
        });
    }

    #[test]
    fn a_bad_broker_in_the_list_is_named_by_its_place() {
        Jail::expect_with(|jail| {
            for (list, expected) in [
                (
                    r#"["amqp://a/%2f", "http://b/"]"#,
                    "entry 1 (counting from 0): scheme `http`",
                ),
                (
                    r#"["amqp://a/%2f", "amqps://b/%2f?verify=verify_none"]"#,
                    "entry 1 (counting from 0):",
                ),
                ("[]", "an empty list"),
                (r#"["amqp://a/%2f", "not a url"]"#, "not a valid URL"),
            ] {
                jail.create_file("c.toml", &format!("[amqp]\nurl = {list}\n"))?;
                let e = load::<ConsumerConfig>(Some(Path::new("c.toml")))
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains("amqp.url") && e.contains(expected),
                    "{list}: {e}"
                );
            }
            Ok(())
        });
    }
}
