//! The API's errors: the closed set of answers a request can get besides success, each with
//! the machine-readable code of API.md, and the ONE conversion of every domain error into
//! it (one `From` impl each). How an error is written as HTTP (status, body, headers) is
//! `crate::http::error`'s job.
//!
//! Invariant kept here: bad input maps to a code of a 4xx; only a failing backend or
//! database maps to a 5xx code; a domain error becomes an `ApiError` in exactly one place
//! (its `From` impl below), so the same failure always gets the same answer.

use thiserror::Error;

use crate::backend::BackendError;
use crate::catalog::CatalogError;
use crate::coupons::CouponsError;
use crate::domain::auth::AuthError;
use crate::domain::batch::InvalidBatch;
use crate::domain::limits::LimitError;
use crate::jobs::GrantError;
use crate::recovery::RebuildError;
use crate::stock::StockError;
use crate::store::DbError;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("user is not eligible for this batch")]
    NotEligible,
    #[error("batch not found")]
    BatchNotFound,
    #[error("coupon not found")]
    CouponNotFound,
    #[error("event not found")]
    EventNotFound,
    #[error("job not found")]
    JobNotFound,
    #[error("per-user limit reached")]
    LimitReached,
    #[error("per-user daily limit reached")]
    DailyLimitReached,
    #[error("the claim window has not started")]
    NotStarted,
    #[error("the claim window has ended")]
    Ended,
    #[error("the batch is paused")]
    Paused,
    #[error("sold out")]
    SoldOut,
    #[error("a different batch already uses this id")]
    BatchExists,
    /// A batch's `timezone` is not an IANA name (with the message naming it).
    #[error("{0}")]
    UnknownTimezone(String),
    /// A change that would make the stock cost more than the batch's budget.
    #[error("{0}")]
    OverBudget(String),
    #[error("{0}")]
    InvalidState(String),
    /// With the wait the limiter computed (the `Retry-After` of this answer).
    #[error("rate limited")]
    RateLimited { retry_after_s: u64 },
    /// Shed or contended: nothing was done; retry after `limits.retry_after_s`.
    #[error("{0}")]
    Overloaded(String),
    /// With the cause, for the log line; the client is told only that nothing was claimed.
    #[error("backend unavailable, nothing was claimed")]
    BackendUnavailable(String),
    /// `redis.ack = "replica"`: the claim is on the primary, not yet confirmed by enough
    /// replicas. With the detail, for the log line.
    #[error(
        "the claim is not yet confirmed by a replica; retry with the same request_id to get \
         it once it is (without one, a retry may claim again)"
    )]
    NotReplicated(String),
    #[error("no such route")]
    RouteNotFound,
    /// With the methods the route does allow.
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// The detail is logged (with the request id), not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// One of each variant, for documentation checks and closed label sets. The match in
    /// [`ApiError::code`] is exhaustive, so a new variant is a compile error there; add it
    /// here too (a test checks every code appears).
    pub fn examples() -> Vec<ApiError> {
        vec![
            ApiError::BadRequest("example".into()),
            ApiError::Unauthorized("example".into()),
            ApiError::NotEligible,
            ApiError::BatchNotFound,
            ApiError::CouponNotFound,
            ApiError::EventNotFound,
            ApiError::JobNotFound,
            ApiError::LimitReached,
            ApiError::DailyLimitReached,
            ApiError::NotStarted,
            ApiError::Ended,
            ApiError::Paused,
            ApiError::SoldOut,
            ApiError::BatchExists,
            ApiError::UnknownTimezone("example".into()),
            ApiError::OverBudget("example".into()),
            ApiError::InvalidState("example".into()),
            ApiError::RateLimited { retry_after_s: 1 },
            ApiError::Overloaded("example".into()),
            ApiError::BackendUnavailable("example".into()),
            ApiError::NotReplicated("example".into()),
            ApiError::RouteNotFound,
            ApiError::MethodNotAllowed("GET"),
            ApiError::Internal("example".into()),
        ]
    }

    /// The machine-readable code of API.md (also the `outcome` label of claim metrics).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotEligible => "not_eligible",
            ApiError::BatchNotFound => "batch_not_found",
            ApiError::CouponNotFound => "coupon_not_found",
            ApiError::EventNotFound => "event_not_found",
            ApiError::JobNotFound => "job_not_found",
            ApiError::LimitReached | ApiError::DailyLimitReached => "limit_reached",
            ApiError::NotStarted => "not_started",
            ApiError::Ended => "ended",
            ApiError::Paused => "paused",
            ApiError::SoldOut => "sold_out",
            ApiError::BatchExists => "batch_exists",
            ApiError::UnknownTimezone(_) => "unknown_timezone",
            ApiError::OverBudget(_) => "over_budget",
            ApiError::InvalidState(_) => "invalid_state",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::BackendUnavailable(_) => "backend_unavailable",
            ApiError::NotReplicated(_) => "indeterminate",
            ApiError::RouteNotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }

    /// What the log line of this error says (the detail of internal errors included).
    pub fn log_detail(&self) -> String {
        match self {
            ApiError::Internal(detail)
            | ApiError::BackendUnavailable(detail)
            | ApiError::NotReplicated(detail) => detail.clone(),
            other => other.to_string(),
        }
    }

    /// A backend or database failure as the client sees it; the cause goes to the log line.
    pub fn unavailable(cause: impl std::fmt::Display) -> ApiError {
        ApiError::BackendUnavailable(cause.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// The one conversion of each domain error.

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingUser => ApiError::BadRequest(e.to_string()),
            _ => ApiError::Unauthorized(e.to_string()),
        }
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> Self {
        match e {
            LimitError::RateLimited { retry_after_s, .. } => {
                ApiError::RateLimited { retry_after_s }
            }
            LimitError::Overloaded(..) => {
                ApiError::Overloaded("too many claims in flight; nothing was claimed".into())
            }
        }
    }
}

impl From<InvalidBatch> for ApiError {
    fn from(e: InvalidBatch) -> Self {
        match e {
            InvalidBatch::Bad(m) => ApiError::BadRequest(m),
            e @ InvalidBatch::UnknownZone(_) => ApiError::UnknownTimezone(e.to_string()),
            InvalidBatch::OverBudget(m) => ApiError::OverBudget(m),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(m) => ApiError::BackendUnavailable(m),
            e @ BackendError::NotReplicated { .. } => ApiError::NotReplicated(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<StockError> for ApiError {
    fn from(e: StockError) -> Self {
        match e {
            StockError::NotFound => ApiError::BatchNotFound,
            StockError::Conflict => ApiError::BatchExists,
            StockError::Shed => ApiError::Overloaded(e.to_string()),
            StockError::Backend(b) => b.into(),
            StockError::Store(_) => ApiError::BackendUnavailable(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound => ApiError::BatchNotFound,
            CatalogError::Lost(_) => ApiError::BackendUnavailable(e.to_string()),
            CatalogError::Stock(s) => s.into(),
            CatalogError::Store(d) => ApiError::BackendUnavailable(d.to_string()),
            CatalogError::Corrupt(_) => ApiError::Internal(e.to_string()),
        }
    }
}

/// The database as the wallet and the admin routes meet it: a coupon transition's refusals
/// are the client's; anything else is the database failing (503, nothing changed).
impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound(_) => ApiError::CouponNotFound,
            DbError::InvalidState { .. } => ApiError::InvalidState(e.to_string()),
            DbError::Contended(_) => ApiError::Overloaded(e.to_string()),
            other => ApiError::BackendUnavailable(other.to_string()),
        }
    }
}

/// A change of a coupon whose state lives on its shard: refusals are the client's (409);
/// a shard under repair or a log at its bound is 503, nothing changed.
impl From<CouponsError> for ApiError {
    fn from(e: CouponsError) -> Self {
        match e {
            CouponsError::InvalidState { .. } => ApiError::InvalidState(e.to_string()),
            CouponsError::Backlog | CouponsError::Contended(_) => {
                ApiError::Overloaded(e.to_string())
            }
            CouponsError::SlotGone => ApiError::BackendUnavailable(e.to_string()),
            CouponsError::Backend(b) => b.into(),
        }
    }
}

/// A grant job's upload as its route meets it: too many users or none is the client's; the
/// batch answers as for a claim; the database failing is 503.
impl From<GrantError> for ApiError {
    fn from(e: GrantError) -> Self {
        match e {
            GrantError::TooManyUsers(_) | GrantError::Empty(_) => {
                ApiError::BadRequest(e.to_string())
            }
            GrantError::Catalog(c) => c.into(),
            GrantError::Db(d) => ApiError::BackendUnavailable(d.to_string()),
            GrantError::Internal(m) => ApiError::Internal(m),
        }
    }
}

/// Recovery as the admin reconcile route meets it: an unknown batch is the client's; the
/// backend or the database failing is 503; anything else is ours.
impl From<RebuildError> for ApiError {
    fn from(e: RebuildError) -> Self {
        match e {
            RebuildError::BatchNotFound(_) => ApiError::BatchNotFound,
            e @ RebuildError::Retired(_) => ApiError::InvalidState(e.to_string()),
            RebuildError::Backend(b) => b.into(),
            RebuildError::Stock(s) => s.into(),
            RebuildError::Db(d) => ApiError::BackendUnavailable(d.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::UnknownZone;

    /// Does not compile when a variant is added: then add it to `ApiError::examples` too.
    #[allow(dead_code)]
    fn every_variant_has_an_example(e: &ApiError) {
        match e {
            ApiError::BadRequest(_)
            | ApiError::Unauthorized(_)
            | ApiError::NotEligible
            | ApiError::BatchNotFound
            | ApiError::CouponNotFound
            | ApiError::EventNotFound
            | ApiError::JobNotFound
            | ApiError::LimitReached
            | ApiError::DailyLimitReached
            | ApiError::NotStarted
            | ApiError::Ended
            | ApiError::Paused
            | ApiError::SoldOut
            | ApiError::BatchExists
            | ApiError::UnknownTimezone(_)
            | ApiError::OverBudget(_)
            | ApiError::InvalidState(_)
            | ApiError::RateLimited { .. }
            | ApiError::NotReplicated(_)
            | ApiError::Overloaded(_)
            | ApiError::BackendUnavailable(_)
            | ApiError::RouteNotFound
            | ApiError::MethodNotAllowed(_)
            | ApiError::Internal(_) => {}
        }
    }

    #[test]
    fn examples_cover_every_code() {
        let codes: std::collections::BTreeSet<_> =
            ApiError::examples().iter().map(ApiError::code).collect();
        assert_eq!(codes.len(), 23, "{codes:?}");
    }

    /// The `outcome` label set of the claims metric is the success outcomes and every code
    /// a claim can answer; the codes left out are exactly those only other routes answer
    /// (`obs` cannot ask this type: it sits below it). Exporting them was "impossible label
    /// values" of the issue "For the people who run it".
    #[test]
    fn the_claim_outcome_labels_are_the_codes_a_claim_can_answer() {
        let codes: std::collections::BTreeSet<&str> =
            ApiError::examples().iter().map(ApiError::code).collect();
        let listed: std::collections::BTreeSet<&str> = crate::obs::metrics::CLAIM_OUTCOMES
            .iter()
            .copied()
            .collect();
        let not_a_claim: std::collections::BTreeSet<&str> = [
            "batch_exists",
            "unknown_timezone",
            "over_budget",
            "coupon_not_found",
            "event_not_found",
            "job_not_found",
            "invalid_state",
            "not_found",
            "method_not_allowed",
        ]
        .into();
        let mut want: std::collections::BTreeSet<&str> =
            codes.difference(&not_a_claim).copied().collect();
        want.extend(["claimed", "replayed"]);
        assert_eq!(listed, want);
        assert!(not_a_claim.is_subset(&codes), "{not_a_claim:?}");
    }

    #[test]
    fn each_domain_error_has_its_answer() {
        let unavailable = BackendError::Unavailable("down".into());
        for (from, code) in [
            (ApiError::from(StockError::NotFound), "batch_not_found"),
            (StockError::Conflict.into(), "batch_exists"),
            (
                StockError::Backend(unavailable.clone()).into(),
                "backend_unavailable",
            ),
            (
                StockError::Backend(BackendError::Protocol("x".into())).into(),
                "internal",
            ),
            (StockError::Inconsistent("x".into()).into(), "internal"),
            (CatalogError::NotFound.into(), "batch_not_found"),
            (CatalogError::Lost("b".into()).into(), "backend_unavailable"),
            (DbError::NotFound("c".into()).into(), "coupon_not_found"),
            (DbError::Contended("c".into()).into(), "overloaded"),
            (DbError::Corrupt("x".into()).into(), "backend_unavailable"),
            (AuthError::MissingUser.into(), "bad_request"),
            (AuthError::Expired.into(), "unauthorized"),
            (InvalidBatch::Bad("x".into()).into(), "bad_request"),
            (
                InvalidBatch::UnknownZone(UnknownZone("Mars/Olympus".into())).into(),
                "unknown_timezone",
            ),
            (InvalidBatch::OverBudget("x".into()).into(), "over_budget"),
            (GrantError::TooManyUsers(5).into(), "bad_request"),
            (GrantError::Empty(String::new()).into(), "bad_request"),
            (
                GrantError::Catalog(CatalogError::NotFound).into(),
                "batch_not_found",
            ),
            (
                GrantError::Db(DbError::Corrupt("x".into())).into(),
                "backend_unavailable",
            ),
        ] {
            assert_eq!(from.code(), code, "{from:?}");
        }
    }
}
