//! Live progress: shared atomic counters bumped by the connections, and a task that prints
//! one line per second on stderr (req/s, 201/s, expected and unexpected outcomes over the
//! last second). A `410 sold_out` is an expected answer, not an error.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::outcome::Class;

/// Counters shared by all connections of a run.
#[derive(Debug, Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub created: AtomicU64,
    pub expected: AtomicU64,
    pub unexpected: AtomicU64,
    /// Requests without an answer (all of them unexpected).
    pub transport: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub requests: u64,
    pub created: u64,
    pub expected: u64,
    pub unexpected: u64,
    pub transport: u64,
}

impl Live {
    /// Counts an HTTP answer of the given class.
    pub fn answered(&self, status: u16, class: Class) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status == 201 {
            self.created.fetch_add(1, Ordering::Relaxed);
        }
        self.count(class);
    }

    /// Counts a request that got no answer.
    pub fn failed(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.transport.fetch_add(1, Ordering::Relaxed);
        self.count(Class::Unexpected);
    }

    fn count(&self, class: Class) {
        let counter = match class {
            Class::Expected => &self.expected,
            Class::Unexpected => &self.unexpected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.load(Ordering::Relaxed),
            created: self.created.load(Ordering::Relaxed),
            expected: self.expected.load(Ordering::Relaxed),
            unexpected: self.unexpected.load(Ordering::Relaxed),
            transport: self.transport.load(Ordering::Relaxed),
        }
    }
}

/// The progress line for the interval between two snapshots.
pub fn line(elapsed: Duration, prev: Snapshot, now: Snapshot, interval: Duration) -> String {
    let secs = interval.as_secs_f64().max(1e-9);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    format!(
        "[{:>5.0}s] {:>9.0} req/s {:>8.0} 201/s | expected {:.0}/s | unexpected {:.0}/s (transport {:.0}/s) | total {}, unexpected {}",
        elapsed.as_secs_f64(),
        rate(prev.requests, now.requests),
        rate(prev.created, now.created),
        rate(prev.expected, now.expected),
        rate(prev.unexpected, now.unexpected),
        rate(prev.transport, now.transport),
        now.requests,
        now.unexpected,
    )
}

/// Prints a progress line every second until `stop` turns true.
pub fn spawn(live: Arc<Live>, t0: Instant, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let mut tick =
            tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut prev = live.snapshot();
        let mut prev_at = t0;
        loop {
            tokio::select! {
                at = tick.tick() => {
                    let now = live.snapshot();
                    let text = line(at - t0, prev, now, at - prev_at);
                    let mut err = std::io::stderr().lock();
                    // Progress output is best effort: a closed stderr must not stop the run.
                    let _ = if tty {
                        write!(err, "\r\x1b[2K{text}")
                    } else {
                        writeln!(err, "{text}")
                    };
                    let _ = err.flush();
                    prev = now;
                    prev_at = at;
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
            }
        }
        if tty {
            let _ = writeln!(std::io::stderr());
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_formats() {
        let live = Live::default();
        live.answered(201, Class::Expected);
        live.answered(200, Class::Expected);
        live.answered(410, Class::Expected);
        live.answered(409, Class::Expected);
        live.answered(503, Class::Unexpected);
        live.failed();
        let s = live.snapshot();
        assert_eq!(
            s,
            Snapshot {
                requests: 6,
                created: 1,
                expected: 4,
                unexpected: 2,
                transport: 1
            }
        );
        let text = line(
            Duration::from_secs(3),
            Snapshot::default(),
            s,
            Duration::from_millis(500),
        );
        assert!(text.contains("12 req/s"), "{text}");
        assert!(text.contains("2 201/s"), "{text}");
        // The sold-out and limit answers are expected, not errors.
        assert!(text.contains("expected 8/s"), "{text}");
        assert!(text.contains("unexpected 4/s (transport 2/s)"), "{text}");
        assert!(!text.contains("error"), "{text}");
    }
}
