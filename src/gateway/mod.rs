//! The composition root: the one place the parts are wired ([`assemble`]), and the running
//! gateway ([`Gateway::start`]: backend, database, persister, event delivery worker,
//! background loops, HTTP servers) with its one shutdown sequence ([`Gateway::shutdown`]).
//! The CLI's `serve` runs [`start`]; the tests assemble in-process gateways with
//! [`assemble`].
//!
//! Invariant kept here: shutdown is one sequence under one grace budget
//! (`server.shutdown_grace_ms`, counted from the moment shutdown starts): stop accepting
//! and drain the connections (in-flight claims finish), stop the background loops and the
//! grant jobs (each resumes from its last checkpoint), let the
//! event delivery worker finish its pass, let the persister write what it read, make the
//! backend durable, close the database; a stage that overruns the budget is cut, and what
//! it leaves stays safe (claims in Redis, events in the outbox).

mod background;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::background::spawn_background;
use crate::api::Api;
use crate::backend::Backend;
use crate::backend::embedded::EmbeddedBackend;
use crate::backend::redis::RedisBackend;
use crate::catalog::Catalog;
use crate::config::secret::redact_url;
use crate::config::{BackendKind, Config};
use crate::domain::time::{Clock, SystemClock};
use crate::http::App;
use crate::notify::Deliverer;
use crate::obs::events::{Serving, Started};
use crate::persist::{PersistStatus, Persister, PersisterHandle};
use crate::recovery::Repairer;
use crate::stock::{ClaimActivity, FaultReporter, Stock};
use crate::store::Db;

/// The least the persister is given to write what it read once the connections drained,
/// even when draining used the whole grace budget (what it cannot write stays pending in
/// Redis for the next instance: safe, only later).
const PERSISTER_MIN_GRACE: Duration = Duration::from_millis(500);

/// Why a gateway could not start (the message names what failed; secrets redacted).
#[derive(Debug, Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// Wires every part of a gateway over an open backend and database, and starts nothing:
/// the stock, the catalog, the API (auth, rate limits, admission) and what the HTTP layer
/// serves. `persist` is the status of this instance's persister, if it runs one.
pub fn assemble<B: Backend>(
    cfg: Arc<Config>,
    backend: Arc<B>,
    db: Db,
    persist: Option<Arc<PersistStatus>>,
) -> Arc<App<B>> {
    assemble_with_clock(cfg, backend, db, persist, Arc::new(SystemClock))
}

/// [`assemble`], with the claim path reporting lost and rolled-back shards to `faults`.
pub fn assemble_with<B: Backend>(
    cfg: Arc<Config>,
    backend: Arc<B>,
    db: Db,
    persist: Option<Arc<PersistStatus>>,
    faults: FaultReporter,
) -> Arc<App<B>> {
    assemble_full(
        cfg,
        backend,
        db,
        persist,
        Arc::new(SystemClock),
        faults,
        ClaimActivity::disabled(),
    )
}

/// [`assemble`] on a given clock (the time of coupon transitions, wallet reads, sweeps and
/// delivery retries): tests of expiry and reminders set theirs.
pub fn assemble_with_clock<B: Backend>(
    cfg: Arc<Config>,
    backend: Arc<B>,
    db: Db,
    persist: Option<Arc<PersistStatus>>,
    clock: Arc<dyn Clock>,
) -> Arc<App<B>> {
    assemble_full(
        cfg,
        backend,
        db,
        persist,
        clock,
        FaultReporter::disabled(),
        ClaimActivity::disabled(),
    )
}

fn assemble_full<B: Backend>(
    cfg: Arc<Config>,
    backend: Arc<B>,
    db: Db,
    persist: Option<Arc<PersistStatus>>,
    clock: Arc<dyn Clock>,
    faults: FaultReporter,
    activity: ClaimActivity,
) -> Arc<App<B>> {
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
    let stock = Arc::new(
        Stock::new(backend, cfg.stock.clone())
            .with_faults(faults)
            .with_activity(activity)
            .with_store(db.clone()),
    );
    let catalog = Arc::new(Catalog::new(&cfg.cache, stock.clone(), db.clone()));
    let api = Api::new(cfg, catalog, stock, db).with_clock(clock);
    Arc::new(App::new(api, metrics, persist))
}

/// A running gateway: its persister, background loops and HTTP servers.
pub struct Gateway<B: Backend> {
    app: Arc<App<B>>,
    shutdown: CancellationToken,
    persister: Option<PersisterHandle>,
    /// The event delivery worker (when `events.webhook_url` is set).
    deliverer: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
}

impl<B: Backend> Gateway<B> {
    /// Starts a gateway on an open backend and a migrated database: the persister (when
    /// `persister.enabled`), the background loops, and the HTTP server on `server.listen`
    /// (and on `metrics.admin_listen`). Port 0 picks a free port ([`Gateway::local_addr`]).
    pub async fn start(
        cfg: Arc<Config>,
        backend: Arc<B>,
        db: Db,
    ) -> Result<Gateway<B>, StartError> {
        let listener = TcpListener::bind(cfg.server.listen)
            .await
            .map_err(|e| StartError(format!("cannot listen on {}: {e}", cfg.server.listen)))?;
        let admin = match cfg.metrics.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError(format!("cannot listen on {addr}: {e}")))?,
            ),
            None => None,
        };
        let local_addr = listener
            .local_addr()
            .map_err(|e| StartError(format!("listener address: {e}")))?;
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let shutdown = CancellationToken::new();
        // Shards found lost or rolled back, from the claim path and the persister's probe, to
        // the one repairer of this instance.
        let (faults, fault_rx) = FaultReporter::channel(cfg.repair.queue);
        // Claims minted here wake this instance's persister for their shard.
        let activity = if cfg.persister.enabled {
            ClaimActivity::new()
        } else {
            ClaimActivity::disabled()
        };
        let persister = cfg.persister.enabled.then(|| {
            Persister::spawn_reporting(
                backend.clone(),
                db.clone(),
                cfg.persister.clone(),
                shutdown.child_token(),
                faults.clone(),
                activity.clone(),
            )
        });
        let app = assemble_full(
            cfg.clone(),
            backend.clone(),
            db.clone(),
            persister.as_ref().map(|p| p.status()),
            Arc::new(SystemClock),
            faults,
            activity,
        );
        if let Some(p) = &persister {
            let wait = Duration::from_millis(cfg.repair.startup_wait_ms);
            if !wait.is_zero() && !p.wait_refreshed(wait).await {
                tracing::warn!(
                    waited_ms = cfg.repair.startup_wait_ms,
                    "serving before the persister read the batch list: a shard rolled back \
                     while no gateway ran is recognised at its next probe, not its first claim"
                );
            }
        }
        let mut background = spawn_background(&app, shutdown.child_token());
        if cfg.repair.enabled {
            let repairer = Repairer::new(
                backend.clone(),
                db,
                cfg.repair.clone(),
                fault_rx,
                shutdown.child_token(),
            );
            background.push(tokio::spawn(repairer.run()));
        }
        // One delivery worker per instance; instances share the outbox through leases.
        let deliverer = Deliverer::new(app.store().clone(), &cfg.events, app.api().clock().clone())
            .map(|d| d.spawn(shutdown.child_token()));
        if deliverer.is_none() {
            tracing::info!(
                "events.webhook_url is unset: events are written to the outbox and wait there"
            );
        }
        if cfg.backend == BackendKind::Embedded && cfg.embedded.aof_path.is_none() {
            tracing::warn!(
                "embedded.aof_path is empty: the keyspace lives in memory only. After a \
                 restart every batch reads as lost until `claimgate rebuild`, and a crash \
                 loses acknowledged claims the persister had not written yet"
            );
        }
        let store = match cfg.backend {
            BackendKind::Embedded => cfg
                .embedded
                .aof_path
                .as_ref()
                .map_or_else(|| "memory".to_string(), |p| p.display().to_string()),
            BackendKind::Redis => redact_url(&cfg.redis.url).into_owned(),
        };
        let config = cfg.file.as_ref().map_or_else(
            || "built-in defaults".to_string(),
            |p| p.display().to_string(),
        );
        Serving {
            version: env!("CARGO_PKG_VERSION"),
            config: &config,
            backend: backend.kind(),
            listen: &local_addr.to_string(),
            admin_listen: &admin_addr.map_or_else(|| "none".to_string(), |a| a.to_string()),
            database: &redact_url(&cfg.database.url),
            store: &store,
        }
        .emit();
        // Accept only once the startup lines are out: whoever sees the gateway healthy can
        // rely on them (the startup-log test killed the gateway between the two).
        let mut servers = Vec::new();
        for l in std::iter::once(listener).chain(admin) {
            servers.push(tokio::spawn(crate::http::server::serve(
                app.clone(),
                l,
                shutdown.child_token(),
            )));
        }
        Ok(Gateway {
            app,
            shutdown,
            persister,
            deliverer,
            background,
            servers,
            local_addr,
            admin_addr,
        })
    }

    pub fn app(&self) -> &Arc<App<B>> {
        &self.app
    }

    /// Where the HTTP server listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the admin listener (`metrics.admin_listen`) listens, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Cancelling it starts the shutdown (what SIGTERM does); [`Gateway::shutdown`] then
    /// finishes it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The one shutdown sequence, under one grace budget (see the module documentation).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let started = Instant::now();
        let grace = Duration::from_millis(self.app.config().server.shutdown_grace_ms);
        let left = || grace.saturating_sub(started.elapsed());
        // 1. the servers stop accepting and drain their connections (each bounded by the
        //    same grace, from now)
        for s in self.servers {
            if tokio::time::timeout(left(), s).await.is_err() {
                tracing::warn!("grace period over while draining connections");
            }
        }
        // 2. in-flight claims are done: the loops stop; the delivery worker finishes the
        //    attempts under way (each bounded by events.request_timeout_ms); cut, their
        //    leases run out and another instance (or the next start) retries them
        for t in self.background {
            t.abort();
        }
        //    grant jobs stop between two claims and give up their leases (resumed by the
        //    next instance from their last checkpoint)
        self.app.api().grants().shutdown(left()).await;
        if let Some(d) = self.deliverer {
            let abort = d.abort_handle();
            if tokio::time::timeout(left(), d).await.is_err() {
                abort.abort();
                tracing::warn!("grace period over during event delivery; the outbox keeps it");
            }
        }
        // 3. the persister writes what it read (what it cannot stays pending in Redis)
        if let Some(p) = self.persister {
            let budget = left().max(PERSISTER_MIN_GRACE);
            if tokio::time::timeout(budget, p.join()).await.is_err() {
                tracing::warn!(
                    "persister did not finish within the grace period; the backend keeps the rest"
                );
            }
        }
        // 4. what was acknowledged is durable, then the database closes
        if let Err(e) = self.app.backend().flush().await {
            tracing::warn!(error = %e, "final flush failed");
        }
        self.app.store().close().await;
        tracing::info!("bye");
    }

    /// Runs until the shutdown token is cancelled, then shuts down.
    pub async fn run(self) {
        self.shutdown.cancelled().await;
        self.shutdown().await;
    }
}

/// A gateway on the backend the configuration names.
pub enum Running {
    Embedded(Gateway<EmbeddedBackend>),
    Redis(Gateway<RedisBackend>),
}

impl Running {
    pub fn local_addr(&self) -> SocketAddr {
        match self {
            Running::Embedded(g) => g.local_addr(),
            Running::Redis(g) => g.local_addr(),
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        match self {
            Running::Embedded(g) => g.shutdown_token(),
            Running::Redis(g) => g.shutdown_token(),
        }
    }

    /// Runs until the shutdown token is cancelled, then shuts down.
    pub async fn run(self) {
        match self {
            Running::Embedded(g) => g.run().await,
            Running::Redis(g) => g.run().await,
        }
    }
}

/// Opens the configured backend and database (migrated), and starts a gateway on them.
pub async fn start(cfg: Config) -> Result<Running, StartError> {
    let cfg = Arc::new(cfg);
    match cfg.backend {
        BackendKind::Embedded => {
            let backend = EmbeddedBackend::open(&cfg.embedded)
                .map_err(|e| StartError(format!("embedded backend: {e}")))?;
            let db = open_store(&cfg).await?;
            Ok(Running::Embedded(
                Gateway::start(cfg, Arc::new(backend), db).await?,
            ))
        }
        BackendKind::Redis => {
            let backend = RedisBackend::connect(&cfg.redis)
                .await
                .map_err(|e| StartError(format!("redis at {}: {e}", redact_url(&cfg.redis.url))))?;
            let db = open_store(&cfg).await?;
            Ok(Running::Redis(
                Gateway::start(cfg, Arc::new(backend), db).await?,
            ))
        }
    }
}

/// Connects to the configured database and applies the migrations.
pub async fn open_store(cfg: &Config) -> Result<Db, StartError> {
    let db = Db::connect(&cfg.database)
        .await
        .map_err(|e| StartError(format!("database: {e}")))?;
    db.migrate()
        .await
        .map_err(|e| StartError(format!("database migration: {e}")))?;
    Ok(db)
}
