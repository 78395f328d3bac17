//! Time partitioning of `weather_logs` (docs/operations.md, "Retention"): the conversion of an
//! unpartitioned table while the consumer goes on writing, and the maintenance that keeps
//! partitions ready ahead and drops those older than `postgres.retention`.
//!
//! Partition key and deduplication: the key is `measured_at` (one partition per UTC day), and
//! the unique key `(message_id, measured_at)` with NULLS NOT DISTINCT. A redelivered or
//! republished reading is the same message, with the same `measured_at`, so it lands in the
//! partition of its first copy and the insert skips it: exact across any partition boundary and
//! for as long as that partition exists. Readings without `measured_at` (older clients) all go
//! to the default partition, where the same key holds. Catch-alls keep every reading the
//! decoder accepts storable (sql/0004_weather_logs_partitions.sql): the default partition before
//! the first day, `weather_logs_ahead` after the newest, `weather_logs_expired` for days dropped.

use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient};
use tracing::{info, warn};

use crate::config::PostgresConfig;
use crate::db::{DbError, MIGRATION_LOCK};

/// Days of partitions kept ready beyond today: the maintenance may fail (or not run) for that
/// long before readings of today go to `weather_logs_ahead` (stored, and moved into their day
/// by the next run that succeeds).
pub const AHEAD_DAYS: i32 = 7;

/// How far in the future the newest stored reading may lie for the conversion to go ahead: the
/// first daily partition starts the day after it, and everything before stays in the default
/// partition, out of reach of retention.
const FURTHEST_CUTOVER_DAYS: i32 = 31;

/// How long the conversion's DDL waits for its lock before it gives up and tries again (the
/// maintenance's SQL function waits 2 s, then fails until the next run): while it waits, the
/// consumer's inserts queue behind it.
const LOCK_TIMEOUT: &str = "5s";
const SWITCH_ATTEMPTS: u32 = 10;

const SWITCH: &str = include_str!("../sql/partition/switch.sql");

/// The conversion's own advisory lock, `(CONVERSION_LOCK, hashtext(schema))`.
const CONVERSION_LOCK: i32 = MIGRATION_LOCK + 1;

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

/// A `timestamp` (UTC) as ISO text, whatever the session's DateStyle (`::text` follows it, and
/// `12/07/2026` reads back as July in a DMY session).
const ISO: &str = "'YYYY-MM-DD HH24:MI:SS'";

/// The switch's SQL for a cutover at `cutover` (ISO text, UTC): literals with an explicit `+00`,
/// which neither DateStyle nor the session's time zone can change.
async fn switch_sql(client: &impl GenericClient, cutover: &str) -> Result<String, DbError> {
    let row = client
        .query_one(
            &format!(
                "SELECT to_char(c, 'YYYYMMDD'), quote_literal(to_char(c, {ISO}) || '+00'), \
                        quote_literal(to_char(c + interval '1 day', {ISO}) || '+00') \
                 FROM (SELECT $1::text::timestamp AS c) x"
            ),
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

/// Today's start (UTC), as ISO text.
const TODAY: &str =
    "SELECT to_char(date_trunc('day', now() AT TIME ZONE 'UTC'), 'YYYY-MM-DD HH24:MI:SS')";

/// Whether `weather_logs` holds no row.
async fn table_is_empty(client: &impl GenericClient) -> Result<bool, DbError> {
    Ok(client
        .query_one("SELECT NOT EXISTS (SELECT FROM weather_logs)", &[])
        .await
        .map_err(DbError::pg("look for rows in weather_logs"))?
        .get(0))
}

/// Within a migration's transaction: converts `weather_logs` if it is empty (nothing to scan,
/// so all of it at once), with partitions from today. A table with rows is left to
/// [`convert`] (`consumer maintain`), which does not block writers for the time of a scan.
pub async fn convert_if_empty(tx: &impl GenericClient) -> Result<bool, DbError> {
    if is_partitioned(tx).await? || !table_is_empty(tx).await? {
        return Ok(false);
    }
    // Then locked, and again: a row written in between would fail the switch's CHECK.
    tx.batch_execute("LOCK TABLE weather_logs IN ACCESS EXCLUSIVE MODE")
        .await
        .map_err(DbError::pg("apply migration: lock weather_logs"))?;
    if !table_is_empty(tx).await? {
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

/// [`convert_if_empty`] in a transaction of its own, under the migrations' lock, with the table
/// locked first (so that no row comes in between); `None` if a row had.
async fn convert_empty(client: &Client, schema: &str) -> Result<Option<Conversion>, DbError> {
    let started = Instant::now();
    let locked = client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
             SELECT pg_advisory_xact_lock({MIGRATION_LOCK}, hashtext({})); \
             LOCK TABLE weather_logs IN ACCESS EXCLUSIVE MODE",
            crate::db::quote_literal(schema)
        ))
        .await;
    if let Err(e) = locked {
        // Busy: the online path, which waits its turn, will do.
        let _ = client.batch_execute("ROLLBACK").await;
        lock_wait(e, 1).map_err(DbError::pg("apply migration: lock weather_logs"))?;
        return Ok(None);
    }
    let converted = convert_if_empty(client).await;
    let end = if matches!(converted, Ok(true)) {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client.batch_execute(end).await;
    if !converted? {
        return Ok(None);
    }
    ended.map_err(DbError::pg("apply migration: partition weather_logs"))?;
    info!(message = "Partitioned weather_logs (empty) by day of measured_at.");
    let today: String = client
        .query_one(TODAY, &[])
        .await
        .map_err(DbError::pg("read the date"))?
        .get(0);
    Ok(Some(Conversion {
        cutover: today,
        index_build: Duration::ZERO,
        validation: Duration::ZERO,
        lock_wait: Duration::ZERO,
        switch: started.elapsed(),
    }))
}

/// `consumer migrate` on a table with rows: converts `weather_logs` to daily partitions while the
/// consumer goes on writing, with no statement timeout (the index build and the validation read
/// the whole table). One conversion at a time: a session advisory lock of its own (the steps are
/// separate transactions), not the migrations' lock, which a consumer that migrates its own
/// schema takes at every connect and must not wait for during a long index build; the switch
/// takes that one too, for its few milliseconds. `Ok(None)`: already partitioned. Each step can
/// be interrupted and run again.
pub async fn convert(client: &Client, schema: &str) -> Result<Option<Conversion>, DbError> {
    client
        .execute(
            "SELECT pg_advisory_lock($1, hashtext($2))",
            &[&CONVERSION_LOCK, &schema],
        )
        .await
        .map_err(DbError::pg("lock the conversion"))?;
    let result = convert_locked(client, schema).await;
    if result.is_err() {
        // Left on a table that is not converted, the constraint would refuse the readings of the
        // cutover and after (every one of them, from that day on).
        let _ = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; DO $$ BEGIN \
                   IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('weather_logs')) = 'r' THEN \
                     ALTER TABLE weather_logs DROP CONSTRAINT IF EXISTS weather_logs_default_range; \
                   END IF; END $$; COMMIT"
            ))
            .await;
    }
    // A failure to unlock ends with the session, which the caller drops.
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&CONVERSION_LOCK, &schema],
        )
        .await;
    let _ = client.batch_execute("RESET statement_timeout").await;
    result
}

async fn convert_locked(client: &Client, schema: &str) -> Result<Option<Conversion>, DbError> {
    if is_partitioned(client).await? {
        return Ok(None);
    }
    // Empty (a new installation): at once, with days from today, as a consumer would.
    if table_is_empty(client).await? {
        if let Some(done) = convert_empty(client, schema).await? {
            return Ok(Some(done));
        }
        // A consumer may have converted it meanwhile.
        if is_partitioned(client).await? {
            return Ok(None);
        }
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
            "apply migration: constrain weather_logs",
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
             SELECT pg_advisory_xact_lock({MIGRATION_LOCK}, hashtext({})); \
             LOCK TABLE weather_logs IN ACCESS EXCLUSIVE MODE",
            crate::db::quote_literal(schema)
        );
        let asked = Instant::now();
        if let Err(e) = client.batch_execute(&lock).await {
            let _ = client.batch_execute("ROLLBACK").await;
            lock_wait(e, attempt).map_err(DbError::pg("apply migration: lock weather_logs"))?;
            continue;
        }
        let locked_at = Instant::now();
        let lock_wait = locked_at - asked;
        // A consumer may have converted it meanwhile (it does so with an empty table).
        if is_partitioned(client).await? {
            let _ = client.batch_execute("ROLLBACK").await;
            return Ok(None);
        }
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
async fn locked(client: &Client, sql: &str, context: &'static str) -> Result<(), DbError> {
    let mut attempt = 1;
    loop {
        let result = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; {sql}; COMMIT"
            ))
            .await;
        let Err(e) = result else { return Ok(()) };
        let _ = client.batch_execute("ROLLBACK").await;
        lock_wait(e, attempt).map_err(DbError::pg(context))?;
        attempt += 1;
    }
}

/// The first day of the daily partitions: two days after today (a reading a little ahead of our
/// clock still fits in the default partition while the conversion runs), or the day after the
/// latest reading stored, whichever is later. Refused if that lies more than a month ahead.
async fn choose_cutover(client: &Client) -> Result<String, DbError> {
    let row = client
        .query_one(
            "SELECT to_char(greatest(date_trunc('day', now() AT TIME ZONE 'UTC') + interval '2 days',
                                     date_trunc('day', max(measured_at) AT TIME ZONE 'UTC') + interval '1 day'),
                            'YYYY-MM-DD HH24:MI:SS'),
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

/// In a migration's transaction: removes the CHECK constraint a conversion that was killed left
/// on the unpartitioned table (it would refuse readings from its cutover on), unless a
/// conversion is running now (it holds its lock). Cheap when there is none: one catalog read.
pub async fn drop_leftover_constraint(
    tx: &impl GenericClient,
    schema: &str,
) -> Result<(), DbError> {
    let left: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid \
             WHERE t.oid = to_regclass('weather_logs') AND t.relkind = 'r' \
             AND c.conname = 'weather_logs_default_range') \
             AND pg_try_advisory_xact_lock($1, hashtext($2))",
            &[&CONVERSION_LOCK, &schema],
        )
        .await
        .map_err(DbError::pg(
            "apply migration: look for a conversion's leftover",
        ))?
        .get(0);
    if left {
        tx.batch_execute("ALTER TABLE weather_logs DROP CONSTRAINT weather_logs_default_range")
            .await
            .map_err(DbError::pg("apply migration: drop a conversion's leftover"))?;
        warn!(message = "Removed the constraint an interrupted conversion to partitions left on weather_logs.");
    }
    Ok(())
}

/// In a migration's transaction: the partitions for the days ahead, if `weather_logs` is
/// partitioned. Returns how many were created.
pub async fn create_ahead(tx: &impl GenericClient) -> Result<i64, DbError> {
    if !is_partitioned(tx).await? {
        return Ok(0);
    }
    let row = tx
        .query_one(
            "SELECT count(*) FROM weather_logs_maintain(now(), $1, NULL, false)",
            &[&AHEAD_DAYS],
        )
        .await
        .map_err(DbError::pg("apply migration: create the partitions ahead"))?;
    Ok(row.get(0))
}

/// What `consumer maintain` did.
#[derive(Debug, Default)]
pub struct Maintained {
    /// The conversion of `weather_logs` to partitions, if this run did it.
    pub conversion: Option<Conversion>,
    /// Partitions created, dropped or detached.
    pub changes: Vec<Change>,
    /// Readings moved back from `weather_logs_catchup` into their days.
    pub caught_up: u64,
    /// Another run held the maintenance's lock: this one did nothing.
    pub busy: bool,
}

impl std::fmt::Display for Maintained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(c) = &self.conversion {
            writeln!(
                f,
                "weather_logs partitioned by day from {} (index built in {:.1} s, cutover validated in {:.1} s, while writers went on; then the lock waited {} ms and was held {} ms)",
                c.cutover,
                c.index_build.as_secs_f64(),
                c.validation.as_secs_f64(),
                c.lock_wait.as_millis(),
                c.switch.as_millis()
            )?;
        }
        for c in &self.changes {
            writeln!(f, "{} {}", c.action, c.partition)?;
        }
        if self.caught_up > 0 {
            writeln!(
                f,
                "moved {} readings back from weather_logs_catchup",
                self.caught_up
            )?;
        }
        match self.busy {
            true => write!(f, "another maintenance run is in progress; nothing done"),
            false => write!(f, "partitions of weather_logs maintained"),
        }
    }
}

/// Rows moved back from `weather_logs_catchup` per transaction.
const CATCH_UP_BATCH: i64 = 10_000;

/// `consumer maintain` (and `consumer migrate`): converts `weather_logs` if it is not partitioned
/// yet ([`convert`], unbounded), then creates the partitions up to [`AHEAD_DAYS`] after today
/// and, with `postgres.retention`, drops those whose day ended before it (bounded by
/// [`PostgresConfig::attempt_limit`]), then moves back any readings that waited in
/// `weather_logs_catchup` (a batch per transaction, each bounded by the statement timeout).
pub async fn maintain(cfg: &PostgresConfig, client: &Client) -> Result<Maintained, DbError> {
    let schema = cfg.schema.as_str();
    // One run at a time, for all of it (the catch-up too); another one running is not an error.
    let mine: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&CONVERSION_LOCK, &schema],
        )
        .await
        .map_err(DbError::pg("lock the maintenance"))?
        .get(0);
    if !mine {
        info!(message = "Another run of the maintenance is in progress; leaving it to that one.");
        return Ok(Maintained {
            busy: true,
            ..Maintained::default()
        });
    }
    let done = maintain_locked(cfg, client).await;
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&CONVERSION_LOCK, &schema],
        )
        .await;
    done
}

async fn maintain_locked(cfg: &PostgresConfig, client: &Client) -> Result<Maintained, DbError> {
    let mut done = Maintained {
        conversion: convert(client, cfg.schema.as_str()).await?,
        ..Maintained::default()
    };
    done.caught_up += catch_up(client).await?;
    let limit = cfg.attempt_limit();
    let seconds = cfg.retention.map(|r| r.as_secs_f64());
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&AHEAD_DAYS, &seconds];
    let run = client.query(
        "SELECT action, partition FROM weather_logs_maintain(now(), $1, \
         CASE WHEN $2::float8 IS NULL THEN NULL ELSE make_interval(secs => $2::float8) END)",
        &params,
    );
    let rows = match tokio::time::timeout(limit, run).await {
        Ok(rows) => rows.map_err(DbError::pg("maintain the partitions of weather_logs"))?,
        Err(_) => return Err(DbError::Timeout("maintain the partitions", limit)),
    };
    done.changes = rows
        .iter()
        .map(|r| Change {
            action: r.get(0),
            partition: r.get(1),
        })
        .collect();
    for c in &done.changes {
        info!(
            message = "Maintained the partitions of weather_logs.",
            action = c.action,
            partition = c.partition
        );
    }
    done.caught_up += catch_up(client).await?;
    Ok(done)
}

/// Moves the readings of `weather_logs_catchup` (the catch-all of days ahead that received
/// readings of days without a partition: the maintenance had not run) back into `weather_logs`,
/// where their days now exist, [`CATCH_UP_BATCH`] per transaction, skipping any stored meanwhile
/// (a redelivery); then drops it. No lock beyond the rows'. Returns how many rows it moved.
async fn catch_up(client: &Client) -> Result<u64, DbError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('weather_logs_catchup') IS NOT NULL",
            &[],
        )
        .await
        .map_err(DbError::pg("look for weather_logs_catchup"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let mut moved = 0;
    loop {
        let n = client
            .execute(
                "WITH batch AS (DELETE FROM weather_logs_catchup WHERE ctid = ANY(ARRAY(\
                   SELECT ctid FROM weather_logs_catchup LIMIT $1)) RETURNING *) \
                 INSERT INTO weather_logs SELECT * FROM batch ON CONFLICT DO NOTHING",
                &[&CATCH_UP_BATCH],
            )
            .await
            .map_err(DbError::pg("move readings back from weather_logs_catchup"))?;
        moved += n;
        let left: bool = client
            .query_one("SELECT EXISTS (SELECT FROM weather_logs_catchup)", &[])
            .await
            .map_err(DbError::pg("look into weather_logs_catchup"))?
            .get(0);
        if !left {
            break;
        }
    }
    locked(
        client,
        "DROP TABLE weather_logs_catchup",
        "drop weather_logs_catchup",
    )
    .await?;
    info!(
        message = "Moved the readings of weather_logs_catchup into their days.",
        moved
    );
    Ok(moved)
}
