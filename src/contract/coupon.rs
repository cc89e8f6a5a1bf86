//! `lua/coupon.lua`: the state of the coupons minted on a shard (the `coupons` hash, one
//! entry per coupon, written by `lua/claim.lua` at the mint), read, and changed by a
//! compare-and-set on the entry's version together with the change record the persister
//! writes to the database.
//!
//! Invariants kept here: [`Entry::encode`] and [`Entry::decode`] are the one writer and
//! reader of an entry (the claim script writes the first one, version 0, in the same
//! layout); an entry that does not read back whole is a protocol error, never a guess.

use super::keys::SlotKeys;
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};
use crate::domain::coupon::{Stored, Validity};

const SCRIPT: Script = Script::Coupon;

/// Most coupons one `get` reads.
pub const MAX_GET: usize = 1000;

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 3] {
    [&slot.meta, &slot.coupons, &slot.log]
}

/// One coupon's entry: its state and what deciding and showing a change needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The coupon row version this state is (0 at the claim; every change adds 1, as the
    /// database's `coupons.version`).
    pub version: i64,
    pub stored: Stored,
    pub user: String,
    pub validity: Validity,
    pub claimed_at: i64,
    pub code: Option<String>,
}

impl Entry {
    /// `<version>|<state>|<order>|<step>|<lock until>|<user>|<vf>|<vt>|<at>|<code>`.
    pub fn encode(&self) -> String {
        let (state, order, step, until) = self.stored.columns();
        format!(
            "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            self.version,
            state.as_str(),
            order.unwrap_or(""),
            step.map(|s| s.as_str()).unwrap_or(""),
            until.map(|u| u.to_string()).unwrap_or_default(),
            self.user,
            self.validity.from,
            self.validity.to,
            self.claimed_at,
            self.code.as_deref().unwrap_or(""),
        )
    }

    /// Reads an entry back; `Err` names what is wrong.
    pub fn decode(s: &str) -> Result<Entry, String> {
        let f: Vec<&str> = s.split('|').collect();
        if f.len() != 10 {
            return Err(format!("{} fields in {s:?}", f.len()));
        }
        let int = |i: usize, what: &str| -> Result<i64, String> {
            f[i].parse::<i64>()
                .map_err(|_| format!("{what} {:?} in {s:?}", f[i]))
        };
        let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
        let until = if f[4].is_empty() {
            None
        } else {
            Some(int(4, "lock deadline")?)
        };
        let stored =
            Stored::from_columns(f[1], opt(f[2]), (!f[3].is_empty()).then_some(f[3]), until)?;
        if f[5].is_empty() {
            return Err(format!("no user in {s:?}"));
        }
        let version = int(0, "version")?;
        if version < 0 {
            return Err(format!("negative version in {s:?}"));
        }
        Ok(Entry {
            version,
            stored,
            user: f[5].to_string(),
            validity: Validity {
                from: int(6, "valid_from")?,
                to: int(7, "valid_to")?,
            },
            claimed_at: int(8, "claimed_at")?,
            code: opt(f[9]),
        })
    }
}

/// What a `get` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// One per seq asked, in order: `None` when the shard holds no entry for it (a coupon of
    /// an older gateway, or of a shard restored since: its state is the database's).
    Entries(Vec<Option<Entry>>),
    /// The shard has no metadata: lost, sealed or under repair.
    SlotGone,
}

/// What a `set` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Set {
    Written,
    /// The entry moved on (decide again on it), or is gone (`None`).
    Conflict(Option<Entry>),
    SlotGone,
    /// The shard's log is at its bound: nothing written.
    Backlog,
}

/// Reads the entries of `seqs` (1..=[`MAX_GET`]) on shard `slot`.
pub async fn get<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    seqs: &[u64],
) -> Result<Got, BackendError> {
    let seqs: Vec<String> = seqs.iter().map(u64::to_string).collect();
    let mut argv: Vec<&str> = Vec::with_capacity(seqs.len() + 1);
    argv.push("get");
    argv.extend(seqs.iter().map(String::as_str));
    decode_get(backend.eval(SCRIPT, &keys(slot), &argv).await?, seqs.len())
}

/// Writes `after` (decided on version `after.version - 1`) for coupon `seq` on shard `slot`,
/// with the change record `record` (field/value pairs), unless the log holds `max_log`
/// records (0: no bound).
pub async fn set<B: Backend>(
    backend: &B,
    slot: &SlotKeys,
    seq: u64,
    after: &Entry,
    max_log: u64,
    record: &[(&str, String)],
) -> Result<Set, BackendError> {
    let (seq, ver, entry, max) = (
        seq.to_string(),
        (after.version - 1).to_string(),
        after.encode(),
        max_log.to_string(),
    );
    let mut argv: Vec<&str> = vec!["set", &seq, &ver, &entry, &max];
    for (f, v) in record {
        argv.push(f);
        argv.push(v);
    }
    decode_set(backend.eval(SCRIPT, &keys(slot), &argv).await?)
}

fn entry_or_none(v: &Value) -> Result<Option<Entry>, BackendError> {
    let s = reply::string(SCRIPT, v)?;
    if s.is_empty() {
        return Ok(None);
    }
    Entry::decode(&s)
        .map(Some)
        .map_err(|e| protocol(SCRIPT, format!("entry: {e}")))
}

/// The one decoder of a `get` reply for `n` seqs.
pub fn decode_get(reply: Value, n: usize) -> Result<Got, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    match items.first().map(|c| reply::int(SCRIPT, c)).transpose()? {
        Some(1) if items.len() == n + 1 => Ok(Got::Entries(
            items[1..]
                .iter()
                .map(entry_or_none)
                .collect::<Result<_, _>>()?,
        )),
        Some(-1) if items.len() == 1 => Ok(Got::SlotGone),
        _ => Err(protocol(SCRIPT, format!("unexpected get reply {items:?}"))),
    }
}

/// The one decoder of a `set` reply.
pub fn decode_set(reply: Value) -> Result<Set, BackendError> {
    let items = reply::array(SCRIPT, reply)?;
    match items.first().map(|c| reply::int(SCRIPT, c)).transpose()? {
        Some(1) if items.len() == 1 => Ok(Set::Written),
        Some(0) if items.len() == 2 => Ok(Set::Conflict(entry_or_none(&items[1])?)),
        Some(-1) if items.len() == 1 => Ok(Set::SlotGone),
        Some(-9) if items.len() == 1 => Ok(Set::Backlog),
        _ => Err(protocol(SCRIPT, format!("unexpected set reply {items:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    fn entry(stored: Stored, code: Option<&str>) -> Entry {
        Entry {
            version: 3,
            stored,
            user: "u1".into(),
            validity: Validity { from: 10, to: 20 },
            claimed_at: 10,
            code: code.map(Into::into),
        }
    }

    #[test]
    fn entries_round_trip() {
        for e in [
            entry(Stored::Unused { last: None }, None),
            entry(
                Stored::Locked {
                    order: "o1".into(),
                    until: 15,
                },
                Some("K7"),
            ),
            entry(Stored::Used { order: "o1".into() }, None),
        ] {
            assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        }
        // the claim script's first entry
        let first = Entry::decode("0|unused||||u9|100|200|100|").unwrap();
        assert_eq!((first.version, first.user.as_str()), (0, "u9"));
        assert_eq!(first.stored, Stored::Unused { last: None });
        for bad in [
            "",
            "0|unused||||u9|100|200|100",
            "x|unused||||u9|100|200|100|",
            "0|nope||||u9|100|200|100|",
            "0|unused||||||200|100|",
            "0|locked|o1|locked|x|u9|100|200|100|",
            "-1|unused||||u9|100|200|100|",
        ] {
            assert!(Entry::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_decode() {
        let e = entry(Stored::Unused { last: None }, None);
        let got = Value::Array(vec![Value::Int(1), bulk(&e.encode()), bulk("")]);
        assert_eq!(
            decode_get(got.clone(), 2).unwrap(),
            Got::Entries(vec![Some(e.clone()), None])
        );
        assert!(decode_get(got, 3).is_err());
        assert_eq!(
            decode_get(Value::Array(vec![Value::Int(-1)]), 2).unwrap(),
            Got::SlotGone
        );
        assert_eq!(
            decode_set(Value::Array(vec![Value::Int(1)])).unwrap(),
            Set::Written
        );
        assert_eq!(
            decode_set(Value::Array(vec![Value::Int(0), bulk(&e.encode())])).unwrap(),
            Set::Conflict(Some(e))
        );
        assert_eq!(
            decode_set(Value::Array(vec![Value::Int(0), bulk("")])).unwrap(),
            Set::Conflict(None)
        );
        assert_eq!(
            decode_set(Value::Array(vec![Value::Int(-9)])).unwrap(),
            Set::Backlog
        );
        for bad in [
            Value::Array(vec![Value::Int(0), bulk("junk")]),
            Value::Array(vec![Value::Int(7)]),
            Value::Nil,
        ] {
            assert!(decode_set(bad.clone()).is_err(), "{bad:?}");
        }
    }
}
