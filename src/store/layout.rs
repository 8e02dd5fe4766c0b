//! From folded state to [`StateWrite`]s: pure functions, no RocksDB (the fold and its benchmark
//! call them). Their inverse is [`Store::load_books`](super::Store::load_books).

use std::collections::BTreeSet;

use super::{keys, value, StateWrite};
use crate::ledger::{BalanceChanged, Book, Dirty};

/// The writes that persist what `dirty` names of `book` (a customer of partition `p`): a
/// projection or record that is gone becomes a deletion.
pub fn book_writes(p: i32, book: &Book, dirty: &BTreeSet<Dirty>) -> Vec<StateWrite> {
    let c = &book.customer;
    dirty
        .iter()
        .map(|d| {
            let (key, value) = match d {
                Dirty::Meter(name) => (
                    keys::meter(p, c, name),
                    book.meters.get(name).map(value::encode),
                ),
                Dirty::Event(id) => (
                    keys::event(p, c, id.as_str()),
                    book.events
                        .get(id)
                        .and_then(|r| r.as_ref())
                        .map(value::encode),
                ),
                Dirty::Grant(id) => (
                    keys::grant(p, c, id.as_str()),
                    book.grants
                        .get(id)
                        .and_then(|r| r.as_ref())
                        .map(value::encode),
                ),
            };
            StateWrite {
                partition: p,
                key,
                value,
            }
        })
        .collect()
}

/// The write that keeps `change` in its meter's history ring of `history_len` slots.
pub fn history_write(p: i32, change: &BalanceChanged, history_len: u32) -> StateWrite {
    let slot = (change.version % u64::from(history_len.max(1))) as u32;
    StateWrite {
        partition: p,
        key: keys::history(p, &change.customer_id, &change.meter, slot),
        value: Some(value::encode(change)),
    }
}
