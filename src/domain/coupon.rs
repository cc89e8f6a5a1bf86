//! The coupon state machine, pure: the states a coupon is in (as stored, and as the wallet
//! shows it at an instant), and every transition (lock = try, redeem = confirm, release =
//! cancel, refund, expire, lock timeout) as a function of the stored state, the coupon's
//! validity and `now`: what to write and which events to append, or why not.
//!
//! Invariants kept here:
//! - a transition is decided from (stored state, validity, now) alone ([`decide`]), so the
//!   same facts give the same answer whoever decides: the database today, a Redis script
//!   whose log record the persister writes tomorrow;
//! - a repeat of a transition by the same order plans nothing ([`Decision::Noop`]): every
//!   state change is written, and so reported, once;
//! - what time already did is written with the next change: a lock past its deadline is
//!   released (event `released`, cause `lock_timeout`), a coupon past its validity end that
//!   is not used is expired (event `expired`), before the requested change and after it;
//! - a coupon is never usable past its validity end: it reads `expired` from that instant
//!   ([`effective`]), cannot be locked, and a lock never outlives it (its deadline is capped
//!   at the validity end);
//! - a refund makes a redeemed coupon usable again (unused, or expired if its validity has
//!   ended); it does NOT give back the batch's per-user claim count: the claim stays
//!   counted (the claim script's `users` hash is never decremented), a refund re-opens the
//!   coupon, not the claim.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A coupon's state as the wallet shows it (and as the `coupons.state` column stores it).
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

/// Kinds of state change (the `coupon_events.kind` column), one per transition that
/// happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Claimed,
    Locked,
    Released,
    Redeemed,
    Refunded,
    Expired,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Claimed,
        EventKind::Locked,
        EventKind::Released,
        EventKind::Redeemed,
        EventKind::Refunded,
        EventKind::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Claimed => "claimed",
            EventKind::Locked => "locked",
            EventKind::Released => "released",
            EventKind::Redeemed => "redeemed",
            EventKind::Refunded => "refunded",
            EventKind::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The last step an order took on a coupon (the `coupons.order_step` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Locked,
    Released,
    Redeemed,
    Refunded,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Locked => "locked",
            Step::Released => "released",
            Step::Redeemed => "redeemed",
            Step::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        [Step::Locked, Step::Released, Step::Redeemed, Step::Refunded]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// How the last order's hold on a coupon ended (an unused or expired coupon remembers it,
/// so that a repeat of that order's release or refund is answered, not refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub order: String,
    /// `true`: the order redeemed the coupon and was refunded; `false`: it released its
    /// lock (or the lock ran out).
    pub refunded: bool,
}

/// A coupon's state as stored, with what each state needs to decide the next transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Usable; `last` is the order that held it before, if any.
    Unused { last: Option<Ended> },
    /// Held for `order` until `until` (ms; the lock is over at `until`).
    Locked { order: String, until: i64 },
    /// Redeemed by `order`.
    Used { order: String },
    /// Past its validity end without being used.
    Expired { last: Option<Ended> },
}

/// The columns a [`Stored`] is written as: state, order id, order step, lock deadline.
pub type Columns<'a> = (CouponState, Option<&'a str>, Option<Step>, Option<i64>);

impl Stored {
    pub fn state(&self) -> CouponState {
        match self {
            Stored::Unused { .. } => CouponState::Unused,
            Stored::Locked { .. } => CouponState::Locked,
            Stored::Used { .. } => CouponState::Used,
            Stored::Expired { .. } => CouponState::Expired,
        }
    }

    /// The order named on the coupon (holding it, or the last one that did).
    pub fn order(&self) -> Option<&str> {
        match self {
            Stored::Locked { order, .. } | Stored::Used { order } => Some(order),
            Stored::Unused { last } | Stored::Expired { last } => {
                last.as_ref().map(|e| e.order.as_str())
            }
        }
    }

    /// The lock deadline, while locked.
    pub fn lock_until(&self) -> Option<i64> {
        match self {
            Stored::Locked { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// The stored columns of this state.
    pub fn columns(&self) -> Columns<'_> {
        let step = match self {
            Stored::Locked { .. } => Some(Step::Locked),
            Stored::Used { .. } => Some(Step::Redeemed),
            Stored::Unused { last } | Stored::Expired { last } => last.as_ref().map(|e| {
                if e.refunded {
                    Step::Refunded
                } else {
                    Step::Released
                }
            }),
        };
        (self.state(), self.order(), step, self.lock_until())
    }

    /// Reads the stored columns back; `Err` names what does not fit together. A locked row
    /// without a deadline reads as a lock already over (rows written before deadlines were
    /// kept); an order without a step (rows written before steps were kept) as the step its
    /// state implies.
    pub fn from_columns(
        state: &str,
        order: Option<String>,
        step: Option<&str>,
        lock_until: Option<i64>,
    ) -> Result<Stored, String> {
        let state = CouponState::parse(state).ok_or_else(|| format!("state {state:?}"))?;
        let step = match step {
            Some(s) => Some(Step::parse(s).ok_or_else(|| format!("order step {s:?}"))?),
            None => None,
        };
        let ended = |order: Option<String>| -> Result<Option<Ended>, String> {
            match (order, step) {
                (None, None) => Ok(None),
                (Some(order), Some(Step::Refunded)) => Ok(Some(Ended {
                    order,
                    refunded: true,
                })),
                (Some(order), None | Some(Step::Released)) => Ok(Some(Ended {
                    order,
                    refunded: false,
                })),
                (order, step) => Err(format!(
                    "{} with order {order:?} and step {step:?}",
                    state.as_str()
                )),
            }
        };
        match state {
            CouponState::Unused => Ok(Stored::Unused {
                last: ended(order)?,
            }),
            CouponState::Expired => Ok(Stored::Expired {
                last: ended(order)?,
            }),
            CouponState::Locked => match (order, step) {
                (Some(order), None | Some(Step::Locked)) => Ok(Stored::Locked {
                    order,
                    until: lock_until.unwrap_or(i64::MIN),
                }),
                (order, step) => Err(format!("locked with order {order:?} and step {step:?}")),
            },
            CouponState::Used => match (order, step) {
                (Some(order), None | Some(Step::Redeemed)) => Ok(Stored::Used { order }),
                (order, step) => Err(format!("used with order {order:?} and step {step:?}")),
            },
        }
    }
}

/// When a coupon can be used: from `from` (inclusive) to `to` (exclusive), ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub from: i64,
    pub to: i64,
}

/// Why a released coupon was released.
pub const CAUSE_LOCK_TIMEOUT: &str = "lock_timeout";

/// One state change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The order it concerns (none for `expired`).
    pub order: Option<String>,
    /// Why it happened when no request asked for it ([`CAUSE_LOCK_TIMEOUT`]).
    pub cause: Option<&'static str>,
}

impl Event {
    fn of(kind: EventKind, order: &str) -> Event {
        Event {
            kind,
            order: Some(order.to_string()),
            cause: None,
        }
    }
}

/// A transition asked of a coupon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Try: hold the coupon for `order` for `timeout_ms` (at most until its validity end).
    Lock { order: String, timeout_ms: i64 },
    /// Confirm: the coupon locked by `order` becomes used.
    Redeem { order: String },
    /// Cancel: the coupon locked by `order` becomes usable again.
    Release { order: String },
    /// The coupon redeemed by `order` becomes usable again (or expired).
    Refund { order: String },
    /// The validity ended: write `expired` (the expiry sweeper).
    Expire,
    /// The lock's deadline passed: write its release (a lock-timeout sweeper).
    LockTimeout,
}

impl Transition {
    /// The API's name of a client transition (`lock`, `redeem`, `release`, `refund`).
    pub fn client(action: &str, order: &str, lock_timeout_ms: i64) -> Option<Transition> {
        let order = order.to_string();
        match action {
            "lock" => Some(Transition::Lock {
                order,
                timeout_ms: lock_timeout_ms,
            }),
            "redeem" => Some(Transition::Redeem { order }),
            "release" => Some(Transition::Release { order }),
            "refund" => Some(Transition::Refund { order }),
            _ => None,
        }
    }
}

/// What a transition does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Already done (a repeat by the same order, or nothing due): write nothing, answer the
    /// coupon as it is.
    Noop,
    /// Write `next` and append `events`, in order, in one transaction.
    Apply { next: Stored, events: Vec<Event> },
}

/// Why a transition is refused (the API's 409 `invalid_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The coupon's state at the instant of the decision.
    pub state: CouponState,
    pub reason: &'static str,
}

/// What time has done to a stored state by `now`: a lock past its deadline is over
/// (released), an unused coupon past its validity end is expired. Returns the state and
/// the events that record it.
pub fn settle(stored: &Stored, validity: Validity, now: i64) -> (Stored, Vec<Event>) {
    let mut s = stored.clone();
    let mut events = Vec::new();
    if let Stored::Locked { order, until } = &s
        && *until <= now
    {
        events.push(Event {
            kind: EventKind::Released,
            order: Some(order.clone()),
            cause: Some(CAUSE_LOCK_TIMEOUT),
        });
        s = Stored::Unused {
            last: Some(Ended {
                order: order.clone(),
                refunded: false,
            }),
        };
    }
    if let Stored::Unused { last } = &s
        && now >= validity.to
    {
        events.push(Event {
            kind: EventKind::Expired,
            order: None,
            cause: None,
        });
        s = Stored::Expired { last: last.clone() };
    }
    (s, events)
}

/// The state the wallet shows at `now`.
pub fn effective(stored: &Stored, validity: Validity, now: i64) -> CouponState {
    settle(stored, validity, now).0.state()
}

/// Whether the "expiring soon" reminder is due at `now`: the coupon is usable (unused) and
/// its validity ends within `lead_ms` (and has not ended). `lead_ms` 0: never.
pub fn reminder_due(stored: &Stored, validity: Validity, now: i64, lead_ms: i64) -> bool {
    lead_ms > 0
        && effective(stored, validity, now) == CouponState::Unused
        && now < validity.to
        && now >= validity.to.saturating_sub(lead_ms)
}

/// Decides transition `t` of a coupon stored as `stored` at `now`.
pub fn decide(
    stored: &Stored,
    validity: Validity,
    t: &Transition,
    now: i64,
) -> Result<Decision, Refusal> {
    let (settled, mut events) = settle(stored, validity, now);
    let refuse = |reason: &'static str| {
        Err(Refusal {
            state: settled.state(),
            reason,
        })
    };
    let last_is = |order: &str, refunded: bool| match &settled {
        Stored::Unused { last: Some(e) } | Stored::Expired { last: Some(e) } => {
            e.order == order && e.refunded == refunded
        }
        _ => false,
    };
    // The change asked for, on the settled state: `None` when already done.
    let change: Option<(Stored, Event)> = match t {
        Transition::Lock { order, timeout_ms } => match &settled {
            Stored::Locked { order: o, .. } if o == order => None,
            Stored::Locked { .. } => return refuse("locked by another order"),
            Stored::Used { .. } => return refuse("already used"),
            Stored::Expired { .. } => return refuse("validity has ended"),
            Stored::Unused { .. } if now < validity.from => return refuse("not valid yet"),
            Stored::Unused { .. } => {
                let until = now.saturating_add((*timeout_ms).max(1)).min(validity.to);
                Some((
                    Stored::Locked {
                        order: order.clone(),
                        until,
                    },
                    Event::of(EventKind::Locked, order),
                ))
            }
        },
        Transition::Redeem { order } => match &settled {
            Stored::Used { order: o } if o == order => None,
            Stored::Locked { order: o, .. } if o == order => Some((
                Stored::Used {
                    order: order.clone(),
                },
                Event::of(EventKind::Redeemed, order),
            )),
            Stored::Used { .. } => return refuse("used by another order"),
            _ if last_is(order, false) => {
                return refuse("this order's lock was released or has expired");
            }
            _ if last_is(order, true) => return refuse("this order was refunded"),
            Stored::Expired { .. } => return refuse("validity has ended"),
            _ => return refuse("not locked by this order"),
        },
        Transition::Release { order } => match &settled {
            _ if last_is(order, false) => None,
            Stored::Locked { order: o, .. } if o == order => Some((
                Stored::Unused {
                    last: Some(Ended {
                        order: order.clone(),
                        refunded: false,
                    }),
                },
                Event::of(EventKind::Released, order),
            )),
            Stored::Used { .. } => return refuse("already used"),
            _ => return refuse("not locked by this order"),
        },
        Transition::Refund { order } => match &settled {
            _ if last_is(order, true) => None,
            Stored::Used { order: o } if o == order => Some((
                Stored::Unused {
                    last: Some(Ended {
                        order: order.clone(),
                        refunded: true,
                    }),
                },
                Event::of(EventKind::Refunded, order),
            )),
            Stored::Used { .. } => return refuse("redeemed by another order"),
            _ => return refuse("not redeemed by this order"),
        },
        Transition::Expire => match &settled {
            Stored::Expired { .. } => None,
            Stored::Used { .. } => return refuse("already used"),
            _ => return refuse("validity has not ended"),
        },
        Transition::LockTimeout => match &settled {
            Stored::Locked { .. } => return refuse("the lock holds"),
            _ => None,
        },
    };
    let next = match change {
        None => settled,
        Some((next, event)) => {
            events.push(event);
            // a refund or release after the validity end lands in `expired`
            let (after, more) = settle(&next, validity, now);
            events.extend(more);
            after
        }
    };
    if events.is_empty() {
        Ok(Decision::Noop)
    } else {
        Ok(Decision::Apply { next, events })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Validity = Validity {
        from: 100,
        to: 1_000,
    };

    fn ended(order: &str, refunded: bool) -> Option<Ended> {
        Some(Ended {
            order: order.into(),
            refunded,
        })
    }
    fn unused() -> Stored {
        Stored::Unused { last: None }
    }
    fn locked(order: &str, until: i64) -> Stored {
        Stored::Locked {
            order: order.into(),
            until,
        }
    }
    fn used(order: &str) -> Stored {
        Stored::Used {
            order: order.into(),
        }
    }
    fn lock(order: &str) -> Transition {
        Transition::Lock {
            order: order.into(),
            timeout_ms: 300,
        }
    }
    fn redeem(order: &str) -> Transition {
        Transition::Redeem {
            order: order.into(),
        }
    }
    fn release(order: &str) -> Transition {
        Transition::Release {
            order: order.into(),
        }
    }
    fn refund(order: &str) -> Transition {
        Transition::Refund {
            order: order.into(),
        }
    }
    fn ev(kind: EventKind, order: Option<&str>) -> Event {
        Event {
            kind,
            order: order.map(Into::into),
            cause: None,
        }
    }
    fn timeout(order: &str) -> Event {
        Event {
            kind: EventKind::Released,
            order: Some(order.into()),
            cause: Some(CAUSE_LOCK_TIMEOUT),
        }
    }
    fn apply(next: Stored, events: Vec<Event>) -> Result<Decision, Refusal> {
        Ok(Decision::Apply { next, events })
    }
    fn no(state: CouponState, reason: &'static str) -> Result<Decision, Refusal> {
        Err(Refusal { state, reason })
    }

    use CouponState::{Expired as X, Locked as L, Unused as U, Used as D};
    use EventKind::{Expired, Locked, Redeemed, Refunded, Released};

    /// A case: name, stored state, transition, now, expected decision.
    type Row = (
        &'static str,
        Stored,
        Transition,
        i64,
        Result<Decision, Refusal>,
    );

    /// Every transition from every stored state, at instants before the validity, inside
    /// it with the lock holding, after the lock's deadline, and at and after the validity
    /// end: the table is the specification.
    #[test]
    fn the_transition_table() {
        let released_o1 = Stored::Unused {
            last: ended("o1", false),
        };
        let refunded_o1 = Stored::Unused {
            last: ended("o1", true),
        };
        let expired = Stored::Expired { last: None };
        let expired_refunded_o1 = Stored::Expired {
            last: ended("o1", true),
        };
        let expired_released_o1 = Stored::Expired {
            last: ended("o1", false),
        };
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            // ---- lock
            ("lock unused", unused(), lock("o1"), 200,
                apply(locked("o1", 500), vec![ev(Locked, Some("o1"))])),
            ("lock before validity", unused(), lock("o1"), 50, no(U, "not valid yet")),
            ("lock is capped at the validity end", unused(), lock("o1"), 900,
                apply(locked("o1", 1_000), vec![ev(Locked, Some("o1"))])),
            ("lock at the validity end", unused(), lock("o1"), 1_000, no(X, "validity has ended")),
            ("lock repeat", locked("o1", 500), lock("o1"), 300, Ok(Decision::Noop)),
            ("lock held by another", locked("o1", 500), lock("o2"), 300,
                no(L, "locked by another order")),
            ("lock taken over after the deadline", locked("o1", 500), lock("o2"), 500,
                apply(locked("o2", 800), vec![timeout("o1"), ev(Locked, Some("o2"))])),
            ("lock again by the same order after its deadline", locked("o1", 500), lock("o1"), 600,
                apply(locked("o1", 900), vec![timeout("o1"), ev(Locked, Some("o1"))])),
            ("lock a used coupon", used("o1"), lock("o2"), 300, no(D, "already used")),
            ("lock expired", expired.clone(), lock("o1"), 300, no(X, "validity has ended")),
            ("lock after release", released_o1.clone(), lock("o2"), 300,
                apply(locked("o2", 600), vec![ev(Locked, Some("o2"))])),
            ("lock after refund", refunded_o1.clone(), lock("o1"), 300,
                apply(locked("o1", 600), vec![ev(Locked, Some("o1"))])),
            // ---- redeem
            ("redeem locked", locked("o1", 500), redeem("o1"), 499,
                apply(used("o1"), vec![ev(Redeemed, Some("o1"))])),
            ("redeem repeat", used("o1"), redeem("o1"), 2_000, Ok(Decision::Noop)),
            ("redeem by another order", locked("o1", 500), redeem("o2"), 300,
                no(L, "not locked by this order")),
            ("redeem at the lock deadline", locked("o1", 500), redeem("o1"), 500,
                no(U, "this order's lock was released or has expired")),
            ("redeem after the validity end", locked("o1", 1_000), redeem("o1"), 1_000,
                no(X, "this order's lock was released or has expired")),
            ("redeem used by another", used("o1"), redeem("o2"), 300, no(D, "used by another order")),
            ("redeem unused", unused(), redeem("o1"), 300, no(U, "not locked by this order")),
            ("redeem after release", released_o1.clone(), redeem("o1"), 300,
                no(U, "this order's lock was released or has expired")),
            ("redeem after refund", refunded_o1.clone(), redeem("o1"), 300,
                no(U, "this order was refunded")),
            ("redeem expired", expired.clone(), redeem("o1"), 300, no(X, "validity has ended")),
            // ---- release
            ("release locked", locked("o1", 500), release("o1"), 300,
                apply(released_o1.clone(), vec![ev(Released, Some("o1"))])),
            ("release after the deadline records the timeout", locked("o1", 500), release("o1"), 700,
                apply(released_o1.clone(), vec![timeout("o1")])),
            ("release repeat", released_o1.clone(), release("o1"), 300, Ok(Decision::Noop)),
            ("release by another order", locked("o1", 500), release("o2"), 300,
                no(L, "not locked by this order")),
            ("release used", used("o1"), release("o1"), 300, no(D, "already used")),
            ("release unused", unused(), release("o1"), 300, no(U, "not locked by this order")),
            ("release after refund", refunded_o1.clone(), release("o1"), 300,
                no(U, "not locked by this order")),
            ("release after the validity end", locked("o1", 1_000), release("o1"), 1_200,
                apply(expired_released_o1.clone(), vec![timeout("o1"), ev(Expired, None)])),
            ("release repeat after the validity end", expired_released_o1.clone(), release("o1"), 1_200,
                Ok(Decision::Noop)),
            // ---- refund
            ("refund used", used("o1"), refund("o1"), 300,
                apply(refunded_o1.clone(), vec![ev(Refunded, Some("o1"))])),
            ("refund after the validity end", used("o1"), refund("o1"), 1_000,
                apply(expired_refunded_o1.clone(), vec![ev(Refunded, Some("o1")), ev(Expired, None)])),
            ("refund repeat", refunded_o1.clone(), refund("o1"), 300, Ok(Decision::Noop)),
            ("refund repeat after the validity end", refunded_o1.clone(), refund("o1"), 1_500,
                apply(expired_refunded_o1.clone(), vec![ev(Expired, None)])),
            ("refund repeat of an expired coupon", expired_refunded_o1.clone(), refund("o1"), 1_500,
                Ok(Decision::Noop)),
            ("refund by another order", used("o1"), refund("o2"), 300,
                no(D, "redeemed by another order")),
            ("refund locked", locked("o1", 500), refund("o1"), 300, no(L, "not redeemed by this order")),
            ("refund unused", unused(), refund("o1"), 300, no(U, "not redeemed by this order")),
            ("refund after release", released_o1.clone(), refund("o1"), 300,
                no(U, "not redeemed by this order")),
            ("refund of an older order after the coupon moved on", locked("o2", 500), refund("o1"), 300,
                no(L, "not redeemed by this order")),
            // ---- expire (the sweeper)
            ("expire unused at the end", unused(), Transition::Expire, 1_000,
                apply(expired.clone(), vec![ev(Expired, None)])),
            ("expire unused before the end", unused(), Transition::Expire, 999,
                no(U, "validity has not ended")),
            ("expire a lapsed lock", locked("o1", 1_000), Transition::Expire, 1_000,
                apply(expired_released_o1.clone(), vec![timeout("o1"), ev(Expired, None)])),
            ("expire a lock held past the end (rows from before the cap)", locked("o1", 2_000),
                Transition::Expire, 1_500, no(L, "validity has not ended")),
            ("expire used", used("o1"), Transition::Expire, 5_000, no(D, "already used")),
            ("expire expired", expired.clone(), Transition::Expire, 5_000, Ok(Decision::Noop)),
            // ---- lock timeout
            ("lock timeout", locked("o1", 500), Transition::LockTimeout, 500,
                apply(released_o1.clone(), vec![timeout("o1")])),
            ("lock timeout before the deadline", locked("o1", 500), Transition::LockTimeout, 499,
                no(L, "the lock holds")),
            ("lock timeout of an unlocked coupon", unused(), Transition::LockTimeout, 499,
                Ok(Decision::Noop)),
        ];
        let mut failures = Vec::new();
        for (name, stored, t, now, want) in &table {
            let got = decide(stored, V, t, *now);
            if &got != want {
                failures.push(format!("{name}: got {got:?}, want {want:?}"));
            }
            // an applied decision is final: deciding it again at the same instant is a no-op
            if let Ok(Decision::Apply { next, .. }) = &got {
                let again = decide(next, V, t, *now);
                if again != Ok(Decision::Noop) {
                    failures.push(format!("{name}: repeat gives {again:?}"));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The states read at an instant: locked until the deadline, expired from the very
    /// instant the validity ends (the end is exclusive).
    #[test]
    fn effective_state_at_an_instant() {
        assert_eq!(effective(&unused(), V, 999), U);
        assert_eq!(effective(&unused(), V, 1_000), X);
        assert_eq!(effective(&locked("o", 500), V, 499), L);
        assert_eq!(effective(&locked("o", 500), V, 500), U);
        assert_eq!(effective(&locked("o", 1_000), V, 1_000), X);
        assert_eq!(effective(&used("o"), V, 5_000), D);
    }

    #[test]
    fn reminders_are_due_in_the_lead_window_for_usable_coupons_only() {
        let lead = 200;
        assert!(!reminder_due(&unused(), V, 799, lead));
        assert!(reminder_due(&unused(), V, 800, lead));
        assert!(reminder_due(&unused(), V, 999, lead));
        assert!(!reminder_due(&unused(), V, 1_000, lead));
        assert!(!reminder_due(&locked("o", 900), V, 850, lead));
        assert!(reminder_due(&locked("o", 820), V, 850, lead));
        assert!(!reminder_due(&used("o"), V, 850, lead));
        assert!(!reminder_due(&unused(), V, 850, 0));
    }

    #[test]
    fn stored_columns_round_trip_and_are_checked() {
        let states = [
            unused(),
            Stored::Unused {
                last: ended("o", false),
            },
            Stored::Unused {
                last: ended("o", true),
            },
            locked("o", 5),
            used("o"),
            Stored::Expired { last: None },
            Stored::Expired {
                last: ended("o", true),
            },
        ];
        for s in states {
            let (state, order, step, until) = s.columns();
            let back = Stored::from_columns(
                state.as_str(),
                order.map(str::to_string),
                step.map(Step::as_str),
                until,
            );
            assert_eq!(back, Ok(s));
        }
        // rows from before steps were kept
        assert_eq!(
            Stored::from_columns("used", Some("o".into()), None, None),
            Ok(used("o"))
        );
        assert_eq!(
            Stored::from_columns("locked", Some("o".into()), None, None),
            Ok(locked("o", i64::MIN))
        );
        for (state, order, step) in [
            ("bogus", None, None),
            ("used", None, None),
            ("locked", None, Some("locked")),
            ("used", Some("o"), Some("refunded")),
            ("unused", None, Some("released")),
            ("unused", Some("o"), Some("bogus")),
        ] {
            assert!(
                Stored::from_columns(state, order.map(Into::into), step, None).is_err(),
                "{state} {order:?} {step:?}"
            );
        }
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
    }
}
