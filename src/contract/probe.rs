//! `lua/probe.lua`: the read-only view of one slot that sold-out detection, the census, the
//! sweeper, the persister's backlog probe and the rebuild all read.
//!
//! Invariant kept here: ONE decoder reads the reply and the outbox entries
//! (`<destination>|<amount>|<created ms>`, as `lua/transfer_out.lua` writes them); an entry
//! in any other form is a protocol error, never skipped or read as zero (a skipped entry
//! would hide stock in flight).

use super::keys::{SlotId, SlotKeys, parse_slot_label};
use super::reply::{self, protocol};
use crate::backend::{Backend, BackendError, Script, Value};

const SCRIPT: Script = Script::Probe;

/// A transfer out of the slot not yet closed (its stock is on its way, or arrived and the
/// entry is not removed yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub transfer_id: String,
    /// The slot the stock goes to (a label, which need not name a slot of the batch).
    pub destination: SlotId,
    pub amount: i64,
    pub created_ms: i64,
}

/// One slot as `probe.lua` sees it, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    pub stock: i64,
    /// Transfer sequence: moves whenever the slot's stock moves (not on claims).
    pub xseq: i64,
    /// Coupons claimed from the slot (the coupon sequence).
    pub claimed: i64,
    pub log_len: u64,
    /// Milliseconds part of the oldest log entry id, if any.
    pub oldest_log_ms: Option<i64>,
    /// The slot's definition version (0 = the slot does not exist).
    pub version: i64,
    pub outbox: Vec<OutboxEntry>,
}

/// KEYS, in the script's order.
pub fn keys(slot: &SlotKeys) -> [&str; 6] {
    [
        &slot.stock,
        &slot.outbox,
        &slot.xseq,
        &slot.claimed,
        &slot.log,
        &slot.meta,
    ]
}

/// Reads `slot`.
pub async fn call<B: Backend>(backend: &B, slot: &SlotKeys) -> Result<Probe, BackendError> {
    decode(backend.eval(SCRIPT, &keys(slot), &[]).await?)
}

/// The one decoder of `probe.lua`'s reply.
pub fn decode(reply: Value) -> Result<Probe, BackendError> {
    let mut items = reply::array(SCRIPT, reply)?;
    if items.len() != 7 {
        return Err(protocol(SCRIPT, format!("{} items, not 7", items.len())));
    }
    let outbox = reply::pairs(SCRIPT, items.pop().unwrap_or(Value::Nil))?
        .into_iter()
        .map(|(id, value)| outbox_entry(id, &value))
        .collect::<Result<_, _>>()?;
    let oldest = reply::string(SCRIPT, &items[4])?;
    Ok(Probe {
        stock: reply::int(SCRIPT, &items[0])?,
        xseq: reply::int(SCRIPT, &items[1])?,
        claimed: reply::int(SCRIPT, &items[2])?,
        log_len: reply::count(SCRIPT, &items[3])?,
        oldest_log_ms: match oldest.as_str() {
            "" => None,
            id => Some(stream_id_ms(id).ok_or_else(|| protocol(SCRIPT, format!("log id {id:?}")))?),
        },
        version: reply::int(SCRIPT, &items[5])?,
        outbox,
    })
}

fn outbox_entry(transfer_id: String, value: &str) -> Result<OutboxEntry, BackendError> {
    let bad = || protocol(SCRIPT, format!("outbox entry {transfer_id} = {value:?}"));
    let mut parts = value.split('|');
    let (Some(dst), Some(amount), Some(created), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok(OutboxEntry {
        destination: parse_slot_label(dst).ok_or_else(bad)?,
        amount: amount.parse().map_err(|_| bad())?,
        created_ms: created.parse().map_err(|_| bad())?,
        transfer_id,
    })
}

/// Milliseconds part of a stream entry id `<ms>-<seq>`.
pub fn stream_id_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::reply::bulk;

    fn reply(outbox: Vec<Value>, oldest: &str) -> Value {
        Value::Array(vec![
            Value::Int(5),
            Value::Int(2),
            Value::Int(9),
            Value::Int(1),
            bulk(oldest),
            Value::Int(3),
            Value::Array(outbox),
        ])
    }

    #[test]
    fn reads_a_slot() {
        let p = decode(reply(
            vec![
                bulk("t1"),
                bulk("pool|4|1700"),
                bulk("t2"),
                bulk("3|1|1800"),
            ],
            "1700000-2",
        ))
        .unwrap();
        assert_eq!(
            (p.stock, p.xseq, p.claimed, p.log_len, p.version),
            (5, 2, 9, 1, 3)
        );
        assert_eq!(p.oldest_log_ms, Some(1_700_000));
        assert_eq!(
            p.outbox,
            [
                OutboxEntry {
                    transfer_id: "t1".into(),
                    destination: None,
                    amount: 4,
                    created_ms: 1700
                },
                OutboxEntry {
                    transfer_id: "t2".into(),
                    destination: Some(3),
                    amount: 1,
                    created_ms: 1800
                }
            ]
        );
        assert_eq!(decode(reply(vec![], "")).unwrap().oldest_log_ms, None);
    }

    #[test]
    fn a_malformed_outbox_entry_is_an_error_not_a_skip() {
        for bad in ["pool|4", "x|4|1", "1|four|1", "1|4|1|extra", ""] {
            let r = decode(reply(vec![bulk("t"), bulk(bad)], ""));
            assert!(r.is_err(), "{bad:?}");
        }
        assert!(decode(Value::Array(vec![Value::Int(1)])).is_err());
        assert_eq!(stream_id_ms("1700-3"), Some(1700));
    }
}
