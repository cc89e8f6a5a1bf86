//! The persister: moves claim records, and the change records of coupons whose state lives
//! in Redis (managed coupons), from every shard's log stream in Redis into the database, in
//! every gateway instance, off the request path.
//!
//! Invariant kept here: a record leaves Redis only after the database transaction holding
//! it has committed (read with a consumer group -> write idempotently -> ack+delete), so
//! every claim acknowledged to a client, and every change of a managed coupon, ends up in
//! the database exactly once:
//! - a write that fails keeps the records in memory and is retried with exponential backoff
//!   (they are not read again), while the claim path goes on untouched and the backlog grows;
//! - records a crashed instance read but never acked stay pending in the consumer group and
//!   are taken over (XAUTOCLAIM) after `min_idle_ms`; writing them twice is a no-op;
//! - a record that cannot be parsed is never written, never acked and never dropped: it stays
//!   pending (visible in the backlog and lag), is counted in `PERSIST_ERRORS{stage="parse"}`
//!   and logged each time it is redelivered, until an operator repairs it;
//! - a change record whose coupon the database does not hold yet (its claim not recorded)
//!   is likewise kept pending and reported (`stage="write"`) each time it is taken over,
//!   the rest of its batch written without it.
//!
//! What it reads (the cost scales with activity, not with history):
//! - **active** shards are read when woken: by a claim minted in this instance
//!   ([`crate::stock::ClaimActivity`], so a claim reaches the database within
//!   `flush_interval_ms`, a new batch's too), by the probe task finding records in a log
//!   (claims of other gateways: within `probe_interval_ms`), again at once while a read
//!   finds records, and by a safety sweep at least every `sweep_interval_ms` (a wake-up is a
//!   hint, never the only path);
//! - a batch is **dormant** when it is out of service (its claim window ended more than
//!   `dormant_after_ms` ago or starts more than that far ahead, or it was paused more than
//!   that long ago), no grant job of it is receiving or running, nothing of it is buffered
//!   or unacked here, and every log of it was found empty. Its shards are neither read nor
//!   probed each pass; the probe task looks at each once per `dormant_sweep_ms`;
//! - a dormant batch becomes active again on anything that can make it receive records: a
//!   change of its database row (a patch that re-opens or extends its window or resumes it,
//!   a re-create, a rebuild or repair moving its epoch: `version`, `epoch`, `updated_at`,
//!   `setup_done_at`, read every `batch_refresh_ms`), a grant job, a claim of this instance
//!   on it, or records found in its log by the dormant sweep. Woken, its shards are read at
//!   once (with takeover of pending records).
//!
//! Files: [`worker`] (the loop: read, write, ack), [`prober`] (backlog and lag, in a task of
//! its own), [`status`] (what `/readyz` shows). The log's scripts and the record format are
//! `crate::contract`'s (`log_read`, `log_ack`, `claim_record`).

mod prober;
mod status;
mod worker;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::prober::{ProbeTargets, Prober};
pub use self::status::{PersistSnapshot, PersistStatus};
use self::worker::Worker;
use crate::backend::{Backend, BackendError};
use crate::config::PersisterConfig;
use crate::obs::events::RepeatFilter;
use crate::stock::{ClaimActivity, FaultReporter};
use crate::store::{Db, DbError};

/// Shortest time a failed ack of committed records is retried before they are left to
/// redelivery (harmless: idempotent). The retry window is `max(min_idle_ms, this)`.
const ACK_RETRY_MIN: Duration = Duration::from_secs(5);
/// Reads of a shard that take over pending records at once (min idle 0) after its reader
/// (re)started or a read of it failed: a read whose reply was lost left records pending
/// with this consumer, which would otherwise wait `min_idle_ms` for a takeover.
const RECOVERY_READS: u32 = 3;
/// Same error logged again at most this often (the metric counts every occurrence).
const LOG_REPEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum PersistError {
    #[error("redis: {0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("database write timed out after {0:?}")]
    Timeout(Duration),
    #[error("the persister is not running")]
    Stopped,
}

/// Starts persisters.
pub struct Persister;

impl Persister {
    /// Spawns the persister loop on the current Tokio runtime (nothing runs when
    /// `cfg.enabled` is false). It stops when `shutdown` is cancelled, after writing and
    /// acking what it had read.
    pub fn spawn<B: Backend>(
        backend: Arc<B>,
        db: Db,
        cfg: PersisterConfig,
        shutdown: CancellationToken,
    ) -> PersisterHandle {
        Self::spawn_reporting(
            backend,
            db,
            cfg,
            shutdown,
            FaultReporter::disabled(),
            ClaimActivity::new(),
        )
    }

    /// [`Persister::spawn`], reporting the shards it finds lost or rolled back (a claim
    /// counter below what the database holds) to `faults`, and woken by the claims of this
    /// instance through `activity` (the board the claim path's `Stock` hints).
    pub fn spawn_reporting<B: Backend>(
        backend: Arc<B>,
        db: Db,
        cfg: PersisterConfig,
        shutdown: CancellationToken,
        faults: FaultReporter,
        activity: ClaimActivity,
    ) -> PersisterHandle {
        let status = Arc::new(PersistStatus::default());
        let (tx, rx) = mpsc::channel(8);
        if !cfg.enabled {
            return PersisterHandle {
                status,
                commands: tx,
                task: None,
            };
        }
        status.running.store(true, Ordering::Relaxed);
        status.db_ok.store(true, Ordering::Relaxed);
        status.stall_ms.store(cfg.stall_ms, Ordering::Relaxed);
        status.caught_up();
        let targets = ProbeTargets::default();
        tokio::spawn(
            Prober {
                backend: backend.clone(),
                status: status.clone(),
                targets: targets.clone(),
                interval: Duration::from_millis(cfg.probe_interval_ms),
                shutdown: shutdown.clone(),
                log_filter: RepeatFilter::new(LOG_REPEAT),
                faults: faults.clone(),
                activity: activity.clone(),
                dormant_sweep: Duration::from_millis(cfg.dormant_sweep_ms),
                dormant_cursor: 0,
            }
            .run(),
        );
        let worker = Worker::new(
            backend,
            db,
            cfg,
            status.clone(),
            shutdown,
            rx,
            targets,
            faults,
            activity,
        );
        let task = tokio::spawn(worker.run());
        PersisterHandle {
            status,
            commands: tx,
            task: Some(task),
        }
    }
}

/// Control of a running persister.
pub struct PersisterHandle {
    status: Arc<PersistStatus>,
    commands: mpsc::Sender<Command>,
    task: Option<JoinHandle<()>>,
}

impl PersisterHandle {
    pub fn status(&self) -> Arc<PersistStatus> {
        self.status.clone()
    }

    /// Waits at most `limit` for the loop's first read of the batch list (every shard's
    /// floor known) and a probe pass over it (every shard found behind the database
    /// sealed); `false` when that did not happen in time (or the persister is off).
    pub async fn wait_refreshed(&self, limit: Duration) -> bool {
        let started = tokio::time::Instant::now();
        while self.task.is_some() && !self.status.probed.load(Ordering::Relaxed) {
            if started.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.task.is_some()
    }

    /// Reads every shard log until nothing is left for this consumer, writes and acks it all;
    /// returns the number of claims newly written. Waits through database retries. For tests
    /// and operator tooling.
    pub async fn flush(&self) -> Result<u64, PersistError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| PersistError::Stopped)?;
        rx.await.map_err(|_| PersistError::Stopped)?
    }

    /// Waits for the loop to end (after its shutdown token was cancelled).
    pub async fn join(self) {
        if let Some(task) = self.task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "persister task failed");
        }
    }
}

pub(crate) enum Command {
    Flush(oneshot::Sender<Result<u64, PersistError>>),
}
