//! `lua/codes_add.lua`: adds a chunk of codes to a batch's pool, with the stock they are.
//!
//! Invariant kept here: a chunk id counts once for ever (the script records it), so a chunk
//! the database has not yet marked loaded can be sent again after any failure; the one
//! decoder ([`decode`]) reads every answer into an [`Added`], anything else is a protocol
//! error.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::CodesAdd;

/// What `codes_add.lua` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Added now; the pool's total is `total` after.
    Now { total: i64 },
    /// Added by an earlier call: nothing written.
    Before { total: i64 },
    /// The pool is missing (Redis lost the batch).
    NoBatch,
    /// The batch does not hand out codes.
    NoCodes,
    /// The codes would take the total past the pool's cap: nothing written.
    OverCap { cap: i64 },
}

/// KEYS, in the script's order (the pool's).
pub fn keys(pool: &SlotKeys) -> [&str; 5] {
    [
        &pool.meta,
        &pool.stock,
        &pool.codes,
        &pool.loads,
        &pool.xseq,
    ]
}

/// Adds `codes` (non-empty, each valid: `domain::codes::valid_code`) to `pool` as chunk
/// `chunk`.
pub async fn call<B: Backend>(
    backend: &B,
    pool: &SlotKeys,
    chunk: &str,
    codes: &[String],
) -> Result<Added, BackendError> {
    let joined = codes.join(",");
    decode(backend.eval(SCRIPT, &keys(pool), &[chunk, &joined]).await?)
}

/// The one decoder of `codes_add.lua`'s reply.
pub fn decode(reply: Value) -> Result<Added, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    let [status, n] = items.as_slice() else {
        return Err(protocol(SCRIPT, "expected { status, n }"));
    };
    let n = reply::int(SCRIPT, n)?;
    Ok(match reply::int(SCRIPT, status)? {
        1 => Added::Now { total: n },
        0 => Added::Before { total: n },
        -1 => Added::NoBatch,
        -2 => Added::NoCodes,
        -3 => Added::OverCap { cap: n },
        other => return Err(protocol(SCRIPT, format!("unknown answer {other}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_answer() {
        let r = |s: i64, n: i64| Value::Array(vec![Value::Int(s), Value::Int(n)]);
        assert_eq!(decode(r(1, 7)).unwrap(), Added::Now { total: 7 });
        assert_eq!(decode(r(0, 7)).unwrap(), Added::Before { total: 7 });
        assert_eq!(decode(r(-1, 0)).unwrap(), Added::NoBatch);
        assert_eq!(decode(r(-2, 0)).unwrap(), Added::NoCodes);
        assert_eq!(decode(r(-3, 5)).unwrap(), Added::OverCap { cap: 5 });
        assert!(decode(r(-4, 0)).is_err());
        assert!(decode(Value::Int(1)).is_err());
    }
}
