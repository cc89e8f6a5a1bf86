//! Persistence check: every coupon the gateway acknowledged must reach the database
//! (table `coupons`, column `coupon_id`) exactly once. Polls until all are there or the
//! drain timeout passes. PostgreSQL and SQLite, runtime queries only.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Row, SqlitePool};
use tokio::time::Instant;

use crate::verify::{Check, Verdict};

/// Name of the check in the verification output.
pub const CHECK_NAME: &str = "persisted exactly once";

/// Coupon ids per `IN (...)` query.
const CHUNK: usize = 500;

/// Pause between two polls of the database.
const POLL_EVERY: Duration = Duration::from_millis(500);

enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        if url.starts_with("sqlite:") {
            // Read-only: the checker must never create or change the gateway's database.
            let opts = SqliteConnectOptions::from_str(url)?.read_only(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            Ok(Self::Sqlite(pool))
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?;
            Ok(Self::Postgres(pool))
        }
    }

    /// Row counts of the given coupon ids (ids absent from the table are absent from the
    /// map), using indexed `IN` lookups.
    async fn counts_of(&self, ids: &[&str]) -> Result<HashMap<String, i64>, sqlx::Error> {
        let mut out = HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            let placeholders: Vec<String> = match self {
                Self::Postgres(_) => (1..=chunk.len()).map(|i| format!("${i}")).collect(),
                Self::Sqlite(_) => vec!["?".to_string(); chunk.len()],
            };
            // Only placeholders are interpolated; the ids themselves are bound.
            let sql = format!(
                "SELECT CAST(coupon_id AS TEXT), COUNT(*) FROM coupons \
                 WHERE coupon_id IN ({}) GROUP BY coupon_id",
                placeholders.join(",")
            );
            match self {
                Self::Postgres(pool) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    for row in q.fetch_all(pool).await? {
                        out.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
                    }
                }
                Self::Sqlite(pool) => {
                    let mut q = sqlx::query(AssertSqlSafe(sql));
                    for id in chunk {
                        q = q.bind(*id);
                    }
                    for row in q.fetch_all(pool).await? {
                        out.insert(row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Row counts of every coupon id in the table (fallback when the column's type does
    /// not compare with text parameters, e.g. a PostgreSQL `uuid`).
    async fn counts_all(&self) -> Result<HashMap<String, i64>, sqlx::Error> {
        const SQL: &str = "SELECT CAST(coupon_id AS TEXT) FROM coupons";
        let ids: Vec<String> = match self {
            Self::Postgres(pool) => sqlx::query(SQL)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?,
            Self::Sqlite(pool) => sqlx::query(SQL)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?,
        };
        let mut out = HashMap::new();
        for id in ids {
            *out.entry(id).or_default() += 1;
        }
        Ok(out)
    }

    async fn counts(&self, ids: &[&str]) -> Result<HashMap<String, i64>, sqlx::Error> {
        match self.counts_of(ids).await {
            Ok(c) => Ok(c),
            Err(sqlx::Error::Database(_)) => self.counts_all().await,
            Err(e) => Err(e),
        }
    }

    async fn close(self) {
        match self {
            Self::Postgres(p) => p.close().await,
            Self::Sqlite(p) => p.close().await,
        }
    }
}

/// Checks that each of `coupons` is in table `coupons` exactly once, waiting up to
/// `drain_timeout` for the persister to catch up.
pub async fn check_persisted(
    url: &str,
    coupons: &BTreeSet<String>,
    drain_timeout: Duration,
) -> Check {
    let started = Instant::now();
    let deadline = started + drain_timeout;
    let db = match Db::connect(url).await {
        Ok(db) => db,
        Err(e) => {
            return Check::new(
                CHECK_NAME,
                Verdict::Fail,
                format!("cannot open the database: {e}"),
            );
        }
    };
    let ids: Vec<&str> = coupons.iter().map(String::as_str).collect();
    let check = loop {
        let counts = match db.counts(&ids).await {
            Ok(c) => c,
            Err(e) => {
                break Check::new(
                    CHECK_NAME,
                    Verdict::Fail,
                    format!("querying table coupons failed: {e}"),
                );
            }
        };
        let missing: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !counts.contains_key(*id))
            .collect();
        let mut duplicated: Vec<(&str, i64)> = ids
            .iter()
            .filter_map(|id| counts.get(*id).filter(|&&n| n > 1).map(|&n| (*id, n)))
            .collect();
        duplicated.sort();
        let waited = started.elapsed().as_secs_f64();
        if !duplicated.is_empty() {
            break Check::new(
                CHECK_NAME,
                Verdict::Fail,
                format!(
                    "{} coupon ids stored more than once, e.g. {:?}",
                    duplicated.len(),
                    &duplicated[..duplicated.len().min(5)]
                ),
            );
        }
        if missing.is_empty() {
            break Check::new(
                CHECK_NAME,
                Verdict::Pass,
                format!(
                    "all {} acknowledged coupons in table coupons once (after {waited:.1} s)",
                    ids.len()
                ),
            );
        }
        if Instant::now() + POLL_EVERY > deadline {
            break Check::new(
                CHECK_NAME,
                Verdict::Fail,
                format!(
                    "{} of {} acknowledged coupons missing after {waited:.1} s, e.g. {:?}",
                    missing.len(),
                    ids.len(),
                    &missing[..missing.len().min(5)]
                ),
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    };
    db.close().await;
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDb(std::path::PathBuf);

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    async fn make_db(name: &str, rows: &[&str]) -> (TempDb, String) {
        let path = std::env::temp_dir().join(format!(
            "claimgate-loadtest-{name}-{}.db",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let url = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)
            .expect("url")
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .expect("create db");
        sqlx::query("CREATE TABLE coupons (coupon_id TEXT NOT NULL, batch_id TEXT)")
            .execute(&pool)
            .await
            .expect("create table");
        for r in rows {
            sqlx::query("INSERT INTO coupons (coupon_id, batch_id) VALUES (?, 'b')")
                .bind(*r)
                .execute(&pool)
                .await
                .expect("insert");
        }
        pool.close().await;
        (TempDb(path), url)
    }

    fn set(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn sqlite_all_present_passes() {
        let (_guard, url) = make_db("ok", &["c1", "c2", "c3", "other"]).await;
        let many: Vec<String> = (0..1200).map(|i| format!("x{i}")).collect();
        let mut want = set(&["c1", "c2", "c3"]);
        let check = check_persisted(&url, &want, Duration::from_secs(1)).await;
        assert_eq!(check.verdict, Verdict::Pass, "{check:?}");
        // Chunked lookups: more ids than one IN list holds.
        want.extend(many);
        let check = check_persisted(&url, &want, Duration::from_millis(100)).await;
        assert_eq!(check.verdict, Verdict::Fail, "{check:?}");
        assert!(check.detail.contains("1200 of 1203"), "{}", check.detail);
    }

    #[tokio::test]
    async fn sqlite_missing_or_duplicated_fails() {
        let (_guard, url) = make_db("bad", &["c1", "c2", "c2"]).await;
        let check = check_persisted(&url, &set(&["c1", "c2"]), Duration::from_secs(1)).await;
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.detail.contains("more than once"), "{}", check.detail);
        let check = check_persisted(&url, &set(&["c1", "c9"]), Duration::from_millis(600)).await;
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.detail.contains("1 of 2"), "{}", check.detail);
    }

    #[tokio::test]
    async fn unreachable_database_fails_cleanly() {
        let path = std::env::temp_dir().join("claimgate-loadtest-does-not-exist.db");
        let url = format!("sqlite://{}", path.display());
        let check = check_persisted(&url, &set(&["c1"]), Duration::from_millis(10)).await;
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.detail.contains("cannot open"), "{}", check.detail);
    }
}
