//! `lua/log_read.lua`: the persister's read of one shard's claim log through its consumer
//! group (taken-over pending entries first, then new ones).
//!
//! Invariant kept here: every entry comes back with its id; an entry deleted while pending
//! comes back with no fields (nothing to persist, but its id is kept); any other shape is
//! a protocol error. What the fields mean is [`super::claim_record`]'s business.

use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::LogRead;

/// One entry of a shard's claim log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl LogEntry {
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_str())
    }
}

/// What to read.
#[derive(Debug, Clone, Copy)]
pub struct Read<'a> {
    pub group: &'a str,
    pub consumer: &'a str,
    /// Entries at most (> 0).
    pub count: usize,
    /// Entries pending with any consumer at least this long are taken over.
    pub min_idle_ms: u64,
}

/// KEYS, in the script's order.
pub fn keys(log: &str) -> [&str; 1] {
    [log]
}

/// Reads up to `r.count` entries of the log stream `log` (a shard's `log` key).
pub async fn call<B: Backend>(
    backend: &B,
    log: &str,
    r: &Read<'_>,
) -> Result<Vec<LogEntry>, BackendError> {
    let (count, idle) = (r.count.to_string(), r.min_idle_ms.to_string());
    let args = [r.group, r.consumer, count.as_str(), idle.as_str()];
    decode(backend.eval(SCRIPT, &keys(log), &args).await?)
}

/// The one decoder of `log_read.lua`'s reply.
pub fn decode(reply: Value) -> Result<Vec<LogEntry>, BackendError> {
    let entries = match reply {
        Value::Nil => return Ok(Vec::new()),
        other => reply::array(SCRIPT, other)?,
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let mut parts = reply::array(SCRIPT, e)?;
        if parts.len() != 2 {
            return Err(protocol(SCRIPT, "entry is not [id, fields]"));
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let id = parts
            .pop()
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| protocol(SCRIPT, "entry id is not a string"))?;
        // `Nil` fields: an entry deleted while pending. `pairs` reads it as none.
        let fields = reply::pairs(SCRIPT, fields)?;
        out.push(LogEntry { id, fields });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    #[test]
    fn log_read_replies_parse() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![bulk("k"), bulk("claimed")]),
            ]),
            Value::Array(vec![bulk("6-0"), Value::Nil]),
        ]);
        let e = decode(reply).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].get("k"), Some("claimed"));
        assert!(e[1].fields.is_empty());
        assert!(decode(Value::Int(3)).is_err());
        assert!(decode(Value::Nil).unwrap().is_empty());
    }
}
