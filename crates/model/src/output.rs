//! What the rules emit.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Why a meter changed (in the order a grant's life goes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// A grant arrived and is active.
    Grant,
    /// A grant arrived that becomes active later.
    GrantScheduled,
    /// A pending grant became active.
    Activated,
    /// Usage drew it down.
    Usage,
    /// A grant's remainder was forfeited at its expiry (or on arrival, already expired).
    Expired,
    /// A cycle ended: remainders beyond the rollover caps were forfeited.
    CycleEnd,
    /// A grant was voided.
    VoidGrant,
    /// A usage event was voided.
    VoidUsage,
    /// A reservation holds units.
    Reserved,
    /// Usage settled a reservation.
    Settled,
    /// A reservation was released.
    Released,
    /// A reservation's ttl ran out.
    ReservationExpired,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 12] = [
        Reason::Grant,
        Reason::GrantScheduled,
        Reason::Activated,
        Reason::Usage,
        Reason::Expired,
        Reason::CycleEnd,
        Reason::VoidGrant,
        Reason::VoidUsage,
        Reason::Reserved,
        Reason::Settled,
        Reason::Released,
        Reason::ReservationExpired,
    ];

    /// The label on the `balance-changed` topic, and a one-letter code for compact logs of
    /// versions.
    fn names(self) -> (&'static str, char) {
        match self {
            Reason::Grant => ("grant", 'g'),
            Reason::GrantScheduled => ("grant_scheduled", 's'),
            Reason::Activated => ("activated", 'a'),
            Reason::Usage => ("usage", 'u'),
            Reason::Expired => ("expired", 'x'),
            Reason::CycleEnd => ("cycle_end", 'c'),
            Reason::VoidGrant => ("void_grant", 'w'),
            Reason::VoidUsage => ("void_usage", 'v'),
            Reason::Reserved => ("reserved", 'r'),
            Reason::Settled => ("settled", 't'),
            Reason::Released => ("released", 'l'),
            Reason::ReservationExpired => ("reservation_expired", 'e'),
        }
    }

    /// The label on the `balance-changed` topic.
    pub fn label(self) -> &'static str {
        self.names().0
    }

    /// A one-letter code (`g s a u x c w v r t l e`), for compact logs of versions.
    pub fn letter(self) -> char {
        self.names().1
    }

    /// The reason with this label.
    pub fn from_label(label: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.label() == label)
    }

    /// The reason with this letter.
    pub fn from_letter(letter: char) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.letter() == letter)
    }
}

/// One change of a meter (a version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Whose.
    pub customer: String,
    /// Which meter.
    pub meter: String,
    /// The meter's version after it.
    pub version: u64,
    /// Balance after minus balance before.
    pub delta: Decimal,
    /// Why.
    pub reason: Reason,
    /// The event or grant id that caused it.
    pub cause: String,
    /// Balance after.
    pub balance: Decimal,
    /// Credited after.
    pub credited: Decimal,
    /// Consumed after.
    pub consumed: Decimal,
    /// Overage after.
    pub overage: Decimal,
    /// Blocked after.
    pub blocked: Decimal,
    /// Processing time (ms).
    pub at: i64,
}

/// The kind of a [`Transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransitionKind {
    /// Crossed from > 0 to <= 0.
    Exhausted,
    /// Back above 0 after an exhaustion.
    Restored,
    /// Crossed below a low threshold.
    Low,
}

impl TransitionKind {
    /// The label on the `balance-exhausted` topic.
    pub fn label(self) -> &'static str {
        match self {
            TransitionKind::Exhausted => "exhausted",
            TransitionKind::Restored => "restored",
            TransitionKind::Low => "low",
        }
    }
}

/// A crossing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Exhausted, restored or low.
    pub kind: TransitionKind,
    /// Whose.
    pub customer: String,
    /// Which meter.
    pub meter: String,
    /// The version of the change that crossed.
    pub version: u64,
    /// Balance after that change.
    pub balance: Decimal,
    /// The threshold crossed (low only).
    pub threshold: Option<Decimal>,
    /// The event or grant id that caused it.
    pub cause: String,
    /// Processing time (ms).
    pub at: i64,
}

/// An automatic top-up request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUp {
    /// `auto:<customer>:<meter>:<version>` (see [`auto_top_up_request_id`]).
    pub request_id: String,
    /// Whose.
    pub customer: String,
    /// Which meter.
    pub meter: String,
    /// The pack asked for.
    pub pack: String,
    /// Processing time (ms).
    pub at: i64,
    /// Balance after the change that crossed.
    pub balance: Decimal,
    /// The `below` threshold crossed.
    pub threshold: Decimal,
}

/// One output, in the order the rules emit them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// A change (a version).
    Changed(Change),
    /// A crossing.
    Transition(Transition),
    /// An automatic top-up request.
    TopUp(TopUp),
}

/// The longest id (bytes) the service accepts.
pub(crate) const MAX_ID_BYTES: usize = 200;

/// `auto:<customer>:<meter>:<version>`; when that is longer than an id may be (200 bytes),
/// `auto:<hex of the first 16 bytes of SHA-256(customer NUL meter)>:<version>`.
pub fn auto_top_up_request_id(customer: &str, meter: &str, version: u64) -> String {
    let full = format!("auto:{customer}:{meter}:{version}");
    if full.len() <= MAX_ID_BYTES {
        return full;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{customer}\0{meter}").as_bytes());
    format!("auto:{}:{version}", hex::encode(&digest[..16]))
}
