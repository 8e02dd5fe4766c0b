//! From a folded batch to [`StateWrite`]s: pure functions, no RocksDB (the fold and its
//! benchmark call them). Their inverse is [`Store::load_books`](super::Store::load_books) and,
//! for the deltas, [`Store::restore`](super::Store::restore).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::history::{Chunker, Operand};
use super::value::{self, pb, DeltaValue};
use super::{due, keys, Due, StateWrite, Target};
use crate::ledger::{BalanceChanged, Book, CustomerId, Dirty, MeterName};

/// How state is cut into records: the history kept per meter and the time buckets of the
/// deltas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    history_len: u32,
    bucket_ms: i64,
}

/// Buckets per dedupe window: an id is remembered for at least the window and at most
/// `1 + 1/BUCKETS` of it.
pub const BUCKETS_PER_WINDOW: i64 = 8;

impl Layout {
    /// `history_len` movements per meter; usage ids kept for `dedupe_window`, in buckets of an
    /// eighth of it (at least a second).
    pub fn new(history_len: u32, dedupe_window: Duration) -> Self {
        let window = dedupe_window.as_millis().min(i64::MAX as u128) as i64;
        Self {
            history_len: history_len.max(1),
            bucket_ms: (window / BUCKETS_PER_WINDOW).max(1_000),
        }
    }

    /// The layout `cfg` asks for.
    pub fn from_config(cfg: &crate::config::PipelineConfig) -> Self {
        Self::new(cfg.history_len, cfg.dedupe_window)
    }

    /// The width of a time bucket (ms).
    pub fn bucket_ms(&self) -> i64 {
        self.bucket_ms
    }

    /// The start (ms) of the bucket holding time `at`.
    pub fn bucket_of(&self, at: i64) -> i64 {
        at - at.rem_euclid(self.bucket_ms)
    }

    /// Movements kept per meter.
    pub fn history_len(&self) -> u32 {
        self.history_len
    }
}

/// A delta record written by a commit: (partition, bucket, seq).
pub type DeltaKey = (i32, i64, u64);

/// The most bytes one delta record holds; a commit writes several for a bucket that has more
/// (a record must stay far below the broker's `message.max.bytes`, 1 MB by default).
pub const MAX_DELTA_BYTES: usize = 256 << 10;

/// The deltas of one (partition, bucket) in this commit, cut at [`MAX_DELTA_BYTES`].
#[derive(Debug, Default)]
struct Deltas {
    done: Vec<DeltaValue>,
    open: DeltaValue,
}

impl Deltas {
    /// Room for an entry of `n` more bytes, starting a new record if the open one is full.
    fn room(&mut self, n: usize) -> &mut DeltaValue {
        if self.open.len() + n > MAX_DELTA_BYTES && !self.open.is_empty() {
            self.done.push(std::mem::take(&mut self.open));
        }
        &mut self.open
    }

    fn into_records(mut self) -> Vec<DeltaValue> {
        if !self.open.is_empty() {
            self.done.push(self.open);
        }
        self.done
    }
}

/// Collects the state writes of one commit.
#[derive(Debug)]
pub struct StateBatch {
    layout: Layout,
    writes: Vec<StateWrite>,
    deltas: BTreeMap<(i32, i64), Deltas>,
    history: Chunker,
}

impl StateBatch {
    /// An empty batch.
    pub fn new(layout: Layout) -> Self {
        Self::with_capacity(layout, 0)
    }

    /// An empty batch with room for `writes` state writes (a commit of n usage events makes
    /// about 3n: growing a vector of that size by doubling copies it and faults in fresh pages
    /// again and again, a fifth of the fold's time in `perf`).
    pub fn with_capacity(layout: Layout, writes: usize) -> Self {
        Self {
            layout,
            writes: Vec::with_capacity(writes),
            deltas: BTreeMap::new(),
            history: Chunker::new(layout.history_len),
        }
    }

    /// Persists what `dirty` names of `book` (a customer of partition `p`): the book (every
    /// meter, once), grant records, event records (into the delta of their bucket) and
    /// reservation records (into the delta of the bucket their hold ends in).
    pub fn book(&mut self, p: i32, book: &Book, dirty: &BTreeSet<Dirty>) {
        let c = &book.customer;
        if dirty.iter().any(|d| matches!(d, Dirty::Meter(_))) {
            let msg = pb::Book {
                meters: book
                    .meters
                    .iter()
                    .map(|(n, s)| value::meter_to(n, s))
                    .collect(),
            };
            self.writes.push(StateWrite {
                partition: p,
                key: keys::book(p, c),
                value: Some(value::encode(&msg)),
                target: Target::Both,
            });
        }
        for d in dirty {
            match d {
                Dirty::Meter(_) => {}
                Dirty::Reservation(id) => {
                    if let Some(Some(r)) = book.reservations.get(id) {
                        // In the bucket of the hold's end: remembered for the window after it.
                        self.index_record(
                            p,
                            keys::reservation(p, c, id.as_str()),
                            value::encode(&value::reservation_to(r)),
                            r.expires_at,
                            (c, id.as_str()),
                            DeltaValue::reservation,
                        );
                    }
                }
                Dirty::Grant(id) => {
                    if let Some(Some(r)) = book.grants.get(id) {
                        self.writes.push(StateWrite {
                            partition: p,
                            key: keys::grant(p, c, id.as_str()),
                            value: Some(value::encode(&value::grant_to(r))),
                            target: Target::Both,
                        });
                    }
                }
                Dirty::Event(id) => {
                    if let Some(Some(r)) = book.events.get(id) {
                        self.index_record(
                            p,
                            keys::event(p, c, id.as_str()),
                            value::encode_event_value(r),
                            r.at,
                            (c, id.as_str()),
                            DeltaValue::event,
                        );
                    }
                }
            }
        }
    }

    /// Writes an id record (a usage or reservation id's stored `value`) locally under `key`,
    /// and its entry (by `entry`) into the delta of partition `p` for the bucket of `at`: the
    /// changelog carries the record there, and forgets it with the bucket.
    fn index_record(
        &mut self,
        p: i32,
        key: Vec<u8>,
        value: Vec<u8>,
        at: i64,
        (customer, id): (&CustomerId, &str),
        entry: fn(&mut DeltaValue, &str, &str, &[u8]),
    ) {
        let record = &value[1..];
        let n = DeltaValue::id_entry_len(customer.as_str(), id, record);
        let bucket = self.layout.bucket_of(at);
        let delta = self.deltas.entry((p, bucket)).or_default().room(n);
        entry(delta, customer.as_str(), id, record);
        self.writes.push(StateWrite {
            partition: p,
            key,
            value: Some(value),
            target: Target::Local,
        });
    }

    /// Moves `meter` of `customer` (partition `p`) in the due index from `was` to `now`
    /// (RocksDB only; see the store's `due` module): the old key is deleted before the new one
    /// is put, so an unchanged time keeps its key.
    pub fn due(
        &mut self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
        was: Option<i64>,
        now: Option<i64>,
    ) {
        for (at, value) in [(was, None), (now, Some(due::marker()))] {
            if let Some(at) = at {
                self.writes.push(StateWrite {
                    partition: p,
                    key: keys::due(p, at, customer, meter),
                    value,
                    target: Target::Local,
                });
            }
        }
    }

    /// Deletes a due-index key that a tick read. Call it before [`StateBatch::due`] in a batch,
    /// so a key put back by the fold stays.
    pub fn forget_due(&mut self, d: &Due) {
        self.writes.push(StateWrite {
            partition: d.partition,
            key: d.key.clone(),
            value: None,
            target: Target::Local,
        });
    }

    /// Keeps `change` (of partition `p`) in its meter's history: one merge per (meter, chunk)
    /// that a customer's changes of this commit touch (see the store's `history` module).
    pub fn change(&mut self, p: i32, change: &BalanceChanged) {
        let msg = value::encode_change(change);
        let writes = &mut self.writes;
        self.history.push(
            p,
            &change.customer_id,
            &change.meter,
            change.version,
            &msg,
            &mut |o| writes.push(merge_write(o)),
        );
        let bucket = self.layout.bucket_of(change.at);
        let n = msg.len() + 4;
        self.deltas
            .entry((p, bucket))
            .or_default()
            .room(n)
            .change(&msg);
    }

    /// The writes, with one delta record per (partition, bucket) touched, numbered from
    /// `next_seq[p]` on; also the delta keys used (so the caller can advance its sequences).
    /// Each delta carries its partition's stream time from `stream_times`.
    pub fn finish(
        mut self,
        next_seq: &BTreeMap<i32, u64>,
        stream_times: &BTreeMap<i32, i64>,
    ) -> (Vec<StateWrite>, Vec<DeltaKey>) {
        let writes = &mut self.writes;
        self.history.flush(&mut |o| writes.push(merge_write(o)));
        let mut used = Vec::with_capacity(self.deltas.len());
        let mut seqs: BTreeMap<i32, u64> = BTreeMap::new();
        for ((p, bucket), deltas) in std::mem::take(&mut self.deltas) {
            let seq = seqs
                .entry(p)
                .or_insert_with(|| next_seq.get(&p).copied().unwrap_or(0));
            let stream_time = stream_times.get(&p).copied().unwrap_or(i64::MIN);
            for delta in deltas.into_records() {
                let key = keys::delta(p, bucket, *seq);
                self.writes.push(StateWrite {
                    partition: p,
                    key: key.clone(),
                    value: Some(delta.finish(stream_time)),
                    target: Target::Changelog,
                });
                // Locally only a marker: restore and the bucket drop need the key, not the value.
                self.writes.push(StateWrite {
                    partition: p,
                    key,
                    value: Some(Vec::new()),
                    target: Target::Local,
                });
                used.push((p, bucket, *seq));
                *seq += 1;
            }
        }
        (self.writes, used)
    }
}

/// The local write of a history merge operand.
fn merge_write((partition, key, operand): Operand) -> StateWrite {
    StateWrite {
        partition,
        key,
        value: Some(operand),
        target: Target::LocalMerge,
    }
}

/// The writes that forget a time bucket's deltas `keys` (tombstones in the changelog, deleted
/// markers locally) and record the partition's new `horizon` (ids applied before it are
/// forgotten).
pub fn drop_deltas(p: i32, delta_keys: Vec<Vec<u8>>, horizon: i64) -> Vec<StateWrite> {
    let mut out: Vec<StateWrite> = delta_keys
        .into_iter()
        .map(|key| StateWrite {
            partition: p,
            key,
            value: None,
            target: Target::Both,
        })
        .collect();
    out.push(StateWrite {
        partition: p,
        key: keys::meta(p),
        value: Some(value::encode(&pb::PartitionMeta { horizon })),
        target: Target::Both,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::movement;

    #[test]
    fn a_big_commit_cuts_its_delta_into_records_of_bounded_size() {
        let mut batch = StateBatch::new(Layout::new(200, Duration::from_secs(80)));
        let change = |v| movement("a-customer-with-a-long-name", "api", v, 1_000);
        for v in 1..=20_000 {
            batch.change(3, &change(v));
        }
        let (writes, used) = batch.finish(&BTreeMap::from([(3, 7)]), &BTreeMap::new());
        let records: Vec<&StateWrite> = writes
            .iter()
            .filter(|w| w.target == Target::Changelog)
            .collect();
        assert!(records.len() > 1);
        assert_eq!(used.len(), records.len());
        assert_eq!(used.first(), Some(&(3, 0, 7)));
        assert!(records
            .iter()
            .all(|w| w.value.as_ref().unwrap().len() <= MAX_DELTA_BYTES + 64));
        let kept: usize = records
            .iter()
            .map(|w| {
                value::decode::<pb::Delta>(&w.key, w.value.as_ref().unwrap())
                    .unwrap()
                    .changes
                    .len()
            })
            .sum();
        assert_eq!(kept, 20_000);
    }

    #[test]
    fn buckets_are_an_eighth_of_the_window_and_at_least_a_second() {
        let l = Layout::new(200, Duration::from_secs(80));
        assert_eq!(l.bucket_ms(), 10_000);
        assert_eq!(l.bucket_of(25_000), 20_000);
        assert_eq!(l.bucket_of(-1), -10_000);
        assert_eq!(Layout::new(200, Duration::from_secs(2)).bucket_ms(), 1_000);
        assert_eq!(Layout::new(0, Duration::from_secs(2)).history_len(), 1);
    }
}
