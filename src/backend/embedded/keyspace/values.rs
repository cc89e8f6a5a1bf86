//! The value types of the embedded keyspace: strings, hashes (small ones insertion-ordered
//! like Redis's listpack), sets, streams with consumer groups, and the stream entry ids.
//!
//! Invariant kept here: these types hold data only; every change to a slot's data goes
//! through the recording primitives of [`super`].

use std::collections::hash_map::{self, HashMap};
use std::collections::{BTreeMap, BTreeSet, HashSet};

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
    pub(super) fn to_val(self) -> Val {
        match self {
            StrRef::Bytes(b) => Val::Str(b.into()),
            StrRef::Int(i) => Val::Int(i),
        }
    }
}
