//! The event outbox and its delivery ledger: the body of every event (one JSON document per
//! coupon state change, and per "expiring soon" reminder), written in the transaction of
//! the change it reports; then claimed by a delivery worker under a lease, and its
//! attempts recorded (attempts, last status, last error, pending | delivered | dead).
//!
//! Invariants kept here:
//! - an event is in the outbox at most once (`event_id` UNIQUE, inserts `ON CONFLICT DO
//!   NOTHING`) and its body never changes once written (the worker signs what is stored);
//! - a pending event is attempted by one worker at a time: claiming it moves its
//!   `next_attempt_at` to the end of a lease and stamps a fresh `lease_token` in one
//!   statement (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so instances never wait on each
//!   other; SQLite: one writer at a time), and only the holder of that token can record
//!   the attempt's result; a worker that dies mid-attempt leaves the event due again when
//!   its lease ends (at least once);
//! - an event leaves `pending` only as `delivered` (a 2xx) or `dead` (after
//!   `events.max_attempts` attempts), and never leaves those.

use serde::Serialize;

use super::{Db, DbError, to_u32};
use crate::domain::coupon::CouponState;
use crate::domain::time::Timestamp;

/// The JSON body of an event, as delivered (and as the ledger shows it).
#[derive(Debug, Serialize)]
pub struct Notice<'a> {
    /// The event id: the consumer's deduplication key (also the `Claimgate-Event-Id`
    /// header).
    pub id: &'a str,
    /// `claimed`, `locked`, `released`, `redeemed`, `refunded`, `expired` or
    /// `expiring_soon` (serialized as `coupon.<kind>`).
    #[serde(rename = "type", serialize_with = "coupon_type")]
    pub kind: &'a str,
    pub occurred_at: Timestamp,
    pub coupon_id: &'a str,
    pub batch_id: &'a str,
    pub user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<&'a str>,
    /// The coupon's state right after the event.
    pub state: CouponState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_expires_at: Option<Timestamp>,
    /// Why it happened when no request asked for it (`lock_timeout`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<&'a str>,
    pub valid_from: Timestamp,
    pub valid_to: Timestamp,
}

fn coupon_type<S: serde::Serializer>(kind: &&str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("coupon.{kind}"))
}

impl Notice<'_> {
    pub fn to_json(&self) -> Result<String, DbError> {
        serde_json::to_string(self)
            .map_err(|e| DbError::Corrupt(format!("event {} not serializable: {e}", self.id)))
    }
}

/// The kind of the reminder (not a state change: outbox only).
pub const EXPIRING_SOON: &str = "expiring_soon";

/// The id of a coupon's one "expiring soon" reminder.
pub fn reminder_event_id(coupon_id: &str) -> String {
    format!("{coupon_id}:{EXPIRING_SOON}")
}

/// `$1` event id, `$2` kind, `$3` coupon id, `$4` body, `$5` now (created, and due).
pub(super) const INSERT_OUTBOX: &str = "INSERT INTO event_outbox \
     (event_id, kind, coupon_id, payload, created_at, next_attempt_at) \
     VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (event_id) DO NOTHING";

/// Where an event is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "dead" => Some(DeliveryState::Dead),
            _ => None,
        }
    }
}

/// An event a worker claimed for one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueEvent {
    pub seq: i64,
    pub event_id: String,
    pub payload: String,
    /// Attempts including this one.
    pub attempts: u32,
}

/// The result of one delivery attempt, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// The consumer answered 2xx.
    Delivered { status: u16 },
    /// No 2xx (`status`: the answer, if there was one): try again at `retry_at`, or never
    /// (`None`: dead).
    Failed {
        status: Option<u16>,
        error: String,
        retry_at: Option<i64>,
    },
}

/// The outbox as a whole, for the backlog gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub pending: u64,
    pub dead: u64,
    /// When the oldest pending event was written.
    pub oldest_pending_at: Option<i64>,
}

/// One event and its delivery ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    pub seq: i64,
    pub event_id: String,
    pub kind: String,
    pub coupon_id: String,
    pub payload: String,
    pub created_at: i64,
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_attempt_at: Option<i64>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
}

/// Largest page of a ledger listing.
pub const MAX_LEDGER_PAGE: u32 = crate::config::LEDGER_MAX_PAGE;

/// The columns of a [`LedgerRow`] (a macro, so that every query text is a literal).
macro_rules! ledger_columns {
    () => {
        "seq, event_id, kind, coupon_id, payload, created_at, state, attempts, \
         next_attempt_at, last_attempt_at, last_status, last_error, delivered_at"
    };
}

type LedgerRow = (
    i64,
    String,
    String,
    String,
    String,
    i64,
    String,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

fn ledger_entry(r: LedgerRow) -> Result<LedgerEntry, DbError> {
    let state = DeliveryState::parse(&r.6)
        .ok_or_else(|| DbError::Corrupt(format!("event {} has state {:?}", r.1, r.6)))?;
    let last_status = match r.10 {
        Some(s) => {
            Some(u16::try_from(s).map_err(|_| DbError::Corrupt(format!("HTTP status {s}")))?)
        }
        None => None,
    };
    Ok(LedgerEntry {
        seq: r.0,
        event_id: r.1,
        kind: r.2,
        coupon_id: r.3,
        payload: r.4,
        created_at: r.5,
        state,
        attempts: to_u32(r.7, "attempts")?,
        next_attempt_at: r.8,
        last_attempt_at: r.9,
        last_status,
        last_error: r.11,
        delivered_at: r.12,
    })
}

/// Claims due events: `$1` lease token, `$2` lease end, `$3` now, `$4` how many.
const CLAIM_PG: &str = "UPDATE event_outbox SET lease_token = $1, next_attempt_at = $2, \
     attempts = attempts + 1, last_attempt_at = $3 \
     WHERE seq IN (SELECT seq FROM event_outbox WHERE state = 'pending' \
                   AND next_attempt_at <= $3 ORDER BY next_attempt_at, seq LIMIT $4 \
                   FOR UPDATE SKIP LOCKED) \
     RETURNING seq, event_id, payload, attempts";
const CLAIM_SQLITE: &str = "UPDATE event_outbox SET lease_token = $1, next_attempt_at = $2, \
     attempts = attempts + 1, last_attempt_at = $3 \
     WHERE seq IN (SELECT seq FROM event_outbox WHERE state = 'pending' \
                   AND next_attempt_at <= $3 ORDER BY next_attempt_at, seq LIMIT $4) \
     RETURNING seq, event_id, payload, attempts";

/// Longest `last_error` kept (the rest is cut).
const MAX_ERROR_CHARS: usize = 500;

impl Db {
    /// Claims up to `limit` events due at `now` for one attempt each, under `token` until
    /// `now + lease_ms` (see the module documentation).
    pub async fn claim_due_events(
        &self,
        token: &str,
        now: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<DueEvent>, DbError> {
        let sql = match self {
            Db::Postgres(_) => CLAIM_PG,
            Db::Sqlite(_) => CLAIM_SQLITE,
        };
        let rows: Vec<(i64, String, String, i64)> = on_pool!(self, p => {
            sqlx::query_as(sql)
                .bind(token)
                .bind(now.saturating_add(lease_ms))
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(p)
                .await?
        });
        let mut due = rows
            .into_iter()
            .map(|(seq, event_id, payload, attempts)| {
                Ok(DueEvent {
                    seq,
                    event_id,
                    payload,
                    attempts: to_u32(attempts, "attempts")?,
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        due.sort_by_key(|d| d.seq);
        Ok(due)
    }

    /// Records the result of an attempt of event `seq` made under `token` at `now`.
    /// Returns `false` when the lease was lost (another worker claimed the event since):
    /// then nothing is recorded, that worker's attempt decides.
    pub async fn record_attempt(
        &self,
        seq: i64,
        token: &str,
        now: i64,
        result: &Attempted,
    ) -> Result<bool, DbError> {
        let n = match result {
            Attempted::Delivered { status } => on_pool!(self, p => {
                sqlx::query(
                    "UPDATE event_outbox SET state = 'delivered', delivered_at = $1, \
                     last_status = $2, last_error = NULL, lease_token = NULL \
                     WHERE seq = $3 AND lease_token = $4 AND state = 'pending'",
                )
                .bind(now)
                .bind(i64::from(*status))
                .bind(seq)
                .bind(token)
                .execute(p)
                .await?
                .rows_affected()
            }),
            Attempted::Failed {
                status,
                error,
                retry_at,
            } => {
                let error: String = error.chars().take(MAX_ERROR_CHARS).collect();
                let (state, next) = match retry_at {
                    Some(t) => (DeliveryState::Pending, *t),
                    None => (DeliveryState::Dead, now),
                };
                on_pool!(self, p => {
                    sqlx::query(
                        "UPDATE event_outbox SET state = $1, next_attempt_at = $2, \
                         last_status = $3, last_error = $4, lease_token = NULL \
                         WHERE seq = $5 AND lease_token = $6 AND state = 'pending'",
                    )
                    .bind(state.as_str())
                    .bind(next)
                    .bind(status.map(i64::from))
                    .bind(&error)
                    .bind(seq)
                    .bind(token)
                    .execute(p)
                    .await?
                    .rows_affected()
                })
            }
        };
        Ok(n == 1)
    }

    /// Pending and dead events, and the age of the backlog.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, DbError> {
        let (pending, dead, oldest): (i64, i64, Option<i64>) = on_pool!(self, p => {
            sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM event_outbox WHERE state = 'pending'), \
                 (SELECT COUNT(*) FROM event_outbox WHERE state = 'dead'), \
                 (SELECT MIN(created_at) FROM event_outbox WHERE state = 'pending')",
            )
            .fetch_one(p)
            .await?
        });
        Ok(OutboxStats {
            pending: super::to_u64(pending, "count")?,
            dead: super::to_u64(dead, "count")?,
            oldest_pending_at: oldest,
        })
    }

    /// The ledger, by outbox order: events in `state` (all when `None`) after `after`
    /// (exclusive), at most `limit` (1..=[`MAX_LEDGER_PAGE`]). Returns the page and the
    /// cursor of the next page.
    pub async fn ledger(
        &self,
        state: Option<DeliveryState>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<LedgerEntry>, Option<i64>), DbError> {
        let limit = limit.clamp(1, MAX_LEDGER_PAGE);
        let after = after.unwrap_or(0);
        let rows: Vec<LedgerRow> = match state {
            None => on_pool!(self, p => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    ledger_columns!(),
                    " FROM event_outbox WHERE seq > $1 ORDER BY seq LIMIT $2"
                ))
                .bind(after)
                .bind(i64::from(limit) + 1)
                .fetch_all(p)
                .await?
            }),
            Some(s) => on_pool!(self, p => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    ledger_columns!(),
                    " FROM event_outbox WHERE state = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                ))
                .bind(s.as_str())
                .bind(after)
                .bind(i64::from(limit) + 1)
                .fetch_all(p)
                .await?
            }),
        };
        let mut page = rows
            .into_iter()
            .map(ledger_entry)
            .collect::<Result<Vec<_>, _>>()?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        let next = if more {
            page.last().map(|e| e.seq)
        } else {
            None
        };
        Ok((page, next))
    }

    /// One event and its ledger.
    pub async fn ledger_entry(&self, event_id: &str) -> Result<Option<LedgerEntry>, DbError> {
        let row: Option<LedgerRow> = on_pool!(self, p => {
            sqlx::query_as(concat!(
                "SELECT ",
                ledger_columns!(),
                " FROM event_outbox WHERE event_id = $1"
            ))
            .bind(event_id)
            .fetch_optional(p)
            .await?
        });
        row.map(ledger_entry).transpose()
    }

    /// Every outbox event of one coupon, in outbox order.
    pub async fn coupon_outbox(&self, coupon_id: &str) -> Result<Vec<LedgerEntry>, DbError> {
        let rows: Vec<LedgerRow> = on_pool!(self, p => {
            sqlx::query_as(concat!(
                "SELECT ",
                ledger_columns!(),
                " FROM event_outbox WHERE coupon_id = $1 ORDER BY seq"
            ))
            .bind(coupon_id)
            .fetch_all(p)
            .await?
        });
        rows.into_iter().map(ledger_entry).collect()
    }
}
