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
use crate::stock::ClaimActivity;
use crate::stock::{FaultKind, FaultReporter};

/// A shard as the probe task sees it: its keys, and a flag telling the loop it has work.
pub(super) struct ProbeTarget {
    pub(super) keys: Arc<SlotKeys>,
    pub(super) has_work: Arc<AtomicBool>,
    /// The highest coupon position committed to the database from the shard.
    pub(super) committed: Arc<AtomicU64>,
}

/// The shards the loop follows, active and dormant.
#[derive(Default)]
pub(super) struct TargetSet {
    pub(super) active: Vec<ProbeTarget>,
    pub(super) dormant: Vec<ProbeTarget>,
}

/// The shards to probe, republished by the loop whenever the set changes.
pub(super) type ProbeTargets = Arc<Mutex<Arc<TargetSet>>>;

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
    /// Where found records wake the loop.
    pub(super) activity: ClaimActivity,
    /// Each dormant shard is probed once per this period.
    pub(super) dormant_sweep: Duration,
    /// Where the next slice of dormant shards starts.
    pub(super) dormant_cursor: usize,
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
        let mut found = false;
        for t in targets.active.iter() {
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
                t.has_work.store(true, Ordering::Relaxed); // read it on the next pass
                found = true;
            }
            self.check_floor(t, &p).await;
        }
        if found {
            self.activity.notify();
        }
        // A slice of the dormant shards, so each is looked at once per `dormant_sweep`.
        let n = targets.dormant.len();
        if n > 0 {
            let interval = self.interval.as_millis().max(1);
            let sweep = self.dormant_sweep.as_millis().max(1);
            let per_pass = usize::try_from((n as u128 * interval).div_ceil(sweep))
                .unwrap_or(n)
                .clamp(1, n);
            let start = self.dormant_cursor % n;
            self.dormant_cursor = (start + per_pass) % n;
            for k in 0..per_pass {
                let t = &targets.dormant[(start + k) % n];
                let p = match probe::call(self.backend.as_ref(), &t.keys).await {
                    Ok(p) => p,
                    Err(e) => return self.note_error(e.to_string()),
                };
                if p.log_len > 0 {
                    // Records without any change the database shows: read the batch again.
                    backlog += p.log_len;
                    self.activity.wake_batch(&t.keys.batch);
                }
                self.check_floor(t, &p).await;
            }
        }
        let lag_ms = oldest.map_or(0, |o| u64::try_from(now_ms() - o).unwrap_or(0));
        self.status.backlog.store(backlog, Ordering::Relaxed);
        self.status.lag_ms.store(lag_ms, Ordering::Relaxed);
        BacklogMeasured { backlog, lag_ms }.emit();
    }

    /// A shard whose claim counter is below what the database holds from it went backwards.
    async fn check_floor(&mut self, t: &ProbeTarget, p: &probe::Probe) {
        let committed = t.committed.load(Ordering::Relaxed);
        if u64::try_from(p.claimed).unwrap_or(0) < committed {
            self.went_backwards(&t.keys, committed).await;
        }
    }

    /// Reports a shard whose counter is behind the database (`committed`): missing when its
    /// meta is gone too, else rolled back (in the epoch its meta names). A shard whose meta
    /// is back with its counter at or above `committed` was rebuilt since the probe
    /// (`lua/restore.lua` 'finish' raises the counter and writes the meta in one call): it
    /// is left alone, not sealed.
    async fn went_backwards(&mut self, keys: &SlotKeys, committed: u64) {
        let Some(shard) = keys.slot else { return };
        match meta_get::call(self.backend.as_ref(), keys).await {
            Ok(meta) if meta.is_empty() => {
                self.faults
                    .report(&keys.batch, shard, FaultKind::Missing, None);
            }
            Ok(meta) => {
                match probe::call(self.backend.as_ref(), keys).await {
                    Ok(p) if u64::try_from(p.claimed).unwrap_or(0) >= committed => return,
                    Ok(_) => {}
                    Err(e) => return self.note_error(e.to_string()),
                }
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
