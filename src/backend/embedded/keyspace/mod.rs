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
//!
//! Files: [`values`] (the value types), [`record`] (the ops' encoding and their replay).

mod record;
mod values;

#[cfg(test)]
use std::collections::BTreeMap;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

pub use self::record::Recorder;
use self::record::*;
pub use self::values::*;
use super::slot::NUM_SLOTS;

/// The data of one hash slot. Held under that slot's mutex for a whole script.
#[derive(Debug, Default)]
pub struct SlotData {
    pub map: HashMap<Box<[u8]>, Obj>,
    /// Number of keys with an expiry, so sweeps skip slots that have none.
    pub volatile: usize,
    /// Rewrite epoch this slot was last snapshotted in (see `aof.rs`).
    pub snap_epoch: u64,
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

/// All the slots, each behind its own mutex (a script holds its slot's lock throughout),
/// and the clock `TIME` answers from.
pub struct Keyspace {
    slots: Box<[Arc<Mutex<SlotData>>]>,
    /// `None`: the system clock. A test sets one to move scripts' `TIME` (and only that:
    /// expiry keeps the system clock) without sleeping.
    clock: parking_lot::RwLock<Option<Arc<dyn crate::domain::time::Clock>>>,
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
            clock: parking_lot::RwLock::new(None),
        }
    }

    /// Scripts' `TIME` follows `clock` from now on (tests).
    pub fn set_clock(&self, clock: Arc<dyn crate::domain::time::Clock>) {
        *self.clock.write() = Some(clock);
    }

    /// What `TIME` answers: (seconds, microseconds) since the Unix epoch.
    pub fn time(&self) -> (u64, u32) {
        match self.clock.read().as_ref() {
            Some(c) => {
                let ms = c.now_ms().max(0) as u64;
                (ms / 1000, (ms % 1000) as u32 * 1000)
            }
            None => {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                (t.as_secs(), t.subsec_micros())
            }
        }
    }

    pub fn slot(&self, slot: u16) -> &Arc<Mutex<SlotData>> {
        &self.slots[usize::from(slot) % NUM_SLOTS]
    }

    pub fn slots(&self) -> &[Arc<Mutex<SlotData>>] {
        &self.slots
    }
    /// Every live key that starts with `prefix` (what `SCAN MATCH <prefix>*` lists), in no
    /// particular order. Takes each slot's lock in turn: an inspection, not a hot path.
    pub fn keys_with_prefix(&self, prefix: &[u8], now: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for slot in self.slots.iter() {
            let db = slot.lock();
            out.extend(
                db.map
                    .iter()
                    .filter(|(k, o)| k.starts_with(prefix) && !o.expired(now))
                    .map(|(k, _)| k.to_vec()),
            );
        }
        out
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

#[cfg(test)]
mod tests {
    use super::super::slot::key_slot;
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
