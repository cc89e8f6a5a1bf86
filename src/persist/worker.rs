//! The persister's loop: reads the logs of the shards that can still receive records
//! (active shards) through the consumer group, when woken by activity or due, writes the
//! records (claims, and the changes of managed coupons) to the database in batched,
//! idempotent transactions, then acks them. Dormant batches (see the rule in `persist`'s
//! module doc) are not read.
//!
//! Invariant kept here: a record is acked (and deleted from its log) only after the
//! transaction holding it committed (a buffer's claims commit before its changes, and the
//! buffer is acked only once both did; each log's records keep their stream order); a
//! failed write keeps the records in memory and retries them with backoff (they are not
//! read again); a record that does not parse stays pending, and so does a change record of
//! a coupon the database does not hold (reported, taken over again later, never dropped);
//! only claim records move a shard's committed floor;
//! under `redis.ack = "replica"` a record reaches the database only once a replica holds it
//! (so a failover never takes back a claim the database knows); a batch goes dormant only
//! when nothing of it is buffered or unacked here and its logs were found empty after its
//! window (plus `dormant_after_ms`) ended.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::prober::{ProbeTarget, ProbeTargets, TargetSet};
use super::status::PersistStatus;
use super::{ACK_RETRY_MIN, Command, LOG_REPEAT, PersistError, RECOVERY_READS};
use crate::backend::{Backend, BackendError};
use crate::config::PersisterConfig;
use crate::contract::claim_record::{self, LogRecord};
use crate::contract::keys::SlotKeys;
use crate::contract::{log_ack, log_read, probe};
use crate::domain::batch::{Batch, BatchState};
use crate::domain::ids::seq_position;
use crate::domain::time::now_ms;
use crate::obs::events::{
    CouponChangeDiverged, CouponConflict, LogRead, PersistFailed, PersistWritten, RepeatFilter,
    ShardsFollowed,
};
use crate::stock::{ClaimActivity, FaultReporter};
use crate::store::{BatchMark, ChangeRecord, ChangesWritten, ClaimRecord, Db, DbError};

/// Definitions read one by one (rather than the whole list) when at most this many batches
/// are new or changed at a refresh.
const FEW_CHANGED: usize = 16;

pub(super) struct ShardState {
    batch: Arc<str>,
    shard: u32,
    keys: Arc<SlotKeys>,
    /// The highest coupon position (`domain::ids::seq_position`) committed to the database
    /// from this shard: its claim counter can never be below it unless Redis lost or rolled
    /// the shard back (the probe task checks).
    committed: Arc<AtomicU64>,
    /// Set by a claim of this instance ([`ClaimActivity`]) or by the probe task when the
    /// shard's log holds entries: read it on the next pass.
    has_work: Arc<AtomicBool>,
    log: Arc<str>,
    /// When the shard is read without a hint: at once after a read that found records,
    /// else `sweep_interval_ms` after the last read (the safety sweep).
    next_poll: Instant,
    /// Recovery reads left (see [`RECOVERY_READS`]).
    recover: u32,
    /// Claims per entry in the shard's last read (at least 1): a read asks for about as
    /// many entries as leave the buffer near `batch_size` claims (one claims record holds
    /// a whole claim call).
    per_entry: usize,
}

/// A batch as the loop follows it.
struct Followed {
    mark: BatchMark,
    /// `None` when the definition could not be read: never dormant then.
    def: Option<BatchTimes>,
    granting: bool,
    dormant: bool,
}

/// What of a batch's definition decides whether it can receive records.
#[derive(Debug, Clone, Copy)]
struct BatchTimes {
    start: i64,
    end: i64,
    paused: bool,
}

impl BatchTimes {
    fn of(b: &Batch) -> BatchTimes {
        BatchTimes {
            start: b.claim_window.start.0,
            end: b.claim_window.end.0,
            paused: b.state == BatchState::Paused,
        }
    }
}

struct Buffered {
    log: Arc<str>,
    id: String,
    record: LogRecord,
}

struct Unacked {
    log: Arc<str>,
    ids: Vec<String>,
    since: Instant,
    next_try: Instant,
    delay: Duration,
}

pub(super) struct Worker<B> {
    backend: Arc<B>,
    db: Db,
    cfg: PersisterConfig,
    consumer: String,
    status: Arc<PersistStatus>,
    shutdown: CancellationToken,
    commands: mpsc::Receiver<Command>,
    /// The shards of active batches: read on activity, swept, probed.
    shards: Vec<ShardState>,
    /// The shards of dormant batches, by batch: not read (the probe task looks at them
    /// rarely).
    dormant: HashMap<Arc<str>, Vec<ShardState>>,
    /// Every batch the database holds, as last read.
    batches: HashMap<Arc<str>, Followed>,
    /// Round-robin start of the next read pass.
    rr: usize,
    next_refresh: Instant,
    /// Batches woken that the last refresh did not know: one early refresh each, at most,
    /// until the next scheduled refresh.
    unknown_woken: HashSet<String>,
    /// The shard list shared with the probe task.
    probe_targets: ProbeTargets,
    /// Where the shards' floors live (shared with the claim path).
    faults: FaultReporter,
    /// Hints from the claim path and the probe task.
    activity: ClaimActivity,
    /// [`ShardState::committed`] by log key, for the records of a committed write.
    committed: HashMap<Arc<str>, Arc<AtomicU64>>,
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
    #[allow(clippy::too_many_arguments)] // the loop's collaborators, each used once here
    pub(super) fn new(
        backend: Arc<B>,
        db: Db,
        cfg: PersisterConfig,
        status: Arc<PersistStatus>,
        shutdown: CancellationToken,
        commands: mpsc::Receiver<Command>,
        probe_targets: ProbeTargets,
        faults: FaultReporter,
        activity: ClaimActivity,
    ) -> Worker<B> {
        let now = Instant::now();
        Worker {
            faults,
            activity,
            consumer: cfg.consumer_name(),
            backoff: Duration::from_millis(cfg.backoff_min_ms),
            read_backoff: Duration::from_millis(cfg.backoff_min_ms),
            backend,
            db,
            cfg,
            status,
            shutdown,
            commands,
            shards: Vec::new(),
            dormant: HashMap::new(),
            batches: HashMap::new(),
            rr: 0,
            next_refresh: now,
            unknown_woken: HashSet::new(),
            probe_targets,
            committed: HashMap::new(),
            buffer: Vec::new(),
            held: HashSet::new(),
            first_buffered: None,
            unacked: Vec::new(),
            pass_error: None,
            grace_deadline: None,
            log_filter: RepeatFilter::new(LOG_REPEAT),
        }
    }

    pub(super) async fn run(mut self) {
        tracing::info!(consumer = %self.consumer, group = %self.cfg.group, "persister started");
        let flush_interval = Duration::from_millis(self.cfg.flush_interval_ms);
        while !self.shutdown.is_cancelled() {
            self.maybe_refresh().await;
            self.take_woken().await;
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
                self.until_due(flush_interval.saturating_sub(waited))
            };
            // Woken by a hint (a claim here, records a probe found), a command, or when
            // something is due (a shard's sweep, the refresh, a buffered write, an ack retry).
            tokio::select! {
                _ = self.shutdown.cancelled() => {}
                cmd = self.commands.recv() => {
                    if let Some(cmd) = cmd {
                        self.handle(cmd).await;
                    }
                }
                _ = self.activity.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            if self.buffer.is_empty() {
                // Nothing held while asleep: caught up until now. The stall clock of
                // `/readyz` starts here, not at the last read before a long idle sleep
                // (records that arrived meanwhile would read as stalled at once).
                self.status.caught_up();
            }
        }
        // Shutdown: the gateway has stopped taking claims, so drain what the logs still
        // hold (every active shard), bounded by the grace period; what is left stays pending
        // in Redis for the next instance.
        let deadline = Instant::now() + Duration::from_millis(self.cfg.shutdown_grace_ms);
        self.next_refresh = Instant::now(); // batches created since the last refresh too
        self.maybe_refresh().await;
        self.take_woken().await;
        loop {
            let got = self.read_pass(true).await;
            if !self.buffer.is_empty()
                && let Err(e) = self.write_buffer().await
            {
                tracing::warn!(error = %e, left = self.buffer.len(),
                    "persister stopping with unwritten records; they stay pending in the backend");
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

    /// How long the loop may sleep when no hint comes: until the first of the next refresh,
    /// a shard's next read, an ack retry, and (records buffered) `flush_left`.
    fn until_due(&self, flush_left: Duration) -> Duration {
        let now = Instant::now();
        let mut at = self.next_refresh;
        for s in &self.shards {
            at = at.min(s.next_poll);
        }
        for u in &self.unacked {
            at = at.min(u.next_try);
        }
        let mut wait = at.saturating_duration_since(now);
        if !self.buffer.is_empty() {
            wait = wait.min(flush_left);
        }
        wait.max(Duration::from_millis(1))
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
        self.take_woken().await;
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

    /// Batches woken by a hint or a probe: a dormant one becomes active (every shard read
    /// at once); one the last refresh did not know (just created) brings the refresh
    /// forward, once until the next scheduled one.
    async fn take_woken(&mut self) {
        let woken = self.activity.take_woken();
        if woken.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut changed = false;
        let mut unknown = false;
        for id in woken {
            if let Some((key, shards)) = self.dormant.remove_entry(id.as_str()) {
                if let Some(f) = self.batches.get_mut(&key) {
                    f.dormant = false;
                }
                self.activate(shards, now);
                changed = true;
            } else if !self.batches.contains_key(id.as_str()) && self.unknown_woken.insert(id) {
                unknown = true;
            }
        }
        if unknown {
            self.next_refresh = now;
            self.maybe_refresh().await;
        } else if changed {
            self.publish();
        }
    }

    /// Moves shards of a batch that woke up to the active list: each is read at once.
    fn activate(&mut self, shards: Vec<ShardState>, now: Instant) {
        for mut s in shards {
            s.next_poll = now;
            s.recover = RECOVERY_READS;
            self.shards.push(s);
        }
    }

    /// Re-reads the batch list (marks only; definitions of new or changed batches), follows
    /// new batches, wakes dormant ones that changed, and puts to sleep the active ones that
    /// can no longer receive records (see `persist`'s module doc for the rule).
    async fn maybe_refresh(&mut self) {
        let now = Instant::now();
        if now < self.next_refresh {
            return;
        }
        self.next_refresh = now + Duration::from_millis(self.cfg.batch_refresh_ms);
        match self.refresh(now).await {
            Ok(()) => {
                self.status.db_ok.store(true, Ordering::Relaxed);
                self.unknown_woken.clear();
            }
            Err(e) => {
                self.status.db_ok.store(false, Ordering::Relaxed);
                self.note_error("refresh", e.to_string());
                return;
            }
        }
        self.settle_dormant().await;
        self.publish();
        // A hint that set a flag just before its shard went dormant (the claim path saw the
        // old set) is not lost: the batch wakes at once.
        for (id, shards) in &self.dormant {
            if shards.iter().any(|s| s.has_work.load(Ordering::Acquire)) {
                self.activity.wake_batch(id);
            }
        }
        self.status.refreshed.store(true, Ordering::Relaxed);
        self.status.wake_prober.notify_one();
    }

    async fn refresh(&mut self, now: Instant) -> Result<(), crate::store::DbError> {
        let marks = self.db.batch_marks().await?;
        let granting: HashSet<String> = self.db.granting_batches().await?.into_iter().collect();
        let changed: Vec<&str> = marks
            .iter()
            .filter(|m| {
                self.batches
                    .get(m.id.as_str())
                    .is_none_or(|f| f.mark != **m)
            })
            .map(|m| m.id.as_str())
            .collect();
        let mut defs: HashMap<String, BatchTimes> = HashMap::new();
        if changed.len() > FEW_CHANGED {
            for b in self.db.list_batches().await? {
                defs.insert(b.id.clone(), BatchTimes::of(&b));
            }
        } else {
            for id in changed {
                if let Some(b) = self.db.get_batch(id).await? {
                    defs.insert(b.id.clone(), BatchTimes::of(&b));
                }
            }
        }
        let mut old_active: HashMap<(Arc<str>, u32), ShardState> = self
            .shards
            .drain(..)
            .map(|s| ((s.batch.clone(), s.shard), s))
            .collect();
        let mut old_dormant = std::mem::take(&mut self.dormant);
        let mut old = std::mem::take(&mut self.batches);
        for m in marks {
            let (id, prev) = match old.remove_entry(m.id.as_str()) {
                Some((id, f)) => (id, Some(f)),
                None => (Arc::from(m.id.as_str()), None),
            };
            let unchanged = prev.as_ref().is_some_and(|f| f.mark == m);
            let def = match (&prev, unchanged) {
                (Some(f), true) => f.def,
                _ => defs.get(&m.id).copied(),
            };
            let granting = granting.contains(&m.id);
            // Stays dormant only while nothing that could make it receive records happened.
            let dormant = prev.as_ref().is_some_and(|f| f.dormant)
                && unchanged
                && !granting
                && def.is_some_and(|d| self.out_of_service(&d, &m));
            let mut asleep: HashMap<u32, ShardState> = old_dormant
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s.shard, s))
                .collect();
            // A batch seen for the first time (or again after a restart): what the database
            // already holds is the floor its shards' counters must not be below.
            let mut floors: HashMap<u32, u64> = HashMap::new();
            if (0..m.shards)
                .any(|i| !old_active.contains_key(&(id.clone(), i)) && !asleep.contains_key(&i))
            {
                match self.db.claims_summary(&m.id).await {
                    Ok(summary) => {
                        floors.extend(summary.iter().map(|s| (s.shard, seq_position(s.max_seq))));
                    }
                    Err(e) => self.note_error("refresh", e.to_string()),
                }
            }
            let mut states = Vec::with_capacity(m.shards as usize);
            for i in 0..m.shards {
                let state = if let Some(s) = old_active.remove(&(id.clone(), i)) {
                    s
                } else if let Some(mut s) = asleep.remove(&i) {
                    if !dormant {
                        s.next_poll = now; // woken: read at once
                        s.recover = RECOVERY_READS;
                    }
                    s
                } else {
                    let keys = SlotKeys::new(&m.id, Some(i));
                    let committed = self.faults.floor(&keys.meta);
                    committed.fetch_max(floors.get(&i).copied().unwrap_or(0), Ordering::Relaxed);
                    ShardState {
                        batch: id.clone(),
                        shard: i,
                        log: Arc::from(keys.log.as_str()),
                        keys: Arc::new(keys),
                        committed,
                        has_work: Arc::default(),
                        next_poll: now,
                        recover: RECOVERY_READS,
                        per_entry: 1,
                    }
                };
                states.push(state);
            }
            if dormant {
                self.dormant.insert(id.clone(), states);
            } else {
                self.shards.extend(states);
            }
            self.batches.insert(
                id,
                Followed {
                    mark: m,
                    def,
                    granting,
                    dormant,
                },
            );
        }
        Ok(())
    }

    /// Whether a batch is out of service: its window ended more than `dormant_after_ms` ago
    /// or starts more than that far ahead, or it was paused more than that long ago (the
    /// margin covers the clocks of gateways and Redis, and changes still on their way).
    fn out_of_service(&self, d: &BatchTimes, m: &BatchMark) -> bool {
        let now = now_ms();
        let margin = i64::try_from(self.cfg.dormant_after_ms).unwrap_or(i64::MAX);
        now > d.end.saturating_add(margin)
            || now < d.start.saturating_sub(margin)
            || (d.paused && now > m.updated_at.saturating_add(margin))
    }

    /// Puts to sleep every active batch that is out of service, not granting, holds nothing
    /// buffered or unacked here, and whose logs are all empty now. A log is empty only once
    /// every record in it was written and acked by some instance (acks delete), and none can
    /// be appended while the batch stays out of service.
    async fn settle_dormant(&mut self) {
        let candidates: Vec<Arc<str>> = self
            .batches
            .iter()
            .filter(|(_, f)| !f.dormant && !f.granting)
            .filter(|(_, f)| f.def.is_some_and(|d| self.out_of_service(&d, &f.mark)))
            .map(|(id, _)| id.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        let busy: HashSet<Arc<str>> = self
            .buffer
            .iter()
            .map(|b| b.log.clone())
            .chain(self.unacked.iter().map(|u| u.log.clone()))
            .collect();
        // A batch with a shard holding records here, or hinted, stays active.
        let mut busy_batches: HashSet<Arc<str>> = HashSet::new();
        let mut by_batch: HashMap<Arc<str>, Vec<Arc<SlotKeys>>> = HashMap::new();
        for s in &self.shards {
            if busy.contains(&s.log) || s.has_work.load(Ordering::Acquire) {
                busy_batches.insert(s.batch.clone());
            }
            by_batch
                .entry(s.batch.clone())
                .or_default()
                .push(s.keys.clone());
        }
        let mut asleep: HashSet<Arc<str>> = HashSet::new();
        'batch: for id in candidates {
            if busy_batches.contains(&id) {
                continue;
            }
            let Some(keys) = by_batch.get(&id) else {
                continue;
            };
            for k in keys {
                match probe::call(self.backend.as_ref(), k).await {
                    Ok(p) if p.log_len == 0 => {}
                    Ok(_) => continue 'batch,
                    Err(e) => {
                        self.note_error("probe", e.to_string());
                        return;
                    }
                }
            }
            asleep.insert(id);
        }
        if asleep.is_empty() {
            return;
        }
        let shards = std::mem::take(&mut self.shards);
        for s in shards {
            if asleep.contains(&s.batch) {
                self.dormant.entry(s.batch.clone()).or_default().push(s);
            } else {
                self.shards.push(s);
            }
        }
        for id in &asleep {
            if let Some(f) = self.batches.get_mut(id) {
                f.dormant = true;
            }
        }
        tracing::debug!(batches = asleep.len(), "persister: batches went dormant");
    }

    /// Shares the active and dormant shards with the probe task and the claim path, and
    /// reports their counts.
    fn publish(&mut self) {
        let target = |s: &ShardState| ProbeTarget {
            keys: s.keys.clone(),
            has_work: s.has_work.clone(),
            committed: s.committed.clone(),
        };
        let set = TargetSet {
            active: self.shards.iter().map(target).collect(),
            dormant: self.dormant.values().flatten().map(target).collect(),
        };
        let (active, dormant) = (set.active.len() as u64, set.dormant.len() as u64);
        *self.probe_targets.lock() = Arc::new(set);
        self.activity.publish(
            self.shards
                .iter()
                .map(|s| (s.log.clone(), s.has_work.clone()))
                .collect(),
        );
        self.committed = self
            .shards
            .iter()
            .chain(self.dormant.values().flatten())
            .map(|s| (s.log.clone(), s.committed.clone()))
            .collect();
        self.status.active_shards.store(active, Ordering::Relaxed);
        self.status.dormant_shards.store(dormant, Ordering::Relaxed);
        ShardsFollowed { active, dormant }.emit();
    }

    /// One round-robin pass over the active shards that are hinted or due (all with
    /// `force`), reading until the buffer is full. Returns how many new records were
    /// buffered.
    async fn read_pass(&mut self, force: bool) -> usize {
        let n = self.shards.len();
        if n == 0 {
            return 0;
        }
        let batch_size = self.cfg.batch_size;
        let now = Instant::now();
        let sweep = Duration::from_millis(self.cfg.sweep_interval_ms);
        let mut got = 0;
        let start = self.rr % n;
        self.rr = (start + 1) % n;
        for k in 0..n {
            let i = (start + k) % n;
            let room = batch_size.saturating_sub(self.buffer.len());
            if room == 0 {
                break;
            }
            let hinted = self.shards[i].has_work.swap(false, Ordering::AcqRel);
            let due = self.shards[i].next_poll <= now;
            if !force && !hinted && !due {
                continue;
            }
            LogRead {
                cause: if force {
                    "drain"
                } else if hinted {
                    "hint"
                } else {
                    "due"
                },
            }
            .emit();
            self.status.reads.fetch_add(1, Ordering::Relaxed);
            let min_idle = if self.shards[i].recover > 0 {
                0
            } else {
                self.cfg.min_idle_ms
            };
            let count = (room / self.shards[i].per_entry).max(1);
            let read = log_read::Read {
                group: &self.cfg.group,
                consumer: &self.consumer,
                count,
                min_idle_ms: min_idle,
            };
            let result = log_read::call(self.backend.as_ref(), &self.shards[i].log, &read).await;
            let entries = match result {
                Ok(e) => e,
                Err(e) => {
                    self.note_error("read", e.to_string());
                    self.shards[i].next_poll = now + self.backoff_min();
                    self.shards[i].recover = RECOVERY_READS;
                    if let b @ BackendError::Unavailable(_) = e {
                        self.pass_error = Some(b);
                        break; // Redis is down: do not hammer every shard
                    }
                    continue;
                }
            };
            let s = &mut self.shards[i];
            if s.recover > 0 {
                s.recover = if entries.len() < count {
                    0
                } else {
                    s.recover - 1
                };
            }
            if !entries.is_empty() {
                // Under `redis.ack = "replica"` the database takes only records a replica
                // holds too: a failover can then never take back a claim the database
                // knows, so no coupon id the database holds is minted again. Unconfirmed,
                // they stay pending and are read again (no-op under "leader").
                let fence = s.keys.fence.clone();
                if let Err(e) = self.backend.confirm(&fence, None).await {
                    self.note_error("read", e.to_string());
                    let next_poll = now + self.backoff_min();
                    let s = &mut self.shards[i];
                    s.next_poll = next_poll;
                    s.recover = RECOVERY_READS;
                    continue;
                }
            }
            let s = &mut self.shards[i];
            // Read again at once after records (more may be waiting), else at the sweep.
            s.next_poll = now + sweep;
            let (batch, shard, log) = (s.batch.clone(), s.shard, s.log.clone());
            let (mut fresh, mut taken) = (0, 0);
            for e in entries {
                let key = (log.clone(), e.id.clone());
                if self.held.contains(&key) {
                    continue;
                }
                if e.fields.is_empty() {
                    // Deleted while pending (already persisted and acked elsewhere).
                    continue;
                }
                match claim_record::parse(&batch, shard, &e) {
                    Ok(records) => {
                        // A claims record holds a whole claim call: its claims are buffered
                        // one by one and acked together (one entry id).
                        self.held.insert(key);
                        taken += 1;
                        fresh += records.len();
                        self.buffer
                            .extend(records.into_iter().map(|record| Buffered {
                                log: log.clone(),
                                id: e.id.clone(),
                                record,
                            }));
                        self.first_buffered.get_or_insert_with(Instant::now);
                    }
                    Err(reason) => {
                        // Kept pending on purpose: see the module documentation.
                        self.note_error(
                            "parse",
                            format!("malformed log record {} in {log}: {reason}", e.id),
                        );
                    }
                }
            }
            if fresh > 0 {
                self.shards[i].next_poll = now;
            }
            if taken > 0 {
                self.shards[i].per_entry = fresh.div_ceil(taken).max(1);
            }
            got += fresh;
        }
        self.status
            .buffered
            .store(self.buffer.len() as u64, Ordering::Relaxed);
        if self.buffer.is_empty() {
            self.status.caught_up();
        }
        got
    }

    /// Writes the buffer: its claims in one transaction, then its changes of managed
    /// coupons in another (a change's coupon row comes from its claim), each log's records
    /// in stream order; retries with exponential backoff until both committed (or, on
    /// shutdown, until the grace period ends); then acks it all. A change of a coupon the
    /// database holds no row for leaves the buffer unacked (it stays pending and is taken
    /// over again after `min_idle_ms`; reported each time) and the rest is written again at
    /// once. Returns the number of claims newly written.
    async fn write_buffer(&mut self) -> Result<u64, PersistError> {
        let claims: Vec<ClaimRecord> = self
            .buffer
            .iter()
            .filter_map(|b| match &b.record {
                LogRecord::Claimed(c) => Some(c.clone()),
                LogRecord::Changed(_) => None,
            })
            .collect();
        let limit = Duration::from_millis(self.cfg.write_timeout_ms);
        // The claims' count once they committed (not written again on a retry).
        let mut inserted: Option<u64> = None;
        loop {
            let started = Instant::now();
            if inserted.is_none() {
                let write = self.db.write_claims_report(&claims);
                match timed(limit, write).await {
                    Ok(written) => {
                        report_conflicts(&written.conflicts);
                        inserted = Some(written.inserted);
                    }
                    Err(e) => {
                        self.write_failed(e).await?;
                        continue;
                    }
                }
            }
            let changes: Vec<ChangeRecord> = self
                .buffer
                .iter()
                .filter_map(|b| match &b.record {
                    LogRecord::Changed(c) => Some(c.clone()),
                    LogRecord::Claimed(_) => None,
                })
                .collect();
            let applied = if changes.is_empty() {
                ChangesWritten::default()
            } else {
                match timed(limit, self.db.apply_changes(&changes)).await {
                    Ok(applied) => applied,
                    Err(PersistError::Db(DbError::MissingCoupons(coupons))) => {
                        self.hold_back(&coupons);
                        continue;
                    }
                    Err(e) => {
                        self.write_failed(e).await?;
                        continue;
                    }
                }
            };
            for coupon_id in &applied.diverged {
                CouponChangeDiverged { coupon_id }.emit();
            }
            let inserted = inserted.unwrap_or_default();
            PersistWritten {
                rows: inserted,
                changes: applied.applied,
                seconds: started.elapsed().as_secs_f64(),
            }
            .emit();
            self.status
                .rows
                .fetch_add(inserted + applied.applied, Ordering::Relaxed);
            self.status.last_write_ms.store(now_ms(), Ordering::Relaxed);
            self.status.db_ok.store(true, Ordering::Relaxed);
            self.backoff = self.backoff_min();
            for b in &self.buffer {
                if let LogRecord::Claimed(c) = &b.record
                    && let Some(floor) = self.committed.get(&b.log)
                {
                    floor.fetch_max(seq_position(c.seq), Ordering::Relaxed);
                }
            }
            self.ack_buffer().await;
            return Ok(inserted);
        }
    }

    /// A failed write: recorded, then waited out with backoff (jittered); on shutdown,
    /// `Err` once the grace period is over (the records stay pending in the backend).
    async fn write_failed(&mut self, e: PersistError) -> Result<(), PersistError> {
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
        Ok(())
    }

    /// Takes the change records of `coupons` (coupons the database holds no row for) out
    /// of the buffer, unacked: they stay pending in their logs and are taken over again
    /// after `min_idle_ms` (their claims may still be on their way). Each is reported.
    fn hold_back(&mut self, coupons: &[String]) {
        let coupons: HashSet<&str> = coupons.iter().map(String::as_str).collect();
        let (held_back, kept): (Vec<Buffered>, Vec<Buffered>) =
            std::mem::take(&mut self.buffer).into_iter().partition(|b| {
                matches!(&b.record, LogRecord::Changed(c) if coupons.contains(c.coupon_id.as_str()))
            });
        self.buffer = kept;
        for b in held_back {
            self.held.remove(&(b.log.clone(), b.id.clone()));
            self.note_error(
                "write",
                format!(
                    "change record {} in {} of coupon {} the database does not hold; \
                     kept pending",
                    b.id,
                    b.log,
                    b.record.coupon_id()
                ),
            );
        }
        self.status
            .buffered
            .store(self.buffer.len() as u64, Ordering::Relaxed);
    }

    /// Acks (and deletes) every buffered entry, by shard log; empties the buffer.
    async fn ack_buffer(&mut self) {
        let mut by_log: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        for b in self.buffer.drain(..) {
            let ids = by_log.entry(b.log).or_default();
            // the claims of one claims record are adjacent and share its entry id
            if ids.last() != Some(&b.id) {
                ids.push(b.id);
            }
        }
        self.held.clear();
        self.first_buffered = None;
        self.status.buffered.store(0, Ordering::Relaxed);
        for (log, ids) in by_log {
            if let Err(e) = log_ack::call(self.backend.as_ref(), &log, &self.cfg.group, &ids).await
            {
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
            if let Err(e) =
                log_ack::call(self.backend.as_ref(), &u.log, &self.cfg.group, &u.ids).await
            {
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

/// `write` within `limit`: its error, or a timeout, as the persister's error.
async fn timed<T>(
    limit: Duration,
    write: impl std::future::Future<Output = Result<T, DbError>>,
) -> Result<T, PersistError> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(w)) => Ok(w),
        Ok(Err(e)) => Err(PersistError::Db(e)),
        Err(_) => Err(PersistError::Timeout(limit)),
    }
}

/// A coupon id met with a different claim than the one stored (minted twice): the database
/// recorded it in `coupon_conflicts` (and `reconcile` reports it); here it is counted and
/// logged loudly, every one of them. The record itself is acked: it is not lost, and leaving
/// it pending would only stall its shard's log.
fn report_conflicts(conflicts: &[crate::store::CouponConflict]) {
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
