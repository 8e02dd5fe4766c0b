//! The bytes of every key: the one place that knows them. Everything else asks this module.
//!
//! `p` = the partition as u16 big-endian; ids never contain NUL (validated at the edge):
//! - `S p 'm' customer NUL meter` -> a meter projection
//! - `S p 'e' customer NUL event_id` -> an event record
//! - `S p 'g' customer NUL grant_id` -> a grant record
//! - `S p 'h' customer NUL meter NUL slot(u32 BE)` -> a movement (a ring of `history_len`)
//! - `C p` -> the next changelog offset to read (i64 BE; local only, never in the changelog)

use crate::ledger::{CustomerId, MeterName};

const STATE: u8 = b'S';
const CHECKPOINT: u8 = b'C';

/// What a state key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Meter = b'm' as isize,
    Event = b'e' as isize,
    Grant = b'g' as isize,
    History = b'h' as isize,
}

/// `S p kind`: every key of one kind in partition `p`.
pub(super) fn kind_prefix(p: i32, kind: Kind) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.push(STATE);
    k.extend_from_slice(&(p as u16).to_be_bytes());
    k.push(kind as u8);
    k
}

/// `S p kind customer NUL`: every key of one kind of one customer.
pub(super) fn customer_prefix(p: i32, kind: Kind, customer: &CustomerId) -> Vec<u8> {
    let mut k = kind_prefix(p, kind);
    k.extend_from_slice(customer.as_str().as_bytes());
    k.push(0);
    k
}

fn with(mut k: Vec<u8>, tail: &[u8]) -> Vec<u8> {
    k.extend_from_slice(tail);
    k
}

/// The key of a meter projection.
pub(super) fn meter(p: i32, customer: &CustomerId, meter: &MeterName) -> Vec<u8> {
    with(
        customer_prefix(p, Kind::Meter, customer),
        meter.as_str().as_bytes(),
    )
}

/// The key of an event record.
pub(super) fn event(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    with(customer_prefix(p, Kind::Event, customer), id.as_bytes())
}

/// The key of a grant record.
pub(super) fn grant(p: i32, customer: &CustomerId, id: &str) -> Vec<u8> {
    with(customer_prefix(p, Kind::Grant, customer), id.as_bytes())
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

/// The key of a history slot (`version % history_len`).
pub(super) fn history(p: i32, customer: &CustomerId, meter: &MeterName, slot: u32) -> Vec<u8> {
    with(history_prefix(p, customer, meter), &slot.to_be_bytes())
}

/// The key of partition `p`'s checkpoint.
pub(super) fn checkpoint(p: i32) -> Vec<u8> {
    let mut k = vec![CHECKPOINT];
    k.extend_from_slice(&(p as u16).to_be_bytes());
    k
}

/// `[lo, hi)` covering every state key of partition `p`.
pub(super) fn partition_range(p: i32) -> (Vec<u8>, Vec<u8>) {
    let lo = kind_prefix(p, Kind::Meter)[..3].to_vec();
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

/// The partition of a state key, if it is one.
#[cfg(test)]
pub(super) fn partition_of(key: &[u8]) -> Option<i32> {
    match key {
        [STATE, a, b, ..] => Some(i32::from(u16::from_be_bytes([*a, *b]))),
        _ => None,
    }
}

/// Splits the rest of a key after a kind prefix at its first NUL: `(customer, tail)`.
pub(super) fn split_customer(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((&rest[..nul], &rest[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_their_partition_and_sort_by_customer() {
        let c = CustomerId::parse("cus").unwrap();
        let m = MeterName::parse("api").unwrap();
        for p in [0, 7, 65535] {
            for k in [
                meter(p, &c, &m),
                event(p, &c, "e"),
                grant(p, &c, "g"),
                history(p, &c, &m, 3),
            ] {
                assert_eq!(partition_of(&k), Some(p));
                let (lo, hi) = partition_range(p);
                assert!(lo <= k && k < hi);
            }
        }
        assert_eq!(partition_of(&checkpoint(3)), None);
        let pre = kind_prefix(2, Kind::Meter);
        let k = meter(2, &c, &m);
        assert_eq!(
            split_customer(&k[pre.len()..]),
            Some((&b"cus"[..], &b"api"[..]))
        );
    }
}
