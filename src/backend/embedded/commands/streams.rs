//! Stream commands without consumer groups (`XADD`, `XLEN`, `XRANGE`, `XDEL`), and the
//! stream id arguments and entry replies the group commands share.

use std::borrow::Cow;

use super::super::keyspace::{Entry, Stream, StreamId};
use super::args::*;
use super::*;

/// Parses a stream id: `-`/`+` (unless strict), `<ms>` (seq = `missing_seq`) or
/// `<ms>-<seq>`.
pub(super) fn parse_id(b: &[u8], missing_seq: u64, strict: bool) -> Option<StreamId> {
    if b.len() > 127 {
        return None;
    }
    match b {
        b"-" if !strict => return Some(StreamId::MIN),
        b"+" if !strict => return Some(StreamId::MAX),
        _ => {}
    }
    match b.iter().position(|&c| c == b'-') {
        Some(dash) => Some(StreamId::new(
            parse_u64(&b[..dash])?,
            parse_u64(&b[dash + 1..])?,
        )),
        None => Some(StreamId::new(parse_u64(b)?, missing_seq)),
    }
}

pub(super) fn id_arg(b: &[u8]) -> Result<StreamId, CmdError> {
    parse_id(b, 0, true).ok_or(Cow::Borrowed(ERR_BAD_ID))
}

/// A range bound: `(` prefix = exclusive (then strict), else `-`, `+` or an id.
pub(super) fn range_id(b: &[u8], missing_seq: u64) -> Result<(StreamId, bool), CmdError> {
    if b.len() > 1 && b[0] == b'(' {
        let id = parse_id(&b[1..], missing_seq, true).ok_or(Cow::Borrowed(ERR_BAD_ID))?;
        Ok((id, true))
    } else {
        let id = parse_id(b, missing_seq, false).ok_or(Cow::Borrowed(ERR_BAD_ID))?;
        Ok((id, false))
    }
}

pub(super) fn range_start(b: &[u8]) -> Result<StreamId, CmdError> {
    match range_id(b, 0)? {
        (id, false) => Ok(id),
        (id, true) => id
            .incr()
            .ok_or(Cow::Borrowed("ERR invalid start ID for the interval")),
    }
}

pub(super) fn range_end(b: &[u8]) -> Result<StreamId, CmdError> {
    match range_id(b, u64::MAX)? {
        (id, false) => Ok(id),
        (id, true) => id
            .decr()
            .ok_or(Cow::Borrowed("ERR invalid end ID for the interval")),
    }
}

pub(super) fn id_reply<'a>(id: StreamId) -> Reply<'a> {
    Reply::BulkOwned(id.to_bytes())
}

/// `[id, [field, value, ...]]`, borrowing the fields.
pub(super) fn entry_reply(id: StreamId, entry: &Entry) -> Reply<'_> {
    Reply::Array(vec![
        id_reply(id),
        Reply::Array(entry.iter().map(Reply::Bulk).collect()),
    ])
}

/// `[id, [field, value, ...]]`, copying the fields (for replies built while mutating).
pub(super) fn entry_reply_owned<'a>(id: StreamId, entry: &Entry) -> Reply<'a> {
    Reply::Array(vec![
        id_reply(id),
        Reply::Array(entry.iter().map(|f| Reply::BulkOwned(f.to_vec())).collect()),
    ])
}

pub(super) fn xadd<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    enum IdSpec {
        Auto,
        AutoSeq(u64),
        Exact(StreamId),
    }
    enum Trim {
        MaxLen(u64),
        MinId(StreamId),
    }
    let key = a[1];
    let mut nomkstream = false;
    let mut trim: Option<(Trim, usize)> = None;
    let mut i = 2;
    let spec = loop {
        let Some(&o) = a.get(i) else {
            return Err(arity_error(b"xadd"));
        };
        let more = a.len() - 1 - i;
        if o == b"*" {
            break IdSpec::Auto;
        } else if is(o, "nomkstream") {
            nomkstream = true;
            i += 1;
        } else if (is(o, "maxlen") || is(o, "minid")) && more >= 1 {
            let maxlen = is(o, "maxlen");
            i += 1;
            let mut approx = false;
            if (a[i] == b"~" || a[i] == b"=") && more >= 2 {
                approx = a[i] == b"~";
                i += 1;
            }
            let t = if maxlen {
                let n = int_arg(a[i])?;
                if n < 0 {
                    return Err("ERR The MAXLEN argument must be >= 0.".into());
                }
                Trim::MaxLen(n as u64)
            } else {
                Trim::MinId(id_arg(a[i])?)
            };
            i += 1;
            let mut limit = 0usize;
            if a.get(i).is_some_and(|o| is(o, "limit")) && a.len() - 1 - i >= 1 {
                let n = int_arg(a[i + 1])?;
                if n < 0 {
                    return Err("ERR The LIMIT argument must be >= 0.".into());
                }
                if !approx {
                    return Err(
                        "ERR syntax error, LIMIT cannot be used without the special ~ option"
                            .into(),
                    );
                }
                limit = n as usize;
                i += 2;
            }
            trim = Some((t, limit));
        } else {
            let (ms, seq) = match o.strip_suffix(b"-*") {
                Some(ms) => (ms, None),
                None => (o, Some(())),
            };
            break match seq {
                None => IdSpec::AutoSeq(parse_u64(ms).ok_or(Cow::Borrowed(ERR_BAD_ID))?),
                Some(()) => IdSpec::Exact(id_arg(o)?),
            };
        }
    };
    let fields = &a[i + 1..];
    if fields.is_empty() || !fields.len().is_multiple_of(2) {
        return Err(arity_error(b"xadd"));
    }
    if matches!(spec, IdSpec::Exact(StreamId::MIN)) {
        return Err("ERR The ID specified in XADD must be greater than 0-0".into());
    }
    let exists = stream_ref(e.db, key, e.now, e.rec)?.is_some();
    if !exists {
        if nomkstream {
            return Ok(Reply::Nil);
        }
        e.db.stream_create(key, e.rec);
    }
    let Some(s) = e.db.stream_mut(key) else {
        return Err("ERR internal: stream missing".into());
    };
    let last = s.last_id;
    if last == StreamId::MAX {
        return Err(
            "ERR The stream has exhausted the last possible ID, unable to add more items".into(),
        );
    }
    let id = match spec {
        IdSpec::Auto => {
            if e.now > last.ms {
                Some(StreamId::new(e.now, 0))
            } else {
                last.incr()
            }
        }
        IdSpec::AutoSeq(ms) if ms == last.ms => {
            last.seq.checked_add(1).map(|s| StreamId::new(ms, s))
        }
        IdSpec::AutoSeq(ms) => Some(StreamId::new(ms, 0)),
        IdSpec::Exact(id) => Some(id),
    };
    let id = match id {
        Some(id) if id > last => id,
        _ => {
            return Err(
                "ERR The ID specified in XADD is equal or smaller than the target stream top item"
                    .into(),
            );
        }
    };
    s.add(key, id, fields, e.rec);
    if let Some((t, limit)) = trim {
        let mut removed = 0usize;
        while limit == 0 || removed < limit {
            let Some((&first, _)) = s.entries.first_key_value() else {
                break;
            };
            let excess = match t {
                Trim::MaxLen(n) => s.entries.len() as u64 > n,
                Trim::MinId(min) => first < min,
            };
            if !excess {
                break;
            }
            s.del(key, first, e.rec);
            removed += 1;
        }
    }
    Ok(id_reply(id))
}

pub(super) fn xlen<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = stream_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(s.map_or(0, |s| s.entries.len() as i64)))
}

pub(super) fn xrange<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    range(e, a, false)
}

/// `XREVRANGE key end start [COUNT n]`: newest first.
pub(super) fn xrevrange<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    range(e, a, true)
}

fn range<'a>(e: Env<'a>, a: &[&[u8]], rev: bool) -> CmdResult<'a> {
    let (first, second) = if rev { (a[3], a[2]) } else { (a[2], a[3]) };
    let start = range_start(first)?;
    let end = range_end(second)?;
    let mut count: Option<usize> = None;
    let mut j = 4;
    while j < a.len() {
        if is(a[j], "count") && j + 1 < a.len() {
            count = Some(int_arg(a[j + 1])?.max(0) as usize);
            j += 2;
        } else {
            return Err(ERR_SYNTAX.into());
        }
    }
    let Some(s) = stream_ref(e.db, a[1], e.now, e.rec)? else {
        return Ok(Reply::Array(Vec::new()));
    };
    if count == Some(0) {
        return Ok(Reply::NilArray);
    }
    if start > end {
        return Ok(Reply::Array(Vec::new()));
    }
    let s: &'a Stream = s;
    let take = count.unwrap_or(usize::MAX);
    let entries = s.entries.range(start..=end);
    let reply = |(id, f): (&StreamId, &'a Entry)| entry_reply(*id, f);
    Ok(Reply::Array(if rev {
        entries.rev().take(take).map(reply).collect()
    } else {
        entries.take(take).map(reply).collect()
    }))
}

pub(super) fn xdel<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let key = a[1];
    if stream_ref(e.db, key, e.now, e.rec)?.is_none() {
        return Ok(Reply::Int(0));
    }
    let ids = a[2..]
        .iter()
        .map(|b| id_arg(b))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(s) = e.db.stream_mut(key) else {
        return Ok(Reply::Int(0));
    };
    Ok(Reply::Int(
        ids.into_iter().filter(|id| s.del(key, *id, e.rec)).count() as i64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_parsing() {
        assert_eq!(parse_id(b"5", 0, true), Some(StreamId::new(5, 0)));
        assert_eq!(
            parse_id(b"5", u64::MAX, false),
            Some(StreamId::new(5, u64::MAX))
        );
        assert_eq!(parse_id(b"5-3", 0, true), Some(StreamId::new(5, 3)));
        assert_eq!(parse_id(b"-", 0, false), Some(StreamId::MIN));
        assert_eq!(parse_id(b"-", 0, true), None);
        assert_eq!(parse_id(b"+", 0, false), Some(StreamId::MAX));
        assert_eq!(parse_id(b"a-1", 0, false), None);
        assert_eq!(parse_id(b"1-", 0, false), None);
        assert_eq!(range_start(b"(5-1").unwrap(), StreamId::new(5, 2));
        assert_eq!(range_end(b"(5-0").unwrap(), StreamId::new(4, u64::MAX));
        assert!(range_end(b"(0-0").is_err());
    }
}
