//! Failovers of a real Redis Cluster (3 primaries, 2 replicas each) under load, through a
//! real gateway over HTTP, with a real PostgreSQL.
//!
//! Invariants checked here, after five `kill -9`s of a primary mid-load (each followed by
//! the promotion of one of its replicas, then the killed node's restart, empty, as a replica
//! of the promoted one: the deployment rules say a node never restarts empty into the
//! primary role): no oversell, no coupon id
//! handed out twice; under `redis.ack = "replica"` every acknowledged claim is in the
//! database (none lost); under `"leader"` the acknowledged claims a failover lost are
//! counted and printed.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use claimgate::config::DatabaseConfig;
use claimgate::store::Db;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::http::Http;
use support::watchdog::{Watchdog, step};
use support::{Gateway, PgDb, RedisCluster};

/// Failovers per test (the issue: "e.g. 5").
const FAILOVERS: usize = 5;
const STOCK: i64 = 1_000_000;

/// user -> the final answer (status, body), or `None` while it is being retried.
type Answers = Arc<Mutex<HashMap<u64, (u16, Value)>>>;

fn gateway(cluster: &RedisCluster, db_url: &str, ack: &str) -> Gateway {
    let sets = [
        "redis.cluster=true".to_string(),
        format!("redis.ack=\"{ack}\""),
        "redis.ack_timeout_ms=500".into(),
        "redis.command_timeout_ms=1000".into(),
        "limits.claim_per_user.per_second=0".into(),
        "persister.flush_interval_ms=5".into(),
        "persister.probe_interval_ms=200".into(),
        "persister.min_idle_ms=2000".into(),
        "repair.retry_ms=200".into(),
        "cache.refresh_ms=200".into(),
    ];
    let mut args: Vec<String> = vec![
        "--backend".into(),
        "redis".into(),
        "--redis-url".into(),
        cluster.url(),
        "--database-url".into(),
        db_url.into(),
    ];
    for s in sets {
        args.extend(["--set".into(), s]);
    }
    Gateway::start(&args)
}

/// Claims for fresh users until `stop`, `workers` at a time; a 503 or a transport error is
/// retried with the same request id (as a client through a failover does) until it gets a
/// final answer. Returns how many answers were 503 on the way.
async fn load(
    http: Http,
    answers: Answers,
    stop: Arc<AtomicBool>,
    workers: usize,
    batch: &'static str,
    first_user: u64,
) -> u64 {
    let next = Arc::new(AtomicU64::new(first_user));
    let retried = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, answers, stop, next, retried) = (
            http.clone(),
            answers.clone(),
            stop.clone(),
            next.clone(),
            retried.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let u = next.fetch_add(1, Ordering::Relaxed);
                let body = json!({"user_id": format!("u{u}"), "request_id": format!("r{u}")});
                let path = format!("/v1/batches/{batch}/claims");
                let started = Instant::now();
                loop {
                    let r = http.send("POST", &path, &body.to_string()).await;
                    match r {
                        Ok((s @ (200 | 201 | 410), v)) => {
                            answers.lock().insert(u, (s, v));
                            break;
                        }
                        Ok((503, _)) | Err(_) => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            assert!(
                                started.elapsed() < Duration::from_secs(60),
                                "user u{u} never got an answer: {r:?}"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Ok(other) => panic!("u{u}: {other:?}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    retried.load(Ordering::Relaxed)
}

/// `kill -9` of the primary on `victim`, then waits for a replica to take its slots over and
/// the cluster to be healthy (returns how long that took: the failover window), then
/// restarts the killed node as its supervisor would: empty, it rejoins as a replica of the
/// node that took its slots over (the deployment rules: never back into the primary role).
/// Without the restart, a few failovers leave a primary with no replica, whose claims answer
/// 503 `indeterminate` under `ack = "replica"` and whose acknowledged records wait in its log
/// for a replica to confirm them (the replica mode's promise needs one).
async fn fail_over(cluster: &mut RedisCluster, victim: u16) -> Duration {
    let replicas = cluster.replicas_linked();
    let killed = Instant::now();
    cluster.kill(victim);
    // a replica took its slots over (not just "ok" before the failure is noticed)
    loop {
        let p = cluster.primaries();
        if p.len() == 3 && !p.contains(&victim) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no failover: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = &*cluster;
    tokio::task::block_in_place(|| c.wait_healthy(Duration::from_secs(30)));
    let window = killed.elapsed();
    cluster.restart_empty(victim);
    let c = &*cluster;
    tokio::task::block_in_place(|| {
        let since = Instant::now();
        while c.replicas_linked() < replicas {
            assert!(since.elapsed() < Duration::from_secs(30), "no rejoin");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    window
}

/// coupon id -> user of every answer (all must be coupons), checking no id went twice.
fn handed_out(answers: &Answers) -> HashMap<String, u64> {
    let mut coupons: HashMap<String, u64> = HashMap::new();
    for (u, (s, v)) in answers.lock().iter() {
        assert!(
            matches!(s, 200 | 201),
            "u{u}: {s} {v} (stock is far from sold out)"
        );
        let c = v["coupon_id"].as_str().unwrap().to_string();
        if let Some(other) = coupons.insert(c.clone(), *u) {
            panic!("{c} handed out to u{other} and to u{u}");
        }
    }
    coupons
}

/// How many of `coupons` are not in the database once the persisters drained (waits up to
/// 60 s); a coupon the database holds for another user is a failure at once.
async fn not_in_the_database(db: &Db, coupons: &HashMap<String, u64>) -> usize {
    let started = Instant::now();
    let mut lost = coupons.len();
    while started.elapsed() < Duration::from_secs(60) {
        lost = 0;
        for (c, u) in coupons {
            match db.get_coupon(c).await.unwrap() {
                Some(row) if row.user_id == format!("u{u}") => {}
                Some(row) => panic!(
                    "{c}: the database holds it for {}, u{u} got it",
                    row.user_id
                ),
                None => lost += 1,
            }
        }
        if lost == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lost
}

async fn failovers_under_load(ack: &str) {
    let _wd = Watchdog::arm(Duration::from_secs(240));
    let mut cluster = RedisCluster::start_with_replicas(3, 2);
    let pg = PgDb::create();
    let gw = gateway(&cluster, &pg.url, ack);
    let http = Http::new(&gw.base());
    for _ in 0..200 {
        if let Ok((200, _)) = http.send("GET", "/healthz", "").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batch = json!({
        "id": "cf", "name": "cluster failover", "stock": STOCK, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": 12
    });
    let (s, v) = http
        .send("POST", "/v1/batches", &batch.to_string())
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    let answers: Answers = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = tokio::spawn(load(
        http.clone(),
        answers.clone(),
        stop.clone(),
        24,
        "cf",
        0,
    ));
    let mut windows = Vec::new();
    for f in 0..FAILOVERS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let candidates = cluster.primaries_with_a_replica();
        assert!(!candidates.is_empty(), "no primary left with a replica");
        let victim = candidates[f % candidates.len()];
        step(format!("failover {f}: kill -9 primary {victim}"));
        windows.push(fail_over(&mut cluster, victim).await);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let retried = loader.await.unwrap();

    step("drain and verify");
    let coupons = handed_out(&answers);
    assert!(coupons.len() as i64 <= STOCK, "oversold");
    let db = Db::connect(&DatabaseConfig {
        url: pg.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let lost = not_in_the_database(&db, &coupons).await;
    let conflicts = db.coupon_conflicts("cf").await.unwrap().len();
    println!(
        "ack = {ack}: {} claims acknowledged over {FAILOVERS} failovers (windows {:?}), {retried} \
         503s or errors retried, {lost} acknowledged claims not in the database, {conflicts} \
         ids minted again (refused, recorded)",
        coupons.len(),
        windows
    );
    if ack == "replica" {
        assert_eq!(lost, 0, "acknowledged claims lost under ack = replica");
    }
    db.close().await;
}

/// Under `ack = "replica"`: nothing acknowledged is lost, nothing oversold, no id minted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failovers_lose_nothing_acknowledged_with_replica_ack() {
    failovers_under_load("replica").await;
}

/// Under `ack = "leader"`: nothing oversold and no id minted twice; what a failover took
/// back is counted and printed. Regression: 1 run in 4 handed out an id minted again when a
/// claim's first attempt was lost in the failover and its retry replayed its own mint (see
/// `stock::claim::tests::an_own_replay_of_an_id_minted_again_fences_the_shard`). Regression
/// (under load, whole suite at once): a claim answered just before a failover was lost with
/// it, the rolled-back shard minted its id again for another claim and wrote that claim
/// (refused, but its record reached the database), the repair restored it and its retry
/// replayed the id (see
/// `stock::claim::tests::a_rolled_back_shard_writes_nothing_for_an_id_it_would_mint_again`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failovers_never_oversell_or_mint_twice_with_leader_ack() {
    failovers_under_load("leader").await;
}

async fn healthy(http: &Http) {
    for _ in 0..200 {
        if let Ok((200, _)) = http.send("GET", "/healthz", "").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway never became healthy");
}

/// One series of a gateway's `/metrics` (0 when not exported yet).
async fn metric(http: &Http, series: &str) -> f64 {
    let (_, text) = http.send_text("GET", "/metrics").await;
    let needle = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Waits (bounded) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Many gateways on one cluster (issue 13 item 4): two gateway processes serve and persist
/// the same hot batch over a cluster of 3 primaries with a replica each, `ack = "replica"`.
/// Mid-load one gateway is killed with -9 and restarted, and a primary is killed and failed
/// over. Then: every acknowledged claim is in the database exactly once (the persisters
/// share the consumer groups: the crashed one's pending records are taken over), no id was
/// handed out twice, and batch changes made through one gateway after the topology change
/// reach the other: a pause, and a sold out (each seen in the other's local cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_share_a_cluster_through_a_failover_and_a_gateway_crash() {
    let _wd = Watchdog::arm(Duration::from_secs(240));
    let mut cluster = RedisCluster::start_with_replicas(3, 1);
    let pg = PgDb::create();
    let mut gw_a = gateway(&cluster, &pg.url, "replica");
    let gw_b = gateway(&cluster, &pg.url, "replica");
    let (a, b) = (Http::new(&gw_a.base()), Http::new(&gw_b.base()));
    healthy(&a).await;
    healthy(&b).await;
    let batch = |id: &str, stock: i64, shards: u32| {
        json!({
            "id": id, "name": "many gateways", "stock": stock, "per_user_limit": 1,
            "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
            "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
            "scope": {"kind": "all"}, "shards": shards
        })
        .to_string()
    };
    let (s, v) = a
        .send("POST", "/v1/batches", &batch("mg", STOCK, 12))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");

    // Each gateway's loader claims for users of its own (numbered from 0 over A, from 10^7
    // over B), with request ids, retrying 503s and transport errors with the same id.
    let answers: Answers = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load_a = tokio::spawn(load(a.clone(), answers.clone(), stop.clone(), 8, "mg", 0));
    let load_b = tokio::spawn(load(
        b.clone(),
        answers.clone(),
        stop.clone(),
        8,
        "mg",
        10_000_000,
    ));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    step("kill -9 gateway A mid-load, restart it");
    gw_a.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw_a.restart();
    healthy(&a).await;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let victim = cluster.primaries_with_a_replica()[0];
    step(format!("kill -9 primary {victim}"));
    fail_over(&mut cluster, victim).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let retried = load_a.await.unwrap() + load_b.await.unwrap();

    step("batch changes after the topology change reach the other gateway");
    let (s, v) = b
        .send("PATCH", "/v1/batches/mg", r#"{"state": "paused"}"#)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let paused_before = metric(&a, r#"claimgate_cache_total{kind="paused"}"#).await;
    eventually("A refuses from its cache: paused", || async {
        let body = json!({"user_id": "late-a"}).to_string();
        let (s, _) = a
            .send("POST", "/v1/batches/mg/claims", &body)
            .await
            .unwrap();
        s != 201 && metric(&a, r#"claimgate_cache_total{kind="paused"}"#).await > paused_before
    })
    .await;
    let (s, v) = b
        .send("POST", "/v1/batches", &batch("mgso", 20, 3))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let mut sold = 0;
    for i in 0..200 {
        let body = json!({"user_id": format!("so{i}")}).to_string();
        match b
            .send("POST", "/v1/batches/mgso/claims", &body)
            .await
            .unwrap()
        {
            (201, _) => sold += 1,
            (410, _) => break,
            (s, v) => panic!("{s} {v}"),
        }
    }
    assert_eq!(sold, 20);
    let sold_out_before = metric(&a, r#"claimgate_cache_total{kind="sold_out"}"#).await;
    eventually("A refuses from its cache: sold out", || async {
        let body = json!({"user_id": "late-a"}).to_string();
        let (s, _) = a
            .send("POST", "/v1/batches/mgso/claims", &body)
            .await
            .unwrap();
        s == 410 && metric(&a, r#"claimgate_cache_total{kind="sold_out"}"#).await > sold_out_before
    })
    .await;

    step("drain and verify");
    let coupons = handed_out(&answers);
    let db = Db::connect(&DatabaseConfig {
        url: pg.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let missing = not_in_the_database(&db, &coupons).await;
    let (rows, _) = db.claim_counts("mg").await.unwrap();
    let conflicts = db.coupon_conflicts("mg").await.unwrap().len();
    println!(
        "two gateways: {} claims acknowledged, {retried} 503s or errors retried, {missing} not \
         in the database, {rows} rows, {conflicts} conflicts",
        coupons.len()
    );
    assert_eq!(missing, 0, "acknowledged claims lost");
    assert_eq!(
        rows,
        coupons.len() as u64,
        "one row per acknowledged claim, no other"
    );
    assert_eq!(conflicts, 0);
    db.close().await;
}
