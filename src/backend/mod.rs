//! Script backends: the one place claimgate talks to its keyspace, as raw script calls.
//!
//! Every stateful operation is one of the Lua scripts in `lua/` ([`Script`], the registry
//! of their texts), run atomically against keys of a single hash slot. Two backends run the
//! very same script text: [`redis`] (fred, against a real Redis or Redis Cluster) and
//! [`embedded`] (mlua, in process). What a script's KEYS, ARGV and reply mean is not this
//! layer's business: `crate::contract` holds one typed module per script, and only it
//! calls [`Backend::eval`].
//!
//! Invariant kept here: callers cannot run anything but a registered script, so both
//! backends are driven through exactly the same operations and stay interchangeable.

pub mod embedded;
pub mod redis;
mod script;

pub use self::script::Script;

use std::future::Future;

use bytes::Bytes;
use thiserror::Error;

use crate::config::Ack;

/// A reply, converted the way Redis converts Lua values: `nil`/`false` -> `Nil`,
/// numbers truncated to integers, `true` -> `Int(1)`, tables -> arrays (up to the first nil),
/// `{ok=...}` -> `Status`. `{err=...}` replies become [`BackendError::Script`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Bulk(Bytes),
    Status(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Bulk(b) => std::str::from_utf8(b).ok(),
            Value::Status(s) => Some(s),
            _ => None,
        }
    }

    pub fn into_array(self) -> Option<Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The backend cannot be reached or did not answer in time. Fail closed: nothing claimed.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The script itself answered with an error reply.
    #[error("script error: {0}")]
    Script(String),
    /// The reply did not have the shape the script's header promises.
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// The write is on the primary, but fewer replicas than `redis.ack_replicas` confirmed
    /// it within `redis.ack_timeout_ms`. Repeating the call with the same request id is safe
    /// (it replays) and is confirmed once the replicas catch up.
    #[error("not confirmed by replicas: {acked} of {wanted}")]
    NotReplicated { acked: u32, wanted: u32 },
}

/// A backend event broadcast to every gateway instance (Redis pub/sub channel
/// [`EVENTS_CHANNEL`]; an in-process broadcast for the embedded backend).
pub const EVENTS_CHANNEL: &str = "cg:events";

/// What a backend must do. Implemented by [`redis::RedisBackend`] and
/// [`embedded::EmbeddedBackend`]; everything above this trait is backend-agnostic.
pub trait Backend: Send + Sync + 'static {
    /// Runs `script` atomically with `keys` (all of one hash slot) and `args`.
    fn eval(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
    ) -> impl Future<Output = Result<Value, BackendError>> + Send;

    /// Publishes `message` on [`EVENTS_CHANNEL`] to every instance (this one included).
    fn publish(&self, message: &str) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Messages published on [`EVENTS_CHANNEL`], from now on.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String>;

    /// Reachable, and every script loaded.
    fn ready(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// `"redis"` or `"embedded"`, for metrics and logs.
    fn kind(&self) -> &'static str;

    /// Returns once the acknowledgement rule `ack` (`None`: the deployment's `redis.ack`; a
    /// batch may name its own) holds for every write the node serving `fence` made so far
    /// (a key: in a cluster its slot picks the node). Under `"leader"`, and on the embedded
    /// backend, that is at once. Under the replica modes one connection writes `fence` and
    /// then waits (`WAIT` / `WAITAOF`): the write puts that connection's replication offset
    /// past every earlier write of the node (the claim being confirmed included, whichever
    /// connection made it), so a replay is confirmed as surely as a fresh claim. Too few
    /// replicas in time: [`BackendError::NotReplicated`].
    fn confirm(
        &self,
        fence: &str,
        ack: Option<Ack>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = (fence, ack);
        async { Ok(()) }
    }

    /// Whether a batch may ask for `ack` here (checked when it is created): the embedded
    /// backend has no replicas, and `replica_aof` needs a server with `WAITAOF`.
    fn supports_ack(&self, ack: Ack) -> bool {
        ack == Ack::Leader
    }

    /// Makes everything acknowledged so far durable (graceful shutdown). Redis persists on
    /// its own; the embedded backend syncs its append-only log.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        async { Ok(()) }
    }
}

/// Backend call metrics, shared by both backends.
pub(crate) fn record(
    script: Script,
    started: std::time::Instant,
    result: &Result<Value, BackendError>,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(BackendError::Script(_)) => "script_error",
        Err(BackendError::Unavailable(_)) => "unavailable",
        Err(BackendError::Protocol(_)) => "protocol",
        // only `confirm` answers this, never a script call
        Err(BackendError::NotReplicated { .. }) => "unavailable",
    };
    crate::obs::events::BackendCalled {
        script: script.name(),
        result: outcome,
        seconds: started.elapsed().as_secs_f64(),
    }
    .emit();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `script` label set of the backend metrics is exactly the registry's names.
    #[test]
    fn the_script_labels_are_the_registry() {
        let names: Vec<&str> = Script::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names, crate::obs::metrics::SCRIPTS);
    }
}
