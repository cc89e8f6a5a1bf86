//! Commands on keys of any type: `TYPE`, `DEL`, `EXISTS`, `EXPIRE`/`PEXPIRE`,
//! `TTL`/`PTTL`, `PERSIST`.

use std::borrow::Cow;

use super::super::keyspace::Val;
use super::args::*;
use super::*;

pub(super) fn type_<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    Ok(Reply::Status(
        match e.db.lookup(a[1], e.now, e.rec).map(|o| &o.val) {
            None => "none",
            Some(Val::Str(_) | Val::Int(_)) => "string",
            Some(Val::Hash(_)) => "hash",
            Some(Val::Set(_)) => "set",
            Some(Val::Stream(_)) => "stream",
        },
    ))
}

pub(super) fn del<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    for k in &a[1..] {
        e.local(k)?;
    }
    let mut n = 0;
    for k in &a[1..] {
        if e.db.lookup(k, e.now, e.rec).is_some() && e.db.delete(k, e.rec) {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

pub(super) fn exists<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    for k in &a[1..] {
        e.local(k)?;
    }
    let mut n = 0;
    for k in &a[1..] {
        if e.db.lookup(k, e.now, e.rec).is_some() {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

pub(super) fn expire<'a>(e: Env<'a>, a: &[&[u8]], seconds: bool) -> CmdResult<'a> {
    let name = if seconds { "expire" } else { "pexpire" };
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in &a[3..] {
        if is(o, "nx") {
            nx = true;
        } else if is(o, "xx") {
            xx = true;
        } else if is(o, "gt") {
            gt = true;
        } else if is(o, "lt") {
            lt = true;
        } else {
            return Err(format!("ERR Unsupported option {}", String::from_utf8_lossy(o)).into());
        }
    }
    if nx && (xx || gt || lt) {
        return Err("ERR NX and XX, GT or LT options at the same time are not compatible".into());
    }
    if gt && lt {
        return Err("ERR GT and LT options at the same time are not compatible".into());
    }
    let when = int_arg(a[2])?;
    let bad = || Cow::Owned(format!("ERR invalid expire time in '{name}' command"));
    let when = if seconds {
        when.checked_mul(1000).ok_or_else(bad)?
    } else {
        when
    };
    let at = when.checked_add(e.now as i64).ok_or_else(bad)?;
    let key = a[1];
    let Some(cur) = e.db.lookup(key, e.now, e.rec).map(|o| o.expire_at) else {
        return Ok(Reply::Int(0));
    };
    // cur == 0: no expiry, i.e. an infinite TTL for GT/LT.
    let refused = (nx && cur != 0)
        || (xx && cur == 0)
        || (gt && (cur == 0 || at <= cur as i64))
        || (lt && cur != 0 && at >= cur as i64);
    if refused {
        return Ok(Reply::Int(0));
    }
    if at <= e.now as i64 {
        e.db.delete(key, e.rec);
    } else {
        e.db.set_expire(key, at as u64, e.rec);
    }
    Ok(Reply::Int(1))
}

pub(super) fn ttl<'a>(e: Env<'a>, a: &[&[u8]], ms: bool) -> CmdResult<'a> {
    Ok(Reply::Int(match e.db.lookup(a[1], e.now, e.rec) {
        None => -2,
        Some(o) if o.expire_at == 0 => -1,
        Some(o) => {
            let left = (o.expire_at as i64 - e.now as i64).max(0);
            if ms { left } else { (left + 500) / 1000 }
        }
    }))
}

pub(super) fn persist<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    match e.db.lookup(a[1], e.now, e.rec) {
        Some(o) if o.expire_at != 0 => {
            e.db.set_expire(a[1], 0, e.rec);
            Ok(Reply::Int(1))
        }
        _ => Ok(Reply::Int(0)),
    }
}
