//! In-process gateways for tests: an `App` on either backend with its own database,
//! driven through the real router without sockets.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use claimgate::backend::Backend;
use claimgate::backend::embedded::EmbeddedBackend;
use claimgate::backend::redis::RedisBackend;
use claimgate::config::Config;
use claimgate::config::EmbeddedConfig;
use claimgate::config::RedisConfig;
use claimgate::http::App;
use claimgate::store::Db;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::{PgDb, RedisCluster, RedisServer};

pub struct Gw<B: Backend> {
    pub app: Arc<App<B>>,
    pub backend: Arc<B>,
    pub db: Db,
    pub cfg: Arc<Config>,
    pub redis: Option<RedisServer>,
    /// The cluster a [`cluster_gw`] runs on (kept alive with the gateway).
    pub cluster: Option<RedisCluster>,
    _pg: Option<PgDb>,
    pub dir: tempfile::TempDir,
}

impl<B: Backend> Gw<B> {
    /// A gateway a test assembled itself (its servers and database are the test's).
    pub fn from_parts(app: Arc<App<B>>, backend: Arc<B>, db: Db, cfg: Arc<Config>) -> Gw<B> {
        Gw {
            app,
            backend,
            db,
            cfg,
            redis: None,
            cluster: None,
            _pg: None,
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

pub fn config(extra: &[String]) -> Config {
    let mut o = vec![
        "limits.claim_per_user.per_second=0".to_string(),
        "limits.admission_wait_ms=60000".to_string(),
        "limits.max_inflight=100000".to_string(),
        "persister.flush_interval_ms=5".to_string(),
        "stock.sweep_min_age_ms=0".to_string(),
        "server.request_timeout_ms=60000".to_string(),
    ];
    o.extend_from_slice(extra);
    claimgate::config::load(None, Vec::new(), &o).expect("test config")
}

pub async fn open_db(url: &str) -> Db {
    let db = Db::connect(&claimgate::config::DatabaseConfig {
        url: url.to_string(),
        ..Default::default()
    })
    .await
    .expect("database");
    db.migrate().await.expect("migrate");
    db
}

/// A migrated SQLite database in a directory of its own (dropped with the guard).
pub async fn sqlite_db() -> (Db, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    (open_db(&url).await, dir)
}

/// A migrated throwaway PostgreSQL database (dropped with the guard).
pub async fn postgres_db() -> (Db, PgDb) {
    let pg = PgDb::create();
    (open_db(&pg.url).await, pg)
}

pub async fn redis_gw() -> Gw<RedisBackend> {
    redis_gw_with(&[]).await
}

/// A redis-backed gateway with extra config overrides.
pub async fn redis_gw_with(extra: &[String]) -> Gw<RedisBackend> {
    redis_gw_on(RedisServer::start(), extra).await
}

/// The script-call bound of the redis-backed test gateways: these suites check invariants
/// under thousands of concurrent claims on 2 shared cores, where the production default
/// (1 s) turns CPU starvation into 503s; timeouts have tests of their own (tests/edge.rs,
/// tests/process.rs).
const TEST_COMMAND_TIMEOUT_MS: u64 = 10_000;

/// A redis-backed gateway on a Redis Cluster of its own: 3 primaries with a replica each.
pub async fn cluster_gw() -> Gw<RedisBackend> {
    let cluster = RedisCluster::start_with_replicas(3, 1);
    let url = cluster.url();
    redis_gw_at(&url, true, None, Some(cluster), &[]).await
}

/// A redis-backed gateway on a given server (e.g. one with AOF).
pub async fn redis_gw_on(redis: RedisServer, extra: &[String]) -> Gw<RedisBackend> {
    let url = redis.url();
    redis_gw_at(&url, false, Some(redis), None, extra).await
}

/// A redis-backed gateway on `url` (a cluster when `cluster`), keeping the server or the
/// cluster it runs on alive with it, and a PostgreSQL database of its own.
async fn redis_gw_at(
    url: &str,
    cluster: bool,
    redis: Option<RedisServer>,
    redis_cluster: Option<RedisCluster>,
    extra: &[String],
) -> Gw<RedisBackend> {
    let pg = PgDb::create();
    let dir = tempfile::tempdir().unwrap();
    let mut o = vec![
        format!("redis.url=\"{url}\""),
        format!("redis.cluster={cluster}"),
        format!("redis.command_timeout_ms={TEST_COMMAND_TIMEOUT_MS}"),
        // queued claims wait as long as a script call may take here
        format!("stock.group_wait_ms={TEST_COMMAND_TIMEOUT_MS}"),
    ];
    o.extend_from_slice(extra);
    let cfg = Arc::new(config(&o));
    let backend = Arc::new(
        RedisBackend::connect(&RedisConfig {
            url: url.to_string(),
            cluster,
            command_timeout_ms: TEST_COMMAND_TIMEOUT_MS,
            ..RedisConfig::default()
        })
        .await
        .expect("redis backend"),
    );
    let db = open_db(&pg.url).await;
    let app = claimgate::gateway::assemble(cfg.clone(), backend.clone(), db.clone(), None);
    Gw {
        app,
        backend,
        db,
        cfg,
        redis,
        cluster: redis_cluster,
        _pg: Some(pg),
        dir,
    }
}

pub async fn embedded_gw() -> Gw<EmbeddedBackend> {
    embedded_gw_with(&[]).await
}

/// An embedded gateway with extra config overrides.
pub async fn embedded_gw_with(extra: &[String]) -> Gw<EmbeddedBackend> {
    let dir = tempfile::tempdir().unwrap();
    // queued claims and refills wait as long as on the redis-backed test gateways: a refill
    // of a batch with codes commits to SQLite (an fsync), which the whole suite's disk
    // traffic can stretch to seconds on this shared machine
    let mut o = vec![format!("stock.group_wait_ms={TEST_COMMAND_TIMEOUT_MS}")];
    o.extend_from_slice(extra);
    let cfg = Arc::new(config(&o));
    let backend = Arc::new(
        EmbeddedBackend::open(&EmbeddedConfig {
            aof_path: Some(dir.path().join("test.aof")),
            ..EmbeddedConfig::default()
        })
        .expect("embedded backend"),
    );
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
    let db = open_db(&url).await;
    let app = claimgate::gateway::assemble(cfg.clone(), backend.clone(), db.clone(), None);
    Gw {
        app,
        backend,
        db,
        cfg,
        redis: None,
        cluster: None,
        _pg: None,
        dir,
    }
}

const PEER: &str = "127.0.0.1:40000";

/// One request through the router (no socket).
pub async fn call<B: Backend>(
    app: &App<B>,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> (u16, Value) {
    call_typed(app, method, path, None, body).await
}

/// [`call`] with a `Content-Type`.
pub async fn call_typed<B: Backend>(
    app: &App<B>,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (u16, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = content_type {
        req = req.header("content-type", t);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let peer: SocketAddr = PEER.parse().unwrap();
    let resp = claimgate::http::router::handle(app, req, peer).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

pub fn batch_json(id: &str, stock: i64, limit: i64, extra: Value) -> String {
    let mut b = json!({
        "id": id, "name": "test batch", "stock": stock, "per_user_limit": limit,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "threshold", "threshold": 10000, "amount": 500},
        "scope": {"kind": "all"}, "exclusive": false,
        "eligibility": {"deny_users": [], "require_tags": [], "new_users_only": false},
    });
    if let (Some(obj), Some(extra)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            obj.insert(k.clone(), v.clone());
        }
    }
    b.to_string()
}

pub async fn create<B: Backend>(g: &Gw<B>, id: &str, stock: i64, limit: i64, extra: Value) {
    let (s, v) = call(
        &g.app,
        "POST",
        "/v1/batches",
        batch_json(id, stock, limit, extra),
    )
    .await;
    assert_eq!(s, 201, "create {id}: {v}");
}

/// `POST /v1/coupons/{id}/{action}` (lock, redeem, release, refund) for `order`.
pub async fn act<B: Backend>(g: &Gw<B>, id: &str, action: &str, order: &str) -> (u16, Value) {
    call(
        &g.app,
        "POST",
        &format!("/v1/coupons/{id}/{action}"),
        json!({ "order_id": order }).to_string(),
    )
    .await
}

pub async fn claim<B: Backend>(
    app: &App<B>,
    batch: &str,
    user: &str,
    rid: Option<&str>,
) -> (u16, Value) {
    let body = match rid {
        Some(r) => json!({"user_id": user, "request_id": r}),
        None => json!({"user_id": user}),
    };
    call(
        app,
        "POST",
        &format!("/v1/batches/{batch}/claims"),
        body.to_string(),
    )
    .await
}

/// Runs a persister on the gateway's backend and database until `done` holds (bounded: the
/// test fails naming `what` after 30 s).
pub async fn persist_until<B: Backend>(g: &Gw<B>, what: &str, mut done: impl AsyncFnMut() -> bool) {
    let stop = tokio_util::sync::CancellationToken::new();
    let p = claimgate::persist::Persister::spawn(
        g.backend.clone(),
        g.db.clone(),
        g.cfg.persister.clone(),
        stop.clone(),
    );
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let _ = p.flush().await;
        if done().await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the database never got {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.cancel();
    p.join().await;
}
