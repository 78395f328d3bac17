//! Time partitioning of `weather_logs` (docs/operations.md, "Retention"): the conversion of an
//! unpartitioned table while the consumer goes on writing, and the maintenance that keeps
//! partitions ready ahead and drops those older than `postgres.retention`.
//!
//! Partition key and deduplication: the key is `measured_at` (one partition per UTC day), and
//! the unique key `(message_id, measured_at)` with NULLS NOT DISTINCT. A redelivered or
//! republished reading is the same message, with the same `measured_at`, so it lands in the
//! partition of its first copy and the insert skips it: exact across any partition boundary and
//! for as long as that partition exists. Readings without `measured_at` (older clients) all go
//! to the default partition, where the same key holds.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};
use tracing::{info, warn};

use crate::db::{DbError, MIGRATION_LOCK};

/// Days of partitions kept ready beyond today: the maintenance may fail (or not run) for that
/// long before a reading of today finds no partition.
pub const AHEAD_DAYS: i32 = 7;

/// How far in the future the newest stored reading may lie for the conversion to go ahead: the
/// first daily partition starts the day after it, and everything before stays in the default
/// partition, out of reach of retention.
const FURTHEST_CUTOVER_DAYS: i32 = 31;

/// How long the switch, and each maintenance DDL, waits for its lock before it gives up and
/// tries again: while it waits, the consumer's inserts queue behind it.
const LOCK_TIMEOUT: &str = "5s";
const SWITCH_ATTEMPTS: u32 = 10;

const SWITCH: &str = include_str!("../sql/partition/switch.sql");

/// The version `schema_migrations` records once `weather_logs` is partitioned.
pub const PARTITIONED: &str = "weather_logs_partitioned";

/// What the conversion did and how long each step took.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// The first day with a partition of its own (UTC); readings before it stay in
    /// `weather_logs_default`.
    pub cutover: String,
    /// Building the unique index `(message_id, measured_at)` concurrently: writers go on.
    pub index_build: Duration,
    /// Validating the default partition's CHECK constraint: writers go on.
    pub validation: Duration,
    /// Waiting for the ACCESS EXCLUSIVE lock: writers that came meanwhile queue behind it.
    pub lock_wait: Duration,
    /// From the ACCESS EXCLUSIVE lock to the commit: how long writers waited.
    pub switch: Duration,
}

/// One partition created or dropped by [`maintain`].
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub action: String,
    pub partition: String,
}

/// Whether `weather_logs` (in the session's search path) is a partitioned table.
pub async fn is_partitioned(client: &impl GenericClient) -> Result<bool, DbError> {
    let row = client
        .query_one(
            "SELECT coalesce((SELECT relkind = 'p' FROM pg_class \
             WHERE oid = to_regclass('weather_logs')), false)",
            &[],
        )
        .await
        .map_err(DbError::pg("read the kind of weather_logs"))?;
    Ok(row.get(0))
}

/// The switch's SQL for a cutover `days` after today (UTC).
async fn switch_sql(client: &impl GenericClient, cutover: &str) -> Result<String, DbError> {
    let row = client
        .query_one(
            "SELECT to_char(c, 'YYYYMMDD'), quote_literal(c AT TIME ZONE 'UTC'), \
                    quote_literal((c + interval '1 day') AT TIME ZONE 'UTC') \
             FROM (SELECT $1::text::timestamp AS c) x",
            &[&cutover],
        )
        .await
        .map_err(DbError::pg("compute the partitions' cutover"))?;
    let (day, from, next): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    Ok(SWITCH
        .replace("{cutover}", &format!("{from}::timestamptz"))
        .replace("{next}", &format!("{next}::timestamptz"))
        .replace("{day}", &day))
}

/// Today's start (UTC), as `timestamp` text.
const TODAY: &str = "SELECT date_trunc('day', now() AT TIME ZONE 'UTC')::text";

/// Within a migration's transaction: converts `weather_logs` if it is empty (nothing to scan,
/// so all of it at once), with partitions from today. A table with rows is left to
/// [`convert`] (`consumer migrate`), which does not block writers for the time of a scan.
pub async fn convert_if_empty(tx: &impl GenericClient) -> Result<bool, DbError> {
    if is_partitioned(tx).await? {
        return Ok(false);
    }
    let empty: bool = tx
        .query_one("SELECT NOT EXISTS (SELECT FROM weather_logs)", &[])
        .await
        .map_err(DbError::pg("look for rows in weather_logs"))?
        .get(0);
    if !empty {
        return Ok(false);
    }
    let today: String = tx
        .query_one(TODAY, &[])
        .await
        .map_err(DbError::pg("read the date"))?
        .get(0);
    tx.batch_execute(&switch_sql(tx, &today).await?)
        .await
        .map_err(DbError::pg("apply migration: partition weather_logs"))?;
    Ok(true)
}

/// `consumer migrate` on a table with rows: converts `weather_logs` to daily partitions while the
/// consumer goes on writing. Under the migrations' advisory lock (a session lock: the steps are
/// separate transactions), with no statement timeout (the index build and the validation read
/// the whole table). `Ok(None)`: already partitioned. Each step can be interrupted and run again.
pub async fn convert(client: &Client, schema: &str) -> Result<Option<Conversion>, DbError> {
    client
        .execute(
            "SELECT pg_advisory_lock($1, hashtext($2))",
            &[&MIGRATION_LOCK, &schema],
        )
        .await
        .map_err(DbError::pg("lock migrations"))?;
    let result = convert_locked(client).await;
    // A failure to unlock ends with the session, which the caller drops.
    let _ = client
        .batch_execute("RESET statement_timeout; SELECT pg_advisory_unlock_all()")
        .await;
    result
}

async fn convert_locked(client: &Client) -> Result<Option<Conversion>, DbError> {
    if is_partitioned(client).await? {
        return Ok(None);
    }
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .map_err(DbError::pg("apply migration: statement timeout"))?;

    info!(message = "Partitioning weather_logs: building the unique index (message_id, measured_at) concurrently; writers go on.");
    let started = Instant::now();
    let invalid = client
        .query_opt(
            "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass('weather_logs_default_key')",
            &[],
        )
        .await
        .map_err(DbError::pg("apply migration: read the index"))?
        .is_some_and(|r| r.get(0));
    if invalid {
        // Left by an interrupted build.
        client
            .batch_execute("DROP INDEX CONCURRENTLY weather_logs_default_key")
            .await
            .map_err(DbError::pg("apply migration: drop an invalid index"))?;
    }
    client
        .batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS weather_logs_default_key \
             ON weather_logs (message_id, measured_at) NULLS NOT DISTINCT",
        )
        .await
        .map_err(DbError::pg("apply migration: build the unique index"))?;
    let index_build = started.elapsed();

    let started = Instant::now();
    let mut cutover = String::new();
    for attempt in 1.. {
        cutover = choose_cutover(client).await?;
        info!(message = "Partitioning weather_logs: validating that every stored reading is measured before the cutover; writers go on.", cutover);
        locked(
            client,
            &format!(
                "ALTER TABLE weather_logs DROP CONSTRAINT IF EXISTS weather_logs_default_range, \
                 ADD CONSTRAINT weather_logs_default_range \
                 CHECK (measured_at IS NULL OR measured_at < {}::timestamp AT TIME ZONE 'UTC') NOT VALID",
                crate::db::quote_literal(&cutover)
            ),
        )
        .await?;
        match client
            .batch_execute(
                "ALTER TABLE weather_logs VALIDATE CONSTRAINT weather_logs_default_range",
            )
            .await
        {
            Ok(()) => break,
            // A reading measured after the cutover arrived between the choice and the constraint.
            Err(e) if e.code() == Some(&SqlState::CHECK_VIOLATION) && attempt < 3 => continue,
            Err(e) => return Err(DbError::pg("apply migration: validate the cutover")(e)),
        }
    }
    let validation = started.elapsed();

    let switch = switch_sql(client, &cutover).await?;
    for attempt in 1..=SWITCH_ATTEMPTS {
        let lock = format!(
            "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
             LOCK TABLE weather_logs IN ACCESS EXCLUSIVE MODE"
        );
        let asked = Instant::now();
        if let Err(e) = client.batch_execute(&lock).await {
            let _ = client.batch_execute("ROLLBACK").await;
            lock_wait(e, attempt).map_err(DbError::pg("apply migration: lock weather_logs"))?;
            continue;
        }
        let locked_at = Instant::now();
        let lock_wait = locked_at - asked;
        let done = client.batch_execute(&format!("{switch}; COMMIT")).await;
        let held = locked_at.elapsed();
        if let Err(e) = done {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(DbError::pg("apply migration: partition weather_logs")(e));
        }
        info!(
            message = "Partitioned weather_logs.",
            cutover,
            index_build_ms = index_build.as_millis() as u64,
            validation_ms = validation.as_millis() as u64,
            lock_wait_ms = lock_wait.as_millis() as u64,
            lock_held_ms = held.as_millis() as u64
        );
        return Ok(Some(Conversion {
            cutover,
            index_build,
            validation,
            lock_wait,
            switch: held,
        }));
    }
    Err(DbError::Conversion(format!(
        "could not lock weather_logs within {LOCK_TIMEOUT} in {SWITCH_ATTEMPTS} attempts: a long transaction holds it; run `consumer migrate` again"
    )))
}

/// A lock timeout ends the transaction; it is retried (up to the last attempt).
fn lock_wait(e: tokio_postgres::Error, attempt: u32) -> Result<(), tokio_postgres::Error> {
    if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) && attempt < SWITCH_ATTEMPTS {
        warn!(
            message = "weather_logs is locked by another transaction; trying again.",
            attempt
        );
        return Ok(());
    }
    Err(e)
}

/// One DDL statement in its own transaction, with the lock timeout, retried while it times out.
async fn locked(client: &Client, sql: &str) -> Result<(), DbError> {
    let mut attempt = 1;
    loop {
        let result = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {sql}; COMMIT"
            ))
            .await;
        let Err(e) = result else { return Ok(()) };
        let _ = client.batch_execute("ROLLBACK").await;
        lock_wait(e, attempt).map_err(DbError::pg("apply migration: constrain weather_logs"))?;
        attempt += 1;
    }
}

/// The first day of the daily partitions: two days after today (a reading a little ahead of our
/// clock still fits in the default partition while the conversion runs), or the day after the
/// latest reading stored, whichever is later. Refused if that lies more than a month ahead.
async fn choose_cutover(client: &Client) -> Result<String, DbError> {
    let row = client
        .query_one(
            "SELECT greatest(date_trunc('day', now() AT TIME ZONE 'UTC') + interval '2 days',
                             date_trunc('day', max(measured_at) AT TIME ZONE 'UTC') + interval '1 day')::text,
                    max(measured_at)::text,
                    count(*) FILTER (WHERE measured_at > now() + make_interval(days => $1))
               FROM weather_logs",
            &[&FURTHEST_CUTOVER_DAYS],
        )
        .await
        .map_err(DbError::pg("apply migration: find the latest reading"))?;
    let (cutover, latest, ahead): (String, Option<String>, i64) =
        (row.get(0), row.get(1), row.get(2));
    if ahead > 0 {
        return Err(DbError::Conversion(format!(
            "{ahead} stored readings are measured more than {FURTHEST_CUTOVER_DAYS} days from now (the latest at {}); \
             the first partition would start after them. Move or delete them \
             (SELECT * FROM weather_logs WHERE measured_at > now() + interval '{FURTHEST_CUTOVER_DAYS} days'), \
             then run `consumer migrate` again",
            latest.unwrap_or_default()
        )));
    }
    Ok(cutover)
}

/// In a migration's transaction: the partitions for the days ahead, if `weather_logs` is
/// partitioned. Returns how many were created.
pub async fn create_ahead(tx: &impl GenericClient) -> Result<i64, DbError> {
    if !is_partitioned(tx).await? {
        return Ok(0);
    }
    let row = tx
        .query_one(
            "SELECT count(*) FROM weather_logs_maintain(now(), $1, NULL)",
            &[&AHEAD_DAYS],
        )
        .await
        .map_err(DbError::pg("apply migration: create the partitions ahead"))?;
    Ok(row.get(0))
}

/// `consumer maintain`: creates the partitions up to [`AHEAD_DAYS`] after today and, with a
/// retention, drops those whose day ended before it. Returns what changed.
pub async fn maintain(
    client: &Client,
    retention: Option<Duration>,
) -> Result<Vec<Change>, DbError> {
    if !is_partitioned(client).await? {
        return Err(DbError::Conversion(
            "weather_logs is not partitioned yet: run `consumer migrate`".into(),
        ));
    }
    let seconds = retention.map(|r| r.as_secs_f64());
    let rows = client
        .query(
            "SELECT action, partition FROM weather_logs_maintain(now(), $1, \
             CASE WHEN $2::float8 IS NULL THEN NULL ELSE make_interval(secs => $2::float8) END)",
            &[&AHEAD_DAYS, &seconds],
        )
        .await
        .map_err(DbError::pg("maintain the partitions of weather_logs"))?;
    let changes: Vec<Change> = rows
        .iter()
        .map(|r| Change {
            action: r.get(0),
            partition: r.get(1),
        })
        .collect();
    for c in &changes {
        info!(
            message = "Maintained the partitions of weather_logs.",
            action = c.action,
            partition = c.partition
        );
    }
    Ok(changes)
}
