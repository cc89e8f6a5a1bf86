//! `docs/openapi.json` against the implementation: the document parses, names exactly the
//! routes the router serves, documents every error `ApiError` can produce (with its status
//! and `Retry-After`), is what `/openapi.json` serves, and its response schemas accept the
//! live answers of the router (checked with a small validator for the schema subset the
//! document uses).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use claimgate::api::ApiError;
use claimgate::backend::embedded::EmbeddedBackend;
use claimgate::config::EmbeddedConfig;
use claimgate::http::App;
use claimgate::store::Db;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

/// Every operation the router serves (src/http/router.rs), as the document must name it.
const ROUTES: [(&str, &str); 22] = [
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/{id}"),
    ("PATCH", "/v1/batches/{id}"),
    ("POST", "/v1/batches/{id}/claims"),
    ("POST", "/v1/batches/{id}/grants"),
    ("POST", "/v1/batches/{id}/codes"),
    ("GET", "/v1/jobs/{job_id}"),
    ("GET", "/v1/users/{user_id}/coupons"),
    ("POST", "/v1/coupons/{coupon_id}/lock"),
    ("POST", "/v1/coupons/{coupon_id}/redeem"),
    ("POST", "/v1/coupons/{coupon_id}/release"),
    ("POST", "/v1/coupons/{coupon_id}/refund"),
    ("GET", "/v1/events"),
    ("GET", "/v1/events/{event_id}"),
    ("GET", "/v1/batches"),
    ("GET", "/v1/products/{product_id}/batches"),
    ("POST", "/v1/checkout/quote"),
    ("GET", "/v1/admin/reconcile"),
];

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn doc() -> Value {
    let text = std::fs::read_to_string(DOC_PATH).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

/// (METHOD, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in HTTP_METHODS {
            if item.get(m).is_some() {
                ops.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// Follows `$ref`s (local ones only) to the object they name.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let target = r.strip_prefix('#').expect("local $ref");
            resolve(
                doc,
                doc.pointer(target)
                    .unwrap_or_else(|| panic!("dangling {r}")),
            )
        }
        None => v,
    }
}

/// The documented response of an operation (or of `x-unrouted-responses` when `method` is
/// empty) for a status.
fn response<'a>(doc: &'a Value, method: &str, path: &str, status: u16) -> Option<&'a Value> {
    let responses = if method.is_empty() {
        &doc["x-unrouted-responses"]
    } else {
        &doc["paths"][path][method.to_lowercase()]["responses"]
    };
    responses.get(status.to_string()).map(|r| resolve(doc, r))
}

// ---- a small JSON Schema validator: the subset the document uses ----

/// Whether `s` matches the JSON Schema `pattern` (a regular expression searched anywhere in
/// `s`, so the document's patterns anchor themselves with `^`/`$`). A pattern the engine
/// cannot compile fails the test: the document must stay checkable.
fn pattern_matches(pattern: &str, s: &str) -> bool {
    regex_automata::meta::Regex::new(pattern)
        .unwrap_or_else(|e| panic!("pattern {pattern} does not compile: {e}"))
        .is_match(s)
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unknown type {other}"),
    }
}

/// Validates `v` against `schema`, collecting errors (with their JSON pointer) in `errs`.
/// Keywords: $ref, type, const, enum, pattern, format date-time, minimum, maximum,
/// required, properties, additionalProperties (false or a schema), items, allOf, anyOf,
/// oneOf. Others (descriptions, discriminator, ...) are annotations here.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if schema.get("$ref").is_some() {
        check(doc, resolve(doc, schema), v, at, errs);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            t => vec![t.as_str().expect("type")],
        };
        if !types.iter().any(|t| has_type(v, t)) {
            errs.push(format!("{at}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(c) = schema.get("const")
        && c != v
    {
        errs.push(format!("{at}: {v} is not {c}"));
    }
    if let Some(Value::Array(e)) = schema.get("enum")
        && !e.contains(v)
    {
        errs.push(format!("{at}: {v} is not one of {e:?}"));
    }
    if let (Some(p), Some(s)) = (schema.get("pattern").and_then(Value::as_str), v.as_str())
        && !pattern_matches(p, s)
    {
        errs.push(format!("{at}: {s:?} does not match {p}"));
    }
    if let (Some("date-time"), Some(s)) = (schema.get("format").and_then(Value::as_str), v.as_str())
        && claimgate::domain::time::Timestamp::parse(s).is_none()
    {
        errs.push(format!("{at}: {s:?} is not an RFC 3339 date-time"));
    }
    if let (Some(m), Some(n)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64())
        && n < m
    {
        errs.push(format!("{at}: {n} < minimum {m}"));
    }
    if let (Some(m), Some(n)) = (schema.get("maximum").and_then(Value::as_f64), v.as_f64())
        && n > m
    {
        errs.push(format!("{at}: {n} > maximum {m}"));
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().expect("required name");
            if !obj.contains_key(r) {
                errs.push(format!("{at}: missing required {r:?}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, child) in obj {
            let at = format!("{at}/{k}");
            match (
                props.and_then(|p| p.get(k)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => check(doc, s, child, &at, errs),
                (None, Some(Value::Bool(false))) => errs.push(format!("{at}: not allowed")),
                (None, Some(s @ Value::Object(_))) => check(doc, s, child, &at, errs),
                (None, _) => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, child) in arr.iter().enumerate() {
            check(doc, items, child, &format!("{at}/{i}"), errs);
        }
    }
    for s in schema["allOf"].as_array().into_iter().flatten() {
        check(doc, s, v, at, errs);
    }
    let passing = |list: &Value| {
        list.as_array().map(|l| {
            l.iter()
                .filter(|s| {
                    let mut e = Vec::new();
                    check(doc, s, v, at, &mut e);
                    e.is_empty()
                })
                .count()
        })
    };
    if let Some(n) = passing(&schema["anyOf"])
        && n == 0
    {
        errs.push(format!("{at}: {v} matches none of anyOf"));
    }
    if let Some(n) = passing(&schema["oneOf"])
        && n != 1
    {
        errs.push(format!("{at}: {v} matches {n} of oneOf, not exactly 1"));
    }
}

fn errors_against(doc: &Value, schema: &Value, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check(doc, schema, v, "", &mut errs);
    errs
}

fn json_schema(r: &Value) -> &Value {
    &r["content"]["application/json"]["schema"]
}

// ---- an app in-process (as tests/conformance.rs `embedded_gw()`) ----

struct Gw {
    app: Arc<App<EmbeddedBackend>>,
    _dir: tempfile::TempDir,
}

async fn gateway() -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(claimgate::config::load(None, Vec::new(), &[]).expect("config"));
    let backend = Arc::new(
        EmbeddedBackend::open(&EmbeddedConfig {
            aof_path: Some(dir.path().join("test.aof")),
            ..Default::default()
        })
        .expect("embedded backend"),
    );
    let db = Db::connect(&claimgate::config::DatabaseConfig {
        url: format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display()),
        ..Default::default()
    })
    .await
    .expect("database");
    db.migrate().await.expect("migrate");
    let app = claimgate::gateway::assemble(cfg, backend, db, None);
    Gw { app, _dir: dir }
}

struct Answer {
    status: u16,
    headers: http::HeaderMap,
    bytes: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
}

async fn call(gw: &Gw, method: &str, path: &str, body: &str) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    let resp = claimgate::http::router::handle(&gw.app, req, peer).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        bytes,
    }
}

/// Calls the router and checks the answer against the document's response for
/// (`method`, `template`, status): documented, JSON body valid, `Retry-After` as documented.
async fn conforms(
    gw: &Gw,
    doc: &Value,
    method: &str,
    template: &str,
    path: &str,
    body: &str,
) -> Value {
    let a = call(gw, method, path, body).await;
    let r = response(doc, method, template, a.status)
        .unwrap_or_else(|| panic!("{method} {path}: status {} not documented", a.status));
    let v = a.json();
    let errs = errors_against(doc, json_schema(r), &v);
    assert!(
        errs.is_empty(),
        "{method} {path} -> {} {v}: {errs:#?}",
        a.status
    );
    assert_eq!(
        a.headers.contains_key(http::header::RETRY_AFTER),
        r["headers"].get("Retry-After").is_some(),
        "{method} {path} -> {}: Retry-After",
        a.status
    );
    v
}

// ---- (a) routes ----

#[test]
fn document_names_exactly_the_routes_of_the_router() {
    let doc = doc();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.1."));
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(operations(&doc), expected);
    // every $ref resolves, every operation has an id and documents its answers
    fn refs(doc: &Value, v: &Value) {
        match v {
            Value::Object(o) => {
                if o.contains_key("$ref") {
                    resolve(doc, v);
                }
                o.values().for_each(|c| refs(doc, c));
            }
            Value::Array(a) => a.iter().for_each(|c| refs(doc, c)),
            _ => {}
        }
    }
    refs(&doc, &doc);
    for (m, p) in ROUTES {
        let op = &doc["paths"][p][m.to_lowercase()];
        assert!(op["operationId"].is_string(), "{m} {p}");
        assert!(!op["responses"].as_object().unwrap().is_empty(), "{m} {p}");
    }
}

/// The router serves each documented operation and refuses every other method (405).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_serves_exactly_the_documented_operations() {
    let doc = doc();
    let gw = gateway().await;
    let ops = operations(&doc);
    for path in doc["paths"].as_object().unwrap().keys() {
        let concrete = path
            .replace("{id}", "b1")
            .replace("{user_id}", "u1")
            .replace("{coupon_id}", "b1.0.1")
            .replace("{event_id}", "b1.0.1:claimed")
            .replace("{product_id}", "p1");
        for m in ["GET", "POST", "PATCH", "PUT", "DELETE"] {
            let a = call(&gw, m, &concrete, "").await;
            let code = a.json()["error"].as_str().unwrap_or("").to_string();
            if ops.contains(&(m.to_string(), path.clone())) {
                assert!(
                    !matches!(code.as_str(), "not_found" | "method_not_allowed"),
                    "{m} {concrete}: {code}"
                );
                assert!(
                    response(&doc, m, path, a.status).is_some(),
                    "{m} {concrete}: {} not documented",
                    a.status
                );
            } else {
                assert_eq!(
                    (a.status, code.as_str()),
                    (405, "method_not_allowed"),
                    "{m} {concrete}"
                );
            }
        }
    }
    // requests that match no operation: as `x-unrouted-responses` documents them
    for (m, path, status) in [("GET", "/v1/nothing", 404), ("DELETE", "/healthz", 405)] {
        let a = call(&gw, m, path, "").await;
        assert_eq!(a.status, status, "{m} {path}");
        let r = response(&doc, "", "", status).expect("x-unrouted-responses");
        let errs = errors_against(&doc, json_schema(r), &a.json());
        assert!(errs.is_empty(), "{m} {path}: {errs:?}");
        // every header but Content-Type is documented (405: `Allow`)
        let documented: Vec<String> = r["headers"]
            .as_object()
            .map(|o| o.keys().map(|k| k.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        for h in a
            .headers
            .keys()
            .filter(|h| *h != http::header::CONTENT_TYPE)
        {
            assert!(documented.contains(&h.to_string()), "{m} {path}: {h}");
        }
    }
}

// ---- (b) errors ----

/// One of each `ApiError` variant (the library keeps the list).
fn every_error() -> Vec<ApiError> {
    ApiError::examples()
}

#[tokio::test]
async fn every_error_is_documented_with_its_status() {
    let doc = doc();
    let codes: BTreeSet<&str> = every_error().iter().map(ApiError::code).collect();
    let documented: BTreeSet<&str> = doc["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode enum")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(
        documented, codes,
        "the ErrorCode enum is exactly the codes ApiError produces"
    );

    for e in every_error() {
        let (code, status) = (e.code(), e.status().as_u16());
        let resp = e.clone().into_response(1);
        assert_eq!(resp.status().as_u16(), status);
        let retry = resp.headers().contains_key(http::header::RETRY_AFTER);
        let body: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        // (operation, response) pairs documenting this status whose schema admits the body
        let mut places: Vec<(String, String, &Value)> = operations(&doc)
            .into_iter()
            .filter_map(|(m, p)| response(&doc, &m, &p, status).map(|r| (m, p, r)))
            .collect();
        if matches!(e, ApiError::RouteNotFound | ApiError::MethodNotAllowed(_)) {
            // not answered by any operation: requests that match none
            places = vec![(
                String::new(),
                "x-unrouted-responses".into(),
                response(&doc, "", "", status).expect("x-unrouted-responses"),
            )];
        }
        let fitting: Vec<_> = places
            .iter()
            .filter(|(_, _, r)| errors_against(&doc, json_schema(r), &body).is_empty())
            .collect();
        assert!(
            !fitting.is_empty(),
            "{code} ({status}) is documented nowhere: {body}"
        );
        for (m, p, r) in fitting {
            assert_eq!(
                r["headers"].get("Retry-After").is_some(),
                retry,
                "{code} at {m} {p}: Retry-After"
            );
        }
    }
}

// ---- (c) the served document ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_is_the_file() {
    let gw = gateway().await;
    let a = call(&gw, "GET", "/openapi.json", "").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers[http::header::CONTENT_TYPE], "application/json");
    assert_eq!(a.bytes, std::fs::read(DOC_PATH).unwrap());
}

// ---- (d) live answers against the response schemas ----

#[test]
fn id_patterns_agree_with_the_code() {
    let doc = doc();
    let pattern = |name: &str| {
        doc["components"]["schemas"][name]["pattern"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (user, batch) = (pattern("UserId"), pattern("BatchId"));
    let samples = [
        "u1",
        "a.b_c@d+e-f",
        "double11-5off",
        "",
        "a b",
        "a{b}",
        "a:b",
        "ü",
        "~x",
        "a/b",
        &"x".repeat(64),
        &"x".repeat(65),
        &"x".repeat(128),
        &"x".repeat(129),
    ];
    for s in samples {
        assert_eq!(
            pattern_matches(&user, s),
            claimgate::domain::ids::valid_ident(s),
            "{s:?}"
        );
        assert_eq!(
            pattern_matches(&batch, s),
            claimgate::domain::ids::valid_batch_id(s),
            "{s:?}"
        );
    }
    let coupon = pattern("CouponId");
    assert!(pattern_matches(&coupon, "double11-5off.3.42"));
    assert!(!pattern_matches(&coupon, "double11-5off.3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_match_the_response_schemas() {
    let doc = doc();
    let gw = gateway().await;
    let new_batch = json!({
        "id": "oa1", "name": "10% off", "stock": 5, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00+02:00"},
        "discount": {"kind": "percent", "percent_off": 10},
        "scope": {"kind": "products", "ids": ["p1"]},
    });
    // the request examples are valid request bodies, and so is this one
    let request_schema = |p: &str, m: &str| {
        doc["paths"][p][m]["requestBody"]["content"]["application/json"]["schema"].clone()
    };
    let nb = request_schema("/v1/batches", "post");
    assert!(errors_against(&doc, &nb, &new_batch).is_empty());
    let example = &resolve(&doc, &nb)["example"];
    assert!(errors_against(&doc, &nb, example).is_empty());
    assert!(!errors_against(&doc, &nb, &json!({"name": "x", "bogus": 1})).is_empty());

    let created = conforms(
        &gw,
        &doc,
        "POST",
        "/v1/batches",
        "/v1/batches",
        &new_batch.to_string(),
    )
    .await;
    assert_eq!(created["discount"]["max_off"], Value::Null);
    let claim = json!({"user_id": "u1", "request_id": "r-1"}).to_string();
    let claims = "/v1/batches/{id}/claims";
    let first = conforms(&gw, &doc, "POST", claims, "/v1/batches/oa1/claims", &claim).await;
    let again = conforms(&gw, &doc, "POST", claims, "/v1/batches/oa1/claims", &claim).await;
    assert_eq!(first, again);
    let limit = conforms(
        &gw,
        &doc,
        "POST",
        claims,
        "/v1/batches/oa1/claims",
        r#"{"user_id":"u1"}"#,
    )
    .await;
    assert_eq!(limit["error"], "limit_reached");
    conforms(
        &gw,
        &doc,
        "POST",
        claims,
        "/v1/batches/oa1/claims",
        r#"{"user_id":"a b"}"#,
    )
    .await;
    conforms(
        &gw,
        &doc,
        "POST",
        claims,
        "/v1/batches/nope/claims",
        r#"{"user_id":"u1"}"#,
    )
    .await;

    let view = conforms(&gw, &doc, "GET", "/v1/batches/{id}", "/v1/batches/oa1", "").await;
    assert_eq!(
        view["stock"],
        json!({"total": 5, "claimed": 1, "remaining": 4})
    );
    let paused = conforms(
        &gw,
        &doc,
        "PATCH",
        "/v1/batches/{id}",
        "/v1/batches/oa1",
        r#"{"state":"paused","add_stock":1}"#,
    )
    .await;
    assert_eq!(paused["batch"]["state"], "paused");
    let refused = conforms(
        &gw,
        &doc,
        "POST",
        claims,
        "/v1/batches/oa1/claims",
        r#"{"user_id":"u2"}"#,
    )
    .await;
    assert_eq!(refused["error"], "paused");
    conforms(&gw, &doc, "GET", "/v1/batches/{id}", "/v1/batches/nope", "").await;
    conforms(&gw, &doc, "POST", "/v1/batches", "/v1/batches", "{").await;

    // the wallet is read from the database, which no persister feeds here
    let wallet = "/v1/users/{user_id}/coupons";
    conforms(
        &gw,
        &doc,
        "GET",
        wallet,
        "/v1/users/u1/coupons?status=unused&limit=5",
        "",
    )
    .await;
    conforms(&gw, &doc, "GET", wallet, "/v1/users/u1/coupons?bogus=1", "").await;
    let coupon = first["coupon_id"].as_str().unwrap();
    // usable the moment the claim answered 201 (its state lives on its shard)
    let lock = "/v1/coupons/{coupon_id}/lock";
    let locked = conforms(
        &gw,
        &doc,
        "POST",
        lock,
        &format!("/v1/coupons/{coupon}/lock"),
        r#"{"order_id":"o1"}"#,
    )
    .await;
    assert_eq!(locked["state"], "locked");
    let missing = conforms(
        &gw,
        &doc,
        "POST",
        lock,
        "/v1/coupons/oa1.0.999999/lock",
        r#"{"order_id":"o1"}"#,
    )
    .await;
    assert_eq!(missing["error"], "coupon_not_found");
    let refund = "/v1/coupons/{coupon_id}/refund";
    let path = format!("/v1/coupons/{coupon}/refund");
    let refused = conforms(&gw, &doc, "POST", refund, &path, r#"{"order_id":"o1"}"#).await;
    assert_eq!(refused["error"], "invalid_state", "not redeemed yet");
    conforms(&gw, &doc, "POST", refund, &path, r#"{"order":"o1"}"#).await;

    // a redeem and a refund, then the database (as the persister writes it): the ledger
    for action in ["lock", "redeem"] {
        let a = call(
            &gw,
            "POST",
            &format!("/v1/coupons/{coupon}/{action}"),
            r#"{"order_id":"o1"}"#,
        )
        .await;
        assert_eq!(a.status, 200);
    }
    let refused = conforms(&gw, &doc, "POST", refund, &path, r#"{"order_id":"o2"}"#).await;
    assert_eq!(refused["error"], "invalid_state");
    let refunded = conforms(&gw, &doc, "POST", refund, &path, r#"{"order_id":"o1"}"#).await;
    assert_eq!(refunded["state"], "unused");
    let mut pcfg = gw.app.config().persister.clone();
    pcfg.consumer = Some("openapi".into());
    let stop = tokio_util::sync::CancellationToken::new();
    let persister = claimgate::persist::Persister::spawn(
        gw.app.backend().clone(),
        gw.app.store().clone(),
        pcfg,
        stop.clone(),
    );
    assert_eq!(persister.flush().await.unwrap(), 1);
    stop.cancel();
    persister.join().await;
    let events = "/v1/events";
    let page = conforms(&gw, &doc, "GET", events, "/v1/events?limit=2", "").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert!(page["next_cursor"].is_string());
    let all = conforms(&gw, &doc, "GET", events, "/v1/events?state=pending", "").await;
    assert_eq!(all["events"].as_array().unwrap().len(), 4);
    conforms(&gw, &doc, "GET", events, "/v1/events?state=lost", "").await;
    let one = "/v1/events/{event_id}";
    let id = all["events"][3]["event_id"].as_str().unwrap().to_string();
    let e = conforms(&gw, &doc, "GET", one, &format!("/v1/events/{id}"), "").await;
    assert_eq!(e["payload"]["type"], "coupon.refunded");
    let none = conforms(&gw, &doc, "GET", one, "/v1/events/nope:claimed", "").await;
    assert_eq!(none["error"], "event_not_found");
    conforms(&gw, &doc, "GET", one, "/v1/events/a%20b", "").await;

    campaign_answers(&gw, &doc, coupon).await;
    grant_answers(&gw, &doc).await;

    conforms(&gw, &doc, "GET", "/healthz", "/healthz", "").await;
    conforms(&gw, &doc, "GET", "/readyz", "/readyz", "").await;
}

/// A grant job's answers: the 202, the job (polled until it ends: `oa1` is paused, so every
/// user is counted failed), and the 400s and 404s.
async fn grant_answers(gw: &Gw, doc: &Value) {
    let grants = "/v1/batches/{id}/grants";
    let body = json!({"user_ids": ["g1", "g2"]}).to_string();
    let accepted = conforms(gw, doc, "POST", grants, "/v1/batches/oa1/grants", &body).await;
    let job_id = accepted["job_id"].as_str().unwrap().to_string();
    let one = "/v1/jobs/{job_id}";
    let path = format!("/v1/jobs/{job_id}");
    let mut job = conforms(gw, doc, "GET", one, &path, "").await;
    for _ in 0..500 {
        if job["state"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        job = conforms(gw, doc, "GET", one, &path, "").await;
    }
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["counts"]["failed"], 2, "{job}");
    assert_eq!(job["errors"][0]["reason"], "the batch is paused", "{job}");
    let bad = conforms(gw, doc, "POST", grants, "/v1/batches/oa1/grants", "{}").await;
    assert_eq!(bad["error"], "bad_request");
    let none = conforms(gw, doc, "POST", grants, "/v1/batches/nope/grants", &body).await;
    assert_eq!(none["error"], "batch_not_found");
    for id in ["0123456789abcdef0123456789abcdef", "nope"] {
        let none = conforms(gw, doc, "GET", one, &format!("/v1/jobs/{id}"), "").await;
        assert_eq!(none["error"], "job_not_found");
    }
    let request = &doc["paths"][grants]["post"]["requestBody"]["content"]["application/json"];
    let example = &resolve(doc, &request["schema"])["example"];
    assert!(errors_against(doc, &request["schema"], example).is_empty());
}

/// The campaign tools' answers: the listing, the product page and the quote (over a wallet
/// the persister wrote), and their 400s. `oa1` is paused by now and `u1` holds `coupon` of
/// it (10% off product p1).
async fn campaign_answers(gw: &Gw, doc: &Value, coupon: &str) {
    let listing = "/v1/batches";
    let page = conforms(
        gw,
        doc,
        "GET",
        listing,
        "/v1/batches?state=paused&limit=5",
        "",
    )
    .await;
    assert_eq!(page["batches"][0]["id"], "oa1");
    assert_eq!(page["next_cursor"], Value::Null);
    let page = conforms(
        gw,
        doc,
        "GET",
        listing,
        "/v1/batches?active_at=2030-01-01T00:00:00Z&ends_after=2030-01-01T00:00:00Z&limit=1",
        "",
    )
    .await;
    assert_eq!(page["batches"].as_array().map(Vec::len), Some(1));
    conforms(gw, doc, "GET", listing, "/v1/batches?limit=0", "").await;

    let other = json!({
        "id": "oa2", "name": "50 off 100 at zz", "stock": 5, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 30},
        "discount": {"kind": "threshold", "threshold": 10000, "amount": 5000},
        "scope": {"kind": "products", "ids": ["zz"]}, "exclusive": true,
    });
    conforms(
        gw,
        doc,
        "POST",
        "/v1/batches",
        "/v1/batches",
        &other.to_string(),
    )
    .await;
    let products = "/v1/products/{product_id}/batches";
    let shown = conforms(
        gw,
        doc,
        "GET",
        products,
        "/v1/products/zz/batches?merchant=m1",
        "",
    )
    .await;
    assert_eq!(shown["batches"][0]["batch_id"], "oa2");
    assert_eq!(shown["batches"][0]["available"], true);
    conforms(gw, doc, "GET", products, "/v1/products/zz/batches?x=1", "").await;

    // the wallet: u1's coupon of oa1, and one of oa2, persisted
    let claim = json!({"user_id": "u1"}).to_string();
    let claims = "/v1/batches/{id}/claims";
    conforms(gw, doc, "POST", claims, "/v1/batches/oa2/claims", &claim).await;
    let app = &gw.app;
    let stop = tokio_util::sync::CancellationToken::new();
    let persister = claimgate::persist::Persister::spawn(
        app.backend().clone(),
        app.store().clone(),
        app.config().persister.clone(),
        stop.clone(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app
        .store()
        .user_coupons("u1", None, 10, None)
        .await
        .unwrap()
        .0
        .len()
        < 2
    {
        let _ = persister.flush().await;
        assert!(
            std::time::Instant::now() < deadline,
            "the wallet was not persisted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.cancel();
    persister.join().await;

    let quote = "/v1/checkout/quote";
    let cart = json!({"user_id": "u1", "items": [
        {"product_id": "p1", "category_id": "c1", "merchant_id": "m1", "unit_price": 1000, "quantity": 2},
        {"product_id": "p2", "unit_price": 999, "quantity": 1},
    ]});
    let q = conforms(gw, doc, "POST", quote, quote, &cart.to_string()).await;
    assert_eq!(q["best"]["coupon_ids"], json!([coupon]));
    assert_eq!(q["best"]["discount"], 200);
    assert_eq!(q["unusable"][0]["reason"], "out_of_scope");
    let example = &resolve(doc, &doc["components"]["schemas"]["QuoteRequest"])["example"];
    let q = conforms(gw, doc, "POST", quote, quote, &example.to_string()).await;
    assert_eq!(q["best"]["discount"], 0);
    conforms(
        gw,
        doc,
        "POST",
        quote,
        quote,
        r#"{"user_id":"u1","items":[]}"#,
    )
    .await;
}

/// Issue 11 item 3: a batch with a zone and a budget, its GET (with `budget`), the 409
/// `over_budget` of an `add_stock` past it and the 400 `unknown_timezone` of an unknown
/// zone, all as the document says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_and_budgets_answer_as_documented() {
    let doc = doc();
    let gw = gateway().await;
    let mut body = json!({
        "id": "oab", "name": "5 off", "stock": 3, "per_user_limit": 1,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7},
        "discount": {"kind": "fixed", "amount": 500},
        "scope": {"kind": "all"},
        "timezone": "Asia/Shanghai", "budget": 2000,
    });
    let created = conforms(
        &gw,
        &doc,
        "POST",
        "/v1/batches",
        "/v1/batches",
        &body.to_string(),
    )
    .await;
    assert_eq!(
        (created["timezone"].as_str(), created["budget"].as_i64()),
        (Some("Asia/Shanghai"), Some(2000))
    );
    let claim = json!({"user_id": "u1"}).to_string();
    conforms(
        &gw,
        &doc,
        "POST",
        "/v1/batches/{id}/claims",
        "/v1/batches/oab/claims",
        &claim,
    )
    .await;
    let got = conforms(&gw, &doc, "GET", "/v1/batches/{id}", "/v1/batches/oab", "").await;
    assert_eq!(
        got["budget"],
        json!({"total": 2000, "spent": 500, "remaining": 1500})
    );
    let add = |n: i64| json!({"add_stock": n}).to_string();
    let over = conforms(
        &gw,
        &doc,
        "PATCH",
        "/v1/batches/{id}",
        "/v1/batches/oab",
        &add(2),
    )
    .await;
    assert_eq!(over["error"], "over_budget");
    let ok = conforms(
        &gw,
        &doc,
        "PATCH",
        "/v1/batches/{id}",
        "/v1/batches/oab",
        &add(1),
    )
    .await;
    assert_eq!(ok["stock"]["total"], 4);
    body["id"] = json!("oab2");
    body["timezone"] = json!("Mars/Olympus");
    let bad = conforms(
        &gw,
        &doc,
        "POST",
        "/v1/batches",
        "/v1/batches",
        &body.to_string(),
    )
    .await;
    assert_eq!(bad["error"], "unknown_timezone");
}

/// Issue "For the people who run it", item 5: the document states the rules the server
/// enforces (with their configured defaults), the server URL is relative, and every link
/// names an operation that exists, with the parameters it takes.
#[test]
fn the_rules_are_stated_the_server_is_relative_and_links_resolve() {
    let doc = doc();
    let cfg = claimgate::config::Config::default();
    assert_eq!(doc["servers"][0]["url"], "/", "a relative server URL");
    let s = &doc["components"]["schemas"];
    let limit = doc["paths"]["/v1/users/{user_id}/coupons"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap();
    assert_eq!(limit["schema"]["maximum"], u64::from(cfg.wallet.max_page));
    assert_eq!(
        limit["schema"]["default"],
        u64::from(cfg.wallet.default_page)
    );
    assert_eq!(
        s["NewBatch"]["properties"]["stock"]["maximum"],
        cfg.batches.max_stock
    );
    assert_eq!(
        s["BatchPatch"]["properties"]["add_stock"]["maximum"],
        cfg.batches.max_stock
    );
    assert_eq!(
        s["NewBatch"]["properties"]["budget"]["maximum"],
        cfg.batches.max_budget
    );
    assert_eq!(
        s["BatchPatch"]["not"]["required"],
        serde_json::json!(["claim_window", "claim_window_end"])
    );
    assert_eq!(s["Scope"]["properties"]["ids"]["items"]["minLength"], 1);
    assert_eq!(s["Scope"]["if"]["properties"]["kind"]["const"], "all");
    assert_eq!(s["Scope"]["then"]["properties"]["ids"]["maxItems"], 0);
    assert_eq!(s["Scope"]["else"]["properties"]["ids"]["minItems"], 1);
    assert_eq!(s["Window"]["x-start-before-end"], true);
    // links: createBatch -> claimCoupon -> lockCoupon -> redeemCoupon
    let mut ops: std::collections::BTreeMap<String, Value> = Default::default();
    for (_, item) in doc["paths"].as_object().unwrap() {
        for (_, op) in item.as_object().unwrap() {
            if let Some(id) = op["operationId"].as_str() {
                ops.insert(id.to_string(), op.clone());
            }
        }
    }
    let mut chain = Vec::new();
    for (id, op) in &ops {
        for (status, r) in op["responses"].as_object().unwrap() {
            for (name, link) in r["links"].as_object().into_iter().flatten() {
                let target = link["operationId"].as_str().unwrap();
                let t = ops
                    .get(target)
                    .unwrap_or_else(|| panic!("{id} {status} link {name}: no {target}"));
                let path_params: Vec<String> = doc["paths"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(_, item)| {
                        item.as_object()
                            .unwrap()
                            .values()
                            .any(|o| o["operationId"] == target)
                    })
                    .map(|(p, _)| {
                        p.split('{')
                            .skip(1)
                            .map(|s| s.split('}').next().unwrap().to_string())
                            .collect()
                    })
                    .unwrap();
                for (param, expr) in link["parameters"].as_object().unwrap() {
                    assert!(path_params.contains(param), "{id} -> {target}: {param}");
                    assert!(
                        expr.as_str().unwrap().starts_with("$response.body#/"),
                        "{expr}"
                    );
                }
                if link.get("requestBody").is_some() {
                    assert!(t["requestBody"].is_object(), "{id} -> {target}");
                }
                chain.push((id.clone(), target.to_string()));
            }
        }
    }
    for (from, to) in [
        ("createBatch", "claimCoupon"),
        ("claimCoupon", "lockCoupon"),
        ("lockCoupon", "redeemCoupon"),
    ] {
        assert!(
            chain.contains(&(from.to_string(), to.to_string())),
            "no link {from} -> {to}: {chain:?}"
        );
    }
}

/// schemathesis (item 5): a user id with `+` or `@`, percent-encoded in the path as a client
/// must, was refused with 400 (the segment was taken literally); it is the same user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_user_id_in_the_path_is_that_user() {
    let gw = gateway().await;
    let a = call(&gw, "GET", "/v1/users/a%2Bb%40c/coupons", "").await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    assert_eq!(a.json()["coupons"], serde_json::json!([]));
    for bad in ["/v1/users/a%2/coupons", "/v1/users/a%20b/coupons"] {
        let a = call(&gw, "GET", bad, "").await;
        assert_eq!(a.status, 400, "{bad}: {:?}", a.json());
    }
}

/// schemathesis (item 5): `"amount": 87562.0` is an `integer` by the document (JSON
/// Schema) and was refused with 400; a name of 256 four-byte characters is within
/// `maxLength: 256` and was refused as over 256 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_document_calls_valid_the_admin_routes_accept() {
    let gw = gateway().await;
    let body = serde_json::json!({
        "id": "integral", "name": "\u{1F600}".repeat(256), "stock": 10.0, "per_user_limit": 1e0,
        "claim_window": {"start": "2020-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"},
        "validity": {"days_after_claim": 7.0}, "discount": {"kind": "fixed", "amount": 87562.0},
        "scope": {"kind": "all"}, "shards": 2.0
    });
    let a = call(&gw, "POST", "/v1/batches", &body.to_string()).await;
    assert_eq!(a.status, 201, "{:?}", a.json());
    assert_eq!(a.json()["stock"], 10);
    let a = call(
        &gw,
        "PATCH",
        "/v1/batches/integral",
        r#"{"add_stock": 5.0}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    assert_eq!(a.json()["stock"]["total"], 15);
    let a = call(
        &gw,
        "PATCH",
        "/v1/batches/integral",
        r#"{"add_stock": 5.5}"#,
    )
    .await;
    assert_eq!(a.status, 400, "{:?}", a.json());
}
