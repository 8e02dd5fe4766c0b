//! The outputs of the rules: balance changes, transitions and automatic top-up requests.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{CustomerId, MeterName, MAX_ID_LEN};

/// Why a projection changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Usage drew it down.
    Usage,
    /// A grant arrived and is active.
    Grant,
    /// A grant arrived that becomes active later.
    GrantScheduled,
    /// A pending grant became active.
    Activated,
    /// A grant's remainder expired.
    Expired,
    /// A cycle ended and a previous cycle grant's remainder beyond its rollover was forfeited.
    CycleEnd,
    /// A usage event was voided.
    VoidUsage,
    /// A grant was voided.
    VoidGrant,
    /// A reservation now holds units (the balance is unchanged, `available` drops).
    Reserved,
    /// Usage settled a reservation: it drew its real amount and the hold ended.
    Settled,
    /// A reservation was released without usage.
    Released,
    /// A reservation's ttl ran out.
    ReservationExpired,
}

impl Reason {
    /// Every reason.
    pub const ALL: [Reason; 12] = [
        Reason::Usage,
        Reason::Grant,
        Reason::GrantScheduled,
        Reason::Activated,
        Reason::Expired,
        Reason::CycleEnd,
        Reason::VoidUsage,
        Reason::VoidGrant,
        Reason::Reserved,
        Reason::Settled,
        Reason::Released,
        Reason::ReservationExpired,
    ];

    /// The reason with this label ([`Reason::as_str`]).
    pub fn from_label(label: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == label)
    }

    /// The label used on topics and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Usage => "usage",
            Reason::Grant => "grant",
            Reason::GrantScheduled => "grant_scheduled",
            Reason::Activated => "activated",
            Reason::Expired => "expired",
            Reason::CycleEnd => "cycle_end",
            Reason::VoidUsage => "void_usage",
            Reason::VoidGrant => "void_grant",
            Reason::Reserved => "reserved",
            Reason::Settled => "settled",
            Reason::Released => "released",
            Reason::ReservationExpired => "reservation_expired",
        }
    }
}

/// One change of a projection: published on `balance-changed` and kept in the meter's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceChanged {
    /// Whose.
    pub customer_id: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// The projection's version after this change.
    pub version: u64,
    /// Change of the balance.
    pub delta: Decimal,
    /// Why.
    pub reason: Reason,
    /// The event or grant id that caused it.
    pub cause_id: String,
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
    /// Units held by reservations after.
    #[serde(default)]
    pub reserved: Decimal,
    /// `balance - reserved` after: what may still be used or reserved without touching a hold.
    #[serde(default)]
    pub available: Decimal,
    /// The time the change applies at (ms): the event time of the input that caused it, or the
    /// stream time (see the `kafka::pipeline::stream_time` docs).
    pub at: i64,
    /// Caused by an input later than `pipeline.grace`, applied at stream time instead of its
    /// own (omitted from JSON when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

/// A state transition, published on `balance-exhausted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Exhausted, restored, low or forecast.
    pub kind: TransitionKind,
    /// Whose.
    pub customer_id: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// The version of the change that crossed.
    pub version: u64,
    /// Balance after.
    pub balance: Decimal,
    /// The threshold crossed (low only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Decimal>,
    /// When the balance is expected to reach 0 (ms; forecast only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_out_at: Option<i64>,
    /// The event or grant id that caused it.
    pub cause_id: String,
    /// Processing time (ms).
    pub at: i64,
}

/// The kind of a [`Transition`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    /// Crossed to <= 0.
    Exhausted,
    /// Crossed back to > 0.
    Restored,
    /// Crossed below a low threshold.
    Low,
    /// `runs_out_at` came within the meter's `forecast_alert`.
    Forecast,
}

/// Who asked for a top-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopUpSource {
    /// The meter's `auto_top_up` threshold was crossed.
    Auto,
    /// A customer pressed "Top up" in the portal.
    Portal,
    /// A service called the API with an API key.
    Api,
}

/// A request to the billing system: charge `pack` and grant it (published on
/// `top-up-requests`, keyed by customer). The billing system dedupes on `request_id` and grants
/// with `grant_id = request_id`, so a replayed request is never charged or granted twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopUpRequested {
    /// The idempotency key (`auto:<customer>:<meter>:<version>` for automatic ones).
    pub request_id: String,
    /// Whose.
    pub customer_id: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// Which pack.
    pub pack: String,
    /// When (ms since the epoch; processing time for automatic ones).
    pub requested_at: i64,
    /// Who asked.
    pub source: TopUpSource,
    /// Automatic: the balance after the change that crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Decimal>,
    /// Automatic: the `below` threshold crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<Decimal>,
}

/// The `request_id` of an automatic top-up: `auto:<customer>:<meter>:<version>`, or, when that
/// would be longer than an id may be, `auto:<sha-256 prefix>:<version>` (still deterministic).
pub fn auto_top_up_request_id(customer: &CustomerId, meter: &MeterName, version: u64) -> String {
    let full = format!("auto:{customer}:{meter}:{version}");
    if full.len() <= MAX_ID_LEN {
        return full;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{customer}\0{meter}").as_bytes());
    format!("auto:{}:{version}", hex::encode(&digest[..16]))
}

/// An output of the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A projection changed.
    Changed(BalanceChanged),
    /// A state transition.
    Transition(Transition),
    /// An automatic top-up request (the meter's `auto_top_up` threshold was crossed).
    TopUp(TopUpRequested),
}

/// What became of an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// It changed the state.
    Applied,
    /// Its id was seen before; nothing changed.
    Duplicate,
    /// A usage event that matches no meter; nothing changed.
    NoMeter,
}
