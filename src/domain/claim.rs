//! What the shard logs record, as the database keeps it: a claim (what the claim script
//! writes for every coupon it mints) and a coupon's state change decided in Redis (what a
//! coupon-state script writes for a coupon whose state lives there); see
//! `crate::contract::claim_record` for the stream fields.
//!
//! Invariants kept here: a record names its coupon once and consistently: the coupon id's
//! batch and shard are the record's (`<batch>.<shard>.<seq>`, [`super::ids`]); a change
//! names the row version it creates (every transition adds 1 to the coupon row's
//! `version`, starting from 0 at the claim), so it is written at most once.

use super::coupon::{Event, Stored};

/// One successful claim, as the claim script recorded it in the shard's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    pub seq: u64,
    pub user_id: String,
    /// `None` when the client sent no request id.
    pub request_id: Option<String>,
    pub claimed_at: i64,
    pub valid_from: i64,
    pub valid_to: i64,
    /// The code the coupon carries, in a batch that hands out codes.
    pub code: Option<String>,
    /// The coupon's state lives in Redis (its shard decides and logs every transition as a
    /// [`ChangeRecord`]); `false` for coupons whose state the database decides (and for the
    /// records of gateways from before Redis-side coupon state).
    pub managed: bool,
}

/// One transition of a managed coupon, decided atomically in Redis (by the same state
/// machine, [`super::coupon::decide`]) and appended to the shard's log after the coupon's
/// claim record. The persister writes it as the database's own transitions are written:
/// the coupon row, then one `coupon_events` row and one outbox row per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// `<batch>.<shard>.<seq>`, of the log's batch and shard.
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    /// The coupon id's sequence.
    pub seq: u64,
    /// The coupon row version this change creates (>= 1: a claimed row is version 0, each
    /// transition adds 1). A row already at or past it has the change (a redelivery).
    pub version: i64,
    /// The state after the change, as the row stores it ([`Stored::columns`]).
    pub next: Stored,
    /// What happened, in order (at least one; never `claimed`).
    pub events: Vec<Event>,
    /// When it was decided, ms (the row's `updated_at`, the events' time).
    pub at: i64,
}
