//! # drawdown-model: one reference model of drawdown's credit rules
//!
//! The property tests of `drawdown::ledger` compare the ledger with this model step by step,
//! and the load generator (`drawdown-loadgen`) keeps its expectation of a whole run in it. It
//! is written from the ledger's documented rules, not from its code, and it does not depend on
//! the `drawdown` crate: a bug copied into both would not be found.
//!
//! It is deliberately naive: one customer's [`Customer`] holds plain lists; every balance is
//! recomputed from the grants, every draw-down order is a fresh sort, every due grant is found
//! by a linear scan, and an input is validated completely before anything changes. Clarity over
//! speed; nothing here is on a hot path.
//!
//! # Inputs and time
//! [`Rules::apply`] applies one [`Input`] at processing time `now` (ms) and [`Rules::advance`]
//! applies time alone (the service's periodic tick). Both push the [`Output`]s in the order the
//! ledger emits them. An input first applies time to the meters it touches. A [`Rejected`]
//! input changes nothing.
//!
//! # Rules
//! - **Meters** count usage events by `event` name and property `filter` (equal as text); a
//!   `count` meter adds 1 per event, a `sum` meter the event's property, an exact decimal
//!   ([`parse_amount`]). One event feeds every meter it matches; if any of them cannot read
//!   its quantity the whole event is rejected (`missing_property`, `invalid_amount`). An event
//!   matching no meter changes nothing and is not recorded ([`Applied::NoMeter`]).
//! - **Grants** become slots with a remainder. A grant whose `effective_at` is after `now` is
//!   *pending* (`grant_scheduled`, credited nothing) until time reaches it (`activated`). One
//!   whose `expires_at` is at or before `now` on arrival is credited and forfeited at once
//!   (`expired`). Rejected: unknown meter, amount <= 0, a cycle grant without subscription,
//!   `expires_at <= effective_at`.
//! - **Draw-down order**: priority ascending, then the soonest `expires_at` (never-expiring
//!   last), then `effective_at` (the arrival time when none was given), then grant id.
//! - **Debt first**: in `overage` mode usage beyond the grants is a debt (a negative balance,
//!   also counted in `overage`); a grant that becomes active pays the debt before it keeps
//!   anything. In `block` mode the balance floors at 0 and the excess is counted in `blocked`;
//!   the event still makes a version.
//! - **Cycles**: an activating `cycle` grant ends the earlier, not yet ended cycle grants of its
//!   subscription on the meter: each keeps at most its `rollover`, the rest is forfeited (one
//!   `cycle_end` change, counted in `expired`, when anything was); one left with nothing is
//!   removed. An ended grant is never ended again. The cycle's credits (the base of fractional
//!   thresholds) restart at the new grant. Top-ups and adjustments are never ended by a cycle.
//! - **Expiry**: a grant is usable while `now < expires_at`; at `expires_at` its remainder is
//!   forfeited (`expired`), activations of the same moment first. A drained grant expires
//!   without a change.
//! - **Time order**: when time moves, everything due (activations, grant expiries, holds
//!   running out) happens soonest first, so moving to `t` at once or in steps makes the same
//!   changes in the same order.
//! - **Drained grants** (remainder 0) stay, so a void can give back to them, until they expire,
//!   their cycle ends or they are voided; after a usage event a meter keeps at most
//!   [`MAX_DRAINED`] of them, dropping the oldest (`effective_at`, then id).
//! - **Voids**: `VoidUsage` gives each unit the event drew back to its grant if that grant is
//!   still held and active, repays the debt the event made as far as it is still open, and
//!   takes back its blocked units; what has no grant to go back to (and debt since paid by a
//!   grant) comes back as one adjustment `void:<event>` (plain `void` if that id would be too
//!   long) of priority 255 that never expires. `VoidGrant` removes the grant's remainder (a
//!   pending grant was never credited; a grant already gone still makes a version).
//!   Unknown ids are rejected (`void_unknown`), repeats too (`void_duplicate`).
//! - **Idempotency**: a usage event or grant id recorded before is a [`Applied::Duplicate`] and
//!   changes nothing, whatever the rest of its contents.
//! - **Versions**: every change of a meter increments its version by one and emits exactly one
//!   [`Change`] with its [`Reason`] and the id that caused it.
//! - **Reservations** hold units of one meter: `available = balance - reserved`. A reservation
//!   whose id was seen before changes nothing. A new one is refused (recorded, no change) when
//!   the meter has [`MAX_HOLDS`] holds, or on a `block` meter whose available units do not
//!   cover it; otherwise it holds (`reserved`, delta 0) until `now + ttl`. Usage naming a hold
//!   of its meter ends it and counts as `settled`; on a `block` meter usage draws at most the
//!   balance less what *other* holds keep (the rest is blocked). A release of a held one ends
//!   it (`released`); of an ended, expired (`expires_at <= now`) or refused one changes nothing; of an unknown id is
//!   rejected (`reservation_unknown`). At `expires_at` a hold ends (`reservation_expired`),
//!   after the grants' expiries of that moment, soonest first, then by id.
//! - **Bookkeeping**: `balance = credited - consumed - expired + voided`, where `credited` is
//!   net of voided grants' remainders and `voided` counts the usage given back.
//!
//! # Transitions (on crossing only)
//! | from | to | emitted |
//! |---|---|---|
//! | balance > 0 | balance <= 0 | `exhausted` |
//! | exhausted | balance > 0 | `restored` |
//! | balance >= t (armed) | balance < t | `low` with threshold t, disarmed |
//! | disarmed | balance >= t | re-armed, nothing emitted |
//! | balance >= `below` (armed) | balance < `below` | a [`TopUp`] request, disarmed |
//! | disarmed | balance >= `below` | re-armed, nothing emitted |
//!
//! A threshold given as a fraction is that fraction of the cycle's credits, and is not judged
//! while those are 0. A meter never funded does not become exhausted (it never was > 0). A
//! cycle's end and the grant opening the next cycle are two versions but one crossing, judged
//! from the balance before the end to the balance after the grant. An automatic top-up's
//! request id is `auto:<customer>:<meter>:<version>` (see [`auto_top_up_request_id`]).

mod amount;
mod book;
mod input;
mod meter;
mod output;
mod rules;

pub use amount::parse_amount;
pub use book::{
    Customer, Draw, EventSeen, GrantSeen, Hold, MeterBook, ReservationSeen, Slot, Status,
    MAX_DRAINED, MAX_HOLDS,
};
pub use input::{Applied, Grant, GrantKind, Input, Rejected, Reserve, Usage};
pub use meter::{Aggregation, AutoTopUp, Low, Meter, OnExhausted};
pub use output::{
    auto_top_up_request_id, Change, Output, Reason, TopUp, Transition, TransitionKind,
};
pub use rules::Rules;

#[cfg(test)]
mod tests;
