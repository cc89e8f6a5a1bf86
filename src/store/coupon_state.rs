//! Writing coupon transitions: a transition decided by the state machine
//! ([`crate::domain::coupon::decide`]) is applied in ONE transaction: the coupon row
//! (compare-and-set on its `version`), one `coupon_events` row per event, and one
//! `event_outbox` row per event.
//!
//! Invariants kept here: the materialised state, the transaction log and the outbox never
//! disagree (all or nothing); a transition applies at most once (the version CAS: of two
//! concurrent decisions on one version only one writes); each event's id is
//! `<coupon_id>:<kind>:<version>` (the row version the transition creates), UNIQUE in the
//! log and in the outbox, so it is recorded and reported exactly once. Who decided does not
//! matter here: the rows written are the decision's.

use super::outbox::{self, Notice};
use super::{Db, DbError, to_u32, to_u64};
use crate::domain::coupon::{CouponState, Event, EventKind, Stored, Validity};
use crate::domain::time::Timestamp;

/// A coupon row as stored (state not yet resolved against the clock).
#[derive(Debug, Clone)]
pub(super) struct StoredCoupon {
    pub(super) coupon_id: String,
    pub(super) batch_id: String,
    pub(super) shard: i64,
    pub(super) seq: i64,
    pub(super) user_id: String,
    pub(super) request_id: Option<String>,
    pub(super) state: String,
    pub(super) order_id: Option<String>,
    pub(super) lock_expires_at: Option<i64>,
    pub(super) valid_from: i64,
    pub(super) valid_to: i64,
    pub(super) claimed_at: i64,
    pub(super) updated_at: i64,
    pub(super) version: i64,
    pub(super) order_step: Option<String>,
    pub(super) code: Option<String>,
}

/// The columns of [`StoredCoupon`], in its order, for `concat!` (every query text is a
/// literal).
macro_rules! coupon_columns {
    () => {
        "coupon_id, batch_id, shard, seq, user_id, request_id, state, order_id, \
         lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version, order_step, \
         code"
    };
}
pub(super) use coupon_columns;

/// Reads a row selected as `coupon_columns!()` into a [`StoredCoupon`] (a macro: the row
/// type differs per engine).
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
            order_step: $r.try_get(14)?,
            code: $r.try_get(15)?,
        }
    };
}
pub(super) use stored_coupon;

impl StoredCoupon {
    /// The state machine's view of the row.
    pub(super) fn stored(&self) -> Result<Stored, DbError> {
        Stored::from_columns(
            &self.state,
            self.order_id.clone(),
            self.order_step.as_deref(),
            self.lock_expires_at,
        )
        .map_err(|e| DbError::Corrupt(format!("coupon {}: {e}", self.coupon_id)))
    }

    pub(super) fn validity(&self) -> Validity {
        Validity {
            from: self.valid_from,
            to: self.valid_to,
        }
    }

    /// The row as the wallet shows it at `now` (state resolved against the clock: a lock
    /// past its deadline reads unused, a coupon past its validity end expired).
    pub(super) fn into_row(self, now: i64) -> Result<super::CouponRow, DbError> {
        let stored = self.stored()?;
        let (settled, _) = crate::domain::coupon::settle(&stored, self.validity(), now);
        Ok(super::CouponRow {
            state: settled.state(),
            lock_expires_at: settled.lock_until(),
            order_id: settled.order().map(str::to_string),
            shard: to_u32(self.shard, "shard")?,
            seq: to_u64(self.seq, "seq")?,
            coupon_id: self.coupon_id,
            batch_id: self.batch_id,
            user_id: self.user_id,
            request_id: self.request_id,
            valid_from: self.valid_from,
            valid_to: self.valid_to,
            claimed_at: self.claimed_at,
            updated_at: self.updated_at,
            code: self.code,
        })
    }

    /// This row after `next` was written at `now` (what [`Db::apply_transitions`] made it).
    pub(super) fn after(self, next: &Stored, now: i64) -> StoredCoupon {
        let (state, order, step, until) = next.columns();
        StoredCoupon {
            state: state.as_str().to_string(),
            order_id: order.map(str::to_string),
            order_step: step.map(|s| s.as_str().to_string()),
            lock_expires_at: until,
            updated_at: now,
            version: self.version + 1,
            ..self
        }
    }
}

/// The state a coupon is in right after an event of `kind`.
pub(super) fn state_after(kind: EventKind) -> CouponState {
    match kind {
        EventKind::Claimed | EventKind::Released | EventKind::Refunded => CouponState::Unused,
        EventKind::Locked => CouponState::Locked,
        EventKind::Redeemed => CouponState::Used,
        EventKind::Expired => CouponState::Expired,
    }
}

/// The id of an event written by the transition that creates row version `version`.
pub fn transition_event_id(coupon_id: &str, kind: EventKind, version: i64) -> String {
    format!("{coupon_id}:{}:{version}", kind.as_str())
}

/// One decided transition to write: the row it was decided on, the state after it and its
/// events, in order.
pub(super) struct Applying<'a> {
    pub(super) coupon: &'a StoredCoupon,
    pub(super) next: &'a Stored,
    pub(super) events: &'a [Event],
}

const UPDATE_COUPON: &str = "UPDATE coupons SET state = $1, order_id = $2, order_step = $3, \
     lock_expires_at = $4, updated_at = $5, version = version + 1 \
     WHERE coupon_id = $6 AND version = $7";

const INSERT_EVENT: &str = "INSERT INTO coupon_events \
     (event_id, kind, batch_id, shard, user_id, coupon_id, request_id, order_id, at, recorded_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING";

impl Db {
    /// Writes decided transitions at `now`, all in ONE transaction (the expiry sweeper
    /// writes a batch of coupons per commit; a client transition is a batch of one). Each
    /// coupon row is a compare-and-set on the version it was decided on: a transition whose
    /// row changed since is skipped (decide it again). Returns, per transition, whether it
    /// was written.
    pub(super) async fn apply_transitions(
        &self,
        batch: &[Applying<'_>],
        now: i64,
    ) -> Result<Vec<bool>, DbError> {
        let mut written = Vec::with_capacity(batch.len());
        // The outbox bodies, built before the transaction opens.
        let mut bodies = Vec::with_capacity(batch.len());
        for a in batch {
            let version = a.coupon.version + 1;
            let mut rows = Vec::with_capacity(a.events.len());
            for e in a.events {
                let id = transition_event_id(&a.coupon.coupon_id, e.kind, version);
                let lock = (e.kind == EventKind::Locked)
                    .then(|| a.next.lock_until())
                    .flatten();
                let body = Notice {
                    id: &id,
                    kind: e.kind.as_str(),
                    occurred_at: Timestamp(now),
                    coupon_id: &a.coupon.coupon_id,
                    batch_id: &a.coupon.batch_id,
                    user_id: &a.coupon.user_id,
                    order_id: e.order.as_deref(),
                    state: state_after(e.kind),
                    lock_expires_at: lock.map(Timestamp),
                    cause: e.cause,
                    valid_from: Timestamp(a.coupon.valid_from),
                    valid_to: Timestamp(a.coupon.valid_to),
                }
                .to_json()?;
                rows.push((id, body));
            }
            bodies.push(rows);
        }
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for (a, rows) in batch.iter().zip(&bodies) {
                let (state, order, step, until) = a.next.columns();
                let n = sqlx::query(UPDATE_COUPON)
                    .bind(state.as_str())
                    .bind(order)
                    .bind(step.map(|s| s.as_str()))
                    .bind(until)
                    .bind(now)
                    .bind(&a.coupon.coupon_id)
                    .bind(a.coupon.version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n != 1 {
                    written.push(false);
                    continue;
                }
                for (e, (id, body)) in a.events.iter().zip(rows) {
                    sqlx::query(INSERT_EVENT)
                        .bind(id)
                        .bind(e.kind.as_str())
                        .bind(&a.coupon.batch_id)
                        .bind(a.coupon.shard)
                        .bind(&a.coupon.user_id)
                        .bind(&a.coupon.coupon_id)
                        .bind(a.coupon.request_id.as_deref())
                        .bind(e.order.as_deref())
                        .bind(now)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query(outbox::INSERT_OUTBOX)
                        .bind(id)
                        .bind(e.kind.as_str())
                        .bind(&a.coupon.coupon_id)
                        .bind(body)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                }
                written.push(true);
            }
            tx.commit().await?;
        });
        Ok(written)
    }
}
