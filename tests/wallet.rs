//! Read-your-writes (issue 10 items 1 and 6): a coupon is in its owner's wallet, and can be
//! locked, redeemed, released and refunded, as soon as its claim returned 201, on every
//! backend (Redis, the embedded default, a Redis Cluster), and while the database is behind
//! or down; the database then follows, every change exactly once.
//!
//! Invariants checked here:
//! - right after a 201, with no persister running (the database knows nothing yet), the
//!   wallet lists the coupon and every transition of the state machine works on it; illegal
//!   ones are refused 409 `invalid_state`; repeats by the same order are answered, not
//!   written again;
//! - of 16 orders racing to lock one coupon exactly one wins, on its shard, and exactly one
//!   `locked` event reaches the database;
//! - once the persister runs, the database holds the coupon's final state and one event per
//!   change, with the ids the database's own transitions would give them;
//! - a lock not confirmed in time reads released at once, and the sweeper releases it on the
//!   shard (event `released`, cause `lock_timeout`), whichever gateway took it;
//! - with the database unreachable, claims, transitions and the wallet (marked partial) go on;
//!   when it is back, everything reaches it once;
//! - a cached wallet page never hides a change (the hot wallet is served from memory).

#[path = "support/proxy.rs"]
mod proxy;
mod support;

use std::sync::Arc;
use std::time::Duration;

use claimgate::backend::Backend;
use claimgate::backend::redis::RedisBackend;
use claimgate::config::RedisConfig;
use claimgate::store::{CouponState, Db};
use serde_json::{Value, json};
use support::gw::{self, Gw, act, call, claim, cluster_gw, create, persist_until};
use support::watchdog::{Watchdog, step};
use support::{PgDb, RedisServer};

fn coupon(v: &Value) -> String {
    v["coupon_id"].as_str().unwrap_or_default().to_string()
}

/// The wallet of `user` (`query` e.g. `?status=locked`): the coupon ids and states.
async fn wallet<B: Backend>(g: &Gw<B>, user: &str, query: &str) -> (Vec<(String, String)>, Value) {
    let (s, v) = call(
        &g.app,
        "GET",
        &format!("/v1/users/{user}/coupons{query}"),
        "",
    )
    .await;
    assert_eq!(s, 200, "wallet: {v}");
    let list = v["coupons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                coupon(c),
                c["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    (list, v)
}

/// The kinds of a coupon's events in the database, in order.
async fn db_events(db: &Db, id: &str) -> Vec<String> {
    db.coupon_events(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

pub mod cases {
    use super::*;

    /// Claim, then at once: the wallet, and every transition and refusal; then the
    /// database follows with one event per change.
    pub async fn usable_at_once<B: Backend>(g: &Gw<B>) {
        create(g, "rw", 10, 1, json!({})).await;
        let (s, v) = claim(&g.app, "rw", "u1", Some("r1")).await;
        assert_eq!(s, 201, "{v}");
        let id = coupon(&v);
        step("the wallet right after the claim");
        assert!(
            g.db.get_coupon(&id).await.unwrap().is_none(),
            "no persister ran"
        );
        let (list, page) = wallet(g, "u1", "").await;
        assert_eq!(list, vec![(id.clone(), "unused".to_string())]);
        let shown = &page["coupons"][0];
        assert_eq!(
            (
                &shown["batch_name"],
                &shown["discount"]["kind"],
                &shown["scope"]["kind"]
            ),
            (&json!("test batch"), &json!("threshold"), &json!("all")),
            "the batch's display fields: {shown}"
        );
        assert!(shown["valid_to"].is_string() && shown["exclusive"] == false);
        let (list, _) = wallet(g, "u1", "?status=unused").await;
        assert_eq!(list.len(), 1);

        step("transitions before the database knows the coupon");
        let (s, v) = act(g, &id, "lock", "o1").await;
        assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{v}");
        assert!(v["lock_expires_at"].is_string(), "{v}");
        let (list, _) = wallet(g, "u1", "?status=locked").await;
        assert_eq!(list, vec![(id.clone(), "locked".to_string())]);
        assert!(wallet(g, "u1", "?status=unused").await.0.is_empty());
        let (s, v) = act(g, &id, "lock", "o2").await;
        assert_eq!(
            (s, v["error"].as_str()),
            (409, Some("invalid_state")),
            "{v}"
        );
        let (s, v) = act(g, &id, "lock", "o1").await;
        assert_eq!(
            (s, v["state"].as_str()),
            (200, Some("locked")),
            "a repeat: {v}"
        );
        let (s, v) = act(g, &id, "redeem", "o2").await;
        assert_eq!(s, 409, "{v}");
        let (s, v) = act(g, &id, "redeem", "o1").await;
        assert_eq!((s, v["state"].as_str()), (200, Some("used")), "{v}");
        let (s, _) = act(g, &id, "redeem", "o1").await;
        assert_eq!(s, 200, "a repeated redeem is answered");
        let (s, v) = act(g, &id, "release", "o1").await;
        assert_eq!(s, 409, "a used coupon is not released: {v}");
        let (s, v) = act(g, &id, "refund", "o1").await;
        assert_eq!((s, v["state"].as_str()), (200, Some("unused")), "{v}");
        let (s, _) = act(g, &id, "refund", "o1").await;
        assert_eq!(s, 200, "a repeated refund is answered");
        let (s, v) = act(g, &id, "lock", "o3").await;
        assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{v}");
        let (s, v) = act(g, &id, "release", "o3").await;
        assert_eq!((s, v["state"].as_str()), (200, Some("unused")), "{v}");
        let (list, _) = wallet(g, "u1", "").await;
        assert_eq!(list, vec![(id.clone(), "unused".to_string())]);
        // ids that name no coupon: 404, never 503 (schemathesis found `f.0.0` answered 503)
        for nope in ["rw.0.999999", "nope.0.0", "rw.999.1"] {
            let (s, v) = act(g, nope, "lock", "o1").await;
            assert_eq!(
                (s, v["error"].as_str()),
                (404, Some("coupon_not_found")),
                "{nope}"
            );
        }

        step("the database follows, each change once");
        let want = [
            "claimed", "locked", "redeemed", "refunded", "locked", "released",
        ];
        persist_until(g, "every change", async || {
            db_events(&g.db, &id).await.len() >= want.len()
        })
        .await;
        assert_eq!(db_events(&g.db, &id).await, want);
        let (log, outbox) = (
            g.db.coupon_events(&id).await.unwrap(),
            g.db.coupon_outbox(&id).await.unwrap(),
        );
        let ids: Vec<&str> = log.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(
            ids[1..],
            [
                format!("{id}:locked:1"),
                format!("{id}:redeemed:2"),
                format!("{id}:refunded:3"),
                format!("{id}:locked:4"),
                format!("{id}:released:5"),
            ]
        );
        assert_eq!(outbox.len(), want.len(), "one outbox row per event");
        let row = g.db.get_coupon(&id).await.unwrap().unwrap();
        assert_eq!(
            (row.state, row.order_id.as_deref()),
            (CouponState::Unused, Some("o3"))
        );
        // the wallet agrees after the database caught up (and after the cache of it)
        let (list, _) = wallet(g, "u1", "").await;
        assert_eq!(list, vec![(id.clone(), "unused".to_string())]);
    }

    /// 16 orders race to lock one coupon just claimed: exactly one wins, one `locked` event.
    pub async fn sixteen_orders_race<B: Backend>(g: &Gw<B>) {
        create(g, "race", 10, 1, json!({})).await;
        let (s, v) = claim(&g.app, "race", "u1", None).await;
        assert_eq!(s, 201, "{v}");
        let id = coupon(&v);
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (app, id) = (g.app.clone(), id.clone());
                tokio::spawn(async move {
                    call(
                        &app,
                        "POST",
                        &format!("/v1/coupons/{id}/lock"),
                        json!({ "order_id": format!("o{i}") }).to_string(),
                    )
                    .await
                })
            })
            .collect();
        let mut won = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let (s, v) = t.await.unwrap();
            match s {
                200 => won.push(i),
                409 => assert_eq!(v["error"], "invalid_state", "{v}"),
                other => panic!("order o{i}: {other} {v}"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one order locks: {won:?}");
        persist_until(g, "the lock", async || {
            db_events(&g.db, &id).await.len() >= 2
        })
        .await;
        assert_eq!(db_events(&g.db, &id).await, ["claimed", "locked"]);
        let row = g.db.get_coupon(&id).await.unwrap().unwrap();
        assert_eq!(row.order_id, Some(format!("o{}", won[0])));
    }

    /// A lock not confirmed in time reads released at once; the sweeper releases it on the
    /// shard, and the database gets `released` with cause `lock_timeout`, once.
    pub async fn lock_timeout<B: Backend>(g: &Gw<B>) {
        create(g, "lt", 10, 1, json!({})).await;
        let (_, v) = claim(&g.app, "lt", "u1", None).await;
        let id = coupon(&v);
        let (s, v) = act(g, &id, "lock", "o1").await;
        assert_eq!(s, 200, "{v}");
        persist_until(g, "the lock", async || {
            db_events(&g.db, &id).await.len() >= 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(g.cfg.wallet.lock_timeout_ms + 50)).await;
        let (list, _) = wallet(g, "u1", "").await;
        assert_eq!(
            list,
            vec![(id.clone(), "unused".to_string())],
            "lapsed at once"
        );
        step("the managed sweep");
        let now = g.app.api().clock().now_ms();
        let (expired, released) =
            claimgate::notify::sweep_managed(&g.db, g.app.api().coupons(), &g.cfg.events, now)
                .await
                .unwrap();
        assert_eq!((expired, released), (0, 1));
        // the database-side sweep leaves managed coupons alone
        let swept = g.db.sweep_coupons(now, 100, 0).await.unwrap();
        assert_eq!(swept.released, 0);
        persist_until(g, "the release", async || {
            db_events(&g.db, &id).await.len() >= 3
        })
        .await;
        assert_eq!(
            db_events(&g.db, &id).await,
            ["claimed", "locked", "released"]
        );
        let body = &g.db.coupon_outbox(&id).await.unwrap()[2].payload;
        assert!(body.contains("lock_timeout"), "{body}");
        // a second pass finds nothing due once the database caught up
        let (_, released) =
            claimgate::notify::sweep_managed(&g.db, g.app.api().coupons(), &g.cfg.events, now)
                .await
                .unwrap();
        assert_eq!(released, 0);
    }

    /// Expiry on the shard, at an injected instant (no sleeping): the sweep expires a
    /// managed coupon once its validity ended, the database gets `expired` once, and an
    /// expired coupon cannot be locked.
    pub async fn expiry<B: Backend>(g: &Gw<B>) {
        create(g, "ex", 10, 1, json!({})).await;
        let (_, v) = claim(&g.app, "ex", "u1", None).await;
        let id = coupon(&v);
        persist_until(g, "the claim", async || {
            g.db.get_coupon(&id).await.unwrap().is_some()
        })
        .await;
        let end = g.db.get_coupon(&id).await.unwrap().unwrap().valid_to;
        let sweep = async |now: i64| {
            claimgate::notify::sweep_managed(&g.db, g.app.api().coupons(), &g.cfg.events, now)
                .await
                .unwrap()
        };
        assert_eq!(sweep(end - 1).await, (0, 0), "not before its end");
        assert_eq!(sweep(end).await, (1, 0), "expired at its end");
        persist_until(g, "the expiry", async || {
            db_events(&g.db, &id).await.len() >= 2
        })
        .await;
        assert_eq!(db_events(&g.db, &id).await, ["claimed", "expired"]);
        assert_eq!(sweep(end + 1).await, (0, 0), "once");
        let (s, v) = act(g, &id, "lock", "o1").await;
        assert_eq!(
            (s, v["error"].as_str()),
            (409, Some("invalid_state")),
            "{v}"
        );
    }
}

const SHORT_LOCK: &str = "wallet.lock_timeout_ms=300";

macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                let _w = Watchdog::arm(Duration::from_secs(120));
                let g = gw::redis_gw_with(&[SHORT_LOCK.into()]).await;
                cases::$case(&g).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                let _w = Watchdog::arm(Duration::from_secs(120));
                let g = gw::embedded_gw_with(&[SHORT_LOCK.into()]).await;
                cases::$case(&g).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn cluster() {
                let _w = Watchdog::arm(Duration::from_secs(180));
                let g = cluster_gw_with_short_lock().await;
                cases::$case(&g).await;
            }
        }
    )*};
}

async fn cluster_gw_with_short_lock() -> Gw<RedisBackend> {
    // the cluster gateway takes no overrides: its config is changed in place
    let mut g = cluster_gw().await;
    let mut cfg = (*g.cfg).clone();
    cfg.wallet.lock_timeout_ms = 300;
    let cfg = Arc::new(cfg);
    g.app = claimgate::gateway::assemble(cfg.clone(), g.backend.clone(), g.db.clone(), None);
    g.cfg = cfg;
    g
}

on_every_backend!(usable_at_once, sixteen_orders_race, lock_timeout, expiry);

/// With the database unreachable: claims, every transition and the wallet (partial) go on;
/// back, the database gets every claim and change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_with_the_database_down() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let pg = PgDb::create();
    let proxy = proxy::FaultProxy::start(proxy::pg_addr(&pg.url).await).await;
    let db = Db::connect(&claimgate::config::DatabaseConfig {
        url: proxy::proxied(&pg.url, proxy.port),
        connect_timeout_ms: 500,
        ..Default::default()
    })
    .await
    .unwrap();
    db.migrate().await.unwrap();
    let redis = RedisServer::start();
    let backend = Arc::new(
        RedisBackend::connect(&RedisConfig {
            url: redis.url(),
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    let cfg = Arc::new(gw::config(&[format!("redis.url=\"{}\"", redis.url())]));
    let app = claimgate::gateway::assemble(cfg.clone(), backend.clone(), db.clone(), None);
    let g = Gw::from_parts(app, backend, db, cfg);
    create(&g, "down", 10, 5, json!({})).await;
    let (s, v) = claim(&g.app, "down", "u1", None).await;
    assert_eq!(s, 201, "{v}");
    let before = coupon(&v);
    // the wallet is read (and cached) with the database up
    assert_eq!(wallet(&g, "u1", "").await.0.len(), 1);

    step("the database goes away");
    proxy.cut();
    let (s, v) = claim(&g.app, "down", "u1", None).await;
    assert_eq!(s, 201, "claims go on: {v}");
    let during = coupon(&v);
    let (s, v) = act(&g, &during, "lock", "o1").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{v}");
    let (s, v) = act(&g, &before, "lock", "o2").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{v}");
    let (s, v) = act(&g, &during, "redeem", "o1").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("used")), "{v}");
    tokio::time::sleep(Duration::from_millis(g.cfg.wallet.cache_ms + 10)).await;
    let (list, page) = wallet(&g, "u1", "").await;
    assert_eq!(page["partial"], true, "{page}");
    let mut list = list;
    list.sort();
    let mut want = vec![
        (before.clone(), "locked".to_string()),
        (during.clone(), "used".to_string()),
    ];
    want.sort();
    assert_eq!(list, want, "both coupons, as they are now");

    step("the database is back");
    proxy.restore();
    persist_until(&g, "the claims and changes", async || {
        db_events(&g.db, &during).await.len() >= 3 && db_events(&g.db, &before).await.len() >= 2
    })
    .await;
    assert_eq!(
        db_events(&g.db, &during).await,
        ["claimed", "locked", "redeemed"]
    );
    assert_eq!(db_events(&g.db, &before).await, ["claimed", "locked"]);
    let (list, page) = wallet(&g, "u1", "").await;
    assert!(page.get("partial").is_none(), "{page}");
    assert_eq!(list.len(), 2);
    drop(redis);
}

/// A cached wallet page never hides a change: a claim and a lock made right after a read
/// (served from the cache within `wallet.cache_ms`) show in the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_wallet_page_never_hides_a_change() {
    let _w = Watchdog::arm(Duration::from_secs(60));
    let g = gw::embedded_gw_with(&["wallet.cache_ms=60000".into(), SHORT_LOCK.into()]).await;
    create(&g, "hot", 10, 5, json!({})).await;
    let (_, v) = claim(&g.app, "hot", "u1", None).await;
    let first = coupon(&v);
    persist_until(&g, "the claim", async || {
        g.db.get_coupon(&first).await.unwrap().is_some()
    })
    .await;
    assert_eq!(wallet(&g, "u1", "").await.0.len(), 1); // read and cached
    let (_, v) = claim(&g.app, "hot", "u1", None).await;
    let second = coupon(&v);
    let (s, _) = act(&g, &first, "lock", "o1").await;
    assert_eq!(s, 200);
    let (mut list, _) = wallet(&g, "u1", "").await;
    list.sort();
    let mut want = vec![
        (first.clone(), "locked".to_string()),
        (second.clone(), "unused".to_string()),
    ];
    want.sort();
    assert_eq!(list, want);
    // filters, cursors and page sizes are answered from the cached wallet at this instant
    assert_eq!(
        wallet(&g, "u1", "?status=unused").await.0,
        vec![(second.clone(), "unused".to_string())]
    );
    assert_eq!(
        wallet(&g, "u1", "?status=locked").await.0,
        vec![(first.clone(), "locked".to_string())]
    );
    let (one, page) = wallet(&g, "u1", "?limit=1").await;
    assert_eq!(one.len(), 1);
    let next = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let (rest, page) = wallet(&g, "u1", &format!("?limit=1&cursor={next}")).await;
    assert_eq!(rest.len(), 1);
    assert_ne!(rest[0].0, one[0].0);
    assert!(page["next_cursor"].is_null(), "{page}");
    // the lock lapses: the wallet shows the coupon unused from that instant
    tokio::time::sleep(Duration::from_millis(g.cfg.wallet.lock_timeout_ms + 20)).await;
    assert_eq!(wallet(&g, "u1", "?status=unused").await.0.len(), 2);
}

/// `wallet.recent_window_ms = 0` turns the wallet's read-your-writes off (one Redis call
/// less per claim): transitions still work at once, on the shard; the wallet lists a coupon
/// once the persister wrote it, with its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wallet_read_your_writes_can_be_turned_off() {
    let _w = Watchdog::arm(Duration::from_secs(60));
    let g = gw::embedded_gw_with(&[
        "wallet.recent_window_ms=0".into(),
        "wallet.cache_ms=0".into(),
    ])
    .await;
    create(&g, "off", 10, 5, json!({})).await;
    let (_, v) = claim(&g.app, "off", "u1", None).await;
    let id = coupon(&v);
    let (s, v) = act(&g, &id, "lock", "o1").await;
    assert_eq!((s, v["state"].as_str()), (200, Some("locked")), "{v}");
    assert!(
        wallet(&g, "u1", "").await.0.is_empty(),
        "not listed before the database has it"
    );
    persist_until(&g, "the claim and the lock", async || {
        db_events(&g.db, &id).await.len() >= 2
    })
    .await;
    assert_eq!(
        wallet(&g, "u1", "").await.0,
        vec![(id.clone(), "locked".to_string())]
    );
}

/// With Redis unreachable the wallet is the database's page alone (read fresh), not an
/// error: the database is the coupons' record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wallet_reads_the_database_alone_while_redis_is_down() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let mut g = gw::redis_gw_with(&["redis.command_timeout_ms=500".into()]).await;
    create(&g, "rd", 10, 5, json!({})).await;
    let (_, v) = claim(&g.app, "rd", "u1", None).await;
    let id = coupon(&v);
    persist_until(&g, "the claim", async || {
        g.db.get_coupon(&id).await.unwrap().is_some()
    })
    .await;
    step("redis goes away");
    g.redis.as_mut().unwrap().kill();
    let (list, page) = wallet(&g, "u1", "").await;
    assert_eq!(list, vec![(id, "unused".to_string())]);
    assert!(page.get("partial").is_none(), "{page}");
}
