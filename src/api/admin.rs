//! Admin routes: create, read and change batches.
//!
//! Invariants kept here:
//! - the database is the arbiter of a batch's definition: a create inserts the row only if
//!   the id is free and goes on with the row it reads back, so concurrent creates of
//!   different definitions have ONE winner (the others get 409 `batch_exists`), and Redis is
//!   always set up with the stored definition;
//! - a batch this instance knows that Redis no longer has is lost, never "not found": a
//!   read or a change of it answers 503 (as its claims do) until `claimgate rebuild`;
//! - a batch is recorded in the database before it becomes claimable in Redis (so the
//!   persister always knows where its claims go), and a batch that was live once (its setup
//!   completed, or the database holds claims of it) is never set up again: when Redis lost
//!   it, a create answers like a claim does (503, batch lost) until `claimgate rebuild`, so
//!   no stock is re-sold and no coupon id is minted twice;
//! - a change (PATCH) is a compare-and-set on the row's version, validated against the fresh
//!   definition (`batches.max_stock` included), then applied to Redis at that version by an
//!   idempotent, order-independent script: concurrent changes apply exactly once, in order,
//!   and a change interrupted on its way to Redis is finished by the catalog's
//!   `heal_definitions`;
//! - a batch with a money budget never holds more stock than the budget pays for: its
//!   create is refused (400) and an `add_stock` past it is refused (409 `over_budget`) by
//!   the same compare-and-set, so the claim script, which never sells stock that is not
//!   there, never spends past the budget (`domain::batch`'s module documentation).

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

use super::{Api, ApiError, parse_object_integral};
use crate::backend::Backend;
use crate::catalog::CatalogError;
use crate::catalog::cache::CachedBatch;
use crate::contract::keys::BatchKeys;
use crate::domain::batch::{Batch, BatchPatch, InvalidBatch, NewBatch};
use crate::domain::time::Timestamp;
use crate::stock::StockError;

/// How often a PATCH re-reads the definition and retries after losing the compare-and-set
/// race to a concurrent change, before answering 503 (nothing changed).
const CHANGE_ATTEMPTS: u32 = 64;
/// Upper bound of the (jittered) pause between two of those attempts.
const CHANGE_BACKOFF_MAX: Duration = Duration::from_millis(5);

#[derive(Debug, Serialize)]
pub struct StockView {
    pub total: i64,
    pub claimed: i64,
    pub remaining: i64,
}

/// A batch's money budget: `spent` is the face values of the coupons claimed (claimed *
/// face value), never more than `total`.
#[derive(Debug, Serialize)]
pub struct BudgetView {
    pub total: i64,
    pub spent: i64,
    pub remaining: i64,
}

#[derive(Debug, Serialize)]
pub struct BatchView {
    pub batch: Batch,
    pub stock: StockView,
    /// Only for a batch with a budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetView>,
    /// Only for a retired batch: when its retirement began (RFC 3339). Its keys left Redis,
    /// and the figures are the database's, final.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<String>,
}

/// `POST /v1/batches`.
pub async fn create<B: Backend>(
    api: &Api<B>,
    body: &[u8],
) -> Result<(StatusCode, Batch), ApiError> {
    let new: NewBatch = parse_object_integral(body, "batch")?;
    let proposed = new.validate(&api.config().batches)?;
    if let Some(ack) = proposed
        .ack
        .filter(|a| !api.stock().backend().supports_ack(*a))
    {
        return Err(InvalidBatch::Bad(format!(
            "ack \"{}\" is not available on this backend ({}): the embedded backend has no \
             replicas, and \"replica_aof\" needs Redis 7.2 or later",
            ack.as_str(),
            api.stock().backend().kind()
        ))
        .into());
    }
    let store = api.store();
    let (stored, inserted) = store.insert_batch(&proposed).await?;
    if stored.batch.fingerprint() != proposed.fingerprint() {
        return Err(ApiError::BatchExists);
    }
    if stored.retired() {
        return Err(retired(&proposed.id));
    }
    let batch = stored.batch;
    let keys = BatchKeys::new(&batch.id, batch.shards);
    let was_live = stored.setup_done || store.has_claims(&batch.id).await?;
    if was_live {
        confirm_setup(api, &batch, &keys, stored.setup_done).await?;
    } else {
        match api.stock().create(&batch, &keys, stored.version).await {
            Ok(_) => {}
            Err(StockError::Conflict) => {
                tracing::error!(batch = %batch.id,
                    "Redis holds a different batch under this id than the database; \
                     create refused");
                if inserted && let Err(e) = store.delete_unset_batch(&batch.id).await {
                    tracing::warn!(batch = %batch.id, error = %e,
                        "could not remove the refused batch's row");
                }
                return Err(ApiError::BatchExists);
            }
            Err(e) => return Err(e.into()),
        }
        // generated codes: stored and loaded before the batch counts as set up, so a
        // create cut short is finished by its retry (which generates only what is missing)
        if api
            .catalog()
            .generate_codes(&batch, &keys, api.config().batches.codes_chunk)
            .await?
            > 0
        {
            api.stock().fill_shards(&keys, batch.stock).await?;
        }
        store.mark_setup_done(&batch.id).await?;
    }
    let catalog = api.catalog();
    catalog.cache().clear_missing(&batch.id);
    catalog.learn(&batch.id).await;
    api.stock().announce_change(&batch.id).await;
    Ok((StatusCode::CREATED, batch))
}

/// A create of a batch that was live once: never set it up again. Every slot present: a
/// repeated create (201). A slot missing: Redis lost the batch, and it stays lost (503, as
/// its claims answer) until `claimgate rebuild` restores it from the database.
async fn confirm_setup<B: Backend>(
    api: &Api<B>,
    batch: &Batch,
    keys: &BatchKeys,
    setup_done: bool,
) -> Result<(), ApiError> {
    let fps = api.stock().slot_fingerprints(keys).await?;
    if fps.iter().any(Option::is_none) {
        let catalog = api.catalog();
        let entry = catalog
            .cache()
            .insert(Arc::new(CachedBatch::new(batch.clone(), 0, false)));
        catalog.mark_lost(&entry);
        return Err(ApiError::unavailable(format!(
            "batch {} is known to the database but missing from Redis: not set up again \
             (that would re-sell its stock); run `claimgate rebuild --batch {}`",
            batch.id, batch.id
        )));
    }
    if !setup_done {
        // A create that crashed after its Redis setup, before recording it: the slots must
        // hold this very definition (no change is possible before the setup is recorded).
        let fp = batch.fingerprint();
        if fps.iter().any(|f| f.as_deref() != Some(fp.as_str())) {
            tracing::error!(batch = %batch.id,
                "the backend holds a different batch under this id than the database");
            return Err(ApiError::BatchExists);
        }
        api.store().mark_setup_done(&batch.id).await?;
    }
    Ok(())
}

/// `GET /v1/batches/{id}`.
pub async fn get<B: Backend>(api: &Api<B>, id: &str) -> Result<BatchView, ApiError> {
    let catalog = api.catalog();
    let entry = catalog.load_live(id).await?;
    if entry.is_retired() {
        return retired_view(api, &entry).await;
    }
    let c = match api.stock().conservation(&entry.keys).await {
        Ok(c) => c,
        // known here, gone from Redis: retired (the database answers), or lost (503, as
        // its claims), not "never existed"
        Err(StockError::NotFound) => {
            if catalog.check_retired(&entry).await? {
                return retired_view(api, &entry).await;
            }
            catalog.mark_lost(&entry);
            return Err(CatalogError::Lost(id.to_string()).into());
        }
        Err(e) => return Err(e.into()),
    };
    // the definition as Redis has it now (the cache may lag by one refresh)
    let batch = match catalog.read_meta(id).await? {
        Some(m) => m.batch,
        None => (*entry.batch()).clone(),
    };
    Ok(BatchView::new(batch, c.total, c.claimed, None))
}

impl BatchView {
    /// The batch with `claimed` of its `total` coupons taken (and its budget spent by them).
    fn new(batch: Batch, total: i64, claimed: i64, retired_at: Option<i64>) -> BatchView {
        let budget = batch.budget.zip(batch.budget_spent(claimed));
        BatchView {
            stock: StockView {
                total,
                claimed,
                remaining: total - claimed,
            },
            budget: budget.map(|(total, spent)| BudgetView {
                total,
                spent,
                remaining: total - spent,
            }),
            batch,
            retired_at: retired_at.map(|t| Timestamp(t).to_rfc3339()),
        }
    }
}

/// A retired batch (`recovery::retire`): its Redis keys were dropped on purpose, and it is
/// final: no change, no create again.
fn retired(id: &str) -> ApiError {
    ApiError::InvalidState(format!(
        "batch {id} is retired (its claim window ended batches.retire_after_ms ago): it cannot \
         be changed or created again; its coupons are served from the database"
    ))
}

/// `GET /v1/batches/{id}` of a retired batch: the database is its record (its stock as
/// defined, its claims as stored: every claim reached it before the keys were dropped).
async fn retired_view<B: Backend>(
    api: &Api<B>,
    entry: &CachedBatch,
) -> Result<BatchView, ApiError> {
    let Some(row) = api.store().batch_row(&entry.id).await? else {
        return Err(ApiError::BatchNotFound);
    };
    let (claimed, _) = api.store().claim_counts(&row.batch.id).await?;
    let claimed = i64::try_from(claimed).unwrap_or(i64::MAX);
    let total = row.batch.stock;
    Ok(BatchView::new(row.batch, total, claimed, row.retired_at))
}

/// `PATCH /v1/batches/{id}`: pause/resume, move the window end, add stock. Applied exactly
/// once, in version order (see the module documentation).
pub async fn patch<B: Backend>(api: &Api<B>, id: &str, body: &[u8]) -> Result<BatchView, ApiError> {
    let change: BatchPatch = parse_object_integral(body, "batch change")?;
    let catalog = api.catalog();
    let entry = catalog.load_live(id).await?;
    if catalog.check_retired(&entry).await? {
        return Err(retired(id));
    }
    // Versions in Redis only grow, and a change must be newer than what Redis holds (a
    // rebuild, or a change made before versions lived in the database, may be ahead).
    let Some(meta) = catalog.read_meta(id).await? else {
        catalog.mark_lost(&entry);
        return Err(CatalogError::Lost(id.to_string()).into());
    };
    let (batch, version) = change_definition(api, id, &change, meta.version).await?;
    match api
        .stock()
        .apply_definition(&entry.keys, &batch, version)
        .await
    {
        Ok(()) => {}
        Err(StockError::NotFound) => {
            catalog.mark_lost(&entry);
            return Err(ApiError::unavailable(format!(
                "batch {id} is missing from Redis; change version {version} is recorded and \
                 applies with its rebuild"
            )));
        }
        // Recorded in the database: the periodic check applies it once Redis answers.
        Err(e) => return Err(e.into()),
    }
    catalog.refresh(&entry).await;
    get(api, id).await
}

/// The compare-and-set on the database row: validates and applies the change to the fresh
/// definition, writes it with the next version if nobody changed the row meanwhile, and
/// retries (bounded) otherwise. Returns the new definition and its version.
async fn change_definition<B: Backend>(
    api: &Api<B>,
    id: &str,
    change: &BatchPatch,
    floor: i64,
) -> Result<(Batch, i64), ApiError> {
    let limits = &api.config().batches;
    let store = api.store();
    for attempt in 0..CHANGE_ATTEMPTS {
        let row = store.batch_row(id).await?;
        let Some(row) = row.filter(|r| r.setup_done) else {
            return Err(ApiError::BatchNotFound);
        };
        if row.retired() {
            return Err(retired(id));
        }
        let mut batch = row.batch;
        change.validate(&batch, limits)?;
        change.apply(&mut batch);
        let version = row.version.max(floor) + 1;
        let applied = store.update_batch(&batch, row.version, version).await?;
        if applied {
            return Ok((batch, version));
        }
        let cap = (CHANGE_BACKOFF_MAX.as_micros() as u64).min(100 * (u64::from(attempt) + 1));
        let pause = Duration::from_micros(rand::random::<u64>() % cap.max(1));
        tokio::time::sleep(pause).await;
    }
    Err(ApiError::unavailable(format!(
        "batch {id} changed concurrently {CHANGE_ATTEMPTS} times in a row; nothing was changed"
    )))
}
