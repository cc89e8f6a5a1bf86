//! The gateway's shared state and its background loops (pub/sub events, metadata refresh,
//! transfer sweeper, limiter purge).
//!
//! Invariants kept here: a batch that the database knows but Redis has lost is served as
//! "lost" (503, nothing claimed) until it is rebuilt, never re-created with fresh stock; a
//! batch's create (on this instance, or on another one by pub/sub) clears the "not found"
//! mark of its id at once, and a lookup that began before the create cannot set it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::cache::{BatchCache, CachedBatch};
use crate::config::Config;
use crate::contract::events::Event;
use crate::contract::keys::SlotKeys;
use crate::domain::auth::Auth;
use crate::domain::batch::Batch;
use crate::domain::limits::{Admission, RateLimits};
use crate::error::ApiError;
use crate::obs::events::{BatchLost, BatchRestored, CacheAnswered, Started};
use crate::persist::PersistStatus;
use crate::stock::{Stock, StockError};
use crate::store::Db;

pub struct App<B: Backend> {
    pub cfg: Arc<Config>,
    pub stock: Arc<Stock<B>>,
    pub cache: BatchCache,
    pub db: Db,
    pub auth: Auth,
    pub limits: RateLimits,
    pub admission: Admission,
    pub metrics: PrometheusHandle,
    pub persist_status: Option<Arc<PersistStatus>>,
    /// `persister.max_backlog_per_shard`, formatted once for the claim script.
    pub max_log: String,
    /// Set when shutdown starts: `/readyz` turns 503 so load balancers drain us.
    pub draining: AtomicBool,
    /// Stock remaining of the tracked batches (at most `metrics.max_batch_labels`), rendered
    /// at scrape time so a batch that stops being tracked leaves the exposition at once.
    pub stock_remaining: parking_lot::Mutex<Vec<(String, i64)>>,
}

impl<B: Backend> App<B> {
    pub fn new(
        cfg: Arc<Config>,
        backend: Arc<B>,
        db: Db,
        persist_status: Option<Arc<PersistStatus>>,
    ) -> App<B> {
        if cfg.auth.user_token_secret.is_none() {
            tracing::warn!(
                "USER AUTH IS OFF: claims trust the body's user_id. Set auth.user_token_secret in production."
            );
        }
        if cfg.auth.admin_token.is_none() {
            tracing::warn!(
                "ADMIN AUTH IS OFF: anyone can create and change batches. Set auth.admin_token."
            );
        }
        let metrics = crate::obs::metrics::install();
        Started {
            version: env!("CARGO_PKG_VERSION"),
            backend: backend.kind(),
        }
        .emit();
        App {
            stock: Arc::new(Stock::new(backend, cfg.stock.clone())),
            cache: BatchCache::new(
                cfg.cache.max_users_at_limit,
                Duration::from_millis(cfg.cache.missing_ttl_ms),
                cfg.cache.max_missing,
            ),
            auth: Auth::new(&cfg.auth),
            limits: RateLimits::new(&cfg.limits),
            admission: Admission::new(&cfg.limits),
            metrics,
            stock_remaining: parking_lot::Mutex::new(Vec::new()),
            max_log: cfg.persister.max_backlog_per_shard.to_string(),
            draining: AtomicBool::new(false),
            persist_status,
            db,
            cfg,
        }
    }

    pub fn backend(&self) -> &Arc<B> {
        self.stock.backend()
    }

    pub fn retry_after(&self) -> u64 {
        self.cfg.limits.retry_after_s
    }

    /// A backend failure as the client sees it.
    /// A backend failure as the client sees it; the cause goes to the log line.
    pub fn unavailable(&self, e: impl std::fmt::Display) -> ApiError {
        ApiError::BackendUnavailable(e.to_string(), self.retry_after())
    }

    pub fn stock_error(&self, e: StockError) -> ApiError {
        match e {
            StockError::NotFound => ApiError::BatchNotFound,
            StockError::Conflict => ApiError::BatchExists,
            StockError::Backend(crate::backend::BackendError::Unavailable(m)) => {
                self.unavailable(m)
            }
            other => ApiError::Internal(other.to_string()),
        }
    }

    /// The batch, from the cache, else from Redis, else from the database: a batch whose
    /// setup completed but which Redis does not have is lost; one whose create has not
    /// finished its setup yet is not found (and not remembered as missing).
    pub async fn load_batch(&self, id: &str) -> Result<Arc<CachedBatch>, ApiError> {
        if let Some(e) = self.cache.get(id) {
            CacheAnswered { kind: "meta_hit" }.emit();
            return Ok(e);
        }
        if !crate::domain::ids::valid_batch_id(id) || self.cache.is_missing(id) {
            return Err(ApiError::BatchNotFound);
        }
        CacheAnswered { kind: "meta_miss" }.emit();
        let epoch = self.cache.missing_epoch();
        if let Some(entry) = self.cache_meta(id).await? {
            return Ok(entry);
        }
        match self.db.batch_row(id).await {
            Ok(Some(row)) if row.setup_done => {
                // The setup may have completed between the Redis read and the database
                // read: look again before declaring the batch lost.
                if let Some(entry) = self.cache_meta(id).await? {
                    return Ok(entry);
                }
                let entry = self
                    .cache
                    .insert(Arc::new(CachedBatch::new(row.batch, 0, false)));
                self.mark_lost(&entry);
                Ok(entry)
            }
            Ok(Some(_)) => Err(ApiError::BatchNotFound), // being created
            Ok(None) => {
                self.cache.set_missing_since(id, epoch);
                Err(ApiError::BatchNotFound)
            }
            Err(e) => Err(self.unavailable(e)),
        }
    }

    /// Caches the batch as Redis has it, if it does.
    async fn cache_meta(&self, id: &str) -> Result<Option<Arc<CachedBatch>>, ApiError> {
        Ok(self.read_meta(id).await?.map(|(batch, ver, sold_out)| {
            self.cache
                .insert(Arc::new(CachedBatch::new(batch, ver, sold_out)))
        }))
    }

    /// The pool metadata of a batch: (definition, version, sold out), or `None` if absent.
    pub async fn read_meta(&self, id: &str) -> Result<Option<(Batch, i64, bool)>, ApiError> {
        let meta = self
            .stock
            .meta(&SlotKeys::new(id, None))
            .await
            .map_err(|e| self.stock_error(e))?;
        let Some(def) = meta.definition() else {
            return Ok(None);
        };
        let batch: Batch =
            def.map_err(|e| ApiError::Internal(format!("batch {id} definition: {e}")))?;
        Ok(Some((batch, meta.version(), meta.sold_out())))
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

    pub fn mark_lost(&self, entry: &CachedBatch) {
        if !entry.is_lost() {
            entry.set_lost(true);
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

    /// Re-reads one batch's metadata (after an event, or periodically).
    pub async fn refresh_batch(&self, entry: &CachedBatch) {
        match self.read_meta(&entry.id).await {
            Ok(Some((batch, ver, sold_out))) => {
                let limits_changed = {
                    let old = entry.batch();
                    old.per_user_limit != batch.per_user_limit
                        || old.per_user_daily_limit != batch.per_user_daily_limit
                };
                let was_lost = entry.is_lost();
                entry.update(batch, ver, sold_out);
                if limits_changed {
                    self.cache.forget_limits(entry);
                }
                if was_lost {
                    BatchRestored {
                        batch: &entry.id,
                        lost: self.lost_count(),
                    }
                    .emit();
                }
            }
            Ok(None) => self.mark_lost(entry),
            Err(e) => tracing::debug!(batch = %entry.id, error = %e, "metadata refresh failed"),
        }
    }

    /// Loads every batch the database knows, so the sweeper and the refresh cover batches
    /// this instance has not served yet (e.g. after a restart).
    pub async fn warm(&self) {
        match self.db.list_batches().await {
            Ok(batches) => {
                for b in batches {
                    if self.cache.get(&b.id).is_none() {
                        let _ = self.load_batch(&b.id).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list batches from the database"),
        }
    }

    /// Starts the background loops; they stop when `shutdown` is cancelled.
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();

        // Pub/sub events: sold out and batch changes reach this instance within milliseconds.
        let app = self.clone();
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut rx = app.backend().subscribe();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = rx.recv() => m,
                };
                match msg {
                    Ok(m) => app.on_event(&m).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }));

        // Periodic refresh: the fallback for missed events; also exports stock gauges.
        let app = self.clone();
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_millis(app.cfg.cache.refresh_ms);
            let mut tick = tokio::time::interval(every);
            let mut n: u64 = 0;
            app.warm().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for entry in app.cache.all() {
                    app.refresh_batch(&entry).await;
                }
                if n.is_multiple_of(5) {
                    crate::admin::heal_definitions(&app).await;
                    crate::obs::metrics::upkeep();
                    app.export_stock_gauges().await;
                    app.limits.purge();
                }
                n += 1;
            }
        }));

        // Sweeper: finishes transfers interrupted by a crash.
        let app = self.clone();
        let stop = shutdown;
        tasks.push(tokio::spawn(async move {
            let every = Duration::from_millis(app.cfg.stock.sweep_interval_ms);
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for entry in app.cache.all() {
                    if entry.is_lost() {
                        continue;
                    }
                    if let Err(e) = app
                        .stock
                        .sweep(&entry.keys, app.cfg.stock.sweep_min_age_ms)
                        .await
                    {
                        tracing::debug!(batch = %entry.id, error = %e, "sweep failed");
                    }
                }
            }
        }));
        tasks
    }

    async fn on_event(&self, msg: &str) {
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
                if let Some(entry) = self.cache.get(&batch) {
                    self.refresh_batch(&entry).await;
                }
            }
            None => {}
        }
    }

    /// Tracks the active batches (window open, not lost), newest first, up to the cap.
    async fn export_stock_gauges(&self) {
        let now = crate::domain::time::Timestamp::now();
        let mut entries = self.cache.all();
        entries.retain(|e| !e.is_lost() && e.batch().claim_window.end > now);
        entries.sort_by_key(|e| std::cmp::Reverse(e.batch().created_at));
        entries.truncate(self.cfg.metrics.max_batch_labels);
        let mut gauges = Vec::with_capacity(entries.len());
        for e in entries {
            if let Ok(c) = self.stock.conservation(&e.keys).await {
                gauges.push((e.id.clone(), c.total - c.claimed));
            }
        }
        gauges.sort();
        *self.stock_remaining.lock() = gauges;
    }

    /// The whole Prometheus exposition: the recorder's metrics and the per-batch gauges.
    pub fn render_metrics(&self) -> String {
        let mut text = self.metrics.render();
        text.push_str(&crate::obs::metrics::render_stock_remaining(
            &self.stock_remaining.lock(),
        ));
        text
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
