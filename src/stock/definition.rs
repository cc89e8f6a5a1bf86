//! A batch's definition in Redis: its setup (every slot, then the initial fill) and its
//! versioned changes.
//!
//! Invariants kept here: a setup creates slots with a fresh claim counter, so it runs only
//! for a batch whose setup never completed (the caller asks the database); a change reaches
//! every slot at a version from the database, shards first and the pool last, idempotent
//! and order-independent (`lua/patch.lua`).

use crate::backend::Backend;
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::meta::{self, DEFINITION, VERSION};
use crate::contract::patch::{self, Patched};
use crate::contract::setup::{self, Created};
use crate::domain::batch::Batch;
use crate::domain::ids::home_shard;

use super::{Stock, StockError, TransferKind};

impl<B: Backend> Stock<B> {
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
        let mut pool_fields = meta::fields(batch, version);
        pool_fields.extend(meta::pool_fields(batch));
        // a batch with codes starts empty: its stock arrives with its codes
        // (`catalog::codes`), which then fill the shards (`Stock::fill_shards`)
        let initial = if batch.codes.is_some() {
            0
        } else {
            batch.stock
        };
        let created = self
            .setup_slot(&keys.pool, initial, &fp, &pool_fields, &[])
            .await?;

        let shard_fields = meta::fields(batch, version);
        let mut deny: Vec<Vec<&str>> = vec![Vec::new(); keys.shards.len()];
        for u in &batch.eligibility.deny_users {
            deny[home_shard(u, batch.shards) as usize].push(u.as_str());
        }
        for (shard, deny) in keys.shards.iter().zip(&deny) {
            self.setup_slot(shard, 0, &fp, &shard_fields, deny).await?;
        }
        if created && initial > 0 {
            self.fill_shards(keys, initial).await?;
        }
        Ok(created)
    }

    /// The initial fill: `st.initial_fill_percent` of `stock` from the pool, spread evenly
    /// over the shards by ordinary (crash-safe) transfers.
    pub async fn fill_shards(&self, keys: &BatchKeys, stock: i64) -> Result<(), StockError> {
        let per_shard = stock * i64::from(self.cfg.initial_fill_percent)
            / 100
            / keys.shards.len().max(1) as i64;
        if per_shard > 0 {
            for shard in &keys.shards {
                self.transfer(&keys.pool, shard, per_shard, false, TransferKind::Initial)
                    .await?;
            }
        }
        Ok(())
    }

    async fn setup_slot(
        &self,
        slot: &SlotKeys,
        initial: i64,
        fp: &str,
        fields: &[(&'static str, String)],
        deny: &[&str],
    ) -> Result<bool, StockError> {
        match setup::call(self.backend.as_ref(), slot, initial, fp, fields, deny).await? {
            Created::Now => Ok(true),
            Created::Already => Ok(false),
            Created::Conflict => Err(StockError::Conflict),
        }
    }

    /// The fingerprint each slot of the batch holds, pool first (`None`: the slot is missing).
    pub async fn slot_fingerprints(
        &self,
        keys: &BatchKeys,
    ) -> Result<Vec<Option<String>>, StockError> {
        let mut out = Vec::with_capacity(keys.shards.len() + 1);
        for slot in keys.all() {
            out.push(self.meta(slot).await?.fingerprint().map(str::to_string));
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
        let mut fields: Vec<(&'static str, String)> =
            meta::fields(batch, u64::try_from(version).unwrap_or(0))
                .into_iter()
                .filter(|(k, _)| *k != VERSION)
                .collect();
        for shard in &keys.shards {
            self.patch_slot(shard, version, None, &fields).await?;
        }
        fields.push((DEFINITION, serde_json::to_string(batch).unwrap_or_default()));
        // the total of a batch with codes is what its codes added (`lua/codes_add.lua`)
        let total = batch.codes.is_none().then_some(batch.stock);
        self.patch_slot(&keys.pool, version, total, &fields).await?;
        self.announce_change(keys.batch()).await;
        Ok(())
    }

    async fn patch_slot(
        &self,
        slot: &SlotKeys,
        version: i64,
        total: Option<i64>,
        fields: &[(&'static str, String)],
    ) -> Result<(), StockError> {
        match patch::call(self.backend.as_ref(), slot, version, total, fields).await? {
            Patched::Applied { .. } | Patched::Stale { .. } => Ok(()),
            Patched::NoSlot => Err(StockError::NotFound),
            Patched::WouldShrink { current } => Err(StockError::Inconsistent(format!(
                "version {version} of batch {} would shrink its total from {current}",
                slot.batch
            ))),
            // the database refuses such a change first (`BatchPatch::validate`): reaching
            // Redis, the definition there and the database's disagree
            Patched::OverCap { cap } => Err(StockError::Inconsistent(format!(
                "version {version} of batch {} would take its total past the {cap} coupons \
                 its budget pays for",
                slot.batch
            ))),
        }
    }
}
