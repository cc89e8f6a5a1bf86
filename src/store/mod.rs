//! The database: batches, the append-only transaction log (`coupon_events`), the
//! materialised coupon rows (`coupons`) and the event outbox with its delivery ledger
//! (`event_outbox`), on PostgreSQL (production) or SQLite (embedded).
//!
//! Invariants kept here:
//! - a claim is recorded at most once however often it is delivered: its event id is
//!   `<coupon_id>:claimed` (UNIQUE) and the coupon id is the `coupons` primary key, and both
//!   rows of a batch of claims are written in one transaction (`ON CONFLICT DO NOTHING`);
//! - every coupon state change (claim, lock, redeem, release, refund, expiry) appends its
//!   event row AND its outbox row in the transaction that changes the state (a transition
//!   is a compare-and-set on the row's `version`; a change decided in Redis for a managed
//!   coupon writes only a row older than the version it creates), so the log, the outbox
//!   and the materialised state never disagree and concurrent transitions cannot both win;
//! - a managed coupon (`coupons.managed`: its state lives in Redis) is changed here only by
//!   its change records; the database's expiry and lock sweeps leave it to Redis;
//! - times are milliseconds since the Unix epoch everywhere (the unit Redis stamps claims with);
//! - the `batches` row is the arbiter of a batch's definition: it is inserted only if absent
//!   (the first create wins), changed only by a compare-and-set on its `version`, and records
//!   whether the batch's Redis setup ever completed (`setup_done_at`);
//! - a claim whose coupon id the database already holds for a different claim (another user,
//!   request id or time: a coupon id minted twice) is never dropped silently: it is recorded
//!   in `coupon_conflicts`, once per distinct claim, and returned to the caller;
//! - a grant job's counts and cursor move in one statement, from the cursor they were
//!   computed at, by the holder of the job's lease ([`grants`]): each chunk is counted once.
//!
//! Files: [`batches`] (the definitions), [`claims`] (the claims the persister writes, their
//! conflicts, the summaries `rebuild` and `reconcile` read), [`coupons`] (the wallet, the
//! coupon transitions decided by `domain::coupon`, the expiry and reminder sweeps, the due
//! managed coupons, unmanaging a shard), [`coupon_state`] (a decided transition, or the
//! change records of managed coupons, written in one transaction), [`outbox`] (event
//! bodies, delivery claims and the ledger), [`grants`] (bulk grant jobs: their spooled users,
//! cursor and counts), [`codes`] (the codes of batches that hand out codes: stored once,
//! loaded into Redis by chunk).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use thiserror::Error;

use crate::config::DatabaseConfig;
pub use crate::domain::claim::{ChangeRecord, ClaimRecord};
pub use crate::domain::time::now_ms;

/// A connection pool to the configured database.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs the same code against whichever pool `$db` holds (the SQL is shared: `$N`
/// placeholders and `ON CONFLICT` work on both engines).
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Postgres($pool) => $body,
            Db::Sqlite($pool) => $body,
        }
    };
}

mod batches;
mod claims;
mod codes;
mod coupon_state;
mod coupons;
mod grants;
mod outbox;

pub use self::batches::{BatchMark, StoredBatch};
pub use self::claims::{ClaimsWritten, CouponConflict, RequestClaim, ShardClaims, claim_event_id};
pub use self::coupon_state::{ChangesWritten, transition_event_id};
pub use self::coupons::{CouponRow, DueManaged, EventRow, MAX_PAGE, Swept};
pub use self::grants::{GrantCounts, GrantJobRow, JobState, Spooled};
pub use self::outbox::{
    Attempted, DeliveryState, DueEvent, EXPIRING_SOON, LedgerEntry, MAX_LEDGER_PAGE, OutboxStats,
    reminder_event_id,
};
pub use crate::domain::coupon::{CouponState, EventKind};

#[derive(Debug, Error)]
pub enum DbError {
    /// The configuration cannot be used (bad URL, unknown scheme, directory not creatable).
    #[error("database configuration: {0}")]
    Config(String),
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// No such coupon (or not yet persisted).
    #[error("coupon {0} not found")]
    NotFound(String),
    /// The transition is not allowed from the coupon's state or for this order
    /// (the API answers 409 `invalid_state`).
    #[error("coupon {coupon_id} is {state}: {reason}")]
    InvalidState {
        coupon_id: String,
        state: CouponState,
        reason: &'static str,
    },
    /// Too many concurrent transitions of one coupon; retry later.
    #[error("coupon {0} is being changed concurrently")]
    Contended(String),
    /// A stored value cannot be interpreted (a bug or a hand edit).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Change records of coupons the database holds no row for (their claims are not
    /// recorded): nothing of the write was kept (see [`Db::apply_changes`]).
    #[error("no coupon row for the change records of {0:?}")]
    MissingCoupons(Vec<String>),
}

pub(crate) fn to_u32(v: i64, what: &str) -> Result<u32, DbError> {
    u32::try_from(v).map_err(|_| DbError::Corrupt(format!("{what} out of range: {v}")))
}

pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, DbError> {
    u64::try_from(v).map_err(|_| DbError::Corrupt(format!("{what} out of range: {v}")))
}

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Corrupt(format!("{what} out of range: {v}")))
}

impl Db {
    /// Connects (and checks the connection) to the configured database. For SQLite the
    /// file's directory is created, and the database runs in WAL mode with full sync so a
    /// committed batch survives a power loss (the persister deletes it from Redis next).
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        let db = Self::connect_lazy(cfg)?;
        db.ping().await?;
        Ok(db)
    }

    /// Like [`Db::connect`] but without touching the server: connections are made on first
    /// use, so a gateway can start while its database is down (the backlog waits in Redis).
    pub fn connect_lazy(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        let acquire = Duration::from_millis(cfg.connect_timeout_ms);
        let statement = Duration::from_millis(cfg.statement_timeout_ms);
        let max = cfg.max_connections;
        let url = cfg.url.as_str();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| {
                    let e = crate::config::secret::redact_text(&e.to_string()).into_owned();
                    DbError::Config(format!("bad PostgreSQL url: {e}"))
                })?
                .options([("statement_timeout", statement.as_millis().to_string())])
                .application_name("claimgate");
            let pool = PgPoolOptions::new()
                .max_connections(max)
                .acquire_timeout(acquire)
                .connect_lazy_with(opts);
            Ok(Db::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)
                .map_err(|e| DbError::Config(format!("bad SQLite url: {e}")))?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(statement);
            let file = opts.get_filename();
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty())
                && file != Path::new(":memory:")
                && !opts_in_memory(url)
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    DbError::Config(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            // An in-memory database lives as long as its one connection: never recycle it.
            let pool = if opts_in_memory(url) {
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            } else {
                SqlitePoolOptions::new().max_connections(max)
            }
            .acquire_timeout(acquire)
            .connect_lazy_with(opts);
            Ok(Db::Sqlite(pool))
        } else {
            Err(DbError::Config(
                "url must start with postgres:// or sqlite:".to_string(),
            ))
        }
    }

    /// `"postgres"` or `"sqlite"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations of this engine (idempotent; safe to race: the
    /// migrator takes a lock).
    pub async fn migrate(&self) -> Result<(), DbError> {
        match self {
            Db::Postgres(p) => sqlx::migrate!("migrations/postgres").run(p).await?,
            Db::Sqlite(p) => sqlx::migrate!("migrations/sqlite").run(p).await?,
        }
        Ok(())
    }

    /// One round trip to the database.
    pub async fn ping(&self) -> Result<(), DbError> {
        on_pool!(self, p => {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    /// Closes every connection (waits for those in use to come back).
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}

fn opts_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// A migrated in-memory SQLite database, for the store's unit tests.
#[cfg(test)]
pub(crate) async fn memory_db() -> Db {
    let db = Db::connect(&crate::config::DatabaseConfig {
        url: "sqlite::memory:".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    db.migrate().await.unwrap();
    db
}
