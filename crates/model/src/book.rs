//! One customer's state: plain lists, recomputed on every read.

use std::collections::{BTreeMap, BTreeSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::input::Grant;

/// The most drained grants (remainder 0) a meter keeps after a usage event.
pub const MAX_DRAINED: usize = 16;

/// One grant a meter holds, active or pending: the grant as it arrived, and what is left of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The grant (for the adjustment of a void, as the rules made it: `void:<event>`).
    pub grant: Grant,
    /// When it became (or becomes) usable: the grant's `effective_at`, else its arrival.
    pub starts_at: i64,
    /// Units left (`grant.amount` less the debt it paid and what was drawn).
    pub remaining: Decimal,
    /// False while pending.
    pub active: bool,
    /// A cycle grant whose cycle has ended (what it kept stays usable).
    pub cycle_ended: bool,
}

impl Slot {
    /// The order grants are drawn in (and listed): priority, soonest expiry (never last),
    /// start, id.
    pub fn draw_key(&self) -> (u8, i64, i64, &str) {
        let g = &self.grant;
        (
            g.priority,
            g.expires_at.unwrap_or(i64::MAX),
            self.starts_at,
            &g.id,
        )
    }
}

/// A meter's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Above every low threshold.
    Active,
    /// Below a low threshold.
    Low,
    /// Balance <= 0.
    Exhausted,
}

/// The most holds a meter keeps at once.
pub const MAX_HOLDS: usize = 1000;

/// One meter of one customer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterBook {
    /// Changes so far.
    pub version: u64,
    /// Units granted, net of voided grants' remainders.
    pub credited: Decimal,
    /// Usage applied (drawn or taken as overage; not what was blocked).
    pub consumed: Decimal,
    /// Forfeited by expiry and cycle ends.
    pub expired: Decimal,
    /// Usage given back by voids.
    pub voided: Decimal,
    /// Usage beyond the credits (overage mode).
    pub overage: Decimal,
    /// Usage refused (block mode).
    pub blocked: Decimal,
    /// The negative part of the balance (overage mode).
    pub debt: Decimal,
    /// Credits granted since the current cycle began.
    pub cycle_credited: Decimal,
    /// The grants held, in the order they became held (not the draw-down order).
    pub slots: Vec<Slot>,
    /// Exhausted since the last crossing to <= 0 (until restored).
    pub exhausted: bool,
    /// Indices of the low thresholds that fired and are not re-armed.
    pub low_fired: BTreeSet<usize>,
    /// The automatic top-up fired and is not re-armed.
    pub auto_top_up_fired: bool,
    /// Processing time of the last change.
    pub updated_at: i64,
    /// Drained grants dropped beyond [`MAX_DRAINED`] (not part of the service's projection:
    /// it tells a workload that it reached the cap).
    pub pruned: u64,
    /// Active reservations, in the order they were made.
    pub holds: Vec<Hold>,
}

/// Units a reservation holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The reservation.
    pub id: String,
    /// Units held.
    pub units: Decimal,
    /// When the hold ends by itself (exclusive).
    pub expires_at: i64,
}

/// A reservation made: its first answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationSeen {
    /// The meter.
    pub meter: String,
    /// Whether it was held (else refused).
    pub held: bool,
}

impl MeterBook {
    /// The sum of the active remainders, less the debt.
    pub fn balance(&self) -> Decimal {
        let mut sum = Decimal::ZERO;
        for s in &self.slots {
            if s.active {
                sum += s.remaining;
            }
        }
        sum - self.debt
    }

    /// Units held by reservations.
    pub fn reserved(&self) -> Decimal {
        self.holds.iter().map(|h| h.units).sum()
    }

    /// The balance less what reservations hold.
    pub fn available(&self) -> Decimal {
        self.balance() - self.reserved()
    }

    /// Exhausted, low or active.
    pub fn status(&self) -> Status {
        if self.balance() <= Decimal::ZERO {
            Status::Exhausted
        } else if !self.low_fired.is_empty() {
            Status::Low
        } else {
            Status::Active
        }
    }

    /// Indices into `slots`: the active grants in draw-down order, then the pending ones in
    /// the same order. Equal keys keep the order they became held in.
    pub fn order(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.slots.len()).collect();
        idx.sort_by(|&a, &b| {
            let (a, b) = (&self.slots[a], &self.slots[b]);
            (!a.active, a.draw_key()).cmp(&(!b.active, b.draw_key()))
        });
        idx
    }

    /// The grants as listed: [`Self::order`].
    pub fn listed(&self) -> Vec<&Slot> {
        self.order().into_iter().map(|i| &self.slots[i]).collect()
    }

    /// The first held, active grant with this id, in listed order.
    pub(crate) fn find_active(&self, id: &str) -> Option<usize> {
        self.order()
            .into_iter()
            .find(|&i| self.slots[i].active && self.slots[i].grant.id == id)
    }

    /// The earliest time at which something is due: a pending grant's start, an active one's
    /// expiry.
    pub fn next_due(&self) -> Option<i64> {
        let mut due: Option<i64> = None;
        for s in &self.slots {
            let at = if s.active {
                s.grant.expires_at
            } else {
                Some(s.starts_at)
            };
            if let Some(at) = at {
                due = Some(due.map_or(at, |d| d.min(at)));
            }
        }
        for h in &self.holds {
            due = Some(due.map_or(h.expires_at, |d| d.min(h.expires_at)));
        }
        due
    }
}

/// What a usage event drew from one meter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draw {
    /// The meter.
    pub meter: String,
    /// (grant id, units), in draw-down order.
    pub grants: Vec<(String, Decimal)>,
    /// Units taken as debt (overage mode).
    pub debt: Decimal,
    /// Units refused (block mode).
    pub blocked: Decimal,
}

/// A usage event recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventSeen {
    /// When it was applied.
    pub at: i64,
    /// What it drew, per meter with a quantity > 0.
    pub draws: Vec<Draw>,
    /// Voided since.
    pub voided: bool,
}

/// A grant id recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSeen {
    /// The grant's meter.
    pub meter: String,
    /// When it arrived.
    pub at: i64,
    /// Voided since.
    pub voided: bool,
}

/// One customer: its meters and the ids it has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    /// The customer id (part of the outputs and of automatic top-up request ids).
    pub id: String,
    /// Meters that were touched, by name.
    pub meters: BTreeMap<String, MeterBook>,
    /// Usage events recorded, by id.
    pub events: BTreeMap<String, EventSeen>,
    /// Grants recorded, by id.
    pub grants: BTreeMap<String, GrantSeen>,
    /// Reservations made, by id.
    pub reservations: BTreeMap<String, ReservationSeen>,
}

impl Customer {
    /// A customer with nothing recorded.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ..Self::default()
        }
    }

    /// The meter's book, if the meter was touched.
    pub fn meter(&self, name: &str) -> Option<&MeterBook> {
        self.meters.get(name)
    }

    /// Forgets a usage event, as the service does past its dedupe window: a void of it is
    /// then unknown. (A workload that keeps only a sample of its events uses this too.)
    pub fn forget_event(&mut self, id: &str) {
        self.events.remove(id);
    }
}
