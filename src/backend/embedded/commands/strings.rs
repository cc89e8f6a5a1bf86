//! String commands: `GET`, `SET` (with its options), `INCR`/`DECR`/`INCRBY`/`DECRBY`.

use std::borrow::Cow;

use super::super::keyspace::{StrRef, Val};
use super::args::*;
use super::*;

pub(super) fn get<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    match e.db.lookup(a[1], e.now, e.rec).map(|o| &*o) {
        None => Ok(Reply::Nil),
        Some(o) => string_of(o),
    }
}

pub(super) fn set<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    #[derive(Clone, Copy, PartialEq)]
    enum Unit {
        Ex,
        Px,
        ExAt,
        PxAt,
    }
    let (key, val) = (a[1], a[2]);
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire: Option<(Unit, &[u8])> = None;
    let mut i = 3;
    while i < a.len() {
        let o = a[i];
        let next = a.get(i + 1).copied();
        let unit = if is(o, "ex") {
            Some(Unit::Ex)
        } else if is(o, "px") {
            Some(Unit::Px)
        } else if is(o, "exat") {
            Some(Unit::ExAt)
        } else if is(o, "pxat") {
            Some(Unit::PxAt)
        } else {
            None
        };
        if is(o, "nx") && !xx {
            nx = true;
        } else if is(o, "xx") && !nx {
            xx = true;
        } else if is(o, "get") {
            get = true;
        } else if is(o, "keepttl") && expire.is_none() {
            keepttl = true;
        } else if let (Some(unit), Some(v)) = (unit, next)
            && !keepttl
            && expire.is_none()
        {
            expire = Some((unit, v));
            i += 1;
        } else {
            return Err(ERR_SYNTAX.into());
        }
        i += 1;
    }
    let bad_expire = || Cow::Borrowed("ERR invalid expire time in 'set' command");
    let expire_at = match expire {
        None => 0,
        Some((unit, v)) => {
            let n = int_arg(v)?;
            if n <= 0 {
                return Err(bad_expire());
            }
            let ms = match unit {
                Unit::Ex | Unit::ExAt => n.checked_mul(1000).ok_or_else(bad_expire)?,
                Unit::Px | Unit::PxAt => n,
            };
            let abs = match unit {
                Unit::Ex | Unit::Px => ms.checked_add(e.now as i64).ok_or_else(bad_expire)?,
                Unit::ExAt | Unit::PxAt => ms,
            };
            abs as u64
        }
    };
    let (exists, old, old_expire) = match e.db.lookup(key, e.now, e.rec).map(|o| &*o) {
        None => (false, None, 0),
        Some(o) => {
            let old = if get {
                Some(match &o.val {
                    Val::Str(b) => b.to_vec(),
                    Val::Int(i) => i.to_string().into_bytes(),
                    _ => return Err(WRONGTYPE.into()),
                })
            } else {
                None
            };
            (true, old, o.expire_at)
        }
    };
    let old_reply = |old: Option<Vec<u8>>| match old {
        Some(v) => Reply::BulkOwned(v),
        None => Reply::Nil,
    };
    if (nx && exists) || (xx && !exists) {
        return Ok(if get { old_reply(old) } else { Reply::Nil });
    }
    let expire_at = if keepttl { old_expire } else { expire_at };
    let v = match parse_i64(val) {
        Some(i) => StrRef::Int(i),
        None => StrRef::Bytes(val),
    };
    e.db.put_str(key, v, expire_at, e.rec);
    Ok(if get {
        old_reply(old)
    } else {
        Reply::Status("OK")
    })
}

pub(super) fn incr_by<'a>(e: Env<'a>, key: &[u8], by: i64) -> CmdResult<'a> {
    let (cur, expire_at) = match e.db.lookup(key, e.now, e.rec) {
        None => (0, 0),
        Some(o) => {
            let cur = match &o.val {
                Val::Int(i) => *i,
                Val::Str(b) => int_arg(b)?,
                _ => return Err(WRONGTYPE.into()),
            };
            (cur, o.expire_at)
        }
    };
    let new = cur.checked_add(by).ok_or(Cow::Borrowed(ERR_OVERFLOW))?;
    e.db.put_str(key, StrRef::Int(new), expire_at, e.rec);
    Ok(Reply::Int(new))
}
