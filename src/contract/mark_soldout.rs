//! `lua/mark_soldout.lua`: records "sold out" on the pool, unless its stock moved since the
//! caller's scan.
//!
//! Invariant kept here: the reply is one of three [`Marked`] answers; anything else is a
//! protocol error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::MarkSoldout;

/// What `mark_soldout.lua` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    Marked,
    /// The pool's transfer sequence moved since the scan: not marked.
    Moved,
    /// No such batch.
    NoBatch,
}

/// KEYS, in the script's order (the pool's).
pub fn keys(pool: &SlotKeys) -> [&str; 2] {
    [&pool.meta, &pool.xseq]
}

/// Marks the batch sold out if the pool's transfer sequence is still `xseq_seen`.
pub async fn call<B: Backend>(
    backend: &B,
    pool: &SlotKeys,
    xseq_seen: i64,
) -> Result<Marked, BackendError> {
    let seen = xseq_seen.to_string();
    decode(backend.eval(SCRIPT, &keys(pool), &[&seen]).await?)
}

/// The one decoder of `mark_soldout.lua`'s reply.
pub fn decode(reply: Value) -> Result<Marked, BackendError> {
    match reply::int(SCRIPT, &reply)? {
        1 => Ok(Marked::Marked),
        0 => Ok(Marked::Moved),
        -1 => Ok(Marked::NoBatch),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}
