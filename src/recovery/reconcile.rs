//! `reconcile`: compares Redis and the database for one batch or all of them, and reports
//! every [`Difference`].
//!
//! Invariants kept here: a live batch shows no false difference (reads are ordered so that
//! claims in flight between Redis and the database, and changes committed meanwhile, are
//! not reported); the conservation equation is the census's ([`census`]), not a second
//! definition; every coupon id the persister met twice is listed; a pool whose budget cap
//! (`contract::meta` `cap`) is not the definition's is reported (`lua/patch.lua` would hold
//! the stock under the wrong bound).

use std::collections::HashMap;

use super::difference::Difference;
use super::{MAX_USER_DIFFERENCES, RebuildError, SNAPSHOT_ATTEMPTS};
use crate::backend::Backend;
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::meta::{self, SlotMeta};
use crate::contract::{log_count, meta_get, probe, winners};
use crate::domain::ids::seq_position;
use crate::stock::census;
use crate::store::{Db, StoredBatch};

/// Compares Redis and the database for one batch (or every batch in the database) and
/// returns every difference found (empty: they agree). Claims still in a shard log count as
/// not yet persisted, not as missing.
pub async fn reconcile<B: Backend>(
    backend: &B,
    db: &Db,
    batch: Option<&str>,
) -> Result<Vec<Difference>, RebuildError> {
    let mut diffs = Vec::new();
    match batch {
        Some(id) => {
            let stored = db.batch_row(id).await?;
            let pool = SlotKeys::new(id, None);
            let meta = meta_get::call(backend, &pool).await?;
            match (stored, meta.is_empty()) {
                (None, true) => return Err(RebuildError::BatchNotFound(id.to_string())),
                (None, false) => diffs.push(Difference::MissingInDb {
                    batch: id.to_string(),
                }),
                (Some(b), _) => reconcile_batch(backend, db, &b, &mut diffs).await?,
            }
        }
        None => {
            for b in db.batch_rows().await? {
                reconcile_batch(backend, db, &b, &mut diffs).await?;
            }
        }
    }
    Ok(diffs)
}

async fn reconcile_batch<B: Backend>(
    backend: &B,
    db: &Db,
    stored: &StoredBatch,
    diffs: &mut Vec<Difference>,
) -> Result<(), RebuildError> {
    let batch = &stored.batch;
    let id = batch.id.clone();
    let keys = BatchKeys::new(&batch.id, batch.shards);
    let meta = meta_get::call(backend, &keys.pool).await?;
    if !stored.setup_done {
        diffs.push(Difference::SetupIncomplete { batch: id.clone() });
    }
    coupon_conflicts(db, &id, diffs).await?;
    if stored.retired() {
        // the database is its record (every claim and change reached it before its keys
        // were dropped; a retirement in progress drops only drained slots): nothing in Redis
        // to compare, the database's own log must agree with its rows
        return event_log(db, &id, diffs).await;
    }
    if meta.is_empty() {
        if stored.setup_done {
            diffs.push(Difference::MissingInRedis { batch: id });
        }
        return Ok(());
    }
    definition(backend, db, stored, &keys, diffs).await?;
    let total = meta.total().unwrap_or(0);
    // a batch with codes holds what its codes added (at most its stock, never more than the
    // codes the database knows); any other batch exactly its stock
    let known = match batch.codes {
        Some(_) => db.code_count(&batch.id).await?.min(batch.stock),
        None => batch.stock,
    };
    if total > known || (batch.codes.is_none() && total != known) {
        diffs.push(Difference::TotalStock {
            batch: id.clone(),
            redis: total,
            db: known,
        });
    }
    conservation(backend, &keys, &id, diffs).await?;

    // Reads are ordered so that a live batch shows no false difference: the database's
    // highest sequences before the counters (which only grow), stored claims after the
    // counter and log were read (a claim is in the log until it is committed), the Redis
    // user counts after the database ones (Redis counts a claim before it is persisted).
    let max_seq: HashMap<u32, u64> = db
        .claims_summary(&batch.id)
        .await?
        .into_iter()
        // the counter position of the highest id (ids carry their epoch above it)
        .map(|s| (s.shard, seq_position(s.max_seq)))
        .collect();
    for s in &keys.shards {
        let shard = s.slot.unwrap_or(0);
        let smeta = meta_get::call(backend, s).await?;
        if smeta.is_empty() {
            diffs.push(Difference::ShardMissing {
                batch: id.clone(),
                shard,
            });
            continue;
        }
        let lost = smeta.lost();
        let before = probe::call(backend, s).await?;
        let counter = u64::try_from(before.claimed).unwrap_or(0);
        let db_max = max_seq.get(&shard).copied().unwrap_or(0);
        if counter < db_max {
            diffs.push(Difference::CounterBehind {
                batch: id.clone(),
                shard,
                counter,
                db_max_seq: db_max,
            });
        }
        // Claims waiting in the log (an entry holds a whole claim call), counted before the
        // database is read: a claim minted before `before` is then either still counted
        // here or was deleted from the log after it committed, so in the rows read next.
        let pending = log_count::claims(backend, &s.log, before.log_len).await?;
        let claims = db.claims_of_shard(&batch.id, shard).await?;
        let db_count = claims.len() as u64;
        let mut db_users: HashMap<String, u64> = HashMap::new();
        for c in claims {
            *db_users.entry(c.user_id).or_default() += 1;
        }
        let redis_users: HashMap<String, u64> =
            winners::call(backend, s).await?.into_iter().collect();
        let after = probe::call(backend, s).await?;
        let counter_after = u64::try_from(after.claimed).unwrap_or(0);
        if db_count > counter_after {
            diffs.push(Difference::ClaimsExtra {
                batch: id.clone(),
                shard,
                counter: counter_after,
                db: db_count,
            });
        } else if db_count + pending + lost < counter {
            diffs.push(Difference::ClaimsMissing {
                batch: id.clone(),
                shard,
                counter,
                db: db_count,
                log: pending,
                lost,
            });
        }
        // Redis above the database is expected while claims wait in the log or arrive;
        // it is a difference only when the shard was quiet throughout. Redis below the
        // database (a user could exceed the limit) always is.
        let quiet = before.log_len == 0 && before.claimed == after.claimed;
        let mut user_diffs = Vec::new();
        for (user, &n_db) in &db_users {
            let n_redis = redis_users.get(user).copied().unwrap_or(0);
            if n_redis < n_db || (n_redis > n_db && quiet) {
                user_diffs.push((user.clone(), n_redis, n_db));
            }
        }
        if quiet {
            for (user, &n_redis) in &redis_users {
                if n_redis > 0 && !db_users.contains_key(user) {
                    user_diffs.push((user.clone(), n_redis, 0));
                }
            }
        }
        user_diffs.sort();
        let more = user_diffs.len().saturating_sub(MAX_USER_DIFFERENCES);
        for (user, redis, db) in user_diffs.into_iter().take(MAX_USER_DIFFERENCES) {
            diffs.push(Difference::UserCount {
                batch: id.clone(),
                shard,
                user,
                redis,
                db,
            });
        }
        if more > 0 {
            diffs.push(Difference::MoreUserCounts {
                batch: id.clone(),
                shard,
                more,
            });
        }
    }
    event_log(db, &id, diffs).await
}

/// Coupon rows and their `claimed` events agree in number.
async fn event_log(db: &Db, id: &str, diffs: &mut Vec<Difference>) -> Result<(), RebuildError> {
    let (coupons, events) = db.claim_counts(id).await?;
    if coupons != events {
        diffs.push(Difference::EventLog {
            batch: id.to_string(),
            coupons,
            events,
        });
    }
    Ok(())
}

/// Lists the batch's recorded coupon conflicts.
async fn coupon_conflicts(
    db: &Db,
    batch: &str,
    diffs: &mut Vec<Difference>,
) -> Result<(), RebuildError> {
    let conflicts = db.coupon_conflicts(batch).await?;
    let more = conflicts.len().saturating_sub(MAX_USER_DIFFERENCES);
    for c in conflicts.into_iter().take(MAX_USER_DIFFERENCES) {
        diffs.push(Difference::CouponConflict {
            batch: batch.to_string(),
            coupon: c.coupon_id,
            stored_user: c.stored_user_id,
            user: c.user_id,
            request: c.request_id,
            claimed_at: c.claimed_at,
        });
    }
    if more > 0 {
        diffs.push(Difference::MoreCouponConflicts {
            batch: batch.to_string(),
            more,
        });
    }
    Ok(())
}

/// Compares every slot's metadata with the database's definition. The row is read before
/// and after the slots, and the comparison made only when no change committed in between
/// (else a live PATCH would show as a false difference).
async fn definition<B: Backend>(
    backend: &B,
    db: &Db,
    stored: &StoredBatch,
    keys: &BatchKeys,
    diffs: &mut Vec<Difference>,
) -> Result<(), RebuildError> {
    let id = &stored.batch.id;
    let mut row = stored.clone();
    for _ in 0..SNAPSHOT_ATTEMPTS {
        let mut metas = Vec::with_capacity(keys.shards.len() + 1);
        for slot in keys.all() {
            metas.push(meta_get::call(backend, slot).await?);
        }
        let Some(after) = db.batch_row(id).await? else {
            return Ok(()); // deleted meanwhile (a refused create): nothing to compare
        };
        if after.version != row.version {
            row = after;
            continue;
        }
        for (slot, meta) in keys.all().zip(&metas) {
            compare_slot(&row, slot, meta, diffs);
        }
        return Ok(());
    }
    diffs.push(Difference::Unsettled { batch: id.clone() });
    Ok(())
}

fn compare_slot(row: &StoredBatch, slot: &SlotKeys, meta: &SlotMeta, diffs: &mut Vec<Difference>) {
    if meta.is_empty() {
        return; // reported as a missing slot
    }
    let batch = &row.batch;
    let label = slot.label.clone();
    let redis_version = meta.version();
    if redis_version < row.version {
        diffs.push(Difference::VersionBehind {
            batch: batch.id.clone(),
            slot: label,
            redis: redis_version,
            db: row.version,
        });
        return;
    }
    let mut differ = |field: String, redis: String, db: String| {
        diffs.push(Difference::DefinitionDiffers {
            batch: batch.id.clone(),
            slot: label.clone(),
            field,
            redis,
            db,
        });
    };
    for (field, want) in meta::fields(batch, 0) {
        if field == meta::VERSION {
            continue;
        }
        let got = meta.get(field).unwrap_or_default().to_string();
        if got != want {
            differ(field.to_string(), got, want);
        }
    }
    if slot.is_pool() {
        // the budget's cap, which `lua/patch.lua` holds the total under
        let want = batch
            .budget_cap()
            .map(|c| c.to_string())
            .unwrap_or_default();
        let got = meta.get(meta::CAP).unwrap_or_default().to_string();
        if got != want {
            differ(meta::CAP.to_string(), got, want);
        }
        let want = serde_json::to_value(batch).unwrap_or_default();
        let got: serde_json::Value = meta
            .get(meta::DEFINITION)
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or_default();
        if got != want {
            let empty = serde_json::Map::new();
            let (g, w) = (
                got.as_object().unwrap_or(&empty),
                want.as_object().unwrap_or(&empty),
            );
            let mut keys: Vec<&String> = g.keys().chain(w.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                if g.get(k) != w.get(k) {
                    let show = |v: Option<&serde_json::Value>| {
                        v.map_or_else(|| "(none)".to_string(), ToString::to_string)
                    };
                    differ(format!("def.{k}"), show(g.get(k)), show(w.get(k)));
                }
            }
        }
    }
}

/// The census's conservation check on a consistent snapshot of a live batch
/// ([`census::settled`]).
async fn conservation<B: Backend>(
    backend: &B,
    keys: &BatchKeys,
    batch: &str,
    diffs: &mut Vec<Difference>,
) -> Result<(), RebuildError> {
    match census::settled(backend, keys, SNAPSHOT_ATTEMPTS).await? {
        Some(c) if c.holds() => {}
        Some(c) => diffs.push(Difference::Conservation {
            batch: batch.to_string(),
            total: c.total,
            pool: c.pool,
            shards: c.shards,
            in_flight: c.in_flight,
            claimed: c.claimed,
        }),
        None => diffs.push(Difference::Unsettled {
            batch: batch.to_string(),
        }),
    }
    Ok(())
}
