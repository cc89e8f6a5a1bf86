//! Bulk grants (issue 11 item 1): `POST /v1/batches/{id}/grants` and `GET /v1/jobs/{id}`.
//! A job grants through the claim script (same stock, same limits), counts every user
//! once, never grants a (job, user) twice (a job resumed after `kill -9` included), takes a
//! streamed NDJSON or CSV upload line by line, and refuses bad input with a 4xx.

mod support;

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use claimgate::backend::Backend;
use claimgate::config::DatabaseConfig;
use claimgate::http::App;
use claimgate::store::Db;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use serde_json::{Value, json};
use support::gw::{Gw, batch_json, call, claim, create, embedded_gw_with, redis_gw_with};
use support::http::Http;
use support::watchdog::{Watchdog, step};
use support::{Gateway, PgDb, RedisServer};
use tokio_util::sync::CancellationToken;

/// A request body delivered in the given frames (a streamed upload, split anywhere).
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// One upload through the router, `body` cut into frames of `frame` bytes.
async fn upload<B: Backend>(
    app: &App<B>,
    batch: &str,
    content_type: &str,
    body: &[u8],
    frame: usize,
) -> (u16, Value) {
    let frames = body
        .chunks(frame.max(1))
        .map(Bytes::copy_from_slice)
        .collect();
    let req = Request::builder()
        .method("POST")
        .uri(format!("/v1/batches/{batch}/grants"))
        .header("content-type", content_type)
        .body(Frames(frames))
        .unwrap();
    let resp = claimgate::http::router::handle(app, req, "127.0.0.1:40000".parse().unwrap()).await;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Polls the job until it is no longer running (bounded).
async fn settled<B: Backend>(app: &App<B>, job: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (s, v) = call(app, "GET", &format!("/v1/jobs/{job}"), "").await;
        assert_eq!(s, 200, "{v}");
        if v["state"] != "running" {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job still running: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counts(v: &Value) -> (u64, u64, u64, u64) {
    let c = &v["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    (
        n("granted"),
        n("skipped_limit"),
        n("skipped_sold_out"),
        n("failed"),
    )
}

/// Starts a persister on the test gateway's backend and database (in-process gateways run
/// none), so the database can be asked who got how many coupons.
fn persist<B: Backend>(g: &Gw<B>) -> CancellationToken {
    let stop = CancellationToken::new();
    let _ = claimgate::persist::Persister::spawn(
        g.backend.clone(),
        g.db.clone(),
        g.cfg.persister.clone(),
        stop.clone(),
    );
    stop
}

/// Waits until the database holds `want` coupons of `batch`, then checks that no user holds
/// more than `limit` of them.
async fn persisted_once_per_user(db: &Db, batch: &str, want: u64, limit: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (rows, events) = db.claim_counts(batch).await.unwrap();
        assert!(rows <= want, "{rows} coupons in the database, stock {want}");
        if rows == want && events == want {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "database has {rows} coupons; want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sql = "SELECT user_id, COUNT(*) FROM coupons WHERE batch_id = $1 \
               GROUP BY user_id HAVING COUNT(*) > $2";
    let over: Vec<(String, i64)> = match db {
        Db::Postgres(p) => {
            sqlx::query_as(sql)
                .bind(batch)
                .bind(limit)
                .fetch_all(p)
                .await
        }
        Db::Sqlite(p) => {
            sqlx::query_as(sql)
                .bind(batch)
                .bind(limit)
                .fetch_all(p)
                .await
        }
    }
    .unwrap();
    assert!(over.is_empty(), "users over the limit: {over:?}");
}

async fn stock_view<B: Backend>(app: &App<B>, batch: &str) -> Value {
    let (s, v) = call(app, "GET", &format!("/v1/batches/{batch}"), "").await;
    assert_eq!(s, 200, "{v}");
    v["stock"].clone()
}

// ------------------------------------------------------------------ the JSON form

async fn json_list_grants_each_user_once<B: Backend>(g: Gw<B>) {
    create(&g, "g1", 1_000, 1, json!({})).await;
    let mut users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    users.push("u7".into()); // a duplicate line
    let body = json!({ "user_ids": users }).to_string();
    let (s, v) = call(&g.app, "POST", "/v1/batches/g1/grants", body).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(
        (v["state"].clone(), v["total"].clone()),
        (json!("running"), json!(301))
    );
    let job = v["job_id"].as_str().unwrap().to_string();
    let v = settled(&g.app, &job).await;
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(counts(&v), (300, 0, 0, 1), "{v}");
    assert_eq!(
        (v["total"].clone(), v["processed"].clone()),
        (json!(301), json!(301))
    );
    let reason = v["errors"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("duplicate"), "{v}");
    assert_eq!(v["errors"][0]["user_id"], "u7");
    // the grants are claims: the users are at their limit, the stock went down by 300
    let (s, e) = claim(&g.app, "g1", "u3", None).await;
    assert_eq!(
        (s, e["error"].clone()),
        (409, json!("limit_reached")),
        "{e}"
    );
    assert_eq!(
        stock_view(&g.app, "g1").await,
        json!({"total": 1000, "claimed": 300, "remaining": 700})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_list_grants_each_user_once_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    json_list_grants_each_user_once(embedded_gw_with(&["grants.chunk_users=64".into()]).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_list_grants_each_user_once_redis() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    json_list_grants_each_user_once(redis_gw_with(&["grants.chunk_users=64".into()]).await).await;
}

// ------------------------------------------------------------------ limits and sold out

/// Users already at their limit are skipped at limit, the stock left is granted, and the
/// rest are skipped as sold out; the counts add up to the users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_sold_out_are_counted_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&["grants.chunk_users=16".into()]).await;
    create(&g, "g2", 50, 1, json!({"shards": 4})).await;
    for i in 0..10 {
        let (s, v) = claim(&g.app, "g2", &format!("u{i}"), None).await;
        assert_eq!(s, 201, "{v}");
    }
    let users: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let (s, v) = call(
        &g.app,
        "POST",
        "/v1/batches/g2/grants",
        json!({ "user_ids": users }).to_string(),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let v = settled(&g.app, v["job_id"].as_str().unwrap()).await;
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(counts(&v), (40, 10, 50, 0), "{v}");
    assert_eq!(
        stock_view(&g.app, "g2").await,
        json!({"total": 50, "claimed": 50, "remaining": 0})
    );
}

/// A paused batch: every user is counted failed with the reason; nothing is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_batch_fails_each_user_with_the_reason_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&["grants.max_errors=3".into()]).await;
    create(&g, "g3", 50, 1, json!({})).await;
    let (s, v) = call(&g.app, "PATCH", "/v1/batches/g3", r#"{"state":"paused"}"#).await;
    assert_eq!(s, 200, "{v}");
    let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let (s, v) = call(
        &g.app,
        "POST",
        "/v1/batches/g3/grants",
        json!({ "user_ids": users }).to_string(),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let v = settled(&g.app, v["job_id"].as_str().unwrap()).await;
    assert_eq!(counts(&v), (0, 0, 0, 10), "{v}");
    assert_eq!(v["errors"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["errors"][0]["reason"], "the batch is paused");
    assert_eq!(stock_view(&g.app, "g3").await["claimed"], 0);
}

// ------------------------------------------------------------------ streamed uploads

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_ndjson_is_read_line_by_line_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&[
        "grants.chunk_users=3".into(),
        "grants.max_line_bytes=200".into(),
    ])
    .await;
    create(&g, "n1", 100, 1, json!({})).await;
    let long = format!("\"{}\"", "x".repeat(300));
    let body = format!(
        "{{\"user_id\": \"a1\"}}\n\"a2\"\r\n\n  \n{{\"user_id\": \"a:3\"}}\nnot json\n{long}\n\
         {{\"user_id\": \"a4\", \"x\": 1}}\n\"a5\"\n{{\"user_id\":\"a6\"}}\n\"a7\""
    );
    // frames of 7 bytes: lines (and the over-long one) span many frames
    let (s, v) = upload(&g.app, "n1", "application/x-ndjson", body.as_bytes(), 7).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["total"], 9, "{v}");
    let v = settled(&g.app, v["job_id"].as_str().unwrap()).await;
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(counts(&v), (5, 0, 0, 4), "{v}");
    let lines: Vec<u64> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![5, 6, 7, 8], "{v}");
    assert!(
        v["errors"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("longer than 200"),
        "{v}"
    );
    for u in ["a1", "a2", "a5", "a6", "a7"] {
        let (s, e) = claim(&g.app, "n1", u, None).await;
        assert_eq!(s, 409, "{u} was granted: {e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_csv_with_a_header_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&["grants.chunk_users=2".into()]).await;
    create(&g, "c1", 100, 1, json!({})).await;
    let body = "user_id\r\nc1\r\n\"c2\"\r\nc3,extra\r\nuser_id\r\nc4";
    let (s, v) = upload(&g.app, "c1", "text/csv; charset=utf-8", body.as_bytes(), 5).await;
    assert_eq!(s, 202, "{v}");
    let v = settled(&g.app, v["job_id"].as_str().unwrap()).await;
    // the header is not a user; a later `user_id` line is one
    assert_eq!(v["total"], 5, "{v}");
    assert_eq!(counts(&v), (4, 0, 0, 1), "{v}");
    assert_eq!(v["errors"][0]["line"], 4, "{v}");
    let (s, _) = claim(&g.app, "c1", "user_id", None).await;
    assert_eq!(s, 409);
}

// ------------------------------------------------------------------ bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_4xx_and_leaves_no_job_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&[
        "grants.max_users=5".into(),
        "grants.max_upload_bytes=1024".into(),
        "grants.max_json_bytes=256".into(),
    ])
    .await;
    create(&g, "b1", 100, 1, json!({})).await;
    let post = |body: String| call(&g.app, "POST", "/v1/batches/b1/grants", body);
    let six: Vec<String> = (0..6).map(|i| format!("u{i}")).collect();
    for (body, want) in [
        (json!({"user_ids": []}).to_string(), "empty"),
        (json!({"user_ids": six}).to_string(), "at most 5"),
        (
            json!({"user_ids": ["ok", "a b"]}).to_string(),
            "user_ids[1]",
        ),
        (
            json!({"user_ids": ["ok"], "x": 1}).to_string(),
            "unknown field",
        ),
        (json!({"user_ids": [1]}).to_string(), "invalid"),
        ("[]".to_string(), "JSON object"),
        (
            json!({"user_ids": ["u".repeat(100), "v".repeat(100), "w".repeat(100)]}).to_string(),
            "larger than 256",
        ),
    ] {
        let (s, v) = post(body.clone()).await;
        assert_eq!(
            (s, v["error"].clone()),
            (400, json!("bad_request")),
            "{body}: {v}"
        );
        assert!(v["message"].as_str().unwrap().contains(want), "{body}: {v}");
    }
    // a missing batch: 404 before anything is read or spooled, in every form
    let (s, v) = call(
        &g.app,
        "POST",
        "/v1/batches/nope/grants",
        r#"{"user_ids":["u"]}"#,
    )
    .await;
    assert_eq!((s, v["error"].clone()), (404, json!("batch_not_found")));
    let (s, v) = upload(&g.app, "nope", "application/x-ndjson", b"\"u\"\n", 4).await;
    assert_eq!((s, v["error"].clone()), (404, json!("batch_not_found")));
    // streamed: too many users, too large, nothing at all, an unknown media type
    let seven = (0..7).map(|i| format!("\"s{i}\"\n")).collect::<String>();
    let (s, v) = upload(&g.app, "b1", "application/x-ndjson", seven.as_bytes(), 3).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("at most 5"), "{v}");
    let big = format!("x\n{}", "\n".repeat(2_000)); // blank lines: not users, but bytes
    let (s, v) = upload(&g.app, "b1", "text/csv", big.as_bytes(), 100).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("larger than 1024"),
        "{v}"
    );
    let (s, v) = upload(&g.app, "b1", "text/csv", b"user_id\n\n", 3).await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = upload(&g.app, "b1", "text/plain", b"u1\n", 3).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("Content-Type"),
        "{v}"
    );
    // nothing was granted, and no job row survived a refused upload
    assert_eq!(stock_view(&g.app, "b1").await["claimed"], 0);
    let jobs: (i64,) = match &g.db {
        Db::Sqlite(p) => {
            sqlx::query_as("SELECT COUNT(*) FROM grant_jobs")
                .fetch_one(p)
                .await
        }
        Db::Postgres(p) => {
            sqlx::query_as("SELECT COUNT(*) FROM grant_jobs")
                .fetch_one(p)
                .await
        }
    }
    .unwrap();
    let users: (i64,) = match &g.db {
        Db::Sqlite(p) => {
            sqlx::query_as("SELECT COUNT(*) FROM grant_job_users")
                .fetch_one(p)
                .await
        }
        Db::Postgres(p) => {
            sqlx::query_as("SELECT COUNT(*) FROM grant_job_users")
                .fetch_one(p)
                .await
        }
    }
    .unwrap();
    assert_eq!((jobs.0, users.0), (0, 0));
    // unknown and malformed job ids
    for id in ["0123456789abcdef0123456789abcdef", "x", "%2e%2e"] {
        let (s, v) = call(&g.app, "GET", &format!("/v1/jobs/{id}"), "").await;
        assert_eq!(
            (s, v["error"].clone()),
            (404, json!("job_not_found")),
            "{id}"
        );
    }
    let (s, _) = call(&g.app, "GET", "/v1/batches/b1/grants", "").await;
    assert_eq!(s, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(60));
    let token = "a-long-admin-token-for-tests";
    let g = embedded_gw_with(&[format!("auth.admin_token=\"{token}\"")]).await;
    let (s, _) = call(
        &g.app,
        "POST",
        "/v1/batches/x/grants",
        r#"{"user_ids":["u"]}"#,
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = call(
        &g.app,
        "GET",
        "/v1/jobs/0123456789abcdef0123456789abcdef",
        "",
    )
    .await;
    assert_eq!(s, 401);
}

// ------------------------------------------------------------------ concurrency

/// A job and live claims race for the same stock and partly the same users: exactly the
/// stock is claimed, granted + claimed-live equals it, and no user ends up with more
/// coupons than the per-user limit (checked in the database).
async fn a_job_racing_live_claims_never_oversells<B: Backend>(g: Gw<B>) {
    let stop = persist(&g);
    create(&g, "race", 500, 1, json!({"shards": 8})).await;
    let job_users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    let app = g.app.clone();
    let live = tokio::spawn(async move {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..16 {
            let app = app.clone();
            set.spawn(async move {
                let mut won = 0;
                for i in (500 + w..1500).step_by(16) {
                    let (s, v) = claim(&app, "race", &format!("u{i}"), Some("live")).await;
                    match s {
                        201 => won += 1,
                        409 | 410 => {}
                        _ => panic!("live claim: {s} {v}"),
                    }
                }
                won
            });
        }
        let mut won = 0;
        while let Some(r) = set.join_next().await {
            won += r.unwrap();
        }
        won
    });
    let (s, v) = call(
        &g.app,
        "POST",
        "/v1/batches/race/grants",
        json!({ "user_ids": job_users }).to_string(),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let job = settled(&g.app, v["job_id"].as_str().unwrap()).await;
    let live_won: u64 = live.await.unwrap();
    let (granted, at_limit, sold_out, failed) = counts(&job);
    assert_eq!(granted + at_limit + sold_out + failed, 1000, "{job}");
    assert_eq!(failed, 0, "{job}");
    assert_eq!(granted + live_won, 500, "job {job}, live {live_won}");
    assert_eq!(
        stock_view(&g.app, "race").await,
        json!({"total": 500, "claimed": 500, "remaining": 0})
    );
    persisted_once_per_user(&g.db, "race", 500, 1).await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_racing_live_claims_never_oversells_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(180));
    let g = embedded_gw_with(&["grants.chunk_users=100".into()]).await;
    a_job_racing_live_claims_never_oversells(g).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_racing_live_claims_never_oversells_redis() {
    let _w = Watchdog::arm(Duration::from_secs(180));
    let g = redis_gw_with(&["grants.chunk_users=100".into()]).await;
    a_job_racing_live_claims_never_oversells(g).await;
}

// ------------------------------------------------------------------ kill -9 and resume

/// The real binary: a job of 20,000 users is killed with `kill -9` part way, the gateway
/// restarts, and the job resumes from its last checkpoint (the restarted process decides
/// at most the users the first had not checkpointed) and finishes. Every user is granted
/// exactly once: the counts add up, the batch's claimed count equals the users, and the
/// database holds one coupon per user.
async fn a_job_killed_mid_way_resumes_without_granting_twice(
    backend_args: Vec<String>,
    db_url: String,
) {
    let users = 20_000u64;
    let mut args = backend_args;
    for s in [
        "grants.lease_ms=500",
        "grants.poll_ms=100",
        "grants.chunk_users=500",
        "grants.concurrency=16",
        "persister.flush_interval_ms=5",
    ] {
        args.push("--set".into());
        args.push(s.into());
    }
    let mut gw = Gateway::start(&args);
    let http = Http::new(&gw.base());
    let (s, v) = http
        .send(
            "POST",
            "/v1/batches",
            &batch_json("k9", 100_000, 1, json!({"shards": 8})),
        )
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    let body: String = (0..users).map(|i| format!("\"user{i}\"\n")).collect();
    step("upload");
    let accepted = upload_over_tcp(&gw.base(), "k9", body).await;
    let job = accepted["job_id"].as_str().unwrap().to_string();
    // kill -9 once part of the job is checkpointed, well before its end
    step("waiting for progress");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        let (s, v) = http
            .send("GET", &format!("/v1/jobs/{job}"), "")
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        if v["processed"].as_u64().unwrap() >= 1_000 {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    gw.kill9();
    assert_eq!(
        before["state"], "running",
        "killed before the end: {before}"
    );
    let processed_at_kill = before["processed"].as_u64().unwrap();
    assert!(processed_at_kill < users, "{before}");
    step("restart");
    gw.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let after = loop {
        let (s, v) = http
            .send("GET", &format!("/v1/jobs/{job}"), "")
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        if v["state"] != "running" {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job not resumed: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(after["state"], "done", "{after}");
    assert_eq!(counts(&after), (users, 0, 0, 0), "{after}");
    // the restarted process resumed at the checkpoint, not from the first user
    let (s, _) = http.send("GET", "/healthz", "").await.unwrap();
    assert_eq!(s, 200);
    let metrics = metrics_text(&gw.base()).await;
    let decided_here = metric(&metrics, "claimgate_grant_users_total{outcome=\"granted\"}");
    assert!(
        decided_here > 0 && decided_here <= users - processed_at_kill,
        "the restarted gateway decided {decided_here} users; {processed_at_kill} were \
         checkpointed before the kill"
    );
    assert_eq!(
        metric(&metrics, "claimgate_grant_jobs_total{event=\"resumed\"}"),
        1
    );
    let (s, v) = http.send("GET", "/v1/batches/k9", "").await.unwrap();
    assert_eq!(s, 200);
    // no shard was taken for rolled back: a repair writes its stock off, which shows as
    // claimed, and nothing was rolled back here
    assert_eq!(
        metric(
            &metrics,
            "claimgate_shard_faults_total{kind=\"rolled_back\"}"
        ),
        0
    );
    assert_eq!(v["stock"]["claimed"], users, "granted twice? {v}");
    step("database");
    let db = Db::connect(&DatabaseConfig {
        url: db_url,
        ..Default::default()
    })
    .await
    .unwrap();
    persisted_once_per_user(&db, "k9", users, 1).await;
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_way_resumes_without_granting_twice_redis() {
    let _w = Watchdog::arm(Duration::from_secs(300));
    let redis = RedisServer::start();
    let pg = PgDb::create();
    let args = vec![
        "--backend".into(),
        "redis".into(),
        "--redis-url".into(),
        redis.url(),
        "--database-url".into(),
        pg.url.clone(),
    ];
    a_job_killed_mid_way_resumes_without_granting_twice(args, pg.url.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_way_resumes_without_granting_twice_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(300));
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}?mode=rwc", dir.path().join("k9.db").display());
    let args = vec![
        "--backend".into(),
        "embedded".into(),
        "--database-url".into(),
        db_url.clone(),
        "--set".into(),
        format!(
            "embedded.aof_path=\"{}\"",
            dir.path().join("k9.aof").display()
        ),
    ];
    a_job_killed_mid_way_resumes_without_granting_twice(args, db_url).await;
}

/// The gateway's `/metrics` text.
async fn metrics_text(base: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let req = format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("metrics answered")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of one exported series (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Streams `body` as NDJSON to the gateway's grant route in many small writes.
async fn upload_over_tcp(base: &str, batch: &str, body: String) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/batches/{batch}/grants HTTP/1.1\r\nhost: {addr}\r\n\
         content-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for part in body.as_bytes().chunks(4096) {
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(part).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut out))
        .await
        .expect("upload answered")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 202"), "{text}");
    let json = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|_| panic!("{text}"))
}

// ------------------------------------------------------------------ leases and resume

/// Two instances on one backend and database: A runs a job and stops part way (it gives
/// its lease up); B, looking for orphaned jobs, resumes it from A's last checkpoint. Then a
/// job A holds (not given up) is left alone by B until the lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_gives_its_job_up_and_another_resumes_it_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(120));
    let g = embedded_gw_with(&[
        "grants.chunk_users=20".into(),
        "grants.concurrency=2".into(),
        "grants.lease_ms=400".into(),
    ])
    .await;
    create(&g, "ab", 10_000, 1, json!({"shards": 4})).await;
    let b = claimgate::gateway::assemble(g.cfg.clone(), g.backend.clone(), g.db.clone(), None);
    let users: Vec<String> = (0..2_000).map(|i| format!("u{i}")).collect();
    let (s, v) = call(
        &g.app,
        "POST",
        "/v1/batches/ab/grants",
        json!({ "user_ids": users }).to_string(),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let job = v["job_id"].as_str().unwrap().to_string();
    step("A runs part of the job");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = call(&g.app, "GET", &format!("/v1/jobs/{job}"), "").await;
        if v["processed"].as_u64().unwrap() >= 100 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {v}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    g.app.api().grants().shutdown(Duration::from_secs(10)).await;
    assert_eq!(g.app.api().grants().running(), 0);
    let (_, at_stop) = call(&g.app, "GET", &format!("/v1/jobs/{job}"), "").await;
    assert_eq!(at_stop["state"], "running", "stopped part way: {at_stop}");
    // the lease was given up: B takes the job at once, from the checkpoint
    step("B resumes it");
    b.api().grants().resume_orphans().await;
    let v = settled(&b, &job).await;
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(counts(&v), (2_000, 0, 0, 0), "{v}");
    assert_eq!(
        stock_view(&b, "ab").await,
        json!({"total": 10000, "claimed": 2000, "remaining": 8000})
    );
    // A job whose instance died holding its lease: nobody else runs it before it expires.
    step("a held lease");
    let c = claimgate::gateway::assemble(g.cfg.clone(), g.backend.clone(), g.db.clone(), None);
    let more: Vec<String> = (2_000..4_000).map(|i| format!("u{i}")).collect();
    c.api().grants().shutdown(Duration::ZERO).await; // c accepts, but runs nothing
    let (s, v) = call(
        &c,
        "POST",
        "/v1/batches/ab/grants",
        json!({ "user_ids": more }).to_string(),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let held = v["job_id"].as_str().unwrap().to_string();
    assert_eq!(c.api().grants().running(), 0);
    // as a dead instance leaves it: leased to it for another 400 ms
    let Db::Sqlite(pool) = &g.db else {
        unreachable!("embedded")
    };
    let until = claimgate::store::now_ms() + 400;
    sqlx::query("UPDATE grant_jobs SET lease_owner = 'dead', lease_until = $2 WHERE id = $1")
        .bind(&held)
        .bind(until)
        .execute(pool)
        .await
        .unwrap();
    b.api().grants().resume_orphans().await;
    assert_eq!(b.api().grants().running(), 0, "a held lease is left alone");
    let (_, v) = call(&b, "GET", &format!("/v1/jobs/{held}"), "").await;
    assert_eq!(
        (v["state"].clone(), v["processed"].clone()),
        (json!("running"), json!(0))
    );
    assert!(
        claimgate::store::now_ms() < until,
        "the check ran within the lease"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.api().grants().resume_orphans().await;
    let v = settled(&b, &held).await;
    assert_eq!(counts(&v), (2_000, 0, 0, 0), "{v}");
    assert_eq!(stock_view(&b, "ab").await["claimed"], 4_000);
}

/// An upload cut off by a crash (nobody was told its job id) is marked failed by the next
/// look for work, and its spooled users are deleted; its users were never granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_off_mid_way_becomes_a_failed_job_embedded() {
    let _w = Watchdog::arm(Duration::from_secs(60));
    let g = embedded_gw_with(&[
        "grants.chunk_users=2".into(),
        "grants.upload_timeout_ms=1".into(),
        "grants.lease_ms=100".into(),
    ])
    .await;
    create(&g, "cut", 100, 1, json!({})).await;
    let mut upload =
        claimgate::api::grants::Upload::begin(g.app.api(), "cut", claimgate::jobs::LineFormat::Csv)
            .await
            .unwrap();
    upload.accept(b"u1\nu2\nu3\nu4\nu").await.unwrap();
    let job: (String,) = match &g.db {
        Db::Sqlite(p) => {
            sqlx::query_as("SELECT id FROM grant_jobs")
                .fetch_one(p)
                .await
        }
        Db::Postgres(_) => unreachable!("embedded"),
    }
    .unwrap();
    drop(upload); // the gateway died mid-upload
    let (s, _) = call(&g.app, "GET", &format!("/v1/jobs/{}", job.0), "").await;
    assert_eq!(s, 404, "an upload under way is not a job yet");
    tokio::time::sleep(Duration::from_millis(150)).await;
    g.app.api().grants().resume_orphans().await;
    let (s, v) = call(&g.app, "GET", &format!("/v1/jobs/{}", job.0), "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["state"].clone(), v["reason"].clone()),
        (json!("failed"), json!("upload interrupted"))
    );
    let spooled: (i64,) = match &g.db {
        Db::Sqlite(p) => {
            sqlx::query_as("SELECT COUNT(*) FROM grant_job_users")
                .fetch_one(p)
                .await
        }
        Db::Postgres(_) => unreachable!("embedded"),
    }
    .unwrap();
    assert_eq!(spooled.0, 0);
    assert_eq!(stock_view(&g.app, "cut").await["claimed"], 0);
}
