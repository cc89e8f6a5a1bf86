//! Retirement: a batch whose claim window ended `batches.retire_after_ms` ago leaves Redis,
//! and the database is its record from then on (the wallet, replays of its request ids,
//! coupon transitions and `reconcile` read it). So Redis memory is bounded by the batches
//! that are live or recently ended, not by history.
//!
//! A pass ([`retire_due`]) runs on every gateway (`gateway::background`), and any number may
//! run at once: every step is idempotent.
//! 1. Begin: the database marks each due batch retired (`batches.retired_at`, a
//!    compare-and-set on the version it was seen at, so a patch that reopened the window
//!    wins). From then on no change of its definition applies, and a reader that finds its
//!    keys gone asks the database instead of calling the batch lost.
//! 2. Drop: for each batch being retired, the pool is checked first (no transfer out of it
//!    still open), then each shard's keys are dropped by `lua/retire.lua` and its coupons
//!    handed to the database (`Db::unmanage`), then the pool's.
//! 3. Done: once every slot is gone, `batches.retire_done_at` is set and the persister stops
//!    following the batch.
//!
//! Invariants kept here: the database marks a batch retired before any key of it is dropped
//! (so the repairer never restores it and no reader serves it as lost); a slot's keys are
//! dropped only when its log is drained (every claim and change it holds is in the
//! database), no transfer out of it is open and no repairer holds it (`lua/retire.lua`
//! checks, then deletes, atomically); the pool goes last (its meta is what makes a batch
//! visible in Redis), and the retirement completes only when every slot is gone.

use thiserror::Error;

use crate::backend::{Backend, BackendError};
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::retire::{self, Retired};
use crate::obs::events::BatchRetirement;
use crate::store::{Db, DbError, StoredBatch};

#[derive(Debug, Error)]
pub enum RetireError {
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("database: {0}")]
    Db(#[from] DbError),
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetireReport {
    /// Batches this pass marked retired in the database.
    pub begun: u32,
    /// Batches whose every Redis key is gone now (their retirement completed this pass).
    pub retired: u32,
    /// Batches still being retired: a slot held records, open transfers or a repair lock,
    /// or a step failed; the next pass goes on.
    pub waiting: u32,
    /// Redis keys this pass deleted.
    pub keys: u64,
}

/// One pass at `now` (ms) over `rows` (`Db::batch_rows`, listed once per tick for this pass
/// and the request-id rotation): begins the retirement of every set-up batch whose claim
/// window ended at least `after_ms` ago, and drives every retirement in progress as far as
/// it can go. `after_ms == 0` means never: nothing is begun (retirements already begun still
/// go on). Errors of one batch are reported (`claimgate_batch_retirements_total{outcome=
/// "failed"}`) and leave it to the next pass; only a failure to list the retirements in
/// progress is returned.
pub async fn retire_due<B: Backend>(
    backend: &B,
    db: &Db,
    rows: &[StoredBatch],
    now: i64,
    after_ms: u64,
) -> Result<RetireReport, RetireError> {
    let mut report = RetireReport::default();
    if after_ms > 0 {
        let after = i64::try_from(after_ms).unwrap_or(i64::MAX);
        for row in rows {
            let due = row.batch.claim_window.end.0.saturating_add(after) <= now;
            if !row.setup_done || row.retired() || !due {
                continue;
            }
            match db.begin_retirement(&row.batch.id, row.version, now).await {
                Ok(true) => {
                    report.begun += 1;
                    emit(&row.batch.id, "begun", 0, "");
                }
                Ok(false) => {} // another gateway began it, or a change came first
                Err(e) => emit(&row.batch.id, "failed", 0, &e.to_string()),
            }
        }
    }
    for (id, shards) in db.retiring().await? {
        match drop_batch(backend, db, &id, shards).await {
            Ok(Step::Done(keys)) => {
                db.finish_retirement(&id, now).await?;
                report.retired += 1;
                report.keys += keys;
                emit(&id, "retired", keys, "");
            }
            Ok(Step::Waiting(keys, why)) => {
                report.waiting += 1;
                report.keys += keys;
                emit(&id, "waiting", keys, &why);
            }
            Err(e) => {
                report.waiting += 1;
                emit(&id, "failed", 0, &e.to_string());
            }
        }
    }
    Ok(report)
}

/// How far one batch's drop went.
enum Step {
    /// Every slot is gone; this many keys were deleted now.
    Done(u64),
    /// A slot is not ready (why); this many keys were deleted before it.
    Waiting(u64, String),
}

async fn drop_batch<B: Backend>(
    backend: &B,
    db: &Db,
    id: &str,
    shards: u32,
) -> Result<Step, RetireError> {
    let keys = BatchKeys::new(id, shards);
    // the pool first, only checked: a transfer still open out of it could land on a shard
    // already dropped and bring keys back
    if let Some(why) = not_ready(&keys.pool, retire::check(backend, &keys.pool).await?) {
        return Ok(Step::Waiting(0, why));
    }
    let mut deleted = 0;
    for s in &keys.shards {
        match retire::call(backend, s).await? {
            Retired::Dropped(n) => deleted += n,
            Retired::Gone => {}
            other => {
                let why = not_ready(s, other).unwrap_or_default();
                return Ok(Step::Waiting(deleted, why));
            }
        }
        // its coupons' state lives in the database from now on (their entries are gone)
        db.unmanage(id, s.slot).await?;
    }
    match retire::call(backend, &keys.pool).await? {
        Retired::Dropped(n) => deleted += n,
        Retired::Gone => {}
        other => {
            let why = not_ready(&keys.pool, other).unwrap_or_default();
            return Ok(Step::Waiting(deleted, why));
        }
    }
    Ok(Step::Done(deleted))
}

/// Why `slot` cannot be retired yet, or `None` when it can.
fn not_ready(slot: &SlotKeys, r: Retired) -> Option<String> {
    let label = &slot.label;
    match r {
        Retired::Ready | Retired::Dropped(_) | Retired::Gone => None,
        Retired::LogNotDrained(n) => Some(format!("{label}: {n} log records not persisted")),
        Retired::TransfersOpen(n) => Some(format!("{label}: {n} transfers open")),
        Retired::UnderRepair => Some(format!("{label}: under repair")),
    }
}

fn emit(batch: &str, outcome: &'static str, keys: u64, detail: &str) {
    BatchRetirement {
        batch,
        outcome,
        keys,
        detail,
    }
    .emit();
}
