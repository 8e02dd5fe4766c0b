//! How values are encoded: one byte of state format ([`FORMAT`]), then a protobuf message of
//! `proto/drawdown/state/v2/state.proto`. Decimals are rust_decimal's exact 16 bytes. A value
//! of another format is refused ([`StoreError::Format`]), never guessed at.

use prost::Message;
use rust_decimal::Decimal;

use super::StoreError;
use crate::ledger::{
    BalanceChanged, CustomerId, EventRecord, GrantId, GrantKind, GrantRecord, GrantSlot, Hold,
    MeterDraw, MeterName, MeterState, Reason, ReservationId, ReservationOutcome, ReservationRecord,
};

/// The generated state messages.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/drawdown.state.v2.rs"));
}

/// The state format this build writes and reads.
pub const FORMAT: u8 = 2;

fn corrupt(key: &[u8], message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).escape_default().to_string(),
        message: message.into(),
    }
}

/// Checks the format byte of a stored value.
pub(super) fn check(key: &[u8], v: &[u8]) -> Result<(), StoreError> {
    match v.first() {
        Some(&FORMAT) => Ok(()),
        Some(&found) => Err(StoreError::Format {
            key: String::from_utf8_lossy(key).escape_default().to_string(),
            found,
        }),
        None => Err(corrupt(key, "empty value")),
    }
}

/// Encodes a message with the format byte.
pub(super) fn encode<M: Message>(m: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + m.encoded_len());
    out.push(FORMAT);
    m.encode(&mut out).expect("a Vec grows");
    out
}

/// An already encoded message with the format byte in front.
pub(super) fn with_format(encoded: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + encoded.len());
    out.push(FORMAT);
    out.extend_from_slice(encoded);
    out
}

/// Decodes a message without the format byte (one held inside a value, e.g. a delta's
/// movements) found at `key`.
pub(super) fn decode_bare<M: Message + Default>(key: &[u8], v: &[u8]) -> Result<M, StoreError> {
    M::decode(v).map_err(|e| corrupt(key, e.to_string()))
}

/// Decodes a message stored at `key`.
pub(super) fn decode<M: Message + Default>(key: &[u8], v: &[u8]) -> Result<M, StoreError> {
    check(key, v)?;
    M::decode(&v[1..]).map_err(|e| corrupt(key, e.to_string()))
}

fn dec(d: Decimal) -> Option<pb::Dec> {
    if d.is_zero() {
        return None;
    }
    let b = d.serialize();
    Some(pb::Dec {
        lo: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        hi: u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
    })
}

fn undec(key: &[u8], d: &Option<pb::Dec>) -> Result<Decimal, StoreError> {
    let Some(d) = d else {
        return Ok(Decimal::ZERO);
    };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.lo.to_le_bytes());
    b[8..].copy_from_slice(&d.hi.to_le_bytes());
    // Flags: bits 16-23 the scale (<= 28), bit 31 the sign, nothing else.
    let flags = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if flags & 0x7F00_FFFF != 0 || (flags >> 16) & 0xFF > 28 {
        return Err(corrupt(key, "not a decimal"));
    }
    Ok(Decimal::deserialize(b))
}

fn id<T>(key: &[u8], parsed: Result<T, crate::ledger::LedgerError>) -> Result<T, StoreError> {
    parsed.map_err(|e| corrupt(key, e.to_string()))
}

/// A meter name read from a stored record. Names are few (the configured meters), so this
/// thread keeps the ones it has read and hands out shared copies: a decoded book then allocates
/// no name (a million cached books would otherwise hold three million copies of a few names).
fn meter_name(key: &[u8], name: &str) -> Result<MeterName, StoreError> {
    /// More distinct names than this (meters removed from the config and such) are parsed anew.
    const KEPT: usize = 64;
    thread_local! {
        static NAMES: std::cell::RefCell<Vec<MeterName>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    NAMES.with_borrow_mut(|names| {
        if let Some(n) = names.iter().find(|n| n.as_str() == name) {
            return Ok(n.clone());
        }
        let n = id(key, MeterName::parse(name))?;
        if names.len() < KEPT {
            names.push(n.clone());
        }
        Ok(n)
    })
}

fn kind_code(k: GrantKind) -> u32 {
    match k {
        GrantKind::Cycle => 0,
        GrantKind::TopUp => 1,
        GrantKind::Adjustment => 2,
    }
}

fn slot_to(g: &GrantSlot) -> pb::GrantSlot {
    pb::GrantSlot {
        id: g.id.to_string(),
        kind: kind_code(g.kind),
        priority: u32::from(g.priority),
        effective_at: g.effective_at,
        expires_at: g.expires_at,
        subscription_id: g.subscription_id.clone(),
        rollover: dec(g.rollover),
        amount: dec(g.amount),
        remaining: dec(g.remaining),
        active: g.active,
        cycle_ended: g.cycle_ended,
    }
}

fn slot_from(key: &[u8], g: pb::GrantSlot) -> Result<GrantSlot, StoreError> {
    Ok(GrantSlot {
        id: id(key, GrantId::parse(g.id))?,
        kind: match g.kind {
            0 => GrantKind::Cycle,
            1 => GrantKind::TopUp,
            2 => GrantKind::Adjustment,
            k => return Err(corrupt(key, format!("grant kind {k}"))),
        },
        priority: u8::try_from(g.priority).map_err(|_| corrupt(key, "priority"))?,
        effective_at: g.effective_at,
        expires_at: g.expires_at,
        subscription_id: g.subscription_id,
        rollover: undec(key, &g.rollover)?,
        amount: undec(key, &g.amount)?,
        remaining: undec(key, &g.remaining)?,
        active: g.active,
        cycle_ended: g.cycle_ended,
    })
}

/// A meter projection as a message.
pub(super) fn meter_to(name: &MeterName, s: &MeterState) -> pb::MeterState {
    pb::MeterState {
        meter: name.to_string(),
        version: s.version,
        credited: dec(s.credited),
        consumed: dec(s.consumed),
        expired: dec(s.expired),
        voided: dec(s.voided),
        overage: dec(s.overage),
        blocked: dec(s.blocked),
        debt: dec(s.debt),
        cycle_credited: dec(s.cycle_credited),
        grants: s.grants.iter().map(slot_to).collect(),
        exhausted: s.exhausted,
        low_fired: s.low_fired,
        auto_top_up_fired: s.auto_top_up_fired,
        updated_at: s.updated_at,
        burn: dec(s.burn),
        burn_at: s.burn_at,
        forecast_fired: s.forecast_fired,
        holds: s
            .holds
            .iter()
            .map(|h| pb::Hold {
                id: h.id.to_string(),
                units: dec(h.units),
                expires_at: h.expires_at,
            })
            .collect(),
        reserved: dec(s.reserved),
    }
}

/// A meter projection from a message.
pub(super) fn meter_from(
    key: &[u8],
    m: pb::MeterState,
) -> Result<(MeterName, MeterState), StoreError> {
    let name = meter_name(key, &m.meter)?;
    let state = MeterState {
        version: m.version,
        credited: undec(key, &m.credited)?,
        consumed: undec(key, &m.consumed)?,
        expired: undec(key, &m.expired)?,
        voided: undec(key, &m.voided)?,
        overage: undec(key, &m.overage)?,
        blocked: undec(key, &m.blocked)?,
        debt: undec(key, &m.debt)?,
        cycle_credited: undec(key, &m.cycle_credited)?,
        grants: m
            .grants
            .into_iter()
            .map(|g| slot_from(key, g))
            .collect::<Result<_, _>>()?,
        exhausted: m.exhausted,
        low_fired: m.low_fired,
        auto_top_up_fired: m.auto_top_up_fired,
        updated_at: m.updated_at,
        burn: undec(key, &m.burn)?,
        burn_at: m.burn_at,
        forecast_fired: m.forecast_fired,
        holds: m
            .holds
            .into_iter()
            .map(|h| {
                Ok(Hold {
                    id: id(key, ReservationId::parse(h.id))?,
                    units: undec(key, &h.units)?,
                    expires_at: h.expires_at,
                })
            })
            .collect::<Result<_, StoreError>>()?,
        reserved: undec(key, &m.reserved)?,
    };
    Ok((name, state))
}

/// A grant record as a message.
pub(super) fn grant_to(r: &GrantRecord) -> pb::GrantRecord {
    pb::GrantRecord {
        meter: r.meter.to_string(),
        at: r.at,
        voided: r.voided,
    }
}

/// A grant record from a message.
pub(super) fn grant_from(key: &[u8], r: pb::GrantRecord) -> Result<GrantRecord, StoreError> {
    Ok(GrantRecord {
        meter: meter_name(key, &r.meter)?,
        at: r.at,
        voided: r.voided,
    })
}

/// A reservation record as a message.
pub(super) fn reservation_to(r: &ReservationRecord) -> pb::ReservationRecord {
    pb::ReservationRecord {
        meter: r.meter.to_string(),
        units: dec(r.units),
        expires_at: r.expires_at,
        at: r.at,
        outcome: match r.outcome {
            ReservationOutcome::Held => 0,
            ReservationOutcome::Insufficient => 1,
            ReservationOutcome::TooMany => 2,
        },
    }
}

/// The end of the hold of a stored reservation record (its value, format byte first), for the
/// compaction filter; `None` if it cannot tell.
pub(super) fn reservation_ends(v: &[u8]) -> Option<i64> {
    match v.split_first() {
        Some((&FORMAT, rest)) => pb::ReservationRecord::decode(rest)
            .ok()
            .map(|r| r.expires_at),
        _ => None,
    }
}

/// A reservation record from a message.
pub(super) fn reservation_from(
    key: &[u8],
    r: pb::ReservationRecord,
) -> Result<ReservationRecord, StoreError> {
    Ok(ReservationRecord {
        meter: meter_name(key, &r.meter)?,
        units: undec(key, &r.units)?,
        expires_at: r.expires_at,
        at: r.at,
        outcome: match r.outcome {
            0 => ReservationOutcome::Held,
            1 => ReservationOutcome::Insufficient,
            2 => ReservationOutcome::TooMany,
            _ => return Err(corrupt(key, "unknown reservation outcome")),
        },
    })
}

/// An event record as a message (the reference of the hand-written encoding).
#[cfg(test)]
fn event_to(r: &EventRecord) -> pb::EventRecord {
    pb::EventRecord {
        at: r.at,
        draws: r
            .draws
            .iter()
            .map(|d| pb::MeterDraw {
                meter: d.meter.to_string(),
                grants: d
                    .grants
                    .iter()
                    .map(|(g, u)| pb::GrantDraw {
                        grant_id: g.to_string(),
                        units: dec(*u),
                    })
                    .collect(),
                debt: dec(d.debt),
                blocked: dec(d.blocked),
            })
            .collect(),
        voided: r.voided,
    }
}

/// An event record from a message.
pub(super) fn event_from(key: &[u8], r: pb::EventRecord) -> Result<EventRecord, StoreError> {
    let mut draws = Vec::with_capacity(r.draws.len());
    for d in r.draws {
        let mut grants = Vec::with_capacity(d.grants.len());
        for g in d.grants {
            grants.push((id(key, GrantId::parse(g.grant_id))?, undec(key, &g.units)?));
        }
        draws.push(MeterDraw {
            meter: meter_name(key, &d.meter)?,
            grants,
            debt: undec(key, &d.debt)?,
            blocked: undec(key, &d.blocked)?,
        });
    }
    Ok(EventRecord {
        at: r.at,
        draws,
        voided: r.voided,
    })
}

/// Hand-written protobuf encoding of the two messages written per event (`Change`,
/// `EventRecord`), straight from the ledger's types: the same bytes as `change_to(..)` /
/// `event_to(..)` then `encode_to_vec()` (the tests hold them together), without building the
/// message's owned strings first.
mod wire {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
    use rust_decimal::Decimal;

    use crate::ledger::{BalanceChanged, EventRecord, MeterDraw};

    fn halves(d: Decimal) -> (u64, u64) {
        let b = d.serialize();
        (
            u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
        )
    }

    fn dec_len(d: Decimal) -> usize {
        if d.is_zero() {
            return 0;
        }
        let (lo, hi) = halves(d);
        let inner = usize::from(lo != 0) * 9 + usize::from(hi != 0) * 9;
        1 + encoded_len_varint(inner as u64) + inner
    }

    fn dec(tag: u32, d: Decimal, out: &mut Vec<u8>) {
        if d.is_zero() {
            return;
        }
        let (lo, hi) = halves(d);
        let inner = usize::from(lo != 0) * 9 + usize::from(hi != 0) * 9;
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(inner as u64, out);
        for (t, half) in [(1, lo), (2, hi)] {
            if half != 0 {
                encode_key(t, WireType::SixtyFourBit, out);
                out.extend_from_slice(&half.to_le_bytes());
            }
        }
    }

    fn str_len(tag: u32, s: &str) -> usize {
        bytes_len(tag, s.as_bytes())
    }

    fn string(tag: u32, s: &str, out: &mut Vec<u8>) {
        bytes(tag, s.as_bytes(), out);
    }

    fn varint(tag: u32, v: u64, out: &mut Vec<u8>) {
        if v != 0 {
            encode_key(tag, WireType::Varint, out);
            encode_varint(v, out);
        }
    }

    /// A `Change`.
    pub(in crate::store) fn change(c: &BalanceChanged) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + c.cause_id.len());
        string(1, c.customer_id.as_str(), &mut out);
        string(2, c.meter.as_str(), &mut out);
        varint(3, c.version, &mut out);
        dec(4, c.delta, &mut out);
        string(5, c.reason.as_str(), &mut out);
        string(6, &c.cause_id, &mut out);
        dec(7, c.balance, &mut out);
        dec(8, c.credited, &mut out);
        dec(9, c.consumed, &mut out);
        dec(10, c.overage, &mut out);
        dec(11, c.blocked, &mut out);
        varint(12, c.at as u64, &mut out);
        dec(13, c.reserved, &mut out);
        dec(14, c.available, &mut out);
        out
    }

    fn draw_len(d: &MeterDraw) -> usize {
        let grants: usize = d
            .grants
            .iter()
            .map(|(g, u)| {
                let inner = str_len(1, g.as_str()) + dec_len(*u);
                1 + encoded_len_varint(inner as u64) + inner
            })
            .sum();
        str_len(1, d.meter.as_str()) + grants + dec_len(d.debt) + dec_len(d.blocked)
    }

    /// An `EventRecord`.
    #[cfg(test)]
    pub(in crate::store) fn event(r: &EventRecord) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        event_into(r, &mut out);
        out
    }

    /// An `EventRecord` as a stored value (the format byte, then the message).
    pub(in crate::store) fn event_value(r: &EventRecord) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(super::FORMAT);
        event_into(r, &mut out);
        out
    }

    fn event_into(r: &EventRecord, out: &mut Vec<u8>) {
        varint(1, r.at as u64, out);
        for d in &r.draws {
            encode_key(2, WireType::LengthDelimited, out);
            encode_varint(draw_len(d) as u64, out);
            string(1, d.meter.as_str(), out);
            for (g, u) in &d.grants {
                encode_key(2, WireType::LengthDelimited, out);
                let inner = str_len(1, g.as_str()) + dec_len(*u);
                encode_varint(inner as u64, out);
                string(1, g.as_str(), out);
                dec(2, *u, out);
            }
            dec(3, d.debt, out);
            dec(4, d.blocked, out);
        }
        if r.voided {
            encode_key(3, WireType::Varint, out);
            out.push(1);
        }
    }

    /// A `string` or `bytes` field (left out when empty, as prost does).
    fn bytes_len(tag: u32, b: &[u8]) -> usize {
        if b.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(b.len() as u64) + b.len()
        }
    }

    fn bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
        if !b.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(b.len() as u64, out);
            out.extend_from_slice(b);
        }
    }

    /// A `Delta` value (the format byte, then the message) written entry by entry as a commit
    /// makes them, so no `pb::Delta` with owned strings is built and then copied. Repeated
    /// fields may interleave on the wire (`events`, `changes`, `reservations` each keep their
    /// order), and `stream_time` comes last: prost decodes it into the same message.
    #[derive(Debug)]
    pub(in crate::store) struct DeltaValue(Vec<u8>);

    impl Default for DeltaValue {
        fn default() -> Self {
            let mut out = Vec::with_capacity(1024);
            out.push(super::FORMAT);
            Self(out)
        }
    }

    impl DeltaValue {
        /// Bytes so far, the format byte included.
        pub(in crate::store) fn len(&self) -> usize {
            self.0.len()
        }

        /// Whether no entry was written.
        pub(in crate::store) fn is_empty(&self) -> bool {
            self.0.len() <= 1
        }

        /// The encoded size of an id entry (a `DeltaEvent` or a `DeltaReservation`).
        pub(in crate::store) fn id_entry_len(customer: &str, id: &str, record: &[u8]) -> usize {
            let inner = str_len(1, customer) + str_len(2, id) + bytes_len(3, record);
            1 + encoded_len_varint(inner as u64) + inner
        }

        fn id_entry(&mut self, tag: u32, customer: &str, id: &str, record: &[u8]) {
            let out = &mut self.0;
            let inner = str_len(1, customer) + str_len(2, id) + bytes_len(3, record);
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(inner as u64, out);
            string(1, customer, out);
            string(2, id, out);
            bytes(3, record, out);
        }

        /// A `DeltaEvent`: a usage id and its encoded `EventRecord`.
        pub(in crate::store) fn event(&mut self, customer: &str, id: &str, record: &[u8]) {
            self.id_entry(1, customer, id, record);
        }

        /// A `DeltaReservation`: a reservation id and its encoded `ReservationRecord`.
        pub(in crate::store) fn reservation(&mut self, customer: &str, id: &str, record: &[u8]) {
            self.id_entry(4, customer, id, record);
        }

        /// An encoded `Change` (an element of `changes`: written even if empty).
        pub(in crate::store) fn change(&mut self, msg: &[u8]) {
            encode_key(2, WireType::LengthDelimited, &mut self.0);
            encode_varint(msg.len() as u64, &mut self.0);
            self.0.extend_from_slice(msg);
        }

        /// The value, with the partition's stream time.
        pub(in crate::store) fn finish(mut self, stream_time: i64) -> Vec<u8> {
            varint(3, stream_time as u64, &mut self.0);
            self.0
        }
    }
}

#[cfg(test)]
pub(super) use wire::event as encode_event;
pub(super) use wire::{change as encode_change, event_value as encode_event_value, DeltaValue};

/// A balance change as a message (the reference of the hand-written encoding).
#[cfg(test)]
fn change_to(c: &BalanceChanged) -> pb::Change {
    pb::Change {
        customer: c.customer_id.to_string(),
        meter: c.meter.to_string(),
        version: c.version,
        delta: dec(c.delta),
        reason: c.reason.as_str().to_string(),
        cause_id: c.cause_id.clone(),
        balance: dec(c.balance),
        credited: dec(c.credited),
        consumed: dec(c.consumed),
        overage: dec(c.overage),
        blocked: dec(c.blocked),
        at: c.at,
        reserved: dec(c.reserved),
        available: dec(c.available),
    }
}

/// A balance change from a message.
pub(super) fn change_from(key: &[u8], c: pb::Change) -> Result<BalanceChanged, StoreError> {
    Ok(BalanceChanged {
        customer_id: id(key, CustomerId::parse(c.customer))?,
        meter: meter_name(key, &c.meter)?,
        version: c.version,
        delta: undec(key, &c.delta)?,
        reason: Reason::from_label(&c.reason)
            .ok_or_else(|| corrupt(key, format!("reason {:?}", c.reason)))?,
        cause_id: c.cause_id,
        balance: undec(key, &c.balance)?,
        credited: undec(key, &c.credited)?,
        consumed: undec(key, &c.consumed)?,
        overage: undec(key, &c.overage)?,
        blocked: undec(key, &c.blocked)?,
        reserved: undec(key, &c.reserved)?,
        available: match c.available {
            Some(_) => undec(key, &c.available)?,
            // Written before reservations: nothing was held, all of the balance was available.
            None => undec(key, &c.balance)? - undec(key, &c.reserved)?,
        },
        at: c.at,
        // The history keeps the movement, not how its input arrived.
        late: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decimals_round_trip_exactly(m in any::<i64>(), scale in 0u32..=28) {
            let d = Decimal::new(m, scale);
            prop_assert_eq!(undec(b"k", &dec(d)).unwrap(), d);
        }
    }

    proptest! {
        #[test]
        fn the_hand_written_encodings_are_prost_s(
            m in any::<i64>(), scale in 0u32..=9, version in any::<u64>(), at in any::<i64>(),
            cause in "[a-z0-9:-]{0,20}", voided in any::<bool>(), draws in 0usize..3,
        ) {
            use crate::ledger::{CustomerId, GrantId, MeterDraw, MeterName};
            let d = Decimal::new(m, scale);
            let c = BalanceChanged {
                customer_id: CustomerId::parse("cus-1").unwrap(),
                meter: MeterName::parse("api").unwrap(),
                version,
                delta: -d,
                reason: Reason::Usage,
                cause_id: cause.clone(),
                balance: d,
                credited: Decimal::ZERO,
                consumed: d * Decimal::from(3),
                overage: Decimal::ONE,
                blocked: Decimal::ZERO,
                reserved: d,
                available: Decimal::ZERO,
                at,
                late: false,
            };
            prop_assert_eq!(encode_change(&c), change_to(&c).encode_to_vec());
            let r = EventRecord {
                at,
                draws: (0..draws)
                    .map(|i| MeterDraw {
                        meter: MeterName::parse(format!("m{i}")).unwrap(),
                        grants: (0..i)
                            .map(|j| (GrantId::parse(format!("g{j}")).unwrap(), d))
                            .collect(),
                        debt: Decimal::from(i),
                        blocked: d,
                    })
                    .collect(),
                voided,
            };
            prop_assert_eq!(encode_event(&r), event_to(&r).encode_to_vec());
            prop_assert_eq!(encode_event_value(&r), with_format(&encode_event(&r)));
        }
    }

    proptest! {
        #[test]
        fn a_delta_written_entry_by_entry_decodes_as_prost_s_message(
            entries in proptest::collection::vec(
                (0u8..3, "[a-z0-9-]{0,12}", "[a-z0-9:-]{0,12}", proptest::collection::vec(any::<u8>(), 0..40)),
                0..30,
            ),
            stream_time in any::<i64>(),
        ) {
            let (mut written, mut expected) = (DeltaValue::default(), pb::Delta::default());
            for (kind, customer, id, record) in entries {
                let before = written.len();
                match kind {
                    0 => {
                        written.event(&customer, &id, &record);
                        prop_assert_eq!(written.len() - before, DeltaValue::id_entry_len(&customer, &id, &record));
                        expected.events.push(pb::DeltaEvent { customer, event_id: id, record });
                    }
                    1 => {
                        written.reservation(&customer, &id, &record);
                        prop_assert_eq!(written.len() - before, DeltaValue::id_entry_len(&customer, &id, &record));
                        expected.reservations.push(pb::DeltaReservation { customer, reservation_id: id, record });
                    }
                    _ => {
                        written.change(&record);
                        expected.changes.push(record);
                    }
                }
            }
            expected.stream_time = stream_time;
            let value = written.finish(stream_time);
            prop_assert_eq!(decode::<pb::Delta>(b"k", &value).unwrap(), expected);
        }
    }

    #[test]
    fn holds_burn_and_reservation_records_read_back_as_written() {
        use crate::ledger::{Hold, MeterName, ReservationId};
        let name = MeterName::parse("tokens").unwrap();
        let state = MeterState {
            version: 7,
            burn: "123.456789012345".parse().unwrap(),
            burn_at: 1_767_225_600_000,
            forecast_fired: true,
            reserved: Decimal::from(45),
            holds: vec![
                Hold {
                    id: ReservationId::parse("r1").unwrap(),
                    units: Decimal::from(30),
                    expires_at: 1_767_225_660_000,
                },
                Hold {
                    id: ReservationId::parse("r2").unwrap(),
                    units: Decimal::from(15),
                    expires_at: 1_767_225_700_000,
                },
            ],
            ..MeterState::default()
        };
        let msg = meter_to(&name, &state);
        let bytes = encode(&msg);
        let back = meter_from(b"k", decode(b"k", &bytes).unwrap()).unwrap();
        assert_eq!(back, (name.clone(), state));
        for outcome in [
            ReservationOutcome::Held,
            ReservationOutcome::Insufficient,
            ReservationOutcome::TooMany,
        ] {
            let r = ReservationRecord {
                meter: name.clone(),
                units: "2.5".parse().unwrap(),
                expires_at: 9,
                at: 3,
                outcome,
            };
            let bytes = encode(&reservation_to(&r));
            assert_eq!(
                reservation_from(b"k", decode(b"k", &bytes).unwrap()).unwrap(),
                r
            );
        }
        let mut bad = reservation_to(&ReservationRecord {
            meter: name,
            units: Decimal::ONE,
            expires_at: 0,
            at: 0,
            outcome: ReservationOutcome::Held,
        });
        bad.outcome = 9;
        assert!(reservation_from(b"k", bad).is_err());
    }

    #[test]
    fn other_formats_are_refused_by_name() {
        let v = encode(&pb::PartitionMeta { horizon: 5 });
        assert_eq!(v[0], FORMAT);
        assert_eq!(decode::<pb::PartitionMeta>(b"k", &v).unwrap().horizon, 5);
        let json = br#"{"version":1}"#;
        match decode::<pb::PartitionMeta>(b"k", json) {
            Err(StoreError::Format { found, .. }) => assert_eq!(found, b'{'),
            other => panic!("{other:?}"),
        }
        assert!(undec(
            b"k",
            &Some(pb::Dec {
                lo: u64::MAX,
                hi: 0
            })
        )
        .is_err());
    }
}
