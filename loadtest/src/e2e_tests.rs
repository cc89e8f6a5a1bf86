//! End-to-end tests: whole invocations (`app::execute`) against the in-process fake
//! gateway of `testserver.rs`, over real loopback TCP connections.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tokio::sync::watch;

use crate::app::{self, Outcome, UsageError};
use crate::cli::Cli;
use crate::history::ClaimRecord;
use crate::testserver::{self, Options};

fn cli(url: &str, args: &[&str]) -> Cli {
    let mut all = vec!["claimgate-loadtest", "--quiet", "--url", url];
    all.extend_from_slice(args);
    Cli::parse_from(all)
}

async fn run(cli: Cli) -> (anyhow::Result<Outcome>, String) {
    let (_tx, rx) = watch::channel(false);
    let mut out = Vec::new();
    let r = app::execute(cli, rx, &mut out).await;
    (r, String::from_utf8_lossy(&out).into_owned())
}

async fn run_ok(cli: Cli) -> (Outcome, String) {
    let (r, out) = run(cli).await;
    match r {
        Ok(o) => (o, out),
        Err(e) => panic!("run failed: {e:#}\n{out}"),
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "claimgate-loadtest-e2e-{}-{name}",
        std::process::id()
    ))
}

fn last_line(out: &str) -> &str {
    out.lines().last().unwrap_or_default()
}

#[tokio::test]
async fn trivial_closed_loop() {
    let gw = testserver::start(Options::default()).await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "trivial",
            "--connections",
            "4",
            "--requests",
            "200",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.requests, 200);
    assert_eq!(s.by_outcome["GET healthz 200"], 200);
    assert_eq!(s.errors, 0);
    assert_eq!(s.connections_opened, 4);
    assert_eq!(s.reconnects, 0);
    assert!(s.rps > 0.0);
    assert!(s.latency_ms.p50 > 0.0 && s.latency_ms.max >= s.latency_ms.p99);
    assert!(out.contains("requests/s"), "{out}");
    assert!(s.verify.is_none());
}

#[tokio::test]
async fn flash_sale_sells_out_and_verifies() {
    let gw = testserver::start(Options::default()).await;
    let json_path = temp_path("flash.json");
    let history_path = temp_path("flash.jsonl");
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--users",
            "50",
            "--stock",
            "20",
            "--requests",
            "100",
            "--connections",
            "8",
            "--seed",
            "3",
            "--verify",
            "--json",
            json_path.to_str().expect("utf8"),
            "--history",
            history_path.to_str().expect("utf8"),
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.batch_id.as_deref(), Some("lt-3"));
    assert_eq!(s.claims_ok, 20);
    assert_eq!(s.by_outcome["201"], 20);
    // 50 users claim once each, then again: 30 sold out in round one, 50 in round two
    // (limit_reached for the 20 winners is answered before sold_out).
    assert_eq!(
        s.by_outcome["410 sold_out"] + s.by_outcome["409 limit_reached"],
        80
    );
    assert_eq!(o.failed_checks, 0, "{out}");
    assert_eq!(last_line(&out), "6 passed, 0 failed", "{out}");
    assert!(out.contains("PASS sold out when demand > stock"), "{out}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json")).expect("parse");
    for key in [
        "requests",
        "elapsed_s",
        "rps",
        "claims_ok",
        "claims_per_s",
        "by_outcome",
        "latency_ms",
        "errors",
    ] {
        assert!(json.get(key).is_some(), "missing {key}: {json}");
    }
    assert_eq!(json["claims_ok"], 20);
    assert_eq!(json["verify"]["failed"], 0);
    let history = std::fs::read_to_string(&history_path).expect("history");
    let records: Vec<ClaimRecord> = history
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert_eq!(records.len(), 100);
    assert!(records.iter().all(|r| r.recv_us >= r.send_us));
    assert_eq!(records.iter().filter(|r| r.status == Some(201)).count(), 20);
    let _ = std::fs::remove_file(json_path);
    let _ = std::fs::remove_file(history_path);
}

#[tokio::test]
async fn retries_get_one_coupon_per_request_id() {
    let gw = testserver::start(Options::default()).await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "retries",
            "--copies",
            "4",
            "--users",
            "30",
            "--stock",
            "100",
            "--requests",
            "80",
            "--connections",
            "8",
            "--verify",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.claims_ok, 20, "one 201 per request id");
    assert_eq!(s.by_outcome["200"], 60, "the other copies are replays");
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(
        out.contains("PASS replays consistent: 60 replays (200), 60 matched"),
        "{out}"
    );
}

#[tokio::test]
async fn bad_replays_are_caught() {
    let gw = testserver::start(Options {
        bad_replays: true,
        ..Options::default()
    })
    .await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "retries",
            "--copies",
            "2",
            "--users",
            "10",
            "--requests",
            "20",
            "--connections",
            "2",
            "--verify",
        ],
    ))
    .await;
    assert!(o.failed_checks > 0, "{out}");
    assert!(out.contains("FAIL replays consistent"), "{out}");
    assert!(last_line(&out).ends_with(&format!("{} failed", o.failed_checks)));
}

#[tokio::test]
async fn oversell_is_caught() {
    let gw = testserver::start(Options {
        oversell: true,
        ..Options::default()
    })
    .await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--users",
            "30",
            "--stock",
            "10",
            "--requests",
            "30",
            "--connections",
            "4",
            "--verify",
        ],
    ))
    .await;
    assert_eq!(o.summary.claims_ok, 30);
    assert!(o.failed_checks >= 1, "{out}");
    assert!(out.contains("FAIL issued <= stock"), "{out}");
}

#[tokio::test]
async fn hot_users_hit_the_per_user_limit() {
    let gw = testserver::start(Options::default()).await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "hot-users",
            "--users",
            "100",
            "--bots",
            "2",
            "--bot-fraction",
            "0.3",
            "--per-user-limit",
            "2",
            "--requests",
            "300",
            "--connections",
            "6",
            "--verify",
        ],
    ))
    .await;
    let s = &o.summary;
    assert!(s.by_outcome["409 limit_reached"] > 90, "{:?}", s.by_outcome);
    assert!(s.claims_ok <= 200);
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(out.contains("at most 2 each (limit 2)"), "{out}");
}

#[tokio::test]
async fn mixed_reads_with_admin_token() {
    let gw = testserver::start(Options {
        admin_token: Some("adm".into()),
        ..Options::default()
    })
    .await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "mixed",
            "--read-fraction",
            "0.5",
            "--requests",
            "200",
            "--admin-token",
            "adm",
            "--verify",
        ],
    ))
    .await;
    let s = &o.summary;
    let reads = s.by_outcome["GET batch 200"];
    assert!((60..140).contains(&reads), "{:?}", s.by_outcome);
    assert_eq!(s.claims, 200 - reads);
    assert_eq!(o.failed_checks, 0, "{out}");

    // Without the token the batch cannot be created.
    let (r, _) = run(cli(&gw.url, &["--seed", "9", "--requests", "5"])).await;
    let msg = format!("{:#}", r.expect_err("unauthorized"));
    assert!(msg.contains("--admin-token"), "{msg}");
}

#[tokio::test]
async fn sold_out_scenario_drains_first() {
    let gw = testserver::start(Options::default()).await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "sold-out",
            "--stock",
            "5",
            "--requests",
            "50",
            "--verify",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.claims_ok, 0);
    assert_eq!(s.by_outcome["410 sold_out"], 50);
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(
        out.contains("issued 5 (admin API), 5 distinct coupons"),
        "{out}"
    );
}

#[tokio::test]
async fn reconnects_after_server_closes() {
    let gw = testserver::start(Options {
        close_every: Some(3),
        ..Options::default()
    })
    .await;
    let (o, _) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "trivial",
            "--connections",
            "4",
            "--requests",
            "120",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.by_outcome["GET healthz 200"], 120, "{s:?}");
    assert_eq!(s.errors, 0, "{s:?}");
    assert!(s.reconnects >= 30, "{s:?}");
}

#[tokio::test]
async fn timeouts_are_counted_not_fatal() {
    let gw = testserver::start(Options {
        delay: Duration::from_millis(300),
        ..Options::default()
    })
    .await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "trivial",
            "--connections",
            "2",
            "--requests",
            "4",
            "--timeout-ms",
            "50",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.requests, 4);
    assert_eq!(s.errors, 4);
    assert_eq!(s.transport_errors["timeout"], 4);
    assert!(out.contains("transport errors      4 (timeout 4)"), "{out}");
}

#[tokio::test]
async fn open_loop_against_real_sockets() {
    let gw = testserver::start(Options::default()).await;
    let (o, _) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "trivial",
            "--connections",
            "4",
            "--rate",
            "200",
            "--duration",
            "500ms",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.mode, "open");
    assert_eq!(s.requests, 100);
    assert_eq!(s.unsent, 0);
    assert!(s.elapsed_s >= 0.49 && s.elapsed_s < 1.0, "{}", s.elapsed_s);
}

#[tokio::test]
async fn open_loop_exposes_queueing() {
    // 1 connection, 50 ms per answer, 100 req/s: the queue grows by 40 ms per request,
    // which an open-loop tester must report (a closed-loop one would say 50 ms).
    let gw = testserver::start(Options {
        delay: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let (o, _) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "trivial",
            "--connections",
            "1",
            "--rate",
            "100",
            "--requests",
            "10",
        ],
    ))
    .await;
    let l = o.summary.latency_ms;
    assert!(l.max > 300.0, "{l:?}");
    assert!(l.p50 > 150.0, "{l:?}");
}

#[tokio::test]
async fn user_tokens() {
    let gw = testserver::start(Options {
        user_secret: Some("k1".into()),
        ..Options::default()
    })
    .await;
    let (o, _) = run_ok(cli(
        &gw.url,
        &[
            "--requests",
            "20",
            "--user-token-secret",
            "k1",
            "--stock",
            "10",
        ],
    ))
    .await;
    assert_eq!(o.summary.claims_ok, 10);
    let (o, _) = run_ok(cli(
        &gw.url,
        &[
            "--requests",
            "20",
            "--user-token-secret",
            "wrong",
            "--seed",
            "2",
        ],
    ))
    .await;
    assert_eq!(o.summary.by_outcome["401 unauthorized"], 20);
}

#[tokio::test]
async fn existing_batch_is_reused_and_shared() {
    let gw = testserver::start(Options::default()).await;
    let _ = run_ok(cli(
        &gw.url,
        &["--seed", "5", "--stock", "10", "--requests", "4"],
    ))
    .await;
    // Same seed again: the batch exists.
    let (r, _) = run(cli(&gw.url, &["--seed", "5", "--requests", "4"])).await;
    let msg = format!("{:#}", r.expect_err("exists"));
    assert!(
        msg.contains("already exists") && msg.contains("--batch lt-5"),
        "{msg}"
    );
    // Reuse it (another seed: fresh users).
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--seed",
            "6",
            "--batch",
            "lt-5",
            "--requests",
            "20",
            "--verify",
        ],
    ))
    .await;
    assert_eq!(o.summary.claims_ok, 6);
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(
        out.contains("PASS issued >= coupons seen: issued 10, distinct coupons in answers 6"),
        "{out}"
    );
    // A batch that does not exist.
    let (r, _) = run(cli(&gw.url, &["--batch", "nope", "--requests", "1"])).await;
    assert!(format!("{:#}", r.expect_err("missing")).contains("not found"));
}

#[tokio::test]
async fn refuses_non_local_targets_and_unreachable_gateways() {
    let (r, _) = run(cli("http://example.com:8080", &["--requests", "1"])).await;
    let e = r.expect_err("refused");
    assert!(e.downcast_ref::<UsageError>().is_some(), "{e:#}");
    assert!(format!("{e}").contains("only 127.0.0.1, localhost"));

    // A port nobody listens on (bound then released).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let (r, _) = run(cli(
        &format!("http://127.0.0.1:{port}"),
        &["--requests", "1"],
    ))
    .await;
    let e = r.expect_err("unreachable");
    assert!(e.downcast_ref::<UsageError>().is_none());
    assert!(format!("{e:#}").contains("cannot connect"), "{e:#}");
}

#[tokio::test]
async fn verifies_persistence_in_sqlite() {
    let path = temp_path("persist.db");
    let _ = std::fs::remove_file(&path);
    let url = format!("sqlite://{}", path.display());
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::from_str(&url)
                .expect("url")
                .create_if_missing(true),
        )
        .await
        .expect("db");
    sqlx::query("CREATE TABLE coupons (coupon_id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("table");
    let gw = testserver::start(Options {
        db: Some(pool.clone()),
        ..Options::default()
    })
    .await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--users",
            "40",
            "--stock",
            "25",
            "--requests",
            "60",
            "--verify",
            "--database-url",
            &url,
            "--drain-timeout",
            "2s",
        ],
    ))
    .await;
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(
        out.contains("PASS persisted exactly once: all 25 acknowledged coupons"),
        "{out}"
    );
    assert_eq!(last_line(&out), "7 passed, 0 failed");

    pool.close().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn lost_coupons_fail_the_persistence_check() {
    let path = temp_path("lost.db");
    let _ = std::fs::remove_file(&path);
    let url = format!("sqlite://{}", path.display());
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::from_str(&url)
                .expect("url")
                .create_if_missing(true),
        )
        .await
        .expect("db");
    sqlx::query("CREATE TABLE coupons (coupon_id TEXT PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("table");
    let gw = testserver::start(Options {
        db: Some(pool.clone()),
        lose_first_coupon: true,
        ..Options::default()
    })
    .await;
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--users",
            "10",
            "--stock",
            "5",
            "--requests",
            "10",
            "--verify",
            "--database-url",
            &url,
            "--drain-timeout",
            "700ms",
        ],
    ))
    .await;
    assert_eq!(o.failed_checks, 1, "{out}");
    assert!(
        out.contains("FAIL persisted exactly once: 1 of 5 acknowledged coupons missing"),
        "{out}"
    );
    assert_eq!(last_line(&out), "6 passed, 1 failed");
    pool.close().await;
    let _ = std::fs::remove_file(&path);
}
