//! The sections of the configuration that shape the gateway's behaviour: HTTP server,
//! batch limits, auth, rate limits, cache, metrics, wallet, log, stock and persister. Each
//! has a `Default` equal to its part of `config/claimgate.toml`; ranges serde cannot express
//! are checked by [`super::Config::check`], which names the key.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted; larger is 400 `bad_request`.
    pub max_body_bytes: usize,
    /// Open client connections at most; further connections wait in the accept queue.
    pub max_connections: usize,
    /// Time allowed for a new connection's first bytes, then for each request's headers;
    /// also closes idle keep-alive connections (HTTP/2: no open stream) after this long.
    pub header_read_timeout_ms: u64,
    /// Time allowed for a whole request, body included.
    pub request_timeout_ms: u64,
    /// Serve HTTP/2 (prior knowledge / h2c) besides HTTP/1.1.
    pub http2: bool,
    /// HTTP/2: ping a peer silent this long; close it if the ping is not answered within
    /// `http2_keep_alive_timeout_ms`.
    pub http2_keep_alive_interval_ms: u64,
    pub http2_keep_alive_timeout_ms: u64,
    /// HTTP/2: requests in flight at once on one connection.
    pub http2_max_concurrent_streams: u32,
    /// Closing a connection whose client may still be sending (e.g. an oversized body): its
    /// input is read and dropped for at most this long and this many bytes, so the client
    /// can read our response instead of getting a reset. 0 ms closes at once.
    pub linger_ms: u64,
    pub linger_max_bytes: usize,
    /// On SIGTERM/SIGINT: stop accepting, finish in-flight requests, flush, exit within this.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 16 * 1024,
            max_connections: 20_000,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            http2: true,
            http2_keep_alive_interval_ms: 20_000,
            http2_keep_alive_timeout_ms: 10_000,
            http2_max_concurrent_streams: 256,
            linger_ms: 2_000,
            linger_max_bytes: 1024 * 1024,
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchesConfig {
    /// Shards of a batch created without `shards`.
    pub default_shards: u32,
    pub max_shards: u32,
    pub max_stock: i64,
    /// Longest `scope.ids`, `deny_users`, `require_tags` list.
    pub max_list_items: usize,
    /// Largest money `budget` of a batch, in minor units.
    pub max_budget: i64,
    /// Most codes a batch with generated codes holds (its `stock`): generated, stored and
    /// loaded at its create.
    pub max_generated_codes: i64,
    /// Codes per database insert and per `lua/codes_add.lua` call, when codes are generated
    /// or imported.
    pub codes_chunk: usize,
    /// Largest `POST /v1/batches/{id}/codes` body: read whole as JSON, streamed as NDJSON
    /// or CSV.
    pub max_codes_json_bytes: usize,
    pub max_codes_upload_bytes: u64,
    /// A batch is retired this long after its claim window ended (ms; 0 = never): its log
    /// drained, every Redis key of it is dropped and the database is its record from then
    /// on (`recovery::retire`).
    pub retire_after_ms: u64,
    /// How often each gateway looks for batches to retire, and for shards whose request-id
    /// records are due to rotate (ms).
    pub retire_every_ms: u64,
    /// How long a shard keeps a request-id record at least (ms; 0 = until the batch
    /// retires): records live between one and two of these in Redis, and a replay of an
    /// older request id is answered from the database (`recovery::Rotator`).
    pub request_id_retention_ms: u64,
}

impl Default for BatchesConfig {
    fn default() -> Self {
        BatchesConfig {
            default_shards: 16,
            max_shards: 1024,
            max_stock: 1_000_000_000,
            max_list_items: 100_000,
            max_budget: 1_000_000_000_000,
            max_generated_codes: 1_000_000,
            codes_chunk: 5_000,
            max_codes_json_bytes: 4 * 1024 * 1024,
            max_codes_upload_bytes: 256 * 1024 * 1024,
            retire_after_ms: 7 * 86_400_000,
            retire_every_ms: 60_000,
            request_id_retention_ms: 86_400_000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When set, admin routes need `Authorization: Bearer <admin_token>`.
    pub admin_token: Option<Secret>,
    /// When set, users are identified by an HS256 JWT (`sub`, `exp`) signed with this secret;
    /// when unset, by `user_id` in the body (development only: a warning is logged).
    pub user_token_secret: Option<Secret>,
    /// Clock skew tolerated on a token's `exp` and `nbf`, seconds (at most 300).
    pub user_token_leeway_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Sustained requests per second (0 = no limit).
    pub per_second: u32,
    /// Burst allowance on top of the rate.
    pub burst: u32,
}

impl RateLimit {
    pub const fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new(0, 0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Claims per second this instance accepts in all.
    pub claim_global: RateLimit,
    /// Claims per second per user.
    pub claim_per_user: RateLimit,
    /// Claims per second per client IP.
    pub claim_per_ip: RateLimit,
    /// Admin and read routes per second per client IP.
    pub other_per_ip: RateLimit,
    /// Proxies whose `X-Forwarded-For` is trusted for the client IP.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Backend calls in flight at most; more wait up to `admission_wait_ms`, then 503.
    pub max_inflight: usize,
    pub admission_wait_ms: u64,
    /// `Retry-After` seconds sent with 429 and 503 answers.
    pub retry_after_s: u64,
    /// Keys each keyed rate limiter (per user, per IP) tracks at most. When full, keys whose
    /// bucket has refilled are dropped, and if that frees too little, all are forgotten
    /// (their buckets refill: errs towards admitting).
    pub max_tracked_keys: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            claim_global: RateLimit::default(),
            claim_per_user: RateLimit::new(20, 20),
            claim_per_ip: RateLimit::default(),
            other_per_ip: RateLimit::default(),
            trusted_proxies: Vec::new(),
            max_inflight: 4096,
            admission_wait_ms: 50,
            retry_after_s: 1,
            max_tracked_keys: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Batch metadata is re-read from the backend this often (fallback for missed events).
    pub refresh_ms: u64,
    /// Users remembered as "at limit", per instance.
    pub max_users_at_limit: usize,
    /// How long a batch id found to exist nowhere is answered 404 from memory.
    pub missing_ttl_ms: u64,
    /// Unknown batch ids remembered at most (a flood of random ids cannot grow memory).
    pub max_missing: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            refresh_ms: 1_000,
            max_users_at_limit: 1_000_000,
            missing_ttl_ms: 1_000,
            max_missing: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` (and health) on this separate admin address too.
    pub admin_listen: Option<SocketAddr>,
    /// Batches with their own `batch` label at most (stock remaining gauges).
    pub max_batch_labels: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            admin_listen: None,
            max_batch_labels: 50,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalletConfig {
    /// How long a `lock` holds a coupon for an order before it counts as released.
    pub lock_timeout_ms: u64,
    /// Coupons per wallet page when `limit` is not given, and the largest `limit`.
    pub default_page: u32,
    pub max_page: u32,
    /// How long a claimed or changed coupon stays in its user's recent set: the wallet shows
    /// it from its shard that long, whatever the database holds (read-your-writes while the
    /// database is behind or down). Longer than `cache_ms`. 0: off (no touch before each
    /// 201, one Redis call less per claim; the wallet lists a coupon once the persister wrote
    /// it, and `cache_ms` must be 0; transitions still work at once).
    pub recent_window_ms: u64,
    /// The most recent coupons kept per user (the oldest are forgotten past it).
    pub recent_max: u32,
    /// How long a gateway serves a wallet from its cache of the database's answer (0: never):
    /// recent changes are merged into it, so a cached wallet never hides one.
    pub cache_ms: u64,
    /// The most wallets cached per gateway.
    pub cache_entries: u32,
    /// A wallet is cached whole when it holds at most this many coupons (one database query
    /// of that many rows); larger ones are read from the database page by page.
    pub cache_max_coupons: u32,
}

impl Default for WalletConfig {
    fn default() -> Self {
        WalletConfig {
            lock_timeout_ms: 15 * 60 * 1000,
            default_page: 20,
            max_page: 100,
            recent_window_ms: 10 * 60 * 1000,
            recent_max: 1000,
            cache_ms: 2000,
            cache_entries: 100_000,
            cache_max_coupons: 200,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter: a level (`trace`, `debug`, `info`, `warn`, `error`, `off`) and/or
    /// `target=level` directives, e.g. `claimgate=debug,info`. `RUST_LOG` overrides the file
    /// (see [`super::load`]); anything else is refused at load.
    pub level: String,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Access log: one `info` line per sampled request (target `claimgate::access`: method,
    /// route label, status, duration, request id; never the path's ids, the query or the
    /// body). Off by default.
    pub access: bool,
    /// Share of requests the access log writes, 0..=1 (1 = every request).
    pub access_sample: f64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            json: false,
            access: false,
            access_sample: 1.0,
        }
    }
}

/// Level names a `log.level` directive may end with.
const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Checks a `log.level` filter: every comma-separated directive is a level or
/// `target[span]=level`. A bare word that is not a level (`verbose`) is refused: `tracing`
/// would read it as a target name enabled at every level, and every other line would be
/// dropped silently.
pub fn check_log_level(filter: &str) -> Result<(), String> {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("is empty: give a level, e.g. \"info\"".to_string());
    }
    for d in directives {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l).trim();
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "`{d}` is not a level: use one of {} or target=level (e.g. claimgate=debug)",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(|_| ())
        .map_err(|e| format!("`{filter}`: {e}"))
}

/// Most claims one call of `lua/claim.lua` may carry (the script refuses more):
/// `stock.group_max_claims` is at most this.
pub const MAX_GROUP_CLAIMS: usize = 1000;

/// `[stock]` section of the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StockConfig {
    /// Percent of a new batch's stock handed to the shards at creation; the rest stays in
    /// the pool and moves to shards as they run dry.
    pub initial_fill_percent: u8,
    /// Stock moved per refill is `total / (shards * refill_divisor)` (at least 1).
    pub refill_divisor: u32,
    /// How many refill rounds one claim may trigger before giving up with `overloaded`.
    pub max_refill_rounds: u32,
    /// Lifetime of a "transfer credited" marker. Must exceed any possible delay between the
    /// two halves of a transfer (the sweeper runs every `sweep_interval_ms`). The markers
    /// are the only keys of a batch retirement does not drop: they must have expired by
    /// then (`batches.retire_after_ms` is checked against this at load).
    pub transfer_marker_ttl_s: u64,
    /// Outbox entries older than this are finished by the sweeper.
    pub sweep_min_age_ms: u64,
    /// How often the sweeper runs.
    pub sweep_interval_ms: u64,
    /// Group commit (`src/stock/group.rs`): most claims one claim call carries (1..=1000;
    /// 1 turns grouping off).
    pub group_max_claims: usize,
    /// Most claims queued for one shard while its call is in flight; past it claims are
    /// shed (503 `overloaded`, nothing claimed).
    pub group_max_queue: usize,
    /// Longest a queued claim waits for its answer (then 503; its request id replays it).
    pub group_wait_ms: u64,
}

impl Default for StockConfig {
    fn default() -> Self {
        StockConfig {
            initial_fill_percent: 50,
            refill_divisor: 8,
            max_refill_rounds: 8,
            transfer_marker_ttl_s: 86_400,
            sweep_min_age_ms: 2_000,
            sweep_interval_ms: 1_000,
            group_max_claims: 64,
            group_max_queue: 4096,
            group_wait_ms: 5_000,
        }
    }
}

/// `[persister]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersisterConfig {
    /// Run the persister in this instance (at least one instance must).
    pub enabled: bool,
    /// Consumer group on every shard log.
    pub group: String,
    /// Consumer name in the group; default `<hostname>-<pid>`. Must differ between
    /// running instances.
    pub consumer: Option<String>,
    /// Most records per database transaction.
    pub batch_size: usize,
    /// Longest a read record waits in memory for more to share its transaction, and the
    /// pause between polls when the logs are idle.
    pub flush_interval_ms: u64,
    /// Records pending this long with another consumer are taken over (its instance is
    /// presumed dead).
    pub min_idle_ms: u64,
    /// Retry delay after a failed database write: doubles from min up to max.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Bound on a shard's log length, given to the claim script: at the bound, claims are
    /// shed (503) rather than letting Redis memory grow without end during a long database
    /// outage. In log entries: one per claim call with successes (it holds that call's
    /// claims, at most `stock.group_max_claims`) or per change of a managed coupon. 0 =
    /// unbounded.
    pub max_backlog_per_shard: u64,
    /// How often the list of batches is re-read from the database.
    pub batch_refresh_ms: u64,
    /// How often backlog and lag are measured.
    pub probe_interval_ms: u64,
    /// Longest a database write may take before it counts as failed.
    pub write_timeout_ms: u64,
    /// On shutdown, how long to keep retrying the write of records already read. Past it
    /// they stay pending in Redis, where another instance takes them over.
    pub shutdown_grace_ms: u64,
    /// The persister counts as stalled (and `/readyz` answers 503) when records wait and it
    /// has made no progress (a committed write, or a read pass that left nothing to write)
    /// for longer than this. 0 = never report a stall. Must exceed `flush_interval_ms`.
    pub stall_ms: u64,
    /// Safety sweep: an active shard is read at least this often even when no wake-up (a
    /// claim in this instance, a probe that found records) named it. Bounds how late a
    /// missed wake-up is caught. At least `flush_interval_ms`.
    pub sweep_interval_ms: u64,
    /// A batch goes dormant (its shards are no longer read nor probed) once its claim
    /// window ended this long ago (or starts more than this far ahead) and its logs are
    /// drained: the margin covers clocks between gateways and Redis.
    pub dormant_after_ms: u64,
    /// Every dormant shard's log is still looked at once per this period (spread over the
    /// probe passes), in case records reached it without any change the database shows.
    /// At least `probe_interval_ms`.
    pub dormant_sweep_ms: u64,
}

impl Default for PersisterConfig {
    fn default() -> Self {
        PersisterConfig {
            enabled: true,
            group: "claimgate".to_string(),
            consumer: None,
            batch_size: 500,
            flush_interval_ms: 20,
            min_idle_ms: 30_000,
            backoff_min_ms: 100,
            backoff_max_ms: 5_000,
            max_backlog_per_shard: 1_000_000,
            batch_refresh_ms: 2_000,
            probe_interval_ms: 1_000,
            write_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            stall_ms: 5_000,
            sweep_interval_ms: 10_000,
            dormant_after_ms: 60_000,
            dormant_sweep_ms: 600_000,
        }
    }
}

impl PersisterConfig {
    /// The consumer name: configured, or `<hostname>-<pid>`.
    pub fn consumer_name(&self) -> String {
        if let Some(c) = self.consumer.as_ref().filter(|c| !c.is_empty()) {
            return c.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "claimgate".to_string());
        format!("{host}-{}", std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_are_levels_or_directives() {
        for ok in [
            "info",
            "WARN",
            "claimgate=debug,info",
            "off",
            "hyper=warn, debug",
        ] {
            check_log_level(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "verbose",
            "",
            " , ",
            "claimgate",
            "info,loud",
            "claimgate=chatty",
        ] {
            assert!(check_log_level(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_defaults_and_rejects_unknown_fields() {
        let c: PersisterConfig = toml::from_str("batch_size = 10").unwrap();
        assert_eq!(c.batch_size, 10);
        assert_eq!(c.group, "claimgate");
        assert!(toml::from_str::<PersisterConfig>("bogus = 1").is_err());
        assert!(!c.consumer_name().is_empty());
    }
}

/// `[repair]` section: the automatic repair of one shard that Redis lost or a failover
/// rolled back (see `crate::recovery::repair_shard`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairConfig {
    /// Repair faulty shards automatically (off: they stay fenced, 503 for their users,
    /// until `claimgate rebuild --force`).
    pub enabled: bool,
    /// Lifetime of a shard's repair lock: another gateway takes over a repair whose holder
    /// died after this long.
    pub lock_ms: u64,
    /// How long a repair waits for the fenced shard's log to reach the database.
    pub drain_timeout_ms: u64,
    /// Wait before retrying a repair that failed.
    pub retry_ms: u64,
    /// Faults waiting for the repairer (more are dropped: the next claim or probe reports
    /// them again).
    pub queue: usize,
    /// At start, how long the gateway waits (before serving) for the persister to learn
    /// what the database holds of every shard, so that a shard a failover rolled back while
    /// no gateway ran is recognised from its first claim (0 = do not wait).
    pub startup_wait_ms: u64,
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            enabled: true,
            lock_ms: 60_000,
            drain_timeout_ms: 30_000,
            retry_ms: 1_000,
            queue: 1_024,
            startup_wait_ms: 5_000,
        }
    }
}
