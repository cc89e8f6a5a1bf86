//! Codes into a batch that hands out codes: a create's generated codes and partner imports,
//! stored in the database, then added to the pool in Redis with the stock they are.
//!
//! Invariants kept here:
//! - a code is handed out at most once: the database stores each code once per batch
//!   (`store::codes`), and only codes stored NOW go on to Redis, in a chunk whose id
//!   `lua/codes_add.lua` records, so a chunk sent again (a retry, a crash between Redis and
//!   the database's `loaded` mark, [`Catalog::load_pending_codes`] on any instance) counts
//!   once;
//! - a batch never holds more codes than its `stock` says: an import past it is refused
//!   before the database (`over_capacity`), and Redis refuses a chunk past its cap
//!   atomically (two imports racing), whose codes are then forgotten;
//! - a chunk stored but not yet in Redis is never lost: the next import, create retry or
//!   definition check loads it.

use std::collections::HashSet;

use rand::Rng;
use serde::Serialize;

use super::{Catalog, CatalogError};
use crate::backend::Backend;
use crate::contract::codes_add::{self, Added};
use crate::contract::keys::BatchKeys;
use crate::domain::batch::{Batch, CodeSource};
use crate::domain::codes::generate_unique;
use crate::obs::events::CodesReceived;
use crate::store::now_ms;

/// Chunks loaded per batch per [`Catalog::load_pending_codes`] pass.
const PENDING_CHUNKS_PER_PASS: i64 = 1000;
/// The periodic check loads only chunks stored at least this long ago: a younger one is
/// most likely on its way to Redis from the import that stored it.
const PENDING_MIN_AGE_MS: i64 = 60_000;
/// Rounds of generation at most, when codes generated earlier collide (each round
/// generates only what is missing; a collision is rare by `domain::codes`' bound).
const GENERATE_ROUNDS: usize = 8;

/// What adding codes did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CodesAdded {
    /// Codes the batch holds now that it did not before.
    pub added: u64,
    /// Codes the batch already had (an earlier import, or earlier in this one).
    pub duplicates: u64,
    /// Codes refused: they would take the batch past its `stock`.
    pub over_capacity: u64,
}

/// An id no other chunk has: a random tag, then the chunk's number in its import.
pub fn chunk_tag() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

impl<B: Backend> Catalog<B> {
    /// The codes `batch` may still take: its stock less the codes it holds (one count, so
    /// that an import or a generation counts once, not per chunk).
    pub async fn code_room(&self, batch: &Batch) -> Result<usize, CatalogError> {
        let held = self.store.code_count(&batch.id).await?;
        Ok(usize::try_from(batch.stock - held).unwrap_or(0))
    }

    /// Adds `codes` (each valid, `domain::codes::valid_code`; repeats allowed) to `batch`
    /// as chunk `chunk` (unique: [`chunk_tag`] plus a number), at most `room` of them
    /// ([`Catalog::code_room`] at the start of the import, less what it added since:
    /// updated here). See the module documentation.
    pub async fn add_codes(
        &self,
        batch: &Batch,
        keys: &BatchKeys,
        chunk: &str,
        codes: &[String],
        room: &mut usize,
    ) -> Result<CodesAdded, CatalogError> {
        let mut seen = HashSet::with_capacity(codes.len());
        let unique: Vec<String> = codes
            .iter()
            .filter(|c| seen.insert(c.as_str()))
            .cloned()
            .collect();
        let mut out = CodesAdded {
            duplicates: (codes.len() - unique.len()) as u64,
            ..CodesAdded::default()
        };
        if unique.is_empty() {
            return Ok(out);
        }
        if *room == 0 {
            out.over_capacity = unique.len() as u64;
            return Ok(out);
        }
        let mut new = self
            .store
            .insert_codes(&batch.id, chunk, &unique, now_ms())
            .await?;
        out.duplicates += (unique.len() - new.len()) as u64;
        if new.len() > *room {
            // past the stock: the codes that do not fit are not kept
            let excess = new.split_off(*room);
            self.store.delete_codes(&batch.id, chunk, &excess).await?;
            out.over_capacity += excess.len() as u64;
        }
        if new.is_empty() {
            return Ok(out);
        }
        *room -= new.len();
        match self.load_chunk(keys, chunk, &new).await? {
            true => out.added = new.len() as u64,
            false => out.over_capacity += new.len() as u64,
        }
        Ok(out)
    }

    /// Sends one stored chunk to Redis and records it loaded. `false`: Redis refused it
    /// (past the cap) and it was forgotten.
    async fn load_chunk(
        &self,
        keys: &BatchKeys,
        chunk: &str,
        codes: &[String],
    ) -> Result<bool, CatalogError> {
        let batch = keys.batch();
        match codes_add::call(self.stock.backend().as_ref(), &keys.pool, chunk, codes)
            .await
            .map_err(crate::stock::StockError::from)?
        {
            Added::Now { .. } | Added::Before { .. } => {
                self.store.mark_chunk_loaded(batch, chunk).await?;
                Ok(true)
            }
            Added::OverCap { cap } => {
                tracing::warn!(
                    batch,
                    chunk,
                    cap,
                    "codes refused: past the batch's stock (a concurrent import took it)"
                );
                self.store.drop_code_chunk(batch, chunk).await?;
                Ok(false)
            }
            Added::NoBatch => Err(CatalogError::Lost(batch.to_string())),
            Added::NoCodes => Err(CatalogError::Corrupt(format!(
                "{batch} has codes in the database but does not hand out codes in Redis"
            ))),
        }
    }

    /// Loads every chunk of `batch` stored before `before` (ms) but not yet in Redis (an
    /// import or create interrupted between the two). Returns the chunks loaded.
    pub async fn load_pending_codes(
        &self,
        keys: &BatchKeys,
        before: i64,
    ) -> Result<usize, CatalogError> {
        let batch = keys.batch();
        let chunks = self
            .store
            .pending_code_chunks(batch, before, PENDING_CHUNKS_PER_PASS)
            .await?;
        for chunk in &chunks {
            let codes = self.store.chunk_codes(batch, chunk).await?;
            if !codes.is_empty() {
                self.load_chunk(keys, chunk, &codes).await?;
            }
        }
        Ok(chunks.len())
    }

    /// The codes of a batch with generated codes, at its create: generates what is missing
    /// up to its `stock` (none on a repeated create), stores and loads them in chunks of
    /// `chunk_codes`, then loads any chunk an interrupted earlier attempt left. Returns the
    /// codes added now.
    pub async fn generate_codes(
        &self,
        batch: &Batch,
        keys: &BatchKeys,
        chunk_codes: usize,
    ) -> Result<u64, CatalogError> {
        let Some(CodeSource::Generated(spec)) = &batch.codes else {
            return Ok(0);
        };
        self.load_pending_codes(keys, i64::MAX).await?;
        let tag = chunk_tag();
        let mut added = 0;
        let mut n = 0;
        for _ in 0..GENERATE_ROUNDS {
            let mut room = self.code_room(batch).await?;
            let missing = room as i64;
            if missing <= 0 {
                if added > 0 {
                    CodesReceived {
                        batch: &batch.id,
                        source: "generate",
                        added,
                        duplicates: 0,
                        invalid: 0,
                        over_capacity: 0,
                    }
                    .emit();
                }
                return Ok(added);
            }
            let codes = generate_unique(spec, missing as usize, &mut rand::rng())
                .map_err(|e| CatalogError::Corrupt(format!("{}: {e}", batch.id)))?;
            for part in codes.chunks(chunk_codes.max(1)) {
                n += 1;
                let got = self
                    .add_codes(batch, keys, &format!("{tag}-{n}"), part, &mut room)
                    .await?;
                added += got.added;
            }
        }
        Err(CatalogError::Corrupt(format!(
            "{}: {GENERATE_ROUNDS} rounds of generation left codes missing",
            batch.id
        )))
    }

    /// Loads the stored-but-unloaded chunks of every batch that has some (the periodic
    /// check).
    pub async fn heal_codes(&self) {
        let batches = match self.store.batches_with_pending_codes().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "code check: listing batches failed");
                return;
            }
        };
        for id in batches {
            let Ok(entry) = self.load_live(&id).await else {
                continue;
            };
            if entry.is_retired() {
                continue; // its keys are gone for good
            }
            let before = now_ms() - PENDING_MIN_AGE_MS;
            match self.load_pending_codes(&entry.keys, before).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(batch = %id, chunks = n,
                    "codes stored but not yet in the backend were loaded"),
                Err(e) => tracing::warn!(batch = %id, error = %e,
                    "loading stored codes failed; retrying on the next check"),
            }
        }
    }
}
