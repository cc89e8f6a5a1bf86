//! Configuration: one typed struct, loaded from TOML, overridden by `CLAIMGATE_*`
//! environment variables and CLI flags. A leaf of the crate: it imports nothing of it, and
//! every module takes its own section from here ([`sections`], [`stores`], `events`; secrets and
//! their redaction in [`secret`]).
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
//! with every secret and URL password replaced by [`secret::REDACTED`]. Loading that
//! text again gives the same configuration, except that a redacted secret or URL is rejected
//! (naming its key) until the real value is given, e.g. by `CLAIMGATE_AUTH__ADMIN_TOKEN`.

mod campaign;
mod events;
pub mod secret;
mod sections;
mod stores;

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use self::campaign::{CatalogConfig, CheckoutConfig, GrantsConfig};
pub use self::events::{EventsConfig, LEDGER_MAX_PAGE};
pub use self::secret::Secret;
use self::secret::{REDACTED, url_passwords};
pub use self::sections::{
    AuthConfig, BatchesConfig, CacheConfig, LimitsConfig, LogConfig, MAX_GROUP_CLAIMS,
    MetricsConfig, PersisterConfig, RateLimit, RepairConfig, ServerConfig, StockConfig,
    WalletConfig, check_log_level,
};
pub use self::stores::{Ack, DEFAULT_AOF_PATH, DatabaseConfig, EmbeddedConfig, Fsync, RedisConfig};

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
    pub repair: RepairConfig,
    pub stock: StockConfig,
    pub batches: BatchesConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub cache: CacheConfig,
    pub metrics: MetricsConfig,
    pub wallet: WalletConfig,
    pub catalog: CatalogConfig,
    pub checkout: CheckoutConfig,
    pub grants: GrantsConfig,
    pub log: LogConfig,
    pub events: EventsConfig,
    /// The file this configuration was loaded from (not a setting: for the startup line).
    #[serde(skip)]
    pub file: Option<std::path::PathBuf>,
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
            repair: RepairConfig::default(),
            stock: StockConfig::default(),
            batches: BatchesConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            cache: CacheConfig::default(),
            metrics: MetricsConfig::default(),
            wallet: WalletConfig::default(),
            catalog: CatalogConfig::default(),
            checkout: CheckoutConfig::default(),
            grants: GrantsConfig::default(),
            log: LogConfig::default(),
            events: EventsConfig::default(),
            file: None,
        }
    }
}

/// The conventional environment variables, as (variable, key): they sit between the file and
/// the `CLAIMGATE_*` variables, so a platform's `DATABASE_URL` is used unless a
/// claimgate-specific setting says otherwise.
pub const CONVENTIONAL_ENV: &[(&str, &str)] = &[
    ("DATABASE_URL", "database.url"),
    ("REDIS_URL", "redis.url"),
    ("RUST_LOG", "log.level"),
];

/// Keys whose value is a string but whose default is absent (`None`), so [`string_key`]
/// cannot learn it from the defaults.
const OPTIONAL_STRING_KEYS: &[&str] = &[
    "auth.admin_token",
    "auth.user_token_secret",
    "persister.consumer",
    "metrics.admin_listen",
];

/// Whether the setting at `path` takes a string (its default is one, or it is listed in
/// [`OPTIONAL_STRING_KEYS`]).
fn string_key(defaults: &toml::Table, path: &[String]) -> bool {
    if OPTIONAL_STRING_KEYS.contains(&path.join(".").as_str()) {
        return true;
    }
    let mut t = defaults;
    for (i, p) in path.iter().enumerate() {
        match t.get(p) {
            Some(toml::Value::Table(next)) if i + 1 < path.len() => t = next,
            Some(toml::Value::String(_)) if i + 1 == path.len() => return true,
            _ => return false,
        }
    }
    false
}

/// Where configuration comes from, lowest precedence first: defaults, the file, the
/// conventional variables ([`CONVENTIONAL_ENV`]: `DATABASE_URL`, `REDIS_URL`, `RUST_LOG`),
/// the `CLAIMGATE_*` variables (`CLAIMGATE_SECTION__KEY=value`, e.g.
/// `CLAIMGATE_SERVER__LISTEN`), and `section.key=value` overrides (the CLI's `--set` and
/// dedicated flags).
///
/// A variable or override is read as a TOML value (numbers, booleans, arrays, inline
/// tables), except for a setting that takes a string: there the text is the string as it
/// is (a secret of digits from the environment stays a string), unless it is a quoted
/// TOML string. A value of the wrong type in the file is reported with its line.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[String],
) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let (mut table, text) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let table = text.parse::<toml::Table>().map_err(|e| {
                // The message quotes the offending line, which may hold a secret.
                ConfigError::Parse(redact_quoted_lines(&format!("{}: {e}", path.display())))
            })?;
            (table, Some(text))
        }
        None => (toml::Table::new(), None),
    };
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let set = |table: &mut toml::Table, path: &[String], value: &str| {
        let as_string = string_key(&defaults, path);
        set_path(table, path, value, as_string);
    };
    // `log.level` came from RUST_LOG (and nothing later replaced it): said in its error.
    let mut level_from_rust_log = false;
    for (var, key) in CONVENTIONAL_ENV {
        if let Some((_, value)) = env.iter().find(|(name, _)| name == var) {
            let path: Vec<String> = key.split('.').map(str::to_string).collect();
            set(&mut table, &path, value);
            level_from_rust_log |= *var == "RUST_LOG";
        }
    }
    for (name, value) in &env {
        // Settings are CLAIMGATE_<SECTION>__<KEY> and CLAIMGATE_BACKEND; other CLAIMGATE_*
        // variables (CLAIMGATE_CONFIG, the test suite's) are not settings.
        let Some(rest) = name.strip_prefix("CLAIMGATE_") else {
            continue;
        };
        if !rest.contains("__") && rest != "BACKEND" {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        level_from_rust_log &= path != ["log", "level"];
        set(&mut table, &path, value);
    }
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| ConfigError::Override(o.clone()))?;
        let path: Vec<String> = key.split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Override(o.clone()));
        }
        level_from_rust_log &= path != ["log", "level"];
        set(&mut table, &path, value);
    }
    let mut config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
        // The file alone, read again with its positions: a type error there is reported
        // with its line and column (the merged table has no positions).
        if let (Some(path), Some(text)) = (file, &text)
            && let Err(fe) = toml::from_str::<Config>(text)
        {
            return ConfigError::Parse(redact_quoted_lines(&format!("{}: {fe}", path.display())));
        }
        ConfigError::Parse(redact_quoted_lines(&e.to_string()))
    })?;
    config.file = file.map(Path::to_path_buf);
    config.check().map_err(|e| match e {
        ConfigError::Invalid { key, message } if key == "log.level" && level_from_rust_log => {
            ConfigError::Invalid {
                key,
                message: format!("{message} (from RUST_LOG)"),
            }
        }
        e => e,
    })?;
    Ok(config)
}

/// Keys whose values are secrets, as they appear in a TOML line.
const SECRET_KEYS: &[&str] = &["admin_token", "user_token_secret", "webhook_secret"];

/// `message` with the value of any `<secret key> = ...` line cut, and URLs redacted: a TOML
/// parse error quotes the line it failed on.
fn redact_quoted_lines(message: &str) -> String {
    message
        .lines()
        .map(|line| match line.split_once('=') {
            Some((head, _)) if SECRET_KEYS.iter().any(|k| head.contains(k)) => {
                format!("{head}= {REDACTED}")
            }
            _ => secret::redact_text(line).into_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sets `a.b.c = value`, reading `value` as a TOML value when it is one (numbers, booleans,
/// arrays) and as a string otherwise; with `as_string` (a setting that takes a string),
/// only a quoted TOML string is unquoted, anything else is the text as it is.
fn set_path(table: &mut toml::Table, path: &[String], value: &str, as_string: bool) {
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
        .filter(|v| !as_string || v.is_str())
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    t.insert(last.clone(), parsed);
}

/// Largest `wallet.max_page`: the database answers at most this many coupons per page.
pub const WALLET_MAX_PAGE: u64 = 500;

/// Highest `batches.max_stock`: a hundredth of a coupon-id epoch (10^12)
/// (`domain::ids::EPOCH_SPAN`), so a shard's claim counter, refunds included, never runs
/// into the next epoch's ids.
pub const MAX_STOCK_CEILING: i64 = 10_000_000_000;

/// Highest `batches.max_budget`: 2^53 - 1, the largest integer a JSON number (and a Lua
/// number in the scripts) carries exactly, so a budget and its spent part are exact in every
/// client.
pub const MAX_BUDGET_CEILING: i64 = (1 << 53) - 1;

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
    /// [`secret::scrub`] of messages that may quote one.
    pub fn secret_values(&self) -> Vec<String> {
        let mut v: Vec<String> = [
            &self.auth.admin_token,
            &self.auth.user_token_secret,
            &self.events.webhook_secret,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.expose().to_string())
        .collect();
        v.extend(url_passwords(&self.database.url));
        v.extend(url_passwords(&self.redis.url));
        if let Some(url) = &self.events.webhook_url {
            v.extend(url_passwords(url));
        }
        v
    }

    /// `text` with every secret of this configuration and every URL password redacted.
    pub fn scrub(&self, text: &str) -> String {
        let secrets = self.secret_values();
        secret::scrub(text, secrets.iter().map(String::as_str))
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
        if let Err((key, message)) = self.events.check(&marker) {
            return Err(ConfigError::Invalid { key, message });
        }
        if self.persister.stall_ms != 0
            && self.persister.stall_ms <= self.persister.flush_interval_ms
        {
            return bad(
                "persister.stall_ms",
                "must be 0 (off) or more than persister.flush_interval_ms",
            );
        }
        if self.persister.sweep_interval_ms < self.persister.flush_interval_ms {
            return bad(
                "persister.sweep_interval_ms",
                "must be at least persister.flush_interval_ms",
            );
        }
        if self.persister.dormant_sweep_ms < self.persister.probe_interval_ms {
            return bad(
                "persister.dormant_sweep_ms",
                "must be at least persister.probe_interval_ms",
            );
        }
        // Every bound a module relies on is checked here, naming the key: no module clamps
        // a configured value on its own (`x.max(1)`), so what is configured is what runs.
        const HOUR_MS: u64 = 3_600_000;
        let ranges: [(&'static str, u64, u64, u64); 49] = [
            (
                "server.max_body_bytes",
                self.server.max_body_bytes as u64,
                64,
                u64::MAX,
            ),
            (
                "server.max_connections",
                self.server.max_connections as u64,
                1,
                u64::MAX,
            ),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "server.request_timeout_ms",
                self.server.request_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "server.http2_keep_alive_interval_ms",
                self.server.http2_keep_alive_interval_ms,
                1,
                HOUR_MS,
            ),
            (
                "server.http2_keep_alive_timeout_ms",
                self.server.http2_keep_alive_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "server.http2_max_concurrent_streams",
                u64::from(self.server.http2_max_concurrent_streams),
                1,
                u64::MAX,
            ),
            ("server.linger_ms", self.server.linger_ms, 0, 60_000),
            ("redis.pool_size", self.redis.pool_size as u64, 1, u64::MAX),
            (
                "redis.command_timeout_ms",
                self.redis.command_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "redis.connect_timeout_ms",
                self.redis.connect_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "redis.event_buffer",
                self.redis.event_buffer as u64,
                16,
                u64::MAX,
            ),
            (
                "redis.ack_replicas",
                u64::from(self.redis.ack_replicas),
                1,
                16,
            ),
            ("redis.ack_timeout_ms", self.redis.ack_timeout_ms, 1, 60_000),
            ("repair.lock_ms", self.repair.lock_ms, 1_000, HOUR_MS),
            (
                "repair.drain_timeout_ms",
                self.repair.drain_timeout_ms,
                100,
                HOUR_MS,
            ),
            ("repair.retry_ms", self.repair.retry_ms, 10, HOUR_MS),
            ("repair.queue", self.repair.queue as u64, 1, 1_000_000),
            (
                "repair.startup_wait_ms",
                self.repair.startup_wait_ms,
                0,
                60_000,
            ),
            (
                "database.max_connections",
                u64::from(self.database.max_connections),
                1,
                u64::MAX,
            ),
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "database.statement_timeout_ms",
                self.database.statement_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.batch_size",
                self.persister.batch_size as u64,
                1,
                u64::MAX,
            ),
            (
                "persister.flush_interval_ms",
                self.persister.flush_interval_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.backoff_min_ms",
                self.persister.backoff_min_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.backoff_max_ms",
                self.persister.backoff_max_ms,
                self.persister.backoff_min_ms,
                HOUR_MS,
            ),
            (
                "persister.batch_refresh_ms",
                self.persister.batch_refresh_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.probe_interval_ms",
                self.persister.probe_interval_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.write_timeout_ms",
                self.persister.write_timeout_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.sweep_interval_ms",
                self.persister.sweep_interval_ms,
                1,
                HOUR_MS,
            ),
            (
                "persister.dormant_after_ms",
                self.persister.dormant_after_ms,
                1_000,
                7 * 24 * HOUR_MS,
            ),
            (
                "persister.dormant_sweep_ms",
                self.persister.dormant_sweep_ms,
                1,
                24 * HOUR_MS,
            ),
            (
                "stock.initial_fill_percent",
                u64::from(self.stock.initial_fill_percent),
                0,
                100,
            ),
            (
                "stock.refill_divisor",
                u64::from(self.stock.refill_divisor),
                1,
                u64::MAX,
            ),
            (
                "stock.max_refill_rounds",
                u64::from(self.stock.max_refill_rounds),
                1,
                u64::MAX,
            ),
            (
                "stock.transfer_marker_ttl_s",
                self.stock.transfer_marker_ttl_s,
                1,
                u64::MAX,
            ),
            (
                "stock.sweep_interval_ms",
                self.stock.sweep_interval_ms,
                10,
                HOUR_MS,
            ),
            (
                "stock.group_max_claims",
                self.stock.group_max_claims as u64,
                1,
                MAX_GROUP_CLAIMS as u64,
            ),
            (
                "stock.group_max_queue",
                self.stock.group_max_queue as u64,
                1,
                1_000_000,
            ),
            ("stock.group_wait_ms", self.stock.group_wait_ms, 1, 600_000),
            ("cache.refresh_ms", self.cache.refresh_ms, 10, HOUR_MS),
            (
                "limits.max_tracked_keys",
                self.limits.max_tracked_keys as u64,
                1,
                u64::MAX,
            ),
            (
                "limits.max_inflight",
                self.limits.max_inflight as u64,
                1,
                u64::MAX,
            ),
            ("limits.retry_after_s", self.limits.retry_after_s, 1, 86_400),
            (
                "wallet.max_page",
                u64::from(self.wallet.max_page),
                1,
                WALLET_MAX_PAGE,
            ),
            (
                "wallet.recent_max",
                u64::from(self.wallet.recent_max),
                1,
                100_000,
            ),
            ("wallet.cache_ms", self.wallet.cache_ms, 0, HOUR_MS),
            (
                "wallet.cache_entries",
                u64::from(self.wallet.cache_entries),
                1,
                10_000_000,
            ),
            (
                "wallet.cache_max_coupons",
                u64::from(self.wallet.cache_max_coupons),
                1,
                WALLET_MAX_PAGE,
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                let message = match (lo, hi) {
                    (lo, u64::MAX) => format!("must be at least {lo}"),
                    (lo, hi) => format!("must be {lo}..={hi}"),
                };
                return Err(ConfigError::Invalid { key, message });
            }
        }
        if self.wallet.default_page == 0 || self.wallet.default_page > self.wallet.max_page {
            return bad("wallet.default_page", "must be 1..=wallet.max_page");
        }
        let window = self.wallet.recent_window_ms;
        if window != 0 && !(1_000..=7 * 24 * 3_600_000).contains(&window) {
            return bad(
                "wallet.recent_window_ms",
                "must be 0 (off) or 1000..=604800000",
            );
        }
        if self.wallet.cache_ms > 0 && self.wallet.cache_ms >= window {
            return bad(
                "wallet.cache_ms",
                "must be below wallet.recent_window_ms, and 0 when it is 0 (a cached wallet \
                 is corrected by the recent coupons only within that window)",
            );
        }
        let campaign = [
            (
                "catalog.max_product_batches",
                self.catalog.max_product_batches as u64,
                1,
                1_000,
            ),
            (
                "catalog.list_max_page",
                u64::from(self.catalog.list_max_page),
                1,
                WALLET_MAX_PAGE,
            ),
            (
                "catalog.list_default_page",
                u64::from(self.catalog.list_default_page),
                1,
                u64::from(self.catalog.list_max_page),
            ),
            (
                "catalog.list_max_scan",
                u64::from(self.catalog.list_max_scan),
                u64::from(self.catalog.list_max_page),
                100_000,
            ),
            (
                "checkout.max_items",
                self.checkout.max_items as u64,
                1,
                1_000,
            ),
            (
                "checkout.max_coupons",
                u64::from(self.checkout.max_coupons),
                1,
                WALLET_MAX_PAGE,
            ),
        ];
        let g = &self.grants;
        let grants = [
            ("grants.concurrency", g.concurrency as u64, 1, 4_096),
            ("grants.chunk_users", g.chunk_users as u64, 1, 100_000),
            ("grants.max_users", g.max_users, 1, 100_000_000),
            (
                "grants.max_line_bytes",
                g.max_line_bytes as u64,
                160,
                65_536,
            ),
            (
                "grants.max_upload_bytes",
                g.max_upload_bytes,
                1_024,
                1 << 40,
            ),
            (
                "grants.max_json_bytes",
                g.max_json_bytes as u64,
                64,
                1 << 30,
            ),
            ("grants.upload_timeout_ms", g.upload_timeout_ms, 1, HOUR_MS),
            ("grants.lease_ms", g.lease_ms, 100, HOUR_MS),
            ("grants.poll_ms", g.poll_ms, 10, HOUR_MS),
            ("grants.max_attempts", u64::from(g.max_attempts), 1, 100),
            ("grants.backoff_ms", g.backoff_ms, 1, 60_000),
            ("grants.max_errors", g.max_errors as u64, 0, 1_000),
        ];
        for (key, value, lo, hi) in campaign.into_iter().chain(grants) {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("must be {lo}..={hi}"),
                });
            }
        }
        if self.batches.default_shards == 0 || self.batches.default_shards > self.batches.max_shards
        {
            return bad("batches.default_shards", "must be 1..=batches.max_shards");
        }
        if self.redis.ack != Ack::Leader && self.backend != BackendKind::Redis {
            return bad(
                "redis.ack",
                "needs backend = \"redis\" (the embedded keyspace has no replicas)",
            );
        }
        // A shard's claim counter must stay far below one coupon-id epoch (refunds included).
        if !(1..=MAX_STOCK_CEILING).contains(&self.batches.max_stock) {
            return bad("batches.max_stock", "must be 1..=10000000000");
        }
        if !(1..=MAX_BUDGET_CEILING).contains(&self.batches.max_budget) {
            return bad("batches.max_budget", "must be 1..=9007199254740991");
        }
        if !(1..=10_000_000).contains(&self.batches.max_generated_codes) {
            return bad("batches.max_generated_codes", "must be 1..=10000000");
        }
        if !(1..=10_000).contains(&self.batches.codes_chunk) {
            return bad("batches.codes_chunk", "must be 1..=10000");
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.batches.max_codes_json_bytes) {
            return bad("batches.max_codes_json_bytes", "must be 1024..=67108864");
        }
        if !(1024..=1 << 40).contains(&self.batches.max_codes_upload_bytes) {
            return bad("batches.max_codes_upload_bytes", "must be 1024..=2^40");
        }
        // at least a minute after the end: a claim begun before the end may still be
        // refilling its shard (background.rs SETTLED_AFTER_END_MS)
        let after = self.batches.retire_after_ms;
        if after != 0 && !(60_000..=10 * 365 * 86_400_000).contains(&after) {
            return bad(
                "batches.retire_after_ms",
                "must be 0 (never) or 60000..=315360000000 (one minute to ten years)",
            );
        }
        // a transfer's "credited" marker (named by the transfer's id, so no script can list
        // it) is the one key of a batch retirement leaves: it must expire on its own first.
        // The last transfers land at most a minute after the end (as above).
        let marker_ms = self.stock.transfer_marker_ttl_s.saturating_mul(1000);
        if after != 0 && after < marker_ms.saturating_add(60_000) {
            return bad(
                "batches.retire_after_ms",
                "must be at least stock.transfer_marker_ttl_s × 1000 + 60000: a retired \
                 batch's transfer markers must have expired",
            );
        }
        if !(100..=86_400_000).contains(&self.batches.retire_every_ms) {
            return bad("batches.retire_every_ms", "must be 100..=86400000");
        }
        let retention = self.batches.request_id_retention_ms;
        if retention != 0 && !(1_000..=10 * 365 * 86_400_000).contains(&retention) {
            return bad(
                "batches.request_id_retention_ms",
                "must be 0 (until the batch retires) or 1000..=315360000000 (a second to ten \
                 years)",
            );
        }
        if let Err(message) = check_log_level(&self.log.level) {
            return Err(ConfigError::Invalid {
                key: "log.level",
                message,
            });
        }
        if !(0.0..=1.0).contains(&self.log.access_sample) {
            return bad("log.access_sample", "must be 0..=1");
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
    fn replica_acknowledgements_need_the_redis_backend() {
        let err = load(None, env(&[]), &["redis.ack=\"replica\"".into()]).unwrap_err();
        assert!(err.to_string().contains("redis.ack"), "{err}");
        let c = load(
            None,
            env(&[("CLAIMGATE_BACKEND", "redis")]),
            &[
                "redis.ack=\"replica\"".into(),
                "redis.ack_timeout_ms=250".into(),
            ],
        )
        .unwrap();
        assert_eq!((c.redis.ack, c.redis.ack_timeout_ms), (Ack::Replica, 250));
        for bad in [
            "redis.ack_replicas=0",
            "redis.ack_timeout_ms=0",
            "redis.ack=\"all\"",
        ] {
            let err = load(None, env(&[("CLAIMGATE_BACKEND", "redis")]), &[bad.into()]);
            assert!(err.is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn max_budget_stays_exact_in_json_and_lua() {
        for bad in ["0", "-1", "9007199254740992"] {
            let err = load(None, env(&[]), &[format!("batches.max_budget={bad}")]).unwrap_err();
            assert!(err.to_string().contains("batches.max_budget"), "{err}");
        }
        let ok = format!("batches.max_budget={MAX_BUDGET_CEILING}");
        assert_eq!(
            load(None, env(&[]), &[ok]).unwrap().batches.max_budget,
            MAX_BUDGET_CEILING
        );
    }

    #[test]
    fn max_stock_stays_far_below_a_coupon_id_epoch() {
        for bad in ["0", "10000000001"] {
            let err = load(None, env(&[]), &[format!("batches.max_stock={bad}")]).unwrap_err();
            assert!(err.to_string().contains("batches.max_stock"), "{err}");
        }
        let ok = format!("batches.max_stock={MAX_STOCK_CEILING}");
        assert_eq!(
            load(None, env(&[]), &[ok]).unwrap().batches.max_stock,
            MAX_STOCK_CEILING
        );
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
            "catalog",
            "checkout",
            "grants",
            "log",
            "events",
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
            assert!(out.contains(secret::REDACTED), "{out}");
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
        // in a file, a number is a number: refused without echoing it, with its line
        let f = write(
            dir.path(),
            "numeric.toml",
            "[auth]\nadmin_token = 12345678901234567\n",
        );
        let err = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(!err.contains("12345678901234567"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    /// Item 4 of "For the people who run it": a secret of digits given in the environment
    /// (or by --set) is the string it looks like; before, it was read as an integer and
    /// refused.
    #[test]
    fn numeric_looking_secrets_are_accepted_from_env() {
        let c = load(
            None,
            env(&[
                ("CLAIMGATE_AUTH__ADMIN_TOKEN", "12345678901234567"),
                (
                    "CLAIMGATE_AUTH__USER_TOKEN_SECRET",
                    "1234567890123456789012345678901234567890",
                ),
                ("CLAIMGATE_PERSISTER__CONSUMER", "42"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.auth.admin_token.as_ref().map(Secret::expose),
            Some("12345678901234567")
        );
        assert_eq!(
            c.auth.user_token_secret.as_ref().map(Secret::expose),
            Some("1234567890123456789012345678901234567890")
        );
        assert_eq!(c.persister.consumer.as_deref(), Some("42"));
        // a float-looking or boolean-looking one too, and a quoted one is unquoted
        let c = load(
            None,
            env(&[("CLAIMGATE_AUTH__ADMIN_TOKEN", "1e10000000000000000")]),
            &["persister.group=true".into(), "backend=\"redis\"".into()],
        )
        .unwrap();
        assert_eq!(
            c.auth.admin_token.as_ref().map(Secret::expose),
            Some("1e10000000000000000")
        );
        assert_eq!(c.persister.group, "true");
        assert_eq!(c.backend, BackendKind::Redis);
        // numbers still are numbers where the setting takes one
        let err = load(None, env(&[("CLAIMGATE_SERVER__MAX_BODY_BYTES", "x")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_body_bytes") || err.contains("usize"),
            "{err}"
        );
    }

    /// Item 4: DATABASE_URL, REDIS_URL and RUST_LOG are honoured above the file and below
    /// the CLAIMGATE_* variables and the flags.
    #[test]
    fn conventional_variables_sit_between_the_file_and_claimgate_vars() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "c.toml",
            "[database]\nurl = \"sqlite://file.db\"\n[redis]\nurl = \"redis://file:1\"\n[log]\nlevel = \"warn\"\n",
        );
        let conventional = [
            ("DATABASE_URL", "postgres://u:p@conventional/db"),
            ("REDIS_URL", "redis://conventional:6379"),
            ("RUST_LOG", "claimgate=debug,info"),
        ];
        let c = load(Some(&f), env(&conventional), &[]).unwrap();
        assert_eq!(c.database.url, "postgres://u:p@conventional/db");
        assert_eq!(c.redis.url, "redis://conventional:6379");
        assert_eq!(c.log.level, "claimgate=debug,info");
        assert_eq!(c.file.as_deref(), Some(f.as_path()));
        let mut both = conventional.to_vec();
        both.extend([
            ("CLAIMGATE_DATABASE__URL", "sqlite://claimgate-var.db"),
            ("CLAIMGATE_REDIS__URL", "redis://claimgate-var:1"),
            ("CLAIMGATE_LOG__LEVEL", "error"),
        ]);
        let c = load(Some(&f), env(&both), &[]).unwrap();
        assert_eq!(c.database.url, "sqlite://claimgate-var.db");
        assert_eq!(c.redis.url, "redis://claimgate-var:1");
        assert_eq!(c.log.level, "error");
        let c = load(
            Some(&f),
            env(&both),
            &[
                "database.url=\"sqlite://flag.db\"".into(),
                "log.level=debug".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.database.url, "sqlite://flag.db");
        assert_eq!(c.log.level, "debug");
        // without the file, over the defaults
        let c = load(None, env(&conventional[..1]), &[]).unwrap();
        assert_eq!(c.database.url, "postgres://u:p@conventional/db");
    }

    /// Item 1: an invalid level is refused at load, naming the key (and RUST_LOG when it
    /// came from there); before, `verbose` loaded and silently dropped every line.
    #[test]
    fn an_invalid_log_level_is_refused() {
        let err = load(None, env(&[]), &["log.level=verbose".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`log.level`") && err.contains("verbose"),
            "{err}"
        );
        assert!(!err.contains("RUST_LOG"), "{err}");
        let err = load(None, env(&[("RUST_LOG", "loud")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`log.level`") && err.contains("RUST_LOG"),
            "{err}"
        );
        // a valid setting above a bad RUST_LOG wins
        load(
            None,
            env(&[("RUST_LOG", "loud"), ("CLAIMGATE_LOG__LEVEL", "info")]),
            &[],
        )
        .unwrap();
        for (set, key) in [
            ("log.access_sample=1.5", "log.access_sample"),
            ("log.access_sample=-0.1", "log.access_sample"),
        ] {
            let err = load(None, env(&[]), &[set.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{set}: {err}");
        }
        let c = load(
            None,
            env(&[]),
            &["log.access=true".into(), "log.access_sample=0".into()],
        )
        .unwrap();
        assert!(c.log.access && c.log.access_sample == 0.0);
    }

    /// Item 4: a value of the wrong type in the file is reported with its line.
    #[test]
    fn type_errors_in_the_file_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(
            dir.path(),
            "typed.toml",
            "# a comment\n[server]\nhttp2 = true\nmax_body_bytes = \"lots\"\n",
        );
        let err = load(Some(&f), env(&[]), &[]).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("max_body_bytes"), "{err}");
        assert!(err.contains("typed.toml"), "{err}");
        // an override's type error over a good file still names the key
        let f = write(dir.path(), "good.toml", "[server]\nhttp2 = true\n");
        let err = load(Some(&f), env(&[]), &["server.http2=\"maybe\"".into()])
            .unwrap_err()
            .to_string();
        assert!(!err.contains("line"), "{err}");
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
    fn campaign_ranges_are_checked_naming_the_key() {
        for (set, key) in [
            (
                "catalog.max_product_batches=0",
                "catalog.max_product_batches",
            ),
            ("catalog.list_max_page=501", "catalog.list_max_page"),
            ("catalog.list_default_page=101", "catalog.list_default_page"),
            ("catalog.list_max_scan=99", "catalog.list_max_scan"),
            ("checkout.max_items=0", "checkout.max_items"),
            ("checkout.max_items=1001", "checkout.max_items"),
            ("checkout.max_coupons=501", "checkout.max_coupons"),
            ("grants.concurrency=0", "grants.concurrency"),
            ("grants.chunk_users=0", "grants.chunk_users"),
            ("grants.max_users=0", "grants.max_users"),
            ("grants.max_line_bytes=100", "grants.max_line_bytes"),
            ("grants.lease_ms=10", "grants.lease_ms"),
            ("grants.max_attempts=0", "grants.max_attempts"),
        ] {
            let err = load(None, env(&[]), &[set.into()]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
        assert!(load(None, env(&[]), &["checkout.max_items=1000".into()]).is_ok());
    }

    /// Values that modules used to clamp silently (`x.max(1)`, `x.max(10)`, `x.min(100)`)
    /// are rejected at load, naming the key (before, each of these loaded and ran as
    /// something else than configured).
    #[test]
    fn values_once_clamped_are_rejected_naming_the_key() {
        for (set, key) in [
            ("stock.refill_divisor=0", "stock.refill_divisor"),
            ("stock.group_max_claims=0", "stock.group_max_claims"),
            ("stock.group_max_claims=1001", "stock.group_max_claims"),
            ("stock.group_max_queue=0", "stock.group_max_queue"),
            ("stock.group_wait_ms=0", "stock.group_wait_ms"),
            (
                "stock.transfer_marker_ttl_s=0",
                "stock.transfer_marker_ttl_s",
            ),
            ("stock.sweep_interval_ms=1", "stock.sweep_interval_ms"),
            ("cache.refresh_ms=5", "cache.refresh_ms"),
            ("persister.batch_size=0", "persister.batch_size"),
            (
                "persister.flush_interval_ms=0",
                "persister.flush_interval_ms",
            ),
            ("persister.backoff_min_ms=0", "persister.backoff_min_ms"),
            ("persister.backoff_max_ms=50", "persister.backoff_max_ms"),
            ("persister.batch_refresh_ms=0", "persister.batch_refresh_ms"),
            (
                "persister.probe_interval_ms=0",
                "persister.probe_interval_ms",
            ),
            ("persister.write_timeout_ms=0", "persister.write_timeout_ms"),
            (
                "persister.sweep_interval_ms=5",
                "persister.sweep_interval_ms",
            ),
            (
                "persister.dormant_after_ms=10",
                "persister.dormant_after_ms",
            ),
            (
                "persister.dormant_sweep_ms=10",
                "persister.dormant_sweep_ms",
            ),
            ("redis.command_timeout_ms=0", "redis.command_timeout_ms"),
            ("redis.connect_timeout_ms=0", "redis.connect_timeout_ms"),
            ("redis.event_buffer=1", "redis.event_buffer"),
            ("database.max_connections=0", "database.max_connections"),
            (
                "database.connect_timeout_ms=0",
                "database.connect_timeout_ms",
            ),
            (
                "database.statement_timeout_ms=0",
                "database.statement_timeout_ms",
            ),
            ("limits.retry_after_s=0", "limits.retry_after_s"),
            ("wallet.max_page=1000", "wallet.max_page"),
            ("wallet.default_page=0", "wallet.default_page"),
            ("wallet.recent_window_ms=999", "wallet.recent_window_ms"),
            ("wallet.recent_window_ms=0", "wallet.cache_ms"),
            ("wallet.recent_max=0", "wallet.recent_max"),
            ("wallet.cache_ms=600000", "wallet.cache_ms"),
            ("wallet.cache_entries=0", "wallet.cache_entries"),
            ("wallet.cache_max_coupons=501", "wallet.cache_max_coupons"),
        ] {
            let err = load(None, env(&[]), &[set.to_string()])
                .expect_err(set)
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{set}: {err}");
        }
        // the edges themselves load
        for ok in [
            "stock.refill_divisor=1",
            "stock.sweep_interval_ms=10",
            "cache.refresh_ms=10",
            "persister.backoff_max_ms=100",
            "redis.event_buffer=16",
            "wallet.max_page=500",
        ] {
            load(None, env(&[]), &[ok.to_string()]).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // the wallet's read-your-writes off: with its cache off too
        let off = ["wallet.recent_window_ms=0", "wallet.cache_ms=0"].map(String::from);
        load(None, env(&[]), &off).expect("recent window and cache off");
    }

    #[test]
    fn shipped_config_files_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in [
            "config/claimgate.toml",
            "config/redis.toml",
            "config/cluster.toml",
        ] {
            load(Some(&root.join(f)), env(&[]), &[]).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
}
