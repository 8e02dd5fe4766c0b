//! The credit rules: a pure function of (state, input, now) -> (state, outputs).
//!
//! No I/O, no clock reads: `now` (ms since the epoch) is an input: the time an input applies at
//! (its event time, or its partition's stream time when it is later than the grace), and for
//! [`Ledger::advance`] the stream time (see the table below). The caller
//! loads a [`Book`] for one customer (the meter projections and the event/grant records that the
//! inputs refer to, see [`Input::refs`]), applies inputs in order, then persists what
//! [`Book::take_dirty`] names and publishes the [`Output`]s. A rejected input (an `Err`) leaves the
//! book untouched.
//!
//! # Rules
//! - **Grants** stack. Each active grant keeps its remainder; usage drains them in draw-down order:
//!   priority ascending, then soonest `expires_at` (never-expiring last), then `effective_at`,
//!   then `grant_id`. A grant whose `effective_at` is in the future is *pending* until then.
//! - **Debt first**: in `overage` mode usage beyond the grants becomes a debt (negative balance,
//!   also counted in `overage`); a grant that becomes active pays the debt before anything else.
//! - **Block** mode: the balance never goes below 0; the excess of a usage event is counted in
//!   `blocked` and the event still gets a version (delta 0 when nothing was left).
//! - **Cycles**: a `cycle` grant for a subscription ends that subscription's earlier cycle grants on
//!   the meter; each keeps at most its `rollover` of its remainder, the rest is forfeited
//!   (`cycle_end`, counted in `expired`). Top-ups and adjustments are never ended by a cycle.
//! - **Expiry**: at `expires_at` (exclusive: a grant is usable while `now < expires_at`) the
//!   remainder is forfeited (`expired`). [`Ledger::advance`] applies expiries and activations; the
//!   pipeline calls it at stream time for every customer it touches, and on a periodic tick for
//!   those with something due; applying an input advances its meter to the input's time first.
//! - **Voids**: `VoidUsage` returns what the event drew to the grants it drew from when they are
//!   still active (else as a non-expiring adjustment), repays the debt it made, and takes back its
//!   blocked units. A grant drained to 0 is still active until it expires, its cycle ends (with
//!   nothing carried over) or it is voided; a meter keeps at most [`MAX_DRAINED`] drained grants
//!   (the oldest go first), so a void after that returns the units as an adjustment. `VoidGrant` removes a grant's remainder (active or pending). Voiding an unknown
//!   id or voiding twice is rejected and changes nothing.
//! - **Idempotency**: an event id or grant id already recorded is a duplicate and changes nothing.
//! - **Bookkeeping**: `balance = credited - consumed - expired + voided`, where `credited` is net
//!   of voided grants' remainders and `voided` counts usage given back.
//!
//! # Reservations (authorize, then settle)
//! A reservation holds units of one meter for a job about to run: `available = balance -
//! reserved`, where `reserved` is the sum of the meter's holds. A hold never changes the balance
//! or the bookkeeping; only the usage that settles it does.
//!
//! | input | when | effect | reason |
//! |---|---|---|---|
//! | `Reserve{id, meter, units, ttl}` | id new; `block` meter with `available >= units`, or any `overage` meter | hold `units` until `at + ttl`; version +1, delta 0 | `reserved` |
//! | `Reserve` | id new; `block` meter with `available < units` | refused (`insufficient`), recorded; no change of the meter | - |
//! | `Reserve` | id new; the meter has [`MAX_HOLDS`] holds | refused (`too_many`), recorded | - |
//! | `Reserve` | id seen before | nothing; the first answer stands (a repeated id gets it) | - |
//! | usage with `reservation_id` | the meter holds it | the hold ends, the usage draws its real amount | `settled` |
//! | usage with `reservation_id` | no such hold on the meter (settled, released, expired, other meter) | plain usage | `usage` |
//! | `Release{id}` | held | the hold ends; delta 0 | `released` |
//! | `Release{id}` | ended, its ttl run out (time ends it), refused, or its meter removed | nothing (`Duplicate`) | - |
//! | `Release{id}` | unknown id | rejected (`reservation_unknown`) | - |
//! | time reaches `at + ttl` | held | the hold ends (in [`Ledger::advance`], in time order with grants' activations and expiries, after them at the same instant; a usage or release at or past it sees it ended) | `reservation_expired` |
//!
//! On a `block` meter usage never draws units that *other* holds keep: it may draw
//! `balance - (reserved - its own hold)`, and the rest is blocked. So a settle gets at least
//! what it held, more only if nobody holds it, and plain usage cannot take what a running job
//! was promised. On an `overage` meter holds limit nothing (usage beyond the balance is
//! overage anyway); a hold may exceed the balance (`available` goes negative). Transitions
//! (`exhausted`, `low`, ...) follow the balance, not `available`. A reservation's record (its
//! first answer: meter, units, expiry, outcome) is kept for idempotency and releases until
//! the dedupe window has passed after its hold's end (the store forgets it with the usage ids
//! of that time); a release or a repeat after that is of an unknown id. Reservations arrive as `reserve` / `release` commands on `credit-grants` and as
//! usage with a `reservation_id` (see `docs/topics.md`).
//!
//! # Time
//! The pipeline keeps a stream time per partition (`kafka::pipeline::stream_time`: the newest
//! event time folded, less `pipeline.grace`), and folds each partition's grants and usage in
//! timestamp order (`kafka::pipeline::merge`). A meter's clock only moves forward: applying an
//! input at `t` first advances that meter to `t`. With a grace of 30 s:
//!
//! | input (partition stream time before it) | applied at | effect |
//! |---|---|---|
//! | usage at 10:00:00 (09:59:00) | 10:00:00 | draws from the grants valid at 10:00:00; stream time 09:59:30 |
//! | grant expiring 09:59:45, then usage at 09:59:40 (09:59:30) | 09:59:40 | still draws from it: the expiry has not run |
//! | usage at 09:59:20 (09:59:30) | 09:59:30 (late) | counted late, `late: true`; applied after what expired by 09:59:30 |
//! | nothing for a while, caught up | - | stream time follows the clock less the grace; the 09:59:45 expiry runs at 10:00:15 |
//! | usage from before an outage, arriving after it | its own time | the backlog applies before the expiries it preceded |
//! | a grant effective 10:05, usage at 10:06 | 10:06 | the grant is active for it (the meter advanced to 10:06) |
//!
//! # Transitions (emitted on crossing only)
//! | from | to | emitted |
//! |---|---|---|
//! | balance > 0 | balance <= 0 | `BalanceExhausted`, state `exhausted` |
//! | `exhausted` | balance > 0 | `BalanceRestored` |
//! | balance >= t (armed) | balance < t | `BalanceLow{t}`, threshold disarmed |
//! | disarmed | balance >= t | (re-armed, nothing emitted) |
//! | balance >= `auto_top_up.below` (armed) | balance < `below` | [`TopUpRequested`] (`source: auto`), disarmed |
//! | auto top-up disarmed | balance >= `below` | (re-armed, nothing emitted) |
//! | `runs_out_at` further than `forecast_alert`, or none (armed) | within it | `Forecast{runs_out_at}`, disarmed |
//! | forecast disarmed | further again, or none | (re-armed, nothing emitted) |
//!
//! The burn rate and `runs_out_at` are described in [`forecast`].
//!
//! An automatic top-up request's `request_id` is `auto:<customer>:<meter>:<version>` (the version
//! of the change that crossed), so it is the same on every replay, and a billing system that
//! grants with `grant_id = request_id` makes the whole loop idempotent.
//!
//! A meter that was never funded is not "exhausted" (it never crossed from > 0); its status still
//! reads `exhausted` while its balance is <= 0. A cycle's end and the grant opening the next cycle
//! are two changes but one crossing (from the balance before the end to the one after the grant).
//! Every change of a (customer, meter) projection increments its `version` by one and emits
//! exactly one [`BalanceChanged`].

mod error;
pub mod forecast;
mod ids;
mod input;
mod meter;
mod meter_states;
mod output;
mod rules;
mod state;

pub use error::{IdProblem, LedgerError};
pub use ids::{
    check_amount, check_id, parse_amount, CustomerId, EventId, GrantId, MeterName, ReservationId,
    MAX_AMOUNT, MAX_ID_LEN, MAX_SCALE,
};
pub use input::{Grant, GrantKind, Input, Refs, Reserve, Usage};
pub use meter::{
    default_burn_window, default_forecast_horizon, Aggregation, AutoTopUp, MeterDef, Meters,
    OnExhausted, Threshold,
};
pub use meter_states::MeterStates;
pub use output::{
    auto_top_up_request_id, Applied, BalanceChanged, Output, Reason, TopUpRequested, TopUpSource,
    Transition, TransitionKind,
};
pub use rules::Ledger;
pub use state::{
    Book, Dirty, EventRecord, GrantRecord, GrantSlot, Hold, MeterDraw, MeterState,
    ReservationOutcome, ReservationRecord, Status, MAX_DRAINED, MAX_HOLDS,
};

#[cfg(test)]
mod reservation_tests;
#[cfg(test)]
mod tests;
