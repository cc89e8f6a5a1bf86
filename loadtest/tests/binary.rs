//! The `claimgate-loadtest` binary as a user runs it: secrets from the environment (not
//! the command line, where `ps` shows them), `--help` that does not print them, and the
//! exit statuses. Runs the real binary against the in-process fake gateway.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../src/testserver.rs"]
#[allow(dead_code)]
mod testserver;

use testserver::Options;

const BIN: &str = env!("CARGO_BIN_EXE_claimgate-loadtest");

/// Every run of the binary is bounded: killed if it has not exited by then.
const RUN_LIMIT: Duration = Duration::from_secs(60);

const TOKEN: &str = "adm-token-from-the-environment";

/// Runs the binary to completion (off the async runtime, which keeps serving the fake
/// gateway), killing it if it outlives `RUN_LIMIT`.
async fn run(args: Vec<String>, env_token: Option<&'static str>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .env_remove("CLAIMGATE_ADMIN_TOKEN")
            .env_remove("CLAIMGATE_USER_TOKEN_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = env_token {
            cmd.env("CLAIMGATE_ADMIN_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("spawn claimgate-loadtest");
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            match child.try_wait().expect("wait") {
                Some(_) => break,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        child.wait_with_output().expect("output")
    })
    .await
    .expect("join")
}

fn args(url: &str, rest: &[&str]) -> Vec<String> {
    ["--url", url, "-q"]
        .iter()
        .chain(rest)
        .map(|s| (*s).to_string())
        .collect()
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "claimgate-loadtest-bin-{}-{name}",
        std::process::id()
    ))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_comes_from_the_environment() {
    let gw = testserver::start(Options {
        admin_token: Some(TOKEN.into()),
        ..Options::default()
    })
    .await;
    let json = temp_path("env.json");
    let out = run(
        args(
            &gw.url,
            &[
                "--scenario",
                "mixed",
                "--requests",
                "40",
                "--connections",
                "2",
                "--json",
                json.to_str().expect("utf8"),
            ],
        ),
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parse");
    let _ = std::fs::remove_file(&json);
    // The batch was created and read with the token: every read came back 200.
    assert!(
        summary["by_outcome"]["GET batch 200"].as_u64() > Some(0),
        "{summary}"
    );
    assert_eq!(summary["unexpected"], 0, "{summary}");
    assert!(!text(&out.stdout).contains(TOKEN));
    assert!(!text(&out.stderr).contains(TOKEN));

    // Without it the gateway refuses, and the error names both ways to give it.
    let out = run(args(&gw.url, &["--seed", "2", "--requests", "5"]), None).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("--admin-token or CLAIMGATE_ADMIN_TOKEN"),
        "{err}"
    );

    // The flag still works, and wins over the environment.
    let out = run(
        args(
            &gw.url,
            &["--seed", "3", "--requests", "5", "--admin-token", TOKEN],
        ),
        Some("wrong-token-in-the-environment"),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_names_the_variables_but_never_their_values() {
    let out = run(vec!["--help".into()], Some(TOKEN)).await;
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("CLAIMGATE_ADMIN_TOKEN"), "{help}");
    assert!(help.contains("CLAIMGATE_USER_TOKEN_SECRET"), "{help}");
    assert!(!help.contains(TOKEN), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses() {
    let gw = testserver::start(Options {
        fail_every: Some((3, 500, Some("internal"))),
        ..Options::default()
    })
    .await;
    // Unexpected outcomes alone keep status 0 (the tool's convention)...
    let out = run(args(&gw.url, &["--seed", "1", "--requests", "9"]), None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("6 expected, 3 unexpected"));
    // ...unless asked for.
    let out = run(
        args(
            &gw.url,
            &["--seed", "2", "--requests", "9", "--fail-on-unexpected"],
        ),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // A report format nobody can draw is a usage error, found before any load is sent.
    let out = run(
        args(&gw.url, &["--report", "r.pdf", "--requests", "1"]),
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(".html, .htm or .svg"));
}
