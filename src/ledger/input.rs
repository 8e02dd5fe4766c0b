//! The inputs of the rules, validated: usage events, grants and voids.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{CustomerId, EventId, GrantId, MeterName, ReservationId};

/// The kind of a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// The credits of one billing cycle of a subscription.
    Cycle,
    /// A one-time pack; stacks and keeps its own expiry.
    TopUp,
    /// A manual or system adjustment (also used for voided usage returned to ended grants).
    Adjustment,
}

/// A usage event, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// Idempotency key.
    pub id: EventId,
    /// Whose usage.
    pub customer: CustomerId,
    /// The event name meters match on.
    pub name: String,
    /// Event time (ms since the epoch); informational, the rules use processing time.
    pub timestamp_ms: i64,
    /// Properties as text (numbers in their exact decimal form).
    pub properties: BTreeMap<String, String>,
    /// The reservation this usage settles, if any.
    pub reservation_id: Option<ReservationId>,
}

/// A reservation: hold `units` of `meter` for `ttl_ms`, until settled or released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reserve {
    /// Idempotency key.
    pub reservation_id: ReservationId,
    /// Whose credits.
    pub customer: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// Units held, > 0.
    pub units: Decimal,
    /// How long the hold lasts (ms, > 0), from the time the reservation applies at.
    pub ttl_ms: i64,
}

/// A grant, validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Idempotency key.
    pub grant_id: GrantId,
    /// Whose credits.
    pub customer: CustomerId,
    /// Which meter.
    pub meter: MeterName,
    /// Units granted, > 0.
    pub amount: Decimal,
    /// Cycle, top-up or adjustment.
    pub kind: GrantKind,
    /// Draw-down priority, lower first.
    pub priority: u8,
    /// When the grant becomes usable (ms); `None` = on arrival.
    pub effective_at: Option<i64>,
    /// When the remainder is forfeited (ms, exclusive); `None` = never.
    pub expires_at: Option<i64>,
    /// The subscription whose cycle a cycle grant opens.
    pub subscription_id: Option<String>,
    /// Cycle grants: the most of the remainder carried into the next cycle.
    pub rollover: Decimal,
}

impl Grant {
    /// A top-up of `amount` on `meter`: priority 0, active on arrival, never expiring.
    pub fn top_up(
        grant_id: GrantId,
        customer: CustomerId,
        meter: MeterName,
        amount: Decimal,
    ) -> Self {
        Self {
            grant_id,
            customer,
            meter,
            amount,
            kind: GrantKind::TopUp,
            priority: 0,
            effective_at: None,
            expires_at: None,
            subscription_id: None,
            rollover: Decimal::ZERO,
        }
    }
}

/// An input to the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Usage drawing credits down.
    Usage(Usage),
    /// Credits granted.
    Grant(Grant),
    /// Remove a grant's remainder.
    VoidGrant {
        /// Whose grant.
        customer: CustomerId,
        /// Which grant.
        grant_id: GrantId,
    },
    /// Give back what a usage event drew.
    VoidUsage {
        /// Whose event.
        customer: CustomerId,
        /// Which event.
        event_id: EventId,
    },
    /// Hold units for a job about to run.
    Reserve(Reserve),
    /// End a hold without usage.
    Release {
        /// Whose reservation.
        customer: CustomerId,
        /// Which reservation.
        reservation_id: ReservationId,
    },
}

/// The records (beyond the meter projections) an input needs loaded in the [`Book`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refs {
    /// Event records.
    pub events: Vec<EventId>,
    /// Grant records.
    pub grants: Vec<GrantId>,
    /// Reservation records.
    pub reservations: Vec<ReservationId>,
}

impl Input {
    /// The event time the input itself carries, if any: a usage event's `timestamp`. (Other
    /// inputs take their record's timestamp.)
    pub fn event_time(&self) -> Option<i64> {
        match self {
            Input::Usage(u) if u.timestamp_ms != 0 => Some(u.timestamp_ms),
            _ => None,
        }
    }

    /// The customer the input belongs to.
    pub fn customer(&self) -> &CustomerId {
        match self {
            Input::Usage(u) => &u.customer,
            Input::Grant(g) => &g.customer,
            Input::VoidGrant { customer, .. }
            | Input::VoidUsage { customer, .. }
            | Input::Release { customer, .. } => customer,
            Input::Reserve(r) => &r.customer,
        }
    }

    /// Adds to `refs` the records this input reads.
    pub fn refs(&self, refs: &mut Refs) {
        match self {
            Input::Usage(u) => refs.events.push(u.id.clone()),
            Input::VoidUsage { event_id, .. } => refs.events.push(event_id.clone()),
            Input::Grant(g) => refs.grants.push(g.grant_id.clone()),
            Input::VoidGrant { grant_id, .. } => refs.grants.push(grant_id.clone()),
            Input::Reserve(r) => refs.reservations.push(r.reservation_id.clone()),
            Input::Release { reservation_id, .. } => refs.reservations.push(reservation_id.clone()),
        }
    }

    /// The id that identifies this input in histories (`cause_id`).
    pub fn cause_id(&self) -> &str {
        match self {
            Input::Usage(u) => u.id.as_str(),
            Input::Grant(g) => g.grant_id.as_str(),
            Input::VoidGrant { grant_id, .. } => grant_id.as_str(),
            Input::VoidUsage { event_id, .. } => event_id.as_str(),
            Input::Reserve(r) => r.reservation_id.as_str(),
            Input::Release { reservation_id, .. } => reservation_id.as_str(),
        }
    }
}
