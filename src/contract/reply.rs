//! Small readers shared by the scripts' decoders. Every one of them answers a shape it does
//! not expect with [`BackendError::Protocol`] naming the script: a decoder never guesses.

use crate::backend::{BackendError, Script, Value};

/// A reply that does not have the shape the script's header promises.
pub fn protocol(script: Script, what: impl std::fmt::Display) -> BackendError {
    BackendError::Protocol(format!("{} reply: {what}", script.name()))
}

/// An integer reply.
pub fn int(script: Script, v: &Value) -> Result<i64, BackendError> {
    match v {
        Value::Int(i) => Ok(*i),
        other => Err(protocol(
            script,
            format!("expected an integer, got {other:?}"),
        )),
    }
}

/// An integer that is at least 0.
pub fn count(script: Script, v: &Value) -> Result<u64, BackendError> {
    let i = int(script, v)?;
    u64::try_from(i).map_err(|_| protocol(script, format!("negative count {i}")))
}

/// An array reply.
pub fn array(script: Script, v: Value) -> Result<Vec<Value>, BackendError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(protocol(
            script,
            format!("expected an array, got {other:?}"),
        )),
    }
}

/// A string element.
pub fn string(script: Script, v: &Value) -> Result<String, BackendError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| protocol(script, format!("expected a string, got {v:?}")))
}

/// A flat `{ field, value, ... }` array (`HGETALL`), as pairs of strings. `Nil` (no such
/// key, as a script may return it) is no pairs.
pub fn pairs(script: Script, v: Value) -> Result<Vec<(String, String)>, BackendError> {
    let flat = match v {
        Value::Nil => return Ok(Vec::new()),
        other => array(script, other)?,
    };
    if flat.len() % 2 != 0 {
        return Err(protocol(script, "odd number of field/value items"));
    }
    flat.chunks(2)
        .map(|kv| Ok((string(script, &kv[0])?, string(script, &kv[1])?)))
        .collect()
}

/// `{ code, n }`, the two-integer replies of several scripts.
pub fn code_and(script: Script, v: Value) -> Result<(i64, i64), BackendError> {
    match array(script, v)?.as_slice() {
        [code, n] => Ok((int(script, code)?, int(script, n)?)),
        other => Err(protocol(
            script,
            format!("expected {{code, n}}, got {other:?}"),
        )),
    }
}

#[cfg(test)]
pub fn bulk(s: &str) -> Value {
    Value::Bulk(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        let s = Script::MetaGet;
        assert_eq!(
            pairs(s, Value::Array(vec![bulk("a"), bulk("1")])).unwrap(),
            [("a".to_string(), "1".to_string())]
        );
        assert!(pairs(s, Value::Nil).unwrap().is_empty());
        assert!(pairs(s, Value::Array(vec![bulk("a")])).is_err());
        assert!(pairs(s, Value::Array(vec![Value::Int(1), bulk("a")])).is_err());
        assert!(pairs(s, Value::Int(1)).is_err());
        assert_eq!(int(s, &Value::Int(-3)).unwrap(), -3);
        assert!(
            int(s, &bulk("3")).is_err(),
            "a script's integer is an integer"
        );
        assert!(count(s, &Value::Int(-1)).is_err());
        assert_eq!(
            code_and(s, Value::Array(vec![Value::Int(1), Value::Int(9)])).unwrap(),
            (1, 9)
        );
        let e = code_and(s, Value::Array(vec![Value::Int(1)])).unwrap_err();
        assert!(e.to_string().contains("meta_get"), "{e}");
    }
}
