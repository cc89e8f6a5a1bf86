//! The admin's view of events out: the delivery ledger (`GET /v1/events?state=&limit=&cursor=`)
//! and one event with its body (`GET /v1/events/{event_id}`), both behind the admin token.
//!
//! Invariant kept here: the ledger is read as the database has it (orchestration only:
//! parameters validated here, the rows are `store::outbox`'s); a malformed parameter is a
//! 400, an unknown event a 404 `event_not_found`.

use serde::Serialize;

use super::{Api, ApiError};
use crate::backend::Backend;
use crate::domain::time::Timestamp;
use crate::store::{DeliveryState, LedgerEntry};

/// One event and its delivery ledger, as the API shows it.
#[derive(Debug, Serialize)]
pub struct EventView {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub coupon_id: String,
    /// `pending`, `delivered` or `dead`.
    pub state: DeliveryState,
    /// Delivery attempts so far.
    pub attempts: u32,
    pub created_at: String,
    /// When the next attempt is due (pending events only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<String>,
    /// HTTP status of the last answer (none: no answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    /// The body delivered (one event only; not in listings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl EventView {
    fn of(e: LedgerEntry, with_payload: bool) -> EventView {
        let t = |ms: i64| Timestamp(ms).to_rfc3339();
        EventView {
            kind: format!("coupon.{}", e.kind),
            next_attempt_at: (e.state == DeliveryState::Pending).then(|| t(e.next_attempt_at)),
            last_attempt_at: e.last_attempt_at.map(t),
            delivered_at: e.delivered_at.map(t),
            created_at: t(e.created_at),
            payload: with_payload.then(|| {
                serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::String(e.payload))
            }),
            event_id: e.event_id,
            coupon_id: e.coupon_id,
            state: e.state,
            attempts: e.attempts,
            last_status: e.last_status,
            last_error: e.last_error,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventPage {
    pub events: Vec<EventView>,
    pub next_cursor: Option<String>,
}

/// An event id as the outbox writes them: `<coupon_id>:<kind>[:<version>]`.
fn valid_event_id(s: &str) -> bool {
    (1..=256).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `GET /v1/events?state=pending|delivered|dead&limit=&cursor=` (admin): events in outbox
/// order.
pub async fn list<B: Backend>(api: &Api<B>, query: &str) -> Result<EventPage, ApiError> {
    let cfg = &api.config().events;
    let (mut state, mut limit, mut after) = (None, cfg.ledger_default_page, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "state" => {
                state = Some(DeliveryState::parse(v).ok_or_else(|| {
                    ApiError::BadRequest("state must be pending, delivered or dead".into())
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=cfg.ledger_max_page).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit must be 1..={}", cfg.ledger_max_page))
                    })?
            }
            "cursor" => {
                after = Some(
                    v.parse::<i64>()
                        .ok()
                        .filter(|c| *c > 0)
                        .ok_or_else(|| ApiError::BadRequest("invalid cursor".into()))?,
                )
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    let (rows, next) = api.store().ledger(state, after, limit).await?;
    Ok(EventPage {
        events: rows.into_iter().map(|e| EventView::of(e, false)).collect(),
        next_cursor: next.map(|n| n.to_string()),
    })
}

/// `GET /v1/events/{event_id}` (admin): one event, its ledger and its body. The path
/// segment is percent-decoded first (clients may escape the `:` of `<coupon>:claimed`).
pub async fn get<B: Backend>(api: &Api<B>, raw_event_id: &str) -> Result<EventView, ApiError> {
    let decoded = super::catalog::percent_decode(raw_event_id);
    let event_id = decoded.as_deref().unwrap_or("");
    if !valid_event_id(event_id) {
        return Err(ApiError::BadRequest(
            "event_id must be 1-256 characters of [A-Za-z0-9._:-]".into(),
        ));
    }
    api.store()
        .ledger_entry(event_id)
        .await?
        .map(|e| EventView::of(e, true))
        .ok_or(ApiError::EventNotFound)
}
