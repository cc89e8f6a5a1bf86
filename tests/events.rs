//! The coupon after the claim: refunds, expiry, reminders and events out, on both
//! databases (SQLite and a throwaway PostgreSQL database), against a local webhook server
//! of the test's own that fails, times out and answers 500.
//!
//! Invariants checked here:
//! - every transition reaches the database exactly once: one `coupon_events` row and one
//!   outbox row with the same id per state change, none for a repeat or a refusal;
//! - of 16 orders racing to lock one coupon exactly one wins, and one `locked` event is
//!   written;
//! - expiry and reminders follow an injected clock (no sleeping): the wallet reads
//!   `expired` from the instant the validity ends, before any sweeper ran; the sweeper
//!   then writes `expired` once; the reminder is written once per coupon, for usable
//!   coupons only;
//! - delivery is at least once under faults (connection closed, no answer in time, 500),
//!   signed as specified, retried with backoff, dead-lettered after `events.max_attempts`,
//!   with the ledger telling attempts and last status; many workers on one outbox deliver
//!   each event once when the consumer is healthy;
//! - a refund makes a coupon usable again and does not give back the batch's per-user
//!   claim count.

mod support;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claimgate::config::{Config, EventsConfig};
use claimgate::domain::claim::ClaimRecord;
use claimgate::domain::coupon::Transition;
use claimgate::domain::time::{Clock, ManualClock};
use claimgate::notify::signature::{EVENT_ID_HEADER, SIGNATURE_HEADER, verify};
use claimgate::notify::{Deliverer, sweep_once};
use claimgate::store::{CouponState, Db, DbError, DeliveryState};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::gw::{self, call};
use support::watchdog::{Watchdog, step};

const SECRET: &str = "webhook-secret-for-tests-0123456789-abcdef";
/// 2030-01-01T00:00:00Z: the validity end of the coupons of these tests.
const END: i64 = 1_893_456_000_000;
const DAY: i64 = 86_400_000;

// ---------------------------------------------------------------------------------------
// databases and coupons

/// A migrated database of each engine; the PostgreSQL one is dropped with the guard.
async fn sqlite() -> (Db, tempfile::TempDir) {
    gw::sqlite_db().await
}

async fn postgres() -> (Db, support::PgDb) {
    gw::postgres_db().await
}

/// A claim of coupon `b.0.<seq>` by `user`, valid from 2020 to [`END`].
fn claim(batch: &str, seq: u64, user: &str) -> ClaimRecord {
    ClaimRecord {
        coupon_id: format!("{batch}.0.{seq}"),
        batch_id: batch.to_string(),
        shard: 0,
        seq,
        user_id: user.to_string(),
        request_id: None,
        claimed_at: END - 30 * DAY,
        valid_from: 1_577_836_800_000,
        valid_to: END,
        code: None,
        managed: false,
    }
}

fn lock(order: &str) -> Transition {
    Transition::Lock {
        order: order.into(),
        timeout_ms: 60_000,
    }
}

fn order(t: &str, order: &str) -> Transition {
    Transition::client(t, order, 60_000).unwrap()
}

/// (event id, kind) of a coupon's transaction log, and of its outbox.
async fn log_and_outbox(db: &Db, coupon: &str) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let log = db
        .coupon_events(coupon)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_id, e.kind))
        .collect();
    let outbox = db
        .coupon_outbox(coupon)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.event_id, e.kind))
        .collect();
    (log, outbox)
}

// ---------------------------------------------------------------------------------------
// every transition reaches the database exactly once

/// A step: transition, instant, expected answer (state, or refusal reason), events written.
type Step = (
    Transition,
    i64,
    Result<CouponState, &'static str>,
    &'static [&'static str],
);

async fn every_transition_once(db: Db) {
    let c = "once.0.1";
    db.write_claims(&[claim("once", 1, "u1")]).await.unwrap();
    db.write_claims(&[claim("once", 1, "u1")]).await.unwrap(); // redelivered
    let t0 = END - 10 * DAY;
    let mut expect: Vec<&str> = vec!["claimed"];
    // (transition, at, answer) in order; a repeat or a refusal writes nothing
    let steps: Vec<Step> = vec![
        (lock("o1"), t0, Ok(CouponState::Locked), &["locked"]),
        (lock("o1"), t0 + 1, Ok(CouponState::Locked), &[]),
        (lock("o2"), t0 + 2, Err("locked by another order"), &[]),
        (
            order("redeem", "o2"),
            t0 + 3,
            Err("not locked by this order"),
            &[],
        ),
        (
            order("redeem", "o1"),
            t0 + 4,
            Ok(CouponState::Used),
            &["redeemed"],
        ),
        (order("redeem", "o1"), t0 + 5, Ok(CouponState::Used), &[]),
        (order("release", "o1"), t0 + 6, Err("already used"), &[]),
        (
            order("refund", "o2"),
            t0 + 7,
            Err("redeemed by another order"),
            &[],
        ),
        (
            order("refund", "o1"),
            t0 + 8,
            Ok(CouponState::Unused),
            &["refunded"],
        ),
        (order("refund", "o1"), t0 + 9, Ok(CouponState::Unused), &[]),
        // usable again, by another order; its lock times out and o3 takes it over
        (lock("o2"), t0 + 10, Ok(CouponState::Locked), &["locked"]),
        (
            lock("o3"),
            t0 + 10 + 60_000,
            Ok(CouponState::Locked),
            &["released", "locked"],
        ),
        (
            order("release", "o3"),
            t0 + 70_001,
            Ok(CouponState::Unused),
            &["released"],
        ),
        (
            order("release", "o3"),
            t0 + 70_002,
            Ok(CouponState::Unused),
            &[],
        ),
        // a lock taken just before the end ends with the validity
        (
            lock("o4"),
            END - 1_000,
            Ok(CouponState::Locked),
            &["locked"],
        ),
        (
            order("redeem", "o4"),
            END,
            Err("this order's lock was released or has expired"),
            &[],
        ),
        (lock("o5"), END + 1, Err("validity has ended"), &[]),
    ];
    for (i, (t, at, want, events)) in steps.into_iter().enumerate() {
        step(format!("transition {i}: {t:?}"));
        let got = db.transition(c, &t, at).await;
        match (&got, want) {
            (Ok(row), Ok(state)) => assert_eq!(row.state, state, "step {i} {t:?}"),
            (Err(DbError::InvalidState { reason, .. }), Err(why)) => {
                assert_eq!(*reason, why, "step {i} {t:?}")
            }
            (got, want) => panic!("step {i} {t:?}: got {got:?}, want {want:?}"),
        }
        expect.extend(events);
        let (log, _) = log_and_outbox(&db, c).await;
        let kinds: Vec<&str> = log.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(kinds, expect, "after step {i} {t:?}");
    }
    // the lock of o4 ended with the validity: the sweeper writes its release and the expiry
    let cfg = EventsConfig::default();
    let (swept, _) = sweep_once(&db, &cfg, END + 5).await.unwrap();
    assert_eq!(swept.expired, 1);
    let (swept, _) = sweep_once(&db, &cfg, END + 6).await.unwrap();
    assert_eq!(swept.expired, 0, "expired once");
    expect.extend(["released", "expired"]);
    let (log, outbox) = log_and_outbox(&db, c).await;
    let kinds: Vec<&str> = log.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(kinds, expect);
    // the outbox has exactly the log's events, once each, in the same order
    assert_eq!(outbox, log, "outbox == transaction log");
    let mut ids: Vec<&String> = log.iter().map(|(id, _)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), log.len(), "event ids are unique");
    // each body names its event and the state right after it
    let bodies = db.coupon_outbox(c).await.unwrap();
    let states: Vec<String> = bodies
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(&e.payload).unwrap();
            assert_eq!(v["id"], e.event_id.as_str());
            assert_eq!(v["type"], format!("coupon.{}", e.kind));
            assert_eq!(v["coupon_id"], c);
            assert_eq!(v["user_id"], "u1");
            assert_eq!(v["valid_to"], "2030-01-01T00:00:00Z");
            v["state"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        states,
        [
            "unused", "locked", "used", "unused", "locked", "unused", "locked", "unused", "locked",
            "unused", "expired"
        ]
    );
    let timed_out: Vec<Value> = bodies
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.payload).unwrap())
        .filter(|v| v["cause"] == "lock_timeout")
        .collect();
    assert_eq!(timed_out.len(), 2, "the two lapsed locks say so");
    assert_eq!(
        db.get_coupon_at(c, END + 7).await.unwrap().unwrap().state,
        CouponState::Expired
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_reaches_the_database_once_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    every_transition_once(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_reaches_the_database_once_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    every_transition_once(db).await;
}

// ---------------------------------------------------------------------------------------
// 16 orders race to lock one coupon

async fn lock_race(db: Db) {
    const COUPONS: u64 = 8;
    const ORDERS: usize = 16;
    let claims: Vec<ClaimRecord> = (1..=COUPONS).map(|i| claim("race", i, "u1")).collect();
    db.write_claims(&claims).await.unwrap();
    for i in 1..=COUPONS {
        step(format!("race for race.0.{i}"));
        let coupon = format!("race.0.{i}");
        let start = Arc::new(tokio::sync::Barrier::new(ORDERS));
        let mut tasks = Vec::new();
        for o in 0..ORDERS {
            let (db, coupon, start) = (db.clone(), coupon.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let order = format!("order-{o}");
                (
                    order.clone(),
                    db.lock(&coupon, &order, Duration::from_secs(60)).await,
                )
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                (order, Ok(row)) => {
                    assert_eq!(row.state, CouponState::Locked);
                    assert_eq!(row.order_id.as_deref(), Some(order.as_str()));
                    winners.push(order);
                }
                (_, Err(DbError::InvalidState { state, .. })) => {
                    assert_eq!(state, CouponState::Locked)
                }
                (o, Err(e)) => panic!("{o}: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "{coupon}: winners {winners:?}");
        let (log, outbox) = log_and_outbox(&db, &coupon).await;
        let kinds: Vec<&str> = log.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(kinds, ["claimed", "locked"], "{coupon}");
        assert_eq!(outbox, log, "{coupon}");
        let row = db.get_coupon(&coupon).await.unwrap().unwrap();
        assert_eq!(row.order_id.as_ref(), Some(&winners[0]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_orders_race_to_lock_one_coupon_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let (db, _dir) = sqlite().await;
    lock_race(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_orders_race_to_lock_one_coupon_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let (db, _pg) = postgres().await;
    lock_race(db).await;
}

// ---------------------------------------------------------------------------------------
// expiry and reminders on an injected clock

async fn expiry_and_reminders(db: Db) {
    let lead = 3 * DAY;
    let cfg = EventsConfig {
        expiring_soon_ms: lead as u64,
        sweep_batch: 2, // several passes for the batch
        ..EventsConfig::default()
    };
    let claims: Vec<ClaimRecord> = (1..=5).map(|i| claim("exp", i, "u7")).collect();
    db.write_claims(&claims).await.unwrap();
    // exp.0.1 used, exp.0.2 locked across the lead instant, the rest usable
    db.transition("exp.0.1", &lock("o1"), END - 10 * DAY)
        .await
        .unwrap();
    db.transition("exp.0.1", &order("redeem", "o1"), END - 10 * DAY)
        .await
        .unwrap();
    db.transition("exp.0.2", &lock("o2"), END - lead - 10)
        .await
        .unwrap();

    step("before the reminder window");
    let (s, _) = sweep_once(&db, &cfg, END - lead - 1).await.unwrap();
    assert_eq!((s.expired, s.reminded), (0, 0));
    step("the reminder window opens");
    let mut reminded = 0;
    for pass in 0..4 {
        let (s, _) = sweep_once(&db, &cfg, END - lead + pass).await.unwrap();
        assert!(s.reminded <= 2, "bounded by sweep_batch");
        reminded += s.reminded;
    }
    assert_eq!(reminded, 3, "the usable ones: exp.0.3, exp.0.4, exp.0.5");
    // the lock of exp.0.2 lapsed: it is usable again, and reminded once
    let (s, _) = sweep_once(&db, &cfg, END - lead + 60_000).await.unwrap();
    assert_eq!(s.reminded, 1);
    let (s, _) = sweep_once(&db, &cfg, END - 1).await.unwrap();
    assert_eq!((s.expired, s.reminded), (0, 0), "once per coupon");
    for i in 2..=5 {
        let out = db.coupon_outbox(&format!("exp.0.{i}")).await.unwrap();
        let reminders: Vec<_> = out.iter().filter(|e| e.kind == "expiring_soon").collect();
        assert_eq!(reminders.len(), 1, "exp.0.{i}");
        let v: Value = serde_json::from_str(&reminders[0].payload).unwrap();
        assert_eq!(v["type"], "coupon.expiring_soon");
        assert_eq!(v["id"], format!("exp.0.{i}:expiring_soon"));
        assert_eq!(v["state"], "unused");
    }
    assert!(
        db.coupon_outbox("exp.0.1")
            .await
            .unwrap()
            .iter()
            .all(|e| e.kind != "expiring_soon"),
        "a used coupon is not reminded"
    );

    step("the validity ends");
    // the wallet reads expired from the instant, before any sweeper ran
    let (page, _) = db
        .user_coupons_at("u7", Some(CouponState::Expired), 10, None, END)
        .await
        .unwrap();
    assert_eq!(page.len(), 4);
    let (page, _) = db
        .user_coupons_at("u7", Some(CouponState::Unused), 10, None, END - 1)
        .await
        .unwrap();
    assert_eq!(page.len(), 4);
    let (page, _) = db
        .user_coupons_at("u7", Some(CouponState::Unused), 10, None, END)
        .await
        .unwrap();
    assert!(page.is_empty());
    assert_eq!(
        db.get_coupon_at("exp.0.3", END)
            .await
            .unwrap()
            .unwrap()
            .state,
        CouponState::Expired
    );
    // an expired coupon cannot be locked
    assert!(matches!(
        db.transition("exp.0.3", &lock("o9"), END).await,
        Err(DbError::InvalidState {
            state: CouponState::Expired,
            reason: "validity has ended",
            ..
        })
    ));
    // the events are not written yet: the sweeper writes them, in bounded batches
    assert!(
        db.coupon_events("exp.0.3")
            .await
            .unwrap()
            .iter()
            .all(|e| e.kind != "expired")
    );
    let mut expired = 0;
    for pass in 0..3 {
        let (s, _) = sweep_once(&db, &cfg, END + pass).await.unwrap();
        assert!(s.expired <= 2);
        expired += s.expired;
    }
    assert_eq!(expired, 4);
    let (s, stats) = sweep_once(&db, &cfg, END + 10).await.unwrap();
    assert_eq!(s.expired, 0);
    // 5 claimed + (locked, redeemed) + locked + 4 reminders + released (o2's lapsed
    // lock, written with its expiry) + 4 expired, none delivered (no webhook here)
    assert_eq!(stats.pending, 5 + 2 + 1 + 4 + 1 + 4);
    for i in 2..=5 {
        let c = format!("exp.0.{i}");
        let (log, outbox) = log_and_outbox(&db, &c).await;
        assert_eq!(log.iter().filter(|(_, k)| k == "expired").count(), 1, "{c}");
        let transitions: Vec<_> = outbox
            .iter()
            .filter(|(_, k)| k != "expiring_soon")
            .cloned()
            .collect();
        assert_eq!(transitions, log, "{c}");
    }
    let used = db
        .get_coupon_at("exp.0.1", END + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(used.state, CouponState::Used, "a used coupon never expires");
    // a refund after the end lands in expired, with both events
    let refunded = db
        .transition("exp.0.1", &order("refund", "o1"), END + 20)
        .await
        .unwrap();
    assert_eq!(refunded.state, CouponState::Expired);
    let (log, outbox) = log_and_outbox(&db, "exp.0.1").await;
    let kinds: Vec<&str> = log.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["claimed", "locked", "redeemed", "refunded", "expired"]
    );
    assert_eq!(outbox, log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_reminders_follow_the_injected_clock_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    expiry_and_reminders(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_reminders_follow_the_injected_clock_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    expiry_and_reminders(db).await;
}

/// Lapsed locks are released by the sweep at their deadline, not before, exactly once, with
/// a `released` event (cause `lock_timeout`) in the log and the outbox; a redeemed coupon
/// and a lock still running are left alone; the clock is injected (no sleeps).
async fn lock_timeouts(db: Db) {
    let cfg = EventsConfig {
        sweep_batch: 2, // several passes
        ..EventsConfig::default()
    };
    let t0 = END - 20 * DAY;
    let claims: Vec<ClaimRecord> = (1..=5).map(|i| claim("lt", i, "u8")).collect();
    db.write_claims(&claims).await.unwrap();
    for i in 1..=4 {
        db.transition(&format!("lt.0.{i}"), &lock(&format!("o{i}")), t0)
            .await
            .unwrap();
    }
    // lt.0.1 redeemed in time; lt.0.4 locked again later (its deadline is later)
    db.transition("lt.0.1", &order("redeem", "o1"), t0 + 1_000)
        .await
        .unwrap();
    db.transition("lt.0.5", &lock("o5"), t0 + 30_000)
        .await
        .unwrap();

    step("before the deadline: nothing");
    let (s, _) = sweep_once(&db, &cfg, t0 + 59_999).await.unwrap();
    assert_eq!((s.released, s.expired), (0, 0));
    step("at the deadline: the three lapsed locks, over two passes");
    let (a, _) = sweep_once(&db, &cfg, t0 + 60_000).await.unwrap();
    let (b, _) = sweep_once(&db, &cfg, t0 + 60_001).await.unwrap();
    assert_eq!((a.released, b.released), (2, 1));
    let (c, _) = sweep_once(&db, &cfg, t0 + 60_002).await.unwrap();
    assert_eq!(c.released, 0, "once");
    for i in 2..=4 {
        let id = format!("lt.0.{i}");
        let (log, outbox) = log_and_outbox(&db, &id).await;
        let kinds: Vec<&str> = log.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(kinds, ["claimed", "locked", "released"], "{id}");
        assert_eq!(outbox, log, "{id}");
        let row = db.get_coupon_at(&id, t0 + 60_002).await.unwrap().unwrap();
        assert_eq!(row.state, CouponState::Unused, "{id}");
    }
    let (log, _) = log_and_outbox(&db, "lt.0.1").await;
    assert_eq!(log.last().unwrap().1, "redeemed");
    let (log, _) = log_and_outbox(&db, "lt.0.5").await;
    assert_eq!(
        log.last().unwrap().1,
        "locked",
        "its lock runs until t0 + 90 s"
    );
    let (s, _) = sweep_once(&db, &cfg, t0 + 90_000).await.unwrap();
    assert_eq!(s.released, 1);
    // the lapsed lock's order cannot redeem; another order can lock
    assert!(
        db.transition("lt.0.2", &order("redeem", "o2"), t0 + 90_001)
            .await
            .is_err()
    );
    db.transition("lt.0.2", &lock("o9"), t0 + 90_001)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_locks_are_swept_at_their_deadline_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    lock_timeouts(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_locks_are_swept_at_their_deadline_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    lock_timeouts(db).await;
}

/// Regression: a coupon read `unused` at the very millisecond its validity ended (the end
/// was treated as inclusive by the wallet's reads and transitions).
#[tokio::test]
async fn a_coupon_reads_expired_from_the_instant_its_validity_ends() {
    let _wd = Watchdog::arm(Duration::from_secs(30));
    let (db, _dir) = sqlite().await;
    db.write_claims(&[claim("edge", 1, "u1")]).await.unwrap();
    let at = |t| db.get_coupon_at("edge.0.1", t);
    assert_eq!(
        at(END - 1).await.unwrap().unwrap().state,
        CouponState::Unused
    );
    assert_eq!(at(END).await.unwrap().unwrap().state, CouponState::Expired);
    let (expired, _) = db
        .user_coupons_at("u1", Some(CouponState::Expired), 10, None, END)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert!(matches!(
        db.transition("edge.0.1", &lock("o1"), END).await,
        Err(DbError::InvalidState { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// a local webhook consumer

/// What the consumer does with the next request.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Reads the request, then closes the connection without an answer.
    Drop,
    /// Answers only after this long (past the sender's timeout).
    Stall(Duration),
    /// Answers this status.
    Status(u16),
}

/// One request the consumer received.
#[derive(Debug, Clone)]
struct Received {
    event_id: String,
    signature: String,
    body: Bytes,
    act: Act,
}

#[derive(Default)]
struct Script {
    /// Acts for the next requests, in order; then `Status(200)`.
    acts: VecDeque<Act>,
    /// Per event id, acts before the scripted ones.
    per_event: HashMap<String, VecDeque<Act>>,
    received: Vec<Received>,
}

/// A webhook consumer on a free port: it follows its script and records every request.
struct Consumer {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    async fn start() -> Consumer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let s = script.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let (event_id, signature) = (h(EVENT_ID_HEADER), h(SIGNATURE_HEADER));
                            let body = match req.into_body().collect().await {
                                Ok(b) => b.to_bytes(),
                                Err(e) => return Err(std::io::Error::other(e)),
                            };
                            let act = {
                                let mut s = s.lock();
                                let act = match s.per_event.get_mut(&event_id) {
                                    Some(q) if !q.is_empty() => q.pop_front(),
                                    _ => None,
                                }
                                .or_else(|| s.acts.pop_front())
                                .unwrap_or(Act::Status(200));
                                s.received.push(Received {
                                    event_id,
                                    signature,
                                    body,
                                    act,
                                });
                                act
                            };
                            let status = match act {
                                // an error from the service: hyper closes the connection
                                Act::Drop => return Err(std::io::Error::other("dropped")),
                                Act::Stall(d) => {
                                    tokio::time::sleep(d).await;
                                    200
                                }
                                Act::Status(s) => s,
                            };
                            let resp = http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(format!("answer {status}"))))
                                .unwrap();
                            Ok::<_, std::io::Error>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Consumer { addr, script, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/claimgate", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.script.lock().received.clone()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn events_config(url: &str, extra: &[&str]) -> Config {
    let mut sets = vec![
        format!("events.webhook_url=\"{url}\""),
        format!("events.webhook_secret=\"{SECRET}\""),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    claimgate::config::load(None, Vec::new(), &sets).expect("events config")
}

/// Checks a received request as a consumer does: the signature over the exact body at the
/// time it names (`now_s`, within 5 minutes), and the event id header equal to the body's.
fn check_signed(r: &Received, now_s: i64) -> Value {
    verify(SECRET.as_bytes(), &r.signature, &r.body, now_s, 300)
        .unwrap_or_else(|e| panic!("{}: signature {:?}: {e}", r.event_id, r.signature));
    let v: Value = serde_json::from_slice(&r.body).expect("JSON body");
    assert_eq!(
        v["id"],
        r.event_id.as_str(),
        "Claimgate-Event-Id == body id"
    );
    v
}

// ---------------------------------------------------------------------------------------
// delivery under faults

async fn delivery_under_faults(db: Db) {
    let consumer = Consumer::start().await;
    let cfg = events_config(
        &consumer.url(),
        &[
            "events.max_attempts=4",
            "events.concurrency=4",
            "events.request_timeout_ms=300",
            "events.lease_ms=5000",
            "events.backoff_min_ms=1000",
            "events.backoff_max_ms=8000",
        ],
    );
    let clock = Arc::new(ManualClock::new(END - 20 * DAY));
    let deliverer = Deliverer::new(db.clone(), &cfg.events, clock.clone()).expect("webhook");
    db.write_claims(&[claim("wh", 1, "u1"), claim("wh", 2, "u2")])
        .await
        .unwrap();
    let (ok, doomed) = ("wh.0.1:claimed", "wh.0.2:claimed");
    {
        let mut s = consumer.script.lock();
        s.per_event.insert(
            ok.into(),
            VecDeque::from([
                Act::Drop,
                Act::Stall(Duration::from_secs(3)),
                Act::Status(500),
                Act::Status(200),
            ]),
        );
        s.per_event
            .insert(doomed.into(), VecDeque::from([Act::Status(500); 10]));
    }
    let mut passes = Vec::new();
    for pass in 1..=6 {
        step(format!("delivery pass {pass}"));
        let p = deliverer.run_once().await.unwrap();
        passes.push((p.claimed, p.delivered, p.failed, p.dead));
        // not due again before the backoff ran: nothing is attempted
        let early = deliverer.run_once().await.unwrap();
        assert_eq!(early.claimed, 0, "pass {pass}: retried before its backoff");
        if pass == 1 {
            let e = db.ledger_entry(ok).await.unwrap().unwrap();
            assert_eq!(
                (e.state, e.attempts, e.last_status),
                (DeliveryState::Pending, 1, None)
            );
            assert!(e.last_error.is_some(), "{e:?}");
        }
        if pass == 2 {
            let e = db.ledger_entry(ok).await.unwrap().unwrap();
            assert!(
                e.last_error
                    .as_deref()
                    .unwrap()
                    .contains("no answer within 300 ms"),
                "{e:?}"
            );
        }
        if pass == 3 {
            let e = db.ledger_entry(ok).await.unwrap().unwrap();
            assert_eq!(e.last_status, Some(500));
            assert!(
                e.last_error.as_deref().unwrap().starts_with("HTTP 500"),
                "{e:?}"
            );
        }
        clock.advance(8_001); // past the longest backoff
    }
    assert_eq!(
        passes,
        [
            (2, 0, 2, 0),
            (2, 0, 2, 0),
            (2, 0, 2, 0),
            (2, 1, 0, 1),
            (0, 0, 0, 0),
            (0, 0, 0, 0),
        ]
    );
    // the ledger
    let e = db.ledger_entry(ok).await.unwrap().unwrap();
    assert_eq!(
        (e.state, e.attempts, e.last_status),
        (DeliveryState::Delivered, 4, Some(200))
    );
    assert!(e.delivered_at.is_some() && e.last_error.is_none());
    let d = db.ledger_entry(doomed).await.unwrap().unwrap();
    assert_eq!(
        (d.state, d.attempts, d.last_status),
        (DeliveryState::Dead, 4, Some(500))
    );
    let (dead, _) = db
        .ledger(Some(DeliveryState::Dead), None, 10)
        .await
        .unwrap();
    assert_eq!(
        dead.iter().map(|e| e.event_id.as_str()).collect::<Vec<_>>(),
        [doomed]
    );
    let stats = db.outbox_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 1));
    // what the consumer saw: every request signed; at least once, deduplicated by id
    let got = consumer.received();
    assert_eq!(got.len(), 8, "4 attempts of each: {got:#?}");
    let mut first_body: HashMap<String, Bytes> = HashMap::new();
    let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
    for r in &got {
        let v = check_signed(r, clock.now_ms() / 1000);
        assert_eq!(v["type"], "coupon.claimed");
        // the same body on every attempt (only the signature's time changes)
        let first = first_body
            .entry(r.event_id.clone())
            .or_insert(r.body.clone());
        assert_eq!(first, &r.body);
        if matches!(r.act, Act::Status(200)) {
            *delivered.entry(r.event_id.clone()).or_default() += 1;
        }
    }
    assert_eq!(delivered, BTreeMap::from([(ok.to_string(), 1)]));
    // the backoff doubled between the failed attempts (with jitter: half to full)
    let acts: Vec<String> = got
        .iter()
        .filter(|r| r.event_id == ok)
        .map(|r| format!("{:?}", r.act))
        .collect();
    assert_eq!(acts.len(), 4, "{acts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivery_under_faults_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    delivery_under_faults(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_delivery_under_faults_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    delivery_under_faults(db).await;
}

/// The backoff between attempts, as the ledger's due times show it: each wait is within
/// [base/2, base] of its doubling base.
#[tokio::test]
async fn retries_back_off_exponentially_with_jitter() {
    let _wd = Watchdog::arm(Duration::from_secs(30));
    let (db, _dir) = sqlite().await;
    let consumer = Consumer::start().await;
    consumer.script.lock().acts = VecDeque::from([Act::Status(503); 6]);
    let cfg = events_config(
        &consumer.url(),
        &[
            "events.max_attempts=7",
            "events.backoff_min_ms=1000",
            "events.backoff_max_ms=10000",
        ],
    );
    let clock = Arc::new(ManualClock::new(END - 20 * DAY));
    let deliverer = Deliverer::new(db.clone(), &cfg.events, clock.clone()).unwrap();
    db.write_claims(&[claim("bo", 1, "u1")]).await.unwrap();
    let id = "bo.0.1:claimed";
    let mut waits = Vec::new();
    for _ in 0..6 {
        let now = clock.now_ms();
        assert_eq!(deliverer.run_once().await.unwrap().failed, 1);
        let e = db.ledger_entry(id).await.unwrap().unwrap();
        waits.push(e.next_attempt_at - now);
        clock.set(e.next_attempt_at);
    }
    for (i, (wait, base)) in waits
        .iter()
        .zip([1_000, 2_000, 4_000, 8_000, 10_000, 10_000])
        .enumerate()
    {
        assert!(
            (base / 2..=base).contains(wait),
            "attempt {}: waited {wait}, base {base}",
            i + 1
        );
    }
    assert_eq!(deliverer.run_once().await.unwrap().delivered, 1);
}

// ---------------------------------------------------------------------------------------
// many workers, one outbox

async fn many_workers(db: Db) {
    const EVENTS: u64 = 120;
    let consumer = Consumer::start().await;
    let cfg = events_config(&consumer.url(), &["events.concurrency=8"]);
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(END - 20 * DAY));
    let claims: Vec<ClaimRecord> = (1..=EVENTS).map(|i| claim("mw", i, "u1")).collect();
    db.write_claims(&claims).await.unwrap();
    let workers: Vec<Deliverer> = (0..3)
        .map(|_| Deliverer::new(db.clone(), &cfg.events, clock.clone()).unwrap())
        .collect();
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds < 100, "the outbox never drained");
        step(format!("round {rounds}"));
        let passes = futures_join(workers.iter().map(|w| {
            let w = w.clone();
            async move { w.run_once().await }
        }))
        .await;
        let claimed: usize = passes.iter().map(|p| p.as_ref().unwrap().claimed).sum();
        if claimed == 0 {
            break;
        }
    }
    let got = consumer.received();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &got {
        check_signed(r, clock.now_ms() / 1000);
        *counts.entry(r.event_id.clone()).or_default() += 1;
    }
    assert_eq!(counts.len() as u64, EVENTS);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let stats = db.outbox_stats().await.unwrap();
    assert_eq!((stats.pending, stats.dead), (0, 0));
    let (page, _) = db
        .ledger(Some(DeliveryState::Delivered), None, 500)
        .await
        .unwrap();
    assert_eq!(page.len() as u64, EVENTS);
    assert!(
        page.iter()
            .all(|e| e.attempts == 1 && e.last_status == Some(200))
    );
}

/// Polls every future to completion, concurrently (no extra dependency).
async fn futures_join<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_workers_deliver_each_event_once_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let (db, _dir) = sqlite().await;
    many_workers(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_workers_deliver_each_event_once_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let (db, _pg) = postgres().await;
    many_workers(db).await;
}

// ---------------------------------------------------------------------------------------
// the wallet's SQL filters are the state machine's states

async fn filters_agree(db: Db) {
    // coupons in every stored state, ending at END or a day later
    let mut claims = Vec::new();
    for i in 1..=14 {
        let mut c = claim("wf", i, "uw");
        if i % 2 == 0 {
            c.valid_to = END + DAY;
        }
        claims.push(c);
    }
    db.write_claims(&claims).await.unwrap();
    let t0 = END - 2 * DAY;
    let id = |i: u64| format!("wf.0.{i}");
    for (i, steps) in [
        (3, vec![lock("o")]), // locked, lapses
        (4, vec![lock("o")]),
        (5, vec![lock("o"), order("redeem", "o")]), // used
        (6, vec![lock("o"), order("redeem", "o")]),
        (7, vec![lock("o"), order("release", "o")]), // released
        (8, vec![lock("o"), order("release", "o")]),
        (
            9,
            vec![lock("o"), order("redeem", "o"), order("refund", "o")],
        ), // refunded
        (
            10,
            vec![lock("o"), order("redeem", "o"), order("refund", "o")],
        ),
    ] {
        for t in steps {
            db.transition(&id(i), &t, t0).await.unwrap();
        }
    }
    // 11, 12: locked with a lock that lasts past the validity end check instant
    for i in [11, 12] {
        let t = Transition::Lock {
            order: "long".into(),
            timeout_ms: 3 * DAY,
        };
        db.transition(&id(i), &t, END - DAY + 1).await.unwrap();
    }
    // 13, 14 swept expired later (the sweep below at END)
    let instants = [
        t0 + 1,
        t0 + 60_000,
        END - 1,
        END,
        END + 1,
        END + DAY - 1,
        END + DAY,
    ];
    for (n, now) in instants.into_iter().enumerate() {
        if n == 4 {
            sweep_once(&db, &EventsConfig::default(), END)
                .await
                .unwrap();
        }
        let mut by_state: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for i in 1..=14 {
            let row = db.get_coupon_at(&id(i), now).await.unwrap().unwrap();
            by_state
                .entry(row.state.as_str())
                .or_default()
                .push(row.coupon_id);
        }
        for state in [
            CouponState::Unused,
            CouponState::Locked,
            CouponState::Used,
            CouponState::Expired,
        ] {
            let (page, _) = db
                .user_coupons_at("uw", Some(state), 100, None, now)
                .await
                .unwrap();
            let mut listed: Vec<String> = page.iter().map(|r| r.coupon_id.clone()).collect();
            assert!(
                page.iter().all(|r| r.state == state),
                "{state} at {now}: {page:?}"
            );
            listed.sort();
            let mut want = by_state.get(state.as_str()).cloned().unwrap_or_default();
            want.sort();
            assert_eq!(listed, want, "{state} at instant {n} ({now})");
        }
        let (all, _) = db
            .user_coupons_at("uw", None, 100, None, now)
            .await
            .unwrap();
        assert_eq!(all.len(), 14);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_filters_agree_with_the_state_machine_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    filters_agree(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_filters_agree_with_the_state_machine_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    filters_agree(db).await;
}

// ---------------------------------------------------------------------------------------
// over HTTP

/// An embedded gateway on an injected clock, with its persister, as `serve` wires it.
struct ClockGw {
    gw: gw::Gw<claimgate::backend::embedded::EmbeddedBackend>,
    app: Arc<claimgate::http::App<claimgate::backend::embedded::EmbeddedBackend>>,
    persister: claimgate::persist::PersisterHandle,
    stop: tokio_util::sync::CancellationToken,
}

async fn clock_gw(clock: Arc<dyn Clock>, extra: &[String]) -> ClockGw {
    let g = gw::embedded_gw_with(extra).await;
    let app = claimgate::gateway::assemble_with_clock(
        g.cfg.clone(),
        g.backend.clone(),
        g.db.clone(),
        None,
        clock,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let mut pcfg = g.cfg.persister.clone();
    pcfg.consumer = Some(format!("events-{:08x}", rand::random::<u32>()));
    let persister =
        claimgate::persist::Persister::spawn(g.backend.clone(), g.db.clone(), pcfg, stop.clone());
    ClockGw {
        gw: g,
        app,
        persister,
        stop,
    }
}

async fn post(
    app: &claimgate::http::App<impl claimgate::backend::Backend>,
    path: &str,
    body: Value,
) -> (u16, Value) {
    call(app, "POST", path, body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_over_http_reopens_the_coupon_not_the_claim() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let clock = Arc::new(ManualClock::new(END - 10 * DAY));
    let g = clock_gw(clock.clone(), &[]).await;
    let app = &g.app;
    let validity =
        json!({"validity": {"start": "2020-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"}});
    let (s, v) = post(
        app,
        "/v1/batches",
        serde_json::from_str(&gw::batch_json("rf", 10, 1, validity)).unwrap(),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = gw::claim(app, "rf", "u1", Some("r1")).await;
    assert_eq!(s, 201, "{v}");
    let coupon = v["coupon_id"].as_str().unwrap().to_string();
    step("persist the claim");
    assert_eq!(g.persister.flush().await.unwrap(), 1);
    let act = |a: &str, o: &str| {
        let path = format!("/v1/coupons/{coupon}/{a}");
        let body = json!({"order_id": o});
        async move { post(app, &path, body).await }
    };
    assert_eq!(act("refund", "o1").await.1["error"], "invalid_state");
    assert_eq!(act("lock", "o1").await.1["state"], "locked");
    assert_eq!(act("redeem", "o1").await.1["state"], "used");
    let (s, v) = act("refund", "o2").await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    let (s, v) = act("refund", "o1").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("unused")), "{v}");
    let (s, v) = act("refund", "o1").await;
    assert_eq!(
        (s, v["state"].as_str()),
        (200, Some("unused")),
        "idempotent: {v}"
    );
    assert_eq!(act("release", "o1").await.1["error"], "invalid_state");
    // usable again: another order locks and redeems it
    assert_eq!(act("lock", "o2").await.1["state"], "locked");
    assert_eq!(act("redeem", "o2").await.1["state"], "used");
    // the claim stays counted: per_user_limit 1 is still reached
    let (s, v) = gw::claim(app, "rf", "u1", Some("r2")).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("limit_reached")),
        "{v}"
    );
    let (s, v) = act("bogus", "o1").await;
    assert_eq!(s, 404, "{v}");

    step("the ledger");
    // the coupon's state lives on its shard: its changes reach the database (and the
    // outbox) through the persister, like its claim
    g.persister.flush().await.unwrap();
    let (s, v) = call(app, "GET", "/v1/events?state=pending&limit=50", "").await;
    assert_eq!(s, 200, "{v}");
    let types: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "coupon.claimed",
            "coupon.locked",
            "coupon.redeemed",
            "coupon.refunded",
            "coupon.locked",
            "coupon.redeemed"
        ]
    );
    assert!(
        v["events"][0].get("payload").is_none(),
        "listings leave the body out"
    );
    assert_eq!(v["next_cursor"], Value::Null);
    let (s, page) = call(app, "GET", "/v1/events?limit=2", "").await;
    assert_eq!(s, 200);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (_, rest) = call(
        app,
        "GET",
        &format!("/v1/events?limit=50&cursor={cursor}"),
        "",
    )
    .await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 4);
    let refunded = v["events"][3]["event_id"].as_str().unwrap().to_string();
    let (s, e) = call(app, "GET", &format!("/v1/events/{refunded}"), "").await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["state"], "pending");
    assert_eq!(e["attempts"], 0);
    assert_eq!(e["payload"]["type"], "coupon.refunded");
    assert_eq!(e["payload"]["order_id"], "o1");
    assert_eq!(e["payload"]["state"], "unused");
    // the `:` may come percent-escaped (schemathesis found it refused)
    let escaped = refunded.replace(':', "%3A");
    let (s, e2) = call(app, "GET", &format!("/v1/events/{escaped}"), "").await;
    assert_eq!((s, &e2["event_id"]), (200, &e["event_id"]), "{e2}");
    for (path, status, code) in [
        ("/v1/events/nope:claimed", 404, "event_not_found"),
        ("/v1/events/bad%20id", 400, "bad_request"),
        ("/v1/events?state=lost", 400, "bad_request"),
        ("/v1/events?limit=0", 400, "bad_request"),
        ("/v1/events?cursor=x", 400, "bad_request"),
        ("/v1/events/%ZZ", 400, "bad_request"),
        ("/v1/events?bogus=1", 400, "bad_request"),
    ] {
        let (s, v) = call(app, "GET", path, "").await;
        assert_eq!(
            (s, v["error"].as_str()),
            (status, Some(code)),
            "{path}: {v}"
        );
    }
    g.stop.cancel();
    drop(g.gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wallet_shows_expired_at_the_instant_over_http() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let clock = Arc::new(ManualClock::new(END - 10 * DAY));
    let g = clock_gw(clock.clone(), &[]).await;
    let app = &g.app;
    let validity =
        json!({"validity": {"start": "2020-01-01T00:00:00Z", "end": "2030-01-01T00:00:00Z"}});
    let (s, _) = post(
        app,
        "/v1/batches",
        serde_json::from_str(&gw::batch_json("ex", 10, 2, validity)).unwrap(),
    )
    .await;
    assert_eq!(s, 201);
    for r in ["r1", "r2"] {
        assert_eq!(gw::claim(app, "ex", "u1", Some(r)).await.0, 201);
    }
    g.persister.flush().await.unwrap();
    let wallet = |status: &str| {
        let path = format!("/v1/users/u1/coupons?status={status}");
        async move {
            call(app, "GET", &path, "").await.1["coupons"]
                .as_array()
                .unwrap()
                .len()
        }
    };
    clock.set(END - 1);
    assert_eq!((wallet("unused").await, wallet("expired").await), (2, 0));
    clock.set(END);
    assert_eq!((wallet("unused").await, wallet("expired").await), (0, 2));
    let (_, page) = call(app, "GET", "/v1/users/u1/coupons", "").await;
    let coupon = page["coupons"][0]["coupon_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(page["coupons"][0]["state"], "expired");
    let (s, v) = post(
        app,
        &format!("/v1/coupons/{coupon}/lock"),
        json!({"order_id": "o1"}),
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (409, Some("invalid_state")),
        "{v}"
    );
    // the sweeper of this gateway writes the events, on the same clock
    let bg = claimgate::gateway::spawn_background(app, g.stop.clone());
    let mut written = false;
    for _ in 0..200 {
        let (_, v) = call(app, "GET", "/v1/events?state=pending", "").await;
        let expired = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "coupon.expired")
            .count();
        if expired == 2 {
            written = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(written, "the coupon sweeper never wrote the expired events");
    g.stop.cancel();
    for t in bg {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------
// end to end: `Gateway::start` delivers to the webhook

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_delivers_signed_events_end_to_end() {
    let _wd = Watchdog::arm(Duration::from_secs(90));
    let consumer = Consumer::start().await;
    // the first attempt of every event fails: delivery must retry
    consumer.script.lock().acts = VecDeque::from([Act::Status(500); 1]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = events_config(
        &consumer.url(),
        &[
            "server.listen=\"127.0.0.1:0\"",
            "events.poll_interval_ms=20",
            "events.backoff_min_ms=50",
            "events.backoff_max_ms=100",
            "persister.flush_interval_ms=5",
            "limits.claim_per_user.per_second=0",
        ],
    );
    let backend = Arc::new(
        claimgate::backend::embedded::EmbeddedBackend::open(&claimgate::config::EmbeddedConfig {
            aof_path: Some(dir.path().join("e2e.aof")),
            ..Default::default()
        })
        .unwrap(),
    );
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("e2e.db").display());
    let db = gw::open_db(&url).await;
    let started = claimgate::gateway::Gateway::start(Arc::new(cfg), backend, db.clone())
        .await
        .unwrap();
    let http = support::http::Http::new(&format!("http://{}", started.local_addr()));
    let (s, v) = http
        .send(
            "POST",
            "/v1/batches",
            &gw::batch_json("e2e", 5, 1, json!({})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = http
        .send(
            "POST",
            "/v1/batches/e2e/claims",
            &json!({"user_id": "u1"}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let coupon = v["coupon_id"].as_str().unwrap().to_string();
    let delivered_types = |c: &Consumer| -> Vec<String> {
        c.received()
            .iter()
            .filter(|r| matches!(r.act, Act::Status(200)))
            .map(|r| {
                let v = check_signed(r, claimgate::domain::time::now_ms() / 1000);
                v["type"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let wait_for = |n: usize| {
        let consumer = &consumer;
        async move {
            for _ in 0..400 {
                if delivered_types(consumer).len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("never delivered {n} events: {:?}", consumer.received());
        }
    };
    step("claimed, through the persister");
    wait_for(1).await;
    // the coupon's state lives on its shard: usable at once
    for action in ["lock", "redeem", "refund"] {
        let (s, v) = http
            .send(
                "POST",
                &format!("/v1/coupons/{coupon}/{action}"),
                &json!({"order_id": "o1"}).to_string(),
            )
            .await
            .unwrap();
        assert_eq!(s, 200, "{action}: {v}");
    }
    step("locked, redeemed, refunded");
    wait_for(4).await;
    let mut types = delivered_types(&consumer);
    types.sort();
    assert_eq!(
        types,
        [
            "coupon.claimed",
            "coupon.locked",
            "coupon.redeemed",
            "coupon.refunded"
        ]
    );
    // the consumer has them; the ledger records each delivery right after its answer
    let mut v = Value::Null;
    for _ in 0..400 {
        let (s, got) = http
            .send("GET", "/v1/events?state=delivered", "")
            .await
            .unwrap();
        assert_eq!(s, 200);
        v = got;
        if v["events"].as_array().is_some_and(|e| e.len() >= 4) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let attempts: Vec<u64> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts.len(), 4);
    assert_eq!(
        attempts.iter().sum::<u64>(),
        5,
        "one failed attempt, retried: {v}"
    );
    step("shutdown");
    let t = std::time::Instant::now();
    started.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(15));
}
