//! What the rules are given, and what they answer.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The kind of a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GrantKind {
    /// A billing cycle's credits; ends the subscription's previous cycle.
    Cycle,
    /// A pack bought; stacks.
    TopUp,
    /// A manual adjustment (and the `void:` adjustments the rules make).
    Adjustment,
}

impl GrantKind {
    /// The label on the wire (`cycle | top_up | adjustment`).
    pub fn label(self) -> &'static str {
        match self {
            GrantKind::Cycle => "cycle",
            GrantKind::TopUp => "top_up",
            GrantKind::Adjustment => "adjustment",
        }
    }
}

/// A usage event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// The idempotency key.
    pub id: String,
    /// The event name meters count.
    pub name: String,
    /// Its properties, as text.
    pub properties: BTreeMap<String, String>,
    /// The reservation it settles, if any.
    #[serde(default)]
    pub reservation: Option<String>,
}

/// A reservation: hold `units` of `meter` for `ttl` ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserve {
    /// The idempotency key.
    pub id: String,
    /// The meter.
    pub meter: String,
    /// Units held, > 0.
    pub units: Decimal,
    /// How long (ms, > 0).
    pub ttl: i64,
}

/// A grant of credits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The idempotency key.
    pub id: String,
    /// The meter credited.
    pub meter: String,
    /// Cycle, top-up or adjustment.
    pub kind: GrantKind,
    /// Units, > 0.
    pub amount: Decimal,
    /// Draw-down priority, lower first.
    pub priority: u8,
    /// When it becomes usable (ms); `None`: on arrival.
    pub effective_at: Option<i64>,
    /// When its remainder is forfeited (ms, exclusive); `None`: never.
    pub expires_at: Option<i64>,
    /// The subscription whose cycle a cycle grant opens.
    pub subscription: Option<String>,
    /// A cycle grant's most carried into the next cycle.
    pub rollover: Decimal,
}

/// One input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// Usage.
    Usage(Usage),
    /// A grant.
    Grant(Grant),
    /// Remove the remainder of the grant with this id.
    VoidGrant(String),
    /// Give back what the usage event with this id drew.
    VoidUsage(String),
    /// Hold units.
    Reserve(Reserve),
    /// End the hold of the reservation with this id.
    Release(String),
}

/// What an accepted input did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// It changed the book.
    Applied,
    /// Its id was recorded before: nothing changed.
    Duplicate,
    /// A usage event no meter counts: nothing changed, nothing recorded.
    NoMeter,
}

/// Why an input was refused; it changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// A quantity or grant amount that is not an acceptable amount.
    InvalidAmount,
    /// A sum meter's property is missing.
    MissingProperty,
    /// A grant for a meter that does not exist.
    UnknownMeter,
    /// A cycle grant without subscription, or one that expires before it starts.
    InvalidGrant,
    /// A void of an id never recorded (or forgotten).
    VoidUnknown,
    /// A void of an id already voided.
    VoidDuplicate,
    /// A reservation of units <= 0 or a ttl <= 0.
    InvalidReservation,
    /// A release of a reservation never made (or forgotten).
    ReservationUnknown,
}

impl Rejected {
    /// The label of the reason, as the service's dead-letter records carry it.
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::InvalidAmount => "invalid_amount",
            Rejected::MissingProperty => "missing_property",
            Rejected::UnknownMeter => "unknown_meter",
            Rejected::InvalidGrant => "invalid_grant",
            Rejected::VoidUnknown => "void_unknown",
            Rejected::VoidDuplicate => "void_duplicate",
            Rejected::InvalidReservation => "invalid_reservation",
            Rejected::ReservationUnknown => "reservation_unknown",
        }
    }
}
