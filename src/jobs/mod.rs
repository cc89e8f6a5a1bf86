//! Bulk grant jobs: an upload of users spooled to the database ([`upload`]), then run
//! chunk by chunk through the claim path's stock layer (`Stock::claim`, the one claim
//! script: same stock, same limits), many claims in flight (`grants.concurrency` per
//! instance), checkpointed after every chunk, and resumed by any instance after a crash.
//!
//! Invariants kept here:
//! - a grant is only ever made by the claim script, with the request id `~g.<job id>`: the
//!   script keys its request-id record by user AND request id, so each (job, user) has one
//!   record, and a claim repeated for it (a retry, a chunk re-run after a crash, a resumed
//!   job) replays the coupon instead of granting a second one; `~` is outside the client
//!   alphabet, so no client request can collide with a job's;
//! - each claim carries the nonce `<job>.<chunk>.<index>` of its line, so a replay tells this
//!   line's own earlier grant (counted `granted`) from the same user on an earlier line of
//!   the job (a duplicate, counted `failed`);
//! - a chunk's outcomes are counted in the same statement that moves the job's cursor past
//!   it, by the instance holding the job's lease (`store::grants`): a chunk is counted once,
//!   and a job's counts add up to its users once it is `done`;
//! - every wait is bounded: per-user retries (`grants.max_attempts`, backoff), the lease
//!   (`grants.lease_ms`), and every loop stops at shutdown (the lease is then given up, so
//!   the next instance resumes at once).

pub mod upload;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::upload::{JobFailure, LineFormat, Spool};
use crate::backend::{Backend, BackendError};
use crate::catalog::cache::CachedBatch;
use crate::catalog::{Catalog, CatalogError};
use crate::config::{Config, GrantsConfig};
use crate::contract::claim::Outcome;
use crate::domain::ids::{INTERNAL_REQUEST_ID, home_shard};
use crate::domain::time::Timestamp;
use crate::obs::events::{GrantJobEvent, GrantsDecided};
use crate::stock::{ClaimArgs, ClaimResult, Stock, StockError};
use crate::store::{Db, DbError, GrantCounts, GrantJobRow, JobState, now_ms};

/// Largest pause between two attempts of one user's claim.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Orphaned jobs one look picks up at most (the next look takes the rest).
const RESUME_BATCH: i64 = 16;

#[derive(Debug, Error)]
pub enum GrantError {
    #[error("a job takes at most {0} users")]
    TooManyUsers(u64),
    /// With why the first invalid line was refused, if there was one.
    #[error("the upload holds no valid user id{0}")]
    Empty(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    Internal(String),
}

/// The request id of every claim of job `job` (see the module documentation).
pub fn request_id(job: &str) -> String {
    format!("{INTERNAL_REQUEST_ID}g.{job}")
}

/// What one user's grant came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decided {
    Granted,
    SkippedLimit,
    SkippedSoldOut,
    Failed(String),
}

/// Why a chunk's run stopped before every user was decided (nothing of it is counted; the
/// chunk runs again when the job resumes).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stopped {
    /// The gateway is shutting down.
    Shutdown,
    /// The backend lost the batch (served as lost until `claimgate rebuild`).
    Lost,
}

/// The outcomes of part of a chunk, and its first failures.
#[derive(Debug, Default)]
struct Tally {
    counts: GrantCounts,
    failures: Vec<JobFailure>,
}

impl Tally {
    fn add(&mut self, user: &str, d: Decided, keep: usize) {
        match d {
            Decided::Granted => self.counts.granted += 1,
            Decided::SkippedLimit => self.counts.skipped_limit += 1,
            Decided::SkippedSoldOut => self.counts.skipped_sold_out += 1,
            Decided::Failed(reason) => {
                self.counts.failed += 1;
                if self.failures.len() < keep {
                    self.failures.push(JobFailure {
                        line: None,
                        user_id: Some(user.to_string()),
                        reason,
                    });
                }
            }
        }
    }

    fn merge(&mut self, o: Tally, keep: usize) {
        self.counts.add(&o.counts);
        let room = keep.saturating_sub(self.failures.len());
        self.failures.extend(o.failures.into_iter().take(room));
    }
}

/// The grant jobs of one instance: it takes uploads, runs jobs, and resumes orphaned ones.
pub struct Grants<B: Backend> {
    cfg: GrantsConfig,
    /// `persister.max_backlog_per_shard`, formatted for the claim script.
    max_log: String,
    stock: Arc<Stock<B>>,
    catalog: Arc<Catalog<B>>,
    store: Db,
    /// This instance's name on the leases it takes.
    instance: String,
    /// Grant claims in flight on this instance (all jobs).
    permits: Arc<Semaphore>,
    /// Jobs this instance runs now.
    running: Mutex<HashSet<String>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl<B: Backend> Grants<B> {
    pub fn new(
        cfg: &Config,
        stock: Arc<Stock<B>>,
        catalog: Arc<Catalog<B>>,
        store: Db,
    ) -> Grants<B> {
        Grants {
            cfg: cfg.grants.clone(),
            max_log: cfg.persister.max_backlog_per_shard.to_string(),
            stock,
            catalog,
            store,
            instance: format!("{:016x}", rand::random::<u64>()),
            permits: Arc::new(Semaphore::new(cfg.grants.concurrency)),
            running: Mutex::new(HashSet::new()),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    pub fn config(&self) -> &GrantsConfig {
        &self.cfg
    }

    /// A new job on `batch` receiving an upload (404 for a batch that does not exist, 503
    /// for one the backend lost).
    pub async fn begin(&self, batch: &str, format: LineFormat) -> Result<Spool, GrantError> {
        self.catalog.load_live(batch).await?;
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        self.store.insert_grant_job(&id, batch, now_ms()).await?;
        Ok(Spool::new(
            self.store.clone(),
            id,
            batch.to_string(),
            format,
            &self.cfg,
        ))
    }

    /// The upload is complete: the job starts (on this instance) and its id is returned.
    pub async fn submit(self: &Arc<Self>, spool: &mut Spool) -> Result<JobStarted, GrantError> {
        let spooled = spool.finish().await?;
        if !self
            .store
            .open_grant_job(&spool.job, &spooled, now_ms())
            .await?
        {
            return Err(GrantError::Internal(format!(
                "job {} was no longer receiving its upload",
                spool.job
            )));
        }
        GrantJobEvent {
            event: "submitted",
            job: &spool.job,
            batch: &spool.batch,
            detail: "",
        }
        .emit();
        self.launch(spool.job.clone());
        Ok(JobStarted {
            job_id: spool.job.clone(),
            batch_id: spool.batch.clone(),
            total: spooled.total,
        })
    }

    /// An upload refused or broken off: its job and spooled users go (best effort: what
    /// stays is marked failed by the stale-upload check).
    pub async fn abandon(&self, spool: &Spool) {
        if let Err(e) = self.store.drop_grant_job(&spool.job).await {
            tracing::warn!(job = %spool.job, error = %e, "could not remove a refused upload");
        }
    }

    /// One job, as stored.
    pub async fn job(&self, id: &str) -> Result<Option<GrantJobRow>, GrantError> {
        Ok(self.store.grant_job(id).await?)
    }

    /// Runs job `id` on this instance unless it already does (it runs only if its lease
    /// can be taken).
    pub fn launch(self: &Arc<Self>, id: String) {
        if self.stop.is_cancelled() || !self.running.lock().insert(id.clone()) {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            me.run(&id).await;
            me.running.lock().remove(&id);
        });
    }

    /// One look for work: uploads that stopped arriving become failed, and running jobs
    /// whose lease ran out (their instance died) are resumed here.
    pub async fn resume_orphans(self: &Arc<Self>) {
        let now = now_ms();
        let stale = now - (self.cfg.upload_timeout_ms + self.cfg.lease_ms) as i64;
        match self.store.fail_stale_uploads(stale, now).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(uploads = n, "uploads interrupted mid-way marked failed"),
            Err(e) => tracing::warn!(error = %e, "stale upload check failed"),
        }
        match self.store.orphaned_grant_jobs(now, RESUME_BATCH).await {
            Ok(ids) => ids.into_iter().for_each(|id| self.launch(id)),
            Err(e) => tracing::warn!(error = %e, "looking for grant jobs to resume failed"),
        }
    }

    /// Stops every job run of this instance (between two claims) and waits for them, at
    /// most `bound`; their leases are given up, so another instance resumes them at once.
    pub async fn shutdown(&self, bound: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(bound, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("grant jobs did not stop within the grace period; their leases expire");
        }
    }

    /// Jobs this instance runs now.
    pub fn running(&self) -> usize {
        self.running.lock().len()
    }

    fn lease_until(&self) -> i64 {
        now_ms() + self.cfg.lease_ms as i64
    }

    /// Runs job `id` from its cursor to its end, a chunk at a time, while it holds the lease.
    async fn run(self: &Arc<Self>, id: &str) {
        let owner = self.instance.as_str();
        match self
            .store
            .lease_grant_job(id, owner, self.lease_until(), now_ms())
            .await
        {
            Ok(true) => {}
            Ok(false) => return, // another instance runs it, or it ended
            Err(e) => {
                tracing::warn!(job = id, error = %e, "could not lease a grant job");
                return;
            }
        }
        let why = self.run_leased(id).await;
        let interrupted = |detail: &str, batch: &str| {
            GrantJobEvent {
                event: "interrupted",
                job: id,
                batch,
                detail,
            }
            .emit()
        };
        match why {
            RunEnd::Ended => {}
            RunEnd::Interrupted { batch, detail } => interrupted(&detail, &batch),
            RunEnd::Shutdown { batch } => {
                interrupted("shutdown", &batch);
                if let Err(e) = self.store.release_grant_job(id, owner).await {
                    tracing::warn!(job = id, error = %e, "could not give up a grant job's lease");
                }
            }
        }
    }

    async fn run_leased(self: &Arc<Self>, id: &str) -> RunEnd {
        let owner = self.instance.as_str();
        let job = match self.store.grant_job(id).await {
            Ok(Some(j)) if j.state == JobState::Running => j,
            Ok(_) => return RunEnd::Ended,
            Err(e) => return RunEnd::interrupted("", e),
        };
        let batch = job.batch_id.clone();
        let keep = self.cfg.max_errors;
        let mut failures: Vec<JobFailure> = serde_json::from_str(&job.errors).unwrap_or_default();
        let mut next = job.next_chunk;
        GrantJobEvent {
            event: if next == 0 { "started" } else { "resumed" },
            job: id,
            batch: &batch,
            detail: "",
        }
        .emit();
        loop {
            if self.stop.is_cancelled() {
                return RunEnd::Shutdown { batch };
            }
            if next >= job.chunks {
                return self.finish(id, &batch, JobState::Done, None).await;
            }
            let entry = match self.catalog.load_live(&batch).await {
                Ok(e) => e,
                Err(CatalogError::NotFound) => {
                    let reason = format!("batch {batch} not found");
                    return self
                        .finish(id, &batch, JobState::Failed, Some(&reason))
                        .await;
                }
                // Lost, or the backend/database failing: resumed after the lease.
                Err(e) => return RunEnd::interrupted(&batch, e),
            };
            let users = match self.store.grant_chunk(id, next).await {
                Ok(Some(u)) => u,
                Ok(None) => {
                    let reason = format!("spooled chunk {next} is missing");
                    return self
                        .finish(id, &batch, JobState::Failed, Some(&reason))
                        .await;
                }
                Err(e) => return RunEnd::interrupted(&batch, e),
            };
            let tally = match self.run_chunk(&entry, id, next, &users).await {
                Ok(t) => t,
                Err(Stopped::Shutdown) => return RunEnd::Shutdown { batch },
                Err(Stopped::Lost) => {
                    self.catalog.mark_lost(&entry);
                    return RunEnd::interrupted(&batch, format!("batch {batch} lost"));
                }
            };
            let room = keep.saturating_sub(failures.len());
            failures.extend(tally.failures.into_iter().take(room));
            let errors = serde_json::to_string(&failures).unwrap_or_else(|_| "[]".into());
            match self
                .store
                .commit_grant_chunk(
                    id,
                    owner,
                    next,
                    &tally.counts,
                    &errors,
                    self.lease_until(),
                    now_ms(),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => return RunEnd::interrupted(&batch, "lease lost"),
                Err(e) => return RunEnd::interrupted(&batch, e),
            }
            GrantsDecided {
                granted: tally.counts.granted,
                skipped_limit: tally.counts.skipped_limit,
                skipped_sold_out: tally.counts.skipped_sold_out,
                failed: tally.counts.failed,
            }
            .emit();
            next += 1;
        }
    }

    async fn finish(&self, id: &str, batch: &str, state: JobState, reason: Option<&str>) -> RunEnd {
        match self
            .store
            .finish_grant_job(id, &self.instance, state, reason, now_ms())
            .await
        {
            Ok(true) => {
                GrantJobEvent {
                    event: state.as_str(),
                    job: id,
                    batch,
                    detail: reason.unwrap_or(""),
                }
                .emit();
                RunEnd::Ended
            }
            Ok(false) => RunEnd::interrupted(batch, "lease lost"),
            Err(e) => RunEnd::interrupted(batch, e),
        }
    }

    /// Every user of one chunk, `grants.concurrency` claims in flight (shared by every job
    /// of this instance). Either every user is decided, or the run stopped.
    async fn run_chunk(
        self: &Arc<Self>,
        entry: &Arc<CachedBatch>,
        job: &str,
        chunk: u64,
        users: &str,
    ) -> Result<Tally, Stopped> {
        let users: Arc<Vec<String>> = Arc::new(users.lines().map(str::to_string).collect());
        let cursor = Arc::new(AtomicUsize::new(0));
        let halt = Arc::new(AtomicBool::new(false));
        let rid: Arc<str> = Arc::from(request_id(job));
        let prefix: Arc<str> = Arc::from(format!("{job}.{chunk}."));
        let workers = self.cfg.concurrency.min(users.len());
        let keep = self.cfg.max_errors;
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (me, entry, users, cursor, halt, rid, prefix) = (
                self.clone(),
                entry.clone(),
                users.clone(),
                cursor.clone(),
                halt.clone(),
                rid.clone(),
                prefix.clone(),
            );
            set.spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let i = cursor.fetch_add(1, Ordering::Relaxed);
                    let Some(user) = users.get(i) else {
                        return Ok(tally);
                    };
                    if halt.load(Ordering::Relaxed) || me.stop.is_cancelled() {
                        return Err(Stopped::Shutdown);
                    }
                    let Ok(_permit) = me.permits.acquire().await else {
                        return Err(Stopped::Shutdown);
                    };
                    let nonce = format!("{prefix}{i}");
                    match me.grant_one(&entry, &rid, user, &nonce).await {
                        Ok(d) => tally.add(user, d, keep),
                        Err(stopped) => {
                            halt.store(true, Ordering::Relaxed);
                            return Err(stopped);
                        }
                    }
                }
            });
        }
        let mut total = Tally::default();
        let mut stopped = None;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(t)) => total.merge(t, keep),
                Ok(Err(s)) => {
                    // a lost batch says more than the shutdown it caused in the others
                    if stopped.is_none() || s == Stopped::Lost {
                        stopped = Some(s);
                    }
                }
                Err(e) => {
                    tracing::error!(job, error = %e, "a grant worker failed");
                    halt.store(true, Ordering::Relaxed);
                    stopped.get_or_insert(Stopped::Shutdown);
                }
            }
        }
        match stopped {
            Some(s) => Err(s),
            None => Ok(total),
        }
    }

    /// One user's grant: the claim script on the user's home shard (refills and the
    /// sold-out scan as for any claim), retried on transient failures with the same request
    /// id (a retry replays, never grants twice).
    async fn grant_one(
        &self,
        entry: &Arc<CachedBatch>,
        rid: &str,
        user: &str,
        nonce: &str,
    ) -> Result<Decided, Stopped> {
        let keys = &entry.keys;
        let home = home_shard(user, keys.shards.len() as u32);
        let mut pause = Duration::from_millis(self.cfg.backoff_ms);
        let attempts = self.cfg.max_attempts;
        for attempt in 1..=attempts {
            let transient = if entry.is_sold_out() {
                // Sold out: one read, so a grant this line made before (a resumed job)
                // still counts as granted; no claim (it would scan every shard).
                match self
                    .stock
                    .replay(keys, home, user, rid, entry.batch().ack)
                    .await
                {
                    Ok(Some(c)) => return Ok(mine(&c.minted_by, nonce)),
                    Ok(None) => return Ok(Decided::SkippedSoldOut),
                    Err(StockError::Backend(BackendError::Unavailable(m))) => m,
                    Err(e) => return Ok(Decided::Failed(e.to_string())),
                }
            } else {
                let args = ClaimArgs {
                    user,
                    request_id: rid,
                    max_log: &self.max_log,
                    nonce,
                    total: entry.batch().stock,
                    ack: entry.batch().ack,
                    day_offset_ms: entry.day_offset_ms(Timestamp(now_ms())),
                    // the job's request id repeats when the job resumes: a grant made
                    // before the shard dropped its record is found in the database
                    fresh_request_id: false,
                };
                match self.stock.claim(keys, home, &args).await {
                    Ok(ClaimResult::Decided(o)) => match o {
                        Outcome::Claimed(_) => return Ok(Decided::Granted),
                        Outcome::Replayed(c) => return Ok(mine(&c.minted_by, nonce)),
                        Outcome::LimitReached | Outcome::DailyLimitReached => {
                            return Ok(Decided::SkippedLimit);
                        }
                        Outcome::NoBatch => return Err(Stopped::Lost),
                        Outcome::NotStarted => {
                            return Ok(failed("the claim window has not started"));
                        }
                        Outcome::Ended => return Ok(failed("the claim window has ended")),
                        Outcome::Paused => return Ok(failed("the batch is paused")),
                        Outcome::Denied => {
                            return Ok(failed("user is not eligible for this batch"));
                        }
                        Outcome::ShardEmpty => {
                            return Ok(failed("claim resolved to an empty shard"));
                        }
                        // resolved by the claim (the shard is fenced): never seen here
                        Outcome::RolledBack | Outcome::AskDatabase => {
                            return Ok(failed(&format!("claim resolved to {o:?}")));
                        }
                        Outcome::BacklogFull => "persistence backlog at its bound".to_string(),
                    },
                    Ok(ClaimResult::SoldOut) => {
                        entry.set_sold_out();
                        return Ok(Decided::SkippedSoldOut);
                    }
                    Ok(ClaimResult::Contended) => "stock is being rebalanced".to_string(),
                    Ok(ClaimResult::ShardFenced) => {
                        "the user's shard is being repaired".to_string()
                    }
                    Err(StockError::Backend(BackendError::Unavailable(m))) => m,
                    // on the primary, not yet on a replica: the same request id replays it
                    Err(StockError::Backend(e @ BackendError::NotReplicated { .. })) => {
                        e.to_string()
                    }
                    Err(StockError::NotFound) => return Err(Stopped::Lost),
                    Err(e) => return Ok(Decided::Failed(e.to_string())),
                }
            };
            if attempt == attempts {
                return Ok(Decided::Failed(format!(
                    "after {attempts} attempts: {transient}"
                )));
            }
            let jitter = rand::random::<u64>() % (pause.as_millis() as u64 / 2 + 1);
            let wait = pause + Duration::from_millis(jitter);
            tokio::select! {
                _ = self.stop.cancelled() => return Err(Stopped::Shutdown),
                _ = tokio::time::sleep(wait) => {}
            }
            pause = (pause * 2).min(BACKOFF_MAX);
        }
        Ok(failed("no attempt made"))
    }
}

/// A replayed grant: this line's own (or one whose nonce was not kept: a batch restored by
/// `claimgate rebuild`), or the same user on an earlier line of the job.
fn mine(minted_by: &str, nonce: &str) -> Decided {
    if minted_by == nonce || minted_by.is_empty() {
        Decided::Granted
    } else {
        failed("duplicate: the user was granted on an earlier line of this job")
    }
}

fn failed(reason: &str) -> Decided {
    Decided::Failed(reason.to_string())
}

/// How a run of a job ended.
enum RunEnd {
    /// The job is done or failed (or was not this instance's to run).
    Ended,
    /// Stopped for a reason that passes (the database or backend failing, the batch lost,
    /// the lease lost): the job resumes when its lease runs out.
    Interrupted { batch: String, detail: String },
    /// The gateway is stopping.
    Shutdown { batch: String },
}

impl RunEnd {
    fn interrupted(batch: &str, detail: impl std::fmt::Display) -> RunEnd {
        RunEnd::Interrupted {
            batch: batch.to_string(),
            detail: detail.to_string(),
        }
    }
}

/// A job accepted: its id, batch and the lines it counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStarted {
    pub job_id: String,
    pub batch_id: String,
    pub total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_told_apart_by_nonce() {
        assert_eq!(mine("j.0.3", "j.0.3"), Decided::Granted);
        assert_eq!(mine("", "j.0.3"), Decided::Granted);
        assert!(matches!(mine("j.0.1", "j.0.3"), Decided::Failed(_)));
        assert!(request_id("abc").starts_with('~'));
    }

    #[test]
    fn tallies_keep_the_first_failures_and_count_all() {
        let mut a = Tally::default();
        for i in 0..5 {
            a.add(&format!("u{i}"), failed("x"), 2);
        }
        a.add("g", Decided::Granted, 2);
        let mut b = Tally::default();
        b.add("s", Decided::SkippedSoldOut, 2);
        b.add("l", Decided::SkippedLimit, 2);
        b.add("f", failed("y"), 2);
        a.merge(b, 3);
        assert_eq!(a.counts.sum(), 9);
        assert_eq!(
            (
                a.counts.granted,
                a.counts.skipped_limit,
                a.counts.skipped_sold_out,
                a.counts.failed
            ),
            (1, 1, 1, 6)
        );
        assert_eq!(a.failures.len(), 3);
    }
}
