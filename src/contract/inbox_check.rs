//! `lua/inbox_check.lua`: was a transfer credited at its destination?
//!
//! Invariant kept here: the reply is 1 (credited) or 0 (not); anything else is a protocol
//! error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::InboxCheck;

/// KEYS, in the script's order: the destination's inbox marker of the transfer
/// ([`SlotKeys::inbox`]).
pub fn keys(inbox: &str) -> [&str; 1] {
    [inbox]
}

/// Whether transfer `tid` was credited to `dst`.
pub async fn call<B: Backend>(
    backend: &B,
    dst: &SlotKeys,
    tid: &str,
) -> Result<bool, BackendError> {
    let inbox = dst.inbox(tid);
    decode(backend.eval(SCRIPT, &keys(&inbox), &[]).await?)
}

/// The one decoder of `inbox_check.lua`'s reply.
pub fn decode(reply: Value) -> Result<bool, BackendError> {
    match reply::int(SCRIPT, &reply)? {
        1 => Ok(true),
        0 => Ok(false),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}
