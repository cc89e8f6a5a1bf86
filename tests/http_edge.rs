//! The HTTP edge under an adversary (hardening items 5, 6, 7, 9, 13, 14): silent and
//! preface-only connections, a replay after the user's eligibility changed, timestamps the
//! scripts cannot carry, not-yet-valid tokens, an oversized body written whole before the
//! reply is read, and a flood of distinct rate-limit keys.
//!
//! Socket tests run the real server (`claimgate::http::server::serve`) on a real loopback listener;
//! the others go through the real router, on both backends where the behaviour is the
//! backend's.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use claimgate::backend::Backend;
use claimgate::http::App;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::gw::*;
use support::watchdog::{Watchdog, step};
use tokio_util::sync::CancellationToken;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The real server of `app` on an ephemeral loopback port.
async fn listen<B: Backend>(app: &Arc<App<B>>, stop: &CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(claimgate::http::server::serve(
        app.clone(),
        listener,
        stop.clone(),
    ));
    addr
}

/// Reads until the server closes the connection (EOF or reset); `Err` if it is still open
/// after `limit`.
fn closed_by_server_within(s: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(format!("still open after {limit:?}"));
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(started.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("still open after {limit:?}"));
            }
            Err(_) => return Ok(started.elapsed()), // reset: closed too
        }
    }
}

/// One HTTP/1.1 request on a fresh connection; the raw response (status line first).
fn raw_http1(addr: SocketAddr, request: &[u8], limit: Duration) -> std::io::Result<String> {
    raw_http1_in_two(addr, request, &[], limit)
}

/// Writes `head`, pauses (the server may answer meanwhile, as it does to an oversized
/// `Content-Length`), writes `body`, and only then reads: as Python's http.client does.
fn raw_http1_in_two(
    addr: SocketAddr,
    head: &[u8],
    body: &[u8],
    limit: Duration,
) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.write_all(head)?;
    if !body.is_empty() {
        std::thread::sleep(Duration::from_millis(100));
        s.write_all(body)?;
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if complete_response(&out) {
                    break;
                }
            }
            Err(e) if out.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Headers and a `Content-Length` body fully received.
fn complete_response(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= len
}

/// A request through the router with extra headers.
async fn request<B: Backend>(
    app: &App<B>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> (u16, Value) {
    let mut b = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = claimgate::http::router::handle(app, req, "127.0.0.1:40000".parse().unwrap()).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

// ---- item 5: every connection gets a deadline, whatever its protocol ------------------------

/// Regression (hardening item 5): with `server.http2 = true` the protocol sniff had no
/// deadline, so silent sockets and sockets that sent only the h2 preface held every
/// connection slot for good and nobody else was served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_silent_and_preface_only_connections_are_closed_after_the_deadline() {
    let _wd = Watchdog::arm(Duration::from_secs(90));
    for http2 in [true, false] {
        step(format!("http2 = {http2}"));
        silent_and_preface_only_connections(http2).await;
    }
}

async fn silent_and_preface_only_connections(http2: bool) {
    let g = embedded_gw_with(&[
        "server.max_connections=4".into(),
        "server.header_read_timeout_ms=300".into(),
        format!("server.http2={http2}"),
    ])
    .await;
    let stop = CancellationToken::new();
    let addr = listen(&g.app, &stop).await;

    let outcome = tokio::task::spawn_blocking(move || {
        step("open 4 silent and 4 preface-only connections (twice the limit)");
        let mut socks = Vec::new();
        for i in 0..8 {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 1 {
                s.write_all(H2_PREFACE).unwrap();
            }
            socks.push(s);
        }
        step("each is closed by the server");
        let started = Instant::now();
        for (i, s) in socks.iter_mut().enumerate() {
            let kind = if i % 2 == 1 { "preface-only" } else { "silent" };
            let left = Duration::from_secs(10).saturating_sub(started.elapsed());
            closed_by_server_within(s, left)
                .map_err(|e| format!("http2 = {http2}: {kind} connection {i}: {e}"))?;
        }
        step("a normal client is served while the attackers' sockets stay open on their side");
        let resp = raw_http1(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .map_err(|e| format!("normal client: {e}"))?;
        drop(socks);
        Ok::<String, String>(resp)
    })
    .await
    .unwrap();
    let resp = outcome.unwrap_or_else(|e| panic!("{e}"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    stop.cancel();
}

/// Item 5, HTTP/2 keep-alive: a peer that completes the handshake but never answers a PING
/// is closed after the ping timeout, long before the idle bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_http2_peer_that_never_answers_pings_is_closed() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&[
        "server.header_read_timeout_ms=30000".into(),
        "server.http2_keep_alive_interval_ms=200".into(),
        "server.http2_keep_alive_timeout_ms=200".into(),
    ])
    .await;
    let stop = CancellationToken::new();
    let addr = listen(&g.app, &stop).await;
    let r = tokio::task::spawn_blocking(move || {
        step("h2 preface + empty SETTINGS, then silence");
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(H2_PREFACE).unwrap();
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
        closed_by_server_within(&mut s, Duration::from_secs(5))
    })
    .await
    .unwrap();
    let took = r.unwrap_or_else(|e| panic!("h2 peer ignoring pings: {e}"));
    assert!(took < Duration::from_secs(5), "{took:?}");
    stop.cancel();
}

/// Item 5: HTTP/2 (prior knowledge) and HTTP/1.1 are both still served on one port, and an
/// HTTP/2 connection left idle with no open stream is closed after the idle bound
/// (`server.header_read_timeout_ms`) even though its client answers every ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_http2_and_http1_are_served_and_idle_http2_is_closed() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&["server.header_read_timeout_ms=400".into()]).await;
    let stop = CancellationToken::new();
    let addr = listen(&g.app, &stop).await;

    step("an HTTP/2 client");
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for _ in 0..3 {
        let req = http::Request::get(format!("http://{addr}/healthz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), h2.request(req))
            .await
            .expect("h2 request timed out")
            .expect("h2 request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
    }

    step("an HTTP/1.1 client on the same port");
    let resp = tokio::task::spawn_blocking(move || {
        raw_http1(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    step("an HTTP/2 connection left idle (a live client: it answers pings) is closed");
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/healthz"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "idle HTTP/2 connection still open after {:?}",
        idle_from.elapsed()
    );
    assert!(
        idle_from.elapsed() >= Duration::from_millis(300),
        "closed too early"
    );
    stop.cancel();
}

// ---- item 13: an oversized body written whole before reading still gets the 400 ----------

/// Regression (hardening item 13): a client that writes its whole oversized body before it
/// reads (Python's http.client does) got a broken pipe instead of the 400 JSON error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_oversized_body_written_before_reading_gets_the_400_json_error() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw().await; // server.max_body_bytes = 16 KiB
    let stop = CancellationToken::new();
    let addr = listen(&g.app, &stop).await;
    // 600 KiB is under the default linger bound (server.linger_max_bytes, 1 MiB)
    for (size, chunked) in [(600 * 1024, false), (64 * 1024, false), (600 * 1024, true)] {
        step(format!("{size} bytes, chunked: {chunked}"));
        let resp = tokio::task::spawn_blocking(move || {
            let json = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(size));
            let mut body = Vec::new();
            let head = if chunked {
                for part in json.as_bytes().chunks(8192) {
                    body.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    body.extend_from_slice(part);
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"0\r\n\r\n");
                "POST /v1/batches/b/claims HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
            } else {
                body.extend_from_slice(json.as_bytes());
                format!(
                    "POST /v1/batches/b/claims HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    json.len()
                )
            };
            // the whole request is written before anything is read
            raw_http1_in_two(addr, head.as_bytes(), &body, Duration::from_secs(10))
        })
        .await
        .unwrap();
        let resp = resp.unwrap_or_else(|e| panic!("{size} bytes (chunked {chunked}): {e}"));
        assert!(resp.starts_with("HTTP/1.1 400"), "{size}: {resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{size}: {resp}"
        );
        let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        assert_eq!(v["error"], "bad_request", "{size}: {resp}");
    }
    step("the server still serves");
    let resp = tokio::task::spawn_blocking(move || {
        raw_http1(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    stop.cancel();
}

/// Item 13: lingering is bounded. A client that never stops sending is cut off after
/// `server.linger_ms`, and its connection slot serves the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_lingering_after_an_oversized_body_is_bounded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&[
        "server.max_connections=1".into(),
        "server.linger_ms=300".into(),
    ])
    .await;
    let stop = CancellationToken::new();
    let addr = listen(&g.app, &stop).await;
    let cut_off = tokio::task::spawn_blocking(move || {
        step("a 1 GB body, sent until the server closes");
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"POST /v1/batches/b/claims HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n",
        )
        .unwrap();
        let started = Instant::now();
        let chunk = vec![b'x'; 64 * 1024];
        while started.elapsed() < Duration::from_secs(10) {
            if s.write_all(&chunk).is_err() {
                return Some(started.elapsed());
            }
        }
        None
    })
    .await
    .unwrap();
    let took = cut_off.expect("the server never stopped reading");
    assert!(took < Duration::from_secs(5), "{took:?}");
    step("the slot is free again");
    let resp = tokio::task::spawn_blocking(move || {
        raw_http1(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
    })
    .await
    .unwrap()
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    stop.cancel();
}

// ---- item 6: a replay answers whatever the user's eligibility is now ---------------------

async fn replay_after_eligibility_changed<B: Backend>(g: &Gw<B>) {
    let extra =
        json!({"eligibility": {"deny_users": [], "require_tags": ["vip"], "new_users_only": true}});
    create(g, "elig", 10, 2, extra).await;
    let path = "/v1/batches/elig/claims";
    let body = |rid: &str| json!({"user_id": "u1", "request_id": rid}).to_string();
    let eligible = [
        ("x-user-tags", "vip,gold".to_string()),
        ("x-new-user", "true".to_string()),
    ];
    let (s, first) = request(&g.app, "POST", path, &eligible, body("r1")).await;
    assert_eq!(s, 201, "{first}");
    for (what, headers) in [
        ("tag gone", vec![("x-new-user", "true".to_string())]),
        ("no longer new", vec![("x-user-tags", "vip".to_string())]),
        ("neither", vec![]),
    ] {
        let (s, v) = request(&g.app, "POST", path, &headers, body("r1")).await;
        assert_eq!(s, 200, "{what}: {v}");
        assert_eq!(v["coupon_id"], first["coupon_id"], "{what}");
        assert_eq!(v["valid_to"], first["valid_to"], "{what}");
    }
    // a request id that never succeeded is still refused
    let (s, v) = request(&g.app, "POST", path, &[], body("r2")).await;
    assert_eq!((s, v["error"].as_str()), (403, Some("not_eligible")), "{v}");
    // and nothing more was claimed
    let keys = g.app.catalog().load("elig").await.unwrap().keys.clone();
    assert_eq!(g.app.stock().conservation(&keys).await.unwrap().claimed, 1);
}

/// Regression (hardening item 6): a replay of a request id answered 403 `not_eligible` once
/// the user's tags or new-user flag had changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_replay_after_eligibility_changed_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    replay_after_eligibility_changed(&embedded_gw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_replay_after_eligibility_changed_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    replay_after_eligibility_changed(&redis_gw().await).await;
}

/// Item 6 with verified tokens: the second token carries other tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_replay_with_a_token_whose_tags_changed() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let secret = "0123456789abcdef0123456789abcdef";
    let g = embedded_gw_with(&[format!("auth.user_token_secret=\"{secret}\"")]).await;
    create(
        &g,
        "elig-jwt",
        10,
        1,
        json!({"eligibility": {"require_tags": ["vip"]}}),
    )
    .await;
    let token = |tags: Value| {
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": "u1", "exp": 4_102_444_800u64, "tags": tags}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        vec![("authorization", format!("Bearer {t}"))]
    };
    let path = "/v1/batches/elig-jwt/claims";
    let body = json!({"request_id": "r1"}).to_string();
    let (s, first) = request(&g.app, "POST", path, &token(json!(["vip"])), body.clone()).await;
    assert_eq!(s, 201, "{first}");
    let (s, again) = request(&g.app, "POST", path, &token(json!([])), body).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["coupon_id"], first["coupon_id"]);
}

// ---- item 7: timestamps the scripts and RFC 3339 cannot carry are refused at create -------

async fn timestamps_out_of_range<B: Backend>(g: &Gw<B>) {
    let cases = [
        (
            "validity before 1970",
            json!({"validity": {"start": "1969-12-31T23:59:59Z", "end": "2100-01-01T00:00:00Z"}}),
        ),
        (
            "validity wholly before 1970",
            json!({"validity": {"start": "1960-01-01T00:00:00Z", "end": "1965-01-01T00:00:00Z"}}),
        ),
        (
            "validity start a millisecond before 1970",
            json!({"validity": {"start": "1969-12-31T23:59:59.999Z", "end": "2100-01-01T00:00:00Z"}}),
        ),
        (
            "claim window before 1970",
            json!({"claim_window": {"start": "1969-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}}),
        ),
        (
            "validity end past year 9999 in UTC",
            json!({"validity": {"start": "2020-01-01T00:00:00Z", "end": "9999-12-31T23:00:00-05:00"}}),
        ),
        (
            "window end past year 9999 in UTC",
            json!({"claim_window": {"start": "2020-01-01T00:00:00Z", "end": "9999-12-31T23:30:00-01:00"}}),
        ),
        (
            "validity start before year 0 in UTC",
            json!({"validity": {"start": "0000-01-01T00:00:00+01:00", "end": "2100-01-01T00:00:00Z"}}),
        ),
    ];
    for (i, (what, extra)) in cases.into_iter().enumerate() {
        let (s, v) = call(
            &g.app,
            "POST",
            "/v1/batches",
            batch_json(&format!("ts{i}"), 10, 1, extra),
        )
        .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("bad_request")),
            "{what}: {v}"
        );
        let (s, _) = call(&g.app, "GET", &format!("/v1/batches/ts{i}"), "").await;
        assert_eq!(s, 404, "{what}: nothing was created");
    }

    // The edges that are allowed work end to end, replay included: no 5xx anywhere.
    let extra =
        json!({"validity": {"start": "1970-01-01T00:00:00Z", "end": "9999-12-31T23:59:59.999Z"}});
    create(g, "ts-edge", 10, 1, extra).await;
    let (s, first) = claim(&g.app, "ts-edge", "u1", Some("r1")).await;
    assert_eq!(s, 201, "{first}");
    assert_eq!(first["valid_from"], "1970-01-01T00:00:00Z");
    assert_eq!(first["valid_to"], "9999-12-31T23:59:59.999Z");
    for _ in 0..2 {
        let (s, v) = claim(&g.app, "ts-edge", "u1", Some("r1")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["coupon_id"], first["coupon_id"]);
        assert_eq!(v["valid_from"], first["valid_from"]);
    }
    // a patch cannot move the window end out of range either
    for end in ["1969-12-31T00:00:00Z", "9999-12-31T23:59:00-01:00"] {
        let (s, v) = call(
            &g.app,
            "PATCH",
            "/v1/batches/ts-edge",
            json!({"claim_window": {"end": end}}).to_string(),
        )
        .await;
        assert_eq!(
            (s, v["error"].as_str()),
            (400, Some("bad_request")),
            "{end}: {v}"
        );
    }
    let (s, v) = call(&g.app, "GET", "/v1/batches/ts-edge", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["batch"]["claim_window"]["end"], "2100-01-01T00:00:00Z");
}

/// Regression (hardening item 7): a batch with fixed validity before 1970 was accepted,
/// answered 201 on claim and then 500 on every replay (`(%d+)` matches no negative number).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_timestamps_out_of_range_are_refused_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    timestamps_out_of_range(&embedded_gw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_timestamps_out_of_range_are_refused_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    timestamps_out_of_range(&redis_gw().await).await;
}

// ---- item 9: a token that is not yet valid is refused -------------------------------------

/// Regression (hardening item 9): JWT `nbf` was ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_token_not_yet_valid_is_refused_within_leeway_accepted() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let secret = "0123456789abcdef0123456789abcdef";
    let g = embedded_gw_with(&[
        format!("auth.user_token_secret=\"{secret}\""),
        "auth.user_token_leeway_s=30".into(),
    ])
    .await;
    create(&g, "nbf", 10, 5, json!({})).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claim_with = |nbf: i64| {
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": "u1", "exp": now + 3600, "nbf": nbf}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let app = g.app.clone();
        async move {
            request(
                &app,
                "POST",
                "/v1/batches/nbf/claims",
                &[("authorization", format!("Bearer {t}"))],
                "{}",
            )
            .await
        }
    };
    for future in [now + 3600, now + 120] {
        let (s, v) = claim_with(future).await;
        assert_eq!((s, v["error"].as_str()), (401, Some("unauthorized")), "{v}");
    }
    for ok in [now - 60, now, now + 10] {
        let (s, v) = claim_with(ok).await;
        assert_eq!(s, 201, "nbf {} s from now: {v}", ok - now);
    }
}

// ---- item 14: the rate limiters' memory is bounded ------------------------------------------

/// Regression (hardening item 14): `limits.max_tracked_keys` was never enforced; a flood of
/// distinct user ids or client IPs grew the limiters without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item14_a_flood_of_distinct_keys_stays_within_max_tracked_keys() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&[
        "limits.claim_per_user.per_second=1000".into(),
        "limits.claim_per_ip.per_second=1000".into(),
        "limits.other_per_ip.per_second=1000".into(),
        "limits.trusted_proxies=[\"127.0.0.1\"]".into(),
        "limits.max_tracked_keys=64".into(),
    ])
    .await;
    create(&g, "flood", 100_000, 1, json!({})).await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let app = g.app.clone();
        tasks.push(tokio::spawn(async move {
            let mut worst = 0;
            for i in 0..500 {
                let ip = format!("10.{w}.{}.{}", i / 256, i % 256);
                let headers = [("x-forwarded-for", ip)];
                let body = json!({"user_id": format!("flood-{w}-{i}")}).to_string();
                let (s, v) =
                    request(&app, "POST", "/v1/batches/flood/claims", &headers, body).await;
                assert_eq!(s, 201, "{v}");
                let (s, _) = request(&app, "GET", "/v1/batches/flood", &headers, "").await;
                assert_eq!(s, 200);
                let t = app.api().limits().tracked_keys();
                worst = worst.max(t.user).max(t.ip).max(t.other_ip);
            }
            worst
        }));
    }
    step("2000 distinct users and IPs");
    let mut worst = 0;
    for t in tasks {
        worst = worst.max(t.await.unwrap());
    }
    let t = g.app.api().limits().tracked_keys();
    assert!(
        worst <= 64 && t.user <= 64 && t.ip <= 64 && t.other_ip <= 64,
        "tracked keys went over the bound of 64: worst {worst}, now {t:?}"
    );
    // the limiter still limits: a user over its rate is refused
    let g2 = embedded_gw_with(&[
        "limits.claim_per_user.per_second=1".into(),
        "limits.claim_per_user.burst=1".into(),
        "limits.max_tracked_keys=8".into(),
    ])
    .await;
    create(&g2, "flood2", 100, 10, json!({})).await;
    assert_eq!(claim(&g2.app, "flood2", "eager", None).await.0, 201);
    assert_eq!(claim(&g2.app, "flood2", "eager", None).await.0, 429);
}
