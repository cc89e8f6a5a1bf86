//! Process-level fault tests: the real `claimgate` binary over real HTTP, killed with
//! `kill -9` mid-load and restarted, stopped with SIGTERM, and run against a Redis that
//! restarts. After each fault: every coupon a client was given is in the database exactly
//! once, nothing is oversold, and the batch's counts add up.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use claimgate::config::DatabaseConfig;
use claimgate::store::Db;
use serde_json::{Value, json};
use support::http::Http;
use support::{Gateway, PgDb, RedisServer};

fn batch_body(id: &str, stock: i64) -> String {
    json!({
        "id": id, "name": "process test", "stock": stock, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": 8
    })
    .to_string()
}

/// Arguments of an embedded gateway keeping its log and SQLite database in `dir`.
fn embedded_args(dir: &std::path::Path, name: &str) -> (Vec<String>, String) {
    let db_url = format!(
        "sqlite://{}?mode=rwc",
        dir.join(format!("{name}.db")).display()
    );
    let aof = dir.join(format!("{name}.aof"));
    let args = common_args(&[
        "--backend".into(),
        "embedded".into(),
        "--database-url".into(),
        db_url.clone(),
        "--set".into(),
        format!("embedded.aof_path=\"{}\"", aof.display()),
    ]);
    (args, db_url)
}

fn common_args(extra: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--set",
        "limits.claim_per_user.per_second=0",
        "--set",
        "limits.admission_wait_ms=10000",
        "--set",
        "persister.flush_interval_ms=5",
        "--set",
        "persister.min_idle_ms=500",
        "--set",
        "stock.sweep_min_age_ms=200",
        "--set",
        "cache.refresh_ms=100",
        "--set",
        "server.shutdown_grace_ms=5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend_from_slice(extra);
    a
}

/// What each user was last told (None: indeterminate, e.g. the connection died).
type Answers = Arc<Mutex<HashMap<usize, Option<(u16, Value)>>>>;

/// Claims for `users` (request id fixed per user) with `concurrency` in flight;
/// `on_answer` runs after each answer with the count so far.
async fn claim_all(
    http: &Http,
    batch: &str,
    users: Vec<usize>,
    concurrency: usize,
    answers: &Answers,
    on_answer: impl Fn(usize) + Send + Sync + 'static,
) {
    let on_answer = Arc::new(on_answer);
    let done = Arc::new(AtomicUsize::new(0));
    let queue = Arc::new(Mutex::new(users));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, queue, answers, done, on_answer) = (
            http.clone(),
            queue.clone(),
            answers.clone(),
            done.clone(),
            on_answer.clone(),
        );
        let path = format!("/v1/batches/{batch}/claims");
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(u) = queue.lock().unwrap().pop() else {
                    break;
                };
                let body = json!({"user_id": format!("user{u}"), "request_id": format!("rid-{u}")});
                let r = http.send("POST", &path, &body.to_string()).await.ok();
                answers.lock().unwrap().insert(u, r);
                on_answer(done.fetch_add(1, Ordering::SeqCst) + 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Claims for `users` again and again (same request ids) until every one has a final
/// answer (201/200/410), as a client retrying through a fault would.
async fn claim_until_settled(
    http: &Http,
    batch: &str,
    users: std::ops::Range<usize>,
    answers: &Answers,
) {
    for _ in 0..20 {
        claim_all(http, batch, users.clone().collect(), 16, answers, |_| {}).await;
        let settled = |a: &Option<(u16, Value)>| matches!(a, Some((200 | 201 | 410, _)));
        if users
            .clone()
            .all(|u| answers.lock().unwrap().get(&u).is_some_and(settled))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_ready(http: &Http) {
    for _ in 0..200 {
        if let Ok((200, _)) = http.send("GET", "/healthz", "").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway not healthy");
}

/// The invariants after a fault, once persistence has drained.
async fn check_invariants(http: &Http, db_url: &str, batch: &str, stock: i64, answers: &Answers) {
    let answers = answers.lock().unwrap().clone();
    let mut coupons = HashSet::new();
    for (u, a) in &answers {
        let (status, body) = a
            .clone()
            .unwrap_or_else(|| panic!("user{u} never got an answer"));
        match status {
            200 | 201 => {
                assert_eq!(body["user_id"], format!("user{u}"));
                assert!(
                    coupons.insert(body["coupon_id"].as_str().unwrap().to_string()),
                    "coupon given twice: {body}"
                );
            }
            410 => assert_eq!(body["error"], "sold_out"),
            other => panic!("user{u}: unexpected {other} {body}"),
        }
    }
    assert_eq!(
        coupons.len() as i64,
        stock,
        "demand exceeded stock: all of it is claimed, no more"
    );
    let (s, v) = http
        .send("GET", &format!("/v1/batches/{batch}"), "")
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["stock"],
        json!({"total": stock, "claimed": stock, "remaining": 0})
    );

    let db = Db::connect(&DatabaseConfig {
        url: db_url.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (rows, events) = db.claim_counts(batch).await.unwrap();
        if rows == stock as u64 && events == rows {
            break;
        }
        assert!(
            rows <= stock as u64,
            "more coupons in the database than stock"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "database has {rows} coupons, {events} events; want {stock}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in &coupons {
        let row = db
            .get_coupon(c)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{c} acknowledged but not in the database"));
        assert_eq!(row.batch_id, batch);
    }
    db.close().await;
}

/// Kill -9 the gateway a third of the way through a sale, restart it, let clients retry
/// what was indeterminate (same request ids), and check that nothing was lost or oversold.
async fn kill9_mid_sale(args: Vec<String>, db_url: String) {
    let stock = 300;
    let gw = Arc::new(Mutex::new(Gateway::start(&args)));
    let http = Http::new(&gw.lock().unwrap().base());
    wait_ready(&http).await;
    let (s, v) = http
        .send("POST", "/v1/batches", &batch_body("k9", stock))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    let answers: Answers = Arc::default();
    let killer = gw.clone();
    claim_all(&http, "k9", (0..600).collect(), 32, &answers, move |n| {
        if n == 150 {
            killer.lock().unwrap().kill9();
        }
    })
    .await;
    let lost: Vec<usize> = answers
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, a)| a.is_none())
        .map(|(u, _)| *u)
        .collect();
    assert!(!lost.is_empty(), "the kill must have cut requests off");

    gw.lock().unwrap().restart();
    wait_ready(&http).await;
    claim_all(&http, "k9", lost, 32, &answers, |_| {}).await;
    check_invariants(&http, &db_url, "k9", stock, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_kill9_and_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (args, db_url) = embedded_args(dir.path(), "k9");
    kill9_mid_sale(args, db_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_kill9_and_restart_loses_nothing() {
    let redis = RedisServer::start();
    let pg = PgDb::create();
    let args = common_args(&[
        "--backend".into(),
        "redis".into(),
        "--redis-url".into(),
        redis.url(),
        "--database-url".into(),
        pg.url.clone(),
    ]);
    kill9_mid_sale(args, pg.url.clone()).await;
}

/// SIGTERM mid-load: in-flight claims finish, the persister flushes, the process exits 0
/// within the grace period, and every coupon handed out is in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let (args, db_url) = embedded_args(dir.path(), "term");
    let gw = Arc::new(Mutex::new(Gateway::start(&args)));
    let http = Http::new(&gw.lock().unwrap().base());
    wait_ready(&http).await;
    http.send("POST", "/v1/batches", &batch_body("term", 1000))
        .await
        .unwrap();
    let answers: Answers = Arc::default();
    let exit = Arc::new(Mutex::new(None));
    let (term, exit2) = (gw.clone(), exit.clone());
    claim_all(&http, "term", (0..400).collect(), 16, &answers, move |n| {
        if n == 100 {
            let term = term.clone();
            let exit2 = exit2.clone();
            std::thread::spawn(move || {
                let r = term.lock().unwrap().terminate();
                *exit2.lock().unwrap() = Some(r);
            });
        }
    })
    .await;
    let (status, took) = loop {
        let exited = *exit.lock().unwrap();
        if let Some(r) = exited {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(7),
        "exited within the grace period: {took:?}"
    );
    let given: Vec<String> = answers
        .lock()
        .unwrap()
        .values()
        .flatten()
        .filter(|(s, _)| *s == 201)
        .map(|(_, v)| v["coupon_id"].as_str().unwrap().to_string())
        .collect();
    assert!(given.len() >= 100);
    let db = Db::connect(&DatabaseConfig {
        url: db_url,
        ..Default::default()
    })
    .await
    .unwrap();
    for c in &given {
        assert!(
            db.get_coupon(c).await.unwrap().is_some(),
            "{c} was acknowledged before shutdown but not flushed"
        );
    }
}

/// A lock whose gateway died is released on time (issue 10 item 2): coupons locked through a
/// gateway that is then killed with -9 come back to `unused` at their deadline, swept by the
/// restarted gateway from the deadline the database holds, each with a `released` event
/// (cause `lock_timeout`) in the outbox; another order can lock them after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_of_a_killed_gateway_are_released_at_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (mut args, db_url) = embedded_args(dir.path(), "locks");
    args.extend([
        "--set".to_string(),
        "wallet.lock_timeout_ms=1500".to_string(),
        "--set".to_string(),
        "events.sweep_interval_ms=100".to_string(),
    ]);
    let mut gw = Gateway::start(&args);
    let http = Http::new(&gw.base());
    wait_ready(&http).await;
    let (s, v) = http
        .send("POST", "/v1/batches", &batch_body("lk", 10))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let mut coupons = Vec::new();
    for u in 0..3 {
        let body = json!({"user_id": format!("lu{u}")}).to_string();
        let (s, v) = http
            .send("POST", "/v1/batches/lk/claims", &body)
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
        coupons.push(v["coupon_id"].as_str().unwrap().to_string());
    }
    let lock = |c: &str, order: &str| {
        let (http, path) = (http.clone(), format!("/v1/coupons/{c}/lock"));
        let body = json!({"order_id": order}).to_string();
        async move {
            // the claim reaches the database asynchronously: retry until it is there
            for _ in 0..100 {
                match http.send("POST", &path, &body).await.unwrap() {
                    (404, _) => tokio::time::sleep(Duration::from_millis(50)).await,
                    other => return other,
                }
            }
            panic!("{path}: never in the database");
        }
    };
    for (i, c) in coupons.iter().enumerate() {
        let (s, v) = lock(c, &format!("o{i}")).await;
        assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{c}: {v}");
    }
    gw.kill9();
    let killed = std::time::Instant::now();
    gw.restart();
    let http = Http::new(&gw.base());
    wait_ready(&http).await;

    let db = Db::connect(&DatabaseConfig {
        url: db_url,
        ..Default::default()
    })
    .await
    .unwrap();
    loop {
        let mut released = 0;
        for c in &coupons {
            // the lock answered from the coupon's shard (read-your-writes): the claim and
            // the lock reach the database through the log, maybe only after the restart
            let Some(row) = db.get_coupon(c).await.unwrap() else {
                continue;
            };
            let events = db.coupon_outbox(c).await.unwrap();
            if row.state.as_str() == "unused" && events.iter().any(|e| e.kind == "released") {
                released += 1;
            }
        }
        if released == coupons.len() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "{released} of {} locks released by the sweeper",
            coupons.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in &coupons {
        let out = db.coupon_outbox(c).await.unwrap();
        let released: Vec<_> = out.iter().filter(|e| e.kind == "released").collect();
        assert_eq!(released.len(), 1, "{c}: one release event");
        let (s, body) = http
            .send("GET", &format!("/v1/events/{}", released[0].event_id), "")
            .await
            .unwrap();
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["payload"]["cause"], "lock_timeout", "{c}: {body}");
        let (s, v) = lock(c, "another-order").await;
        assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{c}: {v}");
    }
    db.close().await;
}

/// Redis restarts with AOF mid-sale (NOSCRIPT and NOGROUP recovered, nothing lost), then
/// restarts empty: claims are refused with 503 until `claimgate rebuild`, after which the
/// sale finishes without re-selling anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarts_with_aof_and_empty() {
    let mut redis = RedisServer::start_with_aof();
    let pg = PgDb::create();
    let args = common_args(&[
        "--backend".into(),
        "redis".into(),
        "--redis-url".into(),
        redis.url(),
        "--database-url".into(),
        pg.url.clone(),
    ]);
    let gw = Gateway::start(&args);
    let http = Http::new(&gw.base());
    wait_ready(&http).await;
    let stock = 300;
    http.send("POST", "/v1/batches", &batch_body("rr", stock))
        .await
        .unwrap();
    let answers: Answers = Arc::default();
    claim_all(&http, "rr", (0..100).collect(), 16, &answers, |_| {}).await;

    // 1. restart with AOF: scripts and consumer groups come back (or are recreated)
    redis.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    claim_until_settled(&http, "rr", 0..200, &answers).await;

    // wait until everything so far is in PostgreSQL, then lose Redis entirely
    let db = Db::connect(&DatabaseConfig {
        url: pg.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let claimed_before = answers
        .lock()
        .unwrap()
        .values()
        .flatten()
        .filter(|(s, _)| *s == 201 || *s == 200)
        .count() as u64;
    for _ in 0..300 {
        if db.claim_counts("rr").await.unwrap().0 == claimed_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(db.claim_counts("rr").await.unwrap().0, claimed_before);
    redis.restart_empty();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = 0;
    for _ in 0..20 {
        match http
            .send(
                "POST",
                "/v1/batches/rr/claims",
                r#"{"user_id":"late","request_id":"late-1"}"#,
            )
            .await
        {
            Ok((503, v)) => {
                assert_eq!(v["error"], "backend_unavailable");
                refused += 1;
                break;
            }
            Ok((s, v)) => assert!(s >= 500, "a lost batch must not sell: {s} {v}"),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(refused, 1, "claims on a lost batch are refused with 503");

    // 2. rebuild from the database, then finish the sale
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_claimgate"))
        .args([
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
            "--database-url",
            &pg.url,
            "rebuild",
            "--batch",
            "rr",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebuild: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    claim_until_settled(&http, "rr", 0..600, &answers).await;
    check_invariants(&http, &pg.url, "rr", stock, &answers).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_claimgate"))
        .args([
            "--backend",
            "redis",
            "--redis-url",
            &redis.url(),
            "--database-url",
            &pg.url,
            "reconcile",
            "--batch",
            "rr",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reconcile: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Invalid configuration exits with status 64 and names the key.
#[test]
fn bad_config_exits_64_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_claimgate"))
        .args(["--set", "server.max_body_byte=5", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_body_byte"), "{err}");
}
