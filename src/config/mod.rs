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

mod amqp;
mod postgres;
mod sections;
mod urls;

pub use self::amqp::{AmqpConfig, AmqpName, BrokerUrls, QueueType};
pub use self::postgres::{Identifier, PostgresConfig};
pub use self::sections::{
    BatchConfig, LogConfig, LogFormat, MetricsConfig, RetryConfig, SimulationConfig,
    StationsConfig, ValidationConfig,
};
use self::urls::{
    check_url, local_url, quiet_url, quiet_url_opt, redact_url, validate_url, with_password,
};

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

impl DaemonConfig for ConsumerConfig {
    const ENV_PREFIX: &'static str = "CONSUMER_";

    fn check_secrets(&self) -> Result<(), ConfigError> {
        self.amqp.password()?;
        self.amqp.check_tls_files()?;
        self.metrics.web()?;
        self.postgres.password()?;
        self.postgres.check_tls_files()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.retry.validate()?;
        self.log.validate()?;
        self.postgres.validate()?;
        self.stations.validate()?;
        self.batch.validate(self.amqp.prefetch)?;
        self.validation.validate()?;
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
        self.amqp.validate()?;
        self.retry.validate()?;
        self.log.validate()?;
        self.simulation.validate()
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
