//! Campaign tools through the real router, on both backends: the product-page lookup (from
//! the reverse index, fresh across instances through the batch-change broadcast), the admin
//! listing (keyset pages stable under inserts, filters, bounded scans) and the checkout
//! quote (over the persisted wallet), with their bad inputs.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use claimgate::backend::Backend;
use claimgate::http::App;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::gw::*;
use support::watchdog::{Watchdog, step};
use tokio_util::sync::CancellationToken;

async fn request<B: Backend>(
    app: &App<B>,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: impl Into<Bytes>,
) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let peer: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let resp = claimgate::http::router::handle(app, req, peer).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get<B: Backend>(app: &App<B>, path: &str) -> (u16, Value) {
    call(app, "GET", path, "").await
}

fn ids(v: &Value, key: &str, field: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .iter()
        .map(|b| b[field].as_str().unwrap().to_string())
        .collect()
}

/// Runs the persister until the database holds `n` coupons of `user`.
async fn persist_wallet<B: Backend>(g: &Gw<B>, user: &str, n: usize) {
    support::gw::persist_until(g, &format!("{n} coupons of {user}"), async || {
        g.db.user_coupons(user, None, 500, None)
            .await
            .unwrap()
            .0
            .len()
            == n
    })
    .await;
}

const PRODUCT_FIELDS: [&str; 8] = [
    "applies_by",
    "available",
    "batch_id",
    "claim_window",
    "discount",
    "exclusive",
    "name",
    "validity",
];

fn window(start: &str, end: &str) -> Value {
    json!({"start": start, "end": end})
}

pub mod cases {
    use super::*;

    /// The lookup finds the claimable batches by product, category, merchant and "all",
    /// hides what is not claimable now (paused at once, sold out, not started, ended), shows
    /// no stock or eligibility detail, and refuses bad input with 400.
    pub async fn product_lookup<B: Backend>(g: &Gw<B>) {
        let _wd = Watchdog::arm(Duration::from_secs(60));
        let app = &g.app;
        let deny =
            json!({"deny_users": ["secret-user"], "require_tags": [], "new_users_only": false});
        create(g, "pl-all", 10, 1, json!({"eligibility": deny})).await;
        create(
            g,
            "pl-prod",
            10,
            1,
            json!({"scope": {"kind": "products", "ids": ["p1", "p2", "sku 1"]},
                   "discount": {"kind": "fixed", "amount": 300}}),
        )
        .await;
        create(
            g,
            "pl-cat",
            10,
            1,
            json!({"scope": {"kind": "categories", "ids": ["shoes"]},
                   "claim_window": window("2020-01-01T00:00:00Z", "2099-01-01T00:00:00Z")}),
        )
        .await;
        create(
            g,
            "pl-mer",
            10,
            1,
            json!({"scope": {"kind": "merchants", "ids": ["acme"]}, "exclusive": true}),
        )
        .await;
        create(
            g,
            "pl-other",
            10,
            1,
            json!({"scope": {"kind": "products", "ids": ["p9"]}}),
        )
        .await;
        create(
            g,
            "pl-future",
            10,
            1,
            json!({"claim_window": window("2099-01-01T00:00:00Z", "2100-01-01T00:00:00Z")}),
        )
        .await;
        create(
            g,
            "pl-ended",
            10,
            1,
            json!({"claim_window": window("2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z")}),
        )
        .await;
        create(
            g,
            "pl-gone",
            1,
            1,
            json!({"scope": {"kind": "products", "ids": ["p1"]}}),
        )
        .await;
        assert_eq!(claim(app, "pl-gone", "u1", None).await.0, 201);
        assert_eq!(claim(app, "pl-gone", "u2", None).await.0, 410);
        step("batches created");

        let page = "/v1/products/p1/batches?category=shoes&merchant=acme";
        let (s, v) = get(app, page).await;
        assert_eq!(s, 200, "{v}");
        // ending soonest first (pl-cat), then by id
        assert_eq!(
            ids(&v, "batches", "batch_id"),
            ["pl-cat", "pl-all", "pl-mer", "pl-prod"]
        );
        assert_eq!(v["product_id"], "p1");
        assert_eq!(v["truncated"], false);
        for b in v["batches"].as_array().unwrap() {
            let keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys, PRODUCT_FIELDS, "{b}");
            assert_eq!(b["available"], true);
        }
        let text = v.to_string();
        for private in ["stock", "remaining", "secret-user", "eligibility"] {
            assert!(!text.contains(private), "{private} shown: {text}");
        }
        let by: Vec<&str> = v["batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["applies_by"].as_str().unwrap())
            .collect();
        assert_eq!(by, ["category", "all", "merchant", "product"]);

        // without category and merchant; a percent-encoded product id
        let (_, v) = get(app, "/v1/products/p2/batches").await;
        assert_eq!(ids(&v, "batches", "batch_id"), ["pl-all", "pl-prod"]);
        let (_, v) = get(app, "/v1/products/sku%201/batches").await;
        assert_eq!(ids(&v, "batches", "batch_id"), ["pl-all", "pl-prod"]);
        assert_eq!(v["product_id"], "sku 1");

        // a pause hides the batch at once; a resume shows it again
        let patch = |state: &str| json!({"state": state}).to_string();
        let (s, v) = call(app, "PATCH", "/v1/batches/pl-prod", patch("paused")).await;
        assert_eq!(s, 200, "{v}");
        let (_, v) = get(app, "/v1/products/p2/batches").await;
        assert_eq!(ids(&v, "batches", "batch_id"), ["pl-all"]);
        call(app, "PATCH", "/v1/batches/pl-prod", patch("active")).await;
        let (_, v) = get(app, "/v1/products/p2/batches").await;
        assert_eq!(ids(&v, "batches", "batch_id"), ["pl-all", "pl-prod"]);
        // moving the window end of an ended batch brings it back
        let (s, v) = call(
            app,
            "PATCH",
            "/v1/batches/pl-ended",
            json!({"claim_window": {"end": "2100-06-01T00:00:00Z"}}).to_string(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let (_, v) = get(app, "/v1/products/p3/batches").await;
        assert_eq!(ids(&v, "batches", "batch_id"), ["pl-all", "pl-ended"]);
        step("lookups answered");

        let long = "x".repeat(129);
        for bad in [
            "/v1/products/p1/batches?color=red".to_string(),
            "/v1/products/p1/batches?category=a&category=b".into(),
            "/v1/products/p1/batches?merchant=".into(),
            "/v1/products/p1/batches?category=%zz".into(),
            "/v1/products/p1/batches?category=a%0Ab".into(),
            "/v1/products/p%0A1/batches".into(),
            "/v1/products/%FF/batches".into(),
            format!("/v1/products/{long}/batches"),
        ] {
            let (s, v) = get(app, &bad).await;
            assert_eq!(
                (s, v["error"].as_str()),
                (400, Some("bad_request")),
                "{bad}: {v}"
            );
        }
        let (s, _) = call(app, "POST", "/v1/products/p1/batches", "").await;
        assert_eq!(s, 405);
    }

    /// Keyset pages: every batch that existed when the listing began comes exactly once, in
    /// id order, whatever is created meanwhile; filters; bad parameters are 400.
    pub async fn listing<B: Backend>(g: &Gw<B>) {
        let _wd = Watchdog::arm(Duration::from_secs(60));
        let app = &g.app;
        for id in ["ls-a", "ls-b", "ls-c", "ls-d", "ls-f", "ls-g"] {
            create(g, id, 5, 1, json!({})).await;
        }
        create(
            g,
            "ls-e",
            5,
            1,
            json!({"claim_window": window("2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z")}),
        )
        .await;
        let (s, _) = call(app, "PATCH", "/v1/batches/ls-c", r#"{"state":"paused"}"#).await;
        assert_eq!(s, 200);

        let (s, p1) = get(app, "/v1/batches?limit=3").await;
        assert_eq!(s, 200, "{p1}");
        assert_eq!(ids(&p1, "batches", "id"), ["ls-a", "ls-b", "ls-c"]);
        assert_eq!(p1["next_cursor"], "ls-c");
        assert_eq!(p1["batches"][2]["state"], "paused");
        // created meanwhile: one before the cursor, one after
        create(g, "ls-0", 5, 1, json!({})).await;
        create(g, "ls-z", 5, 1, json!({})).await;
        let (_, p2) = get(app, "/v1/batches?limit=3&cursor=ls-c").await;
        assert_eq!(ids(&p2, "batches", "id"), ["ls-d", "ls-e", "ls-f"]);
        let (_, p3) = get(app, "/v1/batches?cursor=ls-f&limit=3").await;
        assert_eq!(ids(&p3, "batches", "id"), ["ls-g", "ls-z"]);
        assert_eq!(p3["next_cursor"], Value::Null);
        // exactly a page left: no cursor to an empty page
        let (_, p) = get(app, "/v1/batches?cursor=ls-f&limit=2").await;
        assert_eq!(
            (ids(&p, "batches", "id"), &p["next_cursor"]),
            (vec!["ls-g".to_string(), "ls-z".into()], &Value::Null)
        );

        let all = |v: &Value| ids(v, "batches", "id");
        let (_, v) = get(app, "/v1/batches?state=paused").await;
        assert_eq!(all(&v), ["ls-c"]);
        let (_, v) = get(
            app,
            "/v1/batches?state=active&ends_after=2050-01-01T00:00:00Z",
        )
        .await;
        assert_eq!(
            all(&v),
            ["ls-0", "ls-a", "ls-b", "ls-d", "ls-f", "ls-g", "ls-z"]
        );
        let (_, v) = get(app, "/v1/batches?active_at=2020-06-01T00:00:00Z&limit=2").await;
        assert_eq!(all(&v), ["ls-0", "ls-a"]);
        // a raw `+` of a UTC offset is kept, `%2B` decoded
        for at in ["2030-01-01T00:00:00+01:00", "2030-01-01T00:00:00%2B01:00"] {
            let (s, v) = get(app, &format!("/v1/batches?active_at={at}&state=paused")).await;
            assert_eq!((s, all(&v)), (200, vec!["ls-c".to_string()]), "{at}: {v}");
        }
        let (_, v) = get(app, "/v1/batches?limit=100").await;
        assert_eq!(v["batches"].as_array().unwrap().len(), 9);
        assert_eq!(v["next_cursor"], Value::Null);

        for bad in [
            "state=gone",
            "state=",
            "limit=0",
            "limit=101",
            "limit=x",
            "cursor=a%7Bb",
            "cursor=",
            "active_at=yesterday",
            "ends_after=1969-12-31T00:00:00Z",
            "bogus=1",
            "limit=1&limit=2",
        ] {
            let (s, v) = get(app, &format!("/v1/batches?{bad}")).await;
            assert_eq!(
                (s, v["error"].as_str()),
                (400, Some("bad_request")),
                "{bad}: {v}"
            );
        }
    }

    /// The quote over a persisted wallet: each coupon's discount or reason, the best
    /// combination (the exclusive coupon while it gives more, else the stack), apportioned.
    pub async fn quote<B: Backend>(g: &Gw<B>) {
        let _wd = Watchdog::arm(Duration::from_secs(90));
        let app = &g.app;
        // default: threshold 10000 / 500, scope all
        create(g, "q-all", 10, 2, json!({})).await;
        let fixed = |amount: i64| json!({"kind": "fixed", "amount": amount});
        create(
            g,
            "q-p1",
            10,
            1,
            json!({"discount": fixed(300), "scope": {"kind": "products", "ids": ["p1"]}}),
        )
        .await;
        create(
            g,
            "q-pct",
            10,
            1,
            json!({"discount": {"kind": "percent", "percent_off": 10, "max_off": 1000},
                   "scope": {"kind": "categories", "ids": ["shoes"]}}),
        )
        .await;
        create(
            g,
            "q-ex",
            10,
            1,
            json!({"discount": fixed(2500), "exclusive": true}),
        )
        .await;
        create(
            g,
            "q-far",
            10,
            1,
            json!({"discount": fixed(100), "scope": {"kind": "products", "ids": ["nope"]}}),
        )
        .await;
        create(
            g,
            "q-mer",
            10,
            1,
            json!({"discount": {"kind": "threshold", "threshold": 99_999_999, "amount": 100},
                   "scope": {"kind": "merchants", "ids": ["acme"]}}),
        )
        .await;
        create(g, "q-lock", 10, 1, json!({"discount": fixed(50)})).await;
        let mut coupon = std::collections::HashMap::new();
        for (b, rid) in [
            ("q-all", "1"),
            ("q-all", "2"),
            ("q-p1", "1"),
            ("q-pct", "1"),
            ("q-ex", "1"),
            ("q-far", "1"),
            ("q-mer", "1"),
            ("q-lock", "1"),
        ] {
            let (s, v) = claim(app, b, "qu", Some(&format!("{b}-{rid}"))).await;
            assert_eq!(s, 201, "{b}: {v}");
            coupon
                .entry(b)
                .or_insert_with(Vec::new)
                .push(v["coupon_id"].as_str().unwrap().to_string());
        }
        persist_wallet(g, "qu", 8).await;
        step("wallet persisted");
        let lock = |c: &str, order: &str| {
            let path = format!("/v1/coupons/{c}/lock");
            let body = json!({"order_id": order}).to_string();
            async move { call(app, "POST", &path, body).await }
        };
        assert_eq!(lock(&coupon["q-lock"][0], "o1").await.0, 200);

        let cart = json!({"user_id": "qu", "items": [
            {"product_id": "p1", "category_id": "shoes", "merchant_id": "acme", "unit_price": 6000, "quantity": 1},
            {"product_id": "p2", "category_id": "shirts", "merchant_id": "acme", "unit_price": 2500, "quantity": 2},
        ]})
        .to_string();
        let (s, q) = call(app, "POST", "/v1/checkout/quote", cart.clone()).await;
        assert_eq!(s, 200, "{q}");
        assert_eq!(
            (q["user_id"].as_str(), q["total"].as_i64()),
            (Some("qu"), Some(11_000))
        );
        assert_eq!(q["wallet_truncated"], false);
        let usable: Vec<(String, i64)> = q["usable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["batch_id"].as_str().unwrap().to_string(),
                    u["discount"].as_i64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, i64)> = [
            ("q-ex", 2500),
            ("q-pct", 600),
            ("q-all", 500),
            ("q-all", 500),
            ("q-p1", 300),
        ]
        .iter()
        .map(|(b, d)| (b.to_string(), *d))
        .collect();
        assert_eq!(usable, want, "{q}");
        let reasons: BTreeSet<(String, String)> = q["unusable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| {
                (
                    u["batch_id"].as_str().unwrap().to_string(),
                    u["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let want: BTreeSet<(String, String)> = [
            ("q-far", "out_of_scope"),
            ("q-mer", "below_threshold"),
            ("q-lock", "locked"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(reasons, want);
        // the exclusive gives more than the stack (600 + 500 + 300): alone, apportioned
        // 6000 : 5000 by largest remainder (1363.6 -> 1364, 1136.4 -> 1136)
        let best = &q["best"];
        assert_eq!(best["coupon_ids"], json!([coupon["q-ex"][0]]));
        assert_eq!(best["discount"], 2500);
        let shares: Vec<i64> = best["lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["discount"].as_i64().unwrap())
            .collect();
        assert_eq!(shares, [1364, 1136]);

        // once the exclusive coupon is locked for an order: the stack
        assert_eq!(lock(&coupon["q-ex"][0], "o2").await.0, 200);
        let (_, q) = call(app, "POST", "/v1/checkout/quote", cart.clone()).await;
        let best = &q["best"];
        assert_eq!(best["discount"], 1400, "{q}");
        let chosen: BTreeSet<String> = best["coupon_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let first_all = coupon["q-all"].iter().min().unwrap().clone();
        let want: BTreeSet<String> = [&coupon["q-p1"][0], &coupon["q-pct"][0], &first_all]
            .into_iter()
            .cloned()
            .collect();
        assert_eq!(chosen, want, "one coupon of q-all, the one expiring first");
        let lines = best["lines"].as_array().unwrap();
        let sum: i64 = lines.iter().map(|l| l["discount"].as_i64().unwrap()).sum();
        assert_eq!(sum, 1400);
        for l in lines {
            assert!(l["discount"].as_i64() <= l["amount"].as_i64(), "{l}");
        }
        for c in best["coupons"].as_array().unwrap() {
            let parts: i64 = c["lines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["discount"].as_i64().unwrap())
                .sum();
            assert_eq!(Some(parts), c["discount"].as_i64(), "{c}");
        }
        // q-p1 only on line 0
        let p1 = best["coupons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["batch_id"] == "q-p1")
            .unwrap();
        assert_eq!(p1["lines"], json!([{"line": 0, "discount": 300}]));
        let reasons: Vec<&str> = q["unusable"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["batch_id"] == "q-ex")
            .map(|u| u["reason"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, ["locked"]);

        // a user without coupons: an empty quote
        let empty = cart.replace("\"qu\"", "\"nobody\"");
        let (s, q) = call(app, "POST", "/v1/checkout/quote", empty).await;
        assert_eq!(
            (s, &q["best"]["discount"], &q["usable"]),
            (200, &json!(0), &json!([]))
        );
        step("quotes answered");

        let line = json!({"product_id": "p1", "unit_price": 100, "quantity": 1});
        let many: Vec<Value> = (0..101).map(|_| line.clone()).collect();
        let item = |f: &str, v: Value| {
            let mut l = line.clone();
            l[f] = v;
            json!({"user_id": "qu", "items": [l]}).to_string()
        };
        for (name, body) in [
            ("not json", "{".to_string()),
            ("an array", "[]".into()),
            ("no items", json!({"user_id": "qu"}).to_string()),
            (
                "a null user_id",
                json!({"user_id": null, "items": [line.clone()]}).to_string(),
            ),
            (
                "empty cart",
                json!({"user_id": "qu", "items": []}).to_string(),
            ),
            (
                "too many items",
                json!({"user_id": "qu", "items": many}).to_string(),
            ),
            ("negative price", item("unit_price", json!(-1))),
            ("zero quantity", item("quantity", json!(0))),
            ("negative quantity", item("quantity", json!(-2))),
            ("fractional price", item("unit_price", json!(1.5))),
            ("price beyond i64", item("unit_price", json!(1e20))),
            (
                "line overflow",
                json!({"user_id": "qu", "items": [
                    {"product_id": "p1", "unit_price": i64::MAX, "quantity": 2}]})
                .to_string(),
            ),
            ("missing product", item("product_id", Value::Null)),
            ("empty product", item("product_id", json!(""))),
            ("control character", item("merchant_id", json!("a\u{1}b"))),
            ("unknown item field", item("color", json!("red"))),
            (
                "unknown field",
                json!({"user_id": "qu", "items": [line], "x": 1}).to_string(),
            ),
            (
                "bad user",
                json!({"user_id": "a b", "items": [line]}).to_string(),
            ),
            ("no user (dev mode)", json!({"items": [line]}).to_string()),
            (
                "total overflow",
                json!({"user_id": "qu", "items": [
                    {"product_id": "a", "unit_price": i64::MAX / 2, "quantity": 1},
                    {"product_id": "b", "unit_price": i64::MAX / 2, "quantity": 1},
                    {"product_id": "c", "unit_price": 2, "quantity": 1}]})
                .to_string(),
            ),
        ] {
            let (s, v) = call(app, "POST", "/v1/checkout/quote", body).await;
            assert_eq!(
                (s, v["error"].as_str()),
                (400, Some("bad_request")),
                "{name}: {v}"
            );
        }
        let (s, _) = get(app, "/v1/checkout/quote").await;
        assert_eq!(s, 405);
    }

    /// A batch created on one instance reaches another instance's product index through the
    /// batch-change broadcast alone (its periodic refresh is an hour away), and so does a
    /// pause.
    pub async fn broadcast_keeps_other_instances_fresh<B: Backend>(g: &Gw<B>) {
        let _wd = Watchdog::arm(Duration::from_secs(60));
        let mut cfg = (*g.cfg).clone();
        cfg.cache.refresh_ms = 3_600_000;
        let other =
            claimgate::gateway::assemble(Arc::new(cfg), g.backend.clone(), g.db.clone(), None);
        let stop = CancellationToken::new();
        let loops = claimgate::gateway::spawn_background(&other, stop.clone());
        // the loops' start (warm-up, first refresh and definition check) is over
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, v) = get(&other, "/v1/products/p1/batches").await;
        assert_eq!(v["batches"], json!([]));
        create(g, "bc-new", 10, 1, json!({})).await;
        step("created on the first instance");
        let seen = |want: Vec<&'static str>| {
            let other = other.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let (_, v) = get(&other, "/v1/products/p1/batches").await;
                    if ids(&v, "batches", "batch_id") == want {
                        return;
                    }
                    assert!(tokio::time::Instant::now() < deadline, "{v}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        seen(vec!["bc-new"]).await;
        let (s, _) = call(
            &g.app,
            "PATCH",
            "/v1/batches/bc-new",
            r#"{"state":"paused"}"#,
        )
        .await;
        assert_eq!(s, 200);
        seen(vec![]).await;
        step("paused everywhere");
        stop.cancel();
        for l in loops {
            let _ = tokio::time::timeout(Duration::from_secs(10), l).await;
        }
    }
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
        }
    )*};
}

on_both_backends!(
    product_lookup,
    listing,
    quote,
    broadcast_keeps_other_instances_fresh
);

/// A selective window filter reads at most `catalog.list_max_scan` rows per request: short
/// (even empty) pages with a cursor, and following the cursors finds every match once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selective_filter_scans_a_bounded_number_of_rows() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&[
        "catalog.list_max_page=2".into(),
        "catalog.list_default_page=2".into(),
        "catalog.list_max_scan=2".into(),
    ])
    .await;
    for i in 0..7 {
        let w = if i == 2 || i == 6 {
            window("2020-01-01T00:00:00Z", "2100-01-01T00:00:00Z")
        } else {
            window("2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z")
        };
        create(&g, &format!("sc-{i}"), 5, 1, json!({"claim_window": w})).await;
    }
    let mut found = Vec::new();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/batches?ends_after=2050-01-01T00:00:00Z&cursor={c}"),
            None => "/v1/batches?ends_after=2050-01-01T00:00:00Z".to_string(),
        };
        let (s, v) = get(&g.app, &path).await;
        assert_eq!(s, 200, "{v}");
        let page = ids(&v, "batches", "id");
        pages.push(page.len());
        found.extend(page);
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(found, ["sc-2", "sc-6"]);
    // 7 rows, 2 per request: at least 4 requests, some of them short
    assert!(pages.len() >= 4 && pages.contains(&0), "{pages:?}");
    let (s, v) = get(&g.app, "/v1/batches?limit=3").await;
    assert_eq!((s, v["error"].as_str()), (400, Some("bad_request")));
}

/// Listing is admin-only when an admin token is configured; the product lookup stays
/// public; the quote is the token's user's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_listing_is_admin_lookup_is_public_quote_is_the_users() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let admin = "an-admin-token-of-some-length";
    let secret = "0123456789abcdef0123456789abcdef";
    let g = embedded_gw_with(&[
        format!("auth.admin_token=\"{admin}\""),
        format!("auth.user_token_secret=\"{secret}\""),
    ])
    .await;
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];
    let (s, v) = request(
        &g.app,
        "POST",
        "/v1/batches",
        &bearer(admin),
        batch_json("au", 5, 1, json!({})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(get(&g.app, "/v1/batches").await.0, 401);
    let (s, v) = request(
        &g.app,
        "GET",
        "/v1/batches",
        &bearer("wrong-token-xxxxxxxx"),
        "",
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (401, Some("unauthorized")));
    let (s, v) = request(&g.app, "GET", "/v1/batches", &bearer(admin), "").await;
    assert_eq!((s, ids(&v, "batches", "id")), (200, vec!["au".to_string()]));
    let (s, v) = get(&g.app, "/v1/products/p1/batches").await;
    assert_eq!(
        (s, ids(&v, "batches", "batch_id")),
        (200, vec!["au".to_string()])
    );

    let token = |sub: &str| {
        let t = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": sub, "exp": 4_102_444_800u64}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        bearer(&t)
    };
    let items = json!([{"product_id": "p1", "unit_price": 20000, "quantity": 1}]);
    let (s, v) = request(&g.app, "POST", "/v1/batches/au/claims", &token("ua"), "{}").await;
    assert_eq!(s, 201, "{v}");
    persist_wallet(&g, "ua", 1).await;
    let body = json!({"items": items}).to_string();
    let (s, q) = request(
        &g.app,
        "POST",
        "/v1/checkout/quote",
        &token("ua"),
        body.clone(),
    )
    .await;
    assert_eq!((s, q["user_id"].as_str()), (200, Some("ua")), "{q}");
    assert_eq!(q["best"]["discount"], 500);
    // another user's token sees their own (empty) wallet; a disagreeing body user is refused
    let (_, q) = request(
        &g.app,
        "POST",
        "/v1/checkout/quote",
        &token("ub"),
        body.clone(),
    )
    .await;
    assert_eq!(q["best"]["discount"], 0);
    let theirs = json!({"user_id": "ua", "items": items}).to_string();
    let (s, _) = request(&g.app, "POST", "/v1/checkout/quote", &token("ub"), theirs).await;
    assert_eq!(s, 401);
    assert_eq!(
        call(&g.app, "POST", "/v1/checkout/quote", body).await.0,
        401
    );
}
