//! Shard faults: a shard found lost (its meta gone while the batch's pool lives) or rolled
//! back (it minted a coupon sequence it had already handed out, or one at or below what the
//! database already holds), reported by whoever notices (the claim path, the persister's
//! probe) to the one task that repairs shards (`crate::recovery::Repairer`). Also the shard
//! floors: per shard, the highest coupon position the database is known to hold (kept by
//! the persister, read by the claim path at every mint).
//!
//! Invariant kept here: reporting never blocks and never fails the caller: the channel is
//! bounded, a report that finds it full is dropped (the next claim on the shard or the next
//! probe reports it again), and a shard is reported (and logged) at most once per
//! [`REPORT_EVERY`], so a storm of refused claims cannot grow memory or flood the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::domain::ids::{MintWindow, Sighting};

/// A shard is reported at most this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// How a shard went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Its meta is gone while the pool lives (a node came back empty, or a fence).
    Missing,
    /// It handed out, or the database holds, a coupon position beyond its claim counter.
    RolledBack,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Missing => "missing",
            FaultKind::RolledBack => "rolled_back",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardFault {
    pub batch: String,
    pub shard: u32,
    pub kind: FaultKind,
    /// The coupon-id epoch the shard was in when the fault was seen: a repair moves it to a
    /// new one, so a report that arrives after the repair is recognised as stale. (`None`
    /// for a missing shard: its meta, and so its epoch, is gone.)
    pub epoch: Option<u64>,
}

/// The sending side, cloned into every reporter. `disabled()` reports nowhere (tests, and
/// tools that do not repair).
#[derive(Debug, Clone)]
pub struct FaultReporter {
    tx: Option<mpsc::Sender<ShardFault>>,
    /// When each shard (`<batch>/<shard>`) was last reported.
    recent: Arc<Mutex<HashMap<String, Instant>>>,
    /// Per shard (its meta key), the highest coupon position the database holds.
    floors: Arc<DashMap<Box<str>, Arc<AtomicU64>>>,
    /// Per shard (its meta key), the coupon sequences this instance saw it mint: kept here,
    /// not with the cached batch, so that a batch reloaded meanwhile (a failover often makes
    /// it look lost for a moment) still knows them.
    minted: Arc<DashMap<Box<str>, Arc<Mutex<MintWindow>>>>,
}

impl FaultReporter {
    /// A reporter and the receiver the repairer drains (at most `capacity` waiting).
    pub fn channel(capacity: usize) -> (FaultReporter, mpsc::Receiver<ShardFault>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let r = FaultReporter {
            tx: Some(tx),
            recent: Arc::default(),
            floors: Arc::default(),
            minted: Arc::default(),
        };
        (r, rx)
    }

    pub fn disabled() -> FaultReporter {
        FaultReporter {
            tx: None,
            recent: Arc::default(),
            floors: Arc::default(),
            minted: Arc::default(),
        }
    }

    /// Shows the window of the shard whose meta key is `meta` that it handed out `seq` to
    /// the claim tagged `tag` (`domain::ids::claim_tag`), recorded if new (see
    /// [`MintWindow`]).
    pub fn sight(&self, meta: &str, seq: u64, tag: u32) -> Sighting {
        #[allow(clippy::disallowed_methods)] // the guard ends with this expression
        let known = self.minted.get(meta).map(|w| w.value().clone());
        let window = match known {
            Some(w) => w,
            #[allow(clippy::disallowed_methods)] // the entry guard ends with this expression
            None => self
                .minted
                .entry(Box::from(meta))
                .or_default()
                .value()
                .clone(),
        };
        window.lock().sight(seq, tag)
    }

    /// The highest coupon sequence this instance saw the shard whose meta key is `meta` hand
    /// out (0 = none; see [`MintWindow::highest`]). Read it BEFORE a claim call: the script
    /// refuses to mint at or below it (the shard was rolled back) before writing anything.
    pub fn highest_seen(&self, meta: &str) -> u64 {
        #[allow(clippy::disallowed_methods)] // the guard ends with this expression
        let known = self.minted.get(meta).map(|w| w.value().clone());
        known.map_or(0, |w| w.lock().highest())
    }

    /// The floor of the shard whose meta key is `meta` (created at 0), for its keeper (the
    /// persister) to raise.
    pub fn floor(&self, meta: &str) -> Arc<AtomicU64> {
        #[allow(clippy::disallowed_methods)] // the entry guard ends with this expression
        self.floors
            .entry(Box::from(meta))
            .or_default()
            .value()
            .clone()
    }

    /// What the database holds from the shard whose meta key is `meta` now (its highest
    /// position), if known. Read it BEFORE a claim call: a position the call mints at or
    /// below it was minted again (the shard was rolled back). A floor read after the call
    /// proves nothing: the persister may have written the call's own records meanwhile.
    pub fn floor_now(&self, meta: &str) -> Option<u64> {
        #[allow(clippy::disallowed_methods)] // the guard ends with this expression
        self.floors.get(meta).map(|f| f.load(Ordering::Relaxed))
    }

    /// Whether `batch`/`shard` was not reported within [`REPORT_EVERY`] (and notes it now).
    fn due(&self, batch: &str, shard: u32) -> bool {
        let now = Instant::now();
        let mut recent = self.recent.lock();
        if recent.len() >= 4096 {
            recent.retain(|_, t| now.duration_since(*t) < REPORT_EVERY);
        }
        let key = format!("{batch}/{shard}");
        match recent.get(&key) {
            Some(t) if now.duration_since(*t) < REPORT_EVERY => false,
            _ => {
                recent.insert(key, now);
                true
            }
        }
    }

    /// Reports a fault; `false` when it was dropped (no repairer, or the queue is full).
    pub fn report(&self, batch: &str, shard: u32, kind: FaultKind, epoch: Option<u64>) -> bool {
        let Some(tx) = &self.tx else { return false };
        if !self.due(batch, shard) {
            return false;
        }
        let fault = ShardFault {
            batch: batch.to_string(),
            shard,
            kind,
            epoch,
        };
        crate::obs::events::ShardFaultSeen {
            batch,
            shard,
            kind: kind.as_str(),
        }
        .emit();
        tx.try_send(fault).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_are_shared_with_their_keeper() {
        let (r, _rx) = FaultReporter::channel(1);
        assert_eq!(r.floor_now("m"), None, "no floor known");
        r.floor("m").fetch_max(10, Ordering::Relaxed);
        assert_eq!(r.clone().floor_now("m"), Some(10));
    }

    #[test]
    fn the_highest_sequence_seen_is_per_shard() {
        let r = FaultReporter::disabled();
        assert_eq!(r.highest_seen("m"), 0, "nothing seen");
        assert_eq!(r.sight("m", 7, 1), Sighting::New);
        assert_eq!(r.sight("m", 3, 2), Sighting::New);
        assert_eq!((r.clone().highest_seen("m"), r.highest_seen("n")), (7, 0));
    }

    #[test]
    fn reports_are_bounded_and_never_block() {
        let (r, mut rx) = FaultReporter::channel(2);
        assert!(r.report("b", 1, FaultKind::Missing, None));
        assert!(
            !r.report("b", 1, FaultKind::Missing, None),
            "reported a moment ago"
        );
        assert!(r.report("b", 2, FaultKind::RolledBack, Some(0)));
        assert!(!r.report("b", 3, FaultKind::Missing, None), "full: dropped");
        assert_eq!(rx.try_recv().unwrap().shard, 1);
        assert!(!FaultReporter::disabled().report("b", 1, FaultKind::Missing, None));
    }
}
