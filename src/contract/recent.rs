//! `lua/recent.lua`: the coupons of one user changed lately (claimed or changed), kept in the
//! user's own slot for a window, so that a wallet read finds them before the database does.
//!
//! Invariant kept here: a `get` answers only (coupon id, touched ms) pairs; any other shape
//! is a protocol error.

use super::keys::recent_key;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Recent;

/// KEYS, in the script's order (the key of `user`).
pub fn keys(key: &str) -> [&str; 1] {
    [key]
}

/// Touches `coupons` of `user` at `now`: they stay `window_ms` (as does the key after its
/// last touch); past `cap` coupons the oldest are forgotten.
pub async fn touch<B: Backend>(
    backend: &B,
    user: &str,
    coupons: &[&str],
    window_ms: u64,
    cap: u32,
    now: i64,
) -> Result<(), BackendError> {
    let key = recent_key(user);
    let (w, n, c) = (window_ms.to_string(), now.to_string(), cap.to_string());
    let mut argv: Vec<&str> = vec!["touch", &w, &n, &c];
    argv.extend_from_slice(coupons);
    let got = backend.eval(SCRIPT, &keys(&key), &argv).await?;
    let items = reply::array(SCRIPT, got)?;
    match items.as_slice() {
        [one] if reply::int(SCRIPT, one)? == 1 => Ok(()),
        _ => Err(protocol(
            SCRIPT,
            format!("unexpected touch reply {items:?}"),
        )),
    }
}

/// The coupons of `user` touched within `window_ms` of `now`, with when.
pub async fn get<B: Backend>(
    backend: &B,
    user: &str,
    window_ms: u64,
    now: i64,
) -> Result<Vec<(String, i64)>, BackendError> {
    let key = recent_key(user);
    let (w, n) = (window_ms.to_string(), now.to_string());
    decode_get(backend.eval(SCRIPT, &keys(&key), &["get", &w, &n]).await?)
}

/// The one decoder of a `get` reply.
pub fn decode_get(reply: Value) -> Result<Vec<(String, i64)>, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    if items.len() % 2 != 0 {
        return Err(protocol(SCRIPT, "an odd number of items"));
    }
    items
        .chunks(2)
        .map(|p| Ok((reply::string(SCRIPT, &p[0])?, reply::int(SCRIPT, &p[1])?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    #[test]
    fn pairs_decode() {
        let got = Value::Array(vec![
            bulk("b.0.1"),
            Value::Int(5),
            bulk("b.1.2"),
            Value::Int(7),
        ]);
        assert_eq!(
            decode_get(got).unwrap(),
            vec![("b.0.1".to_string(), 5), ("b.1.2".to_string(), 7)]
        );
        assert_eq!(decode_get(Value::Array(vec![])).unwrap(), vec![]);
        for bad in [
            Value::Array(vec![bulk("b.0.1")]),
            Value::Array(vec![Value::Int(1), Value::Int(5)]),
            Value::Nil,
        ] {
            assert!(decode_get(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
