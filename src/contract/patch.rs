//! `lua/patch.lua`: brings one slot to a version of its definition (idempotent,
//! order-independent per version).
//!
//! Invariant kept here: the version and (on the pool) the absolute total travel with the
//! WHOLE metadata at that version, never a delta; the reply is one of four [`Patched`]
//! answers, anything else is a protocol error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Patch;

/// What `patch.lua` did to the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patched {
    /// The version was applied now.
    Applied { version: i64 },
    /// The slot already holds this version or a newer one: nothing written.
    Stale { current: i64 },
    /// No such batch in this slot.
    NoSlot,
    /// The total would shrink (nothing written); the slot's total is `current`.
    WouldShrink { current: i64 },
    /// The total would pass the pool's cap, the most stock its budget pays for (nothing
    /// written).
    OverCap { cap: i64 },
}

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 3] {
    [&slot.meta, &slot.stock, &slot.xseq]
}

/// ARGV: the version, the total (`""` on shards), then the meta field/value pairs.
pub fn argv<'a>(
    version: &'a str,
    total: &'a str,
    meta: &'a [(&'static str, String)],
) -> Vec<&'a str> {
    let mut args = Vec::with_capacity(2 + 2 * meta.len());
    args.extend([version, total]);
    for (k, v) in meta {
        args.push(k);
        args.push(v);
    }
    args
}

/// Applies `version` with `meta` to `slot`; `total` only on the pool, which owns it.
pub async fn call<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    version: i64,
    total: Option<i64>,
    meta: &[(&'static str, String)],
) -> Result<Patched, BackendError> {
    let version = version.to_string();
    let total = total.map(|t| t.to_string()).unwrap_or_default();
    let args = argv(&version, &total, meta);
    decode(backend.eval(SCRIPT, &keys(slot), &args).await?)
}

/// The one decoder of `patch.lua`'s reply.
pub fn decode(reply: Value) -> Result<Patched, BackendError> {
    match reply::code_and(SCRIPT, reply)? {
        (1, version) => Ok(Patched::Applied { version }),
        (0, current) => Ok(Patched::Stale { current }),
        (-1, _) => Ok(Patched::NoSlot),
        (-2, current) => Ok(Patched::WouldShrink { current }),
        (-3, cap) => Ok(Patched::OverCap { cap }),
        (code, n) => Err(protocol(SCRIPT, format!("unknown answer {{{code}, {n}}}"))),
    }
}
