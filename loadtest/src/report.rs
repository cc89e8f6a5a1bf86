//! Measurements and their presentation: per-connection statistics (an HDR latency
//! histogram with microsecond precision plus outcome counters), merging them at the end
//! of a run, and rendering the summary as a table or as JSON. Every outcome appears under
//! exactly one class (expected or unexpected, see `outcome.rs`), so the two class totals
//! add up to the requests attempted.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::history::Phase;
use crate::outcome::{Class, Expectations};
use crate::verify::VerifySummary;

/// Largest latency the histogram tracks (larger values are clamped): one hour in µs.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Which endpoint a request went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Claim,
    GetBatch,
    Health,
    Product,
    Quote,
    /// checkout: `GET /v1/users/{user}/coupons?status=unused`.
    Wallet,
    /// checkout: `POST /v1/coupons/{coupon}/lock`.
    Lock,
    /// checkout: `POST /v1/coupons/{coupon}/redeem`.
    Redeem,
}

/// The steps of a checkout, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Claim,
    Wallet,
    Lock,
    Redeem,
}

impl Step {
    pub const ALL: [Step; 4] = [Step::Claim, Step::Wallet, Step::Lock, Step::Redeem];

    pub fn name(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::Wallet => "wallet",
            Self::Lock => "lock",
            Self::Redeem => "redeem",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the checkout scenario counts besides the answers themselves.
#[derive(Debug, Clone)]
pub struct CheckoutStats {
    /// Checkouts started (each begins with its claim).
    pub checkouts: u64,
    /// Wallet reads answered 200.
    pub wallet_reads_ok: u64,
    /// Wallet reads answered 200 that did not list the coupon just claimed yet.
    pub wallet_reads_without_coupon: u64,
    /// Locks answered `404 coupon_not_found` and retried: the claim had not reached the
    /// database yet (how far behind the wallet is, not an error of the gateway).
    pub lock_not_persisted: u64,
    /// Checkouts whose lock still found no coupon when `--lock-wait-ms` ran out.
    pub lock_gave_up: u64,
    /// Locks answered 200.
    pub locks_ok: u64,
    /// Lock or redeem answered 409 (every order is fresh: a real failure).
    pub conflicts: u64,
    /// Checkouts whose lock and redeem were both answered 200.
    pub pairs_ok: u64,
    /// Latency of each step's requests (each lock attempt counts), in µs.
    pub latency: [Histogram<u64>; 4],
}

impl Default for CheckoutStats {
    fn default() -> Self {
        Self {
            checkouts: 0,
            wallet_reads_ok: 0,
            wallet_reads_without_coupon: 0,
            lock_not_persisted: 0,
            lock_gave_up: 0,
            locks_ok: 0,
            conflicts: 0,
            pairs_ok: 0,
            latency: std::array::from_fn(|_| new_histogram()),
        }
    }
}

impl CheckoutStats {
    /// Records the latency of one request of `step`.
    pub fn record_latency(&mut self, step: Step, latency: Duration) {
        self.latency[step.index()].saturating_record(duration_us(latency));
    }

    fn merge(&mut self, other: &CheckoutStats) {
        self.checkouts += other.checkouts;
        self.wallet_reads_ok += other.wallet_reads_ok;
        self.wallet_reads_without_coupon += other.wallet_reads_without_coupon;
        self.lock_not_persisted += other.lock_not_persisted;
        self.lock_gave_up += other.lock_gave_up;
        self.locks_ok += other.locks_ok;
        self.conflicts += other.conflicts;
        self.pairs_ok += other.pairs_ok;
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            add_histogram(mine, theirs);
        }
    }
}

/// Statistics of one connection (or, after merging, of the whole run).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of every request that got an HTTP answer, in µs.
    pub latency: Histogram<u64>,
    /// Answers by endpoint, status and error code.
    pub outcomes: HashMap<(Endpoint, u16, Option<String>), u64>,
    /// Requests without an HTTP answer, by kind (`connect`, `timeout`, ...).
    pub transport: BTreeMap<&'static str, u64>,
    /// Requests attempted (answered or not).
    pub requests: u64,
    /// Claim requests attempted.
    pub claims: u64,
    /// 201 answers to claims.
    pub claims_ok: u64,
    /// TCP connections opened.
    pub connections_opened: u64,
    /// Connections opened again after one was lost.
    pub reconnects: u64,
    /// The checkout scenario's own counters (`None` in the other scenarios).
    pub checkout: Option<CheckoutStats>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Self {
            latency: new_histogram(),
            outcomes: HashMap::new(),
            transport: BTreeMap::new(),
            requests: 0,
            claims: 0,
            claims_ok: 0,
            connections_opened: 0,
            reconnects: 0,
            checkout: None,
        }
    }

    /// The checkout counters, created on first use.
    pub fn checkout_mut(&mut self) -> &mut CheckoutStats {
        self.checkout.get_or_insert_with(CheckoutStats::default)
    }

    /// Records an HTTP answer that took `latency`.
    pub fn record_reply(
        &mut self,
        endpoint: Endpoint,
        status: u16,
        code: Option<String>,
        latency: Duration,
    ) {
        self.requests += 1;
        if endpoint == Endpoint::Claim {
            self.claims += 1;
            if status == 201 {
                self.claims_ok += 1;
            }
        }
        self.latency.saturating_record(duration_us(latency));
        *self.outcomes.entry((endpoint, status, code)).or_default() += 1;
    }

    /// Records a request that got no HTTP answer.
    pub fn record_transport(&mut self, endpoint: Endpoint, kind: &'static str) {
        self.requests += 1;
        if endpoint == Endpoint::Claim {
            self.claims += 1;
        }
        *self.transport.entry(kind).or_default() += 1;
    }

    /// Requests without an HTTP answer.
    pub fn transport_errors(&self) -> u64 {
        self.transport.values().sum()
    }

    /// Adds another connection's statistics to these.
    pub fn merge(&mut self, other: &Stats) {
        add_histogram(&mut self.latency, &other.latency);
        if let Some(c) = &other.checkout {
            self.checkout_mut().merge(c);
        }
        for (k, v) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.transport {
            *self.transport.entry(k).or_default() += v;
        }
        self.requests += other.requests;
        self.claims += other.claims;
        self.claims_ok += other.claims_ok;
        self.connections_opened += other.connections_opened;
        self.reconnects += other.reconnects;
    }

    /// Outcome counts keyed `"<status>"` / `"<status> <code>"` for claims and
    /// `"GET batch <status>..."` / `"GET healthz <status>..."` for the other endpoints.
    pub fn by_outcome(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((endpoint, status, code), n) in &self.outcomes {
            *out.entry(outcome_key(*endpoint, *status, code.as_deref()))
                .or_default() += n;
        }
        out
    }

    /// Outcome counts split by class: the answers keyed as in [`Stats::by_outcome`], and
    /// the requests without an answer keyed `"transport:<kind>"` (always unexpected).
    pub fn by_class(&self, expect: &Expectations) -> ByClass {
        let mut out = ByClass::default();
        for ((endpoint, status, code), n) in &self.outcomes {
            let class = expect.classify(*endpoint, Some(*status), code.as_deref());
            *out.get_mut(class)
                .entry(outcome_key(*endpoint, *status, code.as_deref()))
                .or_default() += n;
        }
        for (kind, n) in &self.transport {
            *out.unexpected
                .entry(format!("transport:{kind}"))
                .or_default() += n;
        }
        out
    }

    /// Latency percentiles in milliseconds.
    pub fn latency_ms(&self) -> LatencyMs {
        LatencyMs::of(&self.latency)
    }
}

/// Adds `other` into `into`. Both histograms share the same bounds, so adding cannot
/// fail; if it ever did, the samples are re-recorded one value at a time (clamped).
fn add_histogram(into: &mut Histogram<u64>, other: &Histogram<u64>) {
    if into.add(other).is_err() {
        for v in other.iter_recorded() {
            into.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
    }
}

/// `"<status>"` or `"<status> <code>"`, prefixed `"GET batch "` / `"GET healthz "` for
/// the endpoints other than claims.
pub fn outcome_key(endpoint: Endpoint, status: u16, code: Option<&str>) -> String {
    let prefix = match endpoint {
        Endpoint::Claim => "",
        Endpoint::GetBatch => "GET batch ",
        Endpoint::Health => "GET healthz ",
        Endpoint::Product => "GET product ",
        Endpoint::Quote => "POST quote ",
        Endpoint::Wallet => "GET wallet ",
        Endpoint::Lock => "POST lock ",
        Endpoint::Redeem => "POST redeem ",
    };
    match code {
        Some(c) => format!("{prefix}{status} {c}"),
        None => format!("{prefix}{status}"),
    }
}

/// Outcome counts of each class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ByClass {
    pub expected: BTreeMap<String, u64>,
    pub unexpected: BTreeMap<String, u64>,
}

impl ByClass {
    fn get_mut(&mut self, class: Class) -> &mut BTreeMap<String, u64> {
        match class {
            Class::Expected => &mut self.expected,
            Class::Unexpected => &mut self.unexpected,
        }
    }

    /// Total count of one class.
    pub fn total(&self, class: Class) -> u64 {
        match class {
            Class::Expected => self.expected.values().sum(),
            Class::Unexpected => self.unexpected.values().sum(),
        }
    }
}

/// When the batch sold out, and how fast it sold until then.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SellOut {
    /// The phase in which the first `410 sold_out` came: `measure`, or `drain` for the
    /// sold-out scenario (whose measured phase starts sold out).
    pub phase: Phase,
    /// Seconds from the start of that phase (its first request) to the first
    /// `410 sold_out` answer.
    pub after_s: f64,
    /// Claims answered 201 in that phase. The gateway declares "sold out" only once every
    /// unit is taken, so each of them was decided before the first `sold_out` answer, even
    /// one whose answer arrived a little after it.
    pub claims_ok: u64,
    /// `claims_ok / after_s`: successful claims per second while the stock lasted.
    pub claims_per_s: f64,
}

impl SellOut {
    pub fn new(phase: Phase, after: Duration, claims_ok: u64) -> Self {
        let secs = after.as_secs_f64();
        Self {
            phase,
            after_s: round6(secs),
            claims_ok,
            claims_per_s: if secs > 0.0 {
                round3(claims_ok as f64 / secs)
            } else {
                0.0
            },
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits. The bounds are constants (never input), so
    // construction cannot fail at run time.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LATENCY_US)
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Latency percentiles in milliseconds (microsecond precision).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl LatencyMs {
    /// The percentiles of a histogram of µs.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let q = |q: f64| us_to_ms(h.value_at_quantile(q));
        Self {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: us_to_ms(h.max()),
            mean: h.mean().round() / 1000.0,
        }
    }
}

/// The checkout scenario's figures (`--scenario checkout`), beside the claim rate of the
/// same run.
#[derive(Debug, Clone, Serialize)]
pub struct CheckoutSummary {
    /// Checkouts started (each claims first).
    pub checkouts: u64,
    /// Successful claims per second (the run's `claims_per_s`, repeated here).
    pub claims_per_s: f64,
    /// Wallet reads answered 200.
    pub wallet_reads: u64,
    /// `wallet_reads / elapsed_s`.
    pub wallet_reads_per_s: f64,
    /// Wallet reads (200) that did not list the coupon just claimed yet.
    pub wallet_reads_without_coupon: u64,
    /// Lock and redeem both answered 200.
    pub lock_redeem_pairs: u64,
    /// `lock_redeem_pairs / elapsed_s`.
    pub lock_redeem_pairs_per_s: f64,
    /// Locks answered `404 coupon_not_found` and retried (the claim not yet in the
    /// database): how far behind the wallet is; not counted as errors.
    pub lock_not_persisted_404: u64,
    /// Checkouts that gave up on the lock after `--lock-wait-ms` (unexpected).
    pub lock_gave_up: u64,
    /// Lock or redeem answered 409 (unexpected: every order is fresh).
    pub conflicts_409: u64,
    /// Latency of each step (`claim`, `wallet`, `lock`, `redeem`).
    pub latency_ms: BTreeMap<&'static str, LatencyMs>,
}

impl CheckoutSummary {
    fn new(c: &CheckoutStats, claims_ok: u64, per_s: impl Fn(u64) -> f64) -> Self {
        Self {
            checkouts: c.checkouts,
            claims_per_s: per_s(claims_ok),
            wallet_reads: c.wallet_reads_ok,
            wallet_reads_per_s: per_s(c.wallet_reads_ok),
            wallet_reads_without_coupon: c.wallet_reads_without_coupon,
            lock_redeem_pairs: c.pairs_ok,
            lock_redeem_pairs_per_s: per_s(c.pairs_ok),
            lock_not_persisted_404: c.lock_not_persisted,
            lock_gave_up: c.lock_gave_up,
            conflicts_409: c.conflicts,
            latency_ms: Step::ALL
                .iter()
                .map(|s| (s.name(), LatencyMs::of(&c.latency[s.index()])))
                .collect(),
        }
    }
}

/// The machine-readable result of a run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: String,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Open loop: the requested rate (req/s).
    pub target_rate: Option<f64>,
    pub connections: u32,
    pub url: String,
    pub batch_id: Option<String>,
    pub seed: u64,
    /// Requests attempted in the measured phase (answered or not).
    pub requests: u64,
    /// Claim requests among them.
    pub claims: u64,
    /// Measured time in seconds: from the start of the phase to the last answer (open
    /// loop: at least the schedule window, `planned requests / rate`).
    pub elapsed_s: f64,
    /// `requests / elapsed_s`.
    pub rps: f64,
    /// 201 answers to claims.
    pub claims_ok: u64,
    /// `claims_ok / elapsed_s`: averaged over the whole run, however early the batch sold
    /// out (see `sell_out` for the rate while the stock lasted).
    pub claims_per_s: f64,
    /// When the batch sold out, or `None` if no claim was answered `410 sold_out`.
    pub sell_out: Option<SellOut>,
    /// Answers by status and error code (see README).
    pub by_outcome: BTreeMap<String, u64>,
    /// Requests whose outcome is a correct answer under this workload.
    pub expected: u64,
    /// Requests with any other outcome: to look into.
    pub unexpected: u64,
    /// The outcomes of each class (transport errors as `transport:<kind>`).
    pub by_class: ByClass,
    /// `--expect-shedding`: 429 `rate_limited` and 503 `overloaded` counted as expected.
    pub expect_shedding: bool,
    /// Latency of answered requests.
    pub latency_ms: LatencyMs,
    /// Requests that got no HTTP answer (sum of `transport_errors`).
    pub errors: u64,
    /// Those requests by kind: connect, timeout, http, body.
    pub transport_errors: BTreeMap<String, u64>,
    pub connections_opened: u64,
    pub reconnects: u64,
    /// Open loop: requests (checkout: whole checkouts) scheduled within the run but never
    /// sent because the gateway fell too far behind (the run stops at most `--timeout-ms` after the schedule).
    pub unsent: u64,
    /// The run was cut short by Ctrl-C.
    pub interrupted: bool,
    /// Things the operator should know about the run (a fresh batch instead of a reused
    /// one, a batch without stock, ...), also printed on stderr as they happen.
    pub warnings: Vec<String>,
    /// The checkout scenario's figures.
    pub checkout: Option<CheckoutSummary>,
    /// `--verify` results, when requested.
    pub verify: Option<VerifySummary>,
}

/// Facts about the run that the statistics do not carry.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub scenario: String,
    pub target_rate: Option<f64>,
    pub connections: u32,
    pub url: String,
    pub batch_id: Option<String>,
    pub seed: u64,
    pub elapsed: Duration,
    pub unsent: u64,
    pub interrupted: bool,
    /// What counts as expected in the measured phase.
    pub expect: Expectations,
    pub sell_out: Option<SellOut>,
    pub warnings: Vec<String>,
}

impl Summary {
    pub fn new(info: RunInfo, stats: &Stats) -> Self {
        let by_class = stats.by_class(&info.expect);
        let secs = info.elapsed.as_secs_f64();
        let per_s = |n: u64| {
            if secs > 0.0 {
                round3(n as f64 / secs)
            } else {
                0.0
            }
        };
        Self {
            scenario: info.scenario,
            mode: if info.target_rate.is_some() {
                "open"
            } else {
                "closed"
            },
            target_rate: info.target_rate,
            connections: info.connections,
            url: info.url,
            batch_id: info.batch_id,
            seed: info.seed,
            requests: stats.requests,
            claims: stats.claims,
            elapsed_s: round3(secs),
            rps: per_s(stats.requests),
            claims_ok: stats.claims_ok,
            claims_per_s: per_s(stats.claims_ok),
            sell_out: info.sell_out,
            by_outcome: stats.by_outcome(),
            expected: by_class.total(Class::Expected),
            unexpected: by_class.total(Class::Unexpected),
            by_class,
            expect_shedding: info.expect.shedding,
            latency_ms: stats.latency_ms(),
            errors: stats.transport_errors(),
            transport_errors: stats
                .transport
                .iter()
                .map(|(k, v)| ((*k).to_string(), *v))
                .collect(),
            connections_opened: stats.connections_opened,
            reconnects: stats.reconnects,
            unsent: info.unsent,
            interrupted: info.interrupted,
            warnings: info.warnings,
            checkout: stats
                .checkout
                .as_ref()
                .map(|c| CheckoutSummary::new(c, stats.claims_ok, per_s)),
            verify: None,
        }
    }

    /// The human-readable table printed on stdout.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mode = match self.target_rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            s,
            "claimgate-loadtest: scenario {}, {mode}, {} connections, {}{}",
            self.scenario,
            self.connections,
            self.url,
            self.batch_id
                .as_deref()
                .map(|b| format!(", batch {b}"))
                .unwrap_or_default()
        );
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<22}{v}");
        };
        row(&mut s, "duration", format!("{:.3} s", self.elapsed_s));
        row(&mut s, "requests", self.requests.to_string());
        row(&mut s, "requests/s", format!("{:.1}", self.rps));
        row(&mut s, "claims sent", self.claims.to_string());
        row(&mut s, "claims ok (201)", self.claims_ok.to_string());
        row(
            &mut s,
            "claims ok/s",
            format!("{:.1} (whole run)", self.claims_per_s),
        );
        if let Some(so) = &self.sell_out {
            let phase = match so.phase {
                Phase::Drain => " (drain phase)",
                Phase::Measure => "",
            };
            row(
                &mut s,
                "sold out after",
                format!(
                    "{:.3} s{phase}: {} claims ok, {:.1} claims/s while stock lasted",
                    so.after_s, so.claims_ok, so.claims_per_s
                ),
            );
        }
        if let Some(c) = &self.checkout {
            row(&mut s, "checkouts", c.checkouts.to_string());
            row(
                &mut s,
                "wallet reads/s",
                format!(
                    "{:.1} ({} reads, {} without the new coupon yet)",
                    c.wallet_reads_per_s, c.wallet_reads, c.wallet_reads_without_coupon
                ),
            );
            row(
                &mut s,
                "lock+redeem pairs/s",
                format!(
                    "{:.1} ({} pairs)",
                    c.lock_redeem_pairs_per_s, c.lock_redeem_pairs
                ),
            );
            row(
                &mut s,
                "lock 404 not in db",
                format!(
                    "{} (retried), {} gave up after --lock-wait-ms",
                    c.lock_not_persisted_404, c.lock_gave_up
                ),
            );
            row(&mut s, "lock/redeem 409", c.conflicts_409.to_string());
            let _ = writeln!(s, "  step latency (ms)        p50         p99");
            for (step, l) in &c.latency_ms {
                let _ = writeln!(s, "    {step:<18}{:>10.3}  {:>10.3}", l.p50, l.p99);
            }
        }
        row(
            &mut s,
            "outcomes",
            format!("{} expected, {} unexpected", self.expected, self.unexpected),
        );
        for (name, map) in [
            ("expected", &self.by_class.expected),
            ("unexpected", &self.by_class.unexpected),
        ] {
            let _ = writeln!(s, "    {name}");
            if map.is_empty() {
                let _ = writeln!(s, "      (none)");
            }
            for (k, v) in map {
                let _ = writeln!(s, "      {k:<26}{v:>12}");
            }
        }
        let l = &self.latency_ms;
        let _ = writeln!(s, "  latency (ms)");
        for (k, v) in [
            ("p50", l.p50),
            ("p90", l.p90),
            ("p99", l.p99),
            ("p99.9", l.p999),
            ("max", l.max),
            ("mean", l.mean),
        ] {
            let _ = writeln!(s, "    {k:<28}{v:>12.3}");
        }
        let kinds = if self.transport_errors.is_empty() {
            String::new()
        } else {
            let parts: Vec<String> = self
                .transport_errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!(" ({})", parts.join(", "))
        };
        row(
            &mut s,
            "transport errors",
            format!("{}{kinds}", self.errors),
        );
        row(
            &mut s,
            "connections",
            format!(
                "{} opened, {} reconnects",
                self.connections_opened, self.reconnects
            ),
        );
        if self.target_rate.is_some() {
            row(&mut s, "unsent (behind)", self.unsent.to_string());
        }
        if self.interrupted {
            row(&mut s, "interrupted", "yes (Ctrl-C)".to_string());
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  warning: {w}");
        }
        s
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn round6(v: f64) -> f64 {
    (v * 1_000_000.0).round() / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn merging_combines_histograms_and_counters() {
        let mut a = Stats::new();
        for _ in 0..90 {
            a.record_reply(Endpoint::Claim, 201, None, ms(1));
        }
        a.record_transport(Endpoint::Claim, "timeout");
        a.connections_opened = 2;
        a.reconnects = 1;

        let mut b = Stats::new();
        for _ in 0..10 {
            b.record_reply(Endpoint::Claim, 410, Some("sold_out".into()), ms(100));
        }
        b.record_reply(Endpoint::GetBatch, 200, None, ms(2));
        b.record_transport(Endpoint::Health, "connect");
        b.connections_opened = 1;

        let mut total = Stats::new();
        total.merge(&a);
        total.merge(&b);

        assert_eq!(total.requests, 103);
        assert_eq!(total.claims, 101);
        assert_eq!(total.claims_ok, 90);
        assert_eq!(total.latency.len(), 101);
        assert_eq!(total.transport_errors(), 2);
        assert_eq!(total.connections_opened, 3);
        assert_eq!(total.reconnects, 1);
        let by = total.by_outcome();
        assert_eq!(by["201"], 90);
        assert_eq!(by["410 sold_out"], 10);
        assert_eq!(by["GET batch 200"], 1);

        let l = total.latency_ms();
        // 90 of 101 samples at 1 ms, 1 at 2 ms, 10 at 100 ms (within 0.1 %).
        assert!((l.p50 - 1.0).abs() < 0.002, "{l:?}");
        assert!((l.p90 - 2.0).abs() < 0.003, "{l:?}");
        assert!((l.p99 - 100.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");

        // Merging is the same as recording everything into one histogram.
        let mut single = Stats::new();
        for _ in 0..90 {
            single.record_reply(Endpoint::Claim, 201, None, ms(1));
        }
        for _ in 0..10 {
            single.record_reply(Endpoint::Claim, 410, Some("sold_out".into()), ms(100));
        }
        single.record_reply(Endpoint::GetBatch, 200, None, ms(2));
        assert_eq!(single.latency_ms(), total.latency_ms());
    }

    #[test]
    fn merging_empty_is_identity() {
        let mut a = Stats::new();
        a.record_reply(Endpoint::Health, 200, None, Duration::from_micros(1234));
        let before = a.latency_ms();
        a.merge(&Stats::new());
        assert_eq!(a.latency_ms(), before);
        assert!((before.p50 - 1.234).abs() < 0.002, "{before:?}");
        assert_eq!(Stats::new().latency_ms(), LatencyMs::default());
    }

    #[test]
    fn extreme_latencies_are_clamped() {
        let mut a = Stats::new();
        a.record_reply(Endpoint::Health, 200, None, Duration::ZERO);
        a.record_reply(Endpoint::Health, 200, None, Duration::from_secs(100_000));
        assert_eq!(a.latency.len(), 2);
        assert!(a.latency_ms().max >= 3_600_000.0 * 0.999);
    }

    #[test]
    fn summary_json_and_table() {
        let mut st = Stats::new();
        st.record_reply(Endpoint::Claim, 201, None, ms(3));
        st.record_reply(Endpoint::Claim, 409, Some("limit_reached".into()), ms(1));
        st.record_transport(Endpoint::Claim, "timeout");
        let sum = Summary::new(
            RunInfo {
                scenario: "flash-sale".into(),
                target_rate: None,
                connections: 4,
                url: "http://127.0.0.1:8080".into(),
                batch_id: Some("lt-1".into()),
                seed: 1,
                elapsed: Duration::from_secs(2),
                unsent: 0,
                interrupted: false,
                expect: flash_sale(),
                sell_out: None,
                warnings: Vec::new(),
            },
            &st,
        );
        let v = serde_json::to_value(&sum).expect("json");
        for key in [
            "requests",
            "elapsed_s",
            "rps",
            "claims_ok",
            "claims_per_s",
            "by_outcome",
            "latency_ms",
            "errors",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["requests"], 3);
        assert_eq!(v["rps"], 1.5);
        assert_eq!(v["claims_per_s"], 0.5);
        assert_eq!(v["errors"], 1);
        assert_eq!(v["by_outcome"]["409 limit_reached"], 1);
        assert_eq!(v["transport_errors"]["timeout"], 1);
        assert_eq!(v["mode"], "closed");
        for p in ["p50", "p90", "p99", "p999", "max"] {
            assert!(v["latency_ms"][p].is_number(), "{p}");
        }
        let t = sum.table();
        assert!(t.contains("requests/s"), "{t}");
        assert!(t.contains("409 limit_reached"), "{t}");
        assert!(t.contains("p99.9"), "{t}");
        assert!(t.contains("transport errors      1 (timeout 1)"), "{t}");
        assert!(!t.contains("sold out after"), "{t}");
    }

    #[test]
    fn checkout_figures_in_json_and_table() {
        let mut st = Stats::new();
        for _ in 0..4 {
            st.record_reply(Endpoint::Claim, 201, None, ms(2));
            st.checkout_mut().record_latency(Step::Claim, ms(2));
        }
        for _ in 0..8 {
            st.record_reply(Endpoint::Wallet, 200, None, ms(4));
            st.checkout_mut().record_latency(Step::Wallet, ms(4));
        }
        let c = st.checkout_mut();
        c.checkouts = 4;
        c.wallet_reads_ok = 8;
        c.wallet_reads_without_coupon = 3;
        c.lock_not_persisted = 5;
        c.pairs_ok = 2;
        c.record_latency(Step::Lock, ms(10));
        let mut other = Stats::new();
        other.checkout_mut().pairs_ok = 2;
        st.merge(&other);
        let sum = Summary::new(info(flash_sale(), None), &st);
        let v = serde_json::to_value(&sum).expect("json");
        let c = &v["checkout"];
        assert_eq!(c["checkouts"], 4);
        assert_eq!(c["claims_per_s"], 0.4);
        assert_eq!(c["wallet_reads_per_s"], 0.8);
        assert_eq!(c["lock_redeem_pairs"], 4, "merged");
        assert_eq!(c["lock_redeem_pairs_per_s"], 0.4);
        assert_eq!(c["lock_not_persisted_404"], 5);
        assert!((c["latency_ms"]["wallet"]["p50"].as_f64().expect("p50") - 4.0).abs() < 0.01);
        assert!((c["latency_ms"]["lock"]["p99"].as_f64().expect("p99") - 10.0).abs() < 0.02);
        assert_eq!(c["latency_ms"]["redeem"]["p99"], 0.0, "no redeem yet");
        let t = sum.table();
        assert!(
            t.contains("  wallet reads/s        0.8 (8 reads, 3 without the new coupon yet)"),
            "{t}"
        );
        assert!(t.contains("  lock+redeem pairs/s   0.4 (4 pairs)"), "{t}");
        assert!(
            t.contains("  lock 404 not in db    5 (retried), 0 gave up"),
            "{t}"
        );
        // Other scenarios have no checkout section.
        let plain = Summary::new(info(flash_sale(), None), &Stats::new());
        assert!(serde_json::to_value(&plain).expect("json")["checkout"].is_null());
        assert!(!plain.table().contains("lock+redeem"));
    }

    fn flash_sale() -> Expectations {
        Expectations {
            scenario: crate::cli::ScenarioKind::FlashSale,
            phase: Phase::Measure,
            shedding: false,
            foreign_batch: false,
        }
    }

    fn info(expect: Expectations, sell_out: Option<SellOut>) -> RunInfo {
        RunInfo {
            scenario: "flash-sale".into(),
            target_rate: None,
            connections: 4,
            url: "http://127.0.0.1:8080".into(),
            batch_id: Some("lt-1".into()),
            seed: 1,
            elapsed: Duration::from_secs(10),
            unsent: 0,
            interrupted: false,
            expect,
            sell_out,
            warnings: vec!["batch lt-1 already exists".into()],
        }
    }

    /// Regression: `410 sold_out` was counted among the errors. Every outcome now lands
    /// in exactly one class, and sold-out answers are expected.
    #[test]
    fn outcomes_are_split_into_classes() {
        let mut st = Stats::new();
        for _ in 0..20 {
            st.record_reply(Endpoint::Claim, 201, None, ms(1));
        }
        for _ in 0..70 {
            st.record_reply(Endpoint::Claim, 410, Some("sold_out".into()), ms(1));
        }
        for _ in 0..5 {
            st.record_reply(Endpoint::Claim, 409, Some("limit_reached".into()), ms(1));
        }
        st.record_reply(Endpoint::Claim, 503, Some("overloaded".into()), ms(1));
        st.record_reply(Endpoint::Claim, 500, Some("internal".into()), ms(1));
        st.record_reply(Endpoint::GetBatch, 200, None, ms(1));
        st.record_transport(Endpoint::Claim, "timeout");
        st.record_transport(Endpoint::Claim, "connect");

        let sum = Summary::new(info(flash_sale(), None), &st);
        assert_eq!(sum.expected, 96);
        assert_eq!(sum.unexpected, 4);
        assert_eq!(sum.expected + sum.unexpected, sum.requests);
        assert_eq!(sum.by_class.expected["410 sold_out"], 70);
        assert_eq!(sum.by_class.expected["409 limit_reached"], 5);
        assert_eq!(sum.by_class.expected["GET batch 200"], 1);
        assert_eq!(sum.by_class.unexpected["503 overloaded"], 1);
        assert_eq!(sum.by_class.unexpected["500 internal"], 1);
        assert_eq!(sum.by_class.unexpected["transport:timeout"], 1);
        assert!(!sum.by_class.unexpected.contains_key("410 sold_out"));

        let v = serde_json::to_value(&sum).expect("json");
        assert_eq!(v["expected"], 96);
        assert_eq!(v["unexpected"], 4);
        assert_eq!(v["by_class"]["expected"]["410 sold_out"], 70);
        assert_eq!(v["by_class"]["unexpected"]["transport:connect"], 1);
        assert_eq!(v["expect_shedding"], false);
        assert_eq!(v["warnings"][0], "batch lt-1 already exists");

        let t = sum.table();
        assert!(
            t.contains("outcomes              96 expected, 4 unexpected"),
            "{t}"
        );
        let unexpected_part = t.split("    unexpected").nth(1).expect("section");
        assert!(unexpected_part.contains("500 internal"), "{t}");
        assert!(!unexpected_part.contains("sold_out"), "{t}");
        assert!(t.contains("  warning: batch lt-1 already exists"), "{t}");

        // With --expect-shedding the overload answer is expected; the 500 never is.
        let shed = Summary::new(
            info(
                Expectations {
                    shedding: true,
                    ..flash_sale()
                },
                None,
            ),
            &st,
        );
        assert_eq!(shed.unexpected, 3);
        assert_eq!(shed.by_class.expected["503 overloaded"], 1);
    }

    /// Regression: the only claims/s figure was averaged over the whole run, even when the
    /// batch sold out in its first second.
    #[test]
    fn time_to_sell_out_and_rate_while_stock_lasted() {
        let mut st = Stats::new();
        for _ in 0..1000 {
            st.record_reply(Endpoint::Claim, 201, None, ms(1));
        }
        for _ in 0..9000 {
            st.record_reply(Endpoint::Claim, 410, Some("sold_out".into()), ms(1));
        }
        let so = SellOut::new(Phase::Measure, ms(400), st.claims_ok);
        assert_eq!(so.after_s, 0.4);
        assert_eq!(so.claims_ok, 1000);
        assert_eq!(so.claims_per_s, 2500.0);
        let sum = Summary::new(info(flash_sale(), Some(so)), &st);
        // The whole-run average over 10 s says 100/s; the sale itself ran at 2500/s.
        assert_eq!(sum.claims_per_s, 100.0);
        let v = serde_json::to_value(&sum).expect("json");
        assert_eq!(v["sell_out"]["after_s"], 0.4);
        assert_eq!(v["sell_out"]["claims_per_s"], 2500.0);
        assert_eq!(v["sell_out"]["phase"], "measure");
        let t = sum.table();
        assert!(
            t.contains(
                "sold out after        0.400 s: 1000 claims ok, 2500.0 claims/s while stock lasted"
            ),
            "{t}"
        );
        assert!(t.contains("claims ok/s           100.0 (whole run)"), "{t}");

        let drained = SellOut::new(Phase::Drain, Duration::ZERO, 0);
        assert_eq!(drained.claims_per_s, 0.0);
        let sum = Summary::new(info(flash_sale(), Some(drained)), &st);
        assert!(sum.table().contains("s (drain phase): 0 claims ok"));
    }
}
