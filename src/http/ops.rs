//! Operations endpoints: `/readyz` (with detail), `/metrics`, `/openapi.json`.
//!
//! Invariant kept here: `/readyz` answers 200 only when the backend is reachable with its
//! scripts loaded, the database answers, this instance's persister (if it runs one) is not
//! stalled (records waiting, no progress for `persister.stall_ms`), and the instance is not
//! draining.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

use super::App;
use super::error::json_response;
use crate::backend::Backend;
use crate::config::secret::redact_text;

/// `/readyz` gives each dependency at least this long to answer, even under a tighter
/// `redis.command_timeout_ms` (a readiness probe is not a claim; a slow answer is no outage).
const READY_MIN_WAIT: Duration = Duration::from_millis(100);

/// The API contract, kept in the tree and served as is.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub async fn ready<B: Backend>(app: &App<B>) -> Response<Full<Bytes>> {
    let limit = Duration::from_millis(app.config().redis.command_timeout_ms).max(READY_MIN_WAIT);
    // Error texts are served unauthenticated: any URL in them loses its password.
    let backend = match tokio::time::timeout(limit, app.backend().ready()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(redact_text(&e.to_string()).into_owned()),
        Err(_) => Err("timed out".to_string()),
    };
    let database = match tokio::time::timeout(limit, app.store().ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(redact_text(&e.to_string()).into_owned()),
        Err(_) => Err("timed out".to_string()),
    };
    let draining = app.is_draining();
    let lost = app.catalog().lost();
    let persister = app.persist_status().map(|s| {
        let mut p = s.snapshot();
        p.last_error = p.last_error.map(|e| redact_text(&e).into_owned());
        p
    });
    let stalled = persister.as_ref().is_some_and(|p| p.stalled);
    let ok = backend.is_ok() && database.is_ok() && !stalled && !draining;
    let body = json!({
        "ready": ok,
        "draining": draining,
        "backend": { "kind": app.backend().kind(), "ok": backend.is_ok(), "error": backend.err() },
        "database": { "kind": app.store().kind(), "ok": database.is_ok(), "error": database.err() },
        "persister": persister,
        "lost_batches": lost,
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

/// `/healthz`: the process serves HTTP.
pub fn health() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(br#"{"status":"ok"}"#)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn metrics<B: Backend>(app: &App<B>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(app.render_metrics())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

pub fn openapi() -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
