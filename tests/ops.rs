//! Operations and configuration (issue "Hardening", items 10 to 12), against the real
//! binary where it is about the process and against a real database held locked where it
//! is about readiness:
//! - `check-config` prints TOML that loads again, with every secret redacted, and exits
//!   quietly when its reader goes away; no error or log line carries a password;
//! - `/readyz` turns 503 with `persister.stalled` and a non-zero backlog while the database
//!   is locked against the persister's writes, and 200 again once they drain (both backends);
//! - the bare `claimgate serve` (no `--config`) is durable: it keeps an append-only log, and
//!   a kill -9 after acknowledged claims loses none of them.

mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use claimgate::backend::Backend;
use claimgate::backend::embedded::EmbeddedBackend;
use claimgate::backend::redis::RedisBackend;
use claimgate::config::DatabaseConfig;
use claimgate::config::EmbeddedConfig;
use claimgate::config::RedisConfig;
use claimgate::http::App;
use claimgate::persist::Persister;
use claimgate::store::Db;
use serde_json::{Value, json};
use sqlx::Connection;
use support::gw::{batch_json, call, claim, open_db};
use support::http::Http;
use support::watchdog::{Watchdog, step};
use support::{PgDb, RedisServer, free_port};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_claimgate");

/// The binary, run in `cwd`, with no `CLAIMGATE_*` setting inherited from the test's
/// environment (a bare run must see only the built-in defaults).
fn claimgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd).env_remove("RUST_BACKTRACE");
    for (k, _) in std::env::vars() {
        if k.starts_with("CLAIMGATE_")
            || ["DATABASE_URL", "REDIS_URL", "RUST_LOG"].contains(&k.as_str())
        {
            c.env_remove(k);
        }
    }
    c
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const ADMIN: &str = "admin-token-LEAKCHECK-0123456789";
const PG_URL: &str = "postgres://app:PGLEAKCHECK@db.internal:5432/claims";

/// Item 10: the dump is TOML without a secret in it; it loads again with `--config` once the
/// secrets are given (and is refused, naming the key, until then), printing the same text.
#[test]
fn check_config_prints_reloadable_toml_without_secrets() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let out = claimgate(dir.path())
        .args(["--database-url", PG_URL, "--set"])
        .arg(format!("auth.admin_token=\"{ADMIN}\""))
        .args(["--set", "limits.claim_per_ip={per_second=9, burst=3}"])
        .arg("check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let dump = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(!dump.contains("LEAKCHECK"), "secret in the dump:\n{dump}");
    let parsed: toml::Table = dump.parse().expect("the dump is TOML");
    assert_eq!(parsed["auth"]["admin_token"].as_str(), Some("<redacted>"));
    assert_eq!(
        parsed["database"]["url"].as_str(),
        Some("postgres://app:<redacted>@db.internal:5432/claims")
    );
    assert_eq!(
        parsed["limits"]["claim_per_ip"]["per_second"].as_integer(),
        Some(9)
    );
    assert_eq!(
        parsed["embedded"]["aof_path"].as_str(),
        Some("data/claimgate.aof")
    );

    let file = dir.path().join("dump.toml");
    std::fs::write(&file, &dump).unwrap();
    let refused = claimgate(dir.path())
        .arg("--config")
        .arg(&file)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(64), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("auth.admin_token"),
        "{}",
        text(&refused)
    );
    let again = claimgate(dir.path())
        .arg("--config")
        .arg(&file)
        .env("CLAIMGATE_AUTH__ADMIN_TOKEN", ADMIN)
        .env("CLAIMGATE_DATABASE__URL", PG_URL)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(String::from_utf8(again.stdout).unwrap(), dump);
}

/// Item 10: a reader that has gone before anything is written (EPIPE on the first write)
/// ends the output quietly with status 0; before, the process panicked (status 101).
#[test]
fn output_into_a_closed_pipe_exits_quietly() {
    let _wd = Watchdog::arm(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("p.db").display());
    for args in [
        vec!["check-config".to_string()],
        vec!["--database-url".into(), db.clone(), "migrate".into()],
    ] {
        step(format!("{args:?} into a closed pipe"));
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // the reader is gone before the process starts
        let out = claimgate(dir.path())
            .args(&args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out));
    }
    step("check-config | head -1");
    let out = Command::new("bash")
        .current_dir(dir.path())
        .args(["-c", "set -o pipefail; \"$0\" check-config | head -1", BIN])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "{}",
        text(&out)
    );
    assert!(out.stderr.is_empty(), "{}", text(&out));
}

/// Item 10: errors and the startup log name URLs with the password redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_in_errors_or_logs() {
    let _wd = Watchdog::arm(Duration::from_secs(90));
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    step("redis unreachable");
    let out = claimgate(dir.path())
        .args(["--backend", "redis", "--redis-url"])
        .arg(format!("redis://user:RDLEAKCHECK@127.0.0.1:{closed}/0"))
        .args(["--set", "redis.connect_timeout_ms=500", "reconcile"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    let all = text(&out);
    assert!(!all.contains("RDLEAKCHECK"), "{all}");
    assert!(
        all.contains(&format!("redis://user:<redacted>@127.0.0.1:{closed}/0")),
        "{all}"
    );
    step("bad redis url");
    let out = claimgate(dir.path())
        .args(["--backend", "redis", "--redis-url"])
        .arg("redis://user:RDLEAKCHECK@127.0.0.1:notaport")
        .arg("reconcile")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(!text(&out).contains("RDLEAKCHECK"), "{}", text(&out));
    step("database unreachable");
    let out = claimgate(dir.path())
        .arg("--database-url")
        .arg(format!("postgres://u:PGLEAKCHECK@127.0.0.1:{closed}/db"))
        .args(["--set", "database.connect_timeout_ms=500", "migrate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "{}", text(&out));
    assert!(!text(&out).contains("PGLEAKCHECK"), "{}", text(&out));

    step("startup log against PostgreSQL with a password");
    let redis = RedisServer::start();
    let pg = PgDb::create();
    let password = pg
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, pw)| pw.to_string())
        .expect("CLAIMGATE_TEST_PG has a password");
    let port = free_port();
    let mut child = claimgate(dir.path())
        .args(["--backend", "redis", "--redis-url", &redis.url()])
        .args(["--database-url", &pg.url, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    wait_healthy(&http).await;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    assert!(all.contains("claimgate serving"), "{all}");
    assert!(all.contains(":<redacted>@"), "{all}");
    assert!(!all.contains(&format!(":{password}@")), "{all}");
}

async fn wait_healthy(http: &Http) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http.send("GET", "/healthz", "").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway not healthy after 30 s");
}

/// What holds the database locked against the persister's writes.
enum Lock {
    Sqlite(sqlx::SqliteConnection),
    Pg(sqlx::PgConnection),
}

impl Lock {
    async fn take(url: &str) -> Lock {
        if url.starts_with("sqlite:") {
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url).unwrap();
            let mut c = sqlx::SqliteConnection::connect_with(&opts).await.unwrap();
            sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut c)
                .await
                .unwrap();
            Lock::Sqlite(c)
        } else {
            let mut c = sqlx::PgConnection::connect(url).await.unwrap();
            sqlx::query("BEGIN").execute(&mut c).await.unwrap();
            sqlx::query("LOCK TABLE coupon_events IN ACCESS EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .unwrap();
            Lock::Pg(c)
        }
    }

    async fn release(self) {
        match self {
            Lock::Sqlite(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
            Lock::Pg(mut c) => {
                sqlx::query("ROLLBACK").execute(&mut c).await.unwrap();
                c.close().await.unwrap();
            }
        }
    }
}

/// Polls `/readyz` until `want` holds for its (status, body); panics after `limit`.
async fn readyz_until<B: Backend>(
    app: &App<B>,
    limit: Duration,
    what: &str,
    want: impl Fn(u16, &Value) -> bool,
) -> (u16, Value) {
    let deadline = Instant::now() + limit;
    loop {
        let (s, v) = call(app, "GET", "/readyz", "").await;
        if want(s, &v) {
            return (s, v);
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Item 11: while another connection holds the database locked, the persister's write
/// blocks (or fails and retries); after `persister.stall_ms` `/readyz` answers 503 with
/// `stalled` and a backlog measured while the write was blocked. Claims go on meanwhile.
/// Once the lock is released, everything drains and `/readyz` is 200 again.
async fn stall_scenario<B: Backend>(backend: Arc<B>, db_url: String) {
    step("start the gateway with a persister");
    let cfg = Arc::new(support::gw::config(&[
        "persister.stall_ms=1000".into(),
        "persister.probe_interval_ms=100".into(),
        "persister.backoff_max_ms=300".into(),
    ]));
    let db = open_db(&db_url).await;
    let shutdown = CancellationToken::new();
    let p = Persister::spawn(
        backend.clone(),
        db.clone(),
        cfg.persister.clone(),
        shutdown.child_token(),
    );
    let app =
        claimgate::gateway::assemble(cfg.clone(), backend.clone(), db.clone(), Some(p.status()));
    let (s, v) = call(
        &app,
        "POST",
        "/v1/batches",
        batch_json("stall", 100, 1, json!({"shards": 4})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    for i in 0..5 {
        let (s, v) = claim(&app, "stall", &format!("a{i}"), Some("r")).await;
        assert_eq!(s, 201, "{v}");
    }
    step("drained before the lock");
    readyz_until(
        &app,
        Duration::from_secs(20),
        "ready and drained",
        |s, v| s == 200 && v["persister"]["backlog"] == 0 && v["persister"]["rows_written"] == 5,
    )
    .await;

    step("lock the database, claim on");
    let lock = Lock::take(&db_url).await;
    let locked_at = Instant::now();
    for i in 0..5 {
        let (s, v) = claim(&app, "stall", &format!("b{i}"), Some("r")).await;
        assert_eq!(s, 201, "claims do not wait for the database: {v}");
    }
    step("wait for /readyz to show the stall");
    let (_, v) = readyz_until(&app, Duration::from_secs(15), "503 stalled", |s, _| {
        s == 503
    })
    .await;
    let p_detail = &v["persister"];
    assert_eq!(p_detail["stalled"], true, "{v}");
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(v["database"]["ok"], true, "the database answers pings: {v}");
    assert!(p_detail["backlog"].as_u64().unwrap() >= 5, "{v}");
    assert!(
        p_detail["since_progress_ms"].as_u64().unwrap() > 1000,
        "{v}"
    );
    assert!(locked_at.elapsed() >= Duration::from_secs(1));

    step("release the lock");
    lock.release().await;
    readyz_until(
        &app,
        Duration::from_secs(30),
        "ready and drained again",
        |s, v| {
            s == 200
                && v["persister"]["stalled"] == false
                && v["persister"]["backlog"] == 0
                && v["persister"]["rows_written"] == 10
        },
    )
    .await;
    assert_eq!(db.claim_counts("stall").await.unwrap(), (10, 10));
    shutdown.cancel();
    p.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shows_a_persister_stalled_on_a_locked_sqlite() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(
        EmbeddedBackend::open(&EmbeddedConfig {
            aof_path: Some(dir.path().join("stall.aof")),
            ..EmbeddedConfig::default()
        })
        .unwrap(),
    );
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("stall.db").display()
    );
    stall_scenario(backend, url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shows_a_persister_stalled_on_a_locked_postgres() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let redis = RedisServer::start();
    let pg = PgDb::create();
    let backend = Arc::new(
        RedisBackend::connect(&RedisConfig {
            url: redis.url(),
            ..RedisConfig::default()
        })
        .await
        .unwrap(),
    );
    stall_scenario(backend, pg.url.clone()).await;
}

/// Item 12: `claimgate serve` without `--config` (only `--listen`, in an empty working
/// directory) keeps its append-only log under `data/`; a kill -9 right after acknowledged
/// claims loses none of them: after the restart the batch is there (not "lost"), every
/// claim replays to the same coupon, and every coupon reaches the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_serve_is_durable_across_kill9() {
    let _wd = Watchdog::arm(Duration::from_secs(120));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let start = || {
        claimgate(dir.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    step("first start");
    let mut child = start();
    let http = Http::new(&format!("http://127.0.0.1:{port}"));
    wait_healthy(&http).await;
    assert!(
        dir.path().join("data/claimgate.aof").exists(),
        "the bare gateway keeps an append-only log"
    );
    let body = json!({
        "id": "bare", "name": "bare", "stock": 100, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": 4
    });
    let (s, v) = http
        .send("POST", "/v1/batches", &body.to_string())
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let mut given = Vec::new();
    for i in 0..40 {
        let req = json!({"user_id": format!("u{i}"), "request_id": format!("r{i}")});
        let (s, v) = http
            .send("POST", "/v1/batches/bare/claims", &req.to_string())
            .await
            .unwrap();
        assert_eq!(s, 201, "{v}");
        given.push(v["coupon_id"].as_str().unwrap().to_string());
    }
    step("kill -9 and restart");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = start();
    wait_healthy(&http).await;

    step("the batch and every claim survived");
    let (s, v) = http.send("GET", "/v1/batches/bare", "").await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["stock"]["claimed"], 40, "{v}");
    for (i, c) in given.iter().enumerate() {
        let req = json!({"user_id": format!("u{i}"), "request_id": format!("r{i}")});
        let (s, v) = http
            .send("POST", "/v1/batches/bare/claims", &req.to_string())
            .await
            .unwrap();
        assert_eq!(s, 200, "u{i}: replay after the restart: {v}");
        assert_eq!(v["coupon_id"], c.as_str(), "u{i}");
    }
    step("every coupon reaches the database");
    let db = Db::connect(&DatabaseConfig {
        url: format!(
            "sqlite://{}",
            dir.path().join("data/claimgate.db").display()
        ),
        ..DatabaseConfig::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.claim_counts("bare").await.unwrap() != (40, 40) {
        assert!(
            Instant::now() < deadline,
            "database has {:?} of 40 claims",
            db.claim_counts("bare").await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in &given {
        assert!(db.get_coupon(c).await.unwrap().is_some(), "{c} lost");
    }
    db.close().await;
    let _ = child.kill();
    let _ = child.wait();
}
