//! `lua/transfer_in.lua`: the second half of a stock transfer; credits the destination slot
//! once (an inbox marker records the transfer id).
//!
//! Invariant kept here: the reply says whether this call credited ([`Credit`]); anything
//! else is a protocol error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::TransferIn;

/// What `transfer_in.lua` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    Credited,
    /// Credited by an earlier call: nothing written.
    AlreadyCredited,
}

/// KEYS, in the script's order (the destination slot's; the inbox key carries `tid`).
pub fn keys<'a>(dst: &'a SlotKeys, inbox: &'a str) -> [&'a str; 4] {
    [&dst.stock, inbox, &dst.xseq, &dst.codes]
}

/// Credits `amount` of transfer `tid` to `dst` once, with the `codes` that left the source
/// with it (joined by ','; `''` in a batch without codes); the marker lives `marker_ttl_s`.
pub async fn call<B: Backend>(
    backend: &B,
    dst: &SlotKeys,
    tid: &str,
    amount: i64,
    codes: &str,
    marker_ttl_s: u64,
) -> Result<Credit, BackendError> {
    let inbox = dst.inbox(tid);
    let (amount, ttl) = (amount.to_string(), marker_ttl_s.to_string());
    let reply = backend
        .eval(SCRIPT, &keys(dst, &inbox), &[&amount, &ttl, codes])
        .await?;
    decode(reply)
}

/// The one decoder of `transfer_in.lua`'s reply.
pub fn decode(reply: Value) -> Result<Credit, BackendError> {
    match reply::int(SCRIPT, &reply)? {
        1 => Ok(Credit::Credited),
        0 => Ok(Credit::AlreadyCredited),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}
