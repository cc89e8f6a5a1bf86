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
use crate::config::Ack;
use crate::contract::claim::{self, Coupon, Outcome};
use crate::contract::events::{self, Event};
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::mark_soldout::{self, Marked};
use crate::contract::probe::Probe;
use crate::contract::{meta_get, replay, restore, winners};
use crate::domain::ids::{Sighting, claim_tag, parse_coupon_id, seq_epoch, seq_position};
use crate::obs::events::RequestIdLookedUp;

use super::census::probe_all;
use super::gate::Refilled;
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
    /// The batch's own acknowledgement mode (`None`: the deployment's `redis.ack`).
    pub ack: Option<Ack>,
    /// The batch's UTC offset now, ms (`domain::time::Zone::offset_ms_at`; 0 = UTC): the
    /// script counts the daily limit's days in the batch's zone.
    pub day_offset_ms: i64,
    /// The request id was made for this claim alone (the gateway's own, from a fresh
    /// nonce): it cannot be the replay of an earlier success, so a shard that dropped
    /// request-id records never has it looked up in the database. A grant job's request id
    /// (`~g.<job>`, repeated when a job resumes) is not fresh.
    pub fresh_request_id: bool,
}

/// How a claim's coupon came back, for the rollback check ([`Stock::rolled_back`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    /// Minted by the call; `floor`: what the database held from the shard before the call
    /// (`None`: not known).
    Minted { floor: Option<u64> },
    /// A replay of an earlier success.
    Replayed,
}

/// Claim attempts allowed per counted refill round (`stock.max_refill_rounds`): retries
/// after another claim's refill moved stock that others then took first.
const REFILL_RETRIES_PER_ROUND: u32 = 4;

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
        let day_offset = a.day_offset_ms.to_string();
        let shared = claim::Shared {
            max_log: a.max_log,
            day_offset: &day_offset,
        };
        let mut one = claim::Claim {
            user: a.user,
            request_id: a.request_id,
            nonce: a.nonce,
            seen: 0,
            checked: a.fresh_request_id,
        };
        // Rounds that refilled or scanned themselves count against `max_refill_rounds`; a
        // retry after another claim's refill is free, up to a bound of its own.
        let mut rounds = 0;
        for _attempt in 0..=REFILL_RETRIES_PER_ROUND * self.cfg.max_refill_rounds {
            if rounds > self.cfg.max_refill_rounds {
                break;
            }
            let seen = self.gates.generation(&slot.meta);
            // Read before the call: the persister may write this call's records before the
            // answer is looked at, and what it wrote since proves nothing.
            let floor = self.faults.floor_now(&slot.meta);
            // The highest sequence this instance saw the shard hand out: the script refuses
            // to mint at or below it (rolled back) before writing anything, so an id minted
            // again never becomes another claim's (see `rolled_back` for what is left).
            one.seen = self.faults.highest_seen(&slot.meta);
            // Group-committed: in one call with the other claims queued for this shard.
            let outcome = self.group.claim(slot, shared, one).await?;
            let how = match outcome {
                Outcome::Claimed(_) => Got::Minted { floor },
                _ => Got::Replayed,
            };
            match outcome {
                Outcome::ShardEmpty => {}
                Outcome::NoBatch => return self.without_meta(keys, home).await,
                // The shard dropped request-id records past their retention: an earlier
                // success of this request id is in the database, or there is none and the
                // claim goes on as a new one (once: the script never asks a checked claim).
                Outcome::AskDatabase if !one.checked => {
                    match self
                        .archived_claim(keys.batch(), a.user, a.request_id)
                        .await?
                    {
                        Some(c) => return Ok(ClaimResult::Decided(Outcome::Replayed(c))),
                        None => {
                            one.checked = true;
                            continue;
                        }
                    }
                }
                Outcome::AskDatabase => {
                    return Err(StockError::Inconsistent(
                        "claim.lua asked to look up a request id already looked up".into(),
                    ));
                }
                Outcome::RolledBack => {
                    self.faults.report(
                        &slot.batch,
                        home,
                        FaultKind::RolledBack,
                        Some(seq_epoch(one.seen)),
                    );
                    return self.fence(slot).await;
                }
                Outcome::Claimed(ref c) | Outcome::Replayed(ref c)
                    if self.rolled_back(slot, c, how, a) =>
                {
                    if how != Got::Replayed {
                        self.activity.hint(slot); // its record goes to the database all the same
                    }
                    return self.fence(slot).await;
                }
                decided => {
                    if matches!(decided, Outcome::Claimed(_)) {
                        // The record is in the shard's log: the persister reads it now.
                        self.activity.hint(slot);
                    }
                    return self
                        .acknowledged(slot, ClaimResult::Decided(decided), a.ack)
                        .await;
                }
            }
            // One refill for every claim that found the shard empty, sized for them all.
            let refilled = self
                .gates
                .refill(&slot.meta, seen, |want| {
                    self.refill_at_least(keys, home, a.total, want)
                })
                .await?;
            match refilled {
                Refilled::Moved => {
                    rounds += 1;
                    continue;
                }
                Refilled::MovedByOther => continue,
                Refilled::Nothing => rounds += 1,
                Refilled::NothingByOther => {
                    // Stock added since that refill looked (a patch credits the pool) is
                    // found by one transfer from the pool, without the siblings' walk.
                    rounds += 1;
                    if self.refill_from_pool(keys, home, a.total, 1).await? > 0 {
                        continue;
                    }
                }
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
        let slot = keys.shards.get(home as usize).ok_or(StockError::NotFound)?;
        Ok(
            match self.replay(keys, home, a.user, a.request_id, a.ack).await? {
                Some(c) if self.rolled_back(slot, &c, Got::Replayed, a) => {
                    return self.fence(slot).await;
                }
                Some(c) => ClaimResult::Decided(Outcome::Replayed(c)),
                None => refusal,
            },
        )
    }

    /// Seals a slot found rolled back at once: no claim or replay on it may answer until it
    /// is repaired (a replay could hand out an id minted again).
    async fn fence(&self, slot: &SlotKeys) -> Result<ClaimResult, StockError> {
        restore::seal(self.backend.as_ref(), slot).await?;
        Ok(ClaimResult::ShardFenced)
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

    /// Whether the coupon `got` (minted on `slot` just now, or replayed from an earlier
    /// success of this claim) reveals a rollback. This instance's [`MintWindow`] remembers
    /// which claim (user, request id) each sequence it saw went to:
    /// - a sequence it saw go to ANOTHER claim was minted twice (seen again for the same
    ///   claim is a replay, whose reply may even arrive before the mint's);
    /// - a fresh mint this instance never saw, at or below what the database held from the
    ///   shard (the persister's floor) BEFORE the call that minted it, was minted again. The
    ///   floor read after the call proves nothing: group commit answers a claim once its
    ///   call returns, and the local persister may have written the call's records first.
    ///
    /// Then the shard is reported, and the coupon is not handed out (its id may be another
    /// user's): it reaches the database like any claim, where a clash is recorded as a
    /// coupon conflict. A re-mint of a sequence the window held when the claim was queued
    /// never gets here: the script refuses to mint at or below it ([`Outcome::RolledBack`])
    /// and writes nothing. That matters: when the claim an id first went to was lost with
    /// the rollback, a re-mint's record reaches the database as the id's owner, a repair
    /// restores it, and its retry's replay (no nonce: trusted) hands the id out again. What
    /// is left for this check: ids sighted after the claim read the window (answers still on
    /// their way to their tasks), and positions only the floor knows.
    ///
    /// A replay this instance never saw (its own lost first reply, another request, another
    /// gateway, before a restart) is only recorded: the floor tells nothing
    /// about it (the database holds it whenever it was persisted; grant jobs repeat their
    /// lines' nonces across restarts).
    /// A replay without a nonce was restored from the database by a rebuild or repair: it is
    /// the database's truth, never evidence of a rollback.
    ///
    /// [`MintWindow`]: crate::domain::ids::MintWindow
    ///
    fn rolled_back(&self, slot: &SlotKeys, got: &Coupon, how: Got, a: &ClaimArgs<'_>) -> bool {
        let fresh = how != Got::Replayed;
        let Some((_, shard, seq)) = parse_coupon_id(&got.coupon_id) else {
            return false;
        };
        if !fresh && got.minted_by.is_empty() {
            // Written by a rebuild or repair from the database: the truth, not a mint.
            return false;
        }
        let tag = claim_tag(a.user, a.request_id);
        let minted_twice = match self.faults.sight(&slot.meta, seq, tag) {
            Sighting::Other => true,
            // The same claim: its replay's reply may arrive before its mint's.
            Sighting::Same => false,
            Sighting::New => match how {
                Got::Minted { floor: Some(floor) } => seq_position(seq) <= floor,
                Got::Minted { floor: None } | Got::Replayed => false,
            },
        };
        if !minted_twice {
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
        ack: Option<Ack>,
    ) -> Result<ClaimResult, StockError> {
        if let ClaimResult::Decided(Outcome::Claimed(_) | Outcome::Replayed(_)) = &answer {
            self.backend.confirm(&slot.fence, ack).await?;
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
        ack: Option<Ack>,
    ) -> Result<Option<Coupon>, StockError> {
        let slot = keys.shards.get(home as usize).ok_or(StockError::NotFound)?;
        match replay::call(self.backend.as_ref(), slot, user, request_id).await? {
            replay::Found::Coupon(c) => {
                self.backend.confirm(&slot.fence, ack).await?;
                Ok(Some(c))
            }
            replay::Found::None => Ok(None),
            replay::Found::AskDatabase => self.archived_claim(keys.batch(), user, request_id).await,
        }
    }

    /// The coupon the database holds for an earlier success of (`user`, `request_id`) in
    /// `batch`: asked when Redis no longer has the request-id record (a shard dropped it past
    /// `batches.request_id_retention_ms`, or the batch retired). The database's record is
    /// durable: no acknowledgement rule applies. It does not keep the request's nonce.
    pub async fn archived_claim(
        &self,
        batch: &str,
        user: &str,
        request_id: &str,
    ) -> Result<Option<Coupon>, StockError> {
        let store = self.store.as_ref().ok_or_else(|| {
            StockError::Inconsistent(
                "a request id must be looked up in the database, and none is attached".into(),
            )
        })?;
        let found = store.claim_of_request(batch, user, request_id).await?;
        RequestIdLookedUp {
            outcome: if found.is_some() { "replayed" } else { "new" },
        }
        .emit();
        Ok(found.map(|c| Coupon {
            coupon_id: c.coupon_id,
            valid_from_ms: c.valid_from,
            valid_to_ms: c.valid_to,
            claimed_at_ms: c.claimed_at,
            minted_by: String::new(),
            code: c.code,
        }))
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
        self.refill_at_least(keys, home, total, 1).await
    }

    /// [`Stock::refill`] with a chunk of at least `want` (the claims waiting for it).
    async fn refill_at_least(
        &self,
        keys: &BatchKeys,
        home: u32,
        total: i64,
        want: i64,
    ) -> Result<i64, StockError> {
        let moved = self.refill_from_pool(keys, home, total, want).await?;
        if moved > 0 {
            return Ok(moved);
        }
        let dst = &keys.shards[home as usize];
        let chunk = self.refill_chunk(keys, total, want);
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

    /// Moves a refill chunk (at least `want`) from the pool into shard `home`: the amount
    /// moved.
    async fn refill_from_pool(
        &self,
        keys: &BatchKeys,
        home: u32,
        total: i64,
        want: i64,
    ) -> Result<i64, StockError> {
        let dst = &keys.shards[home as usize];
        let chunk = self.refill_chunk(keys, total, want);
        self.transfer(&keys.pool, dst, chunk, false, TransferKind::Refill)
            .await
    }

    /// `total / (shards * refill_divisor)`, at least `want` and at least 1.
    fn refill_chunk(&self, keys: &BatchKeys, total: i64, want: i64) -> i64 {
        let n = keys.shards.len() as i64;
        (total / (n * i64::from(self.cfg.refill_divisor))).max(want.max(1))
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

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::embedded::EmbeddedBackend;
    use crate::config::{BatchesConfig, EmbeddedConfig, StockConfig};
    use crate::domain::batch::NewBatch;

    async fn one_shard_batch() -> (Stock<EmbeddedBackend>, BatchKeys) {
        one_shard_batch_of("rb", 100, 1).await
    }

    /// A batch `id` of `stock` coupons (half in its one shard), per-user limit `limit`, on
    /// an in-memory embedded backend.
    pub(in crate::stock) async fn one_shard_batch_of(
        id: &str,
        stock_n: i64,
        limit: i64,
    ) -> (Stock<EmbeddedBackend>, BatchKeys) {
        let backend = EmbeddedBackend::open(&EmbeddedConfig::in_memory()).unwrap();
        let stock = Stock::new(Arc::new(backend), StockConfig::default());
        let batch: NewBatch = serde_json::from_value(serde_json::json!({
            "id": id, "name": "test", "stock": stock_n, "per_user_limit": limit,
            "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
            "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 1},
            "scope": {"kind": "all"}, "shards": 1
        }))
        .unwrap();
        let batch = batch.validate(&BatchesConfig::default()).unwrap();
        let keys = BatchKeys::new(&batch.id, 1);
        stock.create(&batch, &keys, 1).await.unwrap();
        (stock, keys)
    }

    fn args<'a>(user: &'a str, rid: &'a str, nonce: &'a str) -> ClaimArgs<'a> {
        ClaimArgs {
            user,
            request_id: rid,
            max_log: "0",
            nonce,
            total: 100,
            ack: None,
            day_offset_ms: 0,
            fresh_request_id: false,
        }
    }

    /// The script's own arguments for one claim (no gateway in between).
    fn script_args<'a>(user: &'a str, rid: &'a str, nonce: &'a str) -> claim::Args<'a> {
        claim::Args {
            user,
            request_id: rid,
            max_log: "0",
            nonce,
            day_offset: "0",
            seen: 0,
            checked: false,
        }
    }

    fn coupon(r: ClaimResult) -> Coupon {
        match r {
            ClaimResult::Decided(Outcome::Claimed(c) | Outcome::Replayed(c)) => c,
            other => panic!("expected a coupon, got {other:?}"),
        }
    }

    /// Regression (issue 13, cluster failover test, leader mode): a claim whose reply was
    /// lost in a failover is asked again with its request id; the promoted replica had
    /// rolled the shard's counter back, so that first attempt minted an id this instance
    /// had already handed to another user, and the retry's replay of its own mint handed it
    /// out a second time.
    #[tokio::test]
    async fn an_own_replay_of_an_id_minted_again_fences_the_shard() {
        let (stock, keys) = one_shard_batch().await;
        let slot = &keys.shards[0];
        let v = coupon(stock.claim(&keys, 0, &args("v", "rv", "nv")).await.unwrap());
        // The failover: the shard's counter goes back one (v's claim record is gone too,
        // but v is another user: nothing else matters here).
        stock
            .backend()
            .eval_source("redis.call('DECR', KEYS[1])", &[&slot.claimed], &[])
            .await
            .unwrap();
        // u's first attempt mints v's id again; its reply is lost (the stock layer never
        // sees it) ...
        let lost = script_args("u", "ru", "nu");
        let again = claim::call(stock.backend().as_ref(), slot, &lost)
            .await
            .unwrap();
        assert!(matches!(&again, Outcome::Claimed(c) if c.coupon_id == v.coupon_id));
        // ... and the retry replays it: it must not be handed out.
        let retry = stock.claim(&keys, 0, &args("u", "ru", "nu")).await.unwrap();
        assert_eq!(retry, ClaimResult::ShardFenced);
        assert!(
            meta_get::call(stock.backend().as_ref(), slot)
                .await
                .unwrap()
                .is_empty(),
            "the shard is sealed"
        );
    }

    /// Regression (cluster failover test, leader mode, under load: `cf.0.3930 handed out to
    /// u47319 and to u47315`): x was answered an id, then a failover to a lagging replica
    /// lost x's claim (neither the replica nor the database had it) and rolled the shard's
    /// counter back. y's claim minted x's id again; the window caught it and y was refused,
    /// but the script had already WRITTEN y's claim: its record reached the database as
    /// the owner of x's id (nothing clashed there, x's claim being lost), the repair
    /// restored y's request id from it, and y's retry replayed x's id (a replay restored
    /// from the database is trusted). A shard about to mint at or below the highest
    /// sequence this gateway saw it hand out must refuse before writing anything.
    #[tokio::test]
    async fn a_rolled_back_shard_writes_nothing_for_an_id_it_would_mint_again() {
        let (stock, keys) = one_shard_batch().await;
        let slot = &keys.shards[0];
        let be = stock.backend().as_ref();
        let x = coupon(stock.claim(&keys, 0, &args("x", "rx", "nx")).await.unwrap());
        // The failover: x's claim is gone (its record, request id, count, and the counter
        // step that minted it), as on a replica that never received it.
        be.eval_source(
            "redis.call('DECR', KEYS[1]); redis.call('INCR', KEYS[2]); \
             redis.call('HDEL', KEYS[3], 'x'); redis.call('HDEL', KEYS[4], 'x|rx'); \
             redis.call('DEL', KEYS[5])",
            &[
                &slot.claimed,
                &slot.stock,
                &slot.users,
                &slot.req,
                &slot.log,
            ],
            &[],
        )
        .await
        .unwrap();
        let y = stock.claim(&keys, 0, &args("y", "ry", "ny")).await.unwrap();
        assert_eq!(y, ClaimResult::ShardFenced);
        // Nothing of y's claim exists: no record for the persister (the database would
        // give x's id to y, and the repair would restore it for y's retry to replay), no
        // request id, no count, and the counter did not move.
        let left = be
            .eval_source(
                "return {redis.call('XLEN', KEYS[1]), redis.call('HEXISTS', KEYS[2], 'y|ry'), \
                 redis.call('HEXISTS', KEYS[3], 'y'), \
                 tonumber(redis.call('GET', KEYS[4]) or '0')}",
                &[&slot.log, &slot.req, &slot.users, &slot.claimed],
                &[],
            )
            .await
            .unwrap();
        let (_, _, xseq) = parse_coupon_id(&x.coupon_id).unwrap();
        let want: Vec<crate::backend::Value> = [0, 0, 0, xseq as i64 - 1]
            .into_iter()
            .map(crate::backend::Value::Int)
            .collect();
        assert_eq!(
            left,
            crate::backend::Value::Array(want),
            "[log length, y's request id, y's count, counter]: y's claim was written"
        );
        assert!(
            meta_get::call(be, slot).await.unwrap().is_empty(),
            "the shard is sealed"
        );
    }

    /// Regression (issue 14, group commit; grant job test killed mid-way): the persister
    /// wrote a call's records before a claim of that call was answered, the floor then
    /// covered the claim's own fresh coupon, and the shard was fenced and repaired (its stock
    /// written off) with nothing rolled back. Only the floor from before the call counts.
    #[tokio::test]
    async fn a_floor_raised_by_the_call_itself_is_no_rollback() {
        let (stock, keys) = one_shard_batch().await;
        let slot = &keys.shards[0];
        // minted by a call this instance has not looked at yet
        let x = script_args("x", "rx", "nx");
        let Outcome::Claimed(c) = claim::call(stock.backend().as_ref(), slot, &x)
            .await
            .unwrap()
        else {
            panic!("x claims")
        };
        let (_, _, seq) = parse_coupon_id(&c.coupon_id).unwrap();
        // ... and the persister wrote it to the database first: the floor covers it
        stock
            .faults()
            .floor(&slot.meta)
            .fetch_max(seq_position(seq), std::sync::atomic::Ordering::Relaxed);
        let a = args("x", "rx", "nx");
        // the floor from before the call knew nothing of it: no rollback (the floor read
        // after the call, as before the fix, said "minted again")
        assert!(!stock.rolled_back(slot, &c, Got::Minted { floor: None }, &a));
        let floor = Some(seq_position(seq) - 1);
        assert!(!stock.rolled_back(slot, &c, Got::Minted { floor }, &a));
        // the database held that position before the call: minted again
        let b = args("y", "ry", "ny");
        let Outcome::Claimed(d) = claim::call(
            stock.backend().as_ref(),
            slot,
            &script_args("y", "ry", "ny"),
        )
        .await
        .unwrap() else {
            panic!("y claims")
        };
        let (_, _, dseq) = parse_coupon_id(&d.coupon_id).unwrap();
        let floor = Some(seq_position(dseq));
        assert!(stock.rolled_back(slot, &d, Got::Minted { floor }, &b));
    }

    /// The same check lets every ordinary replay through: of a claim this instance answered
    /// (another request with the same id, or its own retry), of one it never saw (answered
    /// by another gateway, or before a restart), and of one a rebuild restored (no nonce).
    #[tokio::test]
    async fn ordinary_replays_are_handed_out() {
        let (stock, keys) = one_shard_batch().await;
        let slot = &keys.shards[0];
        let first = coupon(stock.claim(&keys, 0, &args("w", "rw", "n1")).await.unwrap());
        for nonce in ["n1", "n2"] {
            let r = stock
                .claim(&keys, 0, &args("w", "rw", nonce))
                .await
                .unwrap();
            assert_eq!(coupon(r).coupon_id, first.coupon_id, "{nonce}");
        }
        let unseen = script_args("x", "rx", "n3");
        let Outcome::Claimed(x) = claim::call(stock.backend().as_ref(), slot, &unseen)
            .await
            .unwrap()
        else {
            panic!("x claims")
        };
        let r = stock.claim(&keys, 0, &args("x", "rx", "n4")).await.unwrap();
        assert_eq!(coupon(r).coupon_id, x.coupon_id);
        let r = stock.claim(&keys, 0, &args("y", "ry", "n5")).await.unwrap();
        assert!(matches!(r, ClaimResult::Decided(Outcome::Claimed(_))));
        assert!(
            !meta_get::call(stock.backend().as_ref(), slot)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
