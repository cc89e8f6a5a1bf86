//! Observability contract: the Grafana dashboard in `grafana/dashboards/claimgate.json` and
//! the metrics the gateway really exports agree.
//!
//! One in-process gateway (embedded backend + SQLite, as `tests/conformance.rs` builds it)
//! is driven through every outcome the dashboard charts; then `GET /metrics` is checked:
//! (a) every metric name a dashboard query uses is defined in `src/obs/metrics.rs` and present
//!     in the exposition; (b) every metric of `src/obs/metrics.rs` is charted by the dashboard;
//! (c) `promtool check metrics` accepts the exposition (when promtool is installed);
//! (d) label values stay inside their closed sets, and the `batch` label within
//!     `metrics.max_batch_labels` while batches sell out and new ones are created.
//!
//! The metrics recorder is process-global, so everything in-process runs in ONE test. Every
//! failed check is collected and reported together, so one run shows every gap at once.
//!
//! A second test runs the real binary, serves a handful of claims and checks that every
//! series the dashboard queries is already exported (the rare events at 0), that no
//! impossible label value is, and that the process metrics are there.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use claimgate::api::ApiError;
use claimgate::backend::embedded::EmbeddedBackend;
use claimgate::config::EmbeddedConfig;
use claimgate::contract::keys::BatchKeys;
use claimgate::http::App;
use claimgate::persist::Persister;
use claimgate::store::Db;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// `metrics.max_batch_labels` of this test: fewer than the batches that still have stock.
const MAX_BATCH_LABELS: usize = 2;
/// `persister.max_backlog_per_shard`: small, so one batch can fill its shard's log.
const MAX_BACKLOG: usize = 5;

/// Dashboard metrics that cannot be exported by an in-process gateway on the embedded
/// backend, with the reason. They are still checked against `src/obs/metrics.rs`.
const NOT_EXPORTABLE_HERE: &[(&str, &str)] = &[];

/// Metrics of `src/obs/metrics.rs` that the dashboard need not chart, with the reason.
const NOT_CHARTED: &[(&str, &str)] = &[];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------
// closed label sets

/// Every `ApiError` code: the `outcome` label besides `claimed` and `replayed`.
fn api_error_codes() -> BTreeSet<&'static str> {
    ApiError::examples().iter().map(ApiError::code).collect()
}

/// Allowed values of each label of each metric (by base name; `le` is not listed). `None`
/// means "checked separately" (the `batch` label).
type LabelSets = BTreeMap<&'static str, BTreeMap<&'static str, Option<BTreeSet<String>>>>;

fn closed_label_sets() -> LabelSets {
    fn set(values: &[&str]) -> Option<BTreeSet<String>> {
        Some(values.iter().map(|v| v.to_string()).collect())
    }
    // every outcome listed is a success or an API error code
    let mut outcomes: Vec<&str> = claimgate::obs::metrics::CLAIM_OUTCOMES.to_vec();
    let codes = api_error_codes();
    outcomes.retain(|o| ["claimed", "replayed"].contains(o) || codes.contains(o));
    let scripts: Vec<&str> = claimgate::backend::Script::ALL
        .iter()
        .map(|s| s.name())
        .collect();
    let routes = claimgate::obs::metrics::ROUTES;
    let stages = claimgate::obs::metrics::STAGES;
    let m = |pairs: Vec<(&'static str, Option<BTreeSet<String>>)>| {
        pairs.into_iter().collect::<BTreeMap<_, _>>()
    };
    let mut s: LabelSets = BTreeMap::new();
    s.insert(
        "claimgate_claims_total",
        m(vec![("outcome", set(&outcomes))]),
    );
    s.insert("claimgate_claim_duration_seconds", m(vec![]));
    s.insert(
        "claimgate_stage_duration_seconds",
        m(vec![("stage", set(stages))]),
    );
    s.insert(
        "claimgate_http_requests_total",
        m(vec![
            ("route", set(routes)),
            ("status", set(&["2xx", "4xx", "5xx"])),
        ]),
    );
    s.insert(
        "claimgate_backend_calls_total",
        m(vec![
            ("script", set(&scripts)),
            (
                "result",
                set(&["ok", "script_error", "unavailable", "protocol"]),
            ),
        ]),
    );
    s.insert(
        "claimgate_backend_call_duration_seconds",
        m(vec![("script", set(&scripts))]),
    );
    s.insert("claimgate_backend_script_reloads_total", m(vec![]));
    s.insert("claimgate_claim_calls_total", m(vec![]));
    s.insert("claimgate_claim_call_claims_total", m(vec![]));
    s.insert(
        "claimgate_stock_transfers_total",
        m(vec![
            ("kind", set(&["initial", "refill", "steal", "sweep"])),
            ("result", set(&["moved", "empty", "finished"])),
        ]),
    );
    s.insert(
        "claimgate_rate_limited_total",
        m(vec![("limit", set(&["global", "user", "ip"]))]),
    );
    s.insert(
        "claimgate_shed_total",
        m(vec![("reason", set(&["inflight", "backlog", "queue"]))]),
    );
    s.insert(
        "claimgate_replica_confirmations_total",
        m(vec![(
            "result",
            set(&["confirmed", "not_replicated", "unavailable"]),
        )]),
    );
    s.insert(
        "claimgate_shard_faults_total",
        m(vec![("kind", set(&["missing", "rolled_back"]))]),
    );
    s.insert(
        "claimgate_shard_repairs_total",
        m(vec![(
            "result",
            set(&["repaired", "busy", "stale", "failed"]),
        )]),
    );
    s.insert(
        "claimgate_cache_total",
        m(vec![(
            "kind",
            set(&[
                "sold_out",
                "paused",
                "not_started",
                "ended",
                "not_eligible",
                "user_limit",
                "meta_hit",
                "meta_miss",
            ]),
        )]),
    );
    s.insert("claimgate_backend_inflight", m(vec![]));
    s.insert("claimgate_connections", m(vec![]));
    s.insert("claimgate_persist_backlog", m(vec![]));
    s.insert("claimgate_persist_lag_seconds", m(vec![]));
    s.insert("claimgate_persist_rows_total", m(vec![]));
    s.insert("claimgate_persist_write_duration_seconds", m(vec![]));
    s.insert("claimgate_stock_written_off_total", m(vec![]));
    s.insert("claimgate_shard_repair_duration_seconds", m(vec![]));
    s.insert("claimgate_replica_confirm_duration_seconds", m(vec![]));
    s.insert(
        "claimgate_persist_errors_total",
        m(vec![(
            "stage",
            set(&["refresh", "probe", "read", "parse", "write", "ack"]),
        )]),
    );
    s.insert(
        "claimgate_persist_shards",
        m(vec![(
            "state",
            set(claimgate::obs::metrics::PERSIST_SHARD_STATES),
        )]),
    );
    s.insert(
        "claimgate_persist_log_reads_total",
        m(vec![(
            "cause",
            set(claimgate::obs::metrics::PERSIST_READ_CAUSES),
        )]),
    );
    s.insert("claimgate_coupon_conflicts_total", m(vec![]));
    s.insert(
        "claimgate_event_deliveries_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::DELIVERY_OUTCOMES),
        )]),
    );
    s.insert("claimgate_event_backlog", m(vec![]));
    s.insert("claimgate_event_dead", m(vec![]));
    s.insert("claimgate_event_lag_seconds", m(vec![]));
    s.insert(
        "claimgate_coupons_swept_total",
        m(vec![("kind", set(claimgate::obs::metrics::SWEEP_KINDS))]),
    );
    s.insert(
        "claimgate_grant_jobs_total",
        m(vec![(
            "event",
            set(claimgate::obs::metrics::GRANT_JOB_EVENTS),
        )]),
    );
    s.insert(
        "claimgate_batch_retirements_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::RETIRE_OUTCOMES),
        )]),
    );
    s.insert(
        "claimgate_request_id_rotations_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::ROTATE_OUTCOMES),
        )]),
    );
    s.insert(
        "claimgate_request_id_lookups_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::LOOKUP_OUTCOMES),
        )]),
    );
    s.insert(
        "claimgate_codes_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::CODE_OUTCOMES),
        )]),
    );
    s.insert(
        "claimgate_wallet_reads_total",
        m(vec![(
            "source",
            set(claimgate::obs::metrics::WALLET_SOURCES),
        )]),
    );
    s.insert(
        "claimgate_recent_touches_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::TOUCH_OUTCOMES),
        )]),
    );
    s.insert("claimgate_coupon_change_conflicts_total", m(vec![]));
    s.insert(
        "claimgate_coupon_changes_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::COUPON_CHANGE_OUTCOMES),
        )]),
    );
    s.insert(
        "claimgate_grant_users_total",
        m(vec![(
            "outcome",
            set(claimgate::obs::metrics::GRANT_OUTCOMES),
        )]),
    );
    s.insert("claimgate_stock_remaining", m(vec![("batch", None)]));
    s.insert("claimgate_batches_lost", m(vec![]));
    s.insert(
        "claimgate_build_info",
        m(vec![
            ("version", set(&[env!("CARGO_PKG_VERSION")])),
            ("backend", set(&["embedded", "redis"])),
        ]),
    );
    s
}

// ------------------------------------------------------------------------------------------
// parsing: src/obs/metrics.rs, the dashboard, the exposition

/// `pub const NAME: &str = "claimgate_...";` of `src/obs/metrics.rs`: (constant, metric name).
fn defined_metrics() -> Vec<(String, String)> {
    let src = std::fs::read_to_string(root().join("src/obs/metrics.rs"))
        .expect("read src/obs/metrics.rs");
    let mut out = Vec::new();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, value)) = rest.split_once(": &str = \"") else {
            continue;
        };
        let Some(value) = value.strip_suffix("\";") else {
            continue;
        };
        out.push((name.to_string(), value.to_string()));
    }
    out
}

/// Metric names in `s`: identifiers `claimgate_[a-z0-9_]+` and `process_[a-z0-9_]+`.
fn metric_idents(s: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["claimgate_", "process_"] {
        let bytes = s.as_bytes();
        let mut i = 0;
        while let Some(pos) = s[i..].find(prefix) {
            let start = i + pos;
            let boundary = start == 0 || {
                let b = bytes[start - 1];
                !(b.is_ascii_alphanumeric() || b == b'_' || b == b':')
            };
            let mut end = start + prefix.len();
            while end < bytes.len()
                && (bytes[end].is_ascii_lowercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            if boundary && end > start + prefix.len() {
                out.insert(s[start..end].to_string());
            }
            i = end;
        }
    }
    out
}

/// Every PromQL expression of the dashboard: panel targets (`expr`, in nested rows too) and
/// query variables (`query` / `definition`).
fn dashboard_queries(dash: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) if s.contains('(') => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

/// The dashboard's own shape: schema version, the data source and instance variables, every
/// panel and target on the data source variable, every panel query filtered by instance.
fn dashboard_shape(dash: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    if !(36..=41).contains(&schema) {
        bad.push(format!(
            "dashboard: schemaVersion {schema}, expected about 39"
        ));
    }
    let vars = dash["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).cloned();
    match var("DS_PROMETHEUS") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        other => bad.push(format!(
            "dashboard: no Prometheus data source variable DS_PROMETHEUS: {other:?}"
        )),
    }
    if var("instance").is_none() {
        bad.push("dashboard: no `instance` variable".to_string());
    }
    fn panels(v: &Value, out: &mut Vec<Value>) {
        for p in v["panels"].as_array().into_iter().flatten() {
            out.push(p.clone());
            panels(p, out);
        }
    }
    let mut all = Vec::new();
    panels(dash, &mut all);
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            bad.push(format!("dashboard: panel {title:?} reuses id {}", p["id"]));
        }
        if p["type"] == "row" {
            continue;
        }
        let mut sources = vec![&p["datasource"]];
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            bad.push(format!("dashboard: panel {title:?} has no query"));
        }
        sources.extend(targets.iter().map(|t| &t["datasource"]));
        for ds in sources {
            if ds["uid"] != "${DS_PROMETHEUS}" {
                bad.push(format!(
                    "dashboard: panel {title:?} uses data source {ds}, not ${{DS_PROMETHEUS}}"
                ));
            }
        }
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or("");
            if !expr.contains(r#"instance=~"$instance""#) {
                bad.push(format!(
                    "dashboard: panel {title:?} query not filtered by $instance: {expr}"
                ));
            }
        }
    }
    bad
}

/// One sample line of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| format!("no value: {line}"))?;
        let name = line[..name_end].to_string();
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            let mut close = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        close = Some(i);
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        if chars.next().map(|(_, c)| c) != Some('"') {
                            return Err(format!("unquoted label value: {line}"));
                        }
                        let mut value = String::new();
                        loop {
                            match chars.next() {
                                Some((_, '\\')) => match chars.next() {
                                    Some((_, 'n')) => value.push('\n'),
                                    Some((_, c)) => value.push(c),
                                    None => return Err(format!("bad escape: {line}")),
                                },
                                Some((_, '"')) => break,
                                Some((_, c)) => value.push(c),
                                None => return Err(format!("unterminated label value: {line}")),
                            }
                        }
                        labels.push((std::mem::take(&mut key), value));
                    }
                    c => key.push(c),
                }
            }
            let close = close.ok_or_else(|| format!("unterminated labels: {line}"))?;
            rest = &body[close + 1..];
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| format!("no value: {line}"))?;
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .map_err(|e| format!("bad value {v:?} ({e}): {line}"))?,
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

/// The metric a sample belongs to: the defined name it equals, or that it extends with a
/// histogram suffix.
fn base_name<'a>(sample: &str, defined: &'a BTreeSet<String>) -> Option<&'a str> {
    if let Some(d) = defined.get(sample) {
        return Some(d);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| sample.strip_suffix(suffix))
        .find_map(|b| defined.get(b).map(String::as_str))
}

// ------------------------------------------------------------------------------------------
// the gateway

struct Gw {
    app: Arc<App<EmbeddedBackend>>,
    backend: Arc<EmbeddedBackend>,
    db: Db,
    dir: tempfile::TempDir,
}

async fn open_db(path: &Path, migrate: bool) -> Db {
    let cfg = claimgate::config::DatabaseConfig {
        url: format!("sqlite://{}?mode=rwc", path.display()),
        ..Default::default()
    };
    let db = Db::connect(&cfg).await.expect("database");
    if migrate {
        db.migrate().await.expect("migrate");
    }
    db
}

async fn embedded_gw() -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let overrides = vec![
        // one token per second per user: a user's second claim within a second is refused
        "limits.claim_per_user.per_second=1".to_string(),
        "limits.claim_per_user.burst=1".to_string(),
        // one backend slot, short wait: a claim that finds it taken is shed
        "limits.max_inflight=1".to_string(),
        "limits.admission_wait_ms=20".to_string(),
        format!("persister.max_backlog_per_shard={MAX_BACKLOG}"),
        "persister.probe_interval_ms=20".to_string(),
        "persister.flush_interval_ms=5".to_string(),
        "cache.refresh_ms=20".to_string(),
        format!("metrics.max_batch_labels={MAX_BATCH_LABELS}"),
        "server.request_timeout_ms=60000".to_string(),
    ];
    let cfg = Arc::new(claimgate::config::load(None, Vec::new(), &overrides).expect("config"));
    let backend = Arc::new(
        EmbeddedBackend::open(&EmbeddedConfig {
            aof_path: Some(dir.path().join("obs.aof")),
            ..EmbeddedConfig::default()
        })
        .expect("embedded backend"),
    );
    let db = open_db(&dir.path().join("obs.db"), true).await;
    let app = claimgate::gateway::assemble(cfg, backend.clone(), db.clone(), None);
    Gw {
        app,
        backend,
        db,
        dir,
    }
}

const PEER: &str = "127.0.0.1:40000";

async fn call(app: &App<EmbeddedBackend>, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let peer: SocketAddr = PEER.parse().unwrap();
    let resp = claimgate::http::router::handle(app, req, peer).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A claim; returns (status, error code or "").
async fn claim(
    app: &App<EmbeddedBackend>,
    batch: &str,
    user: &str,
    rid: Option<&str>,
) -> (u16, String) {
    let body = match rid {
        Some(r) => json!({"user_id": user, "request_id": r}),
        None => json!({"user_id": user}),
    };
    let (s, text) = call(
        app,
        "POST",
        &format!("/v1/batches/{batch}/claims"),
        &body.to_string(),
    )
    .await;
    (s, error_code(&text))
}

fn error_code(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn create(app: &App<EmbeddedBackend>, id: &str, stock: i64, limit: i64, shards: u32) {
    let body = json!({
        "id": id, "name": "observability", "stock": stock, "per_user_limit": limit,
        "shards": shards,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "threshold", "threshold": 10000, "amount": 500},
        "scope": {"kind": "all"}, "exclusive": false,
        "eligibility": {"deny_users": [], "require_tags": [], "new_users_only": false},
    });
    let (s, text) = call(app, "POST", "/v1/batches", &body.to_string()).await;
    assert_eq!(s, 201, "create {id}: {text}");
}

/// Polls the exposition until `pred` holds (or `limit` passes); returns whether it held.
async fn wait_for(
    app: &App<EmbeddedBackend>,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if pred(&app.render_metrics()) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1 request over a real socket to the real server; returns the status line.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the gateway");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

/// Expects `got` == (status, code); a mismatch is a failure of the traffic, not of metrics.
fn expect(what: &str, got: (u16, String), status: u16, code: &str) {
    assert_eq!(
        (got.0, got.1.as_str()),
        (status, code),
        "{what}: unexpected answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_matches_exported_metrics() {
    let g = embedded_gw().await;
    let app = &g.app;
    let stop = CancellationToken::new();

    // ---- batches ------------------------------------------------------------------------
    // At most MAX_BATCH_LABELS batches get a `batch` label: the active ones, newest first.
    // The set changes while the gateway runs: obs-a-cap sells out, and obs-0-late is created
    // after the first gauges were exported; the label count must stay within the cap.
    create(app, "obs-a-cap", 1, 1, 1).await;
    create(app, "obs-backlog", 100, 1, 1).await;
    create(app, "obs-lim", 100, 1, 1).await;
    create(app, "obs-main", 4, 1, 2).await;
    create(app, "obs-paused", 10, 1, 1).await;
    // A batch the database knows but Redis does not: served as lost.
    let mut lost = g.db.get_batch("obs-lim").await.unwrap().expect("obs-lim");
    lost.id = "obs-lost".to_string();
    g.db.upsert_batch(&lost).await.unwrap();

    // The real server on an ephemeral port (open-connections gauge), and the background
    // loops as `claimgate serve` runs them (warm-up, metadata refresh, stock gauges, sweeper).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(claimgate::http::server::serve(
        app.clone(),
        listener,
        stop.clone(),
    ));
    let background = claimgate::gateway::spawn_background(app, stop.clone());
    assert!(
        wait_for(app, Duration::from_secs(10), |t| t
            .contains(r#"claimgate_stock_remaining{batch="obs-paused"}"#))
        .await,
        "stock gauges were never exported for the newest batch obs-paused"
    );

    // ---- claim traffic --------------------------------------------------------------------
    // sell obs-main out (initial fill, refills and steals between its two shards)
    for i in 0..4 {
        expect(
            "obs-main stock",
            claim(app, "obs-main", &format!("m{i}"), None).await,
            201,
            "",
        );
    }
    expect(
        "obs-main sold out (backend)",
        claim(app, "obs-main", "m4", None).await,
        410,
        "sold_out",
    );
    expect(
        "obs-main sold out (cache)",
        claim(app, "obs-main", "m5", None).await,
        410,
        "sold_out",
    );
    let keys = BatchKeys::new("obs-main", 2);
    let c = app.stock().conservation(&keys).await.unwrap();
    assert!(c.holds() && c.claimed == 4 && c.total == 4, "{c:?}");

    // obs-a-cap sells out after its stock gauge was exported
    expect(
        "obs-a-cap stock",
        claim(app, "obs-a-cap", "c0", None).await,
        201,
        "",
    );
    expect(
        "obs-a-cap sold out",
        claim(app, "obs-a-cap", "c1", None).await,
        410,
        "sold_out",
    );

    // replay and limits: user `r` with a request id, user `l` without
    expect(
        "first claim with a request id",
        claim(app, "obs-lim", "r", Some("rid-1")).await,
        201,
        "",
    );
    expect(
        "l first claim",
        claim(app, "obs-lim", "l", None).await,
        201,
        "",
    );
    expect("rl first", claim(app, "obs-lim", "rl", None).await, 201, "");
    expect(
        "rl second within the second",
        claim(app, "obs-lim", "rl", None).await,
        429,
        "rate_limited",
    );

    // bad input, unknown and lost batches, unknown route and method
    let (s, text) = call(app, "POST", "/v1/batches/obs-lim/claims", "{").await;
    expect("malformed body", (s, error_code(&text)), 400, "bad_request");
    let (s, text) = call(
        app,
        "POST",
        "/v1/batches/obs-lim/claims",
        r#"{"user_id":"a:b"}"#,
    )
    .await;
    expect(
        "invalid user id",
        (s, error_code(&text)),
        400,
        "bad_request",
    );
    expect(
        "unknown batch",
        claim(app, "obs-nope", "u1", None).await,
        404,
        "batch_not_found",
    );
    expect(
        "lost batch",
        claim(app, "obs-lost", "u2", None).await,
        503,
        "backend_unavailable",
    );
    let (s, _) = call(app, "GET", "/no/such/route", "").await;
    assert_eq!(s, 404);
    let (s, _) = call(app, "DELETE", "/healthz", "").await;
    assert_eq!(s, 405);
    let (s, text) = call(app, "GET", "/v1/batches/obs-lim", "").await;
    assert_eq!(s, 200, "{text}");

    // paused batch: refused by the local cache
    let (s, text) = call(
        app,
        "PATCH",
        "/v1/batches/obs-paused",
        r#"{"state":"paused"}"#,
    )
    .await;
    assert_eq!(s, 200, "pause: {text}");
    expect(
        "paused batch",
        claim(app, "obs-paused", "p1", None).await,
        409,
        "paused",
    );

    // a shard log at its bound: shed (backlog)
    for i in 0..MAX_BACKLOG {
        expect(
            "obs-backlog under the bound",
            claim(app, "obs-backlog", &format!("b{i}"), None).await,
            201,
            "",
        );
    }
    expect(
        "obs-backlog at the bound",
        claim(app, "obs-backlog", "b-over", None).await,
        503,
        "overloaded",
    );

    // every backend slot taken: shed (inflight)
    {
        let _slot = app
            .api()
            .admission()
            .admit()
            .await
            .expect("the only backend slot");
        expect(
            "no backend slot",
            claim(app, "obs-lim", "s1", None).await,
            503,
            "overloaded",
        );
    }

    // a transfer cut in half, as by a crash, finished by the sweeper
    let bk = BatchKeys::new("obs-backlog", 1);
    let moved = app
        .stock()
        .transfer_first_half(&bk.pool, &bk.shards[0], "obs-crash", 1, false)
        .await
        .unwrap();
    assert_eq!(moved.amount, 1);
    assert_eq!(app.stock().sweep(&bk, 0).await.unwrap(), 1);

    // a batch created while the gateway runs, after the first stock gauges were exported
    create(app, "obs-0-late", 10, 1, 1).await;
    expect(
        "obs-0-late stock",
        claim(app, "obs-0-late", "late1", None).await,
        201,
        "",
    );

    // a request over a real connection
    let status = tokio::task::spawn_blocking(move || http_get(addr, "/healthz"))
        .await
        .unwrap();
    assert!(status.contains(" 200 "), "GET /healthz: {status}");

    // one token per second per user: wait for the next token between a user's claims
    tokio::time::sleep(Duration::from_millis(1100)).await;
    expect(
        "replay of rid-1",
        claim(app, "obs-lim", "r", Some("rid-1")).await,
        200,
        "",
    );
    expect(
        "l over its limit (backend)",
        claim(app, "obs-lim", "l", None).await,
        409,
        "limit_reached",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    expect(
        "l over its limit (cache)",
        claim(app, "obs-lim", "l", None).await,
        409,
        "limit_reached",
    );

    // ---- persister --------------------------------------------------------------------------
    let pstop = CancellationToken::new();
    let mut pcfg = app.config().persister.clone();
    pcfg.consumer = Some("obs-persister".to_string());
    let persister = Persister::spawn(g.backend.clone(), g.db.clone(), pcfg.clone(), pstop.clone());
    let written = persister.flush().await.expect("persister flush");
    assert!(written > 0, "the persister wrote nothing");
    assert!(
        wait_for(app, Duration::from_secs(10), |t| t
            .contains("claimgate_persist_backlog ")
            && t.contains("claimgate_persist_lag_seconds "))
        .await,
        "persister never measured backlog and lag"
    );
    pstop.cancel();
    persister.join().await;

    // A persister whose database has no schema: its batch refresh fails (errors by stage).
    let broken_db = open_db(&g.dir.path().join("unmigrated.db"), false).await;
    let bstop = CancellationToken::new();
    pcfg.consumer = Some("obs-broken".to_string());
    let broken = Persister::spawn(g.backend.clone(), broken_db, pcfg, bstop.clone());
    let errored = wait_for(app, Duration::from_secs(10), |t| {
        t.contains("claimgate_persist_errors_total{")
    })
    .await;
    bstop.cancel();
    broken.join().await;
    assert!(
        errored,
        "a failing database write/refresh was never counted"
    );

    // stock gauges exported again after the sell-outs and the new batch
    let late_exported = wait_for(app, Duration::from_secs(10), |t| {
        t.contains(r#"claimgate_stock_remaining{batch="obs-0-late"}"#)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // ---- the exposition ------------------------------------------------------------------
    let (s, exposition) = call(app, "GET", "/metrics", "").await;
    assert_eq!(s, 200);
    stop.cancel();
    for t in background {
        let _ = t.await;
    }
    let _ = server.await;

    let mut failures: Vec<String> = Vec::new();
    let samples = parse_exposition(&exposition).unwrap_or_else(|e| panic!("exposition: {e}"));
    let exported: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    let defined = defined_metrics();
    let defined_names: BTreeSet<String> = defined.iter().map(|(_, n)| n.clone()).collect();
    assert!(
        defined.len() >= 20,
        "could not read the metric constants of src/obs/metrics.rs: {defined:?}"
    );

    let dash_text = std::fs::read_to_string(root().join("grafana/dashboards/claimgate.json"))
        .expect("read grafana/dashboards/claimgate.json");
    let dash: Value = serde_json::from_str(&dash_text).expect("dashboard is JSON");
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "dashboard has too few queries");
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_idents(q)).collect();
    failures.extend(dashboard_shape(&dash));

    // (a) every name a query uses is a metric of src/obs/metrics.rs and is exported
    for name in &used {
        if base_name(name, &defined_names).is_none() {
            failures.push(format!(
                "(a) dashboard uses {name}, which is not a metric of src/obs/metrics.rs"
            ));
            continue;
        }
        if exported.contains(name.as_str()) {
            continue;
        }
        match NOT_EXPORTABLE_HERE.iter().find(|(n, _)| n == name) {
            Some((_, why)) => println!("not checked in the exposition: {name}: {why}"),
            None => failures.push(format!(
                "(a) dashboard uses {name}, absent from /metrics after the traffic"
            )),
        }
    }

    // (b) every metric of src/obs/metrics.rs is charted
    for (constant, name) in &defined {
        let charted = used
            .iter()
            .any(|u| base_name(u, &defined_names) == Some(name.as_str()));
        if charted {
            continue;
        }
        match NOT_CHARTED.iter().find(|(n, _)| n == name) {
            Some((_, why)) => println!("not charted: {name}: {why}"),
            None => failures.push(format!(
                "(b) {constant} = {name} is not used by any dashboard query"
            )),
        }
    }

    // (c) promtool
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("skipped promtool check: promtool not installed");
        }
        Err(e) => failures.push(format!("(c) could not run promtool: {e}")),
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(exposition.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                println!("promtool check metrics: ok");
            } else {
                failures.push(format!(
                    "(c) promtool check metrics failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }

    // (d) label values inside their closed sets; `batch` within the cap
    let sets = closed_label_sets();
    let mut batches: BTreeSet<String> = BTreeSet::new();
    for s in samples.iter().filter(|s| s.name.starts_with("claimgate_")) {
        let Some(base) = base_name(&s.name, &defined_names) else {
            failures.push(format!(
                "(d) exported {} is not defined in src/obs/metrics.rs",
                s.name
            ));
            continue;
        };
        let Some(allowed) = sets.get(base) else {
            failures.push(format!("(d) no label sets listed in this test for {base}"));
            continue;
        };
        for (k, v) in &s.labels {
            if k == "le" && s.name.ends_with("_bucket") {
                continue;
            }
            match allowed.get(k.as_str()) {
                None => failures.push(format!("(d) {}: unexpected label {k}={v:?}", s.name)),
                Some(Some(values)) if !values.contains(v) => failures.push(format!(
                    "(d) {}: label {k}={v:?} outside its closed set",
                    s.name
                )),
                Some(_) => {}
            }
            if base == "claimgate_stock_remaining" && k == "batch" {
                batches.insert(v.clone());
            }
        }
    }
    if batches.len() > MAX_BATCH_LABELS {
        failures.push(format!(
            "(d) claimgate_stock_remaining has {} batch labels {batches:?}, above \
             metrics.max_batch_labels = {MAX_BATCH_LABELS}",
            batches.len()
        ));
    }
    if !late_exported {
        failures.push(
            "(d) claimgate_stock_remaining never exported obs-0-late, a batch with stock \
             created while the gateway runs"
                .to_string(),
        );
    }
    for sold_out in ["obs-a-cap", "obs-main"] {
        let stale = samples.iter().find(|s| {
            s.name == "claimgate_stock_remaining"
                && s.labels.iter().any(|(k, v)| k == "batch" && v == sold_out)
                && s.value > 0.0
        });
        if let Some(s) = stale {
            failures.push(format!(
                "(d) sold-out batch {sold_out} still exported with stock remaining {}",
                s.value
            ));
        }
    }
    // the outcomes this traffic produced are all there
    for outcome in [
        "claimed",
        "replayed",
        "sold_out",
        "limit_reached",
        "rate_limited",
        "bad_request",
        "batch_not_found",
        "backend_unavailable",
        "overloaded",
        "paused",
    ] {
        let needle = format!("claimgate_claims_total{{outcome=\"{outcome}\"}}");
        if !exposition.contains(&needle) {
            failures.push(format!("claims by outcome: {outcome} missing"));
        }
    }

    println!(
        "{} metric names in {} dashboard queries; {} samples exported",
        used.len(),
        queries.len(),
        samples.len()
    );
    assert!(
        failures.is_empty(),
        "{} observability check(s) failed:\n  {}\n--- /metrics ---\n{exposition}",
        failures.len(),
        failures.join("\n  ")
    );
}

// ------------------------------------------------------------------------------------------
// a gateway that served only a few claims

/// Item 2 of "For the people who run it": the real binary, a few claims, and `/metrics`.
/// Every series the dashboard queries exists (the rare events at 0: before, "Batches lost"
/// and six more showed "No data" on a healthy gateway); no label value that cannot occur
/// is exported (before: `status="3xx"`, `outcome="batch_exists"`, ...); the process
/// metrics are there with sane values (before: none).
#[test]
fn a_gateway_that_served_a_few_claims_exports_every_dashboard_series() {
    use support::bin::{Served, request};
    use support::watchdog::{Watchdog, step};
    let _wd = Watchdog::arm(Duration::from_secs(90));
    let dir = tempfile::tempdir().unwrap();
    step("serve, create a batch, three claims");
    let gw = Served::start(dir.path(), &[], &[]);
    let body = json!({
        "id": "few", "name": "few", "stock": 10, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7}, "discount": {"kind": "fixed", "amount": 100},
        "scope": {"kind": "all"}, "shards": 2
    });
    let (s, text) = request(gw.port, "POST", "/v1/batches", &[], &body.to_string());
    assert_eq!(s, 201, "{text}");
    for u in ["a", "b", "c"] {
        let (s, text) = request(
            gw.port,
            "POST",
            "/v1/batches/few/claims",
            &[],
            &json!({ "user_id": u }).to_string(),
        );
        assert_eq!(s, 201, "{text}");
    }
    step("scrape once the persister measured its backlog and the stock gauges are out");
    let deadline = Instant::now() + Duration::from_secs(20);
    let exposition = loop {
        let (s, text) = request(gw.port, "GET", "/metrics", &[], "");
        assert_eq!(s, 200, "{text}");
        if text.contains("\nclaimgate_persist_backlog ")
            && text.contains("persist_rows_total 3")
            && text.contains(r#"claimgate_stock_remaining{batch="few"}"#)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "no backlog measured:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(gw);

    let samples = parse_exposition(&exposition).unwrap_or_else(|e| panic!("exposition: {e}"));
    let exported: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    let value = |name: &str, labels: &[(&str, &str)]| {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    };
    let mut failures = Vec::new();
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("grafana/dashboards/claimgate.json")).unwrap(),
    )
    .unwrap();
    let used: BTreeSet<String> = dashboard_queries(&dash)
        .iter()
        .flat_map(|q| metric_idents(q))
        .collect();
    assert!(used.iter().any(|u| u.starts_with("process_")), "{used:?}");
    for name in &used {
        if !exported.contains(name.as_str()) {
            failures.push(format!("{name}: queried by the dashboard, not exported"));
        }
    }
    // the rare events, at 0, with each label value that can occur
    let mut zero: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("claimgate_batches_lost", vec![]),
        ("claimgate_backend_script_reloads_total", vec![]),
        ("claimgate_coupon_conflicts_total", vec![]),
        ("claimgate_persist_write_duration_seconds_count", vec![]),
    ];
    zero.extend(
        claimgate::obs::metrics::SHED_REASONS
            .iter()
            .map(|r| ("claimgate_shed_total", vec![("reason", *r)])),
    );
    zero.extend(
        claimgate::obs::metrics::RATE_LIMITS
            .iter()
            .map(|l| ("claimgate_rate_limited_total", vec![("limit", *l)])),
    );
    zero.push(("claimgate_stock_written_off_total", vec![]));
    zero.extend(
        claimgate::obs::metrics::RETIRE_OUTCOMES
            .iter()
            .map(|o| ("claimgate_batch_retirements_total", vec![("outcome", *o)])),
    );
    zero.extend(claimgate::obs::metrics::ROTATE_OUTCOMES.iter().map(|o| {
        (
            "claimgate_request_id_rotations_total",
            vec![("outcome", *o)],
        )
    }));
    zero.extend(
        claimgate::obs::metrics::LOOKUP_OUTCOMES
            .iter()
            .map(|o| ("claimgate_request_id_lookups_total", vec![("outcome", *o)])),
    );
    zero.extend(
        claimgate::obs::metrics::SHARD_FAULT_KINDS
            .iter()
            .map(|k| ("claimgate_shard_faults_total", vec![("kind", *k)])),
    );
    zero.extend(
        claimgate::obs::metrics::SHARD_REPAIR_RESULTS
            .iter()
            .map(|r| ("claimgate_shard_repairs_total", vec![("result", *r)])),
    );
    zero.extend(
        claimgate::obs::metrics::REPLICA_CONFIRM_RESULTS
            .iter()
            .map(|r| {
                (
                    "claimgate_replica_confirmations_total",
                    vec![("result", *r)],
                )
            }),
    );
    zero.extend(
        claimgate::obs::metrics::PERSIST_STAGES
            .iter()
            .map(|s| ("claimgate_persist_errors_total", vec![("stage", *s)])),
    );
    for (name, labels) in &zero {
        match value(name, labels) {
            Some(v) if name.ends_with("_count") => {
                if v < 0.0 {
                    failures.push(format!("{name}{labels:?} = {v}"));
                }
            }
            Some(0.0) => {}
            other => failures.push(format!("{name}{labels:?}: {other:?}, expected 0")),
        }
    }
    // no impossible label value
    let impossible_outcomes = [
        "batch_exists",
        "coupon_not_found",
        "invalid_state",
        "not_found",
        "method_not_allowed",
    ];
    for s in &samples {
        for (k, v) in &s.labels {
            let bad = (k == "status" && v == "3xx")
                || (s.name == "claimgate_claims_total"
                    && k == "outcome"
                    && impossible_outcomes.contains(&v.as_str()))
                || (s.name == "claimgate_http_requests_total"
                    && k == "route"
                    && v == "unknown"
                    && s.labels.iter().any(|(a, b)| a == "status" && b != "4xx"));
            if bad {
                failures.push(format!(
                    "impossible label value exported: {} {:?}",
                    s.name, s.labels
                ));
            }
        }
    }
    // the process metrics
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (name, ok) in [
        (
            "process_cpu_seconds_total",
            &(|v: f64| v >= 0.0) as &dyn Fn(f64) -> bool,
        ),
        ("process_resident_memory_bytes", &|v: f64| v > 1e6),
        ("process_open_fds", &|v: f64| v >= 3.0),
        ("process_max_fds", &|v: f64| v >= 3.0),
        ("process_start_time_seconds", &|v: f64| {
            (now - 600.0..=now + 5.0).contains(&v)
        }),
    ] {
        match value(name, &[]) {
            Some(v) if ok(v) => {}
            other => failures.push(format!("{name}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} check(s) failed:\n  {}\n--- /metrics ---\n{exposition}",
        failures.len(),
        failures.join("\n  ")
    );
}
