//! One delivery attempt: POST the stored body to `events.webhook_url` with its event id and
//! signature headers, over a pooled HTTP/1.1 client.
//!
//! Invariant kept here: an attempt is bounded (`events.connect_timeout_ms` for the
//! connection, `events.request_timeout_ms` for the whole attempt, answer included), and
//! only a 2xx answer counts as delivered; anything else (no connection, a reset, no answer
//! in time, any other status) is a failed attempt with its reason.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::signature::{EVENT_ID_HEADER, SIGNATURE_HEADER, sign};
use crate::config::{EventsConfig, Secret};

/// Bytes of a failed answer's body kept for the ledger's `last_error`.
const ERROR_BODY_BYTES: usize = 256;

/// Why an attempt failed: the HTTP status when there was an answer, and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: Option<u16>,
    pub error: String,
}

/// The webhook endpoint and its client.
pub struct Webhook {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: http::Uri,
    secret: Secret,
    timeout: Duration,
}

impl Webhook {
    /// The configured webhook; `None` when `events.webhook_url` is unset (the loader
    /// guarantees a valid URL and a secret when it is set).
    pub fn new(cfg: &EventsConfig) -> Option<Webhook> {
        let uri: http::Uri = cfg.webhook_url.as_ref()?.parse().ok()?;
        let secret = cfg.webhook_secret.clone()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(cfg.concurrency as usize)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Some(Webhook {
            client,
            uri,
            secret,
            timeout: Duration::from_millis(cfg.request_timeout_ms),
        })
    }

    /// POSTs `body` (event `event_id`) signed at unix second `t`. `Ok(status)` for a 2xx.
    pub async fn post(&self, event_id: &str, body: &str, t: i64) -> Result<u16, Failure> {
        let signature = sign(self.secret.as_bytes(), t, body.as_bytes());
        let req = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("claimgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(EVENT_ID_HEADER, event_id)
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| Failure {
                status: None,
                error: format!("cannot build the request: {e}"),
            })?;
        let attempt = async {
            let resp = self.client.request(req).await.map_err(|e| Failure {
                status: None,
                error: error_chain(&e),
            })?;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                // the body is not needed; dropping it unread only costs the connection
                return Ok(status);
            }
            let text = match Limited::new(resp.into_body(), ERROR_BODY_BYTES)
                .collect()
                .await
            {
                Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                Err(_) => String::new(),
            };
            let text: String = text.chars().filter(|c| !c.is_control()).collect();
            Err(Failure {
                status: Some(status),
                error: if text.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {text}")
                },
            })
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Failure {
                status: None,
                error: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
        }
    }
}

/// An error and its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
