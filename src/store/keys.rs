//! The bytes of every key: the one place that knows them. Everything else asks this module.
//!
//! `p` = the partition as u16 big-endian; ids never contain NUL (validated at the edge). State
//! keys start with `S p`, so a partition is one key range.
//!
//! | key | value | in the changelog |
//! |---|---|---|
//! | `S p 'b' customer` | the customer's book: every meter projection | yes |
//! | `S p 'g' customer NUL grant_id` | a grant record (idempotency, voids) | yes |
//! | `S p 'r' customer NUL reservation_id` | a reservation's first answer (expanded from the deltas) | no |
//! | `S p 'd' bucket(i64 BE) seq(u64 BE)` | a commit's delta of one time bucket | yes (locally an empty marker) |
//! | `S p 'm'` | the partition's meta (the dedupe horizon) | yes |
//! | `S p 'e' customer NUL event_id` | a usage id's record (expanded from the deltas) | no |
//! | `S p 'H' customer NUL meter NUL slot(u32 BE)` | a chunk of a meter's movements, a ring (from the deltas; see `history`) | no |
//! | `S p 'h' customer NUL meter NUL slot(u32 BE)` | a movement, before the chunks: only read to convert it | no |
//! | `S p 't' due(i64, order-preserving BE) customer NUL meter` | the due index: a meter's next time-driven change (derived from the books) | no |
//! | `C p` | the next changelog offset to read, then the partition's stream time (i64 BE each) | no |
//! | `V` | the store's state format (u8) | no |
//! | `I` | the version of the local indexes derived from the books (u8; see `due`) | no |
//! | `L` | the chunk slots per meter the history is kept in (u64 BE; see `history`) | no |

use crate::ledger::{CustomerId, MeterName};

const STATE: u8 = b'S';
const CHECKPOINT: u8 = b'C';

/// The key of the store's format version.
pub(super) const FORMAT: &[u8] = b"V";

/// The key of the version of the local indexes derived from the books (the due index).
pub(super) const LOCAL_INDEXES: &[u8] = b"I";

/// The key of the number of chunk slots per meter the history is kept in (see `history`).
pub(super) const HISTORY_SLOTS: &[u8] = b"L";

/// What a state key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Book = b'b' as isize,
    Grant = b'g' as isize,
    Reservation = b'r' as isize,
    Delta = b'd' as isize,
    Meta = b'm' as isize,
    Event = b'e' as isize,
    History = b'H' as isize,
    HistoryRing = b'h' as isize,
    Due = b't' as isize,
}

impl Kind {
    /// Every kind, in key order of their bytes' table above.
    pub(super) const ALL: [Kind; 9] = [
        Kind::Book,
        Kind::Grant,
        Kind::Reservation,
        Kind::Delta,
        Kind::Meta,
        Kind::Event,
        Kind::History,
        Kind::HistoryRing,
        Kind::Due,
    ];

    /// The kind of a state key.
    pub(super) fn of(key: &[u8]) -> Option<Kind> {
        match key {
            [STATE, _, _, k, ..] => Self::ALL.into_iter().find(|kind| *kind as u8 == *k),
            _ => None,
        }
    }

    /// The kind's name in metrics.
    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::Book => "book",
            Kind::Grant => "grant",
            Kind::Reservation => "reservation",
            Kind::Delta => "delta",
            Kind::Meta => "meta",
            Kind::Event => "event",
            Kind::History => "history",
            Kind::HistoryRing => "history_ring",
            Kind::Due => "due",
        }
    }
}

/// `S p kind`: every key of one kind in partition `p`.
pub(super) fn kind_prefix(p: i32, kind: Kind) -> Vec<u8> {
    let mut k = Vec::with_capacity(48);
    k.push(STATE);
    k.extend_from_slice(&(p as u16).to_be_bytes());
    k.push(kind as u8);
    k
}

/// `S p kind customer NUL`: every key of one kind of one customer.
fn customer_prefix(p: i32, kind: Kind, customer: &CustomerId) -> Vec<u8> {
    let mut k = kind_prefix(p, kind);
    k.extend_from_slice(customer.as_str().as_bytes());
    k.push(0);
    k
}

fn with(mut k: Vec<u8>, tail: &[u8]) -> Vec<u8> {
    k.extend_from_slice(tail);
    k
}

/// The key of a customer's book.
pub(super) fn book(p: i32, customer: &CustomerId) -> Vec<u8> {
    with(kind_prefix(p, Kind::Book), customer.as_str().as_bytes())
}

/// The customer of a book key.
pub(super) fn book_customer(key: &[u8]) -> &[u8] {
    &key[4..]
}

/// The key of an event record.
pub(super) fn event(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    with(customer_prefix(p, Kind::Event, customer), id.as_bytes())
}

/// The key of a grant record.
pub(super) fn grant(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    with(customer_prefix(p, Kind::Grant, customer), id.as_bytes())
}

/// The key of a reservation record.
pub(super) fn reservation(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    with(
        customer_prefix(p, Kind::Reservation, customer),
        id.as_bytes(),
    )
}

/// `S p 'h' customer NUL meter NUL`: every movement kept of one meter.
pub(super) fn history_prefix(p: i32, customer: &CustomerId, meter: &MeterName) -> Vec<u8> {
    let mut k = with(
        customer_prefix(p, Kind::History, customer),
        meter.as_str().as_bytes(),
    );
    k.push(0);
    k
}

/// The key of a history chunk slot.
pub(super) fn history(p: i32, customer: &CustomerId, meter: &MeterName, slot: u32) -> Vec<u8> {
    with(history_prefix(p, customer, meter), &slot.to_be_bytes())
}

/// For a history key, a chunk's (`S p 'H' customer NUL meter NUL slot`) or one of the history
/// before the chunks (`S p 'h' …`), the prefix of its meter's chunk keys
/// (`S p 'H' customer NUL meter NUL`).
pub(super) fn chunk_prefix(key: &[u8]) -> Option<Vec<u8>> {
    if !matches!(Kind::of(key), Some(Kind::History | Kind::HistoryRing)) || key.len() < 8 {
        return None;
    }
    let mut prefix = key[..key.len() - 4].to_vec();
    prefix[3] = Kind::History as u8;
    Some(prefix)
}

/// `S p 'd' bucket`: every delta of one time bucket.
pub(super) fn bucket_prefix(p: i32, bucket: i64) -> Vec<u8> {
    with(kind_prefix(p, Kind::Delta), &bucket.to_be_bytes())
}

/// The key of the delta `seq` of a time bucket (the bucket's start, ms).
pub(super) fn delta(p: i32, bucket: i64, seq: u64) -> Vec<u8> {
    with(bucket_prefix(p, bucket), &seq.to_be_bytes())
}

/// The (bucket, seq) of a delta key.
pub(super) fn delta_parts(key: &[u8]) -> Option<(i64, u64)> {
    let rest = key.get(4..20)?;
    let bucket = i64::from_be_bytes(rest[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(rest[8..16].try_into().ok()?);
    Some((bucket, seq))
}

/// `at` as bytes that sort as the number does (the sign bit flipped, big-endian).
fn ordered(at: i64) -> [u8; 8] {
    ((at as u64) ^ (1 << 63)).to_be_bytes()
}

/// `S p 't' at`: every due-index key of partition `p` at `at` or later sorts at or after it.
pub(super) fn due_from(p: i32, at: i64) -> Vec<u8> {
    with(kind_prefix(p, Kind::Due), &ordered(at))
}

/// The due-index key of meter `meter` of `customer`, due at `at`.
pub(super) fn due(p: i32, at: i64, customer: &CustomerId, meter: &MeterName) -> Vec<u8> {
    let mut k = due_from(p, at);
    k.extend_from_slice(customer.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(meter.as_str().as_bytes());
    k
}

/// The (due time, customer, meter) of a due-index key.
pub(super) fn due_parts(key: &[u8]) -> Option<(i64, &[u8], &[u8])> {
    let at = u64::from_be_bytes(key.get(4..12)?.try_into().ok()?) ^ (1 << 63);
    let rest = key.get(12..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((at as i64, &rest[..nul], &rest[nul + 1..]))
}

/// The key of partition `p`'s meta.
pub(super) fn meta(p: i32) -> Vec<u8> {
    kind_prefix(p, Kind::Meta)
}

/// The key of partition `p`'s checkpoint.
pub(super) fn checkpoint(p: i32) -> Vec<u8> {
    let mut k = vec![CHECKPOINT];
    k.extend_from_slice(&(p as u16).to_be_bytes());
    k
}

/// The prefix of every checkpoint key.
pub(super) fn checkpoint_prefix() -> [u8; 1] {
    [CHECKPOINT]
}

/// The partition of a checkpoint key.
pub(super) fn checkpoint_partition(key: &[u8]) -> Option<i32> {
    match key {
        [CHECKPOINT, hi, lo] => Some(u16::from_be_bytes([*hi, *lo]) as i32),
        _ => None,
    }
}

/// `[lo, hi)` covering every state key of partition `p`.
pub(super) fn partition_range(p: i32) -> (Vec<u8>, Vec<u8>) {
    let lo = kind_prefix(p, Kind::Book)[..3].to_vec();
    let hi = match (p as u16).checked_add(1) {
        Some(next) => {
            let mut hi = vec![STATE];
            hi.extend_from_slice(&next.to_be_bytes());
            hi
        }
        None => vec![STATE + 1],
    };
    (lo, hi)
}

/// `[lo, hi)` covering the keys of one kind of partition `p`.
pub(super) fn kind_range(p: i32, kind: Kind) -> (Vec<u8>, Vec<u8>) {
    let lo = kind_prefix(p, kind);
    let mut hi = lo.clone();
    *hi.last_mut().expect("non-empty") += 1;
    (lo, hi)
}

/// The partition of a state key, if it is one.
pub(super) fn partition_of(key: &[u8]) -> Option<i32> {
    match key {
        [STATE, a, b, ..] => Some(i32::from(u16::from_be_bytes([*a, *b]))),
        _ => None,
    }
}

/// The key of a movement in the history before the chunks (for tests of the conversion).
#[cfg(test)]
pub(super) fn ring(p: i32, customer: &CustomerId, meter: &MeterName, slot: u32) -> Vec<u8> {
    let mut k = history(p, customer, meter, slot);
    k[3] = Kind::HistoryRing as u8;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_their_partition_and_kind() {
        let c = CustomerId::parse("cus").unwrap();
        let m = MeterName::parse("api").unwrap();
        for p in [0, 7, 65535] {
            for (k, kind) in [
                (book(p, &c), Kind::Book),
                (event(p, &c, "e"), Kind::Event),
                (grant(p, &c, "g"), Kind::Grant),
                (reservation(p, &c, "r"), Kind::Reservation),
                (history(p, &c, &m, 3), Kind::History),
                (ring(p, &c, &m, 3), Kind::HistoryRing),
                (delta(p, 5, 9), Kind::Delta),
                (meta(p), Kind::Meta),
                (due(p, -5, &c, &m), Kind::Due),
            ] {
                assert_eq!(partition_of(&k), Some(p));
                assert_eq!(Kind::of(&k), Some(kind));
                let (lo, hi) = partition_range(p);
                assert!(lo <= k && k < hi);
                let (lo, hi) = kind_range(p, kind);
                assert!(lo <= k && k < hi);
            }
        }
        assert_eq!(partition_of(&checkpoint(3)), None);
        assert_eq!(Kind::of(&checkpoint(3)), None);
        assert_eq!(delta_parts(&delta(2, 1_000, 7)), Some((1_000, 7)));
        assert!(delta(2, 1_000, 7) < delta(2, 1_000, 8) && delta(2, 1_000, 8) < delta(2, 2_000, 0));
        assert_eq!(book_customer(&book(2, &c)), b"cus");
        for key in [ring(2, &c, &m, 3), history(2, &c, &m, 3)] {
            assert_eq!(chunk_prefix(&key), Some(history_prefix(2, &c, &m)));
        }
        assert_eq!(chunk_prefix(&book(2, &c)), None);
    }

    #[test]
    fn due_keys_sort_by_time_and_read_back() {
        let c = CustomerId::parse("cus").unwrap();
        let m = MeterName::parse("api").unwrap();
        let times = [i64::MIN, -1_000, -1, 0, 1, 1_000, i64::MAX];
        for w in times.windows(2) {
            assert!(due(3, w[0], &c, &m) < due(3, w[1], &c, &m));
            assert!(due_from(3, w[1]) > due(3, w[0], &c, &m));
            assert!(due_from(3, w[1]) <= due(3, w[1], &c, &m));
        }
        for at in times {
            let k = due(3, at, &c, &m);
            assert_eq!(due_parts(&k), Some((at, &b"cus"[..], &b"api"[..])));
        }
    }
}
