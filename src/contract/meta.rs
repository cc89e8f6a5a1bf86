//! A slot's metadata hash (`cg:{<batch>:<slot>}:meta`): the fields `lua/setup.lua`,
//! `lua/patch.lua` and `lua/restore.lua` write, and `lua/claim.lua` reads.
//!
//! | field     | slots  | meaning                                                        |
//! |-----------|--------|----------------------------------------------------------------|
//! | `state`   | all    | `active` or `paused`                                           |
//! | `start`   | all    | claim window start, ms                                         |
//! | `end`     | all    | claim window end, ms                                           |
//! | `limit`   | all    | per-user limit                                                 |
//! | `daily`   | all    | per-user daily limit (0 = none)                                |
//! | `vdays`   | all    | validity in days after the claim (0 = fixed validity)          |
//! | `vfrom`   | all    | fixed validity start, ms (when `vdays` is 0)                   |
//! | `vto`     | all    | fixed validity end, ms                                         |
//! | `shards`  | all    | shard count                                                    |
//! | `ver`     | all    | definition version (from the database; only grows)             |
//! | `fp`      | all    | definition fingerprint (a retried create vs a clash)           |
//! | `total`   | pool   | total stock of the batch                                       |
//! | `cap`     | pool   | most stock the batch's budget pays for (absent = no budget);   |
//! |           |        | `lua/patch.lua` refuses a total above it                       |
//! | `soldout` | pool   | `1` once the batch is sold out                                 |
//! | `def`     | pool   | the whole definition, JSON                                     |
//! | `lost`    | shards | coupon sequences a rebuild found issued but never persisted    |
//! | `epoch`   | all    | coupon-id epoch (absent = 0; every rebuild moves to a new one)  |
//!
//! Invariant kept here: the fields are named only here (and in the scripts): [`fields`]
//! writes the definition's part, [`SlotMeta`] is the one reader.

use std::collections::HashMap;

use crate::domain::batch::{Batch, Validity};

/// The definition fields of every slot's meta at `version`: what [`SlotMeta`] and
/// `lua/claim.lua` read back. The pool adds `total`, `soldout` and `def`; every slot `fp`.
pub fn fields(batch: &Batch, version: u64) -> Vec<(&'static str, String)> {
    let (vdays, vfrom, vto) = match batch.validity {
        Validity::Relative { days_after_claim } => (i64::from(days_after_claim), 0, 0),
        Validity::Fixed { start, end } => (0, start.0, end.0),
    };
    vec![
        ("state", batch.state.as_str().to_string()),
        ("start", batch.claim_window.start.0.to_string()),
        ("end", batch.claim_window.end.0.to_string()),
        ("limit", batch.per_user_limit.to_string()),
        ("daily", batch.per_user_daily_limit.unwrap_or(0).to_string()),
        ("vdays", vdays.to_string()),
        ("vfrom", vfrom.to_string()),
        ("vto", vto.to_string()),
        ("shards", batch.shards.to_string()),
        (VERSION, version.to_string()),
        (
            CODES,
            if batch.codes.is_some() { "1" } else { "0" }.to_string(),
        ),
    ]
}

/// Whether the batch hands out codes (`'1'`; `lua/claim.lua` reads it).
pub const CODES: &str = "codes";

/// The definition fingerprint field.
pub const FINGERPRINT: &str = "fp";
/// The version field.
pub const VERSION: &str = "ver";
/// The pool's total stock field.
pub const TOTAL: &str = "total";
/// The pool's stock cap: `floor(budget / face value)` (`Batch::budget_cap`).
pub const CAP: &str = "cap";
/// The pool's sold-out flag.
pub const SOLD_OUT: &str = "soldout";
/// The pool's definition (JSON).
pub const DEFINITION: &str = "def";
/// A rebuilt shard's count of coupon sequences issued but never persisted.
pub const LOST: &str = "lost";
/// The coupon-id epoch `lua/claim.lua` mints in (see `domain::ids::EPOCH_SPAN`).
pub const EPOCH: &str = "epoch";

/// The pool's extra fields: its total, not sold out, the definition as JSON and, with a
/// budget, the stock cap.
pub fn pool_fields(batch: &Batch) -> Vec<(&'static str, String)> {
    // a batch with codes starts empty: its stock arrives with its codes (lua/codes_add.lua)
    let total = if batch.codes.is_some() {
        0
    } else {
        batch.stock
    };
    let mut f = vec![
        (TOTAL, total.to_string()),
        (SOLD_OUT, "0".to_string()),
        (DEFINITION, serde_json::to_string(batch).unwrap_or_default()),
    ];
    if let Some(cap) = batch.stock_cap() {
        f.push((CAP, cap.to_string()));
    }
    f
}

/// A slot's metadata hash as read (empty: the slot does not exist).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMeta {
    fields: HashMap<String, String>,
}

impl SlotMeta {
    pub fn new(pairs: Vec<(String, String)>) -> SlotMeta {
        SlotMeta {
            fields: pairs.into_iter().collect(),
        }
    }

    /// The slot does not exist (its meta is written last, so this is also "not live").
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    /// The definition version (0 when absent or unreadable).
    pub fn version(&self) -> i64 {
        self.get(VERSION).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    pub fn fingerprint(&self) -> Option<&str> {
        self.get(FINGERPRINT)
    }

    /// The pool's total stock.
    pub fn total(&self) -> Option<i64> {
        self.get(TOTAL).and_then(|t| t.parse().ok())
    }

    pub fn sold_out(&self) -> bool {
        self.get(SOLD_OUT) == Some("1")
    }

    /// The coupon-id epoch the slot mints in (0 when absent: never rebuilt).
    pub fn epoch(&self) -> u64 {
        self.get(EPOCH).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// Sequences a rebuild counted as issued but lost (0 when none).
    pub fn lost(&self) -> u64 {
        self.get(LOST).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// The pool's definition: `None` when absent, an error naming the cause when it does
    /// not parse.
    pub fn definition(&self) -> Option<Result<Batch, String>> {
        self.get(DEFINITION)
            .map(|d| serde_json::from_str(d).map_err(|e| e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_read_back() {
        let meta = SlotMeta::new(vec![
            ("ver".into(), "7".into()),
            ("soldout".into(), "1".into()),
            ("total".into(), "100".into()),
            ("fp".into(), "abc".into()),
        ]);
        assert_eq!(
            (meta.version(), meta.sold_out(), meta.total()),
            (7, true, Some(100))
        );
        assert_eq!(meta.fingerprint(), Some("abc"));
        assert_eq!(meta.lost(), 0);
        assert!(meta.definition().is_none());
        assert!(SlotMeta::default().is_empty());
    }
}
