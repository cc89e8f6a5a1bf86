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
//! - times are milliseconds since the Unix epoch everywhere (the unit Redis stamps claims with);
//! - the `batches` row is the arbiter of a batch's definition: it is inserted only if absent
//!   (the first create wins), changed only by a compare-and-set on its `version`, and records
//!   whether the batch's Redis setup ever completed (`setup_done_at`);
//! - a claim whose coupon id the database already holds for a different claim (another user,
//!   request id or time: a coupon id minted twice) is never dropped silently: it is recorded
//!   in `coupon_conflicts`, once per distinct claim, and returned to the caller.

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

use crate::config::DatabaseConfig;
use crate::domain::batch::Batch;
pub use crate::domain::claim::ClaimRecord;
pub use crate::domain::time::now_ms;

/// Rows per multi-row INSERT on SQLite. Each claim row binds at most 11 values, so a
/// statement stays under 999 variables (990), the limit of SQLite builds older than 3.32.
const SQLITE_ROWS_PER_INSERT: usize = 90;
/// How often a coupon transition retries after losing a compare-and-set race.
const TRANSITION_RETRIES: usize = 8;
/// Largest page of a wallet listing.
pub const MAX_PAGE: u32 = 500;

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

/// A batch as the database holds it: the definition (the arbiter of what the batch is), its
/// version (bumped by every change) and whether its Redis setup ever completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    pub batch: Batch,
    pub version: i64,
    pub setup_done: bool,
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

/// The unique event id of a claim in the transaction log.
pub fn claim_event_id(c: &ClaimRecord) -> String {
    format!("{}:claimed", c.coupon_id)
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
     (id, definition, shards, stock, state, created_at, updated_at, version, setup_done_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $7) \
     ON CONFLICT (id) DO UPDATE SET definition = excluded.definition, \
     shards = excluded.shards, stock = excluded.stock, state = excluded.state, \
     updated_at = excluded.updated_at, version = batches.version + 1, \
     setup_done_at = COALESCE(batches.setup_done_at, excluded.setup_done_at)";

/// The first create of an id wins; later ones change nothing (and read the winner back).
const INSERT_BATCH: &str = "INSERT INTO batches \
     (id, definition, shards, stock, state, created_at, updated_at, version, setup_done_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, NULL) ON CONFLICT (id) DO NOTHING";

/// A change of the definition: applied only on top of the version it was computed from.
const UPDATE_BATCH: &str = "UPDATE batches SET definition = $2, shards = $3, stock = $4, \
     state = $5, updated_at = $6, version = $7 WHERE id = $1 AND version = $8";

const BATCH_ROW: &str = "SELECT id, definition, version, setup_done_at FROM batches WHERE id = $1";

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

const UPDATE_COUPON: &str = "UPDATE coupons SET state = $1, order_id = $2, \
     lock_expires_at = $3, updated_at = $4, version = version + 1 \
     WHERE coupon_id = $5 AND version = $6";

const INSERT_EVENT: &str = "INSERT INTO coupon_events \
     (event_id, kind, batch_id, shard, user_id, coupon_id, request_id, order_id, at, recorded_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (event_id) DO NOTHING";

/// PostgreSQL: each table gets ONE statement per batch, the rows passed as one array per
/// column (`UNNEST`), so the statement text and plan never change with the batch size and
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
    let coupons = sqlx::query(
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
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok((inserted, coupons))
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
        let row: Option<(String, String, i64, Option<i64>)> = on_pool!(self, p => {
            sqlx::query_as(BATCH_ROW).bind(id).fetch_optional(p).await?
        });
        row.map(stored_batch).transpose()
    }

    /// Every batch with its version and setup state, by id.
    pub async fn batch_rows(&self) -> Result<Vec<StoredBatch>, DbError> {
        let rows: Vec<(String, String, i64, Option<i64>)> = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT id, definition, version, setup_done_at FROM batches ORDER BY id",
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
                "SELECT id, version FROM batches WHERE setup_done_at IS NOT NULL ORDER BY id",
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
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(n == 1)
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
                coupons += q.build().persistent(full).execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
        });
        Ok((inserted, coupons))
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

fn stored_batch(
    (id, def, version, setup_done_at): (String, String, i64, Option<i64>),
) -> Result<StoredBatch, DbError> {
    Ok(StoredBatch {
        batch: parse_batch(&id, &def)?,
        version,
        setup_done: setup_done_at.is_some(),
    })
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

    async fn memory_db() -> Db {
        let db = Db::connect(&DatabaseConfig {
            url: "sqlite::memory:".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        db.migrate().await.unwrap();
        db
    }

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
        }
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
