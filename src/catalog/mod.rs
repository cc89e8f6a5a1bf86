//! The catalog: what this instance knows of every batch, and how it learns it. The local
//! cache ([`cache`]) and its loader: from the cache, else from Redis (the pool's metadata),
//! else from the database; the reactions to other instances' events; the periodic refresh;
//! the winners of a sold-out batch; the healing of definitions Redis lags behind; and the
//! product-page index ([`index`]) that follows the cache; and the codes of batches that hand
//! out codes ([`codes`]: stored, then loaded into the pool).
//!
//! Invariants kept here: a batch that the database knows but Redis has lost is served as
//! "lost" (503, nothing claimed) until it is rebuilt, never re-created with fresh stock; a
//! batch's create (on this instance, or on another one by pub/sub) clears the "not found"
//! mark of its id at once, and a lookup that began before the create cannot set it again;
//! every batch entering the cache or re-read is synced into the product index, a batch
//! found lost leaves it, and a batch created on another instance is loaded (so indexed) on
//! its `changed` event, or at the latest by the next definition check.

pub mod cache;
pub mod codes;
pub mod index;

use std::sync::Arc;

use thiserror::Error;

use self::cache::{BatchCache, CachedBatch};
use self::index::ProductIndex;
use crate::backend::Backend;
use crate::config::CacheConfig;
use crate::contract::events::Event;
use crate::contract::keys::SlotKeys;
use crate::domain::batch::Batch;
use crate::domain::ids::valid_batch_id;
use crate::domain::time::Timestamp;
use crate::obs::events::{BatchLost, BatchRestored, CacheAnswered};
use crate::stock::{Stock, StockError};
use crate::store::{Db, DbError};

#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("batch not found")]
    NotFound,
    /// The database knows the batch, Redis does not: served as lost until rebuilt.
    #[error("batch {0} is missing from the backend")]
    Lost(String),
    #[error(transparent)]
    Stock(#[from] StockError),
    #[error(transparent)]
    Store(#[from] DbError),
    #[error("batch {0}")]
    Corrupt(String),
}

/// A batch as the pool's metadata holds it.
#[derive(Debug, Clone)]
pub struct PoolMeta {
    pub batch: Batch,
    pub version: i64,
    pub sold_out: bool,
    /// The coupon-id epoch (moved by every rebuild).
    pub epoch: u64,
}

/// Every batch this instance knows, and their loader.
pub struct Catalog<B> {
    cache: BatchCache,
    index: ProductIndex,
    stock: Arc<Stock<B>>,
    store: Db,
}

impl<B: Backend> Catalog<B> {
    pub fn new(cfg: &CacheConfig, stock: Arc<Stock<B>>, store: Db) -> Catalog<B> {
        Catalog {
            cache: BatchCache::new(
                cfg.max_users_at_limit,
                std::time::Duration::from_millis(cfg.missing_ttl_ms),
                cfg.max_missing,
            ),
            index: ProductIndex::new(),
            stock,
            store,
        }
    }

    pub fn cache(&self) -> &BatchCache {
        &self.cache
    }

    /// The product-page index (batches by product, category, merchant and "all").
    pub fn index(&self) -> &ProductIndex {
        &self.index
    }

    /// The batch, from the cache, else from Redis, else from the database: a batch whose
    /// setup completed but which Redis does not have is lost; one whose create has not
    /// finished its setup yet is not found (and not remembered as missing).
    pub async fn load(&self, id: &str) -> Result<Arc<CachedBatch>, CatalogError> {
        if let Some(e) = self.cache.get(id) {
            CacheAnswered { kind: "meta_hit" }.emit();
            return Ok(e);
        }
        if !valid_batch_id(id) || self.cache.is_missing(id) {
            return Err(CatalogError::NotFound);
        }
        CacheAnswered { kind: "meta_miss" }.emit();
        let epoch = self.cache.missing_epoch();
        if let Some(entry) = self.cache_meta(id).await? {
            return Ok(entry);
        }
        match self.store.batch_row(id).await? {
            Some(row) if row.setup_done && row.retired() => {
                // Retired: Redis holds nothing of it by design; the database answers.
                let fresh = Arc::new(CachedBatch::new(row.batch, row.version, false));
                fresh.set_retired();
                let entry = self.cache.insert(fresh);
                entry.set_retired();
                Ok(entry)
            }
            Some(row) if row.setup_done => {
                // The setup may have completed between the Redis read and the database
                // read: look again before declaring the batch lost.
                if let Some(entry) = self.cache_meta(id).await? {
                    return Ok(entry);
                }
                // Marked lost BEFORE it becomes visible: a concurrent lookup must never
                // find this entry not yet lost (it would answer 404 or try to claim).
                let fresh = Arc::new(CachedBatch::new(row.batch, 0, false));
                fresh.set_lost(true);
                let entry = self.cache.insert(fresh.clone());
                if Arc::ptr_eq(&entry, &fresh) {
                    BatchLost {
                        batch: &entry.id,
                        lost: self.lost_count(),
                    }
                    .emit();
                } else {
                    self.mark_lost(&entry);
                }
                Ok(entry)
            }
            Some(_) => Err(CatalogError::NotFound), // being created
            None => {
                self.cache.set_missing_since(id, epoch);
                Err(CatalogError::NotFound)
            }
        }
    }

    /// [`Catalog::load`], refusing a batch served as lost.
    pub async fn load_live(&self, id: &str) -> Result<Arc<CachedBatch>, CatalogError> {
        let entry = self.load(id).await?;
        if entry.is_lost() {
            return Err(CatalogError::Lost(id.to_string()));
        }
        Ok(entry)
    }

    /// Caches the batch as Redis has it, if it does.
    async fn cache_meta(&self, id: &str) -> Result<Option<Arc<CachedBatch>>, CatalogError> {
        Ok(self.read_meta(id).await?.map(|m| {
            let fresh = CachedBatch::new(m.batch, m.version, m.sold_out);
            fresh.enter_epoch(m.epoch);
            let entry = self.cache.insert(Arc::new(fresh));
            self.index.sync(&entry, Timestamp::now());
            entry
        }))
    }

    /// The pool metadata of a batch, or `None` if Redis does not have it.
    pub async fn read_meta(&self, id: &str) -> Result<Option<PoolMeta>, CatalogError> {
        let meta = self.stock.meta(&SlotKeys::new(id, None)).await?;
        let Some(def) = meta.definition() else {
            return Ok(None);
        };
        let batch = def.map_err(|e| CatalogError::Corrupt(format!("{id} definition: {e}")))?;
        Ok(Some(PoolMeta {
            batch,
            version: meta.version(),
            sold_out: meta.sold_out(),
            epoch: meta.epoch(),
        }))
    }

    /// Once a batch is sold out, loads (in the background, once) the users who won, so that
    /// everyone else's sold-out answers need no backend call even with a request id.
    pub fn load_winners(&self, entry: &Arc<CachedBatch>) {
        if !entry.start_loading_winners() {
            return;
        }
        let stock = self.stock.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            match stock.winners(&entry.keys).await {
                Ok(w) => entry.set_winners(Some(w)),
                Err(e) => {
                    tracing::debug!(batch = %entry.id, error = %e, "loading winners failed");
                    entry.set_winners(None);
                }
            }
        });
    }

    /// Whether the batch is retired, as the database says (remembered once it is: final).
    /// What a path that found the batch's Redis keys gone asks before calling it lost.
    pub async fn check_retired(&self, entry: &CachedBatch) -> Result<bool, CatalogError> {
        if entry.is_retired() {
            return Ok(true);
        }
        let retired = self
            .store
            .batch_row(&entry.id)
            .await?
            .is_some_and(|r| r.retired());
        if retired {
            entry.set_retired();
            self.index.forget(&entry.id);
        }
        Ok(retired)
    }

    /// Serves the batch as lost from now on (until a refresh finds it in Redis again).
    pub fn mark_lost(&self, entry: &CachedBatch) {
        if entry.is_retired() {
            return; // its keys are gone by design
        }
        if entry.mark_lost_once() {
            self.index.forget(&entry.id);
            BatchLost {
                batch: &entry.id,
                lost: self.lost_count(),
            }
            .emit();
        }
    }

    fn lost_count(&self) -> usize {
        self.cache.all().iter().filter(|b| b.is_lost()).count()
    }

    /// The ids of the batches served as lost.
    pub fn lost(&self) -> Vec<String> {
        self.cache
            .all()
            .iter()
            .filter(|b| b.is_lost())
            .map(|b| b.id.clone())
            .collect()
    }

    /// Re-reads one batch's metadata (after an event, or periodically).
    pub async fn refresh(&self, entry: &Arc<CachedBatch>) {
        if entry.is_retired() {
            return; // final: Redis holds nothing of it
        }
        match self.read_meta(&entry.id).await {
            Ok(Some(m)) => {
                let limits_changed = {
                    let old = entry.batch();
                    old.per_user_limit != m.batch.per_user_limit
                        || old.per_user_daily_limit != m.batch.per_user_daily_limit
                };
                let was_lost = entry.is_lost();
                // rebuilt from the database: users' counts may be lower than remembered
                let rebuilt = entry.enter_epoch(m.epoch);
                entry.update(m.batch, m.version, m.sold_out);
                if limits_changed || rebuilt {
                    self.cache.forget_limits(entry);
                }
                self.index.sync(entry, Timestamp::now());
                if was_lost {
                    BatchRestored {
                        batch: &entry.id,
                        lost: self.lost_count(),
                    }
                    .emit();
                }
            }
            Ok(None) => match self.check_retired(entry).await {
                Ok(true) => {}
                Ok(false) => self.mark_lost(entry),
                Err(e) => tracing::debug!(batch = %entry.id, error = %e, "retired check failed"),
            },
            Err(e) => tracing::debug!(batch = %entry.id, error = %e, "metadata refresh failed"),
        }
    }

    /// Loads every batch the database knows, so the sweeper and the refresh cover batches
    /// this instance has not served yet (e.g. after a restart).
    pub async fn warm(&self) {
        match self.store.list_batches().await {
            Ok(batches) => {
                for b in batches {
                    if self.cache.get(&b.id).is_none() {
                        let _ = self.load(&b.id).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list batches from the database"),
        }
    }

    /// Reacts to a message of another instance (or this one).
    pub async fn on_event(&self, msg: &str) {
        match Event::parse(msg) {
            Some(Event::SoldOut(batch)) => {
                if let Some(entry) = self.cache.get(&batch) {
                    entry.set_sold_out();
                    self.load_winners(&entry);
                }
            }
            Some(Event::Changed(batch)) => {
                // Created or changed: a "not found" mark of it is wrong now, cached or not.
                self.cache.clear_missing(&batch);
                self.learn(&batch).await;
            }
            None => {}
        }
    }

    /// Re-reads a batch just created or changed (here or elsewhere): refreshes it when
    /// cached, else loads it, so product pages show a new batch at once.
    pub async fn learn(&self, id: &str) {
        match self.cache.get(id) {
            Some(entry) => self.refresh(&entry).await,
            None => {
                if let Err(e) = self.load(id).await {
                    tracing::debug!(batch = %id, error = %e, "loading a new batch failed");
                }
            }
        }
    }

    /// Finishes changes Redis lags behind: for every cached batch whose pool version is
    /// older than the database's, re-applies the stored definition (idempotent; harmless
    /// when a PATCH is applying it right now). Covers a gateway that died between the
    /// database commit of a change and its Redis apply, and an apply that failed. Called
    /// from the refresh loop.
    pub async fn heal_definitions(&self) {
        let versions = match self.store.batch_versions().await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "definition check: listing versions failed");
                return;
            }
        };
        for (id, version) in versions {
            let Some(entry) = self.cache.get(&id) else {
                // A batch this instance has not met (its `changed` event was missed): load
                // it, so the sweeper, the refresh and the product index cover it.
                let _ = self.load(&id).await;
                continue;
            };
            if entry.is_lost() || entry.version() >= version {
                continue;
            }
            // The cached version may lag one refresh: look at Redis before acting.
            let redis_version = match self.read_meta(&id).await {
                Ok(Some(m)) => m.version,
                _ => continue,
            };
            let row = match self.store.batch_row(&id).await {
                Ok(Some(row)) if row.version > redis_version => row,
                _ => continue,
            };
            match self
                .stock
                .apply_definition(&entry.keys, &row.batch, row.version)
                .await
            {
                Ok(()) => {
                    tracing::warn!(batch = %id, redis = redis_version, database = row.version,
                        "the backend lagged behind the stored definition; re-applied it");
                    self.refresh(&entry).await;
                }
                Err(e) => tracing::warn!(batch = %id, error = %e,
                    "re-applying the stored definition failed; retrying on the next check"),
            }
        }
    }

    /// Stock remaining of the active batches (window open, not lost), newest first, at most
    /// `max`: the `claimgate_stock_remaining` gauges.
    pub async fn stock_remaining(&self, max: usize) -> Vec<(String, i64)> {
        let now = crate::domain::time::Timestamp::now();
        let mut entries = self.cache.all();
        entries.retain(|e| !e.is_lost() && e.batch().claim_window.end > now);
        entries.sort_by_key(|e| std::cmp::Reverse(e.batch().created_at));
        entries.truncate(max);
        let mut gauges = Vec::with_capacity(entries.len());
        for e in entries {
            if let Ok(c) = self.stock.conservation(&e.keys).await {
                gauges.push((e.id.clone(), c.total - c.claimed));
            }
        }
        gauges.sort();
        gauges
    }
}
