//! Batch definition consistency between Redis and the database (hardening items 2, 3, 4 and
//! 8), on both backends (redis + PostgreSQL, embedded + SQLite), through the real router with
//! real concurrency. Invariants checked here:
//! - item 2: a create never re-seeds a batch the database knows once Redis lost it (the
//!   batch stays lost until `rebuild`, and no coupon id is minted twice); a coupon id the
//!   persister meets twice with different claims is counted, recorded and reported by
//!   `reconcile`, never dropped silently;
//! - item 3: concurrent creates of different definitions under one id have one winner, the
//!   same in Redis and in the database, and every claim of it reaches the database;
//! - item 4: concurrent PATCHes apply exactly once and in order (totals add up, pause and
//!   add_stock do not undo each other, `batches.max_stock` holds), and `reconcile` agrees;
//! - item 8: a create clears the "batch not found" memory at once, on this instance and on
//!   every other one.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claimgate::backend::Backend;
use claimgate::backend::embedded::EmbeddedBackend;
use claimgate::backend::redis::RedisBackend;
use claimgate::config::Config;
use claimgate::config::EmbeddedConfig;
use claimgate::config::RedisConfig;
use claimgate::contract::keys::{BatchKeys, SlotKeys};
use claimgate::domain::claim::ClaimRecord;
use claimgate::http::App;
use claimgate::persist::Persister;
use claimgate::recovery::{rebuild, reconcile};
use claimgate::store::Db;
use serde_json::{Value, json};
use support::gw::*;
use support::watchdog::{Watchdog, step};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// harness

/// Runs a persister on `backend` until the database holds exactly `expected` claims of
/// `batch` (coupon rows and `claimed` events).
async fn drain<B: Backend>(backend: &Arc<B>, db: &Db, cfg: &Config, batch: &str, expected: u64) {
    let stop = CancellationToken::new();
    let p = Persister::spawn(
        backend.clone(),
        db.clone(),
        cfg.persister.clone(),
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = p.flush().await;
        let (coupons, events) = db.claim_counts(batch).await.unwrap();
        if coupons == expected && events == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{batch}: the database has {coupons} coupons / {events} events, want {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    p.join().await;
}

fn code(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

fn coupon(v: &Value) -> String {
    v["coupon_id"].as_str().unwrap_or_default().to_string()
}

/// The value of a counter without labels in the exposition (0 when absent).
fn counter(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A field of a slot's meta hash in Redis.
async fn meta_field<B: Backend>(app: &App<B>, slot: &SlotKeys, field: &str) -> Option<String> {
    app.stock()
        .meta(slot)
        .await
        .unwrap()
        .get(field)
        .map(str::to_string)
}

async fn assert_reconciled<B: Backend>(backend: &B, db: &Db, batch: &str) {
    let diffs = reconcile(backend, db, Some(batch)).await.unwrap();
    assert!(diffs.is_empty(), "{batch}: reconcile found {diffs:?}");
}

async fn patch<B: Backend>(app: &Arc<App<B>>, id: &str, body: Value) -> (u16, Value) {
    call(app, "PATCH", &format!("/v1/batches/{id}"), body.to_string()).await
}

/// Sends every body as a PATCH at once; returns the answers in order.
async fn patch_storm<B: Backend>(
    app: &Arc<App<B>>,
    id: &str,
    bodies: Vec<Value>,
) -> Vec<(u16, Value)> {
    let mut tasks = Vec::new();
    for body in bodies {
        let (app, id) = (app.clone(), id.to_string());
        tasks.push(tokio::spawn(async move { patch(&app, &id, body).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn second_redis_instance(g: &Gw<RedisBackend>) -> Arc<App<RedisBackend>> {
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

fn second_embedded_instance(g: &Gw<EmbeddedBackend>) -> Arc<App<EmbeddedBackend>> {
    claimgate::gateway::assemble(g.cfg.clone(), g.backend.clone(), g.db.clone(), None)
}

// ---------------------------------------------------------------------------------------
// item 2: re-creating a batch after Redis lost it

const RESELL_SHARDS: u32 = 2;

fn resell_body() -> String {
    batch_json("resell", 10, 1, json!({"shards": RESELL_SHARDS}))
}

/// Sells the batch out and persists it. Returns coupon id -> user.
async fn item2_sell_out<B: Backend>(g: &Gw<B>) -> HashMap<String, String> {
    let (s, v) = call(&g.app, "POST", "/v1/batches", resell_body()).await;
    assert_eq!(s, 201, "{v}");
    let mut sold = HashMap::new();
    for i in 0..10 {
        let user = format!("u{i}");
        let (s, v) = claim(&g.app, "resell", &user, Some("r1")).await;
        assert_eq!(s, 201, "{user}: {v}");
        sold.insert(coupon(&v), user);
    }
    assert_eq!(claim(&g.app, "resell", "late", None).await.0, 410);
    drain(&g.backend, &g.db, &g.cfg, "resell", 10).await;
    sold
}

/// After Redis lost its data (`fresh` is the backend as it is now): an identical re-create is
/// refused and mints nothing; `rebuild` restores the batch and the sale goes on, nothing
/// re-sold.
async fn item2_after_loss<B: Backend>(g: &Gw<B>, fresh: Arc<B>, sold: HashMap<String, String>) {
    // A gateway (re)started on the Redis that lost everything.
    let app = claimgate::gateway::assemble(g.cfg.clone(), fresh.clone(), g.db.clone(), None);
    step("claims on the lost batch");
    let (s, v) = claim(&app, "resell", "u-new", None).await;
    assert_eq!((s, code(&v)), (503, "backend_unavailable"), "{v}");

    step("identical re-create");
    let (s, v) = call(&app, "POST", "/v1/batches", resell_body()).await;
    assert_ne!(s, 201, "a re-create re-seeded a batch Redis lost: {v}");
    assert_eq!((s, code(&v)), (503, "backend_unavailable"), "{v}");
    for user in ["u0", "u-new", "u-other"] {
        let (s, v) = claim(&app, "resell", user, Some("r2")).await;
        assert_eq!((s, code(&v)), (503, "backend_unavailable"), "{user}: {v}");
    }
    // nothing was minted: no slot of the batch exists, no claim counter moved
    let keys = BatchKeys::new("resell", RESELL_SHARDS);
    for slot in keys.all() {
        let p = app.stock().probe(slot).await.unwrap();
        assert_eq!(
            (p.stock, p.claimed, p.log_len),
            (0, 0, 0),
            "{}: re-seeded",
            slot.meta
        );
        assert!(
            app.stock().meta(slot).await.unwrap().is_empty(),
            "{}",
            slot.meta
        );
    }
    assert_eq!(g.db.claim_counts("resell").await.unwrap(), (10, 10));

    step("rebuild");
    let report = rebuild(fresh.as_ref(), &g.db, "resell", false)
        .await
        .unwrap();
    assert_eq!((report.claims, report.pool_stock), (10, 0), "{report}");
    assert_reconciled(fresh.as_ref(), &g.db, "resell").await;
    let entry = app.catalog().load("resell").await.unwrap();
    app.catalog().refresh(&entry).await;
    assert!(!entry.is_lost());

    step("the sale goes on, nothing re-sold");
    let (s, v) = claim(&app, "resell", "u0", Some("r1")).await;
    assert_eq!(s, 200, "replay: {v}");
    assert_eq!(sold.get(&coupon(&v)).map(String::as_str), Some("u0"));
    let (s, v) = claim(&app, "resell", "u0", Some("r3")).await;
    assert_eq!((s, code(&v)), (409, "limit_reached"), "{v}");
    let (s, v) = claim(&app, "resell", "n0", None).await;
    assert_eq!((s, code(&v)), (410, "sold_out"), "{v}");
    let (s, v) = patch(&app, "resell", json!({"add_stock": 5})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stock"]["total"], 15, "{v}");
    let mut fresh_ids = HashSet::new();
    for i in 0..8 {
        let (s, v) = claim(&app, "resell", &format!("n{i}"), None).await;
        match s {
            201 => {
                let c = coupon(&v);
                assert!(!sold.contains_key(&c), "coupon id {c} minted twice");
                assert!(fresh_ids.insert(c));
            }
            410 => {}
            _ => panic!("n{i}: {s} {v}"),
        }
    }
    assert_eq!(fresh_ids.len(), 5, "exactly the added stock is sold");
    drain(&fresh, &g.db, &g.cfg, "resell", 15).await;
    for (c, user) in &sold {
        let row = g.db.get_coupon(c).await.unwrap().expect("old coupon kept");
        assert_eq!(&row.user_id, user, "{c} changed hands");
    }
    assert_reconciled(fresh.as_ref(), &g.db, "resell").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item2_recreate_after_redis_lost_never_resells_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let g = redis_gw().await;
    step("sell out");
    let sold = item2_sell_out(&g).await;
    step("FLUSHALL");
    let out = g.redis.as_ref().unwrap().cli(&["FLUSHALL"]);
    assert!(out.contains("OK"), "{out}");
    item2_after_loss(&g, g.backend.clone(), sold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item2_recreate_after_redis_lost_never_resells_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw().await;
    step("sell out");
    let sold = item2_sell_out(&g).await;
    step("restart without the append-only file: a fresh keyspace");
    let fresh = Arc::new(EmbeddedBackend::open(&EmbeddedConfig::in_memory()).unwrap());
    item2_after_loss(&g, fresh, sold).await;
}

/// The database already holds `dup.0.1` for mallory (what a re-seeded batch mints again);
/// the persister meets `dup.0.1` claimed by alice: counted, recorded, reported, and the
/// shard log still drains.
async fn item2_conflict_case<B: Backend>(g: &Gw<B>) {
    create(g, "dup", 10, 1, json!({"shards": 1})).await;
    let planted = ClaimRecord {
        coupon_id: "dup.0.1".into(),
        batch_id: "dup".into(),
        shard: 0,
        seq: 1,
        user_id: "mallory".into(),
        request_id: Some("m1".into()),
        claimed_at: 1_000,
        valid_from: 1_000,
        valid_to: 2_000,
        code: None,
        managed: false,
    };
    assert_eq!(
        g.db.write_claims(std::slice::from_ref(&planted))
            .await
            .unwrap(),
        1
    );
    let before = counter(&g.app.render_metrics(), "claimgate_coupon_conflicts_total");

    let (s, v) = claim(&g.app, "dup", "alice", Some("a1")).await;
    assert_eq!((s, coupon(&v).as_str()), (201, "dup.0.1"), "{v}");
    let (s, v) = claim(&g.app, "dup", "bob", None).await;
    assert_eq!((s, coupon(&v).as_str()), (201, "dup.0.2"), "{v}");

    step("persist");
    let stop = CancellationToken::new();
    let p = Persister::spawn(
        g.backend.clone(),
        g.db.clone(),
        g.cfg.persister.clone(),
        stop.clone(),
    );
    p.flush().await.unwrap();
    let shard = SlotKeys::new("dup", Some(0));
    assert_eq!(
        g.app.stock().probe(&shard).await.unwrap().log_len,
        0,
        "the conflicting record must not block the log"
    );
    assert_eq!(
        g.db.get_coupon("dup.0.2").await.unwrap().unwrap().user_id,
        "bob"
    );
    assert_eq!(
        g.db.get_coupon("dup.0.1").await.unwrap().unwrap().user_id,
        "mallory",
        "the first owner keeps the id"
    );

    step("reported");
    let after = counter(&g.app.render_metrics(), "claimgate_coupon_conflicts_total");
    assert!(
        after >= before + 1.0,
        "conflict not counted: {before} -> {after}"
    );
    let diffs = reconcile(g.backend.as_ref(), &g.db, Some("dup"))
        .await
        .unwrap();
    let conflicts: Vec<String> = diffs
        .iter()
        .map(ToString::to_string)
        .filter(|d| d.contains("dup.0.1") && d.contains("alice") && d.contains("mallory"))
        .collect();
    assert_eq!(conflicts.len(), 1, "reconcile: {diffs:?}");

    // Identical redeliveries are not conflicts, and a conflict is recorded once.
    assert_eq!(
        g.db.write_claims(std::slice::from_ref(&planted))
            .await
            .unwrap(),
        0
    );
    p.flush().await.unwrap();
    let diffs = reconcile(g.backend.as_ref(), &g.db, Some("dup"))
        .await
        .unwrap();
    let again = diffs
        .iter()
        .filter(|d| d.to_string().contains("dup.0.1"))
        .count();
    assert_eq!(again, 1, "reconcile: {diffs:?}");
    stop.cancel();
    p.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item2_conflicting_coupon_id_is_counted_and_reported_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    item2_conflict_case(&redis_gw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item2_conflicting_coupon_id_is_counted_and_reported_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    item2_conflict_case(&embedded_gw().await).await;
}

// ---------------------------------------------------------------------------------------
// item 3: concurrent creates of different definitions under one id

async fn item3_case<B: Backend>(g: &Gw<B>) {
    for round in 0..4 {
        let id = format!("race{round}");
        step(format!("{id}: 12 different creates at once"));
        let mut tasks = Vec::new();
        for i in 0..12u32 {
            let app = g.app.clone();
            let body = batch_json(
                &id,
                40 + i64::from(i),
                1,
                json!({"shards": 1 + (i + round) % 8}),
            );
            tasks.push(tokio::spawn(async move {
                call(&app, "POST", "/v1/batches", body).await
            }));
        }
        let mut won = Vec::new();
        for t in tasks {
            let (s, v) = t.await.unwrap();
            match s {
                201 => won.push(v),
                409 => assert_eq!(code(&v), "batch_exists", "{v}"),
                _ => panic!("{id}: {s} {v}"),
            }
        }
        assert_eq!(won.len(), 1, "{id}: winners {won:?}");
        let won = &won[0];

        step(format!("{id}: one definition everywhere"));
        let stored = g.db.get_batch(&id).await.unwrap().expect("in the database");
        let in_redis = g
            .app
            .catalog()
            .read_meta(&id)
            .await
            .unwrap()
            .expect("in Redis")
            .batch;
        assert_eq!(in_redis, stored, "{id}: Redis and the database disagree");
        assert_eq!(
            (json!(stored.shards), json!(stored.stock)),
            (won["shards"].clone(), won["stock"].clone()),
            "{id}: the 201 answer is not the stored batch"
        );
        let keys = BatchKeys::new(&id, stored.shards);
        let fp = stored.fingerprint();
        for slot in keys.all() {
            assert_eq!(
                meta_field(&g.app, slot, "fp").await.as_deref(),
                Some(fp.as_str()),
                "{}",
                slot.meta
            );
            assert_eq!(
                meta_field(&g.app, slot, "shards").await,
                Some(stored.shards.to_string()),
                "{}",
                slot.meta
            );
        }
        let beyond = SlotKeys::new(&id, Some(stored.shards));
        assert!(
            g.app.stock().meta(&beyond).await.unwrap().is_empty(),
            "{id}: a loser's shard {} exists",
            stored.shards
        );

        step(format!("{id}: every claim reaches the database"));
        let mut ids = HashSet::new();
        for u in 0..40 {
            let (s, v) = claim(&g.app, &id, &format!("user{u}"), None).await;
            assert_eq!(s, 201, "{id} user{u}: {v}");
            assert!(ids.insert(coupon(&v)));
        }
        drain(&g.backend, &g.db, &g.cfg, &id, 40).await;
        for c in &ids {
            assert!(
                g.db.get_coupon(c).await.unwrap().is_some(),
                "{c} not persisted"
            );
        }
        assert_reconciled(g.backend.as_ref(), &g.db, &id).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item3_concurrent_creates_have_one_winner_everywhere_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(180));
    item3_case(&redis_gw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item3_concurrent_creates_have_one_winner_everywhere_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(180));
    item3_case(&embedded_gw().await).await;
}

// ---------------------------------------------------------------------------------------
// item 4: concurrent PATCHes

/// `batches.max_stock` of the item 4 gateways.
const MAX_STOCK: i64 = 300;

async fn assert_state_everywhere<B: Backend>(g: &Gw<B>, id: &str, want: &str) {
    let (s, v) = call(&g.app, "GET", &format!("/v1/batches/{id}"), "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["batch"]["state"], want, "GET: {v}");
    let stored = g.db.get_batch(id).await.unwrap().unwrap();
    assert_eq!(stored.state.as_str(), want, "database");
    let keys = BatchKeys::new(id, stored.shards);
    for slot in keys.all() {
        assert_eq!(
            meta_field(&g.app, slot, "state").await.as_deref(),
            Some(want),
            "{}",
            slot.meta
        );
    }
}

async fn assert_total<B: Backend>(g: &Gw<B>, id: &str, want: i64) {
    let (s, v) = call(&g.app, "GET", &format!("/v1/batches/{id}"), "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stock"]["total"], want, "GET stock: {v}");
    assert_eq!(v["batch"]["stock"], want, "GET definition: {v}");
    assert_eq!(
        g.db.get_batch(id).await.unwrap().unwrap().stock,
        want,
        "database"
    );
    let keys = BatchKeys::new(id, 4);
    let c = g.app.stock().conservation(&keys).await.unwrap();
    assert!(c.holds() && c.total == want, "{c:?}");
}

async fn item4_case<B: Backend>(g: &Gw<B>) {
    create(g, "p4", 100, 1, json!({"shards": 4})).await;
    for u in 0..5 {
        assert_eq!(claim(&g.app, "p4", &format!("early{u}"), None).await.0, 201);
    }

    step("16 add_stock at once");
    let res = patch_storm(&g.app, "p4", vec![json!({"add_stock": 10}); 16]).await;
    for (s, v) in &res {
        assert_eq!(*s, 200, "{v}");
    }
    assert_total(g, "p4", 260).await;
    assert_reconciled(g.backend.as_ref(), &g.db, "p4").await;

    step("pause / resume racing add_stock");
    for round in 0..6 {
        let want = if round % 2 == 0 { "paused" } else { "active" };
        let res = patch_storm(
            &g.app,
            "p4",
            vec![
                json!({"add_stock": 1}),
                json!({"state": want}),
                json!({"add_stock": 1}),
            ],
        )
        .await;
        for (s, v) in &res {
            assert_eq!(*s, 200, "round {round}: {v}");
        }
        assert_state_everywhere(g, "p4", want).await;
    }
    assert_total(g, "p4", 272).await;
    assert_reconciled(g.backend.as_ref(), &g.db, "p4").await;

    step("racing add_stock never passes batches.max_stock");
    let res = patch_storm(&g.app, "p4", vec![json!({"add_stock": 10}); 10]).await;
    let ok = res.iter().filter(|(s, _)| *s == 200).count();
    for (s, v) in &res {
        assert!(
            *s == 200 || (*s == 400 && code(v) == "bad_request"),
            "{s} {v}"
        );
    }
    assert_eq!(ok, 2, "272 + 2 * 10 <= {MAX_STOCK} < 272 + 3 * 10");
    assert_total(g, "p4", 292).await;
    assert!(g.db.get_batch("p4").await.unwrap().unwrap().stock <= MAX_STOCK);
    assert_reconciled(g.backend.as_ref(), &g.db, "p4").await;

    step("claims still flow");
    for u in 0..5 {
        assert_eq!(claim(&g.app, "p4", &format!("late{u}"), None).await.0, 201);
    }
    drain(&g.backend, &g.db, &g.cfg, "p4", 10).await;
    assert_reconciled(g.backend.as_ref(), &g.db, "p4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item4_concurrent_patches_apply_exactly_once_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let g = redis_gw_with(&[format!("batches.max_stock={MAX_STOCK}")]).await;
    item4_case(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item4_concurrent_patches_apply_exactly_once_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&[format!("batches.max_stock={MAX_STOCK}")]).await;
    item4_case(&g).await;
}

/// A change committed in the database whose Redis apply never happened (the gateway died
/// in between): `reconcile` sees the lag, the periodic check re-applies the stored
/// definition, and a repeated apply of an older version changes nothing.
async fn item4_interrupted_change_case<B: Backend>(g: &Gw<B>) {
    create(g, "heal4", 50, 1, json!({"shards": 3})).await;
    let row = g.db.batch_row("heal4").await.unwrap().unwrap();
    let mut changed = row.batch.clone();
    changed.stock += 25;
    changed.state = claimgate::domain::batch::BatchState::Paused;
    assert!(
        g.db.update_batch(&changed, row.version, row.version + 1)
            .await
            .unwrap()
    );
    let diffs = reconcile(g.backend.as_ref(), &g.db, Some("heal4"))
        .await
        .unwrap();
    assert!(
        diffs.iter().any(|d| matches!(
            d,
            claimgate::recovery::Difference::VersionBehind { slot, .. } if slot == "pool"
        )),
        "{diffs:?}"
    );
    let entry = g.app.catalog().load("heal4").await.unwrap();
    g.app.catalog().heal_definitions().await;
    assert_eq!(entry.version(), row.version + 1);
    assert_state_everywhere(g, "heal4", "paused").await;
    let keys = BatchKeys::new("heal4", 3);
    let c = g.app.stock().conservation(&keys).await.unwrap();
    assert!(c.holds() && c.total == 75, "{c:?}");
    assert_reconciled(g.backend.as_ref(), &g.db, "heal4").await;
    // the older version again (a late PATCH): nothing moves
    g.app
        .stock()
        .apply_definition(&keys, &row.batch, row.version)
        .await
        .unwrap();
    assert_state_everywhere(g, "heal4", "paused").await;
    assert_eq!(g.app.stock().conservation(&keys).await.unwrap(), c);
    assert_reconciled(g.backend.as_ref(), &g.db, "heal4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item4_interrupted_change_is_healed_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    item4_interrupted_change_case(&redis_gw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item4_interrupted_change_is_healed_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    item4_interrupted_change_case(&embedded_gw().await).await;
}

// ---------------------------------------------------------------------------------------
// a create retried after a crash part-way

fn batch_of(body: &str) -> claimgate::domain::batch::Batch {
    let new: claimgate::domain::batch::NewBatch = serde_json::from_str(body).unwrap();
    new.validate(&claimgate::config::BatchesConfig::default())
        .unwrap()
}

/// The three places a create can die: before its Redis setup (the retry sets it up), after
/// it but before recording it, with claims already served and persisted (the retry records
/// it, nothing is set up again), and the same with Redis lost meanwhile (lost until rebuild).
async fn crash_mid_setup_case<B: Backend>(g: &Gw<B>) {
    step("died before the Redis setup");
    let body = batch_json("crash1", 20, 1, json!({"shards": 2}));
    let (row, inserted) = g.db.insert_batch(&batch_of(&body)).await.unwrap();
    assert!(inserted && !row.setup_done);
    assert_eq!(
        claim(&g.app, "crash1", "early", None).await.0,
        404,
        "not created yet"
    );
    let diffs = reconcile(g.backend.as_ref(), &g.db, Some("crash1"))
        .await
        .unwrap();
    assert_eq!(
        diffs,
        [claimgate::recovery::Difference::SetupIncomplete {
            batch: "crash1".into()
        }]
    );
    let (s, v) = call(&g.app, "POST", "/v1/batches", body.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert!(g.db.batch_row("crash1").await.unwrap().unwrap().setup_done);
    assert_eq!(claim(&g.app, "crash1", "u1", None).await.0, 201);
    assert_reconciled(g.backend.as_ref(), &g.db, "crash1").await;

    step("died after the Redis setup, claims served meanwhile");
    let body = batch_json("crash2", 20, 1, json!({"shards": 2}));
    let (row, _) = g.db.insert_batch(&batch_of(&body)).await.unwrap();
    let keys = BatchKeys::new("crash2", 2);
    g.app
        .stock()
        .create(&row.batch, &keys, row.version)
        .await
        .unwrap();
    let mut held = HashSet::new();
    for u in 0..4 {
        let (s, v) = claim(&g.app, "crash2", &format!("u{u}"), None).await;
        assert_eq!(s, 201, "{v}");
        held.insert(coupon(&v));
    }
    drain(&g.backend, &g.db, &g.cfg, "crash2", 4).await;
    let before = g.app.stock().conservation(&keys).await.unwrap();
    let (s, v) = call(&g.app, "POST", "/v1/batches", body.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert!(g.db.batch_row("crash2").await.unwrap().unwrap().setup_done);
    assert_eq!(
        g.app.stock().conservation(&keys).await.unwrap(),
        before,
        "set up again"
    );
    let (s, v) = claim(&g.app, "crash2", "u9", None).await;
    assert_eq!(s, 201, "{v}");
    assert!(!held.contains(&coupon(&v)), "coupon id minted twice");
    drain(&g.backend, &g.db, &g.cfg, "crash2", 5).await;
    assert_reconciled(g.backend.as_ref(), &g.db, "crash2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_retried_after_a_crash_mid_setup_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    crash_mid_setup_case(&redis_gw().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_retried_after_a_crash_mid_setup_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    crash_mid_setup_case(&embedded_gw().await).await;
}

/// A create that died after its Redis setup, then Redis lost the batch while the database
/// holds its claims: the retry must not set it up again (coupon ids would restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_retried_after_crash_and_redis_loss_stays_lost() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = redis_gw().await;
    let body = batch_json("crash3", 20, 1, json!({"shards": 2}));
    let (row, _) = g.db.insert_batch(&batch_of(&body)).await.unwrap();
    let keys = BatchKeys::new("crash3", 2);
    g.app
        .stock()
        .create(&row.batch, &keys, row.version)
        .await
        .unwrap();
    for u in 0..3 {
        assert_eq!(claim(&g.app, "crash3", &format!("u{u}"), None).await.0, 201);
    }
    drain(&g.backend, &g.db, &g.cfg, "crash3", 3).await;
    g.redis.as_ref().unwrap().cli(&["FLUSHALL"]);
    let app = claimgate::gateway::assemble(g.cfg.clone(), g.backend.clone(), g.db.clone(), None);
    let (s, v) = call(&app, "POST", "/v1/batches", body).await;
    assert_eq!((s, code(&v)), (503, "backend_unavailable"), "{v}");
    for slot in keys.all() {
        assert!(
            app.stock().meta(slot).await.unwrap().is_empty(),
            "{}",
            slot.meta
        );
    }
    assert_eq!(claim(&app, "crash3", "u7", None).await.0, 503);
    rebuild(g.backend.as_ref(), &g.db, "crash3", false)
        .await
        .unwrap();
    assert!(g.db.batch_row("crash3").await.unwrap().unwrap().setup_done);
    assert_reconciled(g.backend.as_ref(), &g.db, "crash3").await;
}

/// Model bug 2 (tests/model.rs at 28d3395, `model_redis`, seed 7, step 35): a user refused at their
/// limit is remembered by the gateway's cache; Redis then loses the batch with one of the
/// user's coupons unpersisted, and `rebuild` restores the user's count from the database
/// (one below the limit). The cache must forget what it remembered once it sees the new
/// epoch (here without ever having served the batch as lost), or it refuses the user
/// `limit_reached` for as long as the process lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_forgets_users_remembered_at_their_limit_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = redis_gw().await;
    create(&g, "relimit", 10, 2, json!({"shards": 1})).await;
    step("one coupon persisted, one not; the third claim is refused and remembered");
    assert_eq!(claim(&g.app, "relimit", "u", Some("r1")).await.0, 201);
    drain(&g.backend, &g.db, &g.cfg, "relimit", 1).await;
    assert_eq!(claim(&g.app, "relimit", "u", Some("r2")).await.0, 201);
    let (s, v) = claim(&g.app, "relimit", "u", Some("r3")).await;
    assert_eq!((s, code(&v)), (409, "limit_reached"), "{v}");

    step("Redis loses everything; rebuild from the database, where u holds one");
    g.redis.as_ref().unwrap().cli(&["FLUSHALL"]);
    let report = rebuild(g.backend.as_ref(), &g.db, "relimit", false)
        .await
        .unwrap();
    assert_eq!((report.claims, report.pool_stock), (1, 9), "{report}");
    let entry = g.app.catalog().load("relimit").await.unwrap();
    g.app.catalog().refresh(&entry).await;

    step("u is below the limit again: granted, not refused from the cache");
    let (s, v) = claim(&g.app, "relimit", "u", Some("r4")).await;
    assert_eq!(s, 201, "a user below the limit after the rebuild: {v}");
    let (s, v) = claim(&g.app, "relimit", "u", Some("r5")).await;
    assert_eq!((s, code(&v)), (409, "limit_reached"), "{v}");
    drain(&g.backend, &g.db, &g.cfg, "relimit", 2).await;
    assert_reconciled(g.backend.as_ref(), &g.db, "relimit").await;
}

/// Model bug 3 (tests/model.rs `model_redis`, seed 2, step 8, with batches left lost across
/// steps): a batch Redis lost, while this instance still holds it as live (its claims were
/// answered from the cache, paused), was answered `GET` 404 `batch_not_found`, as if it had
/// never existed. It is lost: 503 `backend_unavailable`, like its claims and changes, until
/// `claimgate rebuild`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_of_a_batch_redis_lost_is_503_not_404_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = redis_gw().await;
    create(&g, "lostget", 10, 1, json!({"shards": 2})).await;
    let (s, v) = call(&g.app, "GET", "/v1/batches/lostget", "").await;
    assert_eq!(s, 200, "{v}");
    g.redis.as_ref().unwrap().cli(&["FLUSHALL"]);
    for _ in 0..2 {
        let (s, v) = call(&g.app, "GET", "/v1/batches/lostget", "").await;
        assert_eq!((s, code(&v)), (503, "backend_unavailable"), "{v}");
    }
    let (s, v) = claim(&g.app, "lostget", "u", None).await;
    assert_eq!((s, code(&v)), (503, "backend_unavailable"), "{v}");
    rebuild(g.backend.as_ref(), &g.db, "lostget", false)
        .await
        .unwrap();
    let entry = g.app.catalog().load("lostget").await.unwrap();
    g.app.catalog().refresh(&entry).await;
    let (s, v) = call(&g.app, "GET", "/v1/batches/lostget", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["stock"],
        json!({"total": 10, "claimed": 0, "remaining": 10})
    );
}

// ---------------------------------------------------------------------------------------
// item 8: a batch asked for before it existed

/// A "not found" mark lasts a minute here: only a create can clear it in time.
fn long_missing_ttl() -> Vec<String> {
    vec!["cache.missing_ttl_ms=60000".to_string()]
}

async fn item8_same_instance_case<B: Backend>(g: &Gw<B>) {
    let (s, _) = call(&g.app, "GET", "/v1/batches/late8", "").await;
    assert_eq!(s, 404);
    assert_eq!(claim(&g.app, "late8", "early", None).await.0, 404);
    create(g, "late8", 10, 1, json!({"shards": 2})).await;
    let (s, v) = claim(&g.app, "late8", "first", None).await;
    assert_eq!(s, 201, "right after its create: {v}");
    let (s, v) = call(&g.app, "GET", "/v1/batches/late8", "").await;
    assert_eq!(s, 200, "{v}");
}

/// `other` asked for the batch before it existed; `g` creates it.
async fn item8_other_instance_case<B: Backend>(g: &Gw<B>, other: Arc<App<B>>) {
    let stop = CancellationToken::new();
    claimgate::gateway::spawn_background(&other, stop.child_token());
    let (s, v) = claim(&other, "late8b", "early", None).await;
    assert_eq!((s, code(&v)), (404, "batch_not_found"));
    tokio::time::sleep(Duration::from_millis(200)).await; // its subscriber is up
    step("create on the first instance");
    create(g, "late8b", 10, 1, json!({"shards": 2})).await;
    let created = Instant::now();
    loop {
        let (s, v) = claim(&other, "late8b", "first", None).await;
        if s == 201 {
            break;
        }
        assert_eq!(s, 404, "{v}");
        assert!(
            created.elapsed() < Duration::from_secs(2),
            "the other instance still answers 404 {:?} after the create",
            created.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item8_create_clears_not_found_same_instance_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    item8_same_instance_case(&redis_gw_with(&long_missing_ttl()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item8_create_clears_not_found_same_instance_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    item8_same_instance_case(&embedded_gw_with(&long_missing_ttl()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item8_create_clears_not_found_other_instance_redis() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = redis_gw_with(&long_missing_ttl()).await;
    let other = second_redis_instance(&g).await;
    item8_other_instance_case(&g, other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item8_create_clears_not_found_other_instance_embedded() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&long_missing_ttl()).await;
    let other = second_embedded_instance(&g);
    item8_other_instance_case(&g, other).await;
}
