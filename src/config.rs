//! Configuration: one typed struct, loaded from TOML, overridden by `CLAIMGATE_*`
//! environment variables and CLI flags.
//!
//! Invariant kept here: the gateway only ever starts from a configuration in which every
//! key is known and every value is in range; anything else is a [`ConfigError`] that names
//! the offending key (the binary exits with status 64, EX_USAGE).
//!
//! The built-in defaults ([`Config::default`] and every section's `Default`) are exactly
//! `config/claimgate.toml`: the durable embedded setup (append-only log and SQLite under
//! `data/`). A test compares the two key by key.
//!
//! [`Config::to_toml`] is the effective configuration as TOML (what `check-config` prints),
//! with every secret and URL password replaced by [`crate::secret::REDACTED`]. Loading that
//! text again gives the same configuration, except that a redacted secret or URL is rejected
//! (naming its key) until the real value is given, e.g. by `CLAIMGATE_AUTH__ADMIN_TOKEN`.

use std::net::SocketAddr;
use std::path::Path;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;

use crate::backend::embedded::EmbeddedConfig;
use crate::backend::redis::RedisConfig;
use crate::db::DatabaseConfig;
use crate::persist::PersisterConfig;
pub use crate::secret::Secret;
use crate::secret::{REDACTED, url_passwords};
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which backend runs the scripts: `embedded` (in-process, default) or `redis`.
    pub backend: BackendKind,
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub embedded: EmbeddedConfig,
    pub database: DatabaseConfig,
    pub persister: PersisterConfig,
    #[serde(serialize_with = "serialize_stock")]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
            text.parse::<toml::Table>().map_err(|e| {
                // The message quotes the offending line, which may hold a secret.
                ConfigError::Parse(redact_quoted_lines(&format!("{}: {e}", path.display())))
            })?
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

/// Keys whose values are secrets, as they appear in a TOML line.
const SECRET_KEYS: &[&str] = &["admin_token", "user_token_secret"];

/// `message` with the value of any `<secret key> = ...` line cut, and URLs redacted: a TOML
/// parse error quotes the line it failed on.
fn redact_quoted_lines(message: &str) -> String {
    message
        .lines()
        .map(|line| match line.split_once('=') {
            Some((head, _)) if SECRET_KEYS.iter().any(|k| head.contains(k)) => {
                format!("{head}= {REDACTED}")
            }
            _ => crate::secret::redact_text(line).into_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Serializes the `[stock]` section (its type lives in `stock.rs` and derives only
/// `Deserialize`). The destructuring names every field, so a new field is a compile error
/// here until it is dumped too.
fn serialize_stock<S: Serializer>(c: &StockConfig, s: S) -> Result<S::Ok, S::Error> {
    let StockConfig {
        initial_fill_percent,
        refill_divisor,
        max_refill_rounds,
        transfer_marker_ttl_s,
        sweep_min_age_ms,
        sweep_interval_ms,
    } = c;
    let mut st = s.serialize_struct("StockConfig", 6)?;
    st.serialize_field("initial_fill_percent", initial_fill_percent)?;
    st.serialize_field("refill_divisor", refill_divisor)?;
    st.serialize_field("max_refill_rounds", max_refill_rounds)?;
    st.serialize_field("transfer_marker_ttl_s", transfer_marker_ttl_s)?;
    st.serialize_field("sweep_min_age_ms", sweep_min_age_ms)?;
    st.serialize_field("sweep_interval_ms", sweep_interval_ms)?;
    st.end()
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

/// First line of [`Config::to_toml`].
const DUMP_HEADER: &str = "\
# claimgate effective configuration (claimgate check-config).
# Secrets and URL passwords are printed as \"<redacted>\": this file loads again once they
# are given, e.g. CLAIMGATE_AUTH__ADMIN_TOKEN=..., CLAIMGATE_DATABASE__URL=... or --set.
";

impl Config {
    /// The configuration as TOML, secrets redacted (see the module documentation).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let body = toml::to_string_pretty(self)
            .map_err(|e| ConfigError::Parse(format!("cannot print the configuration: {e}")))?;
        Ok(format!("{DUMP_HEADER}\n{body}"))
    }

    /// Every secret value of this configuration (tokens, URL passwords raw and decoded), for
    /// [`crate::secret::scrub`] of messages that may quote one.
    pub fn secret_values(&self) -> Vec<String> {
        let mut v: Vec<String> = [&self.auth.admin_token, &self.auth.user_token_secret]
            .into_iter()
            .flatten()
            .map(|s| s.expose().to_string())
            .collect();
        v.extend(url_passwords(&self.database.url));
        v.extend(url_passwords(&self.redis.url));
        v
    }

    /// `text` with every secret of this configuration and every URL password redacted.
    pub fn scrub(&self, text: &str) -> String {
        let secrets = self.secret_values();
        crate::secret::scrub(text, secrets.iter().map(String::as_str))
    }

    /// Range checks serde cannot express.
    fn check(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        let marker = format!(
            "is the redaction marker {REDACTED} from a check-config dump, not the real value: \
             give it (e.g. CLAIMGATE_SECTION__KEY=... or --set)"
        );
        if self
            .auth
            .admin_token
            .as_ref()
            .is_some_and(Secret::is_redaction_marker)
        {
            return bad("auth.admin_token", &marker);
        }
        if self
            .auth
            .user_token_secret
            .as_ref()
            .is_some_and(Secret::is_redaction_marker)
        {
            return bad("auth.user_token_secret", &marker);
        }
        if self.database.url.contains(REDACTED) {
            return bad("database.url", &marker);
        }
        if self.redis.url.contains(REDACTED) {
            return bad("redis.url", &marker);
        }
        if self.persister.stall_ms != 0
            && self.persister.stall_ms <= self.persister.flush_interval_ms
        {
            return bad(
                "persister.stall_ms",
                "must be 0 (off) or more than persister.flush_interval_ms",
            );
        }
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

    fn as_value(c: &Config) -> toml::Value {
        toml::Value::try_from(c).expect("config serializes")
    }

    /// Dotted keys whose values differ between `a` and `b`.
    fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
        match (a, b) {
            (toml::Value::Table(x), toml::Value::Table(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = format!("{prefix}{k}");
                    match (x.get(k), y.get(k)) {
                        (Some(va), Some(vb)) => diff(&format!("{p}."), va, vb, out),
                        (va, vb) => out.push(format!("{p}: {va:?} != {vb:?}")),
                    }
                }
            }
            _ if a != b => out.push(format!("{}: {a} != {b}", prefix.trim_end_matches('.'))),
            _ => {}
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The built-in defaults are exactly `config/claimgate.toml` (item 12 of "Hardening":
    /// they had drifted to an in-memory keyspace over a durable SQLite).
    #[test]
    fn builtin_defaults_equal_the_shipped_embedded_config() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/claimgate.toml");
        let shipped = load(Some(&file), env(&[]), &[]).unwrap();
        let builtin = load(None, env(&[]), &[]).unwrap();
        let mut d = Vec::new();
        diff("", &as_value(&builtin), &as_value(&shipped), &mut d);
        assert!(
            d.is_empty(),
            "built-in != config/claimgate.toml:\n{}",
            d.join("\n")
        );
        assert_eq!(as_value(&Config::default()), as_value(&builtin));
        assert_eq!(
            builtin.embedded.aof_path.as_deref(),
            Some(Path::new("data/claimgate.aof"))
        );
        assert_eq!(builtin.database.url, "sqlite://data/claimgate.db?mode=rwc");
    }

    /// A section present with only some keys takes the others from the section's own
    /// `Default`, which must equal the top-level default (an `[embedded]` with only
    /// `lua_vms` must not silently lose the append-only file).
    #[test]
    fn partial_sections_keep_the_builtin_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let sections = [
            "server",
            "redis",
            "embedded",
            "database",
            "persister",
            "stock",
            "batches",
            "auth",
            "limits",
            "cache",
            "metrics",
            "wallet",
            "log",
        ];
        let text: String = sections.iter().map(|s| format!("[{s}]\n")).collect();
        let f = write(dir.path(), "empty-sections.toml", &text);
        let c = load(Some(&f), env(&[]), &[]).unwrap();
        assert_eq!(as_value(&c), as_value(&Config::default()));
        let f = write(dir.path(), "partial.toml", "[embedded]\nlua_vms = 3\n");
        let c = load(Some(&f), env(&[]), &[]).unwrap();
        assert_eq!(
            c.embedded.aof_path.as_deref(),
            Some(Path::new("data/claimgate.aof"))
        );
    }

    /// The dump loads again into the same configuration, non-default values included
    /// (an in-memory keyspace is `aof_path = ""`).
    #[test]
    fn dump_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(
            None,
            env(&[("CLAIMGATE_PERSISTER__CONSUMER", "gw-7")]),
            &[
                "backend=\"redis\"".into(),
                "embedded.aof_path=\"\"".into(),
                "embedded.fsync=\"always\"".into(),
                "metrics.admin_listen=\"127.0.0.1:9100\"".into(),
                "limits.trusted_proxies=[\"10.0.0.1\", \"::1\"]".into(),
                "limits.claim_global={per_second=5, burst=7}".into(),
                "stock.sweep_interval_ms=1234".into(),
                "persister.stall_ms=0".into(),
                "log.json=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.embedded.aof_path, None);
        let text = c.to_toml().unwrap();
        let f = write(dir.path(), "dump.toml", &text);
        let again = load(Some(&f), env(&[]), &[]).unwrap();
        assert_eq!(again.embedded.aof_path, None, "{text}");
        assert_eq!(again.persister.consumer.as_deref(), Some("gw-7"));
        assert_eq!(again.stock.sweep_interval_ms, 1234);
        assert_eq!(again.to_toml().unwrap(), text);
        // and the defaults' dump too
        let d = Config::default().to_toml().unwrap();
        let f = write(dir.path(), "defaults.toml", &d);
        assert_eq!(load(Some(&f), env(&[]), &[]).unwrap().to_toml().unwrap(), d);
    }

    const ADMIN: &str = "admin-token-0123456789-SECRET";
    const USER: &str = "user-token-secret-0123456789-0123456789-SECRET";

    /// Item 10: secrets and URL passwords never reach the dump or `Debug`; the redacted
    /// dump is refused (naming the key) until the real values are given again.
    #[test]
    fn dump_and_debug_redact_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(
            None,
            env(&[
                ("CLAIMGATE_AUTH__ADMIN_TOKEN", ADMIN),
                ("CLAIMGATE_AUTH__USER_TOKEN_SECRET", USER),
            ]),
            &[
                "database.url=\"postgres://app:PG-PASS-SECRET@db:5432/claims\"".into(),
                "redis.url=\"redis://default:REDIS-PASS-SECRET@cache:6379/0\"".into(),
            ],
        )
        .unwrap();
        let text = c.to_toml().unwrap();
        let debug = format!("{c:?} {c:#?}");
        for out in [&text, &debug] {
            assert!(!out.contains("SECRET"), "a secret leaked:\n{out}");
            assert!(out.contains(crate::secret::REDACTED), "{out}");
        }
        assert!(
            text.contains("postgres://app:<redacted>@db:5432/claims"),
            "{text}"
        );
        assert!(
            text.contains("redis://default:<redacted>@cache:6379/0"),
            "{text}"
        );
        let scrubbed = c.scrub(&format!(
            "auth with {ADMIN} to redis://x:y@z failed, pw PG-PASS-SECRET"
        ));
        assert!(
            !scrubbed.contains("SECRET") && !scrubbed.contains(":y@"),
            "{scrubbed}"
        );

        let f = write(dir.path(), "dump.toml", &text);
        let err = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("auth.admin_token"), "{err}");
        let err = load(
            Some(&f),
            env(&[
                ("CLAIMGATE_AUTH__ADMIN_TOKEN", ADMIN),
                ("CLAIMGATE_AUTH__USER_TOKEN_SECRET", USER),
            ]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("database.url"), "{err}");
        let again = load(
            Some(&f),
            env(&[
                ("CLAIMGATE_AUTH__ADMIN_TOKEN", ADMIN),
                ("CLAIMGATE_AUTH__USER_TOKEN_SECRET", USER),
                (
                    "CLAIMGATE_DATABASE__URL",
                    "postgres://app:PG-PASS-SECRET@db:5432/claims",
                ),
                (
                    "CLAIMGATE_REDIS__URL",
                    "redis://default:REDIS-PASS-SECRET@cache:6379/0",
                ),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(
            again.auth.admin_token.as_ref().map(Secret::expose),
            Some(ADMIN)
        );
        assert_eq!(again.to_toml().unwrap(), text);
    }

    /// A TOML syntax error quotes its line: a secret on it is cut, a URL redacted. A
    /// non-string secret is refused without echoing it.
    #[test]
    fn config_errors_do_not_quote_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "broken.toml",
            "[auth]\nadmin_token = \"admin-token-SECRET-0123456789\n",
        );
        let err = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(err.contains("admin_token"), "{err}");
        let f = write(
            dir.path(),
            "broken-url.toml",
            "[database]\nurl = \"postgres://u:SECRET@h/db\" x\n",
        );
        let err = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        let err = load(
            None,
            env(&[("CLAIMGATE_AUTH__ADMIN_TOKEN", "12345678901234567")]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("12345678901234567"), "{err}");
        assert!(err.contains("admin_token"), "{err}");
    }

    #[test]
    fn stall_threshold_is_checked() {
        let err = load(
            None,
            env(&[]),
            &[
                "persister.stall_ms=10".into(),
                "persister.flush_interval_ms=10".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("persister.stall_ms"), "{err}");
        assert!(load(None, env(&[]), &["persister.stall_ms=0".into()]).is_ok());
    }

    #[test]
    fn shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["config/claimgate.toml", "config/redis.toml"] {
            load(Some(&root.join(f)), env(&[]), &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
