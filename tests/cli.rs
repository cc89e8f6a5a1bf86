//! The command line as an operator meets it (issue "For the people who run it", item 4),
//! against the real binary:
//! - each command shows only its own flags, each with help text, and the exit statuses;
//! - usage errors exit 64, `-c` works, completions for every shell clap knows;
//! - configuration precedence (file < DATABASE_URL < CLAIMGATE_* < --set), numeric secrets
//!   from the environment, type errors with the file's line;
//! - `rebuild` of a batch the backend still has, without `--force`, is a usage error (64);
//! - `reconcile` against a live embedded gateway: the local open is refused with a hint,
//!   `reconcile --url` asks the gateway (`GET /v1/admin/reconcile`), with its admin token.

mod support;

use std::process::Output;
use std::time::Duration;

use claimgate::config::DatabaseConfig;
use claimgate::store::Db;
use serde_json::json;
use support::bin::{Served, claimgate, request};
use support::watchdog::{Watchdog, step};

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = claimgate(dir);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run claimgate")
}

/// The flags (`--name`) a help text lists.
fn flags(help: &str) -> Vec<String> {
    help.split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.', ')', '`']).to_string())
        .collect()
}

#[test]
fn each_command_shows_only_its_own_flags_with_help_and_the_exit_statuses() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let serve_only = ["--listen"];
    for (cmd, want, not) in [
        (
            "serve",
            &["--listen", "--backend", "--redis-url", "--database-url"][..],
            &[][..],
        ),
        (
            "migrate",
            &["--database-url"][..],
            &["--listen", "--backend", "--redis-url"][..],
        ),
        (
            "rebuild",
            &["--batch", "--force", "--backend"][..],
            &serve_only[..],
        ),
        (
            "reconcile",
            &["--batch", "--url", "--timeout-s", "--backend"][..],
            &serve_only[..],
        ),
        (
            "check-config",
            &[][..],
            &["--listen", "--backend", "--redis-url", "--database-url"][..],
        ),
    ] {
        step(format!("{cmd} --help"));
        let out = run(dir.path(), &[cmd, "--help"], &[]);
        assert!(out.status.success(), "{cmd}: {}", text(&out));
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let listed = flags(&help);
        for f in want.iter().chain(["--config", "--set"].iter()) {
            assert!(
                listed.iter().any(|l| l == f),
                "{cmd} --help lacks {f}:\n{help}"
            );
        }
        for f in not {
            assert!(
                !listed.iter().any(|l| l == f),
                "{cmd} --help shows {f}:\n{help}"
            );
        }
        assert!(help.contains("-c, --config"), "{cmd}:\n{help}");
        assert!(
            help.contains("Exit status:") && help.contains("64"),
            "{cmd}:\n{help}"
        );
        // every option line has a help text after its name
        for line in help.lines().filter(|l| l.trim_start().starts_with("--")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            assert!(words.len() >= 2, "{cmd}: an option without help: {line:?}");
        }
    }
    step("rebuild --batch has its help");
    let out = run(dir.path(), &["rebuild", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    let batch = help
        .lines()
        .find(|l| l.trim_start().starts_with("--batch <ID>"))
        .unwrap();
    assert!(
        batch.split("--batch <ID>").nth(1).unwrap().trim().len() > 5,
        "{help}"
    );
    step("--version, -V");
    for v in ["--version", "-V"] {
        let out = run(dir.path(), &[v], &[]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("claimgate {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn usage_errors_exit_64_naming_the_flag() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (&["--listen", "127.0.0.1:1", "migrate"][..], "--listen"),
        (&["migrate", "--listen", "127.0.0.1:1"][..], "--listen"),
        (&["check-config", "--backend", "redis"][..], "--backend"),
        (&["rebuild"][..], "--batch"),
        (&["reconcile", "--timeout-s", "3"][..], "--url"),
        (&["no-such-command"][..], "no-such-command"),
        (&["--backend", "mongo", "serve"][..], "mongo"),
    ] {
        step(format!("{args:?}"));
        let out = run(dir.path(), args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out)
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out));
    }
}

#[test]
fn completions_for_every_shell() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        step(shell);
        let out = run(dir.path(), &["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in [
            "claimgate",
            "reconcile",
            "check-config",
            "database-url",
            "timeout-s",
        ] {
            assert!(script.contains(word), "{shell}: no {word}:\n{script}");
        }
    }
    // a broken configuration does not break completion
    let out = run(
        dir.path(),
        &["completions", "bash"],
        &[("CLAIMGATE_CONFIG", "/nonexistent.toml")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = run(dir.path(), &["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}

/// The effective configuration as `check-config` prints it, parsed.
fn effective(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let mut all = args.to_vec();
    all.push("check-config");
    let out = run(dir, &all, env);
    assert!(out.status.success(), "{all:?} {env:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

#[test]
fn configuration_precedence_numeric_secrets_and_line_numbers() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[database]\nurl = \"sqlite://from-file.db\"\n[redis]\nurl = \"redis://from-file:1\"\n[log]\nlevel = \"warn\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let url = |t: &toml::Table, s: &str| t[s]["url"].as_str().unwrap().to_string();
    step("-c and the file");
    let t = effective(dir.path(), &["-c", f], &[]);
    assert_eq!(url(&t, "database"), "sqlite://from-file.db");
    assert_eq!(t["log"]["level"].as_str(), Some("warn"));
    step("DATABASE_URL, REDIS_URL, RUST_LOG over the file");
    let conventional = [
        ("DATABASE_URL", "sqlite://conventional.db"),
        ("REDIS_URL", "redis://conventional:2"),
        ("RUST_LOG", "claimgate=debug,info"),
    ];
    let t = effective(dir.path(), &["-c", f], &conventional);
    assert_eq!(url(&t, "database"), "sqlite://conventional.db");
    assert_eq!(url(&t, "redis"), "redis://conventional:2");
    assert_eq!(t["log"]["level"].as_str(), Some("claimgate=debug,info"));
    step("CLAIMGATE_* over them, --set over everything");
    let mut env = conventional.to_vec();
    env.push(("CLAIMGATE_DATABASE__URL", "sqlite://claimgate-var.db"));
    let t = effective(dir.path(), &["-c", f], &env);
    assert_eq!(url(&t, "database"), "sqlite://claimgate-var.db");
    assert_eq!(url(&t, "redis"), "redis://conventional:2");
    let t = effective(
        dir.path(),
        &["-c", f, "--set", "database.url=\"sqlite://set.db\""],
        &env,
    );
    assert_eq!(url(&t, "database"), "sqlite://set.db");
    step("a secret of digits from the environment");
    let t = effective(
        dir.path(),
        &[],
        &[("CLAIMGATE_AUTH__ADMIN_TOKEN", "12345678901234567890")],
    );
    assert_eq!(t["auth"]["admin_token"].as_str(), Some("<redacted>"));
    step("a type error names its line");
    std::fs::write(
        &file,
        "[server]\nhttp2 = true\nmax_connections = \"many\"\n",
    )
    .unwrap();
    let out = run(dir.path(), &["-c", f, "check-config"], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("max_connections"),
        "{err}"
    );
}

const BATCH: &str = r#"{"id": "live", "name": "live", "stock": 20, "per_user_limit": 1,
    "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
    "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
    "scope": {"kind": "all"}, "shards": 2}"#;

const ADMIN: &str = "admin-token-0123456789-cli";

fn create_and_claim(gw: &Served, auth: &[(&str, &str)]) {
    let (s, t) = request(gw.port, "POST", "/v1/batches", auth, BATCH);
    assert_eq!(s, 201, "{t}");
    for u in ["a", "b"] {
        let (s, t) = request(
            gw.port,
            "POST",
            "/v1/batches/live/claims",
            &[],
            &json!({ "user_id": u }).to_string(),
        );
        assert_eq!(s, 201, "{t}");
    }
}

/// Before, `rebuild` of a batch the backend still has, without `--force`, exited 69
/// (unavailable) where it is the operator's usage error (64).
#[test]
fn rebuild_of_a_live_batch_without_force_is_a_usage_error() {
    let _wd = Watchdog::arm(Duration::from_secs(90));
    let dir = tempfile::tempdir().unwrap();
    step("serve, create, stop");
    let gw = Served::start(dir.path(), &[], &[]);
    create_and_claim(&gw, &[]);
    gw.stop();
    step("rebuild without --force");
    let out = run(dir.path(), &["rebuild", "--batch", "live"], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("--force") && all.contains("backend"), "{all}");
    assert!(
        !all.contains("Redis"),
        "embedded backend, Redis wording: {all}"
    );
    assert_eq!(
        all.matches("still exists").count(),
        1,
        "printed once: {all}"
    );
    step("rebuild of an unknown batch");
    let out = run(dir.path(), &["rebuild", "--batch", "nope"], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    step("local reconcile once the gateway is gone");
    let out = run(dir.path(), &["reconcile"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("the embedded backend and the database agree"),
        "{}",
        text(&out)
    );
}

/// Before, `reconcile` could not run while an embedded gateway was up (its append-only
/// file is locked by the gateway): `reconcile --url` asks the gateway instead.
#[test]
fn reconcile_against_a_live_embedded_gateway() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let token = [("CLAIMGATE_AUTH__ADMIN_TOKEN", ADMIN)];
    let gw = Served::start(dir.path(), &[], &token);
    let bearer = format!("Bearer {ADMIN}");
    create_and_claim(&gw, &[("Authorization", bearer.as_str())]);
    let url = format!("http://127.0.0.1:{}", gw.port);

    step("the local open is refused, pointing at --url");
    let out = run(dir.path(), &["reconcile"], &token);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(text(&out).contains("reconcile --url"), "{}", text(&out));
    let out = run(dir.path(), &["rebuild", "--batch", "live"], &token);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(text(&out).contains("stop it first"), "{}", text(&out));

    step("--url without the admin token: 64");
    let out = run(dir.path(), &["reconcile", "--url", &url], &[]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("admin_token"), "{}", text(&out));
    assert!(!text(&out).contains(ADMIN), "{}", text(&out));

    step("--url with it: they agree");
    for args in [
        vec!["reconcile", "--url", &url],
        vec!["reconcile", "--url", &url, "--batch", "live"],
    ] {
        let out = run(dir.path(), &args, &token);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "the embedded backend and the database agree"
        );
    }
    step("--batch unknown or malformed: 64");
    for b in ["nope", "a/b"] {
        let out = run(
            dir.path(),
            &["reconcile", "--url", &url, "--batch", b],
            &token,
        );
        assert_eq!(out.status.code(), Some(64), "{b}: {}", text(&out));
    }

    step("a batch the database has and the backend does not: exit 1, the difference");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let db = Db::connect(&DatabaseConfig {
            url: format!(
                "sqlite://{}",
                dir.path().join("data/claimgate.db").display()
            ),
            ..DatabaseConfig::default()
        })
        .await
        .unwrap();
        let mut b = db.get_batch("live").await.unwrap().expect("live");
        b.id = "db-only".to_string();
        db.upsert_batch(&b).await.unwrap();
        db.close().await;
    });
    let out = run(dir.path(), &["reconcile", "--url", &url], &token);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("batch db-only: in the database but missing in the backend")
            && report.contains("1 difference(s)"),
        "{report}"
    );

    step("the endpoint itself, and a gateway that is not there: 69");
    let (s, body) = request(
        gw.port,
        "GET",
        "/v1/admin/reconcile?batch=live",
        &[("Authorization", bearer.as_str())],
        "",
    );
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["agree"], true, "{v}");
    assert_eq!(v["backend"], "embedded", "{v}");
    drop(gw);
    let out = run(
        dir.path(),
        &["reconcile", "--url", &url, "--timeout-s", "5"],
        &token,
    );
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
}
