//! Edge protection and the hot-key cache against a real Redis: the sold-out broadcast
//! between two gateway instances, zero Redis calls for answers from memory, the cache
//! never granting, rate limits, admission control and authentication.

mod support;

use std::sync::Arc;
use std::time::Duration;

use claimgate::backend::redis::RedisBackend;
use claimgate::config::RedisConfig;
use claimgate::http::App;
use serde_json::json;
use support::gw::*;
use tokio_util::sync::CancellationToken;

/// `EVALSHA` calls the server has executed so far.
fn evalsha_calls(g: &Gw<RedisBackend>) -> u64 {
    let info = g.redis.as_ref().unwrap().cli(&["INFO", "commandstats"]);
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A second gateway instance on the same Redis and database as `g`.
async fn second_instance(g: &Gw<RedisBackend>) -> Arc<App<RedisBackend>> {
    let backend = Arc::new(
        RedisBackend::connect(&RedisConfig {
            url: g.redis.as_ref().unwrap().url(),
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    claimgate::gateway::assemble(g.cfg.clone(), backend, g.db.clone(), None)
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sold_out_reaches_every_instance_and_then_costs_no_redis_call() {
    let a = redis_gw().await;
    let b = second_instance(&a).await;
    let stop = CancellationToken::new();
    claimgate::gateway::spawn_background(&a.app, stop.child_token());
    claimgate::gateway::spawn_background(&b, stop.child_token());
    create(&a, "bc", 5, 1, json!({"shards": 2})).await;
    // B serves the batch once, so it caches it
    assert_eq!(claim(&b, "bc", "b-user", Some("b-r1")).await.0, 201);
    for i in 0..10 {
        claim(&a.app, "bc", &format!("a{i}"), None).await;
    }
    assert_eq!(claim(&a.app, "bc", "late", None).await.0, 410);
    let entry = b.catalog().load("bc").await.unwrap();
    eventually("B learns sold out by pub/sub", || entry.is_sold_out()).await;
    eventually("B loads the winners", || entry.is_winner("x").is_some()).await;

    // From now on B answers from memory: no Redis call, with or without request ids.
    let before = evalsha_calls(&a);
    for i in 0..200 {
        let rid = format!("fresh-{i}");
        let (s, v) = claim(
            &b,
            "bc",
            &format!("loser{i}"),
            (i % 2 == 0).then_some(rid.as_str()),
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (410, Some("sold_out")));
    }
    assert_eq!(
        evalsha_calls(&a),
        before,
        "sold-out answers cost zero Redis calls"
    );
    // ... except a winner's replay, which still gets its coupon (one read)
    let (s, v) = claim(&b, "bc", "b-user", Some("b-r1")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(evalsha_calls(&a), before + 1);
    // and added stock reopens the sale on both instances
    let (s, _) = call(&a.app, "PATCH", "/v1/batches/bc", r#"{"add_stock":1}"#).await;
    assert_eq!(s, 200);
    eventually("B learns the stock was added", || !entry.is_sold_out()).await;
    assert_eq!(claim(&b, "bc", "newcomer", None).await.0, 201);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_never_grants() {
    // B never hears events (no background loops): its cache stays as stale as it can get.
    let a = redis_gw().await;
    let b = second_instance(&a).await;
    create(&a, "stale", 40, 1, json!({"shards": 4})).await;
    assert_eq!(claim(&b, "stale", "warm", None).await.0, 201);
    // paused on A: B's cache still says active, the script refuses
    call(
        &a.app,
        "PATCH",
        "/v1/batches/stale",
        r#"{"state":"paused"}"#,
    )
    .await;
    assert_eq!(
        claim(&b, "stale", "u-paused", None).await.1["error"],
        "paused"
    );
    call(
        &a.app,
        "PATCH",
        "/v1/batches/stale",
        r#"{"state":"active"}"#,
    )
    .await;
    // both instances rush the batch: exactly the stock is sold, nothing more
    let mut tasks = Vec::new();
    for i in 0..400 {
        let app = if i % 2 == 0 { a.app.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            claim(&app, "stale", &format!("r{i}"), None).await.0
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 201 {
            ok += 1;
        }
    }
    assert_eq!(ok, 39, "40 stock, 1 taken by the warm-up claim");
    let keys = a.app.catalog().load("stale").await.unwrap().keys.clone();
    let c = a.app.stock().conservation(&keys).await.unwrap();
    assert!(c.holds() && c.claimed == 40, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let g = embedded_gw_with(&[
        "limits.claim_per_user.per_second=2".into(),
        "limits.claim_per_user.burst=2".into(),
    ])
    .await;
    create(&g, "rl", 100, 10, json!({})).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(claim(&g.app, "rl", "eager", None).await.0);
        }
        v
    };
    assert_eq!(statuses, vec![201, 201, 429, 429]);
    let (s, v) = claim(&g.app, "rl", "eager", None).await;
    assert_eq!((s, v["error"].as_str()), (429, Some("rate_limited")));
    assert_eq!(
        claim(&g.app, "rl", "patient", None).await.0,
        201,
        "limits are per user"
    );
    // the limited claims never reached the backend
    let keys = g.app.catalog().load("rl").await.unwrap().keys.clone();
    assert_eq!(g.app.stock().conservation(&keys).await.unwrap().claimed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_sheds_with_503_and_claims_nothing_for_shed_requests() {
    let g = redis_gw_with(&[
        "limits.max_inflight=2".into(),
        "limits.admission_wait_ms=0".into(),
    ])
    .await;
    create(&g, "adm", 10_000, 1, json!({})).await;
    let mut tasks = Vec::new();
    for i in 0..300 {
        let app = g.app.clone();
        tasks.push(tokio::spawn(async move {
            claim(&app, "adm", &format!("u{i}"), None).await
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (201, _) => ok += 1,
            (503, v) => {
                assert_eq!(v["error"], "overloaded");
                shed += 1;
            }
            (s, v) => panic!("{s} {v}"),
        }
    }
    assert!(
        shed > 0,
        "300 concurrent claims through 2 slots with no wait must shed some"
    );
    let keys = g.app.catalog().load("adm").await.unwrap().keys.clone();
    assert_eq!(
        g.app.stock().conservation(&keys).await.unwrap().claimed,
        ok,
        "shed requests claimed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_admin_token_and_user_jwt() {
    let secret = "0123456789abcdef0123456789abcdef";
    let g = embedded_gw_with(&[
        "auth.admin_token=\"admin-token-0123456789\"".into(),
        format!("auth.user_token_secret=\"{secret}\""),
    ])
    .await;
    let body = batch_json("au", 10, 1, json!({}));
    assert_eq!(
        call(&g.app, "POST", "/v1/batches", body.clone()).await.0,
        401
    );
    let req = |path: &str, body: String, auth: &str| {
        http::Request::builder()
            .method("POST")
            .uri(path)
            .header("authorization", format!("Bearer {auth}"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap()
    };
    let peer = "127.0.0.1:1".parse().unwrap();
    let r = claimgate::http::router::handle(
        &g.app,
        req("/v1/batches", body, "admin-token-0123456789"),
        peer,
    )
    .await;
    assert_eq!(r.status(), 201);
    let token = |sub: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": sub, "exp": 4_102_444_800u64}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    assert_eq!(claim(&g.app, "au", "u1", None).await.0, 401, "no token");
    let ok = claimgate::http::router::handle(
        &g.app,
        req("/v1/batches/au/claims", "{}".into(), &token("u1")),
        peer,
    )
    .await;
    assert_eq!(ok.status(), 201);
    let mismatch = claimgate::http::router::handle(
        &g.app,
        req(
            "/v1/batches/au/claims",
            r#"{"user_id":"u2"}"#.into(),
            &token("u1"),
        ),
        peer,
    )
    .await;
    assert_eq!(mismatch.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_closed_then_recovers() {
    let mut g = redis_gw_on(support::RedisServer::start_with_aof(), &[]).await;
    create(&g, "down", 50, 1, json!({"shards": 2})).await;
    assert_eq!(claim(&g.app, "down", "before", None).await.0, 201);

    g.redis.as_mut().unwrap().kill();
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/batches/down/claims")
        .header("x-request-id", "trace-me-1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"user_id":"during"}"#,
        )))
        .unwrap();
    let resp = claimgate::http::router::handle(&g.app, req, "127.0.0.1:1".parse().unwrap()).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.headers()["x-request-id"], "trace-me-1");
    for i in 0..20 {
        let (s, v) = claim(&g.app, "down", &format!("d{i}"), None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (503, Some("backend_unavailable")),
            "{v}"
        );
    }

    // back with its data (AOF) but without scripts: NOSCRIPT is reloaded transparently
    g.redis.as_mut().unwrap().restart();
    let mut recovered = false;
    for _ in 0..100 {
        if claim(&g.app, "down", "after", None).await.0 == 201 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "claims flow again once Redis is back");
    let keys = g.app.catalog().load("down").await.unwrap().keys.clone();
    let c = g.app.stock().conservation(&keys).await.unwrap();
    assert!(
        c.holds() && c.claimed == 2,
        "nothing was claimed during the outage: {c:?}"
    );
}

/// Regression (hardening item 1): a second request for a batch that does not exist, after
/// its "missing" mark expired, deadlocked the worker thread for good (a dashmap read guard
/// held across a remove). Under a watchdog: a hang fails the test instead of stalling CI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_batch_asked_again_after_the_negative_ttl_does_not_hang() {
    let _wd = support::watchdog::Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&["cache.missing_ttl_ms=1".to_string()]).await;
    for round in 0..3 {
        support::watchdog::step(format!("round {round}: claim and GET an unknown batch"));
        let (s, v) = claim(&g.app, "no-such-batch", "u1", None).await;
        assert_eq!((s, v["error"].as_str()), (404, Some("batch_not_found")));
        let (s, _) = call(&g.app, "GET", "/v1/batches/no-such-batch", "").await;
        assert_eq!(s, 404);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    support::watchdog::step("healthz after the unknown batches");
    let (s, _) = call(&g.app, "GET", "/healthz", "").await;
    assert_eq!(s, 200);
}
