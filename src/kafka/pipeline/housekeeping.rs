//! Work that no input record drives: the time-driven rules (activation, expiry) through a due
//! index, and forgetting usage ids older than the dedupe window by dropping whole time buckets
//! of deltas (see the `store` module docs).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::fold::DueUpdate;
use super::stream_time::StreamTimes;
use crate::config::PipelineConfig;
use crate::ledger::{CustomerId, MeterName};
use crate::store::layout::{self, DeltaKey};
use crate::store::{StateWrite, Store, StoreError};

/// When each owned meter next has a time-driven change (activation or expiry), so the tick
/// touches only what is due instead of scanning the store.
///
/// Only configured meters are indexed. A book may still hold a meter removed from the config;
/// the rules never advance it, so its due time would never move, and enough of them would fill
/// every tick's budget and starve the meters that are configured.
#[derive(Default)]
pub(super) struct DueIndex {
    by_time: BTreeSet<(i64, i32, CustomerId, MeterName)>,
    by_key: HashMap<(i32, CustomerId, MeterName), i64>,
    meters: HashSet<MeterName>,
}

impl DueIndex {
    /// An empty index of the meters `meters`.
    pub(super) fn new(meters: &[MeterName]) -> Self {
        Self {
            meters: meters.iter().cloned().collect(),
            ..Default::default()
        }
    }

    pub(super) fn set(&mut self, p: i32, c: &CustomerId, m: &MeterName, due: Option<i64>) {
        if !self.meters.contains(m) {
            return;
        }
        let key = (p, c.clone(), m.clone());
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, p, c.clone(), m.clone()));
        }
        if let Some(d) = due {
            self.by_time.insert((d, p, c.clone(), m.clone()));
            self.by_key.insert(key, d);
        }
    }

    /// Applies a commit's due updates.
    pub(super) fn update(&mut self, updates: Vec<DueUpdate>) {
        for (p, c, m, due) in updates {
            self.set(p, &c, &m, due);
        }
    }

    /// The customers with something due by their partition's time `now(p)`, at most `limit`
    /// meters' worth.
    fn due(&self, now: impl Fn(i32) -> i64, latest: i64, limit: usize) -> Vec<(i32, CustomerId)> {
        let mut out: Vec<(i32, CustomerId)> = self
            .by_time
            .iter()
            .take_while(|(d, ..)| *d <= latest)
            .filter(|(d, p, ..)| *d <= now(*p))
            .take(limit)
            .map(|(_, p, c, _)| (*p, c.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    pub(super) fn clear(&mut self) {
        self.by_time.clear();
        self.by_key.clear();
    }

    pub(super) fn len(&self) -> usize {
        self.by_key.len()
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

/// The most delta tombstones one commit carries (a bucket with more takes several).
const DROP_BUDGET: usize = 20_000;

/// The due index, the delta buckets, and the tick's timer.
pub(super) struct Housekeeping {
    pub(super) due: DueIndex,
    pub(super) deltas: Deltas,
    tick_interval: Duration,
    dedupe_window_ms: i64,
    last_tick: Instant,
}

impl Housekeeping {
    pub(super) fn new(cfg: &PipelineConfig, meters: &[MeterName]) -> Self {
        Self {
            due: DueIndex::new(meters),
            deltas: Deltas::default(),
            tick_interval: cfg.tick_interval,
            dedupe_window_ms: cfg.dedupe_window.as_millis().min(i64::MAX as u128) as i64,
            last_tick: Instant::now(),
        }
    }

    /// The customers whose time-driven changes are due by their partition's stream time,
    /// every `tick_interval`.
    pub(super) fn ticks(&mut self, times: &StreamTimes) -> Vec<(i32, CustomerId)> {
        if self.last_tick.elapsed() < self.tick_interval {
            return Vec::new();
        }
        self.last_tick = Instant::now();
        let latest = times.all().values().copied().max().unwrap_or(i64::MIN);
        self.due.due(|p| times.get(p), latest, 10_000)
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

    fn id(s: &str) -> CustomerId {
        CustomerId::parse(s.to_string()).unwrap()
    }

    fn meter(s: &str) -> MeterName {
        MeterName::parse(s.to_string()).unwrap()
    }

    #[test]
    fn meters_removed_from_the_config_never_starve_the_tick() {
        let mut due = DueIndex::new(&[meter("api_calls")]);
        for i in 0..20_000 {
            due.set(0, &id(&format!("old-{i}")), &meter("gone"), Some(1));
        }
        due.set(0, &id("alice"), &meter("api_calls"), Some(5));
        assert_eq!(due.len(), 1, "the unknown meter is not indexed");
        assert_eq!(due.due(|_| 10, 10, 10_000), [(0, id("alice"))]);
    }

    #[test]
    fn a_meter_leaves_the_index_when_nothing_is_due_any_more() {
        let mut due = DueIndex::new(&[meter("api_calls")]);
        due.set(3, &id("alice"), &meter("api_calls"), Some(5));
        assert_eq!(due.due(|_| 4, 4, 10), []);
        assert_eq!(due.due(|_| 5, 5, 10), [(3, id("alice"))]);
        assert_eq!(
            due.due(|p| if p == 3 { 4 } else { 9 }, 9, 10),
            [],
            "partition 3's own time"
        );
        due.set(3, &id("alice"), &meter("api_calls"), None);
        assert_eq!(due.due(|_| i64::MAX, i64::MAX, 10), []);
        assert_eq!(due.len(), 0);
    }
}
