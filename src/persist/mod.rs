//! The persister: moves claim records from every shard's log stream in Redis into the
//! database, in every gateway instance, off the request path.
//!
//! Invariant kept here: a claim record leaves Redis only after the database transaction
//! holding it has committed (read with a consumer group -> write idempotently -> ack+delete),
//! so every claim acknowledged to a client ends up in the database exactly once:
//! - a write that fails keeps the records in memory and is retried with exponential backoff
//!   (they are not read again), while the claim path goes on untouched and the backlog grows;
//! - records a crashed instance read but never acked stay pending in the consumer group and
//!   are taken over (XAUTOCLAIM) after `min_idle_ms`; writing them twice is a no-op;
//! - a record that cannot be parsed is never written, never acked and never dropped: it stays
//!   pending (visible in the backlog and lag), is counted in `PERSIST_ERRORS{stage="parse"}`
//!   and logged each time it is redelivered, until an operator repairs it.

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
use crate::stock::FaultReporter;
use crate::store::{Db, DbError};

/// Shortest time a failed ack of committed records is retried before they are left to
/// redelivery (harmless: idempotent). The retry window is `max(min_idle_ms, this)`.
const ACK_RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest pause between polls of a shard whose log was empty.
const IDLE_POLL_MAX: Duration = Duration::from_millis(1000);
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
        Self::spawn_reporting(backend, db, cfg, shutdown, FaultReporter::disabled())
    }

    /// [`Persister::spawn`], reporting the shards it finds lost or rolled back (a claim
    /// counter below what the database holds) to `faults`.
    pub fn spawn_reporting<B: Backend>(
        backend: Arc<B>,
        db: Db,
        cfg: PersisterConfig,
        shutdown: CancellationToken,
        faults: FaultReporter,
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
