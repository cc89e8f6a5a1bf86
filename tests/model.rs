//! The stateful randomized model test (issue 8): real `claimgate serve` processes over HTTP,
//! driven by a seeded random sequence of operations, checked after every step against a
//! model of what every answer so far implies.
//!
//! Operations (weighted): create (sometimes two racing creates of one id, with the same or a
//! different definition), re-create of an existing batch, patch (add_stock, pause, resume;
//! sometimes racing pairs, sometimes racing a claim burst), concurrent claim bursts (several users, with and without request
//! ids, users past their limit, twin requests with one request id), replay of a past request
//! id, backend data loss, `claimgate rebuild` (of every lost batch at once, or of a few,
//! the others staying lost for later steps: claims, replays, changes and re-creates of a
//! lost batch are refused and mint nothing), and gateway restart (kill -9 or SIGTERM).
//!
//! Invariants checked after every step, once the persister has drained:
//! - no coupon id is ever answered twice (across batches, restarts and data losses);
//! - no oversell: coupons issued (and sequence numbers consumed) never pass the total;
//! - no user holds more coupons of a batch than its per-user limit;
//! - stock is conserved: the gateway's `{total, claimed, remaining}` is the model's;
//! - a replayed request id answers its original coupon (200);
//! - the database holds exactly the acknowledged coupons, and `GET /v1/admin/reconcile`
//!   reports no difference between the backend and the database.
//!
//! Claims acknowledged (201) but not yet persisted may be lost with the backend's data; the
//! model allows that ONLY for a data loss (learnt when the batch is rebuilt; never when the
//! gateway was stopped with SIGTERM first, which flushes), counts and prints them, and keeps
//! their ids in the set that must never be answered again.
//!
//! Two variants: `model_embedded` (embedded backend with its append-only file + SQLite; data
//! loss = stop the gateway, delete the append-only file, start again, the batches answer 503
//! until `claimgate rebuild`) and `model_redis` (redis backend + PostgreSQL, two gateways on
//! the one Redis taking requests in turn, so every cache answer and event crosses
//! instances; data loss = `RedisServer::restart_empty`, then `claimgate rebuild` against the
//! running gateways).
//!
//! Seeds and length: `CLAIMGATE_MODEL_SEEDS` (default `1,2,3`; a list of numbers and
//! inclusive ranges `a..b`) and `CLAIMGATE_MODEL_STEPS` (steps per seed, default
//! [`DEFAULT_STEPS`]). CI runs the defaults; the soak is the same test, longer:
//!
//! ```text
//! CLAIMGATE_MODEL_SEEDS=1..50 CLAIMGATE_MODEL_STEPS=5000 cargo test --release --test model -- --nocapture
//! ```
//!
//! A failure prints the variant, the seed, the step and the last [`HISTORY`] operations with
//! their answers: rerun with `CLAIMGATE_MODEL_SEEDS=<seed>` to draw the same operations
//! (racing requests may be answered in another order from run to run, and the operations
//! that depend on those answers, such as which request id a replay picks, may then differ).
//! The gateways log nothing unless `CLAIMGATE_MODEL_LOG` names a level (e.g. `warn`).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use claimgate::config::DatabaseConfig;
use claimgate::domain::ids::{parse_coupon_id, seq_position};
use claimgate::store::Db;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::http::Http;
use support::watchdog::{Watchdog, step};
use support::{Gateway, PgDb, RedisServer};

/// Steps per seed when `CLAIMGATE_MODEL_STEPS` is not set (each variant ~30-60 s here).
const DEFAULT_STEPS: usize = 80;
/// Operations kept for the failure report.
const HISTORY: usize = 30;
/// Batches a run creates at most (then creates become re-creates).
const MAX_BATCHES: usize = 6;
/// Users a burst draws from (few, so limits are reached).
const USERS: u64 = 6;
/// The longest wait for the persister to drain, a gateway to come up, a rebuild to show.
const BOUND: Duration = Duration::from_secs(30);
/// Gateways sharing the Redis of `model_redis`.
const GATEWAYS_ON_REDIS: usize = 2;
/// `cache.refresh_ms` of the gateways.
const REFRESH_MS: u64 = 100;

/// After a change, a create or a rebuild: every gateway's cache has caught up (by the
/// change's event, at the latest by its periodic refresh). The cache may refuse from a
/// stale entry until then (`catalog/cache.rs`); the model does not allow it after.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(3 * REFRESH_MS)).await;
}

// ---------------------------------------------------------------------------------------
// seeds, PRNG, failure report

/// SplitMix64: small, seedable, the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5eed_c1a1_6a7e_0008)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }
    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn seeds() -> Vec<u64> {
    let spec = std::env::var("CLAIMGATE_MODEL_SEEDS").unwrap_or_else(|_| "1,2,3".into());
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b): (u64, u64) = (
                    a.trim().parse().expect("CLAIMGATE_MODEL_SEEDS: a number"),
                    b.trim().parse().expect("CLAIMGATE_MODEL_SEEDS: a number"),
                );
                out.extend(a..=b);
            }
            None => out.push(part.parse().expect("CLAIMGATE_MODEL_SEEDS: a number")),
        }
    }
    assert!(!out.is_empty(), "CLAIMGATE_MODEL_SEEDS names no seed");
    out
}

fn steps() -> usize {
    std::env::var("CLAIMGATE_MODEL_STEPS")
        .ok()
        .map(|s| s.parse().expect("CLAIMGATE_MODEL_STEPS: a number"))
        .unwrap_or(DEFAULT_STEPS)
}

/// Where the run is, and what it did lately: printed if the test panics.
struct Trail {
    variant: &'static str,
    seed: u64,
    step: usize,
    ops: VecDeque<String>,
}

static TRAIL: Mutex<Option<Trail>> = Mutex::new(None);

/// Adds a line to the history (the op and, later, what it was answered).
fn note(line: impl Into<String>) {
    if let Some(t) = TRAIL.lock().as_mut() {
        if t.ops.len() == HISTORY {
            t.ops.pop_front();
        }
        t.ops.push_back(format!("#{} {}", t.step, line.into()));
    }
}

/// Prints the seed, the step and the history when dropped during a panic.
struct Report;

impl Drop for Report {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(t) = TRAIL.lock().as_ref() {
            let mut text = format!(
                "\n==== model test FAILED: variant {}, seed {}, step {} \
                 (reproduce: CLAIMGATE_MODEL_SEEDS={} CLAIMGATE_MODEL_STEPS={}) ====\n\
                 last operations, oldest first:\n",
                t.variant,
                t.seed,
                t.step,
                t.seed,
                t.step + 1
            );
            for op in &t.ops {
                text.push_str("  ");
                text.push_str(op);
                text.push('\n');
            }
            eprintln!("{text}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// the world: a gateway, its backend, its database

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Embedded,
    Redis,
}

struct World {
    variant: Variant,
    dir: tempfile::TempDir,
    redis: Option<RedisServer>,
    _pg: Option<PgDb>,
    /// `--backend ... --database-url ...` (+ `--redis-url` or the append-only file).
    store: Vec<String>,
    /// The gateways: one on the embedded backend (it owns its append-only file), two on
    /// one Redis (each with its cache, its persister, the other's events).
    gws: Vec<Gateway>,
    https: Vec<Http>,
    /// Requests go to the gateways in turn.
    turn: std::sync::atomic::AtomicUsize,
    db: Db,
}

/// The gateways' settings. Their log is off (a lost batch is logged as an error, and this
/// test loses batches on purpose); `CLAIMGATE_MODEL_LOG=warn` (any `log.level`) shows it.
fn settings() -> Vec<String> {
    let log = std::env::var("CLAIMGATE_MODEL_LOG").unwrap_or_else(|_| "off".into());
    [
        "limits.claim_per_user.per_second=0".to_string(),
        "limits.admission_wait_ms=10000".to_string(),
        "persister.flush_interval_ms=5".to_string(),
        "persister.min_idle_ms=500".to_string(),
        "stock.sweep_min_age_ms=200".to_string(),
        format!("cache.refresh_ms={REFRESH_MS}"),
        "server.shutdown_grace_ms=5000".to_string(),
        format!("log.level={}", toml::Value::String(log)),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

impl World {
    async fn start(variant: Variant) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let (redis, pg, store, db_url) = match variant {
            Variant::Embedded => {
                let db_url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("model.db").display()
                );
                let aof = aof_dir(dir.path()).join("model.aof");
                let store = vec![
                    "--backend".into(),
                    "embedded".into(),
                    "--database-url".into(),
                    db_url.clone(),
                    "--set".into(),
                    format!("embedded.aof_path=\"{}\"", aof.display()),
                ];
                (None, None, store, db_url)
            }
            Variant::Redis => {
                let redis = RedisServer::start();
                let pg = PgDb::create();
                let store = vec![
                    "--backend".into(),
                    "redis".into(),
                    "--redis-url".into(),
                    redis.url(),
                    "--database-url".into(),
                    pg.url.clone(),
                ];
                let url = pg.url.clone();
                (Some(redis), Some(pg), store, url)
            }
        };
        let mut args = settings();
        args.extend(store.iter().cloned());
        let n = match variant {
            Variant::Embedded => 1,
            Variant::Redis => GATEWAYS_ON_REDIS,
        };
        let gws: Vec<Gateway> = (0..n).map(|_| Gateway::start(&args)).collect();
        let https: Vec<Http> = gws.iter().map(|g| Http::new(&g.base())).collect();
        for http in &https {
            wait_healthy(http).await;
        }
        let db = Db::connect(&DatabaseConfig {
            url: db_url,
            ..Default::default()
        })
        .await
        .expect("the test's own connection to the database");
        World {
            variant,
            dir,
            redis,
            _pg: pg,
            store,
            gws,
            https,
            turn: Default::default(),
            db,
        }
    }

    /// The client of the next gateway in turn.
    fn http(&self) -> &Http {
        let i = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.https[i % self.https.len()]
    }

    /// Starts gateway `i` (stopped or running) again and waits until it is healthy. A fresh
    /// client: the old one's pooled connections died with the process.
    async fn relaunch(&mut self, i: usize) {
        self.gws[i].restart();
        self.https[i] = Http::new(&self.gws[i].base());
        wait_healthy(&self.https[i]).await;
    }

    /// SIGTERM to gateway `i`: must exit 0 within the grace period.
    fn terminate(&mut self, i: usize) {
        let (status, took) = self.gws[i].terminate();
        assert!(status.success(), "SIGTERM: exit status {status:?}");
        assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    }

    /// `claimgate rebuild --batch <id>` with the gateway's store flags.
    fn rebuild(&self, batch: &str) -> String {
        let mut cmd = support::bin::claimgate(self.dir.path());
        cmd.args(&self.store).args(["rebuild", "--batch", batch]);
        let out = support::bin::output_within(&mut cmd, BOUND);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "rebuild of {batch}: {:?}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.trim().to_string()
    }

    async fn send(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.send_to(self.http(), method, path, body).await
    }

    async fn send_to(&self, http: &Http, method: &str, path: &str, body: &str) -> (u16, Value) {
        match http.send(method, path, body).await {
            Ok(r) => r,
            Err(e) => panic!("{method} {path}: no answer from a live gateway: {e}"),
        }
    }
}

fn aof_dir(root: &Path) -> PathBuf {
    root.join("aof")
}

async fn wait_healthy(http: &Http) {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Ok((200, _)) = http.send("GET", "/healthz", "").await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway not healthy in {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn code(v: &Value) -> &str {
    v["error"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------
// the model

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Active,
    Paused,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Paused => "paused",
        }
    }
}

#[derive(Clone, Debug)]
struct Held {
    user: String,
    rid: Option<String>,
}

#[derive(Debug)]
struct BatchM {
    /// The create body that won (a re-create sends it again).
    body: String,
    created_stock: i64,
    shards: u32,
    limit: i64,
    total: i64,
    state: State,
    /// Coupons acknowledged and not lost: coupon id -> holder.
    live: BTreeMap<String, Held>,
    /// (user, request id) -> coupon, for replays.
    rids: HashMap<(String, String), String>,
    /// What the gateway counts as claimed: live coupons plus sequence numbers consumed by
    /// coupons lost in a data loss below a surviving one (a rebuild never re-sells those).
    consumed: i64,
    /// Lost from the backend, not yet rebuilt: `Some(graceful)`, graceful when the loss came
    /// after a SIGTERM (which flushes: then nothing acknowledged may be missing).
    lost: Option<bool>,
    /// (user, request id) of coupons lost with the backend: asked again, a fresh claim.
    lost_rids: Vec<(String, String)>,
}

impl BatchM {
    fn held_by(&self, user: &str) -> i64 {
        self.live.values().filter(|h| h.user == user).count() as i64
    }
}

#[derive(Default)]
struct Model {
    batches: BTreeMap<String, BatchM>,
    /// Every coupon id ever answered (201 or 200), lost ones included: never again.
    ever: HashMap<String, String>,
    /// Coupons acknowledged, then lost with the backend's data (step, coupon, holder).
    lost: Vec<(usize, String, String)>,
    next_batch: u32,
    next_rid: u64,
    /// 503 `overloaded` answers to claims (nothing claimed; counted for the report).
    overloaded: u64,
    /// Tallies for the final line.
    ops: BTreeMap<&'static str, u64>,
}

impl Model {
    fn rid(&mut self) -> String {
        self.next_rid += 1;
        format!("r{}", self.next_rid)
    }

    /// A fresh 201: a new coupon id for this batch and user.
    fn issue(&mut self, batch: &str, coupon: &str, user: &str, rid: Option<&str>) {
        let (b, shard, _) =
            parse_coupon_id(coupon).unwrap_or_else(|| panic!("malformed coupon id {coupon}"));
        let m = self.batches.get_mut(batch).expect("batch in the model");
        assert_eq!(b, batch, "coupon {coupon} answered for batch {batch}");
        assert!(shard < m.shards, "coupon {coupon}: shard past {}", m.shards);
        if let Some(before) = self
            .ever
            .insert(coupon.to_string(), format!("{batch}/{user}"))
        {
            panic!("coupon id {coupon} issued twice: first to {before}, now to {batch}/{user}");
        }
        m.live.insert(
            coupon.to_string(),
            Held {
                user: user.to_string(),
                rid: rid.map(str::to_string),
            },
        );
        if let Some(r) = rid {
            let key = (user.to_string(), r.to_string());
            // a lost coupon's request id, granted again: a live one now
            m.lost_rids.retain(|k| *k != key);
            m.rids.insert(key, coupon.to_string());
        }
        m.consumed += 1;
    }
}

fn batch_body(id: &str, stock: i64, limit: i64, shards: u32) -> String {
    json!({
        "id": id, "name": "model batch", "stock": stock, "per_user_limit": limit,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": shards
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------
// operations

struct Run {
    w: World,
    m: Model,
    rng: Rng,
    step: usize,
}

impl Run {
    fn count(&mut self, op: &'static str) {
        *self.m.ops.entry(op).or_default() += 1;
    }

    fn pick_batch(&mut self) -> Option<String> {
        let n = self.m.batches.len() as u64;
        if n == 0 {
            return None;
        }
        let i = self.rng.below(n) as usize;
        self.m.batches.keys().nth(i).cloned()
    }

    /// A new batch (40%: two racing creates of its id).
    async fn create(&mut self) {
        if self.m.batches.len() >= MAX_BATCHES {
            return self.recreate().await;
        }
        self.count("create");
        self.m.next_batch += 1;
        let id = format!("b{}", self.m.next_batch);
        let (stock, limit, shards) = (
            self.rng.range(3, 40),
            self.rng.range(1, 3),
            self.rng.range(1, 4) as u32,
        );
        let body = batch_body(&id, stock, limit, shards);
        let race = self.rng.below(5);
        let bodies = match race {
            0 => vec![body.clone(), body.clone()],
            1 => {
                let other = batch_body(
                    &id,
                    stock + self.rng.range(1, 5),
                    limit,
                    self.rng.range(1, 4) as u32,
                );
                vec![body.clone(), other]
            }
            _ => vec![body.clone()],
        };
        note(format!(
            "create {id} stock {stock} limit {limit} shards {shards} ({})",
            ["racing twin", "racing a different definition", "alone"][race.min(2) as usize]
        ));
        let answers = self.concurrently_post("/v1/batches", &bodies).await;
        note(format!(
            "  -> {:?}",
            answers
                .iter()
                .map(|(s, v)| format!("{s} {}", code(v)))
                .collect::<Vec<_>>()
        ));
        let won: Vec<usize> = (0..answers.len())
            .filter(|&i| answers[i].0 == 201)
            .collect();
        for (s, v) in &answers {
            assert!(
                *s == 201 || (*s == 409 && code(v) == "batch_exists"),
                "create {id}: {s} {v}"
            );
        }
        let same = bodies.iter().all(|b| *b == bodies[0]);
        if same {
            assert_eq!(won.len(), bodies.len(), "identical creates: {answers:?}");
        } else {
            assert_eq!(
                won.len(),
                1,
                "different definitions, one winner: {answers:?}"
            );
        }
        let winner = &answers[won[0]].1;
        let body = bodies[won[0]].clone();
        let def: Value = serde_json::from_str(&body).unwrap();
        for k in ["stock", "shards", "per_user_limit"] {
            assert_eq!(
                winner[k], def[k],
                "the 201 answer is not the winner's: {winner}"
            );
        }
        self.m.batches.insert(
            id,
            BatchM {
                body,
                created_stock: def["stock"].as_i64().unwrap(),
                shards: def["shards"].as_u64().unwrap() as u32,
                limit: def["per_user_limit"].as_i64().unwrap(),
                total: def["stock"].as_i64().unwrap(),
                state: State::Active,
                live: BTreeMap::new(),
                rids: HashMap::new(),
                consumed: 0,
                lost: None,
                lost_rids: Vec::new(),
            },
        );
    }

    /// The create of an existing batch again, with its original body: 201 while its stored
    /// definition is still that body, 409 `batch_exists` once a change made it another.
    async fn recreate(&mut self) {
        // every run starts with a batch
        let Some(id) = self.pick_batch() else {
            return;
        };
        self.count("recreate");
        let b = &self.m.batches[&id];
        let same = b.total == b.created_stock && b.state == State::Active;
        let lost = b.lost.is_some();
        let body = b.body.clone();
        note(format!(
            "re-create {id} (definition unchanged: {same}, lost: {lost})"
        ));
        let (s, v) = self.w.send("POST", "/v1/batches", &body).await;
        note(format!("  -> {s} {}", code(&v)));
        if same && lost {
            assert_eq!(
                (s, code(&v)),
                (503, "backend_unavailable"),
                "re-create of lost {id}: {v}"
            );
        } else if same {
            assert_eq!(s, 201, "re-create of {id}, unchanged: {v}");
        } else {
            assert_eq!(
                (s, code(&v)),
                (409, "batch_exists"),
                "re-create of {id}, changed: {v}"
            );
        }
    }

    async fn concurrently_post(&self, path: &str, bodies: &[String]) -> Vec<(u16, Value)> {
        self.concurrently(bodies.iter().map(|b| ("POST", path.to_string(), b.clone())))
            .await
    }

    async fn concurrently(
        &self,
        reqs: impl Iterator<Item = (&'static str, String, String)>,
    ) -> Vec<(u16, Value)> {
        let tasks: Vec<_> = reqs
            .map(|(method, path, body)| {
                let http = self.w.http().clone();
                tokio::spawn(async move {
                    match http.send(method, &path, &body).await {
                        Ok(r) => r,
                        Err(e) => panic!("{method} {path}: no answer from a live gateway: {e}"),
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("request task"));
        }
        out
    }

    fn random_change(&mut self) -> Value {
        match self.rng.below(3) {
            0 => json!({"state": "paused"}),
            1 => json!({"state": "active"}),
            _ => json!({"add_stock": self.rng.range(1, 10)}),
        }
    }

    /// add_stock, pause or resume; 30%: two at once.
    async fn patch(&mut self) {
        let Some(id) = self.pick_batch() else {
            return self.create().await;
        };
        self.count("patch");
        let n = if self.rng.chance(30) { 2 } else { 1 };
        let changes: Vec<Value> = (0..n).map(|_| self.random_change()).collect();
        note(format!("patch {id} {changes:?}"));
        let path = format!("/v1/batches/{id}");
        let answers = self
            .concurrently(
                changes
                    .iter()
                    .map(|c| ("PATCH", path.clone(), c.to_string())),
            )
            .await;
        note(format!(
            "  -> {:?}",
            answers
                .iter()
                .map(|(s, v)| format!("{s} {}", code(v)))
                .collect::<Vec<_>>()
        ));
        if self.m.batches[&id].lost.is_some() {
            for (s, v) in &answers {
                assert_eq!(
                    (*s, code(v)),
                    (503, "backend_unavailable"),
                    "patch of lost {id}: {v}"
                );
            }
            return;
        }
        for (s, v) in &answers {
            assert_eq!(*s, 200, "patch {id}: {v}");
        }
        let b = self.m.batches.get_mut(&id).unwrap();
        let mut states = Vec::new();
        for c in &changes {
            if let Some(a) = c["add_stock"].as_i64() {
                b.total += a;
            }
            match c["state"].as_str() {
                Some("paused") => states.push(State::Paused),
                Some("active") => states.push(State::Active),
                _ => {}
            }
        }
        b.state = match states.as_slice() {
            [] => b.state,
            [one] => *one,
            _ => {
                // racing state changes: one of them is last; which, the gateway says
                let (s, v) = self.w.send("GET", &path, "").await;
                assert_eq!(s, 200, "{v}");
                let now = match v["batch"]["state"].as_str() {
                    Some("paused") => State::Paused,
                    Some("active") => State::Active,
                    other => panic!("{id}: state {other:?}"),
                };
                assert!(states.contains(&now), "{id}: state {now:?}, set {states:?}");
                note(format!("  state now {}", now.as_str()));
                now
            }
        };
        settle().await;
    }

    /// A burst of concurrent claims on one batch.
    async fn claims(&mut self) {
        let Some(id) = self.pick_batch() else {
            return self.create().await;
        };
        self.count("claims");
        // (user, request id, twin of an earlier request)
        let n = self.rng.range(2, 12) as usize;
        let mut reqs: Vec<(String, Option<String>)> = Vec::new();
        for _ in 0..n {
            let user = format!("u{}", self.rng.below(USERS));
            let rid = if self.rng.chance(70) {
                Some(self.m.rid())
            } else {
                None
            };
            if rid.is_some() && self.rng.chance(15) {
                reqs.push((user.clone(), rid.clone()));
            }
            reqs.push((user, rid));
        }
        // 30%: the request id of a coupon lost with the backend, asked again: a fresh claim
        let b = &self.m.batches[&id];
        if !b.lost_rids.is_empty() && self.rng.chance(30) {
            let (u, r) = b.lost_rids[self.rng.below(b.lost_rids.len() as u64) as usize].clone();
            reqs.push((u, Some(r)));
        }
        if b.lost.is_some() {
            return self.claims_while_lost(&id, reqs).await;
        }
        let (total, consumed, state, limit) = {
            let b = &self.m.batches[&id];
            (b.total, b.consumed, b.state, b.limit)
        };
        // 20%: a change races the burst (at a random place among the requests)
        let racing = self.rng.chance(20).then(|| {
            let change = self.random_change();
            (self.rng.below(reqs.len() as u64 + 1) as usize, change)
        });
        let before: HashMap<String, i64> = reqs
            .iter()
            .map(|(u, _)| (u.clone(), self.m.batches[&id].held_by(u)))
            .collect();
        note(format!(
            "claims on {id} ({} of {total} left, {}, limit {limit}): {}{}",
            total - consumed,
            state.as_str(),
            reqs.iter()
                .map(|(u, r)| format!("{u}/{}", r.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>()
                .join(" "),
            match &racing {
                Some((at, c)) => format!(", racing patch {c} at {at}"),
                None => String::new(),
            }
        ));
        let path = format!("/v1/batches/{id}/claims");
        let mut sent: Vec<(&'static str, String, String)> = reqs
            .iter()
            .map(|(u, r)| {
                let body = match r {
                    Some(r) => json!({"user_id": u, "request_id": r}),
                    None => json!({"user_id": u}),
                };
                ("POST", path.clone(), body.to_string())
            })
            .collect();
        if let Some((at, change)) = &racing {
            sent.insert(
                *at,
                ("PATCH", format!("/v1/batches/{id}"), change.to_string()),
            );
        }
        let mut answers = self.concurrently(sent.into_iter()).await;
        let (total_after, state_after) = match &racing {
            Some((at, change)) => {
                let (s, v) = answers.remove(*at);
                note(format!("  patch -> {s} {}", code(&v)));
                assert_eq!(s, 200, "patch {id} racing claims: {v}");
                let b = self.m.batches.get_mut(&id).unwrap();
                b.total += change["add_stock"].as_i64().unwrap_or(0);
                match change["state"].as_str() {
                    Some("paused") => b.state = State::Paused,
                    Some("active") => b.state = State::Active,
                    _ => {}
                }
                (b.total, b.state)
            }
            None => (total, state),
        };
        if racing.is_some() {
            settle().await;
        }
        let paused_ok = state == State::Paused || state_after == State::Paused;
        let lifted = racing.as_ref().and_then(|(_, c)| {
            if c["add_stock"].is_i64() {
                Some("sold_out")
            } else if c["state"] == json!("active") {
                Some("paused")
            } else {
                None
            }
        });
        let grant_ok = state == State::Active || state_after == State::Active;
        note(format!(
            "  -> {}",
            answers
                .iter()
                .map(|(s, v)| match s {
                    200 | 201 => format!("{s} {}", v["coupon_id"].as_str().unwrap_or("?")),
                    _ => format!("{s} {}", code(v)),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));

        // Group by request: a twin pair (same user and request id) is one request.
        let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
        for (i, (u, r)) in reqs.iter().enumerate() {
            let key = match r {
                Some(r) => (u.clone(), r.clone()),
                None => (u.clone(), format!("~{i}")),
            };
            groups.entry(key).or_default().push(i);
        }
        let mut granted: HashMap<String, i64> = HashMap::new();
        let mut attempts: HashMap<String, i64> = HashMap::new();
        let (mut sold_out, mut overloaded) = (false, false);
        let mut at_limit_users = HashSet::new();
        for ((user, _), idx) in &groups {
            *attempts.entry(user.clone()).or_default() += 1;
            let rid = reqs[idx[0]].1.clone();
            let mut coupon: Option<String> = None;
            let mut fresh = 0;
            for &i in idx {
                let (s, v) = &answers[i];
                match (*s, code(v)) {
                    (201 | 200, _) => {
                        let c = v["coupon_id"].as_str().expect("coupon_id").to_string();
                        assert_eq!(v["user_id"], json!(user), "{v}");
                        assert_eq!(v["batch_id"], json!(id), "{v}");
                        if let Some(prev) = &coupon {
                            assert_eq!(prev, &c, "one request id, two coupons: {v}");
                        }
                        coupon = Some(c);
                        if *s == 201 {
                            fresh += 1;
                        }
                    }
                    (409, "limit_reached") => {
                        at_limit_users.insert(user.clone());
                    }
                    (410, "sold_out") => sold_out = true,
                    (409, "paused") => assert!(paused_ok, "{id}: paused? {v}"),
                    (503, "overloaded") => overloaded = true,
                    _ => panic!("claim {user} on {id}: unexpected {s} {v}"),
                }
            }
            if let Some(c) = coupon {
                assert_eq!(
                    fresh, 1,
                    "{user}/{rid:?}: a granted request is answered 201 once, 200 after"
                );
                // A twin refused while the other got the coupon: only a refusal a racing
                // change lifted (the refusal then came first: sold out before add_stock,
                // paused before resume); refusals are not remembered, coupons are.
                assert!(
                    idx.iter().all(|&i| matches!(answers[i].0, 200 | 201)
                        || lifted.is_some_and(|l| code(&answers[i].1) == l)),
                    "{user}/{rid:?}: the same request id got a coupon and a refusal"
                );
                self.m.issue(&id, &c, user, rid.as_deref());
                *granted.entry(user.clone()).or_default() += 1;
            }
        }
        if overloaded {
            self.m.overloaded += 1;
        }
        let b = &self.m.batches[&id];
        let issued: i64 = granted.values().sum();
        if !grant_ok {
            assert_eq!(issued, 0, "{id} is paused, yet claims were granted");
        }
        for (user, n) in &granted {
            assert!(
                before[user] + n <= limit,
                "{user} holds {} of {id}, limit {limit}",
                before[user] + n
            );
        }
        assert!(
            b.consumed <= b.total,
            "{id} oversold: {} of {}",
            b.consumed,
            b.total
        );
        for user in &at_limit_users {
            assert_eq!(
                b.held_by(user),
                limit,
                "{user} was refused limit_reached on {id} below the limit"
            );
        }
        if sold_out {
            // answered when what was consumed then was the total then (before or after a
            // racing add_stock); both only grow
            assert!(
                b.consumed >= total,
                "{id}: sold_out answered with {} left",
                total - b.consumed
            );
            if total == total_after {
                assert_eq!(b.consumed, total, "{id}: sold_out answered with stock left");
            }
        }
        if state == State::Active && state_after == State::Active && !sold_out && !overloaded {
            for (user, tries) in &attempts {
                let want = (*tries).min(limit - before[user]);
                assert_eq!(
                    granted.get(user).copied().unwrap_or(0),
                    want,
                    "{user} on {id}: {tries} requests, {} held before, limit {limit}",
                    before[user]
                );
            }
        }
    }

    /// A burst on a lost batch: nothing is granted.
    async fn claims_while_lost(&mut self, id: &str, reqs: Vec<(String, Option<String>)>) {
        note(format!(
            "claims on lost {id}: {}",
            reqs.iter()
                .map(|(u, r)| format!("{u}/{}", r.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let path = format!("/v1/batches/{id}/claims");
        let answers = self
            .concurrently(reqs.iter().map(|(u, r)| {
                let body = match r {
                    Some(r) => json!({"user_id": u, "request_id": r}),
                    None => json!({"user_id": u}),
                };
                ("POST", path.clone(), body.to_string())
            }))
            .await;
        let b = &self.m.batches[id];
        for ((u, _), (s, v)) in reqs.iter().zip(&answers) {
            note(format!("  -> {s} {}", code(v)));
            assert!(
                refused_while_lost(b, u, *s, v),
                "claim of {u} on lost {id}: {s} {v}"
            );
        }
    }

    /// A past successful request id again: the same coupon, 200.
    async fn replay(&mut self) {
        let all: Vec<(String, String, String, String)> = self
            .m
            .batches
            .iter()
            .flat_map(|(id, b)| {
                b.rids
                    .iter()
                    .map(move |((u, r), c)| (id.clone(), u.clone(), r.clone(), c.clone()))
            })
            .collect();
        if all.is_empty() {
            return self.claims().await;
        }
        self.count("replay");
        let (id, user, rid, coupon) = all[self.rng.below(all.len() as u64) as usize].clone();
        let twice = self.rng.chance(25);
        note(format!(
            "replay {user}/{rid} on {id} (want {coupon}){}",
            if twice { ", twice at once" } else { "" }
        ));
        let path = format!("/v1/batches/{id}/claims");
        let body = json!({"user_id": user, "request_id": rid}).to_string();
        let answers = self
            .concurrently(
                (0..if twice { 2 } else { 1 }).map(|_| ("POST", path.clone(), body.clone())),
            )
            .await;
        for (s, v) in &answers {
            note(format!(
                "  -> {s} {}",
                v["coupon_id"].as_str().unwrap_or(code(v))
            ));
            let b = &self.m.batches[&id];
            if b.lost.is_some() {
                assert!(
                    refused_while_lost(b, &user, *s, v),
                    "replay of {user}/{rid} on lost {id}: {s} {v}"
                );
                continue;
            }
            assert_eq!(*s, 200, "replay of {user}/{rid} on {id}: {v}");
            assert_eq!(v["coupon_id"], json!(coupon), "replay of {user}/{rid}: {v}");
            assert_eq!(v["user_id"], json!(user), "{v}");
        }
    }

    /// One gateway: kill -9 (60%) or SIGTERM, then start again.
    async fn restart(&mut self) {
        self.count("restart");
        let term = self.rng.chance(40);
        let i = self.rng.below(self.w.gws.len() as u64) as usize;
        note(format!(
            "gateway {i} restart ({})",
            if term { "SIGTERM" } else { "kill -9" }
        ));
        if self.rng.chance(70) {
            // claims just acknowledged, not yet drained to the database
            self.claims().await;
        }
        if term {
            self.w.terminate(i);
        }
        self.w.relaunch(i).await;
    }

    /// The backend loses its data: every batch is lost (503 for claims, creates, changes and
    /// reads, nothing minted) until `claimgate rebuild` restores it from the database; half
    /// the time every batch is rebuilt at once, else a random few (the rest later).
    async fn data_loss(&mut self) {
        self.count("data loss");
        let graceful = self.w.variant == Variant::Embedded && self.rng.chance(40);
        if self.rng.chance(80) {
            // claims just acknowledged, maybe not yet persisted: what a loss may take
            self.claims().await;
        }
        match self.w.variant {
            Variant::Embedded => {
                note(format!(
                    "data loss: gateway stopped ({}), append-only file deleted",
                    if graceful { "SIGTERM" } else { "kill -9" }
                ));
                if graceful {
                    self.w.terminate(0);
                } else {
                    self.w.gws[0].kill9();
                }
                let dir = aof_dir(self.w.dir.path());
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).expect("delete the append-only file");
                }
                self.w.relaunch(0).await;
            }
            Variant::Redis => {
                note("data loss: Redis restarted empty");
                self.w.redis.as_mut().unwrap().restart_empty();
            }
        }
        let ids: Vec<String> = self.m.batches.keys().cloned().collect();
        for id in &ids {
            let b = self.m.batches.get_mut(id).unwrap();
            // already lost: nothing more to lose since
            b.lost = Some(b.lost.unwrap_or(graceful));
        }
        for id in &ids {
            step(format!("seed step {}: {id} lost", self.step));
            let rid = self.m.rid();
            let (s, v) = self
                .w
                .send(
                    "POST",
                    &format!("/v1/batches/{id}/claims"),
                    &json!({"user_id": "newcomer", "request_id": rid}).to_string(),
                )
                .await;
            assert!(
                refused_while_lost(&self.m.batches[id], "newcomer", s, &v),
                "a claim on lost {id}: {s} {v}"
            );
            let (s, v) = self.w.send("GET", &format!("/v1/batches/{id}"), "").await;
            assert_eq!(s, 503, "GET of lost {id}: {v}");
        }
        let rebuild: Vec<String> = if self.rng.chance(50) {
            ids
        } else {
            ids.into_iter().filter(|_| self.rng.chance(40)).collect()
        };
        self.rebuild(rebuild).await;
    }

    /// `claimgate rebuild` of some lost batches (the others stay lost).
    async fn rebuild_some(&mut self) {
        let lost: Vec<String> = self
            .m
            .batches
            .iter()
            .filter(|(_, b)| b.lost.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        if lost.is_empty() {
            return self.claims().await;
        }
        self.count("rebuild");
        let pick: Vec<String> = lost
            .iter()
            .filter(|_| self.rng.chance(60))
            .cloned()
            .collect();
        let pick = if pick.is_empty() {
            vec![lost[0].clone()]
        } else {
            pick
        };
        self.rebuild(pick).await;
    }

    /// Rebuilds `ids` with the CLI (an embedded gateway is stopped meanwhile: the CLI opens
    /// the append-only file itself), waits until the gateway serves them, and learns from
    /// the database which acknowledged coupons were lost.
    async fn rebuild(&mut self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        note(format!("rebuild {ids:?}"));
        if self.w.variant == Variant::Embedded {
            self.w.terminate(0);
        }
        for id in &ids {
            step(format!("seed step {}: rebuild {id}", self.step));
            let report = self.w.rebuild(id);
            note(format!("  {report}"));
        }
        if self.w.variant == Variant::Embedded {
            self.w.relaunch(0).await;
        }
        // every gateway serves them again (its refresh or the rebuild's event)
        for id in &ids {
            for http in &self.w.https {
                let deadline = Instant::now() + BOUND;
                loop {
                    let (s, v) = self
                        .w
                        .send_to(http, "GET", &format!("/v1/batches/{id}"), "")
                        .await;
                    if s == 200 {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{id} still {s} {v} after its rebuild"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        settle().await;
        // What the database has is all that survived (the backend kept nothing to persist).
        for id in &ids {
            let db_coupons = db_coupons(&self.w.db, id, self.m.batches[id].shards).await;
            let b = self.m.batches.get_mut(id).unwrap();
            let graceful = b.lost.take() == Some(true);
            for (c, (user, _, _)) in &db_coupons {
                let held = b
                    .live
                    .get(c)
                    .unwrap_or_else(|| panic!("{c} of {user} in the database, never answered"));
                assert_eq!(&held.user, user, "{c}");
            }
            let gone: Vec<String> = b
                .live
                .keys()
                .filter(|c| !db_coupons.contains_key(*c))
                .cloned()
                .collect();
            assert!(
                !graceful || gone.is_empty(),
                "{id}: {} coupons lost although the gateway was stopped with SIGTERM: {gone:?}",
                gone.len()
            );
            for c in gone {
                let held = b.live.remove(&c).unwrap();
                if let Some(r) = &held.rid {
                    b.rids.remove(&(held.user.clone(), r.clone()));
                    b.lost_rids.push((held.user.clone(), r.clone()));
                }
                note(format!("  lost {c} of {}", held.user));
                self.m.lost.push((self.step, c, held.user));
            }
            // the rebuilt counters: per shard, the highest position that survived
            let mut top: HashMap<u32, u64> = HashMap::new();
            for (c, _) in db_coupons.iter() {
                let (_, shard, seq) = parse_coupon_id(c).unwrap();
                let t = top.entry(shard).or_default();
                *t = (*t).max(seq_position(seq));
            }
            b.consumed = top.values().sum::<u64>() as i64;
            assert!(b.consumed >= b.live.len() as i64);
        }
    }
}

/// What a claim on a lost batch may be answered: 503, or a refusal the gateway's cache of
/// negative answers still gives from before the loss (sold out, paused, the user at the
/// limit). Never a coupon.
fn refused_while_lost(b: &BatchM, user: &str, s: u16, v: &Value) -> bool {
    match (s, code(v)) {
        (503, "backend_unavailable") => true,
        (410, "sold_out") => b.consumed == b.total,
        (409, "paused") => b.state == State::Paused,
        (409, "limit_reached") => b.held_by(user) >= b.limit,
        _ => false,
    }
}

/// The coupons of a batch in the database: coupon -> (user, request id, seq).
async fn db_coupons(
    db: &Db,
    batch: &str,
    shards: u32,
) -> BTreeMap<String, (String, Option<String>, u64)> {
    let mut out = BTreeMap::new();
    for shard in 0..shards {
        for c in db.claims_of_shard(batch, shard).await.expect("claims") {
            out.insert(c.coupon_id, (c.user_id, c.request_id, c.seq));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// invariants

impl Run {
    async fn check(&mut self) {
        step(format!("seed step {}: check", self.step));
        let ids: Vec<String> = self.m.batches.keys().cloned().collect();
        for id in &ids {
            let b = &self.m.batches[id];
            // the model's own invariants
            assert!(b.consumed <= b.total, "{id} oversold");
            assert!(
                b.live.len() as i64 <= b.consumed,
                "{id}: {} live, {} consumed",
                b.live.len(),
                b.consumed
            );
            let mut per_user: HashMap<&str, i64> = HashMap::new();
            for h in b.live.values() {
                *per_user.entry(h.user.as_str()).or_default() += 1;
            }
            for (u, n) in per_user {
                assert!(n <= b.limit, "{u} holds {n} of {id}, limit {}", b.limit);
            }
            // the database: exactly the live coupons, once the persister drained
            let deadline = Instant::now() + BOUND;
            loop {
                let found = db_coupons(&self.w.db, id, b.shards).await;
                for (c, (user, rid, _)) in &found {
                    let held = b.live.get(c).unwrap_or_else(|| {
                        panic!("{c} of {user} in the database: not a live coupon of the model")
                    });
                    assert_eq!(&held.user, user, "{c}: holder");
                    if let Some(r) = &held.rid {
                        assert_eq!(rid.as_ref(), Some(r), "{c}: request id");
                    }
                }
                let (rows, events) = self.w.db.claim_counts(id).await.expect("counts");
                if (found.len() == b.live.len() || b.lost.is_some()) && rows == events {
                    // (a lost batch: which coupons survived is learnt at its rebuild)
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{id}: the database has {} of {} acknowledged coupons ({rows} rows, \
                     {events} claimed events) after {BOUND:?}",
                    found.len(),
                    b.live.len()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // the gateway's stock and state
            let (s, v) = self.w.send("GET", &format!("/v1/batches/{id}"), "").await;
            if b.lost.is_some() {
                assert_eq!(s, 503, "GET of lost {id}: {v}");
                continue;
            }
            assert_eq!(s, 200, "GET {id}: {v}");
            let want = json!({"total": b.total, "claimed": b.consumed,
                "remaining": b.total - b.consumed});
            assert_eq!(v["stock"], want, "{id}: stock (model: {want})");
            assert_eq!(v["batch"]["stock"], json!(b.total), "{id}: definition");
            assert_eq!(v["batch"]["state"], json!(b.state.as_str()), "{id}: state");
        }
        // the backend and the database agree (on every batch not lost)
        let live: Vec<&String> = ids
            .iter()
            .filter(|id| self.m.batches[*id].lost.is_none())
            .collect();
        let paths: Vec<String> = if live.len() == ids.len() {
            vec!["/v1/admin/reconcile".to_string()]
        } else {
            live.iter()
                .map(|id| format!("/v1/admin/reconcile?batch={id}"))
                .collect()
        };
        for path in paths {
            // A shard the gateways' probe sealed while the operator's rebuild ran is
            // repaired in the background: under load that takes more than a few seconds.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (s, v) = self.w.send("GET", &path, "").await;
                assert_eq!(s, 200, "{path}: {v}");
                if v["agree"] == json!(true) {
                    break;
                }
                assert!(Instant::now() < deadline, "{path} reports differences: {v}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn one_step(&mut self) {
        // weights: claims 38, replay 14, patch 16, create 10, re-create 4, restart 4,
        // rebuild of batches still lost 5, data loss 4
        let r = self.rng.below(95);
        step(format!("seed step {}: op {r}", self.step));
        match r {
            0..38 => self.claims().await,
            38..52 => self.replay().await,
            52..68 => self.patch().await,
            68..78 => self.create().await,
            78..82 => self.recreate().await,
            82..86 => self.restart().await,
            86..91 => self.rebuild_some().await,
            _ => self.data_loss().await,
        }
        self.check().await;
    }
}

async fn run_seed(variant: Variant, seed: u64, steps: usize) -> String {
    *TRAIL.lock() = Some(Trail {
        variant: match variant {
            Variant::Embedded => "model_embedded",
            Variant::Redis => "model_redis",
        },
        seed,
        step: 0,
        ops: VecDeque::new(),
    });
    step(format!("seed {seed}: start"));
    let mut run = Run {
        w: World::start(variant).await,
        m: Model::default(),
        rng: Rng::new(seed),
        step: 0,
    };
    // every run starts with a batch to work on
    run.create().await;
    run.check().await;
    for i in 0..steps {
        run.step = i;
        if let Some(t) = TRAIL.lock().as_mut() {
            t.step = i;
        }
        run.one_step().await;
    }
    let m = &run.m;
    let lost: Vec<String> = m
        .lost
        .iter()
        .map(|(s, c, u)| format!("{c} ({u}, step {s})"))
        .collect();
    format!(
        "seed {seed}: {steps} steps {:?}; {} batches, {} coupons issued, {} lost in data \
         losses{}, {} bursts with 503 overloaded",
        m.ops,
        m.batches.len(),
        m.ever.len(),
        m.lost.len(),
        if lost.is_empty() {
            String::new()
        } else {
            format!(" [{}]", lost.join(", "))
        },
        m.overloaded
    )
}

async fn model(variant: Variant) {
    let seeds = seeds();
    let steps = steps();
    // a generous bound per step: restarts and rebuilds take a few seconds each at most
    let bound = Duration::from_secs(60 + 5 * (steps as u64 + 1) * seeds.len() as u64);
    let _wd = Watchdog::arm(bound);
    let _report = Report;
    let started = Instant::now();
    for seed in seeds {
        let t = Instant::now();
        let summary = run_seed(variant, seed, steps).await;
        eprintln!("{summary} in {:.1?}", t.elapsed());
    }
    eprintln!("{variant:?}: done in {:.1?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_embedded() {
    model(Variant::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_redis() {
    model(Variant::Redis).await;
}
