//! Request-id retention (issue 14 item 3, "Memory with a bound"): a shard keeps its
//! request-id records in two generations and drops the older one once the current one is
//! `batches.request_id_retention_ms` old (`lua/rotate.lua`, `recovery::Rotator`); a replay
//! older than that is answered from the database. On Redis and on the embedded default.
//!
//! Invariants checked here:
//! - a generation is dropped only once the database holds its claims: while the shard's
//!   log holds records from before the current generation, the rotation waits;
//! - a record survives one rotation (it is still answered from Redis), and is gone after the
//!   second (no request-id key of the batch is left in Redis);
//! - then every request id that won, sent three times at once, replays its own coupon (200,
//!   the same id and times) from the database: nothing is minted twice;
//! - a user who claimed before gets a new coupon for a new request id (the database says it
//!   is new), up to the per-user limit; past it, a new request id is `limit_reached` and
//!   the old one still replays (the local cache's path, `lua/replay.lua`);
//! - a user who never claimed claims without any look-up;
//! - a grant job's line (request id `~g.<job>`, repeated when the job resumes) replays its
//!   grant from the database instead of granting again;
//! - reconcile is clean.

mod support;

use std::time::Duration;

use claimgate::backend::Backend;
use claimgate::contract::claim::Outcome;
use claimgate::domain::ids::home_shard;
use claimgate::domain::time::now_ms;
use claimgate::recovery::{RotateReport, Rotator, reconcile};
use claimgate::stock::{ClaimArgs, ClaimResult};
use serde_json::json;
use support::gw::{self, Gw, batch_json, call, claim, persist_until};
use support::watchdog::{Watchdog, step};

const RETENTION_MS: u64 = 1_000;
const USERS: usize = 60;

fn retention() -> Vec<String> {
    vec![format!("batches.request_id_retention_ms={RETENTION_MS}")]
}

/// One rotation pass now, by a rotator of its own (no memory of when shards are due).
async fn pass<B: Backend>(g: &Gw<B>) -> RotateReport {
    let rows = g.db.batch_rows().await.expect("batches");
    Rotator::new(RETENTION_MS)
        .pass(g.backend.as_ref(), &rows, now_ms())
        .await
}

/// Past the current generation's retention.
async fn age() {
    tokio::time::sleep(Duration::from_millis(RETENTION_MS + 100)).await;
}

/// A claim of `user` in batch `rid` as a grant job makes it (`~g.<job>`, not fresh).
async fn stock_claim<B: Backend>(g: &Gw<B>, user: &str) -> ClaimResult {
    let entry = g.app.catalog().load("rid").await.unwrap();
    let home = home_shard(user, entry.keys.shards.len() as u32);
    let args = ClaimArgs {
        user,
        request_id: "~g.job1",
        max_log: "0",
        nonce: "line-nonce",
        total: entry.batch().stock,
        ack: None,
        day_offset_ms: 0,
        fresh_request_id: false,
    };
    g.app.stock().claim(&entry.keys, home, &args).await.unwrap()
}

async fn retention_life<B: Backend>(g: Gw<B>, keys: impl Fn(&str) -> Vec<String>) {
    let body = batch_json("rid", 1_000, 2, json!({"shards": 2}));
    let (s, v) = call(&g.app, "POST", "/v1/batches", body).await;
    assert_eq!(s, 201, "{v}");

    step("claims with request ids, concurrently (not yet persisted)");
    let first = futures::future::join_all((0..USERS).map(|i| {
        let app = g.app.clone();
        async move {
            let (user, rid) = (format!("u{i}"), format!("a{i}"));
            let (s, v) = claim(&app, "rid", &user, Some(&rid)).await;
            assert_eq!(s, 201, "{user}: {v}");
            v
        }
    }))
    .await;
    // a grant job's line, as `jobs` claims it (its request id is not fresh)
    let grant = stock_claim(&g, "granted").await;
    let ClaimResult::Decided(Outcome::Claimed(granted)) = grant else {
        panic!("{grant:?}")
    };

    step("the first pass starts each shard's generation");
    assert_eq!(
        pass(&g).await,
        RotateReport {
            started: 2,
            ..RotateReport::default()
        }
    );
    age().await;
    step("due, but the logs hold claims the database does not have: it waits");
    assert_eq!(
        pass(&g).await,
        RotateReport {
            waiting: 2,
            ..RotateReport::default()
        }
    );
    persist_until(&g, "every claim", async || {
        g.db.claim_counts("rid").await.unwrap().0 == USERS as u64 + 1
    })
    .await;
    step("persisted: the generation rotates, and its records are still answered from Redis");
    assert_eq!(
        pass(&g).await,
        RotateReport {
            rotated: 2,
            ..RotateReport::default()
        }
    );
    assert!(
        keys("cg:{rid:").iter().any(|k| k.ends_with(":req")),
        "the previous generation is kept: {:?}",
        keys("cg:{rid:")
    );
    for i in [0, USERS - 1] {
        let (s, v) = claim(&g.app, "rid", &format!("u{i}"), Some(&format!("a{i}"))).await;
        assert_eq!((s, &v["coupon_id"]), (200, &first[i]["coupon_id"]), "{v}");
    }
    age().await;
    step("the second rotation drops the first generation: no record is left in Redis");
    assert_eq!(
        pass(&g).await,
        RotateReport {
            rotated: 2,
            ..RotateReport::default()
        }
    );
    let left: Vec<String> = keys("cg:{rid:")
        .into_iter()
        .filter(|k| k.ends_with(":req") || k.ends_with(":req2"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "request-id records left");

    step("every winning request id, three times at once: its own coupon, from the database");
    let replays = futures::future::join_all((0..USERS * 3).map(|j| {
        let app = g.app.clone();
        let i = j % USERS;
        async move {
            let (s, v) = claim(&app, "rid", &format!("u{i}"), Some(&format!("a{i}"))).await;
            (i, s, v)
        }
    }))
    .await;
    for (i, s, v) in replays {
        assert_eq!(s, 200, "u{i}: {v}");
        for field in ["coupon_id", "valid_from", "valid_to", "claimed_at"] {
            assert_eq!(v[field], first[i][field], "u{i} {field}");
        }
    }

    step("a grant job that resumes: its line's grant is found in the database");
    match stock_claim(&g, "granted").await {
        ClaimResult::Decided(Outcome::Replayed(c)) => assert_eq!(c.coupon_id, granted.coupon_id),
        other => panic!("granted twice? {other:?}"),
    }

    step("a new request id of a user who claimed before is a new claim, up to the limit");
    let second = futures::future::join_all((0..USERS).map(|i| {
        let app = g.app.clone();
        async move {
            let user = format!("u{i}");
            let (s, v) = claim(&app, "rid", &user, Some(&format!("b{i}"))).await;
            assert_eq!(s, 201, "{user}: {v}");
            assert_ne!(v["coupon_id"], serde_json::Value::Null);
            let (s, v) = claim(&app, "rid", &user, Some(&format!("c{i}"))).await;
            assert_eq!(
                (s, v["error"].as_str()),
                (409, Some("limit_reached")),
                "{user}: {v}"
            );
            // at the limit, the old request id still replays (the cache's replay path)
            let (s, again) = claim(&app, "rid", &user, Some(&format!("a{i}"))).await;
            assert_eq!(s, 200, "{user}: {again}");
            (v, again)
        }
    }))
    .await;
    for (i, (_, again)) in second.iter().enumerate() {
        assert_eq!(again["coupon_id"], first[i]["coupon_id"]);
    }
    let (s, v) = claim(&g.app, "rid", "fresh", Some("f1")).await;
    assert_eq!(s, 201, "a user who never claimed: {v}");

    persist_until(&g, "every claim", async || {
        g.db.claim_counts("rid").await.unwrap().0 == 2 * USERS as u64 + 2
    })
    .await;
    let diffs = reconcile(g.backend.as_ref(), &g.db, Some("rid"))
        .await
        .unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_request_ids_replay_from_the_database_redis() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let mut g = gw::redis_gw_with(&retention()).await;
    let redis = g.redis.take().expect("its own redis");
    retention_life(g, move |prefix| redis.keys_with_prefix(prefix)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_request_ids_replay_from_the_database_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = gw::embedded_gw_with(&retention()).await;
    let backend = g.backend.clone();
    retention_life(g, move |prefix| backend.keys_with_prefix(prefix)).await;
}

/// Out-of-range retention is refused at load, naming the key.
#[test]
fn retention_is_checked_at_load() {
    for bad in ["999", "315360000001"] {
        let set = format!("batches.request_id_retention_ms={bad}");
        match claimgate::config::load(None, Vec::new(), std::slice::from_ref(&set)) {
            Ok(_) => panic!("{set} was accepted"),
            Err(e) => assert!(
                e.to_string().contains("batches.request_id_retention_ms"),
                "{set}: {e}"
            ),
        }
    }
    for good in ["0", "1000", "86400000"] {
        let set = format!("batches.request_id_retention_ms={good}");
        if let Err(e) = claimgate::config::load(None, Vec::new(), std::slice::from_ref(&set)) {
            panic!("{set}: {e}");
        }
    }
}
