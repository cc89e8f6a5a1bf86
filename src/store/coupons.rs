//! Coupons in the database: the wallet's pages, one coupon, its transaction log, the
//! transitions of a checkout and of a refund, the expiry and reminder sweeps, the managed
//! coupons due for expiry or a lock timeout (for the Redis-side sweep), and unmanaging a
//! shard's coupons. Every decision is the state machine's
//! ([`crate::domain::coupon::decide`]) on the stored row and an explicit `now` (the
//! caller's clock); [`super::coupon_state`] writes it.
//!
//! Invariants kept here: every coupon state change is a compare-and-set on the row's
//! `version` and appends its event rows and outbox rows in the same transaction, so the
//! log, the outbox and the materialised state never disagree and concurrent transitions
//! cannot both win; the state the wallet shows is the state machine's at `now` (the SQL
//! filters below select exactly the rows [`crate::domain::coupon::effective`] puts in each
//! state: a test compares them), so reads never wait for a sweeper; the expiry and lock
//! sweeps write only coupons whose state the database decides (`managed = 0`): a managed
//! coupon's expiry and lock timeout are decided in Redis ([`Db::due_managed`] finds them by
//! the same conditions), so the two never race on one row. Reminders are for every coupon.

use std::time::Duration;

use serde::Serialize;
use sqlx::Row;

use super::coupon_state::{Applying, StoredCoupon, coupon_columns, stored_coupon};
use super::outbox::{self, EXPIRING_SOON, Notice, reminder_event_id};
use super::{Db, DbError, now_ms, to_u32};
use crate::domain::coupon::{CouponState, Decision, Transition, decide, effective, reminder_due};
use crate::domain::time::Timestamp;

/// How often a coupon transition retries after losing a compare-and-set race.
const TRANSITION_RETRIES: usize = 8;
/// Largest page of a wallet listing.
pub const MAX_PAGE: u32 = 500;

/// A coupon as the wallet shows it (`state` is the effective state at read time: a lock
/// past its deadline reads as unused, a coupon past its validity end as expired).
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
    /// The coupon's code, in a batch that hands out codes.
    pub code: Option<String>,
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

/// A managed coupon time has changed: its validity ended (unused, or its lock lapsed:
/// [`Transition::Expire`]) or its lock's deadline passed inside its validity
/// ([`Transition::LockTimeout`]). The Redis side decides and writes the transition (the
/// database's sweeps leave managed coupons alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueManaged {
    pub coupon_id: String,
    /// [`Transition::Expire`] or [`Transition::LockTimeout`].
    pub transition: Transition,
}

/// What one pass of the expiry and reminder sweeps wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    /// Coupons written `expired` (with their `expired` event and outbox row).
    pub expired: u64,
    /// Lapsed locks written released (event `released`, cause `lock_timeout`, and its
    /// outbox row).
    pub released: u64,
    /// "Expiring soon" reminders written to the outbox.
    pub reminded: u64,
}

// A lock is over at its deadline; a locked row without one (written before deadlines were
// kept) reads as over. With the validity conditions below, the SQL of
// `domain::coupon::effective` at the instant `$now`.
macro_rules! lapsed_lock {
    ($now:literal) => {
        concat!(
            "(state = 'locked' AND (lock_expires_at IS NULL OR lock_expires_at <= ",
            $now,
            "))"
        )
    };
}

/// Wallet queries, one per status filter: `$1` user, `$2` cursor (exclusive), `$3` page
/// size + 1, `$4` now (bound only where used). Literals, so every query text is static.
const WALLET_ALL: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE user_id = $1 AND coupon_id > $2 ORDER BY coupon_id LIMIT $3"
);
const WALLET_UNUSED: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND (state = 'unused' OR ",
    lapsed_lock!("$4"),
    ") AND valid_to > $4 ORDER BY coupon_id LIMIT $3"
);
const WALLET_LOCKED: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE user_id = $1 AND coupon_id > $2 \
     AND state = 'locked' AND lock_expires_at > $4 ORDER BY coupon_id LIMIT $3"
);
const WALLET_USED: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND state = 'used' \
     ORDER BY coupon_id LIMIT $3"
);
const WALLET_EXPIRED: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND (state = 'expired' OR \
     ((state = 'unused' OR ",
    lapsed_lock!("$4"),
    ") AND valid_to <= $4)) ORDER BY coupon_id LIMIT $3"
);

const COUPON_BY_ID: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE coupon_id = $1"
);

// Coupons whose validity ended by `$2` (now) and that are not used: `$1` how many; of the
// coupons managed (`1`) or not (`0`).
macro_rules! expiry_due {
    ($managed:literal) => {
        concat!(
            "SELECT ",
            coupon_columns!(),
            " FROM coupons WHERE state IN ('unused', 'locked') AND valid_to <= $2 \
             AND (state = 'unused' OR ",
            lapsed_lock!("$2"),
            ") AND managed = ",
            $managed,
            " ORDER BY valid_to LIMIT $1"
        )
    };
}

// Locks whose deadline passed by `$2` (now) on coupons still valid then (past their
// validity end, expiry settles them): `$1` how many; of the coupons managed (`1`) or not
// (`0`).
macro_rules! lock_due {
    ($managed:literal) => {
        concat!(
            "SELECT ",
            coupon_columns!(),
            " FROM coupons WHERE state = 'locked' AND ",
            lapsed_lock!("$2"),
            " AND valid_to > $2 AND managed = ",
            $managed,
            " ORDER BY lock_expires_at LIMIT $1"
        )
    };
}

/// The expiry sweep's coupons: due, and decided by the database.
const EXPIRY_DUE: &str = expiry_due!("0");
/// The lock sweep's coupons: due, and decided by the database.
const LOCK_DUE: &str = lock_due!("0");
/// Managed coupons due for expiry ([`Db::due_managed`]).
const EXPIRY_DUE_MANAGED: &str = expiry_due!("1");
/// Managed coupons due for a lock timeout ([`Db::due_managed`]).
const LOCK_DUE_MANAGED: &str = lock_due!("1");

/// Usable coupons whose validity ends in `($2, $3]` (now, now + lead) and that were not
/// reminded yet: `$1` how many.
const REMINDER_DUE: &str = concat!(
    "SELECT ",
    coupon_columns!(),
    " FROM coupons WHERE reminded_at IS NULL AND state IN ('unused', 'locked') \
     AND valid_to > $2 AND valid_to <= $3 AND (state = 'unused' OR ",
    lapsed_lock!("$2"),
    ") ORDER BY valid_to LIMIT $1"
);

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
        self.user_coupons_at(user_id, state, limit, cursor, now_ms())
            .await
    }

    /// [`Db::user_coupons`] with the states as they are at `now`.
    pub async fn user_coupons_at(
        &self,
        user_id: &str,
        state: Option<CouponState>,
        limit: u32,
        cursor: Option<&str>,
        now: i64,
    ) -> Result<(Vec<CouponRow>, Option<String>), DbError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let (sql, uses_now) = match state {
            None => (WALLET_ALL, false),
            Some(CouponState::Unused) => (WALLET_UNUSED, true),
            Some(CouponState::Locked) => (WALLET_LOCKED, true),
            Some(CouponState::Used) => (WALLET_USED, false),
            Some(CouponState::Expired) => (WALLET_EXPIRED, true),
        };
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
        self.get_coupon_at(coupon_id, now_ms()).await
    }

    /// One coupon, its state as it is at `now`.
    pub async fn get_coupon_at(
        &self,
        coupon_id: &str,
        now: i64,
    ) -> Result<Option<CouponRow>, DbError> {
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

    /// Try: freezes the coupon for `order_id` until `lock_timeout` from now (at most until
    /// its validity end). Idempotent for the same order while the lock holds; an expired
    /// lock of any order counts as released.
    pub async fn lock(
        &self,
        coupon_id: &str,
        order_id: &str,
        lock_timeout: Duration,
    ) -> Result<CouponRow, DbError> {
        let timeout_ms = i64::try_from(lock_timeout.as_millis()).unwrap_or(i64::MAX);
        let t = Transition::Lock {
            order: order_id.to_string(),
            timeout_ms,
        };
        self.transition(coupon_id, &t, now_ms()).await
    }

    /// Confirm: the coupon locked by `order_id` becomes used. Idempotent for the same order.
    pub async fn redeem(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        let t = Transition::Redeem {
            order: order_id.to_string(),
        };
        self.transition(coupon_id, &t, now_ms()).await
    }

    /// Cancel: the coupon locked by `order_id` goes back to unused. Idempotent for the same
    /// order (also after its lock expired).
    pub async fn release(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        let t = Transition::Release {
            order: order_id.to_string(),
        };
        self.transition(coupon_id, &t, now_ms()).await
    }

    /// Refund: the coupon redeemed by `order_id` goes back to unused (expired if its
    /// validity has ended). Idempotent for the same order. The batch's per-user claim count
    /// is not given back (see [`crate::domain::coupon`]).
    pub async fn refund(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        let t = Transition::Refund {
            order: order_id.to_string(),
        };
        self.transition(coupon_id, &t, now_ms()).await
    }

    /// Applies transition `t` to a coupon at `now`: decided by the state machine on the
    /// stored row, written with its events and outbox rows in one transaction (a lost
    /// compare-and-set race is decided again on the new row). A repeat answers the coupon
    /// and writes nothing; a refusal is [`DbError::InvalidState`].
    pub async fn transition(
        &self,
        coupon_id: &str,
        t: &Transition,
        now: i64,
    ) -> Result<CouponRow, DbError> {
        for _ in 0..TRANSITION_RETRIES {
            let Some(c) = self.stored_coupon(coupon_id).await? else {
                return Err(DbError::NotFound(coupon_id.to_string()));
            };
            let (next, events) = match decide(&c.stored()?, c.validity(), t, now) {
                Err(r) => {
                    return Err(DbError::InvalidState {
                        coupon_id: coupon_id.to_string(),
                        state: r.state,
                        reason: r.reason,
                    });
                }
                Ok(Decision::Noop) => return c.into_row(now),
                Ok(Decision::Apply { next, events }) => (next, events),
            };
            let applying = Applying {
                coupon: &c,
                next: &next,
                events: &events,
            };
            if self.apply_transitions(&[applying], now).await? == [true] {
                return c.after(&next, now).into_row(now);
            }
        }
        Err(DbError::Contended(coupon_id.to_string()))
    }

    /// One pass of the sweeps at `now`, each over at most `limit` coupons (oldest first):
    /// coupons whose validity ended are written `expired` (state, event and outbox row,
    /// `limit` per transaction), locks whose deadline passed are written released (cause
    /// `lock_timeout`: the deadline is the row's, so this holds whichever gateway took the
    /// lock, and whether or not it still runs), and usable coupons whose validity ends within
    /// `reminder_lead_ms` get their one "expiring soon" outbox row (0: no reminders).
    /// Coupons changed concurrently are left to the next pass. Managed coupons are neither
    /// expired nor released here (see [`Db::due_managed`]); they are reminded.
    pub async fn sweep_coupons(
        &self,
        now: i64,
        limit: u32,
        reminder_lead_ms: i64,
    ) -> Result<Swept, DbError> {
        let expired = self
            .sweep_due(EXPIRY_DUE, &Transition::Expire, now, limit)
            .await?;
        let released = self
            .sweep_due(LOCK_DUE, &Transition::LockTimeout, now, limit)
            .await?;
        let reminded = if reminder_lead_ms > 0 {
            self.remind_due(now, limit, reminder_lead_ms).await?
        } else {
            0
        };
        Ok(Swept {
            expired,
            released,
            reminded,
        })
    }

    /// Managed coupons due at `now`, at most `limit` (oldest first): those whose validity
    /// ended ([`Transition::Expire`]: unused, or a lapsed lock), then those whose lock's
    /// deadline passed inside their validity ([`Transition::LockTimeout`]); the conditions
    /// of the database's own sweeps, for the coupons those leave to Redis. Each is one the
    /// state machine would write at `now` on the row as read.
    pub async fn due_managed(&self, now: i64, limit: u32) -> Result<Vec<DueManaged>, DbError> {
        let mut due = Vec::new();
        for (sql, t) in [
            (EXPIRY_DUE_MANAGED, Transition::Expire),
            (LOCK_DUE_MANAGED, Transition::LockTimeout),
        ] {
            let left = limit.saturating_sub(u32::try_from(due.len()).unwrap_or(u32::MAX));
            if left == 0 {
                break;
            }
            for c in self.due_coupons(sql, now, left, None).await? {
                if let Ok(Decision::Apply { .. }) = decide(&c.stored()?, c.validity(), &t, now) {
                    due.push(DueManaged {
                        coupon_id: c.coupon_id,
                        transition: t.clone(),
                    });
                }
            }
        }
        Ok(due)
    }

    /// Hands the coupons of `batch_id` (of one shard, or all) back to the database: they
    /// are no longer managed (their state in Redis was dropped by a repair or a rebuild),
    /// so the database's sweeps and transitions decide them again. Returns how many
    /// coupons changed.
    pub async fn unmanage(&self, batch_id: &str, shard: Option<u32>) -> Result<u64, DbError> {
        Ok(on_pool!(self, p => {
            match shard {
                Some(s) => sqlx::query(
                    "UPDATE coupons SET managed = 0 WHERE batch_id = $1 AND shard = $2 \
                     AND managed = 1",
                )
                .bind(batch_id)
                .bind(i64::from(s))
                .execute(p)
                .await?
                .rows_affected(),
                None => sqlx::query(
                    "UPDATE coupons SET managed = 0 WHERE batch_id = $1 AND managed = 1",
                )
                .bind(batch_id)
                .execute(p)
                .await?
                .rows_affected(),
            }
        }))
    }

    async fn due_coupons(
        &self,
        sql: &'static str,
        now: i64,
        limit: u32,
        until: Option<i64>,
    ) -> Result<Vec<StoredCoupon>, DbError> {
        let mut due = Vec::new();
        on_pool!(self, p => {
            let mut q = sqlx::query(sql).bind(i64::from(limit)).bind(now);
            if let Some(until) = until {
                q = q.bind(until);
            }
            let rows = q.fetch_all(p).await?;
            for r in &rows {
                due.push(stored_coupon!(r));
            }
        });
        Ok(due)
    }

    /// The coupons `sql` finds due at `now` (at most `limit`), each given what time did to
    /// it (`t`: expiry, or a lapsed lock's release), in one transaction.
    async fn sweep_due(
        &self,
        sql: &'static str,
        t: &Transition,
        now: i64,
        limit: u32,
    ) -> Result<u64, DbError> {
        let due = self.due_coupons(sql, now, limit, None).await?;
        let mut decided = Vec::with_capacity(due.len());
        for c in &due {
            // a coupon changed since it was read is refused or a no-op: the next pass sees it
            if let Ok(Decision::Apply { next, events }) = decide(&c.stored()?, c.validity(), t, now)
            {
                decided.push((c, next, events));
            }
        }
        let batch: Vec<Applying<'_>> = decided
            .iter()
            .map(|(c, next, events)| Applying {
                coupon: c,
                next,
                events,
            })
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        let written = self.apply_transitions(&batch, now).await?;
        Ok(written.iter().filter(|w| **w).count() as u64)
    }

    async fn remind_due(&self, now: i64, limit: u32, lead_ms: i64) -> Result<u64, DbError> {
        let until = now.saturating_add(lead_ms);
        let due = self
            .due_coupons(REMINDER_DUE, now, limit, Some(until))
            .await?;
        let mut rows = Vec::with_capacity(due.len());
        for c in &due {
            if !reminder_due(&c.stored()?, c.validity(), now, lead_ms) {
                continue;
            }
            let id = reminder_event_id(&c.coupon_id);
            let body = Notice {
                id: &id,
                kind: EXPIRING_SOON,
                occurred_at: Timestamp(now),
                coupon_id: &c.coupon_id,
                batch_id: &c.batch_id,
                user_id: &c.user_id,
                order_id: None,
                state: effective(&c.stored()?, c.validity(), now),
                lock_expires_at: None,
                cause: None,
                valid_from: Timestamp(c.valid_from),
                valid_to: Timestamp(c.valid_to),
            }
            .to_json()?;
            rows.push((c, id, body));
        }
        if rows.is_empty() {
            return Ok(0);
        }
        let mut reminded = 0;
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for (c, id, body) in &rows {
                let n = sqlx::query(
                    "UPDATE coupons SET reminded_at = $1 WHERE coupon_id = $2 \
                     AND reminded_at IS NULL",
                )
                .bind(now)
                .bind(&c.coupon_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n != 1 {
                    continue; // another sweeper reminded it
                }
                reminded += sqlx::query(outbox::INSERT_OUTBOX)
                    .bind(id)
                    .bind(EXPIRING_SOON)
                    .bind(&c.coupon_id)
                    .bind(body)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
        });
        Ok(reminded)
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
