//! `[postgres]`: the database URL (libpq's TLS and host-list parameters), the schema, timeouts,
//! and the roles' passwords.

use super::*;

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
    /// How long readings are kept, by `measured_at` (`"400d"`): `consumer maintain` drops each
    /// daily partition once its whole day is older. At least one day. Unset: kept for ever.
    /// Readings that arrive for a day already dropped are stored in `weather_logs_expired`,
    /// emptied at the next run.
    #[serde(
        default,
        deserialize_with = "humantime_serde::deserialize",
        serialize_with = "in_days",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
}

/// A retention as written, in whole days (`"400d"`), not as humantime prints it (`"1year 1month
/// 4days 7h 26m 24s"`, with years of 365.25 days); any other length as humantime prints it.
fn in_days<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) if d.as_secs() % 86_400 == 0 && d.subsec_nanos() == 0 => {
            s.serialize_str(&format!("{}d", d.as_secs() / 86_400))
        }
        d => humantime_serde::serialize(d, s),
    }
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
            retention: None,
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

/// The TLS files a PostgreSQL URL names can be read and used (at start: a configuration error).
fn check_pg_tls_files(key: &'static str, url: &Url) -> Result<(), ConfigError> {
    let (_, client) = crate::db::tls_client(url).map_err(|e| invalid(key, e))?;
    client.config().map_err(|e| invalid(key, e.to_string()))?;
    Ok(())
}

impl PostgresConfig {
    /// The URLs: scheme, host (or `host=` in the query), TLS parameters, and host, port and
    /// `hostaddr` counts that agree.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        validate_url("postgres.url", &self.url, &["postgres", "postgresql"])?;
        crate::db::check_host_counts(&self.url).map_err(|e| invalid("postgres.url", e))?;
        if let Some(url) = &self.owner_url {
            validate_url("postgres.owner_url", url, &["postgres", "postgresql"])?;
            crate::db::check_host_counts(url).map_err(|e| invalid("postgres.owner_url", e))?;
        }
        if self
            .retention
            .is_some_and(|r| r < Duration::from_secs(86_400))
        {
            return Err(invalid(
                "postgres.retention",
                "must be at least 1d (partitions are days)",
            ));
        }
        Ok(())
    }

    /// The TLS files the URLs name can be read and used (at start: a configuration error).
    pub(super) fn check_tls_files(&self) -> Result<(), ConfigError> {
        check_pg_tls_files("postgres.url", &self.url)?;
        if let Some(url) = &self.owner_url {
            check_pg_tls_files("postgres.owner_url", url)?;
        }
        Ok(())
    }

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
