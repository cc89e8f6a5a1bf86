//! `lua/claim.lua`: one claim against the user's home shard. The typed KEYS/ARGV, the one
//! decoder of its reply ([`decode`]) into the closed set of [`Outcome`]s, and the formats of
//! what it writes besides the claim record: the request-id entries (`req`) and the daily
//! counts (`daily`, keyed by the day in the batch's time zone: ARGV 7 is the zone's UTC
//! offset now), which a rebuild writes back.
//!
//! Invariant kept here: every reply shape the script can produce maps to exactly one
//! [`Outcome`], and anything else is a protocol error (never a guess that could grant a
//! coupon).

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Claim;

/// A coupon as minted by the claim script (also what `lua/replay.lua` finds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    pub coupon_id: String,
    pub valid_from_ms: i64,
    pub valid_to_ms: i64,
    pub claimed_at_ms: i64,
    /// On a replay: the nonce of the request that minted the coupon ('' if unknown).
    pub minted_by: String,
    /// The code the coupon carries, in a batch that hands out codes.
    pub code: Option<String>,
}

/// What one run of `claim.lua` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A coupon was minted now.
    Claimed(Coupon),
    /// The request id was seen before: the coupon minted then.
    Replayed(Coupon),
    /// The shard has no metadata: the batch does not exist here (or Redis lost it).
    NoBatch,
    NotStarted,
    Ended,
    Paused,
    Denied,
    LimitReached,
    DailyLimitReached,
    /// The home shard is empty; stock may still be in the pool or in siblings.
    ShardEmpty,
    /// The shard's claim log is at its bound: shed, nothing claimed.
    BacklogFull,
    /// The shard was rolled back (a failover to a replica that lagged): the next sequence
    /// it would mint is at or below the highest the caller saw it hand out ([`Claim::seen`]).
    /// Nothing was claimed or written.
    RolledBack,
    /// Ask the database: the request id has no record on the shard, but records were
    /// dropped there (request-id retention, `lua/rotate.lua`) and the user claimed before,
    /// so this may be the replay of a success whose record expired. Nothing was written: the
    /// caller answers that success from the database, or claims again marked
    /// [`Claim::checked`].
    AskDatabase,
}

/// ARGV of one claim besides the batch and shard (which come with the slot's keys): one
/// [`Claim`] with its call's [`Shared`] values.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a> {
    pub user: &'a str,
    /// The client's request id, or an internal one; `''` = none.
    pub request_id: &'a str,
    /// `persister.max_backlog_per_shard`, formatted (0 = unbounded).
    pub max_log: &'a str,
    /// This HTTP request's nonce: recorded with the request id, returned on replay.
    pub nonce: &'a str,
    /// The batch's UTC offset now in ms, formatted (`"0"`: UTC): the script's day is
    /// `floor((now + offset) / DAY_MS)` (`domain::time::Zone::offset_ms_at`).
    pub day_offset: &'a str,
    /// See [`Claim::seen`] (0 = none).
    pub seen: u64,
    /// See [`Claim::checked`].
    pub checked: bool,
}

impl<'a> Args<'a> {
    fn split(&self) -> (Shared<'a>, Claim<'a>) {
        (
            Shared {
                max_log: self.max_log,
                day_offset: self.day_offset,
            },
            Claim {
                user: self.user,
                request_id: self.request_id,
                nonce: self.nonce,
                seen: self.seen,
                checked: self.checked,
            },
        )
    }
}

/// One claim of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim<'a> {
    pub user: &'a str,
    /// The client's request id, or an internal one; `''` = none.
    pub request_id: &'a str,
    /// The claim's HTTP request nonce: recorded with the request id, returned on replay.
    pub nonce: &'a str,
    /// The highest coupon sequence the caller saw the shard hand out before the claim was
    /// queued (`domain::ids::MintWindow`; 0 = none). The call gives the script the highest
    /// of its claims' (ARGV 6 + 3n): a shard about to mint at or below it was rolled back,
    /// and refuses ([`Outcome::RolledBack`]) before writing anything.
    pub seen: u64,
    /// The database holds no success of this request id (the caller asked it after an
    /// [`Outcome::AskDatabase`]), or the request id is the gateway's own and fresh: a miss on
    /// the shard is a new request (ARGV 7 + 3n).
    pub checked: bool,
}

/// What every claim of one call shares: the script takes them once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shared<'a> {
    /// `persister.max_backlog_per_shard`, formatted (0 = unbounded).
    pub max_log: &'a str,
    /// The batch's UTC offset now in ms, formatted (`"0"`: UTC): the script's day is
    /// `floor((now + offset) / DAY_MS)` (`domain::time::Zone::offset_ms_at`).
    pub day_offset: &'a str,
}

/// Most claims in one call (the script refuses more).
pub const MAX_CLAIMS_PER_CALL: usize = crate::config::MAX_GROUP_CLAIMS;

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 11] {
    [
        &slot.meta,
        &slot.stock,
        &slot.users,
        &slot.daily,
        &slot.req,
        &slot.log,
        &slot.deny,
        &slot.claimed,
        &slot.codes,
        &slot.coupons,
        &slot.req2,
    ]
}

/// ARGV, in the script's order: `n` (the number of claims, formatted), the shared values,
/// then users, request ids and nonces column by column, then `seen` (the highest
/// [`Claim::seen`] of the call, formatted), then `checked` ([`checked_flags`]) when any
/// claim is.
pub fn argv<'a>(
    slot: &'a SlotKeys,
    n: &'a str,
    shared: &Shared<'a>,
    claims: &[Claim<'a>],
    seen: &'a str,
    checked: &'a str,
) -> Vec<&'a str> {
    let mut v = Vec::with_capacity(7 + 3 * claims.len());
    v.extend([
        n,
        shared.max_log,
        &slot.batch,
        &slot.label,
        shared.day_offset,
    ]);
    v.extend(claims.iter().map(|c| c.user));
    v.extend(claims.iter().map(|c| c.request_id));
    v.extend(claims.iter().map(|c| c.nonce));
    v.push(seen);
    if !checked.is_empty() {
        v.push(checked);
    }
    v
}

/// ARGV 7 + 3n: one `'0'`/`'1'` per claim ([`Claim::checked`]), or `""` when none is.
pub fn checked_flags(claims: &[Claim<'_>]) -> String {
    if !claims.iter().any(|c| c.checked) {
        return String::new();
    }
    claims
        .iter()
        .map(|c| if c.checked { '1' } else { '0' })
        .collect()
}

/// Runs the script on `slot` (a shard) for one claim.
pub async fn call<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    args: &Args<'_>,
) -> Result<Outcome, BackendError> {
    let (shared, claim) = args.split();
    let mut out = call_many(backend, slot, &shared, &[claim]).await?;
    out.pop().ok_or_else(|| protocol(SCRIPT, "no answer"))
}

/// Runs the script on `slot` for `claims` in ONE call (1 ..= [`MAX_CLAIMS_PER_CALL`]),
/// decided in order: one [`Outcome`] per claim, in the same order.
pub async fn call_many<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    shared: &Shared<'_>,
    claims: &[Claim<'_>],
) -> Result<Vec<Outcome>, BackendError> {
    let n = claims.len().to_string();
    let seen = claims.iter().map(|c| c.seen).max().unwrap_or(0).to_string();
    let checked = checked_flags(claims);
    let reply = backend
        .eval(
            SCRIPT,
            &keys(slot),
            &argv(slot, &n, shared, claims, &seen, &checked),
        )
        .await?;
    decode(reply, claims.len())
}

/// The one decoder of `claim.lua`'s reply: `n` answers, one per claim of the call.
pub fn decode(reply: Value, n: usize) -> Result<Vec<Outcome>, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    if items.len() != n {
        return Err(protocol(
            SCRIPT,
            format!("{} answers to {n} claims", items.len()),
        ));
    }
    items.into_iter().map(decode_answer).collect()
}

/// One claim's answer.
fn decode_answer(answer: Value) -> Result<Outcome, BackendError> {
    let items = reply::array(SCRIPT, answer)?;
    let code = items
        .first()
        .ok_or_else(|| protocol(SCRIPT, "empty"))
        .and_then(|c| reply::int(SCRIPT, c))?;
    match code {
        0 => {
            let reason = match items.get(1) {
                Some(r) if items.len() == 2 => reply::int(SCRIPT, r)?,
                _ => return Err(protocol(SCRIPT, "a refusal is {0, code}")),
            };
            Ok(match reason {
                -1 => Outcome::NoBatch,
                -2 => Outcome::NotStarted,
                -3 => Outcome::Ended,
                -4 => Outcome::Paused,
                -5 => Outcome::Denied,
                -6 => Outcome::LimitReached,
                -7 => Outcome::DailyLimitReached,
                -8 => Outcome::ShardEmpty,
                -9 => Outcome::BacklogFull,
                -11 => Outcome::RolledBack,
                -12 => Outcome::AskDatabase,
                other => return Err(protocol(SCRIPT, format!("unknown refusal {other}"))),
            })
        }
        // a claim carries no nonce: its sixth item is '' when a code follows
        1 if items.len() == 5 || (items.len() == 7 && is_empty(&items[5])) => {
            Ok(Outcome::Claimed(coupon(SCRIPT, &items)?))
        }
        2 if items.len() == 6 || items.len() == 7 => Ok(Outcome::Replayed(coupon(SCRIPT, &items)?)),
        other => Err(protocol(
            SCRIPT,
            format!("status {other} with {} items", items.len()),
        )),
    }
}

fn is_empty(v: &Value) -> bool {
    v.as_str() == Some("")
}

/// `{ status, coupon_id, valid_from_ms, valid_to_ms, claimed_at_ms [, nonce [, code]] }`:
/// the coupon part of a claim or replay reply (`script` names which, for errors). A code is
/// never empty.
pub(super) fn coupon(script: Script, items: &[Value]) -> Result<Coupon, BackendError> {
    let int = |i: usize, what: &str| {
        items
            .get(i)
            .ok_or_else(|| protocol(script, format!("no {what}")))
            .and_then(|v| reply::int(script, v))
    };
    Ok(Coupon {
        coupon_id: items
            .get(1)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| protocol(script, "no coupon id"))?
            .to_string(),
        valid_from_ms: int(2, "valid_from")?,
        valid_to_ms: int(3, "valid_to")?,
        claimed_at_ms: int(4, "claimed_at")?,
        minted_by: match items.get(5) {
            None => String::new(),
            Some(v) => reply::string(script, v)?,
        },
        code: match items.get(6) {
            None => None,
            Some(v) => match reply::string(script, v)? {
                c if c.is_empty() => return Err(protocol(script, "an empty code")),
                c => Some(c),
            },
        },
    })
}

/// The `req` hash field of a request id: `<user>|<request id>`.
pub fn request_field(user: &str, request_id: &str) -> String {
    format!("{user}|{request_id}")
}

/// The `req` hash value of a coupon: `<coupon>|<valid_from>|<valid_to>|<claimed_at>`, to
/// which the script appends `|<nonce>` and, for a coupon with a code, `|<code>` (a rebuild
/// writes no nonce: none is known; `<claimed_at>||<code>` then).
pub fn request_value(
    coupon_id: &str,
    valid_from: i64,
    valid_to: i64,
    claimed_at: i64,
    code: Option<&str>,
) -> String {
    match code {
        Some(code) => format!("{coupon_id}|{valid_from}|{valid_to}|{claimed_at}||{code}"),
        None => format!("{coupon_id}|{valid_from}|{valid_to}|{claimed_at}"),
    }
}

/// The `daily` hash value: `<local day>:<count>`, the day as
/// `domain::time::Zone::local_day` counts it (the script's `floor((now + offset) / DAY_MS)`).
pub fn daily_value(day: i64, count: u64) -> String {
    format!("{day}:{count}")
}

/// Milliseconds per day, as the script counts days.
pub use crate::domain::time::DAY_MS;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    fn arr(v: Vec<Value>) -> Value {
        Value::Array(v)
    }

    /// The reply of a call of one claim answered `answer`.
    fn one(answer: Value) -> Result<Outcome, BackendError> {
        decode(arr(vec![answer]), 1).map(|mut v| v.pop().unwrap())
    }

    #[test]
    fn decodes_every_shape() {
        let ok = arr(vec![
            Value::Int(1),
            bulk("b.1.7"),
            Value::Int(10),
            Value::Int(20),
            Value::Int(5),
        ]);
        let c = match one(ok.clone()).unwrap() {
            Outcome::Claimed(c) => c,
            o => panic!("{o:?}"),
        };
        assert_eq!((c.coupon_id.as_str(), c.valid_to_ms), ("b.1.7", 20));
        let replay = arr(vec![
            Value::Int(2),
            bulk("b.1.7"),
            Value::Int(10),
            Value::Int(20),
            Value::Int(5),
            bulk("n1"),
        ]);
        match one(replay.clone()).unwrap() {
            Outcome::Replayed(c) => assert_eq!(c.minted_by, "n1"),
            o => panic!("{o:?}"),
        }
        for (code, want) in [
            (-1, Outcome::NoBatch),
            (-2, Outcome::NotStarted),
            (-3, Outcome::Ended),
            (-4, Outcome::Paused),
            (-5, Outcome::Denied),
            (-6, Outcome::LimitReached),
            (-7, Outcome::DailyLimitReached),
            (-8, Outcome::ShardEmpty),
            (-9, Outcome::BacklogFull),
            (-11, Outcome::RolledBack),
            (-12, Outcome::AskDatabase),
        ] {
            let got = one(arr(vec![Value::Int(0), Value::Int(code)])).unwrap();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            Value::Nil,
            Value::Int(1),
            arr(vec![]),
            arr(vec![Value::Int(0), Value::Int(-42)]),
            // replay.lua's "no earlier success" is not a claim.lua answer
            arr(vec![Value::Int(0), Value::Int(-10)]),
            arr(vec![Value::Int(3), Value::Int(0)]),
            arr(vec![
                Value::Int(1),
                Value::Bulk(bytes::Bytes::new()),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
            ]),
            arr(vec![
                Value::Int(7),
                bulk("x"),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
            ]),
            // a claim with a nonce, a replay without: not what the script returns
            arr(vec![
                Value::Int(1),
                bulk("x"),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
                bulk("n"),
            ]),
        ] {
            assert!(one(bad.clone()).is_err(), "{bad:?}");
        }
        // a reply that is not an array of answers, or has another number of them
        for (bad, n) in [
            (Value::Nil, 1),
            (arr(vec![]), 1),
            (arr(vec![arr(vec![Value::Int(0), Value::Int(-8)])]), 2),
        ] {
            assert!(decode(bad.clone(), n).is_err(), "{bad:?} for {n}");
        }
    }

    #[test]
    fn decodes_codes() {
        let claimed = arr(vec![
            Value::Int(1),
            bulk("b.1.7"),
            Value::Int(10),
            Value::Int(20),
            Value::Int(5),
            bulk(""),
            bulk("K7X"),
        ]);
        match one(claimed).unwrap() {
            Outcome::Claimed(c) => assert_eq!(c.code.as_deref(), Some("K7X")),
            o => panic!("{o:?}"),
        }
        let replay = arr(vec![
            Value::Int(2),
            bulk("b.1.7"),
            Value::Int(10),
            Value::Int(20),
            Value::Int(5),
            bulk("n1"),
            bulk("K7X"),
        ]);
        match one(replay).unwrap() {
            Outcome::Replayed(c) => {
                assert_eq!(
                    (c.minted_by.as_str(), c.code.as_deref()),
                    ("n1", Some("K7X"))
                )
            }
            o => panic!("{o:?}"),
        }
        // an empty code, or a claim with a nonce before its code: not what the script says
        for bad in [
            arr(vec![
                Value::Int(1),
                bulk("b.1.7"),
                Value::Int(10),
                Value::Int(20),
                Value::Int(5),
                bulk(""),
                bulk(""),
            ]),
            arr(vec![
                Value::Int(1),
                bulk("b.1.7"),
                Value::Int(10),
                Value::Int(20),
                Value::Int(5),
                bulk("n"),
                bulk("K"),
            ]),
        ] {
            assert!(one(bad.clone()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn decodes_a_call_of_many_claims_in_order() {
        let refused = arr(vec![Value::Int(0), Value::Int(-6)]);
        let claimed = arr(vec![
            Value::Int(1),
            bulk("b.1.8"),
            Value::Int(10),
            Value::Int(20),
            Value::Int(5),
        ]);
        let got = decode(arr(vec![claimed, refused]), 2).unwrap();
        assert!(matches!(&got[0], Outcome::Claimed(c) if c.coupon_id == "b.1.8"));
        assert_eq!(got[1], Outcome::LimitReached);
    }

    #[test]
    fn argv_is_column_by_column() {
        let slot = SlotKeys::new("b", Some(3));
        let shared = Shared {
            max_log: "9",
            day_offset: "-3600000",
        };
        let claims = [
            Claim {
                user: "u1",
                request_id: "r1",
                nonce: "n1",
                seen: 4,
                checked: false,
            },
            Claim {
                user: "u2",
                request_id: "",
                nonce: "n2",
                seen: 7,
                checked: true,
            },
        ];
        let checked = checked_flags(&claims);
        assert_eq!(
            argv(&slot, "2", &shared, &claims, "7", &checked),
            [
                "2", "9", "b", "3", "-3600000", "u1", "u2", "r1", "", "n1", "n2", "7", "01"
            ]
        );
        // none checked: the argument is left out
        assert_eq!(checked_flags(&claims[..1]), "");
        assert_eq!(argv(&slot, "1", &shared, &claims[..1], "4", "").len(), 9);
    }

    #[test]
    fn record_formats() {
        assert_eq!(request_field("u1", "r-1"), "u1|r-1");
        assert_eq!(request_value("b.0.1", 1, 2, 3, None), "b.0.1|1|2|3");
        assert_eq!(
            request_value("b.0.1", 1, 2, 3, Some("K7")),
            "b.0.1|1|2|3||K7"
        );
        assert_eq!(daily_value(20_000, 2), "20000:2");
    }
}
