//! Redis key layout of a batch: one hash tag per slot, so every script touches one slot.
//!
//! A batch `B` with `N` shards owns the slots `{B:pool}` (canonical metadata, the
//! undistributed pool, the batch's version and sold-out flag) and `{B:0}` .. `{B:N-1}`.
//! Invariant kept here: every key a script receives is built by this module from the same
//! tag, so a script can never span two cluster slots.

/// Slot of the pool (`None`) or of shard `i` (`Some(i)`).
pub type SlotId = Option<u32>;

/// The keys of one slot of a batch, built once and cached with the batch metadata, so the
/// claim path formats no key strings.
#[derive(Debug, Clone)]
pub struct SlotKeys {
    pub slot: SlotId,
    pub meta: String,
    pub stock: String,
    pub users: String,
    pub daily: String,
    pub req: String,
    pub log: String,
    pub deny: String,
    pub claimed: String,
    pub outbox: String,
    pub xseq: String,
    tag: String,
}

impl SlotKeys {
    pub fn new(batch: &str, slot: SlotId) -> SlotKeys {
        let tag = match slot {
            Some(i) => format!("{{{batch}:{i}}}"),
            None => format!("{{{batch}:pool}}"),
        };
        let k = |suffix: &str| format!("cg:{tag}:{suffix}");
        SlotKeys {
            slot,
            meta: k("meta"),
            stock: k("stock"),
            users: k("users"),
            daily: k("daily"),
            req: k("req"),
            log: k("log"),
            deny: k("deny"),
            claimed: k("claimed"),
            outbox: k("out"),
            xseq: k("xseq"),
            tag,
        }
    }

    /// Keys of `lua/claim.lua`, in its KEYS order.
    pub fn claim_keys(&self) -> [&str; 8] {
        [
            &self.meta,
            &self.stock,
            &self.users,
            &self.daily,
            &self.req,
            &self.log,
            &self.deny,
            &self.claimed,
        ]
    }

    /// Keys of `lua/probe.lua`, in its KEYS order.
    pub fn probe_keys(&self) -> [&str; 6] {
        [
            &self.stock,
            &self.outbox,
            &self.xseq,
            &self.claimed,
            &self.log,
            &self.meta,
        ]
    }

    /// The inbox marker of transfer `tid` arriving in this slot.
    pub fn inbox(&self, tid: &str) -> String {
        format!("cg:{}:in:{tid}", self.tag)
    }

    /// Shard index as written in coupon ids and outbox entries (`pool` for the pool).
    pub fn label(&self) -> String {
        match self.slot {
            Some(i) => i.to_string(),
            None => "pool".to_string(),
        }
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

    /// The slot named by an outbox destination or coupon id label.
    pub fn by_label(&self, label: &str) -> Option<&SlotKeys> {
        if label == "pool" {
            return Some(&self.pool);
        }
        self.shards.get(label.parse::<usize>().ok()?)
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
        for key in k.claim_keys().iter().chain(k.probe_keys().iter()) {
            assert!(key.contains("{b1:3}"), "{key}");
        }
        assert_eq!(k.inbox("t9"), "cg:{b1:3}:in:t9");
        assert_eq!(SlotKeys::new("b1", None).meta, "cg:{b1:pool}:meta");
    }
}
