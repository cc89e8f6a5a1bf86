//! `rebuild`: restores a batch's Redis state from the database, after Redis lost it.
//!
//! Invariants kept here:
//! - a rebuild never re-sells stock and never lets a user past a limit: the pool gets
//!   `total - issued`, where `issued` counts every coupon sequence number a shard ever handed
//!   out (coupons missing from the database count as issued), each shard's per-user and
//!   per-day counts and request ids come from the database (the per-day counts for today in
//!   the batch's time zone, the day `lua/claim.lua` counts with the zone's offset), and the
//!   claim counter never goes back;
//! - a rebuild never mints a coupon id again, not even one Redis handed out and lost before
//!   the database saw it: it first moves the batch to a new coupon-id epoch in the database
//!   (committed before any Redis write), and the restored slots mint in that epoch;
//! - a rebuild refuses while a shard log still holds claims the database does not have yet;
//! - a slot goes live only once complete: its meta is written last (`lua/restore.lua`), and
//!   the pool (which makes the batch visible) after every shard;
//! - the restored definition is the database's, at a version no older than the database's
//!   (so later changes, versioned by the database, apply on top of it), and the batch is
//!   recorded as set up: a create never sets it up again.

use std::collections::HashMap;
use std::fmt;

use super::RebuildError;
use crate::backend::Backend;
use crate::contract::events::{self, Event};
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::restore::{self, Step, Target};
use crate::contract::{claim, meta, meta_get, probe};
use crate::domain::batch::Batch;
use crate::domain::ids::{home_shard, seq_epoch, seq_position};
use crate::domain::time::{Zone, now_ms};
use crate::store::{Db, StoredBatch};

/// What a rebuild restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub batch_id: String,
    /// The batch version written to every slot's meta.
    pub version: u64,
    /// The coupon-id epoch the restored slots mint in (new with every rebuild).
    pub epoch: u64,
    pub shards: u32,
    /// Claims found in the database.
    pub claims: u64,
    /// Distinct (shard, user) per-user counters restored.
    pub users: u64,
    pub requests: u64,
    pub daily: u64,
    pub denied: u64,
    /// Coupon sequence numbers handed out (the sum of the shard claim counters).
    pub issued: u64,
    /// Sequence numbers handed out whose coupon the database does not have (lost with
    /// Redis before they were persisted); counted as issued, never re-sold.
    pub lost: u64,
    pub pool_stock: i64,
    pub total: i64,
    /// In a batch with codes: codes no coupon in the database carries that the rebuild did
    /// NOT give back, because they had left the pool for a shard (a claim lost with Redis
    /// before the database saw it may hold any of them).
    pub codes_withheld: u64,
}

impl fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rebuilt batch {} (version {}, epoch {}, {} shards): {} claims, {} user counters, \
             {} request ids, {} daily counters, {} denied users; issued {} of {} \
             ({} lost before persistence); pool stock {}",
            self.batch_id,
            self.version,
            self.epoch,
            self.shards,
            self.claims,
            self.users,
            self.requests,
            self.daily,
            self.denied,
            self.issued,
            self.total,
            self.lost,
            self.pool_stock
        )?;
        if self.codes_withheld > 0 {
            write!(
                f,
                "; {} codes withheld (they had left the pool: a lost coupon may carry one)",
                self.codes_withheld
            )?;
        }
        Ok(())
    }
}

/// Restores the Redis state of `batch_id` from the database. Refuses when the batch's pool
/// meta still exists in Redis unless `force` (pause the batch first when forcing a live
/// one), and whenever a shard log holds unpersisted claims.
pub async fn rebuild<B: Backend>(
    backend: &B,
    db: &Db,
    batch_id: &str,
    force: bool,
) -> Result<RebuildReport, RebuildError> {
    let (stored, keys) = stored_batch(db, batch_id).await?;
    let batch = stored.batch;
    if !force && !meta_get::call(backend, &keys.pool).await?.is_empty() {
        return Err(RebuildError::Live(batch.id.clone()));
    }
    // Check every log before touching anything (begin re-checks atomically per shard).
    for s in &keys.shards {
        let p = probe::call(backend, s).await?;
        if p.log_len > 0 {
            return Err(unpersisted(&batch, s, p.log_len));
        }
    }
    // Above any version gateways may have cached from the Redis that was lost, and never
    // below the database's (changes are versioned by the database).
    let version = u64::try_from(now_ms().max(stored.version))
        .unwrap_or(1)
        .max(1);
    let epoch = next_epoch(db, &batch.id, 0).await?;
    let mut report = RebuildReport {
        batch_id: batch.id.clone(),
        version,
        epoch,
        shards: batch.shards,
        total: batch.stock,
        ..Default::default()
    };
    begin(backend, db, &batch, &keys.pool, force).await?;
    let mut base_meta = with_fp(&batch, meta::fields(&batch, version));
    base_meta.push((meta::EPOCH.to_string(), epoch.to_string()));
    for s in &keys.shards {
        // Once the pool is gone the batch is not live: shard leftovers (of an interrupted
        // rebuild, or of a node that survived) are replaced, unpersisted claims excepted.
        // Their stock goes back to the pool (the pool gets total - issued).
        let (counter, _stock) = begin(backend, db, &batch, s, true).await?;
        let r = restore_shard(backend, db, &batch, s, &base_meta, counter, 0).await?;
        report.claims += r.claims;
        report.users += r.users;
        report.daily += r.daily;
        report.requests += r.requests;
        report.denied += r.denied;
        report.issued += r.issued;
        report.lost += r.lost;
    }
    let issued = i64::try_from(report.issued).unwrap_or(i64::MAX);
    report.pool_stock = (batch.stock - issued).max(0);
    if batch.stock < issued {
        tracing::error!(batch = %batch.id, total = batch.stock, issued,
            "more coupons issued than stock: the pool is restored empty");
    }
    let mut pool_meta = base_meta;
    pool_meta.extend(
        meta::pool_fields(&batch)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    if batch.codes.is_some() {
        restore_codes(backend, db, &batch, &keys.pool, &mut report).await?;
        // the pool's total is what its codes added: those issued and those given back
        let total = issued + report.pool_stock;
        report.total = total;
        for (k, v) in pool_meta.iter_mut() {
            if k == meta::TOTAL {
                *v = total.to_string();
            }
        }
    }
    let pool_stock = u64::try_from(report.pool_stock).unwrap_or(0);
    let finished = restore::finish(backend, &keys.pool, pool_stock, 0, &pool_meta).await?;
    done(&batch, &keys.pool, finished)?;
    db.mark_setup_done(&batch.id).await?;
    tracing::info!(batch = %batch.id, "{report}");
    // Gateways serving the batch as lost re-read it now rather than at their next refresh.
    if let Err(e) = events::publish(backend, &Event::Changed(batch.id.clone())).await {
        tracing::warn!(batch = %batch.id, error = %e, "change broadcast failed");
    }
    Ok(report)
}

/// The codes of a batch with codes back into its pool (after `begin`, before `finish`): the
/// codes that never left the pool (`store::codes`: recorded before any reached a shard, the
/// only place a claim takes one), so none of them can be on a coupon, even one Redis lost
/// before the database saw it. The codes that had left the pool and are on no coupon in
/// the database are withheld: a lost coupon may carry any of them. Sets
/// `report.pool_stock` to the codes given back.
async fn restore_codes<B: Backend>(
    backend: &B,
    db: &Db,
    batch: &Batch,
    pool: &SlotKeys,
    report: &mut RebuildReport,
) -> Result<(), RebuildError> {
    let (free, withheld) = db.free_codes(&batch.id).await?;
    // every chunk is either given back now or withheld: none is loaded again later
    db.mark_all_codes_loaded(&batch.id).await?;
    report.codes_withheld = withheld;
    if withheld > 0 {
        tracing::warn!(batch = %batch.id, withheld,
            "codes that had left the pool and are on no coupon in the database are withheld: \
             a coupon lost with Redis may carry one");
    }
    for part in free.chunks(restore::CHUNK) {
        done(batch, pool, restore::codes(backend, pool, part).await?)?;
    }
    report.pool_stock = free.len() as i64;
    Ok(())
}

/// The batch's row in the database and its keys.
pub(super) async fn stored_batch(
    db: &Db,
    batch_id: &str,
) -> Result<(StoredBatch, BatchKeys), RebuildError> {
    let stored = db
        .batch_row(batch_id)
        .await?
        .ok_or_else(|| RebuildError::BatchNotFound(batch_id.to_string()))?;
    if stored.retired() {
        return Err(RebuildError::Retired(batch_id.to_string()));
    }
    let keys = BatchKeys::new(&stored.batch.id, stored.batch.shards);
    Ok((stored, keys))
}

/// Moves the batch to a new coupon-id epoch, above every epoch its claims in the database
/// (and `seen`, one Redis still shows) were minted in, and returns it. Durable before the
/// first Redis write of a rebuild or repair: every id the replaced Redis state minted
/// (persisted or lost) lies in an older epoch, whatever happens next.
pub(super) async fn next_epoch(db: &Db, batch_id: &str, seen: u64) -> Result<u64, RebuildError> {
    let newest = db
        .claims_summary(batch_id)
        .await?
        .iter()
        .map(|s| seq_epoch(s.max_seq))
        .max()
        .unwrap_or(0)
        .max(seen);
    Ok(db.bump_epoch(batch_id, newest + 1).await?)
}

/// What [`restore_shard`] wrote into one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ShardRestored {
    pub(super) claims: u64,
    pub(super) users: u64,
    pub(super) daily: u64,
    pub(super) requests: u64,
    pub(super) denied: u64,
    /// The shard's claim counter after: every coupon position it ever handed out, the
    /// written-off stock included.
    pub(super) issued: u64,
    /// Positions handed out whose coupon the database does not have.
    pub(super) lost: u64,
    /// Of `issued`, the positions added for stock the shard lost or held stale (written off).
    pub(super) written_off: u64,
}

/// Whether a claim made at `claimed_at` counts toward the daily limit of `today` (a day
/// number in `zone`): the script counts it on the local day it was made.
fn counts_today(zone: &Zone, today: i64, claimed_at: i64) -> bool {
    zone.local_day(claimed_at) == today
}

/// Restores one shard after `begin` (which found its claim counter at `counter`): per-user
/// and per-day counts, request ids and the deny list from the database, then `finish` with
/// stock 0 and `meta` (plus `lost`). The counter becomes at least `census_floor` (a repair:
/// the stock the batch's conservation misses went with this shard, or was held stale by it;
/// a lost primary may have sold it): counted as issued, it is never sold again.
pub(super) async fn restore_shard<B: Backend>(
    backend: &B,
    db: &Db,
    batch: &Batch,
    s: &SlotKeys,
    meta: &[(String, String)],
    counter: u64,
    census_floor: u64,
) -> Result<ShardRestored, RebuildError> {
    let zone = batch.zone();
    let today = zone.local_day(now_ms());
    let shard = s.slot.unwrap_or(0);
    let claims = db.claims_of_shard(&batch.id, shard).await?;
    let mut users: HashMap<&str, u64> = HashMap::new();
    let mut daily: HashMap<&str, u64> = HashMap::new();
    let mut req = Vec::new();
    let mut max_seq = 0;
    for c in &claims {
        *users.entry(c.user_id.as_str()).or_default() += 1;
        if counts_today(&zone, today, c.claimed_at) {
            *daily.entry(c.user_id.as_str()).or_default() += 1;
        }
        if let Some(rid) = &c.request_id {
            req.push((
                claim::request_field(&c.user_id, rid),
                claim::request_value(
                    &c.coupon_id,
                    c.valid_from,
                    c.valid_to,
                    c.claimed_at,
                    c.code.as_deref(),
                ),
            ));
        }
        // the counter position, whatever epoch the coupon was minted in
        max_seq = max_seq.max(seq_position(c.seq));
    }
    let user_pairs: Vec<(String, String)> = users
        .iter()
        .map(|(u, n)| (u.to_string(), n.to_string()))
        .collect();
    let daily_pairs: Vec<(String, String)> = if batch.per_user_daily_limit.is_some() {
        daily
            .iter()
            .map(|(u, n)| (u.to_string(), claim::daily_value(today, *n)))
            .collect()
    } else {
        Vec::new()
    };
    hset_chunks(backend, batch, s, Target::Users, &user_pairs).await?;
    hset_chunks(backend, batch, s, Target::Daily, &daily_pairs).await?;
    hset_chunks(backend, batch, s, Target::Req, &req).await?;
    let deny: Vec<&str> = batch
        .eligibility
        .deny_users
        .iter()
        .filter(|u| home_shard(u, batch.shards) == shard)
        .map(String::as_str)
        .collect();
    for chunk in deny.chunks(restore::CHUNK) {
        done(batch, s, restore::deny(backend, s, chunk).await?)?;
    }
    let known = counter.max(max_seq);
    let issued = known.max(census_floor);
    let count = claims.len() as u64;
    let lost = issued.saturating_sub(count);
    let mut meta = meta.to_vec();
    meta.push((meta::LOST.to_string(), lost.to_string()));
    let final_counter = done(
        batch,
        s,
        restore::finish(backend, s, 0, issued, &meta).await?,
    )?;
    Ok(ShardRestored {
        claims: count,
        users: user_pairs.len() as u64,
        daily: daily_pairs.len() as u64,
        requests: req.len() as u64,
        denied: deny.len() as u64,
        issued: final_counter,
        lost: final_counter.saturating_sub(count),
        written_off: issued - known,
    })
}

pub(super) fn with_fp(batch: &Batch, pairs: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    out.push((meta::FINGERPRINT.to_string(), batch.fingerprint()));
    out
}

pub(super) fn unpersisted(batch: &Batch, s: &SlotKeys, entries: u64) -> RebuildError {
    RebuildError::Unpersisted {
        batch: batch.id.clone(),
        shard: s.slot.unwrap_or(0),
        entries,
    }
}

/// `begin` on a slot: its claim counter and the stock it held (deleted), or why not. On a
/// shard, `begin` dropped its coupon states too (the log was empty: the database holds
/// every change), so its coupons change in the database from now on (`Db::unmanage`).
pub(super) async fn begin<B: Backend>(
    backend: &B,
    db: &Db,
    batch: &Batch,
    s: &SlotKeys,
    force: bool,
) -> Result<(u64, u64), RebuildError> {
    match restore::begin(backend, s, force).await? {
        Step::Begun { counter, stock } => {
            if let Some(shard) = s.slot {
                db.unmanage(&batch.id, Some(shard)).await?;
            }
            Ok((counter, stock))
        }
        Step::Unpersisted { entries } => Err(unpersisted(batch, s, entries)),
        _ => Err(RebuildError::Live(batch.id.clone())),
    }
}

/// A step after `begin` must be done: the slot went live meanwhile otherwise.
pub(super) fn done(batch: &Batch, s: &SlotKeys, step: Step) -> Result<u64, RebuildError> {
    match step {
        Step::Done { n } => Ok(n),
        _ => Err(RebuildError::Raced {
            batch: batch.id.clone(),
            slot: s.label.clone(),
        }),
    }
}

async fn hset_chunks<B: Backend>(
    backend: &B,
    batch: &Batch,
    s: &SlotKeys,
    target: Target,
    pairs: &[(String, String)],
) -> Result<(), RebuildError> {
    for chunk in pairs.chunks(restore::CHUNK) {
        done(batch, s, restore::hset(backend, s, target, chunk).await?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::Timestamp;

    /// Issue 11 item 3: a rebuild restores the daily counts of the batch's local day. At
    /// 01:00 in Beijing (17:00 UTC) a claim at 16:00 UTC (00:00 in Beijing) counts, one at
    /// 15:59 UTC (23:59 in Beijing the day before) does not, although both are on the UTC
    /// day of the rebuild; at 23:00 in Beijing (15:00 UTC) a claim at 16:30 UTC the day
    /// before (00:30 in Beijing, the same local day) counts.
    #[test]
    fn daily_counts_are_restored_for_the_local_day() {
        let t = |s: &str| Timestamp::parse(s).unwrap().0;
        let sh = Zone::named("Asia/Shanghai").unwrap();
        let utc = Zone::utc();
        let now = t("2026-11-11T17:00:00Z");
        let today = sh.local_day(now);
        assert!(counts_today(&sh, today, t("2026-11-11T16:00:00Z")));
        assert!(!counts_today(&sh, today, t("2026-11-11T15:59:59Z")));
        assert!(counts_today(
            &utc,
            utc.local_day(now),
            t("2026-11-11T15:59:59Z")
        ));
        let now = t("2026-11-11T15:00:00Z");
        assert!(counts_today(
            &sh,
            sh.local_day(now),
            t("2026-11-10T16:30:00Z")
        ));
        assert!(!counts_today(
            &utc,
            utc.local_day(now),
            t("2026-11-10T16:30:00Z")
        ));
    }
}
