//! Reading state back: customers' books for the fold (one `multi_get` per batch), projections
//! and history for the API, and the partition walks of restore and housekeeping.

use std::collections::BTreeMap;

use super::keys::{self, Kind};
use super::value::decode;
use super::{StateWrite, Store, StoreError};
use crate::ledger::{
    BalanceChanged, Book, CustomerId, EventRecord, GrantRecord, MeterName, MeterState, Refs,
};

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

impl Store {
    /// Loads the books `wants` names, in order, in one `multi_get`: every configured meter's
    /// projection (absent = never changed) and the records each request's refs name (absent
    /// ones as `None`).
    pub fn load_books(
        &self,
        meters: &[MeterName],
        wants: &[BookRequest<'_>],
    ) -> Result<Vec<Book>, StoreError> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for w in wants {
            let (p, c) = (w.partition, w.customer);
            keys.extend(meters.iter().map(|m| keys::meter(p, c, m)));
            keys.extend(w.refs.events.iter().map(|e| keys::event(p, c, e.as_str())));
            keys.extend(w.refs.grants.iter().map(|g| keys::grant(p, c, g.as_str())));
        }
        let mut values = self.db.multi_get(&keys).into_iter();
        let mut keys = keys.iter();
        let mut books = Vec::with_capacity(wants.len());
        for w in wants {
            let mut book = Book::new(w.customer.clone());
            for m in meters {
                let (k, v) = (keys.next().expect("a key per value"), values.next());
                if let Some(v) = v.expect("a value per key")? {
                    book.meters.insert(m.clone(), decode::<MeterState>(k, &v)?);
                }
            }
            for e in &w.refs.events {
                let (k, v) = (keys.next().expect("a key per value"), values.next());
                let rec = v.expect("a value per key")?;
                let rec = rec.map(|v| decode::<EventRecord>(k, &v)).transpose()?;
                book.events.insert(e.clone(), rec);
            }
            for g in &w.refs.grants {
                let (k, v) = (keys.next().expect("a key per value"), values.next());
                let rec = v.expect("a value per key")?;
                let rec = rec.map(|v| decode::<GrantRecord>(k, &v)).transpose()?;
                book.grants.insert(g.clone(), rec);
            }
            books.push(book);
        }
        Ok(books)
    }

    /// One meter's projection.
    pub fn meter(
        &self,
        p: i32,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Option<MeterState>, StoreError> {
        let k = keys::meter(p, customer, meter);
        self.db.get(&k)?.map(|v| decode(&k, &v)).transpose()
    }

    /// All meter projections of a customer in partition `p`.
    pub fn meters(
        &self,
        p: i32,
        customer: &CustomerId,
    ) -> Result<BTreeMap<MeterName, MeterState>, StoreError> {
        let pre = keys::customer_prefix(p, Kind::Meter, customer);
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
        let pre = keys::history_prefix(p, customer, meter);
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
        let pre = keys::kind_prefix(p, Kind::Meter);
        let mut out = Vec::new();
        self.scan(&pre, |k, v| {
            let state: MeterState = decode(k, v)?;
            let Some(due) = state.next_due() else {
                return Ok(true);
            };
            let Some((customer, meter)) = keys::split_customer(&k[pre.len()..]) else {
                return Ok(true);
            };
            let customer = CustomerId::parse(String::from_utf8_lossy(customer).into_owned());
            let meter = MeterName::parse(String::from_utf8_lossy(meter).into_owned());
            if let (Ok(c), Ok(m)) = (customer, meter) {
                out.push((due, c, m));
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Deletions of the event records of partition `p` applied before `cutoff` (ms), at most
    /// `limit`: usage ids older than the dedupe window, to be forgotten.
    pub fn expired_events(
        &self,
        p: i32,
        cutoff: i64,
        limit: usize,
    ) -> Result<Vec<StateWrite>, StoreError> {
        let pre = keys::kind_prefix(p, Kind::Event);
        let mut out = Vec::new();
        self.scan(&pre, |k, v| {
            if out.len() >= limit {
                return Ok(false);
            }
            let rec: EventRecord = decode(k, v)?;
            if rec.at < cutoff {
                out.push(StateWrite {
                    partition: p,
                    key: k.to_vec(),
                    value: None,
                });
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Counts the meter projections of partition `p` and the distinct customers they belong to:
    /// `(customers, meters)`. A key-only walk of the partition's meter range that bypasses the
    /// block cache; for metrics, so run it rarely and off the async runtime.
    pub fn count_meters(&self, p: i32) -> Result<(u64, u64), StoreError> {
        let pre = keys::kind_prefix(p, Kind::Meter);
        let (mut customers, mut meters) = (0u64, 0u64);
        let mut last: Vec<u8> = Vec::new();
        self.scan_keys(&pre, |k| {
            // Keys sort by customer, so a customer's meters are adjacent.
            let customer = keys::split_customer(&k[pre.len()..]).map_or(&k[pre.len()..], |s| s.0);
            if meters == 0 || customer != last.as_slice() {
                customers += 1;
                last = customer.to_vec();
            }
            meters += 1;
        })?;
        Ok((customers, meters))
    }
}
