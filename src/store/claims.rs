//! Claims in the database: the persister's batched, idempotent writes (a `claimed` event
//! and an `unused` coupon row each), the coupon ids met twice, and the per-shard summaries
//! `rebuild` and `reconcile` read.
//!
//! Invariants kept here: a claim is recorded at most once however often it is delivered
//! (event id `<coupon_id>:claimed` UNIQUE, the coupon id the `coupons` primary key, both
//! rows in one transaction); its `claimed` event enters the outbox in that transaction,
//! once, and only for the claim that got the coupon row (so a conflicting claim is never
//! reported as granted); a claim whose coupon id is held for a DIFFERENT claim is recorded
//! in `coupon_conflicts`, once, and returned, never dropped silently.

use std::collections::HashSet;

use serde::Serialize;
use sqlx::QueryBuilder;

use super::outbox::Notice;
use super::{ClaimRecord, Db, DbError, now_ms, to_i64, to_u32, to_u64};
use crate::domain::coupon::{CouponState, EventKind};
use crate::domain::time::Timestamp;

/// Rows per multi-row INSERT on SQLite. Each claim row binds at most 12 values, so a
/// statement stays under 999 variables (996), the limit of SQLite builds older than 3.32.
const SQLITE_ROWS_PER_INSERT: usize = 83;

/// The unique event id of a claim in the transaction log.
pub fn claim_event_id(c: &ClaimRecord) -> String {
    format!("{}:claimed", c.coupon_id)
}

/// The outbox body of a claim's `claimed` event.
fn claimed_notice(c: &ClaimRecord) -> Result<String, DbError> {
    Notice {
        id: &claim_event_id(c),
        kind: EventKind::Claimed.as_str(),
        occurred_at: Timestamp(c.claimed_at),
        coupon_id: &c.coupon_id,
        batch_id: &c.batch_id,
        user_id: &c.user_id,
        order_id: None,
        state: CouponState::Unused,
        lock_expires_at: None,
        cause: None,
        valid_from: Timestamp(c.valid_from),
        valid_to: Timestamp(c.valid_to),
    }
    .to_json()
}

/// The outbox rows (event id, coupon id, body) of the claims whose coupon rows were
/// inserted now (`inserted`: their coupon ids).
fn claimed_outbox(
    rows: &[(&ClaimRecord, i64)],
    inserted: &[String],
) -> Result<Vec<(String, String, String)>, DbError> {
    let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
    rows.iter()
        .filter(|(c, _)| inserted.contains(c.coupon_id.as_str()))
        .map(|(c, _)| Ok((claim_event_id(c), c.coupon_id.clone(), claimed_notice(c)?)))
        .collect()
}

/// A coupon id the persister met again with a different claim: the database keeps the
/// claim it holds (`stored_*`); the other one is recorded here in full.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CouponConflict {
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    pub stored_user_id: String,
    pub stored_request_id: Option<String>,
    pub stored_claimed_at: i64,
    pub user_id: String,
    pub request_id: Option<String>,
    pub claimed_at: i64,
    pub valid_from: i64,
    pub valid_to: i64,
    pub detected_at: i64,
}

impl CouponConflict {
    /// One conflicting claim, whatever how often it is delivered.
    fn key(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.coupon_id,
            self.user_id,
            self.request_id.as_deref().unwrap_or(""),
            self.claimed_at
        )
    }
}

/// What [`Db::write_claims_report`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimsWritten {
    /// Claims newly recorded.
    pub inserted: u64,
    /// Conflicting claims recorded now for the first time (a redelivered conflict is not
    /// repeated here; it stays recorded once).
    pub conflicts: Vec<CouponConflict>,
}

/// Claims of one shard of a batch in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardClaims {
    pub shard: u32,
    pub count: u64,
    pub max_seq: u64,
}

const INSERT_CONFLICT: &str = "INSERT INTO coupon_conflicts (conflict_key, coupon_id, \
     batch_id, shard, stored_user_id, stored_request_id, stored_claimed_at, user_id, \
     request_id, claimed_at, valid_from, valid_to, detected_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
     ON CONFLICT (conflict_key) DO NOTHING";

/// Coupon ids per lookup of stored claims on SQLite (one bound variable each).
const SQLITE_IDS_PER_SELECT: usize = 500;

/// A claim as the `coupons` table holds it: what tells one claim from another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredClaim {
    user_id: String,
    request_id: Option<String>,
    claimed_at: i64,
    valid_from: i64,
    valid_to: i64,
}

impl StoredClaim {
    fn of(c: &ClaimRecord) -> StoredClaim {
        StoredClaim {
            user_id: c.user_id.clone(),
            request_id: c.request_id.clone(),
            claimed_at: c.claimed_at,
            valid_from: c.valid_from,
            valid_to: c.valid_to,
        }
    }
}

type StoredClaimRow = (String, String, Option<String>, i64, i64, i64);

/// PostgreSQL: one statement per table, every claim bound as one array per column
/// (`UNNEST`), so the statement text and plan never change with the batch size and
/// the server parses 9-11 parameters instead of thousands.
/// Returns (claimed events inserted, coupon rows inserted).
async fn write_claims_pg(
    pool: &sqlx::PgPool,
    rows: &[(&ClaimRecord, i64)],
    now: i64,
) -> Result<(u64, u64), DbError> {
    let col = |f: fn(&ClaimRecord) -> String| rows.iter().map(|(c, _)| f(c)).collect::<Vec<_>>();
    let event_ids = col(claim_event_id);
    let batch_ids = col(|c| c.batch_id.clone());
    let user_ids = col(|c| c.user_id.clone());
    let coupon_ids = col(|c| c.coupon_id.clone());
    let request_ids: Vec<Option<String>> = rows.iter().map(|(c, _)| c.request_id.clone()).collect();
    let shards: Vec<i64> = rows.iter().map(|(c, _)| i64::from(c.shard)).collect();
    let seqs: Vec<i64> = rows.iter().map(|(_, s)| *s).collect();
    let claimed_at: Vec<i64> = rows.iter().map(|(c, _)| c.claimed_at).collect();
    let valid_from: Vec<i64> = rows.iter().map(|(c, _)| c.valid_from).collect();
    let valid_to: Vec<i64> = rows.iter().map(|(c, _)| c.valid_to).collect();
    let codes: Vec<Option<String>> = rows.iter().map(|(c, _)| c.code.clone()).collect();
    let managed: Vec<i16> = rows.iter().map(|(c, _)| i16::from(c.managed)).collect();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO coupon_events (event_id, kind, batch_id, shard, user_id, coupon_id, \
         request_id, at, recorded_at) \
         SELECT e, 'claimed', b, s, u, c, r, a, $8 \
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                     $6::text[], $7::bigint[]) AS t(e, b, s, u, c, r, a) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event_ids)
    .bind(&batch_ids)
    .bind(&shards)
    .bind(&user_ids)
    .bind(&coupon_ids)
    .bind(&request_ids)
    .bind(&claimed_at)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let coupons: Vec<String> = sqlx::query_scalar(
        "INSERT INTO coupons (coupon_id, batch_id, shard, seq, user_id, request_id, state, \
         valid_from, valid_to, claimed_at, updated_at, code, managed) \
         SELECT c, b, s, q, u, r, 'unused', vf, vt, a, $10, cd, m \
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], \
                     $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $11::text[], \
                     $12::smallint[]) \
              AS t(c, b, s, q, u, r, vf, vt, a, cd, m) \
         ON CONFLICT (coupon_id) DO NOTHING RETURNING coupon_id",
    )
    .bind(&coupon_ids)
    .bind(&batch_ids)
    .bind(&shards)
    .bind(&seqs)
    .bind(&user_ids)
    .bind(&request_ids)
    .bind(&valid_from)
    .bind(&valid_to)
    .bind(&claimed_at)
    .bind(now)
    .bind(&codes)
    .bind(&managed)
    .fetch_all(&mut *tx)
    .await?;
    let outbox = claimed_outbox(rows, &coupons)?;
    if !outbox.is_empty() {
        let ids: Vec<&str> = outbox.iter().map(|o| o.0.as_str()).collect();
        let coupon_ids: Vec<&str> = outbox.iter().map(|o| o.1.as_str()).collect();
        let bodies: Vec<&str> = outbox.iter().map(|o| o.2.as_str()).collect();
        sqlx::query(
            "INSERT INTO event_outbox (event_id, kind, coupon_id, payload, created_at, \
             next_attempt_at) \
             SELECT e, 'claimed', c, p, $4, $4 \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS t(e, c, p) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&coupon_ids)
        .bind(&bodies)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok((inserted, coupons.len() as u64))
}

/// The coupon an earlier success of a request id got, as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestClaim {
    pub coupon_id: String,
    pub valid_from: i64,
    pub valid_to: i64,
    pub claimed_at: i64,
    pub code: Option<String>,
}

impl Db {
    /// The coupon `user` got with `request_id` from the batch, if the database holds it:
    /// the replay of a retired batch, whose request-id records left Redis with it.
    pub async fn claim_of_request(
        &self,
        batch_id: &str,
        user: &str,
        request_id: &str,
    ) -> Result<Option<RequestClaim>, DbError> {
        type Row = (String, i64, i64, i64, Option<String>);
        let row: Option<Row> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT coupon_id, valid_from, valid_to, claimed_at, code FROM coupons \
                 WHERE batch_id = $1 AND user_id = $2 AND request_id = $3 \
                 ORDER BY claimed_at, coupon_id LIMIT 1",
            )
            .bind(batch_id)
            .bind(user)
            .bind(request_id)
            .fetch_optional(p)
            .await?
        });
        Ok(row.map(
            |(coupon_id, valid_from, valid_to, claimed_at, code)| RequestClaim {
                coupon_id,
                valid_from,
                valid_to,
                claimed_at,
                code,
            },
        ))
    }

    /// Does the database hold any claim of the batch?
    pub async fn has_claims(&self, batch_id: &str) -> Result<bool, DbError> {
        let n: i64 = on_pool!(self, p => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM coupons WHERE batch_id = $1 LIMIT 1) t",
            )
            .bind(batch_id)
            .fetch_one(p)
            .await?
        });
        Ok(n > 0)
    }

    /// The conflicting claims recorded for a batch, oldest first.
    pub async fn coupon_conflicts(&self, batch_id: &str) -> Result<Vec<CouponConflict>, DbError> {
        type Row = (
            String,
            i64,
            String,
            Option<String>,
            i64,
            String,
            Option<String>,
            i64,
            i64,
            i64,
            i64,
        );
        let rows: Vec<Row> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT coupon_id, shard, stored_user_id, stored_request_id, stored_claimed_at, \
                 user_id, request_id, claimed_at, valid_from, valid_to, detected_at \
                 FROM coupon_conflicts WHERE batch_id = $1 ORDER BY seq",
            )
            .bind(batch_id)
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(|r| {
                Ok(CouponConflict {
                    coupon_id: r.0,
                    batch_id: batch_id.to_string(),
                    shard: to_u32(r.1, "shard")?,
                    stored_user_id: r.2,
                    stored_request_id: r.3,
                    stored_claimed_at: r.4,
                    user_id: r.5,
                    request_id: r.6,
                    claimed_at: r.7,
                    valid_from: r.8,
                    valid_to: r.9,
                    detected_at: r.10,
                })
            })
            .collect()
    }

    /// Records claims (see [`Db::write_claims_report`]); returns how many were new.
    /// Conflicting claims are still recorded in `coupon_conflicts` (and reported by
    /// `reconcile`); the persister uses [`Db::write_claims_report`] to count and log them.
    pub async fn write_claims(&self, claims: &[ClaimRecord]) -> Result<u64, DbError> {
        Ok(self.write_claims_report(claims).await?.inserted)
    }

    /// Records claims: one `claimed` event and one `unused` coupon row each, in ONE
    /// transaction; claims already recorded are skipped (`ON CONFLICT DO NOTHING`), so a
    /// redelivered batch is harmless. A claim whose coupon id the database holds for a
    /// DIFFERENT claim (user, request id, time or validity differ: the id was minted twice)
    /// is recorded in `coupon_conflicts` (once) and returned, never dropped silently. That
    /// check costs one more query only when some coupon id was already there.
    pub async fn write_claims_report(
        &self,
        claims: &[ClaimRecord],
    ) -> Result<ClaimsWritten, DbError> {
        let mut seen = HashSet::with_capacity(claims.len());
        let unique: Vec<&ClaimRecord> = claims
            .iter()
            .filter(|c| seen.insert(c.coupon_id.as_str()))
            .collect();
        if unique.is_empty() {
            return Ok(ClaimsWritten::default());
        }
        let mut rows = Vec::with_capacity(unique.len());
        for c in &unique {
            rows.push((*c, to_i64(c.seq, "seq")?));
        }
        let now = now_ms();
        let (inserted, coupons) = match self {
            Db::Postgres(p) => write_claims_pg(p, &rows, now).await?,
            Db::Sqlite(_) => self.write_claims_sqlite(&rows, now).await?,
        };
        let conflicts = if coupons < claims.len() as u64 {
            self.record_conflicts(claims, now).await?
        } else {
            Vec::new()
        };
        Ok(ClaimsWritten {
            inserted,
            conflicts,
        })
    }

    /// Compares every claim with the claim stored under its coupon id and records the ones
    /// that differ. Returns those recorded now for the first time.
    async fn record_conflicts(
        &self,
        claims: &[ClaimRecord],
        now: i64,
    ) -> Result<Vec<CouponConflict>, DbError> {
        let mut ids: Vec<&str> = claims.iter().map(|c| c.coupon_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut stored: Vec<StoredClaimRow> = Vec::with_capacity(ids.len());
        match self {
            Db::Postgres(p) => {
                stored = sqlx::query_as(
                    "SELECT coupon_id, user_id, request_id, claimed_at, valid_from, valid_to \
                     FROM coupons WHERE coupon_id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(p)
                .await?;
            }
            Db::Sqlite(p) => {
                for part in ids.chunks(SQLITE_IDS_PER_SELECT) {
                    let mut q = QueryBuilder::new(
                        "SELECT coupon_id, user_id, request_id, claimed_at, valid_from, \
                         valid_to FROM coupons WHERE coupon_id IN (",
                    );
                    let mut list = q.separated(", ");
                    for id in part {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    let full = part.len() == SQLITE_IDS_PER_SELECT;
                    stored.extend(
                        q.build_query_as::<StoredClaimRow>()
                            .persistent(full)
                            .fetch_all(p)
                            .await?,
                    );
                }
            }
        }
        let stored: std::collections::HashMap<String, StoredClaim> = stored
            .into_iter()
            .map(
                |(id, user_id, request_id, claimed_at, valid_from, valid_to)| {
                    let claim = StoredClaim {
                        user_id,
                        request_id,
                        claimed_at,
                        valid_from,
                        valid_to,
                    };
                    (id, claim)
                },
            )
            .collect();
        let mut recorded = Vec::new();
        for c in claims {
            let Some(s) = stored.get(&c.coupon_id) else {
                continue;
            };
            if *s == StoredClaim::of(c) {
                continue; // the same claim delivered again
            }
            let conflict = CouponConflict {
                coupon_id: c.coupon_id.clone(),
                batch_id: c.batch_id.clone(),
                shard: c.shard,
                stored_user_id: s.user_id.clone(),
                stored_request_id: s.request_id.clone(),
                stored_claimed_at: s.claimed_at,
                user_id: c.user_id.clone(),
                request_id: c.request_id.clone(),
                claimed_at: c.claimed_at,
                valid_from: c.valid_from,
                valid_to: c.valid_to,
                detected_at: now,
            };
            let n = on_pool!(self, p => {
                sqlx::query(INSERT_CONFLICT)
                    .bind(conflict.key())
                    .bind(&conflict.coupon_id)
                    .bind(&conflict.batch_id)
                    .bind(i64::from(conflict.shard))
                    .bind(&conflict.stored_user_id)
                    .bind(conflict.stored_request_id.as_deref())
                    .bind(conflict.stored_claimed_at)
                    .bind(&conflict.user_id)
                    .bind(conflict.request_id.as_deref())
                    .bind(conflict.claimed_at)
                    .bind(conflict.valid_from)
                    .bind(conflict.valid_to)
                    .bind(now)
                    .execute(p)
                    .await?
                    .rows_affected()
            });
            if n == 1 {
                recorded.push(conflict);
            }
        }
        Ok(recorded)
    }

    /// SQLite: multi-row VALUES, chunked to stay under SQLite's bound-variable limit.
    /// Returns (claimed events inserted, coupon rows inserted).
    async fn write_claims_sqlite(
        &self,
        rows: &[(&ClaimRecord, i64)],
        now: i64,
    ) -> Result<(u64, u64), DbError> {
        let chunk = SQLITE_ROWS_PER_INSERT;
        let mut inserted = 0;
        let mut coupons = 0;
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for part in rows.chunks(chunk) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO coupon_events (event_id, kind, batch_id, shard, user_id, \
                     coupon_id, request_id, at, recorded_at) ",
                );
                q.push_values(part, |mut b, (c, _)| {
                    b.push_bind(claim_event_id(c))
                        .push_bind(EventKind::Claimed.as_str())
                        .push_bind(c.batch_id.as_str())
                        .push_bind(i64::from(c.shard))
                        .push_bind(c.user_id.as_str())
                        .push_bind(c.coupon_id.as_str())
                        .push_bind(c.request_id.as_deref())
                        .push_bind(c.claimed_at)
                        .push_bind(now);
                });
                q.push(" ON CONFLICT (event_id) DO NOTHING");
                let full = part.len() == chunk;
                inserted += q.build().persistent(full).execute(&mut *tx).await?.rows_affected();

                let mut q = QueryBuilder::new(
                    "INSERT INTO coupons (coupon_id, batch_id, shard, seq, user_id, request_id, \
                     state, valid_from, valid_to, claimed_at, updated_at, code, managed) ",
                );
                q.push_values(part, |mut b, (c, seq)| {
                    b.push_bind(c.coupon_id.as_str())
                        .push_bind(c.batch_id.as_str())
                        .push_bind(i64::from(c.shard))
                        .push_bind(*seq)
                        .push_bind(c.user_id.as_str())
                        .push_bind(c.request_id.as_deref())
                        .push_bind(CouponState::Unused.as_str())
                        .push_bind(c.valid_from)
                        .push_bind(c.valid_to)
                        .push_bind(c.claimed_at)
                        .push_bind(now)
                        .push_bind(c.code.as_deref())
                        .push_bind(i16::from(c.managed));
                });
                q.push(" ON CONFLICT (coupon_id) DO NOTHING RETURNING coupon_id");
                let new: Vec<String> = q
                    .build_query_scalar()
                    .persistent(full)
                    .fetch_all(&mut *tx)
                    .await?;
                coupons += new.len() as u64;
                // The outbox rows of the claims that got their coupon row now, in one
                // multi-row statement (not one statement per claim).
                let outbox = claimed_outbox(part, &new)?;
                if !outbox.is_empty() {
                    let mut q = QueryBuilder::new(
                        "INSERT INTO event_outbox (event_id, kind, coupon_id, payload, \
                         created_at, next_attempt_at) ",
                    );
                    q.push_values(&outbox, |mut b, (id, coupon_id, body)| {
                        b.push_bind(id.as_str())
                            .push_bind(EventKind::Claimed.as_str())
                            .push_bind(coupon_id.as_str())
                            .push_bind(body.as_str())
                            .push_bind(now)
                            .push_bind(now);
                    });
                    q.push(" ON CONFLICT (event_id) DO NOTHING");
                    let full = outbox.len() == chunk;
                    q.build().persistent(full).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
        });
        Ok((inserted, coupons))
    }

    /// Per shard of `batch_id`: how many coupons the database holds and the highest sequence.
    pub async fn claims_summary(&self, batch_id: &str) -> Result<Vec<ShardClaims>, DbError> {
        let rows: Vec<(i64, i64, Option<i64>)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT shard, COUNT(*), MAX(seq) FROM coupons WHERE batch_id = $1 \
                 GROUP BY shard ORDER BY shard",
            )
            .bind(batch_id)
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(|(shard, count, max)| {
                Ok(ShardClaims {
                    shard: to_u32(shard, "shard")?,
                    count: to_u64(count, "count")?,
                    max_seq: to_u64(max.unwrap_or(0), "seq")?,
                })
            })
            .collect()
    }

    /// Every claim of one shard of a batch, by sequence (what a rebuild restores).
    pub async fn claims_of_shard(
        &self,
        batch_id: &str,
        shard: u32,
    ) -> Result<Vec<ClaimRecord>, DbError> {
        type Row = (
            String,
            i64,
            String,
            Option<String>,
            i64,
            i64,
            i64,
            Option<String>,
            i16,
        );
        let rows: Vec<Row> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT coupon_id, seq, user_id, request_id, claimed_at, valid_from, valid_to, \
                 code, managed FROM coupons WHERE batch_id = $1 AND shard = $2 ORDER BY seq",
            )
            .bind(batch_id)
            .bind(i64::from(shard))
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(
                |(coupon_id, seq, user_id, request_id, claimed_at, vf, vt, code, managed)| {
                    Ok(ClaimRecord {
                        coupon_id,
                        batch_id: batch_id.to_string(),
                        shard,
                        seq: to_u64(seq, "seq")?,
                        user_id,
                        request_id,
                        claimed_at,
                        valid_from: vf,
                        valid_to: vt,
                        code,
                        managed: managed != 0,
                    })
                },
            )
            .collect()
    }

    /// Number of coupon rows and of `claimed` events of a batch (equal when healthy).
    pub async fn claim_counts(&self, batch_id: &str) -> Result<(u64, u64), DbError> {
        let (coupons, events): (i64, i64) = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM coupons WHERE batch_id = $1), \
                 (SELECT COUNT(*) FROM coupon_events WHERE batch_id = $1 AND kind = 'claimed')",
            )
            .bind(batch_id)
            .fetch_one(p)
            .await?
        });
        Ok((to_u64(coupons, "count")?, to_u64(events, "count")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseConfig;
    use crate::store::CouponState;
    use crate::store::memory_db;

    fn record(seq: u64, user: &str) -> ClaimRecord {
        ClaimRecord {
            coupon_id: format!("b.0.{seq}"),
            batch_id: "b".into(),
            shard: 0,
            seq,
            user_id: user.into(),
            request_id: seq.is_multiple_of(2).then(|| format!("r{seq}")),
            claimed_at: 1,
            valid_from: 0,
            valid_to: i64::MAX,
            code: None,
            managed: false,
        }
    }

    #[tokio::test]
    async fn claims_are_written_once_in_chunks() {
        let cfg = DatabaseConfig {
            url: "sqlite::memory:".into(),
            ..Default::default()
        };
        let db = Db::connect(&cfg).await.unwrap();
        db.migrate().await.unwrap();
        db.migrate().await.unwrap();
        // More rows than one SQLite statement takes, with a duplicate inside the batch.
        let mut claims: Vec<ClaimRecord> = (1..=250).map(|i| record(i, "u1")).collect();
        claims.push(record(7, "u1"));
        assert_eq!(db.write_claims(&claims).await.unwrap(), 250);
        assert_eq!(db.write_claims(&claims[..10]).await.unwrap(), 0);
        assert_eq!(db.claim_counts("b").await.unwrap(), (250, 250));
        let summary = db.claims_summary("b").await.unwrap();
        assert_eq!(
            summary,
            [ShardClaims {
                shard: 0,
                count: 250,
                max_seq: 250
            }]
        );
        let (page, next) = db
            .user_coupons("u1", Some(CouponState::Unused), 100, None)
            .await
            .unwrap();
        assert_eq!(page.len(), 100);
        let (rest, none) = db
            .user_coupons("u1", Some(CouponState::Unused), 500, next.as_deref())
            .await
            .unwrap();
        assert_eq!((rest.len(), none), (150, None));
        assert!(
            db.user_coupons("u1", Some(CouponState::Used), 10, None)
                .await
                .unwrap()
                .0
                .is_empty()
        );
        assert_eq!(db.claims_of_shard("b", 0).await.unwrap().len(), 250);
    }

    #[tokio::test]
    async fn a_coupon_id_met_with_another_claim_is_recorded_once() {
        let db = memory_db().await;
        let first = record(1, "u1");
        let w = db
            .write_claims_report(&[first.clone(), record(2, "u2")])
            .await
            .unwrap();
        assert_eq!((w.inserted, w.conflicts.len()), (2, 0));
        assert!(db.has_claims("b").await.unwrap());
        assert!(!db.has_claims("other").await.unwrap());
        // the same claims again: harmless, no conflict
        let w = db
            .write_claims_report(std::slice::from_ref(&first))
            .await
            .unwrap();
        assert_eq!(w, ClaimsWritten::default());
        // b.0.1 minted again for u9; b.0.3 is new, with a conflicting twin in the same batch
        let mut again = record(1, "u9");
        again.claimed_at = 77;
        let mut twin = record(3, "u4");
        twin.user_id = "u5".into();
        let w = db
            .write_claims_report(&[again.clone(), record(3, "u4"), twin])
            .await
            .unwrap();
        assert_eq!(w.inserted, 1);
        let got: Vec<(&str, &str, &str)> = w
            .conflicts
            .iter()
            .map(|c| {
                (
                    c.coupon_id.as_str(),
                    c.stored_user_id.as_str(),
                    c.user_id.as_str(),
                )
            })
            .collect();
        assert_eq!(got, [("b.0.1", "u1", "u9"), ("b.0.3", "u4", "u5")]);
        assert_eq!(w.conflicts[0].claimed_at, 77);
        // redelivered: recorded once
        let w = db.write_claims_report(&[again]).await.unwrap();
        assert_eq!(w, ClaimsWritten::default());
        let stored = db.coupon_conflicts("b").await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(stored[0].stored_user_id, "u1");
        assert_eq!(db.get_coupon("b.0.1").await.unwrap().unwrap().user_id, "u1");
    }
}
