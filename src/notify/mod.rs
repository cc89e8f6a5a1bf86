//! Events out, off the request path: the delivery worker that takes events from the outbox
//! (`store::outbox`, written in the transaction of each state change) and POSTs them to
//! `events.webhook_url`, signed ([`signature`], [`webhook`]); and the coupon sweep pass
//! (expiry, "expiring soon" reminders, the outbox gauges) a background loop runs; the
//! coupons whose state lives on their shard are expired and released there
//! ([`sweep_managed`]: the database only finds them).
//!
//! Invariants kept here:
//! - delivery is at least once: an event leaves the outbox's `pending` state only when the
//!   consumer answered 2xx (`delivered`) or after `events.max_attempts` failed attempts
//!   (`dead`, kept for the admin ledger); a worker that stops or dies mid-attempt leaves
//!   the event to be retried when its lease ends. Consumers deduplicate by the event id
//!   (the body's `id` and the `Claimgate-Event-Id` header, the same on every attempt);
//! - one instance's worker never attempts an event another instance holds (the outbox
//!   claim is leased), so many instances can run one worker each;
//! - retries back off: the wait doubles per failed attempt from `events.backoff_min_ms` up
//!   to `events.backoff_max_ms`, with jitter, so a consumer that comes back is not hit by
//!   every instance at once; every wait and every attempt is bounded;
//! - time comes from one [`Clock`], so tests drive retries, expiry and reminders without
//!   sleeping.

pub mod signature;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use self::webhook::Webhook;
use crate::backend::Backend;
use crate::config::EventsConfig;
use crate::coupons::{Changed, Coupons};
use crate::domain::coupon::Transition;
use crate::domain::time::Clock;
use crate::obs::events::{
    CouponsSwept, DeliveryFailed, EventAttempted, OutboxMeasured, SweepPassFailed,
};
use crate::store::{Attempted, Db, DbError, DueEvent, OutboxStats, Swept};

/// What one delivery pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pass {
    /// Events claimed for an attempt.
    pub claimed: usize,
    pub delivered: usize,
    /// Failed attempts that will be retried.
    pub failed: usize,
    /// Events that went to the dead-letter state.
    pub dead: usize,
    /// Results not recorded because another worker took the event over meanwhile.
    pub lost: usize,
}

/// The wait before attempt `attempts + 1` after `attempts` failed ones: `min * 2^(n-1)`
/// capped at `max`, of which a random part of up to half is taken off (`jitter` in
/// `[0, 1)`), so the wait is in `[base / 2, base]`.
pub fn backoff_ms(cfg: &EventsConfig, attempts: u32, jitter: f64) -> i64 {
    let doublings = attempts.saturating_sub(1).min(62);
    let base = cfg
        .backoff_min_ms
        .saturating_mul(1_u64 << doublings)
        .min(cfg.backoff_max_ms);
    let cut = (base as f64 / 2.0 * jitter.clamp(0.0, 1.0)) as u64;
    i64::try_from(base - cut.min(base / 2)).unwrap_or(i64::MAX)
}

struct Inner {
    db: Db,
    cfg: EventsConfig,
    webhook: Webhook,
    clock: Arc<dyn Clock>,
    /// This worker's name in lease tokens.
    name: String,
}

/// The delivery worker of one instance.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

impl Deliverer {
    /// A worker for the configured webhook; `None` when `events.webhook_url` is unset (the
    /// outbox is written all the same; its events wait).
    pub fn new(db: Db, cfg: &EventsConfig, clock: Arc<dyn Clock>) -> Option<Deliverer> {
        let webhook = Webhook::new(cfg)?;
        Some(Deliverer {
            inner: Arc::new(Inner {
                db,
                cfg: cfg.clone(),
                webhook,
                clock,
                name: format!("{:016x}", rand::random::<u64>()),
            }),
        })
    }

    /// One pass: claims up to `events.concurrency` due events, attempts them all at once
    /// and records each result. Bounded: the database calls by their timeouts, each
    /// attempt by `events.request_timeout_ms`.
    pub async fn run_once(&self) -> Result<Pass, DbError> {
        let me = &self.inner;
        let token = format!("{}-{:016x}", me.name, rand::random::<u64>());
        let now = me.clock.now_ms();
        let lease = i64::try_from(me.cfg.lease_ms).unwrap_or(i64::MAX);
        let due = me
            .db
            .claim_due_events(&token, now, lease, me.cfg.concurrency)
            .await?;
        let mut pass = Pass {
            claimed: due.len(),
            ..Pass::default()
        };
        let mut attempts = JoinSet::new();
        for ev in due {
            if ev.attempts > me.cfg.max_attempts {
                // claimed before by an instance that stopped before recording its last
                // attempt: that was the last one
                let result = Attempted::Failed {
                    status: None,
                    error: "the last attempt's result was never recorded (its instance \
                            stopped mid-attempt)"
                        .to_string(),
                    retry_at: None,
                };
                self.record(&ev, &token, &result, &mut pass).await?;
                continue;
            }
            let this = self.clone();
            attempts.spawn(async move {
                let t = this.inner.clock.now_ms().div_euclid(1000);
                let answer = this.inner.webhook.post(&ev.event_id, &ev.payload, t).await;
                (ev, answer)
            });
        }
        while let Some(joined) = attempts.join_next().await {
            let Ok((ev, answer)) = joined else {
                continue; // a panicked attempt: its lease ends, it is retried
            };
            let result = match answer {
                Ok(status) => Attempted::Delivered { status },
                Err(f) => {
                    let retry_at = (ev.attempts < me.cfg.max_attempts).then(|| {
                        let wait = backoff_ms(&me.cfg, ev.attempts, rand::random::<f64>());
                        me.clock.now_ms().saturating_add(wait)
                    });
                    Attempted::Failed {
                        status: f.status,
                        error: f.error,
                        retry_at,
                    }
                }
            };
            self.record(&ev, &token, &result, &mut pass).await?;
        }
        Ok(pass)
    }

    async fn record(
        &self,
        ev: &DueEvent,
        token: &str,
        result: &Attempted,
        pass: &mut Pass,
    ) -> Result<(), DbError> {
        let me = &self.inner;
        let now = me.clock.now_ms();
        if !me.db.record_attempt(ev.seq, token, now, result).await? {
            pass.lost += 1;
            return Ok(());
        }
        let outcome = match result {
            Attempted::Delivered { .. } => {
                pass.delivered += 1;
                "delivered"
            }
            Attempted::Failed { retry_at: None, .. } => {
                pass.dead += 1;
                "dead"
            }
            Attempted::Failed { .. } => {
                pass.failed += 1;
                "failed"
            }
        };
        let (status, error) = match result {
            Attempted::Delivered { status } => (Some(*status), ""),
            Attempted::Failed { status, error, .. } => (*status, error.as_str()),
        };
        EventAttempted {
            outcome,
            event_id: &ev.event_id,
            attempt: ev.attempts,
            status,
            error,
        }
        .emit();
        Ok(())
    }

    /// Runs passes until `stop` is cancelled: at once again while passes find a full load,
    /// else every `events.poll_interval_ms`. A pass under way when `stop` comes finishes
    /// (bounded by the attempt timeout).
    pub fn spawn(self, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let idle = Duration::from_millis(self.inner.cfg.poll_interval_ms);
            let full = self.inner.cfg.concurrency as usize;
            while !stop.is_cancelled() {
                let wait = match self.run_once().await {
                    Ok(p) if p.claimed >= full => Duration::ZERO,
                    Ok(_) => idle,
                    Err(e) => {
                        DeliveryFailed {
                            error: &e.to_string(),
                        }
                        .emit();
                        idle
                    }
                };
                if !wait.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        })
    }
}

/// One sweep pass at `now`: coupons past their validity end are written `expired`,
/// reminders that are due are written, and the outbox is measured. Each step is bounded by
/// `events.sweep_batch`; safe to run on every instance at once.
pub async fn sweep_once(
    db: &Db,
    cfg: &EventsConfig,
    now: i64,
) -> Result<(Swept, OutboxStats), DbError> {
    let lead = i64::try_from(cfg.expiring_soon_ms).unwrap_or(i64::MAX);
    let swept = match db.sweep_coupons(now, cfg.sweep_batch, lead).await {
        Ok(s) => s,
        Err(e) => {
            SweepPassFailed {
                error: &e.to_string(),
            }
            .emit();
            return Err(e);
        }
    };
    CouponsSwept {
        expired: swept.expired,
        released: swept.released,
        reminded: swept.reminded,
    }
    .emit();
    let stats = match db.outbox_stats().await {
        Ok(s) => s,
        Err(e) => {
            SweepPassFailed {
                error: &e.to_string(),
            }
            .emit();
            return Err(e);
        }
    };
    OutboxMeasured {
        pending: stats.pending,
        dead: stats.dead,
        lag_ms: stats
            .oldest_pending_at
            .map_or(0, |t| u64::try_from(now.saturating_sub(t)).unwrap_or(0)),
    }
    .emit();
    Ok((swept, stats))
}

/// One pass over the coupons whose state lives on their shard and that are due at `now`
/// (validity ended, or a lock's deadline passed; at most `events.sweep_batch`): the
/// database finds them (`Db::due_managed`), their shard decides and writes the change
/// (`coupons::Coupons::change`: the same state machine, the deadline the entry's, so a lock
/// whose gateway died is released by any other), and the persister brings it to the
/// database like any change. A coupon whose entry is gone (its shard was restored from the
/// database since) changes in the database. A coupon that fails is left to the next pass.
/// Returns how many were expired and released.
pub async fn sweep_managed<B: Backend>(
    db: &Db,
    coupons: &Coupons<B>,
    cfg: &EventsConfig,
    now: i64,
) -> Result<(u64, u64), DbError> {
    let due = match db.due_managed(now, cfg.sweep_batch).await {
        Ok(d) => d,
        Err(e) => {
            SweepPassFailed {
                error: &e.to_string(),
            }
            .emit();
            return Err(e);
        }
    };
    let (mut expired, mut released) = (0, 0);
    for d in due {
        let done = match coupons.get(&d.coupon_id).await {
            Ok(Some(m)) => match coupons.change(m, &d.transition, now).await {
                Ok(Changed::Written(_)) => true,
                Ok(Changed::Repeat(_)) => false,
                Ok(Changed::NotManaged) => db
                    .transition(&d.coupon_id, &d.transition, now)
                    .await
                    .is_ok(),
                Err(_) => false,
            },
            Ok(None) => db
                .transition(&d.coupon_id, &d.transition, now)
                .await
                .is_ok(),
            Err(_) => false,
        };
        match (done, &d.transition) {
            (true, Transition::Expire) => expired += 1,
            (true, _) => released += 1,
            (false, _) => {}
        }
    }
    CouponsSwept {
        expired,
        released,
        reminded: 0,
    }
    .emit();
    Ok((expired, released))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let cfg = EventsConfig {
            backoff_min_ms: 100,
            backoff_max_ms: 1_000,
            ..EventsConfig::default()
        };
        assert_eq!(backoff_ms(&cfg, 1, 0.0), 100);
        assert_eq!(backoff_ms(&cfg, 2, 0.0), 200);
        assert_eq!(backoff_ms(&cfg, 3, 0.0), 400);
        assert_eq!(backoff_ms(&cfg, 4, 0.0), 800);
        assert_eq!(backoff_ms(&cfg, 5, 0.0), 1_000);
        assert_eq!(backoff_ms(&cfg, 1_000, 0.0), 1_000);
        assert_eq!(backoff_ms(&cfg, 0, 0.0), 100);
        // jitter takes off at most half
        assert_eq!(backoff_ms(&cfg, 3, 0.999_999), 201);
        assert_eq!(backoff_ms(&cfg, 5, 0.5), 750);
        for i in 0..1_000 {
            let j = f64::from(i) / 1_000.0;
            let w = backoff_ms(&cfg, 4, j);
            assert!((400..=800).contains(&w), "{j}: {w}");
        }
    }
}
