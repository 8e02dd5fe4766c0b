//! Reading state back: customers' books for the fold (`multi_get` in chunks), projections for
//! the API (the history is read in `history`), and the partition walks of restore and housekeeping.

use std::collections::BTreeSet;

use super::keys::{self, Kind};
use super::value::{self, pb};
use super::{BookCache, Store, StoreError};
use crate::ledger::{
    Book, CustomerId, MeterName, MeterState, MeterStates, Refs, ReservationId, ReservationRecord,
};

/// Keys per `multi_get` call of [`Store::load_books`].
const MULTI_GET_CHUNK: usize = 1024;

/// One book to load: a customer of a partition, with the records its inputs refer to.
#[derive(Clone, Copy, Debug)]
pub struct BookRequest<'a> {
    /// The partition.
    pub partition: i32,
    /// The customer.
    pub customer: &'a CustomerId,
    /// The event and grant records to load with it.
    pub refs: &'a Refs,
}

/// The meters of a book record.
pub(super) fn decode_book(key: &[u8], v: &[u8]) -> Result<MeterStates, StoreError> {
    let book: pb::Book = value::decode(key, v)?;
    book.meters
        .into_iter()
        .map(|m| value::meter_from(key, m))
        .collect()
}

impl Store {
    /// Loads the books `wants` names, in order: the meters from `cache` when it has them (they
    /// are taken out: the caller puts the folded book back after the commit), else from the
    /// book record (absent = a customer never seen), and the records each request's refs name
    /// (absent ones, and usage ids already forgotten, as `None`). One `multi_get` per 1,024 keys.
    pub fn load_books(
        &self,
        wants: &[BookRequest<'_>],
        cache: &mut BookCache,
    ) -> Result<Vec<Book>, StoreError> {
        let mut books = Vec::with_capacity(wants.len());
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut need_book = Vec::with_capacity(wants.len());
        for w in wants {
            let (p, c) = (w.partition, w.customer);
            let mut book = Book::new(c.clone());
            match cache.take(p, c) {
                Some(meters) => {
                    book.meters = meters;
                    need_book.push(false);
                }
                None => {
                    keys.push(keys::book(p, c));
                    need_book.push(true);
                }
            }
            keys.extend(w.refs.events.iter().map(|e| keys::event(p, c, e.as_str())));
            keys.extend(w.refs.grants.iter().map(|g| keys::grant(p, c, g.as_str())));
            keys.extend(
                w.refs
                    .reservations
                    .iter()
                    .map(|r| keys::reservation(p, c, r.as_str())),
            );
            books.push(book);
        }
        let cf = self
            .db
            .cf_handle("default")
            .expect("the default column family");
        // Each answer pins its block in the cache until it is dropped: a batch's keys at a
        // million customers are ~50k distinct blocks, ~400 MB pinned at once past the cache's
        // capacity. In chunks, one chunk's blocks are pinned at a time (each answer is decoded
        // and dropped before the next chunk is read).
        let values = keys
            .chunks(MULTI_GET_CHUNK)
            .flat_map(|chunk| self.db.batched_multi_get_cf(cf, chunk, false));
        let mut it = keys.iter().zip(values);
        let mut next = || {
            let (k, v) = it.next().expect("a value per key");
            v.map(|v| (k, v))
        };
        for ((w, book), need) in wants.iter().zip(books.iter_mut()).zip(need_book) {
            if need {
                let (k, v) = next()?;
                if let Some(v) = v {
                    book.meters = decode_book(k, &v)?;
                }
            }
            let horizon = self.horizon(w.partition);
            for e in &w.refs.events {
                let (k, v) = next()?;
                let rec = match v {
                    Some(v) => {
                        let r = value::event_from(k, value::decode(k, &v)?)?;
                        (r.at >= horizon).then_some(r)
                    }
                    None => None,
                };
                book.events.insert(e.clone(), rec);
            }
            for g in &w.refs.grants {
                let (k, v) = next()?;
                let rec = match v {
                    Some(v) => Some(value::grant_from(k, value::decode(k, &v)?)?),
                    None => None,
                };
                book.grants.insert(g.clone(), rec);
            }
            for r in &w.refs.reservations {
                let (k, v) = next()?;
                let rec = match v {
                    Some(v) => live_reservation(k, &v, horizon)?,
                    None => None,
                };
                book.reservations.insert(r.clone(), rec);
            }
        }
        Ok(books)
    }

    /// A reservation's record (its first answer), if the store has it and has not forgotten
    /// it (its hold ended before the partition's horizon).
    pub fn reservation(
        &self,
        p: i32,
        customer: &CustomerId,
        id: &ReservationId,
    ) -> Result<Option<ReservationRecord>, StoreError> {
        let k = keys::reservation(p, customer, id.as_str());
        match self.db.get_pinned(&k)? {
            Some(v) => live_reservation(&k, &v, self.horizon(p)),
            None => Ok(None),
        }
    }

    /// All meter projections of a customer in partition `p`.
    pub fn meters(&self, p: i32, customer: &CustomerId) -> Result<MeterStates, StoreError> {
        let k = keys::book(p, customer);
        match self.db.get_pinned(&k)? {
            Some(v) => decode_book(&k, &v),
            None => Ok(MeterStates::new()),
        }
    }

    /// One meter's projection.
    pub fn meter(
        &self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Option<MeterState>, StoreError> {
        Ok(self.meters(p, customer)?.remove(meter))
    }

    /// The time buckets partition `p` has deltas in, and the next delta sequence number (one
    /// past the highest in use). A seek per bucket, no scan of the deltas.
    pub fn deltas(&self, p: i32) -> Result<(BTreeSet<i64>, u64), StoreError> {
        let (lo, hi) = keys::kind_range(p, Kind::Delta);
        let mut it = self.cold_iter();
        let mut buckets = BTreeSet::new();
        let mut next_seq = 0;
        it.seek(&lo);
        while let Some(k) = it.key() {
            if k >= hi.as_slice() {
                break;
            }
            let Some((bucket, _)) = keys::delta_parts(k) else {
                break;
            };
            buckets.insert(bucket);
            // The bucket's last delta holds its highest seq (seqs only grow).
            it.seek_for_prev(keys::delta(p, bucket, u64::MAX));
            if let Some((_, seq)) = it.key().and_then(keys::delta_parts) {
                next_seq = next_seq.max(seq + 1);
            }
            if bucket == i64::MAX {
                break;
            }
            it.seek(keys::bucket_prefix(p, bucket + 1));
        }
        it.status()?;
        Ok((buckets, next_seq))
    }

    /// The keys of up to `limit` deltas of one time bucket of partition `p`.
    pub fn delta_keys(
        &self,
        p: i32,
        bucket: i64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let pre = keys::bucket_prefix(p, bucket);
        let mut it = self.cold_iter();
        it.seek(&pre);
        let mut out = Vec::new();
        while let Some(k) = it.key() {
            if !k.starts_with(&pre) || out.len() >= limit {
                break;
            }
            out.push(k.to_vec());
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Whether partition `p` holds a record of usage id `id` of `customer` (forgotten or not:
    /// for tests of the compaction filter).
    pub fn holds_event(&self, p: i32, customer: &CustomerId, id: &str) -> Result<bool, StoreError> {
        Ok(self.db.get_pinned(keys::event(p, customer, id))?.is_some())
    }

    /// Counts the books of partition `p` and the meter projections in them: `(customers,
    /// meters)`. A walk of the partition's books that bypasses the block cache; for metrics, so
    /// run it rarely and off the async runtime.
    pub fn count_meters(&self, p: i32) -> Result<(u64, u64), StoreError> {
        let pre = keys::kind_prefix(p, Kind::Book);
        let (mut customers, mut meters) = (0u64, 0u64);
        let mut it = self.cold_iter();
        it.seek(&pre);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&pre) {
                break;
            }
            customers += 1;
            meters += value::decode::<pb::Book>(k, v)?.meters.len() as u64;
            it.next();
        }
        it.status()?;
        Ok((customers, meters))
    }
}

/// A stored reservation record, unless forgotten: its hold ended before the partition's
/// `horizon` (the compaction filter removes it later).
fn live_reservation(
    k: &[u8],
    v: &[u8],
    horizon: i64,
) -> Result<Option<ReservationRecord>, StoreError> {
    let r = value::reservation_from(k, value::decode(k, v)?)?;
    Ok((r.expires_at >= horizon).then_some(r))
}
