//! The refill gate: claims that found their home shard empty refill it ONCE between them,
//! sized for all of them, instead of each moving a chunk of its own. With group commit a
//! call answers "shard empty" to many claims at once; without the gate each would start its
//! own refill (a transfer from the pool, then from every sibling), a herd that costs Redis
//! more than the claims and drains the pool into one shard.
//!
//! Invariants kept here: at most one refill per gate runs at a time in this gateway; a claim
//! that found its shard empty either refills it or learns the outcome of a refill that ended
//! after its claim call began (a generation number says which), so none waits for a refill
//! that cannot help it, and none skips one that might; waiting for the gate is bounded.
//! Gates are striped: a fixed number, picked by the shard's key (two shards sharing a gate
//! only cost an extra claim round, never a wrong answer).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Mutex;

use crate::backend::BackendError;

use super::StockError;

/// Gates per gateway.
const STRIPES: usize = 256;

/// What a claim that found its shard empty should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refilled {
    /// This claim refilled the shard: claim again.
    Moved,
    /// A refill that ended after this claim's call began moved stock: claim again (others
    /// waiting may take it first).
    MovedByOther,
    /// This claim's refill found nothing to move anywhere: the batch may be sold out.
    Nothing,
    /// A refill that ended after this claim's call began found nothing. Stock added since
    /// (to the pool) is not ruled out: the caller looks there itself, one cheap call.
    NothingByOther,
}

/// The gates of one gateway.
pub struct Gates {
    gates: Box<[Gate]>,
    hasher: std::collections::hash_map::RandomState,
    wait: Duration,
}

#[derive(Default)]
struct Gate {
    /// Refills completed through this gate.
    generation: AtomicU64,
    /// Claims waiting at the gate (they size the next refill).
    waiting: AtomicUsize,
    /// Held while a refill runs; the amount the last one moved.
    last: Mutex<i64>,
}

impl Gates {
    pub fn new(wait: Duration) -> Gates {
        Gates {
            gates: (0..STRIPES).map(|_| Gate::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            wait,
        }
    }

    fn gate(&self, key: &str) -> &Gate {
        &self.gates[self.hasher.hash_one(key) as usize % self.gates.len()]
    }

    /// The generation of `key`'s gate: read it before a claim call, give it to
    /// [`Gates::refill`] if the call found the shard empty.
    pub fn generation(&self, key: &str) -> u64 {
        self.gate(key).generation.load(Ordering::Acquire)
    }

    /// Refills `key`'s shard for a claim that found it empty in a call begun at `seen`
    /// (its [`Gates::generation`]). `refill(want)` moves stock for `want` claims at least and
    /// returns the amount moved; it runs only if no refill ended since `seen`.
    pub async fn refill<F, Fut>(
        &self,
        key: &str,
        seen: u64,
        refill: F,
    ) -> Result<Refilled, StockError>
    where
        F: FnOnce(i64) -> Fut,
        Fut: std::future::Future<Output = Result<i64, StockError>>,
    {
        let gate = self.gate(key);
        gate.waiting.fetch_add(1, Ordering::AcqRel);
        let locked = tokio::time::timeout(self.wait, gate.last.lock()).await;
        gate.waiting.fetch_sub(1, Ordering::AcqRel);
        let mut last = locked.map_err(|_| {
            BackendError::Unavailable(format!(
                "no refill of the shard within stock.group_wait_ms ({} ms)",
                self.wait.as_millis()
            ))
        })?;
        if gate.generation.load(Ordering::Acquire) != seen {
            // A refill ended after this claim's call began: its outcome is ours.
            return Ok(if *last > 0 {
                Refilled::MovedByOther
            } else {
                Refilled::NothingByOther
            });
        }
        // Everyone still waiting will claim again after this refill: move enough for all.
        let want = gate.waiting.load(Ordering::Acquire) as i64 + 1;
        let moved = refill(want).await?;
        *last = moved;
        gate.generation.fetch_add(1, Ordering::AcqRel);
        Ok(if moved > 0 {
            Refilled::Moved
        } else {
            Refilled::Nothing
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;

    use super::*;

    /// 50 claims find the shard empty at once: one refill runs, sized for all of them, and
    /// every claim learns it moved stock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_herd_refills_once_for_all() {
        let gates = Arc::new(Gates::new(Duration::from_secs(10)));
        let seen = gates.generation("s");
        let (runs, wanted) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (gates, runs, wanted) = (gates.clone(), runs.clone(), wanted.clone());
            tasks.push(tokio::spawn(async move {
                gates
                    .refill("s", seen, |want| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        wanted.store(want, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(want)
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut ours = 0;
        for t in tasks {
            match t.await.unwrap() {
                Refilled::Moved => ours += 1,
                r => assert_eq!(r, Refilled::MovedByOther),
            }
        }
        assert_eq!(ours, 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one refill for the herd");
        assert!(wanted.load(Ordering::SeqCst) >= 1);
        // a claim whose call began after that refill refills again; an empty refill is
        // "nothing" for it, and "nothing, by another" for whoever saw the same generation
        let seen = gates.generation("s");
        let r = gates.refill("s", seen, |_| async { Ok(0) }).await.unwrap();
        assert_eq!(r, Refilled::Nothing);
        let r2 = gates
            .refill("s", seen, |_| async {
                panic!("not run: a refill ended since")
            })
            .await
            .unwrap();
        assert_eq!(r2, Refilled::NothingByOther);
    }

    /// A refill that fails leaves the generation: the next claim tries again.
    #[tokio::test]
    async fn a_failed_refill_is_tried_again() {
        let gates = Gates::new(Duration::from_secs(1));
        let seen = gates.generation("s");
        let e = gates
            .refill("s", seen, |_| async {
                Err(StockError::Backend(BackendError::Unavailable("x".into())))
            })
            .await;
        assert!(e.is_err());
        let r = gates
            .refill("s", seen, |w| async move { Ok(w) })
            .await
            .unwrap();
        assert_eq!(r, Refilled::Moved);
    }
}
