//! `lua/meta_get.lua`: the whole metadata hash of one slot.
//!
//! Invariant kept here: the reply is read into a [`SlotMeta`] (the one reader of the meta
//! fields) or rejected as a protocol error; an empty hash is a slot that does not exist.

use super::keys::SlotKeys;
use super::meta::SlotMeta;
use super::reply;
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::MetaGet;

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 1] {
    [&slot.meta]
}

/// The metadata of `slot` (empty when the slot does not exist).
pub async fn call<B: Backend>(backend: &B, slot: &SlotKeys) -> Result<SlotMeta, BackendError> {
    decode(backend.eval(SCRIPT, &keys(slot), &[]).await?)
}

/// The one decoder of `meta_get.lua`'s reply.
pub fn decode(reply: Value) -> Result<SlotMeta, BackendError> {
    Ok(SlotMeta::new(reply::pairs(SCRIPT, reply)?))
}
