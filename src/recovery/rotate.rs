//! Request-id retention: each shard keeps its request-id records (what makes a retried claim
//! replay its coupon instead of minting another) in two generations, and a rotation drops
//! the older one once the current one is `batches.request_id_retention_ms` old
//! (`lua/rotate.lua`). So Redis holds the records of the last one to two retentions, not of
//! the batch's whole life; a replay older than that is answered from the database
//! (`lua/claim.lua` -12, `stock::Stock::archived_claim`).
//!
//! A pass ([`Rotator::pass`]) runs on every gateway (`gateway::background`, with the
//! retirer), and any number may run at once: the script decides atomically whether a shard
//! is due. Each gateway remembers when each batch is next due, so a pass calls a shard about
//! once per retention, not once per tick: idle cost does not grow with the ticks.
//!
//! Invariant kept here: a record leaves Redis only once the database holds its claim (the
//! script rotates only when the shard's log holds nothing from before the generation it
//! drops), and from the first drop on the shard says so (meta `rqd`), so a claim that misses
//! a record asks the database before it could mint a second coupon for one request id.

use std::collections::{HashMap, HashSet};

use crate::backend::Backend;
use crate::contract::keys::BatchKeys;
use crate::contract::rotate::{self, Rotated};
use crate::obs::events::RequestIdsRotated;
use crate::store::StoredBatch;

/// When a shard that could not be looked at (no meta, an error, a log behind) is tried
/// again, at the most (ms).
const RETRY_MS: i64 = 60_000;

/// The request-id rotation of every batch this gateway knows, with when each is next due.
#[derive(Debug)]
pub struct Rotator {
    retention_ms: u64,
    /// Batch id -> the time (ms, Redis's clock) its earliest shard is next due.
    due: HashMap<String, i64>,
}

/// What one pass did, over every batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RotateReport {
    /// Shards whose oldest generation was dropped.
    pub rotated: u64,
    /// Shards whose first generation began.
    pub started: u64,
    /// Shards due whose log still held records from before their current generation.
    pub waiting: u64,
    /// Shards a call failed on.
    pub failed: u64,
}

impl Rotator {
    /// `retention_ms`: `batches.request_id_retention_ms` (0 = never rotate: a pass does
    /// nothing, and records stay until the batch retires).
    pub fn new(retention_ms: u64) -> Rotator {
        Rotator {
            retention_ms,
            due: HashMap::new(),
        }
    }

    /// One pass at `now` (ms) over `rows` (`Db::batch_rows`): every shard of every set-up
    /// batch not retired that is due is rotated. Errors of one shard are counted and logged
    /// (`claimgate_request_id_rotations_total{outcome="failed"}`) and leave it to a later
    /// pass.
    pub async fn pass<B: Backend>(
        &mut self,
        backend: &B,
        rows: &[StoredBatch],
        now: i64,
    ) -> RotateReport {
        let mut report = RotateReport::default();
        if self.retention_ms == 0 {
            return report;
        }
        let w = i64::try_from(self.retention_ms).unwrap_or(i64::MAX);
        let live: Vec<&StoredBatch> = rows
            .iter()
            .filter(|r| r.setup_done && !r.retired())
            .collect();
        // forget batches gone from the list or retired
        let ids: HashSet<&str> = live.iter().map(|r| r.batch.id.as_str()).collect();
        self.due.retain(|id, _| ids.contains(id.as_str()));
        for row in live {
            let id = row.batch.id.as_str();
            if self.due.get(id).is_some_and(|&at| at > now) {
                continue;
            }
            let keys = BatchKeys::new(id, row.batch.shards);
            let mut batch = RotateReport::default();
            let mut next = i64::MAX;
            let mut detail = String::new();
            for shard in &keys.shards {
                let due_at = match rotate::call(backend, shard, self.retention_ms).await {
                    Ok(Rotated::Rotated(mark)) => {
                        batch.rotated += 1;
                        mark.saturating_add(w)
                    }
                    Ok(Rotated::Started(mark)) => {
                        batch.started += 1;
                        mark.saturating_add(w)
                    }
                    Ok(Rotated::NotDue(start)) => start.saturating_add(w),
                    // lost or under repair: the repairer's business; looked at again later
                    Ok(Rotated::NoBatch) => now.saturating_add(RETRY_MS.min(w)),
                    Ok(Rotated::LogBehind(first)) => {
                        batch.waiting += 1;
                        detail = format!("shard {} log holds a record of {first} ms", shard.label);
                        now.saturating_add(RETRY_MS.min(w))
                    }
                    Err(e) => {
                        batch.failed += 1;
                        detail = format!("shard {}: {e}", shard.label);
                        now.saturating_add(RETRY_MS.min(w))
                    }
                };
                next = next.min(due_at);
            }
            self.due.insert(id.to_string(), next);
            RequestIdsRotated {
                batch: id,
                rotated: batch.rotated,
                started: batch.started,
                waiting: batch.waiting,
                failed: batch.failed,
                detail: &detail,
            }
            .emit();
            report.rotated += batch.rotated;
            report.started += batch.started;
            report.waiting += batch.waiting;
            report.failed += batch.failed;
        }
        report
    }
}
