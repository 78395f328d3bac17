//! PostgreSQL: connect, apply `sql/` migrations, insert batches idempotently.

use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};
use tracing::{debug, info, warn};

use crate::config::PostgresConfig;
use crate::reading::Reading;
use crate::secret::Secret;

/// The files in `sql/`, applied in this order, each once, recorded in `schema_migrations`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_weather_logs",
        include_str!("../sql/0001_weather_logs.sql"),
    ),
    (
        "0002_weather_logs_station_index",
        include_str!("../sql/0002_weather_logs_station_index.sql"),
    ),
    (
        "0003_weather_logs_conflicts",
        include_str!("../sql/0003_weather_logs_conflicts.sql"),
    ),
    (
        "0004_weather_logs_partitions",
        include_str!("../sql/0004_weather_logs_partitions.sql"),
    ),
];

/// The stored readings among the given ones whose `message_id` a different reading holds.
const CONFLICTS: &str = "SELECT * FROM weather_logs_conflicts\
    ($1::uuid[], $2::text[], $3::float8[], $4::float8[], $5::float8[], $6::timestamptz[])";

/// What the consumer's role is granted by `consumer migrate` when it is not the owner: enough to
/// check the migrations, insert, and ask for conflicts. Of `weather_logs` it may read no column
/// (`ON CONFLICT DO NOTHING` without a conflict target needs none); earlier versions granted
/// SELECT on `message_id` for `ON CONFLICT (message_id)`, which is revoked, from the table that
/// became the default partition too. No UPDATE, DELETE, TRUNCATE or DDL. `{schema}` and `{role}`
/// are quoted identifiers. One implicit transaction (one simple query).
const WRITER_GRANTS: &str = "GRANT USAGE ON SCHEMA {schema} TO {role};
    GRANT INSERT ON weather_logs TO {role};
    REVOKE SELECT (message_id) ON weather_logs FROM {role};
    DO $$ BEGIN
        IF to_regclass('weather_logs_default') IS NOT NULL THEN
            REVOKE SELECT (message_id) ON weather_logs_default FROM {role};
        END IF;
    END $$;
    GRANT SELECT ON schema_migrations TO {role};
    GRANT EXECUTE ON FUNCTION weather_logs_conflicts
        (uuid[], text[], float8[], float8[], float8[], timestamptz[]) TO {role};";

/// Serialises concurrent migrations of one schema across consumers: the advisory lock
/// `(MIGRATION_LOCK, hashtext(schema))` (any 32-bit constant unique to us).
pub const MIGRATION_LOCK: i32 = 0x5349_5354;

/// Inserts a batch that should hold only new readings: a plain insert, the fast path.
const INSERT_NEW: &str = "INSERT INTO weather_logs \
    (message_id, station_id, temperature, humidity, pressure, measured_at) \
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::float8[], $4::float8[], $5::float8[], $6::timestamptz[])";

/// Inserts a batch that may hold readings already stored, skipping those. The speculative
/// insertion behind ON CONFLICT costs PostgreSQL about half as much again per row, so it is kept
/// for redeliveries and for batches the fast path refused. No conflict target: every unique
/// index of the partition a row goes to is its arbiter, which is `(message_id, measured_at)` on
/// a partitioned table ([`crate::partition`]) and `message_id` on one not converted yet.
const INSERT_SKIPPING: &str = "INSERT INTO weather_logs \
    (message_id, station_id, temperature, humidity, pressure, measured_at) \
    SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::float8[], $4::float8[], $5::float8[], $6::timestamptz[]) \
    ON CONFLICT DO NOTHING";

/// The insert's columns with their PostgreSQL types, in parameter order.
pub const COLUMNS: [(&str, Type); 6] = [
    ("message_id", Type::UUID),
    ("station_id", Type::TEXT),
    ("temperature", Type::FLOAT8),
    ("humidity", Type::FLOAT8),
    ("pressure", Type::FLOAT8),
    ("measured_at", Type::TIMESTAMPTZ),
];

/// Encodes one reading's parameters exactly as the insert sends them (each element of the
/// insert's arrays goes through the same `ToSql`), without sending anything. `Err` names the
/// column that cannot be encoded. [`crate::reading::decode`] calls it, so that nothing it accepts
/// can fail, or panic, on its way to PostgreSQL.
pub fn encode(r: &Reading, buf: &mut bytes::BytesMut) -> Result<(), (&'static str, String)> {
    let values: [&(dyn ToSql + Sync); 6] = [
        &r.message_id,
        &r.station_id,
        &r.temperature,
        &r.humidity,
        &r.pressure,
        &r.measured_at,
    ];
    for ((column, ty), value) in COLUMNS.iter().zip(values) {
        buf.clear();
        value
            .to_sql_checked(ty, buf)
            .map_err(|e| (*column, e.to_string()))?;
    }
    Ok(())
}

/// A batch as the six arrays of [`COLUMNS`], the parameters of the insert and of the conflicts
/// query.
struct Columns<'a> {
    ids: Vec<uuid::Uuid>,
    stations: Vec<&'a str>,
    temperatures: Vec<f64>,
    humidities: Vec<f64>,
    pressures: Vec<f64>,
    measured: Vec<Option<time::OffsetDateTime>>,
}

impl<'a> Columns<'a> {
    fn of(rows: &'a [Reading]) -> Self {
        Self {
            ids: rows.iter().map(|r| r.message_id).collect(),
            stations: rows.iter().map(|r| r.station_id.as_str()).collect(),
            temperatures: rows.iter().map(|r| r.temperature).collect(),
            humidities: rows.iter().map(|r| r.humidity).collect(),
            pressures: rows.iter().map(|r| r.pressure).collect(),
            measured: rows.iter().map(|r| r.measured_at).collect(),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.ids,
            &self.stations,
            &self.temperatures,
            &self.humidities,
            &self.pressures,
            &self.measured,
        ]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}: no answer within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("invalid postgres.url: {0}")]
    Config(#[source] tokio_postgres::Error),
    /// The URL's TLS parameters, or a file they name, cannot be used.
    #[error("invalid postgres.url: {0}")]
    TlsConfig(String),
    #[error("{context}: {}", describe(source))]
    Postgres {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// PostgreSQL refused every reading of a batch, and a reading it accepted before as well:
    /// the fault is the table's (a new NOT NULL column, a CHECK or trigger that refuses
    /// everything, a column too narrow), not the readings'. They are held and retried, not
    /// dead-lettered.
    #[error("PostgreSQL refuses every reading, even one it accepted before: {0}")]
    Systematic(#[source] Box<DbError>),
    /// `consumer migrate` granted the consumer's role what it needs, but it holds more, which
    /// a grant cannot take back: CREATE in the schema, or objects of its own there.
    #[error("{0}")]
    Unsafe(String),
    /// The conversion to partitions (or their maintenance) cannot go on; says what to do.
    #[error("{0}")]
    Conversion(String),
    /// `postgres.migrate = false`, and migrations are missing: `consumer migrate` has not run.
    #[error("schema `{schema}` lacks migrations {missing:?}; run `consumer migrate` (postgres.migrate = false)")]
    NotMigrated {
        schema: String,
        missing: Vec<&'static str>,
    },
}

impl DbError {
    pub(crate) fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DbError {
        move |source| DbError::Postgres { context, source }
    }

    /// PostgreSQL refused the rows themselves (SQLSTATE class 22 or 23, or an exception raised
    /// by a trigger, class P0): perhaps one row, perhaps all of them; see
    /// [`Db::insert_isolating`].
    pub fn is_data_error(&self) -> bool {
        match self {
            DbError::Postgres { source, .. } => source.code().is_some_and(is_data_state),
            DbError::Config(_)
            | DbError::TlsConfig(_)
            | DbError::Timeout(..)
            | DbError::Systematic(_)
            | DbError::Unsafe(_)
            | DbError::Conversion(_)
            | DbError::NotMigrated { .. } => false,
        }
    }

    /// Every value [`DbError::error_type`] can take (the label values of
    /// `postgres_insert_errors_total`, exported at 0 from the start).
    pub const ERROR_TYPES: [&'static str; 15] = [
        "config",
        "tls",
        "timeout",
        "refused_all",
        "migration_pending",
        "unsafe_privileges",
        "data_rejected",
        "connection",
        "server_shutdown",
        "authentication",
        "missing_database",
        "permission_denied",
        "disk_full",
        "migration_failed",
        "query_failed",
    ];

    /// The `error_type` of logs (journal field `ERROR_TYPE`) and of `postgres_insert_errors_total`:
    /// one of [`DbError::ERROR_TYPES`].
    pub fn error_type(&self) -> &'static str {
        match self {
            DbError::Config(_) | DbError::TlsConfig(_) => "config",
            DbError::Timeout(..) => "timeout",
            DbError::Systematic(_) => "refused_all",
            DbError::NotMigrated { .. } => "migration_pending",
            DbError::Unsafe(_) => "unsafe_privileges",
            DbError::Conversion(_) => "migration_failed",
            DbError::Postgres { context, source } => match source.code() {
                Some(c) if is_data_state(c) => "data_rejected",
                Some(c) if c.code().starts_with("08") => "connection",
                Some(&SqlState::QUERY_CANCELED) => "timeout",
                Some(c) if c.code().starts_with("57") => "server_shutdown",
                Some(c) if c.code().starts_with("28") => "authentication",
                Some(&SqlState::INVALID_CATALOG_NAME) => "missing_database",
                Some(&SqlState::INSUFFICIENT_PRIVILEGE) => "permission_denied",
                Some(&SqlState::DISK_FULL) => "disk_full",
                Some(_) if context.contains("migration") || context.contains("schema") => {
                    "migration_failed"
                }
                Some(_) => "query_failed",
                None if crate::tls::failed_check(source).is_some() => "tls",
                None => "connection",
            },
        }
    }

    /// PostgreSQL is away (down, restarting, unreachable, too slow): waiting is the cure. Any
    /// other error (authentication, a missing database or privilege, a broken migration) is
    /// retried too, since it may be fixed while we wait (NixOS creates roles after our unit
    /// starts), but it is logged as an error and named in the status line.
    pub fn is_outage(&self) -> bool {
        matches!(
            self.error_type(),
            "connection" | "timeout" | "server_shutdown"
        )
    }

    /// What is wrong, for the status line: the cause first, then the error.
    pub fn problem(&self) -> String {
        let cause = match self.error_type() {
            "authentication" => "PostgreSQL refused our credentials",
            "missing_database" => "the database does not exist",
            "permission_denied" => "missing privileges in PostgreSQL",
            "migration_failed" => "a schema migration failed",
            "config" => "postgres.url is invalid",
            "tls" => "TLS to PostgreSQL failed",
            "refused_all" => "PostgreSQL refuses every reading (a change to weather_logs?)",
            "migration_pending" => "the schema is not migrated",
            "disk_full" => "PostgreSQL's disk is full",
            "data_rejected" | "query_failed" => "PostgreSQL refused the insert",
            _ => "database unavailable",
        };
        format!("{cause}: {self}")
    }
}

/// The server's own message where there is one ("db error" alone says nothing), else the error
/// and its cause (I/O errors carry theirs as the source).
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    if let Some(check) = crate::tls::failed_check(e) {
        return match std::error::Error::source(e) {
            Some(cause) => format!("{check} ({cause})"),
            None => check.to_owned(),
        };
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn is_data_state(code: &SqlState) -> bool {
    ["22", "23", "P0"]
        .iter()
        .any(|c| code.code().starts_with(c))
}

/// One connection with the insert statements prepared.
pub struct Db {
    client: Client,
    insert_new: Statement,
    insert_skipping: Statement,
    /// Client-side bound on one insert: [`PostgresConfig::statement_limit`].
    insert_timeout: Duration,
}

/// Result of [`Db::insert_isolating`].
#[derive(Debug, Default)]
pub struct Stored {
    /// New rows; the rest of the accepted ones were already there (redeliveries).
    pub inserted: u64,
    /// Indexes into the batch of rows PostgreSQL refused, with its message.
    pub rejected: Vec<(usize, String)>,
    /// Ids of accepted readings that were not stored because a *different* reading holds their id
    /// (the stored one is kept): not redeliveries, but a publisher reusing an id.
    pub conflicting: Vec<uuid::Uuid>,
}

impl Db {
    /// Connects, applies pending migrations and prepares the insert, within
    /// [`PostgresConfig::attempt_limit`] in all: a server that accepts the connection and then
    /// goes silent fails the attempt instead of hanging it.
    pub async fn connect(cfg: &PostgresConfig, password: Option<&Secret>) -> Result<Self, DbError> {
        let limit = cfg.attempt_limit();
        match tokio::time::timeout(limit, Self::connect_unbounded(cfg, password)).await {
            Ok(result) => result,
            Err(_) => Err(DbError::Timeout("connect and migrate", limit)),
        }
    }

    async fn connect_unbounded(
        cfg: &PostgresConfig,
        password: Option<&Secret>,
    ) -> Result<Self, DbError> {
        let mut client = session(cfg, &cfg.url, password).await?;
        match cfg.migrate {
            true => migrate(&mut client, cfg.schema.as_str()).await?,
            false => check_migrated(&client, cfg.schema.as_str()).await?,
        }
        if !crate::partition::is_partitioned(&client).await? {
            warn!(
                message = "weather_logs is not partitioned (yet): retention cannot drop old readings. `consumer maintain` (or `consumer migrate`) converts it while this consumer goes on writing (docs/operations.md, \"Retention\").",
                schema = cfg.schema.as_str()
            );
        }
        let insert_new = client
            .prepare(INSERT_NEW)
            .await
            .map_err(DbError::pg("prepare insert"))?;
        let insert_skipping = client
            .prepare(INSERT_SKIPPING)
            .await
            .map_err(DbError::pg("prepare insert"))?;
        let insert_timeout = cfg.statement_limit();
        Ok(Self {
            client,
            insert_new,
            insert_skipping,
            insert_timeout,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// One multi-row INSERT (its own transaction). With `skip_existing`, rows already stored are
    /// skipped; without, one such row fails the whole statement with a unique violation.
    pub async fn insert(&self, rows: &[Reading], skip_existing: bool) -> Result<u64, DbError> {
        let columns = Columns::of(rows);
        let params = columns.params();
        let statement = if skip_existing {
            &self.insert_skipping
        } else {
            &self.insert_new
        };
        self.bounded("insert batch", self.client.execute(statement, &params))
            .await
    }

    /// Inserts `rows`, skipping those already stored; if PostgreSQL refuses the data, splits the
    /// batch in halves until the refused rows are alone, and stores all the others. Any other
    /// error is returned as is: the caller retries the whole batch, which is safe because the
    /// insert is idempotent.
    ///
    /// A refusal of one row is the row's fault; a refusal of every row may be the table's. So
    /// when the whole batch is refused, each of `references` (readings PostgreSQL accepted
    /// before: the last one stored, and a built-in one) is inserted with a fresh id and the time
    /// now as `measured_at` (a refusal by time, as when the current month's partition is
    /// missing, must show) in a transaction that is rolled back. If one is accepted, the readings
    /// are at fault: the batch is split in halves until the refused rows are alone. If all are
    /// refused, the table may be; but the references may share the batch's fault (a rule that
    /// refuses a station, or a value the last reading had), so the first two halves are tried:
    /// one accepted, the split goes on; both refused, or a batch of one, the fault is systematic
    /// ([`DbError::Systematic`]) and nothing is dead-lettered.
    ///
    /// Unless `maybe_stored` (some message was redelivered), a plain insert is tried first; a
    /// unique violation or refused row there falls back to the skipping insert. Every statement
    /// is bounded; the split as a whole is not (up to two per row), so each statement counts as
    /// `progress` for the watchdog.
    pub async fn insert_isolating(
        &self,
        rows: &[Reading],
        maybe_stored: bool,
        references: &[&Reading],
        progress: impl Fn(),
    ) -> Result<Stored, DbError> {
        let mut stored = self
            .isolate(rows, maybe_stored, references, &progress)
            .await?;
        if stored.inserted + (stored.rejected.len() as u64) < rows.len() as u64 {
            progress();
            let accepted: Vec<Reading> = (0..rows.len())
                .filter(|i| !stored.rejected.iter().any(|(r, _)| r == i))
                .map(|i| rows[i].clone())
                .collect();
            // The rows are stored: a failure here only leaves the conflicts uncounted.
            match self.conflicts(&accepted).await {
                Ok(ids) => stored.conflicting = ids,
                Err(e) => {
                    warn!(message = "Cannot tell duplicates from conflicting ids; all counted as duplicates.", error = %e, error_type = e.error_type());
                }
            }
        }
        Ok(stored)
    }

    /// Of `rows`, those whose id a different stored reading holds.
    async fn conflicts(&self, rows: &[Reading]) -> Result<Vec<uuid::Uuid>, DbError> {
        let columns = Columns::of(rows);
        let params = columns.params();
        let found = self
            .bounded(
                "look for conflicting ids",
                self.client.query(CONFLICTS, &params),
            )
            .await?;
        Ok(found.iter().map(|r| r.get(0)).collect())
    }

    async fn isolate(
        &self,
        rows: &[Reading],
        maybe_stored: bool,
        references: &[&Reading],
        progress: &impl Fn(),
    ) -> Result<Stored, DbError> {
        if !maybe_stored {
            match self.insert(rows, false).await {
                Ok(inserted) => {
                    return Ok(Stored {
                        inserted,
                        ..Stored::default()
                    })
                }
                Err(e) if e.is_data_error() => {
                    debug!(message = "A batch needs the careful insert.", error = %e);
                }
                Err(e) => return Err(e),
            }
            progress();
        }
        let mut stored = Stored::default();
        let whole = match self.insert(rows, true).await {
            Ok(n) => {
                stored.inserted = n;
                return Ok(stored);
            }
            Err(e) if e.is_data_error() => e,
            Err(e) => return Err(e),
        };
        let mut table_accepts = false;
        for reference in references {
            progress();
            match self.probe(reference, progress).await {
                Ok(()) => {
                    table_accepts = true;
                    break;
                }
                Err(e) if e.is_data_error() => {}
                Err(e) => return Err(e),
            }
        }
        if rows.len() == 1 {
            return match table_accepts {
                true => {
                    stored.rejected.push((0, format!("{whole}")));
                    Ok(stored)
                }
                false => Err(DbError::Systematic(Box::new(whole))),
            };
        }
        let mid = rows.len() / 2;
        let mut pending = vec![(mid, rows.len()), (0, mid)];
        // With every reference refused: the halves still undecided, and whether one was accepted.
        let mut halves = if table_accepts { 0 } else { 2 };
        let mut any_accepted = false;
        while let Some((start, end)) = pending.pop() {
            progress();
            let result = match self.insert(&rows[start..end], true).await {
                Err(e) if !e.is_data_error() => return Err(e),
                result => result,
            };
            if halves > 0 {
                halves -= 1;
                any_accepted |= result.is_ok();
                if halves == 0 && !any_accepted {
                    return Err(DbError::Systematic(Box::new(whole)));
                }
            }
            match result {
                Ok(n) => stored.inserted += n,
                Err(e) if e.is_data_error() && end - start == 1 => {
                    stored.rejected.push((start, format!("{e}")));
                }
                Err(e) if e.is_data_error() => {
                    let mid = start + (end - start) / 2;
                    // Behind the other half, if that is still to be tried.
                    let at = pending.len().saturating_sub(halves);
                    pending.insert(at, (mid, end));
                    pending.insert(at + 1, (start, mid));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(stored)
    }
}

impl Db {
    /// Inserts `reference` with a fresh id, and rolls it back: whether PostgreSQL would accept a
    /// reading it accepted before. Nothing is stored.
    async fn probe(&self, reference: &Reading, progress: &impl Fn()) -> Result<(), DbError> {
        let probe = Reading {
            message_id: uuid::Uuid::now_v7(),
            measured_at: Some(time::OffsetDateTime::now_utc()),
            ..reference.clone()
        };
        self.bounded("probe: begin", self.client.batch_execute("BEGIN"))
            .await?;
        progress();
        let inserted = self.insert(std::slice::from_ref(&probe), true).await;
        progress();
        self.bounded("probe: roll back", self.client.batch_execute("ROLLBACK"))
            .await?;
        inserted.map(|_| ())
    }

    /// Some reading the table holds, if the role may read it (it need not): a reference for
    /// [`Self::insert_isolating`] before this process stored any. Any row will do (its id and
    /// time are replaced), and `LIMIT 1` without an order costs one page however large the
    /// table; ordering by `received_at` would sort the whole table, and ids are not all
    /// time-ordered.
    pub async fn latest(&self) -> Option<Reading> {
        let sql = "SELECT message_id, station_id, temperature, humidity, pressure, measured_at \
                   FROM weather_logs LIMIT 1";
        let row = self.bounded("read the latest reading", self.client.query_opt(sql, &[]));
        match row.await {
            Ok(Some(r)) => Some(Reading {
                message_id: r.try_get(0).ok()?,
                station_id: r.try_get(1).ok()?,
                temperature: r.try_get(2).ok()?,
                humidity: r.try_get(3).ok()?,
                pressure: r.try_get(4).ok()?,
                measured_at: r.try_get(5).ok()?,
            }),
            Ok(None) => None,
            Err(e) => {
                debug!(message = "Cannot read the latest reading; the built-in reference will do.", error = %e);
                None
            }
        }
    }

    /// `fut`, or [`DbError::Timeout`] after [`PostgresConfig::statement_limit`].
    async fn bounded<T>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.insert_timeout, fut).await {
            Ok(result) => result.map_err(DbError::pg(what)),
            Err(_) => Err(DbError::Timeout(what, self.insert_timeout)),
        }
    }
}

/// One session to `url` with the consumer's settings (schema, statement timeout); its connection
/// task runs until the client is dropped.
async fn session(
    cfg: &PostgresConfig,
    url: &url::Url,
    password: Option<&Secret>,
) -> Result<Client, DbError> {
    let (url, tls) = tls_client(url).map_err(DbError::TlsConfig)?;
    let tls = tls
        .config()
        .map_err(|e| DbError::TlsConfig(e.to_string()))?;
    let mut pg = tokio_postgres::Config::from_str(url.as_str()).map_err(DbError::Config)?;
    if let Some(p) = password {
        pg.password(p.expose());
    }
    pg.connect_timeout(cfg.connect_timeout)
        .keepalives_idle(Duration::from_secs(30))
        .application_name("sistema-mensajes consumer")
        .options(format!(
            "-c search_path={} -c statement_timeout={}",
            quote_identifier(cfg.schema.as_str()),
            cfg.statement_timeout.as_millis()
        ));
    let (client, connection) = pg
        .connect(Connector(tokio_postgres_rustls::MakeRustlsConnect::new(
            tls,
        )))
        .await
        .map_err(DbError::pg("connect"))?;
    // The connection task ends when the client is dropped or the socket closes; the client
    // then reports `is_closed()` and its next query fails, which is how we notice.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(message = "PostgreSQL connection ended.", error = %e);
        }
    });
    Ok(client)
}

/// tokio-postgres-rustls's connector, for a Unix socket too: tokio-postgres asks for a TLS
/// connector before it knows it will not need one, with the host name `""` for a socket, which
/// rustls refuses. It never uses a connector without a host name ("no hostname provided for TLS
/// handshake"), and [`tls_client`] turns TLS off for sockets, so the stand-in name is never used.
struct Connector(tokio_postgres_rustls::MakeRustlsConnect);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for Connector
where
    tokio_postgres_rustls::MakeRustlsConnect: tokio_postgres::tls::MakeTlsConnect<S>,
{
    type Stream = <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Stream;
    type TlsConnect = <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::TlsConnect;
    type Error =
        <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        let domain = if domain.is_empty() {
            "localhost"
        } else {
            domain
        };
        self.0.make_tls_connect(domain)
    }
}

/// libpq's names for the files.
pub const TLS_KEYS: crate::tls::Keys = crate::tls::Keys {
    ca: "sslrootcert",
    cert: "sslcert",
    key: "sslkey",
};

/// The URL's hosts, ports and `hostaddr`s agree in number, as tokio-postgres requires at every
/// connect (`connect.rs`): caught at start instead, naming the counts.
pub fn check_host_counts(url: &url::Url) -> Result<(), String> {
    let (url, _) = tls_client(url)?;
    let pg = tokio_postgres::Config::from_str(url.as_str()).map_err(|e| e.to_string())?;
    let (hosts, addrs, ports) = (
        pg.get_hosts().len(),
        pg.get_hostaddrs().len(),
        pg.get_ports().len(),
    );
    if hosts > 0 && addrs > 0 && hosts != addrs {
        return Err(format!("{hosts} hosts but {addrs} `hostaddr`s"));
    }
    let n = hosts.max(addrs);
    if ports > 1 && ports != n {
        return Err(format!("{n} hosts but {ports} ports"));
    }
    Ok(())
}

/// What a query value may not hold as is.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'=');

/// The TLS client a PostgreSQL URL asks for, with libpq's parameters and meanings, and the URL
/// for tokio-postgres (which knows `sslmode` only up to `require`, and no file parameters):
/// - `sslmode=disable`: plain text;
/// - `prefer` (the default, as in libpq): TLS if the server offers it, else plain text;
/// - `require`: TLS or nothing;
/// - `verify-ca`: TLS, and the server's certificate signed by `sslrootcert`;
/// - `verify-full`: that, and issued for the host name.
///
/// As in libpq, `prefer` and `require` check the chain when `sslrootcert` is given, and not at
/// all otherwise. `allow` and `sslrootcert=system` are refused. The error names the parameter.
pub fn tls_client(url: &url::Url) -> Result<(url::Url, crate::tls::Client), String> {
    use crate::tls::Verify;
    let mut client = crate::tls::Client {
        verify: Verify::Nothing,
        ca: None,
        cert: None,
        key: None,
        keys: TLS_KEYS,
    };
    let mut mode = String::from("prefer");
    let params = crate::tls::query_parameters(url);
    let ours = [
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "sslnegotiation",
    ];
    if let Some(k) = crate::tls::repeated(&params, &ours) {
        return Err(format!("`{k}` is given twice"));
    }
    // The other parameters go on as written: re-encoding them could change a value (`+`).
    let mut rest: Vec<std::borrow::Cow<str>> = Vec::new();
    for (k, v, raw) in params {
        let path = || Some(std::path::PathBuf::from(&v));
        match k.as_str() {
            "sslrootcert" if v == "system" => {
                return Err("`sslrootcert=system` is not supported: name the CA's file".into())
            }
            "sslrootcert" => client.ca = path(),
            "sslcert" => client.cert = path(),
            "sslkey" => client.key = path(),
            "sslpassword" => {
                return Err("`sslpassword` is not supported: give `sslkey` unencrypted, readable only by the daemon".into())
            }
            "sslnegotiation" if v == "postgres" => {}
            "sslnegotiation" => {
                return Err(format!("`sslnegotiation={v}` is not supported: TLS is negotiated the PostgreSQL way (`postgres`)"))
            }
            "sslmode" => mode = v,
            // libpq takes a list of hosts in one `host=` (or `hostaddr=`), comma-separated;
            // tokio-postgres's URL parser takes one host per `host=`, as many as given.
            "host" | "hostaddr" if v.contains(',') => {
                rest.extend(v.split(',').map(|h| {
                    let h = percent_encoding::utf8_percent_encode(h, QUERY_VALUE);
                    std::borrow::Cow::Owned(format!("{k}={h}"))
                }));
            }
            _ => rest.push(raw.into()),
        }
    }
    let (verify, tokio_mode) = match mode.as_str() {
        "disable" => (Verify::Nothing, "disable"),
        "prefer" | "require" if client.ca.is_some() => (Verify::Chain, mode.as_str()),
        "prefer" | "require" => (Verify::Nothing, mode.as_str()),
        "verify-ca" => (Verify::Chain, "require"),
        "verify-full" => (Verify::Full, "require"),
        other => {
            return Err(format!(
                "`sslmode={other}` is not one of disable, prefer, require, verify-ca, verify-full"
            ))
        }
    };
    client.verify = verify;
    client.check()?;
    let with_mode = |mode: &str| {
        let mut out = url.clone();
        let query = rest
            .iter()
            .map(|p| p.as_ref())
            .chain([format!("sslmode={mode}").as_str()])
            .collect::<Vec<_>>()
            .join("&");
        out.set_query(Some(&query));
        out
    };
    let out = with_mode(tokio_mode);
    // Only Unix sockets (every host a socket directory, no `hostaddr`), as tokio-postgres itself
    // reads the URL: they never carry TLS, whatever sslmode says, as in libpq, and tokio-postgres
    // would ask for a TLS connector all the same (see [`Connector`]). Anything that reaches a TCP
    // address keeps the mode asked for.
    let socket_only = tokio_postgres::Config::from_str(out.as_str()).is_ok_and(|pg| {
        !pg.get_hosts().is_empty()
            && pg.get_hostaddrs().is_empty()
            && pg
                .get_hosts()
                .iter()
                .all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)))
    });
    Ok((
        if socket_only {
            with_mode("disable")
        } else {
            out
        },
        client,
    ))
}

/// What `consumer migrate` did.
#[derive(Debug)]
pub struct Migrated {
    pub schema: String,
    /// The role granted the writer's privileges; `None` if it is the owner itself.
    pub writer: Option<String>,
    /// What the maintenance did, unless `--schema-only`.
    pub maintained: Option<crate::partition::Maintained>,
}

/// `consumer migrate`: connects as the owner (`postgres.owner_url`, else `postgres.url`), applies
/// pending migrations, and grants the consumer's role ([`PostgresConfig::role`]) what it needs
/// and nothing more ([`WRITER_GRANTS`]), bounded by [`PostgresConfig::attempt_limit`]; then, with
/// `maintain`, does what [`maintain_as_owner`] does. Idempotent.
pub async fn migrate_as_owner(
    cfg: &PostgresConfig,
    owner: &url::Url,
    password: Option<&Secret>,
    maintain: bool,
) -> Result<Migrated, DbError> {
    let (client, mut migrated) = migrate_and_grant(cfg, owner, password).await?;
    if maintain {
        migrated.maintained = Some(crate::partition::maintain(cfg, &client).await?);
    }
    Ok(migrated)
}

/// `consumer maintain`: as the owner, [`crate::partition::maintain`]: converts `weather_logs`
/// to partitions if it is not yet, then makes the days ahead and applies `postgres.retention`.
pub async fn maintain_as_owner(
    cfg: &PostgresConfig,
    owner: &url::Url,
    password: Option<&Secret>,
) -> Result<crate::partition::Maintained, DbError> {
    let limit = cfg.attempt_limit();
    let client = match tokio::time::timeout(limit, session(cfg, owner, password)).await {
        Ok(client) => client?,
        Err(_) => return Err(DbError::Timeout("connect", limit)),
    };
    crate::partition::maintain(cfg, &client).await
}

async fn migrate_and_grant(
    cfg: &PostgresConfig,
    owner: &url::Url,
    password: Option<&Secret>,
) -> Result<(Client, Migrated), DbError> {
    let limit = cfg.attempt_limit();
    let work = async {
        let mut client = session(cfg, owner, password).await?;
        let schema = cfg.schema.as_str();
        migrate(&mut client, schema).await?;
        let me: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(DbError::pg("read current_user"))?
            .get(0);
        let writer = cfg.role().filter(|role| *role != me);
        if let Some(role) = &writer {
            let grants = WRITER_GRANTS
                .replace("{schema}", &quote_identifier(schema))
                .replace("{role}", &quote_identifier(role));
            client
                .batch_execute(&grants)
                .await
                .map_err(DbError::pg("grant the consumer's role"))?;
            info!(
                message = "Granted the consumer's role what it needs.",
                role, schema
            );
            check_least_privilege(&client, role, schema).await?;
        }
        let migrated = Migrated {
            schema: schema.to_owned(),
            writer,
            maintained: None,
        };
        Ok((client, migrated))
    };
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(DbError::Timeout("migrate", limit)),
    }
}

/// After the grants: the consumer's role must hold nothing more, which no grant can take back.
/// CREATE in the schema (PUBLIC has it on `public` in databases from before PostgreSQL 15) would
/// let it plant objects that the owner's SECURITY DEFINER function or other roles resolve; owning
/// objects there (left from a one-role setup) gives it every right on them. An owner that is a
/// superuser only warns: the function then runs as a superuser.
async fn check_least_privilege(client: &Client, role: &str, schema: &str) -> Result<(), DbError> {
    let row = client
        .query_one(
            "SELECT has_schema_privilege($1, $2, 'CREATE'),
                    (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $2 AND c.relowner = to_regrole(quote_ident($1)))
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname = $2 AND p.proowner = to_regrole(quote_ident($1))),
                    (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[&role, &schema],
        )
        .await
        .map_err(DbError::pg("check the consumer's privileges"))?;
    let (create, owned, superuser): (bool, i64, bool) = (row.get(0), row.get(1), row.get(2));
    if superuser {
        warn!(message = "The owner role is a superuser: weather_logs_conflicts (SECURITY DEFINER) runs as one. Use an ordinary role that owns the schema.", schema);
    }
    if create {
        let public = match schema {
            "public" => " (PUBLIC has CREATE on `public` in databases from before PostgreSQL 15: REVOKE CREATE ON SCHEMA public FROM PUBLIC)",
            _ => "",
        };
        return Err(DbError::Unsafe(format!(
            "the consumer's role `{role}` may CREATE in schema `{schema}`{public}; revoke it, then run `consumer migrate` again"
        )));
    }
    if owned > 0 {
        return Err(DbError::Unsafe(format!(
            "the consumer's role `{role}` owns {owned} objects in schema `{schema}` (a one-role setup?): REASSIGN OWNED BY or ALTER … OWNER TO the owner role, then run `consumer migrate` again"
        )));
    }
    Ok(())
}

/// With `postgres.migrate = false`: every migration must be recorded, or the consumer waits.
/// Needs only SELECT on `schema_migrations`.
async fn check_migrated(client: &Client, schema: &str) -> Result<(), DbError> {
    let rows = match client
        .query("SELECT version FROM schema_migrations", &[])
        .await
    {
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Vec::new(),
        result => result.map_err(DbError::pg("read schema_migrations"))?,
    };
    let applied: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let missing: Vec<&'static str> = MIGRATIONS
        .iter()
        .map(|(v, _)| *v)
        .filter(|v| !applied.iter().any(|a| a == v))
        .collect();
    match missing.is_empty() {
        true => Ok(()),
        false => Err(DbError::NotMigrated {
            schema: schema.to_owned(),
            missing,
        }),
    }
}

/// A reading any table that holds weather readings accepts, for [`Db::insert_isolating`] until a
/// real one has been stored.
pub fn reference_reading() -> Reading {
    Reading {
        message_id: uuid::Uuid::nil(),
        station_id: "reference".into(),
        temperature: 15.0,
        humidity: 50.0,
        pressure: 1013.25,
        measured_at: Some(time::OffsetDateTime::now_utc()),
    }
}

/// Applies what `schema_migrations` does not list yet, under an advisory lock so two consumers
/// starting together take turns.
async fn migrate(client: &mut Client, schema: &str) -> Result<(), DbError> {
    let tx = client
        .transaction()
        .await
        .map_err(DbError::pg("begin migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK, &schema],
    )
    .await
    .map_err(DbError::pg("lock migrations"))?;
    // Quoted: `schema` is validated, but may still be a keyword (`user`).
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {};
         CREATE TABLE IF NOT EXISTS schema_migrations (
             version    text        PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
        quote_identifier(schema)
    ))
    .await
    .map_err(DbError::pg("create schema_migrations"))?;
    // For the functions' `SET search_path FROM CURRENT`: the schema, then pg_temp explicitly
    // (last), so no caller's temporary object can stand in for ours.
    tx.batch_execute(&format!(
        "SET LOCAL search_path TO {}, pg_temp",
        quote_identifier(schema)
    ))
    .await
    .map_err(DbError::pg("set the migration's search_path"))?;
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(DbError::pg("read schema_migrations"))?
            .is_some();
        if done {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(DbError::pg("apply migration"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(DbError::pg("record migration"))?;
        info!(message = "Applied database migration.", version, schema);
    }
    crate::partition::drop_leftover_constraint(&tx, schema).await?;
    if crate::partition::convert_if_empty(&tx).await? {
        info!(
            message = "Partitioned weather_logs (empty) by day of measured_at.",
            schema
        );
    }
    // The days ahead, so that a consumer that migrates its own schema (one role) keeps days ahead
    // while it reconnects now and then (not a catch-up, nor retention: `consumer maintain`'s).
    crate::partition::create_ahead(&tx).await?;
    tx.commit().await.map_err(DbError::pg("commit migration"))
}

/// `text` as a quoted SQL string literal (standard_conforming_strings, on since PostgreSQL 9.1).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name` as a quoted SQL identifier, so that no configured name is ever read as SQL.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_libpq_host_list_reaches_tokio_postgres_as_several_hosts() {
        let url = url::Url::parse(
            "postgres:///weather?host=10.0.0.1,db2.example,%2Frun%2Fpostgresql&port=5432,5433,5434&target_session_attrs=read-write",
        )
        .unwrap();
        let (out, _) = tls_client(&url).unwrap();
        let pg = tokio_postgres::Config::from_str(out.as_str()).unwrap();
        assert_eq!(pg.get_hosts().len(), 3, "{out}");
        assert_eq!(pg.get_ports(), &[5432, 5433, 5434]);
        assert_eq!(
            pg.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        // Counts that do not agree are refused before any connect.
        let three_two = url::Url::parse("postgres:///weather?host=a,b,c&port=5432,5433").unwrap();
        assert_eq!(
            check_host_counts(&three_two).unwrap_err(),
            "3 hosts but 2 ports"
        );
        assert!(check_host_counts(&url).is_ok());
        // One host stays as written.
        let one = url::Url::parse("postgres:///weather?host=db.example&port=5433").unwrap();
        let (out, _) = tls_client(&one).unwrap();
        assert!(out.as_str().contains("host=db.example&port=5433"), "{out}");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("user"), "\"user\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn every_sql_file_is_a_migration_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .map(|n| n.trim_end_matches(".sql").to_owned())
            .collect();
        files.sort();
        let listed: Vec<_> = MIGRATIONS.iter().map(|(v, _)| v.to_string()).collect();
        assert_eq!(files, listed);
    }
}
