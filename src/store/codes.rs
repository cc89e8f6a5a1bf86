//! The codes of batches that hand out codes (`batch_codes`): every code a batch was given,
//! the chunk it reaches Redis in, and whether Redis has it.
//!
//! Invariants kept here: a code is stored once per batch, whatever the number of imports
//! naming it (the primary key; [`Db::insert_codes`] answers only the codes that are new);
//! a chunk is marked loaded only after `lua/codes_add.lua` counted it (the caller's order),
//! so a chunk still unloaded may be sent again, and counts once (the script records chunk
//! ids); a code is marked `left_pool` before it can reach a shard ([`Db::codes_left_pool`],
//! called by every transfer out of the pool before it credits), so the codes that never
//! left the pool are exactly the ones no claim can have taken, whatever Redis lost.

use sqlx::QueryBuilder;

use super::{Db, DbError};

/// Rows per multi-row SQLite insert (4 binds each, well below SQLite's limit).
const SQLITE_CODES_PER_INSERT: usize = 500;

impl Db {
    /// Stores `codes` of `batch` in chunk `chunk`, not yet loaded, in one transaction;
    /// codes the batch already has are skipped. Returns the codes stored now.
    pub async fn insert_codes(
        &self,
        batch: &str,
        chunk: &str,
        codes: &[String],
        now: i64,
    ) -> Result<Vec<String>, DbError> {
        if codes.is_empty() {
            return Ok(Vec::new());
        }
        let new = match self {
            Db::Postgres(p) => {
                sqlx::query_scalar(
                    "INSERT INTO batch_codes (batch_id, code, chunk, loaded, added_at) \
                     SELECT $1, c, $2, FALSE, $4 FROM UNNEST($3::text[]) AS t(c) \
                     ON CONFLICT (batch_id, code) DO NOTHING RETURNING code",
                )
                .bind(batch)
                .bind(chunk)
                .bind(codes)
                .bind(now)
                .fetch_all(p)
                .await?
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let mut new = Vec::with_capacity(codes.len());
                for part in codes.chunks(SQLITE_CODES_PER_INSERT) {
                    let mut q = QueryBuilder::new(
                        "INSERT INTO batch_codes (batch_id, code, chunk, loaded, added_at) ",
                    );
                    q.push_values(part, |mut b, c| {
                        b.push_bind(batch)
                            .push_bind(c.as_str())
                            .push_bind(chunk)
                            .push_bind(false)
                            .push_bind(now);
                    });
                    q.push(" ON CONFLICT (batch_id, code) DO NOTHING RETURNING code");
                    let got: Vec<String> = q
                        .build_query_scalar()
                        .persistent(part.len() == SQLITE_CODES_PER_INSERT)
                        .fetch_all(&mut *tx)
                        .await?;
                    new.extend(got);
                }
                tx.commit().await?;
                new
            }
        };
        Ok(new)
    }

    /// Codes of `batch` stored (loaded or not): what the next import is checked against.
    pub async fn code_count(&self, batch: &str) -> Result<i64, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar("SELECT COUNT(*) FROM batch_codes WHERE batch_id = $1")
                .bind(batch)
                .fetch_one(p)
                .await?
        }))
    }

    /// The chunks of `batch` not yet loaded into Redis and stored before `before` (ms),
    /// oldest first, at most `limit`.
    pub async fn pending_code_chunks(
        &self,
        batch: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<String>, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar(
                "SELECT chunk FROM batch_codes WHERE batch_id = $1 AND NOT loaded \
                 AND added_at < $2 GROUP BY chunk ORDER BY MIN(added_at), chunk LIMIT $3",
            )
            .bind(batch)
            .bind(before)
            .bind(limit)
            .fetch_all(p)
            .await?
        }))
    }

    /// Batches with codes not yet loaded into Redis.
    pub async fn batches_with_pending_codes(&self) -> Result<Vec<String>, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar("SELECT DISTINCT batch_id FROM batch_codes WHERE NOT loaded")
                .fetch_all(p)
                .await?
        }))
    }

    /// The codes of one chunk, in a fixed order (a chunk sent again is the same chunk).
    pub async fn chunk_codes(&self, batch: &str, chunk: &str) -> Result<Vec<String>, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar(
                "SELECT code FROM batch_codes WHERE batch_id = $1 AND chunk = $2 ORDER BY code",
            )
            .bind(batch)
            .bind(chunk)
            .fetch_all(p)
            .await?
        }))
    }

    /// Records every chunk of `batch` as loaded (a rebuild wrote them all, or withheld them).
    pub async fn mark_all_codes_loaded(&self, batch: &str) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query("UPDATE batch_codes SET loaded = TRUE WHERE batch_id = $1 AND NOT loaded")
                .bind(batch)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Records that Redis counted `chunk` of `batch`.
    pub async fn mark_chunk_loaded(&self, batch: &str, chunk: &str) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query("UPDATE batch_codes SET loaded = TRUE WHERE batch_id = $1 AND chunk = $2")
                .bind(batch)
                .bind(chunk)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Forgets `codes` of `chunk` of `batch` (not yet loaded): stored, then found past the
    /// batch's stock.
    pub async fn delete_codes(
        &self,
        batch: &str,
        chunk: &str,
        codes: &[String],
    ) -> Result<u64, DbError> {
        let mut n = 0;
        for code in codes {
            n += on_pool!(self, p => {
                sqlx::query(
                    "DELETE FROM batch_codes WHERE batch_id = $1 AND chunk = $2 AND code = $3 \
                     AND NOT loaded",
                )
                .bind(batch)
                .bind(chunk)
                .bind(code)
                .execute(p)
                .await?
                .rows_affected()
            });
        }
        Ok(n)
    }

    /// Forgets `chunk` of `batch`, which Redis refused (past the batch's cap): its codes were
    /// never handed out, and a later import may bring them again.
    pub async fn drop_code_chunk(&self, batch: &str, chunk: &str) -> Result<u64, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query("DELETE FROM batch_codes WHERE batch_id = $1 AND chunk = $2 AND NOT loaded")
                .bind(batch)
                .bind(chunk)
                .execute(p)
                .await?
                .rows_affected()
        }))
    }

    /// Records that `codes` of `batch` leave the pool for a shard: before they reach it.
    pub async fn codes_left_pool(&self, batch: &str, codes: &[&str]) -> Result<(), DbError> {
        match self {
            Db::Postgres(p) => {
                sqlx::query(
                    "UPDATE batch_codes SET left_pool = TRUE \
                     WHERE batch_id = $1 AND code = ANY($2)",
                )
                .bind(batch)
                .bind(codes)
                .execute(p)
                .await?;
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                for part in codes.chunks(SQLITE_CODES_PER_INSERT) {
                    let mut q = QueryBuilder::new(
                        "UPDATE batch_codes SET left_pool = TRUE WHERE batch_id = ",
                    );
                    q.push_bind(batch).push(" AND code IN (");
                    let mut list = q.separated(", ");
                    for c in part {
                        list.push_bind(*c);
                    }
                    q.push(")");
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// The codes of `batch` no coupon in the database carries, in a fixed order, split into
    /// those that never left the pool (no claim can have taken one: a rebuild gives them
    /// back) and those that did (a claim lost with Redis may hold one: withheld).
    pub async fn free_codes(&self, batch: &str) -> Result<(Vec<String>, u64), DbError> {
        let rows: Vec<(String, bool)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT bc.code, bc.left_pool FROM batch_codes bc WHERE bc.batch_id = $1 \
                 AND NOT EXISTS (SELECT 1 FROM coupons c WHERE c.batch_id = bc.batch_id \
                 AND c.code = bc.code) ORDER BY bc.code",
            )
            .bind(batch)
            .fetch_all(p)
            .await?
        });
        let left = rows.iter().filter(|(_, l)| *l).count() as u64;
        Ok((
            rows.into_iter()
                .filter(|(_, l)| !l)
                .map(|(c, _)| c)
                .collect(),
            left,
        ))
    }
}
