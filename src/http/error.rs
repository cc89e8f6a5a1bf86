//! How an [`ApiError`] is written as HTTP: its status code, the `{"error": "<code>",
//! "message": "<text>"}` body, and its headers (`Retry-After`, `Allow`).
//!
//! Invariant kept here: every 429 and 503 carries `Retry-After`; the bodies of the hottest
//! refusals (answered from memory) are rendered once, and equal the rendered ones.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

pub use crate::api::ApiError;

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::UnknownTimezone(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotEligible => StatusCode::FORBIDDEN,
            ApiError::BatchNotFound
            | ApiError::CouponNotFound
            | ApiError::EventNotFound
            | ApiError::JobNotFound
            | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::LimitReached
            | ApiError::DailyLimitReached
            | ApiError::NotStarted
            | ApiError::Ended
            | ApiError::Paused
            | ApiError::BatchExists
            | ApiError::OverBudget(_)
            | ApiError::InvalidState(_) => StatusCode::CONFLICT,
            ApiError::SoldOut => StatusCode::GONE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded(_)
            | ApiError::BackendUnavailable(_)
            | ApiError::NotReplicated(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// `Retry-After` seconds: the limiter's wait for a 429, `retry_after_s`
    /// (`limits.retry_after_s`) for a 503, none otherwise.
    fn retry_after(&self, retry_after_s: u64) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_s } => Some(*retry_after_s),
            ApiError::Overloaded(_)
            | ApiError::BackendUnavailable(_)
            | ApiError::NotReplicated(_) => Some(retry_after_s),
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
            ApiError::EventNotFound => body!("event_not_found", "event not found"),
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

    /// The response; a 503 tells the client to retry after `retry_after_s`.
    pub fn into_response(self, retry_after_s: u64) -> Response<Full<Bytes>> {
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
        if let Some(s) = self.retry_after(retry_after_s) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_bodies_equal_the_rendered_ones() {
        for e in [
            ApiError::NotEligible,
            ApiError::BatchNotFound,
            ApiError::CouponNotFound,
            ApiError::EventNotFound,
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
            (ApiError::EventNotFound, 404, "event_not_found"),
            (ApiError::JobNotFound, 404, "job_not_found"),
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
            (ApiError::Overloaded("x".into()), 503, "overloaded"),
            (ApiError::NotReplicated("x".into()), 503, "indeterminate"),
            (
                ApiError::BackendUnavailable("x".into()),
                503,
                "backend_unavailable",
            ),
        ];
        for (e, status, code) in all {
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
            let has_retry = status == 429 || status == 503;
            let resp = e.into_response(1);
            assert_eq!(resp.headers().contains_key(header::RETRY_AFTER), has_retry);
        }
    }
}
