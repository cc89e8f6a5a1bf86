//! Edge protection, local to the instance (no Redis round trip): rate limits per instance,
//! per user and per client IP, and admission control on in-flight backend calls.
//!
//! Invariant kept here: a request refused here never reaches the backend, so nothing is
//! claimed for it; every refusal carries `Retry-After`, and the limiter's memory is bounded
//! (`limits.max_tracked_keys`).

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, RateLimit};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("rate limited ({limit})")]
    RateLimited {
        limit: &'static str,
        retry_after_s: u64,
    },
    #[error("overloaded: no backend slot within {0:?}")]
    Overloaded(Duration, u64),
}

type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Keyed<K, C> =
    RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

fn quota(r: &RateLimit) -> Option<Quota> {
    let rate = NonZeroU32::new(r.per_second)?;
    let burst = NonZeroU32::new(r.burst.max(r.per_second)).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

fn keyed<K, C>(r: &RateLimit, clock: &C) -> Option<Keyed<K, C>>
where
    K: std::hash::Hash + Eq + Clone,
    C: Clock + Clone,
{
    quota(r).map(|q| RateLimiter::dashmap_with_clock(q, clock.clone()))
}

/// The rate limiters of one instance. Generic over the clock so tests can pause time.
pub struct RateLimits<C: Clock = DefaultClock> {
    clock: C,
    claim_global: Option<Direct<C>>,
    claim_user: Option<Keyed<Box<str>, C>>,
    claim_ip: Option<Keyed<IpAddr, C>>,
    other_ip: Option<Keyed<IpAddr, C>>,
    trusted_proxies: Vec<IpAddr>,
    retry_after_s: u64,
    max_keys: usize,
}

impl RateLimits<DefaultClock> {
    pub fn new(cfg: &LimitsConfig) -> Self {
        Self::with_clock(cfg, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    pub fn with_clock(cfg: &LimitsConfig, clock: C) -> Self {
        RateLimits {
            claim_global: quota(&cfg.claim_global)
                .map(|q| RateLimiter::direct_with_clock(q, clock.clone())),
            claim_user: keyed(&cfg.claim_per_user, &clock),
            claim_ip: keyed(&cfg.claim_per_ip, &clock),
            other_ip: keyed(&cfg.other_per_ip, &clock),
            trusted_proxies: cfg.trusted_proxies.clone(),
            retry_after_s: cfg.retry_after_s,
            max_keys: cfg.max_tracked_keys,
            clock,
        }
    }

    fn refusal(&self, limit: &'static str, wait: Duration) -> LimitError {
        metrics::counter!(crate::metrics::RATE_LIMITED, "limit" => limit).increment(1);
        LimitError::RateLimited {
            limit,
            retry_after_s: wait.as_secs().max(self.retry_after_s).max(1),
        }
    }

    /// A claim by `user` from `ip`: global, then per IP, then per user.
    pub fn check_claim(&self, ip: IpAddr, user: &str) -> Result<(), LimitError> {
        if let Some(l) = &self.claim_global {
            l.check()
                .map_err(|n| self.refusal("global", n.wait_time_from(self.clock.now())))?;
        }
        if let Some(l) = &self.claim_ip {
            l.check_key(&ip)
                .map_err(|n| self.refusal("ip", n.wait_time_from(self.clock.now())))?;
        }
        if let Some(l) = &self.claim_user {
            l.check_key(&Box::from(user))
                .map_err(|n| self.refusal("user", n.wait_time_from(self.clock.now())))?;
        }
        Ok(())
    }

    /// Any other route from `ip`.
    pub fn check_other(&self, ip: IpAddr) -> Result<(), LimitError> {
        if let Some(l) = &self.other_ip {
            l.check_key(&ip)
                .map_err(|n| self.refusal("ip", n.wait_time_from(self.clock.now())))?;
        }
        Ok(())
    }

    /// Drops idle keys; called periodically. If still above the bound, forgets all keys
    /// (their buckets refill, which errs towards admitting).
    pub fn purge(&self) {
        if let Some(l) = &self.claim_user {
            l.retain_recent();
            if l.len() > self.max_keys {
                l.retain_recent();
            }
            l.shrink_to_fit();
        }
        for l in [&self.claim_ip, &self.other_ip].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// The client's address: the peer, or, when the peer is a trusted proxy, the rightmost
    /// address in `X-Forwarded-For` that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer_ip = peer.ip();
        if !self.trusted_proxies.contains(&peer_ip) {
            return peer_ip;
        }
        let mut client = peer_ip;
        // Walk back from the nearest hop over trusted proxies.
        let mut hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        while let Some(ip) = hops.pop() {
            if !self.trusted_proxies.contains(&ip) {
                return ip;
            }
            client = ip;
        }
        client
    }
}

/// Bounds backend calls in flight; a request that cannot get a slot in time is shed.
pub struct Admission {
    slots: Arc<Semaphore>,
    wait: Duration,
    retry_after_s: u64,
}

impl Admission {
    pub fn new(cfg: &LimitsConfig) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(cfg.max_inflight)),
            wait: Duration::from_millis(cfg.admission_wait_ms),
            retry_after_s: cfg.retry_after_s,
        }
    }

    pub async fn admit(&self) -> Result<InflightPermit, LimitError> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::time::timeout(self.wait, self.slots.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or_else(|| {
                    metrics::counter!(crate::metrics::SHED, "reason" => "inflight").increment(1);
                    LimitError::Overloaded(self.wait, self.retry_after_s)
                })?,
        };
        metrics::gauge!(crate::metrics::INFLIGHT).increment(1.0);
        Ok(InflightPermit { _permit: permit })
    }

    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// A backend slot; released (and the in-flight gauge lowered) on drop.
pub struct InflightPermit {
    _permit: OwnedSemaphorePermit,
}

impl Drop for InflightPermit {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::INFLIGHT).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn cfg() -> LimitsConfig {
        LimitsConfig {
            claim_global: RateLimit::new(0, 0),
            claim_per_user: RateLimit::new(2, 2),
            claim_per_ip: RateLimit::new(5, 5),
            trusted_proxies: vec!["10.0.0.1".parse().unwrap()],
            max_inflight: 2,
            admission_wait_ms: 20,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn per_user_limit_refills_with_time() {
        let clock = FakeRelativeClock::default();
        let l = RateLimits::with_clock(&cfg(), clock.clone());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(l.check_claim(ip, "u1").is_ok());
        assert!(l.check_claim(ip, "u1").is_ok());
        let err = l.check_claim(ip, "u1").unwrap_err();
        assert!(
            matches!(err, LimitError::RateLimited { limit: "user", retry_after_s } if retry_after_s >= 1)
        );
        assert!(
            l.check_claim(ip, "u2").is_ok(),
            "other users are not affected"
        );
        clock.advance(Duration::from_millis(500));
        assert!(
            l.check_claim(ip, "u1").is_ok(),
            "one token back after 1/rate"
        );
        assert!(l.check_claim(ip, "u1").is_err());
    }

    #[test]
    fn per_ip_limit_applies_across_users() {
        let clock = FakeRelativeClock::default();
        let l = RateLimits::with_clock(&cfg(), clock);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        for i in 0..5 {
            assert!(l.check_claim(ip, &format!("u{i}")).is_ok());
        }
        assert!(matches!(
            l.check_claim(ip, "u9"),
            Err(LimitError::RateLimited { limit: "ip", .. })
        ));
    }

    #[test]
    fn forwarded_for_is_trusted_only_from_proxies() {
        let l = RateLimits::new(&cfg());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 10.0.0.1".parse().unwrap());
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let other: SocketAddr = "9.9.9.9:5000".parse().unwrap();
        assert_eq!(l.client_ip(proxy, &h), "1.2.3.4".parse::<IpAddr>().unwrap());
        assert_eq!(l.client_ip(other, &h), "9.9.9.9".parse::<IpAddr>().unwrap());
        assert_eq!(
            l.client_ip(proxy, &HeaderMap::new()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn admission_sheds_after_the_wait() {
        let a = Admission::new(&cfg());
        let p1 = a.admit().await.unwrap();
        let _p2 = a.admit().await.unwrap();
        let shed = a.admit().await;
        assert!(matches!(shed, Err(LimitError::Overloaded(..))));
        drop(p1);
        assert!(a.admit().await.is_ok(), "a freed slot is reused");
    }
}
