//! Replaying changelog records into the store (a restore): the inverse of `layout` for what the
//! changelog carries.
//!
//! A [`Replay`] gathers the records of one partition read since the last write into one
//! `WriteBatch`, written atomically with the partition's checkpoint by
//! [`Store::finish_replay`]. Records go into the batch as they are read (one copy each, no
//! list of owned records first). Deltas are expanded into the id indexes and the history,
//! books into the due index, and every value's format is checked.
//!
//! A customer's book is rewritten by every commit that touched it, so a stretch of the
//! changelog often holds several versions of one book. Only the last of a replay matters (a
//! book key is written by nothing else), so a replay keeps the last value of each book key and
//! writes and indexes only that: one put and one decode per customer per replay, not per
//! commit.

use std::collections::HashMap;

use rocksdb::WriteBatch;

use super::history::{Chunker, Operand};
use super::keys::{self, Kind};
use super::value::{self, pb};
use super::{checkpoint_value, due, no_wal, Store, StoreError};
use crate::ledger::{CustomerId, MeterName};

/// Changelog records of one partition read since its last write (see the module docs).
pub struct Replay {
    p: i32,
    batch: WriteBatch,
    /// The last value of each book key replayed (`None`: a tombstone).
    books: HashMap<Vec<u8>, Option<Vec<u8>>>,
    horizon: Option<i64>,
    stream_time: Option<i64>,
    records: usize,
}

impl Replay {
    /// The records added since it began.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Whether no record was added.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

impl Store {
    /// Begins replaying records of partition `p` (from its checkpoint's stream time).
    pub fn replay(&self, p: i32) -> Result<Replay, StoreError> {
        Ok(Replay {
            p,
            batch: WriteBatch::default(),
            books: HashMap::new(),
            horizon: None,
            stream_time: self.stream_time(p)?,
            records: 0,
        })
    }

    /// Adds one changelog record (key, value; `None` deletes) to `r`.
    pub fn replay_record(
        &self,
        r: &mut Replay,
        k: &[u8],
        v: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        r.records += 1;
        let kind = Kind::of(k);
        if kind == Some(Kind::Book) {
            if let Some(v) = v {
                value::check(k, v)?;
            }
            r.books.insert(k.to_vec(), v.map(<[u8]>::to_vec));
            return Ok(());
        }
        let Some(v) = v else {
            r.batch.delete(k);
            return Ok(());
        };
        match kind {
            Some(Kind::Delta) => {
                let t = self.expand_delta(r.p, k, v, &mut r.batch)?;
                r.stream_time = r.stream_time.max(Some(t));
            }
            Some(Kind::Meta) => {
                r.horizon = Some(value::decode::<pb::PartitionMeta>(k, v)?.horizon);
                r.batch.put(k, v);
            }
            _ => {
                value::check(k, v)?;
                r.batch.put(k, v);
            }
        }
        Ok(())
    }

    /// Writes `r` with the checkpoint `next` (the offset after its last record), atomically.
    pub fn finish_replay(&self, r: Replay, next: i64) -> Result<(), StoreError> {
        let Replay {
            p,
            mut batch,
            books,
            horizon,
            stream_time,
            ..
        } = r;
        for (k, v) in books {
            match v {
                Some(v) => {
                    due::index_book(p, &k, &v, &mut batch)?;
                    batch.put(k, v);
                }
                None => batch.delete(k),
            }
        }
        batch.put(keys::checkpoint(p), checkpoint_value(next, stream_time));
        self.db.write_opt(batch, &no_wal())?;
        if let Some(h) = horizon {
            self.horizons.set(p, h);
        }
        Ok(())
    }

    /// Applies changelog records of partition `p` (key, value; `None` deletes) with the
    /// checkpoint `next`, atomically: one [`Replay`].
    pub fn restore(
        &self,
        p: i32,
        records: &[(Vec<u8>, Option<Vec<u8>>)],
        next: i64,
    ) -> Result<(), StoreError> {
        let mut r = self.replay(p)?;
        for (k, v) in records {
            self.replay_record(&mut r, k, v.as_deref())?;
        }
        self.finish_replay(r, next)
    }

    /// Expands a delta into `batch`; returns the stream time it carries.
    fn expand_delta(
        &self,
        p: i32,
        key: &[u8],
        v: &[u8],
        batch: &mut WriteBatch,
    ) -> Result<i64, StoreError> {
        let delta: pb::Delta = value::decode(key, v)?;
        let stream_time = delta.stream_time;
        // The id records (usage and reservation ids) into their local indexes.
        type KeyOf = fn(i32, &CustomerId, &str) -> Vec<u8>;
        let events = delta.events.into_iter().map(|e| {
            let key_of: KeyOf = keys::event;
            (e.customer, e.event_id, e.record, key_of)
        });
        let reservations = delta.reservations.into_iter().map(|r| {
            let key_of: KeyOf = keys::reservation;
            (r.customer, r.reservation_id, r.record, key_of)
        });
        for (customer, id, record, key_of) in events.chain(reservations) {
            if let Ok(c) = CustomerId::parse(customer) {
                batch.put(key_of(p, &c, &id), value::with_format(&record));
            }
        }
        let mut history = Chunker::new(self.layout.history_len());
        let mut merge = |(_, k, operand): Operand| batch.merge(k, operand);
        for bytes in delta.changes {
            let ch: pb::Change = value::decode_bare(key, &bytes)?;
            let (Ok(c), Ok(m)) = (CustomerId::parse(ch.customer), MeterName::parse(ch.meter))
            else {
                continue;
            };
            history.push(p, &c, &m, ch.version, &bytes, &mut merge);
        }
        history.flush(&mut merge);
        batch.put(key, []);
        Ok(stream_time)
    }
}
