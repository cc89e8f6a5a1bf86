//! `lua/log_count.lua`: the claims a shard's log holds (minted, not yet in the database), for
//! reconcile. The log holds one entry per claim call, so its length counts calls, not claims.
//!
//! Invariant kept here: [`claims`] reads at most the first `entries` entries of the log, page
//! by page, so a log growing under load cannot keep it reading; the reply is exactly
//! `{ claims >= 0, entries >= 0, last id }` (a protocol error otherwise).

use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::LogCount;

/// Entries per call.
pub const PAGE: u64 = 1000;

/// KEYS, in the script's order.
pub fn keys(log: &str) -> [&str; 1] {
    [log]
}

/// One page: claims in it, entries in it, the id of its last entry (`None`: nothing left).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub claims: u64,
    pub entries: u64,
    pub last: Option<String>,
}

/// The claims held by the first `entries` entries of the log `log` (every claim of an entry
/// that was in the log when its length `entries` was read and is still there: later entries
/// come after them).
pub async fn claims<B: Backend>(backend: &B, log: &str, entries: u64) -> Result<u64, BackendError> {
    let (mut claims, mut left, mut after) = (0, entries, String::new());
    while left > 0 {
        let page = left.min(PAGE).to_string();
        let got = decode(backend.eval(SCRIPT, &keys(log), &[&after, &page]).await?)?;
        claims += got.claims;
        left = left.saturating_sub(got.entries);
        match got.last {
            Some(id) => after = id,
            None => break,
        }
    }
    Ok(claims)
}

/// The one decoder of `log_count.lua`'s reply.
pub fn decode(reply: Value) -> Result<Page, BackendError> {
    let parts = reply::array(SCRIPT, reply)?;
    let [claims, entries, last] = &parts[..] else {
        return Err(protocol(SCRIPT, format!("{} parts, want 3", parts.len())));
    };
    let last = reply::string(SCRIPT, last)?;
    Ok(Page {
        claims: reply::count(SCRIPT, claims)?,
        entries: reply::count(SCRIPT, entries)?,
        last: (!last.is_empty()).then_some(last),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    #[test]
    fn pages_decode() {
        let page =
            |c: i64, e: i64, l: &str| Value::Array(vec![Value::Int(c), Value::Int(e), bulk(l)]);
        assert_eq!(
            decode(page(40, 2, "5-0")).unwrap(),
            Page {
                claims: 40,
                entries: 2,
                last: Some("5-0".into())
            }
        );
        assert_eq!(decode(page(0, 0, "")).unwrap().last, None);
        assert!(decode(page(-1, 0, "")).is_err());
        assert!(decode(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
