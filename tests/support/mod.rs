//! Test harness: real redis-server processes on free ports and throwaway PostgreSQL
//! databases. Invariant kept here: tests only ever touch servers and databases they made
//! themselves, and remove them (process killed, database dropped) when done.
#![allow(dead_code)]

pub mod bin;
pub mod gw;
pub mod watchdog;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; the race is harmless here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A redis-server of our own, on a free port, in a temporary directory.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    aof: bool,
    /// `--replicaof 127.0.0.1 <port>`.
    primary: Option<u16>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server that keeps nothing on disk.
    pub fn start() -> RedisServer {
        Self::spawn(false)
    }

    /// A server with `appendonly yes` and `appendfsync always`: a restart keeps every write.
    pub fn start_with_aof() -> RedisServer {
        Self::spawn(true)
    }

    /// A replica of `primary` (keeps nothing on disk); returns once its link is up.
    pub fn start_replica_of(primary: &RedisServer) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            dir,
            aof: false,
            primary: Some(primary.port),
            child: None,
        };
        s.launch();
        let start = Instant::now();
        while !s
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "replica of {} never linked",
                primary.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// `kill -STOP`: the process stays, answers nothing (a replica that stopped acking).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// `kill -CONT` after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    fn spawn(aof: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer {
            port: free_port(),
            dir,
            aof,
            primary: None,
            child: None,
        };
        s.launch();
        s
    }

    fn launch(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--protected-mode")
            .arg("no");
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        if let Some(p) = self.primary {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (the test script installs it)");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill and start again on the same port and directory (an AOF server reloads its data).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Kill, delete everything on disk, start empty: a Redis that lost its data.
    pub fn restart_empty(&mut self) {
        self.kill();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        self.launch();
    }

    /// Runs a redis-cli command against this server, returning its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key starting with `prefix` (`--scan --pattern <prefix>*`), sorted: the same
    /// view as the embedded backend's `keys_with_prefix`.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let out = self.cli(&["--scan", "--pattern", &format!("{prefix}*")]);
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A redis-server from `launch(port)` once it accepts connections. A free port can be taken
/// between [`free_port`] and the server's bind (many tests start servers at once): a server
/// that exits instead of listening, or finds another process answering on its port (checked
/// by its `process_id`), is started again on another port. Bounded: 5 tries of
/// at most 30 s each.
pub fn listening(mut port: u16, mut launch: impl FnMut(u16) -> Child) -> (u16, Child) {
    for _ in 0..5 {
        let mut child = launch(port);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                if serves(port, child.id()) {
                    return (port, child);
                }
                break; // another test's server holds the port: ours cannot bind it
            }
            if let Ok(Some(_)) = child.try_wait() {
                break; // it exited: the port was taken
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        port = free_port();
    }
    panic!("no redis-server listening after 5 tries");
}

/// Whether the redis-server answering on `port` is the process `pid` (`INFO server`).
fn serves(port: u16, pid: u32) -> bool {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "info", "server"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == format!("process_id:{pid}"))
        })
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on port {port} after {limit:?}");
}

/// The PostgreSQL server the test script made sure is up (`CLAIMGATE_TEST_PG`, default
/// `postgres://postgres@127.0.0.1:5432/postgres`). Tests create their own databases on it.
pub fn pg_admin_url() -> String {
    std::env::var("CLAIMGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A throwaway PostgreSQL database, dropped when this value is dropped.
pub struct PgDb {
    pub url: String,
    name: String,
}

impl PgDb {
    /// Creates `claimgate_test_<pid>_<random>` on the test server. Panics with a clear
    /// message when no server is reachable: the suite must not silently skip.
    pub fn create() -> PgDb {
        let name = format!(
            "claimgate_test_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        psql(&format!("CREATE DATABASE {name}"));
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        PgDb {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .arg(pg_admin_url())
        .args(["-v", "ON_ERROR_STOP=1", "-qtAc", sql])
        .output()
        .expect("psql on PATH (the test script installs PostgreSQL)");
    assert!(
        out.status.success(),
        "psql {sql:?} failed (is PostgreSQL up at {}?): {}",
        pg_admin_url(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Path of a binary built by cargo for this test run.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    dir.join(name)
}

/// A `claimgate serve` process of our own on a free port.
pub struct Gateway {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Gateway {
    /// Starts the binary with `args` (e.g. `--backend`, `--set`), listening on a free port,
    /// and waits until `/healthz` answers.
    pub fn start(args: &[String]) -> Gateway {
        let mut g = Gateway {
            port: free_port(),
            args: args.to_vec(),
            child: None,
        };
        g.launch();
        g
    }

    fn launch(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_claimgate"))
            .args(&self.args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("serve")
            .env("CLAIMGATE_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn claimgate");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30));
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again with the same arguments and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    /// SIGTERM, then wait for the exit; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let status = c.wait().expect("wait");
        (status, started.elapsed())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A small keep-alive HTTP/1.1 client for tests against a running gateway.
pub mod http {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use serde_json::Value;

    #[derive(Clone)]
    pub struct Http {
        client: Client<HttpConnector, Full<Bytes>>,
        pub base: String,
    }

    impl Http {
        pub fn new(base: &str) -> Http {
            Http {
                client: Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(256)
                    .build_http(),
                base: base.to_string(),
            }
        }

        /// `Err` for transport failures (connection refused or reset: indeterminate).
        pub async fn send(
            &self,
            method: &str,
            path: &str,
            body: &str,
        ) -> Result<(u16, Value), String> {
            let (status, bytes) = self.send_raw(method, path, body).await?;
            Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        }

        /// A body that is not JSON (`/metrics`); panics on a transport failure.
        pub async fn send_text(&self, method: &str, path: &str) -> (u16, String) {
            let (status, bytes) = self.send_raw(method, path, "").await.expect("an answer");
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }

        async fn send_raw(
            &self,
            method: &str,
            path: &str,
            body: &str,
        ) -> Result<(u16, Bytes), String> {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|e| e.to_string())?;
            let fut = self.client.request(req);
            let resp = tokio::time::timeout(std::time::Duration::from_secs(20), fut)
                .await
                .map_err(|_| "timeout".to_string())?
                .map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, bytes))
        }
    }
}

/// A Redis Cluster of our own: primaries (and optionally replicas) on free ports, no
/// persistence; a failed node is failed over after `CLUSTER_NODE_TIMEOUT_MS`.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
    children: Vec<Option<Child>>,
}

/// `cluster-node-timeout` of the test clusters: a primary is failed over this long after it
/// stops answering.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        Self::start_with_replicas(n, 0)
    }

    /// `primaries` primaries with `replicas` replicas each (`redis-cli --cluster create
    /// --cluster-replicas`).
    pub fn start_with_replicas(primaries: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = primaries * (1 + replicas);
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut c = RedisCluster {
            ports,
            dir,
            children: Vec::new(),
        };
        for i in 0..n {
            let (port, child) = listening(c.ports[i], |p| c.launch(p));
            c.ports[i] = port;
            c.children.push(Some(child));
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        c.wait_healthy(Duration::from_secs(30));
        if replicas > 0 {
            let start = Instant::now();
            while c.replicas_linked() < primaries * replicas {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "replicas never linked"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    fn launch(&self, port: u16) -> Child {
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args([
                "--cluster-node-timeout",
                &CLUSTER_NODE_TIMEOUT_MS.to_string(),
            ])
            // a replica may take over however long it was cut off
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server")
    }

    fn cli(port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn alive(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Waits until every live node says the cluster is ok with every slot served.
    pub fn wait_healthy(&self, limit: Duration) {
        let start = Instant::now();
        while !self.alive().iter().all(|p| {
            let info = Self::cli(*p, &["cluster", "info"]);
            info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
        }) {
            assert!(start.elapsed() < limit, "cluster never became ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The ports of the primaries serving slots, as a live node sees them.
    pub fn primaries(&self) -> Vec<u16> {
        let Some(any) = self.alive().first().copied() else {
            return Vec::new();
        };
        Self::cli(any, &["cluster", "nodes"])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (addr, flags) = (f.get(1)?, f.get(2)?);
                let serving = flags.contains("master") && !flags.contains("fail") && f.len() > 8;
                let port = addr.split('@').next()?.rsplit(':').next()?.parse().ok()?;
                serving.then_some(port)
            })
            .collect()
    }

    /// The ports of the primaries that have a live replica to fail over to.
    pub fn primaries_with_a_replica(&self) -> Vec<u16> {
        let Some(any) = self.alive().first().copied() else {
            return Vec::new();
        };
        let nodes = Self::cli(any, &["cluster", "nodes"]);
        let rows: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .filter(|f: &Vec<&str>| f.len() >= 8)
            .collect();
        let backed: std::collections::HashSet<&str> = rows
            .iter()
            .filter(|f| f[2].contains("slave") && !f[2].contains("fail"))
            .map(|f| f[3])
            .collect();
        rows.iter()
            .filter(|f| f[2].contains("master") && !f[2].contains("fail") && f.len() > 8)
            .filter(|f| backed.contains(f[0]))
            .filter_map(|f| f[1].split('@').next()?.rsplit(':').next()?.parse().ok())
            .collect()
    }

    /// Live replicas whose link to their primary is up.
    pub fn replicas_linked(&self) -> usize {
        self.alive()
            .iter()
            .filter(|p| {
                let r = Self::cli(**p, &["info", "replication"]);
                r.contains("role:slave") && r.contains("master_link_status:up")
            })
            .count()
    }

    /// `kill -9` of the node on `port`.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the node on `port` again, empty (no persistence): it rejoins with its
    /// cluster config and, its slots taken over meanwhile, as a replica.
    pub fn restart_empty(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        assert!(self.children[i].is_none(), "running");
        let child = self.launch(port);
        self.children[i] = Some(child);
        wait_for_port(port, Duration::from_secs(10));
    }

    /// A URL fred reads as a cluster, naming every node.
    pub fn url(&self) -> String {
        let rest: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.ports[0],
            rest.join("&")
        )
    }

    /// Keys held by each node.
    pub fn key_counts(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|p| {
                let out = Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "dbsize"])
                    .output()
                    .expect("redis-cli");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .collect()
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
