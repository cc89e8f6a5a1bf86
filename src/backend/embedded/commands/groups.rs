//! Consumer group commands: `XACK`, `XGROUP`, `XREADGROUP`, `XAUTOCLAIM`, `XPENDING`.

use std::borrow::Cow;

use super::super::keyspace::{Nack, Stream, StreamId};
use super::args::*;
use super::streams::*;
use super::*;

pub(super) fn xack<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let (key, group) = (a[1], a[2]);
    let Some(s) = stream_ref(e.db, key, e.now, e.rec)? else {
        return Ok(Reply::Int(0));
    };
    if !s.groups.contains_key(group) {
        return Ok(Reply::Int(0));
    }
    let ids = a[3..]
        .iter()
        .map(|b| id_arg(b))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Reply::Int(
        ids.into_iter()
            .filter(|id| s.pel_del(key, group, *id, e.rec))
            .count() as i64,
    ))
}

/// `XGROUP` with too few arguments to name a key.
pub(super) fn xgroup_nokey<'a>(a: &[&[u8]]) -> CmdResult<'a> {
    match a.get(1) {
        Some(sub) if is(sub, "help") => Ok(Reply::Array(vec![Reply::Status(
            "XGROUP <subcommand> [<arg> [value] [opt] ...]",
        )])),
        Some(sub) => Err(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try XGROUP HELP.",
            String::from_utf8_lossy(sub)
        )
        .into()),
        None => Err(arity_error(b"xgroup")),
    }
}

pub(super) fn xgroup<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let sub = a[1];
    let wrong = || {
        Cow::Owned(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try XGROUP HELP.",
            String::from_utf8_lossy(sub)
        ))
    };
    let (key, group) = match (a.get(2), a.get(3)) {
        (Some(k), Some(g)) => (*k, *g),
        _ => return Err(wrong()),
    };
    let create = is(sub, "create");
    let setid = is(sub, "setid");
    let mut mkstream = false;
    if create || setid {
        if a.len() < 5 {
            return Err(wrong());
        }
        let mut j = 5;
        while j < a.len() {
            if create && is(a[j], "mkstream") {
                mkstream = true;
                j += 1;
            } else if is(a[j], "entriesread") && j + 1 < a.len() {
                int_arg(a[j + 1])?;
                j += 2;
            } else {
                return Err(ERR_SYNTAX.into());
            }
        }
    } else if is(sub, "destroy") {
        if a.len() != 4 {
            return Err(wrong());
        }
    } else if is(sub, "createconsumer") || is(sub, "delconsumer") {
        if a.len() != 5 {
            return Err(wrong());
        }
    } else {
        return Err(wrong());
    }

    let info =
        stream_ref(e.db, key, e.now, e.rec)?.map(|s| (s.last_id, s.groups.contains_key(group)));
    let Some((last_id, has_group)) = info.or(if create && mkstream {
        Some((StreamId::MIN, false))
    } else {
        None
    }) else {
        return Err(ERR_XGROUP_NOKEY.into());
    };
    let parse_target = |b: &[u8]| {
        if b == b"$" { Ok(last_id) } else { id_arg(b) }
    };
    let nogroup = || {
        Cow::Owned(format!(
            "NOGROUP No such consumer group '{}' for key name '{}'",
            String::from_utf8_lossy(group),
            String::from_utf8_lossy(key)
        ))
    };
    if create {
        let id = parse_target(a[4])?;
        if has_group {
            return Err("BUSYGROUP Consumer Group name already exists".into());
        }
        e.db.stream_create(key, e.rec);
        if let Some(s) = e.db.stream_mut(key) {
            s.group_create(key, group, id, e.rec);
        }
        return Ok(Reply::Status("OK"));
    }
    let Some(s) = e.db.stream_mut(key) else {
        return Err(ERR_XGROUP_NOKEY.into());
    };
    if is(sub, "destroy") {
        return Ok(Reply::Int(i64::from(s.group_destroy(key, group, e.rec))));
    }
    if !has_group {
        return Err(nogroup());
    }
    if setid {
        let id = parse_target(a[4])?;
        s.group_set_id(key, group, id, e.rec);
        Ok(Reply::Status("OK"))
    } else if is(sub, "createconsumer") {
        Ok(Reply::Int(i64::from(
            s.consumer_create(key, group, a[4], e.rec),
        )))
    } else {
        Ok(Reply::Int(s.consumer_del(key, group, a[4], e.rec) as i64))
    }
}

pub(super) fn xreadgroup<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let mut group: Option<(&[u8], &[u8])> = None;
    let mut count = 0usize; // 0 = no limit
    let mut noack = false;
    let mut streams_at = None;
    let mut i = 1;
    while i < a.len() {
        let o = a[i];
        let more = a.len() - 1 - i;
        if is(o, "block") && more >= 1 {
            let t = parse_i64(a[i + 1]).ok_or(Cow::Borrowed(
                "ERR timeout is not an integer or out of range",
            ))?;
            if t < 0 {
                return Err("ERR timeout is negative".into());
            }
            i += 2;
        } else if is(o, "count") && more >= 1 {
            count = int_arg(a[i + 1])?.max(0) as usize;
            i += 2;
        } else if is(o, "streams") && more >= 1 {
            if !(a.len() - (i + 1)).is_multiple_of(2) {
                return Err("ERR Unbalanced 'xreadgroup' list of streams: for each stream key an ID or '>' must be specified.".into());
            }
            streams_at = Some(i + 1);
            break;
        } else if is(o, "group") && more >= 2 {
            group = Some((a[i + 1], a[i + 2]));
            i += 3;
        } else if is(o, "noack") {
            noack = true;
            i += 1;
        } else {
            return Err(ERR_SYNTAX.into());
        }
    }
    let Some(streams_at) = streams_at else {
        return Err(ERR_SYNTAX.into());
    };
    let Some((gname, consumer)) = group else {
        return Err("ERR Missing GROUP option for XREADGROUP".into());
    };
    let n = (a.len() - streams_at) / 2;
    let (keys, ids) = a[streams_at..].split_at(n);
    for k in keys {
        e.local(k)?;
    }
    // Validate every stream before serving any (errors change nothing). `None` = '>'.
    let mut starts: Vec<Option<StreamId>> = Vec::with_capacity(n);
    for (key, id) in keys.iter().zip(ids) {
        let ok = stream_ref(e.db, key, e.now, e.rec)?.is_some_and(|s| s.groups.contains_key(gname));
        if !ok {
            return Err(format!(
                "NOGROUP No such key '{}' or consumer group '{}' in XREADGROUP with GROUP option",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(gname)
            )
            .into());
        }
        starts.push(match *id {
            b">" => None,
            b"$" => return Err("ERR The $ ID is meaningless in the context of XREADGROUP: you want to read the history of this consumer by specifying a proper ID, or use the > ID to get new messages. The $ ID would just return an empty result set.".into()),
            id => Some(id_arg(id)?),
        });
    }
    let limit = if count == 0 { usize::MAX } else { count };
    let mut out = Vec::new();
    for (key, start) in keys.iter().zip(starts) {
        let Some(s) = e.db.stream_mut(key) else {
            continue;
        };
        let Some(last_delivered) = s.groups.get(gname).map(|g| g.last_id) else {
            continue;
        };
        let serve = match start {
            Some(_) => true,
            None => s
                .entries
                .last_key_value()
                .is_some_and(|(id, _)| *id > last_delivered),
        };
        s.consumer_create(key, gname, consumer, e.rec);
        if !serve {
            continue;
        }
        let mut entries = Vec::new();
        match start {
            Some(after) => {
                // This consumer's pending history, ids above `after`.
                let pending: Vec<StreamId> = match (s.groups.get(gname), after.incr()) {
                    (Some(g), Some(from)) => g
                        .consumers
                        .get(consumer)
                        .map(|ids| ids.range(from..).take(limit).copied().collect())
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                for id in pending {
                    let count = s
                        .groups
                        .get(gname)
                        .and_then(|g| g.pel.get(&id))
                        .map_or(0, |n| n.count);
                    match s.entries.get(&id) {
                        Some(fields) => {
                            entries.push(entry_reply_owned(id, fields));
                            let nack = Nack {
                                consumer: consumer.into(),
                                delivery_ms: e.now,
                                count: count + 1,
                            };
                            s.pel_set(key, gname, id, nack, e.rec);
                        }
                        None => entries.push(Reply::Array(vec![id_reply(id), Reply::NilArray])),
                    }
                }
            }
            None => {
                let new: Vec<StreamId> = match last_delivered.incr() {
                    Some(from) => s
                        .entries
                        .range(from..)
                        .take(limit)
                        .map(|(id, _)| *id)
                        .collect(),
                    None => Vec::new(),
                };
                for &id in &new {
                    if let Some(fields) = s.entries.get(&id) {
                        entries.push(entry_reply_owned(id, fields));
                    }
                    if !noack {
                        let nack = Nack {
                            consumer: consumer.into(),
                            delivery_ms: e.now,
                            count: 1,
                        };
                        s.pel_set(key, gname, id, nack, e.rec);
                    }
                }
                if let Some(&last) = new.last() {
                    s.group_set_id(key, gname, last, e.rec);
                }
            }
        }
        out.push(Reply::Array(vec![
            Reply::BulkOwned(key.to_vec()),
            Reply::Array(entries),
        ]));
    }
    Ok(if out.is_empty() {
        Reply::NilArray
    } else {
        Reply::Array(out)
    })
}

pub(super) fn xautoclaim<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let (key, gname, consumer) = (a[1], a[2], a[3]);
    let min_idle = parse_i64(a[4])
        .ok_or(Cow::Borrowed(
            "ERR Invalid min-idle-time argument for XAUTOCLAIM",
        ))?
        .max(0);
    let start = range_start(a[5])?;
    let mut count: u64 = 100;
    let mut justid = false;
    let mut j = 6;
    while j < a.len() {
        if is(a[j], "count") && j + 1 < a.len() {
            count = match parse_i64(a[j + 1]) {
                Some(n) if (1..=i64::MAX / 10).contains(&n) => n as u64,
                _ => return Err("ERR COUNT must be > 0".into()),
            };
            j += 2;
        } else if is(a[j], "justid") {
            justid = true;
            j += 1;
        } else {
            return Err(ERR_SYNTAX.into());
        }
    }
    let nogroup = || {
        Cow::Owned(format!(
            "NOGROUP No such key '{}' or consumer group '{}'",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(gname)
        ))
    };
    let Some(s) = stream_ref(e.db, key, e.now, e.rec)? else {
        return Err(nogroup());
    };
    let Some(g) = s.groups.get(gname) else {
        return Err(nogroup());
    };
    let mut attempts = count.saturating_mul(10);
    // The PEL entries the scan may examine, plus one for the next cursor.
    let scan: Vec<StreamId> = g
        .pel
        .range(start..)
        .take(usize::try_from(attempts.saturating_add(1)).unwrap_or(usize::MAX))
        .map(|(id, _)| *id)
        .collect();
    let mut examined = 0;
    let mut claimed = Vec::new();
    let mut deleted = Vec::new();
    for &id in &scan {
        if attempts == 0 || count == 0 {
            break;
        }
        attempts -= 1;
        examined += 1;
        if !s.entries.contains_key(&id) {
            s.pel_del(key, gname, id, e.rec);
            deleted.push(id_reply(id));
            count -= 1;
            continue;
        }
        let Some(old) = s.groups.get(gname).and_then(|g| g.pel.get(&id)) else {
            continue;
        };
        if min_idle > 0 && (e.now as i64).saturating_sub(old.delivery_ms as i64) < min_idle {
            continue;
        }
        let nack = Nack {
            consumer: consumer.into(),
            delivery_ms: e.now,
            count: old.count + u64::from(!justid),
        };
        s.consumer_create(key, gname, consumer, e.rec);
        s.pel_set(key, gname, id, nack, e.rec);
        claimed.push(id);
        count -= 1;
    }
    let next = scan.get(examined).copied().unwrap_or(StreamId::MIN);
    let s: &'a Stream = s;
    let entries = claimed
        .into_iter()
        .map(|id| match (justid, s.entries.get(&id)) {
            (false, Some(fields)) => entry_reply(id, fields),
            _ => id_reply(id),
        })
        .collect();
    Ok(Reply::Array(vec![
        id_reply(next),
        Reply::Array(entries),
        Reply::Array(deleted),
    ]))
}

pub(super) fn xpending<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let (key, gname) = (a[1], a[2]);
    let summary = a.len() == 3;
    if !summary && (a.len() < 6 || a.len() > 9) {
        return Err(ERR_SYNTAX.into());
    }
    let mut min_idle = 0i64;
    let mut range = (StreamId::MIN, StreamId::MAX, 0usize, None::<&[u8]>);
    if !summary {
        let mut at = 3;
        if is(a[3], "idle") {
            min_idle = int_arg(a[4])?;
            if a.len() < 8 {
                return Err(ERR_SYNTAX.into());
            }
            at += 2;
        }
        let count = int_arg(a[at + 2])?.max(0) as usize;
        let start = range_start(a[at])?;
        let end = range_end(a[at + 1])?;
        range = (start, end, count, a.get(at + 3).copied());
    }
    let Some(s) = stream_ref(e.db, key, e.now, e.rec)? else {
        return Err(format!(
            "NOGROUP No such key '{}' or consumer group '{}'",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(gname)
        )
        .into());
    };
    let s: &'a Stream = s;
    let Some(g) = s.groups.get(gname) else {
        return Err(format!(
            "NOGROUP No such key '{}' or consumer group '{}'",
            String::from_utf8_lossy(key),
            String::from_utf8_lossy(gname)
        )
        .into());
    };
    if summary {
        let (Some((first, _)), Some((last, _))) = (g.pel.first_key_value(), g.pel.last_key_value())
        else {
            return Ok(Reply::Array(vec![
                Reply::Int(0),
                Reply::Nil,
                Reply::Nil,
                Reply::NilArray,
            ]));
        };
        let consumers = g
            .consumers
            .iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(name, ids)| {
                Reply::Array(vec![Reply::Bulk(name), Reply::BulkInt(ids.len() as i64)])
            })
            .collect();
        return Ok(Reply::Array(vec![
            Reply::Int(g.pel.len() as i64),
            id_reply(*first),
            id_reply(*last),
            Reply::Array(consumers),
        ]));
    }
    let (start, end, count, consumer) = range;
    let ids: Box<dyn Iterator<Item = StreamId>> = match consumer {
        Some(c) => match g.consumers.get(c) {
            Some(ids) if start <= end => Box::new(ids.range(start..=end).copied()),
            _ => return Ok(Reply::Array(Vec::new())),
        },
        None if start <= end => Box::new(g.pel.range(start..=end).map(|(id, _)| *id)),
        None => return Ok(Reply::Array(Vec::new())),
    };
    let mut out = Vec::new();
    for id in ids {
        if out.len() >= count {
            break;
        }
        let Some(n) = g.pel.get(&id) else { continue };
        let idle = (e.now as i64 - n.delivery_ms as i64).max(0);
        if min_idle > 0 && idle < min_idle {
            continue;
        }
        out.push(Reply::Array(vec![
            id_reply(id),
            Reply::Bulk(&n.consumer),
            Reply::Int(idle),
            Reply::Int(n.count as i64),
        ]));
    }
    Ok(Reply::Array(out))
}
