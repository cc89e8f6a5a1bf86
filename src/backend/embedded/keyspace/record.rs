//! The effects log's encoding: the ops each primitive records ([`Recorder`]) and their
//! replay through the very same primitives ([`Keyspace::apply_record`]).
//!
//! Invariant kept here: an op is an exact, deterministic description of what a primitive
//! did (absolute expiry times, generated stream ids, delivery times), so replaying a log
//! rebuilds the same state; an op that does not decode is an error, never skipped.

use super::super::slot::key_slot;
use super::values::{Nack, Stream, StreamId};
use super::{Keyspace, SlotData, StrRef};

// Op codes of the effects log. Each op starts with its code and its key.
pub(super) const OP_SET_STR: u8 = 1; // key, value, expire_at
pub(super) const OP_SET_INT: u8 = 2; // key, zigzag i64, expire_at
pub(super) const OP_DEL: u8 = 3; // key
pub(super) const OP_EXPIRE: u8 = 4; // key, expire_at (0 = persist)
pub(super) const OP_HSET: u8 = 5; // key, field, value
pub(super) const OP_HDEL: u8 = 6; // key, field
pub(super) const OP_SADD: u8 = 7; // key, member
pub(super) const OP_SREM: u8 = 8; // key, member
pub(super) const OP_XCREATE: u8 = 9; // key
pub(super) const OP_XADD: u8 = 10; // key, id, n, n * bytes
pub(super) const OP_XDEL: u8 = 11; // key, id
pub(super) const OP_XSETLAST: u8 = 12; // key, id
pub(super) const OP_XGROUP_CREATE: u8 = 13; // key, group, id
pub(super) const OP_XGROUP_SETID: u8 = 14; // key, group, id
pub(super) const OP_XGROUP_DESTROY: u8 = 15; // key, group
pub(super) const OP_XCONSUMER_CREATE: u8 = 16; // key, group, consumer
pub(super) const OP_XCONSUMER_DEL: u8 = 17; // key, group, consumer
pub(super) const OP_XPEL_SET: u8 = 18; // key, group, id, consumer, delivery_ms, count
pub(super) const OP_XPEL_DEL: u8 = 19; // key, group, id

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

    pub(super) fn num(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.buf.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.buf.push(n as u8);
    }

    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.num(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    pub(super) fn id(&mut self, id: StreamId) {
        self.num(id.ms);
        self.num(id.seq);
    }

    /// Starts an op; false when recording is off.
    pub(super) fn op(&mut self, code: u8, key: &[u8]) -> bool {
        if !self.on {
            return false;
        }
        self.buf.push(code);
        self.bytes(key);
        true
    }

    pub(super) fn set_str(&mut self, key: &[u8], v: StrRef<'_>, expire_at: u64) {
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

    pub(super) fn del(&mut self, key: &[u8]) {
        self.op(OP_DEL, key);
    }

    pub(super) fn expire(&mut self, key: &[u8], at: u64) {
        if self.op(OP_EXPIRE, key) {
            self.num(at);
        }
    }

    pub(super) fn key_bytes(&mut self, code: u8, key: &[u8], b: &[u8]) {
        if self.op(code, key) {
            self.bytes(b);
        }
    }

    pub(super) fn hset(&mut self, key: &[u8], field: &[u8], value: &[u8]) {
        if self.op(OP_HSET, key) {
            self.bytes(field);
            self.bytes(value);
        }
    }

    pub(super) fn key_id(&mut self, code: u8, key: &[u8], id: StreamId) {
        if self.op(code, key) {
            self.id(id);
        }
    }

    pub(super) fn xadd<'f>(
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

    pub(super) fn group_id(&mut self, code: u8, key: &[u8], group: &[u8], id: StreamId) {
        if self.op(code, key) {
            self.bytes(group);
            self.id(id);
        }
    }

    pub(super) fn group_name(&mut self, code: u8, key: &[u8], group: &[u8], name: &[u8]) {
        if self.op(code, key) {
            self.bytes(group);
            self.bytes(name);
        }
    }

    pub(super) fn pel_set(&mut self, key: &[u8], group: &[u8], id: StreamId, n: &Nack) {
        if self.op(OP_XPEL_SET, key) {
            self.bytes(group);
            self.id(id);
            self.bytes(&n.consumer);
            self.num(n.delivery_ms);
            self.num(n.count);
        }
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

impl Keyspace {
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
