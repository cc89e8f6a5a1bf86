//! Stock transfers between the slots of a batch, and the sweeper that finishes the ones a
//! crash (or a lost reply) interrupted.
//!
//! Invariant kept here: a transfer is two scripts on two slots: `transfer_out` moves stock
//! (and, in a batch with codes, as many codes) into the source's outbox (idempotent per
//! transfer id), `transfer_in` credits the destination once (its inbox marker), and the
//! outbox entry is closed last. Stopping anywhere never creates stock nor duplicates a
//! code, and [`Stock::sweep`] (safe on any number of instances at once) always finishes it,
//! with the codes the outbox recorded. Codes leaving the POOL are recorded in the database
//! before the destination is credited (`store::codes`), so a code that never left the pool
//! was never handed out, whatever Redis loses (what a rebuild relies on).

use std::sync::atomic::Ordering;

use crate::backend::Backend;
use crate::contract::keys::{BatchKeys, SlotKeys};
use crate::contract::probe::OutboxEntry;
use crate::contract::transfer_out::Moved;
use crate::contract::{probe, transfer_done, transfer_in, transfer_out};
use crate::domain::time::now_ms;
use crate::obs::events::{SweepFinished, TransferMade};

use super::{Stock, StockError};

/// Why a transfer was made (a metric label).
#[derive(Debug, Clone, Copy)]
pub enum TransferKind {
    Initial,
    Refill,
    Steal,
}

impl TransferKind {
    fn label(self) -> &'static str {
        match self {
            TransferKind::Initial => "initial",
            TransferKind::Refill => "refill",
            TransferKind::Steal => "steal",
        }
    }
}

impl<B: Backend> Stock<B> {
    fn next_transfer_id(&self) -> String {
        let n = self.transfer_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.instance)
    }

    /// A whole transfer of up to `max` from `src` to `dst`. Returns the amount moved.
    pub async fn transfer(
        &self,
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
        if moved.amount > 0 {
            self.credit_and_close(src, dst, &tid, &moved).await?;
        }
        TransferMade {
            batch: &src.batch,
            kind: kind.label(),
            amount: moved.amount,
        }
        .emit();
        Ok(moved.amount)
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
    ) -> Result<Moved, StockError> {
        let backend = self.backend.as_ref();
        Ok(transfer_out::call(backend, src, dst, tid, max, at_most_half).await?)
    }

    /// Second half: credit the destination once, then close the outbox entry.
    async fn credit_and_close(
        &self,
        src: &SlotKeys,
        dst: &SlotKeys,
        tid: &str,
        moved: &Moved,
    ) -> Result<(), StockError> {
        if src.is_pool() && !moved.codes.is_empty() {
            let Some(store) = &self.store else {
                return Err(StockError::Inconsistent(format!(
                    "batch {} hands out codes, and this instance has no database to record \
                     them leaving its pool",
                    src.batch
                )));
            };
            let codes: Vec<&str> = moved.codes.split(',').collect();
            store.codes_left_pool(&src.batch, &codes).await?;
        }
        let backend = self.backend.as_ref();
        let ttl = self.cfg.transfer_marker_ttl_s;
        transfer_in::call(backend, dst, tid, moved.amount, &moved.codes, ttl).await?;
        transfer_done::call(backend, src, tid).await?;
        Ok(())
    }

    /// Finishes the transfer of an outbox entry of `src`, with the codes it carries (a
    /// repeated `transfer_out` of its id writes nothing and answers them).
    async fn finish(
        &self,
        keys: &BatchKeys,
        src: &SlotKeys,
        e: &OutboxEntry,
    ) -> Result<(), StockError> {
        let dst = keys.slot(e.destination).ok_or_else(|| {
            StockError::Inconsistent(format!(
                "transfer {} out of {}:{} names a slot the batch does not have; its {} \
                 stay in flight",
                e.transfer_id, src.batch, src.label, e.amount
            ))
        })?;
        let moved = transfer_out::lookup(self.backend.as_ref(), src, &e.transfer_id).await?;
        if moved.amount != e.amount {
            // closed by another sweeper between the probe and now: nothing left to do
            return Ok(());
        }
        self.credit_and_close(src, dst, &e.transfer_id, &moved)
            .await
    }

    /// Finishes every transfer whose outbox entry is older than `min_age_ms` (0 = all).
    /// Safe to run at any time, on any number of instances at once.
    pub async fn sweep(&self, keys: &BatchKeys, min_age_ms: u64) -> Result<usize, StockError> {
        Ok(self.sweep_counting(keys, min_age_ms).await?.0)
    }

    /// [`Stock::sweep`], also counting the transfers it left open (younger than
    /// `min_age_ms`): `(finished, left open)`.
    pub async fn sweep_counting(
        &self,
        keys: &BatchKeys,
        min_age_ms: u64,
    ) -> Result<(usize, usize), StockError> {
        let now = now_ms();
        let (mut finished, mut open) = (0, 0);
        for slot in keys.all() {
            let p = probe::call(self.backend.as_ref(), slot).await?;
            for e in p.outbox {
                if now - e.created_ms < min_age_ms as i64 {
                    open += 1;
                    continue;
                }
                self.finish(keys, slot, &e).await?;
                SweepFinished {
                    batch: &slot.batch,
                    transfer: &e.transfer_id,
                    amount: e.amount,
                }
                .emit();
                finished += 1;
            }
        }
        Ok((finished, open))
    }
}
