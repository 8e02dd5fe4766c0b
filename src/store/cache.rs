//! A bounded cache of decoded books across batches, least recently used first out, by bytes.
//!
//! A customer active in consecutive batches is then decoded once, not once per batch. It holds
//! only committed state: the loop takes a book out to fold it and puts the folded book back
//! after the commit (a failed commit rebuilds the loop, and the cache with it).

use std::collections::{BTreeMap, HashMap};

use crate::ledger::{CustomerId, MeterName, MeterState, MeterStates};

/// The meters of one book.
pub type Meters = MeterStates;

/// Decoded books by (partition, customer), bounded by an estimate of their bytes.
#[derive(Debug)]
pub struct BookCache {
    max_bytes: usize,
    bytes: usize,
    tick: u64,
    books: HashMap<(i32, CustomerId), (Meters, usize, u64)>,
    /// Last use -> key, for eviction.
    order: BTreeMap<u64, (i32, CustomerId)>,
}

/// The memory a book takes in the cache, as allocated: the meters' vector by capacity, their
/// grant and hold vectors by capacity, the customer id once (the map key and the eviction order
/// share it) and each grant or hold id. Meter names are shared by every book (the configured
/// names, and those the store decodes), so they count nothing here.
fn size(customer: &CustomerId, meters: &Meters) -> usize {
    use crate::ledger::{GrantSlot, Hold};
    use std::mem::size_of;
    // An id's allocation: its text after the reference counts.
    let text = |s: &str| s.len() + 2 * size_of::<usize>();
    let entry = size_of::<(i32, CustomerId)>() * 2 + size_of::<(Meters, usize, u64)>() + 32;
    entry
        + text(customer.as_str())
        + meters.capacity() * (size_of::<MeterName>() + size_of::<MeterState>())
        + meters
            .values()
            .map(|s| {
                s.grants.capacity() * size_of::<GrantSlot>()
                    + s.grants.iter().map(|g| text(g.id.as_str())).sum::<usize>()
                    + s.holds.capacity() * size_of::<Hold>()
                    + s.holds.iter().map(|h| text(h.id.as_str())).sum::<usize>()
            })
            .sum::<usize>()
}

impl BookCache {
    /// An empty cache of at most `max_bytes` (0 disables it).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            bytes: 0,
            tick: 0,
            books: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Takes a customer's book out, if cached.
    pub fn take(&mut self, p: i32, customer: &CustomerId) -> Option<Meters> {
        let key = (p, customer.clone());
        let (meters, bytes, tick) = self.books.remove(&key)?;
        self.order.remove(&tick);
        self.bytes -= bytes;
        Some(meters)
    }

    /// Puts a (committed) book in, evicting the least recently used beyond the bound.
    pub fn put(&mut self, p: i32, customer: CustomerId, meters: Meters) {
        if self.max_bytes == 0 {
            return;
        }
        self.take(p, &customer);
        let bytes = size(&customer, &meters);
        self.tick += 1;
        self.order.insert(self.tick, (p, customer.clone()));
        self.books.insert((p, customer), (meters, bytes, self.tick));
        self.bytes += bytes;
        while self.bytes > self.max_bytes {
            let Some((_, (p, c))) = self.order.pop_first() else {
                break;
            };
            if let Some((_, b, _)) = self.books.remove(&(p, c)) {
                self.bytes -= b;
            }
        }
    }

    /// Forgets every book of partition `p` (it moved away or was dropped).
    pub fn drop_partition(&mut self, p: i32) {
        let gone: Vec<u64> = self
            .books
            .iter()
            .filter(|((q, _), _)| *q == p)
            .map(|(_, (_, _, t))| *t)
            .collect();
        for t in gone {
            if let Some(key) = self.order.remove(&t) {
                if let Some((_, b, _)) = self.books.remove(&key) {
                    self.bytes -= b;
                }
            }
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.books.clear();
        self.order.clear();
        self.bytes = 0;
    }

    /// Books held.
    pub fn len(&self) -> usize {
        self.books.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.books.is_empty()
    }

    /// The estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_books_go_first_and_the_bound_holds() {
        let c = |i: usize| CustomerId::parse(format!("c{i}")).unwrap();
        let one = size(&c(0), &Meters::new());
        let mut cache = BookCache::new(one * 3);
        for i in 0..3 {
            cache.put(0, c(i), Meters::new());
        }
        assert!(cache.take(0, &c(0)).is_some());
        cache.put(0, c(0), Meters::new()); // c0 used last now
        cache.put(1, c(3), Meters::new()); // evicts c1
        assert!(cache.bytes() <= one * 3);
        assert_eq!(cache.len(), 3);
        assert!(cache.take(0, &c(1)).is_none());
        assert!(cache.take(0, &c(0)).is_some());
        cache.drop_partition(1);
        assert!(cache.take(1, &c(3)).is_none());
        assert_eq!(cache.len(), 1);
        let mut off = BookCache::new(0);
        off.put(0, c(0), Meters::new());
        assert!(off.is_empty());
    }
}
