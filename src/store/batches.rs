//! The `batches` table: the arbiter of a batch's definition.
//!
//! Invariant kept here: a row is inserted only if absent (the first create wins), changed
//! only by a compare-and-set on its `version`, and records whether the batch's Redis setup
//! ever completed (`setup_done_at`).

use super::{Db, DbError, now_ms, to_i64, to_u64};
use crate::domain::batch::{Batch, BatchState};

/// A batch as the database holds it: the definition (the arbiter of what the batch is), its
/// version (bumped by every change) and whether its Redis setup ever completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub batch: Batch,
    pub version: i64,
    pub setup_done: bool,
    /// When its retirement began (ms), if it did (`recovery::retire`): its Redis keys are
    /// being dropped or gone, and the database is its record. Final.
    pub retired_at: Option<i64>,
}

impl StoredBatch {
    /// Retired: see [`StoredBatch::retired_at`].
    pub fn retired(&self) -> bool {
        self.retired_at.is_some()
    }
}

type BatchRow = (String, String, i64, Option<i64>, Option<i64>);

const UPSERT_BATCH: &str = "INSERT INTO batches \
     (id, definition, shards, stock, state, created_at, updated_at, version, setup_done_at, \
     timezone, budget) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $7, $8, $9) \
     ON CONFLICT (id) DO UPDATE SET definition = excluded.definition, \
     shards = excluded.shards, stock = excluded.stock, state = excluded.state, \
     timezone = excluded.timezone, budget = excluded.budget, \
     updated_at = excluded.updated_at, version = batches.version + 1, \
     setup_done_at = COALESCE(batches.setup_done_at, excluded.setup_done_at)";

/// The first create of an id wins; later ones change nothing (and read the winner back).
const INSERT_BATCH: &str = "INSERT INTO batches \
     (id, definition, shards, stock, state, created_at, updated_at, version, setup_done_at, \
     timezone, budget) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, NULL, $8, $9) ON CONFLICT (id) DO NOTHING";

/// A change of the definition: applied only on top of the version it was computed from.
const UPDATE_BATCH: &str = "UPDATE batches SET definition = $2, shards = $3, stock = $4, \
     state = $5, updated_at = $6, version = $7, timezone = $9, budget = $10 \
     WHERE id = $1 AND version = $8 AND retired_at IS NULL";

/// What the persister follows of every batch: any change of these can make a batch receive
/// claim records again (a patch bumps `version` and `updated_at`, a rebuild or repair bumps
/// `epoch`, a re-create after a delete is a new `updated_at` and `setup_done_at`).
/// A batch whose retirement completed has no Redis keys left to read: not followed.
const BATCH_MARKS: &str = "SELECT id, shards, version, epoch, updated_at, setup_done_at \
     FROM batches WHERE retire_done_at IS NULL ORDER BY id";

const BATCH_ROW: &str =
    "SELECT id, definition, version, setup_done_at, retired_at FROM batches WHERE id = $1";

/// A page of the admin listing: set-up batches after `$1` (exclusive) by id, at most `$2`;
/// keyset pagination on the primary key, so rows inserted meanwhile never shift a page.
const LIST_PAGE: &str = "SELECT id, definition, version, setup_done_at, retired_at FROM batches \
     WHERE setup_done_at IS NOT NULL AND id > $1 ORDER BY id LIMIT $2";
/// The same, in one state (`$3`).
const LIST_PAGE_STATE: &str = "SELECT id, definition, version, setup_done_at, retired_at \
     FROM batches \
     WHERE setup_done_at IS NOT NULL AND id > $1 AND state = $3 ORDER BY id LIMIT $2";

/// A batch as the persister follows it, without its definition (cheap to read often).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMark {
    pub id: String,
    pub shards: u32,
    pub version: i64,
    pub epoch: i64,
    pub updated_at: i64,
    pub setup_done_at: Option<i64>,
}

impl Db {
    /// Inserts the batch (recorded as set up), or replaces its definition if it exists
    /// (bumping its version). For tools and tests that set a batch up in Redis by hand; the
    /// API creates with [`Db::insert_batch`] and changes with [`Db::update_batch`].
    pub async fn upsert_batch(&self, batch: &Batch) -> Result<(), DbError> {
        let def = serde_json::to_string(batch)
            .map_err(|e| DbError::Corrupt(format!("batch {} does not serialize: {e}", batch.id)))?;
        let now = now_ms();
        on_pool!(self, p => {
            sqlx::query(UPSERT_BATCH)
                .bind(&batch.id)
                .bind(&def)
                .bind(i64::from(batch.shards))
                .bind(batch.stock)
                .bind(batch.state.as_str())
                .bind(batch.created_at.0)
                .bind(now)
                .bind(batch.timezone.as_deref().unwrap_or("UTC"))
                .bind(batch.budget)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Inserts the batch at version 1, not yet set up, unless the id exists; then reads the
    /// row back. Returns the stored batch (the winner of concurrent creates: compare its
    /// fingerprint) and whether this call inserted it.
    pub async fn insert_batch(&self, batch: &Batch) -> Result<(StoredBatch, bool), DbError> {
        let def = serde_json::to_string(batch)
            .map_err(|e| DbError::Corrupt(format!("batch {} does not serialize: {e}", batch.id)))?;
        let now = now_ms();
        let inserted = on_pool!(self, p => {
            sqlx::query(INSERT_BATCH)
                .bind(&batch.id)
                .bind(&def)
                .bind(i64::from(batch.shards))
                .bind(batch.stock)
                .bind(batch.state.as_str())
                .bind(batch.created_at.0)
                .bind(now)
                .bind(batch.timezone.as_deref().unwrap_or("UTC"))
                .bind(batch.budget)
                .execute(p)
                .await?
                .rows_affected()
        });
        let stored = self.batch_row(&batch.id).await?.ok_or_else(|| {
            DbError::Corrupt(format!(
                "batch {} vanished right after its insert",
                batch.id
            ))
        })?;
        Ok((stored, inserted == 1))
    }

    /// The batch with its version and setup state.
    pub async fn batch_row(&self, id: &str) -> Result<Option<StoredBatch>, DbError> {
        let row: Option<BatchRow> = on_pool!(self, p => {
            sqlx::query_as(BATCH_ROW).bind(id).fetch_optional(p).await?
        });
        row.map(stored_batch).transpose()
    }

    /// Every batch with its version and setup state, by id.
    pub async fn batch_rows(&self) -> Result<Vec<StoredBatch>, DbError> {
        let rows: Vec<BatchRow> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, definition, version, setup_done_at, retired_at FROM batches \
                 ORDER BY id",
            )
            .fetch_all(p)
            .await?
        });
        rows.into_iter().map(stored_batch).collect()
    }

    /// (id, version) of every batch whose setup completed: what the periodic check compares
    /// with the versions Redis holds.
    pub async fn batch_versions(&self) -> Result<Vec<(String, i64)>, DbError> {
        Ok(on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, version FROM batches WHERE setup_done_at IS NOT NULL \
                 AND retired_at IS NULL ORDER BY id",
            )
            .fetch_all(p)
            .await?
        }))
    }

    /// Records that the batch's Redis setup completed (keeps the first time).
    pub async fn mark_setup_done(&self, id: &str) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query(
                "UPDATE batches SET setup_done_at = COALESCE(setup_done_at, $2) WHERE id = $1",
            )
            .bind(id)
            .bind(now_ms())
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Moves the batch to a new coupon-id epoch, at least `at_least`, and returns it. Called
    /// (and committed) before a rebuild writes anything to Redis: ids minted by the Redis
    /// state being replaced, lost ones included, all lie in older epochs.
    pub async fn bump_epoch(&self, id: &str, at_least: u64) -> Result<u64, DbError> {
        let at_least = to_i64(at_least, "epoch")?;
        let epoch: Option<i64> = on_pool!(self, p => {
            sqlx::query_scalar(
                "UPDATE batches SET epoch = CASE WHEN epoch + 1 > $2 THEN epoch + 1 ELSE $2 END \
                 WHERE id = $1 RETURNING epoch",
            )
            .bind(id)
            .bind(at_least)
            .fetch_optional(p)
            .await?
        });
        let epoch = epoch.ok_or_else(|| DbError::Corrupt(format!("batch {id} has no row")))?;
        to_u64(epoch, "epoch")
    }

    /// The batch's current coupon-id epoch (0 until its first rebuild).
    pub async fn epoch(&self, id: &str) -> Result<Option<u64>, DbError> {
        let epoch: Option<i64> = on_pool!(self, p => {
            sqlx::query_scalar("SELECT epoch FROM batches WHERE id = $1")
                .bind(id)
                .fetch_optional(p)
                .await?
        });
        epoch.map(|e| to_u64(e, "epoch")).transpose()
    }

    /// Removes a batch whose setup never completed (its create lost to a different batch
    /// Redis already holds under the id). Returns whether a row was removed.
    pub async fn delete_unset_batch(&self, id: &str) -> Result<bool, DbError> {
        let n = on_pool!(self, p => {
            sqlx::query("DELETE FROM batches WHERE id = $1 AND setup_done_at IS NULL")
                .bind(id)
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(n == 1)
    }

    /// Replaces the definition if the row is still at `expected` (compare-and-set), giving it
    /// version `new_version` (> `expected`). Returns whether it was applied; `false` means a
    /// concurrent change won: re-read and retry.
    pub async fn update_batch(
        &self,
        batch: &Batch,
        expected: i64,
        new_version: i64,
    ) -> Result<bool, DbError> {
        let def = serde_json::to_string(batch)
            .map_err(|e| DbError::Corrupt(format!("batch {} does not serialize: {e}", batch.id)))?;
        let n = on_pool!(self, p => {
            sqlx::query(UPDATE_BATCH)
                .bind(&batch.id)
                .bind(&def)
                .bind(i64::from(batch.shards))
                .bind(batch.stock)
                .bind(batch.state.as_str())
                .bind(now_ms())
                .bind(new_version)
                .bind(expected)
                .bind(batch.timezone.as_deref().unwrap_or("UTC"))
                .bind(batch.budget)
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(n == 1)
    }

    pub async fn get_batch(&self, id: &str) -> Result<Option<Batch>, DbError> {
        let def: Option<String> = on_pool!(self, p => {
            sqlx::query_scalar("SELECT definition FROM batches WHERE id = $1")
                .bind(id)
                .fetch_optional(p)
                .await?
        });
        def.map(|d| parse_batch(id, &d)).transpose()
    }

    /// At most `limit` set-up batches whose id is after `after` (exclusive; `None`: from the
    /// start), by id, in `state` if given. Keyset pagination: a page never repeats or skips
    /// a batch that existed when the listing began, whatever is inserted meanwhile.
    pub async fn batches_after(
        &self,
        after: Option<&str>,
        state: Option<BatchState>,
        limit: u32,
    ) -> Result<Vec<StoredBatch>, DbError> {
        let rows: Vec<BatchRow> = on_pool!(self, p => {
            let q = sqlx::query_as(if state.is_some() { LIST_PAGE_STATE } else { LIST_PAGE })
                .bind(after.unwrap_or(""))
                .bind(i64::from(limit));
            match state {
                Some(st) => q.bind(st.as_str()).fetch_all(p).await?,
                None => q.fetch_all(p).await?,
            }
        });
        rows.into_iter().map(stored_batch).collect()
    }

    /// Every batch's [`BatchMark`], by id: what the persister compares on each refresh, so
    /// only batches new or changed have their definition read.
    pub async fn batch_marks(&self) -> Result<Vec<BatchMark>, DbError> {
        type Row = (String, i64, i64, i64, i64, Option<i64>);
        let rows: Vec<Row> = on_pool!(self, p => {
            sqlx::query_as(BATCH_MARKS).fetch_all(p).await?
        });
        rows.into_iter()
            .map(|(id, shards, version, epoch, updated_at, setup_done_at)| {
                Ok(BatchMark {
                    shards: super::to_u32(shards, "shards")?,
                    id,
                    version,
                    epoch,
                    updated_at,
                    setup_done_at,
                })
            })
            .collect()
    }

    /// Begins the retirement of a batch (`recovery::retire`), if it is still at `version`
    /// (a change that reopened its window since wins) and not retired. Returns whether this
    /// call began it. From then on no change of its definition applies.
    pub async fn begin_retirement(
        &self,
        id: &str,
        version: i64,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = on_pool!(self, p => {
            sqlx::query(
                "UPDATE batches SET retired_at = $3 WHERE id = $1 AND version = $2 \
                 AND retired_at IS NULL AND setup_done_at IS NOT NULL",
            )
            .bind(id)
            .bind(version)
            .bind(now)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(n == 1)
    }

    /// (id, shards) of every batch whose retirement began and has not completed.
    pub async fn retiring(&self) -> Result<Vec<(String, u32)>, DbError> {
        let rows: Vec<(String, i64)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, shards FROM batches WHERE retired_at IS NOT NULL \
                 AND retire_done_at IS NULL ORDER BY id",
            )
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(|(id, shards)| Ok((id, super::to_u32(shards, "shards")?)))
            .collect()
    }

    /// Records that every Redis key of the retired batch is gone (keeps the first time).
    pub async fn finish_retirement(&self, id: &str, now: i64) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query(
                "UPDATE batches SET retire_done_at = COALESCE(retire_done_at, $2) \
                 WHERE id = $1 AND retired_at IS NOT NULL",
            )
            .bind(id)
            .bind(now)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Every batch, by id.
    pub async fn list_batches(&self) -> Result<Vec<Batch>, DbError> {
        let rows: Vec<(String, String)> = on_pool!(self, p => {
            sqlx::query_as("SELECT id, definition FROM batches ORDER BY id")
                .fetch_all(p)
                .await?
        });
        rows.iter().map(|(id, d)| parse_batch(id, d)).collect()
    }
}

fn stored_batch(
    (id, def, version, setup_done_at, retired_at): BatchRow,
) -> Result<StoredBatch, DbError> {
    Ok(StoredBatch {
        batch: parse_batch(&id, &def)?,
        version,
        setup_done: setup_done_at.is_some(),
        retired_at,
    })
}

fn parse_batch(id: &str, def: &str) -> Result<Batch, DbError> {
    serde_json::from_str(def)
        .map_err(|e| DbError::Corrupt(format!("definition of batch {id} does not parse: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory_db;

    fn a_batch(id: &str, stock: i64) -> Batch {
        use crate::domain::batch::*;
        Batch {
            id: id.into(),
            name: "n".into(),
            stock,
            per_user_limit: 1,
            per_user_daily_limit: None,
            claim_window: Window {
                start: Timestamp(0),
                end: Timestamp(1_000),
            },
            validity: Validity::Relative {
                days_after_claim: 1,
            },
            discount: Discount::Fixed { amount: 1 },
            scope: Scope {
                kind: ScopeKind::All,
                ids: vec![],
            },
            exclusive: false,
            eligibility: Eligibility::default(),
            shards: 2,
            state: BatchState::Active,
            created_at: Timestamp(5),
            ack: None,
            timezone: None,
            budget: None,
            codes: None,
        }
    }

    #[tokio::test]
    async fn epochs_only_grow() {
        let db = memory_db().await;
        db.insert_batch(&a_batch("b", 10)).await.unwrap();
        assert_eq!(db.epoch("b").await.unwrap(), Some(0));
        assert_eq!(db.bump_epoch("b", 0).await.unwrap(), 1);
        assert_eq!(db.bump_epoch("b", 0).await.unwrap(), 2);
        assert_eq!(db.bump_epoch("b", 7).await.unwrap(), 7, "raised to a floor");
        assert_eq!(db.bump_epoch("b", 3).await.unwrap(), 8, "never lowered");
        assert_eq!(db.epoch("b").await.unwrap(), Some(8));
        assert_eq!(db.epoch("nope").await.unwrap(), None);
        assert!(db.bump_epoch("nope", 0).await.is_err());
    }

    #[tokio::test]
    async fn the_first_create_wins_and_changes_are_compare_and_set() {
        let db = memory_db().await;
        let (row, inserted) = db.insert_batch(&a_batch("b", 10)).await.unwrap();
        assert!(inserted);
        assert_eq!(
            (row.version, row.setup_done, row.batch.stock),
            (1, false, 10)
        );
        // a second, different create changes nothing and reads the winner back
        let (row2, inserted) = db.insert_batch(&a_batch("b", 99)).await.unwrap();
        assert!(!inserted);
        assert_eq!(row2, row);
        assert_eq!(db.batch_versions().await.unwrap(), vec![]);
        db.mark_setup_done("b").await.unwrap();
        assert!(!db.delete_unset_batch("b").await.unwrap(), "set up: kept");
        assert_eq!(db.batch_versions().await.unwrap(), vec![("b".into(), 1)]);
        let mut changed = row.batch.clone();
        changed.stock = 20;
        assert!(db.update_batch(&changed, 1, 2).await.unwrap());
        changed.stock = 30;
        assert!(
            !db.update_batch(&changed, 1, 2).await.unwrap(),
            "a change computed from version 1 loses once version 2 is stored"
        );
        let now = db.batch_row("b").await.unwrap().unwrap();
        assert_eq!(
            (now.version, now.setup_done, now.batch.stock),
            (2, true, 20)
        );
        assert!(db.batch_row("nope").await.unwrap().is_none());
        db.insert_batch(&a_batch("c", 1)).await.unwrap();
        assert!(db.delete_unset_batch("c").await.unwrap());
        assert_eq!(db.batch_rows().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn listing_pages_by_id_in_a_state_skipping_unset_batches() {
        let db = memory_db().await;
        for id in ["d", "a", "c", "b", "e"] {
            db.upsert_batch(&a_batch(id, 1)).await.unwrap();
        }
        db.insert_batch(&a_batch("bb", 1)).await.unwrap(); // being created: not listed
        let mut paused = a_batch("c", 1);
        paused.state = BatchState::Paused;
        db.upsert_batch(&paused).await.unwrap();
        let ids = |rows: Vec<StoredBatch>| rows.into_iter().map(|r| r.batch.id).collect::<Vec<_>>();
        assert_eq!(
            ids(db.batches_after(None, None, 2).await.unwrap()),
            ["a", "b"]
        );
        assert_eq!(
            ids(db.batches_after(Some("b"), None, 10).await.unwrap()),
            ["c", "d", "e"]
        );
        assert_eq!(
            ids(db
                .batches_after(None, Some(BatchState::Active), 10)
                .await
                .unwrap()),
            ["a", "b", "d", "e"]
        );
        assert_eq!(
            ids(db
                .batches_after(Some("a"), Some(BatchState::Paused), 10)
                .await
                .unwrap()),
            ["c"]
        );
        assert!(
            db.batches_after(Some("e"), None, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
