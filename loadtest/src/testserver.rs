//! Test-only fake gateway: a small hyper server on 127.0.0.1:0 that implements the parts
//! of the claimgate API the load tester uses (health, readiness with the persistence
//! backlog, batch create/read, claims with stock, per-user limit and idempotent replays),
//! with knobs to misbehave (delays, connection closes, overselling, replaying the wrong
//! coupon, requiring tokens, answering some claims with an error).
//!
//! Like the real gateway, it answers the re-create of a batch with the same definition
//! 201 (keeping its stock figures) and a different definition under a taken id 409.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sqlx::SqlitePool;
use tokio::net::TcpListener;

/// How the fake gateway behaves.
#[derive(Clone, Default)]
pub struct Options {
    /// Wait this long before answering anything.
    pub delay: Duration,
    /// Close each connection after this many answers (`Connection: close`).
    pub close_every: Option<u64>,
    /// Bug: ignore the stock.
    pub oversell: bool,
    /// Bug: replays get a fresh coupon id.
    pub bad_replays: bool,
    /// Admin endpoints require `Bearer <token>`.
    pub admin_token: Option<String>,
    /// Claims require an HS256 user token with this secret.
    pub user_secret: Option<String>,
    /// Persist every issued coupon into this SQLite pool (table `coupons`).
    pub db: Option<SqlitePool>,
    /// Bug: the first coupon of each batch never reaches the database.
    pub lose_first_coupon: bool,
    /// Every k-th claim (counted over all batches) is answered with this status and
    /// error code instead (`None`: no `error` field), before anything is claimed.
    pub fail_every: Option<(u64, u16, Option<&'static str>)>,
    /// `/readyz` reports a persister whose backlog is the number of coupons issued so far
    /// (`false`: `"persister": null`, as with the persister off).
    pub persister: bool,
}

#[derive(Default)]
struct Batch {
    /// The body it was created with (its definition).
    definition: Value,
    stock: u64,
    per_user_limit: u64,
    claimed: u64,
    next_coupon: u64,
    by_user: HashMap<String, u64>,
    by_request: HashMap<(String, String), String>,
}

#[derive(Default)]
struct State {
    batches: HashMap<String, Batch>,
    /// Claims received (for `fail_every`).
    claims_seen: u64,
}

/// A running fake gateway; stops when dropped.
pub struct FakeGateway {
    pub url: String,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Starts a fake gateway on an ephemeral loopback port.
pub async fn start(opts: Options) -> FakeGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::new(Mutex::new(State::default()));
    let opts = Arc::new(opts);
    let handle = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let state = Arc::clone(&state);
            let opts = Arc::clone(&opts);
            let served = Arc::new(AtomicU64::new(0));
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    let opts = Arc::clone(&opts);
                    let served = Arc::clone(&served);
                    async move {
                        let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                        let mut resp = handle(req, &state, &opts).await;
                        if opts.close_every.is_some_and(|k| n.is_multiple_of(k)) {
                            resp.headers_mut().insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    FakeGateway {
        url: format!("http://{addr}"),
        handle,
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: u16, code: &str) -> Response<Full<Bytes>> {
    reply(status, json!({"error": code, "message": code}))
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

#[derive(serde::Deserialize)]
struct TokenClaims {
    sub: String,
}

async fn handle(
    req: Request<Incoming>,
    state: &Mutex<State>,
    opts: &Options,
) -> Response<Full<Bytes>> {
    if !opts.delay.is_zero() {
        tokio::time::sleep(opts.delay).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let token = bearer(&req);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "bad_request"),
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let admin_ok = opts.admin_token.is_none() || token == opts.admin_token;
    match (&method, parts.as_slice()) {
        (&Method::GET, ["healthz"]) => reply(200, json!({"status": "ok"})),
        (&Method::GET, ["readyz"]) => {
            let st = state.lock().expect("state");
            let issued: u64 = st.batches.values().map(|b| b.claimed).sum();
            let persister = if opts.persister {
                json!({"running": true, "db_ok": true, "backlog": issued, "lag_ms": 5})
            } else {
                Value::Null
            };
            reply(
                200,
                json!({"ready": true, "draining": false, "persister": persister}),
            )
        }
        (&Method::POST, ["v1", "batches"]) => {
            if !admin_ok {
                return error(401, "unauthorized");
            }
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "bad_request");
            };
            let (Some(id), Some(stock), Some(limit)) = (
                v["id"].as_str(),
                v["stock"].as_u64(),
                v["per_user_limit"].as_u64(),
            ) else {
                return error(400, "bad_request");
            };
            let mut st = state.lock().expect("state");
            if let Some(existing) = st.batches.get(id) {
                // Idempotent re-create: the same definition is harmless, another is not.
                if existing.definition == v {
                    return reply(201, v);
                }
                return error(409, "batch_exists");
            }
            st.batches.insert(
                id.to_string(),
                Batch {
                    definition: v.clone(),
                    stock,
                    per_user_limit: limit,
                    ..Batch::default()
                },
            );
            reply(201, v)
        }
        (&Method::GET, ["v1", "batches", id]) => {
            if !admin_ok {
                return error(401, "unauthorized");
            }
            let st = state.lock().expect("state");
            match st.batches.get(*id) {
                Some(b) => reply(
                    200,
                    json!({
                        "batch": {"id": id, "per_user_limit": b.per_user_limit},
                        "stock": {"total": b.stock, "claimed": b.claimed,
                                  "remaining": b.stock.saturating_sub(b.claimed)}
                    }),
                ),
                None => error(404, "batch_not_found"),
            }
        }
        (&Method::POST, ["v1", "batches", id, "claims"]) => {
            let Ok(v) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "bad_request");
            };
            let (Some(user), Some(rid)) = (v["user_id"].as_str(), v["request_id"].as_str()) else {
                return error(400, "bad_request");
            };
            if let Some(secret) = &opts.user_secret {
                let valid = token.and_then(|t| {
                    jsonwebtoken::decode::<TokenClaims>(
                        &t,
                        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
                        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
                    )
                    .ok()
                });
                if valid.is_none_or(|d| d.claims.sub != user) {
                    return error(401, "unauthorized");
                }
            }
            let issued = {
                let mut st = state.lock().expect("state");
                st.claims_seen += 1;
                if let Some((k, status, code)) = opts.fail_every
                    && st.claims_seen.is_multiple_of(k)
                {
                    return match code {
                        Some(c) => error(status, c),
                        None => reply(status, json!({"oops": true})),
                    };
                }
                let Some(b) = st.batches.get_mut(*id) else {
                    return error(404, "batch_not_found");
                };
                let key = (user.to_string(), rid.to_string());
                if let Some(c) = b.by_request.get(&key) {
                    let coupon = if opts.bad_replays {
                        format!("{c}-again")
                    } else {
                        c.clone()
                    };
                    return reply(
                        200,
                        json!({"coupon_id": coupon, "batch_id": id, "user_id": user}),
                    );
                }
                if b.by_user.get(user).copied().unwrap_or(0) >= b.per_user_limit {
                    return error(409, "limit_reached");
                }
                if b.claimed >= b.stock && !opts.oversell {
                    return error(410, "sold_out");
                }
                b.claimed += 1;
                b.next_coupon += 1;
                let coupon = format!("{id}-c{}", b.next_coupon);
                *b.by_user.entry(user.to_string()).or_default() += 1;
                b.by_request.insert(key, coupon.clone());
                coupon
            };
            let lost = opts.lose_first_coupon && issued.ends_with("-c1");
            if let Some(db) = opts.db.as_ref().filter(|_| !lost) {
                let _ = sqlx::query("INSERT INTO coupons (coupon_id) VALUES (?)")
                    .bind(&issued)
                    .execute(db)
                    .await;
            }
            reply(
                201,
                json!({"coupon_id": issued, "batch_id": id, "user_id": user,
                       "valid_from": "2020-01-01T00:00:00Z", "valid_to": "2100-01-01T00:00:00Z"}),
            )
        }
        _ => error(404, "not_found"),
    }
}
