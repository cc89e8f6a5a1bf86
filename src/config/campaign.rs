//! The sections of the campaign tools: the product-page lookup and the admin listing of
//! batches (`[catalog]`), and the checkout quote (`[checkout]`). Each `Default` equals its
//! part of `config/claimgate.toml`; [`super::Config::check`] checks the ranges, naming the
//! key.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Batches a product page lookup answers at most (ending soonest first).
    pub max_product_batches: usize,
    /// Batches per page of `GET /v1/batches` when `limit` is not given, and the largest
    /// `limit`.
    pub list_default_page: u32,
    pub list_max_page: u32,
    /// Database rows one listing request reads at most while applying its window filters
    /// (a selective filter answers a short page with a cursor rather than a long scan).
    pub list_max_scan: u32,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            max_product_batches: 50,
            list_default_page: 20,
            list_max_page: 100,
            list_max_scan: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckoutConfig {
    /// Cart lines a quote accepts at most (more: 400).
    pub max_items: usize,
    /// Coupons of the user's wallet a quote considers at most (unused first, then locked,
    /// then expired; each by coupon id).
    pub max_coupons: u32,
}

impl Default for CheckoutConfig {
    fn default() -> Self {
        CheckoutConfig {
            max_items: 100,
            max_coupons: 200,
        }
    }
}

/// `[grants]`: bulk grant jobs (`POST /v1/batches/{id}/grants`, `GET /v1/jobs/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrantsConfig {
    /// Grant claims one instance has in flight at once, over all its jobs (the pipeline
    /// depth: each is one run of the claim script).
    pub concurrency: usize,
    /// Users per spooled chunk: the unit a job is stored, run and checkpointed in (a job
    /// resumed after a crash re-runs at most one chunk, which replays its grants).
    pub chunk_users: usize,
    /// Users (lines) one job takes at most (more: 400, nothing is granted).
    pub max_users: u64,
    /// Longest line of a streamed NDJSON/CSV upload; a longer line is counted `failed`
    /// without being held in memory.
    pub max_line_bytes: usize,
    /// Largest streamed (NDJSON/CSV) upload body (more: 400, nothing is granted).
    pub max_upload_bytes: u64,
    /// Largest `{"user_ids": [...]}` body (read whole, unlike the streamed forms).
    pub max_json_bytes: usize,
    /// Deadline of one upload request (instead of `server.request_timeout_ms`); an upload
    /// the gateway stopped receiving (a crash mid-upload) is marked failed after it.
    pub upload_timeout_ms: u64,
    /// How long a running job belongs to the instance running it; renewed at every chunk.
    /// A job whose lease ran out (its instance died) is resumed by any instance.
    pub lease_ms: u64,
    /// How often an instance looks for jobs to resume (at start, then every this often).
    pub poll_ms: u64,
    /// Attempts of one user's claim on a transient failure (backend unavailable, the
    /// persistence backlog at its bound, stock being rebalanced); then it counts `failed`.
    pub max_attempts: u32,
    /// Pause before the second attempt; doubles per attempt (with jitter).
    pub backoff_ms: u64,
    /// Failure reasons a job keeps (the first ones; every failure is counted).
    pub max_errors: usize,
}

impl Default for GrantsConfig {
    fn default() -> Self {
        GrantsConfig {
            concurrency: 64,
            chunk_users: 1_000,
            max_users: 1_000_000,
            max_line_bytes: 1_024,
            max_upload_bytes: 67_108_864,
            max_json_bytes: 4_194_304,
            upload_timeout_ms: 300_000,
            lease_ms: 15_000,
            poll_ms: 1_000,
            max_attempts: 5,
            backoff_ms: 20,
            max_errors: 20,
        }
    }
}
