//! `lua/log_ack.lua`: acknowledges persisted claim records and deletes them from the log.
//! Call only after the database transaction holding them committed.
//!
//! Invariant kept here: ids go in chunks of at most [`ACK_CHUNK`] per call; the reply is
//! the number removed (>= 0), anything else is a protocol error.

use super::reply;
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::LogAck;

/// Entry ids per call.
pub const ACK_CHUNK: usize = 1000;

/// KEYS, in the script's order.
pub fn keys(log: &str) -> [&str; 1] {
    [log]
}

/// Acks and deletes `ids` of the log stream `log` for `group`. Returns how many were removed.
pub async fn call<B: Backend>(
    backend: &B,
    log: &str,
    group: &str,
    ids: &[String],
) -> Result<u64, BackendError> {
    let mut removed = 0;
    for chunk in ids.chunks(ACK_CHUNK) {
        let mut args: Vec<&str> = Vec::with_capacity(chunk.len() + 1);
        args.push(group);
        args.extend(chunk.iter().map(String::as_str));
        removed += decode(backend.eval(SCRIPT, &keys(log), &args).await?)?;
    }
    Ok(removed)
}

/// The one decoder of `log_ack.lua`'s reply.
pub fn decode(reply: Value) -> Result<u64, BackendError> {
    reply::count(SCRIPT, &reply)
}
