//! The HTTP layer: the server ([`server`]: connections, protocols, deadlines, draining),
//! the router ([`router`]: method + path to handler), request bodies ([`body`]), the
//! operations endpoints ([`ops`]: healthz, readyz, metrics, openapi) and the writing of
//! every error as HTTP ([`error`]). [`App`] is what it serves: the API and the state the
//! operations endpoints show.
//!
//! Invariant kept here: whatever a client sends (or fails to send), the answer is a JSON
//! response with a status and, for errors, a machine-readable code; nothing reaches a
//! handler unvalidated, and every wait on a client is bounded.

pub mod body;
pub mod error;
pub mod ops;
pub mod router;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::Api;
use crate::backend::Backend;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::persist::PersistStatus;
use crate::stock::Stock;
use crate::store::Db;

/// What the HTTP layer serves: the API, and what the operations endpoints show.
pub struct App<B: Backend> {
    api: Api<B>,
    metrics: PrometheusHandle,
    persist: Option<Arc<PersistStatus>>,
    /// Set when shutdown starts: `/readyz` turns 503 so load balancers drain us.
    draining: AtomicBool,
    /// Stock remaining of the tracked batches (at most `metrics.max_batch_labels`), rendered
    /// at scrape time so a batch that stops being tracked leaves the exposition at once.
    stock_remaining: parking_lot::Mutex<Vec<(String, i64)>>,
}

impl<B: Backend> App<B> {
    pub fn new(
        api: Api<B>,
        metrics: PrometheusHandle,
        persist: Option<Arc<PersistStatus>>,
    ) -> App<B> {
        App {
            api,
            metrics,
            persist,
            draining: AtomicBool::new(false),
            stock_remaining: parking_lot::Mutex::new(Vec::new()),
        }
    }

    pub fn api(&self) -> &Api<B> {
        &self.api
    }

    pub fn config(&self) -> &Arc<Config> {
        self.api.config()
    }

    pub fn catalog(&self) -> &Arc<Catalog<B>> {
        self.api.catalog()
    }

    pub fn stock(&self) -> &Arc<Stock<B>> {
        self.api.stock()
    }

    pub fn store(&self) -> &Db {
        self.api.store()
    }

    pub fn backend(&self) -> &Arc<B> {
        self.api.stock().backend()
    }

    /// The persister of this instance, if it runs one.
    pub fn persist_status(&self) -> Option<&Arc<PersistStatus>> {
        self.persist.as_ref()
    }

    /// `Retry-After` of a 503: `limits.retry_after_s`.
    pub fn retry_after(&self) -> u64 {
        self.config().limits.retry_after_s
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// From now on `/readyz` answers 503 and responses say `Connection: close`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Replaces the `claimgate_stock_remaining` gauges.
    pub fn set_stock_remaining(&self, gauges: Vec<(String, i64)>) {
        *self.stock_remaining.lock() = gauges;
    }

    /// The whole Prometheus exposition: the process metrics (read now), the recorder's
    /// metrics and the per-batch gauges.
    pub fn render_metrics(&self) -> String {
        crate::obs::metrics::collect_process();
        let mut text = self.metrics.render();
        text.push_str(&crate::obs::metrics::render_stock_remaining(
            &self.stock_remaining.lock(),
        ));
        text
    }
}
