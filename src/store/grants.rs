//! The `grant_jobs` and `grant_job_users` tables: bulk grant jobs, their spooled users and
//! their cursor.
//!
//! Invariants kept here:
//! - a job's counts and its cursor (`next_chunk`) change in ONE statement, only from the
//!   cursor the counts were computed at, and only by the instance holding the job's lease:
//!   a chunk is counted once however often it is run (a crash between running a chunk and
//!   counting it re-runs the chunk, and the claim script replays its grants);
//! - only a `running` job is ever leased or counted; `receiving` (its upload under way)
//!   and the final states (`done`, `failed`) are never run;
//! - a job's spooled users never change once written, and are deleted with the job's end.

use super::{Db, DbError, to_u64};

/// A job's state as stored. The API shows `running`, `done` and `failed`; `receiving` is an
/// upload under way (not yet a job anyone was told about).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Receiving,
    Running,
    Done,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Receiving => "receiving",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<JobState, DbError> {
        Ok(match s {
            "receiving" => JobState::Receiving,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "failed" => JobState::Failed,
            other => return Err(DbError::Corrupt(format!("grant job state {other:?}"))),
        })
    }
}

/// The users of one job decided so far, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrantCounts {
    pub granted: u64,
    pub skipped_limit: u64,
    pub skipped_sold_out: u64,
    pub failed: u64,
}

impl GrantCounts {
    pub fn sum(&self) -> u64 {
        self.granted + self.skipped_limit + self.skipped_sold_out + self.failed
    }

    pub fn add(&mut self, o: &GrantCounts) {
        self.granted += o.granted;
        self.skipped_limit += o.skipped_limit;
        self.skipped_sold_out += o.skipped_sold_out;
        self.failed += o.failed;
    }
}

/// One job row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantJobRow {
    pub id: String,
    pub batch_id: String,
    pub state: JobState,
    /// Chunks spooled.
    pub chunks: u64,
    /// Lines received (valid users and invalid lines).
    pub total: u64,
    /// The cursor: chunks below it are decided and counted.
    pub next_chunk: u64,
    pub counts: GrantCounts,
    /// The first failure reasons, as the JSON array the job keeps.
    pub errors: String,
    /// Why a failed job stopped.
    pub reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

type Row = (
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    String,
    Option<String>,
    i64,
    i64,
);

const JOB: &str = "SELECT id, batch_id, state, chunks, total, next_chunk, granted, \
     skipped_limit, skipped_sold_out, failed, errors, reason, created_at, updated_at \
     FROM grant_jobs WHERE id = $1";

fn job_row(r: Row) -> Result<GrantJobRow, DbError> {
    Ok(GrantJobRow {
        id: r.0,
        batch_id: r.1,
        state: JobState::parse(&r.2)?,
        chunks: to_u64(r.3, "grant job chunks")?,
        total: to_u64(r.4, "grant job total")?,
        next_chunk: to_u64(r.5, "grant job cursor")?,
        counts: GrantCounts {
            granted: to_u64(r.6, "granted")?,
            skipped_limit: to_u64(r.7, "skipped_limit")?,
            skipped_sold_out: to_u64(r.8, "skipped_sold_out")?,
            failed: to_u64(r.9, "failed")?,
        },
        errors: r.10,
        reason: r.11,
        created_at: r.12,
        updated_at: r.13,
    })
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What an upload leaves on its job when it ends: the chunks and lines it spooled, and the
/// invalid lines (counted `failed`) with the first reasons.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub chunks: u64,
    pub total: u64,
    pub failed: u64,
    pub errors: String,
}

impl Db {
    /// A new job, `receiving` its upload.
    pub async fn insert_grant_job(&self, id: &str, batch: &str, now: i64) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query(
                "INSERT INTO grant_jobs (id, batch_id, state, created_at, updated_at) \
                 VALUES ($1, $2, 'receiving', $3, $3)",
            )
            .bind(id)
            .bind(batch)
            .bind(now)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Spools chunk `chunk` of a receiving job (its users, one per line). Idempotent.
    pub async fn spool_grant_chunk(
        &self,
        id: &str,
        chunk: u64,
        users: &str,
        now: i64,
    ) -> Result<(), DbError> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(
                "INSERT INTO grant_job_users (job_id, chunk, users) VALUES ($1, $2, $3) \
                 ON CONFLICT (job_id, chunk) DO NOTHING",
            )
            .bind(id)
            .bind(i(chunk))
            .bind(users)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE grant_jobs SET updated_at = $2 WHERE id = $1")
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The upload is complete: the job becomes `running` (free for any instance to lease).
    /// Returns false when the job was not receiving (a stale upload already failed).
    pub async fn open_grant_job(&self, id: &str, s: &Spooled, now: i64) -> Result<bool, DbError> {
        let n = on_pool!(self, p => {
            sqlx::query(
                "UPDATE grant_jobs SET state = 'running', chunks = $2, total = $3, failed = $4, \
                 errors = $5, updated_at = $6, lease_until = 0 \
                 WHERE id = $1 AND state = 'receiving'",
            )
            .bind(id)
            .bind(i(s.chunks))
            .bind(i(s.total))
            .bind(i(s.failed))
            .bind(&s.errors)
            .bind(now)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Removes a job and its users (an upload that was refused or broke off).
    pub async fn drop_grant_job(&self, id: &str) -> Result<(), DbError> {
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query("DELETE FROM grant_job_users WHERE job_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM grant_jobs WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The batches with a grant job receiving or running: they can receive claim records
    /// whatever their window says, so the persister keeps reading them.
    pub async fn granting_batches(&self) -> Result<Vec<String>, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query_scalar(
                "SELECT DISTINCT batch_id FROM grant_jobs \
                 WHERE state IN ('receiving', 'running') ORDER BY batch_id",
            )
            .fetch_all(p)
            .await?
        }))
    }

    /// One job.
    pub async fn grant_job(&self, id: &str) -> Result<Option<GrantJobRow>, DbError> {
        let row: Option<Row> = on_pool!(self, p => {
            sqlx::query_as(JOB).bind(id).fetch_optional(p).await?
        });
        row.map(job_row).transpose()
    }

    /// Takes (or renews) the lease of a running job for `owner` until `until`: only when
    /// nobody else holds it (its lease ran out, or it is already `owner`'s).
    pub async fn lease_grant_job(
        &self,
        id: &str,
        owner: &str,
        until: i64,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = on_pool!(self, p => {
            sqlx::query(
                "UPDATE grant_jobs SET lease_owner = $2, lease_until = $3 \
                 WHERE id = $1 AND state = 'running' \
                 AND (lease_until < $4 OR lease_owner = $2)",
            )
            .bind(id)
            .bind(owner)
            .bind(until)
            .bind(now)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Gives up `owner`'s lease at once (a stopping instance): another may resume the job.
    pub async fn release_grant_job(&self, id: &str, owner: &str) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query(
                "UPDATE grant_jobs SET lease_until = 0 WHERE id = $1 AND lease_owner = $2 \
                 AND state = 'running'",
            )
            .bind(id)
            .bind(owner)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Running jobs nobody holds (their lease ran out), oldest first, at most `limit`.
    pub async fn orphaned_grant_jobs(&self, now: i64, limit: i64) -> Result<Vec<String>, DbError> {
        let ids: Vec<(String,)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id FROM grant_jobs WHERE state = 'running' AND lease_until < $1 \
                 ORDER BY created_at, id LIMIT $2",
            )
            .bind(now)
            .bind(limit)
            .fetch_all(p)
            .await?
        });
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// The users of one chunk, in upload order.
    pub async fn grant_chunk(&self, id: &str, chunk: u64) -> Result<Option<String>, DbError> {
        let row: Option<(String,)> = on_pool!(self, p => {
            sqlx::query_as("SELECT users FROM grant_job_users WHERE job_id = $1 AND chunk = $2")
                .bind(id)
                .bind(i(chunk))
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(|(u,)| u))
    }

    /// Counts chunk `chunk` and moves the cursor past it, renewing the lease: only if
    /// `owner` holds the job and the cursor is still at `chunk`. Returns whether it did
    /// (false: the lease was lost; the chunk is another instance's now).
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_grant_chunk(
        &self,
        id: &str,
        owner: &str,
        chunk: u64,
        counts: &GrantCounts,
        errors: &str,
        until: i64,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = on_pool!(self, p => {
            sqlx::query(
                "UPDATE grant_jobs SET next_chunk = next_chunk + 1, \
                 granted = granted + $4, skipped_limit = skipped_limit + $5, \
                 skipped_sold_out = skipped_sold_out + $6, failed = failed + $7, \
                 errors = $8, lease_until = $9, updated_at = $10 \
                 WHERE id = $1 AND lease_owner = $2 AND next_chunk = $3 \
                 AND state = 'running'",
            )
            .bind(id)
            .bind(owner)
            .bind(i(chunk))
            .bind(i(counts.granted))
            .bind(i(counts.skipped_limit))
            .bind(i(counts.skipped_sold_out))
            .bind(i(counts.failed))
            .bind(errors)
            .bind(until)
            .bind(now)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// Ends a running job `owner` holds (`done`, or `failed` with `reason`) and deletes its
    /// spooled users, in one transaction. Returns whether it did.
    pub async fn finish_grant_job(
        &self,
        id: &str,
        owner: &str,
        state: JobState,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let n = sqlx::query(
                "UPDATE grant_jobs SET state = $3, reason = $4, updated_at = $5, \
                 lease_owner = NULL, lease_until = 0 \
                 WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
            )
            .bind(id)
            .bind(owner)
            .bind(state.as_str())
            .bind(reason)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                sqlx::query("DELETE FROM grant_job_users WHERE job_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            n
        });
        Ok(n == 1)
    }

    /// Uploads that stopped arriving before `before` (their gateway died mid-upload: nobody
    /// was told the job id) become `failed`, and their users are deleted. Returns how many.
    pub async fn fail_stale_uploads(&self, before: i64, now: i64) -> Result<u64, DbError> {
        let n = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let n = sqlx::query(
                "UPDATE grant_jobs SET state = 'failed', reason = 'upload interrupted', \
                 updated_at = $2 WHERE state = 'receiving' AND updated_at < $1",
            )
            .bind(before)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                sqlx::query(
                    "DELETE FROM grant_job_users WHERE job_id IN \
                     (SELECT id FROM grant_jobs WHERE state = 'failed')",
                )
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            n
        });
        Ok(n)
    }
}
