//! The persister: moves claim records from every shard's log stream in Redis into the
//! database, in every gateway instance, off the request path.
//!
//! Invariant kept here: a claim record leaves Redis only after the database transaction
//! holding it has committed (read with a consumer group -> write idempotently -> ack+delete),
//! so every claim acknowledged to a client ends up in the database exactly once:
//! - a write that fails keeps the records in memory and is retried with exponential backoff
//!   (they are not read again), while the claim path goes on untouched and the backlog grows;
//! - records a crashed instance read but never acked stay pending in the consumer group and
//!   are taken over (XAUTOCLAIM) after `min_idle_ms`; writing them twice is a no-op;
//! - a record that cannot be parsed is never written, never acked and never dropped: it stays
//!   pending (visible in the backlog and lag), is counted in `PERSIST_ERRORS{stage="parse"}`
//!   and logged each time it is redelivered, until an operator repairs it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendError, Script, Value};
use crate::config::PersisterConfig;
use crate::db::{ClaimRecord, Db, DbError, now_ms};
use crate::domain::ids::parse_coupon_id;
use crate::keys::SlotKeys;
use crate::obs::events::{
    BacklogMeasured, CouponConflict, PersistFailed, PersistWritten, RepeatFilter,
};

/// Entry ids per `log_ack.lua` call.
const ACK_CHUNK: usize = 1000;
/// Shortest time a failed ack of committed records is retried before they are left to
/// redelivery (harmless: idempotent). The retry window is `max(min_idle_ms, this)`.
const ACK_RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest pause between polls of a shard whose log was empty.
const IDLE_POLL_MAX: Duration = Duration::from_millis(1000);
/// Reads of a shard that take over pending records at once (min idle 0) after its reader
/// (re)started or a read of it failed: a read whose reply was lost left records pending
/// with this consumer, which would otherwise wait `min_idle_ms` for a takeover.
const RECOVERY_READS: u32 = 3;
/// Same error logged again at most this often (the metric counts every occurrence).
const LOG_REPEAT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum PersistError {
    #[error("redis: {0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("database write timed out after {0:?}")]
    Timeout(Duration),
    #[error("the persister is not running")]
    Stopped,
}

/// Shared, lock-free view of the persister for `/readyz` and operators.
///
/// Backlog and lag are measured by a probe task of their own, so they stay fresh while the
/// persister's loop is blocked (e.g. in a database write waiting for a lock). Whether the
/// persister is stalled is derived from time, not from the loop reporting it: records wait
/// (`buffered` or `backlog` non-zero) and neither a write committed nor a read pass left
/// nothing to write for longer than `persister.stall_ms`.
#[derive(Debug, Default)]
pub struct PersistStatus {
    running: AtomicBool,
    db_ok: AtomicBool,
    backlog: AtomicU64,
    lag_ms: AtomicU64,
    rows: AtomicU64,
    buffered: AtomicU64,
    last_write_ms: AtomicI64,
    /// Last read pass that left nothing to write (or the start), epoch milliseconds.
    caught_up_ms: AtomicI64,
    /// `persister.stall_ms` (0 = never stalled).
    stall_ms: AtomicU64,
    last_error: Mutex<Option<(i64, String)>>,
}

/// A point-in-time copy of [`PersistStatus`], serializable for `/readyz` detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PersistSnapshot {
    pub running: bool,
    pub db_ok: bool,
    /// Claim records in Redis not yet in the database (all shard logs).
    pub backlog: u64,
    /// Age of the oldest record not yet in the database, milliseconds.
    pub lag_ms: u64,
    /// Records read and waiting in memory for their database write.
    pub buffered: u64,
    /// Claims newly written to the database by this instance.
    pub rows_written: u64,
    pub last_write_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    /// Milliseconds since the persister last made progress: a committed write, or a read
    /// pass that left it nothing to write.
    pub since_progress_ms: u64,
    /// Records wait and there was no progress for longer than `persister.stall_ms`.
    pub stalled: bool,
}

impl PersistStatus {
    pub fn running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
    /// The last database write succeeded.
    pub fn db_ok(&self) -> bool {
        self.db_ok.load(Ordering::Relaxed)
    }
    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }
    pub fn lag_ms(&self) -> u64 {
        self.lag_ms.load(Ordering::Relaxed)
    }
    pub fn rows_written(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
    pub fn buffered(&self) -> u64 {
        self.buffered.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().as_ref().map(|(_, e)| e.clone())
    }

    /// Milliseconds since the last progress (see [`PersistSnapshot::since_progress_ms`]).
    pub fn since_progress_ms(&self) -> u64 {
        let last = self
            .last_write_ms
            .load(Ordering::Relaxed)
            .max(self.caught_up_ms.load(Ordering::Relaxed));
        if last <= 0 {
            return 0; // never started
        }
        u64::try_from(now_ms() - last).unwrap_or(0)
    }

    /// Records wait (read and unwritten, or in the logs) and the persister has made no
    /// progress for longer than `persister.stall_ms`.
    pub fn stalled(&self) -> bool {
        let limit = self.stall_ms.load(Ordering::Relaxed);
        limit > 0
            && self.running()
            && (self.buffered() > 0 || self.backlog() > 0)
            && self.since_progress_ms() > limit
    }

    pub fn snapshot(&self) -> PersistSnapshot {
        let err = self.last_error.lock().clone();
        let last_write = self.last_write_ms.load(Ordering::Relaxed);
        PersistSnapshot {
            since_progress_ms: self.since_progress_ms(),
            stalled: self.stalled(),
            running: self.running(),
            db_ok: self.db_ok(),
            backlog: self.backlog(),
            lag_ms: self.lag_ms(),
            buffered: self.buffered(),
            rows_written: self.rows_written(),
            last_write_ms: (last_write > 0).then_some(last_write),
            last_error_ms: err.as_ref().map(|(t, _)| *t),
            last_error: err.map(|(_, e)| e),
        }
    }

    fn set_error(&self, msg: String) {
        *self.last_error.lock() = Some((now_ms(), msg));
    }

    /// The loop holds nothing to write: it is caught up with what it can read.
    fn caught_up(&self) {
        self.caught_up_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// A shard as the probe task sees it: its keys, and a flag telling the loop it has work.
struct ProbeTarget {
    keys: Arc<SlotKeys>,
    has_work: Arc<AtomicBool>,
}

/// The shards to probe, republished by the loop on every batch refresh.
type ProbeTargets = Arc<Mutex<Arc<Vec<ProbeTarget>>>>;

/// Measures backlog (total log length) and lag (age of the oldest entry) of every shard,
/// every `probe_interval_ms`, in a task of its own: a blocked database write cannot freeze
/// the figures `/readyz` and the metrics show.
struct Prober<B> {
    backend: Arc<B>,
    status: Arc<PersistStatus>,
    targets: ProbeTargets,
    interval: Duration,
    shutdown: CancellationToken,
    log_filter: RepeatFilter,
}

impl<B: Backend> Prober<B> {
    async fn run(mut self) {
        loop {
            self.probe().await;
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn probe(&mut self) {
        let targets = self.targets.lock().clone();
        let mut backlog = 0u64;
        let mut oldest: Option<i64> = None;
        for t in targets.iter() {
            let reply = match self
                .backend
                .eval(Script::Probe, &t.keys.probe_keys(), &[])
                .await
            {
                Ok(r) => r,
                Err(e) => return self.note_error(e.to_string()),
            };
            let Some(parts) = reply.into_array() else {
                return self.note_error("probe: not an array".to_string());
            };
            let len = parts
                .get(3)
                .and_then(Value::as_int)
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0);
            backlog += len;
            if let Some(ms) = parts.get(4).and_then(Value::as_str).and_then(stream_id_ms) {
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
            if len > 0 {
                t.has_work.store(true, Ordering::Relaxed); // poll it on the next pass
            }
        }
        let lag_ms = oldest.map_or(0, |o| u64::try_from(now_ms() - o).unwrap_or(0));
        self.status.backlog.store(backlog, Ordering::Relaxed);
        self.status.lag_ms.store(lag_ms, Ordering::Relaxed);
        BacklogMeasured { backlog, lag_ms }.emit();
    }

    fn note_error(&mut self, msg: String) {
        PersistFailed {
            stage: "probe",
            message: &msg,
        }
        .emit(&mut self.log_filter);
        self.status.set_error(format!("probe: {msg}"));
    }
}

/// One entry of a shard's claim log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl LogEntry {
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads up to `count` entries of a shard log for `consumer` (`lua/log_read.lua`): entries
/// pending with any consumer for `min_idle_ms` first, then new ones.
pub async fn read_log<B: Backend>(
    backend: &B,
    log_key: &str,
    group: &str,
    consumer: &str,
    count: usize,
    min_idle_ms: u64,
) -> Result<Vec<LogEntry>, PersistError> {
    let count = count.max(1).to_string();
    let idle = min_idle_ms.to_string();
    let reply = backend
        .eval(
            Script::LogRead,
            &[log_key],
            &[group, consumer, &count, &idle],
        )
        .await?;
    Ok(parse_entries(reply)?)
}

/// Acknowledges and deletes persisted entries (`lua/log_ack.lua`). Returns how many were
/// removed.
pub async fn ack_log<B: Backend>(
    backend: &B,
    log_key: &str,
    group: &str,
    ids: &[String],
) -> Result<u64, PersistError> {
    let mut removed = 0;
    for chunk in ids.chunks(ACK_CHUNK) {
        let mut args: Vec<&str> = Vec::with_capacity(chunk.len() + 1);
        args.push(group);
        args.extend(chunk.iter().map(String::as_str));
        let reply = backend.eval(Script::LogAck, &[log_key], &args).await?;
        removed += reply
            .as_int()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| BackendError::Protocol(format!("log_ack returned {reply:?}")))?;
    }
    Ok(removed)
}

fn parse_entries(reply: Value) -> Result<Vec<LogEntry>, BackendError> {
    let bad = |what: &str| BackendError::Protocol(format!("log_read: {what}"));
    let entries = match reply {
        Value::Array(a) => a,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(bad(&format!("expected an array, got {other:?}"))),
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let mut parts = e.into_array().ok_or_else(|| bad("entry is not an array"))?;
        if parts.len() != 2 {
            return Err(bad("entry is not [id, fields]"));
        }
        let fields = parts.pop().unwrap_or(Value::Nil);
        let id = parts
            .pop()
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad("entry id is not a string"))?;
        let flat = match fields {
            Value::Array(a) => a,
            // An entry deleted while pending: nothing to persist, but keep its id.
            Value::Nil => Vec::new(),
            _ => return Err(bad("entry fields are not an array")),
        };
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(f), Some(v)) = (it.next(), it.next()) {
            match (f.as_str(), v.as_str()) {
                (Some(f), Some(v)) => pairs.push((f.to_string(), v.to_string())),
                _ => return Err(bad("entry field is not a string")),
            }
        }
        out.push(LogEntry { id, fields: pairs });
    }
    Ok(out)
}

/// Interprets a log entry of shard `shard` of `batch` as a claim record (fields written by
/// `lua/claim.lua`). Anything unexpected is an error naming what is wrong.
pub fn parse_claim(batch: &str, shard: u32, entry: &LogEntry) -> Result<ClaimRecord, String> {
    let field = |f: &str| entry.get(f).ok_or_else(|| format!("missing field {f:?}"));
    let int = |f: &str| -> Result<i64, String> {
        let v = field(f)?;
        v.parse::<i64>()
            .map_err(|_| format!("field {f:?} is not an integer: {v:?}"))
    };
    let kind = field("k")?;
    if kind != "claimed" {
        return Err(format!("unknown record kind {kind:?}"));
    }
    let coupon = field("c")?;
    let (cb, cs, seq) =
        parse_coupon_id(coupon).ok_or_else(|| format!("bad coupon id {coupon:?}"))?;
    let b = field("b")?;
    let s = field("s")?;
    if cb != batch || b != batch || s != shard.to_string() || cs != shard {
        return Err(format!(
            "record of batch {b:?} shard {s:?} (coupon {coupon:?}) in the log of {batch}:{shard}"
        ));
    }
    let user = field("u")?;
    if user.is_empty() {
        return Err("empty user id".to_string());
    }
    let rid = field("r")?;
    Ok(ClaimRecord {
        coupon_id: coupon.to_string(),
        batch_id: batch.to_string(),
        shard,
        seq,
        user_id: user.to_string(),
        request_id: (!rid.is_empty()).then(|| rid.to_string()),
        claimed_at: int("t")?,
        valid_from: int("vf")?,
        valid_to: int("vt")?,
    })
}

/// Milliseconds part of a stream entry id `<ms>-<seq>`.
fn stream_id_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

/// A coupon id met with a different claim than the one stored (minted twice): the database
/// recorded it in `coupon_conflicts` (and `reconcile` reports it); here it is counted and
/// logged loudly, every one of them. The record itself is acked: it is not lost, and leaving
/// it pending would only stall its shard's log.
fn report_conflicts(conflicts: &[crate::db::CouponConflict]) {
    for c in conflicts {
        CouponConflict {
            coupon: &c.coupon_id,
            batch: &c.batch_id,
            stored_user: &c.stored_user_id,
            stored_request: c.stored_request_id.as_deref().unwrap_or(""),
            stored_claimed_at: c.stored_claimed_at,
            user: &c.user_id,
            request: c.request_id.as_deref().unwrap_or(""),
            claimed_at: c.claimed_at,
        }
        .emit();
    }
}

/// Starts persisters.
pub struct Persister;

impl Persister {
    /// Spawns the persister loop on the current Tokio runtime (nothing runs when
    /// `cfg.enabled` is false). It stops when `shutdown` is cancelled, after writing and
    /// acking what it had read.
    pub fn spawn<B: Backend>(
        backend: Arc<B>,
        db: Db,
        cfg: PersisterConfig,
        shutdown: CancellationToken,
    ) -> PersisterHandle {
        let status = Arc::new(PersistStatus::default());
        let (tx, rx) = mpsc::channel(8);
        if !cfg.enabled {
            return PersisterHandle {
                status,
                commands: tx,
                task: None,
            };
        }
        status.running.store(true, Ordering::Relaxed);
        status.db_ok.store(true, Ordering::Relaxed);
        status.stall_ms.store(cfg.stall_ms, Ordering::Relaxed);
        status.caught_up();
        let targets = ProbeTargets::default();
        tokio::spawn(
            Prober {
                backend: backend.clone(),
                status: status.clone(),
                targets: targets.clone(),
                interval: Duration::from_millis(cfg.probe_interval_ms),
                shutdown: shutdown.clone(),
                log_filter: RepeatFilter::new(LOG_REPEAT),
            }
            .run(),
        );
        let now = Instant::now();
        let worker = Worker {
            consumer: cfg.consumer_name(),
            backoff: Duration::from_millis(cfg.backoff_min_ms),
            read_backoff: Duration::from_millis(cfg.backoff_min_ms),
            backend,
            db,
            cfg,
            status: status.clone(),
            shutdown,
            commands: rx,
            shards: Vec::new(),
            rr: 0,
            next_refresh: now,
            probe_targets: targets,
            buffer: Vec::new(),
            held: HashSet::new(),
            first_buffered: None,
            unacked: Vec::new(),
            pass_error: None,
            grace_deadline: None,
            log_filter: RepeatFilter::new(LOG_REPEAT),
        };
        let task = tokio::spawn(worker.run());
        PersisterHandle {
            status,
            commands: tx,
            task: Some(task),
        }
    }
}

/// Control of a running persister.
pub struct PersisterHandle {
    status: Arc<PersistStatus>,
    commands: mpsc::Sender<Command>,
    task: Option<JoinHandle<()>>,
}

impl PersisterHandle {
    pub fn status(&self) -> Arc<PersistStatus> {
        self.status.clone()
    }

    /// Reads every shard log until nothing is left for this consumer, writes and acks it all;
    /// returns the number of claims newly written. Waits through database retries. For tests
    /// and operator tooling.
    pub async fn flush(&self) -> Result<u64, PersistError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| PersistError::Stopped)?;
        rx.await.map_err(|_| PersistError::Stopped)?
    }

    /// Waits for the loop to end (after its shutdown token was cancelled).
    pub async fn join(self) {
        if let Some(task) = self.task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "persister task failed");
        }
    }
}

enum Command {
    Flush(oneshot::Sender<Result<u64, PersistError>>),
}

struct ShardState {
    batch: Arc<str>,
    shard: u32,
    keys: Arc<SlotKeys>,
    /// Set by the probe task when the shard's log holds entries: poll it on the next pass.
    has_work: Arc<AtomicBool>,
    log: Arc<str>,
    next_poll: Instant,
    idle_streak: u32,
    /// Recovery reads left (see [`RECOVERY_READS`]).
    recover: u32,
}

struct Buffered {
    log: Arc<str>,
    id: String,
    record: ClaimRecord,
}

struct Unacked {
    log: Arc<str>,
    ids: Vec<String>,
    since: Instant,
    next_try: Instant,
    delay: Duration,
}

struct Worker<B> {
    backend: Arc<B>,
    db: Db,
    cfg: PersisterConfig,
    consumer: String,
    status: Arc<PersistStatus>,
    shutdown: CancellationToken,
    commands: mpsc::Receiver<Command>,
    shards: Vec<ShardState>,
    /// Round-robin start of the next read pass.
    rr: usize,
    next_refresh: Instant,
    /// The shard list shared with the probe task.
    probe_targets: ProbeTargets,
    /// Records read, not yet committed: kept across failed writes (never re-read).
    buffer: Vec<Buffered>,
    /// (log, entry id) of the buffer, so a redelivery while buffered is not taken twice.
    held: HashSet<(Arc<str>, String)>,
    first_buffered: Option<Instant>,
    /// Committed records whose ack failed, retried a few times.
    unacked: Vec<Unacked>,
    /// Database retry delay (exponential).
    backoff: Duration,
    /// Redis retry delay (exponential) after a failed read pass.
    read_backoff: Duration,
    /// The backend error that cut the last read pass short.
    pass_error: Option<BackendError>,
    grace_deadline: Option<Instant>,
    log_filter: RepeatFilter,
}

impl<B: Backend> Worker<B> {
    async fn run(mut self) {
        tracing::info!(consumer = %self.consumer, group = %self.cfg.group, "persister started");
        let flush_interval = Duration::from_millis(self.cfg.flush_interval_ms);
        while !self.shutdown.is_cancelled() {
            self.maybe_refresh().await;
            self.retry_acks(false).await;
            while let Ok(cmd) = self.commands.try_recv() {
                self.handle(cmd).await;
            }
            let got = self.read_pass(false).await;
            let full = self.buffer.len() >= self.cfg.batch_size;
            let waited = self.first_buffered.map(|t| t.elapsed()).unwrap_or_default();
            if !self.buffer.is_empty() && (full || waited >= flush_interval) {
                // A failure leaves the records buffered; the next iteration retries.
                let _ = self.write_buffer().await;
                continue;
            }
            if got > 0 {
                continue; // more may be waiting: read again before sleeping
            }
            let wait = if let Some(e) = self.pass_error.take() {
                tracing::debug!(error = %e, "read pass failed; backing off");
                let w = self.read_backoff;
                self.read_backoff = (self.read_backoff * 2).min(self.backoff_max());
                w
            } else {
                self.read_backoff = self.backoff_min();
                if self.buffer.is_empty() {
                    flush_interval
                } else {
                    flush_interval
                        .saturating_sub(waited)
                        .max(Duration::from_millis(1))
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                cmd = self.commands.recv() => {
                    if let Some(cmd) = cmd {
                        self.handle(cmd).await;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Shutdown: the gateway has stopped taking claims, so drain what the logs still
        // hold (every shard, no idle polling), bounded by the grace period; what is left
        // stays pending in Redis for the next instance.
        let deadline = Instant::now() + Duration::from_millis(self.cfg.shutdown_grace_ms);
        self.next_refresh = Instant::now(); // batches created since the last refresh too
        self.maybe_refresh().await;
        loop {
            let got = self.read_pass(true).await;
            if !self.buffer.is_empty()
                && let Err(e) = self.write_buffer().await
            {
                tracing::warn!(error = %e, left = self.buffer.len(),
                    "persister stopping with unwritten records; they stay pending in Redis");
                break;
            }
            if (got == 0 && self.buffer.is_empty()) || Instant::now() >= deadline {
                break;
            }
        }
        self.retry_acks(true).await;
        self.status.running.store(false, Ordering::Relaxed);
        tracing::info!(consumer = %self.consumer, "persister stopped");
    }

    fn backoff_min(&self) -> Duration {
        Duration::from_millis(self.cfg.backoff_min_ms)
    }

    fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.cfg.backoff_max_ms)
    }

    /// Counts and records an error; logs it unless the same one was logged just now.
    fn note_error(&mut self, stage: &'static str, msg: String) {
        PersistFailed {
            stage,
            message: &msg,
        }
        .emit(&mut self.log_filter);
        self.status.set_error(format!("{stage}: {msg}"));
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Flush(reply) => {
                let result = self.flush_all().await;
                let _ = reply.send(result);
            }
        }
    }

    async fn flush_all(&mut self) -> Result<u64, PersistError> {
        self.next_refresh = Instant::now();
        self.maybe_refresh().await;
        self.retry_acks(true).await;
        let mut total = 0;
        loop {
            let got = self.read_pass(true).await;
            if let Some(e) = self.pass_error.take() {
                return Err(e.into());
            }
            if !self.buffer.is_empty() {
                total += self.write_buffer().await?;
            }
            if got == 0 {
                return Ok(total);
            }
        }
    }

    async fn maybe_refresh(&mut self) {
        let now = Instant::now();
        if now < self.next_refresh {
            return;
        }
        self.next_refresh = now + Duration::from_millis(self.cfg.batch_refresh_ms);
        let batches = match self.db.list_batches().await {
            Ok(b) => {
                self.status.db_ok.store(true, Ordering::Relaxed);
                b
            }
            Err(e) => {
                self.status.db_ok.store(false, Ordering::Relaxed);
                self.note_error("refresh", e.to_string());
                return;
            }
        };
        let mut old: HashMap<(Arc<str>, u32), ShardState> = self
            .shards
            .drain(..)
            .map(|s| ((s.batch.clone(), s.shard), s))
            .collect();
        for b in batches {
            let id: Arc<str> = Arc::from(b.id.as_str());
            for i in 0..b.shards {
                let state = old.remove(&(id.clone(), i)).unwrap_or_else(|| {
                    let keys = SlotKeys::new(&b.id, Some(i));
                    ShardState {
                        batch: id.clone(),
                        shard: i,
                        log: Arc::from(keys.log.as_str()),
                        keys: Arc::new(keys),
                        has_work: Arc::default(),
                        next_poll: now,
                        idle_streak: 0,
                        recover: RECOVERY_READS,
                    }
                });
                self.shards.push(state);
            }
        }
        let targets = self
            .shards
            .iter()
            .map(|s| ProbeTarget {
                keys: s.keys.clone(),
                has_work: s.has_work.clone(),
            })
            .collect();
        *self.probe_targets.lock() = Arc::new(targets);
    }

    /// One round-robin pass over the shards that are due (all with `force`), reading until
    /// the buffer is full. Returns how many new records were buffered.
    async fn read_pass(&mut self, force: bool) -> usize {
        let n = self.shards.len();
        if n == 0 {
            return 0;
        }
        let batch_size = self.cfg.batch_size;
        let now = Instant::now();
        let flush = Duration::from_millis(self.cfg.flush_interval_ms);
        let idle_max = IDLE_POLL_MAX.max(flush);
        let mut got = 0;
        let start = self.rr % n;
        self.rr = (start + 1) % n;
        for k in 0..n {
            let i = (start + k) % n;
            let room = batch_size.saturating_sub(self.buffer.len());
            if room == 0 {
                break;
            }
            let hinted = self.shards[i].has_work.swap(false, Ordering::Relaxed);
            if !force && !hinted && self.shards[i].next_poll > now {
                continue;
            }
            let min_idle = if self.shards[i].recover > 0 {
                0
            } else {
                self.cfg.min_idle_ms
            };
            let result = read_log(
                self.backend.as_ref(),
                &self.shards[i].log,
                &self.cfg.group,
                &self.consumer,
                room,
                min_idle,
            )
            .await;
            let entries = match result {
                Ok(e) => e,
                Err(e) => {
                    self.note_error("read", e.to_string());
                    self.shards[i].next_poll = now + self.backoff_min();
                    self.shards[i].recover = RECOVERY_READS;
                    if let PersistError::Backend(b @ BackendError::Unavailable(_)) = e {
                        self.pass_error = Some(b);
                        break; // Redis is down: do not hammer every shard
                    }
                    continue;
                }
            };
            let s = &mut self.shards[i];
            if s.recover > 0 {
                s.recover = if entries.len() < room {
                    0
                } else {
                    s.recover - 1
                };
            }
            if entries.is_empty() {
                s.idle_streak = s.idle_streak.saturating_add(1);
                let factor = 1u32 << (s.idle_streak.min(8) - 1);
                s.next_poll = now + (flush * factor).min(idle_max);
                continue;
            }
            s.idle_streak = 0;
            s.next_poll = now;
            let (batch, shard, log) = (s.batch.clone(), s.shard, s.log.clone());
            for e in entries {
                let key = (log.clone(), e.id.clone());
                if self.held.contains(&key) {
                    continue;
                }
                if e.fields.is_empty() {
                    // Deleted while pending (already persisted and acked elsewhere).
                    continue;
                }
                match parse_claim(&batch, shard, &e) {
                    Ok(record) => {
                        self.held.insert(key);
                        self.buffer.push(Buffered {
                            log: log.clone(),
                            id: e.id,
                            record,
                        });
                        self.first_buffered.get_or_insert_with(Instant::now);
                        got += 1;
                    }
                    Err(reason) => {
                        // Kept pending on purpose: see the module documentation.
                        self.note_error(
                            "parse",
                            format!("malformed claim record {} in {log}: {reason}", e.id),
                        );
                    }
                }
            }
        }
        self.status
            .buffered
            .store(self.buffer.len() as u64, Ordering::Relaxed);
        if self.buffer.is_empty() {
            self.status.caught_up();
        }
        got
    }

    /// Writes the buffer in one transaction, retrying with exponential backoff until it
    /// commits (or, on shutdown, until the grace period ends); then acks it.
    async fn write_buffer(&mut self) -> Result<u64, PersistError> {
        let records: Vec<ClaimRecord> = self.buffer.iter().map(|b| b.record.clone()).collect();
        let limit = Duration::from_millis(self.cfg.write_timeout_ms);
        loop {
            let started = Instant::now();
            let write = self.db.write_claims_report(&records);
            let result = match tokio::time::timeout(limit, write).await {
                Ok(Ok(w)) => Ok(w),
                Ok(Err(e)) => Err(PersistError::Db(e)),
                Err(_) => Err(PersistError::Timeout(limit)),
            };
            match result {
                Ok(written) => {
                    report_conflicts(&written.conflicts);
                    let inserted = written.inserted;
                    PersistWritten {
                        rows: inserted,
                        seconds: started.elapsed().as_secs_f64(),
                    }
                    .emit();
                    self.status.rows.fetch_add(inserted, Ordering::Relaxed);
                    self.status.last_write_ms.store(now_ms(), Ordering::Relaxed);
                    self.status.db_ok.store(true, Ordering::Relaxed);
                    self.backoff = self.backoff_min();
                    self.ack_buffer().await;
                    return Ok(inserted);
                }
                Err(e) => {
                    self.status.db_ok.store(false, Ordering::Relaxed);
                    self.note_error("write", e.to_string());
                    if self.shutdown.is_cancelled() {
                        let grace = Duration::from_millis(self.cfg.shutdown_grace_ms);
                        let deadline = *self.grace_deadline.get_or_insert(Instant::now() + grace);
                        if Instant::now() >= deadline {
                            return Err(e);
                        }
                    }
                    let wait = self.backoff.mul_f64(0.75 + rand::random::<f64>() * 0.5);
                    self.backoff = (self.backoff * 2).min(self.backoff_max());
                    if self.shutdown.is_cancelled() {
                        tokio::time::sleep(wait).await;
                    } else {
                        tokio::select! {
                            _ = self.shutdown.cancelled() => {}
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
    }

    /// Acks (and deletes) every buffered entry, by shard log; empties the buffer.
    async fn ack_buffer(&mut self) {
        let mut by_log: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for b in self.buffer.drain(..) {
            by_log.entry(b.log).or_default().push(b.id);
        }
        self.held.clear();
        self.first_buffered = None;
        self.status.buffered.store(0, Ordering::Relaxed);
        for (log, ids) in by_log {
            if let Err(e) = ack_log(self.backend.as_ref(), &log, &self.cfg.group, &ids).await {
                self.note_error("ack", e.to_string());
                let now = Instant::now();
                let delay = self.backoff_min();
                self.unacked.push(Unacked {
                    log,
                    ids,
                    since: now,
                    next_try: now + delay,
                    delay,
                });
            }
        }
    }

    /// Retries failed acks (with backoff) until they succeed or the retry window ends;
    /// records of our own left pending are only redelivered after `min_idle_ms`, so the
    /// window is at least that long.
    async fn retry_acks(&mut self, force: bool) {
        if self.unacked.is_empty() {
            return;
        }
        let window = Duration::from_millis(self.cfg.min_idle_ms).max(ACK_RETRY_MIN);
        let max = self.backoff_max();
        let pending = std::mem::take(&mut self.unacked);
        for mut u in pending {
            let now = Instant::now();
            if !force && now < u.next_try {
                self.unacked.push(u);
                continue;
            }
            if let Err(e) = ack_log(self.backend.as_ref(), &u.log, &self.cfg.group, &u.ids).await {
                self.note_error("ack", e.to_string());
                if u.since.elapsed() < window {
                    u.delay = (u.delay * 2).min(max);
                    u.next_try = Instant::now() + u.delay;
                    self.unacked.push(u);
                } else {
                    tracing::warn!(log = %u.log, entries = u.ids.len(),
                        "giving up acking persisted records; they will be redelivered \
                         and skipped as duplicates");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bulk(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn entry(pairs: &[(&str, &str)]) -> LogEntry {
        LogEntry {
            id: "1700000000000-0".into(),
            fields: pairs
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect(),
        }
    }

    const GOOD: &[(&str, &str)] = &[
        ("k", "claimed"),
        ("c", "b1.2.7"),
        ("u", "u1"),
        ("r", ""),
        ("b", "b1"),
        ("s", "2"),
        ("t", "100"),
        ("vf", "100"),
        ("vt", "200"),
    ];

    #[test]
    fn claim_records_parse() {
        let r = parse_claim("b1", 2, &entry(GOOD)).unwrap();
        assert_eq!(r.coupon_id, "b1.2.7");
        assert_eq!((r.shard, r.seq, r.request_id.as_deref()), (2, 7, None));
        assert_eq!((r.claimed_at, r.valid_from, r.valid_to), (100, 100, 200));
        assert_eq!(crate::db::claim_event_id(&r), "b1.2.7:claimed");
    }

    #[test]
    fn malformed_records_are_rejected() {
        let mut wrong_shard = GOOD.to_vec();
        wrong_shard[5] = ("s", "3");
        let mut bad_time = GOOD.to_vec();
        bad_time[6] = ("t", "soon");
        let mut bad_kind = GOOD.to_vec();
        bad_kind[0] = ("k", "other");
        for e in [&GOOD[1..], &wrong_shard[..], &bad_time[..], &bad_kind[..]] {
            assert!(parse_claim("b1", 2, &entry(e)).is_err(), "{e:?}");
        }
        assert!(parse_claim("b2", 2, &entry(GOOD)).is_err());
    }

    #[test]
    fn log_read_replies_parse() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("5-1"),
                Value::Array(vec![bulk("k"), bulk("claimed")]),
            ]),
            Value::Array(vec![bulk("6-0"), Value::Nil]),
        ]);
        let e = parse_entries(reply).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].get("k"), Some("claimed"));
        assert!(e[1].fields.is_empty());
        assert!(parse_entries(Value::Int(3)).is_err());
        assert_eq!(stream_id_ms("1700-3"), Some(1700));
    }
}
