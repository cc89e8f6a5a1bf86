//! The transitions of managed coupons (decided in Redis, read from the shard logs as change
//! records) in the database, on both engines (SQLite and a throwaway PostgreSQL database).
//!
//! Invariants checked here:
//! - a change record is written once: the row takes the state and version it names, with
//!   one `coupon_events` row and one outbox row per event (id `<coupon>:<kind>:<version>`,
//!   at the decision time); redelivered, or arriving after a newer change, it writes
//!   nothing;
//! - a change of a coupon the database does not hold is an error naming the coupon, and
//!   nothing of its write is kept;
//! - the database's expiry and lock sweeps write only unmanaged coupons; the managed ones
//!   due (same conditions) are listed for the Redis side instead, until they are unmanaged;
//! - `managed` is stored from the claim record and never shown in a coupon's JSON.

mod support;

use std::time::Duration;

use claimgate::domain::claim::{ChangeRecord, ClaimRecord};
use claimgate::domain::coupon::{CAUSE_LOCK_TIMEOUT, Ended, Event, EventKind, Stored, Transition};
use claimgate::store::{ChangesWritten, CouponState, Db, DbError, DueManaged};
use serde_json::Value;
use support::gw;
use support::watchdog::{Watchdog, step};

/// 2030-01-01T00:00:00Z: the validity end of the coupons of these tests.
const END: i64 = 1_893_456_000_000;
const DAY: i64 = 86_400_000;
const T0: i64 = END - 10 * DAY;

async fn sqlite() -> (Db, tempfile::TempDir) {
    gw::sqlite_db().await
}

async fn postgres() -> (Db, support::PgDb) {
    gw::postgres_db().await
}

/// The claim of `<batch>.<shard>.<seq>` by `user`, valid from 2020 to [`END`].
fn claim(batch: &str, shard: u32, seq: u64, managed: bool) -> ClaimRecord {
    ClaimRecord {
        coupon_id: format!("{batch}.{shard}.{seq}"),
        batch_id: batch.to_string(),
        shard,
        seq,
        user_id: format!("user{seq}"),
        request_id: Some(format!("r{seq}")),
        claimed_at: END - 30 * DAY,
        valid_from: 1_577_836_800_000,
        valid_to: END,
        code: None,
        managed,
    }
}

/// The change of `coupon` (shard 0) creating `version`, decided at `at`.
fn change(coupon: &str, version: i64, next: Stored, events: Vec<Event>, at: i64) -> ChangeRecord {
    let (batch, _) = coupon.split_once('.').unwrap();
    ChangeRecord {
        coupon_id: coupon.to_string(),
        batch_id: batch.to_string(),
        shard: 0,
        seq: coupon.rsplit('.').next().unwrap().parse().unwrap(),
        version,
        next,
        events,
        at,
    }
}

fn ev(kind: EventKind, order: Option<&str>) -> Event {
    Event {
        kind,
        order: order.map(str::to_string),
        cause: None,
    }
}

fn locked(order: &str, until: i64) -> Stored {
    Stored::Locked {
        order: order.into(),
        until,
    }
}

fn lock(coupon: &str, version: i64, order: &str, at: i64) -> ChangeRecord {
    change(
        coupon,
        version,
        locked(order, at + 60_000),
        vec![ev(EventKind::Locked, Some(order))],
        at,
    )
}

fn redeem(coupon: &str, version: i64, order: &str, at: i64) -> ChangeRecord {
    change(
        coupon,
        version,
        Stored::Used {
            order: order.into(),
        },
        vec![ev(EventKind::Redeemed, Some(order))],
        at,
    )
}

/// Event ids of a coupon's transaction log, and of its outbox.
async fn log_and_outbox(db: &Db, coupon: &str) -> (Vec<String>, Vec<String>) {
    let log = db.coupon_events(coupon).await.unwrap();
    let outbox = db.coupon_outbox(coupon).await.unwrap();
    (
        log.into_iter().map(|e| e.event_id).collect(),
        outbox.into_iter().map(|e| e.event_id).collect(),
    )
}

fn written(applied: u64, skipped: u64) -> ChangesWritten {
    ChangesWritten {
        applied,
        skipped,
        diverged: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// change records reach the database once

async fn changes_once(db: Db) {
    let claims: Vec<ClaimRecord> = (1..=5).map(|i| claim("m", 0, i, true)).collect();
    db.write_claims(&claims).await.unwrap();

    step("a lock then a redeem, in one write");
    let c = "m.0.1";
    let first = [lock(c, 1, "o1", T0), redeem(c, 2, "o1", T0 + 5)];
    assert_eq!(db.apply_changes(&first).await.unwrap(), written(2, 0));
    let row = db.get_coupon_at(c, T0 + 10).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.order_id.as_deref(), row.updated_at),
        (CouponState::Used, Some("o1"), T0 + 5)
    );
    let want = [
        "m.0.1:claimed".to_string(),
        "m.0.1:locked:1".to_string(),
        "m.0.1:redeemed:2".to_string(),
    ];
    assert_eq!(log_and_outbox(&db, c).await, (want.to_vec(), want.to_vec()));
    let events = db.coupon_events(c).await.unwrap();
    assert_eq!(
        (
            events[1].at,
            events[1].order_id.as_deref(),
            events[1].request_id.as_deref()
        ),
        (T0, Some("o1"), Some("r1")),
        "the decision time, the order, the claim's request id"
    );
    let outbox = db.coupon_outbox(c).await.unwrap();
    let body: Value = serde_json::from_str(&outbox[1].payload).unwrap();
    assert_eq!(body["id"], "m.0.1:locked:1");
    assert_eq!(body["type"], "coupon.locked");
    assert_eq!(body["state"], "locked");
    assert_eq!(body["order_id"], "o1");
    assert_eq!(body["user_id"], "user1");
    assert!(body["lock_expires_at"].is_string(), "{body}");
    let body: Value = serde_json::from_str(&outbox[2].payload).unwrap();
    assert_eq!(
        (&body["type"], &body["state"]),
        (&"coupon.redeemed".into(), &"used".into())
    );

    step("redelivered: nothing written again");
    assert_eq!(db.apply_changes(&first).await.unwrap(), written(0, 2));
    assert_eq!(db.apply_changes(&first[..1]).await.unwrap(), written(0, 1));
    assert_eq!(log_and_outbox(&db, c).await, (want.to_vec(), want.to_vec()));
    assert_eq!(
        db.get_coupon_at(c, T0 + 10).await.unwrap().unwrap().state,
        CouponState::Used
    );

    step("an older change after a newer one is skipped");
    let c = "m.0.2";
    let late = [lock(c, 2, "o2", T0 + 100), lock(c, 1, "o1", T0)];
    let mut want_late = written(1, 1);
    want_late.diverged = vec![c.to_string()]; // its events were never written: reported
    assert_eq!(db.apply_changes(&late).await.unwrap(), want_late);
    let row = db.get_coupon_at(c, T0 + 101).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.order_id.as_deref()),
        (CouponState::Locked, Some("o2"))
    );
    assert_eq!(
        log_and_outbox(&db, c).await.0,
        ["m.0.2:claimed", "m.0.2:locked:2"]
    );

    step("a version decided twice, differently (a rolled-back shard): skipped, reported");
    let c = "m.0.5";
    assert_eq!(
        db.apply_changes(&[lock(c, 1, "o1", T0)]).await.unwrap(),
        written(1, 0)
    );
    let mut again = written(0, 1);
    again.diverged = vec![c.to_string()];
    assert_eq!(
        db.apply_changes(&[lock(c, 1, "o9", T0 + 1)]).await.unwrap(),
        again,
        "another order at the same version"
    );
    assert_eq!(
        db.apply_changes(&[lock(c, 1, "o1", T0)]).await.unwrap(),
        written(0, 1),
        "the same change again is a redelivery, not a conflict"
    );
    assert_eq!(
        db.get_coupon_at(c, T0 + 2)
            .await
            .unwrap()
            .unwrap()
            .order_id
            .as_deref(),
        Some("o1"),
        "the database keeps the first decision"
    );

    step("a lock timeout and an expiry in one change keep their order and cause");
    let c = "m.0.3";
    let timed_out = change(
        c,
        2,
        Stored::Expired {
            last: Some(Ended {
                order: "o3".into(),
                refunded: false,
            }),
        },
        vec![
            Event {
                kind: EventKind::Released,
                order: Some("o3".into()),
                cause: Some(CAUSE_LOCK_TIMEOUT),
            },
            ev(EventKind::Expired, None),
        ],
        END,
    );
    let w = db
        .apply_changes(&[lock(c, 1, "o3", END - 60_000), timed_out])
        .await
        .unwrap();
    assert_eq!(w, written(2, 0));
    let (log, outbox) = log_and_outbox(&db, c).await;
    assert_eq!(
        log,
        [
            "m.0.3:claimed",
            "m.0.3:locked:1",
            "m.0.3:released:2",
            "m.0.3:expired:2"
        ]
    );
    assert_eq!(outbox, log);
    let bodies = db.coupon_outbox(c).await.unwrap();
    let released: Value = serde_json::from_str(&bodies[2].payload).unwrap();
    assert_eq!(released["cause"], "lock_timeout");
    assert_eq!(released["state"], "unused");
    let row = db.get_coupon_at(c, END).await.unwrap().unwrap();
    assert_eq!(row.state, CouponState::Expired);

    step("a change of a coupon the database does not hold: nothing written");
    let refund = change(
        "m.0.1",
        3,
        Stored::Unused {
            last: Some(Ended {
                order: "o1".into(),
                refunded: true,
            }),
        },
        vec![ev(EventKind::Refunded, Some("o1"))],
        T0 + 20,
    );
    let orphan = lock("m.0.9", 1, "o9", T0);
    let err = db
        .apply_changes(&[refund.clone(), orphan.clone(), lock("m.0.4", 1, "o4", T0)])
        .await
        .unwrap_err();
    match err {
        DbError::MissingCoupons(ids) => assert_eq!(ids, ["m.0.9"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        db.get_coupon_at("m.0.1", T0 + 30)
            .await
            .unwrap()
            .unwrap()
            .state,
        CouponState::Used,
        "rolled back"
    );
    assert_eq!(log_and_outbox(&db, "m.0.4").await.0, ["m.0.4:claimed"]);
    // without it, the rest is written
    let w = db
        .apply_changes(&[refund, lock("m.0.4", 1, "o4", T0)])
        .await
        .unwrap();
    assert_eq!(w, written(2, 0));
    assert_eq!(
        log_and_outbox(&db, "m.0.1").await.0.last().unwrap(),
        "m.0.1:refunded:3"
    );
    assert_eq!(db.apply_changes(&[]).await.unwrap(), written(0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_records_are_written_once_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    changes_once(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_records_are_written_once_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    changes_once(db).await;
}

// ---------------------------------------------------------------------------------------
// the database's sweeps and the managed coupons due

fn due(mut d: Vec<DueManaged>) -> Vec<(String, Transition)> {
    d.sort_by(|a, b| a.coupon_id.cmp(&b.coupon_id));
    d.into_iter().map(|d| (d.coupon_id, d.transition)).collect()
}

fn expire(ids: &[&str]) -> Vec<(String, Transition)> {
    ids.iter()
        .map(|i| (i.to_string(), Transition::Expire))
        .collect()
}

async fn sweeps_partition(db: Db) {
    let mut claims: Vec<ClaimRecord> = (1..=3).map(|i| claim("m", 0, i, true)).collect();
    claims.push(claim("m", 1, 1, true));
    claims.extend((1..=3).map(|i| claim("u", 0, i, false)));
    db.write_claims(&claims).await.unwrap();
    db.write_claims(&claims).await.unwrap(); // redelivered
    let managed = |b: &str, s: u32| {
        let db = db.clone();
        let b = b.to_string();
        async move {
            db.claims_of_shard(&b, s)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.managed)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(managed("m", 0).await, [true, true, true]);
    assert_eq!(managed("m", 1).await, [true]);
    assert_eq!(managed("u", 0).await, [false, false, false]);
    // the flag is the database's business, never a client's
    let row = db.get_coupon("m.0.1").await.unwrap().unwrap();
    let json = serde_json::to_value(&row).unwrap();
    assert!(json.get("managed").is_none(), "{json}");

    // u.0.2 locked by the database, m.0.2 by Redis: both deadlines T0 + 60 s
    db.transition(
        "u.0.2",
        &Transition::Lock {
            order: "ou".into(),
            timeout_ms: 60_000,
        },
        T0,
    )
    .await
    .unwrap();
    db.apply_changes(&[lock("m.0.2", 1, "om", T0)])
        .await
        .unwrap();

    step("before the deadline: nothing due");
    assert!(db.due_managed(T0 + 59_999, 100).await.unwrap().is_empty());
    step("the locks lapse: the sweep releases the unmanaged one only");
    let now = T0 + 60_000;
    assert_eq!(
        due(db.due_managed(now, 100).await.unwrap()),
        [("m.0.2".to_string(), Transition::LockTimeout)]
    );
    let s = db.sweep_coupons(now, 100, 0).await.unwrap();
    assert_eq!((s.released, s.expired), (1, 0));
    assert_eq!(
        log_and_outbox(&db, "u.0.2").await.0,
        ["u.0.2:claimed", "u.0.2:locked:1", "u.0.2:released:2"]
    );
    assert_eq!(
        log_and_outbox(&db, "m.0.2").await.0,
        ["m.0.2:claimed", "m.0.2:locked:1"],
        "left to Redis"
    );
    assert_eq!(db.sweep_coupons(now, 100, 0).await.unwrap().released, 0);

    step("the validity ends: the sweep expires the unmanaged ones only");
    let all = ["m.0.1", "m.0.2", "m.0.3", "m.1.1"];
    assert_eq!(due(db.due_managed(END, 100).await.unwrap()), expire(&all));
    assert_eq!(
        db.due_managed(END, 3).await.unwrap().len(),
        3,
        "at most limit"
    );
    let s = db.sweep_coupons(END, 100, 0).await.unwrap();
    assert_eq!((s.expired, s.released), (3, 0));
    for c in all {
        let (log, _) = log_and_outbox(&db, c).await;
        assert!(!log.iter().any(|e| e.contains(":expired:")), "{c}: {log:?}");
    }
    // the wallet reads them expired all the same
    let row = db.get_coupon_at("m.0.1", END).await.unwrap().unwrap();
    assert_eq!(row.state, CouponState::Expired);

    step("a shard unmanaged goes back to the database's sweeps");
    assert_eq!(db.unmanage("m", Some(1)).await.unwrap(), 1);
    assert_eq!(db.unmanage("m", Some(1)).await.unwrap(), 0);
    assert_eq!(managed("m", 1).await, [false]);
    assert_eq!(
        due(db.due_managed(END, 100).await.unwrap()),
        expire(&all[..3])
    );
    assert_eq!(db.sweep_coupons(END, 100, 0).await.unwrap().expired, 1);
    assert_eq!(
        log_and_outbox(&db, "m.1.1").await.0,
        ["m.1.1:claimed", "m.1.1:expired:1"]
    );
    assert_eq!(db.unmanage("other", None).await.unwrap(), 0);
    assert_eq!(db.unmanage("m", None).await.unwrap(), 3);
    assert!(db.due_managed(END, 100).await.unwrap().is_empty());
    assert_eq!(db.sweep_coupons(END, 100, 0).await.unwrap().expired, 3);
    assert_eq!(
        log_and_outbox(&db, "m.0.2").await.0,
        [
            "m.0.2:claimed",
            "m.0.2:locked:1",
            "m.0.2:released:2",
            "m.0.2:expired:2"
        ]
    );
    assert_eq!(managed("m", 0).await, [false, false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_leave_managed_coupons_to_redis_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _dir) = sqlite().await;
    sweeps_partition(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_leave_managed_coupons_to_redis_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let (db, _pg) = postgres().await;
    sweeps_partition(db).await;
}
