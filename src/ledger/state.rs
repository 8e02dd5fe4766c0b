//! The state the rules fold over: a customer's [`Book`] of meter projections and the event
//! and grant records its inputs refer to.

use std::collections::{BTreeSet, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{CustomerId, EventId, GrantId, GrantKind, MeterName, MeterStates, Refs, ReservationId};

/// One grant held by a meter, active or pending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSlot {
    /// The grant's id.
    pub id: GrantId,
    /// Its kind.
    pub kind: GrantKind,
    /// Its priority.
    pub priority: u8,
    /// When it became (or becomes) usable.
    pub effective_at: i64,
    /// When its remainder is forfeited.
    pub expires_at: Option<i64>,
    /// Its subscription (cycle grants).
    pub subscription_id: Option<String>,
    /// Its rollover cap (cycle grants).
    pub rollover: Decimal,
    /// Units granted.
    pub amount: Decimal,
    /// Units left.
    pub remaining: Decimal,
    /// False while pending (`effective_at` in the future).
    pub active: bool,
    /// A cycle grant whose cycle has ended (its rollover kept); never ended again.
    #[serde(default)]
    pub cycle_ended: bool,
}

impl GrantSlot {
    /// The draw-down order: priority, soonest expiry (never last), `effective_at`, id.
    pub(super) fn order_key(&self) -> (u8, i64, i64, &str) {
        (
            self.priority,
            self.expires_at.unwrap_or(i64::MAX),
            self.effective_at,
            self.id.as_str(),
        )
    }
}

/// Units held for a reservation until it is settled, released or expires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The reservation.
    pub id: ReservationId,
    /// Units held.
    pub units: Decimal,
    /// When the hold ends by itself (ms, exclusive, like a grant's expiry).
    pub expires_at: i64,
}

/// The most holds a meter keeps at once; a reservation beyond is refused (`too_many`).
pub const MAX_HOLDS: usize = 1000;

/// The most drained (remainder 0) grants a meter keeps; see [`MeterState::prune_drained`].
pub const MAX_DRAINED: usize = 16;

/// Status of a meter, for the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Balance above every low threshold.
    Active,
    /// Below at least one low threshold.
    Low,
    /// Balance <= 0.
    Exhausted,
}

/// The projection of one (customer, meter).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterState {
    /// Increments by one with every change; 0 = never changed.
    pub version: u64,
    /// Units granted (net of voided grants' remainders), counted when a grant becomes active.
    pub credited: Decimal,
    /// Units of usage applied (drawn from grants or taken as overage).
    pub consumed: Decimal,
    /// Units forfeited by expiry and cycle ends.
    pub expired: Decimal,
    /// Units of usage given back by voids.
    pub voided: Decimal,
    /// Units used beyond the credits (overage mode), billable.
    pub overage: Decimal,
    /// Units refused (block mode).
    pub blocked: Decimal,
    /// Outstanding negative balance (overage mode), paid first by the next grant.
    pub debt: Decimal,
    /// Credits granted since the current cycle began (base of fractional thresholds).
    pub cycle_credited: Decimal,
    /// Grants, active ones in draw-down order, then pending ones.
    pub grants: Vec<GrantSlot>,
    /// Set at the crossing to <= 0, cleared at the crossing back to > 0.
    pub exhausted: bool,
    /// Bit i set: low threshold i has fired and is disarmed.
    pub low_fired: u32,
    /// The automatic top-up has fired and is disarmed until the balance is back at `below`.
    #[serde(default)]
    pub auto_top_up_fired: bool,
    /// Processing time of the last change (ms).
    pub updated_at: i64,
    /// The usage units seen, exponentially decayed (time constant: the meter's `burn_window`)
    /// as of `burn_at`; see [`super::forecast`].
    #[serde(default)]
    pub burn: Decimal,
    /// The time (ms) `burn` is as of: the time of the last usage.
    #[serde(default)]
    pub burn_at: i64,
    /// The forecast alert has fired and is disarmed until `runs_out_at` leaves its window.
    #[serde(default)]
    pub forecast_fired: bool,
    /// Units held by reservations: the sum of `holds`.
    #[serde(default)]
    pub reserved: Decimal,
    /// Active reservations, in the order they were made.
    #[serde(default)]
    pub holds: Vec<Hold>,
}

impl MeterState {
    /// Units available now: active remainders minus the debt.
    pub fn balance(&self) -> Decimal {
        self.grants
            .iter()
            .filter(|g| g.active)
            .map(|g| g.remaining)
            .sum::<Decimal>()
            - self.debt
    }

    /// Units that may still be reserved or used without touching a hold: the balance less what
    /// reservations hold.
    pub fn available(&self) -> Decimal {
        self.balance() - self.reserved
    }

    /// Active / low / exhausted.
    pub fn status(&self) -> Status {
        if self.balance() <= Decimal::ZERO {
            Status::Exhausted
        } else if self.low_fired != 0 {
            Status::Low
        } else {
            Status::Active
        }
    }

    pub(super) fn sort_grants(&mut self) {
        self.grants.sort_by(|a, b| {
            b.active
                .cmp(&a.active)
                .then_with(|| a.order_key().cmp(&b.order_key()))
        });
    }

    /// Drained grants stay active (a void gives units back to them) until they expire, their
    /// cycle ends or they are voided; beyond [`MAX_DRAINED`] drained grants, the oldest drained
    /// ones are dropped so the projection stays bounded.
    pub(super) fn prune_drained(&mut self) {
        let drained = self
            .grants
            .iter()
            .filter(|g| g.active && g.remaining.is_zero())
            .count();
        if drained <= MAX_DRAINED {
            return;
        }
        let mut by_age: Vec<(i64, GrantId)> = self
            .grants
            .iter()
            .filter(|g| g.active && g.remaining.is_zero())
            .map(|g| (g.effective_at, g.id.clone()))
            .collect();
        by_age.sort();
        let drop: BTreeSet<GrantId> = by_age
            .into_iter()
            .take(drained - MAX_DRAINED)
            .map(|(_, id)| id)
            .collect();
        // Only drained slots: an adjustment may share its id with another slot (`void`).
        self.grants
            .retain(|g| !(g.active && g.remaining.is_zero() && drop.contains(&g.id)));
    }

    /// The earliest time at which [`Ledger::advance`] would change this meter.
    pub fn next_due(&self) -> Option<i64> {
        self.grants
            .iter()
            .filter_map(|g| {
                if g.active {
                    g.expires_at
                } else {
                    Some(g.effective_at)
                }
            })
            .chain(self.holds.iter().map(|h| h.expires_at))
            .min()
    }

    /// Removes the hold of reservation `id`, if the meter has it.
    pub(super) fn take_hold(&mut self, id: &ReservationId) -> Option<Hold> {
        let pos = self.holds.iter().position(|h| &h.id == id)?;
        let h = self.holds.remove(pos);
        self.reserved -= h.units;
        Some(h)
    }
}

/// What one meter of a usage event drew; kept so a void can give it back exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterDraw {
    /// The meter.
    pub meter: MeterName,
    /// (grant, units) drawn from each grant.
    pub grants: Vec<(GrantId, Decimal)>,
    /// Units taken as debt (overage).
    pub debt: Decimal,
    /// Units refused (block).
    pub blocked: Decimal,
}

/// The record of a usage event seen: for idempotency and voids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Processing time it was applied (ms).
    pub at: i64,
    /// What it drew, per meter.
    pub draws: Vec<MeterDraw>,
    /// Whether it has been voided.
    pub voided: bool,
}

/// The record of a grant id seen: for idempotency and voids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// The grant's meter.
    pub meter: MeterName,
    /// Processing time it arrived (ms).
    pub at: i64,
    /// Whether it has been voided.
    pub voided: bool,
}

/// What a reservation was answered, when it was made: kept as it is (a repeated
/// `reservation_id` gets the same answer), whatever happened to the hold since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    /// The meter.
    pub meter: MeterName,
    /// Units asked for.
    pub units: Decimal,
    /// When the hold ends by itself (ms).
    pub expires_at: i64,
    /// When it was made (ms).
    pub at: i64,
    /// Held, or why not.
    pub outcome: ReservationOutcome,
}

/// The answer to a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationOutcome {
    /// The units are held.
    Held,
    /// Refused: a `block` meter whose available units do not cover it.
    Insufficient,
    /// Refused: the meter already has [`MAX_HOLDS`] holds.
    TooMany,
}

/// A key of the state that a [`Book`] changed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dirty {
    /// A meter projection.
    Meter(MeterName),
    /// An event record.
    Event(EventId),
    /// A grant record.
    Grant(GrantId),
    /// A reservation record.
    Reservation(ReservationId),
}

/// One customer's state as loaded for a batch.
#[derive(Clone, Debug)]
pub struct Book {
    /// The customer.
    pub customer: CustomerId,
    /// Meter projections present in the store (absent = never changed).
    pub meters: MeterStates,
    /// Event records loaded for the batch's [`Refs`]; `None` = not in the store.
    pub events: HashMap<EventId, Option<EventRecord>>,
    /// Grant records loaded for the batch's [`Refs`]; `None` = not in the store.
    pub grants: HashMap<GrantId, Option<GrantRecord>>,
    /// Reservation records loaded for the batch's [`Refs`]; `None` = not in the store.
    pub reservations: HashMap<ReservationId, Option<ReservationRecord>>,
    pub(super) dirty: BTreeSet<Dirty>,
}

impl Book {
    /// An empty book (nothing stored yet for this customer).
    pub fn new(customer: CustomerId) -> Self {
        Self {
            customer,
            meters: MeterStates::new(),
            events: HashMap::new(),
            grants: HashMap::new(),
            reservations: HashMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// The keys changed since the last call, and forgets them.
    pub fn take_dirty(&mut self) -> BTreeSet<Dirty> {
        std::mem::take(&mut self.dirty)
    }

    /// Whether the records `refs` names are all loaded.
    pub fn has(&self, refs: &Refs) -> bool {
        refs.events.iter().all(|e| self.events.contains_key(e))
            && refs.grants.iter().all(|g| self.grants.contains_key(g))
            && refs
                .reservations
                .iter()
                .all(|r| self.reservations.contains_key(r))
    }
}
