//! Redis data loss: rebuilding a batch's Redis state from the database, and reconciling
//! the two.
//!
//! Invariants kept here:
//! - a rebuild never re-sells stock and never lets a user past a limit: the pool gets
//!   `total - issued`, where `issued` counts every coupon sequence number a shard ever handed
//!   out (coupons missing from the database count as issued), each shard's per-user and
//!   per-day counts and request ids come from the database, and the claim counter never goes
//!   back, so new coupon ids never collide with old ones;
//! - a rebuild refuses while a shard log still holds claims the database does not have yet;
//! - a slot goes live only once complete: its meta is written last (`lua/restore.lua`), and
//!   the pool (which makes the batch visible) after every shard;
//! - the restored definition is the database's, at a version no older than the database's
//!   (so later changes, versioned by the database, apply on top of it), and the batch is
//!   recorded as set up: a create never sets it up again.
//!
//! `reconcile` reports, besides stock and claims, every slot whose definition lags behind
//! or differs from the database's, and every coupon id the persister met twice.

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;

use crate::backend::{Backend, BackendError, Script, Value};
use crate::db::{Db, DbError, StoredBatch, now_ms};
use crate::domain::batch::Batch;
use crate::domain::ids::home_shard;
use crate::keys::{BatchKeys, SlotKeys};

/// Field/value pairs (or set members) per `restore.lua` call: bounds each call's size.
pub const RESTORE_CHUNK: usize = 500;
/// Per shard, at most this many per-user differences are listed (then a count of the rest).
pub const MAX_USER_DIFFERENCES: usize = 50;
/// Attempts at a conservation snapshot taken while no stock moved.
const SNAPSHOT_ATTEMPTS: usize = 5;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Error)]
pub enum RebuildError {
    #[error("batch {0} is not in the database")]
    BatchNotFound(String),
    #[error("batch {0} still exists in Redis (its pool meta is there); use --force to overwrite")]
    Live(String),
    #[error(
        "shard {shard} of batch {batch} holds {entries} claim records not yet in the database; \
         let the persister drain them and retry"
    )]
    Unpersisted {
        batch: String,
        shard: u32,
        entries: u64,
    },
    #[error("slot {slot} of batch {batch} went live during the rebuild; retry")]
    Raced { batch: String, slot: String },
    #[error("redis: {0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Db(#[from] DbError),
}

/// What a rebuild restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub batch_id: String,
    /// The batch version written to every slot's meta.
    pub version: u64,
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
}

impl fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rebuilt batch {} (version {}, {} shards): {} claims, {} user counters, \
             {} request ids, {} daily counters, {} denied users; issued {} of {} \
             ({} lost before persistence); pool stock {}",
            self.batch_id,
            self.version,
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
        )
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
    let stored = db
        .batch_row(batch_id)
        .await?
        .ok_or_else(|| RebuildError::BatchNotFound(batch_id.to_string()))?;
    let batch = stored.batch;
    let keys = BatchKeys::new(&batch.id, batch.shards);
    if !force && !hgetall(backend, &keys.pool.meta).await?.is_empty() {
        return Err(RebuildError::Live(batch.id.clone()));
    }
    // Check every log before touching anything (begin re-checks atomically per shard).
    for s in &keys.shards {
        let p = probe(backend, s).await?;
        if p.log_len > 0 {
            return Err(unpersisted(&batch, s, p.log_len));
        }
    }
    // Above any version gateways may have cached from the Redis that was lost, and never
    // below the database's (changes are versioned by the database).
    let version = u64::try_from(now_ms().max(stored.version))
        .unwrap_or(1)
        .max(1);
    let mut report = RebuildReport {
        batch_id: batch.id.clone(),
        version,
        shards: batch.shards,
        total: batch.stock,
        ..Default::default()
    };
    begin(backend, &batch, &keys.pool, force).await?;
    let today = now_ms().div_euclid(DAY_MS);
    let base_meta = with_fp(&batch, batch.meta_pairs(version));
    for s in &keys.shards {
        // Once the pool is gone the batch is not live: shard leftovers (of an interrupted
        // rebuild, or of a node that survived) are replaced, unpersisted claims excepted.
        let counter = begin(backend, &batch, s, true).await?;
        let shard = s.slot.unwrap_or(0);
        let claims = db.claims_of_shard(&batch.id, shard).await?;
        let mut users: HashMap<&str, u64> = HashMap::new();
        let mut daily: HashMap<&str, u64> = HashMap::new();
        let mut req = Vec::new();
        let mut max_seq = 0;
        for c in &claims {
            *users.entry(c.user_id.as_str()).or_default() += 1;
            if c.claimed_at.div_euclid(DAY_MS) == today {
                *daily.entry(c.user_id.as_str()).or_default() += 1;
            }
            if let Some(rid) = &c.request_id {
                req.push((
                    format!("{}|{rid}", c.user_id),
                    format!(
                        "{}|{}|{}|{}",
                        c.coupon_id, c.valid_from, c.valid_to, c.claimed_at
                    ),
                ));
            }
            max_seq = max_seq.max(c.seq);
        }
        let user_pairs: Vec<(String, String)> = users
            .iter()
            .map(|(u, n)| (u.to_string(), n.to_string()))
            .collect();
        let daily_pairs: Vec<(String, String)> = if batch.per_user_daily_limit.is_some() {
            daily
                .iter()
                .map(|(u, n)| (u.to_string(), format!("{today}:{n}")))
                .collect()
        } else {
            Vec::new()
        };
        hset_chunks(backend, &batch, s, "users", &user_pairs).await?;
        hset_chunks(backend, &batch, s, "daily", &daily_pairs).await?;
        hset_chunks(backend, &batch, s, "req", &req).await?;
        let deny: Vec<&str> = batch
            .eligibility
            .deny_users
            .iter()
            .filter(|u| home_shard(u, batch.shards) == shard)
            .map(String::as_str)
            .collect();
        for chunk in deny.chunks(RESTORE_CHUNK) {
            let mut args = vec!["deny"];
            args.extend(chunk.iter().copied());
            expect_ok(backend, &batch, s, &args).await?;
        }
        let issued = counter.max(max_seq);
        let count = claims.len() as u64;
        let lost = issued.saturating_sub(count);
        let mut meta = base_meta.clone();
        meta.push(("lost".to_string(), lost.to_string()));
        let final_counter = finish(backend, &batch, s, 0, issued, &meta).await?;
        report.claims += count;
        report.users += user_pairs.len() as u64;
        report.daily += daily_pairs.len() as u64;
        report.requests += req.len() as u64;
        report.denied += deny.len() as u64;
        report.issued += final_counter;
        report.lost += final_counter.saturating_sub(count);
    }
    let issued = i64::try_from(report.issued).unwrap_or(i64::MAX);
    report.pool_stock = (batch.stock - issued).max(0);
    if batch.stock < issued {
        tracing::error!(batch = %batch.id, total = batch.stock, issued,
            "more coupons issued than stock: the pool is restored empty");
    }
    let def = serde_json::to_string(&batch)
        .map_err(|e| DbError::Corrupt(format!("batch {} does not serialize: {e}", batch.id)))?;
    let mut pool_meta = base_meta;
    pool_meta.extend([
        ("total".to_string(), batch.stock.to_string()),
        ("def".to_string(), def),
        ("soldout".to_string(), "0".to_string()),
    ]);
    let pool_stock = u64::try_from(report.pool_stock).unwrap_or(0);
    finish(backend, &batch, &keys.pool, pool_stock, 0, &pool_meta).await?;
    db.mark_setup_done(&batch.id).await?;
    tracing::info!(batch = %batch.id, "{report}");
    // Gateways serving the batch as lost re-read it now rather than at their next refresh.
    if let Err(e) = backend.publish(&format!("changed {}", batch.id)).await {
        tracing::warn!(batch = %batch.id, error = %e, "change broadcast failed");
    }
    Ok(report)
}

fn with_fp(batch: &Batch, pairs: Vec<(&'static str, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> =
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    out.push(("fp".to_string(), batch.fingerprint()));
    out
}

fn unpersisted(batch: &Batch, s: &SlotKeys, entries: u64) -> RebuildError {
    RebuildError::Unpersisted {
        batch: batch.id.clone(),
        shard: s.slot.unwrap_or(0),
        entries,
    }
}

fn restore_keys(s: &SlotKeys) -> [&str; 10] {
    [
        &s.meta, &s.stock, &s.users, &s.daily, &s.req, &s.deny, &s.claimed, &s.xseq, &s.outbox,
        &s.log,
    ]
}

/// Runs one restore step; returns `(code, n)`.
async fn restore<B: Backend>(
    backend: &B,
    s: &SlotKeys,
    args: &[&str],
) -> Result<(i64, u64), RebuildError> {
    let reply = backend
        .eval(Script::Restore, &restore_keys(s), args)
        .await?;
    let parts = reply.into_array().unwrap_or_default();
    match (
        parts.first().and_then(Value::as_int),
        parts.get(1).and_then(Value::as_int),
    ) {
        (Some(code), Some(n)) => Ok((code, u64::try_from(n).unwrap_or(0))),
        _ => Err(BackendError::Protocol(format!("restore returned {parts:?}")).into()),
    }
}

async fn begin<B: Backend>(
    backend: &B,
    batch: &Batch,
    s: &SlotKeys,
    force: bool,
) -> Result<u64, RebuildError> {
    match restore(backend, s, &["begin", if force { "1" } else { "0" }]).await? {
        (1, counter) => Ok(counter),
        (-2, len) => Err(unpersisted(batch, s, len)),
        _ => Err(RebuildError::Live(batch.id.clone())),
    }
}

async fn expect_ok<B: Backend>(
    backend: &B,
    batch: &Batch,
    s: &SlotKeys,
    args: &[&str],
) -> Result<u64, RebuildError> {
    match restore(backend, s, args).await? {
        (1, n) => Ok(n),
        _ => Err(RebuildError::Raced {
            batch: batch.id.clone(),
            slot: s.label(),
        }),
    }
}

async fn hset_chunks<B: Backend>(
    backend: &B,
    batch: &Batch,
    s: &SlotKeys,
    target: &str,
    pairs: &[(String, String)],
) -> Result<(), RebuildError> {
    for chunk in pairs.chunks(RESTORE_CHUNK) {
        let mut args = Vec::with_capacity(2 + 2 * chunk.len());
        args.push("hset");
        args.push(target);
        for (f, v) in chunk {
            args.push(f.as_str());
            args.push(v.as_str());
        }
        expect_ok(backend, batch, s, &args).await?;
    }
    Ok(())
}

async fn finish<B: Backend>(
    backend: &B,
    batch: &Batch,
    s: &SlotKeys,
    stock: u64,
    counter_floor: u64,
    meta: &[(String, String)],
) -> Result<u64, RebuildError> {
    let (stock, floor, n) = (
        stock.to_string(),
        counter_floor.to_string(),
        meta.len().to_string(),
    );
    let mut args: Vec<&str> = vec!["finish", &stock, &floor, &n];
    for (k, v) in meta {
        args.push(k);
        args.push(v);
    }
    expect_ok(backend, batch, s, &args).await
}

/// `HGETALL` of a hash (through `lua/meta_get.lua`, which reads any hash given as KEYS[1]).
async fn hgetall<B: Backend>(
    backend: &B,
    key: &str,
) -> Result<HashMap<String, String>, RebuildError> {
    let reply = backend.eval(Script::MetaGet, &[key], &[]).await?;
    let flat = match reply {
        Value::Array(a) => a,
        Value::Nil => Vec::new(),
        other => {
            return Err(BackendError::Protocol(format!("meta_get returned {other:?}")).into());
        }
    };
    let mut out = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(f), Some(v)) = (it.next(), it.next()) {
        if let (Some(f), Some(v)) = (f.as_str(), v.as_str()) {
            out.insert(f.to_string(), v.to_string());
        }
    }
    Ok(out)
}

/// One slot as `lua/probe.lua` sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Probe {
    stock: i64,
    xseq: i64,
    claimed: i64,
    log_len: u64,
    /// Outbox: transfer id -> (destination label, amount).
    outbox: Vec<(String, String, i64)>,
}

async fn probe<B: Backend>(backend: &B, s: &SlotKeys) -> Result<Probe, RebuildError> {
    let reply = backend.eval(Script::Probe, &s.probe_keys(), &[]).await?;
    let bad =
        || BackendError::Protocol(format!("probe of {} returned an unexpected reply", s.meta));
    let parts = reply.into_array().ok_or_else(bad)?;
    let int = |i: usize| parts.get(i).and_then(Value::as_int).ok_or_else(bad);
    let mut p = Probe {
        stock: int(0)?,
        xseq: int(1)?,
        claimed: int(2)?,
        log_len: u64::try_from(int(3)?).unwrap_or(0),
        outbox: Vec::new(),
    };
    if let Some(Value::Array(flat)) = parts.get(6) {
        for pair in flat.chunks(2) {
            let (Some(id), Some(val)) = (
                pair.first().and_then(Value::as_str),
                pair.get(1).and_then(Value::as_str),
            ) else {
                return Err(bad().into());
            };
            let mut f = val.split('|');
            let dest = f.next().unwrap_or_default().to_string();
            let amount = f.next().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
            p.outbox.push((id.to_string(), dest, amount));
        }
    }
    Ok(p)
}

/// One way Redis and the database (or Redis and itself) disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The database has the batch, Redis does not (rebuild it).
    MissingInRedis { batch: String },
    /// Redis has the batch, the database does not.
    MissingInDb { batch: String },
    /// The pool exists but one shard's meta does not.
    ShardMissing { batch: String, shard: u32 },
    /// Total stock differs between the pool meta and the database definition.
    TotalStock { batch: String, redis: i64, db: i64 },
    /// pool + shards + in flight + claimed != total.
    Conservation {
        batch: String,
        total: i64,
        pool: i64,
        shards: i64,
        in_flight: i64,
        claimed: i64,
    },
    /// Stock kept moving; no consistent snapshot for the conservation check.
    Unsettled { batch: String },
    /// The database holds a coupon sequence above the shard's claim counter: new coupon
    /// ids would collide with stored ones.
    CounterBehind {
        batch: String,
        shard: u32,
        counter: u64,
        db_max_seq: u64,
    },
    /// Claims the shard issued that are neither in the database nor in its log.
    ClaimsMissing {
        batch: String,
        shard: u32,
        counter: u64,
        db: u64,
        log: u64,
        lost: u64,
    },
    /// More coupons in the database than the shard ever issued.
    ClaimsExtra {
        batch: String,
        shard: u32,
        counter: u64,
        db: u64,
    },
    /// A user's claim count in the shard differs from the database.
    UserCount {
        batch: String,
        shard: u32,
        user: String,
        redis: u64,
        db: u64,
    },
    /// More per-user differences in the shard than listed.
    MoreUserCounts {
        batch: String,
        shard: u32,
        more: usize,
    },
    /// Coupon rows and `claimed` events of the batch differ in number.
    EventLog {
        batch: String,
        coupons: u64,
        events: u64,
    },
    /// The batch's create has not recorded a completed Redis setup (in progress, or it
    /// crashed part-way: repeat the identical create).
    SetupIncomplete { batch: String },
    /// A slot holds an older version of the definition than the database (a change not
    /// applied yet; gateways re-apply the stored definition within a few refreshes).
    VersionBehind {
        batch: String,
        slot: String,
        redis: i64,
        db: i64,
    },
    /// A slot's metadata disagrees with the database's definition at its version.
    DefinitionDiffers {
        batch: String,
        slot: String,
        field: String,
        redis: String,
        db: String,
    },
    /// A coupon id the persister met again with a different claim (minted twice). The
    /// database keeps the stored claim; the other one is in `coupon_conflicts`.
    CouponConflict {
        batch: String,
        coupon: String,
        stored_user: String,
        user: String,
        request: Option<String>,
        claimed_at: i64,
    },
    /// More coupon conflicts in the batch than listed.
    MoreCouponConflicts { batch: String, more: usize },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::MissingInRedis { batch } => {
                write!(f, "batch {batch}: in the database but missing in Redis")
            }
            Difference::MissingInDb { batch } => {
                write!(f, "batch {batch}: in Redis but missing in the database")
            }
            Difference::ShardMissing { batch, shard } => {
                write!(f, "batch {batch} shard {shard}: meta missing in Redis")
            }
            Difference::TotalStock { batch, redis, db } => {
                write!(
                    f,
                    "batch {batch}: total stock {redis} in Redis, {db} in the database"
                )
            }
            Difference::Conservation {
                batch,
                total,
                pool,
                shards,
                in_flight,
                claimed,
            } => write!(
                f,
                "batch {batch}: stock not conserved: total {total} != pool {pool} + shards \
                 {shards} + in flight {in_flight} + claimed {claimed} (off by {})",
                pool + shards + in_flight + claimed - total
            ),
            Difference::Unsettled { batch } => write!(
                f,
                "batch {batch}: stock kept moving; conservation not checked (retry)"
            ),
            Difference::CounterBehind {
                batch,
                shard,
                counter,
                db_max_seq,
            } => write!(
                f,
                "batch {batch} shard {shard}: claim counter {counter} below the highest stored \
                 coupon sequence {db_max_seq} (coupon ids would collide)"
            ),
            Difference::ClaimsMissing {
                batch,
                shard,
                counter,
                db,
                log,
                lost,
            } => write!(
                f,
                "batch {batch} shard {shard}: {} claims missing: counter {counter}, database \
                 {db}, log {log}, known lost {lost}",
                counter.saturating_sub(db + log + lost)
            ),
            Difference::ClaimsExtra {
                batch,
                shard,
                counter,
                db,
            } => write!(
                f,
                "batch {batch} shard {shard}: database holds {db} coupons, more than the {counter} \
                 the shard issued"
            ),
            Difference::UserCount {
                batch,
                shard,
                user,
                redis,
                db,
            } => write!(
                f,
                "batch {batch} shard {shard}: user {user} has {redis} claims in Redis, {db} in \
                 the database"
            ),
            Difference::MoreUserCounts { batch, shard, more } => write!(
                f,
                "batch {batch} shard {shard}: {more} more per-user differences not listed"
            ),
            Difference::EventLog {
                batch,
                coupons,
                events,
            } => write!(
                f,
                "batch {batch}: {coupons} coupon rows but {events} claimed events"
            ),
            Difference::SetupIncomplete { batch } => write!(
                f,
                "batch {batch}: its Redis setup never completed (repeat the identical create)"
            ),
            Difference::VersionBehind {
                batch,
                slot,
                redis,
                db,
            } => write!(
                f,
                "batch {batch} slot {slot}: definition version {redis} in Redis, {db} in the \
                 database (change not applied yet)"
            ),
            Difference::DefinitionDiffers {
                batch,
                slot,
                field,
                redis,
                db,
            } => write!(
                f,
                "batch {batch} slot {slot}: {field} is {redis:?} in Redis, {db:?} in the database"
            ),
            Difference::CouponConflict {
                batch,
                coupon,
                stored_user,
                user,
                request,
                claimed_at,
            } => write!(
                f,
                "batch {batch}: coupon {coupon} minted twice: the database holds it for user \
                 {stored_user}; the claim of user {user} (request {}, at {claimed_at}) is in \
                 coupon_conflicts",
                request.as_deref().unwrap_or("-")
            ),
            Difference::MoreCouponConflicts { batch, more } => {
                write!(f, "batch {batch}: {more} more coupon conflicts not listed")
            }
        }
    }
}

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
            let meta = hgetall(backend, &pool.meta).await?;
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
    let meta = hgetall(backend, &keys.pool.meta).await?;
    if !stored.setup_done {
        diffs.push(Difference::SetupIncomplete { batch: id.clone() });
    }
    coupon_conflicts(db, &id, diffs).await?;
    if meta.is_empty() {
        if stored.setup_done {
            diffs.push(Difference::MissingInRedis { batch: id });
        }
        return Ok(());
    }
    definition(backend, db, stored, &keys, diffs).await?;
    let total: i64 = meta.get("total").and_then(|t| t.parse().ok()).unwrap_or(0);
    if total != batch.stock {
        diffs.push(Difference::TotalStock {
            batch: id.clone(),
            redis: total,
            db: batch.stock,
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
        .map(|s| (s.shard, s.max_seq))
        .collect();
    for s in &keys.shards {
        let shard = s.slot.unwrap_or(0);
        let smeta = hgetall(backend, &s.meta).await?;
        if smeta.is_empty() {
            diffs.push(Difference::ShardMissing {
                batch: id.clone(),
                shard,
            });
            continue;
        }
        let lost: u64 = smeta.get("lost").and_then(|v| v.parse().ok()).unwrap_or(0);
        let before = probe(backend, s).await?;
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
        let claims = db.claims_of_shard(&batch.id, shard).await?;
        let db_count = claims.len() as u64;
        let mut db_users: HashMap<String, u64> = HashMap::new();
        for c in claims {
            *db_users.entry(c.user_id).or_default() += 1;
        }
        let redis_users = hgetall(backend, &s.users).await?;
        let after = probe(backend, s).await?;
        let counter_after = u64::try_from(after.claimed).unwrap_or(0);
        if db_count > counter_after {
            diffs.push(Difference::ClaimsExtra {
                batch: id.clone(),
                shard,
                counter: counter_after,
                db: db_count,
            });
        } else if db_count + before.log_len + lost < counter {
            diffs.push(Difference::ClaimsMissing {
                batch: id.clone(),
                shard,
                counter,
                db: db_count,
                log: before.log_len,
                lost,
            });
        }
        // Redis above the database is expected while claims wait in the log or arrive;
        // it is a difference only when the shard was quiet throughout. Redis below the
        // database (a user could exceed the limit) always is.
        let quiet = before.log_len == 0 && before.claimed == after.claimed;
        let mut user_diffs = Vec::new();
        for (user, &n_db) in &db_users {
            let n_redis = redis_users
                .get(user)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if n_redis < n_db || (n_redis > n_db && quiet) {
                user_diffs.push((user.clone(), n_redis, n_db));
            }
        }
        if quiet {
            for (user, v) in &redis_users {
                let n_redis: u64 = v.parse().unwrap_or(0);
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
    let (coupons, events) = db.claim_counts(&batch.id).await?;
    if coupons != events {
        diffs.push(Difference::EventLog {
            batch: id,
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
            metas.push(hgetall(backend, &slot.meta).await?);
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

fn compare_slot(
    row: &StoredBatch,
    slot: &SlotKeys,
    meta: &HashMap<String, String>,
    diffs: &mut Vec<Difference>,
) {
    if meta.is_empty() {
        return; // reported as a missing slot
    }
    let batch = &row.batch;
    let label = slot.label();
    let redis_version: i64 = meta.get("ver").and_then(|v| v.parse().ok()).unwrap_or(0);
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
    for (field, want) in batch.meta_pairs(0) {
        if field == "ver" {
            continue;
        }
        let got = meta.get(field).cloned().unwrap_or_default();
        if got != want {
            differ(field.to_string(), got, want);
        }
    }
    if slot.slot.is_none() {
        let want = serde_json::to_value(batch).unwrap_or_default();
        let got: serde_json::Value = meta
            .get("def")
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

/// Checks total == pool + Σ shard stock + in flight + Σ claimed on a consistent snapshot:
/// every slot's transfer sequence is read twice and must not move in between (claims do
/// not bump it, but move stock to claimed within one slot, which the probe reads atomically).
async fn conservation<B: Backend>(
    backend: &B,
    keys: &BatchKeys,
    batch: &str,
    diffs: &mut Vec<Difference>,
) -> Result<(), RebuildError> {
    for _ in 0..SNAPSHOT_ATTEMPTS {
        let total_before = hgetall(backend, &keys.pool.meta)
            .await?
            .get("total")
            .cloned();
        let mut first = Vec::new();
        for s in keys.all() {
            first.push(probe(backend, s).await?);
        }
        let mut in_flight = 0;
        for p in &first {
            for (tid, dest, amount) in &p.outbox {
                let Some(d) = keys.by_label(dest) else {
                    in_flight += amount; // an unknown destination was never credited
                    continue;
                };
                let marker = d.inbox(tid);
                let credited = backend
                    .eval(Script::InboxCheck, &[&marker], &[])
                    .await?
                    .as_int()
                    == Some(1);
                if !credited {
                    in_flight += amount;
                }
            }
        }
        let mut stable = true;
        for (s, p) in keys.all().zip(&first) {
            if probe(backend, s).await?.xseq != p.xseq {
                stable = false;
                break;
            }
        }
        let total_after = hgetall(backend, &keys.pool.meta)
            .await?
            .get("total")
            .cloned();
        if !stable || total_before != total_after {
            continue;
        }
        let total: i64 = total_after.and_then(|t| t.parse().ok()).unwrap_or(0);
        let pool = first[0].stock;
        let shards: i64 = first[1..].iter().map(|p| p.stock).sum();
        let claimed: i64 = first.iter().map(|p| p.claimed).sum();
        if pool + shards + in_flight + claimed != total {
            diffs.push(Difference::Conservation {
                batch: batch.to_string(),
                total,
                pool,
                shards,
                in_flight,
                claimed,
            });
        }
        return Ok(());
    }
    diffs.push(Difference::Unsettled {
        batch: batch.to_string(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_print_one_line_each() {
        let d = [
            Difference::MissingInRedis { batch: "b".into() },
            Difference::Conservation {
                batch: "b".into(),
                total: 10,
                pool: 2,
                shards: 3,
                in_flight: 0,
                claimed: 4,
            },
            Difference::ClaimsMissing {
                batch: "b".into(),
                shard: 1,
                counter: 9,
                db: 5,
                log: 1,
                lost: 0,
            },
        ];
        for x in &d {
            let s = x.to_string();
            assert!(!s.contains('\n'), "{s}");
            assert!(s.starts_with("batch b"), "{s}");
        }
        assert!(d[1].to_string().contains("off by -1"));
        assert!(d[2].to_string().contains("3 claims missing"));
    }
}
