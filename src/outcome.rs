//! The closed set of claim outcomes, decoded from `lua/claim.lua`'s reply in this one place.
//!
//! Invariant kept here: every reply shape the script can produce maps to exactly one
//! variant, and anything else is a protocol error (never a guess that could grant a coupon).

use crate::backend::{BackendError, Value};

/// A coupon as minted by the claim script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    pub coupon_id: String,
    pub valid_from_ms: i64,
    pub valid_to_ms: i64,
    pub claimed_at_ms: i64,
    /// On a replay: the nonce of the request that minted the coupon ('' if unknown).
    pub minted_by: String,
}

/// What one run of `claim.lua` decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptOutcome {
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
    /// `replay.lua`: no earlier success with this request id.
    NotAReplay,
}

impl ScriptOutcome {
    pub fn decode(reply: Value) -> Result<ScriptOutcome, BackendError> {
        let bad = |why: &str| BackendError::Protocol(format!("claim reply: {why}"));
        let items = reply.into_array().ok_or_else(|| bad("not an array"))?;
        let code = items
            .first()
            .and_then(Value::as_int)
            .ok_or_else(|| bad("no status"))?;
        if code == 0 {
            let reason = items
                .get(1)
                .and_then(Value::as_int)
                .ok_or_else(|| bad("no reason"))?;
            return Ok(match reason {
                -1 => ScriptOutcome::NoBatch,
                -2 => ScriptOutcome::NotStarted,
                -3 => ScriptOutcome::Ended,
                -4 => ScriptOutcome::Paused,
                -5 => ScriptOutcome::Denied,
                -6 => ScriptOutcome::LimitReached,
                -7 => ScriptOutcome::DailyLimitReached,
                -8 => ScriptOutcome::ShardEmpty,
                -9 => ScriptOutcome::BacklogFull,
                -10 => ScriptOutcome::NotAReplay,
                other => return Err(bad(&format!("unknown reason {other}"))),
            });
        }
        if !(5..=6).contains(&items.len()) {
            return Err(bad("coupon reply needs 5 or 6 items"));
        }
        let coupon = Coupon {
            coupon_id: items[1]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("no coupon id"))?
                .to_string(),
            valid_from_ms: items[2].as_int().ok_or_else(|| bad("valid_from"))?,
            valid_to_ms: items[3].as_int().ok_or_else(|| bad("valid_to"))?,
            claimed_at_ms: items[4].as_int().ok_or_else(|| bad("claimed_at"))?,
            minted_by: items
                .get(5)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        match code {
            1 => Ok(ScriptOutcome::Claimed(coupon)),
            2 => Ok(ScriptOutcome::Replayed(coupon)),
            other => Err(bad(&format!("unknown status {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn arr(v: Vec<Value>) -> Value {
        Value::Array(v)
    }

    #[test]
    fn decodes_every_shape() {
        let ok = arr(vec![
            Value::Int(1),
            Value::Bulk(Bytes::from_static(b"b.1.7")),
            Value::Int(10),
            Value::Int(20),
            Value::Int(5),
        ]);
        let c = match ScriptOutcome::decode(ok).unwrap() {
            ScriptOutcome::Claimed(c) => c,
            o => panic!("{o:?}"),
        };
        assert_eq!((c.coupon_id.as_str(), c.valid_to_ms), ("b.1.7", 20));
        for (code, want) in [
            (-1, ScriptOutcome::NoBatch),
            (-2, ScriptOutcome::NotStarted),
            (-3, ScriptOutcome::Ended),
            (-4, ScriptOutcome::Paused),
            (-5, ScriptOutcome::Denied),
            (-6, ScriptOutcome::LimitReached),
            (-7, ScriptOutcome::DailyLimitReached),
            (-8, ScriptOutcome::ShardEmpty),
            (-9, ScriptOutcome::BacklogFull),
            (-10, ScriptOutcome::NotAReplay),
        ] {
            let got = ScriptOutcome::decode(arr(vec![Value::Int(0), Value::Int(code)])).unwrap();
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
            arr(vec![Value::Int(3), Value::Int(0)]),
            arr(vec![
                Value::Int(1),
                Value::Bulk(Bytes::new()),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
            ]),
            arr(vec![
                Value::Int(7),
                Value::Bulk(Bytes::from_static(b"x")),
                Value::Int(1),
                Value::Int(1),
                Value::Int(1),
            ]),
        ] {
            assert!(ScriptOutcome::decode(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
