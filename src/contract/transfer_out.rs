//! `lua/transfer_out.lua`: the first half of a stock transfer; takes stock out of the source
//! slot into its outbox. Idempotent per transfer id.
//!
//! Invariant kept here: the outbox entry names its destination by slot label
//! ([`super::keys::slot_label`]), which [`super::probe`] reads back; the reply is the amount
//! moved (0 = nothing to move), never negative.

use super::keys::SlotKeys;
use super::reply;
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::TransferOut;

/// KEYS, in the script's order (the source slot's).
pub fn keys(src: &SlotKeys) -> [&str; 4] {
    [&src.stock, &src.outbox, &src.xseq, &src.meta]
}

/// Takes up to `max` (at most half of the source's stock, rounded up, with `at_most_half`)
/// out of `src` for `dst` under transfer id `tid`. Returns the amount moved out (0 also
/// when `src` has no meta: a lost or fenced slot gives nothing).
pub async fn call<B: Backend>(
    backend: &B,
    src: &SlotKeys,
    dst: &SlotKeys,
    tid: &str,
    max: i64,
    at_most_half: bool,
) -> Result<i64, BackendError> {
    let max = max.to_string();
    let half = if at_most_half { "1" } else { "0" };
    let args = [tid, max.as_str(), dst.label.as_str(), half];
    decode(backend.eval(SCRIPT, &keys(src), &args).await?)
}

/// The one decoder of `transfer_out.lua`'s reply.
pub fn decode(reply: Value) -> Result<i64, BackendError> {
    Ok(reply::count(SCRIPT, &reply)? as i64)
}
