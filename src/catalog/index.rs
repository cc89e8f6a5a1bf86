//! The product-page index: product id, category id, merchant id (and "all") -> the batches
//! whose scope takes them, so `GET /v1/products/{id}/batches` is answered from memory with
//! a few hash lookups, never a database query.
//!
//! What it holds: every cached batch that could be claimable now or later (not lost, claim
//! window not ended), under the ids of its scope. It follows the cache: the catalog calls
//! [`ProductIndex::sync`] wherever a batch enters the cache or its definition or flags are
//! re-read (load, warm-up, the `changed <id>` events, the periodic refresh), and
//! [`ProductIndex::forget`] when a batch is found lost. Whether a batch is claimable *now*
//! (active, window open, not sold out, not lost) is checked at lookup time on the cached
//! entry itself, so a pause, a sell-out or a window edge shows at once, before any refresh.
//!
//! Invariants kept here:
//! - consistent under concurrent updates: the postings of a batch are changed under one
//!   write lock, and what they become is decided from the entry's state read *under that
//!   lock*, so whichever sync runs last leaves the index agreeing with the entry's latest
//!   state (an older decision never overwrites a newer one); a lookup (read lock) sees a
//!   batch under its old or its new scope, never both or half;
//! - bounded: it holds at most the cached batches whose window has not ended, each under
//!   the scope ids its cached definition already holds (one posting per distinct id); a
//!   batch leaves it within one refresh of its window's end; a lookup answers at most
//!   `catalog.max_product_batches` batches;
//! - no lock is held across an `.await`, and no dashmap guard is taken here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use super::cache::CachedBatch;
use crate::domain::batch::{ScopeKind, Timestamp};

/// Where a batch is indexed: its scope kind and the set of its scope ids (by pointer: the
/// cache replaces the set when the scope changes).
struct Posting {
    kind: ScopeKind,
    ids: Arc<HashSet<Box<str>>>,
}

#[derive(Default)]
struct Inner {
    all: Vec<Arc<CachedBatch>>,
    products: HashMap<Box<str>, Vec<Arc<CachedBatch>>>,
    categories: HashMap<Box<str>, Vec<Arc<CachedBatch>>>,
    merchants: HashMap<Box<str>, Vec<Arc<CachedBatch>>>,
    members: HashMap<String, Posting>,
}

impl Inner {
    fn lists(&mut self, kind: ScopeKind) -> Option<&mut HashMap<Box<str>, Vec<Arc<CachedBatch>>>> {
        match kind {
            ScopeKind::All => None,
            ScopeKind::Products => Some(&mut self.products),
            ScopeKind::Categories => Some(&mut self.categories),
            ScopeKind::Merchants => Some(&mut self.merchants),
        }
    }

    fn remove(&mut self, id: &str) {
        let Some(p) = self.members.remove(id) else {
            return;
        };
        match self.lists(p.kind) {
            None => self.all.retain(|e| e.id != id),
            Some(map) => {
                for key in p.ids.iter() {
                    if let Some(list) = map.get_mut(key) {
                        list.retain(|e| e.id != id);
                        if list.is_empty() {
                            map.remove(key);
                        }
                    }
                }
            }
        }
    }

    fn insert(&mut self, entry: &Arc<CachedBatch>, kind: ScopeKind, ids: Arc<HashSet<Box<str>>>) {
        match self.lists(kind) {
            None => self.all.push(entry.clone()),
            Some(map) => {
                for key in ids.iter() {
                    map.entry(key.clone()).or_default().push(entry.clone());
                }
            }
        }
        self.members.insert(entry.id.clone(), Posting { kind, ids });
    }
}

/// What a product page names: the product, and optionally its category and merchant.
#[derive(Debug, Clone, Copy)]
pub struct ProductRef<'a> {
    pub product: &'a str,
    pub category: Option<&'a str>,
    pub merchant: Option<&'a str>,
}

/// The claimable batches of a product page, and whether more were cut off.
pub struct Listing {
    pub batches: Vec<Arc<CachedBatch>>,
    pub truncated: bool,
}

#[derive(Default)]
pub struct ProductIndex {
    inner: RwLock<Inner>,
}

impl ProductIndex {
    pub fn new() -> ProductIndex {
        ProductIndex::default()
    }

    /// Where the entry belongs now: under its scope while it is not lost and its window has
    /// not ended; nowhere otherwise.
    fn wanted(entry: &CachedBatch, now: Timestamp) -> Option<(ScopeKind, Arc<HashSet<Box<str>>>)> {
        if entry.is_lost() {
            return None;
        }
        let batch = entry.batch();
        (now < batch.claim_window.end).then(|| (batch.scope.kind, entry.scope_ids()))
    }

    fn agrees(
        current: Option<&Posting>,
        wanted: &Option<(ScopeKind, Arc<HashSet<Box<str>>>)>,
    ) -> bool {
        match (current, wanted) {
            (None, None) => true,
            (Some(p), Some((kind, ids))) => p.kind == *kind && Arc::ptr_eq(&p.ids, ids),
            _ => false,
        }
    }

    /// Brings the entry's postings in line with its current state (see the module
    /// documentation); cheap (a read lock) when nothing changed.
    pub fn sync(&self, entry: &Arc<CachedBatch>, now: Timestamp) {
        {
            let inner = self.inner.read();
            if Self::agrees(inner.members.get(&entry.id), &Self::wanted(entry, now)) {
                return;
            }
        }
        let mut inner = self.inner.write();
        // Decided under the write lock, from the entry as it is now.
        let wanted = Self::wanted(entry, now);
        if Self::agrees(inner.members.get(&entry.id), &wanted) {
            return;
        }
        inner.remove(&entry.id);
        if let Some((kind, ids)) = wanted {
            inner.insert(entry, kind, ids);
        }
    }

    /// Takes the batch out (it was found lost).
    pub fn forget(&self, id: &str) {
        self.inner.write().remove(id);
    }

    /// The batches claimable now whose scope takes this product, its category or its
    /// merchant: ending soonest first, then by id; at most `max`.
    pub fn lookup(&self, what: ProductRef<'_>, now: Timestamp, max: usize) -> Listing {
        let mut found: Vec<(Timestamp, Arc<CachedBatch>)> = Vec::new();
        {
            let inner = self.inner.read();
            let mut take = |list: Option<&Vec<Arc<CachedBatch>>>| {
                for e in list.into_iter().flatten() {
                    if e.is_claimable(now) {
                        found.push((e.batch().claim_window.end, e.clone()));
                    }
                }
            };
            take(Some(&inner.all));
            take(inner.products.get(what.product));
            take(what.category.and_then(|c| inner.categories.get(c)));
            take(what.merchant.and_then(|m| inner.merchants.get(m)));
        }
        // A batch has one scope kind and each of its ids is posted once, so it was found at
        // most once; the dedup is a guard, not a necessity.
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        found.dedup_by(|a, b| a.1.id == b.1.id);
        let truncated = found.len() > max;
        found.truncate(max);
        Listing {
            batches: found.into_iter().map(|(_, e)| e).collect(),
            truncated,
        }
    }

    /// Batches indexed, and postings (ids under which they are indexed, "all" counting one).
    pub fn size(&self) -> (usize, usize) {
        let inner = self.inner.read();
        let postings = inner.all.len()
            + [&inner.products, &inner.categories, &inner.merchants]
                .iter()
                .map(|m| m.values().map(Vec::len).sum::<usize>())
                .sum::<usize>();
        (inner.members.len(), postings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::batch::*;

    fn batch(id: &str, kind: ScopeKind, ids: &[&str], end: i64) -> Batch {
        Batch {
            id: id.into(),
            name: "n".into(),
            stock: 10,
            per_user_limit: 1,
            per_user_daily_limit: None,
            claim_window: Window {
                start: Timestamp(100),
                end: Timestamp(end),
            },
            validity: Validity::Relative {
                days_after_claim: 1,
            },
            discount: Discount::Fixed { amount: 1 },
            scope: Scope {
                kind,
                ids: ids.iter().map(|s| s.to_string()).collect(),
            },
            exclusive: false,
            eligibility: Eligibility::default(),
            shards: 1,
            state: BatchState::Active,
            created_at: Timestamp(0),
            ack: None,
            timezone: None,
            budget: None,
            codes: None,
        }
    }

    fn entry(b: Batch) -> Arc<CachedBatch> {
        Arc::new(CachedBatch::new(b, 1, false))
    }

    fn ids(l: &Listing) -> Vec<&str> {
        l.batches.iter().map(|e| e.id.as_str()).collect()
    }

    const P: ProductRef<'static> = ProductRef {
        product: "p1",
        category: Some("shoes"),
        merchant: Some("acme"),
    };

    #[test]
    fn finds_by_product_category_merchant_and_all() {
        let idx = ProductIndex::new();
        let now = Timestamp(150);
        let es = [
            entry(batch("all", ScopeKind::All, &[], 1000)),
            entry(batch("prod", ScopeKind::Products, &["p1", "p2", "p1"], 900)),
            entry(batch("cat", ScopeKind::Categories, &["shoes"], 800)),
            entry(batch("mer", ScopeKind::Merchants, &["acme"], 700)),
            entry(batch("other", ScopeKind::Products, &["p9"], 600)),
            entry(batch("later", ScopeKind::All, &[], 650)),
        ];
        for e in &es {
            idx.sync(e, now);
        }
        assert_eq!(idx.size(), (6, 7));
        assert_eq!(
            ids(&idx.lookup(P, now, 10)),
            vec!["later", "mer", "cat", "prod", "all"]
        );
        let bare = ProductRef {
            product: "p2",
            category: None,
            merchant: None,
        };
        assert_eq!(
            ids(&idx.lookup(bare, now, 10)),
            vec!["later", "prod", "all"]
        );
        let cut = idx.lookup(P, now, 2);
        assert_eq!((ids(&cut), cut.truncated), (vec!["later", "mer"], true));
        assert!(!idx.lookup(P, now, 5).truncated);

        // claimable is checked at lookup: sold out, paused, not started, lost
        es[1].set_sold_out();
        let mut paused = es[2].batch().as_ref().clone();
        paused.state = BatchState::Paused;
        es[2].update(paused, 2, false);
        es[3].set_lost(true);
        assert_eq!(ids(&idx.lookup(P, now, 10)), vec!["later", "all"]);
        assert!(
            idx.lookup(P, Timestamp(99), 10).batches.is_empty(),
            "not started"
        );

        // a lost batch leaves on sync; an ended one too, and comes back when its end moves
        idx.sync(&es[3], now);
        idx.forget("nothing");
        assert_eq!(idx.size().0, 5);
        idx.sync(&es[5], Timestamp(651));
        assert_eq!(idx.size().0, 4);
        let mut longer = es[5].batch().as_ref().clone();
        longer.claim_window.end = Timestamp(5000);
        es[5].update(longer, 2, false);
        idx.sync(&es[5], Timestamp(651));
        assert_eq!(idx.size().0, 5);
        idx.forget("prod");
        assert_eq!(idx.size(), (4, 4));
    }

    #[test]
    fn a_changed_scope_moves_the_postings() {
        let idx = ProductIndex::new();
        let e = entry(batch("b", ScopeKind::Products, &["p1"], 1000));
        idx.sync(&e, Timestamp(150));
        let mut moved = e.batch().as_ref().clone();
        moved.scope = Scope {
            kind: ScopeKind::Merchants,
            ids: vec!["acme".into()],
        };
        e.update(moved, 2, false);
        let only_p1 = ProductRef {
            product: "p1",
            category: None,
            merchant: None,
        };
        // not synced yet: found under the old posting, filtered by nothing else
        assert_eq!(ids(&idx.lookup(only_p1, Timestamp(150), 10)), vec!["b"]);
        idx.sync(&e, Timestamp(150));
        assert!(idx.lookup(only_p1, Timestamp(150), 10).batches.is_empty());
        assert_eq!(ids(&idx.lookup(P, Timestamp(150), 10)), vec!["b"]);
        assert_eq!(idx.size(), (1, 1));
    }

    /// Concurrent updates, syncs and lookups: no deadlock, and once the writers stop (each
    /// having synced after its last update) the index is exactly a fresh build of the
    /// entries' final states: no older decision overwrote a newer one.
    #[test]
    fn concurrent_syncs_and_lookups_converge() {
        let idx = Arc::new(ProductIndex::new());
        let es: Vec<Arc<CachedBatch>> = (0..20)
            .map(|i| entry(batch(&format!("b{i}"), ScopeKind::Products, &["p1"], 1000)))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for t in 0..4 {
            let (idx, es, tx) = (idx.clone(), es.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                for round in 0..2000usize {
                    let e = &es[(round * 7 + t) % es.len()];
                    let mut b = e.batch().as_ref().clone();
                    b.claim_window.end = Timestamp(if round % 3 == 0 { 120 } else { 1000 });
                    b.scope.kind = if round % 2 == 0 {
                        ScopeKind::Products
                    } else {
                        ScopeKind::Merchants
                    };
                    b.scope.ids = vec![if round % 2 == 0 { "p1" } else { "acme" }.into()];
                    e.update(b, e.version() + 1, false);
                    idx.sync(e, Timestamp(150));
                    let _ = idx.lookup(P, Timestamp(150), 100);
                }
                let _ = tx.send(());
            }));
        }
        for _ in 0..4 {
            rx.recv_timeout(std::time::Duration::from_secs(30))
                .expect("syncs and lookups deadlocked");
        }
        for t in threads {
            t.join().unwrap();
        }
        let fresh = ProductIndex::new();
        for e in &es {
            fresh.sync(e, Timestamp(150));
        }
        assert_eq!(idx.size(), fresh.size());
        for what in [
            P,
            ProductRef {
                product: "p1",
                category: None,
                merchant: None,
            },
        ] {
            assert_eq!(
                ids(&idx.lookup(what, Timestamp(150), 100)),
                ids(&fresh.lookup(what, Timestamp(150), 100))
            );
        }
    }
}
