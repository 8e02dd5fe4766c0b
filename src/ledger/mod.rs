//! The credit rules: a pure function of (state, input, now) -> (state, outputs).
//!
//! No I/O, no clock reads: `now` (processing time, ms since the epoch) is an input. The caller
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
//!   pipeline calls it before each input and on a periodic tick.
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
//! # Transitions (emitted on crossing only)
//! | from | to | emitted |
//! |---|---|---|
//! | balance > 0 | balance <= 0 | `BalanceExhausted`, state `exhausted` |
//! | `exhausted` | balance > 0 | `BalanceRestored` |
//! | balance >= t (armed) | balance < t | `BalanceLow{t}`, threshold disarmed |
//! | disarmed | balance >= t | (re-armed, nothing emitted) |
//! | balance >= `auto_top_up.below` (armed) | balance < `below` | [`TopUpRequested`] (`source: auto`), disarmed |
//! | auto top-up disarmed | balance >= `below` | (re-armed, nothing emitted) |
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

mod meter;
mod types;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use meter::{Aggregation, AutoTopUp, MeterDef, Meters, OnExhausted, Threshold};
pub use types::{
    check_amount, parse_amount, CustomerId, EventId, GrantId, MeterName, MAX_AMOUNT, MAX_ID_LEN,
    MAX_SCALE,
};

/// Why an input was rejected. The reason (`reason()`) is a short stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// An identifier is empty, too long or has control characters.
    #[error("invalid {kind}: {why}")]
    InvalidId {
        /// Which identifier.
        kind: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An amount is negative, not an exact decimal, too large or too precise.
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    /// A sum meter's property is missing from the event.
    #[error("missing property {0:?} needed by a sum meter")]
    MissingProperty(String),
    /// A grant refers to a meter that is not configured.
    #[error("unknown meter {0:?}")]
    UnknownMeter(String),
    /// A grant field is inconsistent (e.g. a cycle grant without subscription).
    #[error("invalid grant: {0}")]
    InvalidGrant(String),
    /// A void refers to an event or grant that is unknown (or older than the dedupe window).
    #[error("void of unknown {0}")]
    VoidUnknown(&'static str),
    /// A void refers to an event or grant already voided.
    #[error("{0} already voided")]
    AlreadyVoided(&'static str),
}

impl LedgerError {
    /// A short, bounded label for metrics and the DLQ's `error.reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            LedgerError::InvalidId { .. } => "invalid_id",
            LedgerError::InvalidAmount(_) => "invalid_amount",
            LedgerError::MissingProperty(_) => "missing_property",
            LedgerError::UnknownMeter(_) => "unknown_meter",
            LedgerError::InvalidGrant(_) => "invalid_grant",
            LedgerError::VoidUnknown(_) => "void_unknown",
            LedgerError::AlreadyVoided(_) => "void_duplicate",
        }
    }
}

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
}

/// The records (beyond the meter projections) an input needs loaded in the [`Book`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refs {
    /// Event records.
    pub events: Vec<EventId>,
    /// Grant records.
    pub grants: Vec<GrantId>,
}

impl Input {
    /// The customer the input belongs to.
    pub fn customer(&self) -> &CustomerId {
        match self {
            Input::Usage(u) => &u.customer,
            Input::Grant(g) => &g.customer,
            Input::VoidGrant { customer, .. } | Input::VoidUsage { customer, .. } => customer,
        }
    }

    /// Adds to `refs` the records this input reads.
    pub fn refs(&self, refs: &mut Refs) {
        match self {
            Input::Usage(u) => refs.events.push(u.id.clone()),
            Input::VoidUsage { event_id, .. } => refs.events.push(event_id.clone()),
            Input::Grant(g) => refs.grants.push(g.grant_id.clone()),
            Input::VoidGrant { grant_id, .. } => refs.grants.push(grant_id.clone()),
        }
    }

    /// The id that identifies this input in histories (`cause_id`).
    pub fn cause_id(&self) -> &str {
        match self {
            Input::Usage(u) => u.id.as_str(),
            Input::Grant(g) => g.grant_id.as_str(),
            Input::VoidGrant { grant_id, .. } => grant_id.as_str(),
            Input::VoidUsage { event_id, .. } => event_id.as_str(),
        }
    }
}

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
    fn order_key(&self) -> (u8, i64, i64, &str) {
        (
            self.priority,
            self.expires_at.unwrap_or(i64::MAX),
            self.effective_at,
            self.id.as_str(),
        )
    }
}

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

    fn sort_grants(&mut self) {
        self.grants.sort_by(|a, b| {
            b.active
                .cmp(&a.active)
                .then_with(|| a.order_key().cmp(&b.order_key()))
        });
    }

    /// Drained grants stay active (a void gives units back to them) until they expire, their
    /// cycle ends or they are voided; beyond [`MAX_DRAINED`] drained grants, the oldest drained
    /// ones are dropped so the projection stays bounded.
    fn prune_drained(&mut self) {
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
            .min()
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
}

impl Reason {
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
    /// Processing time (ms).
    pub at: i64,
}

/// A state transition, published on `balance-exhausted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Exhausted, restored or low.
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

/// A key of the state that a [`Book`] changed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dirty {
    /// A meter projection.
    Meter(MeterName),
    /// An event record.
    Event(EventId),
    /// A grant record.
    Grant(GrantId),
}

/// One customer's state as loaded for a batch.
#[derive(Clone, Debug)]
pub struct Book {
    /// The customer.
    pub customer: CustomerId,
    /// Meter projections present in the store (absent = never changed).
    pub meters: BTreeMap<MeterName, MeterState>,
    /// Event records loaded for the batch's [`Refs`]; `None` = not in the store.
    pub events: HashMap<EventId, Option<EventRecord>>,
    /// Grant records loaded for the batch's [`Refs`]; `None` = not in the store.
    pub grants: HashMap<GrantId, Option<GrantRecord>>,
    dirty: BTreeSet<Dirty>,
}

impl Book {
    /// An empty book (nothing stored yet for this customer).
    pub fn new(customer: CustomerId) -> Self {
        Self {
            customer,
            meters: BTreeMap::new(),
            events: HashMap::new(),
            grants: HashMap::new(),
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
    }
}

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

impl Change<'_> {
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
            at: self.now,
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

    /// Applies time: activates pending grants whose `effective_at <= now` and forfeits active
    /// grants whose `expires_at <= now`, on every meter of the book.
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
        // Activations first (in effective order), then expiries, so a grant that both starts
        // and ends within one tick is credited and then forfeited, keeping the books whole.
        let mut pending: Vec<GrantSlot> = Vec::new();
        state.grants.retain(|g| {
            if !g.active && g.effective_at <= now {
                pending.push(g.clone());
                false
            } else {
                true
            }
        });
        pending.sort_by_key(|g| (g.effective_at, g.id.clone()));
        for g in pending {
            let id = g.id.clone();
            let change = Change {
                customer: &book.customer,
                meter: def,
                now,
                cause_id: id.as_str(),
            };
            activate(state, g, &change, Reason::Activated, out);
        }
        let expiring: Vec<GrantId> = state
            .grants
            .iter()
            .filter(|g| g.active && g.expires_at.is_some_and(|e| e <= now))
            .map(|g| g.id.clone())
            .collect();
        for id in expiring {
            let before = state.balance();
            let pos = state
                .grants
                .iter()
                .position(|g| g.id == id)
                .expect("listed above");
            let g = state.grants.remove(pos);
            if g.remaining.is_zero() {
                continue;
            }
            state.expired += g.remaining;
            let change = Change {
                customer: &book.customer,
                meter: def,
                now,
                cause_id: id.as_str(),
            };
            change.emit(state, before, Reason::Expired, out);
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
            let mut left = q;
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
            let change = Change {
                customer: &book.customer,
                meter: def,
                now,
                cause_id: u.id.as_str(),
            };
            change.emit(state, before, Reason::Usage, out);
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
        book.meters.entry(name.clone()).or_default();
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
            effective_at: g
                .effective_at
                .unwrap_or(now)
                .min(now.max(g.effective_at.unwrap_or(now))),
            expires_at: g.expires_at,
            subscription_id: g.subscription_id.clone(),
            rollover: g.rollover,
            amount: g.amount,
            remaining: g.amount,
            active: false,
            cycle_ended: false,
        };
        let change = Change {
            customer: &book.customer,
            meter: def,
            now,
            cause_id: g.grant_id.as_str(),
        };
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
        let change = Change {
            customer: &book.customer,
            meter: def,
            now,
            cause_id: grant_id.as_str(),
        };
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
            let change = Change {
                customer: &book.customer,
                meter: def,
                now,
                cause_id: event_id.as_str(),
            };
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

#[cfg(test)]
mod tests;
