//! What `reconcile` reports: one way Redis and the database (or Redis and itself) disagree,
//! one line each.
//!
//! Invariant kept here: every difference names its batch (and slot or shard) and prints on
//! one line, so an operator can grep and count them.

use std::fmt;

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
    /// Claims the shard issued that are neither in the database nor in its log (`log`: the
    /// claims its log holds, not its entries).
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
                write!(
                    f,
                    "batch {batch}: in the database but missing in the backend"
                )
            }
            Difference::MissingInDb { batch } => {
                write!(
                    f,
                    "batch {batch}: in the backend but missing in the database"
                )
            }
            Difference::ShardMissing { batch, shard } => {
                write!(
                    f,
                    "batch {batch} shard {shard}: meta missing in the backend"
                )
            }
            Difference::TotalStock { batch, redis, db } => {
                write!(
                    f,
                    "batch {batch}: total stock {redis} in the backend, {db} in the database"
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
                "batch {batch}: its backend setup never completed (repeat the identical create)"
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
                "batch {batch} slot {slot}: {field} is {redis:?} in the backend, {db:?} in the database"
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
