//! The connection settings of the three stores: Redis (`[redis]`), the embedded keyspace
//! (`[embedded]`) and the database (`[database]`).
//!
//! Invariant kept here: a URL's password never reaches `Debug` or a serialized dump (both
//! redact it, see [`super::secret`]).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::secret::redact_url;

/// `[redis]` section of the config. Its password (in `url`) never reaches `Debug` or a
/// serialized dump: both redact it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; with `cluster = true`, any node of the
    /// cluster.
    #[serde(serialize_with = "super::secret::serialize_url")]
    pub url: String,
    /// Connect to a Redis Cluster (`redis-cluster://` URLs imply it too).
    pub cluster: bool,
    /// Connections in the pool (each multiplexes many in-flight commands).
    pub pool_size: usize,
    /// Upper bound on one script call, including a NOSCRIPT reload.
    pub command_timeout_ms: u64,
    /// Upper bound on establishing a connection.
    pub connect_timeout_ms: u64,
    /// Capacity of the in-process event fan-out (pub/sub messages buffered per subscriber).
    pub event_buffer: usize,
    /// When a claim is acknowledged: once the primary ran the script (`leader`), or once
    /// `ack_replicas` replicas hold it too (`replica`: `WAIT`; `replica_aof`: `WAITAOF`,
    /// Redis 7.2+, in their append-only files).
    pub ack: Ack,
    /// Replicas that must confirm a claim in the `replica` modes.
    pub ack_replicas: u32,
    /// How long a claim waits for them; past it the answer is 503 `not_replicated` (retry
    /// with the same request id: the claim is on the primary and replays once confirmed).
    pub ack_timeout_ms: u64,
}

/// When a claim is acknowledged (`redis.ack`). What each mode guarantees is in the
/// README's "Scaling out".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ack {
    /// Once the primary ran the script: a failover to a replica that lagged can lose the
    /// last claims acknowledged (detected and repaired, never re-minted).
    #[default]
    Leader,
    /// Once `ack_replicas` replicas received the write (`WAIT`).
    Replica,
    /// Once `ack_replicas` replicas wrote it to their append-only file (`WAITAOF`, Redis
    /// 7.2+; the gateway refuses to start against an older server).
    ReplicaAof,
}

impl Ack {
    pub fn as_str(self) -> &'static str {
        match self {
            Ack::Leader => "leader",
            Ack::Replica => "replica",
            Ack::ReplicaAof => "replica_aof",
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_string(),
            cluster: false,
            pool_size: 4,
            command_timeout_ms: 1000,
            connect_timeout_ms: 2000,
            event_buffer: 1024,
            ack: Ack::Leader,
            ack_replicas: 1,
            ack_timeout_ms: 100,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let RedisConfig {
            url,
            cluster,
            pool_size,
            command_timeout_ms,
            connect_timeout_ms,
            event_buffer,
            ack,
            ack_replicas,
            ack_timeout_ms,
        } = self;
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(url))
            .field("cluster", cluster)
            .field("pool_size", pool_size)
            .field("command_timeout_ms", command_timeout_ms)
            .field("connect_timeout_ms", connect_timeout_ms)
            .field("event_buffer", event_buffer)
            .field("ack", ack)
            .field("ack_replicas", ack_replicas)
            .field("ack_timeout_ms", ack_timeout_ms)
            .finish()
    }
}

/// When the append-only file is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Before every reply (group commit: one fsync serves every waiting script).
    Always,
    /// Once a second in the background; a reply is in the OS page cache (survives a
    /// process kill, not a power loss of the last second).
    #[default]
    Everysec,
    /// Left to the OS.
    No,
}

/// Where the built-in configuration keeps the append-only file (relative to the working
/// directory), as `config/claimgate.toml` does.
pub const DEFAULT_AOF_PATH: &str = "data/claimgate.aof";

/// `[embedded]` section of the config. The default is durable: an append-only file at
/// [`DEFAULT_AOF_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Append-only file; `None` (`aof_path = ""` in TOML) = purely in memory: the keyspace
    /// is lost on exit, so batches read as lost until `claimgate rebuild` and acknowledged
    /// claims not yet in the database are lost with a crash. Tests and benchmarks only.
    #[serde(
        serialize_with = "serialize_aof_path",
        deserialize_with = "deserialize_aof_path"
    )]
    pub aof_path: Option<PathBuf>,
    pub fsync: Fsync,
    /// Lua VMs kept ready; 0 = number of CPUs. More are built on demand under load.
    pub lua_vms: usize,
    /// The log is rewritten in the background once it is this big and has doubled since
    /// the last rewrite.
    pub aof_rewrite_min_bytes: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            aof_path: Some(PathBuf::from(DEFAULT_AOF_PATH)),
            fsync: Fsync::Everysec,
            lua_vms: 0,
            aof_rewrite_min_bytes: 64 << 20,
        }
    }
}

impl EmbeddedConfig {
    /// The defaults without an append-only file: nothing survives the process (tests).
    pub fn in_memory() -> EmbeddedConfig {
        EmbeddedConfig {
            aof_path: None,
            ..EmbeddedConfig::default()
        }
    }
}

/// `None` is written as `""` (TOML has no null, and leaving the key out would mean the
/// default file), so a dumped in-memory configuration loads back as in-memory.
fn serialize_aof_path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => p.serialize(s),
        None => s.serialize_str(""),
    }
}

/// `""` is `None` (in memory).
fn deserialize_aof_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = PathBuf::deserialize(d)?;
    Ok((!p.as_os_str().is_empty()).then_some(p))
}

/// `[database]` section of the configuration. Its password (in `url`) never reaches
/// `Debug` or a serialized dump: both redact it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:pass@host:port/db` or `sqlite://path?mode=rwc`.
    #[serde(serialize_with = "super::secret::serialize_url")]
    pub url: String,
    pub max_connections: u32,
    /// Longest wait for a connection (connect included), milliseconds.
    pub connect_timeout_ms: u64,
    /// PostgreSQL `statement_timeout`; on SQLite the busy timeout (wait for the write lock).
    pub statement_timeout_ms: u64,
}

/// The built-in database, as in `config/claimgate.toml`: SQLite under `data/`.
impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://data/claimgate.db?mode=rwc".to_string(),
            max_connections: 4,
            connect_timeout_ms: 5_000,
            statement_timeout_ms: 5_000,
        }
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field cannot be forgotten here.
        let DatabaseConfig {
            url,
            max_connections,
            connect_timeout_ms,
            statement_timeout_ms,
        } = self;
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(url))
            .field("max_connections", max_connections)
            .field("connect_timeout_ms", connect_timeout_ms)
            .field("statement_timeout_ms", statement_timeout_ms)
            .finish()
    }
}
