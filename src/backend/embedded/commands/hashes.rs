//! Hash commands: `HGET`, `HSET`/`HMSET`, `HSETNX`, `HMGET`, `HGETALL`, `HINCRBY`, `HDEL`,
//! `HEXISTS`, `HLEN`.

use std::borrow::Cow;

use super::args::*;
use super::*;

pub(super) fn hget<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    Ok(
        match hash_ref(e.db, a[1], e.now, e.rec)?.and_then(|h| h.get(a[2])) {
            Some(v) => Reply::Bulk(v),
            None => Reply::Nil,
        },
    )
}

pub(super) fn hset<'a>(e: Env<'a>, a: &[&[u8]], name: &[u8]) -> CmdResult<'a> {
    if !a.len().is_multiple_of(2) {
        return Err(arity_error(name));
    }
    hash_ref(e.db, a[1], e.now, e.rec)?;
    let mut added = 0;
    for pair in a[2..].chunks_exact(2) {
        if e.db.hash_set(a[1], pair[0], pair[1], e.rec) {
            added += 1;
        }
    }
    Ok(Reply::Int(added))
}

pub(super) fn hsetnx<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    if hash_ref(e.db, a[1], e.now, e.rec)?.is_some_and(|h| h.get(a[2]).is_some()) {
        return Ok(Reply::Int(0));
    }
    e.db.hash_set(a[1], a[2], a[3], e.rec);
    Ok(Reply::Int(1))
}

pub(super) fn hmget<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let h = hash_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Array(
        a[2..]
            .iter()
            .map(|f| match h.and_then(|h| h.get(f)) {
                Some(v) => Reply::Bulk(v),
                None => Reply::Nil,
            })
            .collect(),
    ))
}

pub(super) fn hgetall<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let mut out = Vec::new();
    if let Some(h) = hash_ref(e.db, a[1], e.now, e.rec)? {
        out.reserve(h.len() * 2);
        for (f, v) in h.iter() {
            out.push(Reply::Bulk(f));
            out.push(Reply::Bulk(v));
        }
    }
    Ok(Reply::Array(out))
}

pub(super) fn hincrby<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let by = int_arg(a[3])?;
    let cur = match hash_ref(e.db, a[1], e.now, e.rec)?.and_then(|h| h.get(a[2])) {
        None => 0,
        Some(v) => parse_i64(v).ok_or(Cow::Borrowed("ERR hash value is not an integer"))?,
    };
    let new = cur.checked_add(by).ok_or(Cow::Borrowed(ERR_OVERFLOW))?;
    let mut buf = [0u8; 20];
    e.db.hash_set(a[1], a[2], fmt_i64(new, &mut buf), e.rec);
    Ok(Reply::Int(new))
}

pub(super) fn hdel<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    if hash_ref(e.db, a[1], e.now, e.rec)?.is_none() {
        return Ok(Reply::Int(0));
    }
    let mut n = 0;
    for f in &a[2..] {
        if e.db.hash_del(a[1], f, e.rec) {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

pub(super) fn hexists<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let h = hash_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(i64::from(
        h.is_some_and(|h| h.get(a[2]).is_some()),
    )))
}

pub(super) fn hlen<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let h = hash_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(h.map_or(0, |h| h.len() as i64)))
}
