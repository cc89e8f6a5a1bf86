//! Sharded stock: batch setup, the claim on the user's home shard, crash-safe transfers
//! between slots, the sweeper, sold-out detection and the conservation check.
//!
//! Invariants kept here:
//! - stock only moves between slots through a two-phase transfer (outbox in the source,
//!   credited-once marker in the destination, outbox entry closed last), so a crash between
//!   the halves never creates stock and the sweeper always finishes it;
//! - conservation: pool + Σ shard stock + in-flight transfers + Σ claimed == total;
//! - "sold out" is recorded only after two scans of every slot that saw no stock, no
//!   in-flight transfer and no movement (transfer sequence numbers unchanged) in between;
//! - a definition change reaches a slot only at a version newer than the slot's (versions
//!   come from the database), with the absolute total, shards first and the pool last: a
//!   pool at version v proves every shard is at v or newer.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use crate::backend::{Backend, BackendError, Script, Value};
use crate::config::StockConfig;
use crate::domain::batch::Batch;
use crate::keys::{BatchKeys, SlotKeys};
use crate::obs::events::{SweepFinished, TransferMade};
use crate::outcome::{Coupon, ScriptOutcome};

#[derive(Debug, Error)]
pub enum StockError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("batch id already used by a different batch")]
    Conflict,
    #[error("batch not found")]
    NotFound,
    #[error("unexpected reply from {0}: {1:?}")]
    Reply(&'static str, Value),
}

/// Why a transfer was made (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum TransferKind {
    Initial,
    Refill,
    Steal,
    Sweep,
}

impl TransferKind {
    fn label(self) -> &'static str {
        match self {
            TransferKind::Initial => "initial",
            TransferKind::Refill => "refill",
            TransferKind::Steal => "steal",
            TransferKind::Sweep => "sweep",
        }
    }
}

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
    /// What the claim script decided (never `ShardEmpty` or `NotAReplay`: those are
    /// resolved here).
    Decided(ScriptOutcome),
    /// The pool and every shard are empty.
    SoldOut,
    /// Stock exists but kept moving away under contention: retry later.
    Contended,
}

/// One slot as `lua/probe.lua` sees it.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub stock: i64,
    pub xseq: i64,
    pub claimed: i64,
    pub log_len: i64,
    /// Milliseconds part of the oldest log entry id, if any.
    pub oldest_log_ms: Option<i64>,
    pub version: i64,
    /// Outbox: (transfer id, destination label, amount, created ms).
    pub outbox: Vec<(String, String, i64, i64)>,
}

/// The conservation equation of a batch at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conservation {
    pub total: i64,
    pub pool: i64,
    pub shards: i64,
    pub in_flight: i64,
    pub claimed: i64,
}

impl Conservation {
    pub fn holds(&self) -> bool {
        self.pool + self.shards + self.in_flight + self.claimed == self.total
            && self.pool >= 0
            && self.shards >= 0
            && self.claimed <= self.total
    }
}

pub struct Stock<B> {
    backend: Arc<B>,
    cfg: StockConfig,
    transfer_seq: AtomicU64,
    instance: String,
}

fn int(v: &Value, what: &'static str) -> Result<i64, StockError> {
    v.as_int().ok_or_else(|| StockError::Reply(what, v.clone()))
}

impl<B: Backend> Stock<B> {
    pub fn new(backend: Arc<B>, cfg: StockConfig) -> Stock<B> {
        let instance = format!("{:08x}", rand::random::<u32>());
        Stock {
            backend,
            cfg,
            transfer_seq: AtomicU64::new(0),
            instance,
        }
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    pub fn config(&self) -> &StockConfig {
        &self.cfg
    }

    /// Creates the batch in Redis at `version` of its stored definition: the pool with all
    /// the stock, every shard empty, then the initial fill through ordinary (crash-safe)
    /// transfers. Retrying after a crash part-way finishes the job; a different batch with
    /// the same id is a [`StockError::Conflict`]. Returns `true` if the pool was created now,
    /// `false` for a repeated creation.
    ///
    /// Only for a batch whose setup never completed: a slot that is missing is created with
    /// a fresh claim counter, so the caller (the create handler, which asks the database)
    /// must never run this for a batch that was ever live.
    pub async fn create(
        &self,
        batch: &Batch,
        keys: &BatchKeys,
        version: i64,
    ) -> Result<bool, StockError> {
        let version = u64::try_from(version).unwrap_or(1).max(1);
        let fp = batch.fingerprint();
        let def = serde_json::to_string(batch).unwrap_or_default();
        let total = batch.stock.to_string();
        let mut pool_pairs = batch.meta_pairs(version);
        pool_pairs.push(("total", total.clone()));
        pool_pairs.push(("soldout", "0".to_string()));
        pool_pairs.push(("def", def));
        let created = self
            .setup_slot(&keys.pool, &total, &pool_pairs, &fp, &[])
            .await?;

        let shard_pairs = batch.meta_pairs(version);
        let mut deny: Vec<Vec<&str>> = vec![Vec::new(); keys.shards.len()];
        for u in &batch.eligibility.deny_users {
            let home = crate::domain::ids::home_shard(u, batch.shards) as usize;
            deny[home].push(u.as_str());
        }
        for (shard, deny) in keys.shards.iter().zip(&deny) {
            self.setup_slot(shard, "0", &shard_pairs, &fp, deny).await?;
        }
        if created {
            let per_shard = batch.stock * i64::from(self.cfg.initial_fill_percent)
                / 100
                / i64::from(batch.shards.max(1));
            if per_shard > 0 {
                for shard in &keys.shards {
                    self.transfer(
                        keys,
                        &keys.pool,
                        shard,
                        per_shard,
                        false,
                        TransferKind::Initial,
                    )
                    .await?;
                }
            }
        }
        Ok(created)
    }

    async fn setup_slot(
        &self,
        slot: &SlotKeys,
        initial: &str,
        pairs: &[(&'static str, String)],
        fp: &str,
        deny: &[&str],
    ) -> Result<bool, StockError> {
        let n = (pairs.len() + 1).to_string();
        let mut args: Vec<&str> = Vec::with_capacity(4 + pairs.len() * 2 + deny.len());
        args.push(initial);
        args.push(&n);
        args.push("fp");
        args.push(fp);
        for (k, v) in pairs {
            args.push(k);
            args.push(v);
        }
        args.extend_from_slice(deny);
        let keys = [slot.meta.as_str(), &slot.stock, &slot.deny, &slot.xseq];
        let r = self.backend.eval(Script::Setup, &keys, &args).await?;
        match int(&r, "setup")? {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StockError::Conflict),
        }
    }

    /// One claim: the home shard's script, refilling the shard from the pool or siblings
    /// when it is empty, and declaring sold out only when the whole batch is empty.
    pub async fn claim(
        &self,
        keys: &BatchKeys,
        home: u32,
        a: &ClaimArgs<'_>,
    ) -> Result<ClaimResult, StockError> {
        let slot = keys.shards.get(home as usize).ok_or(StockError::NotFound)?;
        let shard_label = home.to_string();
        let batch_id = batch_of(slot);
        let args = [
            a.user,
            a.request_id,
            a.max_log,
            batch_id,
            shard_label.as_str(),
            a.nonce,
        ];
        for _round in 0..=self.cfg.max_refill_rounds {
            let reply = self
                .backend
                .eval(Script::Claim, &slot.claim_keys(), &args)
                .await?;
            match ScriptOutcome::decode(reply)? {
                ScriptOutcome::ShardEmpty => {}
                ScriptOutcome::NotAReplay => {
                    return Err(StockError::Reply("claim", Value::Int(-10)));
                }
                decided => return Ok(ClaimResult::Decided(decided)),
            }
            if self.refill(keys, home, a.total).await? > 0 {
                continue;
            }
            if self.sold_out_scan(keys).await? {
                return Ok(ClaimResult::SoldOut);
            }
            // Stock is in flight or was just added: finish open transfers, look again.
            self.sweep(keys, 0).await?;
        }
        Ok(ClaimResult::Contended)
    }

    /// The coupon an earlier success of (`user`, `request_id`) got, if any. One read.
    pub async fn replay(
        &self,
        keys: &BatchKeys,
        home: u32,
        user: &str,
        request_id: &str,
    ) -> Result<Option<Coupon>, StockError> {
        let slot = keys.shards.get(home as usize).ok_or(StockError::NotFound)?;
        let reply = self
            .backend
            .eval(Script::Replay, &[&slot.req], &[user, request_id])
            .await?;
        match ScriptOutcome::decode(reply)? {
            ScriptOutcome::Replayed(c) => Ok(Some(c)),
            ScriptOutcome::NotAReplay => Ok(None),
            other => Err(StockError::Reply(
                "replay",
                Value::Status(format!("{other:?}")),
            )),
        }
    }

    /// Every user who claimed from the batch (read shard by shard). Only meaningful once the
    /// batch is sold out, when no claim can add to it.
    pub async fn winners(&self, keys: &BatchKeys) -> Result<HashSet<Box<str>>, StockError> {
        let mut out = HashSet::new();
        for shard in &keys.shards {
            let r = self
                .backend
                .eval(Script::Winners, &[&shard.users], &[])
                .await?;
            let items = r
                .clone()
                .into_array()
                .ok_or(StockError::Reply("winners", r))?;
            for pair in items.chunks(2) {
                if let Some(user) = pair[0].as_str() {
                    out.insert(Box::from(user));
                }
            }
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
            .transfer(keys, &keys.pool, dst, chunk, false, TransferKind::Refill)
            .await?;
        if moved > 0 {
            return Ok(moved);
        }
        for step in 1..keys.shards.len() {
            let src = &keys.shards[(home as usize + step) % keys.shards.len()];
            let moved = self
                .transfer(keys, src, dst, chunk, true, TransferKind::Steal)
                .await?;
            if moved > 0 {
                return Ok(moved);
            }
        }
        Ok(0)
    }

    async fn total(&self, keys: &BatchKeys) -> Result<i64, StockError> {
        let meta = self.meta(&keys.pool).await?;
        meta.iter()
            .find(|(k, _)| k == "total")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or(StockError::NotFound)
    }

    /// The metadata hash of one slot (empty when missing).
    pub async fn meta(&self, slot: &SlotKeys) -> Result<Vec<(String, String)>, StockError> {
        let r = self
            .backend
            .eval(Script::MetaGet, &[&slot.meta], &[])
            .await?;
        let items = r
            .clone()
            .into_array()
            .ok_or(StockError::Reply("meta_get", r))?;
        Ok(items
            .chunks(2)
            .filter_map(|kv| {
                Some((
                    kv[0].as_str()?.to_string(),
                    kv.get(1)?.as_str()?.to_string(),
                ))
            })
            .collect())
    }

    fn next_transfer_id(&self) -> String {
        let n = self.transfer_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    /// A whole transfer of up to `max` from `src` to `dst`. Returns the amount moved.
    pub async fn transfer(
        &self,
        keys: &BatchKeys,
        src: &SlotKeys,
        dst: &SlotKeys,
        max: i64,
        at_most_half: bool,
        kind: TransferKind,
    ) -> Result<i64, StockError> {
        let tid = self.next_transfer_id();
        let moved = self
            .transfer_first_half(src, dst, &tid, max, at_most_half)
            .await?;
        if moved > 0 {
            self.finish_transfer(keys, src, &tid, &dst.label(), moved)
                .await?;
        }
        TransferMade {
            batch: batch_of(src),
            kind: kind.label(),
            amount: moved,
        }
        .emit();
        Ok(moved)
    }

    /// First half of a transfer: stock leaves `src` into its outbox. Public so tests can
    /// stop here, as a crash would, and check that the sweeper finishes the transfer.
    pub async fn transfer_first_half(
        &self,
        src: &SlotKeys,
        dst: &SlotKeys,
        tid: &str,
        max: i64,
        at_most_half: bool,
    ) -> Result<i64, StockError> {
        let max = max.to_string();
        let label = dst.label();
        let half = if at_most_half { "1" } else { "0" };
        let r = self
            .backend
            .eval(
                Script::TransferOut,
                &[&src.stock, &src.outbox, &src.xseq],
                &[tid, &max, &label, half],
            )
            .await?;
        int(&r, "transfer_out")
    }

    /// Second half: credit the destination once, then close the outbox entry.
    async fn finish_transfer(
        &self,
        keys: &BatchKeys,
        src: &SlotKeys,
        tid: &str,
        dst_label: &str,
        amount: i64,
    ) -> Result<(), StockError> {
        let dst = keys
            .by_label(dst_label)
            .ok_or(StockError::Reply("outbox destination", Value::Nil))?;
        let inbox = dst.inbox(tid);
        let amount = amount.to_string();
        let ttl = self.cfg.transfer_marker_ttl_s.to_string();
        self.backend
            .eval(
                Script::TransferIn,
                &[&dst.stock, &inbox, &dst.xseq],
                &[&amount, &ttl],
            )
            .await?;
        self.backend
            .eval(Script::TransferDone, &[&src.outbox], &[tid])
            .await?;
        Ok(())
    }

    /// Reads one slot.
    pub async fn probe(&self, slot: &SlotKeys) -> Result<Probe, StockError> {
        let r = self
            .backend
            .eval(Script::Probe, &slot.probe_keys(), &[])
            .await?;
        let items = r
            .clone()
            .into_array()
            .filter(|a| a.len() == 7)
            .ok_or(StockError::Reply("probe", r))?;
        let oldest_log_ms = items[4]
            .as_str()
            .and_then(|id| id.split('-').next())
            .and_then(|ms| ms.parse().ok());
        let mut outbox = Vec::new();
        if let Value::Array(kv) = &items[6] {
            for pair in kv.chunks(2) {
                let (Some(id), Some(v)) = (pair[0].as_str(), pair.get(1).and_then(Value::as_str))
                else {
                    continue;
                };
                let mut parts = v.split('|');
                let (Some(dst), Some(amount), Some(at)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                outbox.push((
                    id.to_string(),
                    dst.to_string(),
                    amount.parse().unwrap_or(0),
                    at.parse().unwrap_or(0),
                ));
            }
        }
        Ok(Probe {
            stock: int(&items[0], "probe stock")?,
            xseq: int(&items[1], "probe xseq")?,
            claimed: int(&items[2], "probe claimed")?,
            log_len: int(&items[3], "probe log")?,
            oldest_log_ms,
            version: int(&items[5], "probe version")?,
            outbox,
        })
    }

    /// Every slot, pool first.
    pub async fn probe_all(&self, keys: &BatchKeys) -> Result<Vec<Probe>, StockError> {
        let mut out = Vec::with_capacity(keys.shards.len() + 1);
        for slot in keys.all() {
            out.push(self.probe(slot).await?);
        }
        Ok(out)
    }

    /// Finishes every transfer whose outbox entry is older than `min_age_ms` (0 = all).
    /// Safe to run at any time, on any number of instances at once.
    pub async fn sweep(&self, keys: &BatchKeys, min_age_ms: u64) -> Result<usize, StockError> {
        let now = crate::domain::time::Timestamp::now().0;
        let mut finished = 0;
        for slot in keys.all() {
            let probe = self.probe(slot).await?;
            for (tid, dst, amount, at) in probe.outbox {
                if now - at < min_age_ms as i64 {
                    continue;
                }
                self.finish_transfer(keys, slot, &tid, &dst, amount).await?;
                SweepFinished {
                    batch: batch_of(slot),
                    transfer: &tid,
                    amount,
                }
                .emit();
                finished += 1;
            }
        }
        Ok(finished)
    }

    /// Is the whole batch empty? Two scans of every slot; sold out only if both saw no
    /// stock, no open transfer, and no slot's transfer sequence moved in between. Records
    /// the flag on the pool (unless stock was added meanwhile) and broadcasts it.
    pub async fn sold_out_scan(&self, keys: &BatchKeys) -> Result<bool, StockError> {
        let first = self.probe_all(keys).await?;
        if !all_empty(&first) {
            return Ok(false);
        }
        let second = self.probe_all(keys).await?;
        if !all_empty(&second) || first.iter().zip(&second).any(|(a, b)| a.xseq != b.xseq) {
            return Ok(false);
        }
        let pool_xseq = second[0].xseq.to_string();
        let r = self
            .backend
            .eval(
                Script::MarkSoldout,
                &[&keys.pool.meta, &keys.pool.xseq],
                &[&pool_xseq],
            )
            .await?;
        if int(&r, "mark_soldout")? != 1 {
            return Ok(false);
        }
        let batch = batch_of(&keys.pool);
        if let Err(e) = self.backend.publish(&format!("soldout {batch}")).await {
            tracing::warn!(batch, error = %e, "sold-out broadcast failed; refresh will catch up");
        }
        Ok(true)
    }

    /// The conservation equation, read slot by slot (exact when no claim or transfer runs
    /// concurrently; tests call it after the load).
    pub async fn conservation(&self, keys: &BatchKeys) -> Result<Conservation, StockError> {
        let probes = self.probe_all(keys).await?;
        let mut c = Conservation {
            total: self.total(keys).await?,
            pool: probes[0].stock,
            ..Conservation::default()
        };
        for (slot, p) in keys.all().zip(&probes) {
            if slot.slot.is_some() {
                c.shards += p.stock;
            }
            c.claimed += p.claimed;
            for (tid, dst, amount, _) in &p.outbox {
                let dst = keys
                    .by_label(dst)
                    .ok_or(StockError::Reply("outbox destination", Value::Nil))?;
                let credited = self
                    .backend
                    .eval(Script::InboxCheck, &[&dst.inbox(tid)], &[])
                    .await?;
                if int(&credited, "inbox_check")? == 0 {
                    c.in_flight += amount;
                }
            }
        }
        Ok(c)
    }

    /// The fingerprint each slot of the batch holds, pool first (`None`: the slot is missing).
    pub async fn slot_fingerprints(
        &self,
        keys: &BatchKeys,
    ) -> Result<Vec<Option<String>>, StockError> {
        let mut out = Vec::with_capacity(keys.shards.len() + 1);
        for slot in keys.all() {
            let meta = self.meta(slot).await?;
            out.push(meta.into_iter().find(|(k, _)| k == "fp").map(|(_, v)| v));
        }
        Ok(out)
    }

    /// Brings every slot to `version` of the batch's definition (`lua/patch.lua`): the full
    /// metadata and, on the pool, the absolute total (the stock added is the difference).
    /// Idempotent and order-independent: a slot at this version or a newer one is left
    /// alone, so concurrent or repeated calls converge on the newest version.
    ///
    /// Shards first, the pool LAST: the pool's version (which the refresh reads anyway)
    /// then proves every shard has that version too, so a change interrupted part-way shows
    /// as "pool behind the database" and the periodic check re-applies it.
    /// A missing slot is [`StockError::NotFound`] (Redis lost the batch).
    pub async fn apply_definition(
        &self,
        keys: &BatchKeys,
        batch: &Batch,
        version: i64,
    ) -> Result<(), StockError> {
        let ver = version.to_string();
        let pairs: Vec<(&'static str, String)> = batch
            .meta_pairs(u64::try_from(version).unwrap_or(0))
            .into_iter()
            .filter(|(k, _)| *k != "ver")
            .collect();
        let mut args: Vec<&str> = Vec::with_capacity(4 + 2 * pairs.len());
        args.push(&ver);
        args.push("");
        for (k, v) in &pairs {
            args.push(k);
            args.push(v);
        }
        for shard in &keys.shards {
            self.patch_slot(shard, &args).await?;
        }
        let total = batch.stock.to_string();
        let def = serde_json::to_string(batch).unwrap_or_default();
        args[1] = &total;
        args.push("def");
        args.push(&def);
        self.patch_slot(&keys.pool, &args).await?;
        self.announce_change(batch_of(&keys.pool)).await;
        Ok(())
    }

    async fn patch_slot(&self, slot: &SlotKeys, args: &[&str]) -> Result<(), StockError> {
        let r = self
            .backend
            .eval(Script::Patch, &[&slot.meta, &slot.stock, &slot.xseq], args)
            .await?;
        let items = r
            .clone()
            .into_array()
            .ok_or_else(|| StockError::Reply("patch", r.clone()))?;
        match items.first().and_then(Value::as_int) {
            Some(1 | 0) => Ok(()),
            Some(-1) => Err(StockError::NotFound),
            _ => Err(StockError::Reply("patch", r)),
        }
    }

    /// Tells every instance (pub/sub) that the batch was created or changed: they forget a
    /// "not found" mark and re-read its metadata. A lost message is caught by the refresh.
    pub async fn announce_change(&self, batch: &str) {
        if let Err(e) = self.backend.publish(&format!("changed {batch}")).await {
            tracing::warn!(batch, error = %e, "change broadcast failed; refresh will catch up");
        }
    }
}

fn all_empty(probes: &[Probe]) -> bool {
    probes.iter().all(|p| p.stock <= 0 && p.outbox.is_empty())
}

/// The batch id inside a slot's hash tag `cg:{<batch>:<slot>}:...`.
fn batch_of(slot: &SlotKeys) -> &str {
    let inner = slot
        .meta
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .unwrap_or("");
    inner.rsplit_once(':').map(|(b, _)| b).unwrap_or(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_id_comes_back_out_of_the_tag() {
        let k = BatchKeys::new("sale-1_x", 3);
        assert_eq!(batch_of(&k.pool), "sale-1_x");
        assert_eq!(batch_of(&k.shards[2]), "sale-1_x");
    }

    #[test]
    fn conservation_arithmetic() {
        let c = Conservation {
            total: 10,
            pool: 3,
            shards: 4,
            in_flight: 1,
            claimed: 2,
        };
        assert!(c.holds());
        assert!(
            !Conservation {
                claimed: 3,
                ..c.clone()
            }
            .holds()
        );
        assert!(
            !Conservation {
                pool: -1,
                shards: 8,
                ..c
            }
            .holds()
        );
    }
}
