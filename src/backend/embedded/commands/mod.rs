//! The `redis.call` command subset of the embedded backend, with Redis's semantics, reply
//! types and error texts.
//!
//! Invariant kept here: a command either fails before changing anything (argument and type
//! errors, like Redis) or makes all its changes through the recording primitives of
//! `keyspace`; and it only touches keys of the one slot the running script holds.
//!
//! Files by data type: [`keys`] (any type), [`strings`], [`hashes`], [`sets`], [`streams`]
//! and their consumer [`groups`]; [`args`] holds the parsing shared by all of them.

use std::borrow::Cow;
use std::sync::Arc;

use parking_lot::{ArcMutexGuard, RawMutex};

use super::keyspace::{Keyspace, Recorder, SlotData};
use super::slot::key_slot;

mod args;
mod groups;
mod hashes;
mod keys;
mod sets;
mod streams;
mod strings;

pub use self::args::fmt_i64;
use self::args::int_arg;
use self::groups::*;
use self::hashes::*;
use self::keys::*;
use self::sets::*;
use self::streams::*;
use self::strings::*;

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
    XRevRange,
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
        // freed at once: the embedded keyspace has no background deleter
        b"unlink" => (Cmd::Del, -2),
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
        b"xrevrange" => (Cmd::XRevRange, -4),
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
            let (secs, micros) = cx.keyspace.time();
            return Ok(Reply::Array(vec![
                Reply::BulkOwned(secs.to_string().into_bytes()),
                Reply::BulkOwned(micros.to_string().into_bytes()),
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
        Cmd::XRevRange => xrevrange(e, args),
        Cmd::XDel => xdel(e, args),
        Cmd::XAck => xack(e, args),
        Cmd::XGroup => xgroup(e, args),
        Cmd::XReadGroup => xreadgroup(e, args),
        Cmd::XAutoClaim => xautoclaim(e, args),
        Cmd::XPending => xpending(e, args),
    }
}
