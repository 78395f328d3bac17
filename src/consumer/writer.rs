//! The writer: takes each batch in order, stores its valid readings in PostgreSQL (retrying
//! until it works or shutdown comes), dead-letters the invalid ones, and settles what succeeded.
//! What did not succeed is left unsettled; settlement makes sure no later acknowledgement covers
//! it, and the broker redelivers it once the link closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::dead_letter::{DeadLetter, Invalid, Raw};
use super::settle::Link;
use crate::config::ConsumerConfig;
use crate::db::{Db, DbError, Stored};
use crate::health::Health;
use crate::metrics::ConsumerMetrics;
use crate::reading::{Reading, RejectReason, Rejection};
use crate::retry;
use crate::secret::Secret;
use crate::telemetry::LogLimiter;

/// One delivery, decoded.
pub struct Delivered {
    pub tag: u64,
    pub redelivered: bool,
    pub raw: Raw,
    pub reading: Result<Reading, Rejection>,
}

/// Deliveries of one link, written and settled together.
pub struct Batch {
    pub link: Arc<Link>,
    pub items: Vec<Delivered>,
}

pub struct Writer {
    /// `None` until connected, and after a failure that may have left the connection unusable.
    pub db: Option<Db>,
    pub cfg: ConsumerConfig,
    pub password: Option<Secret>,
    pub metrics: Arc<ConsumerMetrics>,
    pub health: Arc<Health>,
    pub token: CancellationToken,
    pub dead_letter: DeadLetter,
    pub error_log: LogLimiter,
    /// A reading PostgreSQL accepted (the last batch's first stored one, or the table's latest),
    /// to tell a refusal of one row from a refusal of all: see [`Db::insert_isolating`].
    pub last_stored: Option<Reading>,
}

impl Writer {
    pub async fn run(mut self, mut rx: mpsc::Receiver<Batch>) {
        loop {
            self.health.work_done();
            let retry_at = self.dead_letter.retry_at();
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => {
                        self.health.work_started();
                        self.write(batch).await;
                    }
                    None => break,
                },
                _ = crate::batch::sleep_until(retry_at) => {
                    self.health.work_started();
                    if let Some((link, tags)) = self.dead_letter.retry(&self.metrics).await {
                        settle(&link, &tags).await;
                    }
                }
            }
        }
        self.dead_letter.close().await;
        if self.dead_letter.holding() > 0 {
            warn!(
                message =
                    "Stopping with messages not dead-lettered; the broker will redeliver them.",
                held = self.dead_letter.holding()
            );
        }
    }

    async fn write(&mut self, batch: Batch) {
        let Batch { link, items } = batch;
        let size = items.len();
        if link.is_released() {
            // Its channel is closed: the broker has requeued all of it already.
            debug!(
                message = "Dropping a batch of a closed channel; it will be redelivered.",
                batch_size = size
            );
            return;
        }
        let mut rows = Vec::with_capacity(size);
        let mut row_items = Vec::with_capacity(size);
        let mut invalid = Vec::new();
        let mut redelivered = false;
        for item in items {
            redelivered |= item.redelivered;
            match item.reading {
                Ok(reading) => {
                    rows.push(reading);
                    row_items.push((item.tag, item.raw));
                }
                Err(rejection) => invalid.push(Invalid {
                    tag: item.tag,
                    raw: item.raw,
                    rejection,
                }),
            }
        }
        let started = Instant::now();
        let Some(refused) = self.store(&rows, redelivered, &link).await else {
            return;
        };
        let elapsed = started.elapsed();
        if link.is_released() {
            // Stored, harmlessly (redelivered rows are skipped), but the channel closed while
            // the insert ran: every delivery of it is requeued, the invalid ones included.
            debug!(
                message = "Stored a batch of a closed channel; it will be redelivered.",
                batch_size = size
            );
            return;
        }
        let refused_rows: Vec<usize> = refused.iter().map(|(i, _)| *i).collect();
        let mut refused = refused.into_iter().peekable();
        let mut tags = Vec::with_capacity(size);
        for (index, (tag, raw)) in row_items.into_iter().enumerate() {
            match refused.next_if(|(i, _)| *i == index) {
                Some((_, message)) => invalid.push(Invalid {
                    tag,
                    raw,
                    rejection: Rejection::new(RejectReason::DatabaseRejected, message),
                }),
                None => tags.push(tag),
            }
        }
        let stored = tags.len();
        // Stored: progress. Dead-lettering and acknowledging are bounded steps of their own.
        self.health.work_started();
        tags.extend(self.dead_letter.send(&link, invalid, &self.metrics).await);
        self.health.work_started();
        if settle(&link, &tags).await {
            let m = &self.metrics;
            m.processed.inc_by(stored as u64);
            m.batch_size.observe(size as f64);
            m.insert_duration.observe(elapsed.as_secs_f64());
            let committed = time::OffsetDateTime::now_utc();
            let stored_rows = rows
                .iter()
                .enumerate()
                .filter(|(i, _)| !refused_rows.contains(i))
                .filter_map(|(_, r)| r.measured_at);
            m.observe_end_to_end(stored_rows, committed);
            if stored > 0 {
                // A batch of dead letters only stored nothing: the gauge is for the last commit.
                m.last_commit.set(committed.unix_timestamp() as f64);
            }
            m.last_batch.store(size as u64, Ordering::Relaxed);
            m.last_batch_micros
                .store(elapsed.as_micros() as u64, Ordering::Relaxed);
            debug!(
                message = "Stored a batch.",
                batch_size = size,
                stored,
                held = self.dead_letter.holding(),
                elapsed_ms = elapsed.as_millis() as u64
            );
        }
    }

    /// Stores rows, retrying until it works. Returns the indexes of the rows PostgreSQL refused,
    /// in order, or `None` when it gives up: shutdown came, or `link` closed (its deliveries
    /// are requeued), while PostgreSQL was unavailable. Every failed attempt counts in
    /// `postgres_insert_errors_total`, reconnects included.
    async fn store(
        &mut self,
        rows: &[Reading],
        maybe_stored: bool,
        link: &Link,
    ) -> Option<Vec<(usize, String)>> {
        if rows.is_empty() {
            return Some(Vec::new());
        }
        let mut delays = retry::delays(&self.cfg.retry);
        loop {
            self.health.work_started();
            match self.try_store(rows, maybe_stored).await {
                Ok(stored) => {
                    let accepted = (rows.len() - stored.rejected.len()) as u64;
                    let conflicting = stored.conflicting.len() as u64;
                    self.metrics.rows_inserted.inc_by(stored.inserted);
                    self.metrics.duplicates.inc_by(
                        accepted
                            .saturating_sub(stored.inserted)
                            .saturating_sub(conflicting),
                    );
                    if conflicting > 0 {
                        self.metrics.conflicting.inc_by(conflicting);
                        // A few ids name it; rate-limited like other errors (a publisher
                        // reusing ids on purpose could send nothing else).
                        let ids: Vec<String> = stored
                            .conflicting
                            .iter()
                            .take(5)
                            .map(ToString::to_string)
                            .collect();
                        if let Some(suppressed) = self.error_log.allow(Instant::now()) {
                            error!(message = "Readings reuse the id of a different stored reading; the stored one is kept and these are acknowledged unstored.", conflicting, first_ids = ids.join(","), error_type = "id_conflict", stage = "sending", suppressed);
                        }
                    }
                    self.metrics.refusing_all.set(0);
                    self.health.set_problem(None);
                    let mut refused = stored.rejected;
                    refused.sort_by_key(|(i, _)| *i);
                    let stored = (0..rows.len())
                        .filter(|i| refused.binary_search_by_key(i, |(r, _)| *r).is_err());
                    if let Some(ok) = stored.clone().next() {
                        self.last_stored = Some(rows[ok].clone());
                    }
                    self.metrics
                        .stations_heard(stored.map(|i| rows[i].station_id.as_str()));
                    return Some(refused);
                }
                Err(e) => {
                    self.metrics
                        .refusing_all
                        .set(i64::from(matches!(e, DbError::Systematic(_))));
                    // A connection that failed or timed out may be dead or mid-statement: never
                    // reuse it. The next attempt connects afresh.
                    self.db = None;
                    self.metrics
                        .insert_errors
                        .with_label_values(&[e.error_type()])
                        .inc();
                    self.health.set_problem(Some(e.problem()));
                    if let Some(suppressed) = self.error_log.allow(Instant::now()) {
                        if e.is_outage() {
                            warn!(message = "Failed to insert batch; will retry.", error = %e, error_type = e.error_type(), stage = "sending", batch_size = rows.len(), suppressed);
                        } else {
                            error!(message = "Failed to insert batch, and not because PostgreSQL is away; will retry.", error = %e, error_type = e.error_type(), stage = "sending", batch_size = rows.len(), suppressed);
                        }
                    }
                    // The attempt ended: progress, and the pause is a healthy wait. (Counted from
                    // the attempt's start instead, an attempt and a pause together outlasted the
                    // watchdog with the shipped defaults.)
                    self.health.work_started();
                    if self.token.is_cancelled() || !retry::pause(&mut delays, &self.token).await {
                        warn!(
                            message = "Shutting down with a batch not stored; the broker will redeliver it.",
                            batch_size = rows.len()
                        );
                        return None;
                    }
                    if link.is_released() {
                        debug!(
                            message =
                                "Giving up a batch of a closed channel; it will be redelivered.",
                            batch_size = rows.len()
                        );
                        return None;
                    }
                }
            }
        }
    }

    async fn try_store(&mut self, rows: &[Reading], maybe_stored: bool) -> Result<Stored, DbError> {
        let db = match self.db.take() {
            Some(db) if !db.is_closed() => db,
            _ => {
                let db = Db::connect(&self.cfg.postgres, self.password.as_ref())
                    .await
                    .inspect_err(|_| self.metrics.postgres_connection_errors.inc())?;
                info!("Connected to PostgreSQL again.");
                if self.last_stored.is_none() {
                    self.health.work_started();
                    self.last_stored = db.latest().await;
                }
                db
            }
        };
        // Connected: progress. So is every statement of the insert.
        self.health.work_started();
        let built_in = crate::db::reference_reading();
        let references: Vec<&Reading> = self.last_stored.iter().chain([&built_in]).collect();
        let health = &self.health;
        let result = db
            .insert_isolating(rows, maybe_stored, &references, || health.work_started())
            .await;
        self.db = Some(db);
        result
    }
}

/// Settles `tags` on `link`; `false` if the acknowledgement could not be sent.
async fn settle(link: &Link, tags: &[u64]) -> bool {
    match link.settle(tags).await {
        Ok(()) => true,
        Err(e) => {
            // The channel is gone, so the broker redelivers; stored rows are then skipped.
            warn!(message = "Could not acknowledge; the broker will redeliver what was not acknowledged.", error = %e, settled = tags.len());
            false
        }
    }
}
