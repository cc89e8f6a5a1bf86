//! Campaign tools on the batch catalog: the public product-page lookup and the admin
//! listing of batches.
//!
//! Invariants kept here:
//! - a product-page lookup is answered from this instance's memory (the catalog's product
//!   index and cached entries), never by a database or backend call, and shows no stock
//!   detail beyond `"available": true` (nor any eligibility rule: deny lists stay private);
//! - the listing reads the database one keyset page at a time (by batch id, so a page never
//!   repeats or skips a batch that existed when the listing began, whatever is inserted
//!   meanwhile) and reads at most `catalog.list_max_scan` rows per request;
//! - every query parameter is checked (unknown or repeated ones too): bad input is a 400.
//!
//! Query values are percent-decoded (`%2B` is `+`); a `+` is kept as is (ids may hold it).

use serde::Serialize;

use super::{Api, ApiError};
use crate::backend::Backend;
use crate::catalog::index::ProductRef;
use crate::domain::batch::{Batch, BatchState, Discount, ScopeKind, Validity, Window};
use crate::domain::ids::valid_batch_id;
use crate::domain::quote::{MAX_REF_CHARS, valid_ref};
use crate::domain::time::Timestamp;

/// A batch as a product page shows it.
#[derive(Debug, Serialize)]
pub struct ProductBatch {
    pub batch_id: String,
    pub name: String,
    pub discount: Discount,
    /// Which of the product's attributes the batch's scope matched (`all`: every product).
    pub applies_by: &'static str,
    pub exclusive: bool,
    pub claim_window: Window,
    pub validity: Validity,
    /// Always true: only claimable batches are listed, and no stock count is shown.
    pub available: bool,
}

#[derive(Debug, Serialize)]
pub struct ProductPage {
    pub product_id: String,
    pub batches: Vec<ProductBatch>,
    /// More batches apply than `catalog.max_product_batches`; those ending soonest are shown.
    pub truncated: bool,
}

#[derive(Debug, Serialize)]
pub struct BatchPage {
    pub batches: Vec<Batch>,
    pub next_cursor: Option<String>,
}

/// Decodes `%XX` escapes (the result must be UTF-8); `None` for a malformed escape.
pub fn percent_decode(raw: &str) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_string());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The query's parameters, decoded; each must be one of `allowed` and appear once.
fn params(query: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&k) {
            return Err(ApiError::BadRequest(format!(
                "unknown query parameter {k:?} (allowed: {})",
                allowed.join(", ")
            )));
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(ApiError::BadRequest(format!(
                "query parameter {k:?} given twice"
            )));
        }
        let v = percent_decode(v).ok_or_else(|| {
            ApiError::BadRequest(format!("query parameter {k:?}: malformed percent-escape"))
        })?;
        out.push((k.to_string(), v));
    }
    Ok(out)
}

fn bad_ref(what: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "{what} must be 1-{MAX_REF_CHARS} characters without control characters"
    ))
}

/// `GET /v1/products/{product_id}/batches?category=&merchant=`: the batches a user can claim
/// now that apply to this product, from memory.
pub fn product_batches<B: Backend>(
    api: &Api<B>,
    product_raw: &str,
    query: &str,
) -> Result<ProductPage, ApiError> {
    let product = percent_decode(product_raw)
        .filter(|p| valid_ref(p))
        .ok_or_else(|| bad_ref("product_id"))?;
    let (mut category, mut merchant) = (None, None);
    for (k, v) in params(query, &["category", "merchant"])? {
        if !valid_ref(&v) {
            return Err(bad_ref(&k));
        }
        match k.as_str() {
            "category" => category = Some(v),
            _ => merchant = Some(v),
        }
    }
    let what = ProductRef {
        product: &product,
        category: category.as_deref(),
        merchant: merchant.as_deref(),
    };
    let max = api.config().catalog.max_product_batches;
    let found = api.catalog().index().lookup(what, Timestamp::now(), max);
    let batches = found
        .batches
        .iter()
        .map(|e| {
            let b = e.batch();
            ProductBatch {
                batch_id: b.id.clone(),
                name: b.name.clone(),
                discount: b.discount.clone(),
                applies_by: match b.scope.kind {
                    ScopeKind::All => "all",
                    ScopeKind::Products => "product",
                    ScopeKind::Categories => "category",
                    ScopeKind::Merchants => "merchant",
                },
                exclusive: b.exclusive,
                claim_window: b.claim_window.clone(),
                validity: b.validity.clone(),
                available: true,
            }
        })
        .collect();
    Ok(ProductPage {
        product_id: product,
        batches,
        truncated: found.truncated,
    })
}

/// The listing's filters.
#[derive(Debug, Default)]
struct Filter {
    state: Option<BatchState>,
    /// The claim window holds this instant (`start <= t < end`).
    active_at: Option<Timestamp>,
    /// The claim window ends after this instant (`end > t`).
    ends_after: Option<Timestamp>,
}

impl Filter {
    fn matches(&self, b: &Batch) -> bool {
        let w = &b.claim_window;
        self.active_at.is_none_or(|t| w.start <= t && t < w.end)
            && self.ends_after.is_none_or(|t| w.end > t)
    }
}

fn time_param(k: &str, v: &str) -> Result<Timestamp, ApiError> {
    Timestamp::parse(v)
        .filter(|t| (Timestamp::MIN..=Timestamp::MAX).contains(t))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{k} must be an RFC 3339 time between 1970 and 9999 (write + as %2B)"
            ))
        })
}

/// `GET /v1/batches?state=&active_at=&ends_after=&limit=&cursor=` (admin).
pub async fn list<B: Backend>(api: &Api<B>, query: &str) -> Result<BatchPage, ApiError> {
    let cfg = &api.config().catalog;
    let mut filter = Filter::default();
    let (mut limit, mut cursor) = (cfg.list_default_page, None);
    let allowed = ["state", "active_at", "ends_after", "limit", "cursor"];
    for (k, v) in params(query, &allowed)? {
        match k.as_str() {
            "state" => {
                filter.state = Some(match v.as_str() {
                    "active" => BatchState::Active,
                    "paused" => BatchState::Paused,
                    _ => {
                        return Err(ApiError::BadRequest(
                            "state must be active or paused".into(),
                        ));
                    }
                })
            }
            "active_at" => filter.active_at = Some(time_param(&k, &v)?),
            "ends_after" => filter.ends_after = Some(time_param(&k, &v)?),
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=cfg.list_max_page).contains(l))
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("limit must be 1..={}", cfg.list_max_page))
                    })?
            }
            _ => {
                if !valid_batch_id(&v) {
                    return Err(ApiError::BadRequest(
                        "cursor must be a batch id (the next_cursor of a page)".into(),
                    ));
                }
                cursor = Some(v);
            }
        }
    }
    let store = api.store();
    let budget = cfg.list_max_scan;
    let (mut page, mut scanned) = (Vec::new(), 0u32);
    let mut after = cursor;
    let more = loop {
        // one row past what the page still needs: tells "no more rows" without a query
        let want = (limit - page.len() as u32 + 1).min(budget - scanned);
        let rows = store
            .batches_after(after.as_deref(), filter.state, want)
            .await?;
        let exhausted = (rows.len() as u32) < want;
        let n = rows.len();
        let mut consumed = 0;
        for row in rows {
            consumed += 1;
            scanned += 1;
            after = Some(row.batch.id.clone());
            if filter.matches(&row.batch) {
                page.push(row.batch);
                if page.len() as u32 == limit {
                    break;
                }
            }
        }
        if page.len() as u32 == limit {
            break !(exhausted && consumed == n);
        }
        if exhausted {
            break false;
        }
        if scanned >= budget {
            // a selective filter: a short page, and the cursor to go on from
            break true;
        }
    };
    Ok(BatchPage {
        batches: page,
        next_cursor: if more { after } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a+b").as_deref(), Some("a+b"));
        assert_eq!(
            percent_decode("2026-01-01T00:00:00%2B01:00").as_deref(),
            Some("2026-01-01T00:00:00+01:00")
        );
        assert_eq!(percent_decode("%E2%9C%93").as_deref(), Some("✓"));
        for bad in ["%", "%2", "%zz", "%FF", "a%2"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn parameters_are_known_and_given_once() {
        let ok = params("a=1&&b=x%20y", &["a", "b"]).unwrap();
        assert_eq!(
            ok,
            vec![("a".into(), "1".into()), ("b".into(), "x y".into())]
        );
        assert!(params("a=1&a=2", &["a"]).is_err());
        assert!(params("c=1", &["a"]).is_err());
        assert!(params("a=%zz", &["a"]).is_err());
    }
}
