//! Time series of a run, for `--report`: per-interval aggregates of the answers
//! (throughput, outcome classes, a small latency histogram) and the gateway's persistence
//! backlog sampled from `/readyz`.
//!
//! Invariant: memory stays bounded whatever the run's length or rate. Nothing is kept per
//! request: each connection adds into one open interval and hands it to the shared
//! timeline when it moves on, and the timeline keeps at most [`MAX_POINTS`] intervals by
//! merging neighbours (doubling the interval) when a run outgrows them. Backlog samples are
//! thinned the same way.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::client::{Api, Connection};
use crate::outcome::Class;

/// The finest interval of the timeline (runs longer than `MAX_POINTS` of these get wider
/// intervals).
pub const BASE_INTERVAL: Duration = Duration::from_millis(100);

/// Most intervals the timeline keeps.
pub const MAX_POINTS: usize = 600;

/// How often `/readyz` is asked for the persistence backlog.
pub const BACKLOG_EVERY: Duration = Duration::from_millis(500);

/// Most backlog samples kept (older ones are thinned to every other sample beyond this).
pub const MAX_BACKLOG_SAMPLES: usize = 600;

/// Largest latency recorded, in µs (one hour; larger values are clamped).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Significant digits of the per-interval latency histograms (1 % precision is plenty for
/// a chart and keeps each interval small).
const INTERVAL_SIGFIG: u8 = 2;

/// What happened in one interval.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// Requests that ended in this interval (answered or not).
    pub requests: u64,
    /// Claims answered 201.
    pub claims_ok: u64,
    /// Outcomes classed unexpected.
    pub unexpected: u64,
    /// Latency of the answered requests, µs.
    pub latency: Histogram<u64>,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            requests: 0,
            claims_ok: 0,
            unexpected: 0,
            // Auto-resizing from a constant precision: cannot fail at run time.
            latency: Histogram::new(INTERVAL_SIGFIG).expect("constant histogram precision"),
        }
    }
}

impl Bucket {
    fn merge(&mut self, other: &Bucket) {
        self.requests += other.requests;
        self.claims_ok += other.claims_ok;
        self.unexpected += other.unexpected;
        // Auto-resizing histograms of equal precision always add; should that ever fail,
        // the samples are re-recorded one value at a time (clamped) instead.
        if self.latency.add(&other.latency).is_err() {
            for v in other.latency.iter_recorded() {
                self.latency
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }
}

/// The intervals of one phase, shared by its connections.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// Interval width is `BASE_INTERVAL * 2^shift`.
    shift: u32,
    cap: usize,
    buckets: Vec<Bucket>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::with_capacity(MAX_POINTS)
    }
}

/// One interval, ready to plot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Middle of the interval, seconds since the start of the phase.
    pub t_s: f64,
    pub requests_per_s: f64,
    pub claims_ok_per_s: f64,
    pub unexpected_per_s: f64,
    /// Latency percentiles in ms; `None` when nothing was answered in the interval.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Timeline {
    /// A timeline that keeps at most `cap` (≥ 2) intervals.
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            shift: 0,
            cap: cap.max(2),
            buckets: Vec::new(),
        }
    }

    /// Current interval width.
    pub fn interval(&self) -> Duration {
        BASE_INTERVAL.saturating_mul(1u32.checked_shl(self.shift).unwrap_or(u32::MAX))
    }

    /// Number of intervals held.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Adds what happened in base interval number `base_idx`.
    pub fn add(&mut self, base_idx: u64, bucket: &Bucket) {
        let mut pos = base_idx.checked_shr(self.shift).unwrap_or(0);
        while pos >= self.cap as u64 {
            self.coarsen();
            pos = base_idx.checked_shr(self.shift).unwrap_or(0);
        }
        let pos = usize::try_from(pos).unwrap_or(usize::MAX);
        if self.buckets.len() <= pos {
            self.buckets.resize_with(pos + 1, Bucket::default);
        }
        self.buckets[pos].merge(bucket);
    }

    /// Doubles the interval: merges intervals 2k and 2k+1.
    fn coarsen(&mut self) {
        let old = std::mem::take(&mut self.buckets);
        let mut merged: Vec<Bucket> = Vec::with_capacity(old.len().div_ceil(2));
        for (i, b) in old.into_iter().enumerate() {
            if i % 2 == 0 {
                merged.push(b);
            } else if let Some(last) = merged.last_mut() {
                last.merge(&b);
            }
        }
        self.buckets = merged;
        self.shift += 1;
    }

    /// The intervals as rates and percentiles; `elapsed` (the phase's length) trims the
    /// last interval so that a partial interval's rate is not understated. A last interval
    /// shorter than half the width (typically the in-flight tail of a closed-loop run,
    /// after which nothing new is sent) is folded into the one before, so that a handful
    /// of answers over a few milliseconds makes neither a spike nor a cliff.
    pub fn points(&self, elapsed: Duration) -> Vec<Point> {
        let width = self.interval().as_secs_f64();
        let end_of_run = elapsed.as_secs_f64();
        let n = self.buckets.len();
        let tail_start = self
            .interval()
            .saturating_mul(u32::try_from(n.saturating_sub(1)).unwrap_or(u32::MAX));
        let fold = n >= 2 && elapsed.saturating_sub(tail_start) < self.interval() / 2;
        let last = if fold { n - 1 } else { n };
        let mut out = Vec::with_capacity(last);
        for (i, b) in self.buckets.iter().take(last).enumerate() {
            let start = i as f64 * width;
            let mut end = start + width;
            if i + 1 == last {
                // The run's last interval ends with the run (but never before it starts).
                end = end.min(end_of_run).max(start + width * 0.01);
                if fold {
                    end = end_of_run.max(end);
                    let mut merged = b.clone();
                    merged.merge(&self.buckets[n - 1]);
                    out.push(point(start, end, &merged));
                    continue;
                }
            }
            out.push(point(start, end, b));
        }
        out
    }
}

/// One interval `[start, end)` (seconds) as a point.
fn point(start: f64, end: f64, b: &Bucket) -> Point {
    let span = end - start;
    let q =
        |q: f64| (!b.latency.is_empty()).then(|| b.latency.value_at_quantile(q) as f64 / 1000.0);
    Point {
        t_s: start + span / 2.0,
        requests_per_s: b.requests as f64 / span,
        claims_ok_per_s: b.claims_ok as f64 / span,
        unexpected_per_s: b.unexpected as f64 / span,
        p50_ms: q(0.50),
        p90_ms: q(0.90),
        p99_ms: q(0.99),
    }
}

/// Locks a mutex that only ever holds plain data: a panic elsewhere cannot leave it half
/// updated in a way that matters for a chart, so a poisoned lock is simply taken over.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One connection's open interval; hands it to the shared timeline when a request ends in
/// a later interval, and when dropped via [`Recorder::finish`].
pub struct Recorder {
    shared: Arc<Mutex<Timeline>>,
    t0: Instant,
    idx: u64,
    open: Bucket,
}

impl Recorder {
    pub fn new(shared: Arc<Mutex<Timeline>>, t0: Instant) -> Self {
        Self {
            shared,
            t0,
            idx: 0,
            open: Bucket::default(),
        }
    }

    /// Records a request that ended at `done`.
    pub fn record(
        &mut self,
        done: Instant,
        latency: Option<Duration>,
        claim_ok: bool,
        class: Class,
    ) {
        let since = done.saturating_duration_since(self.t0);
        let idx = u64::try_from(since.as_nanos() / BASE_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
        if idx != self.idx {
            self.flush();
            self.idx = idx;
        }
        let b = &mut self.open;
        b.requests += 1;
        b.claims_ok += u64::from(claim_ok);
        b.unexpected += u64::from(class == Class::Unexpected);
        if let Some(l) = latency {
            let us = u64::try_from(l.as_micros())
                .unwrap_or(u64::MAX)
                .clamp(1, MAX_LATENCY_US);
            // `record` grows the auto-resizing histogram (`saturating_record` would clamp
            // to its current size instead); growth to the clamped maximum cannot fail.
            if b.latency.record(us).is_err() {
                b.latency.saturating_record(us);
            }
        }
    }

    fn flush(&mut self) {
        if self.open.requests > 0 {
            let done = std::mem::take(&mut self.open);
            lock(&self.shared).add(self.idx, &done);
        }
    }

    /// Hands the last open interval over.
    pub fn finish(mut self) {
        self.flush();
    }
}

/// A copy of the shared timeline.
pub fn snapshot(shared: &Mutex<Timeline>) -> Timeline {
    lock(shared).clone()
}

/// One `/readyz` reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacklogSample {
    /// Seconds since the start of the phase.
    pub t_s: f64,
    /// Claim records not yet in the database.
    pub backlog: u64,
    /// Age of the oldest of them, ms.
    pub lag_ms: Option<u64>,
}

/// The persistence backlog over a phase.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BacklogSeries {
    pub samples: Vec<BacklogSample>,
    /// Why there are no (or fewer) samples, when there is a reason to tell.
    pub note: Option<String>,
    /// `/readyz` requests that got no usable answer.
    pub failed: u64,
}

impl BacklogSeries {
    pub fn peak(&self) -> Option<u64> {
        self.samples.iter().map(|s| s.backlog).max()
    }
}

/// What a `/readyz` body says about the persister.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The persister's backlog and lag.
    Backlog { backlog: u64, lag_ms: Option<u64> },
    /// `"persister": null`: this gateway runs no persister.
    NoPersister,
}

/// Reads `persister.backlog` (and `lag_ms`) from a `/readyz` body.
pub fn parse_readyz(body: &[u8]) -> Result<Readiness, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("/readyz is not JSON: {e}"))?;
    match v.get("persister") {
        None => Err("/readyz has no \"persister\" field".into()),
        Some(serde_json::Value::Null) => Ok(Readiness::NoPersister),
        Some(p) => {
            let backlog = p
                .get("backlog")
                .and_then(serde_json::Value::as_u64)
                .ok_or("/readyz persister has no numeric \"backlog\"")?;
            Ok(Readiness::Backlog {
                backlog,
                lag_ms: p.get("lag_ms").and_then(serde_json::Value::as_u64),
            })
        }
    }
}

/// Samples `/readyz` every [`BACKLOG_EVERY`] from `t0` until `stop` turns true, on a
/// connection of its own (not counted in the run's figures). Each request is bounded by
/// `timeout` (and by the sampling interval).
pub fn spawn_backlog_sampler(
    mut conn: Connection,
    api: Arc<Api>,
    t0: Instant,
    timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<BacklogSeries> {
    tokio::spawn(async move {
        let mut series = BacklogSeries::default();
        let mut tick = tokio::time::interval_at(t0, BACKLOG_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Every `keep`-th tick is kept; doubled whenever the samples are thinned.
        let mut keep: u64 = 1;
        let mut n: u64 = 0;
        let limit = timeout.min(BACKLOG_EVERY.saturating_mul(4));
        loop {
            tokio::select! {
                at = tick.tick() => {
                    n += 1;
                    if !(n - 1).is_multiple_of(keep) {
                        continue;
                    }
                    let req = match api.readyz() {
                        Ok(r) => r,
                        Err(e) => {
                            series.note = Some(format!("cannot build GET /readyz: {e}"));
                            break;
                        }
                    };
                    let reply = tokio::select! {
                        r = conn.send(req, limit) => r,
                        changed = stop.changed() => {
                            if changed.is_err() || *stop.borrow() { break; }
                            continue;
                        }
                    };
                    let parsed = match reply {
                        Ok(r) if r.status == 404 => {
                            series.note = Some("the gateway has no /readyz (404)".into());
                            break;
                        }
                        Ok(r) => parse_readyz(&r.body),
                        Err(e) => Err(format!("GET /readyz: {e}")),
                    };
                    match parsed {
                        Ok(Readiness::Backlog { backlog, lag_ms }) => {
                            if series.samples.len() >= MAX_BACKLOG_SAMPLES {
                                let mut i = 0;
                                series.samples.retain(|_| { i += 1; i % 2 == 1 });
                                keep = keep.saturating_mul(2);
                            }
                            series.samples.push(BacklogSample {
                                t_s: at.saturating_duration_since(t0).as_secs_f64(),
                                backlog,
                                lag_ms,
                            });
                        }
                        Ok(Readiness::NoPersister) => {
                            series.note = Some(
                                "the gateway runs no persister (\"persister\": null in /readyz)"
                                    .into(),
                            );
                            break;
                        }
                        Err(e) => {
                            series.failed += 1;
                            series.note = Some(e);
                        }
                    }
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
            }
        }
        series
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(requests: u64, ok: u64, unexpected: u64, latencies_us: &[u64]) -> Bucket {
        let mut b = Bucket {
            requests,
            claims_ok: ok,
            unexpected,
            ..Bucket::default()
        };
        for &l in latencies_us {
            b.latency.record(l).expect("record");
        }
        b
    }

    #[test]
    fn intervals_become_rates_and_percentiles() {
        let mut t = Timeline::default();
        t.add(0, &bucket(10, 4, 1, &[1000; 10]));
        t.add(0, &bucket(10, 6, 0, &[3000; 10]));
        t.add(2, &bucket(5, 0, 5, &[]));
        let p = t.points(Duration::from_millis(300));
        assert_eq!(p.len(), 3);
        assert!((p[0].t_s - 0.05).abs() < 1e-9);
        assert!((p[0].requests_per_s - 200.0).abs() < 1e-6);
        assert!((p[0].claims_ok_per_s - 100.0).abs() < 1e-6);
        assert!((p[0].unexpected_per_s - 10.0).abs() < 1e-6);
        assert!((p[0].p50_ms.expect("p50") - 1.0).abs() < 0.02);
        assert!((p[0].p99_ms.expect("p99") - 3.0).abs() < 0.05);
        // An interval in which nothing happened, and one without answers.
        assert_eq!(p[1].requests_per_s, 0.0);
        assert_eq!(p[1].p50_ms, None);
        assert_eq!(p[2].p90_ms, None);
        assert!((p[2].unexpected_per_s - 50.0).abs() < 1e-6);
    }

    #[test]
    fn a_partial_last_interval_is_not_understated() {
        let mut t = Timeline::default();
        t.add(0, &bucket(100, 0, 0, &[]));
        t.add(1, &bucket(60, 0, 0, &[]));
        // The run ended 60 ms into the second interval.
        let p = t.points(Duration::from_millis(160));
        assert!((p[0].requests_per_s - 1000.0).abs() < 1e-6);
        assert!((p[1].requests_per_s - 1000.0).abs() < 1e-6, "{:?}", p[1]);
        assert!((p[1].t_s - 0.13).abs() < 1e-9);
    }

    #[test]
    fn a_short_tail_is_folded_into_the_interval_before() {
        let mut t = Timeline::default();
        t.add(0, &bucket(100, 0, 0, &[]));
        t.add(1, &bucket(100, 0, 0, &[1000]));
        t.add(2, &bucket(3, 0, 0, &[9000]));
        // The run ended 40 ms into the third interval: the 3 answers of the in-flight
        // tail are no cliff down to 75/s.
        let p = t.points(Duration::from_millis(240));
        assert_eq!(p.len(), 2);
        assert!(
            (p[1].requests_per_s - 103.0 / 0.14).abs() < 1e-6,
            "{:?}",
            p[1]
        );
        assert!(
            p[1].p99_ms.expect("p99") > 8.0,
            "the tail's latency is kept"
        );
        // Exactly on the boundary: the empty-span tail folds too.
        let p = t.points(Duration::from_millis(200));
        assert_eq!(p.len(), 2);
        assert!((p[1].requests_per_s - 1030.0).abs() < 1e-6, "{:?}", p[1]);
    }

    #[test]
    fn long_runs_stay_bounded() {
        let mut t = Timeline::with_capacity(8);
        for i in 0..1000u64 {
            t.add(i, &bucket(1, 1, 0, &[i + 1]));
        }
        assert!(t.len() <= 8, "{}", t.len());
        // 1000 base intervals of 100 ms fold into 128 x 100 ms = 12.8 s intervals.
        assert_eq!(t.interval(), Duration::from_millis(12_800));
        let p = t.points(Duration::from_secs(100));
        let total: f64 = p
            .iter()
            .enumerate()
            .map(|(i, pt)| {
                let start = i as f64 * 12.8;
                pt.requests_per_s * ((start + 12.8).min(100.0) - start)
            })
            .sum();
        assert!((total - 1000.0).abs() < 1e-6, "nothing lost: {total}");
        // Out-of-order adds (a slow connection flushing late) land in the right interval.
        let mut t = Timeline::with_capacity(4);
        t.add(7, &bucket(1, 0, 0, &[]));
        t.add(0, &bucket(2, 0, 0, &[]));
        assert_eq!(t.interval(), Duration::from_millis(200));
        let p = t.points(Duration::from_millis(800));
        assert!((p[0].requests_per_s - 10.0).abs() < 1e-6);
        assert!((p[3].requests_per_s - 5.0).abs() < 1e-6);
    }

    #[test]
    fn recorders_flush_per_interval() {
        let shared = Arc::new(Mutex::new(Timeline::default()));
        let t0 = Instant::now();
        let mut r = Recorder::new(Arc::clone(&shared), t0);
        let ms = Duration::from_millis;
        r.record(t0 + ms(10), Some(ms(2)), true, Class::Expected);
        r.record(t0 + ms(20), None, false, Class::Unexpected);
        assert!(snapshot(&shared).is_empty(), "still open");
        r.record(t0 + ms(250), Some(ms(4)), false, Class::Expected);
        assert_eq!(snapshot(&shared).len(), 1);
        r.finish();
        let p = snapshot(&shared).points(ms(300));
        assert_eq!(p.len(), 3);
        assert!((p[0].requests_per_s - 20.0).abs() < 1e-6);
        assert!((p[0].claims_ok_per_s - 10.0).abs() < 1e-6);
        assert!((p[0].unexpected_per_s - 10.0).abs() < 1e-6);
        assert!((p[0].p50_ms.expect("p50") - 2.0).abs() < 0.05);
        assert!((p[2].p50_ms.expect("p50") - 4.0).abs() < 0.05);
    }

    #[test]
    fn readyz_bodies() {
        assert_eq!(
            parse_readyz(br#"{"ready":true,"persister":{"backlog":42,"lag_ms":7}}"#),
            Ok(Readiness::Backlog {
                backlog: 42,
                lag_ms: Some(7)
            })
        );
        assert_eq!(
            parse_readyz(br#"{"ready":false,"persister":null}"#),
            Ok(Readiness::NoPersister)
        );
        assert!(parse_readyz(br#"{"ready":true}"#).is_err());
        assert!(parse_readyz(br#"{"persister":{"backlog":"x"}}"#).is_err());
        assert!(parse_readyz(b"oops").is_err());
    }
}
