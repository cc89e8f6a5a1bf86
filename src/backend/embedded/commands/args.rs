//! Argument parsing and typed lookups shared by the commands, with Redis's rules (its
//! `string2ll`, its integer formatting, its WRONGTYPE checks).

use std::borrow::Cow;

use super::super::keyspace::{HashVal, Obj, Stream, Val};
use super::*;

/// Redis's `string2ll`: optional '-', digits, no leading zeros (except "0"), no '+', no
/// spaces, within i64.
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let (neg, digits) = match b.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, b),
    };
    match digits {
        [] => return None,
        [b'0'] if !neg => return Some(0),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if neg {
        if v <= i64::MAX as u64 + 1 {
            Some((v as i64).wrapping_neg())
        } else {
            None
        }
    } else {
        i64::try_from(v).ok()
    }
}

/// Unsigned parse used for stream id parts (Redis falls back to `strtoull`, so leading
/// zeros are accepted).
pub(super) fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(v)
}

pub(super) fn int_arg(b: &[u8]) -> Result<i64, CmdError> {
    parse_i64(b).ok_or(Cow::Borrowed(ERR_NOT_INT))
}

pub(super) fn is(a: &[u8], word: &str) -> bool {
    a.eq_ignore_ascii_case(word.as_bytes())
}

/// Formats an integer into `buf`, returning the digits.
pub fn fmt_i64(i: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut n = i.unsigned_abs();
    let mut pos = buf.len();
    loop {
        pos -= 1;
        buf[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if i < 0 {
        pos -= 1;
        buf[pos] = b'-';
    }
    &buf[pos..]
}

pub(super) fn string_of(o: &Obj) -> Result<Reply<'_>, CmdError> {
    match &o.val {
        Val::Str(b) => Ok(Reply::Bulk(b)),
        Val::Int(i) => Ok(Reply::BulkInt(*i)),
        _ => Err(WRONGTYPE.into()),
    }
}

pub(super) fn hash_ref<'a>(
    db: &'a mut SlotData,
    key: &[u8],
    now: u64,
    rec: &mut Recorder,
) -> Result<Option<&'a HashVal>, CmdError> {
    match db.lookup(key, now, rec).map(|o| &*o) {
        None => Ok(None),
        Some(Obj {
            val: Val::Hash(h), ..
        }) => Ok(Some(h)),
        Some(_) => Err(WRONGTYPE.into()),
    }
}

pub(super) fn set_ref<'a>(
    db: &'a mut SlotData,
    key: &[u8],
    now: u64,
    rec: &mut Recorder,
) -> Result<Option<&'a std::collections::HashSet<Box<[u8]>>>, CmdError> {
    match db.lookup(key, now, rec).map(|o| &*o) {
        None => Ok(None),
        Some(Obj {
            val: Val::Set(s), ..
        }) => Ok(Some(s)),
        Some(_) => Err(WRONGTYPE.into()),
    }
}

pub(super) fn stream_ref<'a>(
    db: &'a mut SlotData,
    key: &[u8],
    now: u64,
    rec: &mut Recorder,
) -> Result<Option<&'a mut Stream>, CmdError> {
    match db.lookup(key, now, rec) {
        None => Ok(None),
        Some(Obj {
            val: Val::Stream(s),
            ..
        }) => Ok(Some(s)),
        Some(_) => Err(WRONGTYPE.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string2ll_rules() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-5"), Some(-5));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1.0",
            b"9223372036854775808",
            b"abc",
        ] {
            assert_eq!(parse_i64(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn int_formatting() {
        let mut buf = [0u8; 20];
        for i in [0, 1, -1, 42, i64::MAX, i64::MIN, -1000] {
            assert_eq!(fmt_i64(i, &mut buf), i.to_string().as_bytes());
        }
    }
}
