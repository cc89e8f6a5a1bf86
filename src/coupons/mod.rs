//! Coupon state on its shard: the source of truth of a coupon's transitions from the
//! instant its claim is answered (issue "The coupon after the claim", read-your-writes).
//!
//! `lua/claim.lua` writes each coupon's entry in the call that mints it, on the coupon's own
//! shard (routed by the coupon id); every change after that (lock, redeem, release, refund,
//! expiry, lock timeout) is decided here by the state machine (`domain::coupon::decide`) on
//! the entry read, and written by `lua/coupon.lua` as a compare-and-set on the entry's
//! version, together with the change record the persister writes to the database
//! (`store::Db::apply_changes`). So a coupon can be locked, redeemed and released as soon as
//! its claim returned 201, with the database down or behind; the database follows.
//!
//! Invariants kept here: a change is answered only once the deployment's acknowledgement
//! rule holds for it (`redis.ack`, as for claims: `Backend::confirm`); a change is written
//! only on the state it was decided on (a lost
//! race decides again on the entry that won, at most [`RETRIES`] times); the same order's
//! repeat writes nothing; a coupon without an entry (minted by an older gateway, or on a
//! shard restored from the database since, which dropped the entries) is not managed here:
//! its state is the database's, and the caller uses the database's transitions.

pub mod wallet;

use std::collections::HashMap;
use std::sync::Arc;

use thiserror::Error;

use crate::backend::{Backend, BackendError};
use crate::contract::claim_record::change_fields;
use crate::contract::coupon::{self, Entry, Got, Set};
use crate::contract::keys::SlotKeys;
use crate::domain::claim::ChangeRecord;
use crate::domain::coupon::{CouponState, Decision, Transition, decide, settle};
use crate::domain::ids::parse_coupon_id;
use crate::obs::events::CouponChanged;

/// Decisions made again after lost races, at most (each lost race is another change that
/// was written, so this bounds only a coupon changed that often at once).
pub const RETRIES: usize = 32;

/// Why a change of a managed coupon was not made.
#[derive(Debug, Error)]
pub enum CouponsError {
    #[error("the coupon's shard is being repaired; try again")]
    SlotGone,
    #[error("the coupon's shard has too many changes not yet persisted; try again")]
    Backlog,
    #[error("coupon {coupon_id} is {state}: {reason}")]
    InvalidState {
        coupon_id: String,
        state: CouponState,
        reason: &'static str,
    },
    #[error("coupon {0} changed too often at once; try again")]
    Contended(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A coupon whose state lives on its shard, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Managed {
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    pub seq: u64,
    pub entry: Entry,
}

impl Managed {
    /// The state the wallet shows at `now`, with its order and lock deadline (what time did
    /// to the entry: a lapsed lock reads unused, a coupon past its validity end expired).
    pub fn at(&self, now: i64) -> (CouponState, Option<String>, Option<i64>) {
        let (s, _) = settle(&self.entry.stored, self.entry.validity, now);
        (s.state(), s.order().map(str::to_string), s.lock_until())
    }
}

/// The outcome of [`Coupons::change`].
#[derive(Debug)]
pub enum Changed {
    /// Written: the coupon as it is now.
    Written(Managed),
    /// A repeat, or nothing due: nothing written; the coupon as it is.
    Repeat(Managed),
    /// The entry is gone (its shard was restored from the database meanwhile): the
    /// database's transitions apply.
    NotManaged,
}

/// The coupon-state service of one gateway.
pub struct Coupons<B: Backend> {
    backend: Arc<B>,
    /// `persister.max_backlog_per_shard`: changes are shed like claims past it.
    max_log: u64,
}

impl<B: Backend> Coupons<B> {
    pub fn new(backend: Arc<B>, max_log: u64) -> Coupons<B> {
        Coupons { backend, max_log }
    }

    /// The coupon's entry, if its shard holds one. `None` also for an id that names no
    /// coupon.
    pub async fn get(&self, coupon_id: &str) -> Result<Option<Managed>, CouponsError> {
        let Some((batch, shard, seq)) = parse_coupon_id(coupon_id) else {
            return Ok(None);
        };
        let slot = SlotKeys::new(batch, Some(shard));
        match coupon::get(self.backend.as_ref(), &slot, &[seq]).await? {
            Got::SlotGone => Err(CouponsError::SlotGone),
            Got::Entries(mut e) => Ok(e.pop().flatten().map(|entry| Managed {
                coupon_id: coupon_id.to_string(),
                batch_id: batch.to_string(),
                shard,
                seq,
                entry,
            })),
        }
    }

    /// The entries of many coupons, one call per shard (in parallel): those without an entry
    /// are left out. A shard under repair leaves its coupons out too (the database's state,
    /// at most a moment behind, is shown for them).
    pub async fn get_many(&self, ids: &[&str]) -> Result<HashMap<String, Managed>, CouponsError> {
        let mut by_shard: HashMap<(&str, u32), Vec<(u64, &str)>> = HashMap::new();
        for id in ids {
            if let Some((batch, shard, seq)) = parse_coupon_id(id) {
                by_shard.entry((batch, shard)).or_default().push((seq, id));
            }
        }
        let calls = by_shard.into_iter().flat_map(|((batch, shard), coupons)| {
            coupons
                .chunks(coupon::MAX_GET)
                .map(|part| (batch, shard, part.to_vec()))
                .collect::<Vec<_>>()
        });
        let reads = calls.map(|(batch, shard, part)| async move {
            let slot = SlotKeys::new(batch, Some(shard));
            let seqs: Vec<u64> = part.iter().map(|(s, _)| *s).collect();
            let got = coupon::get(self.backend.as_ref(), &slot, &seqs).await?;
            Ok::<_, BackendError>((batch, shard, part, got))
        });
        let mut out = HashMap::new();
        for r in futures::future::join_all(reads).await {
            let (batch, shard, part, got) = r?;
            let Got::Entries(entries) = got else { continue };
            for ((seq, id), entry) in part.into_iter().zip(entries) {
                if let Some(entry) = entry {
                    out.insert(
                        id.to_string(),
                        Managed {
                            coupon_id: id.to_string(),
                            batch_id: batch.to_string(),
                            shard,
                            seq,
                            entry,
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    /// Applies `t` at `now` to the managed coupon `m` (as read by [`Coupons::get`]): decided
    /// on its entry, written by compare-and-set with its change record; a lost race is
    /// decided again on the entry that won.
    pub async fn change(
        &self,
        m: Managed,
        t: &Transition,
        now: i64,
    ) -> Result<Changed, CouponsError> {
        let r = self.change_once(m, t, now).await;
        let outcome = match &r {
            Ok(Changed::Written(_) | Changed::Repeat(_)) => None, // counted where known
            Ok(Changed::NotManaged) => Some("unavailable"),
            Err(CouponsError::InvalidState { .. }) => Some("refused"),
            Err(_) => Some("unavailable"),
        };
        if let Some(outcome) = outcome {
            CouponChanged { outcome }.emit();
        }
        r
    }

    async fn change_once(
        &self,
        mut m: Managed,
        t: &Transition,
        now: i64,
    ) -> Result<Changed, CouponsError> {
        let slot = SlotKeys::new(&m.batch_id, Some(m.shard));
        for _ in 0..RETRIES {
            let e = &m.entry;
            let (next, events) = match decide(&e.stored, e.validity, t, now) {
                Err(r) => {
                    return Err(CouponsError::InvalidState {
                        coupon_id: m.coupon_id,
                        state: r.state,
                        reason: r.reason,
                    });
                }
                Ok(Decision::Noop) => {
                    CouponChanged { outcome: "repeat" }.emit();
                    // as a replay of a claim: the state answered is confirmed as a change is
                    self.backend.confirm(&slot.fence, None).await?;
                    return Ok(Changed::Repeat(m));
                }
                Ok(Decision::Apply { next, events }) => (next, events),
            };
            let after = Entry {
                version: e.version + 1,
                stored: next.clone(),
                ..e.clone()
            };
            let record = change_fields(&ChangeRecord {
                coupon_id: m.coupon_id.clone(),
                batch_id: m.batch_id.clone(),
                shard: m.shard,
                seq: m.seq,
                version: after.version,
                next,
                events,
                at: now,
            });
            match coupon::set(
                self.backend.as_ref(),
                &slot,
                m.seq,
                &after,
                self.max_log,
                &record,
            )
            .await?
            {
                Set::Written => {
                    CouponChanged { outcome: "written" }.emit();
                    // under `redis.ack = "replica"` a change is answered once a replica
                    // holds it, as a claim is (at once under "leader" and embedded)
                    self.backend.confirm(&slot.fence, None).await?;
                    m.entry = after;
                    return Ok(Changed::Written(m));
                }
                Set::Conflict(Some(now_is)) => {
                    CouponChanged { outcome: "retried" }.emit();
                    m.entry = now_is;
                }
                Set::Conflict(None) => return Ok(Changed::NotManaged),
                Set::SlotGone => return Err(CouponsError::SlotGone),
                Set::Backlog => return Err(CouponsError::Backlog),
            }
        }
        Err(CouponsError::Contended(m.coupon_id))
    }
}
