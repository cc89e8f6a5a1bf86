//! Claim activity: the cheap, in-process hint from the claim path (and the persister's probe
//! task) to this instance's persister that a shard's log just received records, so the
//! persister reads that shard now instead of polling every shard.
//!
//! Invariant kept here: a hint is never lost while the persister listens (a flag is set
//! before the wake-up, and a wake-up given while the persister is busy is kept for its next
//! wait), and a hint is only ever a hint: the persister's probe and safety sweep catch what
//! no hint names (claims of other gateways, a hint given while nobody listened). A hint
//! costs the claim path one map lookup under a read lock and one atomic swap; a shard hinted
//! again before the persister read it costs no wake-up.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::contract::keys::SlotKeys;

/// The shared hint board. Cloning shares it; [`ClaimActivity::disabled`] hints nobody.
#[derive(Clone, Default)]
pub struct ClaimActivity {
    inner: Option<Arc<Board>>,
}

#[derive(Default)]
struct Board {
    /// The work flags of the shards the persister reads now, by log key.
    active: RwLock<HashMap<Arc<str>, Arc<AtomicBool>>>,
    /// Batches hinted that the persister does not read now (new to it, or dormant): it
    /// looks them up and wakes them. Bounded by the batches that exist (only a claim that
    /// minted, or a probe that found records, names one).
    woken: Mutex<HashSet<String>>,
    notify: Notify,
}

impl std::fmt::Debug for ClaimActivity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimActivity")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl ClaimActivity {
    /// A board a persister listens to.
    pub fn new() -> ClaimActivity {
        ClaimActivity {
            inner: Some(Arc::default()),
        }
    }

    /// A board nobody listens to: hints cost nothing and go nowhere.
    pub fn disabled() -> ClaimActivity {
        ClaimActivity { inner: None }
    }

    /// The log of `slot` received records (a claim minted on it).
    pub fn hint(&self, slot: &SlotKeys) {
        let Some(board) = &self.inner else { return };
        let flag = board.active.read().get(slot.log.as_str()).cloned();
        match flag {
            Some(flag) => {
                if !flag.swap(true, Ordering::AcqRel) {
                    board.notify.notify_one();
                }
            }
            None => self.wake_batch(&slot.batch),
        }
    }

    /// Asks the persister to read every shard of `batch` (it is new to it, or dormant).
    pub fn wake_batch(&self, batch: &str) {
        let Some(board) = &self.inner else { return };
        let new = {
            let mut woken = board.woken.lock();
            !woken.contains(batch) && woken.insert(batch.to_string())
        };
        if new {
            board.notify.notify_one();
        }
    }

    /// The persister: the shards it reads now and their work flags (replaces the last set).
    pub fn publish(&self, active: HashMap<Arc<str>, Arc<AtomicBool>>) {
        if let Some(board) = &self.inner {
            *board.active.write() = active;
        }
    }

    /// The persister: the batches woken since the last call.
    pub fn take_woken(&self) -> Vec<String> {
        match &self.inner {
            Some(board) => board.woken.lock().drain().collect(),
            None => Vec::new(),
        }
    }

    /// The persister: wakes it (a probe set some work flags).
    pub fn notify(&self) {
        if let Some(board) = &self.inner {
            board.notify.notify_one();
        }
    }

    /// The persister: waits for the next hint (at once if one came since the last wait).
    /// Never resolves on a disabled board.
    pub async fn notified(&self) {
        match &self.inner {
            Some(board) => board.notify.notified().await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_hint_sets_the_flag_and_wakes_once() {
        let a = ClaimActivity::new();
        let keys = SlotKeys::new("b1", Some(0));
        let flag = Arc::new(AtomicBool::new(false));
        a.publish(HashMap::from([(
            Arc::from(keys.log.as_str()),
            flag.clone(),
        )]));
        a.hint(&keys);
        a.hint(&keys);
        assert!(flag.load(Ordering::Relaxed));
        // The wake-up given before anyone waited is kept for the next wait.
        tokio::time::timeout(Duration::from_secs(1), a.notified())
            .await
            .expect("woken");
        assert!(a.take_woken().is_empty());
    }

    #[tokio::test]
    async fn a_hint_for_an_unread_shard_wakes_its_batch() {
        let a = ClaimActivity::new();
        a.hint(&SlotKeys::new("fresh", Some(3)));
        a.hint(&SlotKeys::new("fresh", Some(1)));
        tokio::time::timeout(Duration::from_secs(1), a.notified())
            .await
            .expect("woken");
        assert_eq!(a.take_woken(), vec!["fresh".to_string()]);
        assert!(a.take_woken().is_empty());
    }

    #[test]
    fn a_disabled_board_takes_hints_and_keeps_nothing() {
        let a = ClaimActivity::disabled();
        a.hint(&SlotKeys::new("b", Some(0)));
        assert!(a.take_woken().is_empty());
    }
}
