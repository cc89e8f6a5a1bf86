//! The coupon state machine: the states a coupon is in (stored, and effective at a time),
//! and the transitions of a checkout (lock = try, redeem = confirm, release = cancel) as a
//! pure function of the stored row: what to write and which events to append, or why not.
//!
//! Invariant kept here: a transition is decided from the stored row alone ([`plan`]), is
//! idempotent for the same order (a repeat plans nothing), and an expired lock taken over
//! by another order is released first (its event appended).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::coupons::CouponRow;
use super::{DbError, to_u32, to_u64};

/// Effective state of a coupon, as the wallet shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CouponState {
    Unused,
    Locked,
    Used,
    Expired,
}

impl CouponState {
    pub fn as_str(self) -> &'static str {
        match self {
            CouponState::Unused => "unused",
            CouponState::Locked => "locked",
            CouponState::Used => "used",
            CouponState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<CouponState> {
        match s {
            "unused" => Some(CouponState::Unused),
            "locked" => Some(CouponState::Locked),
            "used" => Some(CouponState::Used),
            "expired" => Some(CouponState::Expired),
            _ => None,
        }
    }
}

impl fmt::Display for CouponState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kinds of `coupon_events` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Claimed,
    Locked,
    Redeemed,
    Released,
    Expired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Claimed => "claimed",
            EventKind::Locked => "locked",
            EventKind::Redeemed => "redeemed",
            EventKind::Released => "released",
            EventKind::Expired => "expired",
        }
    }
}

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
}

impl StoredCoupon {
    pub(super) fn stored_state(&self) -> Result<CouponState, DbError> {
        CouponState::parse(&self.state).ok_or_else(|| {
            DbError::Corrupt(format!(
                "coupon {} has state {:?}",
                self.coupon_id, self.state
            ))
        })
    }

    pub(super) fn lock_expired(&self, now: i64) -> bool {
        self.lock_expires_at.is_none_or(|t| t <= now)
    }

    /// The state the wallet shows at `now`.
    pub(super) fn effective(&self, now: i64) -> Result<CouponState, DbError> {
        Ok(match self.stored_state()? {
            CouponState::Locked if !self.lock_expired(now) => CouponState::Locked,
            CouponState::Locked | CouponState::Unused if self.valid_to < now => {
                CouponState::Expired
            }
            CouponState::Locked | CouponState::Unused => CouponState::Unused,
            s => s,
        })
    }

    pub(super) fn into_row(self, now: i64) -> Result<CouponRow, DbError> {
        let state = self.effective(now)?;
        let lock_expires_at = if state == CouponState::Locked {
            self.lock_expires_at
        } else {
            None
        };
        Ok(CouponRow {
            state,
            lock_expires_at,
            shard: to_u32(self.shard, "shard")?,
            seq: to_u64(self.seq, "seq")?,
            coupon_id: self.coupon_id,
            batch_id: self.batch_id,
            user_id: self.user_id,
            request_id: self.request_id,
            order_id: self.order_id,
            valid_from: self.valid_from,
            valid_to: self.valid_to,
            claimed_at: self.claimed_at,
            updated_at: self.updated_at,
        })
    }
}

/// A coupon transition (the TCC steps of a checkout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transition {
    Lock { timeout_ms: i64 },
    Redeem,
    Release,
}

/// What a transition does to a stored row.
pub(super) enum Plan {
    /// Already in the requested state for this order: answer the row, write nothing.
    Noop,
    Apply {
        state: CouponState,
        lock_expires_at: Option<i64>,
        /// Events to append, in order (an expired lock taken over is released first).
        events: Vec<(EventKind, String)>,
    },
}

pub(super) fn plan(
    t: Transition,
    c: &StoredCoupon,
    order: &str,
    now: i64,
) -> Result<Plan, DbError> {
    let stored = c.stored_state()?;
    let effective = c.effective(now)?;
    let same_order = c.order_id.as_deref() == Some(order);
    let refuse = |reason: &'static str| {
        Err(DbError::InvalidState {
            coupon_id: c.coupon_id.clone(),
            state: effective,
            reason,
        })
    };
    match t {
        Transition::Lock { timeout_ms } => match effective {
            CouponState::Locked if same_order => Ok(Plan::Noop),
            CouponState::Locked => refuse("locked by another order"),
            CouponState::Used => refuse("already used"),
            CouponState::Expired => refuse("validity has ended"),
            CouponState::Unused if c.valid_from > now => refuse("not valid yet"),
            CouponState::Unused => {
                let mut events = Vec::with_capacity(2);
                if stored == CouponState::Locked {
                    // The previous order's lock ran out: it counts as released.
                    if let Some(prev) = &c.order_id {
                        events.push((EventKind::Released, prev.clone()));
                    }
                }
                events.push((EventKind::Locked, order.to_string()));
                Ok(Plan::Apply {
                    state: CouponState::Locked,
                    lock_expires_at: Some(now.saturating_add(timeout_ms)),
                    events,
                })
            }
        },
        Transition::Redeem => match stored {
            CouponState::Used if same_order => Ok(Plan::Noop),
            CouponState::Locked if same_order && !c.lock_expired(now) => Ok(Plan::Apply {
                state: CouponState::Used,
                lock_expires_at: None,
                events: vec![(EventKind::Redeemed, order.to_string())],
            }),
            CouponState::Locked if same_order => refuse("the lock has expired"),
            CouponState::Used => refuse("used by another order"),
            _ => refuse("not locked by this order"),
        },
        Transition::Release => match stored {
            CouponState::Unused if same_order => Ok(Plan::Noop),
            // An expired lock of this order is released too (recording the release).
            CouponState::Locked if same_order => Ok(Plan::Apply {
                state: CouponState::Unused,
                lock_expires_at: None,
                events: vec![(EventKind::Released, order.to_string())],
            }),
            CouponState::Used => refuse("already used"),
            _ => refuse("not locked by this order"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coupon(state: &str, order: Option<&str>, lock: Option<i64>) -> StoredCoupon {
        StoredCoupon {
            coupon_id: "b.0.1".into(),
            batch_id: "b".into(),
            shard: 0,
            seq: 1,
            user_id: "u".into(),
            request_id: None,
            state: state.into(),
            order_id: order.map(Into::into),
            lock_expires_at: lock,
            valid_from: 0,
            valid_to: 1_000,
            claimed_at: 0,
            updated_at: 0,
            version: 0,
        }
    }

    #[test]
    fn effective_state_resolves_expiry() {
        assert_eq!(
            coupon("unused", None, None).effective(10).unwrap(),
            CouponState::Unused
        );
        assert_eq!(
            coupon("unused", None, None).effective(2_000).unwrap(),
            CouponState::Expired
        );
        let locked = coupon("locked", Some("o1"), Some(50));
        assert_eq!(locked.effective(10).unwrap(), CouponState::Locked);
        assert_eq!(locked.effective(60).unwrap(), CouponState::Unused);
        assert!(coupon("bogus", None, None).effective(0).is_err());
    }

    #[test]
    fn transitions_are_idempotent_per_order() {
        let lock = Transition::Lock { timeout_ms: 100 };
        let unused = coupon("unused", None, None);
        assert!(matches!(
            plan(lock, &unused, "o1", 10),
            Ok(Plan::Apply { .. })
        ));
        let locked = coupon("locked", Some("o1"), Some(110));
        assert!(matches!(plan(lock, &locked, "o1", 20), Ok(Plan::Noop)));
        assert!(matches!(
            plan(lock, &locked, "o2", 20),
            Err(DbError::InvalidState { .. })
        ));
        // Expired lock: another order may take it, releasing the first one.
        match plan(lock, &locked, "o2", 200) {
            Ok(Plan::Apply { events, .. }) => assert_eq!(events.len(), 2),
            _ => panic!("expired lock must be taken over"),
        }
        assert!(matches!(
            plan(Transition::Redeem, &locked, "o1", 20),
            Ok(Plan::Apply { .. })
        ));
        assert!(matches!(
            plan(Transition::Redeem, &locked, "o1", 200),
            Err(DbError::InvalidState { .. })
        ));
        let used = coupon("used", Some("o1"), None);
        assert!(matches!(
            plan(Transition::Redeem, &used, "o1", 20),
            Ok(Plan::Noop)
        ));
        assert!(matches!(
            plan(Transition::Release, &used, "o1", 20),
            Err(DbError::InvalidState { .. })
        ));
        let released = coupon("unused", Some("o1"), None);
        assert!(matches!(
            plan(Transition::Release, &released, "o1", 20),
            Ok(Plan::Noop)
        ));
        assert!(matches!(
            plan(Transition::Release, &released, "o2", 20),
            Err(DbError::InvalidState { .. })
        ));
    }
}
