//! The `claimgate` binary as a test runs it: a command with none of the test's own
//! environment settings, a served gateway on a free port with its stderr in a file, and a
//! bounded plain HTTP/1.1 exchange. Invariant kept here: every wait is bounded, and a
//! gateway started here is stopped (killed) when dropped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_claimgate");

/// Variables a run must not inherit from the test's environment.
const INHERITED: &[&str] = &[
    "DATABASE_URL",
    "REDIS_URL",
    "RUST_LOG",
    "NO_COLOR",
    "RUST_BACKTRACE",
];

/// The binary, run in `cwd`, with no `CLAIMGATE_*` setting nor conventional variable of
/// the test's environment.
pub fn claimgate(cwd: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("CLAIMGATE_") || INHERITED.contains(&k.as_str()) {
            c.env_remove(k);
        }
    }
    c
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), bounded by 10 s:
/// (status, body).
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A `claimgate serve` of a test, in its own directory, stderr in `<dir>/stderr.log`.
pub struct Served {
    pub port: u16,
    pub stderr: PathBuf,
    child: Option<Child>,
}

impl Served {
    /// Starts `claimgate <args> serve --listen 127.0.0.1:<free port>` in `dir` with `env`,
    /// and waits (at most 30 s) until `/healthz` answers.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
        let port = super::free_port();
        let stderr = dir.join("stderr.log");
        let mut c = claimgate(dir);
        c.args(args)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().expect("spawn claimgate serve");
        let mut s = Served {
            port,
            stderr,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok()
                && request(port, "GET", "/healthz", &[], "").0 == 200
            {
                return s;
            }
            if let Some(Ok(Some(status))) = s.child.as_mut().map(|c| c.try_wait()) {
                panic!("claimgate serve exited {status}: {}", s.log());
            }
            assert!(
                Instant::now() < deadline,
                "not healthy in 30 s: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then waits (at most 30 s, then kills) for the exit; returns its stderr.
    pub fn stop(mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.log()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` to its end, but at most `limit`: a process still running then is killed and
/// its output returned with the status of the kill (a test then fails, it does not hang).
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn claimgate");
    let deadline = Instant::now() + limit;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("claimgate output")
}
