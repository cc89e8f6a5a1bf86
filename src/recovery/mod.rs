//! Recovery from Redis data loss: [`rebuild`] (restore a batch's Redis state from the
//! database), [`repair_shard`] (restore one shard of a live batch that Redis lost or a
//! failover rolled back; the [`Repairer`] task runs it automatically on every reported
//! [`crate::stock::ShardFault`]), [`reconcile`] (compare the two and list every
//! [`Difference`]) and [`retire_due`] (drop the Redis keys of batches long ended: the
//! database is their record).
//!
//! Invariant kept here: recovery goes through the same typed scripts (`crate::contract`) and
//! the same conservation check (`crate::stock::census`) as the gateway, so it cannot drift
//! from what the gateway wrote.

mod difference;
mod rebuild;
mod reconcile;
mod repair;
mod repairer;
mod retire;
mod rotate;

use thiserror::Error;

pub use self::difference::Difference;
pub use self::rebuild::{RebuildReport, rebuild};
pub use self::reconcile::reconcile;
pub use self::repair::{RepairReport, Repaired, repair_shard};
pub use self::repairer::Repairer;
pub use self::retire::{RetireError, RetireReport, retire_due};
pub use self::rotate::{RotateReport, Rotator};
use crate::backend::BackendError;
use crate::stock::StockError;
use crate::store::DbError;

/// Per shard, at most this many per-user differences are listed (then a count of the rest).
pub const MAX_USER_DIFFERENCES: usize = 50;
/// Attempts at a conservation snapshot taken while no stock moved.
const SNAPSHOT_ATTEMPTS: usize = 5;

#[derive(Debug, Error)]
pub enum RebuildError {
    #[error("batch {0} is not in the database")]
    BatchNotFound(String),
    #[error(
        "batch {0} is retired: its Redis keys were dropped on purpose and the database is its \
         record; it is never restored to Redis"
    )]
    Retired(String),
    #[error(
        "batch {0} still exists in the backend (its pool meta is there); use --force to overwrite"
    )]
    Live(String),
    #[error(
        "shard {shard} of batch {batch} holds {entries} log entries not yet in the database; \
         let the persister drain them and retry"
    )]
    Unpersisted {
        batch: String,
        shard: u32,
        entries: u64,
    },
    #[error(
        "the pool of batch {0} is gone from the backend: the whole batch is lost; run \
         `claimgate rebuild {0}`"
    )]
    PoolLost(String),
    #[error("stock of batch {0} kept moving: no consistent snapshot; retry")]
    Unsettled(String),
    #[error("slot {slot} of batch {batch} went live during the rebuild; retry")]
    Raced { batch: String, slot: String },
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("{0}")]
    Stock(#[from] StockError),
}
