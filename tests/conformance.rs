//! Conformance suite: the same cases against the `redis` backend (a redis-server of our own
//! and PostgreSQL; and a Redis Cluster of 3 primaries with a replica each) and the `embedded`
//! backend (+ SQLite), through the real router, with real concurrency. Any difference
//! between the backends is a bug.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claimgate::backend::Backend;
use claimgate::http::App;
use claimgate::persist::Persister;
use serde_json::{Value, json};
use support::gw::*;
use tokio_util::sync::CancellationToken;

/// Fires `n` claims at once; returns (user, status, body) for each.
async fn storm<B: Backend>(
    app: &Arc<App<B>>,
    batch: &str,
    n: usize,
    user_of: impl Fn(usize) -> String,
    rid_of: impl Fn(usize) -> Option<String>,
) -> Vec<(String, u16, Value)> {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let app = app.clone();
        let batch = batch.to_string();
        let user = user_of(i);
        let rid = rid_of(i);
        tasks.push(tokio::spawn(async move {
            let (s, v) = claim(&app, &batch, &user, rid.as_deref()).await;
            (user, s, v)
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn assert_conserved<B: Backend>(g: &Gw<B>, batch: &str, claimed: i64) {
    let keys = g.app.catalog().load(batch).await.unwrap().keys.clone();
    let c = g.app.stock().conservation(&keys).await.unwrap();
    assert!(c.holds(), "conservation broken: {c:?}");
    assert_eq!(c.claimed, claimed, "{c:?}");
}

/// Runs the persister until the database holds `expected` claims of `batch`.
async fn drain_to_db<B: Backend>(g: &Gw<B>, batch: &str, expected: u64) {
    let stop = CancellationToken::new();
    let p = Persister::spawn(
        g.backend.clone(),
        g.db.clone(),
        g.cfg.persister.clone(),
        stop.clone(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = p.flush().await;
        let (coupons, events) = g.db.claim_counts(batch).await.unwrap();
        if coupons == expected && events == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "db has {coupons}/{events}, want {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    p.join().await;
}

fn coupon(v: &Value) -> String {
    v["coupon_id"].as_str().unwrap_or_default().to_string()
}

pub mod cases {
    use super::*;

    /// The issue's acceptance figure: 1,000 users rush stock 100.
    pub async fn flash_sale<B: Backend>(g: &Gw<B>) {
        create(g, "flash", 100, 1, json!({})).await;
        let res = storm(&g.app, "flash", 1000, |i| format!("user{i}"), |_| None).await;
        let ok: Vec<_> = res.iter().filter(|r| r.1 == 201).collect();
        let gone = res.iter().filter(|r| r.1 == 410).count();
        assert_eq!(
            (ok.len(), gone),
            (100, 900),
            "statuses: {:?}",
            status_counts(&res)
        );
        let ids: HashSet<String> = ok.iter().map(|r| coupon(&r.2)).collect();
        assert_eq!(ids.len(), 100, "coupon ids must be distinct");
        assert_conserved(g, "flash", 100).await;
        let (s, v) = call(&g.app, "GET", "/v1/batches/flash", "").await;
        assert_eq!(s, 200);
        assert_eq!(
            v["stock"],
            json!({"total": 100, "claimed": 100, "remaining": 0})
        );
        drain_to_db(g, "flash", 100).await;
        for id in &ids {
            let c =
                g.db.get_coupon(id)
                    .await
                    .unwrap()
                    .expect("every 201 coupon is in the database");
            assert_eq!(c.batch_id, "flash");
        }
    }

    /// 5,000 concurrent claims from 1,000 users on stock 700, limit 2.
    pub async fn limits_under_concurrency<B: Backend>(g: &Gw<B>) {
        create(g, "conc", 700, 2, json!({"shards": 8})).await;
        let res = storm(
            &g.app,
            "conc",
            5000,
            |i| format!("u{}", i % 1000),
            |i| Some(format!("r{i}")),
        )
        .await;
        let mut per_user: HashMap<&str, HashSet<String>> = HashMap::new();
        let mut all = HashSet::new();
        for (u, s, v) in &res {
            match s {
                201 => {
                    assert!(all.insert(coupon(v)), "duplicate coupon {v}");
                    per_user.entry(u).or_default().insert(coupon(v));
                }
                409 => assert_eq!(v["error"], "limit_reached"),
                410 => assert_eq!(v["error"], "sold_out"),
                other => panic!("unexpected {other}: {v}"),
            }
        }
        assert_eq!(all.len(), 700, "statuses: {:?}", status_counts(&res));
        assert!(per_user.values().all(|c| c.len() <= 2));
        assert_conserved(g, "conc", 700).await;
        drain_to_db(g, "conc", 700).await;
    }

    /// The same request id sent concurrently returns one coupon, every time.
    pub async fn replays<B: Backend>(g: &Gw<B>) {
        create(g, "replay", 1000, 1, json!({"shards": 4})).await;
        let res = storm(
            &g.app,
            "replay",
            500,
            |i| format!("p{}", i % 20),
            |i| Some(format!("req-{}", i % 20)),
        )
        .await;
        let mut by_user: HashMap<&str, Vec<(u16, String)>> = HashMap::new();
        for (u, s, v) in &res {
            assert!(*s == 201 || *s == 200, "{s}: {v}");
            by_user.entry(u).or_default().push((*s, coupon(v)));
        }
        for (u, answers) in by_user {
            let created = answers.iter().filter(|a| a.0 == 201).count();
            assert_eq!(created, 1, "{u}: exactly one 201");
            let ids: HashSet<_> = answers.iter().map(|a| &a.1).collect();
            assert_eq!(ids.len(), 1, "{u}: one coupon for every replay");
        }
        // a new request id of a user at the limit is refused, the old one still replays
        let (s, v) = claim(&g.app, "replay", "p1", Some("another")).await;
        assert_eq!((s, v["error"].as_str()), (409, Some("limit_reached")));
        let (s, _) = claim(&g.app, "replay", "p1", Some("req-1")).await;
        assert_eq!(s, 200);
        assert_conserved(g, "replay", 20).await;

        // A call repeated by the gateway itself (after a lost reply) is told apart from a
        // client's replay by the nonce recorded with the request id.
        use claimgate::contract::claim::Outcome as ScriptOutcome;
        use claimgate::stock::ClaimResult;
        let keys = g.app.catalog().load("replay").await.unwrap().keys.clone();
        let home = claimgate::domain::ids::home_shard("nonce-user", keys.shards.len() as u32);
        let stock = g.app.stock();
        let args = |nonce| claimgate::stock::ClaimArgs {
            user: "nonce-user",
            request_id: "nr",
            max_log: "0",
            nonce,
            total: 1000,
            ack: None,
            day_offset_ms: 0,
            fresh_request_id: false,
        };
        let first = stock.claim(&keys, home, &args("n1")).await.unwrap();
        let ClaimResult::Decided(ScriptOutcome::Claimed(c1)) = first else {
            panic!("{first:?}")
        };
        for (nonce, ours) in [("n1", true), ("n2", false)] {
            let again = stock.claim(&keys, home, &args(nonce)).await.unwrap();
            let ClaimResult::Decided(ScriptOutcome::Replayed(c)) = again else {
                panic!("{again:?}")
            };
            assert_eq!(c.coupon_id, c1.coupon_id);
            assert_eq!(c.minted_by == nonce, ours);
        }
    }

    /// A crash between the two halves of a transfer: no stock created, none lost after sweep.
    pub async fn transfer_crash<B: Backend>(g: &Gw<B>) {
        create(g, "xfer", 50, 5, json!({"shards": 4})).await;
        let keys = g.app.catalog().load("xfer").await.unwrap().keys.clone();
        let stock = g.app.stock();
        let before = stock.conservation(&keys).await.unwrap();
        assert!(before.holds() && before.in_flight == 0, "{before:?}");
        // first half only, as if the gateway died right after it
        let moved = stock
            .transfer_first_half(&keys.pool, &keys.shards[0], "crash-1", 10, false)
            .await
            .unwrap()
            .amount;
        assert!(moved > 0);
        // repeating the first half (a retried call) moves nothing more
        let again = stock
            .transfer_first_half(&keys.pool, &keys.shards[0], "crash-1", 10, false)
            .await
            .unwrap()
            .amount;
        assert_eq!(again, moved);
        let mid = stock.conservation(&keys).await.unwrap();
        assert!(mid.holds(), "{mid:?}");
        assert_eq!(mid.in_flight, moved);
        assert_eq!(mid.pool, before.pool - moved);
        assert_eq!(stock.sweep(&keys, 0).await.unwrap(), 1);
        let after = stock.conservation(&keys).await.unwrap();
        assert!(after.holds() && after.in_flight == 0, "{after:?}");
        assert_eq!(after.shards, before.shards + moved);
        // sweeping again creates nothing
        assert_eq!(stock.sweep(&keys, 0).await.unwrap(), 0);
        assert_eq!(stock.conservation(&keys).await.unwrap(), after);
        // and the batch still sells exactly its stock
        let res = storm(&g.app, "xfer", 200, |i| format!("x{i}"), |_| None).await;
        assert_eq!(res.iter().filter(|r| r.1 == 201).count(), 50);
        assert_conserved(g, "xfer", 50).await;
    }

    /// Window, pause/resume, deny list, daily limit, unknown batch, added stock.
    pub async fn rules<B: Backend>(g: &Gw<B>) {
        let app = &g.app;
        create(g, "future", 10, 1, json!({"claim_window": {"start": "2099-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}})).await;
        assert_eq!(
            claim(app, "future", "u", None).await.1["error"],
            "not_started"
        );
        create(g, "past", 10, 1, json!({"claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2021-01-01T00:00:00Z"}})).await;
        assert_eq!(claim(app, "past", "u", None).await.1["error"], "ended");
        assert_eq!(
            claim(app, "nope", "u", None).await,
            (
                404,
                json!({"error": "batch_not_found", "message": "batch not found"})
            )
        );

        create(
            g,
            "rules",
            3,
            5,
            json!({"per_user_daily_limit": 1, "eligibility": {"deny_users": ["mallory"]}}),
        )
        .await;
        let (s, v) = claim(app, "rules", "mallory", None).await;
        assert_eq!((s, v["error"].as_str()), (403, Some("not_eligible")));
        assert_eq!(claim(app, "rules", "alice", None).await.0, 201);
        let (s, v) = claim(app, "rules", "alice", None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (409, Some("limit_reached")),
            "daily limit 1"
        );

        let (s, v) = call(app, "PATCH", "/v1/batches/rules", r#"{"state":"paused"}"#).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["batch"]["state"], "paused");
        let (s, v) = claim(app, "rules", "bob", None).await;
        assert_eq!((s, v["error"].as_str()), (409, Some("paused")));
        call(app, "PATCH", "/v1/batches/rules", r#"{"state":"active"}"#).await;
        assert_eq!(claim(app, "rules", "bob", None).await.0, 201);
        assert_eq!(claim(app, "rules", "carol", None).await.0, 201);
        let (s, v) = claim(app, "rules", "dave", None).await;
        assert_eq!((s, v["error"].as_str()), (410, Some("sold_out")));
        assert_eq!(
            claim(app, "rules", "erin", None).await.0,
            410,
            "sold out answered from memory"
        );

        let (s, v) = call(app, "PATCH", "/v1/batches/rules", r#"{"add_stock":2}"#).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v["stock"],
            json!({"total": 5, "claimed": 3, "remaining": 2})
        );
        assert_eq!(
            claim(app, "rules", "dave", None).await.0,
            201,
            "added stock clears sold out"
        );
        assert_eq!(claim(app, "rules", "erin", None).await.0, 201);
        assert_eq!(claim(app, "rules", "frank", None).await.0, 410);
        let (s, _) = call(
            app,
            "PATCH",
            "/v1/batches/rules",
            r#"{"claim_window":{"end":"2021-06-01T00:00:00Z"}}"#,
        )
        .await;
        assert_eq!(s, 200);
        call(app, "PATCH", "/v1/batches/rules", r#"{"add_stock":1}"#).await;
        assert_eq!(claim(app, "rules", "gina", None).await.1["error"], "ended");
        assert_conserved(g, "rules", 5).await;
        // a second, identical create is harmless; a different one under the same id is refused
        let again = batch_json(
            "past",
            10,
            1,
            json!({"claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2021-01-01T00:00:00Z"}}),
        );
        assert_eq!(call(app, "POST", "/v1/batches", again).await.0, 201);
        let (s, v) = call(
            app,
            "POST",
            "/v1/batches",
            batch_json("past", 11, 1, json!({})),
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (409, Some("batch_exists")));
    }

    /// Bad input gets a 4xx with the right code and changes nothing.
    /// A batch's own acknowledgement mode: `leader` everywhere; the replica modes only where
    /// the backend can honour them (never on the embedded backend: it has no replicas).
    pub async fn batch_ack<B: Backend>(g: &Gw<B>) {
        let app = &g.app;
        let redis = app.stock().backend().kind() == "redis";
        for (id, ack, accepted) in [
            ("ack-leader", "leader", true),
            ("ack-replica", "replica", redis),
        ] {
            let (s, v) = call(
                app,
                "POST",
                "/v1/batches",
                batch_json(id, 10, 1, json!({"ack": ack})),
            )
            .await;
            if accepted {
                assert_eq!((s, v["ack"].as_str()), (201, Some(ack)), "{id}: {v}");
            } else {
                assert_eq!(
                    (s, v["error"].as_str()),
                    (400, Some("bad_request")),
                    "{id}: {v}"
                );
                let (s, _) = call(app, "GET", &format!("/v1/batches/{id}"), "").await;
                assert_eq!(s, 404, "{id}: nothing created");
            }
        }
        let (s, v) = claim(app, "ack-leader", "u1", Some("r1")).await;
        assert_eq!(s, 201, "{v}");
    }

    pub async fn bad_input<B: Backend>(g: &Gw<B>) {
        create(g, "bad", 10, 1, json!({})).await;
        let app = &g.app;
        let big = format!(r#"{{"user_id":"{}"}}"#, "a".repeat(64 * 1024));
        let cases: Vec<(&str, &str, Bytes, u16, &str)> = vec![
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(b"{"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(b""),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(b"[]"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"user_id":5}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"user_id":"a{b}"}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"user_id":"a:b"}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(b"{\"user_id\":\"a\\nb\"}"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(b"{\"user_id\":\"\xff\xfe\"}"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"user_id":"u","request_id":"r r"}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"user_id":"u","request_id":7}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"request_id":"r"}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from_static(br#"{"user_id":"u","x":1}"#),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/bad/claims",
                Bytes::from(big),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches/a{b}/claims",
                Bytes::from_static(br#"{"user_id":"u"}"#),
                404,
                "batch_not_found",
            ),
            (
                "POST",
                "/v1/batches/a%0Ab/claims",
                Bytes::from_static(br#"{"user_id":"u"}"#),
                404,
                "batch_not_found",
            ),
            (
                "GET",
                "/v1/batches/bad/claims",
                Bytes::new(),
                405,
                "method_not_allowed",
            ),
            (
                "DELETE",
                "/v1/batches/bad",
                Bytes::new(),
                405,
                "method_not_allowed",
            ),
            ("GET", "/v1/nothing", Bytes::new(), 404, "not_found"),
            ("GET", "/", Bytes::new(), 404, "not_found"),
            (
                "POST",
                "/v1/batches",
                Bytes::from_static(b"{}"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from_static(b"not json"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from(batch_json("x:y", 1, 1, json!({}))),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from(batch_json("neg", -1, 1, json!({}))),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from(batch_json("lim", 1, 0, json!({}))),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from(batch_json("sh", 1, 1, json!({"shards": 0}))),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from(batch_json(
                    "win",
                    1,
                    1,
                    json!({"claim_window": {"start": "2021-01-01T00:00:00Z", "end": "2020-01-01T00:00:00Z"}}),
                )),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/batches",
                Bytes::from(batch_json(
                    "ts",
                    1,
                    1,
                    json!({"claim_window": {"start": "yesterday", "end": "2020-01-01T00:00:00Z"}}),
                )),
                400,
                "bad_request",
            ),
            (
                "PATCH",
                "/v1/batches/bad",
                Bytes::from_static(br#"{"state":"gone"}"#),
                400,
                "bad_request",
            ),
            (
                "PATCH",
                "/v1/batches/bad",
                Bytes::from_static(br#"{"add_stock":-5}"#),
                400,
                "bad_request",
            ),
            (
                "PATCH",
                "/v1/batches/bad",
                Bytes::from_static(br#"{}"#),
                400,
                "bad_request",
            ),
            (
                "PATCH",
                "/v1/batches/missing",
                Bytes::from_static(br#"{"state":"paused"}"#),
                404,
                "batch_not_found",
            ),
            (
                "GET",
                "/v1/users/a%20b/coupons",
                Bytes::new(),
                400,
                "bad_request",
            ),
            (
                "GET",
                "/v1/users/u/coupons?status=lost",
                Bytes::new(),
                400,
                "bad_request",
            ),
            (
                "GET",
                "/v1/users/u/coupons?limit=0",
                Bytes::new(),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/coupons/bad.0.1/lock",
                Bytes::from_static(b"{}"),
                400,
                "bad_request",
            ),
            (
                "POST",
                "/v1/coupons/nonsense/lock",
                Bytes::from_static(br#"{"order_id":"o1"}"#),
                404,
                "coupon_not_found",
            ),
        ];
        for (method, path, body, status, code) in cases {
            let (s, v) = call(app, method, path, body.clone()).await;
            assert_eq!(
                (s, v["error"].as_str()),
                (status, Some(code)),
                "{method} {path} {body:?}: {v}"
            );
            assert!(v["message"].is_string(), "{v}");
        }
        assert_conserved(g, "bad", 0).await;
        // a malformed script call is refused before the script's first write
        let keys = g.app.catalog().load("bad").await.unwrap().keys.clone();
        let shard = &keys.shards[0];
        for bad in [
            &["u", "r", "0", "bad", "0"][..],
            // two claims announced, one given
            &["2", "0", "bad", "0", "0", "u", "r", "n"],
            // an empty user among good ones
            &["2", "0", "bad", "0", "0", "u", "", "r1", "r2", "n", "n"],
            &["1001", "0", "bad", "0", "0"],
        ] {
            let r = g
                .backend
                .eval(
                    claimgate::backend::Script::Claim,
                    &claimgate::contract::claim::keys(shard),
                    bad,
                )
                .await;
            assert!(
                matches!(r, Err(claimgate::backend::BackendError::Script(_))),
                "{bad:?}: {r:?}"
            );
        }
        assert_conserved(g, "bad", 0).await;
        assert_eq!(
            claim(app, "bad", "good", None).await.0,
            201,
            "still serving"
        );
    }

    /// An outbox entry naming a slot the batch does not have (no gateway writes one; a
    /// damaged Redis can hold one): the ONE census counts its stock as in flight, so the
    /// API's view, the gauges and reconcile's snapshot agree, and the sweeper reports it
    /// instead of guessing where the stock goes. (The gateway's conservation check used to
    /// fail on it while reconcile's own copy counted it in flight.)
    pub async fn transfer_to_a_missing_slot<B: Backend>(g: &Gw<B>) {
        use claimgate::contract::keys::SlotKeys;
        use claimgate::stock::StockError;
        create(g, "ghost", 20, 5, json!({"shards": 2})).await;
        let keys = g.app.catalog().load("ghost").await.unwrap().keys.clone();
        let stock = g.app.stock();
        let before = stock.conservation(&keys).await.unwrap();
        let nowhere = SlotKeys::new("ghost", Some(7));
        let moved = stock
            .transfer_first_half(&keys.pool, &nowhere, "ghost-1", 3, false)
            .await
            .unwrap()
            .amount;
        assert!(moved > 0);
        let c = stock.conservation(&keys).await.unwrap();
        assert!(c.holds(), "{c:?}");
        assert_eq!((c.in_flight, c.pool), (moved, before.pool - moved));
        let settled = claimgate::stock::census::settled(g.backend.as_ref(), &keys, 5)
            .await
            .unwrap();
        assert_eq!(settled.as_ref(), Some(&c), "reconcile's snapshot agrees");
        let err = stock.sweep(&keys, 0).await.unwrap_err();
        assert!(matches!(err, StockError::Inconsistent(_)), "{err}");
        assert_eq!(stock.conservation(&keys).await.unwrap(), c, "nothing moved");
        let (s, v) = call(&g.app, "GET", "/v1/batches/ghost", "").await;
        assert_eq!((s, v["stock"]["total"].as_i64()), (200, Some(20)), "{v}");
    }

    /// Wallet and TCC redemption after persistence.
    pub async fn wallet<B: Backend>(g: &Gw<B>) {
        create(g, "wal", 5, 2, json!({})).await;
        let (_, v) = claim(&g.app, "wal", "w1", Some("a")).await;
        let c1 = coupon(&v);
        claim(&g.app, "wal", "w1", Some("b")).await;
        drain_to_db(g, "wal", 2).await;
        let (s, v) = call(
            &g.app,
            "GET",
            "/v1/users/w1/coupons?status=unused&limit=1",
            "",
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["coupons"].as_array().unwrap().len(), 1);
        assert!(v["next_cursor"].is_string());
        let lock = |c: &str, action: &str, order: &str| {
            let app = g.app.clone();
            let path = format!("/v1/coupons/{c}/{action}");
            let body = json!({"order_id": order}).to_string();
            async move { call(&app, "POST", &path, body).await }
        };
        assert_eq!(lock(&c1, "lock", "o1").await.0, 200);
        assert_eq!(
            lock(&c1, "lock", "o1").await.0,
            200,
            "idempotent for the same order"
        );
        let (s, v) = lock(&c1, "lock", "o2").await;
        assert_eq!((s, v["error"].as_str()), (409, Some("invalid_state")));
        assert_eq!(lock(&c1, "redeem", "o1").await.1["state"], "used");
        assert_eq!(lock(&c1, "redeem", "o1").await.0, 200);
        assert_eq!(lock(&c1, "release", "o1").await.0, 409);
        let (_, v) = call(&g.app, "GET", "/v1/users/w1/coupons?status=used", "").await;
        assert_eq!(v["coupons"][0]["coupon_id"], json!(c1));
    }

    /// Issue 11 item 3: the budget is never exceeded under concurrency. A batch of face value
    /// 500 with a budget for 37 coupons (18,750 = 37 * 500 + 250) starts with stock 20 on 8
    /// shards; 300 claims race 40 `add_stock: 1` changes (refills move stock from the pool and
    /// between shards meanwhile). Exactly 17 changes fit, the rest are 409 `over_budget`; the
    /// batch never issues more than 37 coupons, and once drained it issued exactly 37: spent
    /// 18,500 of 18,750.
    pub async fn budget_under_concurrency<B: Backend>(g: &Gw<B>) {
        const FACE: i64 = 500;
        const CAP: i64 = 37;
        const BUDGET: i64 = CAP * FACE + 250;
        let make = |id: &str, stock: i64, extra: Value| {
            let mut body: Value = serde_json::from_str(&batch_json(id, stock, 1, extra)).unwrap();
            body["discount"] = json!({"kind": "fixed", "amount": FACE});
            body.to_string()
        };
        // refused at create: a stock the budget cannot pay for, a percent discount without
        // max_off, a budget past batches.max_budget
        let (s, v) = call(
            &g.app,
            "POST",
            "/v1/batches",
            make("budget-x", CAP + 1, json!({"budget": BUDGET})),
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
        let mut pct: Value =
            serde_json::from_str(&make("budget-p", 1, json!({"budget": BUDGET}))).unwrap();
        pct["discount"] = json!({"kind": "percent", "percent_off": 10});
        let (s, v) = call(&g.app, "POST", "/v1/batches", pct.to_string()).await;
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
        let (s, _) = call(
            &g.app,
            "POST",
            "/v1/batches",
            make(
                "budget-y",
                1,
                json!({"budget": g.cfg.batches.max_budget + 1}),
            ),
        )
        .await;
        assert_eq!(s, 400);

        let (s, v) = call(
            &g.app,
            "POST",
            "/v1/batches",
            make("budget", 20, json!({"budget": BUDGET, "shards": 8})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["budget"], BUDGET);

        let patches: Vec<_> = (0..40)
            .map(|_| {
                let app = g.app.clone();
                tokio::spawn(async move {
                    // 503 = changed concurrently too often, nothing changed: the client retries
                    for _ in 0..50 {
                        let (s, v) = call(
                            &app,
                            "PATCH",
                            "/v1/batches/budget",
                            json!({"add_stock": 1}).to_string(),
                        )
                        .await;
                        if s != 503 {
                            return (s, v);
                        }
                    }
                    panic!("a change kept answering 503");
                })
            })
            .collect();
        let mut res = storm(
            &g.app,
            "budget",
            300,
            |i| format!("u{i}"),
            |i| Some(format!("r{i}")),
        )
        .await;
        let (mut applied, mut refused) = (0, 0);
        for p in patches {
            match p.await.unwrap() {
                (200, v) => {
                    applied += 1;
                    let b = &v["budget"];
                    assert!(b["spent"].as_i64().unwrap() <= BUDGET, "{v}");
                    assert!(v["batch"]["stock"].as_i64().unwrap() <= CAP, "{v}");
                }
                (409, v) => {
                    assert_eq!(v["error"], "over_budget", "{v}");
                    refused += 1;
                }
                (s, v) => panic!("add_stock answered {s}: {v}"),
            }
        }
        assert_eq!((applied, refused), (CAP - 20, 40 - (CAP - 20)));
        // drain what the claims racing the changes did not take (added after they ran)
        for round in 0..5 {
            let more = storm(&g.app, "budget", 50, |i| format!("d{round}-{i}"), |_| None).await;
            let done = more.iter().all(|r| r.1 == 410);
            res.extend(more);
            if done {
                break;
            }
        }
        let mut coupons = HashSet::new();
        for (_, s, v) in &res {
            match s {
                201 => assert!(coupons.insert(coupon(v)), "duplicate {v}"),
                410 => assert_eq!(v["error"], "sold_out"),
                other => panic!("unexpected {other}: {v} ({:?})", status_counts(&res)),
            }
        }
        assert_eq!(coupons.len() as i64, CAP, "{:?}", status_counts(&res));
        assert_conserved(g, "budget", CAP).await;
        let (s, v) = call(&g.app, "GET", "/v1/batches/budget", "").await;
        assert_eq!(s, 200);
        assert_eq!(
            v["stock"],
            json!({"total": CAP, "claimed": CAP, "remaining": 0})
        );
        assert_eq!(
            v["budget"],
            json!({"total": BUDGET, "spent": CAP * FACE, "remaining": 250})
        );
        // at the cap: one more coupon is refused, nothing changes
        let (s, v) = call(
            &g.app,
            "PATCH",
            "/v1/batches/budget",
            json!({"add_stock": 1}).to_string(),
        )
        .await;
        assert_eq!((s, v["error"].as_str()), (409, Some("over_budget")), "{v}");
        let (_, v) = call(&g.app, "GET", "/v1/batches/budget", "").await;
        assert_eq!(v["stock"]["total"], CAP);
        // and Redis itself refuses it: the pool keeps the cap, `patch.lua` answers -3 for a
        // total past it (a version far ahead of any), writing nothing
        use claimgate::contract::patch::{self, Patched};
        let keys = g.app.catalog().load("budget").await.unwrap().keys.clone();
        let over = patch::call(
            g.backend.as_ref(),
            &keys.pool,
            1_000_000,
            Some(CAP + 1),
            &[],
        )
        .await;
        assert_eq!(over.unwrap(), Patched::OverCap { cap: CAP });
        let fine = patch::call(g.backend.as_ref(), &keys.pool, 1_000_000, Some(CAP), &[]).await;
        assert_eq!(fine.unwrap(), Patched::Applied { version: 1_000_000 });
        assert_conserved(g, "budget", CAP).await;
        // a batch without a budget shows none
        create(g, "nobudget", 3, 1, json!({})).await;
        let (_, v) = call(&g.app, "GET", "/v1/batches/nobudget", "").await;
        assert!(
            v.get("budget").is_none() && v["batch"].get("budget").is_none(),
            "{v}"
        );
    }

    /// Issue 11 item 2 (code pools): 10,000 concurrent claims on a pool of 2,000 generated
    /// codes over 8 shards hand out each code at most once, every code a valid one of the
    /// batch's spec, each 201 carrying it, and a replay the same one; a transfer cut in half
    /// by a crash carries its codes to the sweeper; imported codes are deduplicated and
    /// capped by the batch's stock; the database records each coupon's code.
    pub async fn code_pools<B: Backend>(g: &Gw<B>) {
        use claimgate::domain::codes::{CodeSpec, verify};
        let spec = CodeSpec {
            prefix: "CG-".into(),
            length: 8,
        };
        create(
            g,
            "codes-gen",
            2000,
            1,
            json!({"shards": 8, "codes": {"source": "generated", "prefix": "CG-", "length": 8}}),
        )
        .await;
        let (s, v) = call(&g.app, "GET", "/v1/batches/codes-gen", "").await;
        assert_eq!((s, v["stock"]["total"].as_i64()), (200, Some(2000)), "{v}");
        assert_eq!(v["batch"]["codes"]["source"], "generated", "{v}");

        // a transfer cut in half, as by a crash: the codes wait in the outbox
        let keys = g
            .app
            .catalog()
            .load("codes-gen")
            .await
            .unwrap()
            .keys
            .clone();
        let stock = g.app.stock();
        let moved = stock
            .transfer_first_half(&keys.pool, &keys.shards[3], "codes-crash", 7, false)
            .await
            .unwrap();
        assert_eq!(moved.amount, 7);
        assert_eq!(moved.codes.split(',').count(), 7);
        assert!(
            moved.codes.split(',').all(|c| verify(&spec, c)),
            "{moved:?}"
        );
        assert_eq!(stock.sweep(&keys, 0).await.unwrap(), 1);

        let res = storm(
            &g.app,
            "codes-gen",
            10_000,
            |i| format!("cu{i}"),
            |i| Some(format!("r{i}")),
        )
        .await;
        let mut codes = HashSet::new();
        let mut by_user = HashMap::new();
        for (u, s, v) in &res {
            match s {
                201 => {
                    let code = v["code"].as_str().unwrap_or_default().to_string();
                    assert!(verify(&spec, &code), "{v}");
                    assert!(codes.insert(code.clone()), "code {code} handed out twice");
                    by_user.insert(u.clone(), (coupon(v), code));
                }
                410 => assert_eq!(v["error"], "sold_out", "{v}"),
                _ => panic!("unexpected {s} {v}"),
            }
        }
        assert_eq!(codes.len(), 2000, "{:?}", status_counts(&res));
        assert_conserved(g, "codes-gen", 2000).await;
        // a replay answers the same coupon and code
        let (u, (cid, code)) = by_user.iter().next().unwrap();
        let i: usize = u.trim_start_matches("cu").parse().unwrap();
        let (s, v) = claim(&g.app, "codes-gen", u, Some(&format!("r{i}"))).await;
        assert_eq!(
            (s, coupon(&v), v["code"].as_str()),
            (200, cid.clone(), Some(code.as_str()))
        );

        // the database records each coupon's code
        drain_to_db(g, "codes-gen", 2000).await;
        for (cid, code) in by_user.values().take(200) {
            let row = g.db.get_coupon(cid).await.unwrap().unwrap();
            assert_eq!(row.code.as_deref(), Some(code.as_str()), "{cid}");
        }
        let (s, v) = call(&g.app, "GET", &format!("/v1/users/{u}/coupons"), "").await;
        assert_eq!(
            (s, v["coupons"][0]["code"].as_str()),
            (200, Some(code.as_str())),
            "{v}"
        );

        // imported codes: capped by the stock, deduplicated, refused where they do not belong
        create(
            g,
            "codes-imp",
            50,
            1,
            json!({"shards": 4, "codes": {"source": "imported"}}),
        )
        .await;
        let (s, v) = claim(&g.app, "codes-imp", "early", None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (410, Some("sold_out")),
            "no codes yet: {v}"
        );
        let import = |body: String, ctype: Option<&'static str>| {
            let app = g.app.clone();
            async move { call_typed(&app, "POST", "/v1/batches/codes-imp/codes", ctype, body).await }
        };
        let (s, v) = import(json!({"codes": ["P-1", "bad code"]}).to_string(), None).await;
        assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")), "{v}");
        let first: Vec<String> = (0..25).map(|i| format!("P-{i}")).collect();
        let mut body = first.clone();
        body.extend(first[..5].iter().cloned()); // repeated within the import
        let (s, v) = import(json!({ "codes": body }).to_string(), None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (
                v["received"].as_u64(),
                v["added"].as_u64(),
                v["duplicates"].as_u64()
            ),
            (Some(30), Some(25), Some(5)),
            "{v}"
        );
        // streamed (CSV with its header): 5 known codes, 5 new, 2 invalid lines, a blank one,
        // 28 more new: 25 of the 33 new fit
        let mut lines = vec!["code".to_string()];
        lines.extend((20..30).map(|i| format!("P-{i}")));
        lines.push("not a code".into());
        lines.push(String::new());
        lines.push("\"x|y\"".into());
        lines.extend((100..128).map(|i| format!("\"Q-{i}\"")));
        let (s, v) = import(lines.join("\n"), Some("text/csv")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (
                v["received"].as_u64(),
                v["added"].as_u64(),
                v["duplicates"].as_u64(),
                v["invalid"].as_u64(),
                v["over_capacity"].as_u64(),
                v["total"].as_i64(),
            ),
            (Some(38), Some(25), Some(5), Some(2), Some(8), Some(50)),
            "{v}"
        );
        assert_eq!(v["errors"][0]["line"], 12, "{v}");
        let ndjson = "{\"code\":\"Z-1\"}\n\"Z-2\"\n{\"user_id\":\"Z-3\"}";
        let (s, v) = import(ndjson.into(), Some("application/x-ndjson")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            (v["invalid"].as_u64(), v["over_capacity"].as_u64()),
            (Some(1), Some(2)),
            "{v}"
        );
        let (s, v) = call(&g.app, "GET", "/v1/batches/codes-imp", "").await;
        assert_eq!((s, v["stock"]["total"].as_i64()), (200, Some(50)), "{v}");
        let res = storm(&g.app, "codes-imp", 120, |i| format!("iu{i}"), |_| None).await;
        let got: HashSet<String> = res
            .iter()
            .filter(|(_, s, _)| *s == 201)
            .map(|(_, _, v)| v["code"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got.len(), 50, "{:?}", status_counts(&res));
        assert!(
            got.iter()
                .all(|c| c.starts_with("P-") || c.starts_with("Q-"))
        );
        assert_conserved(g, "codes-imp", 50).await;

        for (path, body) in [
            ("/v1/batches/codes-gen/codes", json!({"codes": ["A-1"]})),
            ("/v1/batches/codes-gen", json!({"add_stock": 1})),
        ] {
            let method = if path.ends_with("codes") {
                "POST"
            } else {
                "PATCH"
            };
            let (s, v) = call(&g.app, method, path, body.to_string()).await;
            assert!(s == 409 || s == 400, "{path}: {s} {v}");
        }
        let (s, _) = call(
            &g.app,
            "POST",
            "/v1/batches/nope/codes",
            json!({"codes": ["A-1"]}).to_string(),
        )
        .await;
        assert_eq!(s, 404);
    }

    /// Every claim in a shard's log, as the persister reads them (a reading group of its
    /// own), as (sequence position, user, request id), in log order.
    async fn logged<B: Backend>(
        backend: &B,
        slot: &claimgate::contract::keys::SlotKeys,
    ) -> Vec<(u64, String, Option<String>)> {
        use claimgate::contract::claim_record::{LogRecord, parse};
        use claimgate::contract::log_read;
        let read = log_read::Read {
            group: "conformance-check",
            consumer: "c",
            count: 100_000,
            min_idle_ms: 0,
        };
        let (batch, shard) = (slot.batch.as_str(), slot.slot.unwrap());
        let mut out = Vec::new();
        for e in log_read::call(backend, &slot.log, &read).await.unwrap() {
            for r in parse(batch, shard, &e).unwrap() {
                let LogRecord::Claimed(c) = r else {
                    panic!("not a claim: {r:?}")
                };
                out.push((
                    claimgate::domain::ids::seq_position(c.seq),
                    c.user_id,
                    c.request_id,
                ));
            }
        }
        out
    }

    /// Issue 14 item 1 (group commit): `lua/claim.lua` decides the claims of one call exactly
    /// as calls of one claim each would, in order. The same random sequence of claims (users
    /// at their limit and daily limit, denied users, request ids repeated across and within
    /// calls, no request id, the shard running dry) goes one claim per call to one batch and
    /// in calls of up to 300 claims to an identical one: every answer and the final counts
    /// and stock agree.
    pub async fn group_commit_matches_one_by_one<B: Backend>(g: &Gw<B>) {
        use claimgate::contract::claim::{self as c, Claim, Outcome, Shared};
        use claimgate::contract::{probe, winners};
        use rand::{Rng, SeedableRng};
        let deny = json!({"deny_users": ["d0", "d1"], "require_tags": [], "new_users_only": false});
        let mut kinds = HashMap::new();
        // a daily limit below the limit (it binds first), and no daily limit
        for (tag, limit, extra) in [
            (
                "d",
                3,
                json!({"shards": 1, "per_user_daily_limit": 2, "eligibility": deny}),
            ),
            ("l", 2, json!({"shards": 1, "eligibility": deny})),
        ] {
            let (id_one, id_many) = (format!("gone{tag}"), format!("gmany{tag}"));
            for id in [&id_one, &id_many] {
                create(g, id, 240, limit, extra.clone()).await;
            }
            let slot = |id: String| async move {
                g.app.catalog().load(&id).await.unwrap().keys.shards[0].clone()
            };
            let (one, many) = (slot(id_one).await, slot(id_many).await);
            let backend = g.backend.as_ref();
            let mut rng = rand::rngs::StdRng::seed_from_u64(14 + limit as u64);
            let mut claims: Vec<(String, String, String)> = Vec::new();
            for i in 0..900 {
                let user = match rng.random_range(0..100) {
                    0..3 => format!("d{}", rng.random_range(0..2)),
                    _ => format!("u{}", rng.random_range(0..200)),
                };
                let rid = match rng.random_range(0..10) {
                    // a repeat of an earlier claim's (user, request id): a replay or a retry
                    0..3 if !claims.is_empty() => {
                        let (u, r, _) = claims[rng.random_range(0..claims.len())].clone();
                        claims.push((u, r, format!("n{i}")));
                        continue;
                    }
                    3 => String::new(),
                    _ => format!("r{i}"),
                };
                claims.push((user, rid, format!("n{i}")));
            }
            let shared = Shared {
                max_log: "0",
                day_offset: "0",
            };
            fn as_claim((u, r, n): &(String, String, String)) -> Claim<'_> {
                Claim {
                    user: u,
                    request_id: r,
                    nonce: n,
                    seen: 0,
                    checked: false,
                }
            }
            let mut by_one = Vec::new();
            for cl in &claims {
                let got = c::call_many(backend, &one, &shared, &[as_claim(cl)]).await;
                by_one.push(got.unwrap().pop().unwrap());
            }
            let mut by_many = Vec::new();
            let mut rest = &claims[..];
            while !rest.is_empty() {
                let n = [1, 2, 17, 64, 300][rng.random_range(0..5)].min(rest.len());
                let group: Vec<Claim> = rest[..n].iter().map(as_claim).collect();
                by_many.extend(c::call_many(backend, &many, &shared, &group).await.unwrap());
                rest = &rest[n..];
            }
            // the same answers, ids compared by their sequence (the batch ids differ)
            let norm = |o: &Outcome| match o {
                Outcome::Claimed(x) => {
                    format!("claimed {}", x.coupon_id.rsplit('.').next().unwrap())
                }
                Outcome::Replayed(x) => format!(
                    "replayed {} by {}",
                    x.coupon_id.rsplit('.').next().unwrap(),
                    x.minted_by
                ),
                other => format!("{other:?}"),
            };
            for (i, (a, b)) in by_one.iter().zip(&by_many).enumerate() {
                assert_eq!(norm(a), norm(b), "claim {i} {:?}", claims[i]);
                *kinds
                    .entry(norm(a).split(' ').next().unwrap().to_string())
                    .or_insert(0) += 1;
            }
            let mut w1 = winners::call(backend, &one).await.unwrap();
            let mut w2 = winners::call(backend, &many).await.unwrap();
            w1.sort();
            w2.sort();
            assert_eq!(w1, w2, "per-user counts");
            let (p1, p2) = (
                probe::call(backend, &one).await.unwrap(),
                probe::call(backend, &many).await.unwrap(),
            );
            assert_eq!((p1.stock, p1.claimed), (p2.stock, p2.claimed));
            // one log entry per call with successes, holding all of them: the grouped
            // batch's log holds the same claims in fewer entries
            assert_eq!(
                p1.log_len as i64, p1.claimed,
                "one claim per call: one entry per claim"
            );
            assert!(p2.log_len < p1.log_len, "{} entries", p2.log_len);
            let (l1, l2) = (logged(backend, &one).await, logged(backend, &many).await);
            assert_eq!(l1, l2, "the claims in the logs");
            assert_eq!(l1.len() as i64, p1.claimed);
        }
        // the sequences covered every path
        for k in [
            "claimed",
            "replayed",
            "LimitReached",
            "DailyLimitReached",
            "Denied",
            "ShardEmpty",
        ] {
            assert!(
                kinds.get(k).copied().unwrap_or(0) > 0,
                "{k} never happened: {kinds:?}"
            );
        }
    }

    /// Issue 11 item 3: `lua/claim.lua` counts the daily limit's days as floor((TIME + offset)
    /// / DAY), with the offset the gateway passes (ARGV 7), against the backend's own clock
    /// (no sleep: two offsets half a day apart put the same instant on two local days). Two
    /// claims of one user in one call (group commit) count on the same day.
    pub async fn daily_days_follow_the_offset<B: Backend>(g: &Gw<B>) {
        use claimgate::contract::claim::{self as c, Args, Outcome};
        const DAY: i64 = 86_400_000;
        create(
            g,
            "dayoff",
            20,
            10,
            json!({"shards": 1, "per_user_daily_limit": 1}),
        )
        .await;
        let keys = g.app.catalog().load("dayoff").await.unwrap().keys.clone();
        let slot = &keys.shards[0];
        let backend = g.backend.as_ref();
        let run = |user: &'static str, rid: &'static str, off: String| async move {
            let args = Args {
                user,
                request_id: rid,
                max_log: "0",
                nonce: "n",
                day_offset: &off,
                seen: 0,
                checked: false,
            };
            c::call(backend, slot, &args).await
        };
        // the backend's now (its TIME), from a first claim's claimed_at
        let now = match run("probe", "p1", "0".into()).await.unwrap() {
            Outcome::Claimed(coupon) => coupon.claimed_at_ms,
            o => panic!("{o:?}"),
        };
        // a local 18:00 (3/4 of a day) within 3/4 of a day of now, then the next day's 06:00
        let r = now.rem_euclid(DAY);
        let off1 = if r < DAY / 2 {
            -DAY / 4 - r
        } else {
            3 * DAY / 4 - r
        };
        let off2 = off1 + DAY / 2;
        assert!(off1.abs() < DAY && off2.abs() < DAY);
        let claimed = |o: &Outcome| matches!(o, Outcome::Claimed(_));
        assert!(claimed(&run("x", "1", off1.to_string()).await.unwrap()));
        assert_eq!(
            run("x", "2", off1.to_string()).await.unwrap(),
            Outcome::DailyLimitReached
        );
        // the same instant half a day further east is the next local day: the limit reset
        assert!(claimed(&run("x", "3", off2.to_string()).await.unwrap()));
        assert_eq!(
            run("x", "4", off2.to_string()).await.unwrap(),
            Outcome::DailyLimitReached
        );
        // bad offsets are refused before anything is written
        for bad in ["86400000", "-86400000", "1.5", "x", ""] {
            let e = run("y", "1", bad.to_string()).await;
            assert!(
                matches!(e, Err(claimgate::backend::BackendError::Script(_))),
                "{bad}: {e:?}"
            );
        }
        // two claims of one user in ONE call (group commit): the second sees the first's
        // day count
        let shared = c::Shared {
            max_log: "0",
            day_offset: "0",
        };
        let both = [
            c::Claim {
                user: "z",
                request_id: "1",
                nonce: "n",
                seen: 0,
                checked: false,
            },
            c::Claim {
                user: "z",
                request_id: "2",
                nonce: "n",
                seen: 0,
                checked: false,
            },
        ];
        let got = c::call_many(backend, slot, &shared, &both).await.unwrap();
        assert!(claimed(&got[0]), "{got:?}");
        assert_eq!(got[1], Outcome::DailyLimitReached);
        let day_utc = now.div_euclid(DAY);
        let (s, v) = call(&g.app, "GET", "/v1/batches/dayoff", "").await;
        assert_eq!(
            (s, v["stock"]["claimed"].as_i64()),
            (200, Some(4)),
            "{v} (day {day_utc})"
        );
    }

    /// Cluster failover test, leader mode (`cf.0.3930 handed out to u47319 and to u47315`):
    /// a shard rolled back below a sequence the gateway saw it hand out must mint nothing
    /// and write nothing (`lua/claim.lua` ARGV 6 + 3n): a re-mint written there reached the
    /// database as the owner of an id already handed out, and a repair restored it for its
    /// retry to replay. Replays in the same call are still answered.
    pub async fn a_rolled_back_shard_mints_nothing<B: Backend>(g: &Gw<B>) {
        use claimgate::contract::claim::{self as c, Claim, Outcome, Shared};
        use claimgate::contract::replay;
        use claimgate::domain::ids::parse_coupon_id;
        create(g, "rolled", 20, 1, json!({"shards": 1})).await;
        let keys = g.app.catalog().load("rolled").await.unwrap().keys.clone();
        let slot = &keys.shards[0];
        let backend = g.backend.as_ref();
        let shared = Shared {
            max_log: "0",
            day_offset: "0",
        };
        let one = |user: &'static str, seen: u64| Claim {
            user,
            request_id: "r",
            nonce: "n",
            seen,
            checked: false,
        };
        let x = match c::call_many(backend, slot, &shared, &[one("x", 0)]).await {
            Ok(mut v) => match v.pop() {
                Some(Outcome::Claimed(coupon)) => coupon,
                o => panic!("{o:?}"),
            },
            e => panic!("{e:?}"),
        };
        let (_, _, seq) = parse_coupon_id(&x.coupon_id).unwrap();
        // the caller saw the shard hand out the sequence it would mint next: rolled back
        let got = c::call_many(backend, slot, &shared, &[one("y", seq + 1)]).await;
        assert_eq!(got.unwrap(), [Outcome::RolledBack]);
        assert_eq!(
            replay::call(backend, slot, "y", "r").await.unwrap(),
            replay::Found::None,
            "nothing written"
        );
        // a replay in the same call is answered; the highest of the call's values counts
        let got = c::call_many(backend, slot, &shared, &[one("x", seq + 5), one("z", 0)])
            .await
            .unwrap();
        assert!(
            matches!(&got[0], Outcome::Replayed(r) if r.coupon_id == x.coupon_id),
            "{got:?}"
        );
        assert_eq!(got[1], Outcome::RolledBack);
        // not rolled back: the next sequence is above what the caller saw
        let got = c::call_many(backend, slot, &shared, &[one("y", seq)]).await;
        assert!(
            matches!(&got.as_ref().unwrap()[0], Outcome::Claimed(cy)
                if parse_coupon_id(&cy.coupon_id).unwrap().2 == seq + 1),
            "{got:?}"
        );
        let shard = slot.label.clone();
        for bad in ["-1", "1.5", "x", ""] {
            let r = backend
                .eval(
                    claimgate::backend::Script::Claim,
                    &c::keys(slot),
                    &["1", "0", "rolled", &shard, "0", "w", "r", "n", bad],
                )
                .await;
            assert!(
                matches!(r, Err(claimgate::backend::BackendError::Script(_))),
                "{bad:?}: {r:?}"
            );
        }
        assert_conserved(g, "rolled", 2).await;
    }

    /// Issue 14 item 3 (request-id retention): a shard drops a generation of request-id
    /// records only once its log holds nothing from before it (`lua/rotate.lua`); then a
    /// request id it no longer has, of a user who claimed before, is "ask the database"
    /// (`lua/claim.lua` and `lua/replay.lua` -12) unless the claim is marked checked, while a
    /// user who never claimed claims at once. The gateway answers the database's coupon.
    pub async fn expired_request_ids_ask_the_database<B: Backend>(g: &Gw<B>) {
        use claimgate::contract::claim::{self as c, Claim, Outcome, Shared};
        use claimgate::contract::replay::{self, Found};
        use claimgate::contract::rotate::{self, Rotated};
        create(g, "rot", 20, 3, json!({"shards": 1})).await;
        let keys = g.app.catalog().load("rot").await.unwrap().keys.clone();
        let slot = &keys.shards[0];
        let backend = g.backend.as_ref();
        let shared = Shared {
            max_log: "0",
            day_offset: "0",
        };
        let one = |user: &'static str, rid: &'static str, checked: bool| Claim {
            user,
            request_id: rid,
            nonce: "n",
            seen: 0,
            checked,
        };
        let (s, first) = claim(&g.app, "rot", "x", Some("a")).await;
        assert_eq!(s, 201, "{first}");
        // a retention of 1 ms: every call after the first is due
        let rot = async || {
            tokio::time::sleep(Duration::from_millis(3)).await;
            rotate::call(backend, slot, 1).await.unwrap()
        };
        assert!(matches!(rot().await, Rotated::Started(_)));
        assert!(
            matches!(rot().await, Rotated::LogBehind(_)),
            "x's claim is not in the database yet"
        );
        drain_to_db(g, "rot", 1).await;
        assert!(matches!(rot().await, Rotated::Rotated(_)));
        // one rotation: x's record is in the previous generation, still found
        assert_eq!(
            replay::call(backend, slot, "x", "a").await.unwrap(),
            Found::Coupon(
                match c::call_many(backend, slot, &shared, &[one("x", "a", false)])
                    .await
                    .unwrap()
                    .pop()
                {
                    Some(Outcome::Replayed(c)) => c,
                    o => panic!("{o:?}"),
                }
            )
        );
        assert!(matches!(rot().await, Rotated::Rotated(_)));
        // two: it is gone, and the shard says records were dropped
        let got = c::call_many(
            backend,
            slot,
            &shared,
            &[
                one("x", "a", false),
                one("x", "b", false),
                one("z", "c", false),
                one("x", "d", true),
            ],
        )
        .await
        .unwrap();
        assert_eq!(got[0], Outcome::AskDatabase);
        assert_eq!(got[1], Outcome::AskDatabase);
        assert!(matches!(got[2], Outcome::Claimed(_)), "{got:?}");
        assert!(matches!(got[3], Outcome::Claimed(_)), "{got:?}");
        assert_eq!(
            replay::call(backend, slot, "x", "a").await.unwrap(),
            Found::AskDatabase
        );
        assert!(matches!(
            replay::call(backend, slot, "z", "c").await.unwrap(),
            Found::Coupon(_)
        ));
        assert_eq!(
            replay::call(backend, slot, "w", "q").await.unwrap(),
            Found::None,
            "a user who never claimed"
        );
        // the gateway: the same coupon as the first answer, from the database
        let (s, v) = claim(&g.app, "rot", "x", Some("a")).await;
        assert_eq!((s, &v["coupon_id"]), (200, &first["coupon_id"]), "{v}");
        // a new request id of x: the database has none, so it claims (x's third)
        let (s, v) = claim(&g.app, "rot", "x", Some("e")).await;
        assert_eq!(s, 201, "{v}");
        assert_conserved(g, "rot", 4).await;
    }
}

fn status_counts(res: &[(String, u16, Value)]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for (_, s, v) in res {
        *m.entry(format!("{s} {}", v["error"].as_str().unwrap_or("")))
            .or_default() += 1;
    }
    m
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                let g = redis_gw().await;
                cases::$case(&g).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                let g = embedded_gw().await;
                cases::$case(&g).await;
            }
            /// On a Redis Cluster of 3 primaries with a replica each (issue 13 item 5).
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                let g = cluster_gw().await;
                cases::$case(&g).await;
            }
        }
    )*};
}

on_both_backends!(
    flash_sale,
    limits_under_concurrency,
    replays,
    transfer_crash,
    rules,
    bad_input,
    wallet,
    transfer_to_a_missing_slot,
    batch_ack,
    budget_under_concurrency,
    daily_days_follow_the_offset,
    group_commit_matches_one_by_one,
    code_pools,
    a_rolled_back_shard_mints_nothing,
    expired_request_ids_ask_the_database
);

/// Random operation sequences give identical answers on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_random_sequences() {
    use rand::{Rng, SeedableRng};
    let r = redis_gw().await;
    let e = embedded_gw().await;
    for seed in 0..3u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let batch = format!("diff{seed}");
        let stock = rng.random_range(5..40);
        let shards = rng.random_range(1..6);
        let limit = rng.random_range(1..4);
        let body = batch_json(
            &batch,
            stock,
            limit,
            json!({"shards": shards, "per_user_daily_limit": if seed == 1 { json!(1) } else { Value::Null }}),
        );
        let ops: Vec<(u8, String, String)> = (0..150)
            .map(|_| {
                let op = rng.random_range(0..10u8);
                (
                    op,
                    format!("u{}", rng.random_range(0..25)),
                    format!("r{}", rng.random_range(0..60)),
                )
            })
            .collect();
        let mut answers = Vec::new();
        for app_is_redis in [true, false] {
            let mut log = Vec::new();
            macro_rules! run {
                ($g:expr) => {{
                    log.push(
                        call(&$g.app, "POST", "/v1/batches", body.clone())
                            .await
                            .0
                            .to_string(),
                    );
                    for (op, user, rid) in &ops {
                        let (s, v) = match op {
                            0 => {
                                call(
                                    &$g.app,
                                    "PATCH",
                                    &format!("/v1/batches/{batch}"),
                                    r#"{"state":"paused"}"#,
                                )
                                .await
                            }
                            1 => {
                                call(
                                    &$g.app,
                                    "PATCH",
                                    &format!("/v1/batches/{batch}"),
                                    r#"{"state":"active"}"#,
                                )
                                .await
                            }
                            2 => {
                                call(
                                    &$g.app,
                                    "PATCH",
                                    &format!("/v1/batches/{batch}"),
                                    r#"{"add_stock":3}"#,
                                )
                                .await
                            }
                            3 => claim(&$g.app, &batch, user, None).await,
                            _ => claim(&$g.app, &batch, user, Some(rid)).await,
                        };
                        let detail = match s {
                            200 | 201 if v.get("coupon_id").is_some() => coupon(&v),
                            200 => v["stock"].to_string(),
                            _ => v["error"].as_str().unwrap_or("").to_string(),
                        };
                        log.push(format!("{s} {detail}"));
                    }
                    let (_, v) = call(&$g.app, "GET", &format!("/v1/batches/{batch}"), "").await;
                    log.push(v["stock"].to_string());
                }};
            }
            if app_is_redis {
                run!(r)
            } else {
                run!(e)
            }
            answers.push(log);
        }
        for (i, (a, b)) in answers[0].iter().zip(&answers[1]).enumerate() {
            assert_eq!(a, b, "seed {seed}, step {i}: redis vs embedded");
        }
    }
}

/// Past `persister.max_backlog_per_shard` unpersisted records, claims are shed with 503
/// (nothing claimed) instead of growing Redis memory; once the persister drains, they flow.
async fn backlog_bound_case<B: Backend>(g: &Gw<B>) {
    create(g, "bl", 100, 1, json!({"shards": 1})).await;
    for i in 0..5 {
        assert_eq!(claim(&g.app, "bl", &format!("b{i}"), None).await.0, 201);
    }
    let (s, v) = claim(&g.app, "bl", "b-over", None).await;
    assert_eq!((s, v["error"].as_str()), (503, Some("overloaded")), "{v}");
    assert_conserved(g, "bl", 5).await;
    drain_to_db(g, "bl", 5).await;
    assert_eq!(
        claim(&g.app, "bl", "b-over", None).await.0,
        201,
        "drained: claims flow again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_bound_sheds_then_recovers_redis() {
    let g = redis_gw_with(&["persister.max_backlog_per_shard=5".into()]).await;
    backlog_bound_case(&g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_bound_sheds_then_recovers_embedded() {
    let g = embedded_gw_with(&["persister.max_backlog_per_shard=5".into()]).await;
    backlog_bound_case(&g).await;
}

/// Issue 11 item 3: the per-user daily limit of a batch in Asia/Shanghai resets at midnight
/// in Beijing (16:00 UTC), not at 08:00 in Beijing (00:00 UTC), through the whole claim
/// path (the cache's memory of users at their limit included), on one injected clock that
/// the gateway and the embedded backend's `TIME` share: no sleep. (Redis's TIME cannot be
/// moved: `daily_days_follow_the_offset::redis` checks the script's day arithmetic there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_limit_rolls_over_at_local_midnight_embedded() {
    use claimgate::domain::time::{ManualClock, Timestamp};
    let at = |s: &str| Timestamp::parse(s).unwrap().0;
    let g = embedded_gw().await;
    let clock = Arc::new(ManualClock::new(at("2026-11-11T15:59:58Z"))); // 23:59:58 Beijing
    g.backend.set_clock(clock.clone());
    let app = claimgate::gateway::assemble_with_clock(
        g.cfg.clone(),
        g.backend.clone(),
        g.db.clone(),
        None,
        clock.clone(),
    );
    for (id, zone) in [("bj", json!("Asia/Shanghai")), ("utc", Value::Null)] {
        let body = batch_json(
            id,
            100,
            10,
            json!({"shards": 2, "per_user_daily_limit": 1, "timezone": zone}),
        );
        let (s, v) = call(&app, "POST", "/v1/batches", body).await;
        assert_eq!(s, 201, "{v}");
    }
    let (_, v) = call(&app, "GET", "/v1/batches/bj", "").await;
    assert_eq!(v["batch"]["timezone"], "Asia/Shanghai");
    let mut n = 0;
    let mut claim_as = |batch: &'static str| {
        n += 1;
        let (app, rid) = (app.clone(), format!("r{n}"));
        async move { claim(&app, batch, "u1", Some(&rid)).await.0 }
    };
    // 23:59:58 in Beijing: the first claim of the day, then the limit (twice: the second
    // refusal comes from the cache)
    for batch in ["bj", "utc"] {
        assert_eq!(claim_as(batch).await, 201, "{batch}");
        assert_eq!(claim_as(batch).await, 409, "{batch}");
        assert_eq!(claim_as(batch).await, 409, "{batch}");
    }
    // 00:00:00.000 in Beijing: a new day there, not in UTC
    clock.set(at("2026-11-11T16:00:00Z"));
    assert_eq!(
        claim_as("bj").await,
        201,
        "Beijing's midnight resets the Beijing batch"
    );
    assert_eq!(claim_as("bj").await, 409);
    assert_eq!(claim_as("utc").await, 409, "the UTC day has not turned");
    // 08:00 in Beijing = 00:00 UTC: a new UTC day, not in Beijing (the old bug reset here)
    clock.set(at("2026-11-12T00:00:00Z"));
    assert_eq!(claim_as("utc").await, 201);
    assert_eq!(
        claim_as("bj").await,
        409,
        "08:00 in Beijing is not a new day there"
    );
    // an unknown zone is refused with its own code, nothing created
    let body = batch_json("mars", 1, 1, json!({"timezone": "Mars/Olympus"}));
    let (s, v) = call(&app, "POST", "/v1/batches", body).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (400, Some("unknown_timezone")),
        "{v}"
    );
    let (s, _) = call(&app, "GET", "/v1/batches/mars", "").await;
    assert_eq!(s, 404);
}
