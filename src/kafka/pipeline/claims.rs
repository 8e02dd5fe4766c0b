//! Which loop of this process owns each partition, and how long the local state of the others
//! has been unowned: shared by the loops, so the state a loop released is never dropped while
//! another loop of the same process owns (or restores) that partition.
//!
//! A partition's local state is kept `state_drop_delay` after it moved away, so a quick return
//! restores from the checkpoint, not from scratch; then it is dropped. The state found on disk at
//! start-up counts as released at start-up, so a partition that moved elsewhere while the process
//! was down is dropped too.
//!
//! Claiming and dropping happen under one lock: a loop claims a partition before its restore
//! reads the checkpoint, and a drop checks the claim in the same critical section, so a drop
//! never races a restore.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};

#[derive(Debug, Default)]
struct Inner {
    /// Partition -> the loop that owns it.
    owned: HashMap<i32, usize>,
    /// Partitions with local state and no owner here, since when.
    released: HashMap<i32, Instant>,
}

/// The claims of the loops of one process.
#[derive(Debug, Default)]
pub(super) struct Claims {
    inner: Mutex<Inner>,
}

impl Claims {
    /// Claims for a process whose store holds state of `on_disk` (released as of now).
    pub(super) fn new(on_disk: impl IntoIterator<Item = i32>) -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                owned: HashMap::new(),
                released: on_disk.into_iter().map(|p| (p, now)).collect(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loop `id` was assigned `parts`: their state is kept.
    pub(super) fn claim(&self, id: usize, parts: &BTreeSet<i32>) {
        let mut g = self.lock();
        for p in parts {
            g.released.remove(p);
            g.owned.insert(*p, id);
        }
    }

    /// Loop `id` gave up `parts`: their state is dropped after the delay, unless claimed again
    /// (by any loop) meanwhile. A partition another loop claimed since is left alone.
    pub(super) fn release(&self, id: usize, parts: &BTreeSet<i32>) {
        let mut g = self.lock();
        let now = Instant::now();
        for p in parts {
            if g.owned.get(p) == Some(&id) {
                g.owned.remove(p);
                g.released.insert(*p, now);
            }
        }
    }

    /// Loop `id` starts over (after an error): whatever it owned is released.
    pub(super) fn release_all(&self, id: usize) {
        let mine: BTreeSet<i32> = self
            .lock()
            .owned
            .iter()
            .filter(|(_, owner)| **owner == id)
            .map(|(p, _)| *p)
            .collect();
        self.release(id, &mine);
    }

    /// Drops the local state of the partitions released more than `delay` ago and not claimed
    /// since. Returns them.
    pub(super) fn drop_expired(
        &self,
        store: &Store,
        delay: Duration,
    ) -> Result<Vec<i32>, StoreError> {
        let mut g = self.lock();
        let expired: Vec<i32> = g
            .released
            .iter()
            .filter(|(p, t)| t.elapsed() >= delay && !g.owned.contains_key(p))
            .map(|(p, _)| *p)
            .collect();
        for p in &expired {
            store.drop_partition(*p)?;
            g.released.remove(p);
            tracing::info!(
                partition = p,
                "dropped the local state of a partition owned elsewhere"
            );
        }
        Ok(expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::layout::Layout;

    fn store(dir: &std::path::Path) -> Store {
        Store::open_path(dir, 8, 8, Layout::new(200, Duration::from_secs(80))).unwrap()
    }

    fn parts(ps: &[i32]) -> BTreeSet<i32> {
        ps.iter().copied().collect()
    }

    #[test]
    fn state_left_on_disk_by_an_earlier_run_is_dropped_unless_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.write(&[], &[(0, 5), (1, 7), (2, 9)]).unwrap();
        let claims = Claims::new(s.partitions().unwrap());
        claims.claim(0, &parts(&[1]));
        let mut dropped = claims.drop_expired(&s, Duration::ZERO).unwrap();
        dropped.sort();
        assert_eq!(dropped, [0, 2]);
        assert_eq!(s.partitions().unwrap(), [1]);
        assert_eq!(s.checkpoint(1).unwrap(), Some(7));
    }

    #[test]
    fn a_partition_that_moved_to_another_loop_of_the_process_is_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.write(&[], &[(3, 11)]).unwrap();
        let claims = Claims::new([]);
        claims.claim(0, &parts(&[3]));
        // Loop 1 is assigned partition 3 before loop 0 hears of its revocation.
        claims.claim(1, &parts(&[3]));
        claims.release(0, &parts(&[3]));
        assert!(claims.drop_expired(&s, Duration::ZERO).unwrap().is_empty());
        // And in the usual order: released by 0, claimed by 1.
        claims.release(1, &parts(&[3]));
        claims.claim(1, &parts(&[3]));
        assert!(claims.drop_expired(&s, Duration::ZERO).unwrap().is_empty());
        assert_eq!(s.checkpoint(3).unwrap(), Some(11));
    }

    #[test]
    fn released_state_is_kept_for_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.write(&[], &[(4, 1)]).unwrap();
        let claims = Claims::new([]);
        claims.claim(0, &parts(&[4]));
        claims.release(0, &parts(&[4]));
        assert!(claims
            .drop_expired(&s, Duration::from_secs(600))
            .unwrap()
            .is_empty());
        assert_eq!(claims.drop_expired(&s, Duration::ZERO).unwrap(), [4]);
        assert_eq!(s.checkpoint(4).unwrap(), None);
    }
}
