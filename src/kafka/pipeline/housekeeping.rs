//! Work that no input record drives: the time-driven rules (activation, expiry) through a due
//! index, and forgetting usage ids older than the dedupe window by dropping whole time buckets
//! of deltas (see the `store` module docs).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::stream_time::StreamTimes;
use crate::config::PipelineConfig;
use crate::store::layout::{self, DeltaKey};
use crate::store::{Due, StateWrite, Store, StoreError};

/// Where the tick reads each served partition's due index from (see the store's `due`
/// module): the lowest due time that may still be unread. Reading from there, not from the
/// start of the index, skips the tombstones of what earlier ticks consumed.
#[derive(Default)]
pub(super) struct DueFloors {
    from: BTreeMap<i32, i64>,
}

impl DueFloors {
    /// Partition `p` became ready: its index is read from the start once.
    pub(super) fn start(&mut self, p: i32) {
        self.from.insert(p, i64::MIN);
    }

    /// Stops reading every partition (revoked).
    pub(super) fn clear(&mut self) {
        self.from.clear();
    }

    /// A commit put due times as early as `floor` (per partition) into the index.
    pub(super) fn written(&mut self, floor: &BTreeMap<i32, i64>) {
        for (p, at) in floor {
            if let Some(f) = self.from.get_mut(p) {
                *f = (*f).min(*at);
            }
        }
    }

    /// The meters due by their partition's time `now(p)`, at most `limit` (shared evenly
    /// between the partitions). The floors move past what was read: the tick's commit deletes
    /// those keys, and anything put earlier later lowers the floor again ([`Self::written`]).
    fn due(
        &mut self,
        store: &Store,
        now: impl Fn(i32) -> i64,
        limit: usize,
    ) -> Result<Vec<Due>, StoreError> {
        let share = (limit / self.from.len().max(1)).max(1);
        let mut out = Vec::new();
        for (p, from) in self.from.iter_mut() {
            let until = now(*p);
            let found = store.due(*p, *from, until, share)?;
            *from = match found.last() {
                // Cut by the share: more may wait at that time.
                Some(last) if found.len() == share => last.at,
                _ => (*from).max(until.saturating_add(1)),
            };
            out.extend(found);
        }
        Ok(out)
    }
}

/// The delta records of each owned partition: the next sequence number, and the time buckets
/// holding deltas (to drop them whole once they leave the dedupe window).
#[derive(Default)]
pub(super) struct Deltas {
    next_seq: BTreeMap<i32, u64>,
    buckets: BTreeMap<i32, BTreeSet<i64>>,
}

impl Deltas {
    /// Starts tracking a restored partition.
    pub(super) fn track(&mut self, p: i32, buckets: BTreeSet<i64>, next_seq: u64) {
        self.next_seq.insert(p, next_seq);
        self.buckets.insert(p, buckets);
    }

    /// Stops tracking every partition (revoked).
    pub(super) fn clear(&mut self) {
        self.next_seq.clear();
        self.buckets.clear();
    }

    /// The next sequence number per partition, for the fold.
    pub(super) fn next_seq(&self) -> &BTreeMap<i32, u64> {
        &self.next_seq
    }

    /// Records the deltas a commit wrote.
    pub(super) fn committed(&mut self, written: &[DeltaKey]) {
        for (p, bucket, seq) in written {
            let next = self.next_seq.entry(*p).or_default();
            *next = (*next).max(seq + 1);
            self.buckets.entry(*p).or_default().insert(*bucket);
        }
    }
}

/// Forgetting the oldest time buckets of the owned partitions: one commit of its own.
#[derive(Default)]
pub(super) struct Drop {
    /// Tombstones of the deltas and the new horizons.
    pub(super) writes: Vec<StateWrite>,
    /// Buckets whose every delta is in `writes`: no longer tracked once committed.
    pub(super) emptied: Vec<(i32, i64)>,
}

/// The most due meters one tick reads.
const TICK_BUDGET: usize = 10_000;

/// The most delta tombstones one commit carries (a bucket with more takes several).
const DROP_BUDGET: usize = 20_000;

/// The due index, the delta buckets, and the tick's timer.
pub(super) struct Housekeeping {
    pub(super) due: DueFloors,
    pub(super) deltas: Deltas,
    tick_interval: Duration,
    dedupe_window_ms: i64,
    last_tick: Instant,
}

impl Housekeeping {
    pub(super) fn new(cfg: &PipelineConfig) -> Self {
        Self {
            due: DueFloors::default(),
            deltas: Deltas::default(),
            tick_interval: cfg.tick_interval,
            dedupe_window_ms: cfg.dedupe_window.as_millis().min(i64::MAX as u128) as i64,
            last_tick: Instant::now(),
        }
    }

    /// The meters whose time-driven changes are due by their partition's stream time, every
    /// `tick_interval`.
    pub(super) fn ticks(
        &mut self,
        store: &Store,
        times: &StreamTimes,
    ) -> Result<Vec<Due>, StoreError> {
        if self.last_tick.elapsed() < self.tick_interval {
            return Ok(Vec::new());
        }
        self.last_tick = Instant::now();
        self.due.due(store, |p| times.get(p), TICK_BUDGET)
    }

    /// The buckets entirely older than the dedupe window at their partition's stream time,
    /// as one drop (at most [`DROP_BUDGET`] deltas): their deltas' tombstones, and a horizon
    /// past them.
    pub(super) fn drop(&self, store: &Store, times: &StreamTimes) -> Result<Drop, StoreError> {
        let width = store.layout().bucket_ms();
        let mut out = Drop::default();
        let mut budget = DROP_BUDGET;
        for (p, buckets) in &self.deltas.buckets {
            let cutoff = times.get(*p).saturating_sub(self.dedupe_window_ms);
            let mut keys = Vec::new();
            let mut horizon = None;
            for b in buckets
                .iter()
                .take_while(|b| b.saturating_add(width) <= cutoff)
            {
                if budget == 0 {
                    break;
                }
                let found = store.delta_keys(*p, *b, budget)?;
                budget -= found.len();
                if budget > 0 {
                    out.emptied.push((*p, *b));
                }
                keys.extend(found);
                horizon = Some(b.saturating_add(width));
            }
            if let Some(h) = horizon {
                let h = h.max(store.horizon(*p));
                out.writes.extend(layout::drop_deltas(*p, keys, h));
            }
        }
        Ok(out)
    }

    /// Records a committed drop.
    pub(super) fn dropped(&mut self, emptied: &[(i32, i64)]) {
        for (p, b) in emptied {
            if let Some(set) = self.deltas.buckets.get_mut(p) {
                set.remove(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{CustomerId, MeterName};
    use crate::store::layout::{Layout, StateBatch};

    fn id(s: &str) -> CustomerId {
        CustomerId::parse(s).unwrap()
    }

    fn meter(s: &str) -> MeterName {
        MeterName::parse(s).unwrap()
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(10, Duration::from_secs(3600));
        let store = Store::open_path(dir.path(), 8, 8, layout).unwrap();
        (dir, store)
    }

    /// Writes `f`'s due-index changes locally, as a committed batch would.
    fn write(store: &Store, f: impl FnOnce(&mut StateBatch)) {
        let mut batch = StateBatch::new(store.layout());
        f(&mut batch);
        let (writes, _) = batch.finish(&BTreeMap::new(), &BTreeMap::new());
        store.write(&writes, &[]).unwrap();
    }

    #[test]
    fn a_tick_reads_what_is_due_by_its_partitions_own_time_once() {
        let (_dir, store) = store();
        let (alice, api) = (id("alice"), meter("api_calls"));
        write(&store, |b| {
            b.due(3, &alice, &api, None, Some(5));
            b.due(4, &alice, &api, None, Some(5));
        });
        let mut floors = DueFloors::default();
        floors.start(3);
        floors.start(4);
        let at = |t3, t4| move |p| if p == 3 { t3 } else { t4 };
        assert_eq!(floors.due(&store, at(4, 4), 10).unwrap(), []);
        let found = floors.due(&store, at(5, 4), 10).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].partition, found[0].at), (3, 5));
        assert_eq!(found[0].customer, alice);
        // Its commit deletes the key and puts back the meter's new due time.
        write(&store, |b| {
            b.forget_due(&found[0]);
            b.due(3, &alice, &api, None, Some(9));
        });
        floors.written(&BTreeMap::from([(3, 9)]));
        assert_eq!(floors.due(&store, at(8, 4), 10).unwrap(), []);
        let found = floors.due(&store, at(9, 5), 10).unwrap();
        let seen: Vec<(i32, i64)> = found.iter().map(|d| (d.partition, d.at)).collect();
        assert_eq!(seen, [(3, 9), (4, 5)]);
    }

    #[test]
    fn a_time_moved_earlier_is_read_though_the_floor_had_passed_it() {
        let (_dir, store) = store();
        let (alice, api) = (id("alice"), meter("api_calls"));
        let mut floors = DueFloors::default();
        floors.start(0);
        assert_eq!(floors.due(&store, |_| 100, 10).unwrap(), []);
        // A late event left a meter due at 50, behind the floor (101).
        write(&store, |b| b.due(0, &alice, &api, None, Some(50)));
        floors.written(&BTreeMap::from([(0, 50)]));
        let found = floors.due(&store, |_| 100, 10).unwrap();
        assert_eq!(found.iter().map(|d| d.at).collect::<Vec<_>>(), [50]);
    }

    #[test]
    fn a_moved_time_leaves_no_key_behind_and_a_full_share_resumes_where_it_stopped() {
        let (_dir, store) = store();
        let api = meter("api_calls");
        write(&store, |b| {
            for i in 0..5 {
                b.due(0, &id(&format!("c{i}")), &api, None, Some(10 + i));
            }
            // c0 moves from 10 to 30: its old key goes.
            b.due(0, &id("c0"), &api, Some(10), Some(30));
        });
        let mut floors = DueFloors::default();
        floors.start(0);
        let first = floors.due(&store, |_| 100, 2).unwrap();
        assert_eq!(first.iter().map(|d| d.at).collect::<Vec<_>>(), [11, 12]);
        write(&store, |b| first.iter().for_each(|d| b.forget_due(d)));
        let rest = floors.due(&store, |_| 100, 10).unwrap();
        assert_eq!(rest.iter().map(|d| d.at).collect::<Vec<_>>(), [13, 14, 30]);
    }
}
