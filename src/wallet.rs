//! Wallet and redemption (TCC: lock = try, redeem = confirm, release = cancel) on the
//! database's materialised coupons.
//!
//! Invariant kept here: a coupon changes state only through the database transition for
//! the right order id (idempotent for the same order); with user auth on, only the coupon's
//! owner (or the admin token) can see or change it.

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::backend::Backend;
use crate::domain::ids::valid_ident;
use crate::domain::time::Timestamp;
use crate::error::ApiError;
use crate::store::{CouponRow, CouponState, DbError};

#[derive(Debug, Serialize)]
pub struct CouponView {
    pub coupon_id: String,
    pub batch_id: String,
    pub user_id: String,
    pub state: CouponState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_expires_at: Option<String>,
    pub valid_from: String,
    pub valid_to: String,
    pub claimed_at: String,
}

impl From<CouponRow> for CouponView {
    fn from(c: CouponRow) -> Self {
        CouponView {
            coupon_id: c.coupon_id,
            batch_id: c.batch_id,
            user_id: c.user_id,
            state: c.state,
            order_id: c.order_id,
            lock_expires_at: c.lock_expires_at.map(|t| Timestamp(t).to_rfc3339()),
            valid_from: Timestamp(c.valid_from).to_rfc3339(),
            valid_to: Timestamp(c.valid_to).to_rfc3339(),
            claimed_at: Timestamp(c.claimed_at).to_rfc3339(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Page {
    pub coupons: Vec<CouponView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    order_id: String,
}

fn db_error<B: Backend>(app: &App<B>, e: DbError) -> ApiError {
    match e {
        DbError::NotFound(_) => ApiError::CouponNotFound,
        DbError::InvalidState { .. } => ApiError::InvalidState(e.to_string()),
        DbError::Contended(_) => ApiError::Overloaded(e.to_string(), app.retry_after()),
        other => app.unavailable(other),
    }
}

/// With user auth on, the caller must be `owner` (or hold the admin token).
fn authorize<B: Backend>(app: &App<B>, headers: &HeaderMap, owner: &str) -> Result<(), ApiError> {
    if !app.auth.user_auth_enabled() {
        return Ok(());
    }
    if app.cfg.auth.admin_token.is_some() && app.auth.check_admin(headers).is_ok() {
        return Ok(());
    }
    let who = app.auth.identify(headers, None)?;
    if who.user_id == owner {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "token does not belong to this user".into(),
        ))
    }
}

/// `GET /v1/users/{user_id}/coupons?status=&limit=&cursor=`.
pub async fn list<B: Backend>(
    app: &App<B>,
    headers: &HeaderMap,
    user: &str,
    query: &str,
) -> Result<Page, ApiError> {
    if !valid_ident(user) {
        return Err(ApiError::BadRequest(
            "user_id must be 1-128 characters of [A-Za-z0-9._@+-]".into(),
        ));
    }
    authorize(app, headers, user)?;
    let (mut state, mut limit, mut cursor) = (None, app.cfg.wallet.default_page, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "status" => {
                state = Some(CouponState::parse(v).ok_or_else(|| {
                    ApiError::BadRequest("status must be unused, locked, used or expired".into())
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=app.cfg.wallet.max_page).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "limit must be 1..={}",
                            app.cfg.wallet.max_page
                        ))
                    })?
            }
            "cursor" => {
                if crate::domain::ids::parse_coupon_id(v).is_none() {
                    return Err(ApiError::BadRequest("invalid cursor".into()));
                }
                cursor = Some(v.to_string());
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )));
            }
        }
    }
    let (rows, next_cursor) = app
        .db
        .user_coupons(user, state, limit, cursor.as_deref())
        .await
        .map_err(|e| db_error(app, e))?;
    Ok(Page {
        coupons: rows.into_iter().map(CouponView::from).collect(),
        next_cursor,
    })
}

/// `POST /v1/coupons/{coupon_id}/{lock|redeem|release}` with `{"order_id"}`.
pub async fn act<B: Backend>(
    app: &App<B>,
    headers: &HeaderMap,
    coupon_id: &str,
    action: &str,
    body: &[u8],
) -> Result<CouponView, ApiError> {
    let body: OrderBody = crate::router::parse_object(body, "order body")?;
    if !valid_ident(&body.order_id) {
        return Err(ApiError::BadRequest(
            "order_id must be 1-128 characters of [A-Za-z0-9._@+-]".into(),
        ));
    }
    if crate::domain::ids::parse_coupon_id(coupon_id).is_none() {
        return Err(ApiError::CouponNotFound);
    }
    if app.auth.user_auth_enabled() {
        // Authenticate first, then look up: another user's coupon reads as absent, so the
        // answer never tells whether a coupon id exists.
        let admin = app.cfg.auth.admin_token.is_some() && app.auth.check_admin(headers).is_ok();
        let caller = if admin {
            None
        } else {
            Some(app.auth.identify(headers, None)?)
        };
        let coupon = app
            .db
            .get_coupon(coupon_id)
            .await
            .map_err(|e| db_error(app, e))?;
        match (coupon, caller) {
            (Some(c), Some(who)) if c.user_id != who.user_id => {
                return Err(ApiError::CouponNotFound);
            }
            (Some(_), _) => {}
            (None, _) => return Err(ApiError::CouponNotFound),
        }
    }
    let timeout = std::time::Duration::from_millis(app.cfg.wallet.lock_timeout_ms);
    let row = match action {
        "lock" => app.db.lock(coupon_id, &body.order_id, timeout).await,
        "redeem" => app.db.redeem(coupon_id, &body.order_id).await,
        _ => app.db.release(coupon_id, &body.order_id).await,
    }
    .map_err(|e| db_error(app, e))?;
    Ok(row.into())
}
