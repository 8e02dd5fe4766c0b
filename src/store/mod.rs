//! RocksDB: the local materialisation of the changelog and, per partition, the changelog offset
//! it reflects.
//!
//! # State layout (format 2)
//! The unit of durable state is a customer's **book**: all its meter projections in one record,
//! written (to the changelog and RocksDB) at most once per commit. Beside it:
//! - **grant records** (idempotency of grant ids, forever; what a `VoidGrant` needs), one key per
//!   grant: written only when a grant or a void of one arrives;
//! - **usage ids** (idempotency within `pipeline.dedupe_window`, and what each event drew, for
//!   `VoidUsage`) live in **time buckets** of an eighth of the window. What a commit adds to a
//!   bucket of a partition is *one* changelog record, a **delta** (`D p bucket seq`), holding the
//!   ids (with their draws) and the balance changes of that commit. RocksDB keeps an index of
//!   the ids (`E p customer id`, one point lookup per usage event, bloom-filtered) expanded from
//!   the deltas. A bucket older than the window is dropped whole: its deltas are tombstoned in
//!   the changelog, the partition's **horizon** (`M p`) moves past it, so its ids stop counting
//!   at once; the index entries below the horizon are removed by a compaction filter, not one
//!   by one. Forgetting therefore costs a few records per bucket, whatever the ingest rate.
//! - **reservation records** (a reservation's first answer, for idempotency and releases; one
//!   per job, so as many as usage ids in an AI product) ride in the same deltas, in the bucket
//!   of the hold's end (`expires_at`, at most 7 days ahead), and are indexed locally (`r`
//!   keys). A reservation id is therefore remembered for the dedupe window after its hold
//!   ends, then forgotten with its bucket: a repeat after that is a new reservation, as a
//!   usage id replayed after the window counts again. Its index entry is filtered out at load
//!   once `expires_at` is below the horizon, and removed by the same compaction filter.
//! - **history** (the movements the Meters API pages through): per meter, a ring of chunk keys
//!   holding the newest `history_len` movements, in RocksDB only, expanded from the deltas
//!   (see `history`). It costs no changelog record per event: the balance changes ride in the
//!   deltas (one record per commit and partition), so they are as durable as the ids and
//!   restored with them. Locally a commit writes one RocksDB merge per (meter, chunk) it moved,
//!   not a key per movement. After a restore from an empty disk the history holds the
//!   movements of the dedupe window (the deltas still in the changelog); `balance-changed`
//!   remains the complete, durable record of every movement.
//!
//! - the **due index** (`t` keys, RocksDB only): one key per meter with a time-driven change
//!   ahead, ordered by its time, so the tick reads what is due with one seek per partition and
//!   nothing per meter is held in memory (see `due`). Derived from the books: a restore rebuilds
//!   it from the book records it replays.
//!
//! - **stream time** (the clock the rules run on, per partition; see
//!   `kafka::pipeline::stream_time`): each delta carries its partition's stream time after the
//!   commit, and the local checkpoint records it too, so a restored partition (from a checkpoint
//!   or from scratch) goes on from the time it had, not from the wall clock.
//!
//! So a usage event costs its `balance-changed` records, a share of its customer's one book
//! record per commit, and a share of its partition's one delta per commit.
//!
//! Every value starts with one byte of **state format** ([`FORMAT`], protobuf after it); the
//! store records its format under `V`. A store or changelog record of another format (e.g. the
//! JSON of format 1) is refused with [`StoreError::Format`], and drawdown stops rather than
//! guess. The key bytes are documented (and only known) in [`keys`].
//!
//! # Invariants
//! - The store is never ahead of Kafka: it is written only after a transaction committed, in one
//!   `WriteBatch` holding the touched keys *and* the new checkpoint of each partition, so a crash
//!   leaves it at some earlier consistent point and restore replays the changelog from there.
//! - Every state key starts with its partition, so a partition's state can be dropped or
//!   restored on its own.
//! - The WAL is off: the changelog is the log. One column family, so a flush never splits a
//!   batch from its checkpoint.
//!
//! # Who knows what
//! - [`keys`] is the only code that knows the bytes of a key.
//! - [`layout`] turns a folded batch into [`StateWrite`]s (pure), and [`Store::load_books`] and
//!   `replay` ([`Store::restore`]) turn records back into state: the store owns its layout both
//!   ways.
//! - `value` encodes and decodes the values; [`BookCache`] keeps decoded books across batches.

mod books;
mod cache;
mod due;
mod history;
mod keys;
pub mod layout;
mod replay;
mod value;

pub use books::BookRequest;
pub use cache::BookCache;
pub use due::Due;
pub use replay::Replay;
pub use value::FORMAT;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    Cache, DBCompressionType, Direction, IteratorMode, Options, ReadOptions, WriteBatch,
    WriteBufferManager, WriteOptions, DB,
};

use self::keys::Kind;
use self::layout::Layout;
use self::value::pb;
use crate::config::StoreConfig;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value does not decode (corruption).
    #[error("corrupt value at {key}: {message}")]
    Corrupt {
        /// The key, escaped.
        key: String,
        /// The decoder's message.
        message: String,
    },
    /// A value (or the store) is of a state format this build does not read.
    #[error(
        "state record {key} has state format {found}, this drawdown reads format {}; \
         format 1 (JSON, drawdown before v2) is not read: use a new consumer group \
         (kafka.group_id, so a new changelog) and an empty store.path, or the drawdown \
         version that wrote it",
        FORMAT
    )]
    Format {
        /// The key, escaped.
        key: String,
        /// The format found.
        found: u8,
    },
}

impl StoreError {
    /// Whether retrying cannot help (the state is of another format): drawdown must stop.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Format { .. })
    }
}

/// Where a [`StateWrite`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The changelog (in the transaction) and RocksDB (after the commit).
    Both,
    /// RocksDB only (derived state: the id index, delta markers).
    Local,
    /// RocksDB only, merged into the key's value by the store's merge operator (the history
    /// chunks; see `history`).
    LocalMerge,
    /// The changelog only (a delta, of which RocksDB keeps a marker).
    Changelog,
}

impl Target {
    /// Whether it is produced to the changelog.
    pub fn changelog(self) -> bool {
        matches!(self, Target::Both | Target::Changelog)
    }

    /// Whether it is written to RocksDB.
    pub fn local(self) -> bool {
        matches!(self, Target::Both | Target::Local | Target::LocalMerge)
    }
}

/// One change of a partition's state. `None` deletes (a tombstone in the changelog).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateWrite {
    /// The partition whose state this is (= the changelog partition).
    pub partition: i32,
    /// The key (see [`keys`]).
    pub key: Vec<u8>,
    /// The value, or `None` for a deletion.
    pub value: Option<Vec<u8>>,
    /// Where it goes.
    pub target: Target,
}

/// What a changelog record holds (for tools and tests: only [`keys`] knows the bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A customer's book.
    Book,
    /// A grant record.
    Grant,
    /// A delta of usage ids and balance changes (one time bucket, one commit).
    Delta,
    /// A partition's meta (the dedupe horizon).
    Meta,
}

/// The kind of the changelog record with this key, if it is one.
pub fn record_kind(key: &[u8]) -> Option<RecordKind> {
    match Kind::of(key)? {
        Kind::Book => Some(RecordKind::Book),
        Kind::Grant => Some(RecordKind::Grant),
        Kind::Delta => Some(RecordKind::Delta),
        Kind::Meta => Some(RecordKind::Meta),
        Kind::Event | Kind::Reservation | Kind::History | Kind::HistoryRing | Kind::Due => None,
    }
}

/// Per partition, the time before which usage ids are forgotten (see the module docs). Shared
/// with the compaction filter.
struct Horizons(Vec<AtomicI64>);

impl Horizons {
    fn new() -> Self {
        Self((0..=u16::MAX).map(|_| AtomicI64::new(i64::MIN)).collect())
    }

    fn get(&self, p: i32) -> i64 {
        self.0[p as u16 as usize].load(Ordering::Acquire)
    }

    fn set(&self, p: i32, h: i64) {
        self.0[p as u16 as usize].store(h, Ordering::Release);
    }
}

/// The `at` of an encoded event record, without decoding the rest (field 1, a varint).
fn event_at(v: &[u8]) -> Option<i64> {
    if v.len() < 2 || v[0] != FORMAT {
        return None;
    }
    if v[1] != 0x08 {
        return Some(0); // proto3 leaves a zero `at` out
    }
    let mut x: u64 = 0;
    for (i, b) in v[2..].iter().take(10).enumerate() {
        x |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(x as i64);
        }
    }
    None
}

/// The version of the local indexes this build writes (the `I` key; see
/// [`Store::migrate_local_indexes`]).
const LOCAL_INDEXES_VERSION: u8 = 2;

/// The local state store.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    horizons: Arc<Horizons>,
    layout: Layout,
    /// Counts the writes of committed state, for readers waiting on a commit.
    written: Arc<tokio::sync::watch::Sender<u64>>,
}

fn no_wal() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    wo
}

impl Store {
    /// Opens (creating) the store, with one shared block cache and write-buffer budget.
    pub fn open(cfg: &StoreConfig, layout: Layout) -> Result<Self, StoreError> {
        Self::open_path(&cfg.path, cfg.block_cache_mb, cfg.write_buffer_mb, layout)
    }

    /// Opens (creating) the store at `path`. Refuses a store of another state format.
    pub fn open_path(
        path: &Path,
        block_cache_mb: usize,
        write_buffer_mb: usize,
        layout: Layout,
    ) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(block_cache_mb.max(8) << 20);
        let wbm = WriteBufferManager::new_write_buffer_manager_with_cache(
            write_buffer_mb.max(8) << 20,
            true,
            cache.clone(),
        );
        // Point lookups dominate (books, usage ids, most of them misses): whole-key bloom
        // filters, kept in the block cache with the index and pinned for L0, small blocks, and
        // no compression on the levels that are read most.
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        block.set_whole_key_filtering(true);
        block.set_cache_index_and_filter_blocks(true);
        block.set_pin_l0_filter_and_index_blocks_in_cache(true);
        block.set_pin_top_level_index_and_filter(true);
        block.set_block_size(8 << 10);
        block.set_format_version(5);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_block_based_table_factory(&block);
        opts.set_write_buffer_manager(&wbm);
        opts.set_memtable_prefix_bloom_ratio(0.05);
        opts.set_memtable_whole_key_filtering(true);
        opts.set_compression_per_level(&[
            DBCompressionType::None,
            DBCompressionType::None,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
        ]);
        opts.set_merge_operator_associative("history-chunks", history::merge);
        opts.set_level_compaction_dynamic_level_bytes(true);
        opts.set_max_background_jobs(2);
        opts.increase_parallelism(2);
        let horizons = Arc::new(Horizons::new());
        let filter = horizons.clone();
        opts.set_compaction_filter(
            "forgotten-usage-ids",
            move |_level, key: &[u8], v: &[u8]| match (Kind::of(key), keys::partition_of(key)) {
                (Some(Kind::Event), Some(p)) => match event_at(v) {
                    Some(at) if at < filter.get(p) => Decision::Remove,
                    _ => Decision::Keep,
                },
                (Some(Kind::Reservation), Some(p)) => match value::reservation_ends(v) {
                    Some(ends) if ends < filter.get(p) => Decision::Remove,
                    _ => Decision::Keep,
                },
                _ => Decision::Keep,
            },
        );
        // The default column family opened by name, so batched MultiGet can address it.
        let cf =
            rocksdb::ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, opts.clone());
        let db = DB::open_cf_descriptors(&opts, path, [cf])?;
        let store = Self {
            db: Arc::new(db),
            horizons,
            layout,
            written: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        store.check_format()?;
        store.migrate_local_indexes()?;
        store.check_history_slots()?;
        Ok(store)
    }

    /// Records the format in a new store; refuses one of another format.
    fn check_format(&self) -> Result<(), StoreError> {
        match self.db.get(keys::FORMAT)? {
            Some(v) if v.as_slice() == [FORMAT] => Ok(()),
            Some(v) => Err(StoreError::Format {
                key: "V".into(),
                found: v.first().copied().unwrap_or(0),
            }),
            None => {
                let empty = self.db.iterator(IteratorMode::Start).next().is_none();
                if !empty {
                    return Err(StoreError::Format {
                        key: "V".into(),
                        found: 1,
                    });
                }
                self.db.put_opt(keys::FORMAT, [FORMAT], &no_wal())?;
                self.db.flush()?;
                Ok(())
            }
        }
    }

    /// Brings the local indexes of a store written by an older build up to
    /// [`LOCAL_INDEXES_VERSION`], once, at open: version 1 added the due index (built from the
    /// books), version 2 the history in chunks (converted from one key per movement).
    fn migrate_local_indexes(&self) -> Result<(), StoreError> {
        let from = match self.db.get(keys::LOCAL_INDEXES)?.as_deref() {
            None => 0,
            Some([v]) if *v <= LOCAL_INDEXES_VERSION => *v,
            Some(v) => {
                return Err(StoreError::Format {
                    key: "I".into(),
                    found: v.first().copied().unwrap_or(0),
                })
            }
        };
        if from == LOCAL_INDEXES_VERSION {
            return Ok(());
        }
        let started = std::time::Instant::now();
        if from < 1 {
            let books = self.index_all_books()?;
            if books > 0 {
                tracing::info!(
                    books,
                    "built the due index of a store written before it existed"
                );
            }
        }
        if from < 2 {
            let moved = self.convert_history_rings()?;
            if moved > 0 {
                tracing::info!(
                    moved,
                    "moved the history of a store written before its chunks"
                );
            }
        }
        self.db
            .put_opt(keys::LOCAL_INDEXES, [LOCAL_INDEXES_VERSION], &no_wal())?;
        self.db.flush()?;
        tracing::debug!(
            secs = started.elapsed().as_secs_f64(),
            from,
            "local indexes migrated"
        );
        Ok(())
    }

    /// How state is cut into records.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The changelog offset partition `p`'s state reflects (the next one to read), if any.
    pub fn checkpoint(&self, p: i32) -> Result<Option<i64>, StoreError> {
        Ok(self.db.get(keys::checkpoint(p))?.map(|v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8]);
            i64::from_be_bytes(b)
        }))
    }

    /// The partitions this store holds state of (those with a checkpoint).
    pub fn partitions(&self) -> Result<Vec<i32>, StoreError> {
        let mut out = Vec::new();
        self.scan(&keys::checkpoint_prefix(), |k, _| {
            out.extend(keys::checkpoint_partition(k));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Partition `p`'s stream time as of its checkpoint, if one was recorded.
    pub fn stream_time(&self, p: i32) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get(keys::checkpoint(p))?
            .and_then(|v| Some(i64::from_be_bytes(v.get(8..16)?.try_into().ok()?))))
    }

    /// Writes the local part of `writes` and the checkpoints (next changelog offset per
    /// partition) atomically, then applies any new horizon.
    pub fn write(
        &self,
        writes: &[StateWrite],
        checkpoints: &[(i32, i64)],
    ) -> Result<(), StoreError> {
        self.write_timed(writes, checkpoints, &BTreeMap::new())
    }

    /// [`Store::write`], recording with each checkpoint its partition's stream time from
    /// `stream_times`.
    pub fn write_timed(
        &self,
        writes: &[StateWrite],
        checkpoints: &[(i32, i64)],
        stream_times: &BTreeMap<i32, i64>,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let mut horizons = Vec::new();
        for w in writes.iter().filter(|w| w.target.local()) {
            match &w.value {
                Some(v) if w.target == Target::LocalMerge => batch.merge(&w.key, v),
                Some(v) => {
                    if Kind::of(&w.key) == Some(Kind::Meta) {
                        horizons
                            .push((w.partition, value::decode::<pb::PartitionMeta>(&w.key, v)?));
                    }
                    batch.put(&w.key, v)
                }
                None => batch.delete(&w.key),
            }
        }
        for (p, off) in checkpoints {
            batch.put(
                keys::checkpoint(*p),
                checkpoint_value(*off, stream_times.get(p).copied()),
            );
        }
        self.db.write_opt(batch, &no_wal())?;
        for (p, meta) in horizons {
            self.horizons.set(p, meta.horizon);
        }
        self.written.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Changes after every write of committed state ([`Store::write`]): what a request waits
    /// on for the pipeline to commit a command it handed over. Subscribe before handing it.
    pub fn subscribe_writes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Loads partition `p`'s horizon from its meta record (after a restore).
    pub fn load_meta(&self, p: i32) -> Result<(), StoreError> {
        let k = keys::meta(p);
        let h = match self.db.get(&k)? {
            Some(v) => value::decode::<pb::PartitionMeta>(&k, &v)?.horizon,
            None => i64::MIN,
        };
        self.horizons.set(p, h);
        Ok(())
    }

    /// The time before which partition `p`'s usage ids are forgotten.
    pub fn horizon(&self, p: i32) -> i64 {
        self.horizons.get(p)
    }

    /// Drops all state of partition `p`, and its checkpoint.
    pub fn drop_partition(&self, p: i32) -> Result<(), StoreError> {
        let (lo, hi) = keys::partition_range(p);
        let mut batch = WriteBatch::default();
        batch.delete_range(lo, hi);
        batch.delete(keys::checkpoint(p));
        self.db.write_opt(batch, &no_wal())?;
        self.horizons.set(p, i64::MIN);
        Ok(())
    }

    /// Flushes memtables to disk (used at shutdown, so a clean restart restores nothing).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Compacts partition `p`'s id indexes now (the compaction filter drops forgotten usage
    /// and reservation ids). For tests and tools: RocksDB compacts on its own as data comes in.
    pub fn compact_ids(&self, p: i32) {
        for kind in [Kind::Event, Kind::Reservation] {
            let (lo, hi) = keys::kind_range(p, kind);
            self.db.compact_range(Some(lo), Some(hi));
        }
    }

    /// Calls `f(key, value)` for every key starting with `pre`, in order, until it returns
    /// `Ok(false)`.
    fn scan(
        &self,
        pre: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        for item in self
            .db
            .iterator(IteratorMode::From(pre, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(pre) || !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Rewrites the keys in `[lo, hi)` a round at a time: `f` sees each key and value with the
    /// round's batch (and `None` at the end of each round, to put what it still holds), and
    /// ends a round before a key by returning [`Round::EndBefore`]. Each round's batch is
    /// written after its iterator is dropped, never while it is open: with the write buffer
    /// manager's stall, a write waits for memtable memory to be freed, and an open iterator
    /// pins the memtables it reads, so a write under an open iterator could wait forever (a
    /// conversion at open hung so on a 1M-customer store).
    fn rewrite_in_rounds(
        &self,
        lo: &[u8],
        hi: &[u8],
        mut f: impl FnMut(Option<(&[u8], &[u8])>, &mut WriteBatch) -> Result<Round, StoreError>,
    ) -> Result<(), StoreError> {
        let mut start = lo.to_vec();
        loop {
            let mut batch = WriteBatch::default();
            let mut next = None;
            for item in self
                .db
                .iterator(IteratorMode::From(&start, Direction::Forward))
            {
                let (k, v) = item?;
                if k[..] >= *hi {
                    break;
                }
                if f(Some((&k, &v)), &mut batch)? == Round::EndBefore {
                    next = Some(k.to_vec());
                    break;
                }
            }
            f(None, &mut batch)?;
            self.db.write_opt(batch, &no_wal())?;
            match next {
                Some(k) if k != start => start = k,
                Some(_) => unreachable!("a round must take at least one key"),
                None => return Ok(()),
            }
        }
    }

    /// A raw iterator that does not fill the block cache (for rare walks).
    fn cold_iter(&self) -> rocksdb::DBRawIterator<'_> {
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        self.db.raw_iterator_opt(ro)
    }

    /// Approximate size of the live data, bytes (for metrics).
    pub fn live_data_size(&self) -> u64 {
        self.property_int("rocksdb.estimate-live-data-size")
            .unwrap_or(0)
    }

    /// An integer RocksDB property (e.g. `rocksdb.block-cache-usage`), if RocksDB knows it.
    pub fn property_int(&self, name: &str) -> Option<u64> {
        self.db.property_int_value(name).ok().flatten()
    }

    /// RocksDB's estimate of the bytes on disk of each kind of state key in `partitions`, by
    /// kind name (`book`, `event`, `history`, ...): SST files only, so data still in a memtable
    /// is not counted, and data a compaction has yet to drop is. A lookup in the files' indexes,
    /// no data read.
    pub fn bytes_by_kind(
        &self,
        partitions: impl IntoIterator<Item = i32>,
    ) -> Vec<(&'static str, u64)> {
        let bounds: Vec<(Vec<u8>, Vec<u8>)> = partitions
            .into_iter()
            .flat_map(|p| Kind::ALL.map(|kind| keys::kind_range(p, kind)))
            .collect();
        let ranges: Vec<rocksdb::Range> = bounds
            .iter()
            .map(|(lo, hi)| rocksdb::Range::new(lo, hi))
            .collect();
        let sizes = self.db.get_approximate_sizes(&ranges);
        let mut out = Kind::ALL.map(|kind| (kind.name(), 0u64));
        for (i, size) in sizes.into_iter().enumerate() {
            out[i % Kind::ALL.len()].1 += size;
        }
        out.to_vec()
    }
}

/// What a [`Store::rewrite_in_rounds`] step says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Round {
    /// Go on with the next key.
    Next,
    /// End the round before this key (it starts the next round).
    EndBefore,
}

/// A checkpoint's value: the next changelog offset, then the stream time if known (i64 BE
/// each).
fn checkpoint_value(next: i64, stream_time: Option<i64>) -> Vec<u8> {
    let mut v = next.to_be_bytes().to_vec();
    if let Some(t) = stream_time {
        v.extend_from_slice(&t.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests;
