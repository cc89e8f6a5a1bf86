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
use crate::history::{ClaimRecord, Phase};
use crate::outcome::Class;
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
    // Sold-out and limit answers are expected: nothing here is to look into.
    assert_eq!((s.expected, s.unexpected), (100, 0), "{out}");
    assert!(out.contains("100 expected, 0 unexpected"), "{out}");
    // Time to sell out: from the first request to the first sold_out answer.
    let so = s.sell_out.expect("the batch sold out");
    assert_eq!(so.phase, Phase::Measure);
    assert_eq!(so.claims_ok, 20);
    assert!(
        so.after_s > 0.0 && so.after_s <= s.elapsed_s,
        "{so:?} {s:?}"
    );
    assert!(
        (so.claims_per_s - 20.0 / so.after_s).abs() <= 0.01 * so.claims_per_s,
        "{so:?}"
    );
    assert!(
        so.claims_per_s >= s.claims_per_s,
        "{so:?} vs {}",
        s.claims_per_s
    );
    assert!(out.contains("claims/s while stock lasted"), "{out}");

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
    assert_eq!(json["unexpected"], 0);
    assert_eq!(json["by_class"]["expected"]["201"], 20);
    assert_eq!(json["sell_out"]["claims_ok"], 20);
    assert!(
        json["sell_out"]["after_s"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
    );
    let history = std::fs::read_to_string(&history_path).expect("history");
    let records: Vec<ClaimRecord> = history
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert_eq!(records.len(), 100);
    assert!(records.iter().all(|r| r.recv_us >= r.send_us));
    assert!(records.iter().all(|r| r.class == Class::Expected));
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
    assert_eq!(s.by_class.expected["200"], 60, "replays are expected");
    assert_eq!(s.unexpected, 0);
    assert!(s.sell_out.is_none(), "stock 100 never ran out");
    assert!(!out.contains("sold out after"), "{out}");
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
    assert!(msg.contains("CLAIMGATE_ADMIN_TOKEN"), "{msg}");
    assert_eq!(s.by_class.expected["GET batch 200"], reads);
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
    assert_eq!((s.expected, s.unexpected), (50, 0));
    assert_eq!(o.failed_checks, 0, "{out}");
    // The measured phase starts sold out: the sell-out figures are the drain's.
    let so = s.sell_out.expect("drained");
    assert_eq!(so.phase, Phase::Drain);
    assert_eq!(so.claims_ok, 5);
    assert!(out.contains("(drain phase): 5 claims ok"), "{out}");
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
    assert_eq!(s.unexpected, 4);
    assert_eq!(s.by_class.unexpected["transport:timeout"], 4);
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

/// Regression: a re-run with the same seed silently landed on the batch an earlier run had
/// claimed from (the gateway answers the identical re-create 201), so a flash sale
/// measured nothing but sold-out answers and `--verify` judged someone else's claims.
#[tokio::test]
async fn rerun_with_the_same_seed_gets_a_fresh_batch() {
    let gw = testserver::start(Options::default()).await;
    let first = [
        "--seed",
        "5",
        "--stock",
        "10",
        "--users",
        "20",
        "--requests",
        "4",
    ];
    let (o, _) = run_ok(cli(&gw.url, &first)).await;
    assert_eq!(o.summary.batch_id.as_deref(), Some("lt-5"));
    assert_eq!(o.summary.claims_ok, 4);
    assert!(o.summary.warnings.is_empty());

    // Same seed and flags again: lt-5 holds 4 claims, so a fresh batch is used.
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--seed",
            "5",
            "--stock",
            "10",
            "--users",
            "20",
            "--requests",
            "20",
            "--verify",
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.batch_id.as_deref(), Some("lt-5-2"), "{out}");
    assert_eq!(s.claims_ok, 10, "the whole stock of a fresh batch");
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    let w = &s.warnings[0];
    assert!(w.contains("lt-5 (claimed 4 of 10)"), "{w}");
    assert!(w.contains("fresh batch lt-5-2"), "{w}");
    assert!(w.contains("--batch lt-5 "), "{w}");
    assert!(
        out.contains("  warning: batch lt-5 (claimed 4 of 10)"),
        "{out}"
    );
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(out.contains("PASS issued == coupons seen"), "{out}");

    // Another stock under the same seed: lt-5 and lt-5-2 are both taken.
    let (o, _) = run_ok(cli(
        &gw.url,
        &["--seed", "5", "--stock", "7", "--requests", "3"],
    ))
    .await;
    assert_eq!(o.summary.batch_id.as_deref(), Some("lt-5-3"));
    let w = &o.summary.warnings[0];
    assert!(
        w.contains("lt-5 (another stock or per-user limit), lt-5-2 (another stock"),
        "{w}"
    );

    // Reusing on purpose (another seed: fresh users) needs --batch, and shares the batch.
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
    assert!(o.summary.warnings.is_empty(), "{:?}", o.summary.warnings);
    assert_eq!(o.failed_checks, 0, "{out}");
    assert!(
        out.contains("PASS issued >= coupons seen: issued 10, distinct coupons in answers 6"),
        "{out}"
    );
    // lt-5 is now drained: running a flash sale on it says so loudly.
    let (o, out) = run_ok(cli(
        &gw.url,
        &["--seed", "7", "--batch", "lt-5", "--requests", "5"],
    ))
    .await;
    assert_eq!(o.summary.claims_ok, 0);
    assert!(
        o.summary.warnings[0].contains("batch lt-5 has no stock left (claimed 10 of 10)"),
        "{:?}",
        o.summary.warnings
    );
    assert!(
        out.contains("warning: batch lt-5 has no stock left"),
        "{out}"
    );
    // A batch that does not exist.
    let (r, _) = run(cli(&gw.url, &["--batch", "nope", "--requests", "1"])).await;
    assert!(format!("{:#}", r.expect_err("missing")).contains("not found"));
}

/// Answers the workload makes correct are expected; server errors are not, and with
/// `--fail-on-unexpected` they set the exit status.
#[tokio::test]
async fn outcome_classes_in_table_json_and_history() {
    let gw = testserver::start(Options {
        fail_every: Some((7, 500, Some("internal"))),
        ..Options::default()
    })
    .await;
    let json_path = temp_path("classes.json");
    let history_path = temp_path("classes.jsonl");
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
            "4",
            "--json",
            json_path.to_str().expect("utf8"),
            "--history",
            history_path.to_str().expect("utf8"),
        ],
    ))
    .await;
    let s = &o.summary;
    assert_eq!(s.by_class.unexpected["500 internal"], 14, "{out}");
    assert_eq!(s.unexpected, 14);
    assert_eq!(s.expected, 86);
    assert_eq!(s.by_class.expected["201"], 20);
    assert!(s.by_class.expected["410 sold_out"] > 0, "{out}");
    assert!(!s.by_class.unexpected.contains_key("410 sold_out"));
    assert!(out.contains("86 expected, 14 unexpected"), "{out}");
    assert_eq!(
        app::exit_status(&Ok(o)),
        app::EXIT_OK,
        "outcomes alone keep status 0"
    );

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json")).expect("parse");
    assert_eq!(json["unexpected"], 14);
    assert_eq!(json["by_class"]["unexpected"]["500 internal"], 14);
    assert_eq!(json["by_class"]["expected"]["201"], 20);
    let records: Vec<ClaimRecord> = std::fs::read_to_string(&history_path)
        .expect("history")
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    let unexpected: Vec<&ClaimRecord> = records
        .iter()
        .filter(|r| r.class == Class::Unexpected)
        .collect();
    assert_eq!(unexpected.len(), 14);
    assert!(unexpected.iter().all(|r| r.status == Some(500)));
    assert!(
        records
            .iter()
            .filter(|r| r.status == Some(410))
            .all(|r| r.class == Class::Expected)
    );

    // --fail-on-unexpected: exit status 4.
    let (r, _) = run(cli(
        &gw.url,
        &["--seed", "2", "--requests", "14", "--fail-on-unexpected"],
    ))
    .await;
    assert_eq!(app::exit_status(&r), app::EXIT_UNEXPECTED);
    let _ = std::fs::remove_file(json_path);
    let _ = std::fs::remove_file(history_path);
}

#[tokio::test]
async fn shedding_is_expected_only_when_asked() {
    let gw = testserver::start(Options {
        fail_every: Some((5, 503, Some("overloaded"))),
        ..Options::default()
    })
    .await;
    let (o, _) = run_ok(cli(&gw.url, &["--seed", "1", "--requests", "50"])).await;
    assert_eq!(o.summary.by_class.unexpected["503 overloaded"], 10);
    assert_eq!(o.summary.unexpected, 10);

    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--seed",
            "2",
            "--requests",
            "50",
            "--expect-shedding",
            "--fail-on-unexpected",
        ],
    ))
    .await;
    assert_eq!(o.summary.by_class.expected["503 overloaded"], 10, "{out}");
    assert_eq!(o.summary.unexpected, 0, "{out}");
    assert!(o.summary.expect_shedding);
    assert_eq!(app::exit_status(&Ok(o)), app::EXIT_OK);

    // An unparsable error answer is never excused.
    let gw = testserver::start(Options {
        fail_every: Some((2, 503, None)),
        ..Options::default()
    })
    .await;
    let (o, _) = run_ok(cli(&gw.url, &["--requests", "10", "--expect-shedding"])).await;
    assert_eq!(o.summary.by_class.unexpected["503"], 5);
}

#[tokio::test]
async fn html_report_holds_the_charts_and_the_backlog() {
    let gw = testserver::start(Options {
        persister: true,
        ..Options::default()
    })
    .await;
    let path = temp_path("report.html");
    let (o, out) = run_ok(cli(
        &gw.url,
        &[
            "--users",
            "500",
            "--stock",
            "200",
            "--connections",
            "4",
            "--duration",
            "1200ms",
            "--report",
            path.to_str().expect("utf8"),
        ],
    ))
    .await;
    assert!(o.summary.sell_out.is_some(), "{out}");
    let html = std::fs::read_to_string(&path).expect("report written");
    let _ = std::fs::remove_file(&path);
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), 3, "three charts");
    for text in [
        "Throughput (per second)",
        "Latency percentiles per interval",
        "Persistence backlog",
        "backlog (from /readyz)",
        "sold out at ",
        "claims ok/s while stock lasted",
        "<td>expected</td><td>201</td><td class=\"n\">200</td>",
    ] {
        assert!(html.contains(text), "missing {text}");
    }
    assert!(!html.contains("not sampled"), "the backlog was sampled");
    assert!(html.matches("<polyline").count() >= 7, "lines drawn");
}

#[tokio::test]
async fn svg_report_without_a_persister() {
    let gw = testserver::start(Options::default()).await;
    let path = temp_path("report.svg");
    let (_, _) = run_ok(cli(
        &gw.url,
        &[
            "--scenario",
            "trivial",
            "--connections",
            "2",
            "--duration",
            "700ms",
            "--report",
            path.to_str().expect("utf8"),
        ],
    ))
    .await;
    let svg = std::fs::read_to_string(&path).expect("report written");
    let _ = std::fs::remove_file(&path);
    assert_eq!(svg.matches("<svg").count(), 1);
    assert!(svg.contains("Throughput (per second)"));
    assert!(svg.contains("Latency percentiles per interval"));
    assert!(
        svg.contains("not sampled: the gateway runs no persister"),
        "the backlog chart says why it is empty"
    );

    // Formats are checked before the run.
    let (r, _) = run(cli(&gw.url, &["--report", "r.png", "--requests", "1"])).await;
    let e = r.expect_err("refused");
    assert!(e.downcast_ref::<UsageError>().is_some(), "{e:#}");
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
