//! The wallet read: a user's coupons as they are now, from the database's page (cached for
//! hot wallets) corrected by what changed lately on the coupons' shards.
//!
//! Every claim answered 201 and every coupon change is touched in the user's recent set
//! (`lua/recent.lua`) before it is answered. A read takes the user's whole wallet from this
//! gateway's cache (`wallet.cache_ms`; a wallet of at most `wallet.cache_max_coupons`
//! coupons, read from the database in one query and kept as stored, so any status filter,
//! cursor and page size is answered from it at the instant of the read), or, for a larger
//! wallet, the page from the database; it reads the state of the recently touched coupons
//! from their shards, and merges: a coupon's shard state replaces its row, a coupon the
//! database does not hold yet is added where it sorts.
//!
//! Invariants kept here: read-your-writes: a coupon claimed or changed is shown as it is on
//! its shard (the source of truth of its state) for `wallet.recent_window_ms` after the
//! change, whatever the database holds; a cached wallet is used only while younger than
//! `wallet.cache_ms` (< the window) and newer than every recent change the shards do not
//! hold (a change in the database only, by an older gateway's path), so a cached wallet
//! never hides a change; states are resolved at the instant of the read (a lock lapsed or a
//! validity ended since the wallet was cached shows); with the database unreachable the
//! page is the recent coupons alone, marked partial; with Redis unreachable, the
//! database's page alone, read fresh (counted `no_shards`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use dashmap::DashMap;

use super::{Coupons, CouponsError, Managed};
use crate::backend::{Backend, BackendError};
use crate::config::WalletConfig;
use crate::contract::recent;
use crate::domain::coupon::{CouponState, Ended, Stored, Validity, settle};
use crate::obs::events::{RecentTouched, WalletRead};
use crate::store::{CouponRow, Db, DbError};

/// Clock skew allowed between gateways when a change's touch time is compared with a cached
/// page's read time.
const SKEW_MS: i64 = 1_000;

/// A page of a wallet.
#[derive(Debug, Clone)]
pub struct WalletPage {
    pub coupons: Vec<CouponRow>,
    pub next_cursor: Option<String>,
    /// The database could not be read: the page holds only the recent coupons.
    pub partial: bool,
}

/// A user's whole wallet as the database held it at `read_at` (the clock of the reads), or
/// `None` when it holds more than `wallet.cache_max_coupons` coupons (then pages are read
/// from the database each time).
#[derive(Debug, Clone)]
struct Cached {
    read_at: i64,
    rows: Option<Arc<Vec<CouponRow>>>,
}

/// The wallets of one gateway.
pub struct Wallets<B: Backend> {
    backend: Arc<B>,
    coupons: Arc<Coupons<B>>,
    db: Db,
    cfg: WalletConfig,
    /// User -> their wallet.
    cache: DashMap<String, Cached>,
}

impl<B: Backend> Wallets<B> {
    pub fn new(
        backend: Arc<B>,
        coupons: Arc<Coupons<B>>,
        db: Db,
        cfg: &WalletConfig,
    ) -> Wallets<B> {
        Wallets {
            backend,
            coupons,
            db,
            cfg: cfg.clone(),
            cache: DashMap::new(),
        }
    }

    /// Records that `coupon_id` of `user` changed at `now` (before the change is answered).
    /// A failure is counted and logged, and returned: the change itself stands.
    pub async fn touch(&self, user: &str, coupon_id: &str, now: i64) -> Result<(), BackendError> {
        if self.cfg.recent_window_ms == 0 {
            return Ok(()); // read-your-writes of the wallet is off
        }
        let r = recent::touch(
            self.backend.as_ref(),
            user,
            &[coupon_id],
            self.cfg.recent_window_ms,
            self.cfg.recent_max,
            now,
        )
        .await;
        RecentTouched {
            error: r.as_ref().err().map(|e| e.to_string()),
        }
        .emit();
        r
    }

    /// The user's coupons with effective state `state` (all when `None`) at `now`, after
    /// `cursor`, at most `limit`.
    pub async fn page(
        &self,
        user: &str,
        state: Option<CouponState>,
        limit: u32,
        cursor: Option<&str>,
        now: i64,
    ) -> Result<WalletPage, CouponsError> {
        // The recent coupons as their shards hold them; Redis unreachable: the database's
        // page alone (read fresh: a cached one could hide a change), not read-your-writes.
        let (touched, managed, shards) = match self.recent(user, now).await {
            Ok((t, m)) => (t, m, true),
            Err(e) => {
                WalletRead {
                    source: "no_shards",
                    error: Some(&e.to_string()),
                }
                .emit();
                (Vec::new(), HashMap::new(), false)
            }
        };
        // The latest change the shards do not hold (made in the database): a cached page
        // read before it is stale.
        let db_changed = touched
            .iter()
            .filter(|(id, _)| !managed.contains_key(id))
            .map(|(_, t)| *t)
            .max();
        let whole = if shards {
            self.whole(user, now, db_changed).await
        } else {
            Ok(None)
        };
        let (base, source) = match whole {
            Ok(Some((rows, source))) => {
                let after: Vec<CouponRow> = rows
                    .iter()
                    .filter(|r| cursor.is_none_or(|c| r.coupon_id.as_str() > c))
                    .cloned()
                    .collect();
                (Ok((after, false)), source)
            }
            Ok(None) => (
                self.db
                    .user_coupons_at(user, state, limit, cursor, now)
                    .await
                    .map(|(rows, next)| (rows, next.is_some())),
                "database",
            ),
            Err(e) => (Err(e), "partial"),
        };
        let ((rows, more), partial) = match base {
            Ok(b) => {
                WalletRead {
                    source,
                    error: None,
                }
                .emit();
                (b, false)
            }
            Err(e) => {
                WalletRead {
                    source: "partial",
                    error: Some(&e.to_string()),
                }
                .emit();
                ((Vec::new(), false), true)
            }
        };
        let fresh: Vec<CouponRow> = managed.values().map(|m| managed_row(m, now)).collect();
        let (coupons, next_cursor) = merge(rows, more, fresh, state, cursor, limit, now);
        Ok(WalletPage {
            coupons,
            next_cursor,
            partial,
        })
    }

    /// The coupons of `user` touched within the window, and those of them whose state lives
    /// on their shards, as the shards hold them.
    async fn recent(
        &self,
        user: &str,
        now: i64,
    ) -> Result<(Vec<(String, i64)>, HashMap<String, Managed>), CouponsError> {
        if self.cfg.recent_window_ms == 0 {
            return Ok((Vec::new(), HashMap::new()));
        }
        let touched =
            recent::get(self.backend.as_ref(), user, self.cfg.recent_window_ms, now).await?;
        let ids: Vec<&str> = touched.iter().map(|(id, _)| id.as_str()).collect();
        let managed = self.coupons.get_many(&ids).await?;
        Ok((touched, managed))
    }

    /// The user's whole wallet with where it came from (`cache`, `database`), or `None` when
    /// it is too large to be kept (or caching is off).
    async fn whole(
        &self,
        user: &str,
        now: i64,
        db_changed: Option<i64>,
    ) -> Result<Option<(Arc<Vec<CouponRow>>, &'static str)>, DbError> {
        if self.cfg.cache_ms == 0 {
            return Ok(None);
        }
        let ttl = self.cfg.cache_ms as i64;
        let hit = self.cache.view(user, |_, c| c.clone()).filter(|c| {
            (0..ttl).contains(&(now - c.read_at))
                && db_changed.is_none_or(|t| t + SKEW_MS < c.read_at)
        });
        if let Some(c) = hit {
            return Ok(c.rows.map(|r| (r, "cache")));
        }
        let cap = self.cfg.cache_max_coupons;
        let (rows, next) = self.db.user_coupons_at(user, None, cap, None, now).await?;
        let rows = next.is_none().then(|| Arc::new(rows));
        if self.cache.len() >= self.cfg.cache_entries as usize {
            self.cache
                .retain(|_, v| (0..ttl).contains(&(now - v.read_at)));
            if self.cache.len() >= self.cfg.cache_entries as usize {
                self.cache.clear();
            }
        }
        self.cache.insert(
            user.to_string(),
            Cached {
                read_at: now,
                rows: rows.clone(),
            },
        );
        Ok(rows.map(|r| (r, "database")))
    }
}

/// A managed coupon as a wallet row at `now`.
pub fn managed_row(m: &Managed, now: i64) -> CouponRow {
    let (state, order_id, lock) = m.at(now);
    let e = &m.entry;
    CouponRow {
        coupon_id: m.coupon_id.clone(),
        batch_id: m.batch_id.clone(),
        shard: m.shard,
        seq: m.seq,
        user_id: e.user.clone(),
        request_id: None,
        state,
        order_id,
        lock_expires_at: lock,
        valid_from: e.validity.from,
        valid_to: e.validity.to,
        claimed_at: e.claimed_at,
        updated_at: e.claimed_at,
        code: e.code.clone(),
    }
}

/// A row read earlier, as it is at `now` (a lock that lapsed since reads unused, a coupon
/// whose validity ended since reads expired).
fn resettle(mut r: CouponRow, now: i64) -> CouponRow {
    let order = r.order_id.clone();
    let stored = match r.state {
        CouponState::Locked => Stored::Locked {
            order: order.unwrap_or_default(),
            until: r.lock_expires_at.unwrap_or(i64::MIN),
        },
        CouponState::Used => Stored::Used {
            order: order.unwrap_or_default(),
        },
        CouponState::Unused => Stored::Unused {
            last: order.map(|order| Ended {
                order,
                refunded: false,
            }),
        },
        CouponState::Expired => return r,
    };
    let validity = Validity {
        from: r.valid_from,
        to: r.valid_to,
    };
    let (s, _) = settle(&stored, validity, now);
    r.state = s.state();
    r.lock_expires_at = s.lock_until();
    r
}

/// The page: `rows` (the database's page after `cursor`, `more` when it has a next page),
/// with `fresh` (rows of coupons as their shards hold them now) replacing theirs and added
/// where they sort inside the page's range; filtered by `state` at `now`, at most `limit`.
fn merge(
    rows: Vec<CouponRow>,
    more: bool,
    fresh: Vec<CouponRow>,
    state: Option<CouponState>,
    cursor: Option<&str>,
    limit: u32,
    now: i64,
) -> (Vec<CouponRow>, Option<String>) {
    let bound = if more {
        rows.last().map(|r| r.coupon_id.clone())
    } else {
        None
    };
    let mut page: BTreeMap<String, CouponRow> = rows
        .into_iter()
        .map(|r| (r.coupon_id.clone(), resettle(r, now)))
        .collect();
    for r in fresh {
        let after = cursor.is_none_or(|c| r.coupon_id.as_str() > c);
        let inside = bound.as_deref().is_none_or(|b| r.coupon_id.as_str() <= b);
        if after && inside {
            page.insert(r.coupon_id.clone(), r);
        }
    }
    let mut out: Vec<CouponRow> = page
        .into_values()
        .filter(|r| state.is_none_or(|s| r.state == s))
        .collect();
    let next = if out.len() > limit as usize {
        out.truncate(limit as usize);
        out.last().map(|r| r.coupon_id.clone())
    } else {
        bound
    };
    (out, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, state: CouponState) -> CouponRow {
        CouponRow {
            coupon_id: id.into(),
            batch_id: "b".into(),
            shard: 0,
            seq: 1,
            user_id: "u".into(),
            request_id: None,
            state,
            order_id: None,
            lock_expires_at: None,
            valid_from: 0,
            valid_to: 1_000,
            claimed_at: 0,
            updated_at: 0,
            code: None,
        }
    }

    fn ids(rows: &[CouponRow]) -> Vec<&str> {
        rows.iter().map(|r| r.coupon_id.as_str()).collect()
    }

    use CouponState::{Locked, Unused};

    #[test]
    fn fresh_state_replaces_and_adds_inside_the_range() {
        let db = vec![row("b.0.1", Unused), row("b.0.3", Unused)];
        let mut locked = row("b.0.1", Locked);
        locked.order_id = Some("o1".into());
        locked.lock_expires_at = Some(500);
        let fresh = vec![locked, row("b.0.2", Unused), row("b.0.9", Unused)];
        // a last page: everything after the cursor belongs to it
        let (p, next) = merge(db.clone(), false, fresh.clone(), None, None, 10, 100);
        assert_eq!(ids(&p), ["b.0.1", "b.0.2", "b.0.3", "b.0.9"]);
        assert_eq!(p[0].state, Locked);
        assert_eq!(next, None);
        // a page with more after it: b.0.9 sorts past it, so it waits for a later page
        let (p, next) = merge(db.clone(), true, fresh.clone(), None, None, 10, 100);
        assert_eq!(ids(&p), ["b.0.1", "b.0.2", "b.0.3"]);
        assert_eq!(next.as_deref(), Some("b.0.3"));
        // the status filter applies to the shard's state: the locked one leaves `unused`
        let (p, _) = merge(
            db.clone(),
            false,
            fresh.clone(),
            Some(Unused),
            None,
            10,
            100,
        );
        assert_eq!(ids(&p), ["b.0.2", "b.0.3", "b.0.9"]);
        // the limit cuts, and the cursor follows the cut
        let (p, next) = merge(db.clone(), false, fresh.clone(), None, None, 2, 100);
        assert_eq!(ids(&p), ["b.0.1", "b.0.2"]);
        assert_eq!(next.as_deref(), Some("b.0.2"));
        // nothing at or before the cursor is added
        let (p, _) = merge(
            vec![row("b.0.3", Unused)],
            false,
            fresh,
            None,
            Some("b.0.2"),
            10,
            100,
        );
        assert_eq!(ids(&p), ["b.0.3", "b.0.9"]);
    }

    #[test]
    fn rows_read_earlier_are_shown_as_they_are_now() {
        let mut locked = row("b.0.1", Locked);
        locked.order_id = Some("o1".into());
        locked.lock_expires_at = Some(500);
        let (p, _) = merge(vec![locked.clone()], false, vec![], None, None, 10, 499);
        assert_eq!(p[0].state, Locked);
        let (p, _) = merge(vec![locked], false, vec![], None, None, 10, 500);
        assert_eq!(p[0].state, Unused);
        let (p, _) = merge(
            vec![row("b.0.2", Unused)],
            false,
            vec![],
            None,
            None,
            10,
            1_000,
        );
        assert_eq!(p[0].state, CouponState::Expired);
    }
}
