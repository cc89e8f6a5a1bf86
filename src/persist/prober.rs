//! The persister's probe task: measures backlog (total log length) and lag (age of the
//! oldest entry) of every shard, every `persister.probe_interval_ms`.
//!
//! Invariant kept here: the figures `/readyz` and the metrics show come from a task of their
//! own, so a database write blocked in the persister's loop cannot freeze them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::status::PersistStatus;
use crate::backend::Backend;
use crate::contract::keys::SlotKeys;
use crate::contract::probe;
use crate::domain::time::now_ms;
use crate::obs::events::{BacklogMeasured, PersistFailed, RepeatFilter};

/// A shard as the probe task sees it: its keys, and a flag telling the loop it has work.
pub(super) struct ProbeTarget {
    pub(super) keys: Arc<SlotKeys>,
    pub(super) has_work: Arc<AtomicBool>,
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
}

impl<B: Backend> Prober<B> {
    pub(super) async fn run(mut self) {
        loop {
            self.probe().await;
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
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
        }
        let lag_ms = oldest.map_or(0, |o| u64::try_from(now_ms() - o).unwrap_or(0));
        self.status.backlog.store(backlog, Ordering::Relaxed);
        self.status.lag_ms.store(lag_ms, Ordering::Relaxed);
        BacklogMeasured { backlog, lag_ms }.emit();
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
