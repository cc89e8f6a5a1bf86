//! The batch model: what an admin creates, how it is validated, and the fingerprint that
//! tells a retried create from a clash (how it is written to each slot's metadata hash is
//! `crate::contract::meta`'s).
//!
//! Invariant kept here: a batch that passes [`NewBatch::validate`] has a well-formed id,
//! positive stock, limits >= 1, a window with start < end and a coherent validity, every
//! timestamp within [`Timestamp::MIN`]..=[`Timestamp::MAX`] (so no script ever sees
//! metadata it cannot interpret, and every time formats back to RFC 3339), a time zone of
//! the bundled IANA database (or none: UTC), and, with a money budget, a stock whose face
//! values fit in it: `stock * face value <= budget`, kept by every change
//! ([`BatchPatch::validate`] refuses an `add_stock` past it).
//!
//! The budget. A coupon's face value is fixed by the batch's discount
//! ([`Discount::face_value`]: the amount of a fixed or threshold discount, the `max_off` of
//! a percent one; a percent discount without `max_off` has no bounded face value and
//! cannot have a budget), and the discount never changes. So "the sum of the face values
//! granted <= budget" is exactly "coupons granted <= floor(budget / face value)"
//! ([`Batch::budget_cap`]), and the stock is bounded by that. Every unit of stock, in the
//! pool, a shard or a transfer in flight, is one face value of budget reserved: the shards'
//! stock counters ARE the sharded budget, moved by the same idempotent transfers, and
//! `lua/claim.lua`'s stock check (it decrements only stock that is there) is the budget
//! check, atomic per shard. Conservation (`pool + shards + in flight + claimed == total`)
//! then gives `spent = claimed * face <= total * face <= budget`. The pool also holds the
//! cap (`contract::meta` `cap`), and `lua/patch.lua` refuses a total above it, so Redis
//! never holds more stock than the budget pays for, whatever reaches it.
//!
//! Codes. A batch may hand out codes ([`CodeSource`]): each coupon claimed carries one, and
//! one code never goes to two coupons. Its `stock` is then the most codes it may hold: a
//! generated batch gets exactly that many at its create (`domain::codes`), an imported one
//! as many as are imported (`POST /v1/batches/{id}/codes`, deduplicated). Its stock only
//! grows by codes, never by `add_stock`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::codes::CodeSpec;
use super::ids::{valid_batch_id, valid_ident};
pub use super::time::Timestamp;
use super::time::{UnknownZone, Zone};
use crate::config::{Ack, BatchesConfig};

/// Why a batch definition or patch is rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidBatch {
    /// A malformed or incoherent definition or change (400 `bad_request`).
    #[error("{0}")]
    Bad(String),
    /// `timezone` is not a name of the IANA database (400 `unknown_timezone`).
    #[error(transparent)]
    UnknownZone(#[from] UnknownZone),
    /// A change whose stock would cost more than the batch's budget (409 `over_budget`).
    #[error("{0}")]
    OverBudget(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, InvalidBatch> {
    Err(InvalidBatch::Bad(msg.into()))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Validity {
    Relative { days_after_claim: u32 },
    Fixed { start: Timestamp, end: Timestamp },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Discount {
    Threshold {
        threshold: i64,
        amount: i64,
    },
    Fixed {
        amount: i64,
    },
    Percent {
        percent_off: i64,
        max_off: Option<i64>,
    },
}

impl Discount {
    /// The most one coupon can take off an order, in minor units: what it costs the budget.
    /// `None` for a percent discount without `max_off` (unbounded: it cannot have a budget).
    pub fn face_value(&self) -> Option<i64> {
        match *self {
            Discount::Threshold { amount, .. } | Discount::Fixed { amount } => Some(amount),
            Discount::Percent { max_off, .. } => max_off,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    All,
    Products,
    Categories,
    Merchants,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    pub kind: ScopeKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Eligibility {
    pub deny_users: Vec<String>,
    pub require_tags: Vec<String>,
    pub new_users_only: bool,
}

/// `POST /v1/batches` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBatch {
    pub id: Option<String>,
    pub name: String,
    pub stock: i64,
    pub per_user_limit: i64,
    #[serde(default)]
    pub per_user_daily_limit: Option<i64>,
    pub claim_window: Window,
    pub validity: Validity,
    pub discount: Discount,
    pub scope: Scope,
    #[serde(default)]
    pub exclusive: bool,
    #[serde(default)]
    pub eligibility: Eligibility,
    #[serde(default)]
    pub shards: Option<u32>,
    /// When this batch's claims are acknowledged, if not as the deployment says
    /// (`redis.ack`): e.g. `"replica"` for a high-value batch on a `"leader"` deployment.
    #[serde(default)]
    pub ack: Option<Ack>,
    /// IANA time zone of the batch's days (the daily limit resets at its midnight); none =
    /// UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Money budget in minor units: the face values of the coupons granted never sum above
    /// it (see the module documentation).
    #[serde(default)]
    pub budget: Option<i64>,
    /// Codes instead of bare coupon ids (see the module documentation).
    #[serde(default)]
    pub codes: Option<CodeSource>,
}

/// Where a batch's codes come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum CodeSource {
    /// `stock` codes generated at the create: the prefix, `length` random characters of an
    /// alphabet without look-alikes, and a check character (`domain::codes`).
    Generated(CodeSpec),
    /// Partner codes, imported (and deduplicated) after the create. (A struct variant, so
    /// that an unknown field next to `source` is refused.)
    Imported {},
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BatchState {
    Active,
    Paused,
}

impl BatchState {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Active => "active",
            BatchState::Paused => "paused",
        }
    }
}

/// A batch as stored (pool metadata `def`, database `batches` row) and returned by the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Batch {
    pub id: String,
    pub name: String,
    pub stock: i64,
    pub per_user_limit: i64,
    pub per_user_daily_limit: Option<i64>,
    pub claim_window: Window,
    pub validity: Validity,
    pub discount: Discount,
    pub scope: Scope,
    pub exclusive: bool,
    pub eligibility: Eligibility,
    pub shards: u32,
    pub state: BatchState,
    pub created_at: Timestamp,
    /// The batch's own acknowledgement mode (`None`: the deployment's `redis.ack`). Left
    /// out of the stored JSON when `None`, so older definitions (and their fingerprints)
    /// are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
    /// The IANA name of the zone its days are counted in, as the database spells it;
    /// absent = UTC (and absent from the JSON, so definitions and fingerprints of batches
    /// made before zones existed are unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Money budget in minor units; absent = none (absent from the JSON, as above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<i64>,
    /// Codes, if the batch hands them out; absent = none (absent from the JSON, as above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codes: Option<CodeSource>,
}

const MAX_NAME: usize = 256;

impl NewBatch {
    /// Checks every field and produces the stored batch (with `id` generated if absent).
    pub fn validate(self, limits: &BatchesConfig) -> Result<Batch, InvalidBatch> {
        let id = match self.id {
            Some(id) if valid_batch_id(&id) => id,
            Some(_) => return invalid("id must be 1-64 characters of [A-Za-z0-9_-]"),
            None => generate_id(),
        };
        // characters, as the document's `maxLength` counts them (schemathesis: 100 4-byte
        // characters were schema-valid and refused as 400 bytes)
        if self.name.is_empty() || self.name.chars().count() > MAX_NAME {
            return invalid(format!("name must be 1-{MAX_NAME} characters"));
        }
        if self.stock <= 0 || self.stock > limits.max_stock {
            return invalid(format!("stock must be 1..={}", limits.max_stock));
        }
        if self.per_user_limit < 1 {
            return invalid("per_user_limit must be >= 1");
        }
        if self.per_user_daily_limit.is_some_and(|d| d < 1) {
            return invalid("per_user_daily_limit must be >= 1 or null");
        }
        in_range("claim_window.start", self.claim_window.start)?;
        in_range("claim_window.end", self.claim_window.end)?;
        if self.claim_window.start >= self.claim_window.end {
            return invalid("claim_window.start must be before claim_window.end");
        }
        if let Validity::Fixed { start, end } = self.validity {
            in_range("validity.start", start)?;
            in_range("validity.end", end)?;
        }
        match self.validity {
            Validity::Relative { days_after_claim } if !(1..=3650).contains(&days_after_claim) => {
                return invalid("validity.days_after_claim must be 1..=3650");
            }
            Validity::Fixed { start, end } if start >= end => {
                return invalid("validity.start must be before validity.end");
            }
            _ => {}
        }
        match self.discount {
            Discount::Threshold { threshold, amount } if threshold < 0 || amount <= 0 => {
                return invalid("discount: threshold >= 0 and amount > 0");
            }
            Discount::Fixed { amount } if amount <= 0 => {
                return invalid("discount.amount must be > 0");
            }
            Discount::Percent {
                percent_off,
                max_off,
            } if !(1..=100).contains(&percent_off) || max_off.is_some_and(|m| m <= 0) => {
                return invalid("discount: percent_off 1..=100, max_off > 0");
            }
            _ => {}
        }
        if (self.scope.kind == ScopeKind::All) != self.scope.ids.is_empty() {
            return invalid("scope.ids must be empty for kind all and non-empty otherwise");
        }
        if self.scope.ids.iter().any(String::is_empty) {
            return invalid("scope.ids must not hold an empty id");
        }
        let lists = [
            &self.scope.ids,
            &self.eligibility.deny_users,
            &self.eligibility.require_tags,
        ];
        if lists.iter().any(|l| l.len() > limits.max_list_items) {
            return invalid(format!(
                "scope.ids, deny_users and require_tags hold at most {} items",
                limits.max_list_items
            ));
        }
        if self.eligibility.deny_users.iter().any(|u| !valid_ident(u)) {
            return invalid("deny_users must be user ids (1-128 of [A-Za-z0-9._@+-])");
        }
        let shards = self.shards.unwrap_or(limits.default_shards);
        if shards < 1 || shards > limits.max_shards {
            return invalid(format!("shards must be 1..={}", limits.max_shards));
        }
        let timezone = match self.timezone {
            None => None,
            Some(name) => Some(Zone::named(&name)?.name().to_string()),
        };
        if let Some(budget) = self.budget {
            if !(1..=limits.max_budget).contains(&budget) {
                return invalid(format!("budget must be 1..={}", limits.max_budget));
            }
            let Some(face) = self.discount.face_value() else {
                return invalid(
                    "a budget needs a bounded face value: a percent discount with a budget \
                     must give max_off",
                );
            };
            if !within_budget(self.stock, face, budget) {
                return invalid(format!(
                    "stock {} at a face value of {face} costs more than the budget {budget} \
                     (at most {} coupons)",
                    self.stock,
                    budget / face
                ));
            }
        }
        match &self.codes {
            Some(CodeSource::Generated(spec)) => {
                spec.validate().map_err(InvalidBatch::Bad)?;
                if self.stock > limits.max_generated_codes {
                    return invalid(format!(
                        "a batch with generated codes holds at most {} (batches.\
                         max_generated_codes); import larger sets of codes",
                        limits.max_generated_codes
                    ));
                }
                if self.stock as f64 > spec.capacity() / 4.0 {
                    return invalid(format!(
                        "codes.length {} leaves too few codes for stock {}: give a longer \
                         length",
                        spec.length, self.stock
                    ));
                }
            }
            Some(CodeSource::Imported {}) | None => {}
        }
        Ok(Batch {
            id,
            name: self.name,
            stock: self.stock,
            per_user_limit: self.per_user_limit,
            per_user_daily_limit: self.per_user_daily_limit,
            claim_window: self.claim_window,
            validity: self.validity,
            discount: self.discount,
            scope: self.scope,
            exclusive: self.exclusive,
            eligibility: self.eligibility,
            shards,
            state: BatchState::Active,
            created_at: Timestamp::now(),
            ack: self.ack,
            timezone,
            budget: self.budget,
            codes: self.codes,
        })
    }
}

/// `stock` coupons of face value `face` fit in `budget` (no overflow: a product past
/// `i64` does not fit).
fn within_budget(stock: i64, face: i64, budget: i64) -> bool {
    stock.checked_mul(face).is_some_and(|cost| cost <= budget)
}

/// Refuses a time outside [`Timestamp::MIN`]..=[`Timestamp::MAX`] (UTC), naming the field.
fn in_range(field: &str, t: Timestamp) -> Result<(), InvalidBatch> {
    if (Timestamp::MIN..=Timestamp::MAX).contains(&t) {
        Ok(())
    } else {
        invalid(format!(
            "{field} must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z (UTC)"
        ))
    }
}

fn generate_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("b-{suffix}")
}

/// `PATCH /v1/batches/{id}` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPatch {
    pub state: Option<BatchState>,
    pub claim_window_end: Option<Timestamp>,
    pub claim_window: Option<WindowEnd>,
    pub add_stock: Option<i64>,
}

/// `{"claim_window": {"end": "..."}}`: only the end of the window moves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowEnd {
    pub end: Timestamp,
}

impl BatchPatch {
    /// The new window end, however it was spelled.
    pub fn new_end(&self) -> Option<Timestamp> {
        self.claim_window
            .as_ref()
            .map(|w| w.end)
            .or(self.claim_window_end)
    }

    pub fn validate(&self, batch: &Batch, limits: &BatchesConfig) -> Result<(), InvalidBatch> {
        if self.state.is_none() && self.new_end().is_none() && self.add_stock.is_none() {
            return invalid("nothing to change: give state, claim_window.end or add_stock");
        }
        if self.add_stock.is_some() && batch.codes.is_some() {
            return invalid(
                "a batch with codes gets its stock from its codes: import codes \
                 (POST /v1/batches/{id}/codes) instead of add_stock",
            );
        }
        if self.claim_window.is_some() && self.claim_window_end.is_some() {
            return invalid("give the window end once");
        }
        if let Some(end) = self.new_end() {
            in_range("claim_window.end", end)?;
        }
        if self
            .new_end()
            .is_some_and(|end| end <= batch.claim_window.start)
        {
            return invalid("claim_window.end must be after claim_window.start");
        }
        if self
            .add_stock
            .is_some_and(|add| add <= 0 || batch.stock.saturating_add(add) > limits.max_stock)
        {
            return invalid(format!(
                "add_stock must be > 0 and the total at most {}",
                limits.max_stock
            ));
        }
        if let (Some(add), Some(cap)) = (self.add_stock, batch.budget_cap()) {
            let total = batch.stock + add;
            if total > cap {
                return Err(InvalidBatch::OverBudget(format!(
                    "add_stock {add} would make the stock {total}, past the {cap} coupons the \
                     budget {} pays for at a face value of {}; nothing was changed",
                    batch.budget.unwrap_or(0),
                    batch.discount.face_value().unwrap_or(0)
                )));
            }
        }
        Ok(())
    }

    /// Applies the patch to the stored definition.
    pub fn apply(&self, batch: &mut Batch) {
        if let Some(s) = self.state {
            batch.state = s;
        }
        if let Some(end) = self.new_end() {
            batch.claim_window.end = end;
        }
        if let Some(add) = self.add_stock {
            batch.stock += add;
        }
    }
}

impl Batch {
    /// The zone its days are counted in (UTC when it names none). A stored name is one the
    /// bundled database resolved at create, so it resolves again; UTC otherwise.
    pub fn zone(&self) -> Zone {
        match &self.timezone {
            None => Zone::utc(),
            Some(name) => Zone::named(name).unwrap_or_else(|e| {
                tracing::error!(batch = %self.id, error = %e, "stored time zone unknown; UTC");
                Zone::utc()
            }),
        }
    }

    /// The most coupons the budget pays for: `floor(budget / face value)`; `None` without
    /// a budget (or, never after validation, without a bounded face value).
    /// The most stock the pool may ever hold (`contract::meta` `cap`): what the budget pays
    /// for and, in a batch with codes, its declared `stock`.
    pub fn stock_cap(&self) -> Option<i64> {
        let codes = self.codes.as_ref().map(|_| self.stock);
        match (self.budget_cap(), codes) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn budget_cap(&self) -> Option<i64> {
        let budget = self.budget?;
        let face = self.discount.face_value().filter(|f| *f > 0)?;
        Some(budget / face)
    }

    /// The budget spent by `claimed` coupons: their face values.
    pub fn budget_spent(&self, claimed: i64) -> Option<i64> {
        let face = self.discount.face_value().unwrap_or(0);
        self.budget.map(|_| claimed.saturating_mul(face))
    }

    /// Fingerprint of the definition, so a retried create is told apart from a clash.
    pub fn fingerprint(&self) -> String {
        let mut clone = self.clone();
        clone.created_at = Timestamp(0);
        let json = serde_json::to_string(&clone).unwrap_or_default();
        sha1_smol::Sha1::from(json).digest().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchesConfig = BatchesConfig {
        default_shards: 16,
        max_shards: 1024,
        max_stock: 1_000_000_000,
        max_list_items: 10_000,
        max_budget: 1_000_000_000_000,
        max_generated_codes: 1_000,
        codes_chunk: 100,
        max_codes_json_bytes: 4096,
        max_codes_upload_bytes: 4096,
        retire_after_ms: 7 * 86_400_000,
        request_id_retention_ms: 86_400_000,
        retire_every_ms: 60_000,
    };

    #[test]
    fn batches_with_codes() {
        let new = |codes: &str| -> Result<Batch, InvalidBatch> {
            serde_json::from_str::<NewBatch>(&body(&format!(r#","codes":{codes}"#)))
                .map_err(|e| InvalidBatch::Bad(e.to_string()))?
                .validate(&LIMITS)
        };
        let b = new(r#"{"source":"generated","prefix":"SALE-","length":8}"#).unwrap();
        assert_eq!(
            b.codes,
            Some(CodeSource::Generated(CodeSpec {
                prefix: "SALE-".into(),
                length: 8
            }))
        );
        assert_eq!(b.stock_cap(), Some(100), "its stock is its cap");
        let b = new(r#"{"source":"imported"}"#).unwrap();
        assert_eq!(b.codes, Some(CodeSource::Imported {}));
        // the definition keeps them, and a batch without codes shows none
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains(r#""codes":{"source":"imported"}"#), "{json}");
        let plain = serde_json::from_str::<NewBatch>(&body(""))
            .unwrap()
            .validate(&LIMITS)
            .unwrap();
        assert!(!serde_json::to_string(&plain).unwrap().contains("codes"));
        assert_eq!(plain.stock_cap(), None);
        for bad in [
            r#"{"source":"generated","length":5}"#,
            r#"{"source":"generated","prefix":"a b","length":8}"#,
            r#"{"source":"minted"}"#,
            r#"{"source":"imported","extra":1}"#,
            r#"{"source":"generated","length":8,"charset":"x"}"#,
            // 30^6 / 4 codes at most: stock 100 fits, a longer prefix changes nothing
            r#"{"prefix":"X","length":8}"#,
        ] {
            assert!(new(bad).is_err(), "{bad}");
        }
        // past batches.max_generated_codes (1000 here), or too many for the length
        let over = serde_json::from_str::<NewBatch>(
            &body(r#","codes":{"source":"generated","length":8}"#)
                .replace(r#""stock":100"#, r#""stock":1001"#),
        )
        .unwrap();
        assert!(over.validate(&LIMITS).is_err());
        // add_stock is refused: the stock of a batch with codes comes from its codes
        let b = new(r#"{"source":"imported"}"#).unwrap();
        let add: BatchPatch = serde_json::from_str(r#"{"add_stock":5}"#).unwrap();
        assert!(add.validate(&b, &LIMITS).is_err());
        let pause: BatchPatch = serde_json::from_str(r#"{"state":"paused"}"#).unwrap();
        assert!(pause.validate(&b, &LIMITS).is_ok());
    }

    fn body(extra: &str) -> String {
        format!(
            r#"{{"name":"5 off","stock":100,"per_user_limit":1,
            "claim_window":{{"start":"2026-11-11T00:00:00Z","end":"2026-11-12T00:00:00Z"}},
            "validity":{{"days_after_claim":7}},
            "discount":{{"kind":"threshold","threshold":10000,"amount":500}},
            "scope":{{"kind":"all"}}{extra}}}"#
        )
    }

    #[test]
    fn a_valid_batch_gets_defaults() {
        let nb: NewBatch = serde_json::from_str(&body("")).unwrap();
        let b = nb.validate(&LIMITS).unwrap();
        assert_eq!(b.shards, 16);
        assert!(valid_batch_id(&b.id));
        assert_eq!(b.claim_window.start.to_rfc3339(), "2026-11-11T00:00:00Z");
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(json["claim_window"]["end"], "2026-11-12T00:00:00Z");
        assert_eq!(json["discount"]["kind"], "threshold");
    }

    #[test]
    fn bad_definitions_are_rejected() {
        for extra in [
            r#","id":"a{b}""#,
            r#","id":"""#,
            r#","shards":0"#,
            r#","shards":100000"#,
            r#","per_user_daily_limit":0"#,
            r#","eligibility":{"deny_users":["a b"]}"#,
        ] {
            let nb: NewBatch = serde_json::from_str(&body(extra)).unwrap();
            assert!(nb.validate(&LIMITS).is_err(), "{extra}");
        }
        assert!(serde_json::from_str::<NewBatch>(&body(r#","bogus":1"#)).is_err());
        // a name of MAX_NAME characters of 4 bytes each is valid, one more is not
        let long = |n: usize| body("").replace("5 off", &"\u{1F600}".repeat(n));
        let nb: NewBatch = serde_json::from_str(&long(MAX_NAME)).unwrap();
        assert!(nb.validate(&LIMITS).is_ok());
        let nb: NewBatch = serde_json::from_str(&long(MAX_NAME + 1)).unwrap();
        assert!(nb.validate(&LIMITS).is_err());
        // an empty scope id (schemathesis: the schema now says minLength 1)
        let empty_id = body("").replace(
            r#""scope":{"kind":"all"}"#,
            r#""scope":{"kind":"products","ids":["p1",""]}"#,
        );
        assert!(empty_id.contains(r#""ids":["p1",""]"#), "{empty_id}");
        let nb: NewBatch = serde_json::from_str(&empty_id).unwrap();
        assert!(nb.validate(&LIMITS).is_err());
        let nb: NewBatch = serde_json::from_str(&empty_id.replace(r#","""#, "")).unwrap();
        assert!(nb.validate(&LIMITS).is_ok());
        let bad_window = body("").replace("2026-11-12", "2026-11-10");
        let nb: NewBatch = serde_json::from_str(&bad_window).unwrap();
        assert!(nb.validate(&LIMITS).is_err());
    }

    /// Regression (hardening item 7): a fixed validity before 1970 was accepted (then every
    /// replay of its claims failed with 500). Every timestamp must lie in what the scripts
    /// and RFC 3339 can carry, whatever UTC offset it was written with.
    #[test]
    fn item7_timestamps_outside_1970_to_9999_are_rejected() {
        let with = |window: (&str, &str), validity: (&str, &str)| {
            body("")
                .replace(
                    r#""start":"2026-11-11T00:00:00Z","end":"2026-11-12T00:00:00Z""#,
                    &format!(r#""start":"{}","end":"{}""#, window.0, window.1),
                )
                .replace(
                    r#"{"days_after_claim":7}"#,
                    &format!(r#"{{"start":"{}","end":"{}"}}"#, validity.0, validity.1),
                )
        };
        let ok_window = ("2026-11-11T00:00:00Z", "2026-11-12T00:00:00Z");
        let ok_validity = ("2026-11-11T00:00:00Z", "2027-11-12T00:00:00Z");
        for (window, validity) in [
            (
                ok_window,
                ("1969-12-31T23:59:59.999Z", "2027-01-01T00:00:00Z"),
            ),
            (ok_window, ("1960-01-01T00:00:00Z", "1961-01-01T00:00:00Z")),
            (
                ok_window,
                ("1970-01-01T00:30:00+01:00", "2027-01-01T00:00:00Z"),
            ),
            (
                ok_window,
                ("2026-01-01T00:00:00Z", "9999-12-31T23:59:59-00:01"),
            ),
            (
                ("1969-01-01T00:00:00Z", "2026-11-12T00:00:00Z"),
                ok_validity,
            ),
            (
                ("2026-01-01T00:00:00Z", "9999-12-31T23:00:00-05:00"),
                ok_validity,
            ),
            (
                ("0000-01-01T00:00:00+01:00", "2026-11-12T00:00:00Z"),
                ok_validity,
            ),
        ] {
            let json = with(window, validity);
            let nb: NewBatch = serde_json::from_str(&json).unwrap();
            assert!(nb.validate(&LIMITS).is_err(), "{window:?} {validity:?}");
        }
        // the edges themselves are fine
        let nb: NewBatch = serde_json::from_str(&with(
            ("1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z"),
            ("1970-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z"),
        ))
        .unwrap();
        let b = nb.validate(&LIMITS).unwrap();
        assert_eq!(b.claim_window.start, Timestamp::MIN);
        assert_eq!(b.claim_window.end, Timestamp::MAX);
        assert_eq!(Timestamp::MAX.to_rfc3339(), "9999-12-31T23:59:59.999Z");
        assert_eq!(Timestamp::MIN.to_rfc3339(), "1970-01-01T00:00:00Z");
        // a patch cannot move the window end out of range
        for end in ["9999-12-31T23:59:59-01:00", "1969-12-31T00:00:00Z"] {
            let p: BatchPatch =
                serde_json::from_str(&format!(r#"{{"claim_window":{{"end":"{end}"}}}}"#)).unwrap();
            assert!(p.validate(&b, &LIMITS).is_err(), "{end}");
        }
    }

    /// Issue 11 item 3: a zone is an IANA name (stored as the database spells it, unknown
    /// ones refused with their own error); a batch without one serializes as before.
    #[test]
    fn time_zones_are_checked_and_absent_ones_change_nothing() {
        let nb: NewBatch = serde_json::from_str(&body(r#","timezone":"asia/shanghai""#)).unwrap();
        let b = nb.validate(&LIMITS).unwrap();
        assert_eq!(b.timezone.as_deref(), Some("Asia/Shanghai"));
        assert_eq!(b.zone().name(), "Asia/Shanghai");
        let nb: NewBatch = serde_json::from_str(&body(r#","timezone":"Mars/Olympus""#)).unwrap();
        assert!(matches!(
            nb.validate(&LIMITS),
            Err(InvalidBatch::UnknownZone(_))
        ));
        let nb: NewBatch = serde_json::from_str(&body(r#","timezone":null"#)).unwrap();
        let b = nb.validate(&LIMITS).unwrap();
        assert_eq!((b.timezone.as_deref(), b.zone().name()), (None, "UTC"));
        // no new keys in the stored JSON of a batch without zone or budget: its definition
        // and fingerprint are what they were before both existed
        let json = serde_json::to_value(&b).unwrap();
        assert!(
            json.get("timezone").is_none() && json.get("budget").is_none(),
            "{json}"
        );
        let old: Batch = serde_json::from_value(json).unwrap();
        assert_eq!(old.fingerprint(), b.fingerprint());
    }

    /// Issue 11 item 3: a budget bounds the stock at floor(budget / face value), at create
    /// and at every `add_stock`; a percent discount needs `max_off` to have one.
    #[test]
    fn budgets_bound_the_stock() {
        // threshold 500 off: 100 coupons cost 50000
        let with = |extra: &str| -> Result<Batch, InvalidBatch> {
            serde_json::from_str::<NewBatch>(&body(extra))
                .unwrap()
                .validate(&LIMITS)
        };
        let b = with(r#","budget":50000"#).unwrap();
        assert_eq!((b.budget, b.budget_cap()), (Some(50000), Some(100)));
        assert_eq!(b.budget_spent(7), Some(3500));
        assert!(matches!(
            with(r#","budget":49999"#),
            Err(InvalidBatch::Bad(_))
        ));
        assert!(with(r#","budget":0"#).is_err());
        assert!(with(r#","budget":1000000000001"#).is_err());
        let percent = |extra: &str| {
            body(extra).replace(
                r#"{"kind":"threshold","threshold":10000,"amount":500}"#,
                r#"{"kind":"percent","percent_off":10}"#,
            )
        };
        let nb: NewBatch = serde_json::from_str(&percent(r#","budget":1000000"#)).unwrap();
        assert!(matches!(nb.validate(&LIMITS), Err(InvalidBatch::Bad(_))));
        let nb: NewBatch = serde_json::from_str(&percent("")).unwrap();
        let p = nb.validate(&LIMITS).unwrap();
        assert_eq!((p.budget_cap(), p.budget_spent(5)), (None, None));
        let capped = percent(r#","budget":1000000"#).replace(
            r#""percent_off":10}"#,
            r#""percent_off":10,"max_off":2000}"#,
        );
        let nb: NewBatch = serde_json::from_str(&capped).unwrap();
        assert_eq!(nb.validate(&LIMITS).unwrap().budget_cap(), Some(500));
        // a product past i64 does not fit (no overflow)
        assert!(!within_budget(i64::MAX, 2, i64::MAX));

        // add_stock up to the cap, not past it, and not past it in steps either
        let mut b = with(r#","budget":50250"#).unwrap();
        let add = |n: i64| -> BatchPatch {
            serde_json::from_str(&format!(r#"{{"add_stock":{n}}}"#)).unwrap()
        };
        assert!(matches!(
            add(1).validate(&b, &LIMITS),
            Err(InvalidBatch::OverBudget(_))
        ));
        b.budget = Some(51000);
        assert!(matches!(
            add(3).validate(&b, &LIMITS),
            Err(InvalidBatch::OverBudget(_))
        ));
        add(2).validate(&b, &LIMITS).unwrap();
        add(2).apply(&mut b);
        assert_eq!(b.stock, 102);
        assert!(matches!(
            add(1).validate(&b, &LIMITS),
            Err(InvalidBatch::OverBudget(_))
        ));
        // other changes of a batch at its cap are fine
        let pause: BatchPatch = serde_json::from_str(r#"{"state":"paused"}"#).unwrap();
        pause.validate(&b, &LIMITS).unwrap();
    }

    #[test]
    fn patches_validate_and_apply() {
        let nb: NewBatch = serde_json::from_str(&body("")).unwrap();
        let mut b = nb.validate(&LIMITS).unwrap();
        let p: BatchPatch = serde_json::from_str(r#"{"state":"paused","add_stock":5}"#).unwrap();
        p.validate(&b, &LIMITS).unwrap();
        p.apply(&mut b);
        assert_eq!((b.state, b.stock), (BatchState::Paused, 105));
        let p: BatchPatch = serde_json::from_str(r#"{}"#).unwrap();
        assert!(p.validate(&b, &LIMITS).is_err());
        let p: BatchPatch =
            serde_json::from_str(r#"{"claim_window":{"end":"2020-01-01T00:00:00Z"}}"#).unwrap();
        assert!(p.validate(&b, &LIMITS).is_err());
    }
}
