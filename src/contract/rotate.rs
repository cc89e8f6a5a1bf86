//! `lua/rotate.lua`: request-id retention on one shard. The shard's request-id records live in
//! two generations; a rotation drops the older one once the database holds its claims.
//!
//! Invariant kept here: the reply is one of the closed [`Rotated`] answers, and a record is
//! dropped only by a [`Rotated::Rotated`] answer, which the script gives only once the
//! shard's log holds nothing from before the generation it drops.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Rotate;

/// What `rotate.lua` did on a shard. Every mark is a time in ms (Redis's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotated {
    /// Rotated now: the previous generation was dropped; the new one starts at the mark.
    Rotated(i64),
    /// The first call on the shard: its current generation starts at the mark.
    Started(i64),
    /// Not due: the current generation started at the mark (due a retention later).
    NotDue(i64),
    /// No meta: no batch in this slot (or it is being repaired).
    NoBatch,
    /// Due, but the log still holds an entry from before the current generation (its id's
    /// ms): the database may not have its claim yet. Nothing written.
    LogBehind(i64),
}

/// KEYS, in the script's order.
pub fn keys(s: &SlotKeys) -> [&str; 4] {
    [&s.meta, &s.req, &s.req2, &s.log]
}

/// Rotates `slot`'s request-id generations if the current one is `retention_ms` old.
pub async fn call<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    retention_ms: u64,
) -> Result<Rotated, BackendError> {
    let w = retention_ms.to_string();
    decode(backend.eval(SCRIPT, &keys(slot), &[&w]).await?)
}

/// The one decoder of `rotate.lua`'s reply.
pub fn decode(reply: Value) -> Result<Rotated, BackendError> {
    let (code, ms) = reply::code_and(SCRIPT, reply)?;
    match code {
        1 => Ok(Rotated::Rotated(ms)),
        2 => Ok(Rotated::Started(ms)),
        0 => Ok(Rotated::NotDue(ms)),
        -1 => Ok(Rotated::NoBatch),
        -2 => Ok(Rotated::LogBehind(ms)),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: i64, b: i64) -> Value {
        Value::Array(vec![Value::Int(a), Value::Int(b)])
    }

    #[test]
    fn decodes_every_answer_and_nothing_else() {
        assert_eq!(decode(pair(1, 7)).unwrap(), Rotated::Rotated(7));
        assert_eq!(decode(pair(2, 7)).unwrap(), Rotated::Started(7));
        assert_eq!(decode(pair(0, 7)).unwrap(), Rotated::NotDue(7));
        assert_eq!(decode(pair(-1, 0)).unwrap(), Rotated::NoBatch);
        assert_eq!(decode(pair(-2, 5)).unwrap(), Rotated::LogBehind(5));
        assert!(decode(pair(3, 0)).is_err());
        assert!(decode(Value::Nil).is_err());
    }
}
