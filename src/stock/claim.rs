//! The claim on the user's home shard and what it needs when the shard runs dry: refills
//! from the pool or siblings, and the sold-out scan. Also the read-only replay of a request
//! id and the set of winners of a sold-out batch.
//!
//! Invariants kept here: a coupon is only ever granted by `claim.lua`, and answered only
//! once the backend's acknowledgement rule holds for it (`redis.ack`: a replica confirmed
//! it, replays included); "sold out" is declared only by [`Stock::sold_out_scan`] (two
//! scans that saw nothing anywhere and nothing move).

use std::collections::HashSet;

use crate::backend::Backend;
use crate::contract::claim::{self, Coupon, Outcome};
use crate::contract::events::{self, Event};
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::mark_soldout::{self, Marked};
use crate::contract::probe::Probe;
use crate::contract::{meta_get, replay, restore, winners};
use crate::domain::ids::{parse_coupon_id, seq_epoch, seq_position};

use super::census::probe_all;
use super::{FaultKind, Stock, StockError, TransferKind};

/// One claim's arguments besides the batch and home shard.
#[derive(Debug, Clone, Copy)]
pub struct ClaimArgs<'a> {
    pub user: &'a str,
    /// The client's request id, or an internal one (never empty).
    pub request_id: &'a str,
    /// `persister.max_backlog_per_shard`, formatted.
    pub max_log: &'a str,
    /// This HTTP request's nonce (see `lua/claim.lua`, ARGV 6).
    pub nonce: &'a str,
    /// The batch's total stock as cached: sizes refill chunks (no extra round trip).
    pub total: i64,
}

/// The final answer of a claim after any refills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimResult {
    /// What the claim script decided (never `ShardEmpty`: resolved here).
    Decided(Outcome),
    /// The pool and every shard are empty.
    SoldOut,
    /// The home shard was lost or rolled back (a failover): it is fenced and being repaired
    /// from the database; nothing was claimed that the caller may hand out. The batch's
    /// other shards are unaffected.
    ShardFenced,
    /// Stock exists but kept moving away under contention: retry later.
    Contended,
}

impl<B: Backend> Stock<B> {
    /// One claim: the home shard's script, refilling the shard from the pool or siblings
    /// when it is empty, and declaring sold out only when the whole batch is empty.
    pub async fn claim(
        &self,
        keys: &BatchKeys,
        home: u32,
        a: &ClaimArgs<'_>,
    ) -> Result<ClaimResult, StockError> {
        let slot = keys.shards.get(home as usize).ok_or(StockError::NotFound)?;
        let args = claim::Args {
            user: a.user,
            request_id: a.request_id,
            max_log: a.max_log,
            nonce: a.nonce,
        };
        for _round in 0..=self.cfg.max_refill_rounds {
            match claim::call(self.backend.as_ref(), slot, &args).await? {
                Outcome::ShardEmpty => {}
                Outcome::NoBatch => return self.without_meta(keys, home).await,
                Outcome::Claimed(c) if self.rolled_back(slot, &c) => {
                    self.activity.hint(slot); // its record goes to the database all the same
                    // Sealed at once: no claim or replay on it may answer until it is
                    // repaired (a replay could hand out the id minted again).
                    restore::seal(self.backend.as_ref(), slot).await?;
                    return Ok(ClaimResult::ShardFenced);
                }
                decided => {
                    if matches!(decided, Outcome::Claimed(_)) {
                        // The record is in the shard's log: the persister reads it now.
                        self.activity.hint(slot);
                    }
                    return self.acknowledged(slot, ClaimResult::Decided(decided)).await;
                }
            }
            if self.refill(keys, home, a.total).await? > 0 {
                continue;
            }
            if self.sold_out_scan(keys).await? {
                return self
                    .unless_replay(keys, home, a, ClaimResult::SoldOut)
                    .await;
            }
            // Stock is in flight or was just added: finish open transfers, look again.
            self.sweep(keys, 0).await?;
        }
        self.unless_replay(keys, home, a, ClaimResult::Contended)
            .await
    }

    /// A claim about to be refused for want of stock: a concurrent twin with the same
    /// (user, request id) may have claimed since this one found its shard empty, and the
    /// same request id must get the same answer (the coupon, replayed). One read, only on
    /// the way to a sold-out or contended answer.
    async fn unless_replay(
        &self,
        keys: &BatchKeys,
        home: u32,
        a: &ClaimArgs<'_>,
        refusal: ClaimResult,
    ) -> Result<ClaimResult, StockError> {
        Ok(match self.replay(keys, home, a.user, a.request_id).await? {
            Some(c) => ClaimResult::Decided(Outcome::Replayed(c)),
            None => refusal,
        })
    }

    /// The home shard has no meta: the batch is lost when its pool is gone too (answered
    /// `NoBatch`), else only this shard is (reported for repair, answered `ShardFenced`).
    async fn without_meta(&self, keys: &BatchKeys, home: u32) -> Result<ClaimResult, StockError> {
        if meta_get::call(self.backend.as_ref(), &keys.pool)
            .await?
            .is_empty()
        {
            return Ok(ClaimResult::Decided(Outcome::NoBatch));
        }
        self.faults
            .report(keys.batch(), home, FaultKind::Missing, None);
        Ok(ClaimResult::ShardFenced)
    }

    /// Whether `minted` (just minted on `slot`) reveals a rollback: a sequence this instance
    /// already saw the slot mint (`MintWindow`), or a position at or below what the database
    /// holds from it (the persister's floor). Then the shard is reported, and
    /// the coupon is not handed out (its id may be another user's): it reaches the database
    /// like any claim, where a clash is recorded as a coupon conflict.
    fn rolled_back(&self, slot: &SlotKeys, minted: &Coupon) -> bool {
        let Some((_, shard, seq)) = parse_coupon_id(&minted.coupon_id) else {
            return false;
        };
        let first = self.faults.first_mint(&slot.meta, seq);
        if first && !self.faults.below_floor(&slot.meta, seq_position(seq)) {
            return false;
        }
        self.faults.report(
            &slot.batch,
            shard,
            FaultKind::RolledBack,
            Some(seq_epoch(seq)),
        );
        true
    }

    /// `answer`, once the backend's acknowledgement rule holds for it when it grants a
    /// coupon (a fresh one or a replay: the replayed claim may be the very one whose
    /// confirmation failed before). Under `redis.ack = "replica"` too few replicas in time is
    /// [`crate::backend::BackendError::NotReplicated`]: the coupon exists on the primary,
    /// and the same request id answers it once confirmed.
    async fn acknowledged(
        &self,
        slot: &SlotKeys,
        answer: ClaimResult,
    ) -> Result<ClaimResult, StockError> {
        if let ClaimResult::Decided(Outcome::Claimed(_) | Outcome::Replayed(_)) = &answer {
            self.backend.confirm(&slot.fence).await?;
        }
        Ok(answer)
    }

    /// The coupon an earlier success of (`user`, `request_id`) got, if any: one read, and
    /// the acknowledgement rule (`redis.ack`) for a coupon found, like any coupon answer.
    pub async fn replay(
        &self,
        keys: &BatchKeys,
        home: u32,
        user: &str,
        request_id: &str,
    ) -> Result<Option<Coupon>, StockError> {
        let slot = keys.shards.get(home as usize).ok_or(StockError::NotFound)?;
        let found = replay::call(self.backend.as_ref(), slot, user, request_id).await?;
        if found.is_some() {
            self.backend.confirm(&slot.fence).await?;
        }
        Ok(found)
    }

    /// Every user who claimed from the batch (read shard by shard). Only meaningful once the
    /// batch is sold out, when no claim can add to it.
    pub async fn winners(&self, keys: &BatchKeys) -> Result<HashSet<Box<str>>, StockError> {
        let mut out = HashSet::new();
        for shard in &keys.shards {
            let users = winners::call(self.backend.as_ref(), shard).await?;
            out.extend(users.into_iter().map(|(u, _)| Box::from(u)));
        }
        Ok(out)
    }

    /// Moves stock into shard `home`: from the pool first, then from siblings (at most half
    /// of what each holds). `total` (the batch's stock, as the caller knows it) only sizes
    /// the chunk. Returns the amount moved.
    pub async fn refill(&self, keys: &BatchKeys, home: u32, total: i64) -> Result<i64, StockError> {
        let dst = &keys.shards[home as usize];
        let n = keys.shards.len() as i64;
        let chunk = (total / (n * i64::from(self.cfg.refill_divisor))).max(1);
        let moved = self
            .transfer(&keys.pool, dst, chunk, false, TransferKind::Refill)
            .await?;
        if moved > 0 {
            return Ok(moved);
        }
        for step in 1..keys.shards.len() {
            let src = &keys.shards[(home as usize + step) % keys.shards.len()];
            let moved = self
                .transfer(src, dst, chunk, true, TransferKind::Steal)
                .await?;
            if moved > 0 {
                return Ok(moved);
            }
        }
        Ok(0)
    }

    /// Is the whole batch empty? Two scans of every slot; sold out only if both saw no
    /// stock, no open transfer, and no slot's transfer sequence moved in between. Records
    /// the flag on the pool (unless stock was added meanwhile) and broadcasts it.
    pub async fn sold_out_scan(&self, keys: &BatchKeys) -> Result<bool, StockError> {
        let backend = self.backend.as_ref();
        let first = probe_all(backend, keys).await?;
        if !all_empty(&first) {
            return Ok(false);
        }
        let second = probe_all(backend, keys).await?;
        if !all_empty(&second) || first.iter().zip(&second).any(|(a, b)| a.xseq != b.xseq) {
            return Ok(false);
        }
        if mark_soldout::call(backend, &keys.pool, second[0].xseq).await? != Marked::Marked {
            return Ok(false);
        }
        let batch = keys.batch();
        if let Err(e) = events::publish(backend, &Event::SoldOut(batch.to_string())).await {
            tracing::warn!(batch, error = %e, "sold-out broadcast failed; refresh will catch up");
        }
        Ok(true)
    }
}

fn all_empty(probes: &[Probe]) -> bool {
    probes.iter().all(|p| p.stock <= 0 && p.outbox.is_empty())
}
