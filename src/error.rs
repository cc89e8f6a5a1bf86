//! API errors and their HTTP mapping: the one place where an error becomes a status code
//! and a `{"error": "<code>", "message": "<text>"}` body.
//!
//! Invariant kept here: bad input maps to a 4xx with a stable machine-readable code; only a
//! failing backend or database maps to a 5xx, and those carry `Retry-After`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use thiserror::Error;

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
    #[error("{0}")]
    InvalidState(String),
    #[error("rate limited")]
    RateLimited { retry_after_s: u64 },
    #[error("{0}")]
    Overloaded(String, u64),
    /// With the cause, for the log line; the client is told only that nothing was claimed.
    #[error("backend unavailable, nothing was claimed")]
    BackendUnavailable(String, u64),
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
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotEligible => StatusCode::FORBIDDEN,
            ApiError::BatchNotFound | ApiError::CouponNotFound | ApiError::RouteNotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::LimitReached
            | ApiError::DailyLimitReached
            | ApiError::NotStarted
            | ApiError::Ended
            | ApiError::Paused
            | ApiError::BatchExists
            | ApiError::InvalidState(_) => StatusCode::CONFLICT,
            ApiError::SoldOut => StatusCode::GONE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded(..) | ApiError::BackendUnavailable(..) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

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
            ApiError::LimitReached,
            ApiError::DailyLimitReached,
            ApiError::NotStarted,
            ApiError::Ended,
            ApiError::Paused,
            ApiError::SoldOut,
            ApiError::BatchExists,
            ApiError::InvalidState("example".into()),
            ApiError::RateLimited { retry_after_s: 1 },
            ApiError::Overloaded("example".into(), 1),
            ApiError::BackendUnavailable("example".into(), 1),
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
            ApiError::LimitReached | ApiError::DailyLimitReached => "limit_reached",
            ApiError::NotStarted => "not_started",
            ApiError::Ended => "ended",
            ApiError::Paused => "paused",
            ApiError::SoldOut => "sold_out",
            ApiError::BatchExists => "batch_exists",
            ApiError::InvalidState(_) => "invalid_state",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded(..) => "overloaded",
            ApiError::BackendUnavailable(..) => "backend_unavailable",
            ApiError::RouteNotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Internal(_) => "internal",
        }
    }

    /// What the log line of this error says (the detail of internal errors included).
    pub fn log_detail(&self) -> String {
        match self {
            ApiError::Internal(detail) | ApiError::BackendUnavailable(detail, _) => detail.clone(),
            other => other.to_string(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_s }
            | ApiError::Overloaded(_, retry_after_s)
            | ApiError::BackendUnavailable(_, retry_after_s) => Some(*retry_after_s),
            _ => None,
        }
    }

    /// The body of errors whose message never varies, rendered once: refusals answered
    /// from memory (sold out, at limit, rate limited) are the hottest responses there are.
    fn static_body(&self) -> Option<&'static str> {
        macro_rules! body {
            ($code:literal, $msg:literal) => {
                concat!(r#"{"error":""#, $code, r#"","message":""#, $msg, r#""}"#)
            };
        }
        Some(match self {
            ApiError::NotEligible => body!("not_eligible", "user is not eligible for this batch"),
            ApiError::BatchNotFound => body!("batch_not_found", "batch not found"),
            ApiError::CouponNotFound => body!("coupon_not_found", "coupon not found"),
            ApiError::LimitReached => body!("limit_reached", "per-user limit reached"),
            ApiError::DailyLimitReached => body!("limit_reached", "per-user daily limit reached"),
            ApiError::NotStarted => body!("not_started", "the claim window has not started"),
            ApiError::Ended => body!("ended", "the claim window has ended"),
            ApiError::Paused => body!("paused", "the batch is paused"),
            ApiError::SoldOut => body!("sold_out", "sold out"),
            ApiError::RateLimited { .. } => body!("rate_limited", "rate limited"),
            ApiError::RouteNotFound => body!("not_found", "no such route"),
            _ => return None,
        })
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut resp = match self.static_body() {
            Some(body) => {
                let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                *r.status_mut() = self.status();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            None => json_response(
                self.status(),
                &serde_json::json!({ "error": self.code(), "message": self.to_string() }),
            ),
        };
        if let Some(s) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let ApiError::MethodNotAllowed(allow) = self {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl From<crate::domain::auth::AuthError> for ApiError {
    fn from(e: crate::domain::auth::AuthError) -> Self {
        match e {
            crate::domain::auth::AuthError::MissingUser => ApiError::BadRequest(e.to_string()),
            _ => ApiError::Unauthorized(e.to_string()),
        }
    }
}

impl From<crate::domain::limits::LimitError> for ApiError {
    fn from(e: crate::domain::limits::LimitError) -> Self {
        match e {
            crate::domain::limits::LimitError::RateLimited { retry_after_s, .. } => {
                ApiError::RateLimited { retry_after_s }
            }
            crate::domain::limits::LimitError::Overloaded(_, retry_after_s) => {
                ApiError::Overloaded(
                    "too many claims in flight; nothing was claimed".into(),
                    retry_after_s,
                )
            }
        }
    }
}

impl From<crate::domain::batch::InvalidBatch> for ApiError {
    fn from(e: crate::domain::batch::InvalidBatch) -> Self {
        ApiError::BadRequest(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Does not compile when a variant is added: then add it to `ApiError::examples` too.
    #[allow(dead_code)]
    fn every_variant_has_an_example(e: &ApiError) {
        match e {
            ApiError::BadRequest(_)
            | ApiError::Unauthorized(_)
            | ApiError::NotEligible
            | ApiError::BatchNotFound
            | ApiError::CouponNotFound
            | ApiError::LimitReached
            | ApiError::DailyLimitReached
            | ApiError::NotStarted
            | ApiError::Ended
            | ApiError::Paused
            | ApiError::SoldOut
            | ApiError::BatchExists
            | ApiError::InvalidState(_)
            | ApiError::RateLimited { .. }
            | ApiError::Overloaded(..)
            | ApiError::BackendUnavailable(..)
            | ApiError::RouteNotFound
            | ApiError::MethodNotAllowed(_)
            | ApiError::Internal(_) => {}
        }
    }

    #[test]
    fn examples_cover_every_code() {
        let codes: std::collections::BTreeSet<_> =
            ApiError::examples().iter().map(ApiError::code).collect();
        assert_eq!(codes.len(), 18, "{codes:?}");
    }

    /// The `outcome` label set of the claims metric is exactly the success outcomes and
    /// every code (`obs` cannot ask this type: it sits below it).
    #[test]
    fn the_claim_outcome_labels_are_the_codes() {
        let mut want: std::collections::BTreeSet<&str> =
            ApiError::examples().iter().map(ApiError::code).collect();
        want.extend(["claimed", "replayed"]);
        let listed: std::collections::BTreeSet<&str> = crate::obs::metrics::CLAIM_OUTCOMES
            .iter()
            .copied()
            .collect();
        assert_eq!(listed, want);
    }

    #[test]
    fn static_bodies_equal_the_rendered_ones() {
        for e in [
            ApiError::NotEligible,
            ApiError::BatchNotFound,
            ApiError::CouponNotFound,
            ApiError::LimitReached,
            ApiError::DailyLimitReached,
            ApiError::NotStarted,
            ApiError::Ended,
            ApiError::Paused,
            ApiError::SoldOut,
            ApiError::RateLimited { retry_after_s: 1 },
            ApiError::RouteNotFound,
        ] {
            let fixed: serde_json::Value = serde_json::from_str(e.static_body().unwrap()).unwrap();
            let rendered = serde_json::json!({ "error": e.code(), "message": e.to_string() });
            assert_eq!(fixed, rendered, "{e:?}");
        }
    }

    #[test]
    fn every_error_has_a_status_code_and_body() {
        let all = [
            (ApiError::BadRequest("x".into()), 400, "bad_request"),
            (ApiError::Unauthorized("x".into()), 401, "unauthorized"),
            (ApiError::NotEligible, 403, "not_eligible"),
            (ApiError::BatchNotFound, 404, "batch_not_found"),
            (ApiError::LimitReached, 409, "limit_reached"),
            (ApiError::DailyLimitReached, 409, "limit_reached"),
            (ApiError::NotStarted, 409, "not_started"),
            (ApiError::Ended, 409, "ended"),
            (ApiError::Paused, 409, "paused"),
            (ApiError::SoldOut, 410, "sold_out"),
            (
                ApiError::RateLimited { retry_after_s: 2 },
                429,
                "rate_limited",
            ),
            (ApiError::Overloaded("x".into(), 1), 503, "overloaded"),
            (
                ApiError::BackendUnavailable("x".into(), 1),
                503,
                "backend_unavailable",
            ),
        ];
        for (e, status, code) in all {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
            let has_retry = status == 429 || status == 503;
            let resp = e.into_response();
            assert_eq!(resp.headers().contains_key(header::RETRY_AFTER), has_retry);
        }
    }
}
