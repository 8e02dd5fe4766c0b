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
//! Key layout (`p` = u16 big-endian partition, ids never contain NUL):
//! - `S p 'm' customer NUL meter` -> `MeterState` (JSON)
//! - `S p 'e' customer NUL event_id` -> `EventRecord`
//! - `S p 'g' customer NUL grant_id` -> `GrantRecord`
//! - `S p 'h' customer NUL meter NUL slot(u32 BE)` -> `BalanceChanged` (a ring of `history_len`)
//! - `C p` -> next changelog offset to read (i64 BE)

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{
    Cache, Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteBufferManager,
    WriteOptions, DB,
};
use serde::de::DeserializeOwned;

use crate::config::StoreConfig;
use crate::ledger::{
    BalanceChanged, Book, CustomerId, EventRecord, GrantRecord, MeterName, MeterState, Refs,
};

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

/// One key/value change, as written to the changelog and to RocksDB (`None` deletes).
pub type Mutation = (Vec<u8>, Option<Vec<u8>>);

/// The local state store.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

const KIND_METER: u8 = b'm';
const KIND_EVENT: u8 = b'e';
const KIND_GRANT: u8 = b'g';
const KIND_HISTORY: u8 = b'h';

/// `S p kind`: every key of one kind in partition `p`.
fn kind_prefix(p: i32, kind: u8) -> Vec<u8> {
    let mut k = vec![b'S'];
    k.extend_from_slice(&(p as u16).to_be_bytes());
    k.push(kind);
    k
}

fn prefix(p: i32, kind: u8, customer: &CustomerId) -> Vec<u8> {
    let mut k = kind_prefix(p, kind);
    k.extend_from_slice(customer.as_str().as_bytes());
    k.push(0);
    k
}

/// The key of a meter projection.
pub fn meter_key(p: i32, customer: &CustomerId, meter: &MeterName) -> Vec<u8> {
    let mut k = prefix(p, KIND_METER, customer);
    k.extend_from_slice(meter.as_str().as_bytes());
    k
}

/// The key of an event record.
pub fn event_key(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    let mut k = prefix(p, KIND_EVENT, customer);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The key of a grant record.
pub fn grant_key(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    let mut k = prefix(p, KIND_GRANT, customer);
    k.extend_from_slice(id.as_bytes());
    k
}

fn history_prefix(p: i32, customer: &CustomerId, meter: &MeterName) -> Vec<u8> {
    let mut k = prefix(p, KIND_HISTORY, customer);
    k.extend_from_slice(meter.as_str().as_bytes());
    k.push(0);
    k
}

/// The key of a history slot (`version % history_len`).
pub fn history_key(p: i32, customer: &CustomerId, meter: &MeterName, slot: u32) -> Vec<u8> {
    let mut k = history_prefix(p, customer, meter);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}

fn checkpoint_key(p: i32) -> Vec<u8> {
    let mut k = vec![b'C'];
    k.extend_from_slice(&(p as u16).to_be_bytes());
    k
}

fn partition_range(p: i32) -> (Vec<u8>, Vec<u8>) {
    let mut lo = vec![b'S'];
    lo.extend_from_slice(&(p as u16).to_be_bytes());
    let mut hi = vec![b'S'];
    hi.extend_from_slice(&((p as u32 + 1) as u16).to_be_bytes());
    if p as u16 == u16::MAX {
        hi = vec![b'T'];
    }
    (lo, hi)
}

fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).escape_default().to_string(),
        message: e.to_string(),
    })
}

/// Encodes a value for the store and the changelog.
pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialisable")
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
        Ok(self.db.get(checkpoint_key(p))?.map(|v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8]);
            i64::from_be_bytes(b)
        }))
    }

    /// Writes `mutations` and the checkpoints atomically (WAL off: the changelog is the log).
    pub fn write(
        &self,
        mutations: &[Mutation],
        checkpoints: &[(i32, i64)],
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for (k, v) in mutations {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        for (p, off) in checkpoints {
            batch.put(checkpoint_key(*p), off.to_be_bytes());
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Drops all state of partition `p`, and its checkpoint.
    pub fn drop_partition(&self, p: i32) -> Result<(), StoreError> {
        let (lo, hi) = partition_range(p);
        let mut batch = WriteBatch::default();
        batch.delete_range(lo, hi);
        batch.delete(checkpoint_key(p));
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Flushes memtables to disk (used at shutdown, so a clean restart restores nothing).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Loads one customer's book: every configured meter's projection, and the records `refs`
    /// names (absent ones as `None`), in one `multi_get`.
    pub fn load_book(
        &self,
        p: i32,
        customer: &CustomerId,
        meters: &[MeterName],
        refs: &Refs,
    ) -> Result<Book, StoreError> {
        let mut keys: Vec<Vec<u8>> = meters.iter().map(|m| meter_key(p, customer, m)).collect();
        keys.extend(
            refs.events
                .iter()
                .map(|e| event_key(p, customer, e.as_str())),
        );
        keys.extend(
            refs.grants
                .iter()
                .map(|g| grant_key(p, customer, g.as_str())),
        );
        let values = self.db.multi_get(&keys);
        let mut book = Book::new(customer.clone());
        for (i, (k, v)) in keys.iter().zip(values).enumerate() {
            let v = v?;
            if i < meters.len() {
                if let Some(v) = v {
                    book.meters
                        .insert(meters[i].clone(), decode::<MeterState>(k, &v)?);
                }
            } else if i < meters.len() + refs.events.len() {
                let id = refs.events[i - meters.len()].clone();
                let rec = v.map(|v| decode::<EventRecord>(k, &v)).transpose()?;
                book.events.insert(id, rec);
            } else {
                let id = refs.grants[i - meters.len() - refs.events.len()].clone();
                let rec = v.map(|v| decode::<GrantRecord>(k, &v)).transpose()?;
                book.grants.insert(id, rec);
            }
        }
        Ok(book)
    }

    /// One meter's projection.
    pub fn meter(
        &self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Option<MeterState>, StoreError> {
        let k = meter_key(p, customer, meter);
        self.db.get(&k)?.map(|v| decode(&k, &v)).transpose()
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

    /// All meter projections of a customer in partition `p`.
    pub fn meters(
        &self,
        p: i32,
        customer: &CustomerId,
    ) -> Result<BTreeMap<MeterName, MeterState>, StoreError> {
        let pre = prefix(p, KIND_METER, customer);
        let mut out = BTreeMap::new();
        self.scan(&pre, |k, v| {
            let name = String::from_utf8_lossy(&k[pre.len()..]).into_owned();
            if let Ok(m) = MeterName::parse(name) {
                out.insert(m, decode(k, v)?);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// The kept movements of a meter, newest first, with versions below `before` (if given).
    pub fn history(
        &self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<BalanceChanged>, StoreError> {
        let pre = history_prefix(p, customer, meter);
        let mut all = Vec::new();
        self.scan(&pre, |k, v| {
            let c: BalanceChanged = decode(k, v)?;
            if before.is_none_or(|b| c.version < b) {
                all.push(c);
            }
            Ok(true)
        })?;
        all.sort_by_key(|c| std::cmp::Reverse(c.version));
        all.truncate(limit);
        Ok(all)
    }

    /// Every meter projection of partition `p` with a time-driven change pending: (due, customer,
    /// meter). Used to rebuild the tick index after a restore.
    pub fn due_meters(&self, p: i32) -> Result<Vec<(i64, CustomerId, MeterName)>, StoreError> {
        let pre = kind_prefix(p, KIND_METER);
        let mut out = Vec::new();
        self.scan(&pre, |k, v| {
            let state: MeterState = decode(k, v)?;
            let Some(due) = state.next_due() else {
                return Ok(true);
            };
            let rest = &k[pre.len()..];
            let Some(nul) = rest.iter().position(|b| *b == 0) else {
                return Ok(true);
            };
            let customer = CustomerId::parse(String::from_utf8_lossy(&rest[..nul]).into_owned());
            let meter = MeterName::parse(String::from_utf8_lossy(&rest[nul + 1..]).into_owned());
            if let (Ok(c), Ok(m)) = (customer, meter) {
                out.push((due, c, m));
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Keys of event records of partition `p` applied before `cutoff` (ms), at most `limit`:
    /// usage ids older than the dedupe window, to be forgotten.
    pub fn expired_events(
        &self,
        p: i32,
        cutoff: i64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let pre = kind_prefix(p, KIND_EVENT);
        let mut out = Vec::new();
        self.scan(&pre, |k, v| {
            if out.len() >= limit {
                return Ok(false);
            }
            let rec: EventRecord = decode(k, v)?;
            if rec.at < cutoff {
                out.push(k.to_vec());
            }
            Ok(true)
        })?;
        Ok(out)
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

    /// Counts the meter projections of partition `p` and the distinct customers they belong to:
    /// `(customers, meters)`. A key-only walk of the partition's meter range that bypasses the
    /// block cache; for metrics, so run it rarely and off the async runtime.
    pub fn count_meters(&self, p: i32) -> Result<(u64, u64), StoreError> {
        let pre = kind_prefix(p, KIND_METER);
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        let mut it = self.db.raw_iterator_opt(ro);
        it.seek(&pre);
        let (mut customers, mut meters) = (0u64, 0u64);
        let mut last: Vec<u8> = Vec::new();
        while let Some(k) = it.key() {
            if !k.starts_with(&pre) {
                break;
            }
            // Keys sort by customer, so a customer's meters are adjacent.
            let rest = &k[pre.len()..];
            let customer = &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())];
            if meters == 0 || customer != last.as_slice() {
                customers += 1;
                last = customer.to_vec();
            }
            meters += 1;
            it.next();
        }
        it.status()?;
        Ok((customers, meters))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::EventId;

    #[test]
    fn write_then_load_round_trips_with_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_path(dir.path(), 8, 8).unwrap();
        let c = CustomerId::parse("c1").unwrap();
        let m = MeterName::parse("api").unwrap();
        let st = MeterState {
            version: 3,
            ..Default::default()
        };
        s.write(&[(meter_key(2, &c, &m), Some(encode(&st)))], &[(2, 42)])
            .unwrap();
        assert_eq!(s.checkpoint(2).unwrap(), Some(42));
        assert_eq!(s.checkpoint(3).unwrap(), None);
        let refs = Refs {
            events: vec![EventId::parse("e").unwrap()],
            grants: vec![],
        };
        let b = s.load_book(2, &c, std::slice::from_ref(&m), &refs).unwrap();
        assert_eq!(b.meters[&m].version, 3);
        assert_eq!(b.events.len(), 1);
        assert!(s.meter(1, &c, &m).unwrap().is_none());
        s.drop_partition(2).unwrap();
        assert!(s.meter(2, &c, &m).unwrap().is_none());
        assert_eq!(s.checkpoint(2).unwrap(), None);
    }

    #[test]
    fn count_meters_counts_projections_and_distinct_customers_of_one_partition() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_path(dir.path(), 8, 8).unwrap();
        let st = encode(&MeterState::default());
        let key = |p, c: &str, m: &str| {
            meter_key(
                p,
                &CustomerId::parse(c).unwrap(),
                &MeterName::parse(m).unwrap(),
            )
        };
        let mut muts = vec![
            (key(1, "a", "x"), Some(st.clone())),
            (key(1, "a", "y"), Some(st.clone())),
            (key(1, "ab", "x"), Some(st.clone())),
            (key(2, "a", "x"), Some(st.clone())),
        ];
        muts.push((
            event_key(1, &CustomerId::parse("a").unwrap(), "e1"),
            Some(b"{}".to_vec()),
        ));
        s.write(&muts, &[]).unwrap();
        assert_eq!(s.count_meters(1).unwrap(), (2, 3));
        assert_eq!(s.count_meters(2).unwrap(), (1, 1));
        assert_eq!(s.count_meters(3).unwrap(), (0, 0));
        assert!(s.property_int("rocksdb.estimate-num-keys").is_some());
        assert!(s.property_int("rocksdb.block-cache-capacity").unwrap() >= 8 << 20);
    }
}
