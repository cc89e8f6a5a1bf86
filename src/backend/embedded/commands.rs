//! The `redis.call` command subset of the embedded backend, with Redis's semantics, reply
//! types and error texts.
//!
//! Invariant kept here: a command either fails before changing anything (argument and type
//! errors, like Redis) or makes all its changes through the recording primitives of
//! `keyspace.rs`; and it only touches keys of the one slot the running script holds.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{ArcMutexGuard, RawMutex};

use super::keyspace::{
    Entry, HashVal, Keyspace, Nack, Obj, Recorder, SlotData, StrRef, Stream, StreamId, Val,
};
use super::slot::key_slot;

/// An error reply, full text (`CODE message`).
pub type CmdError = Cow<'static, str>;
pub type CmdResult<'a> = Result<Reply<'a>, CmdError>;

pub const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const ERR_NOT_INT: &str = "ERR value is not an integer or out of range";
const ERR_SYNTAX: &str = "ERR syntax error";
const ERR_OVERFLOW: &str = "ERR increment or decrement would overflow";
const ERR_BAD_ID: &str = "ERR Invalid stream ID specified as stream command argument";
const ERR_NONLOCAL: &str =
    "ERR Script attempted to access a non local key in a cluster node script";
const ERR_XGROUP_NOKEY: &str = "ERR The XGROUP subcommand requires the key to exist. Note that for CREATE you may want to use the MKSTREAM option to create an empty stream automatically.";

/// A command reply (RESP2 shapes), borrowing from the keyspace where it can.
#[derive(Debug, PartialEq)]
pub enum Reply<'a> {
    /// Nil bulk string.
    Nil,
    /// Null array (e.g. `XREADGROUP` with nothing to read).
    NilArray,
    Int(i64),
    Bulk(&'a [u8]),
    BulkOwned(Vec<u8>),
    /// A bulk string holding an integer (int-encoded strings).
    BulkInt(i64),
    Status(&'static str),
    Array(Vec<Reply<'a>>),
}

/// What a running script's commands act on: the slot it holds (locked lazily by the first
/// key for scripts declared with no keys), the effects recorder, and the script's clock.
pub struct CallCtx {
    keyspace: Arc<Keyspace>,
    pub slot: Option<u16>,
    pub guard: Option<ArcMutexGuard<RawMutex, SlotData>>,
    pub rec: Recorder,
    /// Wall-clock ms at script start: Redis freezes time for expiry checks during a script.
    pub now: u64,
}

impl CallCtx {
    /// `record`: encode effects (only when there is a log to append them to).
    pub fn new(keyspace: Arc<Keyspace>, record: bool) -> Self {
        CallCtx {
            keyspace,
            slot: None,
            guard: None,
            rec: Recorder::new(record),
            now: 0,
        }
    }

    /// The slot data for a command whose first key is `key`, locking the slot if the script
    /// holds none yet; a key of another slot is refused, as Redis Cluster refuses it.
    fn env(&mut self, key: &[u8]) -> Result<Env<'_>, CmdError> {
        let ks = key_slot(key);
        match self.slot {
            Some(s) if s != ks => return Err(ERR_NONLOCAL.into()),
            Some(_) => {}
            None => {
                self.guard = Some(self.keyspace.slot(ks).lock_arc());
                self.slot = Some(ks);
            }
        }
        let db = self
            .guard
            .as_deref_mut()
            .ok_or(Cow::Borrowed("ERR internal: no slot held"))?;
        Ok(Env {
            db,
            rec: &mut self.rec,
            now: self.now,
            slot: ks,
        })
    }
}

/// One command's view: the slot data, the recorder and the script clock.
struct Env<'a> {
    db: &'a mut SlotData,
    rec: &'a mut Recorder,
    now: u64,
    slot: u16,
}

impl Env<'_> {
    /// Checks a further key of a multi-key command is in this slot.
    fn local(&self, key: &[u8]) -> Result<(), CmdError> {
        if key_slot(key) == self.slot {
            Ok(())
        } else {
            Err(ERR_NONLOCAL.into())
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmd {
    Ping,
    Time,
    Type,
    Get,
    Set,
    Del,
    Exists,
    Incr,
    Decr,
    IncrBy,
    DecrBy,
    Expire,
    PExpire,
    Ttl,
    PTtl,
    Persist,
    HGet,
    HSet,
    HSetNx,
    HMGet,
    HGetAll,
    HIncrBy,
    HDel,
    HExists,
    HLen,
    SAdd,
    SRem,
    SIsMember,
    SCard,
    SMembers,
    XAdd,
    XLen,
    XRange,
    XDel,
    XAck,
    XGroup,
    XReadGroup,
    XAutoClaim,
    XPending,
}

/// Command by lower-case name, with Redis's arity (n = exactly n, -n = at least n).
fn lookup_cmd(lower: &[u8]) -> Option<(Cmd, i32)> {
    Some(match lower {
        b"ping" => (Cmd::Ping, -1),
        b"time" => (Cmd::Time, 1),
        b"type" => (Cmd::Type, 2),
        b"get" => (Cmd::Get, 2),
        b"set" => (Cmd::Set, -3),
        b"del" => (Cmd::Del, -2),
        b"exists" => (Cmd::Exists, -2),
        b"incr" => (Cmd::Incr, 2),
        b"decr" => (Cmd::Decr, 2),
        b"incrby" => (Cmd::IncrBy, 3),
        b"decrby" => (Cmd::DecrBy, 3),
        b"expire" => (Cmd::Expire, -3),
        b"pexpire" => (Cmd::PExpire, -3),
        b"ttl" => (Cmd::Ttl, 2),
        b"pttl" => (Cmd::PTtl, 2),
        b"persist" => (Cmd::Persist, 2),
        b"hget" => (Cmd::HGet, 3),
        b"hset" => (Cmd::HSet, -4),
        b"hsetnx" => (Cmd::HSetNx, 4),
        b"hmget" => (Cmd::HMGet, -3),
        b"hgetall" => (Cmd::HGetAll, 2),
        b"hincrby" => (Cmd::HIncrBy, 4),
        b"hdel" => (Cmd::HDel, -3),
        b"hexists" => (Cmd::HExists, 3),
        b"hlen" => (Cmd::HLen, 2),
        b"sadd" => (Cmd::SAdd, -3),
        b"srem" => (Cmd::SRem, -3),
        b"sismember" => (Cmd::SIsMember, 3),
        b"scard" => (Cmd::SCard, 2),
        b"smembers" => (Cmd::SMembers, 2),
        b"xadd" => (Cmd::XAdd, -5),
        b"xlen" => (Cmd::XLen, 2),
        b"xrange" => (Cmd::XRange, -4),
        b"xdel" => (Cmd::XDel, -3),
        b"xack" => (Cmd::XAck, -4),
        b"xgroup" => (Cmd::XGroup, -2),
        b"xreadgroup" => (Cmd::XReadGroup, -7),
        b"xautoclaim" => (Cmd::XAutoClaim, -6),
        b"xpending" => (Cmd::XPending, -3),
        _ => return None,
    })
}

fn arity_error(name: &[u8]) -> CmdError {
    format!(
        "ERR wrong number of arguments for '{}' command",
        String::from_utf8_lossy(name).to_lowercase()
    )
    .into()
}

fn unknown_command(args: &[&[u8]]) -> CmdError {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&args[0][..args[0].len().min(128)])
    );
    for a in args[1..].iter().take(8) {
        msg.push('\'');
        msg.push_str(&String::from_utf8_lossy(&a[..a.len().min(128)]));
        msg.push_str("' ");
    }
    msg.into()
}

/// Runs one `redis.call`. `args[0]` is the command name; `args` is non-empty.
pub fn call<'a>(cx: &'a mut CallCtx, args: &[&[u8]]) -> CmdResult<'a> {
    let Some(name) = args.first() else {
        return Err("ERR Please specify at least one argument for this redis lib call".into());
    };
    let mut lower = [0u8; 16];
    if name.len() > lower.len() {
        return Err(unknown_command(args));
    }
    for (d, s) in lower.iter_mut().zip(name.iter()) {
        *d = s.to_ascii_lowercase();
    }
    let Some((cmd, arity)) = lookup_cmd(&lower[..name.len()]) else {
        return Err(unknown_command(args));
    };
    let n = args.len() as i32;
    if (arity > 0 && n != arity) || (arity < 0 && n < -arity) {
        return Err(arity_error(name));
    }
    match cmd {
        Cmd::Ping => {
            return Ok(match args.get(1) {
                Some(m) if args.len() == 2 => Reply::BulkOwned(m.to_vec()),
                Some(_) => return Err(arity_error(name)),
                None => Reply::Status("PONG"),
            });
        }
        Cmd::Time => {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            return Ok(Reply::Array(vec![
                Reply::BulkOwned(t.as_secs().to_string().into_bytes()),
                Reply::BulkOwned(t.subsec_micros().to_string().into_bytes()),
            ]));
        }
        _ => {}
    }
    let first = match cmd {
        Cmd::XGroup => args.get(2),
        Cmd::XReadGroup => args
            .iter()
            .position(|a| a.eq_ignore_ascii_case(b"streams"))
            .and_then(|i| args.get(i + 1)),
        _ => args.get(1),
    };
    let e = match first {
        Some(k) => cx.env(k)?,
        // No key where one is needed: let the command report its own syntax error.
        None if cmd == Cmd::XGroup => return xgroup_nokey(args),
        None => return Err(ERR_SYNTAX.into()),
    };
    match cmd {
        Cmd::Ping | Cmd::Time => Err(ERR_SYNTAX.into()),
        Cmd::Type => type_(e, args),
        Cmd::Get => get(e, args),
        Cmd::Set => set(e, args),
        Cmd::Del => del(e, args),
        Cmd::Exists => exists(e, args),
        Cmd::Incr => incr_by(e, args[1], 1),
        Cmd::Decr => incr_by(e, args[1], -1),
        Cmd::IncrBy => incr_by(e, args[1], int_arg(args[2])?),
        Cmd::DecrBy => {
            let by = int_arg(args[2])?;
            if by == i64::MIN {
                return Err("ERR decrement would overflow".into());
            }
            incr_by(e, args[1], -by)
        }
        Cmd::Expire => expire(e, args, true),
        Cmd::PExpire => expire(e, args, false),
        Cmd::Ttl => ttl(e, args, false),
        Cmd::PTtl => ttl(e, args, true),
        Cmd::Persist => persist(e, args),
        Cmd::HGet => hget(e, args),
        Cmd::HSet => hset(e, args, name),
        Cmd::HSetNx => hsetnx(e, args),
        Cmd::HMGet => hmget(e, args),
        Cmd::HGetAll => hgetall(e, args),
        Cmd::HIncrBy => hincrby(e, args),
        Cmd::HDel => hdel(e, args),
        Cmd::HExists => hexists(e, args),
        Cmd::HLen => hlen(e, args),
        Cmd::SAdd => sadd(e, args),
        Cmd::SRem => srem(e, args),
        Cmd::SIsMember => sismember(e, args),
        Cmd::SCard => scard(e, args),
        Cmd::SMembers => smembers(e, args),
        Cmd::XAdd => xadd(e, args),
        Cmd::XLen => xlen(e, args),
        Cmd::XRange => xrange(e, args),
        Cmd::XDel => xdel(e, args),
        Cmd::XAck => xack(e, args),
        Cmd::XGroup => xgroup(e, args),
        Cmd::XReadGroup => xreadgroup(e, args),
        Cmd::XAutoClaim => xautoclaim(e, args),
        Cmd::XPending => xpending(e, args),
    }
}

// ---------------------------------------------------------------- parsing helpers

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
fn parse_u64(b: &[u8]) -> Option<u64> {
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

fn int_arg(b: &[u8]) -> Result<i64, CmdError> {
    parse_i64(b).ok_or(Cow::Borrowed(ERR_NOT_INT))
}

fn is(a: &[u8], word: &str) -> bool {
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

/// Parses a stream id: `-`/`+` (unless strict), `<ms>` (seq = `missing_seq`) or
/// `<ms>-<seq>`.
fn parse_id(b: &[u8], missing_seq: u64, strict: bool) -> Option<StreamId> {
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

fn id_arg(b: &[u8]) -> Result<StreamId, CmdError> {
    parse_id(b, 0, true).ok_or(Cow::Borrowed(ERR_BAD_ID))
}

/// A range bound: `(` prefix = exclusive (then strict), else `-`, `+` or an id.
fn range_id(b: &[u8], missing_seq: u64) -> Result<(StreamId, bool), CmdError> {
    if b.len() > 1 && b[0] == b'(' {
        let id = parse_id(&b[1..], missing_seq, true).ok_or(Cow::Borrowed(ERR_BAD_ID))?;
        Ok((id, true))
    } else {
        let id = parse_id(b, missing_seq, false).ok_or(Cow::Borrowed(ERR_BAD_ID))?;
        Ok((id, false))
    }
}

fn range_start(b: &[u8]) -> Result<StreamId, CmdError> {
    match range_id(b, 0)? {
        (id, false) => Ok(id),
        (id, true) => id
            .incr()
            .ok_or(Cow::Borrowed("ERR invalid start ID for the interval")),
    }
}

fn range_end(b: &[u8]) -> Result<StreamId, CmdError> {
    match range_id(b, u64::MAX)? {
        (id, false) => Ok(id),
        (id, true) => id
            .decr()
            .ok_or(Cow::Borrowed("ERR invalid end ID for the interval")),
    }
}

fn id_reply<'a>(id: StreamId) -> Reply<'a> {
    Reply::BulkOwned(id.to_bytes())
}

/// `[id, [field, value, ...]]`, borrowing the fields.
fn entry_reply(id: StreamId, entry: &Entry) -> Reply<'_> {
    Reply::Array(vec![
        id_reply(id),
        Reply::Array(entry.iter().map(Reply::Bulk).collect()),
    ])
}

/// `[id, [field, value, ...]]`, copying the fields (for replies built while mutating).
fn entry_reply_owned<'a>(id: StreamId, entry: &Entry) -> Reply<'a> {
    Reply::Array(vec![
        id_reply(id),
        Reply::Array(entry.iter().map(|f| Reply::BulkOwned(f.to_vec())).collect()),
    ])
}

// ---------------------------------------------------------------- typed lookups

fn string_of(o: &Obj) -> Result<Reply<'_>, CmdError> {
    match &o.val {
        Val::Str(b) => Ok(Reply::Bulk(b)),
        Val::Int(i) => Ok(Reply::BulkInt(*i)),
        _ => Err(WRONGTYPE.into()),
    }
}

fn hash_ref<'a>(
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

fn set_ref<'a>(
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

fn stream_ref<'a>(
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

// ---------------------------------------------------------------- keys and strings

fn type_<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn get<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    match e.db.lookup(a[1], e.now, e.rec).map(|o| &*o) {
        None => Ok(Reply::Nil),
        Some(o) => string_of(o),
    }
}

fn set<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn del<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn exists<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn incr_by<'a>(e: Env<'a>, key: &[u8], by: i64) -> CmdResult<'a> {
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

fn expire<'a>(e: Env<'a>, a: &[&[u8]], seconds: bool) -> CmdResult<'a> {
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

fn ttl<'a>(e: Env<'a>, a: &[&[u8]], ms: bool) -> CmdResult<'a> {
    Ok(Reply::Int(match e.db.lookup(a[1], e.now, e.rec) {
        None => -2,
        Some(o) if o.expire_at == 0 => -1,
        Some(o) => {
            let left = (o.expire_at as i64 - e.now as i64).max(0);
            if ms { left } else { (left + 500) / 1000 }
        }
    }))
}

fn persist<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    match e.db.lookup(a[1], e.now, e.rec) {
        Some(o) if o.expire_at != 0 => {
            e.db.set_expire(a[1], 0, e.rec);
            Ok(Reply::Int(1))
        }
        _ => Ok(Reply::Int(0)),
    }
}

// ---------------------------------------------------------------- hashes

fn hget<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    Ok(
        match hash_ref(e.db, a[1], e.now, e.rec)?.and_then(|h| h.get(a[2])) {
            Some(v) => Reply::Bulk(v),
            None => Reply::Nil,
        },
    )
}

fn hset<'a>(e: Env<'a>, a: &[&[u8]], name: &[u8]) -> CmdResult<'a> {
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

fn hsetnx<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    if hash_ref(e.db, a[1], e.now, e.rec)?.is_some_and(|h| h.get(a[2]).is_some()) {
        return Ok(Reply::Int(0));
    }
    e.db.hash_set(a[1], a[2], a[3], e.rec);
    Ok(Reply::Int(1))
}

fn hmget<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn hgetall<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn hincrby<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn hdel<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn hexists<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let h = hash_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(i64::from(
        h.is_some_and(|h| h.get(a[2]).is_some()),
    )))
}

fn hlen<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let h = hash_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(h.map_or(0, |h| h.len() as i64)))
}

// ---------------------------------------------------------------- sets

fn sadd<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    set_ref(e.db, a[1], e.now, e.rec)?;
    let mut n = 0;
    for m in &a[2..] {
        if e.db.set_add(a[1], m, e.rec) {
            n += 1;
        }
    }
    Ok(Reply::Int(n))
}

fn srem<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn sismember<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = set_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(i64::from(s.is_some_and(|s| s.contains(a[2])))))
}

fn scard<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = set_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(s.map_or(0, |s| s.len() as i64)))
}

fn smembers<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = set_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Array(
        s.into_iter().flatten().map(|m| Reply::Bulk(m)).collect(),
    ))
}

// ---------------------------------------------------------------- streams

fn xadd<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn xlen<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let s = stream_ref(e.db, a[1], e.now, e.rec)?;
    Ok(Reply::Int(s.map_or(0, |s| s.entries.len() as i64)))
}

fn xrange<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
    let start = range_start(a[2])?;
    let end = range_end(a[3])?;
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
    Ok(Reply::Array(
        s.entries
            .range(start..=end)
            .take(count.unwrap_or(usize::MAX))
            .map(|(id, f)| entry_reply(*id, f))
            .collect(),
    ))
}

fn xdel<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn xack<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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
fn xgroup_nokey<'a>(a: &[&[u8]]) -> CmdResult<'a> {
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

fn xgroup<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn xreadgroup<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn xautoclaim<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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

fn xpending<'a>(e: Env<'a>, a: &[&[u8]]) -> CmdResult<'a> {
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
