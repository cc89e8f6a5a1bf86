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
async fn load(http: Http, answers: Answers, stop: Arc<AtomicBool>, workers: usize) -> u64 {
    let next = Arc::new(AtomicU64::new(0));
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
                let started = Instant::now();
                loop {
                    let r = http
                        .send("POST", "/v1/batches/cf/claims", &body.to_string())
                        .await;
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
    let loader = tokio::spawn(load(http.clone(), answers.clone(), stop.clone(), 24));
    let mut windows = Vec::new();
    for f in 0..FAILOVERS {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let candidates = cluster.primaries_with_a_replica();
        assert!(!candidates.is_empty(), "no primary left with a replica");
        let victim = candidates[f % candidates.len()];
        step(format!("failover {f}: kill -9 primary {victim}"));
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
        let c = &cluster;
        tokio::task::block_in_place(|| c.wait_healthy(Duration::from_secs(30)));
        windows.push(killed.elapsed());
        // Its supervisor restarts the killed node: empty, it rejoins as a replica of the
        // node that took its slots over (the deployment rules: never back into the primary
        // role). Without it, the fourth failover leaves a primary with no replica, whose
        // claims answer 503 `not_replicated` and whose acknowledged records wait in its
        // log for a replica to confirm them (the replica mode's promise needs one).
        cluster.restart_empty(victim);
        let c = &cluster;
        tokio::task::block_in_place(|| {
            let since = Instant::now();
            while c.replicas_linked() < 6 {
                assert!(since.elapsed() < Duration::from_secs(30), "no rejoin");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let retried = loader.await.unwrap();

    step("drain and verify");
    let answers = answers.lock().clone();
    let mut coupons: HashMap<String, u64> = HashMap::new();
    for (u, (s, v)) in &answers {
        assert!(
            matches!(s, 200 | 201),
            "u{u}: {s} {v} (stock is far from sold out)"
        );
        let c = v["coupon_id"].as_str().unwrap().to_string();
        if let Some(other) = coupons.insert(c.clone(), *u) {
            panic!("{c} handed out to u{other} and to u{u}");
        }
    }
    assert!(coupons.len() as i64 <= STOCK, "oversold");
    let db = Db::connect(&DatabaseConfig {
        url: pg.url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // the persister drains: everything still in the shard logs reaches the database
    let started = Instant::now();
    let mut lost = coupons.len();
    while started.elapsed() < Duration::from_secs(60) {
        lost = 0;
        for (c, u) in &coupons {
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
/// `stock::claim::tests::an_own_replay_of_an_id_minted_again_fences_the_shard`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failovers_never_oversell_or_mint_twice_with_leader_ack() {
    failovers_under_load("leader").await;
}
