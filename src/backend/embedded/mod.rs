//! The `embedded` backend (the default): the very same `lua/*.lua` scripts, run in process
//! under mlua (Lua 5.1, as in Redis) against an in-memory keyspace that implements the
//! `redis.call` subset the scripts use, made durable by an append-only effects log.
//!
//! Invariant kept here: a script is atomic and isolated exactly as in Redis Cluster: all its
//! keys hash to one slot (else `CROSSSLOT`), it runs holding that slot's lock from start to
//! end (scripts on other slots run in parallel), writes made before an error are kept, and
//! its reply is released only after its effects reached the log (see `aof.rs`).
//!
//! Layout: [`slot`] (key -> slot), [`keyspace`] (data and recorded primitive mutations),
//! [`commands`] (the command subset), [`lua`] (VMs, pool, conversions), [`aof`] (the log).

mod aof;
mod commands;
mod keyspace;
mod lua;
mod slot;

#[cfg(test)]
mod difftest;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};
use thiserror::Error;
use tokio::sync::broadcast;

use self::aof::Aof;
use self::keyspace::{Keyspace, Recorder};
use self::lua::{Code, VmPool};
pub use self::slot::key_slot;
use crate::backend::{Backend, BackendError, Script, Value};
use crate::config::{EmbeddedConfig, Fsync};

#[derive(Debug, Error)]
pub enum EmbeddedError {
    #[error("append-only file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("append-only file {} is damaged at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("append-only file {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("lua: {0}")]
    Lua(String),
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often the maintenance thread sweeps expired keys and checks for a rewrite.
const MAINTENANCE_TICK: Duration = Duration::from_millis(100);
/// Slots swept per tick (a full pass every 1.6 s).
const SWEEP_SLOTS_PER_TICK: usize = 1024;

/// Stop signal for the background threads.
#[derive(Default)]
struct Stopper {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stopper {
    /// Sleeps up to `d`; true once stopped.
    fn sleep(&self, d: Duration) -> bool {
        let mut s = self.stopped.lock();
        if !*s {
            self.cv.wait_for(&mut s, d);
        }
        *s
    }

    fn stop(&self) {
        *self.stopped.lock() = true;
        self.cv.notify_all();
    }
}

/// The embedded backend. Cheap to share behind an `Arc`; dropping it stops its background
/// threads and flushes the log.
pub struct EmbeddedBackend {
    keyspace: Arc<Keyspace>,
    pool: VmPool,
    aof: Option<Arc<Aof>>,
    events: broadcast::Sender<String>,
    stopper: Arc<Stopper>,
    threads: Vec<JoinHandle<()>>,
    /// Held for the backend's life so two processes never append to the same log.
    _lock: Option<File>,
}

impl EmbeddedBackend {
    /// Opens the backend: loads and replays the log (dropping a torn tail), rewrites it
    /// compactly, and starts the fsync and maintenance threads.
    pub fn open(cfg: &EmbeddedConfig) -> Result<EmbeddedBackend, EmbeddedError> {
        let keyspace = Arc::new(Keyspace::new());
        let mut lock = None;
        let aof = match &cfg.aof_path {
            None => None,
            Some(path) => {
                lock = Some(lock_file(path)?);
                let stats = aof::load(path, &keyspace)?;
                let aof = Arc::new(Aof::open(path, cfg.fsync)?);
                if let Some(stats) = stats {
                    if let Some(at) = stats.torn_at {
                        tracing::warn!(path = %path.display(), offset = at, dropped = stats.bytes - at,
                            "append-only file ended with a torn record (crash mid-write); dropped it");
                    }
                    tracing::info!(path = %path.display(), records = stats.records, bytes = stats.bytes,
                        "append-only file loaded");
                    if stats.bytes != aof::MAGIC.len() as u64 {
                        aof.rewrite(&keyspace)?;
                    }
                }
                Some(aof)
            }
        };
        let vms = match cfg.lua_vms {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let pool = VmPool::new(vms, keyspace.clone(), aof.is_some())
            .map_err(|e| EmbeddedError::Lua(e.to_string()))?;
        let (events, _) = broadcast::channel(1024);
        // Built before its threads start, so an error below stops the ones already running.
        let mut backend = EmbeddedBackend {
            keyspace,
            pool,
            aof,
            events,
            stopper: Arc::new(Stopper::default()),
            threads: Vec::new(),
            _lock: lock,
        };
        let spawn_err = |e: std::io::Error| EmbeddedError::Io {
            path: PathBuf::from("<background thread>"),
            source: e,
        };
        if let Some(aof) = &backend.aof
            && aof.fsync_policy() != Fsync::No
        {
            let aof = aof.clone();
            let t = std::thread::Builder::new()
                .name("cg-aof-fsync".into())
                .spawn(move || aof.run_syncer())
                .map_err(spawn_err)?;
            backend.threads.push(t);
        }
        let (ks, aof, stop) = (
            backend.keyspace.clone(),
            backend.aof.clone(),
            backend.stopper.clone(),
        );
        let min = cfg.aof_rewrite_min_bytes;
        let t = std::thread::Builder::new()
            .name("cg-embedded-maint".into())
            .spawn(move || maintenance(&ks, aof.as_deref(), min, &stop))
            .map_err(spawn_err)?;
        backend.threads.push(t);
        Ok(backend)
    }

    /// Scripts' `TIME` answers from `clock` from now on (tests: a claim at any instant, e.g.
    /// both sides of a batch's local midnight, without sleeping). Key expiry keeps the
    /// system clock.
    pub fn set_clock(&self, clock: Arc<dyn crate::domain::time::Clock>) {
        self.keyspace.set_clock(clock);
    }

    /// Every live key starting with `prefix`, sorted (as `SCAN MATCH <prefix>*` would list
    /// them on Redis): what an operator or a test inspects, e.g. that a retired batch left
    /// no key behind.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let (secs, micros) = self.keyspace.time();
        let now = secs.saturating_mul(1000) + u64::from(micros / 1000);
        let mut keys: Vec<String> = self
            .keyspace
            .keys_with_prefix(prefix.as_bytes(), now)
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect();
        keys.sort();
        keys
    }

    /// Writes and fsyncs everything logged so far (graceful shutdown).
    pub fn flush(&self) -> Result<(), EmbeddedError> {
        match &self.aof {
            Some(aof) => aof.flush().map_err(|source| EmbeddedError::Io {
                path: aof.path().to_path_buf(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Rewrites the log now (normally done in the background); no-op without a log.
    pub fn rewrite_aof(&self) -> Result<(), EmbeddedError> {
        match &self.aof {
            Some(aof) => aof.rewrite(&self.keyspace).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Runs a script synchronously: everything but waiting for durability.
    fn run(
        &self,
        code: Code<'_>,
        keys: &[&str],
        args: &[&str],
    ) -> Result<lua::Outcome, BackendError> {
        if self.aof.as_ref().is_some_and(|a| a.failed()) {
            return Err(BackendError::Unavailable(
                "append-only file failed; refusing scripts".into(),
            ));
        }
        let slot = match keys.split_first() {
            None => None,
            Some((first, rest)) => {
                let s = key_slot(first.as_bytes());
                if rest.iter().any(|k| key_slot(k.as_bytes()) != s) {
                    return Err(BackendError::Script(
                        "CROSSSLOT Keys in request don't hash to the same slot".into(),
                    ));
                }
                Some(s)
            }
        };
        let vm = self
            .pool
            .get()
            .map_err(|e| BackendError::Unavailable(format!("lua vm: {e}")))?;
        Ok(vm.run(code, slot, keys, args, self.aof.as_deref()))
    }

    /// Runs a script's source (crate tests only: they use it to play a Redis failure, such as
    /// a claim counter rolled back, that no script of `lua/` can cause).
    #[cfg(test)]
    pub(crate) async fn eval_source(
        &self,
        src: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, BackendError> {
        self.eval_code(Code::Source(src), keys, args).await
    }

    /// Runs `code` and waits until its reply may be released.
    async fn eval_code(
        &self,
        code: Code<'_>,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, BackendError> {
        let outcome = self.run(code, keys, args)?;
        if let (Some(aof), Some(end)) = (&self.aof, outcome.aof_end) {
            aof.commit(end).await?;
        }
        outcome.reply
    }
}

impl Drop for EmbeddedBackend {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(aof) = &self.aof {
            aof.stop();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(aof) = &self.aof
            && !aof.failed()
            && let Err(e) = aof.flush()
        {
            tracing::error!(error = %e, "append-only file: final flush failed");
        }
    }
}

impl Backend for EmbeddedBackend {
    async fn eval(
        &self,
        script: Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Value, BackendError> {
        let started = std::time::Instant::now();
        let result = self.eval_code(Code::Known(script), keys, args).await;
        super::record(script, started, &result);
        result
    }

    async fn publish(&self, message: &str) -> Result<(), BackendError> {
        // No subscriber is not an error: nobody is listening in this process yet.
        let _ = self.events.send(message.to_owned());
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    async fn ready(&self) -> Result<(), BackendError> {
        match &self.aof {
            Some(a) if a.failed() => {
                Err(BackendError::Unavailable("append-only file failed".into()))
            }
            _ => Ok(()),
        }
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }
}

/// Takes the exclusive lock `<aof>.lock` next to the log (creating the directory: a fresh
/// checkout has no `data/` yet).
fn lock_file(path: &Path) -> Result<File, EmbeddedError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| EmbeddedError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let mut p = path.as_os_str().to_owned();
    p.push(".lock");
    let lock_path = PathBuf::from(p);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| EmbeddedError::Io {
            path: lock_path.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(EmbeddedError::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(EmbeddedError::Io {
            path: lock_path,
            source,
        }),
    }
}

/// Background upkeep: deletes expired keys (logging the deletions like Redis propagates
/// them), pushes sweep records to the file, and rewrites the log when it has grown.
fn maintenance(ks: &Keyspace, aof: Option<&Aof>, rewrite_min: u64, stop: &Stopper) {
    let mut next = 0usize;
    let mut rec = Recorder::new(aof.is_some());
    while !stop.sleep(MAINTENANCE_TICK) {
        let now = now_ms();
        for _ in 0..SWEEP_SLOTS_PER_TICK {
            let slot = &ks.slots()[next];
            next = (next + 1) % ks.slots().len();
            let mut db = slot.lock();
            if db.volatile == 0 {
                continue;
            }
            if db.sweep_expired(now, &mut rec) > 0
                && let Some(aof) = aof
            {
                aof.append(&rec.buf, db.snap_epoch);
            }
            rec.buf.clear();
        }
        let Some(aof) = aof else { continue };
        if aof.failed() {
            continue;
        }
        if let Err(e) = aof.write_through(aof.appended()) {
            tracing::error!(error = %e, "append-only file: background write failed");
            continue;
        }
        if aof.should_rewrite(rewrite_min)
            && let Err(e) = aof.rewrite(ks)
        {
            tracing::error!(error = %e, "append-only file: background rewrite failed");
        }
    }
}
