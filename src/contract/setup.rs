//! `lua/setup.lua`: creates one slot of a batch (the pool or a shard). Idempotent.
//!
//! Invariant kept here: the ARGV carry the fingerprint first among the meta fields, and the
//! reply is one of three answers ([`Created`]); anything else is a protocol error.

use super::keys::SlotKeys;
use super::meta::FINGERPRINT;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Setup;

/// What `setup.lua` did to the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created now.
    Now,
    /// Created before with the same fingerprint (a retry).
    Already,
    /// A different batch owns this id.
    Conflict,
}

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 4] {
    [&slot.meta, &slot.stock, &slot.deny, &slot.xseq]
}

/// ARGV: the initial stock, the meta field count, `fp` and the fields, the denied users.
pub fn argv<'a>(
    initial: &'a str,
    count: &'a str,
    fingerprint: &'a str,
    meta: &'a [(&'static str, String)],
    deny: &[&'a str],
) -> Vec<&'a str> {
    let mut args = Vec::with_capacity(4 + 2 * meta.len() + deny.len());
    args.extend([initial, count, FINGERPRINT, fingerprint]);
    for (k, v) in meta {
        args.push(k);
        args.push(v);
    }
    args.extend_from_slice(deny);
    args
}

/// Creates `slot` holding `initial` stock, with `meta` (besides the fingerprint) and the
/// denied users whose home it is.
pub async fn call<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    initial: i64,
    fingerprint: &str,
    meta: &[(&'static str, String)],
    deny: &[&str],
) -> Result<Created, BackendError> {
    let (initial, count) = (initial.to_string(), (meta.len() + 1).to_string());
    let args = argv(&initial, &count, fingerprint, meta, deny);
    decode(backend.eval(SCRIPT, &keys(slot), &args).await?)
}

/// The one decoder of `setup.lua`'s reply.
pub fn decode(reply: Value) -> Result<Created, BackendError> {
    match reply::int(SCRIPT, &reply)? {
        1 => Ok(Created::Now),
        0 => Ok(Created::Already),
        -1 => Ok(Created::Conflict),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}
