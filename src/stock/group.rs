//! Group commit per shard: while a claim call to a shard is in flight from this gateway,
//! further claims for that shard queue here; when the call returns, the queue goes in ONE
//! call of `lua/claim.lua`, which decides the claims in order, each with its own answer. No
//! artificial delay: under light load a claim goes alone at once (run by its own request,
//! nothing spawned), under heavy load the calls grow, which is what makes a claim cheap for
//! Redis (the script's reads and writes are per call, not per claim).
//!
//! Invariants kept here:
//! - every claim handed to [`GroupCommit::claim`] gets exactly one answer: its own outcome
//!   from the call that carried it, that call's error, or a shed before it was queued;
//! - per shard, at most one claim call from this gateway is in flight, and claims go in the
//!   order they arrived (a call carries a prefix of the queue);
//! - bounds: a call carries at most `stock.group_max_claims` claims, a shard's queue holds
//!   at most `stock.group_max_queue` (past it a claim is shed: nothing claimed, 503), and no
//!   caller waits for its answer longer than `stock.group_wait_ms`;
//! - a call that carries other requests' claims runs in a task of its own, so a client that
//!   hangs up cancels nobody else's claim; the right to run calls on a shard (the [`Turn`])
//!   is handed over or given back on every path, a panic included.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError};
use crate::contract::claim::{self, Claim, MAX_CLAIMS_PER_CALL, Outcome, Shared};
use crate::contract::keys::SlotKeys;
use crate::obs::events::{ClaimCallMade, Shed};

use super::StockError;

/// The group committer of one gateway: one lane per shard with claims in flight.
pub struct GroupCommit<B> {
    core: Arc<Core<B>>,
    max_queue: usize,
    wait: Duration,
}

/// What a [`Turn`] needs, shared with the task it may move to.
struct Core<B> {
    backend: Arc<B>,
    lanes: Lanes,
    stats: Stats,
    max_claims: usize,
}

/// Calls made and claims they carried, since start (their ratio is the mean group size;
/// the metrics `claimgate_claim_calls_total` and `claimgate_claim_call_claims_total` count
/// the same).
#[derive(Debug, Default)]
pub struct Stats {
    pub calls: AtomicU64,
    pub claims: AtomicU64,
    /// The largest call so far.
    pub largest: AtomicU64,
}

impl Stats {
    fn record(&self, claims: usize) {
        let n = claims as u64;
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.claims.fetch_add(n, Ordering::Relaxed);
        self.largest.fetch_max(n, Ordering::Relaxed);
        ClaimCallMade { claims }.emit();
    }
}

/// Lanes by the shard's meta key; a lane exists only while its shard has a call in flight.
type Lanes = DashMap<Box<str>, Arc<Lane>>;

#[derive(Default)]
struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    /// A [`Turn`] exists: a call is in flight (or about to be made) for this shard.
    busy: bool,
    queue: VecDeque<Pending>,
}

/// A queued claim and where its answer goes.
struct Pending {
    user: Box<str>,
    request_id: Box<str>,
    nonce: Box<str>,
    max_log: Box<str>,
    day_offset: Box<str>,
    seen: u64,
    checked: bool,
    reply: oneshot::Sender<Result<Outcome, BackendError>>,
}

impl Pending {
    fn claim(&self) -> Claim<'_> {
        Claim {
            user: &self.user,
            request_id: &self.request_id,
            nonce: &self.nonce,
            seen: self.seen,
            checked: self.checked,
        }
    }

    fn shared(&self) -> Shared<'_> {
        Shared {
            max_log: &self.max_log,
            day_offset: &self.day_offset,
        }
    }
}

impl<B: Backend> GroupCommit<B> {
    /// `max_claims` is clamped to what the script accepts.
    pub fn new(backend: Arc<B>, max_claims: usize, max_queue: usize, wait: Duration) -> Self {
        GroupCommit {
            core: Arc::new(Core {
                backend,
                lanes: DashMap::new(),
                stats: Stats::default(),
                max_claims: max_claims.clamp(1, MAX_CLAIMS_PER_CALL),
            }),
            max_queue,
            wait,
        }
    }

    /// Claims `claim` on `slot`: at once in a call of its own when no call to the shard is
    /// in flight, else in the next call that carries the shard's queue.
    pub async fn claim(
        &self,
        slot: &SlotKeys,
        shared: Shared<'_>,
        claim: Claim<'_>,
    ) -> Result<Outcome, StockError> {
        let lane = self.lane(&slot.meta);
        let queued = {
            let mut st = lane.state.lock();
            if !st.busy {
                st.busy = true;
                None
            } else if st.queue.len() >= self.max_queue {
                drop(st);
                Shed { reason: "queue" }.emit();
                return Err(StockError::Shed);
            } else {
                let (tx, rx) = oneshot::channel();
                st.queue.push_back(Pending {
                    user: claim.user.into(),
                    request_id: claim.request_id.into(),
                    nonce: claim.nonce.into(),
                    max_log: shared.max_log.into(),
                    day_offset: shared.day_offset.into(),
                    seen: claim.seen,
                    checked: claim.checked,
                    reply: tx,
                });
                Some(rx)
            }
        };
        match queued {
            // Our turn: the claim goes alone, from this request. Whatever queues meanwhile
            // is handed to a task when the turn ends (also if this future is dropped).
            None => {
                let turn = Turn {
                    lane,
                    core: Arc::clone(&self.core),
                    slot: TurnSlot::Borrowed(slot),
                };
                let core = &self.core;
                let answer = claim::call_many(core.backend.as_ref(), slot, &shared, &[claim]).await;
                core.stats.record(1);
                drop(turn);
                let mut answer = answer?;
                Ok(answer
                    .pop()
                    .ok_or_else(|| BackendError::Protocol("claim: no answer".into()))?)
            }
            Some(rx) => {
                // Not held while waiting: the turn that answers forgets an idle lane only
                // when nobody else holds it.
                drop(lane);
                self.wait_for(rx).await
            }
        }
    }

    /// The answer of a queued claim, within `stock.group_wait_ms`.
    async fn wait_for(
        &self,
        rx: oneshot::Receiver<Result<Outcome, BackendError>>,
    ) -> Result<Outcome, StockError> {
        match tokio::time::timeout(self.wait, rx).await {
            Ok(Ok(answer)) => Ok(answer?),
            // The call carrying it was abandoned (a panic, a runtime shutting down):
            // whether it ran is unknown, as after a lost reply.
            Ok(Err(_)) => Err(BackendError::Unavailable(
                "the claim call carrying this claim was abandoned".into(),
            )
            .into()),
            // It may still run: the same request id replays it.
            Err(_) => Err(BackendError::Unavailable(format!(
                "no answer within stock.group_wait_ms ({} ms) while queued for the shard",
                self.wait.as_millis()
            ))
            .into()),
        }
    }

    /// The shard's lane, created when absent. The map's guard is dropped before returning.
    fn lane(&self, key: &str) -> Arc<Lane> {
        let lanes = &self.core.lanes;
        #[allow(clippy::disallowed_methods)] // guard dropped at the end of the statement
        let found = lanes.get(key).map(|l| Arc::clone(l.value()));
        if let Some(l) = found {
            return l;
        }
        #[allow(clippy::disallowed_methods)] // guard dropped at the end of the statement
        let created = Arc::clone(lanes.entry(key.into()).or_default().value());
        created
    }

    /// Calls made and claims carried so far.
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// Shards with a lane (a call in flight or just finished), for tests.
    #[cfg(test)]
    fn lanes(&self) -> usize {
        self.core.lanes.len()
    }
}

/// The slot keys a turn calls with: the leading request's (borrowed) until the turn moves
/// to a task, which needs its own.
enum TurnSlot<'s> {
    Borrowed(&'s SlotKeys),
    Owned(Box<SlotKeys>),
}

impl TurnSlot<'_> {
    fn get(&self) -> &SlotKeys {
        match self {
            TurnSlot::Borrowed(s) => s,
            TurnSlot::Owned(s) => s,
        }
    }
}

/// The right to make claim calls on one shard: exactly one exists per busy lane. Dropped,
/// it hands the queue to a new task, or marks the lane idle and forgets it.
struct Turn<'s, B: Backend> {
    lane: Arc<Lane>,
    core: Arc<Core<B>>,
    slot: TurnSlot<'s>,
}

impl<B: Backend> Turn<'static, B> {
    /// Runs calls until the queue is empty (then the drop marks the lane idle).
    async fn drain(self) {
        loop {
            let group = take_group(&mut self.lane.state.lock().queue, self.core.max_claims);
            if group.is_empty() {
                return;
            }
            self.run(group).await;
        }
    }

    /// One call carrying `group` (a prefix of the queue sharing its call values).
    async fn run(&self, group: Vec<Pending>) {
        let claims: Vec<Claim<'_>> = group.iter().map(Pending::claim).collect();
        let shared = group[0].shared();
        let core = &self.core;
        let answers =
            claim::call_many(core.backend.as_ref(), self.slot.get(), &shared, &claims).await;
        core.stats.record(group.len());
        drop(claims);
        match answers {
            Ok(answers) => {
                for (p, a) in group.into_iter().zip(answers) {
                    let _ = p.reply.send(Ok(a)); // a caller that gave up is gone: fine
                }
            }
            Err(e) => {
                for p in group {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl<B: Backend> Drop for Turn<'_, B> {
    fn drop(&mut self) {
        let handover = {
            let mut st = self.lane.state.lock();
            if st.queue.is_empty() {
                st.busy = false;
                false
            } else {
                match tokio::runtime::Handle::try_current() {
                    Ok(_) => true,
                    // No runtime (shutting down): the queued callers hear "abandoned".
                    Err(_) => {
                        st.queue.clear();
                        st.busy = false;
                        false
                    }
                }
            }
        };
        if handover {
            let next = Turn {
                lane: Arc::clone(&self.lane),
                core: Arc::clone(&self.core),
                slot: TurnSlot::Owned(Box::new(self.slot.get().clone())),
            };
            tokio::spawn(next.drain());
            return;
        }
        // Idle: forget the lane unless someone else holds it (the map's reference and ours
        // make 2; a caller that found it in the map holds a third). Only the map's lock is
        // held here, never the lane's.
        self.core
            .lanes
            .remove_if(self.slot.get().meta.as_str(), |_, l| {
                Arc::strong_count(l) == 2
            });
    }
}

/// The longest prefix of `queue`, at most `max` claims, whose claims share their call
/// values (the day offset differs across a zone's offset change; the backlog bound only
/// across a config reload).
fn take_group(queue: &mut VecDeque<Pending>, max: usize) -> Vec<Pending> {
    let Some(first) = queue.front() else {
        return Vec::new();
    };
    let (log, day) = (first.max_log.clone(), first.day_offset.clone());
    let n = queue
        .iter()
        .take(max)
        .take_while(|p| p.max_log == log && p.day_offset == day)
        .count();
    queue.drain(..n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::embedded::EmbeddedBackend;
    use crate::contract::keys::BatchKeys;

    async fn shard_with_stock(stock_n: i64) -> (Arc<EmbeddedBackend>, BatchKeys) {
        let (stock, keys) = crate::stock::claim::tests::one_shard_batch_of("gc", stock_n, 2).await;
        (Arc::clone(stock.backend()), keys)
    }

    fn pending(
        user: &str,
        day: &str,
    ) -> (Pending, oneshot::Receiver<Result<Outcome, BackendError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Pending {
                user: user.into(),
                request_id: "".into(),
                nonce: "".into(),
                max_log: "0".into(),
                day_offset: day.into(),
                seen: 0,
                checked: false,
                reply: tx,
            },
            rx,
        )
    }

    #[test]
    fn a_group_is_a_prefix_sharing_its_call_values_and_bounded() {
        let mut q: VecDeque<Pending> = ["0", "0", "0", "3600000", "0"]
            .iter()
            .enumerate()
            .map(|(i, d)| pending(&format!("u{i}"), d).0)
            .collect();
        let g = take_group(&mut q, 2);
        assert_eq!(g.iter().map(|p| &*p.user).collect::<Vec<_>>(), ["u0", "u1"]);
        let g = take_group(&mut q, 10);
        assert_eq!(g.iter().map(|p| &*p.user).collect::<Vec<_>>(), ["u2"]);
        let g = take_group(&mut q, 10);
        assert_eq!(g.iter().map(|p| &*p.user).collect::<Vec<_>>(), ["u3"]);
        assert_eq!(take_group(&mut q, 10).len(), 1);
        assert!(take_group(&mut q, 10).is_empty());
    }

    /// Many concurrent claims on one shard: every claim answered once, calls carry many
    /// claims, no coupon twice, per-user limits and request-id replays hold across and
    /// within calls, and the lanes are forgotten once idle.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_share_calls_and_keep_every_invariant() {
        let (backend, keys) = shard_with_stock(400).await;
        let gc = Arc::new(GroupCommit::new(
            Arc::clone(&backend),
            64,
            100_000,
            Duration::from_secs(30),
        ));
        let slot = Arc::new(keys.shards[0].clone());
        let mut tasks = Vec::new();
        // 300 users x 3 attempts each: the first two with distinct request ids (limit 2),
        // the third repeating the first request id (a replay).
        for round in 0..3 {
            for u in 0..300 {
                let (gc, slot) = (Arc::clone(&gc), Arc::clone(&slot));
                tasks.push(tokio::spawn(async move {
                    let user = format!("u{u}");
                    let rid = format!("r{u}-{}", if round == 2 { 0 } else { round });
                    let nonce = format!("n{u}-{round}");
                    let shared = Shared {
                        max_log: "0",
                        day_offset: "0",
                    };
                    let c = Claim {
                        user: &user,
                        request_id: &rid,
                        nonce: &nonce,
                        seen: 0,
                        checked: false,
                    };
                    (u, round, gc.claim(&slot, shared, c).await.unwrap())
                }));
            }
        }
        let mut coupons = std::collections::HashMap::new();
        let mut per_user = std::collections::HashMap::<usize, Vec<String>>::new();
        let (mut claimed, mut replayed, mut empty) = (0, 0, 0);
        for t in tasks {
            let (u, _round, o) = t.await.unwrap();
            match o {
                Outcome::Claimed(c) => {
                    claimed += 1;
                    assert!(
                        coupons.insert(c.coupon_id.clone(), u).is_none(),
                        "minted twice"
                    );
                    per_user.entry(u).or_default().push(c.coupon_id);
                }
                Outcome::Replayed(c) => {
                    replayed += 1;
                    assert_eq!(coupons.get(&c.coupon_id).copied().unwrap_or(u), u);
                }
                Outcome::ShardEmpty => empty += 1,
                o => panic!("unexpected {o:?}"),
            }
        }
        // 200 coupons in the shard at creation (half the stock; the rest in the pool)
        assert!(claimed <= 400 && claimed > 0, "{claimed}");
        assert!(per_user.values().all(|v| v.len() <= 2));
        assert_eq!(claimed + replayed + empty, 900);
        // the last call's task answers before it gives its turn back: bounded wait
        for _ in 0..1000 {
            if gc.lanes() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(gc.lanes(), 0, "idle lanes are forgotten");
        let st = gc.stats();
        let (calls, carried) = (
            st.calls.load(Ordering::Relaxed),
            st.claims.load(Ordering::Relaxed),
        );
        assert_eq!(carried, 900, "each claim went in exactly one call");
        assert!(
            calls < 900,
            "calls were shared: {calls} calls for 900 claims"
        );
        assert!(st.largest.load(Ordering::Relaxed) > 1);
    }
}
