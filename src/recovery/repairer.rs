//! The repairer: the one task of a gateway that repairs the shards reported faulty
//! ([`crate::stock::ShardFault`]), one at a time, with retries.
//!
//! Invariants kept here: a fault is acted on only while it still holds (a missing shard is
//! still missing; a rolled-back shard is still in the epoch it was seen in), so a report
//! queued before a repair never fences the repaired shard again; a repair that fails is
//! retried after `repair.retry_ms` for as long as its fault holds; shutdown stops the task
//! between steps (a shard left fenced is repaired by the next gateway that sees it: the
//! repair lock expires).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::RebuildError;
use super::repair::{Repaired, repair_shard};
use crate::backend::Backend;
use crate::config::RepairConfig;
use crate::contract::keys::SlotKeys;
use crate::contract::meta_get;
use crate::obs::events::ShardRepairEnded;
use crate::stock::{FaultKind, ShardFault};
use crate::store::Db;

pub struct Repairer<B> {
    backend: Arc<B>,
    db: Db,
    cfg: RepairConfig,
    rx: mpsc::Receiver<ShardFault>,
    shutdown: CancellationToken,
    /// This gateway's id in repair locks.
    id: String,
}

impl<B: Backend> Repairer<B> {
    pub fn new(
        backend: Arc<B>,
        db: Db,
        cfg: RepairConfig,
        rx: mpsc::Receiver<ShardFault>,
        shutdown: CancellationToken,
    ) -> Repairer<B> {
        Repairer {
            backend,
            db,
            cfg,
            rx,
            shutdown,
            id: format!("repairer-{:016x}", rand::random::<u64>()),
        }
    }

    /// Runs until shutdown (or until every reporter is gone).
    pub async fn run(mut self) {
        // faults waiting for a retry, with when they were first seen
        let mut pending: HashMap<(String, u32), (ShardFault, Instant)> = HashMap::new();
        let retry = Duration::from_millis(self.cfg.retry_ms);
        loop {
            let fault = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                f = self.rx.recv() => f,
                _ = tokio::time::sleep(retry), if !pending.is_empty() => None,
            };
            if let Some(f) = fault {
                pending
                    .entry((f.batch.clone(), f.shard))
                    .or_insert_with(|| (f, Instant::now()));
            } else if self.rx.is_closed() && pending.is_empty() {
                return;
            }
            let due: Vec<(String, u32)> = pending.keys().cloned().collect();
            for key in due {
                if self.shutdown.is_cancelled() {
                    return;
                }
                let Some((fault, since)) = pending.get(&key).cloned() else {
                    continue;
                };
                if self.attempt(&fault, since).await {
                    pending.remove(&key);
                }
            }
        }
    }

    /// One repair attempt; `true` when the fault is dealt with (repaired, stale, or repaired
    /// by another gateway).
    async fn attempt(&self, fault: &ShardFault, since: Instant) -> bool {
        let (result, detail, written_off) = match self.still_holds(fault).await {
            Ok(false) => ("stale", String::new(), 0),
            Err(e) => ("failed", e, 0),
            Ok(true) => {
                let lock = Duration::from_millis(self.cfg.lock_ms);
                let drain = Duration::from_millis(self.cfg.drain_timeout_ms);
                match repair_shard(
                    self.backend.as_ref(),
                    &self.db,
                    &fault.batch,
                    fault.shard,
                    &self.id,
                    lock,
                    drain,
                )
                .await
                {
                    Ok(Repaired::Done(r)) => ("repaired", r.to_string(), r.written_off),
                    Ok(Repaired::Busy) => ("busy", String::new(), 0),
                    // nothing a shard repair can do: the whole batch needs `rebuild`
                    // a retired batch's keys are gone on purpose: nothing to repair
                    Err(
                        e @ (RebuildError::PoolLost(_)
                        | RebuildError::BatchNotFound(_)
                        | RebuildError::Retired(_)),
                    ) => ("stale", e.to_string(), 0),
                    Err(e) => ("failed", e.to_string(), 0),
                }
            }
        };
        ShardRepairEnded {
            batch: &fault.batch,
            shard: fault.shard,
            result,
            detail: &detail,
            written_off,
            seconds: since.elapsed().as_secs_f64(),
        }
        .emit();
        result != "failed"
    }

    /// Whether the shard is still as the fault says: missing (no meta) for a missing shard
    /// (or one fenced by a repairer that died), still in the reported epoch for a rolled-back
    /// one.
    async fn still_holds(&self, fault: &ShardFault) -> Result<bool, String> {
        let slot = SlotKeys::new(&fault.batch, Some(fault.shard));
        let meta = meta_get::call(self.backend.as_ref(), &slot)
            .await
            .map_err(|e| e.to_string())?;
        Ok(match fault.kind {
            FaultKind::Missing => meta.is_empty(),
            FaultKind::RolledBack => meta.is_empty() || Some(meta.epoch()) == fault.epoch,
        })
    }
}
