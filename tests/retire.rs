//! Retirement (issue 14 item 3, "Memory with a bound"): a batch whose claim window ended
//! `batches.retire_after_ms` ago leaves Redis once its log is drained, and the database is
//! its record: replays return the same coupon, the wallet and every transition still work,
//! reconcile is clean. On Redis and on the embedded default.
//!
//! Invariants checked here:
//! - a batch is retired only `retire_after_ms` after its end, and never while its window is
//!   open (a live batch beside it keeps every key);
//! - a shard whose log holds records the database does not have yet keeps its keys (the
//!   retirement waits), and completes once the persister drained it;
//! - afterwards no key of the batch is left, and a second pass changes nothing;
//! - a replay of every request id that won returns its coupon (same id, code and times)
//!   from the database, on this gateway and on a fresh one; a new claim is `ended`;
//! - the coupons' states are the database's: the wallet shows them (a coupon redeemed on its
//!   shard before the retirement reads `used`), and transitions go on there;
//! - the batch cannot be changed, created again, rebuilt or repaired into Redis;
//! - reconcile of the retired batch is clean.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use claimgate::backend::{Backend, BackendError, Script, Value};
use claimgate::domain::time::{Clock, ManualClock, Timestamp};
use claimgate::recovery::{RebuildError, RetireReport, rebuild, reconcile, retire_due};
use claimgate::store::CouponState;
use serde_json::json;
use support::gw::{self, Gw, act, batch_json, call, claim, persist_until};
use support::watchdog::{Watchdog, step};

/// The default `batches.retire_after_ms`: a week.
const AFTER_MS: u64 = 7 * 86_400_000;
const USERS: usize = 40;

/// (coupon id, state) of `user`'s coupons of the batch `ret` (the live batch's coupon of
/// the same user has expired by the time this is read).
async fn wallet<B: Backend>(g: &Gw<B>, user: &str) -> Vec<(String, String)> {
    let (s, v) = call(&g.app, "GET", &format!("/v1/users/{user}/coupons"), "").await;
    assert_eq!(s, 200, "wallet: {v}");
    v["coupons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["batch_id"] == "ret")
        .map(|c| {
            let id = c["coupon_id"].as_str().unwrap_or_default().to_string();
            (id, c["state"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// The gateway's app on `clock` (the background loops are not running: every pass here is
/// called by the test at the instant it names).
fn on_clock<B: Backend>(g: &mut Gw<B>, clock: &Arc<ManualClock>) {
    // transfer markers live a second (Redis expires them in real time, not on `clock`)
    Arc::make_mut(&mut g.cfg).stock.transfer_marker_ttl_s = 1;
    g.app = claimgate::gateway::assemble_with_clock(
        g.cfg.clone(),
        g.backend.clone(),
        g.db.clone(),
        None,
        clock.clone(),
    );
}

async fn pass<B: Backend>(g: &Gw<B>, now: i64) -> RetireReport {
    let rows = g.db.batch_rows().await.expect("batches");
    retire_due(g.backend.as_ref(), &g.db, &rows, now, AFTER_MS)
        .await
        .expect("retirement pass")
}

/// The whole life: claims, a redeem on the shard, retirement (waiting for an undrained log,
/// then complete), then every read and change from the database. `keys(prefix)` lists the
/// backend's keys that start with `prefix`.
async fn retirement<B: Backend>(
    g: Gw<B>,
    clock: Arc<ManualClock>,
    keys: impl Fn(&str) -> Vec<String>,
) {
    let start = clock.now_ms();
    let end = start + 3_600_000;
    let window = json!({"start": "2020-01-01T00:00:00Z", "end": Timestamp(end).to_rfc3339()});
    for id in ["ret", "live"] {
        let w = if id == "ret" {
            window.clone()
        } else {
            json!({"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"})
        };
        let body = batch_json(
            id,
            200,
            2,
            json!({"shards": 4, "claim_window": w, "validity": {"days_after_claim": 30}}),
        );
        let (s, v) = call(&g.app, "POST", "/v1/batches", body).await;
        assert_eq!(s, 201, "{v}");
    }

    step("claims with request ids, concurrently; a coupon redeemed on its shard");
    let claims = futures::future::join_all((0..USERS).map(|i| {
        let app = g.app.clone();
        async move {
            let (user, rid) = (format!("u{i}"), format!("r{i}"));
            let (s, v) = claim(&app, "ret", &user, Some(&rid)).await;
            assert_eq!(s, 201, "{user}: {v}");
            (user, rid, v)
        }
    }))
    .await;
    for i in 0..4 {
        let (s, _) = claim(&g.app, "live", &format!("u{i}"), None).await;
        assert_eq!(s, 201);
    }
    let redeemed = claims[0].2["coupon_id"].as_str().unwrap().to_string();
    // on Redis a claim's time is the server's: the transitions' clock must not lag it
    clock.set(claimgate::domain::time::now_ms() + 1_000);
    for action in ["lock", "redeem"] {
        let (s, v) = act(&g, &redeemed, action, "o1").await;
        assert_eq!(s, 200, "{action}: {v}");
    }
    persist_until(&g, "every claim and the redeem", async || {
        let (coupons, _) = g.db.claim_counts("ret").await.unwrap();
        let row = g.db.get_coupon(&redeemed).await.unwrap();
        coupons == USERS as u64 && row.is_some_and(|r| r.state == CouponState::Used)
    })
    .await;

    step("not due: the window is open, then ended less than retire_after_ms ago");
    for now in [start, end + 1, end + AFTER_MS as i64 - 1] {
        assert_eq!(pass(&g, now).await, RetireReport::default(), "at {now}");
    }
    assert!(!keys("cg:{ret:").is_empty());

    step("a claim not yet persisted holds its shard: the retirement waits");
    let (s, v) = claim(&g.app, "ret", "late", Some("rl")).await;
    assert_eq!(s, 201, "{v}");
    let late = v["coupon_id"].as_str().unwrap().to_string();
    let late_shard: u32 = late.split('.').nth(1).unwrap().parse().unwrap();
    let due = end + AFTER_MS as i64;
    clock.set(due);
    let first = pass(&g, due).await;
    assert_eq!((first.begun, first.retired, first.waiting), (1, 0, 1));
    assert!(
        keys(&format!("cg:{{ret:{late_shard}}}:log")).len() == 1,
        "the undrained log is kept: {:?}",
        keys("cg:{ret:")
    );
    assert!(keys("cg:{ret:pool}:meta").len() == 1, "the pool goes last");
    // mid-retirement, a replay is answered (from the database, or from the shard)
    let (s, v) = claim(&g.app, "ret", "u1", Some("r1")).await;
    assert_eq!(
        (s, &v["coupon_id"]),
        (200, &claims[1].2["coupon_id"]),
        "{v}"
    );

    persist_until(&g, "the late claim", async || {
        g.db.get_coupon(&late).await.unwrap().is_some()
    })
    .await;
    // the transfer markers are the one kind of key retirement leaves to expire on its own
    // (the configuration makes them expire first: retirement_settings_are_checked_at_load)
    let markers = || {
        let mut k = keys("cg:{ret:");
        k.retain(|k| k.contains("}:in:"));
        k
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !markers().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "markers: {:?}",
            markers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = pass(&g, due + 1).await;
    assert_eq!((second.begun, second.retired, second.waiting), (0, 1, 0));
    assert!(second.keys > 0);
    assert_eq!(
        keys("cg:{ret:"),
        Vec::<String>::new(),
        "no key of it is left"
    );
    assert!(!keys("cg:{live:").is_empty(), "a live batch keeps its keys");
    assert_eq!(
        pass(&g, due + 2).await,
        RetireReport::default(),
        "idempotent"
    );
    assert_eq!(keys("cg:{ret:"), Vec::<String>::new());

    step("replays come from the database, the same coupon; new claims are ended");
    for (user, rid, first) in &claims {
        let (s, v) = claim(&g.app, "ret", user, Some(rid)).await;
        assert_eq!(s, 200, "{user}: {v}");
        for field in [
            "coupon_id",
            "valid_from",
            "valid_to",
            "claimed_at",
            "batch_id",
        ] {
            assert_eq!(v[field], first[field], "{user} {field}: {v} vs {first}");
        }
    }
    let (s, v) = claim(&g.app, "ret", "u3", Some("other")).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("ended")), "{v}");
    let (s, v) = claim(&g.app, "ret", "newcomer", None).await;
    assert_eq!((s, v["error"].as_str()), (409, Some("ended")), "{v}");

    step("a fresh gateway knows it only from the database");
    let fresh = claimgate::gateway::assemble_with_clock(
        g.cfg.clone(),
        g.backend.clone(),
        g.db.clone(),
        None,
        clock.clone(),
    );
    let (user, rid, first) = &claims[7];
    let (s, v) = claim(&fresh, "ret", user, Some(rid)).await;
    assert_eq!((s, &v["coupon_id"]), (200, &first["coupon_id"]), "{v}");
    let (s, v) = call(&fresh, "GET", "/v1/batches/ret", "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["stock"]["total"], &v["stock"]["claimed"]),
        (&json!(200), &json!(USERS + 1)),
        "{v}"
    );
    assert_eq!(v["retired_at"], json!(Timestamp(due).to_rfc3339()), "{v}");

    step("the wallet and transitions are the database's");
    assert_eq!(
        wallet(&g, "u0").await,
        vec![(redeemed.clone(), "used".into())]
    );
    let (s, v) = act(&g, &redeemed, "refund", "o1").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("unused")), "{v}");
    let other = claims[2].2["coupon_id"].as_str().unwrap().to_string();
    let (s, v) = act(&g, &other, "lock", "o2").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{v}");
    let (s, v) = act(&g, &other, "lock", "o3").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    assert_eq!(
        wallet(&g, "u2").await,
        vec![(other.clone(), "locked".into())]
    );
    let row = g.db.get_coupon(&other).await.unwrap().unwrap();
    assert_eq!(row.state, CouponState::Locked, "written to the database");
    assert_eq!(keys("cg:{ret:"), Vec::<String>::new(), "nothing came back");

    step("final: no change, no create, no rebuild, no repair");
    let (s, v) = call(
        &g.app,
        "PATCH",
        "/v1/batches/ret",
        json!({"add_stock": 10}).to_string(),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let body = batch_json(
        "ret",
        200,
        2,
        json!({"shards": 4, "claim_window": window, "validity": {"days_after_claim": 30}}),
    );
    let (s, v) = call(&g.app, "POST", "/v1/batches", body).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let r = rebuild(g.backend.as_ref(), &g.db, "ret", true).await;
    assert!(matches!(r, Err(RebuildError::Retired(_))), "{r:?}");
    let r = claimgate::recovery::repair_shard(
        g.backend.as_ref(),
        &g.db,
        "ret",
        0,
        "test",
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .await;
    assert!(matches!(r, Err(RebuildError::Retired(_))), "{r:?}");
    assert_eq!(keys("cg:{ret:"), Vec::<String>::new());

    step("reconcile is clean");
    let diffs = reconcile(g.backend.as_ref(), &g.db, Some("ret"))
        .await
        .unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    persist_until(&g, "the live batch's claims", async || {
        g.db.claim_counts("live").await.unwrap().0 == 4
    })
    .await;
    let diffs = reconcile(g.backend.as_ref(), &g.db, None).await.unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

/// A backend that runs `hook` once, just before the first call of `script`, then passes
/// every call through: a test's way to put another actor's steps between two of the code
/// under test's own.
struct Interpose<B> {
    inner: Arc<B>,
    script: Script,
    hook: std::sync::Mutex<Option<Hook>>,
}

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

impl<B: Backend> Backend for Interpose<B> {
    fn eval(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
    ) -> impl Future<Output = Result<Value, BackendError>> + Send {
        let hook = if script == self.script {
            self.hook.lock().unwrap().take()
        } else {
            None
        };
        async move {
            if let Some(hook) = hook {
                hook().await;
            }
            self.inner.eval(script, keys, args).await
        }
    }
    fn publish(&self, message: &str) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.inner.publish(message)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.subscribe()
    }
    fn ready(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        self.inner.ready()
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

/// A repair that read the batch before its retirement began, and fences the shard only once
/// the retirement dropped everything (the retirement runs between the repairer's pool check
/// and its fence), stops: the batch is retired, so nothing of it comes back to Redis but the
/// fence's lock, which expires on its own. Before the repair read the batch again under its
/// lock, it went on into the retired batch (a new epoch in the database, the shard's
/// `begin`) and failed only at its census.
async fn repair_racing_retirement<B: Backend>(g: Gw<B>, keys: impl Fn(&str) -> Vec<String>) {
    let ended = json!({"start": "2020-01-01T00:00:00Z", "end": "2021-01-01T00:00:00Z"});
    let body = batch_json("rr", 100, 1, json!({"shards": 4, "claim_window": ended}));
    let (s, v) = call(&g.app, "POST", "/v1/batches", body).await;
    assert_eq!(s, 201, "{v}");
    assert!(!keys("cg:{rr:").is_empty());
    let (inner, db) = (g.backend.clone(), g.db.clone());
    let retire: Hook = Box::new(move || {
        Box::pin(async move {
            let now = claimgate::domain::time::now_ms();
            let rows = db.batch_rows().await.unwrap();
            let r = retire_due(inner.as_ref(), &db, &rows, now, AFTER_MS)
                .await
                .unwrap();
            assert_eq!((r.begun, r.retired), (1, 1), "{r:?}");
        })
    });
    let racing = Interpose {
        inner: g.backend.clone(),
        script: Script::Restore,
        hook: std::sync::Mutex::new(Some(retire)),
    };
    let secs = Duration::from_secs(5);
    let r = claimgate::recovery::repair_shard(&racing, &g.db, "rr", 0, "test", secs, secs).await;
    assert!(matches!(r, Err(RebuildError::Retired(_))), "{r:?}");
    // (and the transfer markers of the set-up, which expire on their own too)
    let mut left = keys("cg:{rr:");
    left.retain(|k| !k.contains("}:in:"));
    assert_eq!(
        left,
        vec!["cg:{rr:0}:repair".to_string()],
        "only the fence's lock is left"
    );
    let row = g.db.batch_row("rr").await.unwrap().unwrap();
    assert!(row.retired());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repair_racing_a_retirement_restores_nothing_redis() {
    let _w = Watchdog::arm(Duration::from_secs(60));
    let mut g = gw::redis_gw().await;
    let redis = g.redis.take().expect("its own redis");
    repair_racing_retirement(g, move |prefix| redis.keys_with_prefix(prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repair_racing_a_retirement_restores_nothing_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(60));
    let g = gw::embedded_gw().await;
    let backend = g.backend.clone();
    repair_racing_retirement(g, move |prefix| backend.keys_with_prefix(prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retired_batch_leaves_redis_and_the_database_answers_redis() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let mut g = gw::redis_gw().await;
    let clock = Arc::new(ManualClock::new(claimgate::domain::time::now_ms()));
    on_clock(&mut g, &clock);
    let redis = g.redis.take().expect("its own redis");
    retirement(g, clock, move |prefix| redis.keys_with_prefix(prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retired_batch_leaves_redis_and_the_database_answers_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let mut g = gw::embedded_gw().await;
    let clock = Arc::new(ManualClock::new(claimgate::domain::time::now_ms()));
    g.backend.set_clock(clock.clone());
    on_clock(&mut g, &clock);
    let backend = g.backend.clone();
    retirement(g, clock, move |prefix| backend.keys_with_prefix(prefix)).await;
}

/// A batch that sold out, then retired: its winners' replays are answered from the
/// database. Regression (`scripts/bench-retire.sh`, 2026-12-02: 0 of 500 replays after the
/// retirement): the local cache refused them as sold out, and only a refusal as ended was
/// looked up in the database; the winners set that lets a sold-out refusal replay came
/// from Redis, which no longer had it.
async fn sold_out_then_retired<B: Backend>(g: Gw<B>, clock: Arc<ManualClock>) {
    let start = clock.now_ms();
    let end = start + 3_600_000;
    let window = json!({"start": "2020-01-01T00:00:00Z", "end": Timestamp(end).to_rfc3339()});
    let body = batch_json("so", 10, 1, json!({"shards": 2, "claim_window": window}));
    let (s, v) = call(&g.app, "POST", "/v1/batches", body).await;
    assert_eq!(s, 201, "{v}");
    let won = futures::future::join_all((0..10).map(|i| {
        let app = g.app.clone();
        async move {
            let (s, v) = claim(&app, "so", &format!("w{i}"), Some(&format!("r{i}"))).await;
            assert_eq!(s, 201, "{v}");
            v
        }
    }))
    .await;
    let (s, v) = claim(&g.app, "so", "late", Some("rl")).await;
    assert_eq!((s, v["error"].as_str()), (410, Some("sold_out")), "{v}");
    // sold out, still in Redis: a winner replays (the winners set is loaded)
    let (s, v) = claim(&g.app, "so", "w0", Some("r0")).await;
    assert_eq!((s, &v["coupon_id"]), (200, &won[0]["coupon_id"]), "{v}");
    persist_until(&g, "every claim", async || {
        g.db.claim_counts("so").await.unwrap().0 == 10
    })
    .await;
    let due = end + AFTER_MS as i64;
    clock.set(due);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // transfer markers (1 s) must expire before the retirement completes
    while pass(&g, due).await.retired == 0 && g.db.retiring().await.unwrap().len() == 1 {
        assert!(std::time::Instant::now() < deadline, "never retired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(g.db.retiring().await.unwrap().is_empty());
    for (i, first) in won.iter().enumerate() {
        let (s, v) = claim(&g.app, "so", &format!("w{i}"), Some(&format!("r{i}"))).await;
        assert_eq!(
            (s, &v["coupon_id"]),
            (200, &first["coupon_id"]),
            "w{i}: {v}"
        );
    }
    let (s, v) = claim(&g.app, "so", "late", Some("rl")).await;
    assert!(s == 410 || s == 409, "a new claim is refused: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sold_out_batch_replays_its_winners_after_retirement_redis() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let mut g = gw::redis_gw().await;
    let clock = Arc::new(ManualClock::new(claimgate::domain::time::now_ms()));
    on_clock(&mut g, &clock);
    sold_out_then_retired(g, clock).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sold_out_batch_replays_its_winners_after_retirement_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let mut g = gw::embedded_gw().await;
    let clock = Arc::new(ManualClock::new(claimgate::domain::time::now_ms()));
    g.backend.set_clock(clock.clone());
    on_clock(&mut g, &clock);
    sold_out_then_retired(g, clock).await;
}

/// Out-of-range retirement settings are refused at load, naming the key.
#[test]
fn retirement_settings_are_checked_at_load() {
    for (sets, key) in [
        (
            &["batches.retire_after_ms=59999"][..],
            "batches.retire_after_ms",
        ),
        (
            &["batches.retire_after_ms=315360000001"],
            "batches.retire_after_ms",
        ),
        // the default marker lifetime is a day: a retirement a day after the end would
        // find markers of the last transfers still alive
        (
            &["batches.retire_after_ms=86400000"],
            "batches.retire_after_ms",
        ),
        (
            &[
                "stock.transfer_marker_ttl_s=1",
                "batches.retire_after_ms=60999",
            ],
            "batches.retire_after_ms",
        ),
        (&["batches.retire_every_ms=99"], "batches.retire_every_ms"),
        (
            &["batches.retire_every_ms=86400001"],
            "batches.retire_every_ms",
        ),
    ] {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match claimgate::config::load(None, Vec::new(), &sets) {
            Ok(_) => panic!("{sets:?} was accepted"),
            Err(e) => assert!(e.to_string().contains(key), "{sets:?}: {e}"),
        }
    }
    for ok in [
        &["batches.retire_after_ms=0"][..],
        &["batches.retire_after_ms=86460000"],
        &[
            "stock.transfer_marker_ttl_s=1",
            "batches.retire_after_ms=61000",
        ],
    ] {
        let sets: Vec<String> = ok.iter().map(|s| s.to_string()).collect();
        if let Err(e) = claimgate::config::load(None, Vec::new(), &sets) {
            panic!("{sets:?}: {e}");
        }
    }
}
