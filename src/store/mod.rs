//! RocksDB: the local materialisation of the changelog (projections, records, history) and,
//! per partition, the changelog offset it reflects.
//!
//! # Invariants
//! - The store is never ahead of Kafka: it is written only after a transaction committed, in one
//!   `WriteBatch` holding the touched keys *and* the new checkpoint of each partition, so a crash
//!   leaves it at some earlier consistent point and restore replays the changelog from there.
//! - Every state key starts with its partition, so a partition's state can be dropped or
//!   restored on its own. Changelog records carry exactly these keys and values, so restoring is
//!   copying records (a null value deletes).
//! - The WAL is off: the changelog is the log. One column family, so a flush never splits a
//!   batch from its checkpoint.
//!
//! # Who knows what
//! - [`keys`] is the only code that knows the bytes of a key (the layout is documented there).
//! - [`layout`] turns a folded [`Book`](crate::ledger::Book) into [`StateWrite`]s (pure), and
//!   [`Store::load_books`] turns keys back into books: the store owns its layout both ways.
//! - [`value`] encodes and decodes the values.

mod books;
pub use books::BookRequest;
mod keys;
pub mod layout;
mod value;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    Cache, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteBufferManager,
    WriteOptions, DB,
};

use crate::config::StoreConfig;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value does not decode (corruption or an incompatible version).
    #[error("corrupt value at {key}: {message}")]
    Corrupt {
        /// The key, escaped.
        key: String,
        /// The decoder's message.
        message: String,
    },
}

/// One change of a partition's state: produced to the changelog (partition `partition`) in the
/// transaction, then written to RocksDB after the commit. `None` deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateWrite {
    /// The partition whose state this is (= the changelog partition).
    pub partition: i32,
    /// The key (see [`keys`]).
    pub key: Vec<u8>,
    /// The value, or `None` for a deletion (a changelog tombstone).
    pub value: Option<Vec<u8>>,
}

/// The local state store.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

fn no_wal() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    wo
}

impl Store {
    /// Opens (creating) the store, with one shared block cache and write-buffer budget.
    pub fn open(cfg: &StoreConfig) -> Result<Self, StoreError> {
        Self::open_path(&cfg.path, cfg.block_cache_mb, cfg.write_buffer_mb)
    }

    /// Opens (creating) the store at `path`.
    pub fn open_path(
        path: &Path,
        block_cache_mb: usize,
        write_buffer_mb: usize,
    ) -> Result<Self, StoreError> {
        let cache = Cache::new_lru_cache(block_cache_mb.max(8) << 20);
        let wbm = WriteBufferManager::new_write_buffer_manager_with_cache(
            write_buffer_mb.max(8) << 20,
            true,
            cache.clone(),
        );
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_block_cache(&cache);
        block.set_bloom_filter(10.0, false);
        block.set_cache_index_and_filter_blocks(true);
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_block_based_table_factory(&block);
        opts.set_write_buffer_manager(&wbm);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        opts.increase_parallelism(2);
        let db = DB::open(&opts, path)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// The changelog offset partition `p`'s state reflects (the next one to read), if any.
    pub fn checkpoint(&self, p: i32) -> Result<Option<i64>, StoreError> {
        Ok(self.db.get(keys::checkpoint(p))?.map(|v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8]);
            i64::from_be_bytes(b)
        }))
    }

    /// Writes `writes` and the checkpoints (next changelog offset per partition) atomically.
    pub fn write(
        &self,
        writes: &[StateWrite],
        checkpoints: &[(i32, i64)],
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for w in writes {
            match &w.value {
                Some(v) => batch.put(&w.key, v),
                None => batch.delete(&w.key),
            }
        }
        for (p, off) in checkpoints {
            batch.put(keys::checkpoint(*p), off.to_be_bytes());
        }
        self.db.write_opt(batch, &no_wal())?;
        Ok(())
    }

    /// Applies changelog records of partition `p` (key, value; `None` deletes) read during a
    /// restore, with the checkpoint `next` (the offset after the last of them), atomically.
    pub fn restore(
        &self,
        p: i32,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
        next: i64,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (k, v) in records {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        batch.put(keys::checkpoint(p), next.to_be_bytes());
        self.db.write_opt(batch, &no_wal())?;
        Ok(())
    }

    /// Drops all state of partition `p`, and its checkpoint.
    pub fn drop_partition(&self, p: i32) -> Result<(), StoreError> {
        let (lo, hi) = keys::partition_range(p);
        let mut batch = WriteBatch::default();
        batch.delete_range(lo, hi);
        batch.delete(keys::checkpoint(p));
        self.db.write_opt(batch, &no_wal())?;
        Ok(())
    }

    /// Flushes memtables to disk (used at shutdown, so a clean restart restores nothing).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
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

    /// Calls `f(key)` for every key starting with `pre`, without values and without filling the
    /// block cache (for rare walks such as the metrics' counts).
    fn scan_keys(&self, pre: &[u8], mut f: impl FnMut(&[u8])) -> Result<(), StoreError> {
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(pre);
        while let Some(k) = it.key() {
            if !k.starts_with(pre) {
                break;
            }
            f(k);
            it.next();
        }
        it.status()?;
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{
        BalanceChanged, Book, CustomerId, EventId, Grant, GrantId, Input, Ledger, MeterDef,
        MeterName, MeterState, Meters, Output, Refs, Usage,
    };

    fn ledger() -> Ledger {
        let def: MeterDef = toml::from_str(
            r#"name = "api"
event = "call"
aggregation = { type = "count" }
on_exhausted = "overage""#,
        )
        .unwrap();
        Ledger::new(Meters::new(vec![def]).unwrap())
    }

    #[test]
    fn a_folded_book_round_trips_through_the_store_with_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_path(dir.path(), 8, 8).unwrap();
        let c = CustomerId::parse("c1").unwrap();
        let m = MeterName::parse("api").unwrap();
        let (e, g) = (EventId::parse("e1").unwrap(), GrantId::parse("g1").unwrap());
        let refs = Refs {
            events: vec![e.clone()],
            grants: vec![g.clone()],
        };
        let want = BookRequest {
            partition: 2,
            customer: &c,
            refs: &refs,
        };
        let mut book = s
            .load_books(std::slice::from_ref(&m), &[want])
            .unwrap()
            .remove(0);
        assert!(book.meters.is_empty() && book.events[&e].is_none() && book.grants[&g].is_none());
        let grant = Input::Grant(Grant::top_up(g.clone(), c.clone(), m.clone(), 5.into()));
        let usage = Input::Usage(Usage {
            id: e.clone(),
            customer: c.clone(),
            name: "call".into(),
            timestamp_ms: 0,
            properties: Default::default(),
        });
        let mut out = Vec::new();
        let l = ledger();
        l.apply(&mut book, &grant, 10, &mut out).unwrap();
        l.apply(&mut book, &usage, 11, &mut out).unwrap();
        let dirty = book.take_dirty();
        let mut writes = layout::book_writes(2, &book, &dirty);
        assert_eq!(writes.len(), 3, "meter, event and grant");
        for o in &out {
            if let Output::Changed(ch) = o {
                writes.push(layout::history_write(2, ch, 200));
            }
        }
        assert!(writes
            .iter()
            .all(|w| w.partition == 2 && keys::partition_of(&w.key) == Some(2)));
        s.write(&writes, &[(2, 42)]).unwrap();
        assert_eq!(s.checkpoint(2).unwrap(), Some(42));
        assert_eq!(s.checkpoint(3).unwrap(), None);
        let loaded = s
            .load_books(std::slice::from_ref(&m), &[want])
            .unwrap()
            .remove(0);
        assert_eq!(loaded.meters, book.meters);
        assert_eq!(loaded.events, book.events);
        assert_eq!(loaded.grants, book.grants);
        let history: Vec<u64> = s
            .history(2, &c, &m, None, 10)
            .unwrap()
            .iter()
            .map(|h: &BalanceChanged| h.version)
            .collect();
        assert_eq!(history, vec![2, 1]);
        assert!(s.meter(1, &c, &m).unwrap().is_none());
        s.drop_partition(2).unwrap();
        assert!(s.meter(2, &c, &m).unwrap().is_none());
        assert_eq!(s.checkpoint(2).unwrap(), None);
    }

    #[test]
    fn count_meters_counts_projections_and_distinct_customers_of_one_partition() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_path(dir.path(), 8, 8).unwrap();
        let mut writes = Vec::new();
        for (p, c, m) in [(1, "a", "x"), (1, "a", "y"), (1, "ab", "x"), (2, "a", "x")] {
            let mut book = Book::new(CustomerId::parse(c).unwrap());
            let m = MeterName::parse(m).unwrap();
            book.meters.insert(m.clone(), MeterState::default());
            let dirty = [crate::ledger::Dirty::Meter(m)].into();
            writes.extend(layout::book_writes(p, &book, &dirty));
        }
        s.write(&writes, &[]).unwrap();
        assert_eq!(s.count_meters(1).unwrap(), (2, 3));
        assert_eq!(s.count_meters(2).unwrap(), (1, 1));
        assert_eq!(s.count_meters(3).unwrap(), (0, 0));
        assert!(s.property_int("rocksdb.estimate-num-keys").is_some());
        assert!(s.property_int("rocksdb.block-cache-capacity").unwrap() >= 8 << 20);
    }
}
