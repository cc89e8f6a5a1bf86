//! `POST /v1/checkout/quote`: which of a user's coupons apply to a cart, what each gives, and
//! the best combination. Orchestration only: the rules are `domain::quote`'s; the coupons
//! come from [`wallet_for_quote`] and their batches' terms from the catalog's cache.
//!
//! Invariant kept here: a quote changes nothing (it locks no coupon: checkout does that with
//! `/lock`), reads the wallet through the one function [`wallet_for_quote`], and, with user
//! auth on, quotes only the token's user.

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use super::{Api, ApiError, parse_object};
use crate::backend::Backend;
use crate::catalog::CatalogError;
use crate::domain::ids::valid_ident;
use crate::domain::quote::{Cart, Held, Item, Offer, Quote, quote};
use crate::domain::time::Timestamp;
use crate::store::{CouponRow, CouponState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteBody {
    /// Absent = the token's user; `null` is refused like any other non-string.
    #[serde(default, deserialize_with = "present_string")]
    user_id: Option<String>,
    items: Vec<Item>,
}

fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    <String as Deserialize>::deserialize(d).map(Some)
}

#[derive(Debug, Serialize)]
pub struct QuoteReply {
    pub user_id: String,
    #[serde(flatten)]
    pub quote: Quote,
    /// The wallet held more coupons than `checkout.max_coupons`: the rest were not
    /// considered.
    pub wallet_truncated: bool,
}

/// The user's coupons a quote considers: THE one place the quote reads the wallet. Today
/// that is the wallet as `GET /v1/users/{id}/coupons` shows it (`coupons::wallet`: read-your-
/// writes, the coupons' shards over the database's page). Unused coupons first (the
/// ones that can apply), then locked, then expired (reported with their reason), each by
/// coupon id, at most `max` in all; used coupons are not considered. Returns them and
/// whether the wallet held more.
pub async fn wallet_for_quote<B: Backend>(
    api: &Api<B>,
    user: &str,
    max: u32,
) -> Result<(Vec<CouponRow>, bool), ApiError> {
    let wallets = api.wallets();
    let now = api.clock().now_ms();
    let mut rows: Vec<CouponRow> = Vec::new();
    let mut truncated = false;
    for state in [
        CouponState::Unused,
        CouponState::Locked,
        CouponState::Expired,
    ] {
        let room = max.saturating_sub(rows.len() as u32);
        if room == 0 {
            // full: is anything left out?
            let more = wallets.page(user, Some(state), 1, None, now).await?;
            if !more.coupons.is_empty() {
                truncated = true;
                break;
            }
            continue;
        }
        let page = wallets.page(user, Some(state), room, None, now).await?;
        truncated |= page.next_cursor.is_some();
        rows.extend(page.coupons);
    }
    Ok((rows, truncated))
}

/// `POST /v1/checkout/quote` with `{"user_id", "items": [...]}`.
pub async fn quote_cart<B: Backend>(
    api: &Api<B>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<QuoteReply, ApiError> {
    let body: QuoteBody = parse_object(body, "quote request")?;
    if body.user_id.as_deref().is_some_and(|u| !valid_ident(u)) {
        return Err(ApiError::BadRequest(
            "user_id must be 1-128 characters of [A-Za-z0-9._@+-]".into(),
        ));
    }
    let cart = Cart::new(body.items, api.config().checkout.max_items)
        .map_err(|e| ApiError::BadRequest(e.0))?;
    // with user auth on: the token's user (a disagreeing body user_id is refused)
    let user = api
        .auth()
        .identify(headers, body.user_id.as_deref())?
        .user_id;
    let (rows, wallet_truncated) =
        wallet_for_quote(api, &user, api.config().checkout.max_coupons).await?;

    // each batch's terms once, from the cache (a miss loads it like a claim would)
    let mut terms = std::collections::HashMap::new();
    for row in &rows {
        if terms.contains_key(row.batch_id.as_str()) {
            continue;
        }
        let t = match api.catalog().load(&row.batch_id).await {
            Ok(entry) => Some(entry.terms()),
            Err(CatalogError::NotFound) => None,
            Err(e) => return Err(e.into()),
        };
        terms.insert(row.batch_id.as_str(), t);
    }
    let offers: Vec<Offer> = rows
        .iter()
        .map(|r| Offer {
            coupon_id: r.coupon_id.clone(),
            batch_id: r.batch_id.clone(),
            state: match r.state {
                CouponState::Unused => Held::Unused,
                CouponState::Locked => Held::Locked,
                CouponState::Used => Held::Used,
                CouponState::Expired => Held::Expired,
            },
            valid_from: Timestamp(r.valid_from),
            valid_to: Timestamp(r.valid_to),
            terms: terms.get(r.batch_id.as_str()).cloned().flatten(),
        })
        .collect();
    Ok(QuoteReply {
        user_id: user,
        quote: quote(&cart, &offers, Timestamp::now()),
        wallet_truncated,
    })
}
