//! Edge protection, local to the instance (no Redis round trip): rate limits per instance,
//! per user and per client IP, and admission control on in-flight backend calls.
//!
//! Invariant kept here: a request refused here never reaches the backend, so nothing is
//! claimed for it; every refusal carries `Retry-After`, and the limiter's memory is bounded:
//! each keyed limiter tracks at most `limits.max_tracked_keys` keys, however many distinct
//! users or addresses send requests ([`BoundedStore`]).

use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{LimitsConfig, RateLimit};
use crate::obs::events::{BackendSlotReleased, BackendSlotTaken, RateLimited, Shed};

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
type Keyed<K, C> = RateLimiter<K, BoundedStore<K, C>, C, NoOpMiddleware<<C as Clock>::Instant>>;

fn quota(r: &RateLimit) -> Option<Quota> {
    let rate = NonZeroU32::new(r.per_second)?;
    let burst = NonZeroU32::new(r.burst.max(r.per_second)).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

fn keyed<K, C>(r: &RateLimit, clock: &C, max_keys: usize) -> Option<Keyed<K, C>>
where
    K: Hash + Eq + Clone,
    C: Clock + Clone,
{
    quota(r).map(|q| {
        RateLimiter::new(
            q,
            BoundedStore::new(q, clock.clone(), max_keys),
            clock.clone(),
        )
    })
}

/// The keyed GCRA state of a rate limiter (governor's `StateStore`), holding at most `max`
/// keys.
///
/// Each key's state is its theoretical arrival time (nanoseconds since the store's start,
/// 0 = fresh), updated by compare-and-swap as governor's own stores do. A new key first
/// reserves room in `count`, which is always >= the number of entries (it rises before an
/// insert and falls after a removal), so the map never holds more than `max` keys, even
/// under concurrent inserts. When the store is full, one caller makes room: it drops the
/// keys whose bucket is full again (indistinguishable from fresh, so nothing changes for
/// them), and if that frees less than a tenth of the bound, every key is forgotten (their
/// buckets refill: this errs towards admitting, and a flood of distinct keys costs O(1)
/// amortised per key). A new key that finds the store full while another caller is making
/// room is decided as a fresh key and not remembered.
///
/// How many keys are tracked is counted in `entries` (raised under the shard lock of the
/// insert, lowered after a removal), not read from the map: `DashMap::len` adds up its
/// shards one after the other, so while one caller clears the map and others insert, it
/// can report more keys than the map ever held at once.
pub struct BoundedStore<K, C: Clock> {
    map: DashMap<K, AtomicU64>,
    count: AtomicUsize,
    entries: AtomicUsize,
    max: usize,
    making_room: parking_lot::Mutex<()>,
    clock: C,
    start: C::Instant,
    /// The weight of one cell: a key whose arrival time is this far behind now is fresh.
    cell: Nanos,
}

impl<K: Hash + Eq + Clone, C: Clock> BoundedStore<K, C> {
    pub fn new(quota: Quota, clock: C, max: usize) -> Self {
        let cell = Nanos::from(quota.replenish_interval().max(Duration::from_nanos(1)));
        BoundedStore {
            map: DashMap::new(),
            count: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
            max,
            making_room: parking_lot::Mutex::new(()),
            start: clock.now(),
            clock,
            cell,
        }
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.entries.load(Ordering::Acquire)
    }

    /// Removes the keys `keep` refuses; returns how many.
    fn remove_where(&self, keep: impl Fn(u64) -> bool) -> usize {
        let mut removed = 0;
        self.map.retain(|_, v| {
            let k = keep(v.load(Ordering::Acquire));
            if !k {
                removed += 1;
            }
            k
        });
        self.entries.fetch_sub(removed, Ordering::AcqRel);
        self.count.fetch_sub(removed, Ordering::AcqRel);
        removed
    }

    /// Drops keys that are as good as fresh (arrival time at least one cell behind now).
    fn drop_fresh(&self) -> usize {
        let now = self.clock.now().duration_since(self.start);
        let below = u64::from(now.saturating_sub(self.cell));
        self.remove_where(|tat| tat > below)
    }

    /// Reserves room for one new key; `false` if the store is full and someone else is
    /// making room.
    fn reserve(&self) -> bool {
        for _ in 0..2 {
            if self.count.fetch_add(1, Ordering::AcqRel) < self.max {
                return true;
            }
            self.count.fetch_sub(1, Ordering::AcqRel);
            let Some(_room) = self.making_room.try_lock() else {
                return false;
            };
            if self.count.load(Ordering::Acquire) < self.max {
                continue; // made meanwhile
            }
            self.drop_fresh();
            let free = self.max.saturating_sub(self.count.load(Ordering::Acquire));
            if free <= self.max / 10 {
                let forgotten = self.remove_where(|_| false);
                tracing::warn!(
                    forgotten,
                    bound = self.max,
                    "rate limiter full of active keys (limits.max_tracked_keys): forgot them all"
                );
            }
        }
        false
    }
}

/// One compare-and-swap decision on a key's state (0 = fresh), as governor's own stores do.
fn measure_and_replace_one<T, F, E>(state: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let read = |v: u64| NonZeroU64::new(v).map(|n| Nanos::from(n.get()));
    let mut prev = state.load(Ordering::Acquire);
    let mut decision = f(read(prev));
    while let Ok((result, next)) = decision {
        match state.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(actual) => prev = actual,
        }
        decision = f(read(prev));
    }
    decision.map(|(result, _)| result)
}

impl<K: Hash + Eq + Clone, C: Clock> StateStore for BoundedStore<K, C> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        #[allow(clippy::disallowed_methods)] // the guard lives for this one CAS; no map change
        if let Some(state) = self.map.get(key) {
            return measure_and_replace_one(&state, f);
        }
        if !self.reserve() {
            return f(None).map(|(result, _)| result);
        }
        #[allow(clippy::disallowed_methods)] // the guard lives for this one CAS; no map change
        match self.map.entry(key.clone()) {
            Entry::Occupied(e) => {
                // inserted by another caller meanwhile: give the reservation back
                self.count.fetch_sub(1, Ordering::AcqRel);
                measure_and_replace_one(e.get(), f)
            }
            Entry::Vacant(e) => {
                let state = e.insert(AtomicU64::new(0));
                // counted while the shard is still locked: a removal cannot see the key
                // before it is counted
                self.entries.fetch_add(1, Ordering::AcqRel);
                measure_and_replace_one(&state, f)
            }
        }
    }
}

impl<K: Hash + Eq + Clone, C: Clock> ShrinkableKeyedStateStore<K> for BoundedStore<K, C> {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = u64::from(drop_below);
        self.remove_where(|tat| tat > below);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.tracked()
    }

    fn is_empty(&self) -> bool {
        self.tracked() == 0
    }
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
            claim_user: keyed(&cfg.claim_per_user, &clock, cfg.max_tracked_keys),
            claim_ip: keyed(&cfg.claim_per_ip, &clock, cfg.max_tracked_keys),
            other_ip: keyed(&cfg.other_per_ip, &clock, cfg.max_tracked_keys),
            trusted_proxies: cfg.trusted_proxies.clone(),
            retry_after_s: cfg.retry_after_s,
            clock,
        }
    }

    fn refusal(&self, limit: &'static str, wait: Duration) -> LimitError {
        RateLimited { limit }.emit();
        LimitError::RateLimited {
            limit,
            retry_after_s: wait.as_secs().max(self.retry_after_s),
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

    /// Drops keys whose bucket is full again (as good as fresh); called periodically. The
    /// bound itself is kept on every insert (see [`BoundedStore`]).
    pub fn purge(&self) {
        if let Some(l) = &self.claim_user {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in [&self.claim_ip, &self.other_ip].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys each keyed limiter tracks now.
    pub fn tracked_keys(&self) -> TrackedKeys {
        TrackedKeys {
            user: self.claim_user.as_ref().map_or(0, |l| l.len()),
            ip: self.claim_ip.as_ref().map_or(0, |l| l.len()),
            other_ip: self.other_ip.as_ref().map_or(0, |l| l.len()),
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

/// How many keys each keyed limiter tracks (each at most `limits.max_tracked_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedKeys {
    pub user: usize,
    pub ip: usize,
    pub other_ip: usize,
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
                    Shed { reason: "inflight" }.emit();
                    LimitError::Overloaded(self.wait, self.retry_after_s)
                })?,
        };
        BackendSlotTaken.emit();
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
        BackendSlotReleased.emit();
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

    /// Regression (hardening item 14): `max_tracked_keys` was never enforced, so a flood of
    /// distinct user ids or client IPs grew the limiters without bound.
    #[test]
    fn item14_a_flood_of_distinct_keys_never_exceeds_max_tracked_keys() {
        let clock = FakeRelativeClock::default();
        let l = Arc::new(RateLimits::with_clock(
            &LimitsConfig {
                max_tracked_keys: 100,
                ..cfg()
            },
            clock,
        ));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let mut worst = TrackedKeys {
                        user: 0,
                        ip: 0,
                        other_ip: 0,
                    };
                    for i in 0..20_000u32 {
                        let ip = IpAddr::from((t << 24 | i).to_be_bytes());
                        // each key is used once: every limiter admits it
                        assert!(l.check_claim(ip, &format!("u{t}-{i}")).is_ok());
                        let now = l.tracked_keys();
                        worst.user = worst.user.max(now.user);
                        worst.ip = worst.ip.max(now.ip);
                    }
                    worst
                })
            })
            .collect();
        for t in threads {
            let worst = t.join().unwrap();
            assert!(worst.user <= 100 && worst.ip <= 100, "{worst:?}");
        }
        let now = l.tracked_keys();
        assert!(now.user <= 100 && now.ip <= 100, "{now:?}");
        assert!(
            now.user > 0 && now.ip > 0,
            "keys are still tracked: {now:?}"
        );
    }

    /// A full store first drops the keys whose bucket has refilled, so active keys keep
    /// their state while that makes room; a store full of active keys forgets them all.
    #[test]
    fn item14_full_store_drops_refilled_keys_first() {
        let clock = FakeRelativeClock::default();
        let l = RateLimits::with_clock(
            &LimitsConfig {
                max_tracked_keys: 10,
                ..cfg()
            },
            clock.clone(),
        );
        let ip = |i: u8| IpAddr::from([10, 0, 0, i]);
        let hot = |l: &RateLimits<FakeRelativeClock>| l.check_claim(ip(1), "hot").is_ok();
        // per user 2/s, burst 2 (one cell = 500 ms)
        for i in 0..8 {
            assert!(l.check_claim(ip(10 + i), &format!("idle{i}")).is_ok());
        }
        assert!(hot(&l) && hot(&l));
        clock.advance(Duration::from_millis(1000));
        // the idle keys have refilled; "hot" goes into debt
        assert!(hot(&l) && hot(&l) && !hot(&l));
        for i in 0..9 {
            assert!(l.check_claim(ip(100 + i), &format!("new{i}")).is_ok());
            let t = l.tracked_keys();
            assert!(t.user <= 10 && t.ip <= 10, "{t:?}");
        }
        assert!(
            !hot(&l),
            "an active key kept its state: only refilled keys were dropped"
        );
        // a flood of active keys: forgotten all at once, never over the bound
        for i in 0..100 {
            assert!(l.check_claim(ip(150 + i), &format!("flood{i}")).is_ok());
            let t = l.tracked_keys();
            assert!(t.user <= 10 && t.ip <= 10, "{t:?}");
        }
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
