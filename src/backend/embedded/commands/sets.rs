//! Set commands: `SADD`, `SREM`, `SISMEMBER`, `SCARD`, `SMEMBERS`.

use super::args::*;
use super::*;

pub(super) fn sadd<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    set_ref(e.db, a[1], e.now, e.rec)?;
    let mut n = 0;
    for m in &a[2..] {
        if e.db.set_add(a[1], m, e.rec) {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

pub(super) fn srem<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    if set_ref(e.db, a[1], e.now, e.rec)?.is_none() {
        return Ok(Reply::Int(0));
    }
    let mut n = 0;
    for m in &a[2..] {
        if e.db.set_rem(a[1], m, e.rec) {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

pub(super) fn sismember<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = set_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(i64::from(s.is_some_and(|s| s.contains(a[2])))))
}

pub(super) fn scard<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = set_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(s.map_or(0, |s| s.len() as i64)))
}

pub(super) fn smembers<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = set_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Array(
        s.into_iter().flatten().map(|m| Reply::Bulk(m)).collect(),
    ))
}
