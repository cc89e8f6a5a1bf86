//! Configuration: one typed struct, loaded from TOML, overridden by `CLAIMGATE_*`
//! environment variables and CLI flags.
//!
//! Invariant kept here: the gateway only ever starts from a configuration in which every
//! key is known and every value is in range; anything else is a [`ConfigError`] that names
//! the offending key (the binary exits with status 64, EX_USAGE).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use crate::backend::embedded::EmbeddedConfig;
use crate::backend::redis::RedisConfig;
use crate::db::DatabaseConfig;
use crate::persist::PersisterConfig;
use crate::stock::StockConfig;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("invalid override `{0}`: expected section.key=value")]
    Override(String),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which backend runs the scripts: `embedded` (in-process, default) or `redis`.
    pub backend: BackendKind,
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub embedded: EmbeddedConfig,
    pub database: DatabaseConfig,
    pub persister: PersisterConfig,
    pub stock: StockConfig,
    pub batches: BatchesConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
    pub metrics: MetricsConfig,
    pub wallet: WalletConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: BackendKind::Embedded,
            server: ServerConfig::default(),
            redis: RedisConfig::default(),
            embedded: EmbeddedConfig::default(),
            database: DatabaseConfig::default(),
            persister: PersisterConfig::default(),
            stock: StockConfig::default(),
            batches: BatchesConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            cache: CacheConfig::default(),
            metrics: MetricsConfig::default(),
            wallet: WalletConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchesConfig {
    /// Shards of a batch created without `shards`.
    pub default_shards: u32,
    pub max_shards: u32,
    pub max_stock: i64,
    /// Longest `scope.ids`, `deny_users`, `require_tags` list.
    pub max_list_items: usize,
}

impl Default for BatchesConfig {
    fn default() -> Self {
        BatchesConfig {
            default_shards: 16,
            max_shards: 1024,
            max_stock: 1_000_000_000,
            max_list_items: 100_000,
        }
    }
}

impl BatchesConfig {
    pub fn limits(&self) -> crate::batch::BatchLimits {
        crate::batch::BatchLimits {
            default_shards: self.default_shards,
            max_shards: self.max_shards,
            max_stock: self.max_stock,
            max_list_items: self.max_list_items,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When set, admin routes need `Authorization: Bearer <admin_token>`.
    pub admin_token: Option<String>,
    /// When set, users are identified by an HS256 JWT (`sub`, `exp`) signed with this secret;
    /// when unset, by `user_id` in the body (development only: a warning is logged).
    pub user_token_secret: Option<String>,
    /// Clock skew tolerated on a token's `exp` and `nbf`, seconds (at most 300).
    pub user_token_leeway_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalletConfig {
    /// How long a `lock` holds a coupon for an order before it counts as released.
    pub lock_timeout_ms: u64,
    /// Coupons per wallet page when `limit` is not given, and the largest `limit`.
    pub default_page: u32,
    pub max_page: u32,
}

impl Default for WalletConfig {
    fn default() -> Self {
        WalletConfig {
            lock_timeout_ms: 15 * 60 * 1000,
            default_page: 20,
            max_page: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `claimgate=debug,info`.
    pub level: String,
    /// One JSON object per line instead of text.
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            json: false,
        }
    }
}

/// Where configuration comes from, lowest precedence first: defaults, the file, the
/// environment (`CLAIMGATE_SECTION__KEY=value`, e.g. `CLAIMGATE_SERVER__LISTEN`), and
/// `section.key=value` overrides (the CLI's `--set` and dedicated flags).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[String],
) -> Result<Config, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse(format!("{}: {e}", path.display())))?
        }
        None => toml::Table::new(),
    };
    for (name, value) in env {
        // Settings are CLAIMGATE_<SECTION>__<KEY> and CLAIMGATE_BACKEND; other CLAIMGATE_*
        // variables (CLAIMGATE_CONFIG, the test suite's) are not settings.
        let Some(rest) = name.strip_prefix("CLAIMGATE_") else {
            continue;
        };
        if !rest.contains("__") && rest != "BACKEND" {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        set_path(&mut table, &path, &value);
    }
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| ConfigError::Override(o.clone()))?;
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Override(o.clone()));
        }
        set_path(&mut table, &path, value);
    }
    let config: Config = Config::deserialize(toml::Value::Table(table))
        .map_err(|e| ConfigError::Parse(e.to_string()))?;
    config.check()?;
    Ok(config)
}

/// Sets `a.b.c = value`, reading `value` as a TOML value when it is one (numbers, booleans,
/// arrays) and as a string otherwise.
fn set_path(table: &mut toml::Table, path: &[String], value: &str) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let Some(next) = entry.as_table_mut() else {
            return;
        };
        t = next;
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    t.insert(last.clone(), parsed);
}

impl Config {
    /// Range checks serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if self.server.max_body_bytes < 64 {
            return bad("server.max_body_bytes", "must be at least 64");
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1");
        }
        for (key, ms) in [
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            (
                "server.http2_keep_alive_interval_ms",
                self.server.http2_keep_alive_interval_ms,
            ),
            (
                "server.http2_keep_alive_timeout_ms",
                self.server.http2_keep_alive_timeout_ms,
            ),
        ] {
            if !(1..=3_600_000).contains(&ms) {
                return bad(key, "must be 1..=3600000 (ms)");
            }
        }
        if self.server.http2_max_concurrent_streams == 0 {
            return bad("server.http2_max_concurrent_streams", "must be at least 1");
        }
        if self.server.linger_ms > 60_000 {
            return bad("server.linger_ms", "must be 0..=60000");
        }
        if self.batches.default_shards == 0 || self.batches.default_shards > self.batches.max_shards
        {
            return bad("batches.default_shards", "must be 1..=batches.max_shards");
        }
        if self.stock.initial_fill_percent > 100 {
            return bad("stock.initial_fill_percent", "must be 0..=100");
        }
        if self.stock.max_refill_rounds == 0 {
            return bad("stock.max_refill_rounds", "must be at least 1");
        }
        if self.limits.max_tracked_keys == 0 {
            return bad("limits.max_tracked_keys", "must be at least 1");
        }
        if self.limits.max_inflight == 0 {
            return bad("limits.max_inflight", "must be at least 1");
        }
        if self.redis.pool_size == 0 {
            return bad("redis.pool_size", "must be at least 1");
        }
        if self.auth.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return bad("auth.admin_token", "must be at least 16 characters");
        }
        if self.auth.user_token_leeway_s > 300 {
            return bad("auth.user_token_leeway_s", "must be 0..=300");
        }
        if self
            .auth
            .user_token_secret
            .as_ref()
            .is_some_and(|s| s.len() < 32)
        {
            return bad("auth.user_token_secret", "must be at least 32 bytes");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(None, env(&[]), &[]).unwrap();
        assert_eq!(c.backend, BackendKind::Embedded);
        assert_eq!(c.server.listen.port(), 8080);
    }

    #[test]
    fn env_and_overrides_apply_in_order() {
        let c = load(
            None,
            env(&[
                ("CLAIMGATE_SERVER__MAX_BODY_BYTES", "1024"),
                ("CLAIMGATE_BACKEND", "redis"),
                ("CLAIMGATE_CONFIG", "ignored.toml"),
                ("CLAIMGATE_TEST_PG", "postgres://ignored"),
                ("OTHER", "x"),
            ]),
            &["server.max_body_bytes=2048".to_string()],
        )
        .unwrap();
        assert_eq!(c.server.max_body_bytes, 2048);
        assert_eq!(c.backend, BackendKind::Redis);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load(None, env(&[("CLAIMGATE_SERVER__LISTN", "x")]), &[]).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        let err = load(None, env(&[]), &["server.max_body_bytes=1".into()]).unwrap_err();
        assert!(err.to_string().contains("server.max_body_bytes"), "{err}");
        assert!(load(None, env(&[]), &["nonsense".into()]).is_err());
    }

    #[test]
    fn shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["config/claimgate.toml", "config/redis.toml"] {
            load(Some(&root.join(f)), env(&[]), &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
