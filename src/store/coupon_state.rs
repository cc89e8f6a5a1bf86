//! Writing coupon transitions: a transition decided by the state machine
//! ([`crate::domain::coupon::decide`]) is applied in ONE transaction: the coupon row
//! (compare-and-set on its `version`), one `coupon_events` row per event, and one
//! `event_outbox` row per event. The transitions of managed coupons, decided in Redis and
//! read from the shard logs as change records ([`ChangeRecord`]), are written the same way
//! by [`Db::apply_changes`] (the row set to the version the change names, if older).
//!
//! Invariants kept here: the materialised state, the transaction log and the outbox never
//! disagree (all or nothing); a transition applies at most once (the version CAS: of two
//! concurrent decisions on one version only one writes; a change record writes only a row
//! older than the version it creates, so a redelivered or overtaken change writes
//! nothing); each event's id is `<coupon_id>:<kind>:<version>` (the row version the
//! transition creates), UNIQUE in the log and in the outbox, so it is recorded and reported
//! exactly once. Who decided does not matter here: the rows written are the decision's
//! (one code writes the events and outbox rows of both paths).

use std::collections::HashMap;

use super::outbox::{self, Notice};
use super::{Db, DbError, now_ms, to_u32, to_u64};
use crate::domain::claim::ChangeRecord;
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

/// What a coupon's event rows and outbox bodies say about the coupon, besides the event.
struct Owner<'a> {
    coupon_id: &'a str,
    batch_id: &'a str,
    shard: i64,
    user_id: &'a str,
    request_id: Option<&'a str>,
    valid_from: i64,
    valid_to: i64,
}

impl<'a> Owner<'a> {
    fn of(c: &'a StoredCoupon) -> Owner<'a> {
        Owner {
            coupon_id: &c.coupon_id,
            batch_id: &c.batch_id,
            shard: c.shard,
            user_id: &c.user_id,
            request_id: c.request_id.as_deref(),
            valid_from: c.valid_from,
            valid_to: c.valid_to,
        }
    }
}

/// The (event id, outbox body) of each of `events`, written by the transition to `next`
/// that creates row `version` of `owner`, decided at `at`.
fn event_rows(
    owner: &Owner<'_>,
    next: &Stored,
    events: &[Event],
    version: i64,
    at: i64,
) -> Result<Vec<(String, String)>, DbError> {
    let mut rows = Vec::with_capacity(events.len());
    for e in events {
        let id = transition_event_id(owner.coupon_id, e.kind, version);
        let lock = (e.kind == EventKind::Locked)
            .then(|| next.lock_until())
            .flatten();
        let body = Notice {
            id: &id,
            kind: e.kind.as_str(),
            occurred_at: Timestamp(at),
            coupon_id: owner.coupon_id,
            batch_id: owner.batch_id,
            user_id: owner.user_id,
            order_id: e.order.as_deref(),
            state: state_after(e.kind),
            lock_expires_at: lock.map(Timestamp),
            cause: e.cause,
            valid_from: Timestamp(owner.valid_from),
            valid_to: Timestamp(owner.valid_to),
        }
        .to_json()?;
        rows.push((id, body));
    }
    Ok(rows)
}

/// Inserts, in transaction `$tx`, the `coupon_events` row and the `event_outbox` row of
/// each event of `$events` (with its (id, body) of [`event_rows`] in `$rows`) of coupon
/// `$owner` ([`Owner`]), the events at `$at`, recorded and due at `$now`. A macro: the
/// transaction type differs per engine.
macro_rules! insert_events {
    ($tx:ident, $owner:expr, $events:expr, $rows:expr, $at:expr, $now:expr) => {
        for (e, (id, body)) in $events.iter().zip($rows) {
            sqlx::query(INSERT_EVENT)
                .bind(id)
                .bind(e.kind.as_str())
                .bind($owner.batch_id)
                .bind($owner.shard)
                .bind($owner.user_id)
                .bind($owner.coupon_id)
                .bind($owner.request_id)
                .bind(e.order.as_deref())
                .bind($at)
                .bind($now)
                .execute(&mut *$tx)
                .await?;
            sqlx::query(outbox::INSERT_OUTBOX)
                .bind(id)
                .bind(e.kind.as_str())
                .bind($owner.coupon_id)
                .bind(body)
                .bind($now)
                .execute(&mut *$tx)
                .await?;
        }
    };
}

const UPDATE_COUPON: &str = "UPDATE coupons SET state = $1, order_id = $2, order_step = $3, \
     lock_expires_at = $4, updated_at = $5, version = version + 1 \
     WHERE coupon_id = $6 AND version = $7";

/// A change record's row write: `$6` the version it creates, written only over an older one.
const UPDATE_COUPON_TO: &str = "UPDATE coupons SET state = $1, order_id = $2, \
     order_step = $3, lock_expires_at = $4, updated_at = $5, version = $6 \
     WHERE coupon_id = $7 AND version < $6";

/// What a change record's events and outbox rows need of its coupon row.
const CHANGE_OWNER: &str = "SELECT batch_id, shard, user_id, request_id, valid_from, \
     valid_to FROM coupons WHERE coupon_id = $1";

/// The order of an event of the transaction log, by id.
const EVENT_ORDER: &str = "SELECT order_id FROM coupon_events WHERE event_id = $1";

const INSERT_EVENT: &str = "INSERT INTO coupon_events \
     (event_id, kind, batch_id, shard, user_id, coupon_id, request_id, order_id, at, recorded_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING";

/// What [`Db::apply_changes`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangesWritten {
    /// Changes written (the row, and an event and outbox row per event).
    pub applied: u64,
    /// Changes whose version the row already had or had passed (redelivered, or overtaken
    /// by a later change): nothing written.
    pub skipped: u64,
    /// Coupons of skipped changes whose events the database does not hold as they say
    /// (another kind or order at that version, or none): the version was decided twice,
    /// differently, as on a shard a failover rolled back, or an older change came after a
    /// newer one and its events were never written. Nothing written for them; the caller
    /// reports them (the database keeps what it has).
    pub diverged: Vec<String>,
}

/// A change record's coupon row, as [`CHANGE_OWNER`] reads it.
type OwnerRow = (String, i64, String, Option<String>, i64, i64);

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
            let owner = Owner::of(a.coupon);
            bodies.push(event_rows(
                &owner,
                a.next,
                a.events,
                a.coupon.version + 1,
                now,
            )?);
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
                let owner = Owner::of(a.coupon);
                insert_events!(tx, owner, a.events, rows, now, now);
                written.push(true);
            }
            tx.commit().await?;
        });
        Ok(written)
    }

    /// Writes the change records of managed coupons (decided in Redis, read from the shard
    /// logs by the persister), in order, in ONE transaction. Each change sets its coupon
    /// row to the state after it and to the version it creates, `updated_at` its decision
    /// time, only when the row is at an older version; then its events go to
    /// `coupon_events` and the outbox (ids `<coupon_id>:<kind>:<version>`, at the decision
    /// time), as [`Db::apply_transitions`] writes them. A change the row already has (a
    /// redelivery) or has passed (an older change after a newer one) is skipped.
    ///
    /// A change of a coupon the database holds no row for (its claim is not recorded) is
    /// [`DbError::MissingCoupons`], naming every such coupon, and nothing is written: the
    /// caller keeps those records pending and writes the others again.
    pub async fn apply_changes(&self, changes: &[ChangeRecord]) -> Result<ChangesWritten, DbError> {
        let mut done = ChangesWritten::default();
        if changes.is_empty() {
            return Ok(done);
        }
        let now = now_ms();
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            // Each coupon's row once: what its events say about it.
            let mut owners: HashMap<&str, OwnerRow> = HashMap::new();
            let mut missing: Vec<String> = Vec::new();
            for c in changes {
                if owners.contains_key(c.coupon_id.as_str()) || missing.contains(&c.coupon_id) {
                    continue;
                }
                let row: Option<OwnerRow> = sqlx::query_as(CHANGE_OWNER)
                    .bind(&c.coupon_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                match row {
                    Some(r) => {
                        owners.insert(c.coupon_id.as_str(), r);
                    }
                    None => missing.push(c.coupon_id.clone()),
                }
            }
            if !missing.is_empty() {
                return Err(DbError::MissingCoupons(missing));
            }
            for c in changes {
                let (batch_id, shard, user_id, request_id, valid_from, valid_to) =
                    &owners[c.coupon_id.as_str()];
                let owner = Owner {
                    coupon_id: &c.coupon_id,
                    batch_id,
                    shard: *shard,
                    user_id,
                    request_id: request_id.as_deref(),
                    valid_from: *valid_from,
                    valid_to: *valid_to,
                };
                let (state, order, step, until) = c.next.columns();
                let n = sqlx::query(UPDATE_COUPON_TO)
                    .bind(state.as_str())
                    .bind(order)
                    .bind(step.map(|s| s.as_str()))
                    .bind(until)
                    .bind(c.at)
                    .bind(c.version)
                    .bind(&c.coupon_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n != 1 {
                    done.skipped += 1;
                    // a redelivery finds its own events; a version decided again
                    // differently does not
                    for e in &c.events {
                        let id = transition_event_id(&c.coupon_id, e.kind, c.version);
                        let held: Option<(Option<String>,)> =
                            sqlx::query_as(EVENT_ORDER).bind(&id).fetch_optional(&mut *tx).await?;
                        if held.is_none_or(|(order,)| order != e.order) {
                            done.diverged.push(c.coupon_id.clone());
                            break;
                        }
                    }
                    continue;
                }
                let rows = event_rows(&owner, &c.next, &c.events, c.version, c.at)?;
                insert_events!(tx, owner, c.events, &rows, c.at, now);
                done.applied += 1;
            }
            tx.commit().await?;
        });
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::claim::ClaimRecord;
    use crate::store::memory_db;

    fn change(version: i64, next: Stored, kind: EventKind) -> ChangeRecord {
        ChangeRecord {
            coupon_id: "b.0.1".into(),
            batch_id: "b".into(),
            shard: 0,
            seq: 1,
            version,
            events: vec![Event {
                kind,
                order: next.order().map(str::to_string),
                cause: None,
            }],
            next,
            at: 50 + version,
        }
    }

    /// A lock then a redeem, written once however often delivered; a change without its
    /// coupon row writes nothing.
    #[tokio::test]
    async fn changes_apply_once_in_version_order() {
        let db = memory_db().await;
        let lock = change(
            1,
            Stored::Locked {
                order: "o".into(),
                until: 1_000,
            },
            EventKind::Locked,
        );
        let redeem = change(2, Stored::Used { order: "o".into() }, EventKind::Redeemed);
        let missing = db.apply_changes(std::slice::from_ref(&lock)).await;
        assert!(
            matches!(&missing, Err(DbError::MissingCoupons(ids)) if ids == &["b.0.1"]),
            "{missing:?}"
        );
        db.write_claims(&[ClaimRecord {
            coupon_id: "b.0.1".into(),
            batch_id: "b".into(),
            shard: 0,
            seq: 1,
            user_id: "u".into(),
            request_id: None,
            claimed_at: 1,
            valid_from: 0,
            valid_to: 10_000,
            code: None,
            managed: true,
        }])
        .await
        .unwrap();
        let both = [lock.clone(), redeem.clone()];
        let w = db.apply_changes(&both).await.unwrap();
        assert_eq!((w.applied, w.skipped), (2, 0));
        let w = db.apply_changes(&[redeem, lock]).await.unwrap();
        assert_eq!((w.applied, w.skipped), (0, 2));
        let ids: Vec<String> = db
            .coupon_events("b.0.1")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(ids, ["b.0.1:claimed", "b.0.1:locked:1", "b.0.1:redeemed:2"]);
        let row = db.get_coupon_at("b.0.1", 100).await.unwrap().unwrap();
        assert_eq!((row.state, row.updated_at), (CouponState::Used, 52));
    }
}
