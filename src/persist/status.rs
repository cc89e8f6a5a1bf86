//! What the persister shows `/readyz` and operators: a lock-free status updated by the
//! persister's loop and its probe task.
//!
//! Invariant kept here: whether the persister is stalled is derived from time, not from the
//! loop reporting it (a loop blocked in a database write cannot report anything).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

use crate::domain::time::now_ms;

/// Shared, lock-free view of the persister for `/readyz` and operators.
///
/// Backlog and lag are measured by a probe task of their own, so they stay fresh while the
/// persister's loop is blocked (e.g. in a database write waiting for a lock). Whether the
/// persister is stalled is derived from time, not from the loop reporting it: records wait
/// (`buffered` or `backlog` non-zero) and neither a write committed nor a read pass left
/// nothing to write for longer than `persister.stall_ms`.
#[derive(Debug, Default)]
pub struct PersistStatus {
    pub(super) running: AtomicBool,
    pub(super) db_ok: AtomicBool,
    pub(super) backlog: AtomicU64,
    pub(super) lag_ms: AtomicU64,
    pub(super) rows: AtomicU64,
    pub(super) buffered: AtomicU64,
    pub(super) last_write_ms: AtomicI64,
    /// Last read pass that left nothing to write (or the start), epoch milliseconds.
    caught_up_ms: AtomicI64,
    /// `persister.stall_ms` (0 = never stalled).
    pub(super) stall_ms: AtomicU64,
    /// The loop has read the batch list once: every shard's floor (what the database holds)
    /// is known, so a rolled-back shard is recognised from the first claim.
    pub(super) refreshed: AtomicBool,
    /// A probe pass ran over the shards of that first read: a shard found behind the
    /// database is sealed, so it answers no claim before its repair.
    pub(super) probed: AtomicBool,
    /// Wakes the probe task at once (the loop read a new batch list).
    pub(super) wake_prober: tokio::sync::Notify,
    /// Shard logs read on activity and swept (see the module doc of `persist`).
    pub(super) active_shards: AtomicU64,
    /// Shard logs of dormant batches: not read.
    pub(super) dormant_shards: AtomicU64,
    /// Shard log reads made by the loop since it started.
    pub(super) reads: AtomicU64,
    last_error: Mutex<Option<(i64, String)>>,
}

/// A point-in-time copy of [`PersistStatus`], serializable for `/readyz` detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PersistSnapshot {
    pub running: bool,
    pub db_ok: bool,
    /// Log entries in Redis not yet in the database (all shard logs; one per claim call with
    /// successes, or per change of a managed coupon).
    pub backlog: u64,
    /// Age of the oldest record not yet in the database, milliseconds.
    pub lag_ms: u64,
    /// Records read and waiting in memory for their database write.
    pub buffered: u64,
    /// Claims newly written to the database by this instance.
    pub rows_written: u64,
    pub last_write_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    /// Milliseconds since the persister last made progress: a committed write, or a read
    /// pass that left it nothing to write.
    pub since_progress_ms: u64,
    /// Records wait and there was no progress for longer than `persister.stall_ms`.
    pub stalled: bool,
}

impl PersistStatus {
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
    /// The last database write succeeded.
    pub fn db_ok(&self) -> bool {
        self.db_ok.load(Ordering::Relaxed)
    }
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }
    pub fn lag_ms(&self) -> u64 {
        self.lag_ms.load(Ordering::Relaxed)
    }
    pub fn rows_written(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }
    /// Shard logs the persister reads on activity (and sweeps).
    pub fn active_shards(&self) -> u64 {
        self.active_shards.load(Ordering::Relaxed)
    }
    /// Shard logs of dormant batches, which the persister does not read.
    pub fn dormant_shards(&self) -> u64 {
        self.dormant_shards.load(Ordering::Relaxed)
    }
    /// Shard log reads made since the persister started.
    pub fn log_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().as_ref().map(|(_, e)| e.clone())
    }

    /// Milliseconds since the last progress (see [`PersistSnapshot::since_progress_ms`]).
    pub fn since_progress_ms(&self) -> u64 {
        let last = self
            .last_write_ms
            .load(Ordering::Relaxed)
            .max(self.caught_up_ms.load(Ordering::Relaxed));
        if last <= 0 {
            return 0; // never started
        }
        u64::try_from(now_ms() - last).unwrap_or(0)
    }

    /// Records wait (read and unwritten, or in the logs) and the persister has made no
    /// progress for longer than `persister.stall_ms`.
    pub fn stalled(&self) -> bool {
        let limit = self.stall_ms.load(Ordering::Relaxed);
        limit > 0
            && self.running()
            && (self.buffered() > 0 || self.backlog() > 0)
            && self.since_progress_ms() > limit
    }

    pub fn snapshot(&self) -> PersistSnapshot {
        let err = self.last_error.lock().clone();
        let last_write = self.last_write_ms.load(Ordering::Relaxed);
        PersistSnapshot {
            since_progress_ms: self.since_progress_ms(),
            stalled: self.stalled(),
            running: self.running(),
            db_ok: self.db_ok(),
            backlog: self.backlog(),
            lag_ms: self.lag_ms(),
            buffered: self.buffered(),
            rows_written: self.rows_written(),
            last_write_ms: (last_write > 0).then_some(last_write),
            last_error_ms: err.as_ref().map(|(t, _)| *t),
            last_error: err.map(|(_, e)| e),
        }
    }

    pub(super) fn set_error(&self, msg: String) {
        *self.last_error.lock() = Some((now_ms(), msg));
    }

    /// The loop holds nothing to write: it is caught up with what it can read.
    pub(super) fn caught_up(&self) {
        self.caught_up_ms.store(now_ms(), Ordering::Relaxed);
    }
}
