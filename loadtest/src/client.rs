//! HTTP client: one persistent HTTP/1.1 keep-alive connection per virtual client (hyper 1
//! `client::conn::http1` over a tokio `TcpStream`), reconnecting when the server closes it,
//! plus the builder that turns planned requests into gateway API calls.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::auth::TokenSigner;
use crate::cli::Target;
use crate::scenario;

/// Largest response body read; anything larger is a transport error.
const MAX_BODY: usize = 1 << 20;

const USER_AGENT: &str = concat!("claimgate-loadtest/", env!("CARGO_PKG_VERSION"));

/// A request ready to be sent.
pub type HttpRequest = Request<Full<Bytes>>;

/// A complete HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

/// A request that got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connect failed")]
    Connect(#[source] std::io::Error),
    #[error("no complete answer within the timeout")]
    Timeout,
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    #[error("reading the response body failed: {0}")]
    Body(String),
}

impl TransportError {
    /// Short name used in the counters (`connect`, `timeout`, `http`, `body`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Http(_) => "http",
            Self::Body(_) => "body",
        }
    }
}

/// One virtual client's connection. Connects lazily and reconnects whenever the previous
/// connection was closed (by the server, by an error, or after a timeout left it in an
/// unknown state).
pub struct Connection {
    target: Arc<Target>,
    sender: Option<SendRequest<Full<Bytes>>>,
    opened: u64,
}

impl Connection {
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            sender: None,
            opened: 0,
        }
    }

    /// How many TCP connections this client has opened so far.
    pub fn opened(&self) -> u64 {
        self.opened
    }

    /// Opens the connection now (if it is not open) so that the first request of the
    /// measured phase does not pay for the TCP handshake.
    pub async fn warm_up(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if self.sender.as_ref().is_some_and(|s| !s.is_closed()) {
            return Ok(());
        }
        let sender = tokio::time::timeout(timeout, self.open())
            .await
            .map_err(|_| TransportError::Timeout)??;
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request and reads the whole answer, all within `timeout`.
    pub async fn send(
        &mut self,
        req: HttpRequest,
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        match tokio::time::timeout(timeout, self.exchange(req)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                // The answer may still arrive on this connection: never reuse it.
                self.sender = None;
                Err(TransportError::Timeout)
            }
        }
    }

    async fn exchange(&mut self, mut req: HttpRequest) -> Result<Reply, TransportError> {
        // One retry, and only for a request hyper hands back unsent (the connection was
        // found closed before any byte went out), so nothing can be applied twice.
        let mut retried = false;
        loop {
            let mut current = self.sender.take();
            if let Some(s) = current.as_mut()
                && s.ready().await.is_err()
            {
                current = None;
            }
            let sender = match current {
                Some(s) => s,
                None => self.open().await?,
            };
            let sender = self.sender.insert(sender);
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let body = Limited::new(resp.into_body(), MAX_BODY)
                        .collect()
                        .await
                        .map_err(|e| TransportError::Body(e.to_string()))?
                        .to_bytes();
                    return Ok(Reply { status, body });
                }
                Err(mut e) => {
                    self.sender = None;
                    match e.take_message() {
                        Some(unsent) if !retried => {
                            retried = true;
                            req = unsent;
                        }
                        _ => return Err(TransportError::Http(e.into_error())),
                    }
                }
            }
        }
    }

    async fn open(&mut self) -> Result<SendRequest<Full<Bytes>>, TransportError> {
        let stream = TcpStream::connect(self.target.addr)
            .await
            .map_err(TransportError::Connect)?;
        stream.set_nodelay(true).map_err(TransportError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(TransportError::Http)?;
        tokio::spawn(async move {
            // Ends when the server closes the connection or the sender is dropped; the
            // next request notices and reconnects, so the error itself is not needed.
            let _ = conn.await;
        });
        self.opened += 1;
        Ok(sender)
    }
}

/// Builds gateway API requests for one target and batch.
#[derive(Debug, Clone)]
pub struct Api {
    target: Arc<Target>,
    batch_path: String,
    claims_path: String,
    health_path: String,
    ready_path: String,
    admin_auth: Option<HeaderValue>,
    signer: Option<TokenSigner>,
    /// The quote scenario's body and user (set once its wallet is ready).
    quote: Option<(Bytes, String)>,
}

/// Why a request could not be built (a token or header value that HTTP cannot carry).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot sign the user token")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("invalid request")]
    Http(#[from] hyper::http::Error),
    #[error("a header value (token?) is not valid in HTTP")]
    Header(#[from] hyper::header::InvalidHeaderValue),
    #[error("cannot encode the request body")]
    Json(#[from] serde_json::Error),
}

#[derive(Serialize)]
struct OrderBody<'a> {
    order_id: &'a str,
}

#[derive(Serialize)]
struct ClaimBody<'a> {
    user_id: &'a str,
    request_id: &'a str,
}

impl Api {
    /// `batch_id` may be empty for scenarios that never touch a batch.
    pub fn new(
        target: Arc<Target>,
        batch_id: &str,
        admin_token: Option<&str>,
        signer: Option<TokenSigner>,
    ) -> Result<Self, BuildError> {
        let admin_auth = admin_token
            .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
            .transpose()?;
        Ok(Self {
            batch_path: target.path(&format!("/v1/batches/{batch_id}")),
            claims_path: target.path(&format!("/v1/batches/{batch_id}/claims")),
            health_path: target.path("/healthz"),
            ready_path: target.path("/readyz"),
            target,
            admin_auth,
            signer,
            quote: None,
        })
    }

    /// The same API, sending `body` as the quote of `user` (the quote scenario).
    pub fn with_quote(self, body: Bytes, user: &str) -> Self {
        Self {
            quote: Some((body, user.to_string())),
            ..self
        }
    }

    /// Bearer of `user`'s signed token when tokens are signed, else the admin token.
    fn auth_as(&self, user: Option<&str>) -> Result<Option<HeaderValue>, BuildError> {
        match (user, &self.signer) {
            (Some(u), Some(s)) => Ok(Some(HeaderValue::from_str(&format!(
                "Bearer {}",
                s.token(u)?
            ))?)),
            _ => Ok(self.admin_auth.clone()),
        }
    }

    /// `GET` of an API path, as `user` (see [`Api::auth_as`]) or as the admin.
    pub fn get_as(&self, api_path: &str, user: Option<&str>) -> Result<HttpRequest, BuildError> {
        self.get(&self.target.path(api_path), self.auth_as(user)?)
    }

    /// `POST` of an API path, as `user` (see [`Api::auth_as`]) or as the admin.
    pub fn post_as(
        &self,
        api_path: &str,
        body: Bytes,
        user: Option<&str>,
    ) -> Result<HttpRequest, BuildError> {
        self.post(&self.target.path(api_path), body, self.auth_as(user)?)
    }

    /// The HTTP request for a planned request.
    pub fn build(&self, req: &scenario::Request) -> Result<HttpRequest, BuildError> {
        match req {
            scenario::Request::Health => self.get(&self.health_path, None),
            scenario::Request::GetBatch => self.get(&self.batch_path, self.admin_auth.clone()),
            scenario::Request::Claim(c) => {
                let body = serde_json::to_vec(&ClaimBody {
                    user_id: &c.user_id,
                    request_id: &c.request_id,
                })?;
                let auth = match &self.signer {
                    Some(s) => Some(HeaderValue::from_str(&format!(
                        "Bearer {}",
                        s.token(&c.user_id)?
                    ))?),
                    None => None,
                };
                self.post(&self.claims_path, Bytes::from(body), auth)
            }
            scenario::Request::Product(k) => {
                self.get(&self.target.path(&scenario::product_path(*k)), None)
            }
            scenario::Request::Quote => {
                let (body, user) = self.quote.clone().unwrap_or_default();
                self.post_as("/v1/checkout/quote", body, Some(&user))
            }
            // A checkout starts with its claim; the driver builds the later steps.
            scenario::Request::Checkout(c) => {
                self.build(&scenario::Request::Claim(c.claim.clone()))
            }
        }
    }

    /// `GET /v1/users/{user}/coupons?status=unused` as `user` (a checkout's wallet read).
    pub fn wallet_unused(&self, user: &str) -> Result<HttpRequest, BuildError> {
        self.get_as(
            &format!("/v1/users/{user}/coupons?status=unused"),
            Some(user),
        )
    }

    /// `POST /v1/coupons/{coupon}/{action}` with `{"order_id"}` as `user`; `action` is
    /// `lock` or `redeem` (a checkout's last two steps).
    pub fn coupon_action(
        &self,
        coupon: &str,
        action: &str,
        order_id: &str,
        user: &str,
    ) -> Result<HttpRequest, BuildError> {
        let body = serde_json::to_vec(&OrderBody { order_id })?;
        self.post_as(
            &format!("/v1/coupons/{coupon}/{action}"),
            Bytes::from(body),
            Some(user),
        )
    }

    /// `GET /v1/batches/{id}` with the admin token.
    pub fn get_batch(&self) -> Result<HttpRequest, BuildError> {
        self.get(&self.batch_path, self.admin_auth.clone())
    }

    /// `GET /readyz` (the persistence backlog, for `--report`).
    pub fn readyz(&self) -> Result<HttpRequest, BuildError> {
        self.get(&self.ready_path, None)
    }

    /// The same API for another batch id (a fresh batch instead of a reused one).
    pub fn for_batch(&self, batch_id: &str) -> Self {
        Self {
            batch_path: self.target.path(&format!("/v1/batches/{batch_id}")),
            claims_path: self.target.path(&format!("/v1/batches/{batch_id}/claims")),
            ..self.clone()
        }
    }

    /// `POST /v1/batches` with the admin token.
    pub fn create_batch(&self, body: Bytes) -> Result<HttpRequest, BuildError> {
        self.post(
            &self.target.path("/v1/batches"),
            body,
            self.admin_auth.clone(),
        )
    }

    fn get(&self, path: &str, auth: Option<HeaderValue>) -> Result<HttpRequest, BuildError> {
        let mut b = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::HOST, &self.target.authority)
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::ACCEPT, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        Ok(b.body(Full::new(Bytes::new()))?)
    }

    fn post(
        &self,
        path: &str,
        body: Bytes,
        auth: Option<HeaderValue>,
    ) -> Result<HttpRequest, BuildError> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, &self.target.authority)
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        Ok(b.body(Full::new(body))?)
    }
}

/// What a claim (or any API) answer says, as far as the tester cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `error` of an error body.
    pub error: Option<String>,
    /// `coupon_id` of a successful claim.
    pub coupon_id: Option<String>,
}

/// Longest error code kept verbatim; longer (or odd) codes are truncated.
const MAX_CODE: usize = 64;

/// Extracts `error` and `coupon_id` from a JSON body; anything unparsable yields nothing.
pub fn parse_body(body: &[u8]) -> Parsed {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Parsed::default();
    };
    let text = |k: &str| map.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    Parsed {
        error: text("error").map(|c| sanitize_code(&c)),
        coupon_id: text("coupon_id"),
    }
}

fn sanitize_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_CODE)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bodies_defensively() {
        assert_eq!(
            parse_body(br#"{"error":"sold_out","message":"gone"}"#),
            Parsed {
                error: Some("sold_out".into()),
                coupon_id: None
            }
        );
        assert_eq!(
            parse_body(br#"{"coupon_id":"c-1","batch_id":"b"}"#).coupon_id,
            Some("c-1".into())
        );
        assert_eq!(parse_body(b"not json"), Parsed::default());
        assert_eq!(parse_body(b"[1,2]"), Parsed::default());
        assert_eq!(parse_body(br#"{"error":42}"#), Parsed::default());
        assert_eq!(
            parse_body(format!(r#"{{"error":"{}\n"}}"#, "x".repeat(500)).as_bytes())
                .error
                .map(|e| e.len()),
            Some(MAX_CODE)
        );
    }

    #[test]
    fn builds_api_requests() {
        let target = Arc::new(crate::cli::parse_target("http://localhost:9/gw").expect("t"));
        let api = Api::new(target, "lt-1", Some("adm"), Some(TokenSigner::new("k"))).expect("api");
        let r = api
            .build(&scenario::Request::Claim(scenario::Claim {
                user_id: "u1".into(),
                request_id: "r1".into(),
            }))
            .expect("claim");
        assert_eq!(r.method(), Method::POST);
        assert_eq!(r.uri(), "/gw/v1/batches/lt-1/claims");
        assert_eq!(r.headers()[header::HOST], "localhost:9");
        let auth = r.headers()[header::AUTHORIZATION].to_str().expect("ascii");
        assert!(auth.starts_with("Bearer ey"), "{auth}");
        let g = api.build(&scenario::Request::GetBatch).expect("get");
        assert_eq!(g.uri(), "/gw/v1/batches/lt-1");
        assert_eq!(g.headers()[header::AUTHORIZATION], "Bearer adm");
        let h = api.build(&scenario::Request::Health).expect("health");
        assert_eq!(h.uri(), "/gw/healthz");
        assert!(h.headers().get(header::AUTHORIZATION).is_none());
        let r = api.readyz().expect("readyz");
        assert_eq!(r.uri(), "/gw/readyz");
        assert!(r.headers().get(header::AUTHORIZATION).is_none());
        let other = api.for_batch("lt-1-2");
        assert_eq!(
            other.get_batch().expect("get").uri(),
            "/gw/v1/batches/lt-1-2"
        );
        let c = other
            .build(&scenario::Request::Claim(scenario::Claim {
                user_id: "u1".into(),
                request_id: "r1".into(),
            }))
            .expect("claim");
        assert_eq!(c.uri(), "/gw/v1/batches/lt-1-2/claims");
        assert_eq!(
            other.get_batch().expect("get").headers()[header::AUTHORIZATION],
            "Bearer adm"
        );

        let bad = Api::new(
            Arc::new(crate::cli::parse_target("http://127.0.0.1").expect("t")),
            "b",
            Some("bad\ntoken"),
            None,
        );
        assert!(bad.is_err());
    }
}
