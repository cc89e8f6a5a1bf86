//! `claimgate reconcile --url`: the client of a running gateway's
//! `GET /v1/admin/reconcile`, so that reconcile works while an embedded gateway holds its
//! append-only file (the keyspace lives in that process).
//!
//! Invariant kept here: the whole exchange (connect, request, answer) is bounded by the
//! caller's timeout and the answer by [`MAX_ANSWER_BYTES`]; only `http://` is spoken, the
//! batch id is checked before it goes into the query, and the admin token travels only in
//! the `Authorization` header (never in a message).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;

use crate::domain::ids::valid_batch_id;

/// The largest answer read (the differences of every batch, one line each).
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// What the gateway answered: its backend kind and every difference, one line each.
#[derive(Debug, Deserialize)]
pub struct Report {
    pub backend: String,
    pub differences: Vec<String>,
}

/// Why the gateway could not answer: the operator's mistake (a bad URL, batch or token), or
/// a gateway that is not there or failed.
#[derive(Debug)]
pub enum RemoteError {
    Usage(String),
    Unavailable(String),
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    message: String,
}

/// Asks the gateway at `base` (`http://host:port[/prefix]`) to reconcile `batch` (or every
/// batch), within `timeout`.
pub async fn reconcile(
    base: &str,
    batch: Option<&str>,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Report, RemoteError> {
    let usage = |m: String| RemoteError::Usage(m);
    let uri: Uri = base
        .parse()
        .map_err(|e| usage(format!("--url {base}: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(usage(format!(
            "--url {base}: give the gateway's http:// address (e.g. http://127.0.0.1:8080)"
        )));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| usage(format!("--url {base}: no host")))?
        .clone();
    let mut path = format!("{}/v1/admin/reconcile", uri.path().trim_end_matches('/'));
    if let Some(b) = batch {
        if !valid_batch_id(b) {
            return Err(usage(format!(
                "--batch {b:?}: not a batch id (1-64 of [A-Za-z0-9_-])"
            )));
        }
        path.push_str(&format!("?batch={b}"));
    }
    let mut req = Request::get(path.as_str())
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/json");
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| usage(format!("--url {base}: {e}")))?;
    let port = authority.port_u16().unwrap_or(80);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        let driver = tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{authority}: reading the answer: {e}"))?
            .to_bytes();
        driver.abort();
        Ok::<_, String>((status, body))
    };
    let (status, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return Err(RemoteError::Unavailable(e)),
        Err(_) => {
            return Err(RemoteError::Unavailable(format!(
                "{authority} did not answer within {}s (--timeout-s)",
                timeout.as_secs()
            )));
        }
    };
    if status == StatusCode::OK {
        return serde_json::from_slice(&body).map_err(|e| {
            RemoteError::Unavailable(format!("{authority}: not a reconcile report: {e}"))
        });
    }
    let err: Option<ErrorBody> = serde_json::from_slice(&body).ok();
    let (code, message) = err
        .map(|e| (e.error, e.message))
        .unwrap_or_else(|| (String::new(), String::from_utf8_lossy(&body).into_owned()));
    let said = format!("{authority} answered {status}: {code} {message}");
    Err(match (status.as_u16(), code.as_str()) {
        (401, _) => usage(format!(
            "{said} (give the gateway's admin token as auth.admin_token, e.g. \
             CLAIMGATE_AUTH__ADMIN_TOKEN)"
        )),
        (404, "not_found") => RemoteError::Unavailable(format!(
            "{said}: this gateway has no /v1/admin/reconcile (an older version?)"
        )),
        (400 | 404, _) => usage(said),
        _ => RemoteError::Unavailable(said),
    })
}
