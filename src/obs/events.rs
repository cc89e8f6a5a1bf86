//! One struct per event the gateway counts or measures: its `emit()` records the metric
//! and writes the log line together, at the level the event deserves (the way vector's
//! `internal_events` do). Call sites build the event and emit it; no other module records a
//! metric.
//!
//! Invariant kept here: an event's metric and its log line cannot drift apart (they are
//! written by the same function), and every label an event records comes from a closed set
//! (`&'static str` labels from [`super::metrics`]'s lists or from enums of their owners).
//! Per-request events log at `trace`/`debug`; events an operator must see (a shed, a
//! persister error, a coupon minted twice, a lost batch) log at `warn`/`error`, the
//! frequent ones through a limiter ([`LogLimiter`], [`RepeatFilter`]) so an overload cannot
//! flood the log.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::metrics as m;

// ------------------------------------------------------------------------ log limiters

/// At most one log line per `every` for one kind of event, telling how many were left out.
/// Lock-free; shared by every task emitting that event.
pub struct LogLimiter {
    every_ms: i64,
    last_ms: AtomicI64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub const fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every_ms: every.as_millis() as i64,
            last_ms: AtomicI64::new(i64::MIN),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence may be logged (`n` were left out since the last one).
    pub fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != i64::MIN && now - last < self.every_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// Lets a message through unless the very same one passed less than `every` ago. Owned by
/// the one task that reports (e.g. the persister loop), so no synchronisation.
#[derive(Debug)]
pub struct RepeatFilter {
    every: Duration,
    last: Option<(Instant, String)>,
}

impl RepeatFilter {
    pub fn new(every: Duration) -> RepeatFilter {
        RepeatFilter { every, last: None }
    }

    /// Whether `msg` is to be logged now (and remembers it if so).
    pub fn admit(&mut self, msg: &str) -> bool {
        let repeat = self
            .last
            .as_ref()
            .is_some_and(|(t, last)| last == msg && t.elapsed() < self.every);
        if !repeat {
            self.last = Some((Instant::now(), msg.to_string()));
        }
        !repeat
    }
}

// ------------------------------------------------------------------------ the claim path

/// A claim answered (`outcome`: `claimed`, `replayed` or the API error code), end to end.
pub struct ClaimAnswered {
    pub outcome: &'static str,
    pub seconds: f64,
}

impl ClaimAnswered {
    pub fn emit(self) {
        m::claim_answered(self.outcome, self.seconds);
        tracing::trace!(
            outcome = self.outcome,
            seconds = self.seconds,
            "claim answered"
        );
    }
}

/// One stage of the claim path took `seconds` ([`m::STAGES`]).
pub struct StageTimed {
    pub stage: &'static str,
    pub seconds: f64,
}

impl StageTimed {
    pub fn emit(self) {
        m::stage(self.stage, self.seconds);
        tracing::trace!(stage = self.stage, seconds = self.seconds, "claim stage");
    }
}

/// Why a request failed, for the log line of [`HttpAnswered`].
pub struct Failure<'a> {
    pub status: u16,
    /// The API error code.
    pub code: &'static str,
    /// What went wrong (the detail of an internal error included; never sent to the client).
    pub detail: &'a str,
}

/// An HTTP request answered: counted by route and status class; an error is logged with the
/// request id (`warn` for a 5xx, ours to fix; `debug` for a refused request).
pub struct HttpAnswered<'a> {
    pub route: &'static str,
    /// `2xx` .. `5xx`.
    pub class: &'static str,
    pub request_id: &'a str,
    pub failure: Option<Failure<'a>>,
}

impl HttpAnswered<'_> {
    pub fn emit(self) {
        m::http_request(self.route, self.class);
        let (route, request_id) = (self.route, self.request_id);
        match self.failure {
            Some(f) if f.status >= 500 => {
                tracing::warn!(%request_id, route, status = f.status, error = f.code,
                    detail = %f.detail, "request failed")
            }
            Some(f) => {
                tracing::debug!(%request_id, route, status = f.status, error = f.code,
                    "request refused")
            }
            None => tracing::trace!(%request_id, route, class = self.class, "request answered"),
        }
    }
}

/// One line of the access log (`log.access`, sampled by `log.access_sample`): the method,
/// the route label (never the path: it holds user and coupon ids), the status, the time
/// taken and the request id; never the query or the body. Target `claimgate::access`, so
/// a filter can route or silence it (`log.level = "info,claimgate::access=off"`).
pub struct Accessed<'a> {
    pub method: &'a str,
    pub route: &'static str,
    pub status: u16,
    pub seconds: f64,
    pub request_id: &'a str,
}

impl Accessed<'_> {
    pub fn emit(self) {
        tracing::info!(
            target: "claimgate::access",
            method = self.method,
            route = self.route,
            status = self.status,
            duration_ms = (self.seconds * 1e6).round() / 1e3,
            request_id = self.request_id,
            "access"
        );
    }
}

/// The local hot-key cache answered (`kind`: [`m::CACHE_KINDS`]).
pub struct CacheAnswered {
    pub kind: &'static str,
}

impl CacheAnswered {
    pub fn emit(self) {
        m::cache_answer(self.kind);
        tracing::trace!(kind = self.kind, "cache answered");
    }
}

/// A request refused by a local rate limit (`limit`: global, user, ip).
pub struct RateLimited {
    pub limit: &'static str,
}

impl RateLimited {
    pub fn emit(self) {
        metrics::counter!(m::RATE_LIMITED, "limit" => self.limit).increment(1);
        tracing::debug!(limit = self.limit, "rate limited");
    }
}

static SHED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(1));

/// A claim shed, nothing claimed (`reason`: `inflight` = no backend slot in time,
/// `backlog` = the shard's claim log at `persister.max_backlog_per_shard`, `queue` = the
/// shard's group-commit queue at `stock.group_max_queue`). Logged at `warn`,
/// at most once a second.
pub struct Shed {
    pub reason: &'static str,
}

impl Shed {
    pub fn emit(self) {
        metrics::counter!(m::SHED, "reason" => self.reason).increment(1);
        if let Some(left_out) = SHED_LOG.admit() {
            tracing::warn!(
                reason = self.reason,
                left_out,
                "shedding claims: nothing claimed, answered 503"
            );
        }
    }
}

/// One claim call made (group commit, `stock/group.rs`) carrying `claims` claims. Counted
/// only: calls are the claim path's hottest event; the claims' own answers are logged.
pub struct ClaimCallMade {
    pub claims: usize,
}

impl ClaimCallMade {
    pub fn emit(self) {
        m::claim_call(self.claims as u64);
    }
}

/// A backend slot taken (the in-flight gauge goes up); see [`BackendSlotReleased`].
pub struct BackendSlotTaken;

impl BackendSlotTaken {
    pub fn emit(self) {
        metrics::gauge!(m::INFLIGHT).increment(1.0);
    }
}

/// A backend slot given back.
pub struct BackendSlotReleased;

impl BackendSlotReleased {
    pub fn emit(self) {
        metrics::gauge!(m::INFLIGHT).decrement(1.0);
    }
}

/// A client connection accepted.
pub struct ConnectionOpened;

impl ConnectionOpened {
    pub fn emit(self) {
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
    }
}

/// A client connection ended.
pub struct ConnectionClosed;

impl ConnectionClosed {
    pub fn emit(self) {
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

// ------------------------------------------------------------------------ the backend

/// One script call (`result`: [`m::BACKEND_RESULTS`]) and its latency.
pub struct BackendCalled {
    pub script: &'static str,
    pub result: &'static str,
    pub seconds: f64,
}

impl BackendCalled {
    pub fn emit(self) {
        m::backend_call(self.script, self.result, self.seconds);
        if self.result == "ok" {
            tracing::trace!(script = self.script, seconds = self.seconds, "script call");
        } else {
            tracing::debug!(
                script = self.script,
                result = self.result,
                "script call failed"
            );
        }
    }
}

/// A shard was found lost or rolled back (`kind`: one of [`m::SHARD_FAULT_KINDS`]); it is
/// fenced and repaired.
pub struct ShardFaultSeen<'a> {
    pub batch: &'a str,
    pub shard: u32,
    pub kind: &'static str,
}

impl ShardFaultSeen<'_> {
    pub fn emit(self) {
        metrics::counter!(m::SHARD_FAULTS, "kind" => self.kind).increment(1);
        tracing::error!(
            batch = self.batch,
            shard = self.shard,
            kind = self.kind,
            "shard fault: its claims answer 503 until it is repaired from the database"
        );
    }
}

/// A shard repair ended (`result`: one of [`m::SHARD_REPAIR_RESULTS`]).
pub struct ShardRepairEnded<'a> {
    pub batch: &'a str,
    pub shard: u32,
    pub result: &'static str,
    /// The report (repaired) or the error (failed).
    pub detail: &'a str,
    pub written_off: u64,
    pub seconds: f64,
}

impl ShardRepairEnded<'_> {
    pub fn emit(self) {
        metrics::counter!(m::SHARD_REPAIRS, "result" => self.result).increment(1);
        match self.result {
            "repaired" => {
                metrics::counter!(m::STOCK_WRITTEN_OFF).increment(self.written_off);
                metrics::histogram!(m::SHARD_REPAIR_SECONDS).record(self.seconds);
                tracing::warn!(
                    batch = self.batch,
                    shard = self.shard,
                    seconds = self.seconds,
                    "{}",
                    self.detail
                );
            }
            "failed" => tracing::error!(
                batch = self.batch,
                shard = self.shard,
                error = self.detail,
                "shard repair failed; retrying"
            ),
            _ => tracing::info!(
                batch = self.batch,
                shard = self.shard,
                result = self.result,
                "shard repair skipped"
            ),
        }
    }
}

/// A claim's replica confirmation (`redis.ack = "replica"`) ended: `result` is one of
/// [`m::REPLICA_CONFIRM_RESULTS`].
pub struct ReplicaConfirmed<'a> {
    pub result: &'static str,
    pub seconds: f64,
    /// Why it failed (`not_replicated`: "1 of 2"; `unavailable`: the error).
    pub detail: &'a str,
}

impl ReplicaConfirmed<'_> {
    pub fn emit(self) {
        metrics::counter!(m::REPLICA_CONFIRMS, "result" => self.result).increment(1);
        metrics::histogram!(m::REPLICA_CONFIRM_SECONDS).record(self.seconds);
        if self.result != "confirmed" {
            tracing::warn!(
                result = self.result,
                detail = self.detail,
                seconds = self.seconds,
                "claim not confirmed by replicas: answered 503, retry with the same request id"
            );
        }
    }
}

/// Redis answered NOSCRIPT (a restart, a failover, `SCRIPT FLUSH`): every script is loaded
/// again and the call retried.
pub struct ScriptsReloaded {
    pub script: &'static str,
}

impl ScriptsReloaded {
    pub fn emit(self) {
        metrics::counter!(m::BACKEND_RELOADS).increment(1);
        tracing::warn!(script = self.script, "NOSCRIPT: reloading scripts");
    }
}

// ------------------------------------------------------------------------ stock

/// A stock transfer between two slots of a batch (`kind`: initial, refill, steal), which
/// moved stock or found none to move.
pub struct TransferMade<'a> {
    pub batch: &'a str,
    pub kind: &'static str,
    pub amount: i64,
}

impl TransferMade<'_> {
    pub fn emit(self) {
        let result = if self.amount > 0 { "moved" } else { "empty" };
        metrics::counter!(m::TRANSFERS, "kind" => self.kind, "result" => result).increment(1);
        tracing::debug!(
            batch = self.batch,
            kind = self.kind,
            amount = self.amount,
            "stock transfer"
        );
    }
}

/// The sweeper finished a transfer interrupted between its two halves (a crash, a lost
/// reply): counted as `kind="sweep", result="finished"`, logged at `info`.
pub struct SweepFinished<'a> {
    pub batch: &'a str,
    pub transfer: &'a str,
    pub amount: i64,
}

impl SweepFinished<'_> {
    pub fn emit(self) {
        metrics::counter!(m::TRANSFERS, "kind" => "sweep", "result" => "finished").increment(1);
        tracing::info!(
            batch = self.batch,
            transfer = self.transfer,
            amount = self.amount,
            "sweeper finished an interrupted transfer"
        );
    }
}

/// A sweep of a batch failed (it is retried at the next interval). Not counted: it has no
/// metric of its own (the failing script calls are counted by [`BackendCalled`]).
pub struct SweepFailed<'a> {
    pub batch: &'a str,
    pub error: &'a str,
}

impl SweepFailed<'_> {
    pub fn emit(self) {
        tracing::debug!(batch = self.batch, error = self.error, "sweep failed");
    }
}

// ------------------------------------------------------------------------ batches

/// Redis lost a batch the database knows: claims are refused until it is rebuilt. `lost`
/// is how many batches this instance now serves as lost.
pub struct BatchLost<'a> {
    pub batch: &'a str,
    pub lost: usize,
}

impl BatchLost<'_> {
    pub fn emit(self) {
        metrics::gauge!(m::BATCHES_LOST).set(self.lost as f64);
        tracing::error!(batch = %self.batch,
            "the backend has lost this batch: claims refused until `claimgate rebuild --batch {}`",
            self.batch);
    }
}

/// A batch served as lost is back in Redis (rebuilt).
pub struct BatchRestored<'a> {
    pub batch: &'a str,
    pub lost: usize,
}

impl BatchRestored<'_> {
    pub fn emit(self) {
        metrics::gauge!(m::BATCHES_LOST).set(self.lost as f64);
        tracing::info!(batch = %self.batch, "batch is back in the backend; claims served again");
    }
}

/// A step of a batch's retirement (`recovery::retire`): `outcome` is one of
/// [`m::RETIRE_OUTCOMES`]; `detail` says what it waits for or why it failed.
pub struct BatchRetirement<'a> {
    pub batch: &'a str,
    pub outcome: &'static str,
    pub keys: u64,
    pub detail: &'a str,
}

impl BatchRetirement<'_> {
    pub fn emit(self) {
        metrics::counter!(m::BATCHES_RETIRED, "outcome" => self.outcome).increment(1);
        match self.outcome {
            "failed" => tracing::warn!(batch = %self.batch, detail = %self.detail,
                "retiring the batch failed; tried again next pass"),
            "waiting" => tracing::debug!(batch = %self.batch, detail = %self.detail,
                "the batch's retirement waits"),
            _ => tracing::info!(batch = %self.batch, outcome = self.outcome, keys = self.keys,
                "batch retirement"),
        }
    }
}

/// A pass of request-id rotation over one batch's shards (`recovery::rotate`): how many
/// shards gave each answer. One line per batch and pass when anything happened.
pub struct RequestIdsRotated<'a> {
    pub batch: &'a str,
    pub rotated: u64,
    pub started: u64,
    pub waiting: u64,
    pub failed: u64,
    pub detail: &'a str,
}

impl RequestIdsRotated<'_> {
    pub fn emit(self) {
        for (outcome, n) in [
            ("rotated", self.rotated),
            ("started", self.started),
            ("waiting", self.waiting),
            ("failed", self.failed),
        ] {
            if n > 0 {
                metrics::counter!(m::REQUEST_ID_ROTATIONS, "outcome" => outcome).increment(n);
            }
        }
        if self.failed > 0 {
            tracing::warn!(batch = %self.batch, failed = self.failed, detail = %self.detail,
                "rotating request ids failed on some shards; tried again next pass");
        } else if self.waiting > 0 {
            tracing::debug!(batch = %self.batch, waiting = self.waiting, detail = %self.detail,
                "request-id rotation waits for the persister");
        } else if self.rotated > 0 {
            tracing::info!(batch = %self.batch, shards = self.rotated,
                "request-id records past their retention dropped");
        }
    }
}

/// A request id looked up in the database because Redis no longer has its record (its shard
/// dropped records past the retention, or the batch retired: `stock::Stock::archived_claim`):
/// `outcome` is one of [`m::LOOKUP_OUTCOMES`].
pub struct RequestIdLookedUp {
    pub outcome: &'static str,
}

impl RequestIdLookedUp {
    pub fn emit(self) {
        metrics::counter!(m::REQUEST_ID_LOOKUPS, "outcome" => self.outcome).increment(1);
        tracing::debug!(
            outcome = self.outcome,
            "request id looked up in the database"
        );
    }
}

// ------------------------------------------------------------------------ the persister

/// A batch of log records committed to the database (`rows` new claims, `changes` changes
/// of managed coupons applied), after `seconds`. The rows counter counts both.
pub struct PersistWritten {
    pub rows: u64,
    pub changes: u64,
    pub seconds: f64,
}

impl PersistWritten {
    pub fn emit(self) {
        metrics::histogram!(m::PERSIST_SECONDS).record(self.seconds);
        metrics::counter!(m::PERSIST_ROWS).increment(self.rows + self.changes);
        tracing::debug!(
            rows = self.rows,
            changes = self.changes,
            seconds = self.seconds,
            "claims written to the database"
        );
    }
}

/// A persister failure (`stage`: read, write, ack, parse, probe, refresh). Every one is
/// counted; the log line is left out when the same message was logged just now.
pub struct PersistFailed<'a> {
    pub stage: &'static str,
    pub message: &'a str,
}

impl PersistFailed<'_> {
    pub fn emit(self, filter: &mut RepeatFilter) {
        metrics::counter!(m::PERSIST_ERRORS, "stage" => self.stage).increment(1);
        if filter.admit(self.message) {
            tracing::warn!(stage = self.stage, error = %self.message, "persister error");
        }
    }
}

/// The log entries waiting in Redis (all shard logs; a claim call's claims are one entry)
/// and the age of the oldest one.
pub struct BacklogMeasured {
    pub backlog: u64,
    pub lag_ms: u64,
}

impl BacklogMeasured {
    pub fn emit(self) {
        metrics::gauge!(m::PERSIST_BACKLOG).set(self.backlog as f64);
        metrics::gauge!(m::PERSIST_LAG).set(self.lag_ms as f64 / 1000.0);
        tracing::trace!(
            backlog = self.backlog,
            lag_ms = self.lag_ms,
            "persister backlog"
        );
    }
}

/// The shard logs the persister follows, after a refresh or a wake-up changed them.
pub struct ShardsFollowed {
    pub active: u64,
    pub dormant: u64,
}

impl ShardsFollowed {
    pub fn emit(self) {
        metrics::gauge!(m::PERSIST_SHARDS, "state" => "active").set(self.active as f64);
        metrics::gauge!(m::PERSIST_SHARDS, "state" => "dormant").set(self.dormant as f64);
        tracing::debug!(
            active = self.active,
            dormant = self.dormant,
            "persister shards"
        );
    }
}

/// One read of a shard log by the persister (`cause`: one of `PERSIST_READ_CAUSES`).
pub struct LogRead {
    pub cause: &'static str,
}

impl LogRead {
    pub fn emit(self) {
        metrics::counter!(m::PERSIST_READS, "cause" => self.cause).increment(1);
    }
}

/// A coupon id met with a different claim than the one the database holds (minted twice):
/// counted, and logged loudly, every one.
pub struct CouponConflict<'a> {
    pub coupon: &'a str,
    pub batch: &'a str,
    pub stored_user: &'a str,
    pub stored_request: &'a str,
    pub stored_claimed_at: i64,
    pub user: &'a str,
    pub request: &'a str,
    pub claimed_at: i64,
}

impl CouponConflict<'_> {
    pub fn emit(self) {
        metrics::counter!(m::COUPON_CONFLICTS).increment(1);
        tracing::error!(
            coupon = %self.coupon,
            batch = %self.batch,
            stored_user = %self.stored_user,
            stored_request = self.stored_request,
            stored_claimed_at = self.stored_claimed_at,
            user = %self.user,
            request = self.request,
            claimed_at = self.claimed_at,
            "COUPON ID MINTED TWICE: the database holds this coupon for another claim; the \
             new claim is recorded in coupon_conflicts and its owner does not have it"
        );
    }
}

// ------------------------------------------------------------------------ events out

static DELIVERY_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(1));

/// One delivery attempt of an event (`outcome`: [`m::DELIVERY_OUTCOMES`]). A failed attempt
/// is logged at `debug` (it is retried), at most once a second at `info`; a dead letter at
/// `warn`, every one.
pub struct EventAttempted<'a> {
    pub outcome: &'static str,
    pub event_id: &'a str,
    /// The attempt's number (1 = first).
    pub attempt: u32,
    pub status: Option<u16>,
    pub error: &'a str,
}

impl EventAttempted<'_> {
    pub fn emit(self) {
        metrics::counter!(m::EVENT_DELIVERIES, "outcome" => self.outcome).increment(1);
        let (event, attempt, status) = (self.event_id, self.attempt, self.status);
        match self.outcome {
            "dead" => tracing::warn!(
                event,
                attempt,
                ?status,
                error = self.error,
                "event dead-lettered: no more delivery attempts (GET /v1/events?state=dead)"
            ),
            "failed" => match DELIVERY_LOG.admit() {
                Some(left_out) => tracing::info!(
                    event,
                    attempt,
                    ?status,
                    error = self.error,
                    left_out,
                    "event delivery failed; retrying later"
                ),
                None => tracing::debug!(
                    event,
                    attempt,
                    ?status,
                    error = self.error,
                    "event delivery failed; retrying later"
                ),
            },
            _ => tracing::trace!(event, attempt, ?status, "event delivered"),
        }
    }
}

static DELIVERY_PASS_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A delivery pass failed on the database (retried at the next poll). Not counted: the
/// backlog gauge shows its effect.
pub struct DeliveryFailed<'a> {
    pub error: &'a str,
}

impl DeliveryFailed<'_> {
    pub fn emit(self) {
        if let Some(left_out) = DELIVERY_PASS_LOG.admit() {
            tracing::warn!(error = %self.error, left_out, "event delivery pass failed");
        }
    }
}

/// The outbox measured: events waiting, events dead, age of the oldest waiting one.
pub struct OutboxMeasured {
    pub pending: u64,
    pub dead: u64,
    pub lag_ms: u64,
}

impl OutboxMeasured {
    pub fn emit(self) {
        metrics::gauge!(m::EVENT_BACKLOG).set(self.pending as f64);
        metrics::gauge!(m::EVENT_DEAD).set(self.dead as f64);
        metrics::gauge!(m::EVENT_LAG).set(self.lag_ms as f64 / 1000.0);
        tracing::trace!(
            pending = self.pending,
            dead = self.dead,
            lag_ms = self.lag_ms,
            "outbox measured"
        );
    }
}

/// A sweep pass wrote `expired` coupons, lapsed locks' releases and "expiring soon"
/// reminders.
pub struct CouponsSwept {
    pub expired: u64,
    pub released: u64,
    pub reminded: u64,
}

impl CouponsSwept {
    pub fn emit(self) {
        metrics::counter!(m::COUPONS_SWEPT, "kind" => "expired").increment(self.expired);
        metrics::counter!(m::COUPONS_SWEPT, "kind" => "released").increment(self.released);
        metrics::counter!(m::COUPONS_SWEPT, "kind" => "reminded").increment(self.reminded);
        if self.expired + self.released + self.reminded > 0 {
            tracing::debug!(
                expired = self.expired,
                released = self.released,
                reminded = self.reminded,
                "coupon sweep"
            );
        }
    }
}

static WALLET_READ_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A wallet page was read: from the cache, the database, or (the database failing) only
/// the recent coupons.
pub struct WalletRead<'a> {
    pub source: &'static str,
    pub error: Option<&'a str>,
}

impl WalletRead<'_> {
    pub fn emit(self) {
        metrics::counter!(m::WALLET_READS, "source" => self.source).increment(1);
        if let Some(error) = self.error
            && let Some(suppressed) = WALLET_READ_LOG.admit()
        {
            let what = if self.source == "partial" {
                "wallet read without the database: recent coupons only"
            } else {
                "wallet read without the shards: the database's page only"
            };
            tracing::warn!(error, suppressed, "{what}");
        }
    }
}

static TOUCH_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A coupon was touched in its user's recent set (or the touch failed: the wallet may miss
/// it until the database has it).
pub struct RecentTouched {
    pub error: Option<String>,
}

impl RecentTouched {
    pub fn emit(self) {
        let outcome = if self.error.is_some() { "error" } else { "ok" };
        metrics::counter!(m::RECENT_TOUCHES, "outcome" => outcome).increment(1);
        if let Some(error) = self.error
            && let Some(suppressed) = TOUCH_LOG.admit()
        {
            tracing::warn!(%error, suppressed, "recent coupons not touched");
        }
    }
}

/// The persister met a change record of a coupon version the database holds decided
/// differently (a shard a failover rolled back decided it again); the database keeps the
/// first decision.
pub struct CouponChangeDiverged<'a> {
    pub coupon_id: &'a str,
}

impl CouponChangeDiverged<'_> {
    pub fn emit(self) {
        metrics::counter!(m::COUPON_CHANGE_CONFLICTS).increment(1);
        tracing::error!(
            coupon_id = self.coupon_id,
            "a coupon change decided twice differently (rolled-back shard?): the database \
             keeps the first; check the coupon"
        );
    }
}

/// A change of a coupon whose state lives on its shard: its outcome (one of
/// `COUPON_CHANGE_OUTCOMES`).
pub struct CouponChanged {
    pub outcome: &'static str,
}

impl CouponChanged {
    pub fn emit(self) {
        metrics::counter!(m::COUPON_CHANGES, "outcome" => self.outcome).increment(1);
        tracing::debug!(outcome = self.outcome, "coupon change");
    }
}

static SWEEP_PASS_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A coupon sweep pass failed on the database (retried at the next interval).
pub struct SweepPassFailed<'a> {
    pub error: &'a str,
}

impl SweepPassFailed<'_> {
    pub fn emit(self) {
        if let Some(left_out) = SWEEP_PASS_LOG.admit() {
            tracing::warn!(error = %self.error, left_out, "coupon sweep failed");
        }
    }
}

// ------------------------------------------------------------------------ grant jobs

/// A grant job's life: `event` is one of `metrics::GRANT_JOB_EVENTS`; `detail` says why a
/// run was interrupted or a job failed.
pub struct GrantJobEvent<'a> {
    pub event: &'static str,
    pub job: &'a str,
    pub batch: &'a str,
    pub detail: &'a str,
}

static GRANT_INTERRUPTED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

impl GrantJobEvent<'_> {
    pub fn emit(self) {
        metrics::counter!(m::GRANT_JOBS, "event" => self.event).increment(1);
        let (job, batch, detail) = (self.job, self.batch, self.detail);
        match self.event {
            "failed" => tracing::warn!(job, batch, detail, "grant job failed"),
            "interrupted" => {
                if let Some(left_out) = GRANT_INTERRUPTED_LOG.admit() {
                    tracing::warn!(
                        job,
                        batch,
                        detail,
                        left_out,
                        "grant job interrupted; it resumes after its lease"
                    );
                }
            }
            event => tracing::info!(job, batch, event, "grant job"),
        }
    }
}

/// The users of one checkpointed chunk of a grant job, by outcome.
pub struct GrantsDecided {
    pub granted: u64,
    pub skipped_limit: u64,
    pub skipped_sold_out: u64,
    pub failed: u64,
}

impl GrantsDecided {
    pub fn emit(self) {
        for (outcome, n) in [
            ("granted", self.granted),
            ("skipped_limit", self.skipped_limit),
            ("skipped_sold_out", self.skipped_sold_out),
            ("failed", self.failed),
        ] {
            metrics::counter!(m::GRANT_USERS, "outcome" => outcome).increment(n);
        }
        tracing::debug!(
            granted = self.granted,
            skipped_limit = self.skipped_limit,
            skipped_sold_out = self.skipped_sold_out,
            failed = self.failed,
            "grant chunk decided"
        );
    }
}

/// Codes received for a batch with codes (an import, or a create's generated codes),
/// counted once each by what became of them.
pub struct CodesReceived<'a> {
    pub batch: &'a str,
    /// `import` or `generate`.
    pub source: &'static str,
    pub added: u64,
    pub duplicates: u64,
    pub invalid: u64,
    pub over_capacity: u64,
}

impl CodesReceived<'_> {
    pub fn emit(self) {
        for (outcome, n) in [
            ("added", self.added),
            ("duplicate", self.duplicates),
            ("invalid", self.invalid),
            ("over_capacity", self.over_capacity),
        ] {
            metrics::counter!(m::CODES, "outcome" => outcome).increment(n);
        }
        tracing::info!(
            batch = self.batch,
            source = self.source,
            added = self.added,
            duplicates = self.duplicates,
            invalid = self.invalid,
            over_capacity = self.over_capacity,
            "codes received"
        );
    }
}

// ------------------------------------------------------------------------ the process

/// This process serves `version` on the `backend` (a constant gauge at 1).
pub struct Started {
    pub version: &'static str,
    pub backend: &'static str,
}

impl Started {
    pub fn emit(self) {
        metrics::gauge!(m::BUILD_INFO, "version" => self.version, "backend" => self.backend)
            .set(1.0);
    }
}

/// The gateway serves: the one startup line, with what an operator needs to tell which
/// build runs, from which configuration, on what (every URL's password redacted by the
/// caller). `store` is the append-only file (`memory` without one) for the embedded
/// backend, the Redis URL for the redis backend.
pub struct Serving<'a> {
    pub version: &'static str,
    /// The config file, or `built-in defaults`.
    pub config: &'a str,
    pub backend: &'static str,
    pub listen: &'a str,
    /// `metrics.admin_listen`, or `none`.
    pub admin_listen: &'a str,
    pub database: &'a str,
    pub store: &'a str,
}

impl Serving<'_> {
    pub fn emit(self) {
        let Serving {
            version,
            config,
            backend,
            listen,
            admin_listen,
            database,
            store,
        } = self;
        match backend {
            "embedded" => tracing::info!(
                version,
                config,
                backend,
                listen,
                admin_listen,
                database,
                aof = store,
                "claimgate serving"
            ),
            _ => tracing::info!(
                version,
                config,
                backend,
                listen,
                admin_listen,
                database,
                redis = store,
                "claimgate serving"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_filter_lets_each_message_through_once_per_period() {
        let mut f = RepeatFilter::new(Duration::from_secs(60));
        assert!(f.admit("a"));
        assert!(!f.admit("a"));
        assert!(f.admit("b"));
        assert!(f.admit("a"), "another message came in between");
        let mut quick = RepeatFilter::new(Duration::ZERO);
        assert!(quick.admit("a") && quick.admit("a"));
    }

    #[test]
    fn a_log_limiter_counts_what_it_leaves_out() {
        let l = LogLimiter::new(Duration::from_secs(60));
        assert_eq!(l.admit(), Some(0));
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        let now = l.last_ms.load(Ordering::Relaxed);
        l.last_ms.store(now - 61_000, Ordering::Relaxed);
        assert_eq!(l.admit(), Some(2));
    }
}
