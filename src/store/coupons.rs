//! Coupons in the database: the wallet's pages, one coupon, its transaction log, and the
//! transitions of a checkout applied as compare-and-sets.
//!
//! Invariant kept here: every coupon state change is a compare-and-set on the row's
//! `version` and appends its event row in the same transaction, so the log and the
//! materialised state never disagree and concurrent transitions cannot both win.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

use super::coupon_state::{CouponState, Plan, StoredCoupon, Transition, plan};
use super::{Db, DbError, now_ms, to_u32};

/// How often a coupon transition retries after losing a compare-and-set race.
const TRANSITION_RETRIES: usize = 8;
/// Largest page of a wallet listing.
pub const MAX_PAGE: u32 = 500;

/// A coupon as the wallet shows it (`state` is the effective state at read time: an expired
/// lock reads as unused, an unused coupon past `valid_to` as expired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CouponRow {
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    pub seq: u64,
    pub user_id: String,
    pub request_id: Option<String>,
    pub state: CouponState,
    pub order_id: Option<String>,
    pub lock_expires_at: Option<i64>,
    pub valid_from: i64,
    pub valid_to: i64,
    pub claimed_at: i64,
    pub updated_at: i64,
}

/// One row of the transaction log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    pub event_id: String,
    pub kind: String,
    pub batch_id: String,
    pub shard: u32,
    pub user_id: String,
    pub coupon_id: String,
    pub request_id: Option<String>,
    pub order_id: Option<String>,
    pub at: i64,
    pub recorded_at: i64,
}

macro_rules! stored_coupon {
    ($r:expr) => {
        StoredCoupon {
            coupon_id: $r.try_get(0)?,
            batch_id: $r.try_get(1)?,
            shard: $r.try_get(2)?,
            seq: $r.try_get(3)?,
            user_id: $r.try_get(4)?,
            request_id: $r.try_get(5)?,
            state: $r.try_get(6)?,
            order_id: $r.try_get(7)?,
            lock_expires_at: $r.try_get(8)?,
            valid_from: $r.try_get(9)?,
            valid_to: $r.try_get(10)?,
            claimed_at: $r.try_get(11)?,
            updated_at: $r.try_get(12)?,
            version: $r.try_get(13)?,
        }
    };
}

/// Wallet queries, one per status filter: `$1` user, `$2` cursor (exclusive), `$3` page
/// size + 1, `$4` now (bound only where used). Literals, so every query text is static.
const WALLET_ALL: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 ORDER BY coupon_id LIMIT $3";
const WALLET_UNUSED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 \
     AND (state = 'unused' OR (state = 'locked' AND lock_expires_at <= $4)) \
     AND valid_to >= $4 ORDER BY coupon_id LIMIT $3";
const WALLET_LOCKED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 \
     AND state = 'locked' AND lock_expires_at > $4 ORDER BY coupon_id LIMIT $3";
const WALLET_USED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND state = 'used' \
     ORDER BY coupon_id LIMIT $3";
const WALLET_EXPIRED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND (state = 'expired' OR \
     ((state = 'unused' OR (state = 'locked' AND lock_expires_at <= $4)) AND valid_to < $4)) \
     ORDER BY coupon_id LIMIT $3";

const COUPON_BY_ID: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE coupon_id = $1";

const UPDATE_COUPON: &str = "UPDATE coupons SET state = $1, order_id = $2, \
     lock_expires_at = $3, updated_at = $4, version = version + 1 \
     WHERE coupon_id = $5 AND version = $6";

const INSERT_EVENT: &str = "INSERT INTO coupon_events \
     (event_id, kind, batch_id, shard, user_id, coupon_id, request_id, order_id, at, recorded_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING";

impl Db {
    /// A user's coupons with the given effective state (all when `None`), ordered by coupon
    /// id, after `cursor` (exclusive). Returns the page and the cursor of the next page.
    pub async fn user_coupons(
        &self,
        user_id: &str,
        state: Option<CouponState>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<CouponRow>, Option<String>), DbError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let (sql, uses_now) = match state {
            None => (WALLET_ALL, false),
            Some(CouponState::Unused) => (WALLET_UNUSED, true),
            Some(CouponState::Locked) => (WALLET_LOCKED, true),
            Some(CouponState::Used) => (WALLET_USED, false),
            Some(CouponState::Expired) => (WALLET_EXPIRED, true),
        };
        let now = now_ms();
        let mut stored = Vec::new();
        on_pool!(self, p => {
            let mut q = sqlx::query(sql)
                .bind(user_id)
                .bind(cursor.unwrap_or(""))
                .bind(i64::from(limit) + 1);
            if uses_now {
                q = q.bind(now);
            }
            let rows = q.fetch_all(p).await?;
            for r in &rows {
                stored.push(stored_coupon!(r));
            }
        });
        let more = stored.len() > limit as usize;
        stored.truncate(limit as usize);
        let next = if more {
            stored.last().map(|c| c.coupon_id.clone())
        } else {
            None
        };
        let page = stored
            .into_iter()
            .map(|c| c.into_row(now))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((page, next))
    }

    pub async fn get_coupon(&self, coupon_id: &str) -> Result<Option<CouponRow>, DbError> {
        let now = now_ms();
        self.stored_coupon(coupon_id)
            .await?
            .map(|c| c.into_row(now))
            .transpose()
    }

    async fn stored_coupon(&self, coupon_id: &str) -> Result<Option<StoredCoupon>, DbError> {
        Ok(on_pool!(self, p => {
            match sqlx::query(COUPON_BY_ID).bind(coupon_id).fetch_optional(p).await? {
                Some(r) => Some(stored_coupon!(r)),
                None => None,
            }
        }))
    }

    /// Try: freezes the coupon for `order_id` until `lock_timeout` from now. Idempotent for
    /// the same order while the lock holds; an expired lock of any order counts as released.
    pub async fn lock(
        &self,
        coupon_id: &str,
        order_id: &str,
        lock_timeout: Duration,
    ) -> Result<CouponRow, DbError> {
        let timeout_ms = i64::try_from(lock_timeout.as_millis()).unwrap_or(i64::MAX);
        self.transition(coupon_id, order_id, Transition::Lock { timeout_ms })
            .await
    }

    /// Confirm: the coupon locked by `order_id` becomes used. Idempotent for the same order.
    pub async fn redeem(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        self.transition(coupon_id, order_id, Transition::Redeem)
            .await
    }

    /// Cancel: the coupon locked by `order_id` goes back to unused. Idempotent for the same
    /// order (also after its lock expired).
    pub async fn release(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        self.transition(coupon_id, order_id, Transition::Release)
            .await
    }

    async fn transition(
        &self,
        coupon_id: &str,
        order_id: &str,
        t: Transition,
    ) -> Result<CouponRow, DbError> {
        for _ in 0..TRANSITION_RETRIES {
            let now = now_ms();
            let Some(c) = self.stored_coupon(coupon_id).await? else {
                return Err(DbError::NotFound(coupon_id.to_string()));
            };
            let (state, lock_expires_at, events) = match plan(t, &c, order_id, now)? {
                Plan::Noop => return c.into_row(now),
                Plan::Apply {
                    state,
                    lock_expires_at,
                    events,
                } => (state, lock_expires_at, events),
            };
            let version = c.version + 1;
            let applied = on_pool!(self, p => {
                let mut tx = p.begin().await?;
                let n = sqlx::query(UPDATE_COUPON)
                    .bind(state.as_str())
                    .bind(order_id)
                    .bind(lock_expires_at)
                    .bind(now)
                    .bind(coupon_id)
                    .bind(c.version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 1 {
                    for (kind, order) in &events {
                        sqlx::query(INSERT_EVENT)
                            .bind(format!("{coupon_id}:{}:{version}", kind.as_str()))
                            .bind(kind.as_str())
                            .bind(&c.batch_id)
                            .bind(c.shard)
                            .bind(&c.user_id)
                            .bind(coupon_id)
                            .bind(c.request_id.as_deref())
                            .bind(order.as_str())
                            .bind(now)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    true
                } else {
                    tx.rollback().await?;
                    false
                }
            });
            if applied {
                let updated = StoredCoupon {
                    state: state.as_str().to_string(),
                    order_id: Some(order_id.to_string()),
                    lock_expires_at,
                    updated_at: now,
                    version,
                    ..c
                };
                return updated.into_row(now);
            }
        }
        Err(DbError::Contended(coupon_id.to_string()))
    }

    /// The transaction log of one coupon, oldest first.
    pub async fn coupon_events(&self, coupon_id: &str) -> Result<Vec<EventRow>, DbError> {
        type Row = (
            String,
            String,
            String,
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            i64,
            i64,
        );
        let rows: Vec<Row> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT event_id, kind, batch_id, shard, user_id, coupon_id, request_id, \
                 order_id, at, recorded_at FROM coupon_events WHERE coupon_id = $1 ORDER BY seq",
            )
            .bind(coupon_id)
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(|r| {
                Ok(EventRow {
                    event_id: r.0,
                    kind: r.1,
                    batch_id: r.2,
                    shard: to_u32(r.3, "shard")?,
                    user_id: r.4,
                    coupon_id: r.5,
                    request_id: r.6,
                    order_id: r.7,
                    at: r.8,
                    recorded_at: r.9,
                })
            })
            .collect()
    }
}
