//! `lua/replay.lua`: the read-only lookup of an earlier success of a request id, for the
//! requests the local cache would refuse.
//!
//! Invariant kept here: only `{2, coupon...}` (a replay) and `{0, -10}` (none) are answers;
//! anything else is a protocol error.

use super::claim::{self, Coupon};
use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Replay;

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 1] {
    [&slot.req]
}

/// The coupon an earlier success of (`user`, `request_id`) got on the shard `slot`, if any.
pub async fn call<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    user: &str,
    request_id: &str,
) -> Result<Option<Coupon>, BackendError> {
    decode(
        backend
            .eval(SCRIPT, &keys(slot), &[user, request_id])
            .await?,
    )
}

/// The one decoder of `replay.lua`'s reply.
pub fn decode(reply: Value) -> Result<Option<Coupon>, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    match items.first().map(|c| reply::int(SCRIPT, c)).transpose()? {
        Some(2) if items.len() == 6 || items.len() == 7 => Ok(Some(claim::coupon(SCRIPT, &items)?)),
        Some(0) if items.len() == 2 && reply::int(SCRIPT, &items[1])? == -10 => Ok(None),
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
        let c = decode(found).unwrap().unwrap();
        assert_eq!((c.coupon_id.as_str(), c.minted_by.as_str()), ("b.0.3", ""));
        assert_eq!(
            decode(Value::Array(vec![Value::Int(0), Value::Int(-10)])).unwrap(),
            None
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
