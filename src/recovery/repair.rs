//! `repair`: restores ONE shard of a live batch from the database, after Redis lost that
//! shard (a node came back empty) or rolled it back (a failover to a replica that lagged).
//!
//! Invariants kept here:
//! - the blast radius is one shard: the pool and every other shard keep serving, and the
//!   repaired shard is fenced (its meta deleted, `lua/restore.lua` 'fence') so that every
//!   gateway refuses its claims until it is complete again;
//! - one repairer per shard at a time (the repair lock, which expires if its holder dies);
//! - a retired batch is never repaired back into Redis: the database is read again once
//!   the lock is held (`recovery::retire` drops no shard while a repairer holds it);
//! - a repaired shard never mints an id again: the batch moves to a new coupon-id epoch in
//!   the database before the shard is restored, and the shard's claim counter never goes
//!   back;
//! - a repair never re-sells stock: the shard restarts empty, and the stock it still held is
//!   written off (counted as issued: a lost primary may have sold part of it; the shard
//!   refills from the pool);
//! - claims the database holds keep their limits and request ids (a lost-then-persisted
//!   claim replays).

use std::fmt;
use std::time::Duration;

use super::RebuildError;
use super::rebuild::{begin, next_epoch, restore_shard, stored_batch, unpersisted, with_fp};
use crate::backend::Backend;
use crate::contract::events::{self, Event};
use crate::contract::restore::{self, Step};
use crate::contract::{meta, meta_get, probe};
use crate::stock::census;

/// Tries at a conservation snapshot taken while no stock moves.
const CENSUS_ATTEMPTS: usize = 20;
use crate::store::Db;

/// What a shard repair did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub batch_id: String,
    pub shard: u32,
    /// The coupon-id epoch the shard mints in from now on.
    pub epoch: u64,
    /// Claims of the shard found in the database (their limits and request ids restored).
    pub claims: u64,
    /// Stock the shard lost or held stale, written off (counted as issued, never sold again).
    pub written_off: u64,
    /// The shard's claim counter after.
    pub issued: u64,
}

impl fmt::Display for RepairReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "repaired shard {} of batch {} (epoch {}): {} claims restored, {} stock written off, \
             counter {}",
            self.shard, self.batch_id, self.epoch, self.claims, self.written_off, self.issued
        )
    }
}

/// How a repair ended besides an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repaired {
    Done(RepairReport),
    /// Another repairer holds the shard's lock: it repairs it.
    Busy,
}

/// Repairs shard `shard` of `batch_id`: fences it (`repairer` takes the lock for `lock`),
/// waits at most `drain` for its log to reach the database, then restores it in a new epoch.
/// Refuses (`Live`-free errors) when the pool is gone: a lost batch needs `rebuild`.
pub async fn repair_shard<B: Backend>(
    backend: &B,
    db: &Db,
    batch_id: &str,
    shard: u32,
    repairer: &str,
    lock: Duration,
    drain: Duration,
) -> Result<Repaired, RebuildError> {
    let (stored, keys) = stored_batch(db, batch_id).await?;
    let batch = stored.batch;
    let s = keys
        .shards
        .get(shard as usize)
        .ok_or_else(|| RebuildError::BatchNotFound(format!("{batch_id} shard {shard}")))?;
    let pool = meta_get::call(backend, &keys.pool).await?;
    if pool.is_empty() {
        return Err(RebuildError::PoolLost(batch.id.clone()));
    }
    let lock_ms = u64::try_from(lock.as_millis()).unwrap_or(u64::MAX);
    match restore::fence(backend, s, repairer, lock_ms).await? {
        Step::Fenced => {}
        Step::Held => return Ok(Repaired::Busy),
        other => {
            return Err(RebuildError::Raced {
                batch: batch.id.clone(),
                slot: format!("{} (fence answered {other:?})", s.label),
            });
        }
    }
    // A retirement begun since the batch was read above may have dropped the shard already:
    // restored now, it would come back to Redis after its batch left (and stay, once the
    // retirement completed). Read again under the lock: a retirement begun after this read
    // finds the lock and waits for it (`lua/retire.lua` -3); one begun before is seen here,
    // and the lock expires on its own.
    if db
        .batch_row(batch_id)
        .await?
        .is_some_and(|row| row.retired())
    {
        return Err(RebuildError::Retired(batch_id.to_string()));
    }
    // What the shard minted before it was fenced must reach the database first.
    let started = tokio::time::Instant::now();
    loop {
        let p = probe::call(backend, s).await?;
        if p.log_len == 0 {
            break;
        }
        if started.elapsed() >= drain {
            return Err(unpersisted(&batch, s, p.log_len));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let epoch = next_epoch(db, &batch.id, pool.epoch()).await?;
    let (counter, _stale) = begin(backend, db, &batch, s, true).await?;
    // The shard now holds no stock: whatever the batch's conservation misses went with it
    // (lost with its node, or held stale by a rolled-back copy: a lost primary may have
    // sold it). The shard's counter absorbs it, so it is never sold again.
    let census = census::settled(backend, &keys, CENSUS_ATTEMPTS)
        .await?
        .ok_or_else(|| RebuildError::Unsettled(batch.id.clone()))?;
    let missing = u64::try_from(-census.off_by()).unwrap_or(0);
    // The live definition's version (the pool's), never older than the database's.
    let version = u64::try_from(pool.version().max(stored.version))
        .unwrap_or(1)
        .max(1);
    let mut shard_meta = with_fp(&batch, meta::fields(&batch, version));
    shard_meta.push((meta::EPOCH.to_string(), epoch.to_string()));
    let r = restore_shard(
        backend,
        db,
        &batch,
        s,
        &shard_meta,
        counter,
        counter + missing,
    )
    .await?;
    let report = RepairReport {
        batch_id: batch.id.clone(),
        shard,
        epoch,
        claims: r.claims,
        written_off: r.written_off,
        issued: r.issued,
    };
    // Gateways re-read the batch (its shard is live again) rather than at their next refresh.
    if let Err(e) = events::publish(backend, &Event::Changed(batch.id.clone())).await {
        tracing::warn!(batch = %batch.id, error = %e, "change broadcast failed");
    }
    Ok(Repaired::Done(report))
}
