//! The rules (see the crate docs), applied to one [`Customer`] at a time.

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::book::{
    Customer, Draw, EventSeen, GrantSeen, Hold, MeterBook, ReservationSeen, Slot, MAX_DRAINED,
    MAX_HOLDS,
};
use crate::input::{Applied, Grant, GrantKind, Input, Rejected, Reserve, Usage};
use crate::meter::{Meter, OnExhausted};
use crate::output::{
    auto_top_up_request_id, Change, Output, Reason, TopUp, Transition, TransitionKind, MAX_ID_BYTES,
};

/// The rules over a set of meters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    meters: Vec<Meter>,
}

/// Who and what a change is about.
struct Cause<'a> {
    customer: &'a str,
    meter: &'a Meter,
    id: &'a str,
    now: i64,
}

impl<'a> Cause<'a> {
    fn new(customer: &'a str, meter: &'a Meter, id: &'a str, now: i64) -> Self {
        Self {
            customer,
            meter,
            id,
            now,
        }
    }
}

impl Rules {
    /// The rules over these meters (in this order: an event feeds them in it).
    pub fn new(meters: Vec<Meter>) -> Self {
        Self { meters }
    }

    /// The meters.
    pub fn meters(&self) -> &[Meter] {
        &self.meters
    }

    /// The meter with this name.
    pub fn meter(&self, name: &str) -> Option<&Meter> {
        self.meters.iter().find(|m| m.name == name)
    }

    /// The units an event of this name and these properties adds to each meter that counts it
    /// (empty if none does); the first meter that cannot read its quantity rejects the event.
    pub fn quantities(
        &self,
        name: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<Vec<(&Meter, Decimal)>, Rejected> {
        let mut out = Vec::new();
        for m in &self.meters {
            if m.counts(name, properties) {
                out.push((m, m.quantity(properties)?));
            }
        }
        Ok(out)
    }

    /// Applies `input` to `customer` at `now`, pushing what it emits to `out`. A rejected
    /// input changes nothing and emits nothing.
    pub fn apply(
        &self,
        customer: &mut Customer,
        input: &Input,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        match input {
            Input::Usage(u) => self.usage(customer, u, now, out),
            Input::Grant(g) => self.grant(customer, g, now, out),
            Input::VoidGrant(id) => self.void_grant(customer, id, now, out),
            Input::VoidUsage(id) => self.void_usage(customer, id, now, out),
            Input::Reserve(r) => self.reserve(customer, r, now, out),
            Input::Release(id) => self.release(customer, id, now, out),
        }
    }

    /// Applies time alone: on every meter touched so far (by name), the pending grants due
    /// become active, the active grants due expire and the holds due end, in time order.
    pub fn advance(&self, customer: &mut Customer, now: i64, out: &mut Vec<Output>) {
        let Customer { id, meters, .. } = customer;
        for (name, book) in meters.iter_mut() {
            if let Some(meter) = self.meter(name) {
                advance_meter(id, meter, book, now, out);
            }
        }
    }

    fn usage(
        &self,
        customer: &mut Customer,
        u: &Usage,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        if customer.events.contains_key(&u.id) {
            return Ok(Applied::Duplicate);
        }
        let quantities = self.quantities(&u.name, &u.properties)?;
        if quantities.is_empty() {
            return Ok(Applied::NoMeter);
        }
        let Customer {
            id, meters, events, ..
        } = customer;
        let mut draws = Vec::new();
        for (meter, q) in quantities {
            let book = touch(id, meter, meters, now, out);
            if q.is_zero() {
                continue;
            }
            let before = book.balance();
            let settled = match &u.reservation {
                Some(r) => match book.holds.iter().position(|h| &h.id == r) {
                    Some(i) => {
                        book.holds.remove(i);
                        true
                    }
                    None => false,
                },
                None => false,
            };
            // A block meter never draws what other reservations hold.
            let withheld = match meter.on_exhausted {
                OnExhausted::Block => {
                    let usable = book.available().max(Decimal::ZERO);
                    (q - usable).max(Decimal::ZERO)
                }
                OnExhausted::Overage => Decimal::ZERO,
            };
            let mut left = q - withheld;
            let mut drawn = Vec::new();
            for i in book.order() {
                let slot = &mut book.slots[i];
                if left.is_zero() || !slot.active {
                    continue;
                }
                let take = left.min(slot.remaining);
                if take > Decimal::ZERO {
                    slot.remaining -= take;
                    left -= take;
                    drawn.push((slot.grant.id.clone(), take));
                }
            }
            prune_drained(book);
            left += withheld;
            let mut draw = Draw {
                meter: meter.name.clone(),
                grants: drawn,
                debt: Decimal::ZERO,
                blocked: Decimal::ZERO,
            };
            match meter.on_exhausted {
                OnExhausted::Overage => {
                    book.consumed += q;
                    book.debt += left;
                    book.overage += left;
                    draw.debt = left;
                }
                OnExhausted::Block => {
                    book.consumed += q - left;
                    book.blocked += left;
                    draw.blocked = left;
                }
            }
            let cause = Cause::new(id, meter, &u.id, now);
            let reason = if settled {
                Reason::Settled
            } else {
                Reason::Usage
            };
            change(&cause, book, before, Some(before), reason, out);
            draws.push(draw);
        }
        events.insert(
            u.id.clone(),
            EventSeen {
                at: now,
                draws,
                voided: false,
            },
        );
        Ok(Applied::Applied)
    }

    fn grant(
        &self,
        customer: &mut Customer,
        g: &Grant,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        if customer.grants.contains_key(&g.id) {
            return Ok(Applied::Duplicate);
        }
        let meter = self.meter(&g.meter).ok_or(Rejected::UnknownMeter)?;
        if g.amount <= Decimal::ZERO {
            return Err(Rejected::InvalidAmount);
        }
        if g.kind == GrantKind::Cycle && g.subscription.is_none() {
            return Err(Rejected::InvalidGrant);
        }
        if let (Some(starts), Some(ends)) = (g.effective_at, g.expires_at) {
            if ends <= starts {
                return Err(Rejected::InvalidGrant);
            }
        }
        let Customer {
            id, meters, grants, ..
        } = customer;
        let book = touch(id, meter, meters, now, out);
        let cause = Cause::new(id, meter, &g.id, now);
        let slot = Slot {
            grant: g.clone(),
            starts_at: g.effective_at.unwrap_or(now),
            remaining: g.amount,
            active: false,
            cycle_ended: false,
        };
        let before = book.balance();
        if g.expires_at.is_some_and(|ends| ends <= now) {
            book.credited += g.amount;
            book.expired += g.amount;
            change(&cause, book, before, Some(before), Reason::Expired, out);
        } else if g.effective_at.is_some_and(|starts| starts > now) {
            book.slots.push(slot);
            change(
                &cause,
                book,
                before,
                Some(before),
                Reason::GrantScheduled,
                out,
            );
        } else {
            activate(&cause, book, slot, Reason::Grant, out);
        }
        grants.insert(
            g.id.clone(),
            GrantSeen {
                meter: meter.name.clone(),
                at: now,
                voided: false,
            },
        );
        Ok(Applied::Applied)
    }

    fn reserve(
        &self,
        customer: &mut Customer,
        r: &Reserve,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        if customer.reservations.contains_key(&r.id) {
            return Ok(Applied::Duplicate);
        }
        let meter = self.meter(&r.meter).ok_or(Rejected::UnknownMeter)?;
        if r.units <= Decimal::ZERO || r.ttl <= 0 {
            return Err(Rejected::InvalidReservation);
        }
        let Customer {
            id,
            meters,
            reservations,
            ..
        } = customer;
        let book = touch(id, meter, meters, now, out);
        let held = book.holds.len() < MAX_HOLDS
            && (meter.on_exhausted == OnExhausted::Overage || book.available() >= r.units);
        if held {
            let before = book.balance();
            book.holds.push(Hold {
                id: r.id.clone(),
                units: r.units,
                expires_at: now.saturating_add(r.ttl),
            });
            let cause = Cause::new(id, meter, &r.id, now);
            change(&cause, book, before, Some(before), Reason::Reserved, out);
        }
        reservations.insert(
            r.id.clone(),
            ReservationSeen {
                meter: meter.name.clone(),
                held,
            },
        );
        Ok(Applied::Applied)
    }

    fn release(
        &self,
        customer: &mut Customer,
        reservation: &str,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        let seen = customer
            .reservations
            .get(reservation)
            .ok_or(Rejected::ReservationUnknown)?;
        if !seen.held {
            return Ok(Applied::Duplicate);
        }
        let Some(meter) = self.meter(&seen.meter) else {
            return Ok(Applied::Duplicate);
        };
        // Ended, or its ttl has run out (time ends it, not the release): nothing changes.
        let live = customer.meters.get(&meter.name).is_some_and(|b| {
            b.holds
                .iter()
                .any(|h| h.id == reservation && h.expires_at > now)
        });
        if !live {
            return Ok(Applied::Duplicate);
        }
        let Customer { id, meters, .. } = customer;
        let book = touch(id, meter, meters, now, out);
        let i = book
            .holds
            .iter()
            .position(|h| h.id == reservation)
            .expect("a live hold outlasts the advance to now");
        let before = book.balance();
        book.holds.remove(i);
        let cause = Cause::new(id, meter, reservation, now);
        change(&cause, book, before, Some(before), Reason::Released, out);
        Ok(Applied::Applied)
    }

    fn void_grant(
        &self,
        customer: &mut Customer,
        grant_id: &str,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        let seen = customer.grants.get(grant_id).ok_or(Rejected::VoidUnknown)?;
        if seen.voided {
            return Err(Rejected::VoidDuplicate);
        }
        let meter = self.meter(&seen.meter).ok_or(Rejected::UnknownMeter)?;
        let Customer {
            id, meters, grants, ..
        } = customer;
        let book = touch(id, meter, meters, now, out);
        let before = book.balance();
        let held = book
            .order()
            .into_iter()
            .find(|&i| book.slots[i].grant.id == grant_id);
        if let Some(i) = held {
            let slot = book.slots.remove(i);
            // A pending grant's remainder was never credited.
            let uncredit = if slot.active {
                slot.remaining
            } else {
                Decimal::ZERO
            };
            book.credited -= uncredit;
            if slot.grant.kind == GrantKind::Cycle && !slot.cycle_ended {
                book.cycle_credited -= uncredit;
            }
        }
        let cause = Cause::new(id, meter, grant_id, now);
        change(&cause, book, before, Some(before), Reason::VoidGrant, out);
        grants.get_mut(grant_id).expect("looked up above").voided = true;
        Ok(Applied::Applied)
    }

    fn void_usage(
        &self,
        customer: &mut Customer,
        event_id: &str,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, Rejected> {
        let seen = customer.events.get(event_id).ok_or(Rejected::VoidUnknown)?;
        if seen.voided {
            return Err(Rejected::VoidDuplicate);
        }
        let draws = seen.draws.clone();
        let Customer {
            id, meters, events, ..
        } = customer;
        for d in &draws {
            let Some(meter) = self.meter(&d.meter) else {
                continue;
            };
            let book = touch(id, meter, meters, now, out);
            let before = book.balance();
            let mut homeless = Decimal::ZERO;
            let mut given_back = Decimal::ZERO;
            for (grant, units) in &d.grants {
                given_back += *units;
                match book.find_active(grant) {
                    Some(i) => book.slots[i].remaining += *units,
                    None => homeless += *units,
                }
            }
            let repaid = d.debt.min(book.debt);
            book.debt -= repaid;
            homeless += d.debt - repaid;
            book.overage -= d.debt;
            book.blocked -= d.blocked;
            book.voided += given_back + d.debt;
            if homeless > Decimal::ZERO {
                let full = format!("void:{event_id}");
                let adjustment = Grant {
                    id: if full.len() <= MAX_ID_BYTES {
                        full
                    } else {
                        "void".into()
                    },
                    meter: meter.name.clone(),
                    kind: GrantKind::Adjustment,
                    amount: homeless,
                    priority: 255,
                    effective_at: None,
                    expires_at: None,
                    subscription: None,
                    rollover: Decimal::ZERO,
                };
                book.slots.push(Slot {
                    grant: adjustment,
                    starts_at: now,
                    remaining: homeless,
                    active: true,
                    cycle_ended: false,
                });
            }
            let cause = Cause::new(id, meter, event_id, now);
            change(&cause, book, before, Some(before), Reason::VoidUsage, out);
        }
        events.get_mut(event_id).expect("looked up above").voided = true;
        Ok(Applied::Applied)
    }
}

/// The book of `meter`, created if it was never touched, with time applied.
fn touch<'a>(
    customer: &str,
    meter: &Meter,
    meters: &'a mut BTreeMap<String, MeterBook>,
    now: i64,
    out: &mut Vec<Output>,
) -> &'a mut MeterBook {
    let book = meters.entry(meter.name.clone()).or_default();
    advance_meter(customer, meter, book, now, out);
    book
}

/// Everything due up to `now`, one at a time, soonest first. At one instant: activations (by
/// id), then grant expiries (in draw-down order), then holds (by id). So a grant that starts
/// and ends between two steps is credited, then forfeited, and advancing in one step or in
/// many gives the same changes.
fn advance_meter(
    customer: &str,
    meter: &Meter,
    book: &mut MeterBook,
    now: i64,
    out: &mut Vec<Output>,
) {
    loop {
        let mut due: Vec<(i64, u8, usize)> = Vec::new();
        for (rank, &i) in book.order().iter().enumerate() {
            let s = &book.slots[i];
            if !s.active && s.starts_at <= now {
                due.push((s.starts_at, 0, i));
            } else if let Some(ends) = s.grant.expires_at.filter(|&e| s.active && e <= now) {
                due.push((ends, 1, rank));
            }
        }
        for (i, h) in book.holds.iter().enumerate() {
            if h.expires_at <= now {
                due.push((h.expires_at, 2, i));
            }
        }
        // Ties: activations by id, expiries by draw-down rank, holds by id.
        let first = due.into_iter().min_by(|a, b| {
            (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| match a.1 {
                0 => book.slots[a.2].grant.id.cmp(&book.slots[b.2].grant.id),
                1 => a.2.cmp(&b.2),
                _ => book.holds[a.2].id.cmp(&book.holds[b.2].id),
            })
        });
        let Some((_, kind, i)) = first else { break };
        match kind {
            0 => {
                let slot = book.slots.remove(i);
                let id = slot.grant.id.clone();
                let cause = Cause::new(customer, meter, &id, now);
                activate(&cause, book, slot, Reason::Activated, out);
            }
            1 => {
                let i = book.order()[i];
                let before = book.balance();
                let slot = book.slots.remove(i);
                if slot.remaining.is_zero() {
                    continue;
                }
                book.expired += slot.remaining;
                let cause = Cause::new(customer, meter, &slot.grant.id, now);
                change(&cause, book, before, Some(before), Reason::Expired, out);
            }
            _ => {
                let before = book.balance();
                let hold = book.holds.remove(i);
                let cause = Cause::new(customer, meter, &hold.id, now);
                change(
                    &cause,
                    book,
                    before,
                    Some(before),
                    Reason::ReservationExpired,
                    out,
                );
            }
        }
    }
}

/// A grant becomes active: a cycle grant first ends its subscription's cycle; then the grant
/// pays the debt and keeps the rest. One crossing, from before the cycle's end.
fn activate(
    cause: &Cause<'_>,
    book: &mut MeterBook,
    mut slot: Slot,
    reason: Reason,
    out: &mut Vec<Output>,
) {
    let judged_from = book.balance();
    if slot.grant.kind == GrantKind::Cycle {
        let before = book.balance();
        let mut forfeited = Decimal::ZERO;
        let mut kept = Vec::new();
        for mut s in std::mem::take(&mut book.slots) {
            let ends = s.active
                && s.grant.kind == GrantKind::Cycle
                && !s.cycle_ended
                && s.grant.subscription == slot.grant.subscription;
            if ends {
                let keep = s.remaining.min(s.grant.rollover);
                forfeited += s.remaining - keep;
                s.remaining = keep;
                s.cycle_ended = true;
                if keep.is_zero() {
                    continue;
                }
            }
            kept.push(s);
        }
        book.slots = kept;
        book.cycle_credited = Decimal::ZERO;
        if forfeited > Decimal::ZERO {
            book.expired += forfeited;
            change(cause, book, before, None, Reason::CycleEnd, out);
        }
    }
    let before = book.balance();
    let amount = slot.grant.amount;
    let paid = book.debt.min(amount);
    book.debt -= paid;
    slot.remaining = amount - paid;
    slot.active = true;
    book.credited += amount;
    book.cycle_credited += amount;
    if slot.remaining > Decimal::ZERO {
        book.slots.push(slot);
    }
    change(cause, book, before, Some(judged_from), reason, out);
}

/// Beyond [`MAX_DRAINED`] drained grants, the oldest drained ones go, one by one.
fn prune_drained(book: &mut MeterBook) {
    loop {
        let drained: Vec<usize> = (0..book.slots.len())
            .filter(|&i| book.slots[i].active && book.slots[i].remaining.is_zero())
            .collect();
        if drained.len() <= MAX_DRAINED {
            return;
        }
        let oldest = drained
            .into_iter()
            .min_by_key(|&i| (book.slots[i].starts_at, &book.slots[i].grant.id))
            .expect("more than MAX_DRAINED");
        book.slots.remove(oldest);
        book.pruned += 1;
    }
}

/// Records one change of `book` whose balance was `before`: a version, its [`Change`], and,
/// when `judged_from` is given, the crossings from that balance to the new one.
fn change(
    cause: &Cause<'_>,
    book: &mut MeterBook,
    before: Decimal,
    judged_from: Option<Decimal>,
    reason: Reason,
    out: &mut Vec<Output>,
) {
    let after = book.balance();
    book.version += 1;
    book.updated_at = cause.now;
    let version = book.version;
    out.push(Output::Changed(Change {
        customer: cause.customer.into(),
        meter: cause.meter.name.clone(),
        version,
        delta: after - before,
        reason,
        cause: cause.id.into(),
        balance: after,
        credited: book.credited,
        consumed: book.consumed,
        overage: book.overage,
        blocked: book.blocked,
        at: cause.now,
    }));
    let Some(from) = judged_from else { return };
    let crossed = |kind, threshold| {
        Output::Transition(Transition {
            kind,
            customer: cause.customer.into(),
            meter: cause.meter.name.clone(),
            version,
            balance: after,
            threshold,
            cause: cause.id.into(),
            at: cause.now,
        })
    };
    let zero = Decimal::ZERO;
    if !book.exhausted && from > zero && after <= zero {
        book.exhausted = true;
        out.push(crossed(TransitionKind::Exhausted, None));
    } else if book.exhausted && after > zero {
        book.exhausted = false;
        out.push(crossed(TransitionKind::Restored, None));
    }
    for (i, low) in cause.meter.lows.iter().enumerate() {
        let Some(t) = low.units(book.cycle_credited) else {
            continue;
        };
        let armed = !book.low_fired.contains(&i);
        if armed && from >= t && after < t {
            book.low_fired.insert(i);
            out.push(crossed(TransitionKind::Low, Some(t)));
        } else if !armed && after >= t {
            book.low_fired.remove(&i);
        }
    }
    if let Some(auto) = &cause.meter.auto_top_up {
        if !book.auto_top_up_fired && from >= auto.below && after < auto.below {
            book.auto_top_up_fired = true;
            out.push(Output::TopUp(TopUp {
                request_id: auto_top_up_request_id(cause.customer, &cause.meter.name, version),
                customer: cause.customer.into(),
                meter: cause.meter.name.clone(),
                pack: auto.pack.clone(),
                at: cause.now,
                balance: after,
                threshold: auto.below,
            }));
        } else if book.auto_top_up_fired && after >= auto.below {
            book.auto_top_up_fired = false;
        }
    }
}
