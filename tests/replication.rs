//! `redis.ack = "replica"` against a real primary and replica, through real gateways over
//! HTTP, with a real PostgreSQL.
//!
//! Invariants checked here: under `replica`, a claim is answered 201 (or replayed 200) only
//! once a replica holds it; while no replica confirms, the answer is 503 `not_replicated`
//! and the database receives nothing the replica lacks; once the replica is back, the same
//! request ids answer the very coupons minted meanwhile. Under `leader` (the control) the
//! same outage still gets 201s: the claims a failover would lose.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use claimgate::config::DatabaseConfig;
use claimgate::domain::ids::home_shard;
use claimgate::store::Db;
use serde_json::{Value, json};
use support::http::Http;
use support::watchdog::{Watchdog, step};
use support::{Gateway, PgDb, RedisServer};

const SHARDS: u32 = 4;
const ACK_TIMEOUT_MS: u64 = 200;

fn gateway(redis: &RedisServer, db_url: &str, extra: &[&str]) -> Gateway {
    let mut args: Vec<String> = [
        "--backend",
        "redis",
        "--set",
        "limits.claim_per_user.per_second=0",
        "--set",
        "persister.flush_interval_ms=5",
        "--set",
        "persister.backoff_max_ms=200",
        "--set",
        "cache.refresh_ms=100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--redis-url".into(), redis.url()]);
    args.extend(["--database-url".into(), db_url.to_string()]);
    for e in extra {
        args.extend(["--set".to_string(), e.to_string()]);
    }
    Gateway::start(&args)
}

async fn ready(http: &Http) {
    for _ in 0..200 {
        if let Ok((200, _)) = http.send("GET", "/healthz", "").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway not healthy");
}

/// Claims for every user concurrently (request id `r-<user>`): user -> (status, body).
async fn claim(http: &Http, users: &[String]) -> HashMap<String, (u16, Value)> {
    let mut tasks = tokio::task::JoinSet::new();
    for u in users {
        let (http, u) = (http.clone(), u.clone());
        tasks.spawn(async move {
            let body = json!({"user_id": u, "request_id": format!("r-{u}")}).to_string();
            let r = http
                .send("POST", "/v1/batches/rep/claims", &body)
                .await
                .expect("an answer");
            (u, r)
        });
    }
    let mut out = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        let (u, r) = r.unwrap();
        out.insert(u, r);
    }
    out
}

fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// The coupon the server with this port holds for (user, its request id), if any.
fn coupon_on(server: &RedisServer, user: &str) -> Option<String> {
    let key = format!("cg:{{rep:{}}}:req", home_shard(user, SHARDS));
    let v = server.cli(&["HGET", &key, &format!("{user}|r-{user}")]);
    let v = v.trim();
    (!v.is_empty()).then(|| v.split('|').next().unwrap().to_string())
}

async fn rows(db: &Db) -> u64 {
    db.claim_counts("rep").await.unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_ack_answers_only_what_a_replica_holds() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let pg = PgDb::create();
    let ack_timeout = format!("redis.ack_timeout_ms={ACK_TIMEOUT_MS}");
    let safe = gateway(&primary, &pg.url, &["redis.ack=\"replica\"", &ack_timeout]);
    // the control: acknowledges on the primary alone; no persister (the database then holds
    // only what the replica-mode persister confirmed)
    let fast = gateway(&primary, &pg.url, &["persister.enabled=false"]);
    let (safe_http, fast_http) = (Http::new(&safe.base()), Http::new(&fast.base()));
    ready(&safe_http).await;
    ready(&fast_http).await;
    let db = Db::connect(&DatabaseConfig {
        url: pg.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let batch = json!({
        "id": "rep", "name": "replicated", "stock": 500, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": SHARDS
    });
    let (s, v) = safe_http
        .send("POST", "/v1/batches", &batch.to_string())
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    step("healthy replica: every claim confirmed");
    let healthy = claim(&safe_http, &users("h", 40)).await;
    for (u, (s, v)) in &healthy {
        assert_eq!(*s, 201, "{u}: {v}");
        let c = v["coupon_id"].as_str().unwrap();
        assert_eq!(
            coupon_on(&replica, u).as_deref(),
            Some(c),
            "{u} on the replica"
        );
    }

    step("replica stopped: 503 not_replicated, nothing reaches the database");
    let settled = Instant::now();
    while rows(&db).await < 40 {
        assert!(
            settled.elapsed() < Duration::from_secs(20),
            "persister stuck"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica.pause();
    let started = Instant::now();
    let stalled = claim(&safe_http, &users("s", 12)).await;
    for (u, (s, v)) in &stalled {
        assert_eq!(
            (*s, v["error"].as_str()),
            (503, Some("not_replicated")),
            "{u}: {v}"
        );
        assert!(
            coupon_on(&primary, u).is_some(),
            "{u}: the claim is on the primary"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(ACK_TIMEOUT_MS),
        "answered before the wait could have elapsed"
    );
    // the leader-mode control answers 201 for what no replica has: a failover now would
    // lose these acknowledged claims
    let unsafe_acks = claim(&fast_http, &users("f", 5)).await;
    for (u, (s, v)) in &unsafe_acks {
        assert_eq!(*s, 201, "{u}: {v}");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        rows(&db).await,
        40,
        "the database took records no replica confirmed"
    );

    step("replica back: the same request ids answer the coupons minted meanwhile");
    replica.resume();
    let retried = claim(&safe_http, &users("s", 12)).await;
    for (u, (s, v)) in &retried {
        assert_eq!(*s, 200, "{u}: a replay: {v}");
        let c = v["coupon_id"].as_str().unwrap();
        assert_eq!(coupon_on(&primary, u).as_deref(), Some(c), "{u}");
        assert_eq!(
            coupon_on(&replica, u).as_deref(),
            Some(c),
            "{u} on the replica"
        );
    }
    let drained = Instant::now();
    while rows(&db).await < 40 + 12 + 5 {
        assert!(
            drained.elapsed() < Duration::from_secs(20),
            "records never reached the database once confirmed: {} rows",
            rows(&db).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (text_status, metrics) = safe_http.send_text("GET", "/metrics").await;
    assert_eq!(text_status, 200);
    for (result, at_least) in [("confirmed", 40.0), ("not_replicated", 12.0)] {
        let needle = format!("claimgate_replica_confirmations_total{{result=\"{result}\"}} ");
        let n: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&needle))
            .unwrap_or_else(|| panic!("{needle} missing"))
            .trim()
            .parse()
            .unwrap();
        assert!(n >= at_least, "{result}: {n}");
    }
    db.close().await;
}
