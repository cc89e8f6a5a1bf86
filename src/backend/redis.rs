//! The `redis` backend: fred against a real Redis (single node or Redis Cluster).
//!
//! Scripts are loaded once (`SCRIPT LOAD`, on every cluster primary) and called by SHA.
//! A `NOSCRIPT` reply (after a restart, a failover or `SCRIPT FLUSH`) reloads the scripts
//! and retries once. Every call is bounded by `command_timeout_ms` through
//! `tokio::time::timeout` (fred's per-call options are not applied to `EVALSHA`).
//! Under `redis.ack = "replica"` / `"replica_aof"` (or a batch's own `ack`),
//! [`Backend::confirm`] writes a per-shard fence key and waits (`WAIT` / `WAITAOF`) on a pool
//! of its own, so a wait that blocks its connection never delays script calls; whether the
//! server has `WAITAOF` (Redis 7.2+) is read at connect: a `replica_aof` deployment refuses
//! to start without it, and a batch cannot ask for it.
//! Invariant kept here: a call on a disconnected client fails at once with
//! [`BackendError::Unavailable`] without being queued, so "503, nothing was claimed" holds for
//! it; a call that timed out after being sent is reported as unavailable too, and callers make
//! such calls safe to repeat with a request id the script records.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::{
    ClientLike, Config, Error as FredError, ErrorKind, EventInterface, KeysInterface, LuaInterface,
    Pool, PubsubInterface, ReconnectPolicy, ServerConfig, Value as FredValue,
};
use fred::types::{Builder, ClusterHash, CustomCommand, InfoKind};
use tokio::sync::broadcast;

use super::{Backend, BackendError, EVENTS_CHANNEL, Script, Value};
use crate::config::secret::redact_text;
use crate::config::{Ack, RedisConfig};
use crate::obs::events::{ReplicaConfirmed, ScriptsReloaded};

/// Scripts with their SHA1, precomputed once.
struct Loaded {
    shas: Vec<(Script, String)>,
}

impl Loaded {
    fn sha(&self, script: Script) -> &str {
        self.shas
            .iter()
            .find(|(s, _)| *s == script)
            .map(|(_, sha)| sha.as_str())
            .unwrap_or_default()
    }
}

/// What a claim waits for in a replica mode (the deployment's `redis.ack`, or a batch's
/// own), on connections of its own.
struct AckPolicy {
    pool: Pool,
    replicas: u32,
    timeout_ms: u64,
    /// The deployment's mode: what a batch without one of its own gets.
    default: Ack,
    /// The server has `WAITAOF` (Redis 7.2+).
    waitaof: bool,
}

impl AckPolicy {
    fn replicas(&self) -> FredValue {
        FredValue::Integer(i64::from(self.replicas))
    }

    /// The configuration bounds it to 60 000 ms.
    fn timeout(&self) -> FredValue {
        FredValue::Integer(i64::try_from(self.timeout_ms).unwrap_or(i64::MAX))
    }

    /// How many replicas confirmed: a write of `fence`, then the wait (`WAITAOF` when
    /// `aof`), pipelined on ONE connection (the wait covers that connection's writes, so the
    /// fence comes first).
    async fn wait(&self, fence: &str, aof: bool) -> Result<u32, BackendError> {
        let client = self.pool.next_connected();
        if !client.is_connected() {
            return Err(BackendError::Unavailable("not connected".into()));
        }
        let pipe = client.pipeline();
        let slot = ClusterHash::Custom(fred::util::redis_keyslot(fence.as_bytes()));
        let (cmd, args): (CustomCommand, Vec<FredValue>) = if aof {
            (
                CustomCommand::new_static("WAITAOF", slot, false),
                vec![FredValue::Integer(0), self.replicas(), self.timeout()],
            )
        } else {
            (
                CustomCommand::new_static("WAIT", slot, false),
                vec![self.replicas(), self.timeout()],
            )
        };
        let queued = async {
            let _: FredValue = pipe.incr(fence).await?;
            let _: FredValue = pipe.custom(cmd, args).await?;
            pipe.all::<Vec<FredValue>>().await
        };
        let replies = queued.await.map_err(|e| classify(&e))?;
        let acked = match replies.get(1) {
            Some(FredValue::Integer(n)) => *n,
            // WAITAOF: [local fsyncs, replica fsyncs]
            Some(FredValue::Array(a)) if a.len() == 2 => a[1].as_i64().unwrap_or(0),
            other => {
                return Err(BackendError::Protocol(format!("wait answered {other:?}")));
            }
        };
        Ok(u32::try_from(acked.max(0)).unwrap_or(u32::MAX))
    }
}

/// `redis_version:7.2.4` in an `INFO server` text: (7, 2).
fn server_version(info: &str) -> Option<(u32, u32)> {
    let v = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let mut parts = v.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub struct RedisBackend {
    pool: Pool,
    ack: AckPolicy,
    scripts: Arc<Loaded>,
    timeout: Duration,
    cluster: bool,
    events: broadcast::Sender<String>,
    _subscriber_task: tokio::task::JoinHandle<()>,
}

fn classify(e: &FredError) -> BackendError {
    match e.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Backpressure
        | ErrorKind::Routing
        | ErrorKind::Cluster
        | ErrorKind::Auth => BackendError::Unavailable(e.to_string()),
        _ if e.details().starts_with("LOADING")
            || e.details().starts_with("MASTERDOWN")
            || e.details().starts_with("CLUSTERDOWN")
            || e.details().starts_with("TRYAGAIN") =>
        {
            BackendError::Unavailable(e.details().to_string())
        }
        // A reply from the server starts with its error code (ERR, NOSCRIPT, WRONGTYPE...);
        // anything else is the client failing to get the command there ("Failed to route
        // command." while reconnecting): unavailable, fail closed.
        _ if is_server_error_reply(e.details()) => BackendError::Script(e.details().to_string()),
        _ => BackendError::Unavailable(e.details().to_string()),
    }
}

/// `ERR ...`, `NOSCRIPT ...`, `WRONGTYPE ...`: an error code of capitals first.
fn is_server_error_reply(details: &str) -> bool {
    let code = details.split(' ').next().unwrap_or("");
    code.len() >= 2 && code.bytes().all(|b| b.is_ascii_uppercase())
}

fn convert(v: FredValue) -> Result<Value, BackendError> {
    Ok(match v {
        FredValue::Null => Value::Nil,
        FredValue::Integer(i) => Value::Int(i),
        FredValue::Boolean(b) => Value::Int(i64::from(b)),
        FredValue::Double(d) => Value::Int(d as i64),
        FredValue::String(s) => Value::Bulk(Bytes::copy_from_slice(s.as_bytes())),
        FredValue::Bytes(b) => Value::Bulk(b),
        FredValue::Array(a) => Value::Array(a.into_iter().map(convert).collect::<Result<_, _>>()?),
        other => {
            return Err(BackendError::Protocol(format!(
                "unexpected reply type {:?}",
                other.kind()
            )));
        }
    })
}

impl RedisBackend {
    /// Connects the pool and a subscriber, and loads every script.
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisBackend, BackendError> {
        let cluster = cfg.cluster || cfg.url.starts_with("redis-cluster://");
        let mut config = if cluster {
            Config::from_url_clustered(&cfg.url)
        } else {
            Config::from_url(&cfg.url)
        }
        .map_err(|e| {
            // The caller names the (redacted) URL; the parser's text might quote it.
            BackendError::Unavailable(format!("bad redis url: {}", redact_text(&e.to_string())))
        })?;
        if cluster && !matches!(config.server, ServerConfig::Clustered { .. }) {
            return Err(BackendError::Unavailable(
                "cluster = true needs a cluster url".to_string(),
            ));
        }
        config.fail_fast = true;
        let timeout = Duration::from_millis(cfg.command_timeout_ms);
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|p| {
                p.default_command_timeout = timeout;
                p.broadcast_channel_capacity = cfg.event_buffer;
            })
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = timeout;
                // One attempt: a command is never silently re-sent after a reconnect;
                // callers repeat it themselves with the same request id.
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2));
        let pool = builder
            .build_pool(cfg.pool_size)
            .map_err(|e| classify(&e))?;
        tokio::time::timeout(connect_timeout, pool.init())
            .await
            .map_err(|_| BackendError::Unavailable("connect timed out".to_string()))?
            .map_err(|e| classify(&e))?;

        let subscriber = builder
            .build_subscriber_client()
            .map_err(|e| classify(&e))?;
        tokio::time::timeout(connect_timeout, subscriber.init())
            .await
            .map_err(|_| BackendError::Unavailable("connect timed out".to_string()))?
            .map_err(|e| classify(&e))?;
        subscriber
            .subscribe(EVENTS_CHANNEL)
            .await
            .map_err(|e| classify(&e))?;
        let _resubscribe = subscriber.manage_subscriptions();
        let (events, _) = broadcast::channel(cfg.event_buffer);
        let tx = events.clone();
        let mut rx = subscriber.message_rx();
        let subscriber_task = tokio::spawn(async move {
            let _keep = subscriber;
            loop {
                match rx.recv().await {
                    Ok(msg) => {
                        if let Ok(s) = msg.value.convert::<String>() {
                            let _ = tx.send(s);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(
                            missed = n,
                            "pub/sub events lagged; periodic refresh covers them"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });

        // The acknowledgement pool exists in every mode: a batch may ask for replica
        // acknowledgements on a `leader` deployment.
        let ack_pool = builder
            .build_pool(cfg.pool_size)
            .map_err(|e| classify(&e))?;
        tokio::time::timeout(connect_timeout, ack_pool.init())
            .await
            .map_err(|_| BackendError::Unavailable("connect timed out".to_string()))?
            .map_err(|e| classify(&e))?;
        let info: String =
            tokio::time::timeout(timeout, ack_pool.next().info(Some(InfoKind::Server)))
                .await
                .map_err(|_| BackendError::Unavailable("INFO timed out".to_string()))?
                .map_err(|e| classify(&e))?;
        let version = server_version(&info);
        let waitaof = version.is_some_and(|v| v >= (7, 2));
        if cfg.ack == Ack::ReplicaAof && !waitaof {
            return Err(BackendError::Unavailable(format!(
                "redis.ack = \"replica_aof\" needs WAITAOF (Redis 7.2 or later); the server \
                 is {}: use ack = \"replica\"",
                version.map_or("of an unknown version".to_string(), |(a, b)| {
                    format!("{a}.{b}")
                })
            )));
        }
        let ack = AckPolicy {
            pool: ack_pool,
            replicas: cfg.ack_replicas,
            timeout_ms: cfg.ack_timeout_ms,
            default: cfg.ack,
            waitaof,
        };
        let backend = RedisBackend {
            pool,
            ack,
            scripts: Arc::new(Loaded {
                shas: Script::ALL.iter().map(|s| (*s, s.sha1())).collect(),
            }),
            timeout,
            cluster,
            events,
            _subscriber_task: subscriber_task,
        };
        backend.load_scripts().await?;
        Ok(backend)
    }

    /// `SCRIPT LOAD` of every script (on every primary of a cluster).
    pub async fn load_scripts(&self) -> Result<(), BackendError> {
        for script in Script::ALL {
            let fut = async {
                let sha: String = if self.cluster {
                    self.pool
                        .next()
                        .script_load_cluster(script.source())
                        .await?
                } else {
                    // every connection of the pool talks to the same server
                    self.pool.next().script_load(script.source()).await?
                };
                Ok::<String, FredError>(sha)
            };
            let sha = tokio::time::timeout(self.timeout, fut)
                .await
                .map_err(|_| BackendError::Unavailable("SCRIPT LOAD timed out".into()))?
                .map_err(|e| classify(&e))?;
            if sha != self.scripts.sha(script) {
                return Err(BackendError::Protocol(format!(
                    "server hashed {} to {sha}",
                    script.name()
                )));
            }
        }
        Ok(())
    }

    async fn evalsha_once(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<FredValue, FredError> {
        let client = self.pool.next_connected();
        if !client.is_connected() {
            return Err(FredError::new(ErrorKind::IO, "not connected"));
        }
        let keys: Vec<&str> = keys.to_vec();
        let args: Vec<&str> = args.to_vec();
        client.evalsha(self.scripts.sha(script), keys, args).await
    }

    async fn eval_inner(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, BackendError> {
        let started = std::time::Instant::now();
        let reply = match self.evalsha_once(script, keys, args).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                ScriptsReloaded {
                    script: script.name(),
                }
                .emit();
                self.load_scripts().await?;
                self.evalsha_once(script, keys, args).await
            }
            other => other,
        };
        let result = reply.map_err(|e| classify(&e)).and_then(convert);
        super::record(script, started, &result);
        result
    }
}

impl Backend for RedisBackend {
    async fn eval(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, BackendError> {
        match tokio::time::timeout(self.timeout, self.eval_inner(script, keys, args)).await {
            Ok(r) => r,
            Err(_) => {
                let r = Err(BackendError::Unavailable(format!(
                    "{} timed out after {:?}",
                    script.name(),
                    self.timeout
                )));
                super::record(script, std::time::Instant::now() - self.timeout, &r);
                r
            }
        }
    }

    async fn publish(&self, message: &str) -> Result<(), BackendError> {
        let fut = self
            .pool
            .next_connected()
            .publish::<i64, _, _>(EVENTS_CHANNEL, message);
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| BackendError::Unavailable("PUBLISH timed out".into()))?
            .map(|_| ())
            .map_err(|e| classify(&e))
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    async fn confirm(&self, fence: &str, ack: Option<Ack>) -> Result<(), BackendError> {
        let mode = ack.unwrap_or(self.ack.default);
        if mode == Ack::Leader {
            return Ok(());
        }
        if mode == Ack::ReplicaAof && !self.ack.waitaof {
            // refused at create (`supports_ack`); a server downgraded since cannot confirm
            return Err(BackendError::Unavailable(
                "the server has no WAITAOF (a batch asks for replica_aof)".into(),
            ));
        }
        let ack = &self.ack;
        let started = std::time::Instant::now();
        // the server's own wait, plus the usual bound for the round trip
        let bound = self.timeout + Duration::from_millis(ack.timeout_ms);
        let aof = mode == Ack::ReplicaAof;
        let result = match tokio::time::timeout(bound, ack.wait(fence, aof)).await {
            Ok(Ok(n)) if n >= ack.replicas => Ok(()),
            Ok(Ok(n)) => Err(BackendError::NotReplicated {
                acked: n,
                wanted: ack.replicas,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BackendError::Unavailable(format!(
                "replica confirmation timed out after {bound:?}"
            ))),
        };
        let (label, detail) = match &result {
            Ok(()) => ("confirmed", String::new()),
            Err(e @ BackendError::NotReplicated { .. }) => ("not_replicated", e.to_string()),
            Err(e) => ("unavailable", e.to_string()),
        };
        ReplicaConfirmed {
            result: label,
            seconds: started.elapsed().as_secs_f64(),
            detail: &detail,
        }
        .emit();
        result
    }

    async fn ready(&self) -> Result<(), BackendError> {
        let client = self.pool.next_connected();
        let fut = client.script_exists::<Vec<bool>, _>(self.scripts.sha(Script::Claim));
        let exists = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| BackendError::Unavailable("SCRIPT EXISTS timed out".into()))?
            .map_err(|e| classify(&e))?;
        if exists.first().copied() == Some(true) {
            Ok(())
        } else {
            self.load_scripts().await
        }
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn supports_ack(&self, ack: Ack) -> bool {
        ack != Ack::ReplicaAof || self.ack.waitaof
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        self._subscriber_task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_version_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.2.4\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(server_version(info), Some((7, 2)));
        assert_eq!(server_version("redis_version:7.0.15"), Some((7, 0)));
        assert_eq!(server_version("nothing"), None);
        assert!(server_version("redis_version:7.0.15").unwrap() < (7, 2));
    }

    #[test]
    fn client_side_failures_are_unavailable_server_replies_are_script_errors() {
        let unknown = |d: &str| classify(&FredError::new(ErrorKind::Unknown, d.to_string()));
        assert!(matches!(
            unknown("Failed to route command."),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            unknown("ERR claim: expects 6 arguments"),
            BackendError::Script(_)
        ));
        assert!(matches!(
            unknown("WRONGTYPE Operation against a key"),
            BackendError::Script(_)
        ));
        assert!(matches!(
            classify(&FredError::new(ErrorKind::IO, "Connection closed.")),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            unknown("LOADING Redis is loading"),
            BackendError::Unavailable(_)
        ));
    }
}
