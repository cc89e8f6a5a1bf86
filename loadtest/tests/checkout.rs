//! The checkout scenario against a real gateway: an embedded-backend claimgate (SQLite
//! database, persister on) started in-process on a free port, driven for about 1.5 s by
//! `app::execute` with `--verify`. Checks that the figures add up (every claim starts a
//! checkout, every checkout reads its wallet and ends in a lock+redeem pair) and that the
//! wallet check passes.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use claimgate_loadtest::app;
use claimgate_loadtest::cli::Cli;
use clap::Parser;
use tokio::sync::watch;

/// The gateway and the run are bounded: a hang fails the test instead of blocking it.
const LIMIT: Duration = Duration::from_secs(120);

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "claimgate-loadtest-checkout-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_scenario_against_an_embedded_gateway() {
    let dir = temp_dir();
    let overrides: Vec<String> = vec![
        "backend=\"embedded\"".into(),
        "server.listen=\"127.0.0.1:0\"".into(),
        format!("database.url=\"sqlite://{}/gw.db?mode=rwc\"", dir.display()),
        format!("embedded.aof_path=\"{}/gw.aof\"", dir.display()),
        "limits.claim_per_user.per_second=0".into(),
        "persister.flush_interval_ms=5".into(),
    ];
    let cfg = claimgate::config::load(None, Vec::new(), &overrides).expect("config");
    let gw = claimgate::gateway::start(cfg).await.expect("gateway");
    let url = format!("http://{}", gw.local_addr());
    let stop = gw.shutdown_token();
    let served = tokio::spawn(gw.run());

    let json = dir.join("checkout.json");
    let cli = Cli::parse_from([
        "claimgate-loadtest",
        "--quiet",
        "--url",
        &url,
        "--scenario",
        "checkout",
        "--connections",
        "4",
        "--duration",
        "1500ms",
        "--wallet-reads",
        "2",
        "--verify",
        "--json",
        json.to_str().expect("utf8"),
    ]);
    let (_tx, rx) = watch::channel(false);
    let mut out = Vec::new();
    let result = tokio::time::timeout(LIMIT, app::execute(cli, rx, &mut out))
        .await
        .expect("the run ends in time");
    let out = String::from_utf8_lossy(&out).into_owned();
    let o = match result {
        Ok(o) => o,
        Err(e) => panic!("run failed: {e:#}\n{out}"),
    };
    stop.cancel();
    tokio::time::timeout(LIMIT, served)
        .await
        .expect("the gateway stops in time")
        .expect("gateway task");

    let s = &o.summary;
    let c = s.checkout.as_ref().expect("checkout figures");
    assert!(c.checkouts >= 10, "a few checkouts at least: {out}");
    // Every checkout claims once and gets a coupon (stock 1,000,000, fresh users).
    assert_eq!(s.claims, c.checkouts, "{out}");
    assert_eq!(s.claims_ok, c.checkouts, "{out}");
    // Every checkout reads its wallet twice, then locks and redeems for a fresh order.
    assert_eq!(c.wallet_reads, 2 * c.checkouts, "{out}");
    assert_eq!(c.lock_redeem_pairs, c.checkouts, "{out}");
    assert_eq!((c.lock_gave_up, c.conflicts_409), (0, 0), "{out}");
    assert_eq!(s.by_outcome["GET wallet 200"], c.wallet_reads, "{out}");
    assert_eq!(s.by_outcome["POST lock 200"], c.lock_redeem_pairs, "{out}");
    assert_eq!(
        s.by_outcome["POST redeem 200"], c.lock_redeem_pairs,
        "{out}"
    );
    // The not-yet-persisted answers are counted apart and are not errors.
    assert_eq!(
        s.by_outcome
            .get("POST lock 404 coupon_not_found")
            .copied()
            .unwrap_or(0),
        c.lock_not_persisted_404,
        "{out}"
    );
    assert_eq!(s.unexpected, 0, "{out}");
    assert_eq!(
        s.requests,
        c.checkouts * 5 + c.lock_not_persisted_404,
        "claim + 2 reads + lock + redeem per checkout, plus lock retries: {out}"
    );
    // Rates of the same run, over the same elapsed time.
    let per_s = |n: u64| n as f64 / s.elapsed_s;
    assert!((c.claims_per_s - s.claims_per_s).abs() < 1e-9, "{out}");
    assert!(
        (c.wallet_reads_per_s - per_s(c.wallet_reads)).abs() < 0.01 * c.wallet_reads_per_s + 0.01
    );
    assert!(c.lock_redeem_pairs_per_s > 0.0, "{out}");
    for step in ["claim", "wallet", "lock", "redeem"] {
        let l = &c.latency_ms[step];
        assert!(l.p50 > 0.0 && l.p99 >= l.p50, "{step}: {l:?}");
    }
    // The verifier read the wallets: claimed coupons are their users', redeemed ones used.
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(
        out.contains("PASS claimed coupons in their owners' wallets"),
        "{out}"
    );
    assert!(out.contains("PASS redeemed coupons used"), "{out}");
    assert!(out.contains("lock+redeem pairs/s"), "{out}");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    for key in [
        "wallet_reads_per_s",
        "lock_redeem_pairs_per_s",
        "lock_not_persisted_404",
        "claims_per_s",
    ] {
        assert!(
            v["checkout"].get(key).is_some(),
            "missing checkout.{key}: {v}"
        );
    }
    assert!(
        v["checkout"]["latency_ms"]["lock"]["p99"].is_number(),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
