//! Sharded stock: the claim on the user's home shard with its refills ([`claim`]), the
//! crash-safe transfers between slots and their sweeper ([`transfer`]), the census (the ONE
//! conservation check, [`census`]), and the batch definition in Redis: setup and versioned
//! changes ([`definition`]), and the hint of a minted claim to the local persister
//! ([`activity`]). Everything here runs scripts through `crate::contract`.
//!
//! Invariants kept here:
//! - stock only moves between slots through a two-phase transfer (outbox in the source,
//!   credited-once marker in the destination, outbox entry closed last), so a crash between
//!   the halves never creates stock and the sweeper always finishes it;
//! - conservation: pool + Σ shard stock + in-flight transfers + Σ claimed == total, with
//!   one definition of "in flight" ([`census`]);
//! - "sold out" is recorded only after two scans of every slot that saw no stock, no
//!   in-flight transfer and no movement (transfer sequence numbers unchanged) in between;
//! - a definition change reaches a slot only at a version newer than the slot's (versions
//!   come from the database), with the absolute total, shards first and the pool last: a
//!   pool at version v proves every shard is at v or newer.

pub mod activity;
pub mod census;
pub mod claim;
pub mod definition;
pub mod faults;
pub mod gate;
pub mod group;
pub mod transfer;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use thiserror::Error;

use crate::backend::{Backend, BackendError};
use crate::config::StockConfig;
use crate::contract::events::{self, Event};
use crate::contract::keys::SlotKeys;
use crate::contract::{meta_get, probe};

pub use self::activity::ClaimActivity;
pub use self::census::Conservation;
pub use self::claim::{ClaimArgs, ClaimResult};
pub use self::faults::{FaultKind, FaultReporter, ShardFault};
pub use self::group::GroupCommit;
pub use self::transfer::TransferKind;

#[derive(Debug, Error)]
pub enum StockError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("batch id already used by a different batch")]
    Conflict,
    #[error("batch not found")]
    NotFound,
    /// The batch's state in Redis contradicts itself (e.g. an outbox entry names a slot the
    /// batch does not have, or a change would shrink the total).
    #[error("inconsistent batch state: {0}")]
    Inconsistent(String),
    /// The shard's group-commit queue is at `stock.group_max_queue`: nothing claimed.
    #[error("too many claims queued for one shard; nothing was claimed")]
    Shed,
    /// The database did not record the codes a transfer takes out of the pool (they stay
    /// in the transfer's outbox entry until it does: the sweeper finishes it).
    #[error("the database did not record codes leaving the pool: {0}")]
    Store(#[from] crate::store::DbError),
}

/// The stock of every batch, on one backend.
pub struct Stock<B> {
    backend: Arc<B>,
    cfg: StockConfig,
    transfer_seq: AtomicU64,
    instance: String,
    /// Where shard faults go (the repairer), see [`faults`].
    faults: FaultReporter,
    /// Where a minted claim is hinted to this instance's persister, see [`activity`].
    activity: ClaimActivity,
    /// Claim calls, group-committed per shard, see [`group`].
    group: GroupCommit<B>,
    /// One refill at a time per shard for the claims that found it empty, see [`gate`].
    gates: gate::Gates,
    /// Where codes leaving the pool are recorded before they reach a shard (see
    /// [`transfer`]); none: a batch with codes cannot refill its shards.
    store: Option<crate::store::Db>,
}

impl<B: Backend> Stock<B> {
    pub fn new(backend: Arc<B>, cfg: StockConfig) -> Stock<B> {
        let instance = format!("{:08x}", rand::random::<u32>());
        let group = GroupCommit::new(
            Arc::clone(&backend),
            cfg.group_max_claims,
            cfg.group_max_queue,
            std::time::Duration::from_millis(cfg.group_wait_ms),
        );
        Stock {
            group,
            gates: gate::Gates::new(std::time::Duration::from_millis(cfg.group_wait_ms)),
            backend,
            cfg,
            transfer_seq: AtomicU64::new(0),
            instance,
            faults: FaultReporter::disabled(),
            activity: ClaimActivity::disabled(),
            store: None,
        }
    }

    /// Records codes leaving the pool in `store` (required by batches with codes).
    pub fn with_store(mut self, store: crate::store::Db) -> Stock<B> {
        self.store = Some(store);
        self
    }

    /// Hints every minted claim to this instance's persister through `activity`.
    pub fn with_activity(mut self, activity: ClaimActivity) -> Stock<B> {
        self.activity = activity;
        self
    }

    /// Reports shard faults (lost or rolled-back shards) to `faults`.
    pub fn with_faults(mut self, faults: FaultReporter) -> Stock<B> {
        self.faults = faults;
        self
    }

    pub fn faults(&self) -> &FaultReporter {
        &self.faults
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn config(&self) -> &StockConfig {
        &self.cfg
    }

    /// The group committer of claim calls (its [`group::Stats`]).
    pub fn group(&self) -> &GroupCommit<B> {
        &self.group
    }

    /// The metadata of one slot (empty when the slot does not exist).
    pub async fn meta(
        &self,
        slot: &SlotKeys,
    ) -> Result<crate::contract::meta::SlotMeta, StockError> {
        Ok(meta_get::call(self.backend.as_ref(), slot).await?)
    }

    /// Reads one slot.
    pub async fn probe(&self, slot: &SlotKeys) -> Result<probe::Probe, StockError> {
        Ok(probe::call(self.backend.as_ref(), slot).await?)
    }

    /// Tells every instance that the batch was created or changed: they forget a "not
    /// found" mark and re-read its metadata. A lost message is caught by the refresh.
    pub async fn announce_change(&self, batch: &str) {
        let event = Event::Changed(batch.to_string());
        if let Err(e) = events::publish(self.backend.as_ref(), &event).await {
            tracing::warn!(batch, error = %e, "change broadcast failed; refresh will catch up");
        }
    }
}
