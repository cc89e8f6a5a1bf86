//! `lua/transfer_done.lua`: closes a transfer (removes its outbox entry) once the
//! destination was credited.
//!
//! Invariant kept here: the reply is 1 (closed now) or 0 (closed before); anything else is
//! a protocol error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::TransferDone;

/// KEYS, in the script's order (the source slot's).
pub fn keys(src: &SlotKeys) -> [&str; 2] {
    [&src.outbox, &src.xcodes]
}

/// Removes transfer `tid` from `src`'s outbox. Returns whether it was still there.
pub async fn call<B: Backend>(
    backend: &B,
    src: &SlotKeys,
    tid: &str,
) -> Result<bool, BackendError> {
    decode(backend.eval(SCRIPT, &keys(src), &[tid]).await?)
}

/// The one decoder of `transfer_done.lua`'s reply.
pub fn decode(reply: Value) -> Result<bool, BackendError> {
    match reply::int(SCRIPT, &reply)? {
        1 => Ok(true),
        0 => Ok(false),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}
