//! Local hot-key cache: batch metadata, the sold-out flag and "user already at limit".
//!
//! Invariant kept here: the cache may only short-circuit NEGATIVE answers (not found, sold
//! out, paused, outside the window, not eligible, at limit). It never grants: every coupon
//! comes from the claim script, which re-checks everything atomically. A stale entry can
//! at worst refuse a claim the script would have allowed, until the next event or refresh.
//! A user remembered at the daily limit is remembered for the batch's LOCAL day (its
//! `timezone`, as `lua/claim.lua` counts it), so the cache lets the user through again at
//! the same local midnight the script resets at.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};

use crate::contract::keys::BatchKeys;
use crate::domain::batch::{Batch, BatchState, Timestamp};
use crate::domain::quote::{Terms, scope_set};
use crate::domain::time::Zone;

/// One batch as this instance knows it.
pub struct CachedBatch {
    pub id: String,
    pub keys: BatchKeys,
    def: RwLock<Arc<Batch>>,
    /// The definition's time zone, resolved once (a claim asks its offset).
    zone: RwLock<Arc<Zone>>,
    deny: RwLock<Arc<HashSet<String>>>,
    /// The scope ids as a set (a cart line or a product page matches with one lookup);
    /// replaced, never mutated, so a changed scope gets a new `Arc` (the product index tells
    /// a change by pointer).
    scope: RwLock<Arc<HashSet<Box<str>>>>,
    /// Serializes [`CachedBatch::update`]: its version check and its stores are one step, so
    /// concurrent refreshes never leave an older definition over a newer one.
    updating: Mutex<()>,
    version: AtomicI64,
    sold_out: AtomicBool,
    /// Redis no longer has this batch (known from the database): claims get 503 until a
    /// `claimgate rebuild`.
    lost: AtomicBool,
    /// Retired (`recovery::retire`): its Redis keys are gone or going, the database is its
    /// record; never lost, and final.
    retired: AtomicBool,
    /// Once sold out: every user who won a coupon (final while sold out). `None` until
    /// loaded; cleared when stock is added.
    winners: RwLock<Option<Arc<HashSet<Box<str>>>>>,
    winners_loading: AtomicBool,
    /// Users known to be at their limit: user -> local day it applies to (`i64::MAX` for the
    /// lifetime limit, which never resets while the backend keeps the batch). Forgotten when
    /// the limits change and when the batch is rebuilt (see [`CachedBatch::enter_epoch`]).
    at_limit: DashMap<Box<str>, i64>,
    /// The coupon-id epoch of the backend state this entry was read from: a rebuild moves
    /// the batch to a new one, restoring per-user counts from the database (coupons lost
    /// with the backend no longer count), so what was remembered per user is void.
    epoch: AtomicU64,
}

impl CachedBatch {
    pub fn new(batch: Batch, version: i64, sold_out: bool) -> CachedBatch {
        let keys = BatchKeys::new(&batch.id, batch.shards);
        let deny = batch.eligibility.deny_users.iter().cloned().collect();
        let scope = scope_set(&batch);
        let zone = batch.zone();
        CachedBatch {
            id: batch.id.clone(),
            keys,
            zone: RwLock::new(Arc::new(zone)),
            def: RwLock::new(Arc::new(batch)),
            deny: RwLock::new(Arc::new(deny)),
            scope: RwLock::new(Arc::new(scope)),
            updating: Mutex::new(()),
            version: AtomicI64::new(version),
            sold_out: AtomicBool::new(sold_out),
            lost: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            winners: RwLock::new(None),
            winners_loading: AtomicBool::new(false),
            at_limit: DashMap::new(),
            epoch: AtomicU64::new(0),
        }
    }

    /// Records the backend's epoch for this batch; `true` when it moved past the one known
    /// (the batch was rebuilt since this entry last read it).
    pub fn enter_epoch(&self, epoch: u64) -> bool {
        self.epoch.fetch_max(epoch, Ordering::AcqRel) < epoch
    }

    pub fn batch(&self) -> Arc<Batch> {
        self.def.read().clone()
    }

    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Acquire)
    }

    /// The batch's time zone.
    pub fn zone(&self) -> Arc<Zone> {
        self.zone.read().clone()
    }

    /// The batch's UTC offset at `now`, ms: what `lua/claim.lua` adds to its TIME to count
    /// days in the batch's zone.
    pub fn day_offset_ms(&self, now: Timestamp) -> i64 {
        self.zone.read().offset_ms_at(now.0)
    }

    /// The batch's local day at `now` (`lua/claim.lua`'s day number).
    pub fn local_day(&self, now: Timestamp) -> i64 {
        self.zone.read().local_day(now.0)
    }

    /// Replaces the definition if `version` is not older than what is cached.
    pub fn update(&self, batch: Batch, version: i64, sold_out: bool) {
        let _serial = self.updating.lock();
        if version < self.version() {
            return;
        }
        if batch.eligibility.deny_users != self.def.read().eligibility.deny_users {
            *self.deny.write() = Arc::new(batch.eligibility.deny_users.iter().cloned().collect());
        }
        if batch.scope != self.def.read().scope {
            *self.scope.write() = Arc::new(scope_set(&batch));
        }
        if batch.timezone != self.def.read().timezone {
            *self.zone.write() = Arc::new(batch.zone());
        }
        *self.def.write() = Arc::new(batch);
        self.version.store(version, Ordering::Release);
        if !sold_out {
            *self.winners.write() = None;
        }
        self.sold_out.store(sold_out, Ordering::Release);
        self.lost.store(false, Ordering::Release);
    }

    pub fn is_sold_out(&self) -> bool {
        self.sold_out.load(Ordering::Acquire)
    }

    pub fn set_sold_out(&self) {
        self.sold_out.store(true, Ordering::Release);
    }

    /// `Some(false)`: sold out and this user won nothing, so no request id of theirs can be
    /// a replay. `None`: not known (winners not loaded, or not sold out).
    pub fn is_winner(&self, user: &str) -> Option<bool> {
        if !self.is_sold_out() {
            return None;
        }
        self.winners.read().as_ref().map(|w| w.contains(user))
    }

    /// Claims the right to load the winners (one loader at a time, once per sell-out).
    pub fn start_loading_winners(&self) -> bool {
        self.is_sold_out()
            && self.winners.read().is_none()
            && !self.winners_loading.swap(true, Ordering::AcqRel)
    }

    pub fn set_winners(&self, winners: Option<HashSet<Box<str>>>) {
        if let Some(w) = winners
            && self.is_sold_out()
        {
            *self.winners.write() = Some(Arc::new(w));
        }
        self.winners_loading.store(false, Ordering::Release);
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub fn set_lost(&self, lost: bool) {
        self.lost.store(lost, Ordering::Release);
    }

    /// Retired: the database is the batch's record (its Redis keys are gone or going).
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Serves the batch as retired from now on (final): never as lost.
    pub fn set_retired(&self) {
        self.retired.store(true, Ordering::Release);
        self.lost.store(false, Ordering::Release);
    }

    /// Marks the batch lost; `true` if it was not lost before (exactly one caller wins).
    pub fn mark_lost_once(&self) -> bool {
        !self.lost.swap(true, Ordering::AcqRel)
    }

    pub fn is_denied(&self, user: &str) -> bool {
        self.deny.read().contains(user)
    }

    /// The scope ids as a set (same `Arc` until the scope changes).
    pub fn scope_ids(&self) -> Arc<HashSet<Box<str>>> {
        self.scope.read().clone()
    }

    /// What this batch's coupons do at checkout.
    pub fn terms(&self) -> Terms {
        Terms::with_ids(&self.batch(), self.scope_ids())
    }

    /// Can a user claim from this batch now, as far as this instance knows: active, window
    /// open, not sold out, not lost (what a product page shows as available).
    pub fn is_claimable(&self, now: Timestamp) -> bool {
        if self.is_lost() || self.is_retired() || self.is_sold_out() {
            return false;
        }
        let b = self.def.read();
        b.state == BatchState::Active && b.claim_window.start <= now && now < b.claim_window.end
    }
}

/// What the cache can answer without the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalRefusal {
    SoldOut,
    Paused,
    NotStarted,
    Ended,
    NotEligible,
    LimitReached,
}

impl LocalRefusal {
    pub fn label(self) -> &'static str {
        match self {
            LocalRefusal::SoldOut => "sold_out",
            LocalRefusal::Paused => "paused",
            LocalRefusal::NotStarted => "not_started",
            LocalRefusal::Ended => "ended",
            LocalRefusal::NotEligible => "not_eligible",
            LocalRefusal::LimitReached => "user_limit",
        }
    }
}

pub struct BatchCache {
    batches: DashMap<String, Arc<CachedBatch>>,
    /// Batch ids recently found to exist nowhere: answered 404 without a backend call.
    missing: DashMap<String, Instant>,
    /// Bumped by every [`BatchCache::clear_missing`], so a lookup that began before a
    /// create cleared its id does not set a stale "missing" mark after it (see
    /// [`BatchCache::set_missing_since`]).
    missing_clears: AtomicU64,
    missing_ttl: Duration,
    max_missing: usize,
    /// Entries in all batches' "at limit" maps, bounded by `max_at_limit`.
    at_limit_entries: AtomicUsize,
    max_at_limit: usize,
}

impl BatchCache {
    pub fn new(max_at_limit: usize, missing_ttl: Duration, max_missing: usize) -> BatchCache {
        BatchCache {
            batches: DashMap::new(),
            missing: DashMap::new(),
            missing_clears: AtomicU64::new(0),
            missing_ttl,
            max_missing,
            at_limit_entries: AtomicUsize::new(0),
            max_at_limit,
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<CachedBatch>> {
        #[allow(clippy::disallowed_methods)] // guard dropped at the end of the expression
        self.batches.get(id).map(|e| e.value().clone())
    }

    pub fn insert(&self, entry: Arc<CachedBatch>) -> Arc<CachedBatch> {
        self.missing.remove(&entry.id);
        #[allow(clippy::disallowed_methods)] // guard dropped at the end of the expression
        self.batches
            .entry(entry.id.clone())
            .or_insert(entry)
            .value()
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<CachedBatch>> {
        #[allow(clippy::disallowed_methods)] // guards only read, dropped by the collect
        self.batches.iter().map(|e| e.value().clone()).collect()
    }

    /// Was `id` found to exist nowhere less than `missing_ttl` ago?
    ///
    /// Never holds a map guard while mutating the map: a `get()` guard alive during a
    /// `remove()` of the same key deadlocks the thread (dashmap shard lock), which is how a
    /// second request for an unknown batch once hung a worker for good.
    pub fn is_missing(&self, id: &str) -> bool {
        let ttl = self.missing_ttl;
        #[allow(clippy::disallowed_methods)] // guard dropped at the end of the statement
        let fresh = self.missing.get(id).map(|at| at.elapsed() < ttl);
        match fresh {
            Some(true) => true,
            Some(false) => {
                // Atomic check-and-remove: a newer mark set meanwhile is kept.
                self.missing.remove_if(id, |_, at| at.elapsed() >= ttl);
                false
            }
            None => false,
        }
    }

    /// Forgets that `id` was missing (it was just created, here or on another instance).
    pub fn clear_missing(&self, id: &str) {
        self.missing_clears.fetch_add(1, Ordering::AcqRel);
        self.missing.remove(id);
    }

    /// Taken before looking a batch up in Redis and the database; handed to
    /// [`BatchCache::set_missing_since`] when the lookup found nothing.
    pub fn missing_epoch(&self) -> u64 {
        self.missing_clears.load(Ordering::Acquire)
    }

    pub fn set_missing(&self, id: &str) {
        if self.missing.len() >= self.max_missing {
            let ttl = self.missing_ttl;
            self.missing.retain(|_, at| at.elapsed() < ttl);
            if self.missing.len() >= self.max_missing {
                return;
            }
        }
        self.missing.insert(id.to_string(), Instant::now());
    }

    /// Marks `id` missing unless a create cleared a mark since `epoch` was taken (the
    /// lookup that found nothing may predate the create): then the mark is taken back.
    pub fn set_missing_since(&self, id: &str, epoch: u64) {
        if self.missing_epoch() != epoch {
            return;
        }
        self.set_missing(id);
        if self.missing_epoch() != epoch {
            self.missing.remove(id);
        }
    }

    /// Checks everything the cache can refuse locally, cheapest first.
    pub fn refuse(
        &self,
        entry: &CachedBatch,
        identity: &crate::domain::auth::Identity,
        now: Timestamp,
    ) -> Option<LocalRefusal> {
        if entry.is_sold_out() {
            return Some(LocalRefusal::SoldOut);
        }
        let batch = entry.batch();
        if batch.state == BatchState::Paused {
            return Some(LocalRefusal::Paused);
        }
        if now < batch.claim_window.start {
            return Some(LocalRefusal::NotStarted);
        }
        if now >= batch.claim_window.end {
            return Some(LocalRefusal::Ended);
        }
        let e = &batch.eligibility;
        if (e.new_users_only && !identity.new_user)
            || !e.require_tags.iter().all(|t| identity.tags.contains(t))
            || entry.is_denied(&identity.user_id)
        {
            return Some(LocalRefusal::NotEligible);
        }
        if self.user_at_limit(entry, &identity.user_id, now) {
            return Some(LocalRefusal::LimitReached);
        }
        None
    }

    fn user_at_limit(&self, entry: &CachedBatch, user: &str, now: Timestamp) -> bool {
        #[allow(clippy::disallowed_methods)] // guard dropped at the end of the statement
        let day = entry.at_limit.get(user).map(|d| *d);
        day.is_some_and(|day| day == i64::MAX || day == entry.local_day(now))
    }

    /// Remembers that `user` reached the lifetime limit (`daily = false`) or today's limit.
    pub fn remember_at_limit(&self, entry: &CachedBatch, user: &str, daily: bool, now: Timestamp) {
        if self.at_limit_entries.load(Ordering::Relaxed) >= self.max_at_limit {
            return;
        }
        let day = if daily {
            entry.local_day(now)
        } else {
            i64::MAX
        };
        if entry.at_limit.insert(Box::from(user), day).is_none() {
            self.at_limit_entries.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops the "at limit" entries of a batch (its limits changed).
    pub fn forget_limits(&self, entry: &CachedBatch) {
        let n = entry.at_limit.len();
        entry.at_limit.clear();
        self.at_limit_entries.fetch_sub(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::auth::Identity;
    use crate::domain::batch::*;

    fn batch(start: i64, end: i64) -> Batch {
        Batch {
            id: "b".into(),
            name: "n".into(),
            stock: 10,
            per_user_limit: 1,
            per_user_daily_limit: None,
            claim_window: Window {
                start: Timestamp(start),
                end: Timestamp(end),
            },
            validity: Validity::Relative {
                days_after_claim: 1,
            },
            discount: Discount::Fixed { amount: 1 },
            scope: Scope {
                kind: ScopeKind::All,
                ids: vec![],
            },
            exclusive: false,
            eligibility: Eligibility {
                deny_users: vec!["bad".into()],
                require_tags: vec![],
                new_users_only: false,
            },
            shards: 2,
            state: BatchState::Active,
            created_at: Timestamp(0),
            ack: None,
            timezone: None,
            budget: None,
            codes: None,
        }
    }

    fn who(u: &str) -> Identity {
        Identity {
            user_id: u.into(),
            tags: vec![],
            new_user: false,
        }
    }

    #[test]
    fn refuses_only_what_it_knows() {
        let cache = BatchCache::new(10, Duration::from_secs(1), 100);
        let e = cache.insert(Arc::new(CachedBatch::new(batch(100, 200), 1, false)));
        assert_eq!(cache.refuse(&e, &who("u"), Timestamp(150)), None);
        assert_eq!(
            cache.refuse(&e, &who("u"), Timestamp(50)),
            Some(LocalRefusal::NotStarted)
        );
        assert_eq!(
            cache.refuse(&e, &who("u"), Timestamp(200)),
            Some(LocalRefusal::Ended)
        );
        assert_eq!(
            cache.refuse(&e, &who("bad"), Timestamp(150)),
            Some(LocalRefusal::NotEligible)
        );
        cache.remember_at_limit(&e, "u", false, Timestamp(150));
        assert_eq!(
            cache.refuse(&e, &who("u"), Timestamp(150)),
            Some(LocalRefusal::LimitReached)
        );
        cache.forget_limits(&e);
        assert_eq!(cache.refuse(&e, &who("u"), Timestamp(150)), None);
        e.set_sold_out();
        assert_eq!(
            cache.refuse(&e, &who("u"), Timestamp(150)),
            Some(LocalRefusal::SoldOut)
        );
        // a newer definition (e.g. stock added) clears sold out; an older one is ignored
        e.update(batch(100, 300), 0, false);
        assert!(e.is_sold_out());
        e.update(batch(100, 300), 2, false);
        assert!(!e.is_sold_out());
    }

    #[test]
    fn daily_limit_entries_expire_with_the_day() {
        let cache = BatchCache::new(10, Duration::from_secs(1), 100);
        let e = cache.insert(Arc::new(CachedBatch::new(batch(0, i64::MAX), 1, false)));
        let day = 86_400_000;
        cache.remember_at_limit(&e, "u", true, Timestamp(day + 5));
        assert!(cache.user_at_limit(&e, "u", Timestamp(day + 10)));
        assert!(!cache.user_at_limit(&e, "u", Timestamp(2 * day + 1)));
    }

    /// Issue 11 item 3: a user at the daily limit of a batch in Asia/Shanghai is let through
    /// again at midnight in Beijing (16:00 UTC), not at 08:00 in Beijing (00:00 UTC), and a
    /// change of the zone applies to what is remembered from then on.
    #[test]
    fn daily_limit_entries_expire_at_the_batch_s_local_midnight() {
        let t = |s: &str| Timestamp::parse(s).unwrap();
        let cache = BatchCache::new(10, Duration::from_secs(1), 100);
        let mut b = batch(0, i64::MAX);
        b.timezone = Some("Asia/Shanghai".into());
        let e = cache.insert(Arc::new(CachedBatch::new(b.clone(), 1, false)));
        assert_eq!(e.day_offset_ms(t("2026-11-11T12:00:00Z")), 8 * 3_600_000);
        cache.remember_at_limit(&e, "u", true, t("2026-11-11T15:59:59Z"));
        assert!(cache.user_at_limit(&e, "u", t("2026-11-11T15:59:59.999Z")));
        assert!(!cache.user_at_limit(&e, "u", t("2026-11-11T16:00:00Z")));
        // remembered just after Beijing's midnight: still at the limit past 00:00 UTC
        cache.remember_at_limit(&e, "v", true, t("2026-11-11T16:00:01Z"));
        assert!(cache.user_at_limit(&e, "v", t("2026-11-12T00:30:00Z")));
        // the UTC batch of the same instants turns its day at 00:00 UTC
        let mut utc = b.clone();
        utc.timezone = None;
        e.update(utc, 2, false);
        assert_eq!(e.day_offset_ms(t("2026-11-11T12:00:00Z")), 0);
        cache.remember_at_limit(&e, "w", true, t("2026-11-11T16:00:01Z"));
        assert!(cache.user_at_limit(&e, "w", t("2026-11-11T23:59:59Z")));
        assert!(!cache.user_at_limit(&e, "w", t("2026-11-12T00:00:00Z")));
    }

    /// Regression: the second lookup of an expired "missing" mark deadlocked its thread
    /// (a dashmap read guard held across a `remove` of the same shard).
    #[test]
    fn an_expired_missing_mark_does_not_deadlock() {
        let cache = Arc::new(BatchCache::new(10, Duration::from_millis(1), 100));
        cache.set_missing("nope");
        std::thread::sleep(Duration::from_millis(5));
        let (tx, rx) = std::sync::mpsc::channel();
        let c = cache.clone();
        std::thread::spawn(move || {
            let first = c.is_missing("nope");
            let again = c.is_missing("nope");
            let _ = tx.send((first, again));
        });
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("is_missing deadlocked on an expired mark");
        assert_eq!(got, (false, false));
        cache.set_missing("nope");
        assert!(cache.is_missing("nope"));
        cache.clear_missing("nope");
        assert!(!cache.is_missing("nope"));
    }

    /// A lookup that found nothing before a create cleared the id must not mark it missing
    /// after the create.
    #[test]
    fn a_clear_beats_a_lookup_that_began_before_it() {
        let cache = BatchCache::new(10, Duration::from_secs(60), 100);
        let epoch = cache.missing_epoch();
        cache.clear_missing("new"); // the create's broadcast arrives mid-lookup
        cache.set_missing_since("new", epoch);
        assert!(!cache.is_missing("new"));
        let epoch = cache.missing_epoch();
        cache.set_missing_since("other", epoch);
        assert!(cache.is_missing("other"));
    }

    /// Regression: `update` checked the version, then stored the definition, the scope set
    /// and the version one by one, so two concurrent refreshes could leave an older
    /// definition (and version) cached over a newer one, and a scope set that disagrees with
    /// the cached definition (the product index would post the batch under the wrong ids).
    #[test]
    fn concurrent_updates_keep_the_newest_definition() {
        const THREADS: usize = 4;
        for round in 0..300 {
            let e = Arc::new(CachedBatch::new(batch(0, 1000), 0, false));
            let start = Arc::new(std::sync::Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (e, start) = (e.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        for v in (1 + t..=200).step_by(THREADS) {
                            let mut b = batch(0, 1000);
                            b.stock = v as i64;
                            b.scope = Scope {
                                kind: ScopeKind::Products,
                                ids: vec![format!("p{v}")],
                            };
                            e.update(b, v as i64, false);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let b = e.batch();
            assert_eq!((e.version(), b.stock), (200, 200), "round {round}");
            let want: HashSet<Box<str>> = [Box::from("p200")].into_iter().collect();
            assert_eq!(
                *e.scope_ids(),
                want,
                "round {round}: scope set and definition disagree"
            );
        }
    }

    #[test]
    fn bounded() {
        let cache = BatchCache::new(2, Duration::from_secs(1), 100);
        let e = cache.insert(Arc::new(CachedBatch::new(batch(0, i64::MAX), 1, false)));
        for u in ["a", "b", "c"] {
            cache.remember_at_limit(&e, u, false, Timestamp(0));
        }
        assert_eq!(e.at_limit.len(), 2);
        cache.forget_limits(&e);
        cache.remember_at_limit(&e, "c", false, Timestamp(0));
        assert_eq!(e.at_limit.len(), 1, "forgetting frees room");
    }
}
