//! The in-memory keyspace of the embedded backend: per-slot data, the value types (string,
//! hash, set, stream with consumer groups) and the primitive mutations every write goes
//! through.
//!
//! Invariant kept here: every change to a [`SlotData`] is made by one of the primitive
//! methods below, and each primitive appends an exact, deterministic description of what it
//! did (an "op": absolute expiry times, generated stream ids, delivery times) to the
//! [`Recorder`] it is handed. Replaying those ops through the very same primitives
//! ([`Keyspace::apply_record`]) rebuilds the same state, which is what makes the append-only
//! file correct; snapshots ([`SlotData::snapshot`]) are written as the same ops.

use std::collections::hash_map::{self, HashMap};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use super::slot::{NUM_SLOTS, key_slot};

/// Largest hash kept in the small, insertion-ordered form (Redis: `hash-max-listpack-entries`).
const HASH_SMALL_MAX_ENTRIES: usize = 128;
/// Longest field or value kept in the small form (Redis: `hash-max-listpack-value`).
const HASH_SMALL_MAX_VALUE: usize = 64;

/// A stream entry id, `<ms>-<seq>`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };
    pub const MAX: StreamId = StreamId {
        ms: u64::MAX,
        seq: u64::MAX,
    };

    pub const fn new(ms: u64, seq: u64) -> Self {
        StreamId { ms, seq }
    }

    /// The next id, or `None` past the last possible one.
    pub fn incr(self) -> Option<StreamId> {
        if self.seq < u64::MAX {
            Some(StreamId::new(self.ms, self.seq + 1))
        } else if self.ms < u64::MAX {
            Some(StreamId::new(self.ms + 1, 0))
        } else {
            None
        }
    }

    /// The previous id, or `None` before `0-0`.
    pub fn decr(self) -> Option<StreamId> {
        if self.seq > 0 {
            Some(StreamId::new(self.ms, self.seq - 1))
        } else if self.ms > 0 {
            Some(StreamId::new(self.ms - 1, u64::MAX))
        } else {
            None
        }
    }

    /// `<ms>-<seq>` as bytes, the form replies carry.
    pub fn to_bytes(self) -> Vec<u8> {
        format!("{}-{}", self.ms, self.seq).into_bytes()
    }
}

/// A `(field, value)` pair of a small hash.
pub type FieldValue = (Box<[u8]>, Box<[u8]>);

/// A hash: small ones keep insertion order like Redis's listpack encoding (so `HGETALL`
/// answers in the same order as Redis); they turn into a hash table past the same limits
/// Redis uses, and never go back.
#[derive(Debug, Clone)]
pub enum HashVal {
    Small(Vec<FieldValue>),
    Large(HashMap<Box<[u8]>, Box<[u8]>>),
}

impl Default for HashVal {
    fn default() -> Self {
        HashVal::Small(Vec::new())
    }
}

impl HashVal {
    pub fn get(&self, field: &[u8]) -> Option<&[u8]> {
        match self {
            HashVal::Small(v) => v.iter().find(|(f, _)| &**f == field).map(|(_, v)| &**v),
            HashVal::Large(m) => m.get(field).map(|v| &**v),
        }
    }

    /// Sets `field`; true when the field is new.
    pub fn insert(&mut self, field: &[u8], value: &[u8]) -> bool {
        if let HashVal::Small(v) = self {
            if let Some(slot) = v.iter_mut().find(|(f, _)| &**f == field) {
                slot.1 = value.into();
                if value.len() > HASH_SMALL_MAX_VALUE {
                    self.grow();
                }
                return false;
            }
            v.push((field.into(), value.into()));
            if v.len() > HASH_SMALL_MAX_ENTRIES
                || field.len() > HASH_SMALL_MAX_VALUE
                || value.len() > HASH_SMALL_MAX_VALUE
            {
                self.grow();
            }
            return true;
        }
        match self {
            HashVal::Large(m) => match m.get_mut(field) {
                Some(v) => {
                    *v = value.into();
                    false
                }
                None => {
                    m.insert(field.into(), value.into());
                    true
                }
            },
            HashVal::Small(_) => false,
        }
    }

    /// Converts the small form into a hash table (Redis's listpack -> hashtable conversion).
    fn grow(&mut self) {
        if let HashVal::Small(v) = self {
            let map = std::mem::take(v).into_iter().collect();
            *self = HashVal::Large(map);
        }
    }

    /// Removes `field`; true when it was there. Order of the other fields is kept.
    pub fn remove(&mut self, field: &[u8]) -> bool {
        match self {
            HashVal::Small(v) => match v.iter().position(|(f, _)| &**f == field) {
                Some(i) => {
                    v.remove(i);
                    true
                }
                None => false,
            },
            HashVal::Large(m) => m.remove(field).is_some(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HashVal::Small(v) => v.len(),
            HashVal::Large(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> HashIter<'_> {
        match self {
            HashVal::Small(v) => HashIter::Small(v.iter()),
            HashVal::Large(m) => HashIter::Large(m.iter()),
        }
    }
}

/// Iterator over a hash's `(field, value)` pairs, in `HGETALL` order.
pub enum HashIter<'a> {
    Small(std::slice::Iter<'a, FieldValue>),
    Large(hash_map::Iter<'a, Box<[u8]>, Box<[u8]>>),
}

impl<'a> Iterator for HashIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            HashIter::Small(it) => it.next().map(|(f, v)| (&**f, &**v)),
            HashIter::Large(it) => it.next().map(|(f, v)| (&**f, &**v)),
        }
    }
}

/// A pending entry of a consumer group (Redis's NACK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    pub consumer: Box<[u8]>,
    /// Wall-clock ms of the last delivery.
    pub delivery_ms: u64,
    pub count: u64,
}

/// A consumer group: last delivered id, the pending entries list, and its consumers (each
/// with the ids it has pending, so history reads and `XPENDING` need not scan the PEL).
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub last_id: StreamId,
    pub pel: BTreeMap<StreamId, Nack>,
    pub consumers: BTreeMap<Box<[u8]>, BTreeSet<StreamId>>,
}

/// The field and value strings of one stream entry, in one buffer (one allocation for
/// the bytes and one for their end offsets, instead of one per string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    data: Box<[u8]>,
    ends: Box<[u32]>,
}

impl Entry {
    pub fn new<B: AsRef<[u8]>>(fields: &[B]) -> Entry {
        let mut data = Vec::with_capacity(fields.iter().map(|f| f.as_ref().len()).sum());
        let mut ends = Vec::with_capacity(fields.len());
        for f in fields {
            data.extend_from_slice(f.as_ref());
            // Stream arguments are far below 4 GiB (Redis caps a bulk string at 512 MiB).
            ends.push(u32::try_from(data.len()).unwrap_or(u32::MAX));
        }
        Entry {
            data: data.into_boxed_slice(),
            ends: ends.into_boxed_slice(),
        }
    }

    /// The strings, in order (field, value, field, value, ...).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        let mut start = 0usize;
        self.ends.iter().map(move |&end| {
            let end = (end as usize).min(self.data.len());
            let s = &self.data[start.min(end)..end];
            start = end;
            s
        })
    }
}

/// A stream: entries by id, the last id ever generated (ids stay strictly increasing even
/// after the newest entry is deleted), and consumer groups by name.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub entries: BTreeMap<StreamId, Entry>,
    pub last_id: StreamId,
    pub groups: BTreeMap<Box<[u8]>, Group>,
}

/// A stored value.
#[derive(Debug, Clone)]
pub enum Val {
    Str(Box<[u8]>),
    /// A string that is the canonical form of an integer (Redis's int encoding): `INCR`
    /// and friends need no parse and no allocation.
    Int(i64),
    Hash(HashVal),
    Set(HashSet<Box<[u8]>>),
    Stream(Box<Stream>),
}

/// A key's value and its absolute expiry (wall-clock ms; 0 = none).
#[derive(Debug, Clone)]
pub struct Obj {
    pub val: Val,
    pub expire_at: u64,
}

impl Obj {
    /// Redis: a key is expired once the clock is past its expiry time.
    pub fn expired(&self, now: u64) -> bool {
        self.expire_at != 0 && now > self.expire_at
    }
}

/// A string value to store, by reference.
#[derive(Debug, Clone, Copy)]
pub enum StrRef<'a> {
    Bytes(&'a [u8]),
    Int(i64),
}

impl StrRef<'_> {
    fn to_val(self) -> Val {
        match self {
            StrRef::Bytes(b) => Val::Str(b.into()),
            StrRef::Int(i) => Val::Int(i),
        }
    }
}

/// The data of one hash slot. Held under that slot's mutex for a whole script.
#[derive(Debug, Default)]
pub struct SlotData {
    pub map: HashMap<Box<[u8]>, Obj>,
    /// Number of keys with an expiry, so sweeps skip slots that have none.
    pub volatile: usize,
    /// Rewrite epoch this slot was last snapshotted in (see `aof.rs`).
    pub snap_epoch: u64,
}

// Op codes of the effects log. Each op starts with its code and its key.
const OP_SET_STR: u8 = 1; // key, value, expire_at
const OP_SET_INT: u8 = 2; // key, zigzag i64, expire_at
const OP_DEL: u8 = 3; // key
const OP_EXPIRE: u8 = 4; // key, expire_at (0 = persist)
const OP_HSET: u8 = 5; // key, field, value
const OP_HDEL: u8 = 6; // key, field
const OP_SADD: u8 = 7; // key, member
const OP_SREM: u8 = 8; // key, member
const OP_XCREATE: u8 = 9; // key
const OP_XADD: u8 = 10; // key, id, n, n * bytes
const OP_XDEL: u8 = 11; // key, id
const OP_XSETLAST: u8 = 12; // key, id
const OP_XGROUP_CREATE: u8 = 13; // key, group, id
const OP_XGROUP_SETID: u8 = 14; // key, group, id
const OP_XGROUP_DESTROY: u8 = 15; // key, group
const OP_XCONSUMER_CREATE: u8 = 16; // key, group, consumer
const OP_XCONSUMER_DEL: u8 = 17; // key, group, consumer
const OP_XPEL_SET: u8 = 18; // key, group, id, consumer, delivery_ms, count
const OP_XPEL_DEL: u8 = 19; // key, group, id

/// Collects the ops of one script execution (or of a snapshot chunk). When off (replay),
/// it records nothing.
#[derive(Debug, Default)]
pub struct Recorder {
    pub buf: Vec<u8>,
    on: bool,
}

impl Recorder {
    pub fn new(on: bool) -> Self {
        Recorder {
            buf: Vec::new(),
            on,
        }
    }

    pub fn off() -> Self {
        Recorder::new(false)
    }

    fn num(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.buf.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.buf.push(n as u8);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.num(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    fn id(&mut self, id: StreamId) {
        self.num(id.ms);
        self.num(id.seq);
    }

    /// Starts an op; false when recording is off.
    fn op(&mut self, code: u8, key: &[u8]) -> bool {
        if !self.on {
            return false;
        }
        self.buf.push(code);
        self.bytes(key);
        true
    }

    fn set_str(&mut self, key: &[u8], v: StrRef<'_>, expire_at: u64) {
        match v {
            StrRef::Bytes(b) => {
                if self.op(OP_SET_STR, key) {
                    self.bytes(b);
                    self.num(expire_at);
                }
            }
            StrRef::Int(i) => {
                if self.op(OP_SET_INT, key) {
                    self.num(((i << 1) ^ (i >> 63)) as u64);
                    self.num(expire_at);
                }
            }
        }
    }

    fn del(&mut self, key: &[u8]) {
        self.op(OP_DEL, key);
    }

    fn expire(&mut self, key: &[u8], at: u64) {
        if self.op(OP_EXPIRE, key) {
            self.num(at);
        }
    }

    fn key_bytes(&mut self, code: u8, key: &[u8], b: &[u8]) {
        if self.op(code, key) {
            self.bytes(b);
        }
    }

    fn hset(&mut self, key: &[u8], field: &[u8], value: &[u8]) {
        if self.op(OP_HSET, key) {
            self.bytes(field);
            self.bytes(value);
        }
    }

    fn key_id(&mut self, code: u8, key: &[u8], id: StreamId) {
        if self.op(code, key) {
            self.id(id);
        }
    }

    fn xadd<'f>(
        &mut self,
        key: &[u8],
        id: StreamId,
        fields: impl ExactSizeIterator<Item = &'f [u8]>,
    ) {
        if self.op(OP_XADD, key) {
            self.id(id);
            self.num(fields.len() as u64);
            for f in fields {
                self.bytes(f);
            }
        }
    }

    fn group_id(&mut self, code: u8, key: &[u8], group: &[u8], id: StreamId) {
        if self.op(code, key) {
            self.bytes(group);
            self.id(id);
        }
    }

    fn group_name(&mut self, code: u8, key: &[u8], group: &[u8], name: &[u8]) {
        if self.op(code, key) {
            self.bytes(group);
            self.bytes(name);
        }
    }

    fn pel_set(&mut self, key: &[u8], group: &[u8], id: StreamId, n: &Nack) {
        if self.op(OP_XPEL_SET, key) {
            self.bytes(group);
            self.id(id);
            self.bytes(&n.consumer);
            self.num(n.delivery_ms);
            self.num(n.count);
        }
    }
}

impl SlotData {
    /// Removes `key` without recording, keeping the `volatile` count right.
    fn remove(&mut self, key: &[u8]) -> Option<Obj> {
        let obj = self.map.remove(key)?;
        if obj.expire_at != 0 {
            self.volatile -= 1;
        }
        Some(obj)
    }

    /// Replaces whatever `key` holds with `val` (no expiry).
    fn replace(&mut self, key: &[u8], val: Val) {
        self.remove(key);
        self.map.insert(key.into(), Obj { val, expire_at: 0 });
    }

    /// Looks `key` up for a command. A key whose time is up is deleted first, and the
    /// deletion recorded (as Redis propagates a `DEL` for a key it expires).
    pub fn lookup(&mut self, key: &[u8], now: u64, rec: &mut Recorder) -> Option<&mut Obj> {
        let expired = self.map.get(key)?.expired(now);
        if expired {
            self.remove(key);
            rec.del(key);
            return None;
        }
        self.map.get_mut(key)
    }

    /// Stores a string value with the given absolute expiry (0 = none), replacing any value.
    pub fn put_str(&mut self, key: &[u8], v: StrRef<'_>, expire_at: u64, rec: &mut Recorder) {
        rec.set_str(key, v, expire_at);
        match self.map.get_mut(key) {
            Some(obj) => {
                let was = obj.expire_at != 0;
                obj.val = v.to_val();
                obj.expire_at = expire_at;
                match (was, expire_at != 0) {
                    (false, true) => self.volatile += 1,
                    (true, false) => self.volatile -= 1,
                    _ => {}
                }
            }
            None => {
                self.map.insert(
                    key.into(),
                    Obj {
                        val: v.to_val(),
                        expire_at,
                    },
                );
                if expire_at != 0 {
                    self.volatile += 1;
                }
            }
        }
    }

    /// Deletes `key`; true when it existed.
    pub fn delete(&mut self, key: &[u8], rec: &mut Recorder) -> bool {
        if self.remove(key).is_some() {
            rec.del(key);
            true
        } else {
            false
        }
    }

    /// Sets the absolute expiry of `key` (0 = persist); false when there is no such key.
    pub fn set_expire(&mut self, key: &[u8], at: u64, rec: &mut Recorder) -> bool {
        let Some(obj) = self.map.get_mut(key) else {
            return false;
        };
        let was = obj.expire_at != 0;
        obj.expire_at = at;
        match (was, at != 0) {
            (false, true) => self.volatile += 1,
            (true, false) => self.volatile -= 1,
            _ => {}
        }
        rec.expire(key, at);
        true
    }

    /// Sets a hash field, creating the hash; true when the field is new.
    pub fn hash_set(&mut self, key: &[u8], field: &[u8], value: &[u8], rec: &mut Recorder) -> bool {
        rec.hset(key, field, value);
        let hash = match self.map.get_mut(key) {
            Some(Obj {
                val: Val::Hash(h), ..
            }) => h,
            _ => {
                self.replace(key, Val::Hash(HashVal::default()));
                match self.map.get_mut(key) {
                    Some(Obj {
                        val: Val::Hash(h), ..
                    }) => h,
                    _ => return false,
                }
            }
        };
        hash.insert(field, value)
    }

    /// Removes a hash field (and the key with its last field); true when it was there.
    pub fn hash_del(&mut self, key: &[u8], field: &[u8], rec: &mut Recorder) -> bool {
        let Some(Obj {
            val: Val::Hash(h), ..
        }) = self.map.get_mut(key)
        else {
            return false;
        };
        if !h.remove(field) {
            return false;
        }
        let empty = h.is_empty();
        rec.key_bytes(OP_HDEL, key, field);
        if empty {
            self.remove(key);
        }
        true
    }

    /// Adds a set member, creating the set; true when it is new.
    pub fn set_add(&mut self, key: &[u8], member: &[u8], rec: &mut Recorder) -> bool {
        let set = match self.map.get_mut(key) {
            Some(Obj {
                val: Val::Set(s), ..
            }) => s,
            _ => {
                self.replace(key, Val::Set(HashSet::new()));
                match self.map.get_mut(key) {
                    Some(Obj {
                        val: Val::Set(s), ..
                    }) => s,
                    _ => return false,
                }
            }
        };
        if set.contains(member) {
            return false;
        }
        set.insert(member.into());
        rec.key_bytes(OP_SADD, key, member);
        true
    }

    /// Removes a set member (and the key with its last member); true when it was there.
    pub fn set_rem(&mut self, key: &[u8], member: &[u8], rec: &mut Recorder) -> bool {
        let Some(Obj {
            val: Val::Set(s), ..
        }) = self.map.get_mut(key)
        else {
            return false;
        };
        if !s.remove(member) {
            return false;
        }
        let empty = s.is_empty();
        rec.key_bytes(OP_SREM, key, member);
        if empty {
            self.remove(key);
        }
        true
    }

    /// Creates an empty stream at `key` unless a stream is there already.
    pub fn stream_create(&mut self, key: &[u8], rec: &mut Recorder) {
        if !matches!(
            self.map.get(key),
            Some(Obj {
                val: Val::Stream(_),
                ..
            })
        ) {
            self.replace(key, Val::Stream(Box::default()));
            rec.op(OP_XCREATE, key);
        }
    }

    /// The stream at `key`, if `key` holds one (no expiry check: callers looked it up).
    pub fn stream_mut(&mut self, key: &[u8]) -> Option<&mut Stream> {
        match self.map.get_mut(key) {
            Some(Obj {
                val: Val::Stream(s),
                ..
            }) => Some(s),
            _ => None,
        }
    }

    /// Deletes every expired key of this slot, recording the deletions; returns how many.
    pub fn sweep_expired(&mut self, now: u64, rec: &mut Recorder) -> usize {
        if self.volatile == 0 {
            return 0;
        }
        let dead: Vec<Box<[u8]>> = self
            .map
            .iter()
            .filter(|(_, o)| o.expired(now))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &dead {
            self.delete(k, rec);
        }
        dead.len()
    }

    /// Writes this slot's live keys as ops into `rec`, calling `emit` whenever `rec` holds
    /// at least `chunk` bytes (so a huge key is split over several records).
    pub fn snapshot(
        &self,
        now: u64,
        rec: &mut Recorder,
        chunk: usize,
        emit: &mut dyn FnMut(&mut Recorder),
    ) {
        let mut maybe_emit = |rec: &mut Recorder| {
            if rec.buf.len() >= chunk {
                emit(rec);
            }
        };
        for (key, obj) in &self.map {
            if obj.expired(now) {
                continue;
            }
            match &obj.val {
                Val::Str(b) => rec.set_str(key, StrRef::Bytes(b), obj.expire_at),
                Val::Int(i) => rec.set_str(key, StrRef::Int(*i), obj.expire_at),
                Val::Hash(h) => {
                    for (f, v) in h.iter() {
                        rec.hset(key, f, v);
                        maybe_emit(rec);
                    }
                }
                Val::Set(s) => {
                    for m in s {
                        rec.key_bytes(OP_SADD, key, m);
                        maybe_emit(rec);
                    }
                }
                Val::Stream(s) => {
                    rec.op(OP_XCREATE, key);
                    for (id, entry) in &s.entries {
                        rec.xadd(key, *id, entry.iter());
                        maybe_emit(rec);
                    }
                    rec.key_id(OP_XSETLAST, key, s.last_id);
                    for (name, g) in &s.groups {
                        rec.group_id(OP_XGROUP_CREATE, key, name, g.last_id);
                        for consumer in g.consumers.keys() {
                            rec.group_name(OP_XCONSUMER_CREATE, key, name, consumer);
                        }
                        for (id, nack) in &g.pel {
                            rec.pel_set(key, name, *id, nack);
                            maybe_emit(rec);
                        }
                    }
                }
            }
            if obj.expire_at != 0 {
                rec.expire(key, obj.expire_at);
            }
            maybe_emit(rec);
        }
    }
}

impl Stream {
    /// Appends an entry; the caller checked `id` is above `last_id` (replay trusts the log).
    pub fn add<B: AsRef<[u8]>>(
        &mut self,
        key: &[u8],
        id: StreamId,
        fields: &[B],
        rec: &mut Recorder,
    ) {
        rec.xadd(key, id, fields.iter().map(AsRef::as_ref));
        self.entries.insert(id, Entry::new(fields));
        if id > self.last_id {
            self.last_id = id;
        }
    }

    /// Deletes an entry (pending lists are left alone, as in Redis); true when it existed.
    pub fn del(&mut self, key: &[u8], id: StreamId, rec: &mut Recorder) -> bool {
        if self.entries.remove(&id).is_some() {
            rec.key_id(OP_XDEL, key, id);
            true
        } else {
            false
        }
    }

    pub fn set_last_id(&mut self, key: &[u8], id: StreamId, rec: &mut Recorder) {
        self.last_id = id;
        rec.key_id(OP_XSETLAST, key, id);
    }

    /// Creates (or, in replay, resets) a group whose last delivered id is `id`.
    pub fn group_create(&mut self, key: &[u8], group: &[u8], id: StreamId, rec: &mut Recorder) {
        rec.group_id(OP_XGROUP_CREATE, key, group, id);
        self.groups.insert(
            group.into(),
            Group {
                last_id: id,
                ..Group::default()
            },
        );
    }

    /// Sets a group's last delivered id; false when there is no such group.
    pub fn group_set_id(
        &mut self,
        key: &[u8],
        group: &[u8],
        id: StreamId,
        rec: &mut Recorder,
    ) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        if g.last_id != id {
            g.last_id = id;
            rec.group_id(OP_XGROUP_SETID, key, group, id);
        }
        true
    }

    pub fn group_destroy(&mut self, key: &[u8], group: &[u8], rec: &mut Recorder) -> bool {
        if self.groups.remove(group).is_some() {
            rec.key_bytes(OP_XGROUP_DESTROY, key, group);
            true
        } else {
            false
        }
    }

    /// Creates a consumer; true when it is new (false also when the group is missing).
    pub fn consumer_create(
        &mut self,
        key: &[u8],
        group: &[u8],
        consumer: &[u8],
        rec: &mut Recorder,
    ) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        if g.consumers.contains_key(consumer) {
            return false;
        }
        g.consumers.insert(consumer.into(), BTreeSet::new());
        rec.group_name(OP_XCONSUMER_CREATE, key, group, consumer);
        true
    }

    /// Deletes a consumer and its pending entries; returns how many it had pending.
    pub fn consumer_del(
        &mut self,
        key: &[u8],
        group: &[u8],
        consumer: &[u8],
        rec: &mut Recorder,
    ) -> usize {
        let Some(g) = self.groups.get_mut(group) else {
            return 0;
        };
        let Some(pending) = g.consumers.remove(consumer) else {
            return 0;
        };
        for id in &pending {
            g.pel.remove(id);
        }
        rec.group_name(OP_XCONSUMER_DEL, key, group, consumer);
        pending.len()
    }

    /// Sets a pending entry: owned by `nack.consumer` (created if needed, and the entry
    /// moved from its previous owner), with the given delivery time and count.
    pub fn pel_set(
        &mut self,
        key: &[u8],
        group: &[u8],
        id: StreamId,
        nack: Nack,
        rec: &mut Recorder,
    ) {
        rec.pel_set(key, group, id, &nack);
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        if let Some(old) = g.pel.get(&id)
            && old.consumer != nack.consumer
            && let Some(ids) = g.consumers.get_mut(&old.consumer)
        {
            ids.remove(&id);
        }
        match g.consumers.get_mut(&nack.consumer) {
            Some(ids) => {
                ids.insert(id);
            }
            None => {
                g.consumers
                    .insert(nack.consumer.clone(), BTreeSet::from([id]));
            }
        }
        g.pel.insert(id, nack);
    }

    /// Removes a pending entry (XACK); true when it was pending.
    pub fn pel_del(&mut self, key: &[u8], group: &[u8], id: StreamId, rec: &mut Recorder) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        let Some(nack) = g.pel.remove(&id) else {
            return false;
        };
        if let Some(ids) = g.consumers.get_mut(&nack.consumer) {
            ids.remove(&id);
        }
        rec.group_id(OP_XPEL_DEL, key, group, id);
        true
    }
}

/// Reads ops back.
struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn u8(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.buf.split_first().ok_or("truncated op")?;
        self.buf = rest;
        Ok(b)
    }

    fn num(&mut self) -> Result<u64, String> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("bad varint".into())
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = usize::try_from(self.num()?).map_err(|_| "bad length")?;
        if len > self.buf.len() {
            return Err("truncated bytes".into());
        }
        let (b, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(b)
    }

    fn id(&mut self) -> Result<StreamId, String> {
        Ok(StreamId::new(self.num()?, self.num()?))
    }
}

/// All the slots, each behind its own mutex (a script holds its slot's lock throughout).
pub struct Keyspace {
    slots: Box<[Arc<Mutex<SlotData>>]>,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self::new()
    }
}

impl Keyspace {
    pub fn new() -> Self {
        Keyspace {
            slots: (0..NUM_SLOTS)
                .map(|_| Arc::new(Mutex::new(SlotData::default())))
                .collect(),
        }
    }

    pub fn slot(&self, slot: u16) -> &Arc<Mutex<SlotData>> {
        &self.slots[usize::from(slot) % NUM_SLOTS]
    }

    pub fn slots(&self) -> &[Arc<Mutex<SlotData>>] {
        &self.slots
    }

    /// Applies one log record (a sequence of ops) through the primitives, recording nothing.
    pub fn apply_record(&self, payload: &[u8]) -> Result<(), String> {
        let mut d = Dec { buf: payload };
        let mut off = Recorder::off();
        let rec = &mut off;
        while !d.buf.is_empty() {
            let op = d.u8()?;
            let key = d.bytes()?;
            let mut db = self.slot(key_slot(key)).lock();
            match op {
                OP_SET_STR => {
                    let v = d.bytes()?;
                    let at = d.num()?;
                    db.put_str(key, StrRef::Bytes(v), at, rec);
                }
                OP_SET_INT => {
                    let z = d.num()?;
                    let i = ((z >> 1) as i64) ^ -((z & 1) as i64);
                    let at = d.num()?;
                    db.put_str(key, StrRef::Int(i), at, rec);
                }
                OP_DEL => {
                    db.delete(key, rec);
                }
                OP_EXPIRE => {
                    let at = d.num()?;
                    db.set_expire(key, at, rec);
                }
                OP_HSET => {
                    let f = d.bytes()?;
                    let v = d.bytes()?;
                    db.hash_set(key, f, v, rec);
                }
                OP_HDEL => {
                    let f = d.bytes()?;
                    db.hash_del(key, f, rec);
                }
                OP_SADD => {
                    let m = d.bytes()?;
                    db.set_add(key, m, rec);
                }
                OP_SREM => {
                    let m = d.bytes()?;
                    db.set_rem(key, m, rec);
                }
                OP_XCREATE => db.stream_create(key, rec),
                OP_XADD => {
                    let id = d.id()?;
                    let n = d.num()?;
                    let mut fields = Vec::with_capacity(n.min(1024) as usize);
                    for _ in 0..n {
                        fields.push(d.bytes()?);
                    }
                    db.stream_create(key, rec);
                    stream(&mut db, key)?.add(key, id, &fields, rec);
                }
                OP_XDEL => {
                    let id = d.id()?;
                    stream(&mut db, key)?.del(key, id, rec);
                }
                OP_XSETLAST => {
                    let id = d.id()?;
                    stream(&mut db, key)?.set_last_id(key, id, rec);
                }
                OP_XGROUP_CREATE => {
                    let g = d.bytes()?;
                    let id = d.id()?;
                    stream(&mut db, key)?.group_create(key, g, id, rec);
                }
                OP_XGROUP_SETID => {
                    let g = d.bytes()?;
                    let id = d.id()?;
                    stream(&mut db, key)?.group_set_id(key, g, id, rec);
                }
                OP_XGROUP_DESTROY => {
                    let g = d.bytes()?;
                    stream(&mut db, key)?.group_destroy(key, g, rec);
                }
                OP_XCONSUMER_CREATE => {
                    let g = d.bytes()?;
                    let c = d.bytes()?;
                    stream(&mut db, key)?.consumer_create(key, g, c, rec);
                }
                OP_XCONSUMER_DEL => {
                    let g = d.bytes()?;
                    let c = d.bytes()?;
                    stream(&mut db, key)?.consumer_del(key, g, c, rec);
                }
                OP_XPEL_SET => {
                    let g = d.bytes()?;
                    let id = d.id()?;
                    let consumer = d.bytes()?.into();
                    let delivery_ms = d.num()?;
                    let count = d.num()?;
                    let nack = Nack {
                        consumer,
                        delivery_ms,
                        count,
                    };
                    stream(&mut db, key)?.pel_set(key, g, id, nack, rec);
                }
                OP_XPEL_DEL => {
                    let g = d.bytes()?;
                    let id = d.id()?;
                    stream(&mut db, key)?.pel_del(key, g, id, rec);
                }
                other => return Err(format!("unknown op code {other}")),
            }
        }
        Ok(())
    }

    /// A canonical, order-independent description of every live key, for tests comparing
    /// two keyspaces (e.g. before a restart and after the log is replayed).
    #[cfg(test)]
    pub fn dump(&self, now: u64) -> BTreeMap<Vec<u8>, String> {
        let mut out = BTreeMap::new();
        for slot in self.slots.iter() {
            let db = slot.lock();
            for (k, o) in &db.map {
                if o.expired(now) {
                    continue;
                }
                let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let v = match &o.val {
                    Val::Str(b) => format!("str {}", lossy(b)),
                    Val::Int(i) => format!("str {i}"),
                    Val::Hash(h) => {
                        let m: BTreeMap<String, String> =
                            h.iter().map(|(f, v)| (lossy(f), lossy(v))).collect();
                        format!("hash {m:?}")
                    }
                    Val::Set(s) => {
                        let m: BTreeSet<String> = s.iter().map(|m| lossy(m)).collect();
                        format!("set {m:?}")
                    }
                    Val::Stream(s) => format!("stream {s:?}"),
                };
                out.insert(k.to_vec(), format!("{v} exp={}", o.expire_at));
            }
        }
        out
    }
}

/// The stream an op applies to; a missing one means the log is not ours or is damaged.
fn stream<'a>(db: &'a mut SlotData, key: &[u8]) -> Result<&'a mut Stream, String> {
    db.stream_mut(key).ok_or_else(|| {
        format!(
            "stream op on missing stream {:?}",
            String::from_utf8_lossy(key)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_hash_keeps_insertion_order_and_grows() {
        let mut h = HashVal::default();
        assert!(h.insert(b"b", b"1"));
        assert!(h.insert(b"a", b"2"));
        assert!(!h.insert(b"b", b"9"));
        let got: Vec<_> = h.iter().map(|(f, v)| (f.to_vec(), v.to_vec())).collect();
        assert_eq!(
            got,
            vec![
                (b"b".to_vec(), b"9".to_vec()),
                (b"a".to_vec(), b"2".to_vec())
            ]
        );
        for i in 0..200 {
            h.insert(format!("f{i}").as_bytes(), b"x");
        }
        assert!(matches!(h, HashVal::Large(_)));
        assert_eq!(h.len(), 202);
        assert!(h.remove(b"a"));
        assert_eq!(h.get(b"b"), Some(&b"9"[..]));
    }

    #[test]
    fn stream_ids_step() {
        assert_eq!(StreamId::new(1, u64::MAX).incr(), Some(StreamId::new(2, 0)));
        assert_eq!(StreamId::MAX.incr(), None);
        assert_eq!(StreamId::new(2, 0).decr(), Some(StreamId::new(1, u64::MAX)));
        assert_eq!(StreamId::MIN.decr(), None);
        assert_eq!(StreamId::new(5, 1).to_bytes(), b"5-1");
    }

    #[test]
    fn recorded_ops_replay_to_same_state() {
        let live = Keyspace::new();
        let mut rec = Recorder::new(true);
        {
            let key: &[u8] = b"{t}s";
            let mut db = live.slot(key_slot(key)).lock();
            db.put_str(b"{t}a", StrRef::Int(-42), 0, &mut rec);
            db.put_str(
                b"{t}b",
                StrRef::Bytes(b"hello"),
                99_999_999_999_999,
                &mut rec,
            );
            db.hash_set(b"{t}h", b"f", b"v", &mut rec);
            db.hash_set(b"{t}h", b"g", b"w", &mut rec);
            db.hash_del(b"{t}h", b"f", &mut rec);
            db.set_add(b"{t}set", b"m", &mut rec);
            db.stream_create(key, &mut rec);
            let s = db.stream_mut(key).unwrap();
            s.add(key, StreamId::new(1, 0), &[&b"k"[..], b"v"], &mut rec);
            s.add(key, StreamId::new(2, 0), &[&b"k"[..], b"w"], &mut rec);
            s.group_create(key, b"g", StreamId::MIN, &mut rec);
            s.consumer_create(key, b"g", b"c", &mut rec);
            let nack = Nack {
                consumer: b"c".as_slice().into(),
                delivery_ms: 7,
                count: 1,
            };
            s.pel_set(key, b"g", StreamId::new(1, 0), nack, &mut rec);
            s.group_set_id(key, b"g", StreamId::new(1, 0), &mut rec);
            s.del(key, StreamId::new(2, 0), &mut rec);
        }
        let replayed = Keyspace::new();
        replayed.apply_record(&rec.buf).unwrap();
        assert_eq!(live.dump(0), replayed.dump(0));

        // And the snapshot of the live state replays to the same state too.
        let snap = Keyspace::new();
        for slot in live.slots() {
            let mut r = Recorder::new(true);
            slot.lock().snapshot(0, &mut r, 16, &mut |r| {
                snap.apply_record(&r.buf).unwrap();
                r.buf.clear();
            });
            snap.apply_record(&r.buf).unwrap();
        }
        assert_eq!(live.dump(0), snap.dump(0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let ks = Keyspace::new();
        assert!(ks.apply_record(&[0xff, 1, b'k']).is_err());
        assert!(ks.apply_record(&[OP_SET_STR, 200]).is_err());
        assert!(ks.apply_record(&[OP_XDEL, 1, b'k', 1, 1]).is_err());
    }
}
