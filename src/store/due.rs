//! The due index: when each meter next has a time-driven change (an activation, a grant's
//! expiry, a hold's end), so the tick reads only what is due instead of holding every meter in
//! memory or scanning the books.
//!
//! One key per meter with a due time, `S p 't' due customer NUL meter` (see [`keys`]), in
//! RocksDB only: it is derived from the books, which stay the truth.
//! - The fold moves a meter's key when its due time changes (it knows the time before and
//!   after), in the commit's local writes; a tick deletes the keys it read and puts back the
//!   current due time of every configured meter of the customers it loaded.
//! - A restore puts the key of every meter of the last version of each book it replays in one
//!   write (see `replay`). A key of an older version of the book may stay behind: it is stale,
//!   and the tick that reads it loads the book, finds nothing due and deletes it. Stale keys
//!   cost one book load each, never a wrong change (the rules act on the book's own times).
//! - A store written before the index existed (no `I` key) gets it built from its books once,
//!   at open (`Store::migrate_local_indexes`).
//!
//! Memory: nothing per meter. The pipeline keeps, per partition, the lowest due time that may
//! be unread ([`Store::due`]'s `from`), so a tick seeks past the tombstones of what earlier
//! ticks consumed.

use rocksdb::WriteBatch;

use super::books::decode_book;
use super::keys::{self, Kind};
use super::{value, Round, Store, StoreError};
use crate::ledger::{CustomerId, MeterName};

/// How many keys a migration writes per batch.
const MIGRATION_BATCH: usize = 50_000;

/// A meter found due by [`Store::due`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The partition.
    pub partition: i32,
    /// When it is due (ms, on the partition's stream time).
    pub at: i64,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// The index key, to delete once the tick is committed.
    pub(super) key: Vec<u8>,
}

/// The value of a due-index key: the state format alone.
pub(super) fn marker() -> Vec<u8> {
    value::with_format(&[])
}

/// Puts the due-index key of every meter of the book stored as `(key, v)` into `batch`.
pub(super) fn index_book(
    p: i32,
    key: &[u8],
    v: &[u8],
    batch: &mut WriteBatch,
) -> Result<(), StoreError> {
    let customer = String::from_utf8_lossy(keys::book_customer(key)).into_owned();
    let Ok(c) = CustomerId::parse(customer) else {
        return Ok(());
    };
    for (name, state) in decode_book(key, v)? {
        if let Some(at) = state.next_due() {
            batch.put(keys::due(p, at, &c, &name), marker());
        }
    }
    Ok(())
}

impl Store {
    /// The meters of partition `p` due at `from..=until`, soonest first, at most `limit`.
    pub fn due(&self, p: i32, from: i64, until: i64, limit: usize) -> Result<Vec<Due>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 || from > until {
            return Ok(out);
        }
        let lo = keys::due_from(p, from);
        let (_, hi) = keys::kind_range(p, Kind::Due);
        let mut it = self.db.raw_iterator();
        it.seek(&lo);
        while let Some(k) = it.key() {
            if k >= hi.as_slice() || out.len() >= limit {
                break;
            }
            let Some((at, customer, meter)) = keys::due_parts(k) else {
                it.next();
                continue;
            };
            if at > until {
                break;
            }
            let parsed = (
                CustomerId::parse(String::from_utf8_lossy(customer)),
                MeterName::parse(String::from_utf8_lossy(meter)),
            );
            if let (Ok(customer), Ok(meter)) = parsed {
                out.push(Due {
                    partition: p,
                    at,
                    customer,
                    meter,
                    key: k.to_vec(),
                });
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// Builds the due index from every book (for a store written before it existed); returns
    /// the books indexed.
    pub(super) fn index_all_books(&self) -> Result<u64, StoreError> {
        let mut books = 0u64;
        for p in self.partitions()? {
            let (lo, hi) = keys::kind_range(p, Kind::Book);
            self.rewrite_in_rounds(&lo, &hi, |item, batch| {
                let Some((k, v)) = item else {
                    return Ok(Round::Next);
                };
                if batch.len() >= MIGRATION_BATCH {
                    return Ok(Round::EndBefore);
                }
                index_book(p, k, v, batch)?;
                books += 1;
                Ok(Round::Next)
            })?;
        }
        Ok(books)
    }
}
