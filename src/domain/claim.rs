//! A claim as it is recorded: what the claim script writes to its shard's log stream (see
//! `crate::contract::claim_record` for the stream fields) and what the database keeps.
//!
//! Invariant kept here: a claim record names its coupon once and consistently: the coupon
//! id's batch and shard are the record's (`<batch>.<shard>.<seq>`, [`super::ids`]).

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
}
