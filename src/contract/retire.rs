//! `lua/retire.lua`: drops every key of one slot of a retired batch, once everything the
//! slot holds is in the database.
//!
//! Invariant kept here: the reply is one of the closed [`Retired`] answers; the KEYS are
//! every key of the slot's layout ([`super::keys`]), so a retired slot leaves nothing behind.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Retire;

/// What `retire.lua` did to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// Its keys are gone now: this many were deleted.
    Dropped(u64),
    /// Nothing was left: retired before.
    Gone,
    /// Its log holds this many records the database may not have yet: nothing dropped.
    LogNotDrained(u64),
    /// This many transfers out of it are not settled yet: nothing dropped.
    TransfersOpen(u64),
    /// A repairer holds its repair lock: nothing dropped.
    UnderRepair,
    /// Asked only to check ([`check`]): it could be retired now.
    Ready,
}

/// KEYS, in the script's order.
pub fn keys(s: &SlotKeys) -> [&str; 17] {
    [
        &s.meta, &s.stock, &s.users, &s.daily, &s.req, &s.deny, &s.claimed, &s.xseq, &s.outbox,
        &s.log, &s.repair, &s.codes, &s.xcodes, &s.coupons, &s.fence, &s.loads, &s.req2,
    ]
}

/// Retires one slot.
pub async fn call<B: Backend>(backend: &B, slot: &SlotKeys) -> Result<Retired, BackendError> {
    decode(backend.eval(SCRIPT, &keys(slot), &[]).await?)
}

/// Checks whether the slot could be retired now, writing nothing.
pub async fn check<B: Backend>(backend: &B, slot: &SlotKeys) -> Result<Retired, BackendError> {
    decode(backend.eval(SCRIPT, &keys(slot), &["check"]).await?)
}

/// The one decoder of `retire.lua`'s reply.
pub fn decode(reply: Value) -> Result<Retired, BackendError> {
    let (code, n) = reply::code_and(SCRIPT, reply)?;
    let n = u64::try_from(n).map_err(|_| protocol(SCRIPT, format!("negative count {n}")))?;
    match code {
        2 => Ok(Retired::Ready),
        1 => Ok(Retired::Dropped(n)),
        0 => Ok(Retired::Gone),
        -1 => Ok(Retired::LogNotDrained(n)),
        -2 => Ok(Retired::TransfersOpen(n)),
        -3 => Ok(Retired::UnderRepair),
        other => Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    }
}
