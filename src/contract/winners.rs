//! `lua/winners.lua`: every user of a shard who claimed from the batch, with their count
//! (the shard's `users` hash).
//!
//! Invariant kept here: the reply is read as (user, count) pairs with a count >= 0, or
//! rejected as a protocol error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Winners;

/// KEYS, in the script's order.
pub fn keys(shard: &SlotKeys) -> [&str; 1] {
    [&shard.users]
}

/// (user, coupons claimed) of every user of `shard`.
pub async fn call<B: Backend>(
    backend: &B,
    shard: &SlotKeys,
) -> Result<Vec<(String, u64)>, BackendError> {
    decode(backend.eval(SCRIPT, &keys(shard), &[]).await?)
}

/// The one decoder of `winners.lua`'s reply.
pub fn decode(reply: Value) -> Result<Vec<(String, u64)>, BackendError> {
    reply::pairs(SCRIPT, reply)?
        .into_iter()
        .map(|(user, n)| match n.parse() {
            Ok(n) => Ok((user, n)),
            Err(_) => Err(protocol(SCRIPT, format!("count {n:?} of {user}"))),
        })
        .collect()
}
