//! Work that no input record drives: the time-driven rules (activation, expiry) through a due
//! index, and forgetting usage ids older than the dedupe window.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::fold::DueUpdate;
use crate::config::PipelineConfig;
use crate::ledger::{CustomerId, MeterName};
use crate::store::{StateWrite, Store, StoreError};

/// When each owned meter next has a time-driven change (activation or expiry), so the tick
/// touches only what is due instead of scanning the store.
#[derive(Default)]
pub(super) struct DueIndex {
    by_time: BTreeSet<(i64, i32, CustomerId, MeterName)>,
    by_key: HashMap<(i32, CustomerId, MeterName), i64>,
}

impl DueIndex {
    pub(super) fn set(&mut self, p: i32, c: &CustomerId, m: &MeterName, due: Option<i64>) {
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

    /// The customers with something due at `now`, at most `limit` meters' worth.
    fn due(&self, now: i64, limit: usize) -> Vec<(i32, CustomerId)> {
        let mut out: Vec<(i32, CustomerId)> = self
            .by_time
            .iter()
            .take_while(|(d, ..)| *d <= now)
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

/// The work housekeeping adds to a commit.
#[derive(Default)]
pub(super) struct Chores {
    /// Customers with grants to activate or expire now.
    pub(super) ticks: Vec<(i32, CustomerId)>,
    /// Deletions of event records older than the dedupe window.
    pub(super) forget: Vec<StateWrite>,
}

impl Chores {
    pub(super) fn is_empty(&self) -> bool {
        self.ticks.is_empty() && self.forget.is_empty()
    }
}

/// The due index and the timers of the tick and the purge.
pub(super) struct Housekeeping {
    pub(super) due: DueIndex,
    tick_interval: Duration,
    purge_interval: Duration,
    dedupe_window_ms: i64,
    last_tick: Instant,
    last_purge: Instant,
}

impl Housekeeping {
    pub(super) fn new(cfg: &PipelineConfig) -> Self {
        Self {
            due: DueIndex::default(),
            tick_interval: cfg.tick_interval,
            purge_interval: (cfg.dedupe_window / 10)
                .clamp(Duration::from_secs(1), Duration::from_secs(600)),
            dedupe_window_ms: cfg.dedupe_window.as_millis() as i64,
            last_tick: Instant::now(),
            last_purge: Instant::now(),
        }
    }

    /// What is due now: ticks every `tick_interval`; every `dedupe_window / 10` (when no
    /// partition is restoring) the ids of `owned` partitions older than the window.
    pub(super) fn chores(
        &mut self,
        store: &Store,
        owned: &BTreeSet<i32>,
        restoring: bool,
        now_ms: i64,
    ) -> Result<Chores, StoreError> {
        let mut chores = Chores::default();
        if self.last_tick.elapsed() >= self.tick_interval {
            self.last_tick = Instant::now();
            chores.ticks = self.due.due(now_ms, 10_000);
        }
        if self.last_purge.elapsed() >= self.purge_interval && !restoring {
            self.last_purge = Instant::now();
            let cutoff = now_ms - self.dedupe_window_ms;
            for p in owned {
                chores
                    .forget
                    .extend(store.expired_events(*p, cutoff, 10_000)?);
            }
            if !chores.forget.is_empty() {
                tracing::info!(
                    records = chores.forget.len(),
                    "forgetting usage ids older than the dedupe window"
                );
            }
        }
        Ok(chores)
    }
}
