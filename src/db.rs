//! The database: batches, the append-only transaction log (`coupon_events`) and the
//! materialised coupon rows (`coupons`), on PostgreSQL (production) or SQLite (embedded).
//!
//! Invariants kept here:
//! - a claim is recorded at most once however often it is delivered: its event id is
//!   `<coupon_id>:claimed` (UNIQUE) and the coupon id is the `coupons` primary key, and both
//!   rows of a batch of claims are written in one transaction (`ON CONFLICT DO NOTHING`);
//! - every coupon state change (lock / redeem / release) is a compare-and-set on the row's
//!   `version` and appends its event row in the same transaction, so the log and the
//!   materialised state never disagree and concurrent transitions cannot both win;
//! - times are milliseconds since the Unix epoch everywhere (the unit Redis stamps claims with).

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};
use thiserror::Error;

use crate::batch::{Batch, Timestamp};

/// Rows per multi-row INSERT on SQLite. Each claim row binds at most 11 values, so a
/// statement stays under 999 variables (990), the limit of SQLite builds older than 3.32.
const SQLITE_ROWS_PER_INSERT: usize = 90;
/// How often a coupon transition retries after losing a compare-and-set race.
const TRANSITION_RETRIES: usize = 8;
/// Largest page of a wallet listing.
pub const MAX_PAGE: u32 = 500;

/// `[database]` section of the configuration. Its password (in `url`) never reaches
/// `Debug` or a serialized dump: both redact it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:pass@host:port/db` or `sqlite://path?mode=rwc`.
    #[serde(serialize_with = "crate::secret::serialize_url")]
    pub url: String,
    pub max_connections: u32,
    /// Longest wait for a connection (connect included), milliseconds.
    pub connect_timeout_ms: u64,
    /// PostgreSQL `statement_timeout`; on SQLite the busy timeout (wait for the write lock).
    pub statement_timeout_ms: u64,
}

/// The built-in database, as in `config/claimgate.toml`: SQLite under `data/`.
impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://data/claimgate.db?mode=rwc".to_string(),
            max_connections: 4,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 5_000,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let DatabaseConfig {
            url,
            max_connections,
            connect_timeout_ms,
            statement_timeout_ms,
        } = self;
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::secret::redact_url(url))
            .field("max_connections", max_connections)
            .field("connect_timeout_ms", connect_timeout_ms)
            .field("statement_timeout_ms", statement_timeout_ms)
            .finish()
    }
}

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
}

/// Effective state of a coupon, as the wallet shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CouponState {
    Unused,
    Locked,
    Used,
    Expired,
}

impl CouponState {
    pub fn as_str(self) -> &'static str {
        match self {
            CouponState::Unused => "unused",
            CouponState::Locked => "locked",
            CouponState::Used => "used",
            CouponState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<CouponState> {
        match s {
            "unused" => Some(CouponState::Unused),
            "locked" => Some(CouponState::Locked),
            "used" => Some(CouponState::Used),
            "expired" => Some(CouponState::Expired),
            _ => None,
        }
    }
}

impl fmt::Display for CouponState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Kinds of `coupon_events` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Claimed,
    Locked,
    Redeemed,
    Released,
    Expired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Claimed => "claimed",
            EventKind::Locked => "locked",
            EventKind::Redeemed => "redeemed",
            EventKind::Released => "released",
            EventKind::Expired => "expired",
        }
    }
}

/// One successful claim, as the claim script recorded it in the shard's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    pub seq: u64,
    pub user_id: String,
    /// `None` when the client sent no request id.
    pub request_id: Option<String>,
    pub claimed_at: i64,
    pub valid_from: i64,
    pub valid_to: i64,
}

impl ClaimRecord {
    /// The claim's unique event id in the transaction log.
    pub fn event_id(&self) -> String {
        format!("{}:claimed", self.coupon_id)
    }
}

/// A coupon as the wallet shows it (`state` is the effective state at read time: an expired
/// lock reads as unused, an unused coupon past `valid_to` as expired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CouponRow {
    pub coupon_id: String,
    pub batch_id: String,
    pub shard: u32,
    pub seq: u64,
    pub user_id: String,
    pub request_id: Option<String>,
    pub state: CouponState,
    pub order_id: Option<String>,
    pub lock_expires_at: Option<i64>,
    pub valid_from: i64,
    pub valid_to: i64,
    pub claimed_at: i64,
    pub updated_at: i64,
}

/// One row of the transaction log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    pub event_id: String,
    pub kind: String,
    pub batch_id: String,
    pub shard: u32,
    pub user_id: String,
    pub coupon_id: String,
    pub request_id: Option<String>,
    pub order_id: Option<String>,
    pub at: i64,
    pub recorded_at: i64,
}

/// Claims of one shard of a batch in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardClaims {
    pub shard: u32,
    pub count: u64,
    pub max_seq: u64,
}

/// A coupon row as stored (state not yet resolved against the clock).
#[derive(Debug, Clone)]
struct StoredCoupon {
    coupon_id: String,
    batch_id: String,
    shard: i64,
    seq: i64,
    user_id: String,
    request_id: Option<String>,
    state: String,
    order_id: Option<String>,
    lock_expires_at: Option<i64>,
    valid_from: i64,
    valid_to: i64,
    claimed_at: i64,
    updated_at: i64,
    version: i64,
}

impl StoredCoupon {
    fn stored_state(&self) -> Result<CouponState, DbError> {
        CouponState::parse(&self.state).ok_or_else(|| {
            DbError::Corrupt(format!(
                "coupon {} has state {:?}",
                self.coupon_id, self.state
            ))
        })
    }

    fn lock_expired(&self, now: i64) -> bool {
        self.lock_expires_at.is_none_or(|t| t <= now)
    }

    /// The state the wallet shows at `now`.
    fn effective(&self, now: i64) -> Result<CouponState, DbError> {
        Ok(match self.stored_state()? {
            CouponState::Locked if !self.lock_expired(now) => CouponState::Locked,
            CouponState::Locked | CouponState::Unused if self.valid_to < now => {
                CouponState::Expired
            }
            CouponState::Locked | CouponState::Unused => CouponState::Unused,
            s => s,
        })
    }

    fn into_row(self, now: i64) -> Result<CouponRow, DbError> {
        let state = self.effective(now)?;
        let lock_expires_at = if state == CouponState::Locked {
            self.lock_expires_at
        } else {
            None
        };
        Ok(CouponRow {
            state,
            lock_expires_at,
            shard: to_u32(self.shard, "shard")?,
            seq: to_u64(self.seq, "seq")?,
            coupon_id: self.coupon_id,
            batch_id: self.batch_id,
            user_id: self.user_id,
            request_id: self.request_id,
            order_id: self.order_id,
            valid_from: self.valid_from,
            valid_to: self.valid_to,
            claimed_at: self.claimed_at,
            updated_at: self.updated_at,
        })
    }
}

fn to_u32(v: i64, what: &str) -> Result<u32, DbError> {
    u32::try_from(v).map_err(|_| DbError::Corrupt(format!("{what} out of range: {v}")))
}

fn to_u64(v: i64, what: &str) -> Result<u64, DbError> {
    u64::try_from(v).map_err(|_| DbError::Corrupt(format!("{what} out of range: {v}")))
}

fn to_i64(v: u64, what: &str) -> Result<i64, DbError> {
    i64::try_from(v).map_err(|_| DbError::Corrupt(format!("{what} out of range: {v}")))
}

/// Current time, milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    Timestamp::now().0
}

/// A coupon transition (the TCC steps of a checkout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Lock { timeout_ms: i64 },
    Redeem,
    Release,
}

/// What a transition does to a stored row.
enum Plan {
    /// Already in the requested state for this order: answer the row, write nothing.
    Noop,
    Apply {
        state: CouponState,
        lock_expires_at: Option<i64>,
        /// Events to append, in order (an expired lock taken over is released first).
        events: Vec<(EventKind, String)>,
    },
}

fn plan(t: Transition, c: &StoredCoupon, order: &str, now: i64) -> Result<Plan, DbError> {
    let stored = c.stored_state()?;
    let effective = c.effective(now)?;
    let same_order = c.order_id.as_deref() == Some(order);
    let refuse = |reason: &'static str| {
        Err(DbError::InvalidState {
            coupon_id: c.coupon_id.clone(),
            state: effective,
            reason,
        })
    };
    match t {
        Transition::Lock { timeout_ms } => match effective {
            CouponState::Locked if same_order => Ok(Plan::Noop),
            CouponState::Locked => refuse("locked by another order"),
            CouponState::Used => refuse("already used"),
            CouponState::Expired => refuse("validity has ended"),
            CouponState::Unused if c.valid_from > now => refuse("not valid yet"),
            CouponState::Unused => {
                let mut events = Vec::with_capacity(2);
                if stored == CouponState::Locked {
                    // The previous order's lock ran out: it counts as released.
                    if let Some(prev) = &c.order_id {
                        events.push((EventKind::Released, prev.clone()));
                    }
                }
                events.push((EventKind::Locked, order.to_string()));
                Ok(Plan::Apply {
                    state: CouponState::Locked,
                    lock_expires_at: Some(now.saturating_add(timeout_ms)),
                    events,
                })
            }
        },
        Transition::Redeem => match stored {
            CouponState::Used if same_order => Ok(Plan::Noop),
            CouponState::Locked if same_order && !c.lock_expired(now) => Ok(Plan::Apply {
                state: CouponState::Used,
                lock_expires_at: None,
                events: vec![(EventKind::Redeemed, order.to_string())],
            }),
            CouponState::Locked if same_order => refuse("the lock has expired"),
            CouponState::Used => refuse("used by another order"),
            _ => refuse("not locked by this order"),
        },
        Transition::Release => match stored {
            CouponState::Unused if same_order => Ok(Plan::Noop),
            // An expired lock of this order is released too (recording the release).
            CouponState::Locked if same_order => Ok(Plan::Apply {
                state: CouponState::Unused,
                lock_expires_at: None,
                events: vec![(EventKind::Released, order.to_string())],
            }),
            CouponState::Used => refuse("already used"),
            _ => refuse("not locked by this order"),
        },
    }
}

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

macro_rules! stored_coupon {
    ($r:expr) => {
        StoredCoupon {
            coupon_id: $r.try_get(0)?,
            batch_id: $r.try_get(1)?,
            shard: $r.try_get(2)?,
            seq: $r.try_get(3)?,
            user_id: $r.try_get(4)?,
            request_id: $r.try_get(5)?,
            state: $r.try_get(6)?,
            order_id: $r.try_get(7)?,
            lock_expires_at: $r.try_get(8)?,
            valid_from: $r.try_get(9)?,
            valid_to: $r.try_get(10)?,
            claimed_at: $r.try_get(11)?,
            updated_at: $r.try_get(12)?,
            version: $r.try_get(13)?,
        }
    };
}

/// Wallet queries, one per status filter: `$1` user, `$2` cursor (exclusive), `$3` page
/// size + 1, `$4` now (bound only where used). Literals, so every query text is static.
const WALLET_ALL: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 ORDER BY coupon_id LIMIT $3";
const WALLET_UNUSED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 \
     AND (state = 'unused' OR (state = 'locked' AND lock_expires_at <= $4)) \
     AND valid_to >= $4 ORDER BY coupon_id LIMIT $3";
const WALLET_LOCKED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 \
     AND state = 'locked' AND lock_expires_at > $4 ORDER BY coupon_id LIMIT $3";
const WALLET_USED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND state = 'used' \
     ORDER BY coupon_id LIMIT $3";
const WALLET_EXPIRED: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE user_id = $1 AND coupon_id > $2 AND (state = 'expired' OR \
     ((state = 'unused' OR (state = 'locked' AND lock_expires_at <= $4)) AND valid_to < $4)) \
     ORDER BY coupon_id LIMIT $3";

const COUPON_BY_ID: &str = "SELECT coupon_id, batch_id, shard, seq, user_id, request_id, state, \
     order_id, lock_expires_at, valid_from, valid_to, claimed_at, updated_at, version \
     FROM coupons WHERE coupon_id = $1";

const UPSERT_BATCH: &str = "INSERT INTO batches \
     (id, definition, shards, stock, state, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (id) DO UPDATE SET definition = excluded.definition, \
     shards = excluded.shards, stock = excluded.stock, state = excluded.state, \
     updated_at = excluded.updated_at";

const UPDATE_COUPON: &str = "UPDATE coupons SET state = $1, order_id = $2, \
     lock_expires_at = $3, updated_at = $4, version = version + 1 \
     WHERE coupon_id = $5 AND version = $6";

const INSERT_EVENT: &str = "INSERT INTO coupon_events \
     (event_id, kind, batch_id, shard, user_id, coupon_id, request_id, order_id, at, recorded_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING";

/// PostgreSQL: each table gets ONE statement per batch, the rows passed as one array per
/// column (`UNNEST`), so the statement text and plan never change with the batch size and
/// the server parses 9-11 parameters instead of thousands.
async fn write_claims_pg(
    pool: &sqlx::PgPool,
    rows: &[(&ClaimRecord, i64)],
    now: i64,
) -> Result<u64, DbError> {
    let col = |f: fn(&ClaimRecord) -> String| rows.iter().map(|(c, _)| f(c)).collect::<Vec<_>>();
    let event_ids = col(|c| c.event_id());
    let batch_ids = col(|c| c.batch_id.clone());
    let user_ids = col(|c| c.user_id.clone());
    let coupon_ids = col(|c| c.coupon_id.clone());
    let request_ids: Vec<Option<String>> = rows.iter().map(|(c, _)| c.request_id.clone()).collect();
    let shards: Vec<i64> = rows.iter().map(|(c, _)| i64::from(c.shard)).collect();
    let seqs: Vec<i64> = rows.iter().map(|(_, s)| *s).collect();
    let claimed_at: Vec<i64> = rows.iter().map(|(c, _)| c.claimed_at).collect();
    let valid_from: Vec<i64> = rows.iter().map(|(c, _)| c.valid_from).collect();
    let valid_to: Vec<i64> = rows.iter().map(|(c, _)| c.valid_to).collect();
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
    sqlx::query(
        "INSERT INTO coupons (coupon_id, batch_id, shard, seq, user_id, request_id, state, \
         valid_from, valid_to, claimed_at, updated_at) \
         SELECT c, b, s, q, u, r, 'unused', vf, vt, a, $10 \
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], \
                     $6::text[], $7::bigint[], $8::bigint[], $9::bigint[]) \
              AS t(c, b, s, q, u, r, vf, vt, a) \
         ON CONFLICT (coupon_id) DO NOTHING",
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
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(inserted)
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
        let acquire = Duration::from_millis(cfg.connect_timeout_ms.max(1));
        let statement = Duration::from_millis(cfg.statement_timeout_ms.max(1));
        let max = cfg.max_connections.max(1);
        let url = cfg.url.as_str();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let opts = PgConnectOptions::from_str(url)
                .map_err(|e| {
                    let e = crate::secret::redact_text(&e.to_string()).into_owned();
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

    /// Inserts the batch, or replaces its definition if it exists.
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
                .execute(p)
                .await?;
        });
        Ok(())
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

    /// Every batch, by id.
    pub async fn list_batches(&self) -> Result<Vec<Batch>, DbError> {
        let rows: Vec<(String, String)> = on_pool!(self, p => {
            sqlx::query_as("SELECT id, definition FROM batches ORDER BY id")
                .fetch_all(p)
                .await?
        });
        rows.iter().map(|(id, d)| parse_batch(id, d)).collect()
    }

    /// Records claims: one `claimed` event and one `unused` coupon row each, in ONE
    /// transaction; claims already recorded are skipped (`ON CONFLICT DO NOTHING`), so a
    /// redelivered batch is harmless. Returns how many events were newly inserted.
    pub async fn write_claims(&self, claims: &[ClaimRecord]) -> Result<u64, DbError> {
        let mut seen = HashSet::with_capacity(claims.len());
        let unique: Vec<&ClaimRecord> = claims
            .iter()
            .filter(|c| seen.insert(c.coupon_id.as_str()))
            .collect();
        if unique.is_empty() {
            return Ok(0);
        }
        let mut rows = Vec::with_capacity(unique.len());
        for c in &unique {
            rows.push((*c, to_i64(c.seq, "seq")?));
        }
        let now = now_ms();
        if let Db::Postgres(p) = self {
            return write_claims_pg(p, &rows, now).await;
        }
        // SQLite from here on (PostgreSQL returned above): multi-row VALUES, chunked to
        // stay under SQLite's bound-variable limit.
        let chunk = SQLITE_ROWS_PER_INSERT;
        let mut inserted = 0;
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            for part in rows.chunks(chunk) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO coupon_events (event_id, kind, batch_id, shard, user_id, \
                     coupon_id, request_id, at, recorded_at) ",
                );
                q.push_values(part, |mut b, (c, _)| {
                    b.push_bind(c.event_id())
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
                     state, valid_from, valid_to, claimed_at, updated_at) ",
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
                        .push_bind(now);
                });
                q.push(" ON CONFLICT (coupon_id) DO NOTHING");
                q.build().persistent(full).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(inserted)
    }

    /// A user's coupons with the given effective state (all when `None`), ordered by coupon
    /// id, after `cursor` (exclusive). Returns the page and the cursor of the next page.
    pub async fn user_coupons(
        &self,
        user_id: &str,
        state: Option<CouponState>,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<CouponRow>, Option<String>), DbError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let (sql, uses_now) = match state {
            None => (WALLET_ALL, false),
            Some(CouponState::Unused) => (WALLET_UNUSED, true),
            Some(CouponState::Locked) => (WALLET_LOCKED, true),
            Some(CouponState::Used) => (WALLET_USED, false),
            Some(CouponState::Expired) => (WALLET_EXPIRED, true),
        };
        let now = now_ms();
        let mut stored = Vec::new();
        on_pool!(self, p => {
            let mut q = sqlx::query(sql)
                .bind(user_id)
                .bind(cursor.unwrap_or(""))
                .bind(i64::from(limit) + 1);
            if uses_now {
                q = q.bind(now);
            }
            let rows = q.fetch_all(p).await?;
            for r in &rows {
                stored.push(stored_coupon!(r));
            }
        });
        let more = stored.len() > limit as usize;
        stored.truncate(limit as usize);
        let next = if more {
            stored.last().map(|c| c.coupon_id.clone())
        } else {
            None
        };
        let page = stored
            .into_iter()
            .map(|c| c.into_row(now))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((page, next))
    }

    pub async fn get_coupon(&self, coupon_id: &str) -> Result<Option<CouponRow>, DbError> {
        let now = now_ms();
        self.stored_coupon(coupon_id)
            .await?
            .map(|c| c.into_row(now))
            .transpose()
    }

    async fn stored_coupon(&self, coupon_id: &str) -> Result<Option<StoredCoupon>, DbError> {
        Ok(on_pool!(self, p => {
            match sqlx::query(COUPON_BY_ID).bind(coupon_id).fetch_optional(p).await? {
                Some(r) => Some(stored_coupon!(r)),
                None => None,
            }
        }))
    }

    /// Try: freezes the coupon for `order_id` until `lock_timeout` from now. Idempotent for
    /// the same order while the lock holds; an expired lock of any order counts as released.
    pub async fn lock(
        &self,
        coupon_id: &str,
        order_id: &str,
        lock_timeout: Duration,
    ) -> Result<CouponRow, DbError> {
        let timeout_ms = i64::try_from(lock_timeout.as_millis()).unwrap_or(i64::MAX);
        self.transition(coupon_id, order_id, Transition::Lock { timeout_ms })
            .await
    }

    /// Confirm: the coupon locked by `order_id` becomes used. Idempotent for the same order.
    pub async fn redeem(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        self.transition(coupon_id, order_id, Transition::Redeem)
            .await
    }

    /// Cancel: the coupon locked by `order_id` goes back to unused. Idempotent for the same
    /// order (also after its lock expired).
    pub async fn release(&self, coupon_id: &str, order_id: &str) -> Result<CouponRow, DbError> {
        self.transition(coupon_id, order_id, Transition::Release)
            .await
    }

    async fn transition(
        &self,
        coupon_id: &str,
        order_id: &str,
        t: Transition,
    ) -> Result<CouponRow, DbError> {
        for _ in 0..TRANSITION_RETRIES {
            let now = now_ms();
            let Some(c) = self.stored_coupon(coupon_id).await? else {
                return Err(DbError::NotFound(coupon_id.to_string()));
            };
            let (state, lock_expires_at, events) = match plan(t, &c, order_id, now)? {
                Plan::Noop => return c.into_row(now),
                Plan::Apply {
                    state,
                    lock_expires_at,
                    events,
                } => (state, lock_expires_at, events),
            };
            let version = c.version + 1;
            let applied = on_pool!(self, p => {
                let mut tx = p.begin().await?;
                let n = sqlx::query(UPDATE_COUPON)
                    .bind(state.as_str())
                    .bind(order_id)
                    .bind(lock_expires_at)
                    .bind(now)
                    .bind(coupon_id)
                    .bind(c.version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n == 1 {
                    for (kind, order) in &events {
                        sqlx::query(INSERT_EVENT)
                            .bind(format!("{coupon_id}:{}:{version}", kind.as_str()))
                            .bind(kind.as_str())
                            .bind(&c.batch_id)
                            .bind(c.shard)
                            .bind(&c.user_id)
                            .bind(coupon_id)
                            .bind(c.request_id.as_deref())
                            .bind(order.as_str())
                            .bind(now)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    true
                } else {
                    tx.rollback().await?;
                    false
                }
            });
            if applied {
                let updated = StoredCoupon {
                    state: state.as_str().to_string(),
                    order_id: Some(order_id.to_string()),
                    lock_expires_at,
                    updated_at: now,
                    version,
                    ..c
                };
                return updated.into_row(now);
            }
        }
        Err(DbError::Contended(coupon_id.to_string()))
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
        type Row = (String, i64, String, Option<String>, i64, i64, i64);
        let rows: Vec<Row> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT coupon_id, seq, user_id, request_id, claimed_at, valid_from, valid_to \
                 FROM coupons WHERE batch_id = $1 AND shard = $2 ORDER BY seq",
            )
            .bind(batch_id)
            .bind(i64::from(shard))
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(
                |(coupon_id, seq, user_id, request_id, claimed_at, vf, vt)| {
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

    /// The transaction log of one coupon, oldest first.
    pub async fn coupon_events(&self, coupon_id: &str) -> Result<Vec<EventRow>, DbError> {
        type Row = (
            String,
            String,
            String,
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            i64,
            i64,
        );
        let rows: Vec<Row> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT event_id, kind, batch_id, shard, user_id, coupon_id, request_id, \
                 order_id, at, recorded_at FROM coupon_events WHERE coupon_id = $1 ORDER BY seq",
            )
            .bind(coupon_id)
            .fetch_all(p)
            .await?
        });
        rows.into_iter()
            .map(|r| {
                Ok(EventRow {
                    event_id: r.0,
                    kind: r.1,
                    batch_id: r.2,
                    shard: to_u32(r.3, "shard")?,
                    user_id: r.4,
                    coupon_id: r.5,
                    request_id: r.6,
                    order_id: r.7,
                    at: r.8,
                    recorded_at: r.9,
                })
            })
            .collect()
    }
}

fn opts_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

fn parse_batch(id: &str, def: &str) -> Result<Batch, DbError> {
    serde_json::from_str(def)
        .map_err(|e| DbError::Corrupt(format!("definition of batch {id} does not parse: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coupon(state: &str, order: Option<&str>, lock: Option<i64>) -> StoredCoupon {
        StoredCoupon {
            coupon_id: "b.0.1".into(),
            batch_id: "b".into(),
            shard: 0,
            seq: 1,
            user_id: "u".into(),
            request_id: None,
            state: state.into(),
            order_id: order.map(Into::into),
            lock_expires_at: lock,
            valid_from: 0,
            valid_to: 1_000,
            claimed_at: 0,
            updated_at: 0,
            version: 0,
        }
    }

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

    #[test]
    fn effective_state_resolves_expiry() {
        assert_eq!(
            coupon("unused", None, None).effective(10).unwrap(),
            CouponState::Unused
        );
        assert_eq!(
            coupon("unused", None, None).effective(2_000).unwrap(),
            CouponState::Expired
        );
        let locked = coupon("locked", Some("o1"), Some(50));
        assert_eq!(locked.effective(10).unwrap(), CouponState::Locked);
        assert_eq!(locked.effective(60).unwrap(), CouponState::Unused);
        assert!(coupon("bogus", None, None).effective(0).is_err());
    }

    #[test]
    fn transitions_are_idempotent_per_order() {
        let lock = Transition::Lock { timeout_ms: 100 };
        let unused = coupon("unused", None, None);
        assert!(matches!(
            plan(lock, &unused, "o1", 10),
            Ok(Plan::Apply { .. })
        ));
        let locked = coupon("locked", Some("o1"), Some(110));
        assert!(matches!(plan(lock, &locked, "o1", 20), Ok(Plan::Noop)));
        assert!(matches!(
            plan(lock, &locked, "o2", 20),
            Err(DbError::InvalidState { .. })
        ));
        // Expired lock: another order may take it, releasing the first one.
        match plan(lock, &locked, "o2", 200) {
            Ok(Plan::Apply { events, .. }) => assert_eq!(events.len(), 2),
            _ => panic!("expired lock must be taken over"),
        }
        assert!(matches!(
            plan(Transition::Redeem, &locked, "o1", 20),
            Ok(Plan::Apply { .. })
        ));
        assert!(matches!(
            plan(Transition::Redeem, &locked, "o1", 200),
            Err(DbError::InvalidState { .. })
        ));
        let used = coupon("used", Some("o1"), None);
        assert!(matches!(
            plan(Transition::Redeem, &used, "o1", 20),
            Ok(Plan::Noop)
        ));
        assert!(matches!(
            plan(Transition::Release, &used, "o1", 20),
            Err(DbError::InvalidState { .. })
        ));
        let released = coupon("unused", Some("o1"), None);
        assert!(matches!(
            plan(Transition::Release, &released, "o1", 20),
            Ok(Plan::Noop)
        ));
        assert!(matches!(
            plan(Transition::Release, &released, "o2", 20),
            Err(DbError::InvalidState { .. })
        ));
    }
}
