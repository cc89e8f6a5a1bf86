//! The gateway's background loops: pub/sub events, the periodic refresh (metadata,
//! definition healing, stock gauges, limiter purge, metrics upkeep), the transfer
//! sweeper, the coupon sweeper (expiry, "expiring soon" reminders, outbox gauges), the
//! grant job resumer (running jobs whose instance died; uploads that broke off), and the
//! retirer (batches long ended leave Redis: `recovery::retire_due`).
//!
//! Invariant kept here: every loop stops when its shutdown token is cancelled, and every
//! wait in it is bounded (a tick, or a message).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::domain::time::now_ms;
use crate::http::App;
use crate::obs::events::{BatchRetirement, SweepFailed};

/// The refresh loop does its slower chores (healing, gauges, purge, upkeep) every this
/// many ticks.
const CHORES_EVERY: u64 = 5;

/// How long after a batch's window ended it is settled: no claim begun before the end
/// can still be refilling it.
const SETTLED_AFTER_END_MS: i64 = 60_000;

/// The refresh looks at batches ended [`SETTLED_AFTER_END_MS`] ago every this many ticks.
const ENDED_REFRESH_EVERY: u64 = 30;

/// Starts the background loops of `app`; they stop when `shutdown` is cancelled.
pub fn spawn_background<B: Backend>(
    app: &Arc<App<B>>,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(events(app.clone(), shutdown.clone())),
        tokio::spawn(refresh(app.clone(), shutdown.clone())),
        tokio::spawn(sweeper(app.clone(), shutdown.clone())),
        tokio::spawn(coupon_sweeper(app.clone(), shutdown.clone())),
        tokio::spawn(grant_resumer(app.clone(), shutdown.clone())),
        tokio::spawn(retirer(app.clone(), shutdown)),
    ]
}

/// A tick every `period_ms` until `stop` is cancelled: `while ticks.next().await { .. }`. A
/// tick missed while the body ran is not made up (the next one comes a period later).
struct Ticks {
    tick: tokio::time::Interval,
    stop: CancellationToken,
}

impl Ticks {
    fn every(period_ms: u64, stop: CancellationToken) -> Ticks {
        let mut tick = tokio::time::interval(Duration::from_millis(period_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks { tick, stop }
    }

    /// Waits for the next tick: false once `stop` is cancelled.
    async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = self.tick.tick() => true,
        }
    }
}

/// Pub/sub events: sold out and batch changes reach this instance within milliseconds.
async fn events<B: Backend>(app: Arc<App<B>>, stop: CancellationToken) {
    let mut rx = app.backend().subscribe();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = rx.recv() => m,
        };
        match msg {
            Ok(m) => app.catalog().on_event(&m).await,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// Periodic refresh: the fallback for missed events; also exports the stock gauges.
async fn refresh<B: Backend>(app: Arc<App<B>>, stop: CancellationToken) {
    let cfg = app.config().clone();
    let mut ticks = Ticks::every(cfg.cache.refresh_ms, stop);
    let catalog = app.catalog();
    let mut n: u64 = 0;
    catalog.warm().await;
    while ticks.next().await {
        let now = now_ms();
        for entry in catalog.cache().all() {
            // An ended batch changes only by a patch (announced by an event); the refresh,
            // the fallback for a lost event, looks at it less often.
            let ended = now
                > entry
                    .batch()
                    .claim_window
                    .end
                    .0
                    .saturating_add(SETTLED_AFTER_END_MS);
            if !ended || n.is_multiple_of(ENDED_REFRESH_EVERY) {
                catalog.refresh(&entry).await;
            }
        }
        if n.is_multiple_of(CHORES_EVERY) {
            catalog.heal_definitions().await;
            catalog.heal_codes().await;
            crate::obs::metrics::upkeep();
            let gauges = catalog.stock_remaining(cfg.metrics.max_batch_labels).await;
            app.set_stock_remaining(gauges);
            app.api().limits().purge();
        }
        n += 1;
    }
}

/// Sweeper: finishes transfers interrupted by a crash. A batch whose claim window ended
/// more than [`SETTLED_AFTER_END_MS`] ago and whose slots hold no open transfer is settled:
/// nothing can open one any more (only claims refill, and they end with the window), so it
/// is not swept again unless its window's end changes (a patch reopening it).
async fn sweeper<B: Backend>(app: Arc<App<B>>, stop: CancellationToken) {
    let cfg = app.config().stock.clone();
    let mut ticks = Ticks::every(cfg.sweep_interval_ms, stop);
    // batch id -> the window end it was settled at
    let mut settled: HashMap<String, i64> = HashMap::new();
    while ticks.next().await {
        let now = now_ms();
        let entries = app.catalog().cache().all();
        for entry in &entries {
            let end = entry.batch().claim_window.end.0;
            if entry.is_lost() || entry.is_retired() || settled.get(entry.id.as_str()) == Some(&end)
            {
                continue;
            }
            match app
                .stock()
                .sweep_counting(&entry.keys, cfg.sweep_min_age_ms)
                .await
            {
                Ok((_, 0)) if now > end.saturating_add(SETTLED_AFTER_END_MS) => {
                    settled.insert(entry.id.to_string(), end);
                }
                Ok(_) => {}
                Err(e) => SweepFailed {
                    batch: &entry.id,
                    error: &e.to_string(),
                }
                .emit(),
            }
        }
        if settled.len() > entries.len() {
            let live: HashSet<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            settled.retain(|id, _| live.contains(id.as_str()));
        }
    }
}

/// Coupon sweeper: writes `expired` for coupons past their validity end and the "expiring
/// soon" reminders that are due, and measures the outbox (`notify::sweep_once`; failures
/// are logged there and retried at the next interval).
async fn coupon_sweeper<B: Backend>(app: Arc<App<B>>, stop: CancellationToken) {
    let cfg = app.config().events.clone();
    let mut ticks = Ticks::every(cfg.sweep_interval_ms, stop);
    while ticks.next().await {
        let now = app.api().clock().now_ms();
        let _ = crate::notify::sweep_once(app.store(), &cfg, now).await;
        let _ = crate::notify::sweep_managed(app.store(), app.api().coupons(), &cfg, now).await;
    }
}

/// Grant job resumer: at start and every `grants.poll_ms`, resumes running jobs nobody
/// holds (their instance died or stopped) and fails uploads that broke off
/// (`jobs::Grants::resume_orphans`). The jobs run as tasks of `jobs::Grants`, stopped by
/// `Gateway::shutdown`.
async fn grant_resumer<B: Backend>(app: Arc<App<B>>, stop: CancellationToken) {
    let grants = app.api().grants().clone();
    let mut ticks = Ticks::every(grants.config().poll_ms, stop);
    while ticks.next().await {
        grants.resume_orphans().await;
    }
}

/// Retirer: every `batches.retire_every_ms`, the batches listed once, then one request-id
/// rotation pass (`recovery::Rotator`, at the system's clock: it compares with Redis's) and
/// one retirement pass (`recovery::retire_due`, at the Api's clock). Every gateway runs it;
/// its steps are idempotent. `retire_after_ms = 0`: nothing is begun, retirements begun
/// earlier still complete.
async fn retirer<B: Backend>(app: Arc<App<B>>, stop: CancellationToken) {
    let cfg = app.config().batches.clone();
    let mut ticks = Ticks::every(cfg.retire_every_ms, stop);
    let mut rotator = crate::recovery::Rotator::new(cfg.request_id_retention_ms);
    let limit = Duration::from_millis(cfg.retire_every_ms.max(10_000));
    while ticks.next().await {
        let backend = app.backend().as_ref();
        let pass = async {
            let rows = app.store().batch_rows().await?;
            // a shard's failure is counted in the pass
            rotator.pass(backend, &rows, now_ms()).await;
            let now = app.api().clock().now_ms();
            crate::recovery::retire_due(backend, app.store(), &rows, now, cfg.retire_after_ms).await
        };
        // bounded: a pass that hangs on a dead backend gives way to the next tick
        let failed = match tokio::time::timeout(limit, pass).await {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => format!("retirement pass: {e}"),
            Err(_) => "retirement pass timed out".to_string(),
        };
        BatchRetirement {
            batch: "",
            outcome: "failed",
            keys: 0,
            detail: &failed,
        }
        .emit();
    }
}
