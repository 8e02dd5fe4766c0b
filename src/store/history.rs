//! The movement history the Meters API pages through: RocksDB only, derived from the deltas
//! (the balance changes ride in them), so it costs no changelog record.
//!
//! A meter's movements are kept in a ring of chunk keys, `S p 'H' customer NUL meter NUL slot`
//! (see [`keys`]): version `v` belongs to chunk `v / CHUNK`, stored at slot
//! `chunk % slots`, with `slots` = `ceil(history_len / CHUNK) + 1`, so the ring always holds
//! the newest `history_len` movements (and at most `CHUNK - 1` more, which a read leaves out).
//!
//! A commit writes one RocksDB **merge** per (meter, chunk) it touched, holding that commit's
//! movements of the chunk, not a key per movement and no read before the write. The merge
//! operator ([`merge`]) concatenates a slot's pieces and keeps only the entries of its newest
//! chunk: the older lap of the ring is dropped when RocksDB merges (at a read, a flush or a
//! compaction). A restore expands each delta the same way.
//!
//! A value (and a merge operand) is the format byte, then entries of `version (u64 BE)`,
//! `length (u32 BE)` and the encoded movement (`pb::Change`, the bytes the delta carries).
//!
//! The slot of a chunk depends on the ring's size, so a store keeps the size its chunks were
//! written with (`L`); opened with a `history_len` of another size, it moves them into the new
//! ring first ([`Store::check_history_slots`]).
//!
//! Stores written before the chunks kept one key per movement (`S p 'h' … slot`, a ring of
//! `history_len`); [`Store::convert_history_rings`] moves them into chunks once, at open.

use rocksdb::{MergeOperands, WriteBatch};

use super::keys::{self, Kind};
use super::{no_wal, value, Round, Store, StoreError, FORMAT};
use crate::ledger::{BalanceChanged, CustomerId, MeterName};

/// Movements per chunk key.
pub(super) const CHUNK: u64 = 32;

/// How many keys a conversion writes per batch.
const CONVERSION_BATCH: usize = 50_000;

/// The chunk slots of a meter's ring holding `history_len` movements.
fn slots(history_len: u32) -> u64 {
    u64::from(history_len.max(1)).div_ceil(CHUNK) + 1
}

/// Appends one entry (a movement's `version` and its encoded bytes) to a value or operand.
fn push_entry(out: &mut Vec<u8>, version: u64, msg: &[u8]) {
    if out.is_empty() {
        out.push(FORMAT);
    }
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
}

/// The entries of a value or operand, in order; `None` if it is not one of this format.
fn entries(v: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let (&format, mut rest) = v.split_first()?;
    if format != FORMAT {
        return None;
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        let version = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let len = u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
        out.push((version, rest.get(12..12 + len)?));
        rest = &rest[12 + len..];
    }
    Some(out)
}

/// The entries of a stored chunk at `k`, checked: of this format and parsing whole.
fn stored_entries<'v>(k: &[u8], v: &'v [u8]) -> Result<Vec<(u64, &'v [u8])>, StoreError> {
    value::check(k, v)?;
    entries(v).ok_or_else(|| StoreError::Corrupt {
        key: String::from_utf8_lossy(k).escape_default().to_string(),
        message: "history chunk does not parse".into(),
    })
}

/// The merge operator of the chunk keys (full and partial): the pieces' entries, of the newest
/// chunk among them only, by version, the last written of a version winning. A piece that does
/// not parse is skipped (history is derived state; failing the merge would fail the read or the
/// compaction).
pub(super) fn merge(
    key: &[u8],
    existing: Option<&[u8]>,
    operands: &MergeOperands,
) -> Option<Vec<u8>> {
    let mut all: Vec<(u64, &[u8])> = Vec::new();
    for piece in existing.into_iter().chain(operands) {
        match entries(piece) {
            Some(e) => all.extend(e),
            None => tracing::warn!(
                key = %String::from_utf8_lossy(key).escape_default(),
                "skipped a history piece that does not parse"
            ),
        }
    }
    let newest = all.iter().map(|(v, _)| v / CHUNK).max();
    all.retain(|(v, _)| Some(v / CHUNK) == newest);
    // Stable: of equal versions, the one written last stays last.
    all.sort_by_key(|(v, _)| *v);
    let mut out = Vec::with_capacity(1 + all.iter().map(|(_, m)| 12 + m.len()).sum::<usize>());
    for (i, (v, m)) in all.iter().enumerate() {
        if all.get(i + 1).is_none_or(|(next, _)| next != v) {
            push_entry(&mut out, *v, m);
        }
    }
    if out.is_empty() {
        out.push(FORMAT);
    }
    Some(out)
}

/// Cuts a run of movements into one merge operand per (meter, chunk) of one customer: the
/// movements of a customer come together (the fold applies a customer's inputs in one group),
/// so a commit writes a key per meter it moved, not per movement.
#[derive(Debug)]
pub(super) struct Chunker {
    history_len: u32,
    customer: Option<(i32, CustomerId)>,
    open: Vec<Open>,
}

#[derive(Debug)]
struct Open {
    meter: MeterName,
    chunk: u64,
    key: Vec<u8>,
    operand: Vec<u8>,
}

/// A finished operand: (partition, key, operand).
pub(super) type Operand = (i32, Vec<u8>, Vec<u8>);

impl Chunker {
    pub(super) fn new(history_len: u32) -> Self {
        Self {
            history_len,
            customer: None,
            open: Vec::new(),
        }
    }

    /// Adds movement `version` (encoded `msg`) of `meter` of `customer` (partition `p`);
    /// finished operands go to `out`.
    pub(super) fn push(
        &mut self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
        version: u64,
        msg: &[u8],
        out: &mut impl FnMut(Operand),
    ) {
        if self
            .customer
            .as_ref()
            .is_none_or(|(q, c)| *q != p || c != customer)
        {
            self.flush(out);
            self.customer = Some((p, customer.clone()));
        }
        let chunk = version / CHUNK;
        let open = match self
            .open
            .iter()
            .position(|o| o.chunk == chunk && o.meter == *meter)
        {
            Some(i) => &mut self.open[i],
            None => {
                let slot = (chunk % slots(self.history_len)) as u32;
                self.open.push(Open {
                    meter: meter.clone(),
                    chunk,
                    key: keys::history(p, customer, meter, slot),
                    operand: Vec::with_capacity(64 + msg.len()),
                });
                self.open.last_mut().expect("just pushed")
            }
        };
        push_entry(&mut open.operand, version, msg);
    }

    /// Emits every open operand.
    pub(super) fn flush(&mut self, out: &mut impl FnMut(Operand)) {
        if let Some((p, _)) = self.customer.take() {
            for o in self.open.drain(..) {
                out((p, o.key, o.operand));
            }
        }
    }
}

impl Store {
    /// The kept movements of a meter, newest first, with versions below `before` (if given).
    pub fn history(
        &self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<BalanceChanged>, StoreError> {
        let pre = keys::history_prefix(p, customer, meter);
        let mut all = Vec::new();
        self.scan(&pre, |k, v| {
            for (_, msg) in stored_entries(k, v)? {
                all.push(value::change_from(k, value::decode_bare(k, msg)?)?);
            }
            Ok(true)
        })?;
        all.sort_by_key(|c| std::cmp::Reverse(c.version));
        // The ring holds up to a chunk more than `history_len`: keep exactly the newest.
        all.truncate(self.layout.history_len() as usize);
        all.retain(|c| before.is_none_or(|b| c.version < b));
        all.truncate(limit);
        Ok(all)
    }

    /// Moves the history of a store written before the chunks (one key per movement) into
    /// chunks; returns the movements moved.
    /// The chunks are then in the configured ring (`L` says so).
    pub(super) fn convert_history_rings(&self) -> Result<u64, StoreError> {
        let moved = self.rechunk(Kind::HistoryRing)?;
        let slots = slots(self.layout.history_len());
        self.db
            .put_opt(keys::HISTORY_SLOTS, slots.to_be_bytes(), &no_wal())?;
        Ok(moved)
    }

    /// Keeps the chunks in the ring of the configured `history_len`. The slot of a chunk
    /// depends on the ring's size, so chunks written with another size are in the wrong slots:
    /// a new chunk would merge into a slot that holds a newer one, and the newest movements
    /// would have gaps. The size the chunks were written with is kept under `L`; when it is not
    /// the configured one (or not known: a store from before the key), every meter's chunks are
    /// rewritten into the configured ring (the newest `slots` chunks, which hold the newest
    /// `history_len` movements kept). Runs at open, before anything is written.
    pub(super) fn check_history_slots(&self) -> Result<(), StoreError> {
        let want = slots(self.layout.history_len());
        let had = self
            .db
            .get(keys::HISTORY_SLOTS)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes);
        if had == Some(want) {
            return Ok(());
        }
        let moved = self.rechunk(Kind::History)?;
        if moved > 0 {
            tracing::info!(
                moved,
                from_slots = had,
                to_slots = want,
                history_len = self.layout.history_len(),
                "moved the history into the chunk ring of the configured history_len"
            );
        }
        self.db
            .put_opt(keys::HISTORY_SLOTS, want.to_be_bytes(), &no_wal())?;
        self.db.flush()?;
        Ok(())
    }

    /// Rewrites every meter's movements held in keys of `kind` (the chunks, or the history before
    /// them) as whole chunks in the configured ring, a meter at a time (its old keys deleted and
    /// its chunks put in the same batch), in rounds of [`CONVERSION_BATCH`] writes; returns the
    /// movements read. Reads only the keys of `kind` (a seek per partition), not the whole
    /// store. Idempotent: a rewrite cut short runs again from the start (every meter's chunks
    /// are put whole, from whatever slots they are in).
    fn rechunk(&self, kind: Kind) -> Result<u64, StoreError> {
        let mut moved = 0u64;
        let history_len = self.layout.history_len();
        for p in self.partitions()? {
            let (lo, hi) = keys::kind_range(p, kind);
            let mut meter: Option<MeterChunks> = None;
            self.rewrite_in_rounds(&lo, &hi, |item, batch| {
                let Some((k, v)) = item else {
                    put_chunks(history_len, meter.take(), batch);
                    return Ok(Round::Next);
                };
                let prefix = keys::chunk_prefix(k).expect("a history key");
                if meter.as_ref().is_some_and(|m| m.prefix != prefix) {
                    put_chunks(history_len, meter.take(), batch);
                    if batch.len() >= CONVERSION_BATCH {
                        return Ok(Round::EndBefore);
                    }
                }
                let m = meter.get_or_insert_with(|| MeterChunks {
                    prefix,
                    old: Vec::new(),
                    changes: Vec::new(),
                });
                m.old.push(k.to_vec());
                let before = m.changes.len();
                if kind == Kind::HistoryRing {
                    let version = value::decode::<value::pb::Change>(k, v)?.version;
                    m.changes.push((version, v[1..].to_vec()));
                } else {
                    let found = stored_entries(k, v)?;
                    m.changes
                        .extend(found.into_iter().map(|(v, msg)| (v, msg.to_vec())));
                }
                moved += (m.changes.len() - before) as u64;
                Ok(Round::Next)
            })?;
        }
        Ok(moved)
    }
}

/// One meter's movements as read for a rewrite: the prefix of its chunk keys, the keys they
/// were read from, and (version, encoded movement).
struct MeterChunks {
    prefix: Vec<u8>,
    old: Vec<Vec<u8>>,
    changes: Vec<(u64, Vec<u8>)>,
}

/// Deletes one meter's old keys and puts its movements as whole chunks: the newest, one per
/// slot of the ring for `history_len`; of equal versions, the last read is kept.
fn put_chunks(history_len: u32, meter: Option<MeterChunks>, batch: &mut WriteBatch) {
    let Some(MeterChunks {
        prefix,
        old,
        mut changes,
    }) = meter
    else {
        return;
    };
    for key in old {
        batch.delete(key);
    }
    changes.sort_by_key(|(v, _)| *v);
    let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
    for (i, (v, msg)) in changes.iter().enumerate() {
        if changes.get(i + 1).is_some_and(|(next, _)| next == v) {
            continue;
        }
        if chunks.last().is_none_or(|(c, _)| *c != v / CHUNK) {
            chunks.push((v / CHUNK, Vec::new()));
        }
        push_entry(&mut chunks.last_mut().expect("pushed").1, *v, msg);
    }
    let slots = slots(history_len);
    for (chunk, value) in chunks.into_iter().rev().take(slots as usize) {
        let mut key = prefix.clone();
        key.extend_from_slice(&((chunk % slots) as u32).to_be_bytes());
        batch.put(key, value);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::store::layout::{Layout, StateBatch};
    use crate::store::tests::movement;
    use crate::store::{StateWrite, Target};

    fn open(dir: &Path, history_len: u32) -> Store {
        let layout = Layout::new(history_len, Duration::from_secs(80));
        Store::open_path(dir, 8, 8, layout).unwrap()
    }

    fn change(customer: &str, meter: &str, version: u64) -> BalanceChanged {
        movement(customer, meter, version, 1_000 + version as i64)
    }

    /// Commits `versions` of (a, api), each beside a movement of (a, llm) and of (b, api), as
    /// the fold orders them (a customer's movements together); returns the writes.
    fn commit(s: &Store, versions: std::ops::RangeInclusive<u64>) -> Vec<StateWrite> {
        let mut batch = StateBatch::new(s.layout());
        for v in versions.clone() {
            batch.change(2, &change("a", "api", v));
            batch.change(2, &change("a", "llm", v));
        }
        for v in versions {
            batch.change(2, &change("b", "api", v));
        }
        let (writes, _) = batch.finish(&BTreeMap::new(), &BTreeMap::new());
        s.write(&writes, &[(2, 1)]).unwrap();
        writes
    }

    fn versions(s: &Store, customer: &str, before: Option<u64>, limit: usize) -> Vec<u64> {
        let (c, m) = (
            CustomerId::parse(customer).unwrap(),
            MeterName::parse("api").unwrap(),
        );
        let h = s.history(2, &c, &m, before, limit).unwrap();
        assert!(h.iter().all(|ch| ch.customer_id == c && ch.meter == m));
        h.iter().map(|ch| ch.version).collect()
    }

    fn keys_of(s: &Store, kind: Kind) -> usize {
        let (lo, hi) = keys::kind_range(2, kind);
        s.db.iterator(rocksdb::IteratorMode::From(
            &lo,
            rocksdb::Direction::Forward,
        ))
        .map(|i| i.unwrap().0)
        .take_while(|k| k[..] < hi[..])
        .count()
    }

    #[test]
    fn a_meter_keeps_exactly_its_newest_movements_across_commits_and_laps_of_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 50); // 3 slots of 32
        let mut merges = 0;
        let mut last = 0;
        for n in [1, 7, 40, 100, 3] {
            let writes = commit(&s, last + 1..=last + n);
            merges += writes
                .iter()
                .filter(|w| w.target == Target::LocalMerge)
                .count();
            last += n;
        }
        assert_eq!(last, 151);
        // One merge per (customer, meter, chunk) a commit touched, not one per movement:
        // chunks 0 | 0 | 0,1 | 1,2,3,4 | 4 for each of the three meters.
        assert_eq!(merges, 3 * (1 + 1 + 2 + 4 + 1));
        let newest: Vec<u64> = (102..=151).rev().collect();
        let check = |s: &Store| {
            assert_eq!(versions(s, "a", None, 1_000), newest);
            assert_eq!(versions(s, "b", None, 1_000), newest);
            assert_eq!(versions(s, "a", Some(120), 5), [119, 118, 117, 116, 115]);
            assert_eq!(versions(s, "a", Some(103), 5), [102]);
            assert_eq!(versions(s, "a", Some(102), 5), Vec::<u64>::new());
        };
        check(&s);
        // Merged by a flush and a compaction, then read back by a new process.
        s.flush().unwrap();
        s.db.compact_range::<&[u8], &[u8]>(None, None);
        check(&s);
        assert_eq!(keys_of(&s, Kind::History), 3 * 3, "3 slots per meter");
        drop(s);
        check(&open(dir.path(), 50));
    }

    /// The newest movements of a meter are contiguous (no version missing from the newest
    /// down) and at most `len`.
    fn contiguous(got: &[u64], newest: u64, len: usize) {
        assert!(got.len() <= len, "{} movements, at most {len}", got.len());
        let want: Vec<u64> = (0..got.len() as u64).map(|i| newest - i).collect();
        assert_eq!(got, want, "a gap in the history");
    }

    #[test]
    fn a_new_history_len_moves_the_chunks_to_its_ring_and_loses_no_newer_movement() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 200); // 8 slots
        commit(&s, 1..=300);
        assert_eq!(keys_of(&s, Kind::History), 3 * 8);
        drop(s);
        // Shorter: 3 slots. The newest 50 stay, the old slots go.
        let s = open(dir.path(), 50);
        assert_eq!(
            versions(&s, "a", None, 1_000),
            (251..=300).rev().collect::<Vec<_>>()
        );
        assert_eq!(keys_of(&s, Kind::History), 3 * 3);
        let mut prev = 300;
        for last in [310, 330, 333, 370] {
            commit(&s, prev + 1..=last);
            prev = last;
            contiguous(&versions(&s, "a", None, 1_000), last, 50);
        }
        assert_eq!(versions(&s, "b", None, 1_000).len(), 50);
        drop(s);
        // Longer again: what was kept stays, nothing newer is dropped by the wider ring.
        let s = open(dir.path(), 200);
        let kept = versions(&s, "a", None, 1_000);
        contiguous(&kept, 370, 200);
        assert!(kept.len() >= 50, "{}", kept.len());
        for last in [380, 420, 470, 600] {
            commit(&s, prev + 1..=last);
            prev = last;
            contiguous(&versions(&s, "a", None, 1_000), last, 200);
        }
        s.flush().unwrap();
        s.db.compact_range::<&[u8], &[u8]>(None, None);
        contiguous(&versions(&s, "a", None, 1_000), 600, 200);
        assert!(keys_of(&s, Kind::History) <= 3 * 8);
        drop(s);
        // Reopened with the same length: nothing to move.
        let s = open(dir.path(), 200);
        contiguous(&versions(&s, "a", None, 1_000), 600, 200);
    }

    #[test]
    fn a_history_larger_than_the_write_buffer_moves_to_a_new_ring_without_waiting_on_itself() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 200);
        // 150,000 meters x 12 movements: several rounds of writes, each several times the
        // 8 MiB write buffer.
        for round in 0..30 {
            let mut batch = StateBatch::new(s.layout());
            for c in 0..5_000 {
                for v in 1..=12 {
                    batch.change(2, &change(&format!("c{round}-{c:04}"), "api", v));
                }
            }
            let (writes, _) = batch.finish(&BTreeMap::new(), &BTreeMap::new());
            s.write(&writes, &[(2, 1)]).unwrap();
        }
        s.flush().unwrap();
        drop(s);
        // Opened with another ring size, it rewrites them all. A write made while the rewrite's
        // iterator is open waited forever for memtable memory that the iterator pinned (with
        // the batches written under the iterator, this timed out after 60 s; now about 4 s).
        let (done, finished) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let s = open(&path, 50);
            let ends = [
                versions(&s, "c0-0000", None, 1_000),
                versions(&s, "c29-4999", None, 1_000),
            ];
            done.send((ends, keys_of(&s, Kind::History))).unwrap();
        });
        let (ends, keys) = finished
            .recv_timeout(Duration::from_secs(600))
            .expect("the rewrite at open finished");
        for got in ends {
            assert_eq!(got, (1..=12).rev().collect::<Vec<u64>>());
        }
        assert_eq!(keys, 150_000, "one chunk per meter");
    }

    #[test]
    fn a_restore_expands_the_same_history_from_the_deltas() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let s = open(a.path(), 50);
        let mut log = Vec::new();
        for range in [1..=20, 21..=90, 91..=95] {
            log.extend(
                commit(&s, range)
                    .into_iter()
                    .filter(|w| w.target.changelog())
                    .map(|w| (w.key, w.value)),
            );
        }
        let r = open(b.path(), 50);
        r.restore(2, &log, 3).unwrap();
        let newest: Vec<u64> = (46..=95).rev().collect();
        assert_eq!(versions(&r, "a", None, 1_000), newest);
        assert_eq!(versions(&r, "b", None, 1_000), newest);
    }

    #[test]
    fn the_history_of_a_store_before_the_chunks_is_moved_into_chunks_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 50);
        // The old ring: a key per movement, slot = version % history_len (the newest 50 of 60).
        for customer in ["a", "b"] {
            for v in 1..=60u64 {
                let ch = change(customer, "api", v);
                let key = keys::ring(2, &ch.customer_id, &ch.meter, (v % 50) as u32);
                let value = value::with_format(&value::encode_change(&ch));
                s.db.put(key, value).unwrap();
            }
        }
        s.db.put(keys::LOCAL_INDEXES, [1]).unwrap();
        s.write(&[], &[(2, 1)]).unwrap(); // a store with state has its partition's checkpoint
        assert_eq!(keys_of(&s, Kind::HistoryRing), 100);
        drop(s);
        let s = open(dir.path(), 50);
        let newest: Vec<u64> = (11..=60).rev().collect();
        assert_eq!(versions(&s, "a", None, 1_000), newest);
        assert_eq!(versions(&s, "b", None, 1_000), newest);
        assert_eq!(keys_of(&s, Kind::HistoryRing), 0);
        assert_eq!(s.db.get(keys::LOCAL_INDEXES).unwrap(), Some(vec![2]));
        assert_eq!(
            s.db.get(keys::HISTORY_SLOTS).unwrap(),
            Some(slots(50).to_be_bytes().to_vec())
        );
        // New movements merge onto the converted chunks.
        let mut batch = StateBatch::new(s.layout());
        batch.change(2, &change("a", "api", 61));
        let (writes, _) = batch.finish(&BTreeMap::new(), &BTreeMap::new());
        s.write(&writes, &[(2, 1)]).unwrap();
        assert_eq!(versions(&s, "a", None, 3), [61, 60, 59]);
        assert_eq!(versions(&s, "a", None, 1_000).len(), 50);
    }
}
