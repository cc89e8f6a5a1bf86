//! Replication and failover against real Redis primaries and replicas, through real gateways
//! over HTTP, with a real PostgreSQL.
//!
//! Invariants checked here:
//! - under `redis.ack = "replica"`, a claim is answered 201 (or replayed 200) only once a
//!   replica holds it; while no replica confirms, the answer is 503 `indeterminate` and the
//!   database receives nothing the replica lacks; once the replica is back, the same request
//!   ids answer the very coupons minted meanwhile. Under `leader` (the control) the same
//!   outage still gets 201s: the claims a failover would lose;
//! - a shard Redis lost (its node came back empty) is fenced and repaired from the database
//!   on its own: the batch's other shards never stop, no coupon id is handed out twice, no
//!   stock is sold twice, and the lost shard's claims replay with their request ids;
//! - a failover to a replica that lagged (a shard rolled back) is detected from the database
//!   and repaired the same way.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use claimgate::config::DatabaseConfig;
use claimgate::domain::ids::{home_shard, parse_coupon_id, seq_epoch};
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
        "--set",
        "persister.probe_interval_ms=100",
        "--set",
        "persister.batch_refresh_ms=200",
        "--set",
        "repair.retry_ms=100",
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
    claim_in(http, "rep", users).await
}

/// [`claim`] in batch `batch`.
async fn claim_in(http: &Http, batch: &str, users: &[String]) -> HashMap<String, (u16, Value)> {
    let path = format!("/v1/batches/{batch}/claims");
    let mut tasks = tokio::task::JoinSet::new();
    for u in users {
        let (http, u, path) = (http.clone(), u.clone(), path.clone());
        tasks.spawn(async move {
            let body = json!({"user_id": u, "request_id": format!("r-{u}")}).to_string();
            let r = http.send("POST", &path, &body).await.expect("an answer");
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
    coupon_in(server, "rep", user)
}

/// [`coupon_on`] in batch `batch`.
fn coupon_in(server: &RedisServer, batch: &str, user: &str) -> Option<String> {
    let key = format!("cg:{{{batch}:{}}}:req", home_shard(user, SHARDS));
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

    step("replica stopped: 503 indeterminate, nothing reaches the database");
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
            (503, Some("indeterminate")),
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

/// A batch's own acknowledgement mode (issue 13 item 2, "optionally per batch"): on a
/// `leader` deployment, a batch created with `"ack": "replica"` answers its claims only once
/// the replica holds them (503 `indeterminate` while the replica is stopped, then the same
/// coupon for the same request id once it is back), while the other batches keep answering
/// 201 from the primary alone. A mode the backend cannot honour is refused at creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_may_ask_for_replica_acknowledgements_on_a_leader_deployment() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let pg = PgDb::create();
    let ack_timeout = format!("redis.ack_timeout_ms={ACK_TIMEOUT_MS}");
    let gw = gateway(&primary, &pg.url, &["redis.ack=\"leader\"", &ack_timeout]);
    let http = Http::new(&gw.base());
    ready(&http).await;
    let with_ack = |id: &str, ack: Option<&str>| {
        let mut b: Value = serde_json::from_str(&batch_body(id, 100)).unwrap();
        if let Some(a) = ack {
            b["ack"] = json!(a);
        }
        b.to_string()
    };
    let (s, v) = http
        .send("POST", "/v1/batches", &with_ack("strict", Some("replica")))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["ack"], "replica", "{v}");
    let (s, v) = http
        .send("POST", "/v1/batches", &with_ack("loose", None))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert!(v.get("ack").is_none(), "{v}");
    // this machine's Redis is 7.0: no WAITAOF, so a batch cannot ask for it
    let info = primary.cli(&["INFO", "server"]);
    if info.contains("redis_version:7.0") || info.contains("redis_version:6.") {
        let (s, v) = http
            .send("POST", "/v1/batches", &with_ack("aof", Some("replica_aof")))
            .await
            .unwrap();
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
    }
    let (s, v) = http
        .send("POST", "/v1/batches", &with_ack("bogus", Some("quorum")))
        .await
        .unwrap();
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");

    step("healthy replica: both batches answer 201");
    for (u, (s, v)) in claim_in(&http, "strict", &users("a", 10)).await {
        assert_eq!(s, 201, "{u}: {v}");
    }
    for (u, (s, v)) in claim_in(&http, "loose", &users("a", 10)).await {
        assert_eq!(s, 201, "{u}: {v}");
    }

    step("replica stopped: the strict batch answers 503 indeterminate, the other 201");
    replica.pause();
    let stalled = claim_in(&http, "strict", &users("b", 6)).await;
    for (u, (s, v)) in &stalled {
        assert_eq!(
            (*s, v["error"].as_str()),
            (503, Some("indeterminate")),
            "{u}: {v}"
        );
    }
    let started = Instant::now();
    for (u, (s, v)) in claim_in(&http, "loose", &users("b", 6)).await {
        assert_eq!(s, 201, "{u}: {v}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(ACK_TIMEOUT_MS),
        "the loose batch waited for the replica"
    );

    step("replica back: the same request ids answer the coupons the primary holds");
    replica.resume();
    let mut answered = HashMap::new();
    let since = Instant::now();
    while answered.len() < stalled.len() {
        for (u, (s, v)) in claim_in(&http, "strict", &users("b", 6)).await {
            if matches!(s, 200 | 201) {
                answered.insert(u, v["coupon_id"].as_str().unwrap().to_string());
            }
        }
        assert!(since.elapsed() < Duration::from_secs(20), "never confirmed");
    }
    for (u, c) in &answered {
        assert_eq!(
            coupon_in(&primary, "strict", u).as_deref(),
            Some(c.as_str()),
            "{u}"
        );
        assert_eq!(
            coupon_in(&replica, "strict", u).as_deref(),
            Some(c.as_str()),
            "{u}"
        );
    }
}

fn batch_body(id: &str, stock: i64) -> String {
    json!({
        "id": id, "name": "failover", "stock": stock, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": SHARDS
    })
    .to_string()
}

async fn connect(url: &str) -> Db {
    Db::connect(&DatabaseConfig {
        url: url.to_string(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Waits (bounded) until the database holds `n` coupons of `batch`.
async fn persisted(db: &Db, batch: &str, n: u64) {
    let started = Instant::now();
    loop {
        let rows = db.claim_counts(batch).await.unwrap().0;
        if rows >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{rows} of {n} coupons of {batch} persisted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Claims again (same request ids) every user whose last answer was a 503, until each has a
/// coupon (201, or 200 for a replay); any other answer fails the test.
async fn settle(http: &Http, batch: &str, answers: &mut HashMap<String, (u16, Value)>) {
    let started = Instant::now();
    loop {
        let waiting: Vec<String> = answers
            .iter()
            .filter(|(_, (s, _))| *s == 503)
            .map(|(u, _)| u.clone())
            .collect();
        if waiting.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} users still answered 503, e.g. {:?}",
            waiting.len(),
            answers[&waiting[0]]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (u, r) in claim_in(http, batch, &waiting).await {
            assert!(
                matches!(r.0, 200 | 201 | 503),
                "{u} while the shard was repaired: {r:?}"
            );
            answers.insert(u, r);
        }
    }
}

/// Every answer is a coupon; no coupon went to two users. Returns coupon -> user.
fn handed_out<'a>(
    answers: impl IntoIterator<Item = &'a HashMap<String, (u16, Value)>>,
) -> HashMap<String, String> {
    let mut coupons: HashMap<String, String> = HashMap::new();
    for a in answers {
        for (u, (s, v)) in a {
            assert!(matches!(s, 200 | 201), "{u}: {s} {v}");
            let c = v["coupon_id"].as_str().unwrap().to_string();
            if let Some(other) = coupons.insert(c.clone(), u.clone()) {
                assert_eq!(&other, u, "{c} handed out to {other} and to {u}");
            }
        }
    }
    coupons
}

async fn metric(http: &Http, series: &str) -> f64 {
    let (_, text) = http.send_text("GET", "/metrics").await;
    let needle = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .unwrap_or_else(|| panic!("{series} not exported"))
        .trim()
        .parse()
        .unwrap()
}

/// Redis and the database agree about `batch` (bounded wait for the persister to drain).
async fn agree(http: &Http, batch: &str) {
    let started = Instant::now();
    loop {
        let (s, v) = http
            .send("GET", &format!("/v1/admin/reconcile?batch={batch}"), "")
            .await
            .unwrap();
        if s == 200 && v["agree"] == true {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reconcile never agreed: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node comes back empty holding one shard of a hot batch (its keys deleted): that shard
/// alone answers 503 while it is fenced and rebuilt from the database in a new epoch; every
/// other shard keeps claiming; its old claims replay; nothing is sold or minted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_shard_is_repaired_while_the_others_serve() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let redis = RedisServer::start();
    let pg = PgDb::create();
    let gw = gateway(&redis, &pg.url, &[]);
    let http = Http::new(&gw.base());
    ready(&http).await;
    let db = connect(&pg.url).await;
    let (s, v) = http
        .send("POST", "/v1/batches", &batch_body("lost1", 600))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    step("claims before the loss");
    let before = claim_in(&http, "lost1", &users("a", 120)).await;
    let old = handed_out([&before]);
    persisted(&db, "lost1", 120).await;

    step("shard 1 lost: its keys deleted");
    let lost: u32 = 1;
    let scan = redis.cli(&["--scan", "--pattern", &format!("cg:{{lost1:{lost}}}:*")]);
    let keys: Vec<&str> = scan.lines().filter(|l| !l.is_empty()).collect();
    assert!(keys.iter().any(|k| k.ends_with(":meta")), "{keys:?}");
    let mut del = vec!["DEL"];
    del.extend(keys.iter().copied());
    redis.cli(&del);

    step("claims while shard 1 is repaired");
    let mut during = claim_in(&http, "lost1", &users("b", 160)).await;
    let mut fenced = 0;
    for (u, (s, v)) in &during {
        if home_shard(u, SHARDS) == lost {
            assert!(matches!(s, 201 | 503), "{u}: {s} {v}");
            if *s == 503 {
                assert_eq!(v["error"], "backend_unavailable", "{v}");
                fenced += 1;
            }
        } else {
            assert_eq!(*s, 201, "{u} on a healthy shard: {v}");
        }
    }
    assert!(fenced > 0, "the lost shard answered nothing but 201");
    settle(&http, "lost1", &mut during).await;

    step("after the repair");
    let replays = claim_in(&http, "lost1", &users("a", 120)).await;
    for (u, (s, v)) in &replays {
        assert_eq!(*s, 200, "{u} replays: {v}");
        assert_eq!(old[v["coupon_id"].as_str().unwrap()], *u);
    }
    let all = handed_out([&before, &during]);
    assert_eq!(all.len(), 120 + 160, "one coupon per user");
    for (c, u) in &all {
        if home_shard(u, SHARDS) == lost && u.starts_with('b') {
            let (_, _, seq) = parse_coupon_id(c).unwrap();
            assert!(
                seq_epoch(seq) >= 1,
                "{c} minted after the repair, in a new epoch"
            );
        }
    }
    // per-user limits survived the loss
    let body = json!({"user_id": "a1", "request_id": "another"}).to_string();
    let (s, v) = http
        .send("POST", "/v1/batches/lost1/claims", &body)
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("limit_reached")),
        "{v}"
    );
    assert!(metric(&http, "claimgate_shard_faults_total{kind=\"missing\"}").await >= 1.0);
    assert!(metric(&http, "claimgate_shard_repairs_total{result=\"repaired\"}").await >= 1.0);
    persisted(&db, "lost1", 280).await;
    agree(&http, "lost1").await;
    db.close().await;
}

/// The primary dies while its replica lags (claims acknowledged in `leader` mode and already
/// persisted are missing from the replica); the replica is promoted and a gateway starts on
/// it (as after a Sentinel failover). The rolled-back shards are recognised from what the database holds, fenced and
/// repaired: the claims the replica lost replay with their request ids, and no coupon id is
/// handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_to_a_lagging_replica_is_repaired() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let pg = PgDb::create();
    let db = connect(&pg.url).await;
    let mut first = gateway(&primary, &pg.url, &[]);
    let http = Http::new(&first.base());
    ready(&http).await;
    let (s, v) = http
        .send("POST", "/v1/batches", &batch_body("fo", 600))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    step("claims the replica receives");
    let a = claim_in(&http, "fo", &users("a", 80)).await;
    handed_out([&a]);
    persisted(&db, "fo", 80).await;
    let started = Instant::now();
    while users("a", 80)
        .iter()
        .any(|u| coupon_in(&replica, "fo", u).is_none())
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    step("claims only the primary (and the database) get");
    // The replica stops following (as a replica cut off from its primary does): what the
    // primary acknowledges from now on never reaches it.
    replica.cli(&["REPLICAOF", "NO", "ONE"]);
    let b = claim_in(&http, "fo", &users("b", 60)).await;
    let b_coupons = handed_out([&b]);
    persisted(&db, "fo", 140).await;

    step("failover: the primary dies, the lagging replica serves");
    first.kill9();
    primary.kill();
    assert!(
        coupon_in(&replica, "fo", "b0").is_none(),
        "the replica lagged"
    );
    let second = gateway(&replica, &pg.url, &[]);
    let http = Http::new(&second.base());
    ready(&http).await;

    step("claims on the promoted replica");
    let mut c = claim_in(&http, "fo", &users("c", 120)).await;
    settle(&http, "fo", &mut c).await;
    let replays = claim_in(&http, "fo", &users("b", 60)).await;
    for (u, (s, v)) in &replays {
        assert_eq!(*s, 200, "{u}: a claim the replica lost replays: {v}");
        assert_eq!(b_coupons[v["coupon_id"].as_str().unwrap()], *u);
    }
    let all = handed_out([&a, &b, &c]);
    assert_eq!(all.len(), 80 + 60 + 120, "one coupon per user, none twice");
    assert!(metric(&http, "claimgate_shard_repairs_total{result=\"repaired\"}").await >= 1.0);
    persisted(&db, "fo", 260).await;
    // The gateway started on the promoted replica sealed the rolled-back shards before it
    // served a claim (it learns what the database holds first): no id was minted again.
    let conflicts = db.coupon_conflicts("fo").await.unwrap();
    assert!(conflicts.is_empty(), "{conflicts:?}");
    agree(&http, "fo").await;
    db.close().await;
}
