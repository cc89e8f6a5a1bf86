//! The logs as an operator meets them (issue "For the people who run it", item 1), from the
//! real binary:
//! - logs go to stderr, without colour codes when stderr is not a terminal;
//! - one startup line with the version, config file, backend, listen address, database
//!   and append-only file;
//! - `RUST_LOG` is honoured, with `log.level` its default and `CLAIMGATE_LOG__LEVEL` above
//!   it; an invalid level is refused at load (exit 64, naming the key);
//! - a fatal error is printed once;
//! - the access log: off by default; when on, one line per sampled request with method,
//!   route, status, duration and request id, never the path's ids, the query or the body;
//! - with `log.json`, every line is one JSON object.

mod support;

use std::net::TcpListener;
use std::time::Duration;

use serde_json::{Value, json};
use support::bin::{Served, claimgate, output_within, request};
use support::watchdog::{Watchdog, step};

fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn plain_stderr_and_one_startup_line_that_says_it_all() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        "[embedded]\naof_path = \"state/gw.aof\"\n[database]\nurl = \"sqlite://state/gw.db?mode=rwc\"\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let gw = Served::start(dir.path(), &["-c", cfg.to_str().unwrap()], &[]);
    let port = gw.port;
    let log = gw.stop();
    assert!(!log.contains('\u{1b}'), "colour codes in a file:\n{log}");
    let started = lines_with(&log, "claimgate serving");
    assert_eq!(started.len(), 1, "{log}");
    let line = started[0];
    for want in [
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        format!("config=\"{}\"", cfg.display()),
        "backend=\"embedded\"".to_string(),
        format!("listen=\"127.0.0.1:{port}\""),
        "database=\"sqlite://state/gw.db?mode=rwc\"".to_string(),
        "aof=\"state/gw.aof\"".to_string(),
    ] {
        assert!(
            line.contains(&want),
            "no {want} in the startup line: {line}"
        );
    }
    assert!(log.contains("bye"), "{log}");
}

#[test]
fn rust_log_is_honoured_below_claimgate_log_level() {
    let _wd = Watchdog::arm(Duration::from_secs(90));
    let dir = tempfile::tempdir().unwrap();
    step("RUST_LOG=warn: no info line");
    let log = Served::start(dir.path(), &[], &[("RUST_LOG", "warn")]).stop();
    assert!(lines_with(&log, "claimgate serving").is_empty(), "{log}");
    assert!(!lines_with(&log, "WARN").is_empty(), "{log}");
    step("RUST_LOG=debug: a refused request shows at debug");
    let gw = Served::start(dir.path(), &[], &[("RUST_LOG", "debug")]);
    assert_eq!(request(gw.port, "GET", "/no/such/route", &[], "").0, 404);
    let log = gw.stop();
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("request refused")),
        "{log}"
    );
    step("CLAIMGATE_LOG__LEVEL above RUST_LOG");
    let log = Served::start(
        dir.path(),
        &[],
        &[("RUST_LOG", "warn"), ("CLAIMGATE_LOG__LEVEL", "info")],
    )
    .stop();
    assert_eq!(lines_with(&log, "claimgate serving").len(), 1, "{log}");
}

#[test]
fn an_invalid_level_is_refused_at_load() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    for (args, env, says) in [
        (
            &["--set", "log.level=verbose", "serve"][..],
            &[][..],
            "log.level",
        ),
        (&["serve"][..], &[("RUST_LOG", "verbose")][..], "RUST_LOG"),
        (
            &["--set", "log.access_sample=2", "serve"][..],
            &[][..],
            "log.access_sample",
        ),
    ] {
        step(format!("{args:?} {env:?}"));
        let mut c = claimgate(dir.path());
        c.args(args).arg("--listen").arg("127.0.0.1:0");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = output_within(&mut c, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(says), "{err}");
        assert_eq!(err.lines().count(), 1, "one message: {err}");
    }
}

/// Before, a fatal error was printed twice (a log line and an `eprintln!`).
#[test]
fn a_fatal_error_is_printed_once() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for extra in [
        &[][..],
        &["--set", "log.level=off"][..],
        &["--set", "log.json=true"][..],
    ] {
        step(format!("{extra:?}"));
        let out = output_within(
            claimgate(dir.path())
                .args(extra)
                .args(["serve", "--listen", &addr]),
            Duration::from_secs(20),
        );
        assert_eq!(out.status.code(), Some(69), "{out:?}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(all.matches("cannot listen").count(), 1, "{extra:?}:\n{all}");
        assert!(out.stdout.is_empty(), "logs belong on stderr:\n{all}");
    }
}

#[test]
fn the_access_log_is_off_by_default_sampled_and_never_shows_ids_queries_or_bodies() {
    let _wd = Watchdog::arm(Duration::from_secs(90));
    let dir = tempfile::tempdir().unwrap();
    let traffic = |port: u16| {
        let (s, t) = request(
            port,
            "GET",
            "/v1/users/SECRETUSER/coupons?cursor=SECRETQUERY&status=unused",
            &[("X-Request-Id", "rid-access-1")],
            "",
        );
        assert_eq!(s, 400, "{t}");
        let (s, t) = request(
            port,
            "POST",
            "/v1/batches/nobatch/claims",
            &[("X-Request-Id", "rid-access-2")],
            &json!({"user_id": "SECRETBODY"}).to_string(),
        );
        assert_eq!(s, 404, "{t}");
        assert_eq!(request(port, "GET", "/healthz", &[], "").0, 200);
    };
    step("off by default");
    let gw = Served::start(dir.path(), &[], &[]);
    traffic(gw.port);
    let log = gw.stop();
    assert!(lines_with(&log, "access").is_empty(), "{log}");

    step("on, JSON: one object per line, one access line per request");
    let gw = Served::start(
        dir.path(),
        &["--set", "log.access=true", "--set", "log.json=true"],
        &[],
    );
    traffic(gw.port);
    let log = gw.stop();
    for l in log.lines() {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(
        !log.contains("SECRET"),
        "ids, queries or bodies in the log:\n{log}"
    );
    let access: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["fields"]["message"] == "access")
        .collect();
    assert!(access.len() >= 3, "{log}");
    let find = |rid: &str| {
        access
            .iter()
            .find(|v| v["fields"]["request_id"] == rid)
            .unwrap_or_else(|| panic!("no access line for {rid}:\n{log}"))
            .clone()
    };
    let a = find("rid-access-1");
    assert_eq!(a["fields"]["method"], "GET");
    assert_eq!(a["fields"]["route"], "user_coupons");
    assert_eq!(a["fields"]["status"], 400);
    assert!(
        a["fields"]["duration_ms"]
            .as_f64()
            .is_some_and(|d| d >= 0.0),
        "{a}"
    );
    assert_eq!(a["level"], "INFO");
    let b = find("rid-access-2");
    assert_eq!(b["fields"]["method"], "POST");
    assert_eq!(b["fields"]["route"], "claims");
    assert_eq!(b["fields"]["status"], 404);

    step("sampled at 0: none");
    let gw = Served::start(
        dir.path(),
        &["--set", "log.access=true", "--set", "log.access_sample=0"],
        &[],
    );
    traffic(gw.port);
    let log = gw.stop();
    assert!(lines_with(&log, " access ").is_empty(), "{log}");
}
