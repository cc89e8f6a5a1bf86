//! The persister's probe task: measures backlog (total log length) and lag (age of the
//! oldest entry) of every shard, every `persister.probe_interval_ms`, and watches for shards
//! that went backwards.
//!
//! Invariants kept here: the figures `/readyz` and the metrics show come from a task of their
//! own, so a database write blocked in the persister's loop cannot freeze them; a shard whose
//! claim counter is below a coupon position already committed to the database was lost or
//! rolled back by Redis (a failover to a replica that lagged, a restart without its data),
//! and is reported for repair ([`crate::stock::ShardFault`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::status::PersistStatus;
use crate::backend::Backend;
use crate::contract::keys::SlotKeys;
use crate::contract::{meta_get, probe, restore};
use crate::domain::time::now_ms;
use crate::obs::events::{BacklogMeasured, PersistFailed, RepeatFilter};
use crate::stock::{FaultKind, FaultReporter};

/// A shard as the probe task sees it: its keys, and a flag telling the loop it has work.
pub(super) struct ProbeTarget {
    pub(super) keys: Arc<SlotKeys>,
    pub(super) has_work: Arc<AtomicBool>,
    /// The highest coupon position committed to the database from the shard.
    pub(super) committed: Arc<AtomicU64>,
}

/// The shards to probe, republished by the loop on every batch refresh.
pub(super) type ProbeTargets = Arc<Mutex<Arc<Vec<ProbeTarget>>>>;

/// Measures backlog (total log length) and lag (age of the oldest entry) of every shard,
/// every `probe_interval_ms`, in a task of its own: a blocked database write cannot freeze
/// the figures `/readyz` and the metrics show.
pub(super) struct Prober<B> {
    pub(super) backend: Arc<B>,
    pub(super) status: Arc<PersistStatus>,
    pub(super) targets: ProbeTargets,
    pub(super) interval: Duration,
    pub(super) shutdown: CancellationToken,
    pub(super) log_filter: RepeatFilter,
    pub(super) faults: FaultReporter,
}

impl<B: Backend> Prober<B> {
    pub(super) async fn run(mut self) {
        loop {
            let refreshed = self.status.refreshed.load(Ordering::Relaxed);
            self.probe().await;
            if refreshed {
                self.status.probed.store(true, Ordering::Relaxed);
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.status.wake_prober.notified() => {}
            }
        }
    }

    async fn probe(&mut self) {
        let targets = self.targets.lock().clone();
        let mut backlog = 0u64;
        let mut oldest: Option<i64> = None;
        for t in targets.iter() {
            let p = match probe::call(self.backend.as_ref(), &t.keys).await {
                Ok(p) => p,
                Err(e) => return self.note_error(e.to_string()),
            };
            let len = p.log_len;
            backlog += len;
            if let Some(ms) = p.oldest_log_ms {
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
            if len > 0 {
                t.has_work.store(true, Ordering::Relaxed); // poll it on the next pass
            }
            let committed = t.committed.load(Ordering::Relaxed);
            if u64::try_from(p.claimed).unwrap_or(0) < committed {
                self.went_backwards(&t.keys).await;
            }
        }
        let lag_ms = oldest.map_or(0, |o| u64::try_from(now_ms() - o).unwrap_or(0));
        self.status.backlog.store(backlog, Ordering::Relaxed);
        self.status.lag_ms.store(lag_ms, Ordering::Relaxed);
        BacklogMeasured { backlog, lag_ms }.emit();
    }

    /// Reports a shard whose counter is behind the database: missing when its meta is gone
    /// too, else rolled back (in the epoch its meta names).
    async fn went_backwards(&mut self, keys: &SlotKeys) {
        let Some(shard) = keys.slot else { return };
        match meta_get::call(self.backend.as_ref(), keys).await {
            Ok(meta) if meta.is_empty() => {
                self.faults
                    .report(&keys.batch, shard, FaultKind::Missing, None);
            }
            Ok(meta) => {
                // Sealed at once: no claim may mint (or replay) an id the database holds.
                if let Err(e) = restore::seal(self.backend.as_ref(), keys).await {
                    return self.note_error(e.to_string());
                }
                self.faults.report(
                    &keys.batch,
                    shard,
                    FaultKind::RolledBack,
                    Some(meta.epoch()),
                );
            }
            Err(e) => self.note_error(e.to_string()),
        }
    }

    fn note_error(&mut self, msg: String) {
        PersistFailed {
            stage: "probe",
            message: &msg,
        }
        .emit(&mut self.log_filter);
        self.status.set_error(format!("probe: {msg}"));
    }
}
