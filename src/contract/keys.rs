//! Redis key layout of a batch: one hash tag per slot, so every script touches one slot.
//!
//! A batch `B` with `N` shards owns the slots `{B:pool}` (canonical metadata, the
//! undistributed pool, the batch's version and sold-out flag) and `{B:0}` .. `{B:N-1}`.
//! Every key of a slot is `cg:{B:<slot>}:<name>`:
//!
//! | name      | type   | holds                                                          |
//! |-----------|--------|----------------------------------------------------------------|
//! | `meta`    | hash   | the batch metadata of the slot ([`super::meta`])               |
//! | `stock`   | string | coupons left in the slot                                       |
//! | `users`   | hash   | user -> coupons claimed (shards)                               |
//! | `daily`   | hash   | user -> `<utc day>:<count>` (shards)                           |
//! | `req`     | hash   | `<user>\|<request id>` -> the coupon it got (shards)           |
//! | `req2`    | hash   | the second request-id generation (shards; `lua/rotate.lua`)    |
//! | `log`     | stream | claim records for the persister ([`super::claim_record`])      |
//! | `deny`    | set    | denied users whose home is the shard                           |
//! | `claimed` | string | coupons claimed from the shard, also the coupon sequence       |
//! | `out`     | hash   | transfer outbox: id -> `<destination>\|<amount>\|<created ms>` |
//! | `xseq`    | string | transfer sequence, bumped whenever the slot's stock moves      |
//! | `in:<id>` | string | "transfer `<id>` was credited here" (expires)                  |
//! | `ack`     | string | counter written before a replica wait (`redis.ack = "replica"`) |
//! | `repair`  | string | the repair lock: id of the repairer restoring the slot (expires) |
//! | `codes`   | hash   | the slot's code queue, in a batch that hands out codes         |
//! | `xcodes`  | hash   | transfer id -> the codes an open transfer carries              |
//! | `loads`   | set    | chunk ids of codes added to the batch (pool)                   |
//! | `coupons` | hash   | seq -> the state of a coupon minted here (shards; `lua/coupon.lua`) |
//!
//! Beside the batches' slots, each user has one: `cg:{w:<user>}:recent` ([`recent_key`]).
//!
//! Invariant kept here: every key a script receives is built by this module from the same
//! tag, so a script can never span two cluster slots.

/// The coupons of user `user` changed lately (`lua/recent.lua`): the user's own slot,
/// `cg:{w:<user>}:recent` (a user id has no braces: `domain::ids::valid_ident`).
pub fn recent_key(user: &str) -> String {
    format!("cg:{{w:{user}}}:recent")
}

/// Slot of the pool (`None`) or of shard `i` (`Some(i)`).
pub type SlotId = Option<u32>;

/// The label of a slot in coupon ids, outbox entries and reports: `pool` or the shard index.
pub fn slot_label(slot: SlotId) -> String {
    match slot {
        Some(i) => i.to_string(),
        None => "pool".to_string(),
    }
}

/// The slot a label names (`pool` or a shard index), whether or not the batch has it.
pub fn parse_slot_label(label: &str) -> Option<SlotId> {
    if label == "pool" {
        return Some(None);
    }
    label.parse().ok().map(Some)
}

/// The keys of one slot of a batch, built once and cached with the batch metadata, so the
/// claim path formats no key strings.
#[derive(Debug, Clone)]
pub struct SlotKeys {
    /// The batch id.
    pub batch: String,
    pub slot: SlotId,
    /// [`slot_label`] of `slot`.
    pub label: String,
    pub meta: String,
    pub stock: String,
    pub users: String,
    pub daily: String,
    pub req: String,
    /// The second request-id generation (`lua/rotate.lua`, `lua/claim.lua` KEYS[11]).
    pub req2: String,
    pub log: String,
    pub deny: String,
    pub claimed: String,
    pub outbox: String,
    pub xseq: String,
    /// Written right before a replica wait (see `Backend::confirm`), never read.
    pub fence: String,
    /// The repair lock (`lua/restore.lua` 'fence' takes it, 'finish' releases it).
    pub repair: String,
    /// The code queue (`lua/claim.lua` KEYS[9]).
    pub codes: String,
    /// The codes of open transfers out of the slot (`lua/transfer_out.lua`).
    pub xcodes: String,
    /// Chunk ids of codes added (`lua/codes_add.lua`, on the pool).
    pub loads: String,
    /// The states of the coupons minted in the slot (`lua/claim.lua` KEYS[10],
    /// `lua/coupon.lua`).
    pub coupons: String,
    tag: String,
}

impl SlotKeys {
    pub fn new(batch: &str, slot: SlotId) -> SlotKeys {
        let label = slot_label(slot);
        let tag = format!("{{{batch}:{label}}}");
        let k = |suffix: &str| format!("cg:{tag}:{suffix}");
        SlotKeys {
            batch: batch.to_string(),
            slot,
            meta: k("meta"),
            stock: k("stock"),
            users: k("users"),
            daily: k("daily"),
            req: k("req"),
            req2: k("req2"),
            log: k("log"),
            deny: k("deny"),
            claimed: k("claimed"),
            outbox: k("out"),
            xseq: k("xseq"),
            fence: k("ack"),
            repair: k("repair"),
            codes: k("codes"),
            xcodes: k("xcodes"),
            loads: k("loads"),
            coupons: k("coupons"),
            label,
            tag,
        }
    }

    /// The inbox marker of transfer `tid` arriving in this slot.
    pub fn inbox(&self, tid: &str) -> String {
        format!("cg:{}:in:{tid}", self.tag)
    }

    pub fn is_pool(&self) -> bool {
        self.slot.is_none()
    }
}

/// All slots of a batch: the pool and its shards.
#[derive(Debug, Clone)]
pub struct BatchKeys {
    pub pool: SlotKeys,
    pub shards: Vec<SlotKeys>,
}

impl BatchKeys {
    pub fn new(batch: &str, shards: u32) -> BatchKeys {
        BatchKeys {
            pool: SlotKeys::new(batch, None),
            shards: (0..shards).map(|i| SlotKeys::new(batch, Some(i))).collect(),
        }
    }

    /// The batch id.
    pub fn batch(&self) -> &str {
        &self.pool.batch
    }

    /// The slot `id` of this batch, if the batch has it.
    pub fn slot(&self, id: SlotId) -> Option<&SlotKeys> {
        match id {
            None => Some(&self.pool),
            Some(i) => self.shards.get(i as usize),
        }
    }

    /// Every slot, pool first.
    pub fn all(&self) -> impl Iterator<Item = &SlotKeys> {
        std::iter::once(&self.pool).chain(self.shards.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_slot_share_one_hash_tag() {
        let k = SlotKeys::new("b1", Some(3));
        for key in [
            &k.meta, &k.stock, &k.users, &k.daily, &k.req, &k.log, &k.deny, &k.claimed, &k.outbox,
            &k.fence, &k.repair, &k.xseq, &k.codes, &k.xcodes, &k.loads, &k.coupons,
        ] {
            assert!(key.starts_with("cg:{b1:3}:"), "{key}");
        }
        assert_eq!(k.inbox("t9"), "cg:{b1:3}:in:t9");
        assert_eq!((k.batch.as_str(), k.label.as_str()), ("b1", "3"));
        let pool = SlotKeys::new("b1", None);
        assert_eq!(pool.meta, "cg:{b1:pool}:meta");
        assert_eq!(pool.label, "pool");
    }

    #[test]
    fn labels_name_slots() {
        let keys = BatchKeys::new("sale-1_x", 3);
        assert_eq!(keys.batch(), "sale-1_x");
        for slot in keys.all() {
            let id = parse_slot_label(&slot.label).unwrap();
            assert_eq!(keys.slot(id).unwrap().meta, slot.meta);
        }
        assert_eq!(parse_slot_label("7"), Some(Some(7)));
        assert!(keys.slot(Some(7)).is_none(), "not a shard of this batch");
        assert_eq!(parse_slot_label("x"), None);
        assert_eq!(parse_slot_label("-1"), None);
    }
}
