//! Every metric the gateway exports: names, help texts, closed label sets, the recorder and
//! the handles resolved once for the hot path. Recording happens through the event structs
//! of [`super::events`], never directly.
//!
//! Invariant kept here: metric names and label sets are defined only in this module, labels
//! take values from closed sets (outcome codes, stage names, script names, backend kinds) or
//! from the bounded set of tracked batches, so cardinality stays bounded whatever the
//! traffic. The owners of those closed sets (`ApiError`, the script registry) test that
//! their values are the ones listed here.

use std::collections::HashMap;
use std::sync::LazyLock;

use metrics::{Counter, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Claims answered, by `outcome` (claimed, replayed, or the API error code).
pub const CLAIMS: &str = "claimgate_claims_total";
/// End-to-end claim latency (request parsed to reply built), seconds.
pub const CLAIM_SECONDS: &str = "claimgate_claim_duration_seconds";
/// Latency of each stage of the claim path, by `stage`.
pub const STAGE_SECONDS: &str = "claimgate_stage_duration_seconds";
/// HTTP requests by `route` and `status` class (2xx..5xx).
pub const HTTP_REQUESTS: &str = "claimgate_http_requests_total";
/// Script calls by `script` and `result` (ok, script_error, unavailable, protocol).
pub const BACKEND_CALLS: &str = "claimgate_backend_calls_total";
/// Script call latency by `script`, seconds.
pub const BACKEND_SECONDS: &str = "claimgate_backend_call_duration_seconds";
/// Replica confirmations of claims under `redis.ack = "replica"`, by `result`
/// (confirmed, not_replicated, unavailable).
pub const REPLICA_CONFIRMS: &str = "claimgate_replica_confirmations_total";
/// Time a claim waited for its replica confirmation, seconds.
pub const REPLICA_CONFIRM_SECONDS: &str = "claimgate_replica_confirm_duration_seconds";
/// `result` labels of [`REPLICA_CONFIRMS`].
pub const REPLICA_CONFIRM_RESULTS: &[&str] = &["confirmed", "not_replicated", "unavailable"];
/// Shard faults seen, by `kind` (missing, rolled_back): a shard Redis lost or a failover
/// rolled back. Each is fenced and repaired from the database.
pub const SHARD_FAULTS: &str = "claimgate_shard_faults_total";
/// `kind` labels of [`SHARD_FAULTS`].
pub const SHARD_FAULT_KINDS: &[&str] = &["missing", "rolled_back"];
/// Shard repairs by `result` (repaired, busy: another gateway repairs it, stale: already
/// repaired, failed: retried).
pub const SHARD_REPAIRS: &str = "claimgate_shard_repairs_total";
/// `result` labels of [`SHARD_REPAIRS`].
pub const SHARD_REPAIR_RESULTS: &[&str] = &["repaired", "busy", "stale", "failed"];
/// Stock written off by shard repairs (a lost primary may have sold it).
pub const STOCK_WRITTEN_OFF: &str = "claimgate_stock_written_off_total";
/// How long a shard stayed fenced, from the fault to the end of its repair, seconds.
pub const SHARD_REPAIR_SECONDS: &str = "claimgate_shard_repair_duration_seconds";
/// NOSCRIPT replies that caused a script reload.
pub const BACKEND_RELOADS: &str = "claimgate_backend_script_reloads_total";
/// Stock transfers by `kind` (initial, refill, steal, sweep) and `result` (moved, empty, finished).
pub const TRANSFERS: &str = "claimgate_stock_transfers_total";
/// Requests refused by a local rate limit, by `limit` (global, user, ip).
pub const RATE_LIMITED: &str = "claimgate_rate_limited_total";
/// Claim script calls (group commit: one call carries the claims queued for its shard).
pub const CLAIM_CALLS: &str = "claimgate_claim_calls_total";
/// Claims carried by those calls; `rate(claims) / rate(calls)` is the mean group size.
pub const CLAIM_CALL_CLAIMS: &str = "claimgate_claim_call_claims_total";
/// Requests shed by admission control, by `reason` (inflight, backlog, queue). At
/// `server.max_connections` the server stops accepting instead (the kernel queues).
pub const SHED: &str = "claimgate_shed_total";
/// Local hot-key cache answers, by `kind` (sold_out, user_limit, not_started, ended, paused,
/// not_eligible, meta_hit, meta_miss).
pub const CACHE: &str = "claimgate_cache_total";
/// Backend calls in flight.
pub const INFLIGHT: &str = "claimgate_backend_inflight";
/// Open client connections.
pub const CONNECTIONS: &str = "claimgate_connections";
/// Log records in Redis not yet in the database (entries: one per claim call with
/// successes, holding its claims; one per change of a managed coupon).
pub const PERSIST_BACKLOG: &str = "claimgate_persist_backlog";
/// Age of the oldest claim record not yet in the database, seconds.
pub const PERSIST_LAG: &str = "claimgate_persist_lag_seconds";
/// Rows written to the transaction log.
pub const PERSIST_ROWS: &str = "claimgate_persist_rows_total";
/// Persister batch write latency, seconds.
pub const PERSIST_SECONDS: &str = "claimgate_persist_write_duration_seconds";
/// Persister failures by `stage` (read, write, ack, parse, probe, refresh).
pub const PERSIST_ERRORS: &str = "claimgate_persist_errors_total";
/// Shard logs the persister follows, by `state`: `active` (read on activity and swept),
/// `dormant` (a batch out of its claim window with its logs drained: not read).
pub const PERSIST_SHARDS: &str = "claimgate_persist_shards";
/// Reads of shard logs by the persister, by `cause`: `hint` (a claim in this instance or a
/// probe that found records), `due` (records found by the last read, a recovery read or the
/// safety sweep), `drain` (a flush or the shutdown drain).
pub const PERSIST_READS: &str = "claimgate_persist_log_reads_total";
/// Claims whose coupon id the database already held for a different claim (a coupon id
/// minted twice), each recorded in `coupon_conflicts`. Anything above 0 is an alarm.
pub const COUPON_CONFLICTS: &str = "claimgate_coupon_conflicts_total";
/// Stock remaining per tracked batch (`batch` label: active batches only, at most
/// `metrics.max_batch_labels`). Rendered at scrape time by [`render_stock_remaining`].
pub const STOCK_REMAINING: &str = "claimgate_stock_remaining";
/// Batches whose Redis state is missing (claims refused until rebuild).
pub const BATCHES_LOST: &str = "claimgate_batches_lost";
/// Batch retirement steps by `outcome` ([`RETIRE_OUTCOMES`]): `begun` (the database marked
/// it retired), `retired` (every Redis key of it dropped), `waiting` (a slot still held
/// records or open transfers: tried again next pass), `failed`.
pub const BATCHES_RETIRED: &str = "claimgate_batch_retirements_total";
/// `outcome` labels of [`BATCHES_RETIRED`].
pub const RETIRE_OUTCOMES: &[&str] = &["begun", "retired", "waiting", "failed"];
/// Request-id rotations of shards by `outcome` ([`ROTATE_OUTCOMES`]): `rotated` (the oldest
/// generation of records dropped), `started` (a shard's first generation begun), `waiting`
/// (due, but the shard's log still holds records from before it: tried again next pass),
/// `failed`.
pub const REQUEST_ID_ROTATIONS: &str = "claimgate_request_id_rotations_total";
/// `outcome` labels of [`REQUEST_ID_ROTATIONS`].
pub const ROTATE_OUTCOMES: &[&str] = &["rotated", "started", "waiting", "failed"];
/// Request ids looked up in the database because Redis no longer has their records (their
/// shard dropped records older than the retention, or the batch retired), by `outcome`
/// ([`LOOKUP_OUTCOMES`]): `replayed` (an earlier success found there) or `new` (none: the
/// claim went on as a new one, or was refused).
pub const REQUEST_ID_LOOKUPS: &str = "claimgate_request_id_lookups_total";
/// `outcome` labels of [`REQUEST_ID_LOOKUPS`].
pub const LOOKUP_OUTCOMES: &[&str] = &["replayed", "new"];
/// Build info (`version`, `backend`) with value 1.
pub const BUILD_INFO: &str = "claimgate_build_info";
/// Event delivery attempts by `outcome` ([`DELIVERY_OUTCOMES`]: delivered; failed, to be
/// retried; dead, gone to the dead-letter state).
pub const EVENT_DELIVERIES: &str = "claimgate_event_deliveries_total";
/// Events in the outbox waiting for delivery (the database's count: every instance's).
pub const EVENT_BACKLOG: &str = "claimgate_event_backlog";
/// Events in the dead-letter state (`GET /v1/events?state=dead`). Above 0 is an alarm.
pub const EVENT_DEAD: &str = "claimgate_event_dead";
/// Age of the oldest event waiting for delivery, seconds.
pub const EVENT_LAG: &str = "claimgate_event_lag_seconds";
/// Coupons the sweeps wrote, by `kind` ([`SWEEP_KINDS`]: expired; released = a lapsed
/// lock released, cause `lock_timeout`; reminded = an "expiring soon" event written).
pub const COUPONS_SWEPT: &str = "claimgate_coupons_swept_total";
/// Wallet reads by `source` ([`WALLET_SOURCES`]: the page came from this gateway's cache,
/// from the database, or, with the database unreachable, only the recent coupons
/// (`partial`); `no_shards`: Redis unreachable, the database's page alone).
pub const WALLET_READS: &str = "claimgate_wallet_reads_total";
/// Touches of a user's recent coupons (before a claim or a change is answered), by
/// `outcome` (`ok`, `error`: the wallet may miss the coupon until the database has it).
pub const RECENT_TOUCHES: &str = "claimgate_recent_touches_total";
/// Change records the persister skipped because the database holds that coupon version
/// decided differently (a shard a failover rolled back decided it again): the database
/// keeps the first decision. Above 0 is an alarm.
pub const COUPON_CHANGE_CONFLICTS: &str = "claimgate_coupon_change_conflicts_total";
/// Changes of coupons whose state lives on their shard, by `outcome`
/// ([`COUPON_CHANGE_OUTCOMES`]).
pub const COUPON_CHANGES: &str = "claimgate_coupon_changes_total";
/// Grant job events by `event` ([`GRANT_JOB_EVENTS`]).
pub const GRANT_JOBS: &str = "claimgate_grant_jobs_total";
/// Users of grant jobs decided, by `outcome` ([`GRANT_OUTCOMES`]); counted when a chunk is
/// checkpointed (a chunk re-run after a crash is counted again here, once in the job).
pub const GRANT_USERS: &str = "claimgate_grant_users_total";
/// Codes received by imports and creates of batches with codes, by `outcome`.
pub const CODES: &str = "claimgate_codes_total";

// Process metrics, in the names every Prometheus client library uses (collected at scrape
// time by `metrics-process` from /proc; [`collect_process`]).
/// CPU time (user + system) the process used, seconds (whole seconds).
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
/// Resident memory, bytes.
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
/// Open file descriptors (client connections, the database, the log files).
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
/// The limit on open file descriptors (`ulimit -n`).
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
/// When the process started, seconds since the Unix epoch.
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// Installs the global recorder (no listener of its own: `/metrics` is served by the
/// gateway), describes every metric and registers every series that must exist from the
/// start ([`register_at_zero`]). Idempotent: tests run many gateways in one process, and
/// they all render the first recorder's handle.
pub fn install() -> PrometheusHandle {
    static ZERO: std::sync::Once = std::sync::Once::new();
    let h = handle().clone();
    ZERO.call_once(|| {
        LazyLock::force(&HOT);
        register_at_zero();
    });
    h
}

/// The recorder's handle, the recorder installed and the metrics described on first use.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("static bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program; then the
        // handle still renders this recorder's (empty) registry and the embedder's wins.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// Drains histogram samples into their buckets. The recorder keeps raw samples until
/// then, so this must run periodically (the gateway does it every few seconds), scraped or
/// not; rendering runs it too.
pub fn upkeep() {
    handle().run_upkeep();
}

/// `outcome` labels of [`CLAIMS`]: `claimed`, `replayed` and every API error code a claim
/// can answer. Not listed, because only other routes answer them: `batch_exists` and
/// `unknown_timezone` (a create), `over_budget` (a change), `coupon_not_found` and `invalid_state` (the wallet), `not_found` and
/// `method_not_allowed` (the router, before any handler). The `api::error` tests check the
/// split against every code of `ApiError`.
pub const CLAIM_OUTCOMES: &[&str] = &[
    "claimed",
    "replayed",
    "bad_request",
    "unauthorized",
    "not_eligible",
    "batch_not_found",
    "limit_reached",
    "not_started",
    "ended",
    "paused",
    "sold_out",
    "rate_limited",
    "overloaded",
    "backend_unavailable",
    "indeterminate",
    "internal",
];
/// `script` labels of [`BACKEND_CALLS`] and [`BACKEND_SECONDS`]: the name of every script
/// in `lua/` (the script registry's tests check that they are these).
pub const SCRIPTS: &[&str] = &[
    "claim",
    "setup",
    "patch",
    "transfer_out",
    "transfer_in",
    "transfer_done",
    "probe",
    "inbox_check",
    "mark_soldout",
    "meta_get",
    "log_read",
    "log_ack",
    "log_count",
    "restore",
    "replay",
    "winners",
    "codes_add",
    "coupon",
    "recent",
    "retire",
    "rotate",
];
/// Stage labels of [`STAGE_SECONDS`].
pub const STAGES: &[&str] = &[
    "parse",
    "auth",
    "ratelimit",
    "cache",
    "admission",
    "backend",
    "recent",
];
/// `route` labels of [`HTTP_REQUESTS`].
pub const ROUTES: &[&str] = &[
    "healthz",
    "readyz",
    "metrics",
    "openapi",
    "batches",
    "batch",
    "claims",
    "user_coupons",
    "coupon_action",
    "events",
    "products",
    "quote",
    "admin_reconcile",
    "grants",
    "jobs",
    "unknown",
];
/// `status` labels of [`HTTP_REQUESTS`] each route can answer: nothing redirects (no
/// `3xx`); `healthz`, `metrics` and `openapi` fail only with 405/429 (`4xx`); `readyz`
/// answers 503 when not ready; a path no route knows is always a 4xx (404, 429).
pub const ROUTE_STATUSES: &[(&str, &[&str])] = &[
    ("healthz", &["2xx", "4xx"]),
    ("readyz", &["2xx", "4xx", "5xx"]),
    ("metrics", &["2xx", "4xx"]),
    ("openapi", &["2xx", "4xx"]),
    ("batches", &["2xx", "4xx", "5xx"]),
    ("batch", &["2xx", "4xx", "5xx"]),
    ("claims", &["2xx", "4xx", "5xx"]),
    ("user_coupons", &["2xx", "4xx", "5xx"]),
    ("coupon_action", &["2xx", "4xx", "5xx"]),
    ("admin_reconcile", &["2xx", "4xx", "5xx"]),
    ("grants", &["2xx", "4xx", "5xx"]),
    ("jobs", &["2xx", "4xx", "5xx"]),
    ("unknown", &["4xx"]),
];
/// `limit` labels of [`RATE_LIMITED`] (`domain::limits`).
pub const RATE_LIMITS: &[&str] = &["global", "user", "ip"];
/// `reason` labels of [`SHED`].
pub const SHED_REASONS: &[&str] = &["inflight", "backlog", "queue"];
/// `stage` labels of [`PERSIST_ERRORS`] (`persist::worker`, `persist::prober`).
pub const PERSIST_STAGES: &[&str] = &["refresh", "probe", "read", "parse", "write", "ack"];
/// `state` labels of [`PERSIST_SHARDS`].
pub const PERSIST_SHARD_STATES: &[&str] = &["active", "dormant"];
/// `cause` labels of [`PERSIST_READS`].
pub const PERSIST_READ_CAUSES: &[&str] = &["hint", "due", "drain"];
/// (`kind`, `result`) pairs of [`TRANSFERS`]: a transfer moves stock or finds none; the
/// sweeper only finishes transfers.
pub const TRANSFER_SERIES: &[(&str, &str)] = &[
    ("initial", "moved"),
    ("initial", "empty"),
    ("refill", "moved"),
    ("refill", "empty"),
    ("steal", "moved"),
    ("steal", "empty"),
    ("sweep", "finished"),
];
/// `kind` labels of [`CACHE`].
pub const CACHE_KINDS: &[&str] = &[
    "sold_out",
    "user_limit",
    "not_started",
    "ended",
    "paused",
    "not_eligible",
    "meta_hit",
    "meta_miss",
];
/// `outcome` labels of [`EVENT_DELIVERIES`].
pub const DELIVERY_OUTCOMES: &[&str] = &["delivered", "failed", "dead"];
/// `source` labels of [`WALLET_READS`].
pub const WALLET_SOURCES: &[&str] = &["cache", "database", "partial", "no_shards"];
/// `outcome` labels of [`RECENT_TOUCHES`].
pub const TOUCH_OUTCOMES: &[&str] = &["ok", "error"];
/// `outcome` labels of [`COUPON_CHANGES`]: written, a repeat that needed nothing, refused
/// (409), a lost race decided again, or not made (shard under repair, log at its bound,
/// contended, backend error).
pub const COUPON_CHANGE_OUTCOMES: &[&str] =
    &["written", "repeat", "refused", "retried", "unavailable"];
/// `kind` labels of [`COUPONS_SWEPT`].
pub const SWEEP_KINDS: &[&str] = &["expired", "released", "reminded"];
/// `event` labels of [`GRANT_JOBS`]: an upload became a job (`submitted`); a run of it
/// began from its first chunk (`started`) or from its cursor (`resumed`); a run stopped
/// early, to be resumed (`interrupted`); the job ended (`done`, `failed`).
pub const GRANT_JOB_EVENTS: &[&str] = &[
    "submitted",
    "started",
    "resumed",
    "interrupted",
    "done",
    "failed",
];
/// `outcome` labels of [`GRANT_USERS`].
pub const GRANT_OUTCOMES: &[&str] = &["granted", "skipped_limit", "skipped_sold_out", "failed"];
/// `outcome` labels of [`CODES`].
pub const CODE_OUTCOMES: &[&str] = &["added", "duplicate", "invalid", "over_capacity"];
/// `result` labels of [`BACKEND_CALLS`].
pub const BACKEND_RESULTS: &[&str] = &["ok", "script_error", "unavailable", "protocol"];

/// Handles of the metrics recorded on every request, resolved once (a registry lookup per
/// use showed in profiles). Keys are the closed label sets above; anything else falls back to
/// an ordinary lookup.
struct Hot {
    claims: HashMap<&'static str, Counter>,
    claim_seconds: Histogram,
    stages: HashMap<&'static str, Histogram>,
    http: HashMap<(&'static str, &'static str), Counter>,
    cache: HashMap<&'static str, Counter>,
    backend_calls: HashMap<(&'static str, &'static str), Counter>,
    backend_seconds: HashMap<&'static str, Histogram>,
    claim_calls: Counter,
    claim_call_claims: Counter,
}

static HOT: LazyLock<Hot> = LazyLock::new(|| {
    handle(); // handles taken before the recorder exists would record nothing
    Hot {
        claims: CLAIM_OUTCOMES
            .iter()
            .map(|o| (*o, metrics::counter!(CLAIMS, "outcome" => *o)))
            .collect(),
        claim_seconds: metrics::histogram!(CLAIM_SECONDS),
        claim_calls: metrics::counter!(CLAIM_CALLS),
        claim_call_claims: metrics::counter!(CLAIM_CALL_CLAIMS),
        stages: STAGES
            .iter()
            .map(|s| (*s, metrics::histogram!(STAGE_SECONDS, "stage" => *s)))
            .collect(),
        http: ROUTE_STATUSES
            .iter()
            .flat_map(|(r, classes)| classes.iter().map(move |c| (*r, *c)))
            .map(|(r, c)| {
                (
                    (r, c),
                    metrics::counter!(HTTP_REQUESTS, "route" => r, "status" => c),
                )
            })
            .collect(),
        cache: CACHE_KINDS
            .iter()
            .map(|k| (*k, metrics::counter!(CACHE, "kind" => *k)))
            .collect(),
        backend_calls: SCRIPTS
            .iter()
            .flat_map(|s| BACKEND_RESULTS.iter().map(move |r| (*s, *r)))
            .map(|(s, r)| {
                (
                    (s, r),
                    metrics::counter!(BACKEND_CALLS, "script" => s, "result" => r),
                )
            })
            .collect(),
        backend_seconds: SCRIPTS
            .iter()
            .map(|s| (*s, metrics::histogram!(BACKEND_SECONDS, "script" => *s)))
            .collect(),
    }
});

/// A local hot-key cache answer of `kind`.
pub(super) fn cache_answer(kind: &'static str) {
    match HOT.cache.get(kind) {
        Some(c) => c.increment(1),
        None => metrics::counter!(CACHE, "kind" => kind).increment(1),
    }
}

/// One script call with its result label and latency.
pub(super) fn backend_call(script: &'static str, result: &'static str, seconds: f64) {
    match HOT.backend_calls.get(&(script, result)) {
        Some(c) => c.increment(1),
        None => {
            metrics::counter!(BACKEND_CALLS, "script" => script, "result" => result).increment(1)
        }
    }
    match HOT.backend_seconds.get(script) {
        Some(h) => h.record(seconds),
        None => metrics::histogram!(BACKEND_SECONDS, "script" => script).record(seconds),
    }
}

/// One claim answered with `outcome`, after `seconds`.
pub(super) fn claim_answered(outcome: &'static str, seconds: f64) {
    match HOT.claims.get(outcome) {
        Some(c) => c.increment(1),
        None => metrics::counter!(CLAIMS, "outcome" => outcome).increment(1),
    }
    HOT.claim_seconds.record(seconds);
}

/// One group-committed claim call carrying `claims` claims.
pub(super) fn claim_call(claims: u64) {
    HOT.claim_calls.increment(1);
    HOT.claim_call_claims.increment(claims);
}

/// Time spent in one stage of the claim path.
pub(super) fn stage(stage: &'static str, seconds: f64) {
    match HOT.stages.get(stage) {
        Some(h) => h.record(seconds),
        None => metrics::histogram!(STAGE_SECONDS, "stage" => stage).record(seconds),
    }
}

/// One HTTP request answered.
pub(super) fn http_request(route: &'static str, class: &'static str) {
    match HOT.http.get(&(route, class)) {
        Some(c) => c.increment(1),
        None => metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => class).increment(1),
    }
}

/// The process metrics ([`PROCESS_CPU`] ...), read from /proc now: called at each scrape.
pub fn collect_process() {
    process_collector().collect();
}

fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: LazyLock<metrics_process::Collector> =
        LazyLock::new(metrics_process::Collector::default);
    &COLLECTOR
}

/// The `claimgate_stock_remaining` family in text exposition format.
pub fn render_stock_remaining(gauges: &[(String, i64)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if gauges.is_empty() {
        return out;
    }
    let _ = writeln!(
        out,
        "# HELP {STOCK_REMAINING} Stock remaining per tracked batch."
    );
    let _ = writeln!(out, "# TYPE {STOCK_REMAINING} gauge");
    for (batch, remaining) in gauges {
        // batch ids are [A-Za-z0-9_-]: nothing to escape
        let _ = writeln!(out, "{STOCK_REMAINING}{{batch=\"{batch}\"}} {remaining}");
    }
    out
}

fn describe() {
    describe_counter!(CLAIMS, "Claims answered, by outcome.");
    describe_histogram!(CLAIM_SECONDS, Unit::Seconds, "End-to-end claim latency.");
    describe_histogram!(
        STAGE_SECONDS,
        Unit::Seconds,
        "Latency of each claim path stage."
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status class.");
    describe_counter!(BACKEND_CALLS, "Script calls by script and result.");
    describe_histogram!(BACKEND_SECONDS, Unit::Seconds, "Script call latency.");
    describe_counter!(BACKEND_RELOADS, "Script reloads after NOSCRIPT.");
    describe_counter!(SHARD_FAULTS, "Shards found lost or rolled back, by kind.");
    describe_counter!(SHARD_REPAIRS, "Shard repairs by result.");
    describe_counter!(STOCK_WRITTEN_OFF, "Stock written off by shard repairs.");
    describe_histogram!(
        SHARD_REPAIR_SECONDS,
        Unit::Seconds,
        "Time from a shard fault to the end of its repair."
    );
    describe_counter!(
        REPLICA_CONFIRMS,
        "Replica confirmations of claims (redis.ack = replica), by result."
    );
    describe_histogram!(
        REPLICA_CONFIRM_SECONDS,
        Unit::Seconds,
        "Time a claim waited for its replica confirmation."
    );
    describe_counter!(TRANSFERS, "Stock transfers by kind and result.");
    describe_counter!(RATE_LIMITED, "Requests refused by a local rate limit.");
    describe_counter!(SHED, "Requests shed by admission control.");
    describe_counter!(CLAIM_CALLS, "Claim script calls (group commit).");
    describe_counter!(
        CLAIM_CALL_CLAIMS,
        "Claims carried by claim script calls (their ratio to the calls is the group size)."
    );
    describe_counter!(CACHE, "Local hot-key cache answers by kind.");
    describe_gauge!(INFLIGHT, "Backend calls in flight.");
    describe_gauge!(CONNECTIONS, "Open client connections.");
    describe_gauge!(
        PERSIST_BACKLOG,
        "Log records not yet in the database (one per claim call with successes, or per change)."
    );
    describe_gauge!(
        PERSIST_LAG,
        Unit::Seconds,
        "Age of the oldest unpersisted claim record."
    );
    describe_counter!(PERSIST_ROWS, "Rows written to the transaction log.");
    describe_histogram!(
        PERSIST_SECONDS,
        Unit::Seconds,
        "Persister batch write latency."
    );
    describe_counter!(PERSIST_ERRORS, "Persister failures by stage.");
    describe_gauge!(
        PERSIST_SHARDS,
        "Shard logs the persister follows, active or dormant."
    );
    describe_counter!(PERSIST_READS, "Shard log reads by the persister, by cause.");
    describe_counter!(
        COUPON_CONFLICTS,
        "Coupon ids met with a different claim than the stored one (minted twice)."
    );
    // Exported from the start (at 0), so an alert on any increase works on every instance.
    metrics::counter!(COUPON_CONFLICTS).increment(0);
    describe_gauge!(BATCHES_LOST, "Batches whose backend state is missing.");
    describe_counter!(EVENT_DELIVERIES, "Event delivery attempts by outcome.");
    describe_gauge!(EVENT_BACKLOG, "Events in the outbox waiting for delivery.");
    describe_gauge!(EVENT_DEAD, "Events in the dead-letter state.");
    describe_gauge!(
        EVENT_LAG,
        Unit::Seconds,
        "Age of the oldest event waiting for delivery."
    );
    describe_counter!(COUPONS_SWEPT, "Coupons the sweeps wrote, by kind.");
    // Exported from the start (at 0), like the conflicts counter.
    for outcome in DELIVERY_OUTCOMES {
        metrics::counter!(EVENT_DELIVERIES, "outcome" => *outcome).increment(0);
    }
    for kind in SWEEP_KINDS {
        metrics::counter!(COUPONS_SWEPT, "kind" => *kind).increment(0);
    }
    describe_counter!(WALLET_READS, "Wallet reads by where the page came from.");
    describe_counter!(
        RECENT_TOUCHES,
        "Touches of users' recent coupons (read-your-writes), by outcome."
    );
    describe_counter!(
        COUPON_CHANGES,
        "Changes of coupons whose state lives on their shard, by outcome."
    );
    for source in WALLET_SOURCES {
        metrics::counter!(WALLET_READS, "source" => *source).increment(0);
    }
    for outcome in TOUCH_OUTCOMES {
        metrics::counter!(RECENT_TOUCHES, "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        COUPON_CHANGE_CONFLICTS,
        "Coupon versions decided twice, differently (a rolled-back shard); the first is kept."
    );
    metrics::counter!(COUPON_CHANGE_CONFLICTS).increment(0);
    for outcome in COUPON_CHANGE_OUTCOMES {
        metrics::counter!(COUPON_CHANGES, "outcome" => *outcome).increment(0);
    }
    describe_counter!(
        GRANT_JOBS,
        "Grant job events (submitted, started, resumed, ...)."
    );
    describe_counter!(GRANT_USERS, "Users of grant jobs decided, by outcome.");
    describe_counter!(CODES, "Codes received for batches with codes, by outcome.");
    describe_counter!(BATCHES_RETIRED, "Batch retirement steps, by outcome.");
    describe_counter!(
        REQUEST_ID_ROTATIONS,
        "Request-id generation rotations of shards, by outcome."
    );
    describe_counter!(
        REQUEST_ID_LOOKUPS,
        "Request ids looked up in the database after their records left Redis, by outcome."
    );
    describe_gauge!(BUILD_INFO, "Build information.");
    process_collector().describe();
}

/// Every series of a rare event exists from the start, at 0, with each label value that
/// can occur (only those): a dashboard panel shows 0 on a healthy gateway, not "No data",
/// and an alert on any increase fires on the first event. The series of the hot path
/// (claims, stages, HTTP, cache, script calls) are registered by [`HOT`].
fn register_at_zero() {
    metrics::counter!(COUPON_CONFLICTS).increment(0);
    metrics::counter!(BACKEND_RELOADS).increment(0);
    metrics::counter!(PERSIST_ROWS).increment(0);
    // A histogram is exported (count 0, every bucket 0) once it has a handle.
    let _ = metrics::histogram!(PERSIST_SECONDS);
    metrics::gauge!(BATCHES_LOST).increment(0.0);
    metrics::gauge!(INFLIGHT).increment(0.0);
    metrics::gauge!(CONNECTIONS).increment(0.0);
    for limit in RATE_LIMITS {
        metrics::counter!(RATE_LIMITED, "limit" => *limit).increment(0);
    }
    for kind in SHARD_FAULT_KINDS {
        metrics::counter!(SHARD_FAULTS, "kind" => *kind).increment(0);
    }
    for result in SHARD_REPAIR_RESULTS {
        metrics::counter!(SHARD_REPAIRS, "result" => *result).increment(0);
    }
    metrics::counter!(STOCK_WRITTEN_OFF).increment(0);
    for outcome in RETIRE_OUTCOMES {
        metrics::counter!(BATCHES_RETIRED, "outcome" => *outcome).increment(0);
    }
    for outcome in ROTATE_OUTCOMES {
        metrics::counter!(REQUEST_ID_ROTATIONS, "outcome" => *outcome).increment(0);
    }
    for outcome in LOOKUP_OUTCOMES {
        metrics::counter!(REQUEST_ID_LOOKUPS, "outcome" => *outcome).increment(0);
    }
    let _ = metrics::histogram!(SHARD_REPAIR_SECONDS);
    let _ = metrics::histogram!(REPLICA_CONFIRM_SECONDS);
    for result in REPLICA_CONFIRM_RESULTS {
        metrics::counter!(REPLICA_CONFIRMS, "result" => *result).increment(0);
    }
    for reason in SHED_REASONS {
        metrics::counter!(SHED, "reason" => *reason).increment(0);
    }
    for stage in PERSIST_STAGES {
        metrics::counter!(PERSIST_ERRORS, "stage" => *stage).increment(0);
    }
    for state in PERSIST_SHARD_STATES {
        metrics::gauge!(PERSIST_SHARDS, "state" => *state).increment(0.0);
    }
    for cause in PERSIST_READ_CAUSES {
        metrics::counter!(PERSIST_READS, "cause" => *cause).increment(0);
    }
    for event in GRANT_JOB_EVENTS {
        metrics::counter!(GRANT_JOBS, "event" => *event).increment(0);
    }
    for outcome in GRANT_OUTCOMES {
        metrics::counter!(GRANT_USERS, "outcome" => *outcome).increment(0);
    }
    for outcome in CODE_OUTCOMES {
        metrics::counter!(CODES, "outcome" => *outcome).increment(0);
    }
    for (kind, result) in TRANSFER_SERIES {
        metrics::counter!(TRANSFERS, "kind" => *kind, "result" => *result).increment(0);
    }
}
