//! The rules themselves: [`Ledger::apply`] and [`Ledger::advance`] over a [`Book`].

use std::collections::BTreeSet;

use rust_decimal::Decimal;

use super::*;

/// The rules over the configured meters.
#[derive(Clone, Debug)]
pub struct Ledger {
    meters: Meters,
}

/// Accumulates the outputs of one change.
struct Change<'a> {
    customer: &'a CustomerId,
    meter: &'a MeterDef,
    now: i64,
    cause_id: &'a str,
}

impl<'a> Change<'a> {
    fn new(customer: &'a CustomerId, meter: &'a MeterDef, now: i64, cause_id: &'a str) -> Self {
        Self {
            customer,
            meter,
            now,
            cause_id,
        }
    }

    /// Records a change of `state` whose balance was `before`: bumps the version, emits
    /// `BalanceChanged` and any transitions crossed.
    fn emit(&self, state: &mut MeterState, before: Decimal, reason: Reason, out: &mut Vec<Output>) {
        self.emit_crossing(state, before, Some(before), reason, out);
    }

    /// [`Self::emit`], judging transitions from the balance `crossed_from` (none if `None`): a
    /// cycle's end and the grant opening the next one cross as one step, so a renewal does not
    /// flap through `exhausted`/`low` on its intermediate balance.
    fn emit_crossing(
        &self,
        state: &mut MeterState,
        before: Decimal,
        crossed_from: Option<Decimal>,
        reason: Reason,
        out: &mut Vec<Output>,
    ) {
        let after = state.balance();
        state.version += 1;
        state.updated_at = self.now;
        let base = |kind, threshold| Transition {
            kind,
            customer_id: self.customer.clone(),
            meter: self.meter.name.clone(),
            version: state.version,
            balance: after,
            threshold,
            runs_out_at: None,
            cause_id: self.cause_id.to_string(),
            at: self.now,
        };
        out.push(Output::Changed(BalanceChanged {
            customer_id: self.customer.clone(),
            meter: self.meter.name.clone(),
            version: state.version,
            delta: after - before,
            reason,
            cause_id: self.cause_id.to_string(),
            balance: after,
            credited: state.credited,
            consumed: state.consumed,
            overage: state.overage,
            blocked: state.blocked,
            reserved: state.reserved,
            available: after - state.reserved,
            at: self.now,
            late: false,
        }));
        let Some(before) = crossed_from else { return };
        if before > Decimal::ZERO && after <= Decimal::ZERO && !state.exhausted {
            state.exhausted = true;
            out.push(Output::Transition(base(TransitionKind::Exhausted, None)));
        } else if state.exhausted && after > Decimal::ZERO {
            state.exhausted = false;
            out.push(Output::Transition(base(TransitionKind::Restored, None)));
        }
        for (i, t) in self.meter.low_balance.iter().enumerate() {
            let Some(t) = t.units(state.cycle_credited) else {
                continue;
            };
            let bit = 1u32 << i;
            if state.low_fired & bit == 0 && before >= t && after < t {
                state.low_fired |= bit;
                out.push(Output::Transition(base(TransitionKind::Low, Some(t))));
            } else if state.low_fired & bit != 0 && after >= t {
                state.low_fired &= !bit;
            }
        }
        if let Some(auto) = &self.meter.auto_top_up {
            if !state.auto_top_up_fired && before >= auto.below && after < auto.below {
                state.auto_top_up_fired = true;
                out.push(Output::TopUp(TopUpRequested {
                    request_id: auto_top_up_request_id(
                        self.customer,
                        &self.meter.name,
                        state.version,
                    ),
                    customer_id: self.customer.clone(),
                    meter: self.meter.name.clone(),
                    pack: auto.pack.clone(),
                    requested_at: self.now,
                    source: TopUpSource::Auto,
                    balance: Some(after),
                    threshold: Some(auto.below),
                }));
            } else if state.auto_top_up_fired && after >= auto.below {
                state.auto_top_up_fired = false;
            }
        }
        if let Some(alert) = self.meter.forecast_alert {
            let alert = i64::try_from(alert.as_millis()).unwrap_or(i64::MAX);
            let runs_out_at = forecast::runs_out_at(state, self.meter, self.now);
            let within = runs_out_at.is_some_and(|x| x - self.now <= alert);
            if within && !state.forecast_fired {
                state.forecast_fired = true;
                out.push(Output::Transition(Transition {
                    runs_out_at,
                    ..base(TransitionKind::Forecast, None)
                }));
            } else if !within && state.forecast_fired {
                state.forecast_fired = false;
            }
        }
    }
}

impl Ledger {
    /// The rules over these meters.
    pub fn new(meters: Meters) -> Self {
        Self { meters }
    }

    /// The configured meters.
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// Applies time: activates pending grants whose `effective_at <= now`, forfeits active
    /// grants whose `expires_at <= now` and ends holds whose ttl ran out, on every meter of the
    /// book, in time order (see `Due`).
    pub fn advance(&self, book: &mut Book, now: i64, out: &mut Vec<Output>) {
        let names: Vec<MeterName> = book.meters.keys().cloned().collect();
        for name in names {
            self.advance_meter(book, &name, now, out);
        }
    }

    fn advance_meter(&self, book: &mut Book, name: &MeterName, now: i64, out: &mut Vec<Output>) {
        let Some(def) = self.meters.get(name) else {
            return;
        };
        let Some(state) = book.meters.get_mut(name) else {
            return;
        };
        if state.next_due().is_none_or(|due| due > now) {
            return;
        }
        // Everything due, in time order (see `Due`): advancing to `now` at once or in steps
        // emits the same changes in the same order.
        while let Some(due) = Due::next(state, now) {
            match due {
                Due::Activation(i) => {
                    let g = state.grants.remove(i);
                    let id = g.id.clone();
                    let change = Change::new(&book.customer, def, now, id.as_str());
                    activate(state, g, &change, Reason::Activated, out);
                }
                Due::Expiry(i) => {
                    let before = state.balance();
                    let g = state.grants.remove(i);
                    if g.remaining.is_zero() {
                        continue;
                    }
                    state.expired += g.remaining;
                    let change = Change::new(&book.customer, def, now, g.id.as_str());
                    change.emit(state, before, Reason::Expired, out);
                }
                Due::HoldEnd(i) => {
                    let before = state.balance();
                    let id = state.holds[i].id.clone();
                    state.take_hold(&id);
                    let change = Change::new(&book.customer, def, now, id.as_str());
                    change.emit(state, before, Reason::ReservationExpired, out);
                }
            }
        }
        book.dirty.insert(Dirty::Meter(name.clone()));
    }

    /// Applies one input at processing time `now`. On `Err` the book is unchanged.
    ///
    /// Panics if the book lacks a record named by [`Input::refs`]: that is a bug of the caller,
    /// and guessing would risk counting twice.
    pub fn apply(
        &self,
        book: &mut Book,
        input: &Input,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        debug_assert_eq!(input.customer(), &book.customer);
        match input {
            Input::Usage(u) => self.apply_usage(book, u, now, out),
            Input::Grant(g) => self.apply_grant(book, g, now, out),
            Input::VoidGrant { grant_id, .. } => self.void_grant(book, grant_id, now, out),
            Input::VoidUsage { event_id, .. } => self.void_usage(book, event_id, now, out),
            Input::Reserve(r) => self.reserve(book, r, now, out),
            Input::Release { reservation_id, .. } => self.release(book, reservation_id, now, out),
        }
    }

    fn apply_usage(
        &self,
        book: &mut Book,
        u: &Usage,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        let seen = book.events.get(&u.id).expect("event record not loaded");
        if seen.is_some() {
            return Ok(Applied::Duplicate);
        }
        let quantities = self.meters.quantities(&u.name, &u.properties)?;
        if quantities.is_empty() {
            return Ok(Applied::NoMeter);
        }
        let mut draws = Vec::with_capacity(quantities.len());
        for (def, q) in quantities {
            self.ensure_meter(book, &def.name, now, out);
            if q.is_zero() {
                continue;
            }
            let state = book.meters.get_mut(&def.name).expect("ensured");
            let before = state.balance();
            forecast::record_usage(state, def, q, now);
            // Settling: the hold ends and the usage draws its real amount.
            let settled = u
                .reservation_id
                .as_ref()
                .and_then(|r| state.take_hold(r))
                .is_some();
            // In block mode the units other reservations hold are not drawn. (`before` is still
            // the balance: ending a hold does not change it.)
            let withheld = match def.on_exhausted {
                OnExhausted::Block => {
                    let usable = (before - state.reserved).max(Decimal::ZERO);
                    (q - usable).max(Decimal::ZERO)
                }
                OnExhausted::Overage => Decimal::ZERO,
            };
            let mut left = q - withheld;
            let mut drawn = Vec::new();
            for g in state.grants.iter_mut().filter(|g| g.active) {
                if left.is_zero() {
                    break;
                }
                let take = left.min(g.remaining);
                if take > Decimal::ZERO {
                    g.remaining -= take;
                    left -= take;
                    drawn.push((g.id.clone(), take));
                }
            }
            state.prune_drained();
            left += withheld;
            let (debt, blocked) = match def.on_exhausted {
                OnExhausted::Overage => {
                    state.debt += left;
                    state.overage += left;
                    state.consumed += q;
                    (left, Decimal::ZERO)
                }
                OnExhausted::Block => {
                    state.blocked += left;
                    state.consumed += q - left;
                    (Decimal::ZERO, left)
                }
            };
            let change = Change::new(&book.customer, def, now, u.id.as_str());
            let reason = if settled {
                Reason::Settled
            } else {
                Reason::Usage
            };
            change.emit(state, before, reason, out);
            book.dirty.insert(Dirty::Meter(def.name.clone()));
            draws.push(MeterDraw {
                meter: def.name.clone(),
                grants: drawn,
                debt,
                blocked,
            });
        }
        book.events.insert(
            u.id.clone(),
            Some(EventRecord {
                at: now,
                draws,
                voided: false,
            }),
        );
        book.dirty.insert(Dirty::Event(u.id.clone()));
        Ok(Applied::Applied)
    }

    /// Makes sure the meter has a projection and that time has been applied to it.
    fn ensure_meter(&self, book: &mut Book, name: &MeterName, now: i64, out: &mut Vec<Output>) {
        book.meters.get_or_default(name);
        self.advance_meter(book, name, now, out);
    }

    fn apply_grant(
        &self,
        book: &mut Book,
        g: &Grant,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        let seen = book
            .grants
            .get(&g.grant_id)
            .expect("grant record not loaded");
        if seen.is_some() {
            return Ok(Applied::Duplicate);
        }
        let def = self
            .meters
            .get(&g.meter)
            .ok_or_else(|| LedgerError::UnknownMeter(g.meter.to_string()))?;
        if g.amount <= Decimal::ZERO {
            return Err(LedgerError::InvalidAmount(format!(
                "grant amount must be > 0, got {}",
                g.amount
            )));
        }
        if g.kind == GrantKind::Cycle && g.subscription_id.is_none() {
            return Err(LedgerError::InvalidGrant(
                "a cycle grant needs a subscription_id".into(),
            ));
        }
        if let (Some(e), Some(x)) = (g.effective_at, g.expires_at) {
            if x <= e {
                return Err(LedgerError::InvalidGrant(
                    "expires_at must be after effective_at".into(),
                ));
            }
        }
        self.ensure_meter(book, &def.name, now, out);
        let state = book.meters.get_mut(&def.name).expect("ensured");
        let slot = GrantSlot {
            id: g.grant_id.clone(),
            kind: g.kind,
            priority: g.priority,
            effective_at: g.effective_at.unwrap_or(now),
            expires_at: g.expires_at,
            subscription_id: g.subscription_id.clone(),
            rollover: g.rollover,
            amount: g.amount,
            remaining: g.amount,
            active: false,
            cycle_ended: false,
        };
        let change = Change::new(&book.customer, def, now, g.grant_id.as_str());
        if g.expires_at.is_some_and(|x| x <= now) {
            // Already expired on arrival: recorded (for idempotency), credited and forfeited.
            let before = state.balance();
            state.credited += g.amount;
            state.expired += g.amount;
            change.emit(state, before, Reason::Expired, out);
        } else if g.effective_at.is_some_and(|e| e > now) {
            let before = state.balance();
            state.grants.push(slot);
            state.sort_grants();
            change.emit(state, before, Reason::GrantScheduled, out);
        } else {
            activate(state, slot, &change, Reason::Grant, out);
        }
        book.dirty.insert(Dirty::Meter(def.name.clone()));
        book.grants.insert(
            g.grant_id.clone(),
            Some(GrantRecord {
                meter: def.name.clone(),
                at: now,
                voided: false,
            }),
        );
        book.dirty.insert(Dirty::Grant(g.grant_id.clone()));
        Ok(Applied::Applied)
    }

    fn reserve(
        &self,
        book: &mut Book,
        r: &Reserve,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        let seen = book
            .reservations
            .get(&r.reservation_id)
            .expect("reservation record not loaded");
        if seen.is_some() {
            return Ok(Applied::Duplicate);
        }
        let def = self
            .meters
            .get(&r.meter)
            .ok_or_else(|| LedgerError::UnknownMeter(r.meter.to_string()))?;
        if r.units <= Decimal::ZERO {
            return Err(LedgerError::InvalidReservation(format!(
                "units must be > 0, got {}",
                r.units
            )));
        }
        if r.ttl_ms <= 0 {
            return Err(LedgerError::InvalidReservation("ttl must be > 0".into()));
        }
        self.ensure_meter(book, &def.name, now, out);
        let state = book.meters.get_mut(&def.name).expect("ensured");
        let expires_at = now.saturating_add(r.ttl_ms);
        let outcome = if state.holds.len() >= MAX_HOLDS {
            ReservationOutcome::TooMany
        } else if def.on_exhausted == OnExhausted::Block && state.available() < r.units {
            ReservationOutcome::Insufficient
        } else {
            ReservationOutcome::Held
        };
        if outcome == ReservationOutcome::Held {
            let before = state.balance();
            state.holds.push(Hold {
                id: r.reservation_id.clone(),
                units: r.units,
                expires_at,
            });
            state.reserved += r.units;
            let change = Change::new(&book.customer, def, now, r.reservation_id.as_str());
            change.emit(state, before, Reason::Reserved, out);
            book.dirty.insert(Dirty::Meter(def.name.clone()));
        }
        book.reservations.insert(
            r.reservation_id.clone(),
            Some(ReservationRecord {
                meter: def.name.clone(),
                units: r.units,
                expires_at,
                at: now,
                outcome,
            }),
        );
        book.dirty
            .insert(Dirty::Reservation(r.reservation_id.clone()));
        Ok(Applied::Applied)
    }

    fn release(
        &self,
        book: &mut Book,
        id: &ReservationId,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        let rec = book
            .reservations
            .get(id)
            .expect("reservation record not loaded")
            .clone()
            .ok_or(LedgerError::ReservationUnknown)?;
        let Some(def) = self.meters.get(&rec.meter) else {
            return Ok(Applied::Duplicate);
        };
        if rec.outcome != ReservationOutcome::Held {
            return Ok(Applied::Duplicate);
        }
        // A hold already ended, or whose ttl has run out (time ends it, not this release):
        // nothing to do, and nothing changes.
        let live = book
            .meters
            .get(&def.name)
            .is_some_and(|s| s.holds.iter().any(|h| &h.id == id && h.expires_at > now));
        if !live {
            return Ok(Applied::Duplicate);
        }
        self.ensure_meter(book, &def.name, now, out);
        let state = book.meters.get_mut(&def.name).expect("ensured");
        let before = state.balance();
        state
            .take_hold(id)
            .expect("a live hold outlasts the advance to now");
        let change = Change::new(&book.customer, def, now, id.as_str());
        change.emit(state, before, Reason::Released, out);
        book.dirty.insert(Dirty::Meter(def.name.clone()));
        Ok(Applied::Applied)
    }

    fn void_grant(
        &self,
        book: &mut Book,
        grant_id: &GrantId,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        let rec = book
            .grants
            .get(grant_id)
            .expect("grant record not loaded")
            .clone()
            .ok_or(LedgerError::VoidUnknown("grant"))?;
        if rec.voided {
            return Err(LedgerError::AlreadyVoided("grant"));
        }
        let def = self
            .meters
            .get(&rec.meter)
            .ok_or_else(|| LedgerError::UnknownMeter(rec.meter.to_string()))?;
        self.ensure_meter(book, &def.name, now, out);
        let state = book.meters.get_mut(&def.name).expect("ensured");
        let before = state.balance();
        if let Some(pos) = state.grants.iter().position(|g| &g.id == grant_id) {
            let g = state.grants.remove(pos);
            if g.active {
                state.credited -= g.remaining;
                if g.kind == GrantKind::Cycle && !g.cycle_ended {
                    state.cycle_credited -= g.remaining;
                }
            }
        }
        let change = Change::new(&book.customer, def, now, grant_id.as_str());
        change.emit(state, before, Reason::VoidGrant, out);
        book.dirty.insert(Dirty::Meter(def.name.clone()));
        book.grants.insert(
            grant_id.clone(),
            Some(GrantRecord {
                voided: true,
                ..rec
            }),
        );
        book.dirty.insert(Dirty::Grant(grant_id.clone()));
        Ok(Applied::Applied)
    }

    fn void_usage(
        &self,
        book: &mut Book,
        event_id: &EventId,
        now: i64,
        out: &mut Vec<Output>,
    ) -> Result<Applied, LedgerError> {
        let rec = book
            .events
            .get(event_id)
            .expect("event record not loaded")
            .clone()
            .ok_or(LedgerError::VoidUnknown("usage event"))?;
        if rec.voided {
            return Err(LedgerError::AlreadyVoided("usage event"));
        }
        for d in &rec.draws {
            let Some(def) = self.meters.get(&d.meter) else {
                continue;
            };
            self.ensure_meter(book, &def.name, now, out);
            let state = book.meters.get_mut(&def.name).expect("ensured");
            let before = state.balance();
            let mut orphan = Decimal::ZERO;
            for (gid, units) in &d.grants {
                match state.grants.iter_mut().find(|g| &g.id == gid && g.active) {
                    Some(g) => g.remaining += *units,
                    None => orphan += *units,
                }
            }
            // What the event took as debt repays the debt still open; what that debt has been
            // paid with since comes back as credit.
            let repay = d.debt.min(state.debt);
            state.debt -= repay;
            orphan += d.debt - repay;
            state.overage -= d.debt;
            state.blocked -= d.blocked;
            let returned: Decimal = d.grants.iter().map(|(_, u)| *u).sum::<Decimal>() + d.debt;
            state.voided += returned;
            if orphan > Decimal::ZERO {
                state.grants.push(GrantSlot {
                    id: GrantId::parse(format!("void:{event_id}"))
                        .unwrap_or_else(|_| GrantId::parse("void").expect("valid id")),
                    kind: GrantKind::Adjustment,
                    priority: 255,
                    effective_at: now,
                    expires_at: None,
                    subscription_id: None,
                    rollover: Decimal::ZERO,
                    amount: orphan,
                    remaining: orphan,
                    active: true,
                    cycle_ended: false,
                });
            }
            state.sort_grants();
            let change = Change::new(&book.customer, def, now, event_id.as_str());
            change.emit(state, before, Reason::VoidUsage, out);
            book.dirty.insert(Dirty::Meter(def.name.clone()));
        }
        book.events.insert(
            event_id.clone(),
            Some(EventRecord {
                voided: true,
                ..rec
            }),
        );
        book.dirty.insert(Dirty::Event(event_id.clone()));
        Ok(Applied::Applied)
    }
}

/// Makes `slot` active: ends earlier cycles (cycle grants), pays the debt, credits the rest.
fn activate(
    state: &mut MeterState,
    mut slot: GrantSlot,
    change: &Change<'_>,
    reason: Reason,
    out: &mut Vec<Output>,
) {
    let crossed_from = state.balance();
    if slot.kind == GrantKind::Cycle {
        let before = state.balance();
        let mut forfeited = Decimal::ZERO;
        let mut gone: BTreeSet<GrantId> = BTreeSet::new();
        for g in state.grants.iter_mut().filter(|g| {
            g.active
                && g.kind == GrantKind::Cycle
                && !g.cycle_ended
                && g.subscription_id == slot.subscription_id
        }) {
            let keep = g.remaining.min(g.rollover);
            forfeited += g.remaining - keep;
            g.remaining = keep;
            g.cycle_ended = true;
            if keep.is_zero() {
                gone.insert(g.id.clone());
            }
        }
        // A cycle grant ended now with nothing carried over is gone; one that carries credits
        // stays active (drained or not, even through later cycles) until its own expiry.
        state
            .grants
            .retain(|g| !(g.cycle_ended && g.remaining.is_zero() && gone.contains(&g.id)));
        state.cycle_credited = Decimal::ZERO;
        if forfeited > Decimal::ZERO {
            state.expired += forfeited;
            change.emit_crossing(state, before, None, Reason::CycleEnd, out);
        }
    }
    let before = state.balance();
    let pay = state.debt.min(slot.amount);
    state.debt -= pay;
    slot.remaining = slot.amount - pay;
    slot.active = true;
    state.credited += slot.amount;
    state.cycle_credited += slot.amount;
    if slot.remaining > Decimal::ZERO {
        state.grants.push(slot);
    }
    state.sort_grants();
    change.emit_crossing(state, before, Some(crossed_from), reason, out);
}

/// The next time-driven change of a meter at or before `now`: the soonest, and at one instant
/// activations (by `effective_at`, id) before grant expiries (draw-down order) before holds
/// running out (by id). A grant that starts and ends between two steps is credited, then
/// forfeited; a hold that ends before a grant expires is released first, whether time
/// reached both at once or one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// The pending grant at this index becomes active.
    Activation(usize),
    /// The active grant at this index expires.
    Expiry(usize),
    /// The hold at this index runs out.
    HoldEnd(usize),
}

impl Due {
    fn next(state: &MeterState, now: i64) -> Option<Self> {
        let activation = state
            .grants
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.active && g.effective_at <= now)
            .min_by(|(_, a), (_, b)| (a.effective_at, &a.id).cmp(&(b.effective_at, &b.id)))
            .map(|(i, g)| ((g.effective_at, 0u8), Due::Activation(i)));
        let expiry = state
            .grants
            .iter()
            .enumerate()
            .filter_map(|(i, g)| match g.expires_at {
                Some(at) if g.active && at <= now => Some((at, i, g)),
                _ => None,
            })
            .min_by(|a, b| (a.0, a.2.order_key()).cmp(&(b.0, b.2.order_key())))
            .map(|(at, i, _)| ((at, 1u8), Due::Expiry(i)));
        let hold = state
            .holds
            .iter()
            .enumerate()
            .filter(|(_, h)| h.expires_at <= now)
            .min_by(|(_, a), (_, b)| (a.expires_at, &a.id).cmp(&(b.expires_at, &b.id)))
            .map(|(i, h)| ((h.expires_at, 2u8), Due::HoldEnd(i)));
        [activation, expiry, hold]
            .into_iter()
            .flatten()
            .min_by_key(|(key, _)| *key)
            .map(|(_, due)| due)
    }
}
