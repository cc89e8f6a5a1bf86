//! Wallet and redemption (TCC: lock = try, redeem = confirm, release = cancel; and refund)
//! on the database's materialised coupons, at the API's clock.
//!
//! Invariant kept here: a coupon changes state only through the database transition for
//! the right order id (idempotent for the same order), decided by the state machine
//! (`domain::coupon`); the wallet shows each coupon's state at the instant of the request
//! (expired from its validity end, whether or not a sweeper has written it yet); with user
//! auth on, only the coupon's owner (or the admin token) can see or change it.

use std::collections::HashMap;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::{Api, ApiError, parse_object};
use crate::backend::Backend;
use crate::catalog::CatalogError;
use crate::coupons::wallet::managed_row;
use crate::coupons::{Changed, CouponsError};
use crate::domain::batch::{Discount, Scope};
use crate::domain::coupon::Transition;
use crate::domain::ids::{parse_coupon_id, valid_ident};
use crate::domain::time::Timestamp;
use crate::store::{CouponRow, CouponState};

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
    /// The coupon's code, in a batch that hands out codes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The batch's display fields (name, discount, scope), from the catalog's cache; absent
    /// when the batch cannot be read now.
    #[serde(flatten)]
    pub display: Option<Display>,
}

/// What a wallet shows of a coupon's batch, beside the coupon's validity.
#[derive(Debug, Clone, Serialize)]
pub struct Display {
    pub batch_name: String,
    pub discount: Discount,
    pub scope: Scope,
    pub exclusive: bool,
}

/// The display fields of each batch of `views`, one catalog lookup per batch (the cache's:
/// a hot wallet costs no backend call for them). A batch that cannot be read is left bare.
async fn with_display<B: Backend>(api: &Api<B>, views: &mut [CouponView]) {
    let mut seen: HashMap<String, Option<Display>> = HashMap::new();
    for v in views.iter_mut() {
        if !seen.contains_key(&v.batch_id) {
            let d = api.catalog().load(&v.batch_id).await.ok().map(|e| {
                let b = e.batch();
                Display {
                    batch_name: b.name.clone(),
                    discount: b.discount.clone(),
                    scope: b.scope.clone(),
                    exclusive: b.exclusive,
                }
            });
            seen.insert(v.batch_id.clone(), d);
        }
        v.display = seen.get(&v.batch_id).cloned().flatten();
    }
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
            code: c.code,
            display: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Page {
    pub coupons: Vec<CouponView>,
    pub next_cursor: Option<String>,
    /// The database could not be read: only the coupons claimed or changed lately (within
    /// `wallet.recent_window_ms`) are listed. Absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderBody {
    order_id: String,
}

/// A path segment as the client meant it: `%XX` escapes decoded (a client encodes `+` and
/// `@` of a user id as `%2B` and `%40`); `None` for a broken escape or non-UTF-8 bytes.
fn percent_decoded(segment: &str) -> Option<String> {
    if !segment.contains('%') {
        return Some(segment.to_string());
    }
    let b = segment.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = segment
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// With user auth on, the caller must be `owner` (or hold the admin token).
fn authorize<B: Backend>(api: &Api<B>, headers: &HeaderMap, owner: &str) -> Result<(), ApiError> {
    let auth = api.auth();
    if !auth.user_auth_enabled() {
        return Ok(());
    }
    if api.config().auth.admin_token.is_some() && auth.check_admin(headers).is_ok() {
        return Ok(());
    }
    let who = auth.identify(headers, None)?;
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
    api: &Api<B>,
    headers: &HeaderMap,
    user: &str,
    query: &str,
) -> Result<Page, ApiError> {
    let user = percent_decoded(user)
        .filter(|u| valid_ident(u))
        .ok_or_else(|| {
            ApiError::BadRequest("user_id must be 1-128 characters of [A-Za-z0-9._@+-]".into())
        })?;
    let user = user.as_str();
    authorize(api, headers, user)?;
    let wallet = &api.config().wallet;
    let (mut state, mut limit, mut cursor) = (None, wallet.default_page, None);
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
                    .filter(|l| (1..=wallet.max_page).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit must be 1..={}", wallet.max_page))
                    })?
            }
            "cursor" => {
                if parse_coupon_id(v).is_none() {
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
    let now = api.clock().now_ms();
    let page = api
        .wallets()
        .page(user, state, limit, cursor.as_deref(), now)
        .await?;
    let mut coupons: Vec<CouponView> = page.coupons.into_iter().map(CouponView::from).collect();
    with_display(api, &mut coupons).await;
    Ok(Page {
        coupons,
        next_cursor: page.next_cursor,
        partial: page.partial,
    })
}

/// `POST /v1/coupons/{coupon_id}/{lock|redeem|release|refund}` with `{"order_id"}`.
///
/// A coupon whose state lives on its shard (every coupon minted since coupon state moved
/// there) changes there, at once after its claim and with the database down or behind
/// (`coupons`); any other coupon changes in the database.
pub async fn act<B: Backend>(
    api: &Api<B>,
    headers: &HeaderMap,
    coupon_id: &str,
    action: &str,
    body: &[u8],
) -> Result<CouponView, ApiError> {
    let body: OrderBody = parse_object(body, "order body")?;
    if !valid_ident(&body.order_id) {
        return Err(ApiError::BadRequest(
            "order_id must be 1-128 characters of [A-Za-z0-9._@+-]".into(),
        ));
    }
    let Some((batch_id, shard, _)) = parse_coupon_id(coupon_id) else {
        return Err(ApiError::CouponNotFound);
    };
    // An id of no batch, or of a shard the batch does not have, names no coupon (its shard
    // would read as one under repair: 503). schemathesis found `f.0.0/lock` answered 503.
    let entry = match api.catalog().load(batch_id).await {
        Ok(e) if (shard as usize) < e.keys.shards.len() => e,
        Ok(_) | Err(CatalogError::NotFound) => return Err(ApiError::CouponNotFound),
        Err(e) => return Err(e.into()),
    };
    let timeout = i64::try_from(api.config().wallet.lock_timeout_ms).unwrap_or(i64::MAX);
    let t = Transition::client(action, &body.order_id, timeout).ok_or(ApiError::RouteNotFound)?;
    // Authenticate first, then look up: another user's coupon reads as absent, so the
    // answer never tells whether a coupon id exists. `None`: no user to check against.
    let (auth, store) = (api.auth(), api.store());
    let caller = if !auth.user_auth_enabled()
        || (api.config().auth.admin_token.is_some() && auth.check_admin(headers).is_ok())
    {
        None
    } else {
        Some(auth.identify(headers, None)?.user_id)
    };
    // A retired batch's coupons live in the database alone (their shard's keys are gone:
    // read as a shard under repair, which a retired one never is).
    let managed = if entry.is_retired() {
        None
    } else {
        match api.coupons().get(coupon_id).await {
            Ok(m) => m,
            Err(CouponsError::SlotGone) if api.catalog().check_retired(&entry).await? => None,
            Err(e) => return Err(e.into()),
        }
    };
    if let Some(m) = managed {
        if caller.as_ref().is_some_and(|who| *who != m.entry.user) {
            return Err(ApiError::CouponNotFound);
        }
        let now = api.clock().now_ms();
        match api.coupons().change(m, &t, now).await? {
            Changed::Written(m) | Changed::Repeat(m) => {
                // the wallet shows the change at once (a failed touch is counted and logged)
                let _ = api.wallets().touch(&m.entry.user, &m.coupon_id, now).await;
                let mut view = [CouponView::from(managed_row(&m, now))];
                with_display(api, &mut view).await;
                let [view] = view;
                return Ok(view);
            }
            Changed::NotManaged => {} // restored from the database meanwhile: its state is there
        }
    }
    if let Some(who) = &caller {
        match store.get_coupon(coupon_id).await? {
            Some(c) if c.user_id == *who => {}
            _ => return Err(ApiError::CouponNotFound),
        }
    }
    let now = api.clock().now_ms();
    let row = store.transition(coupon_id, &t, now).await?;
    // a cached wallet page older than this change is not used again
    let _ = api.wallets().touch(&row.user_id, &row.coupon_id, now).await;
    let mut view = [CouponView::from(row)];
    with_display(api, &mut view).await;
    let [view] = view;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// schemathesis: `GET /v1/users/a%2Bb%40c/coupons` (the user `a+b@c`, encoded as a
    /// client must) was refused with 400; the segment is decoded before it is checked.
    #[test]
    fn a_percent_encoded_user_id_is_decoded() {
        assert_eq!(percent_decoded("u1").as_deref(), Some("u1"));
        assert_eq!(percent_decoded("a%2Bb%40c").as_deref(), Some("a+b@c"));
        assert_eq!(percent_decoded("a%2bb").as_deref(), Some("a+b"));
        for bad in ["a%", "a%2", "a%zz", "a%+1", "%ff%fe"] {
            assert_eq!(percent_decoded(bad), None, "{bad}");
        }
        // decoded, then checked: an escaped character outside the alphabet stays refused
        assert!(!valid_ident(&percent_decoded("a%20b").unwrap()));
        assert!(!valid_ident(&percent_decoded("a%2Fb").unwrap()));
    }
}
