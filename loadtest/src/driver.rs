//! The load driver: runs a plan over many connections in closed loop (each connection
//! sends its next request when the previous answer arrives) or open loop (requests at
//! fixed intended times `t0 + i/R`, latency measured from the intended time so that a
//! slow server cannot hide its queueing delay: no coordinated omission). It classes every
//! outcome (expected or unexpected), notes when the first `410 sold_out` arrived, and can
//! keep a bounded per-interval timeline for `--report`. A checkout (one plan index of the
//! checkout scenario) is a short sequence of requests on the same connection: claim,
//! wallet reads, lock (retried, bounded by `--lock-wait-ms`, while the coupon is not yet in
//! the database), redeem; every one of them is classed and counted like any request.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::ScenarioKind;
use crate::client::{self, Api, HttpRequest, Reply, TransportError};
use crate::history::{ClaimRecord, Phase};
use crate::outcome::{Class, Expectations, GAVE_UP, NOT_PERSISTED};
use crate::progress::Live;
use crate::report::{Endpoint, Stats, Step};
use crate::scenario::{Checkout, Claim, Plan, Request};
use crate::timeline::{self, Recorder, Timeline};

/// An open-loop request whose intended time is at most this far ahead is sent at once
/// (tokio timers have millisecond granularity and round up). Early sends measure their
/// latency from the actual send time.
pub const TIMER_SLACK: Duration = Duration::from_millis(1);

/// How many connections are opened at the same time while warming up.
const WARM_UP_PARALLELISM: usize = 128;

/// Closed or open loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Every connection keeps exactly one request in flight.
    Closed,
    /// Requests at a fixed rate (req/s), spread over the connections.
    Open { rate: f64 },
}

/// How one phase of a run is driven.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub connections: u32,
    pub mode: Mode,
    /// Send nothing after this long (open loop: schedule nothing at or after it).
    pub duration: Option<Duration>,
    /// Send at most this many requests.
    pub requests: Option<u64>,
    pub timeout: Duration,
    /// Keep a [`ClaimRecord`] for every claim.
    pub record_history: bool,
    /// Stop as soon as a claim is answered `410 sold_out` (used to drain a batch).
    pub stop_on_sold_out: bool,
    pub phase: Phase,
    /// What counts as an expected outcome in this phase.
    pub expect: Expectations,
    /// Keep a per-interval timeline (for `--report`).
    pub timeline: bool,
    /// The checkout scenario's knobs.
    pub checkout: CheckoutConfig,
}

/// How a checkout is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckoutConfig {
    /// Wallet reads between the claim and the lock.
    pub wallet_reads: u32,
    /// How long a lock answered `404 coupon_not_found` is retried.
    pub lock_wait: Duration,
}

impl Default for CheckoutConfig {
    fn default() -> Self {
        Self {
            wallet_reads: 3,
            lock_wait: Duration::from_secs(5),
        }
    }
}

/// A coupon a checkout redeemed (answered 200), for `--verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub user: String,
    pub coupon_id: String,
}

/// A connection the driver can send requests on.
pub trait Exchange: Send + 'static {
    /// Sends one request and reads the whole answer within `timeout`.
    fn send(
        &mut self,
        req: HttpRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<Reply, TransportError>> + Send;
    /// Opens the connection ahead of the measured phase.
    fn warm_up(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Connections opened so far.
    fn opened(&self) -> u64;
}

impl Exchange for client::Connection {
    fn send(
        &mut self,
        req: HttpRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<Reply, TransportError>> + Send {
        client::Connection::send(self, req, timeout)
    }

    fn warm_up(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        client::Connection::warm_up(self, timeout)
    }

    fn opened(&self) -> u64 {
        client::Connection::opened(self)
    }
}

/// Everything a phase shares besides its configuration.
#[derive(Clone)]
pub struct RunContext {
    pub plan: Arc<Plan>,
    pub api: Arc<Api>,
    /// Origin of all `*_us` timestamps in the history.
    pub epoch: Instant,
    pub live: Arc<Live>,
    /// Turns true on Ctrl-C.
    pub cancel: watch::Receiver<bool>,
}

/// What a phase produced.
#[derive(Debug)]
pub struct RunResult {
    pub stats: Stats,
    pub history: Vec<ClaimRecord>,
    /// Checkout: the coupons redeemed (kept when the history is).
    pub redeemed: Vec<Redeemed>,
    /// When the phase started (after the connections were opened).
    pub t0: Instant,
    /// From `t0` to the last answer.
    pub elapsed: Duration,
    /// Open loop: scheduled requests never sent.
    pub unsent: u64,
    pub interrupted: bool,
    pub sold_out_seen: bool,
    /// From `t0` to the first claim answered `410 sold_out`.
    pub sold_out_after: Option<Duration>,
    /// The per-interval timeline, when asked for.
    pub timeline: Option<Timeline>,
}

/// The intended send times of an open-loop run: request `i` at `t0 + i/rate`, computed
/// from `i` directly (no accumulated drift).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    t0: Instant,
    rate: f64,
}

impl Schedule {
    pub fn new(t0: Instant, rate: f64) -> Self {
        Self { t0, rate }
    }

    /// Offset of request `i` from `t0`.
    pub fn offset(&self, i: u64) -> Duration {
        let nanos = (i as f64 * 1e9 / self.rate).round();
        if nanos >= u64::MAX as f64 {
            Duration::from_nanos(u64::MAX)
        } else {
            Duration::from_nanos(nanos as u64)
        }
    }

    /// Intended send time of request `i`.
    pub fn intended(&self, i: u64) -> Instant {
        self.t0 + self.offset(i)
    }

    /// How many requests are intended strictly before `t0 + span`.
    pub fn count_within(&self, span: Duration) -> u64 {
        let estimate = (span.as_secs_f64() * self.rate).ceil();
        let mut n = if estimate >= u64::MAX as f64 {
            u64::MAX
        } else {
            estimate as u64
        };
        // Align with `offset`'s rounding so that the count and the schedule agree.
        while n > 0 && self.offset(n - 1) >= span {
            n -= 1;
        }
        while n < u64::MAX && self.offset(n) < span {
            n += 1;
        }
        n
    }
}

/// Where a request's latency is measured from: its intended send time in open loop (a
/// request that had to wait for a free connection is charged for the wait), or the
/// moment it was handed to the connection in closed loop or when sent early.
pub fn latency_origin(intended: Option<Instant>, started: Instant) -> Instant {
    match intended {
        Some(t) => t.min(started),
        None => started,
    }
}

/// State shared by the connections of one phase.
struct Shared {
    next: AtomicU64,
    stop: AtomicBool,
    /// Arrival of the first `410 sold_out`, ns since `t0`; `u64::MAX` until one came.
    first_sold_out_ns: AtomicU64,
    timeline: Option<Arc<Mutex<Timeline>>>,
}

/// Limits computed once per phase.
#[derive(Clone, Copy)]
struct Bounds {
    schedule: Option<Schedule>,
    /// Closed loop: no request starts after this.
    deadline: Option<Instant>,
    /// Requests with index below this may be sent.
    max_requests: Option<u64>,
    /// Open loop: nothing is sent after this (the gateway fell too far behind).
    hard_stop: Option<Instant>,
}

struct WorkerOutput {
    stats: Stats,
    /// Plan items (requests, or whole checkouts) this connection started.
    started: u64,
    history: Vec<ClaimRecord>,
    redeemed: Vec<Redeemed>,
    last_done: Option<Instant>,
}

/// Runs one phase over `cfg.connections` connections made by `connect`; `on_start` is
/// called with the start time once the connections are open and the clock starts.
pub async fn run<C, F>(
    cfg: &DriverConfig,
    ctx: &RunContext,
    connect: F,
    on_start: impl FnOnce(Instant),
) -> anyhow::Result<RunResult>
where
    C: Exchange,
    F: Fn() -> C,
{
    if cfg.duration.is_none() && cfg.requests.is_none() {
        anyhow::bail!("a run needs a duration or a request count");
    }
    let conns = warm_up(cfg, (0..cfg.connections).map(|_| connect()).collect()).await?;

    let t0 = Instant::now();
    on_start(t0);
    let bounds = bounds(cfg, t0);
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_sold_out_ns: AtomicU64::new(u64::MAX),
        timeline: cfg
            .timeline
            .then(|| Arc::new(Mutex::new(Timeline::default()))),
    });
    let mut set = JoinSet::new();
    for conn in conns {
        let cfg = cfg.clone();
        let ctx = ctx.clone();
        let shared = Arc::clone(&shared);
        set.spawn(worker(conn, cfg, ctx, shared, bounds, t0));
    }

    let mut stats = Stats::new();
    let mut history = Vec::new();
    let mut redeemed = Vec::new();
    let mut started: u64 = 0;
    let mut last_done: Option<Instant> = None;
    let mut failure = None;
    while let Some(joined) = set.join_next().await {
        match joined.context("a connection task panicked").and_then(|r| r) {
            Ok(out) => {
                stats.merge(&out.stats);
                history.extend(out.history);
                redeemed.extend(out.redeemed);
                started += out.started;
                last_done = last_done.max(out.last_done);
            }
            Err(e) => {
                shared.stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    history.sort_by_key(|r| (r.send_us, r.recv_us));

    let interrupted = *ctx.cancel.borrow();
    let unsent = match (bounds.schedule, interrupted) {
        (Some(_), false) => bounds
            .max_requests
            .unwrap_or(0)
            // Plan items, not requests: a checkout is one item of several requests.
            .saturating_sub(started),
        _ => 0,
    };
    let mut elapsed = last_done.map_or(Duration::ZERO, |d| d.saturating_duration_since(t0));
    if let (Some(s), Some(planned), false) = (bounds.schedule, bounds.max_requests, interrupted) {
        // Open loop measures over the whole schedule window, so that a gateway that keeps
        // up reports exactly the target rate.
        elapsed = elapsed.max(s.offset(planned));
    }
    let sold_out_after = match shared.first_sold_out_ns.load(Ordering::Relaxed) {
        u64::MAX => None,
        ns => Some(Duration::from_nanos(ns)),
    };
    Ok(RunResult {
        stats,
        history,
        redeemed,
        t0,
        elapsed,
        unsent,
        interrupted,
        sold_out_seen: sold_out_after.is_some(),
        sold_out_after,
        timeline: shared.timeline.as_deref().map(timeline::snapshot),
    })
}

/// Opens every connection before the clock starts (a few at a time). A connection that
/// cannot be opened now will try again on its first request, where a failure counts.
async fn warm_up<C: Exchange>(cfg: &DriverConfig, conns: Vec<C>) -> anyhow::Result<Vec<C>> {
    let permits = Arc::new(Semaphore::new(WARM_UP_PARALLELISM));
    let mut set = JoinSet::new();
    for mut conn in conns {
        let permits = Arc::clone(&permits);
        let timeout = cfg.timeout;
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            // Errors are deliberately left for the first request to report.
            let _ = conn.warm_up(timeout).await;
            conn
        });
    }
    let mut out = Vec::with_capacity(set.len());
    while let Some(conn) = set.join_next().await {
        out.push(conn.context("warming up a connection panicked")?);
    }
    Ok(out)
}

fn bounds(cfg: &DriverConfig, t0: Instant) -> Bounds {
    match cfg.mode {
        Mode::Closed => Bounds {
            schedule: None,
            deadline: cfg.duration.map(|d| t0 + d),
            max_requests: cfg.requests,
            hard_stop: None,
        },
        Mode::Open { rate } => {
            let schedule = Schedule::new(t0, rate);
            let within = cfg.duration.map(|d| schedule.count_within(d));
            let planned = match (within, cfg.requests) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => 0,
            };
            let last = schedule.intended(planned.saturating_sub(1));
            Bounds {
                schedule: Some(schedule),
                deadline: None,
                max_requests: Some(planned),
                hard_stop: Some(last + cfg.timeout + TIMER_SLACK),
            }
        }
    }
}

fn endpoint(req: &Request) -> Endpoint {
    match req {
        Request::Claim(_) | Request::Checkout(_) => Endpoint::Claim,
        Request::GetBatch => Endpoint::GetBatch,
        Request::Health => Endpoint::Health,
        Request::Product(_) => Endpoint::Product,
        Request::Quote => Endpoint::Quote,
    }
}

fn micros_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
}

/// The step of a checkout an endpoint stands for.
fn step(ep: Endpoint) -> Option<Step> {
    match ep {
        Endpoint::Claim => Some(Step::Claim),
        Endpoint::Wallet => Some(Step::Wallet),
        Endpoint::Lock => Some(Step::Lock),
        Endpoint::Redeem => Some(Step::Redeem),
        Endpoint::GetBatch | Endpoint::Health | Endpoint::Product | Endpoint::Quote => None,
    }
}

/// One answered (or failed) request, as recorded.
struct Answer {
    status: Option<u16>,
    /// The recorded `error` code (`transport:<kind>` without an answer).
    error: Option<String>,
    coupon_id: Option<String>,
    body: Bytes,
    class: Class,
    started: Instant,
    done: Instant,
}

/// One connection's sending state within a phase: every request it sends is classed,
/// counted and timed in one place ([`Lane::exchange`]).
struct Lane<'a, C> {
    conn: C,
    cfg: &'a DriverConfig,
    ctx: &'a RunContext,
    shared: &'a Shared,
    recorder: Option<Recorder>,
    stats: Stats,
    history: Vec<ClaimRecord>,
    redeemed: Vec<Redeemed>,
    last_done: Option<Instant>,
    t0: Instant,
}

impl<C: Exchange> Lane<'_, C> {
    /// Sends `http` and records its outcome. `intended` is the open-loop send time (the
    /// latency origin); `last_lock_try` marks a checkout's final lock attempt, whose
    /// `404 coupon_not_found` is recorded as given up ([`GAVE_UP`]).
    async fn exchange(
        &mut self,
        ep: Endpoint,
        http: HttpRequest,
        intended: Option<Instant>,
        last_lock_try: bool,
    ) -> Answer {
        let started = Instant::now();
        let result = self.conn.send(http, self.cfg.timeout).await;
        let done = Instant::now();
        self.last_done = Some(done);
        let latency = done.saturating_duration_since(latency_origin(intended, started));
        match result {
            Ok(reply) => {
                let mut parsed = if ep == Endpoint::Claim || reply.status >= 400 {
                    client::parse_body(&reply.body)
                } else {
                    client::Parsed::default()
                };
                if last_lock_try
                    && reply.status == 404
                    && parsed.error.as_deref() == Some(NOT_PERSISTED)
                {
                    parsed.error = Some(GAVE_UP.to_string());
                }
                let class =
                    self.cfg
                        .expect
                        .classify(ep, Some(reply.status), parsed.error.as_deref());
                self.ctx.live.answered(reply.status, class);
                if ep == Endpoint::Claim
                    && reply.status == 410
                    && parsed.error.as_deref() == Some("sold_out")
                {
                    let ns = u64::try_from(done.saturating_duration_since(self.t0).as_nanos())
                        .unwrap_or(u64::MAX - 1);
                    self.shared
                        .first_sold_out_ns
                        .fetch_min(ns, Ordering::Relaxed);
                    if self.cfg.stop_on_sold_out {
                        self.shared.stop.store(true, Ordering::Relaxed);
                    }
                }
                if let Some(r) = self.recorder.as_mut() {
                    let ok = ep == Endpoint::Claim && reply.status == 201;
                    r.record(done, Some(latency), ok, class);
                }
                if self.cfg.expect.scenario == ScenarioKind::Checkout
                    && let Some(s) = step(ep)
                {
                    self.stats.checkout_mut().record_latency(s, latency);
                }
                self.stats
                    .record_reply(ep, reply.status, parsed.error.clone(), latency);
                Answer {
                    status: Some(reply.status),
                    error: parsed.error,
                    coupon_id: parsed.coupon_id,
                    body: reply.body,
                    class,
                    started,
                    done,
                }
            }
            Err(e) => {
                self.ctx.live.failed();
                if let Some(r) = self.recorder.as_mut() {
                    r.record(done, None, false, Class::Unexpected);
                }
                self.stats.record_transport(ep, e.kind());
                Answer {
                    status: None,
                    error: Some(format!("transport:{}", e.kind())),
                    coupon_id: None,
                    body: Bytes::new(),
                    class: Class::Unexpected,
                    started,
                    done,
                }
            }
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed) || *self.ctx.cancel.borrow()
    }

    /// Keeps the claim's record for `--verify` / `--history`.
    fn record_claim(&mut self, c: &Claim, a: &Answer, intended: Option<Instant>) {
        if !self.cfg.record_history {
            return;
        }
        self.history.push(ClaimRecord {
            phase: self.cfg.phase,
            user: c.user_id.clone(),
            request_id: c.request_id.clone(),
            status: a.status,
            error: a.error.clone(),
            coupon_id: a.coupon_id.clone(),
            class: a.class,
            intended_us: intended.map(|t| micros_since(self.ctx.epoch, t)),
            send_us: micros_since(self.ctx.epoch, a.started),
            recv_us: micros_since(self.ctx.epoch, a.done),
        });
    }

    /// One checkout after its claim answered `a`: wallet reads, the lock (retrying
    /// `404 coupon_not_found` until `lock_wait` is over), the redeem.
    async fn checkout(&mut self, co: &Checkout, a: &Answer) -> anyhow::Result<()> {
        self.stats.checkout_mut().checkouts += 1;
        let (Some(200 | 201), Some(coupon)) = (a.status, a.coupon_id.clone()) else {
            return Ok(());
        };
        let user = co.claim.user_id.as_str();
        let api = Arc::clone(&self.ctx.api);
        for _ in 0..self.cfg.checkout.wallet_reads {
            if self.stopped() {
                return Ok(());
            }
            let w = self
                .exchange(
                    Endpoint::Wallet,
                    build(api.wallet_unused(user))?,
                    None,
                    false,
                )
                .await;
            if w.status == Some(200) {
                let c = self.stats.checkout_mut();
                c.wallet_reads_ok += 1;
                if !contains(&w.body, coupon.as_bytes()) {
                    c.wallet_reads_without_coupon += 1;
                }
            }
        }
        let lock_deadline = Instant::now() + self.cfg.checkout.lock_wait;
        let mut backoff = LOCK_BACKOFF_MIN;
        loop {
            if self.stopped() {
                return Ok(());
            }
            let last = Instant::now() + backoff > lock_deadline;
            let http = build(api.coupon_action(&coupon, "lock", &co.order_id, user))?;
            let l = self.exchange(Endpoint::Lock, http, None, last).await;
            match (l.status, l.error.as_deref()) {
                (Some(200), _) => {
                    self.stats.checkout_mut().locks_ok += 1;
                    break;
                }
                (Some(404), Some(NOT_PERSISTED)) => {
                    self.stats.checkout_mut().lock_not_persisted += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(LOCK_BACKOFF_MAX);
                }
                (Some(404), Some(GAVE_UP)) => {
                    self.stats.checkout_mut().lock_gave_up += 1;
                    return Ok(());
                }
                (Some(409), _) => {
                    self.stats.checkout_mut().conflicts += 1;
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
        if self.stopped() {
            return Ok(());
        }
        let http = build(api.coupon_action(&coupon, "redeem", &co.order_id, user))?;
        let r = self.exchange(Endpoint::Redeem, http, None, false).await;
        match r.status {
            Some(200) => {
                self.stats.checkout_mut().pairs_ok += 1;
                if self.cfg.record_history {
                    self.redeemed.push(Redeemed {
                        user: user.to_string(),
                        coupon_id: coupon,
                    });
                }
            }
            Some(409) => self.stats.checkout_mut().conflicts += 1,
            _ => {}
        }
        Ok(())
    }
}

/// First wait before retrying a lock that found no coupon yet (doubled each try).
const LOCK_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two lock tries.
const LOCK_BACKOFF_MAX: Duration = Duration::from_millis(100);

fn build(r: Result<HttpRequest, client::BuildError>) -> anyhow::Result<HttpRequest> {
    r.map_err(|e| anyhow::Error::new(e).context("building a request"))
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn worker<C: Exchange>(
    conn: C,
    cfg: DriverConfig,
    ctx: RunContext,
    shared: Arc<Shared>,
    b: Bounds,
    t0: Instant,
) -> anyhow::Result<WorkerOutput> {
    let recorder = shared
        .timeline
        .as_ref()
        .map(|t| Recorder::new(Arc::clone(t), t0));
    let mut cancel = ctx.cancel.clone();
    let mut lane = Lane {
        conn,
        cfg: &cfg,
        ctx: &ctx,
        shared: &shared,
        recorder,
        stats: Stats::new(),
        history: Vec::new(),
        redeemed: Vec::new(),
        last_done: None,
        t0,
    };
    let mut started: u64 = 0;

    loop {
        if lane.stopped() {
            break;
        }
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        if b.max_requests.is_some_and(|n| i >= n) {
            break;
        }
        let intended = match b.schedule {
            Some(s) => {
                let t = s.intended(i);
                if t > Instant::now() + TIMER_SLACK {
                    tokio::select! {
                        () = tokio::time::sleep_until(t - TIMER_SLACK) => {}
                        Ok(_) = cancel.wait_for(|c| *c) => break,
                    }
                }
                Some(t)
            }
            None => None,
        };
        let now = Instant::now();
        if b.deadline.is_some_and(|d| now >= d) || b.hard_stop.is_some_and(|h| now > h) {
            break;
        }

        let req = ctx.plan.request(i);
        let ep = endpoint(&req);
        let http = match ctx.api.build(&req) {
            Ok(r) => r,
            Err(e) => {
                shared.stop.store(true, Ordering::Relaxed);
                return Err(anyhow::Error::new(e).context("building a request"));
            }
        };
        started += 1;
        let a = lane.exchange(ep, http, intended, false).await;
        match &req {
            Request::Claim(c) => lane.record_claim(c, &a, intended),
            Request::Checkout(co) => {
                lane.record_claim(&co.claim, &a, intended);
                if let Err(e) = lane.checkout(co, &a).await {
                    shared.stop.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            Request::GetBatch | Request::Health | Request::Product(_) | Request::Quote => {}
        }
    }
    let Lane {
        conn,
        mut stats,
        history,
        redeemed,
        last_done,
        recorder,
        ..
    } = lane;
    stats.connections_opened = conn.opened();
    stats.reconnects = conn.opened().saturating_sub(1);
    if let Some(r) = recorder {
        r.finish();
    }
    Ok(WorkerOutput {
        stats,
        started,
        history,
        redeemed,
        last_done,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::cli::{ScenarioKind, parse_target};
    use crate::scenario::PlanParams;

    #[test]
    fn schedule_is_drift_free() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(1000), Duration::from_secs(1));
        assert_eq!(s.offset(3_600_000), Duration::from_secs(3600));
        let third = Schedule::new(t0, 3.0);
        assert_eq!(third.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(third.offset(3), Duration::from_secs(1));
        assert_eq!(third.offset(300_000), Duration::from_secs(100_000));
        // Monotonic.
        let odd = Schedule::new(t0, 7919.3);
        assert!((0..10_000).all(|i| odd.offset(i) < odd.offset(i + 1)));
    }

    #[test]
    fn schedule_counts_requests_within_a_span() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0);
        assert_eq!(s.count_within(Duration::from_secs(1)), 1000);
        assert_eq!(s.count_within(Duration::from_micros(1500)), 2);
        assert_eq!(s.count_within(Duration::ZERO), 0);
        let slow = Schedule::new(t0, 0.5);
        assert_eq!(slow.count_within(Duration::from_secs(1)), 1);
        assert_eq!(slow.count_within(Duration::from_secs(2)), 1);
        assert_eq!(slow.count_within(Duration::from_millis(2001)), 2);
        let third = Schedule::new(t0, 3.0);
        assert_eq!(third.count_within(Duration::from_secs(1)), 3);
        for span_ms in [1, 333, 334, 999, 1000, 1001, 12_345] {
            let span = Duration::from_millis(span_ms);
            let n = third.count_within(span);
            assert!(n == 0 || third.offset(n - 1) < span);
            assert!(third.offset(n) >= span);
        }
    }

    #[test]
    fn latency_accounting() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Closed loop: from the hand-over to the connection.
        assert_eq!(latency_origin(None, t0 + ms(7)), t0 + ms(7));
        // Open loop, sent late (waited for a free connection): from the intended time.
        assert_eq!(latency_origin(Some(t0), t0 + ms(50)), t0);
        // Open loop, sent slightly early (timer slack): from the actual send.
        assert_eq!(latency_origin(Some(t0 + ms(1)), t0), t0);
    }

    /// A connection that answers every request with 200 after a fixed service time.
    struct FakeConn {
        service: Duration,
        sent_at: Arc<std::sync::Mutex<Vec<Instant>>>,
    }

    impl Exchange for FakeConn {
        fn send(
            &mut self,
            _req: HttpRequest,
            _timeout: Duration,
        ) -> impl Future<Output = Result<Reply, TransportError>> + Send {
            if let Ok(mut v) = self.sent_at.lock() {
                v.push(Instant::now());
            }
            let service = self.service;
            async move {
                tokio::time::sleep(service).await;
                Ok(Reply {
                    status: 200,
                    body: Bytes::new(),
                })
            }
        }

        async fn warm_up(&mut self, _timeout: Duration) -> Result<(), TransportError> {
            Ok(())
        }

        fn opened(&self) -> u64 {
            1
        }
    }

    fn ctx() -> (RunContext, watch::Sender<bool>) {
        let target = Arc::new(parse_target("http://127.0.0.1:9").expect("target"));
        let params = PlanParams {
            seed: 1,
            users: 10,
            bot_fraction: 0.0,
            bots: 1,
            zipf_exponent: 1.0,
            copies: 1,
            read_fraction: 0.0,
        };
        let (tx, rx) = watch::channel(false);
        (
            RunContext {
                plan: Arc::new(Plan::for_scenario(ScenarioKind::Trivial, &params)),
                api: Arc::new(Api::new(target, "", None, None).expect("api")),
                epoch: Instant::now(),
                live: Arc::new(Live::default()),
                cancel: rx,
            },
            tx,
        )
    }

    fn config(mode: Mode, connections: u32) -> DriverConfig {
        DriverConfig {
            connections,
            mode,
            duration: None,
            requests: Some(10),
            timeout: Duration::from_secs(5),
            record_history: false,
            stop_on_sold_out: false,
            phase: Phase::Measure,
            expect: Expectations {
                scenario: ScenarioKind::Trivial,
                phase: Phase::Measure,
                shedding: false,
                foreign_batch: false,
            },
            timeline: false,
            checkout: CheckoutConfig::default(),
        }
    }

    fn quantile_ms(stats: &Stats, q: f64) -> f64 {
        stats.latency.value_at_quantile(q) as f64 / 1000.0
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_charges_queueing_to_the_request() {
        // 1 connection, 100 req/s (10 ms apart), 20 ms service: request k goes out at
        // 20k ms and returns at 20(k+1) ms, its latency from the intended 10k ms is
        // 10k + 20 ms. A closed-loop view would report 20 ms throughout.
        let (ctx, _tx) = ctx();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sent);
        let cfg = config(Mode::Open { rate: 100.0 }, 1);
        let r = run(
            &cfg,
            &ctx,
            move || FakeConn {
                service: Duration::from_millis(20),
                sent_at: Arc::clone(&s2),
            },
            |_| {},
        )
        .await
        .expect("run");
        assert_eq!(r.stats.requests, 10);
        assert_eq!(r.unsent, 0);
        assert!((quantile_ms(&r.stats, 0.0) - 20.0).abs() < 0.05);
        assert!(
            (r.stats.latency_ms().max - 110.0).abs() < 0.1,
            "{:?}",
            r.stats.latency_ms()
        );
        assert!((r.stats.latency.mean() / 1000.0 - 65.0).abs() < 0.1);
        assert_eq!(r.elapsed, Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_keeps_the_rate_when_the_server_keeps_up() {
        let (ctx, _tx) = ctx();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sent);
        let mut cfg = config(Mode::Open { rate: 100.0 }, 4);
        cfg.requests = None;
        cfg.duration = Some(Duration::from_secs(1));
        let r = run(
            &cfg,
            &ctx,
            move || FakeConn {
                service: Duration::from_millis(2),
                sent_at: Arc::clone(&s2),
            },
            |_| {},
        )
        .await
        .expect("run");
        assert_eq!(r.stats.requests, 100, "exactly rate x duration");
        // Service time only: no request waited.
        assert!(
            (r.stats.latency_ms().max - 2.0).abs() < 0.01,
            "{:?}",
            r.stats.latency_ms()
        );
        let mut times = sent.lock().expect("lock").clone();
        times.sort();
        let t0 = r.t0;
        for (k, t) in times.iter().enumerate() {
            let intended = t0 + Duration::from_millis(10 * k as u64);
            assert!(
                *t <= intended && intended - *t <= TIMER_SLACK,
                "request {k}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_spreads_over_connections() {
        // 4 connections absorb a 20 ms service time at 100 req/s: no queueing.
        let (ctx, _tx) = ctx();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sent);
        let mut cfg = config(Mode::Open { rate: 100.0 }, 4);
        cfg.requests = Some(50);
        let r = run(
            &cfg,
            &ctx,
            move || FakeConn {
                service: Duration::from_millis(20),
                sent_at: Arc::clone(&s2),
            },
            |_| {},
        )
        .await
        .expect("run");
        assert_eq!(r.stats.requests, 50);
        assert!(
            (r.stats.latency_ms().max - 20.0).abs() < 0.05,
            "{:?}",
            r.stats.latency_ms()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn open_loop_gives_up_when_far_behind() {
        // 1 connection, 1000 req/s for 100 ms, 50 ms service, 100 ms timeout: the run
        // stops 100 ms after the schedule ends and reports the rest as unsent.
        let (ctx, _tx) = ctx();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sent);
        let mut cfg = config(Mode::Open { rate: 1000.0 }, 1);
        cfg.requests = None;
        cfg.duration = Some(Duration::from_millis(100));
        cfg.timeout = Duration::from_millis(100);
        let r = run(
            &cfg,
            &ctx,
            move || FakeConn {
                service: Duration::from_millis(50),
                sent_at: Arc::clone(&s2),
            },
            |_| {},
        )
        .await
        .expect("run");
        assert_eq!(r.stats.requests + r.unsent, 100);
        assert!(r.stats.requests <= 5, "{}", r.stats.requests);
        assert!(r.unsent >= 95);
    }

    /// A gateway that issues a coupon to every claim and answers every other request 200.
    struct CheckoutConn {
        service: Duration,
    }

    impl Exchange for CheckoutConn {
        fn send(
            &mut self,
            req: HttpRequest,
            _timeout: Duration,
        ) -> impl Future<Output = Result<Reply, TransportError>> + Send {
            let service = self.service;
            let claim = req.uri().path().ends_with("/claims");
            async move {
                tokio::time::sleep(service).await;
                Ok(if claim {
                    Reply {
                        status: 201,
                        body: Bytes::from_static(br#"{"coupon_id":"c"}"#),
                    }
                } else {
                    Reply {
                        status: 200,
                        body: Bytes::new(),
                    }
                })
            }
        }

        async fn warm_up(&mut self, _timeout: Duration) -> Result<(), TransportError> {
            Ok(())
        }

        fn opened(&self) -> u64 {
            1
        }
    }

    /// Regression: open-loop `unsent` subtracted the requests sent from the checkouts
    /// planned; a checkout is 6 requests here, so a far-behind run reported none unsent.
    #[tokio::test(start_paused = true)]
    async fn open_loop_counts_unsent_checkouts_not_requests() {
        let (mut ctx, _tx) = ctx();
        let params = PlanParams {
            seed: 1,
            users: 10,
            bot_fraction: 0.0,
            bots: 1,
            zipf_exponent: 1.0,
            copies: 1,
            read_fraction: 0.0,
        };
        ctx.plan = Arc::new(Plan::for_scenario(ScenarioKind::Checkout, &params));
        // 1 connection, 100 checkouts/s for 100 ms, 10 ms per request: each checkout (claim,
        // 3 wallet reads, lock, redeem) takes 60 ms, the run falls behind and gives up.
        let mut cfg = config(Mode::Open { rate: 100.0 }, 1);
        cfg.requests = None;
        cfg.duration = Some(Duration::from_millis(100));
        cfg.timeout = Duration::from_millis(100);
        cfg.expect.scenario = ScenarioKind::Checkout;
        let r = run(
            &cfg,
            &ctx,
            || CheckoutConn {
                service: Duration::from_millis(10),
            },
            |_| {},
        )
        .await
        .expect("run");
        let c = r.stats.checkout.as_ref().expect("checkout stats");
        assert_eq!(
            r.stats.requests,
            6 * c.checkouts,
            "{:?}",
            r.stats.by_outcome()
        );
        assert_eq!(c.pairs_ok, c.checkouts);
        assert_eq!(c.wallet_reads_ok, 3 * c.checkouts);
        assert!(c.checkouts >= 2 && c.checkouts < 10, "{}", c.checkouts);
        assert_eq!(
            c.checkouts + r.unsent,
            10,
            "planned checkouts = started + unsent"
        );
    }

    /// A gateway whose database lags: a lock finds the coupon (404 `coupon_not_found`)
    /// only from its `found_at`-th try on (never when `None`); everything else succeeds.
    struct LaggingConn {
        found_at: Option<u32>,
        lock_tries: u32,
    }

    impl Exchange for LaggingConn {
        fn send(
            &mut self,
            req: HttpRequest,
            _timeout: Duration,
        ) -> impl Future<Output = Result<Reply, TransportError>> + Send {
            let path = req.uri().path().to_string();
            let reply = if path.ends_with("/claims") {
                self.lock_tries = 0;
                Reply {
                    status: 201,
                    body: Bytes::from_static(br#"{"coupon_id":"c"}"#),
                }
            } else if path.ends_with("/lock") {
                self.lock_tries += 1;
                if self.found_at.is_some_and(|k| self.lock_tries >= k) {
                    Reply {
                        status: 200,
                        body: Bytes::new(),
                    }
                } else {
                    Reply {
                        status: 404,
                        body: Bytes::from_static(br#"{"error":"coupon_not_found"}"#),
                    }
                }
            } else {
                Reply {
                    status: 200,
                    body: Bytes::new(),
                }
            };
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(reply)
            }
        }

        async fn warm_up(&mut self, _timeout: Duration) -> Result<(), TransportError> {
            Ok(())
        }

        fn opened(&self) -> u64 {
            1
        }
    }

    async fn lagging_run(found_at: Option<u32>, lock_wait: Duration) -> (RunResult, RunContext) {
        let (mut ctx, _tx) = ctx();
        let params = PlanParams {
            seed: 1,
            users: 10,
            bot_fraction: 0.0,
            bots: 1,
            zipf_exponent: 1.0,
            copies: 1,
            read_fraction: 0.0,
        };
        ctx.plan = Arc::new(Plan::for_scenario(ScenarioKind::Checkout, &params));
        let mut cfg = config(Mode::Closed, 2);
        cfg.requests = Some(6);
        cfg.expect.scenario = ScenarioKind::Checkout;
        cfg.checkout = CheckoutConfig {
            wallet_reads: 1,
            lock_wait,
        };
        let r = run(
            &cfg,
            &ctx,
            move || LaggingConn {
                found_at,
                lock_tries: 0,
            },
            |_| {},
        )
        .await
        .expect("run");
        (r, ctx)
    }

    #[tokio::test(start_paused = true)]
    async fn locks_not_yet_persisted_are_retried_and_counted_apart() {
        // Found at the 3rd try: two 404s per checkout, retried, expected.
        let (r, ctx) = lagging_run(Some(3), Duration::from_secs(5)).await;
        let c = r.stats.checkout.as_ref().expect("checkout stats");
        assert_eq!(c.checkouts, 6);
        assert_eq!(c.lock_not_persisted, 12);
        assert_eq!((c.locks_ok, c.pairs_ok, c.lock_gave_up), (6, 6, 0));
        let by = r.stats.by_outcome();
        assert_eq!(by["POST lock 404 coupon_not_found"], 12);
        assert_eq!(by["POST lock 200"], 6);
        assert_eq!(by["POST redeem 200"], 6);
        assert_eq!(ctx.live.snapshot().unexpected, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_that_never_finds_its_coupon_gives_up_in_time() {
        // Tries at about 0, 6, 17, 38 ms (1 ms answers, backoff 5, 10, 20 ms): the 4th is the
        // last one whose backoff (40 ms) would end past the 50 ms wait.
        let (r, ctx) = lagging_run(None, Duration::from_millis(50)).await;
        let c = r.stats.checkout.as_ref().expect("checkout stats");
        assert_eq!((c.checkouts, c.lock_gave_up, c.pairs_ok), (6, 6, 0));
        assert_eq!(c.lock_not_persisted, 18, "3 retried tries per checkout");
        let by = r.stats.by_outcome();
        assert_eq!(by["POST lock 404 coupon_not_found:gave_up"], 6);
        assert!(!by.contains_key("POST redeem 200"), "{by:?}");
        // The give-ups are unexpected; the retried 404s are not.
        assert_eq!(ctx.live.snapshot().unexpected, 6);
        // With no wait at all the first 404 gives up.
        let (r, _) = lagging_run(None, Duration::ZERO).await;
        let c = r.stats.checkout.as_ref().expect("checkout stats");
        assert_eq!((c.lock_not_persisted, c.lock_gave_up), (0, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_measures_service_time() {
        let (ctx, _tx) = ctx();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sent);
        let mut cfg = config(Mode::Closed, 3);
        cfg.requests = None;
        cfg.duration = Some(Duration::from_millis(100));
        let r = run(
            &cfg,
            &ctx,
            move || FakeConn {
                service: Duration::from_millis(10),
                sent_at: Arc::clone(&s2),
            },
            |_| {},
        )
        .await
        .expect("run");
        // 3 connections x 10 requests each in 100 ms.
        assert_eq!(r.stats.requests, 30);
        assert!((r.stats.latency_ms().max - 10.0).abs() < 0.02);
        assert_eq!(r.stats.connections_opened, 3);
        assert_eq!(r.stats.by_outcome()["GET healthz 200"], 30);
    }

    /// A connection to a batch of `stock` coupons shared by all connections: 201 while
    /// stock lasts, then `410 sold_out`, each after a fixed service time.
    struct Seller {
        service: Duration,
        left: Arc<AtomicU64>,
    }

    impl Exchange for Seller {
        fn send(
            &mut self,
            _req: HttpRequest,
            _timeout: Duration,
        ) -> impl Future<Output = Result<Reply, TransportError>> + Send {
            let service = self.service;
            let left = Arc::clone(&self.left);
            async move {
                tokio::time::sleep(service).await;
                let took = left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok();
                Ok(if took {
                    Reply {
                        status: 201,
                        body: Bytes::from_static(br#"{"coupon_id":"c"}"#),
                    }
                } else {
                    Reply {
                        status: 410,
                        body: Bytes::from_static(br#"{"error":"sold_out"}"#),
                    }
                })
            }
        }

        async fn warm_up(&mut self, _timeout: Duration) -> Result<(), TransportError> {
            Ok(())
        }

        fn opened(&self) -> u64 {
            1
        }
    }

    fn claims_ctx() -> (RunContext, watch::Sender<bool>) {
        let (mut ctx, tx) = ctx();
        let params = PlanParams {
            seed: 1,
            users: 1000,
            bot_fraction: 0.0,
            bots: 1,
            zipf_exponent: 1.0,
            copies: 1,
            read_fraction: 0.0,
        };
        ctx.plan = Arc::new(Plan::for_scenario(ScenarioKind::FlashSale, &params));
        (ctx, tx)
    }

    #[tokio::test(start_paused = true)]
    async fn time_to_sell_out_is_the_first_sold_out_answer() {
        // 2 connections, 10 ms per answer, stock 10: five rounds of two 201s (10..50 ms),
        // then the first sold_out answers arrive at 60 ms; the run goes on to 300 ms.
        let (ctx, _tx) = claims_ctx();
        let left = Arc::new(AtomicU64::new(10));
        let mut cfg = config(Mode::Closed, 2);
        cfg.requests = None;
        cfg.duration = Some(Duration::from_millis(300));
        cfg.timeline = true;
        cfg.expect.scenario = ScenarioKind::FlashSale;
        let r = run(
            &cfg,
            &ctx,
            move || Seller {
                service: Duration::from_millis(10),
                left: Arc::clone(&left),
            },
            |_| {},
        )
        .await
        .expect("run");
        assert_eq!(r.stats.claims_ok, 10);
        assert_eq!(r.sold_out_after, Some(Duration::from_millis(60)));
        assert!(r.sold_out_seen);
        assert_eq!(r.elapsed, Duration::from_millis(300));
        assert_eq!(r.stats.by_outcome()["410 sold_out"], 50);
        // Nothing unexpected: the progress counters agree with the classes.
        let live = ctx.live.snapshot();
        assert_eq!((live.expected, live.unexpected), (60, 0));
        // The timeline holds the sale: 100 ms intervals, 201s only in the first one.
        let t = r.timeline.expect("timeline");
        let p = t.points(r.elapsed);
        assert_eq!(p.len(), 3);
        assert!((p[0].claims_ok_per_s - 100.0).abs() < 1e-6, "{p:?}");
        assert_eq!(p[1].claims_ok_per_s, 0.0);
        assert!((p[1].requests_per_s - 200.0).abs() < 1e-6, "{p:?}");
        assert!((p[1].p50_ms.expect("p50") - 10.0).abs() < 0.1, "{p:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_sold_out_no_sell_out_time() {
        let (ctx, _tx) = claims_ctx();
        let left = Arc::new(AtomicU64::new(1000));
        let mut cfg = config(Mode::Closed, 2);
        cfg.requests = Some(20);
        let r = run(
            &cfg,
            &ctx,
            move || Seller {
                service: Duration::from_millis(1),
                left: Arc::clone(&left),
            },
            |_| {},
        )
        .await
        .expect("run");
        assert_eq!(r.stats.claims_ok, 20);
        assert_eq!(r.sold_out_after, None);
        assert!(r.timeline.is_none(), "not asked for");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_a_sleeping_open_loop() {
        let (ctx, tx) = ctx();
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = Arc::clone(&sent);
        let mut cfg = config(Mode::Open { rate: 1.0 }, 2);
        cfg.requests = None;
        cfg.duration = Some(Duration::from_secs(3600));
        let handle = tokio::spawn(async move {
            run(
                &cfg,
                &ctx,
                move || FakeConn {
                    service: Duration::from_millis(1),
                    sent_at: Arc::clone(&s2),
                },
                |_| {},
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        tx.send_replace(true);
        let r = handle.await.expect("join").expect("run");
        assert!(r.interrupted);
        assert_eq!(r.stats.requests, 3);
        assert_eq!(r.unsent, 0);
    }
}
