//! `lua/replay.lua`: the read-only lookup of an earlier success of a request id, for the
//! requests the local cache would refuse.
//!
//! Invariant kept here: only `{2, coupon...}` (a replay), `{0, -10}` (none) and `{0, -12}`
//! (ask the database: request-id records were dropped) are answers; anything else is a
//! protocol error.

use super::claim::{self, Coupon};
use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Replay;

/// What the shard knows of an earlier success of a request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Its coupon.
    Coupon(Coupon),
    /// No success.
    None,
    /// No record, but records were dropped (request-id retention) and the user claimed
    /// before: only the database can tell.
    AskDatabase,
}

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 4] {
    [&slot.req, &slot.req2, &slot.meta, &slot.users]
}

/// What the shard `slot` knows of an earlier success of (`user`, `request_id`).
pub async fn call<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    user: &str,
    request_id: &str,
) -> Result<Found, BackendError> {
    decode(
        backend
            .eval(SCRIPT, &keys(slot), &[user, request_id])
            .await?,
    )
}

/// The one decoder of `replay.lua`'s reply.
pub fn decode(reply: Value) -> Result<Found, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    match items.first().map(|c| reply::int(SCRIPT, c)).transpose()? {
        Some(2) if items.len() == 6 || items.len() == 7 => {
            Ok(Found::Coupon(claim::coupon(SCRIPT, &items)?))
        }
        Some(0) if items.len() == 2 => match reply::int(SCRIPT, &items[1])? {
            -10 => Ok(Found::None),
            -12 => Ok(Found::AskDatabase),
            other => Err(protocol(SCRIPT, format!("unknown refusal {other}"))),
        },
        _ => Err(protocol(SCRIPT, format!("unexpected {items:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    #[test]
    fn a_replay_or_none() {
        let found = Value::Array(vec![
            Value::Int(2),
            bulk("b.0.3"),
            Value::Int(1),
            Value::Int(2),
            Value::Int(3),
            bulk(""),
        ]);
        let Found::Coupon(c) = decode(found).unwrap() else {
            panic!("a coupon")
        };
        assert_eq!((c.coupon_id.as_str(), c.minted_by.as_str()), ("b.0.3", ""));
        assert_eq!(
            decode(Value::Array(vec![Value::Int(0), Value::Int(-10)])).unwrap(),
            Found::None
        );
        assert_eq!(
            decode(Value::Array(vec![Value::Int(0), Value::Int(-12)])).unwrap(),
            Found::AskDatabase
        );
        for bad in [
            Value::Array(vec![Value::Int(0), Value::Int(-8)]),
            Value::Array(vec![Value::Int(1), bulk("x")]),
            Value::Nil,
        ] {
            assert!(decode(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
