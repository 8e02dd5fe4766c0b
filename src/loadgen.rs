//! The load generator (`drawdown produce`), its own reference model, and the verifier
//! (`drawdown verify`, `drawdown wait-idle`).
//!
//! # What is generated
//! `produce --phase` chooses the records, for customers `<prefix>-0 .. <prefix>-(N-1)` over the
//! configured meters, keyed by `customer_id`, written by an idempotent producer with the Java
//! client's partitioner (`murmur2_random`), as JSON or protobuf (`content-type` header):
//! - `grants`: per customer x meter, for most customers a `cycle` grant of subscription
//!   `<customer>-s1` (some also `-s2`; rollover cap 0, a quarter or all of it; priority 10 or
//!   50), and (always for the others) a `top_up` or `adjustment` stacked on it (priorities
//!   0-200, a fifth with a far expiry), sized around the usage planned by `--events`;
//! - `expiring`: for some meters a top-up expiring `--expire-in` from now (priority 0 or 10,
//!   so usage draws it first), for some a grant scheduled to start a second before that (a
//!   few of them cycle grants: a renewal on a tick);
//! - `expire`: the time barrier, sends nothing: run after `wait-idle`, it fails unless every
//!   input so far was processed before the first pending activation/expiry, sleeps until 3 s
//!   past the last one (the periodic tick applies them without new events) and applies them
//!   to the model;
//! - `usage`: `--events` usage events; the event names are the meters' `event`s, sum meters get
//!   exact decimal quantities (`"12.5"`), and an event matching several meters (the example's
//!   `llm_completion` feeds `tokens` and `llm_requests`) draws from each. `--duplicates F`
//!   re-sends a fraction of them with the same id, and F/2 reuse ids of earlier phases' events
//!   (voided or not) with other contents (all must be counted once);
//! - `topups`: top-ups for a random subset, restoring most of the exhausted meters (and, on
//!   purpose, paying only part of some debts so they stay exhausted);
//! - `renewal`: a new cycle grant for every subscription (half of the second ones): the
//!   previous cycle ends, its remainder carried over up to the rollover cap; some top-ups;
//! - `voids`: for a random subset of customers `VoidGrant` (often of a grant that a kept
//!   event drew from), `VoidUsage` of kept events (a sample of the usage, some of which drew
//!   from grants since expired, ended or voided: returned as `void:<event>` adjustments),
//!   repeated voids (DLQ `void_duplicate`) and voids of unknown ids (DLQ `void_unknown`);
//! - `mixed`: usage with grants and top-ups interleaved, for demos and throughput. The relative
//!   order of two topics is not defined, so nothing exact can be predicted: `--expect` is refused.
//!
//! The grant phases also replay a few known grant ids (another amount: ignored). `--bad N` adds
//! N malformed records (garbage bytes, wrong types, missing fields, a negative amount, an
//! unknown meter, ...) that must end in the DLQ and change nothing.
//!
//! # The expectation
//! `--expect FILE` keeps, across phases, what drawdown must end with, computed by the generator's
//! own model ([`Expected`]), deliberately independent of `crate::ledger`: per (customer, meter)
//! every grant with its remainder in draw-down order, the totals (`expired` and `voided`
//! included), one reason letter per version and the ordered transitions (exhausted, restored,
//! low); per customer the grant ids and a sample of usage events with what they drew (for
//! voids); per run the DLQ records expected. It is exact because:
//! - each customer's records go to one partition of one topic per phase, in order (idempotent
//!   producer), voids and grants on the same topic, and phases are separated by `wait-idle`;
//! - the only time-driven changes are the `expiring` phase's, and the `expire` barrier proves
//!   that nothing else was processed at or after them and sends nothing before they are due
//!   (the pipeline applies due changes before any later input);
//! - the ledger breaks draw-down ties by `effective_at` (processing time) then `grant_id`; the
//!   model uses activation order instead, which agrees because a customer's grants are
//!   processed in sending order, ids of one phase sort in sending order (zero-padded), later
//!   phases are processed later, and priority 255 is left to the `void:` adjustments, which
//!   the `voids` phase creates in ascending event id order.
//!
//! Not generated (so not modelled ambiguously): grants already expired on arrival, voids of
//! pending grants, more than [`MAX_DRAINED`] drained grants per meter (the model does prune
//! like the ledger, and `verify` reports if it ever did), and `mixed` with an expectation.
//!
//! # Verification
//! `verify` compares the expectation with (a) the HTTP API (totals, `expired`, `voided`,
//! version, and each grant's remainder in order), (b) every `balance-changed` record of the
//! expectation's customers (exactly one per version, no gaps, the reason of each version, the
//! last balance), (c) the transitions on `balance-exhausted`, one for one, and (d) the DLQ
//! records of the run's customers (`void_duplicate`, `void_unknown`, and the total).
//! `wait-idle` waits until the consumer group has committed every input record.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::codec::{self, pb};
use crate::config::Config;
use crate::ledger::{Aggregation, MeterDef, OnExhausted, Threshold};

// ------------------------------------------------------------------------------------------
// Command-line arguments
// ------------------------------------------------------------------------------------------

/// What `produce` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Cycle grants, top-ups and adjustments per customer x meter.
    Grants,
    /// Grants expiring (or starting) `--expire-in` from now.
    Expiring,
    /// The time barrier after `expiring` and the usage it covers (sends nothing).
    Expire,
    /// `--events` usage events (plus `--duplicates`).
    Usage,
    /// Top-ups for a random subset, restoring some exhausted meters.
    Topups,
    /// A new billing cycle for every subscription.
    Renewal,
    /// Voids of usage and grants, repeated and unknown ones.
    Voids,
    /// Usage with grants interleaved (no exact expectation).
    Mixed,
}

/// Encoding of the generated records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `application/json`.
    Json,
    /// `application/x-protobuf`.
    Protobuf,
}

/// `drawdown produce`.
#[derive(Clone, Debug, clap::Args)]
pub struct ProduceArgs {
    /// What to send.
    #[arg(long, value_enum, default_value_t = Phase::Mixed)]
    pub phase: Phase,
    /// Number of customers (`<prefix>-0` ..).
    #[arg(long, default_value_t = 100)]
    pub customers: usize,
    /// Customer id prefix.
    #[arg(long, default_value = "cus")]
    pub prefix: String,
    /// Usage events to send (usage, mixed); for the grant phases, the usage volume per usage
    /// phase that the amounts are sized for.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Target rate in records/s (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Record encoding.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Fraction of usage events re-sent with the same id.
    #[arg(long, default_value_t = 0.01)]
    pub duplicates: f64,
    /// `expiring`: how far in the future the grants expire (must cover the processing of
    /// everything sent before the `expire` barrier).
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub expire_in: Duration,
    /// RNG seed (with `--expect`, each phase also mixes in its sequence number).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Expectation file: loaded if present, updated with this phase, saved.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// Additionally send this many malformed records (they must land in the DLQ).
    #[arg(long, default_value_t = 0)]
    pub bad: u64,
}

/// `drawdown verify`.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// The expectation file written by `produce --expect`.
    #[arg(long)]
    pub expect: PathBuf,
    /// Base URL of the API (default `http://<api.listen>`).
    #[arg(long)]
    pub api: Option<String>,
    /// How long the balances may take to catch up before a mismatch is final.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

/// `drawdown wait-idle`.
#[derive(Clone, Debug, clap::Args)]
pub struct WaitIdleArgs {
    /// Give up (non-zero exit) after this long.
    #[arg(long, default_value = "600s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// `600` (seconds) or a humantime duration (`10m`).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

// ------------------------------------------------------------------------------------------
// The reference model
// ------------------------------------------------------------------------------------------

/// A low-balance threshold, as the model sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Low {
    Units(Decimal),
    Fraction(Decimal),
}

/// A meter as the model and the generator see it (copied from the config once).
#[derive(Clone, Debug)]
struct RefMeter {
    name: String,
    event: String,
    filter: BTreeMap<String, String>,
    /// `Some(property)` for sum meters.
    sum: Option<String>,
    block: bool,
    lows: Vec<Low>,
}

impl RefMeter {
    fn from_def(d: &MeterDef) -> Self {
        Self {
            name: d.name.to_string(),
            event: d.event.clone(),
            filter: d.filter.clone(),
            sum: match &d.aggregation {
                Aggregation::Count => None,
                Aggregation::Sum { property } => Some(property.clone()),
            },
            block: d.on_exhausted == OnExhausted::Block,
            lows: d
                .low_balance
                .iter()
                .map(|t| match *t {
                    Threshold::Units(u) => Low::Units(u),
                    Threshold::Fraction(f) => Low::Fraction(f),
                })
                .collect(),
        }
    }

    /// The quantity an event adds to this meter, `None` if the meter does not count it.
    fn quantity(&self, name: &str, props: &BTreeMap<String, String>) -> Option<Decimal> {
        if self.event != name || self.filter.iter().any(|(k, v)| props.get(k) != Some(v)) {
            return None;
        }
        match &self.sum {
            None => Some(Decimal::ONE),
            Some(p) => props
                .get(p)
                .map(|v| Decimal::from_str(v).expect("generated decimals parse")),
        }
    }
}

/// The meter named `name` among `meters`.
fn ref_meter<'a>(meters: &'a [RefMeter], name: &str) -> &'a RefMeter {
    meters
        .iter()
        .find(|m| m.name == name)
        .expect("a configured meter")
}

/// The kind of a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Cycle,
    TopUp,
    Adjustment,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Cycle => "cycle",
            Kind::TopUp => "top_up",
            Kind::Adjustment => "adjustment",
        }
    }
}

/// Why a version was made, one letter per version in [`Expected::reasons`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Grant,
    Scheduled,
    Activated,
    Expired,
    CycleEnd,
    Usage,
    VoidUsage,
    VoidGrant,
}

impl Why {
    const ALL: [Why; 8] = [
        Why::Grant,
        Why::Scheduled,
        Why::Activated,
        Why::Expired,
        Why::CycleEnd,
        Why::Usage,
        Why::VoidUsage,
        Why::VoidGrant,
    ];

    fn code(self) -> char {
        match self {
            Why::Grant => 'g',
            Why::Scheduled => 's',
            Why::Activated => 'a',
            Why::Expired => 'x',
            Why::CycleEnd => 'c',
            Why::Usage => 'u',
            Why::VoidUsage => 'v',
            Why::VoidGrant => 'w',
        }
    }

    /// The `reason` of `balance-changed`.
    fn label(self) -> &'static str {
        match self {
            Why::Grant => "grant",
            Why::Scheduled => "grant_scheduled",
            Why::Activated => "activated",
            Why::Expired => "expired",
            Why::CycleEnd => "cycle_end",
            Why::Usage => "usage",
            Why::VoidUsage => "void_usage",
            Why::VoidGrant => "void_grant",
        }
    }

    fn from_code(c: char) -> Option<Why> {
        Why::ALL.into_iter().find(|w| w.code() == c)
    }

    fn from_label(s: &str) -> Option<Why> {
        Why::ALL.into_iter().find(|w| w.label() == s)
    }
}

/// One expected transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ExpectedTransition {
    /// exhausted | restored | low.
    kind: String,
    /// The version of the change that crossed.
    version: u64,
    /// The threshold (low only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threshold: Option<Decimal>,
}

/// One grant held by a meter in the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Slot {
    id: String,
    kind: Kind,
    priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    /// When a pending (scheduled) grant becomes active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    effective_at: Option<i64>,
    /// Order of activation within the meter: stands for the ledger's `(effective_at,
    /// grant_id)` tie-breaks (see the module docs for why they agree).
    seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subscription: Option<String>,
    rollover: Decimal,
    amount: Decimal,
    remaining: Decimal,
    active: bool,
    cycle_ended: bool,
}

impl Slot {
    fn expiry_key(&self) -> i64 {
        self.expires_at.unwrap_or(i64::MAX)
    }
}

/// What a usage event drew from one meter: what a void gives back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Draw {
    meter: String,
    /// (grant, units) per grant drawn.
    grants: Vec<(String, Decimal)>,
    debt: Decimal,
    blocked: Decimal,
}

/// The most drained grants a meter keeps (the ledger's `MAX_DRAINED`, restated).
const MAX_DRAINED: usize = 16;

/// What one (customer, meter) must show, computed by the model's own bookkeeping:
/// - grants are slots with a remainder, drawn in order: priority, soonest expiry (never last),
///   then activation order; a grant pays the debt first; a `cycle` grant first ends its
///   subscription's earlier cycle grants (each keeps at most its rollover, the rest is
///   forfeited as `cycle_end`, counted in `expired`);
/// - usage `q` draws from the slots in order; what is left becomes debt and `overage`
///   (overage mode) or `blocked` (block mode);
/// - at its expiry a slot's remainder is forfeited (`expired`, one version if > 0);
/// - a void of usage gives each unit back to the slot it came from while that slot exists,
///   else (and for debt already repaid) as a priority-255 adjustment `void:<event>`;
///   a void of a grant removes its slot (its remainder leaves `credited`);
/// - `balance = remainders - debt`; every change is one version with its reason letter;
/// - transitions on crossing only, a renewal judged once from before its cycle end.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Expected {
    credited: Decimal,
    consumed: Decimal,
    overage: Decimal,
    blocked: Decimal,
    #[serde(default)]
    expired: Decimal,
    #[serde(default)]
    voided: Decimal,
    #[serde(default)]
    debt: Decimal,
    /// Credits granted since the current cycle began (base of fractional thresholds).
    #[serde(default)]
    cycle_credited: Decimal,
    balance: Decimal,
    version: u64,
    exhausted: bool,
    /// Per threshold: armed (`true` until it fires).
    low_armed: Vec<bool>,
    /// Active slots in draw-down order, then pending ones.
    #[serde(default)]
    slots: Vec<Slot>,
    /// Activation counter (see [`Slot::seq`]).
    #[serde(default)]
    seq: u64,
    /// One [`Why::code`] per version.
    #[serde(default)]
    reasons: String,
    /// Drained slots dropped beyond [`MAX_DRAINED`] (the workload keeps this at 0).
    #[serde(default)]
    pruned: u64,
    transitions: Vec<ExpectedTransition>,
}

impl Expected {
    /// Remainders of the active slots minus the debt.
    fn live_balance(&self) -> Decimal {
        self.slots
            .iter()
            .filter(|s| s.active)
            .map(|s| s.remaining)
            .sum::<Decimal>()
            - self.debt
    }

    /// Active slots first in draw-down order, then pending ones (by priority, expiry,
    /// effective time, id, as the ledger lists them).
    fn sort(&mut self) {
        self.slots.sort_by(|a, b| {
            b.active.cmp(&a.active).then_with(|| {
                (a.priority, a.expiry_key())
                    .cmp(&(b.priority, b.expiry_key()))
                    .then_with(|| {
                        if a.active {
                            a.seq.cmp(&b.seq)
                        } else {
                            (a.effective_at, &a.id).cmp(&(b.effective_at, &b.id))
                        }
                    })
            })
        });
    }

    /// Records one change: a version with its reason and, when `crossed_from` is given, the
    /// transitions crossed from that balance.
    fn emit(&mut self, m: &RefMeter, why: Why, crossed_from: Option<Decimal>) {
        let after = self.live_balance();
        self.balance = after;
        self.version += 1;
        self.reasons.push(why.code());
        let Some(before) = crossed_from else { return };
        let zero = Decimal::ZERO;
        let version = self.version;
        if before > zero && after <= zero && !self.exhausted {
            self.exhausted = true;
            self.transitions.push(ExpectedTransition {
                kind: "exhausted".into(),
                version,
                threshold: None,
            });
        } else if self.exhausted && after > zero {
            self.exhausted = false;
            self.transitions.push(ExpectedTransition {
                kind: "restored".into(),
                version,
                threshold: None,
            });
        }
        self.low_armed.resize(m.lows.len(), true);
        for (i, low) in m.lows.iter().enumerate() {
            let t = match *low {
                Low::Units(u) => u,
                Low::Fraction(_) if self.cycle_credited <= zero => continue,
                Low::Fraction(f) => f * self.cycle_credited,
            };
            if self.low_armed[i] && before >= t && after < t {
                self.low_armed[i] = false;
                self.transitions.push(ExpectedTransition {
                    kind: "low".into(),
                    version,
                    threshold: Some(t),
                });
            } else if !self.low_armed[i] && after >= t {
                self.low_armed[i] = true;
            }
        }
    }

    /// A grant arrives: pending if it has an `effective_at` (the generator only sets future
    /// ones), else active now.
    fn grant(&mut self, m: &RefMeter, g: &GrantCmd) {
        let slot = Slot {
            id: g.grant_id.clone(),
            kind: g.kind,
            priority: g.priority,
            expires_at: g.expires_at,
            effective_at: g.effective_at,
            seq: 0,
            subscription: g.subscription_id.clone(),
            rollover: g.rollover.unwrap_or_default(),
            amount: g.amount,
            remaining: g.amount,
            active: false,
            cycle_ended: false,
        };
        if g.effective_at.is_some() {
            let before = self.live_balance();
            self.slots.push(slot);
            self.sort();
            self.emit(m, Why::Scheduled, Some(before));
        } else {
            self.activate(m, slot, Why::Grant);
        }
    }

    /// A grant becomes active: a cycle grant ends the earlier cycle of its subscription, the
    /// debt is paid, the rest becomes a slot.
    fn activate(&mut self, m: &RefMeter, mut slot: Slot, why: Why) {
        let crossed_from = self.live_balance();
        if slot.kind == Kind::Cycle {
            let mut forfeited = Decimal::ZERO;
            let mut gone = BTreeSet::new();
            for s in self.slots.iter_mut().filter(|s| {
                s.active
                    && s.kind == Kind::Cycle
                    && !s.cycle_ended
                    && s.subscription == slot.subscription
            }) {
                let keep = s.remaining.min(s.rollover);
                forfeited += s.remaining - keep;
                s.remaining = keep;
                s.cycle_ended = true;
                if keep.is_zero() {
                    gone.insert(s.id.clone());
                }
            }
            self.slots
                .retain(|s| !(s.cycle_ended && s.remaining.is_zero() && gone.contains(&s.id)));
            self.cycle_credited = Decimal::ZERO;
            if forfeited > Decimal::ZERO {
                self.expired += forfeited;
                self.emit(m, Why::CycleEnd, None);
            }
        }
        let pay = self.debt.min(slot.amount);
        self.debt -= pay;
        slot.remaining = slot.amount - pay;
        slot.active = true;
        self.seq += 1;
        slot.seq = self.seq;
        self.credited += slot.amount;
        self.cycle_credited += slot.amount;
        if slot.remaining > Decimal::ZERO {
            self.slots.push(slot);
        }
        self.sort();
        self.emit(m, why, Some(crossed_from));
    }

    /// Time reaches `now`: pending grants due become active (in effective order), then active
    /// grants due expire (in draw-down order).
    fn advance(&mut self, m: &RefMeter, now: i64) {
        let mut due: Vec<Slot> = Vec::new();
        self.slots.retain(|s| {
            let start = !s.active && s.effective_at.is_some_and(|e| e <= now);
            if start {
                due.push(s.clone());
            }
            !start
        });
        due.sort_by(|a, b| (a.effective_at, &a.id).cmp(&(b.effective_at, &b.id)));
        for s in due {
            self.activate(m, s, Why::Activated);
        }
        let expiring: Vec<String> = self
            .slots
            .iter()
            .filter(|s| s.active && s.expires_at.is_some_and(|x| x <= now))
            .map(|s| s.id.clone())
            .collect();
        for id in expiring {
            let before = self.live_balance();
            let pos = self.slots.iter().position(|s| s.id == id).expect("listed");
            let s = self.slots.remove(pos);
            if s.remaining.is_zero() {
                continue;
            }
            self.expired += s.remaining;
            self.emit(m, Why::Expired, Some(before));
        }
    }

    /// Usage of `q > 0` units; returns what it drew.
    fn usage(&mut self, m: &RefMeter, q: Decimal) -> Draw {
        let before = self.live_balance();
        let mut left = q;
        let mut drawn = Vec::new();
        for s in self.slots.iter_mut().filter(|s| s.active) {
            if left.is_zero() {
                break;
            }
            let take = left.min(s.remaining);
            if take > Decimal::ZERO {
                s.remaining -= take;
                left -= take;
                drawn.push((s.id.clone(), take));
            }
        }
        self.prune_drained();
        let (debt, blocked) = if m.block {
            self.blocked += left;
            self.consumed += q - left;
            (Decimal::ZERO, left)
        } else {
            self.debt += left;
            self.overage += left;
            self.consumed += q;
            (left, Decimal::ZERO)
        };
        self.emit(m, Why::Usage, Some(before));
        Draw {
            meter: m.name.clone(),
            grants: drawn,
            debt,
            blocked,
        }
    }

    /// Beyond [`MAX_DRAINED`] drained slots, the oldest drained ones go.
    fn prune_drained(&mut self) {
        let mut drained: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.active && s.remaining.is_zero())
            .map(|s| s.seq)
            .collect();
        if drained.len() <= MAX_DRAINED {
            return;
        }
        drained.sort_unstable();
        let drop: BTreeSet<u64> = drained[..drained.len() - MAX_DRAINED]
            .iter()
            .copied()
            .collect();
        self.pruned += drop.len() as u64;
        self.slots
            .retain(|s| !(s.active && s.remaining.is_zero() && drop.contains(&s.seq)));
    }

    /// A void of a usage event that drew `d` from this meter.
    fn void_usage(&mut self, m: &RefMeter, d: &Draw, event_id: &str) {
        let before = self.live_balance();
        let mut orphan = Decimal::ZERO;
        for (id, units) in &d.grants {
            match self.slots.iter_mut().find(|s| &s.id == id && s.active) {
                Some(s) => s.remaining += *units,
                None => orphan += *units,
            }
        }
        let repay = d.debt.min(self.debt);
        self.debt -= repay;
        orphan += d.debt - repay;
        self.overage -= d.debt;
        self.blocked -= d.blocked;
        self.voided += d.grants.iter().map(|(_, u)| *u).sum::<Decimal>() + d.debt;
        if orphan > Decimal::ZERO {
            self.seq += 1;
            self.slots.push(Slot {
                id: format!("void:{event_id}"),
                kind: Kind::Adjustment,
                priority: 255,
                expires_at: None,
                effective_at: None,
                seq: self.seq,
                subscription: None,
                rollover: Decimal::ZERO,
                amount: orphan,
                remaining: orphan,
                active: true,
                cycle_ended: false,
            });
        }
        self.sort();
        self.emit(m, Why::VoidUsage, Some(before));
    }

    /// A void of a grant of this meter (its slot may be gone already: still one version).
    fn void_grant(&mut self, m: &RefMeter, grant_id: &str) {
        let before = self.live_balance();
        if let Some(pos) = self.slots.iter().position(|s| s.id == grant_id) {
            let s = self.slots.remove(pos);
            if s.active {
                self.credited -= s.remaining;
                if s.kind == Kind::Cycle && !s.cycle_ended {
                    self.cycle_credited -= s.remaining;
                }
            }
        }
        self.emit(m, Why::VoidGrant, Some(before));
    }

    /// The earliest pending activation or expiry.
    fn next_due(&self) -> Option<i64> {
        self.slots
            .iter()
            .filter_map(|s| {
                if s.active {
                    s.expires_at
                } else {
                    s.effective_at
                }
            })
            .min()
    }
}

/// A grant id the model has seen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct GrantInfo {
    meter: String,
    voided: bool,
}

/// A usage event kept for voids (a sample).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EventInfo {
    draws: Vec<Draw>,
    voided: bool,
}

/// The unvoided events a customer keeps for later voids.
const KEEP_EVENTS: usize = 4;

/// One customer in the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct CustomerModel {
    /// meter -> expected.
    meters: BTreeMap<String, Expected>,
    /// Every grant id sent (for replays and voids).
    #[serde(default)]
    grants: BTreeMap<String, GrantInfo>,
    /// A sample of the usage events (for voids and replays).
    #[serde(default)]
    events: BTreeMap<String, EventInfo>,
    /// meter -> subscriptions with cycle grants.
    #[serde(default)]
    subs: BTreeMap<String, Vec<String>>,
}

impl CustomerModel {
    fn meter(&mut self, name: &str) -> &mut Expected {
        self.meters.entry(name.into()).or_default()
    }

    /// A grant; `false` if its id was seen before (then nothing changes).
    fn grant(&mut self, m: &RefMeter, g: &GrantCmd) -> bool {
        if self.grants.contains_key(&g.grant_id) {
            return false;
        }
        self.grants.insert(
            g.grant_id.clone(),
            GrantInfo {
                meter: m.name.clone(),
                voided: false,
            },
        );
        if let (Kind::Cycle, Some(sub)) = (g.kind, &g.subscription_id) {
            let subs = self.subs.entry(m.name.clone()).or_default();
            if !subs.contains(sub) {
                subs.push(sub.clone());
            }
        }
        self.meter(&m.name).grant(m, g);
        true
    }

    /// A new usage event (never a duplicate); returns what it drew per meter.
    fn usage(&mut self, meters: &[RefMeter], e: &UsageEv) -> Vec<Draw> {
        let mut draws = Vec::new();
        for m in meters {
            if let Some(q) = m.quantity(&e.name, &e.properties) {
                if !q.is_zero() {
                    draws.push(self.meter(&m.name).usage(m, q));
                }
            }
        }
        draws
    }

    /// Keeps `id` for later voids, replacing a random kept one beyond [`KEEP_EVENTS`].
    fn remember(&mut self, id: &str, draws: Vec<Draw>, rng: &mut StdRng) {
        let kept: Vec<String> = self
            .events
            .iter()
            .filter(|(_, e)| !e.voided)
            .map(|(k, _)| k.clone())
            .collect();
        if kept.len() >= KEEP_EVENTS {
            self.events.remove(&kept[rng.random_range(0..kept.len())]);
        }
        self.events.insert(
            id.into(),
            EventInfo {
                draws,
                voided: false,
            },
        );
    }

    /// A `VoidUsage`; `Err(DLQ reason)` when the ledger must reject it.
    fn void_usage(&mut self, meters: &[RefMeter], event_id: &str) -> Result<(), &'static str> {
        let ev = self.events.get_mut(event_id).ok_or("void_unknown")?;
        if ev.voided {
            return Err("void_duplicate");
        }
        ev.voided = true;
        let draws = ev.draws.clone();
        for d in &draws {
            let m = ref_meter(meters, &d.meter);
            self.meter(&d.meter).void_usage(m, d, event_id);
        }
        Ok(())
    }

    /// A `VoidGrant`; `Err(DLQ reason)` when the ledger must reject it.
    fn void_grant(&mut self, meters: &[RefMeter], grant_id: &str) -> Result<(), &'static str> {
        let g = self.grants.get_mut(grant_id).ok_or("void_unknown")?;
        if g.voided {
            return Err("void_duplicate");
        }
        g.voided = true;
        let meter = g.meter.clone();
        self.meter(&meter)
            .void_grant(ref_meter(meters, &meter), grant_id);
        Ok(())
    }
}

/// The expectation file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Expectation {
    /// Customer id prefix of the run.
    prefix: String,
    /// Phases produced so far (part of the record ids and of the RNG seed).
    phases: u64,
    /// customer -> model.
    customers: BTreeMap<String, CustomerModel>,
    /// Pending time-driven changes (activations, expiries): the first and the last time.
    #[serde(default)]
    due: Option<(i64, i64)>,
    /// Expected DLQ records of the run's customers: `void_duplicate`, `void_unknown`, and
    /// `malformed` (the `--bad` records, whatever their reason).
    #[serde(default)]
    dlq: BTreeMap<String, u64>,
}

impl Expectation {
    fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    fn customer(&mut self, customer: &str) -> &mut CustomerModel {
        self.customers.entry(customer.into()).or_default()
    }

    fn get(&self, customer: &str, meter: &str) -> Option<&Expected> {
        self.customers
            .get(customer)
            .and_then(|c| c.meters.get(meter))
    }

    /// Notes a pending time-driven change at `at`.
    fn due_at(&mut self, at: i64) {
        self.due = Some(match self.due {
            None => (at, at),
            Some((a, b)) => (a.min(at), b.max(at)),
        });
    }

    fn count_dlq(&mut self, reason: &str, n: u64) {
        if n > 0 {
            *self.dlq.entry(reason.into()).or_default() += n;
        }
    }

    /// Applies every pending activation and expiry up to `now`.
    fn advance(&mut self, meters: &[RefMeter], now: i64) {
        for c in self.customers.values_mut() {
            for (name, e) in c.meters.iter_mut() {
                if e.next_due().is_some_and(|d| d <= now) {
                    e.advance(ref_meter(meters, name), now);
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// produce
// ------------------------------------------------------------------------------------------

/// Which input topic a record goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topic {
    Usage,
    Grants,
}

/// One record to send.
#[derive(Clone, Debug)]
struct Rec {
    topic: Topic,
    key: String,
    payload: Vec<u8>,
    content_type: &'static str,
}

/// Counts delivery failures (an idempotent producer either delivers in order or fails).
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            self.first
                .lock()
                .expect("not poisoned")
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// The producer, the pacing and the counts.
struct Sender {
    producer: BaseProducer<Deliveries>,
    usage_topic: String,
    grants_topic: String,
    rate: f64,
    started: Instant,
    sent: u64,
    counts: BTreeMap<&'static str, u64>,
}

impl Sender {
    fn new(cfg: &Config, rate: f64) -> anyhow::Result<Self> {
        let producer: BaseProducer<Deliveries> = crate::kafka::client_config(&cfg.kafka)
            .set("client.id", "drawdown-loadgen")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create_with_context(Deliveries::default())
            .context("creating the producer")?;
        Ok(Self {
            producer,
            usage_topic: cfg.topics.usage.clone(),
            grants_topic: cfg.topics.grants.clone(),
            rate,
            started: Instant::now(),
            sent: 0,
            counts: BTreeMap::new(),
        })
    }

    fn send(&mut self, rec: &Rec, what: &'static str) -> anyhow::Result<()> {
        let topic = match rec.topic {
            Topic::Usage => self.usage_topic.as_str(),
            Topic::Grants => self.grants_topic.as_str(),
        };
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(rec.content_type),
        });
        let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
            .key(rec.key.as_str())
            .payload(rec.payload.as_slice())
            .headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        self.sent += 1;
        *self.counts.entry(what).or_default() += 1;
        if self.sent.is_multiple_of(1000) {
            self.producer.poll(Duration::ZERO);
            self.check()?;
        }
        if self.rate > 0.0 && self.sent.is_multiple_of(16) {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / self.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Ok(())
    }

    fn check(&self) -> anyhow::Result<()> {
        let ctx = self.producer.context();
        if ctx.failed.load(Ordering::Acquire) > 0 {
            let first = ctx
                .first
                .lock()
                .expect("not poisoned")
                .clone()
                .unwrap_or_default();
            bail!(
                "{} records were not delivered (first: {first})",
                ctx.failed.load(Ordering::Acquire)
            );
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<(u64, Duration, BTreeMap<&'static str, u64>)> {
        self.producer
            .flush(Duration::from_secs(120))
            .context("flushing the producer")?;
        self.check()?;
        Ok((self.sent, self.started.elapsed(), self.counts))
    }
}

/// The generator: meters, ids, encoding and randomness of one phase.
struct Gen {
    rng: StdRng,
    meters: Vec<RefMeter>,
    prefix: String,
    customers: usize,
    /// Unique per phase: part of every record id (zero-padded, so ids sort in sending order).
    tag: String,
    format: Format,
    /// Planned usage volume, to size the grants.
    events: u64,
    seq: u64,
}

/// A usage event before encoding.
#[derive(Clone, Debug)]
struct UsageEv {
    id: String,
    customer: String,
    name: String,
    properties: BTreeMap<String, String>,
}

/// A grant before encoding.
#[derive(Clone, Debug)]
struct GrantCmd {
    grant_id: String,
    customer: String,
    meter: String,
    amount: Decimal,
    kind: Kind,
    priority: u8,
    expires_at: Option<i64>,
    effective_at: Option<i64>,
    subscription_id: Option<String>,
    rollover: Option<Decimal>,
}

/// A void before encoding.
#[derive(Clone, Debug)]
enum VoidCmd {
    Usage(String),
    Grant(String),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Priorities of generated top-ups and adjustments: 255 is left to the ledger's `void:`
/// adjustments (see the module docs).
const TOPUP_PRIORITIES: [u8; 6] = [0, 10, 10, 50, 100, 200];

impl Gen {
    fn customer(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// A customer, skewed (see [`Gen::pick_index`]).
    fn pick_customer(&mut self) -> String {
        let i = self.pick_index();
        self.customer(i)
    }

    /// A sum quantity: mostly whole tokens 1..=500, sometimes with a decimal part, rarely 0.
    fn sum_value(&mut self) -> Decimal {
        let r: f64 = self.rng.random();
        if r < 0.005 {
            Decimal::ZERO
        } else if r < 0.8 {
            Decimal::from(self.rng.random_range(1..=500u32))
        } else {
            let whole = Decimal::from(self.rng.random_range(0..=499u32));
            let frac = [
                Decimal::new(5, 1),
                Decimal::new(25, 2),
                Decimal::new(125, 3),
                Decimal::new(1, 1),
            ][self.rng.random_range(0..4)];
            whole + frac
        }
    }

    /// The index of a customer, skewed: a fifth of the traffic comes from a tenth of them.
    fn pick_index(&mut self) -> usize {
        let hot = (self.customers / 10).max(1);
        if self.rng.random_bool(0.2) {
            self.rng.random_range(0..hot)
        } else {
            self.rng.random_range(0..self.customers)
        }
    }

    fn usage_event(&mut self, i: usize) -> UsageEv {
        let customer = self.customer(i);
        let chosen = self.meters[self.rng.random_range(0..self.meters.len())].clone();
        let mut properties = chosen.filter.clone();
        // Every sum property of the meters counting this event gets a value.
        let sums: BTreeSet<String> = self
            .meters
            .iter()
            .filter(|m| m.event == chosen.event)
            .filter_map(|m| m.sum.clone())
            .collect();
        for p in sums {
            if let std::collections::btree_map::Entry::Vacant(slot) = properties.entry(p) {
                slot.insert(self.sum_value().to_string());
            }
        }
        properties
            .entry("region".into())
            .or_insert_with(|| ["eu", "us", "ap"][self.seq as usize % 3].into());
        self.seq += 1;
        UsageEv {
            id: format!("{}-e{:09}", self.tag, self.seq),
            customer,
            name: chosen.event,
            properties,
        }
    }

    /// Usage of `meter` per customer expected from one usage phase of `events` events.
    fn planned_use(&self, m: &RefMeter) -> Decimal {
        let same = self.meters.iter().filter(|o| o.event == m.event).count() as u64;
        let per_customer = Decimal::from(self.events.max(1)) * Decimal::from(same)
            / Decimal::from(self.meters.len() as u64 * self.customers.max(1) as u64);
        let mean = if m.sum.is_some() {
            Decimal::from(250)
        } else {
            Decimal::ONE
        };
        per_customer * mean
    }

    /// An amount around `base`: from a fifth to three times it, whole units for count meters,
    /// sometimes with one decimal for sum meters. At least 1.
    fn amount(&mut self, m: &RefMeter, base: Decimal) -> Decimal {
        let pct = Decimal::from(self.rng.random_range(20..=300u32));
        let scale = if m.sum.is_some() && self.rng.random_bool(0.3) {
            1
        } else {
            0
        };
        (base * pct / Decimal::from(100))
            .round_dp(scale)
            .max(Decimal::ONE)
            .normalize()
    }

    /// A new grant id and the plain fields.
    fn new_grant(
        &mut self,
        customer: &str,
        m: &RefMeter,
        amount: Decimal,
        kind: Kind,
        priority: u8,
    ) -> GrantCmd {
        self.seq += 1;
        GrantCmd {
            grant_id: format!("{}-g{:09}-{}", self.tag, self.seq, m.name),
            customer: customer.into(),
            meter: m.name.clone(),
            amount,
            kind,
            priority,
            expires_at: None,
            effective_at: None,
            subscription_id: None,
            rollover: None,
        }
    }

    /// A top-up or adjustment, varied priority, a fifth of them with a far expiry.
    fn grant(&mut self, customer: &str, m: &RefMeter, amount: Decimal, kind: Kind) -> GrantCmd {
        let priority = TOPUP_PRIORITIES[self.rng.random_range(0..TOPUP_PRIORITIES.len())];
        let mut g = self.new_grant(customer, m, amount, kind, priority);
        g.expires_at = self
            .rng
            .random_bool(0.2)
            .then(|| now_ms() + 365 * 24 * 3600 * 1000);
        g
    }

    /// A cycle grant of subscription `sub`: rollover none, a quarter or all of it.
    fn cycle_grant(&mut self, customer: &str, m: &RefMeter, sub: &str) -> GrantCmd {
        let base = self.planned_use(m);
        let amount = self.amount(m, base);
        let priority = [10u8, 50][self.rng.random_range(0..2)];
        let mut g = self.new_grant(customer, m, amount, Kind::Cycle, priority);
        g.subscription_id = Some(sub.into());
        g.rollover = Some(match self.rng.random_range(0..10) {
            0..=3 => Decimal::ZERO,
            4..=6 => (amount / Decimal::from(4)).round_dp(1).normalize(),
            _ => amount,
        });
        g
    }

    fn encode_usage(&mut self, e: &UsageEv) -> Rec {
        let payload = match self.format {
            Format::Json => {
                let sums: HashSet<&str> = self
                    .meters
                    .iter()
                    .filter_map(|m| m.sum.as_deref())
                    .collect();
                let mut props = serde_json::Map::new();
                for (k, v) in &e.properties {
                    let value = if sums.contains(k.as_str()) && self.rng.random_bool(0.7) {
                        Value::Number(serde_json::Number::from_str(v).expect("a decimal"))
                    } else {
                        Value::String(v.clone())
                    };
                    props.insert(k.clone(), value);
                }
                let timestamp = if self.rng.random_bool(0.5) {
                    Value::String(humantime::format_rfc3339_millis(SystemTime::now()).to_string())
                } else {
                    Value::from(now_ms())
                };
                serde_json::to_vec(&json!({
                    "id": e.id, "customer_id": e.customer, "name": e.name,
                    "timestamp": timestamp, "properties": props,
                }))
                .expect("serialisable")
            }
            Format::Protobuf => pb::UsageEvent {
                id: e.id.clone(),
                customer_id: e.customer.clone(),
                name: e.name.clone(),
                timestamp_ms: now_ms(),
                properties: e.properties.clone().into_iter().collect(),
            }
            .encode_to_vec(),
        };
        Rec {
            topic: Topic::Usage,
            key: e.customer.clone(),
            payload,
            content_type: self.content_type(),
        }
    }

    fn encode_grant(&self, g: &GrantCmd) -> Rec {
        let payload = match self.format {
            Format::Json => {
                let mut v = json!({
                    "type": "grant", "grant_id": g.grant_id, "customer_id": g.customer,
                    "meter": g.meter, "amount": g.amount.to_string(), "kind": g.kind.as_str(),
                    "priority": g.priority,
                });
                if let Some(x) = g.expires_at {
                    v["expires_at"] = Value::from(x);
                }
                if let Some(x) = g.effective_at {
                    v["effective_at"] = Value::from(x);
                }
                if let Some(s) = &g.subscription_id {
                    v["subscription_id"] = Value::from(s.as_str());
                }
                if let Some(r) = g.rollover {
                    v["rollover"] = Value::from(r.to_string());
                }
                serde_json::to_vec(&v).expect("serialisable")
            }
            Format::Protobuf => pb::CreditCommand {
                command: Some(pb::credit_command::Command::Grant(pb::Grant {
                    grant_id: g.grant_id.clone(),
                    customer_id: g.customer.clone(),
                    meter: g.meter.clone(),
                    amount: g.amount.to_string(),
                    kind: match g.kind {
                        Kind::Cycle => pb::GrantKind::Cycle as i32,
                        Kind::TopUp => pb::GrantKind::TopUp as i32,
                        Kind::Adjustment => pb::GrantKind::Adjustment as i32,
                    },
                    priority: u32::from(g.priority),
                    effective_at_ms: g.effective_at.unwrap_or(0),
                    expires_at_ms: g.expires_at.unwrap_or(0),
                    subscription_id: g.subscription_id.clone().unwrap_or_default(),
                    rollover: g.rollover.map(|r| r.to_string()).unwrap_or_default(),
                })),
            }
            .encode_to_vec(),
        };
        Rec {
            topic: Topic::Grants,
            key: g.customer.clone(),
            payload,
            content_type: self.content_type(),
        }
    }

    fn encode_void(&self, customer: &str, v: &VoidCmd) -> Rec {
        let payload = match (self.format, v) {
            (Format::Json, VoidCmd::Usage(id)) => {
                json!({"type": "void_usage", "customer_id": customer, "event_id": id})
                    .to_string()
                    .into_bytes()
            }
            (Format::Json, VoidCmd::Grant(id)) => {
                json!({"type": "void_grant", "customer_id": customer, "grant_id": id})
                    .to_string()
                    .into_bytes()
            }
            (Format::Protobuf, VoidCmd::Usage(id)) => pb::CreditCommand {
                command: Some(pb::credit_command::Command::VoidUsage(pb::VoidUsage {
                    customer_id: customer.into(),
                    event_id: id.clone(),
                })),
            }
            .encode_to_vec(),
            (Format::Protobuf, VoidCmd::Grant(id)) => pb::CreditCommand {
                command: Some(pb::credit_command::Command::VoidGrant(pb::VoidGrant {
                    customer_id: customer.into(),
                    grant_id: id.clone(),
                })),
            }
            .encode_to_vec(),
        };
        Rec {
            topic: Topic::Grants,
            key: customer.into(),
            payload,
            content_type: self.content_type(),
        }
    }

    fn content_type(&self) -> &'static str {
        match self.format {
            Format::Json => codec::JSON,
            Format::Protobuf => codec::PROTOBUF,
        }
    }
    /// A malformed record of kind `k % 8`; none of them may change any state.
    fn bad_record(&mut self, k: u64) -> Rec {
        let customer = self.pick_customer();
        self.seq += 1;
        let id = format!("{}-bad{}", self.tag, self.seq);
        let json_rec = |topic, v: Value| Rec {
            topic,
            key: customer.clone(),
            payload: serde_json::to_vec(&v).expect("serialisable"),
            content_type: codec::JSON,
        };
        let some_meter = self.meters[0].name.clone();
        match k % 8 {
            0 => Rec {
                topic: Topic::Usage,
                key: customer.clone(),
                payload: vec![0xff, 0x00, 0x13, 0x37],
                content_type: codec::JSON,
            },
            1 => json_rec(
                Topic::Usage,
                json!({"id": id, "customer_id": 42, "name": "api_call"}),
            ),
            2 => json_rec(
                Topic::Usage,
                json!({"customer_id": customer, "name": self.meters[0].event}),
            ),
            3 => json_rec(
                Topic::Grants,
                json!({"type": "grant", "grant_id": id, "customer_id": customer, "meter": some_meter, "amount": "-5"}),
            ),
            4 => json_rec(
                Topic::Grants,
                json!({"type": "grant", "grant_id": id, "customer_id": customer, "meter": "no_such_meter", "amount": "5"}),
            ),
            5 => Rec {
                topic: Topic::Grants,
                key: customer.clone(),
                payload: vec![0x0a, 0xff, 0xff, 0x01],
                content_type: codec::PROTOBUF,
            },
            6 => match self.meters.iter().find(|m| m.sum.is_some()) {
                // A sum meter's event without its property: rejected as a whole.
                Some(m) => json_rec(
                    Topic::Usage,
                    json!({"id": id, "customer_id": customer, "name": m.event}),
                ),
                None => json_rec(
                    Topic::Grants,
                    json!({"type": "refund", "customer_id": customer}),
                ),
            },
            _ => Rec {
                // The key names another customer than the payload.
                topic: Topic::Usage,
                key: format!("{customer}-other"),
                payload: serde_json::to_vec(
                    &json!({"id": id, "customer_id": customer, "name": self.meters[0].event}),
                )
                .expect("serialisable"),
                content_type: codec::JSON,
            },
        }
    }
}

/// Sends the records of one phase and updates the model.
struct Run<'a> {
    gen: Gen,
    sender: Sender,
    model: &'a mut Expectation,
    duplicates: f64,
    recent: Vec<Rec>,
    bad_left: u64,
    bad_sent: u64,
}

/// The chance that a new usage event is kept for later voids.
const SAMPLE_EVENTS: f64 = 0.05;

impl Run<'_> {
    fn send_usage(&mut self, customer: usize) -> anyhow::Result<()> {
        let e = self.gen.usage_event(customer);
        let c = self.model.customer(&e.customer);
        let draws = c.usage(&self.gen.meters, &e);
        if !draws.is_empty() && self.gen.rng.random_bool(SAMPLE_EVENTS) {
            c.remember(&e.id, draws, &mut self.gen.rng);
        }
        let rec = self.gen.encode_usage(&e);
        self.sender.send(&rec, "usage")?;
        if self.recent.len() < 1000 {
            self.recent.push(rec);
        } else {
            let i = self.gen.rng.random_range(0..self.recent.len());
            self.recent[i] = rec;
        }
        if self.duplicates > 0.0 && self.gen.rng.random_bool(self.duplicates.min(1.0)) {
            let dup = self.recent[self.gen.rng.random_range(0..self.recent.len())].clone();
            self.sender.send(&dup, "duplicates")?;
        }
        if self.duplicates > 0.0 && self.gen.rng.random_bool((self.duplicates / 2.0).min(1.0)) {
            self.replay_usage()?;
        }
        Ok(())
    }

    /// Re-sends the id of an event of an earlier phase (voided or not) with other contents:
    /// a duplicate all the same.
    fn replay_usage(&mut self) -> anyhow::Result<()> {
        let i = self.gen.pick_index();
        let c = self.gen.customer(i);
        let ids: Vec<String> = self
            .model
            .customers
            .get(&c)
            .map(|m| m.events.keys().cloned().collect())
            .unwrap_or_default();
        if ids.is_empty() {
            return Ok(());
        }
        let mut e = self.gen.usage_event(i);
        e.id = ids[self.gen.rng.random_range(0..ids.len())].clone();
        let rec = self.gen.encode_usage(&e);
        self.sender.send(&rec, "replays")
    }

    fn send_grant(&mut self, g: &GrantCmd) -> anyhow::Result<()> {
        let m = ref_meter(&self.gen.meters, &g.meter);
        let what = if self.model.customer(&g.customer).grant(m, g) {
            if let Some(e) = g.effective_at {
                self.model.due_at(e);
            }
            // Far expiries never come due during a run; note the near ones.
            if let Some(x) = g.expires_at.filter(|x| *x < now_ms() + 24 * 3600 * 1000) {
                self.model.due_at(x);
            }
            "grants"
        } else {
            "grant_replays"
        };
        let rec = self.gen.encode_grant(g);
        self.sender.send(&rec, what)
    }

    /// Re-sends a known grant id of `customer` with another amount: ignored.
    fn maybe_replay_grant(&mut self, customer: &str, chance: f64) -> anyhow::Result<()> {
        if !self.gen.rng.random_bool(chance) {
            return Ok(());
        }
        let known: Vec<(String, String)> = self
            .model
            .customers
            .get(customer)
            .map(|c| {
                c.grants
                    .iter()
                    .map(|(id, g)| (id.clone(), g.meter.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if known.is_empty() {
            return Ok(());
        }
        let (id, meter) = known[self.gen.rng.random_range(0..known.len())].clone();
        let m = ref_meter(&self.gen.meters, &meter).clone();
        let mut g = self
            .gen
            .new_grant(customer, &m, Decimal::from(7), Kind::TopUp, 0);
        g.grant_id = id;
        self.send_grant(&g)
    }

    fn send_void(&mut self, customer: &str, v: &VoidCmd) -> anyhow::Result<()> {
        let c = self.model.customer(customer);
        let result = match v {
            VoidCmd::Usage(id) => c.void_usage(&self.gen.meters, id),
            VoidCmd::Grant(id) => c.void_grant(&self.gen.meters, id),
        };
        let what = match (v, result) {
            (VoidCmd::Usage(_), Ok(())) => "void_usage",
            (VoidCmd::Grant(_), Ok(())) => "void_grant",
            (_, Err(reason)) => {
                self.model.count_dlq(reason, 1);
                reason
            }
        };
        let rec = self.gen.encode_void(customer, v);
        self.sender.send(&rec, what)
    }

    /// Sends a bad record now and then, so that `--bad` are spread over `steps` steps.
    fn maybe_bad(&mut self, step: u64, steps: u64) -> anyhow::Result<()> {
        if self.bad_left == 0 {
            return Ok(());
        }
        let every = (steps / (self.bad_left + self.bad_sent + 1)).max(1);
        if step.is_multiple_of(every) || step + 1 >= steps {
            let rec = self.gen.bad_record(self.bad_sent);
            self.sender.send(&rec, "bad")?;
            self.bad_left -= 1;
            self.bad_sent += 1;
        }
        Ok(())
    }

    fn flush_bad(&mut self) -> anyhow::Result<()> {
        while self.bad_left > 0 {
            let rec = self.gen.bad_record(self.bad_sent);
            self.sender.send(&rec, "bad")?;
            self.bad_left -= 1;
            self.bad_sent += 1;
        }
        Ok(())
    }

    /// Cycle grants for most customers (sometimes two subscriptions), top-ups and
    /// adjustments stacked on them or alone, a few replayed grant ids.
    fn phase_grants(&mut self) -> anyhow::Result<()> {
        let steps = (self.gen.customers * self.gen.meters.len()) as u64;
        let mut step = 0;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            let subscriber = self.gen.rng.random_bool(0.6);
            for mi in 0..self.gen.meters.len() {
                let m = self.gen.meters[mi].clone();
                if subscriber {
                    let g = self.gen.cycle_grant(&c, &m, &format!("{c}-s1"));
                    self.send_grant(&g)?;
                    if self.gen.rng.random_bool(0.15) {
                        let g = self.gen.cycle_grant(&c, &m, &format!("{c}-s2"));
                        self.send_grant(&g)?;
                    }
                }
                if !subscriber || self.gen.rng.random_bool(0.5) {
                    let base = self.gen.planned_use(&m);
                    let amount = self.gen.amount(&m, base);
                    let kind = if self.gen.rng.random_bool(0.8) {
                        Kind::TopUp
                    } else {
                        Kind::Adjustment
                    };
                    let g = self.gen.grant(&c, &m, amount, kind);
                    self.send_grant(&g)?;
                }
                self.maybe_replay_grant(&c, 0.05)?;
                self.maybe_bad(step, steps)?;
                step += 1;
            }
        }
        Ok(())
    }

    /// Top-ups expiring at `now + expire_in` (priority 0 or 10: drawn first), and grants
    /// scheduled a second before that (some of them cycle grants: a renewal on a tick).
    fn phase_expiring(&mut self, expire_in: Duration) -> anyhow::Result<()> {
        let expires_at = now_ms() + expire_in.as_millis() as i64;
        let effective_at = expires_at - 1000;
        let steps = (self.gen.customers * self.gen.meters.len()) as u64;
        let mut step = 0;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            for mi in 0..self.gen.meters.len() {
                let m = self.gen.meters[mi].clone();
                let base = self.gen.planned_use(&m);
                if self.gen.rng.random_bool(0.35) {
                    let amount = self.gen.amount(&m, base / Decimal::TWO);
                    let priority = [0u8, 10][self.gen.rng.random_range(0..2)];
                    let mut g = self.gen.new_grant(&c, &m, amount, Kind::TopUp, priority);
                    g.expires_at = Some(expires_at);
                    self.send_grant(&g)?;
                }
                if self.gen.rng.random_bool(0.12) {
                    let sub = self
                        .model
                        .customers
                        .get(&c)
                        .and_then(|x| x.subs.get(&m.name))
                        .and_then(|s| s.first().cloned());
                    let mut g = match sub {
                        Some(sub) if self.gen.rng.random_bool(0.4) => {
                            self.gen.cycle_grant(&c, &m, &sub)
                        }
                        _ => {
                            let amount = self.gen.amount(&m, base);
                            self.gen.grant(&c, &m, amount, Kind::TopUp)
                        }
                    };
                    g.effective_at = Some(effective_at);
                    self.send_grant(&g)?;
                }
                self.maybe_bad(step, steps)?;
                step += 1;
            }
        }
        Ok(())
    }

    /// The time barrier: see [`Phase::Expire`].
    fn phase_expire(&mut self) -> anyhow::Result<()> {
        let Some((first, last)) = self.model.due else {
            println!("expire: nothing pending");
            return Ok(());
        };
        let now = now_ms();
        if now >= first {
            bail!(
                "expire: the earlier inputs may have been processed after the first pending \
                 activation/expiry ({} ms ago), so their order is unknown; give the expiring \
                 phase a longer --expire-in",
                now - first
            );
        }
        // Past the last one, plus a tick or two, so that the tick (not a later input) applies
        // most of them.
        let until = last + 3000;
        println!(
            "expire: {:.1}s of slack before the first activation; sleeping {:.1}s",
            (first - now) as f64 / 1000.0,
            (until - now) as f64 / 1000.0
        );
        std::thread::sleep(Duration::from_millis((until - now).max(0) as u64));
        self.model.advance(&self.gen.meters, last);
        self.model.due = None;
        Ok(())
    }

    fn phase_usage(&mut self) -> anyhow::Result<()> {
        let steps = self.gen.events;
        for step in 0..steps {
            let i = self.gen.pick_index();
            self.send_usage(i)?;
            self.maybe_bad(step, steps)?;
        }
        Ok(())
    }

    fn phase_topups(&mut self) -> anyhow::Result<()> {
        let steps = (self.gen.customers * self.gen.meters.len()) as u64;
        let mut step = 0;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            for mi in 0..self.gen.meters.len() {
                let m = self.gen.meters[mi].clone();
                let balance = self
                    .model
                    .get(&c, &m.name)
                    .map(|e| e.balance)
                    .unwrap_or_default();
                let chance = if balance <= Decimal::ZERO { 0.7 } else { 0.3 };
                if self.gen.rng.random_bool(chance) {
                    let debt = (-balance).max(Decimal::ZERO);
                    let amount = if debt > Decimal::ONE && self.gen.rng.random_bool(0.2) {
                        // Pays only part of the debt: stays exhausted.
                        (debt / Decimal::TWO).floor().max(Decimal::ONE)
                    } else {
                        let base = self.gen.planned_use(&m);
                        debt + self.gen.amount(&m, base)
                    };
                    let g = self.gen.grant(&c, &m, amount, Kind::TopUp);
                    self.send_grant(&g)?;
                }
                self.maybe_bad(step, steps)?;
                step += 1;
            }
        }
        Ok(())
    }

    /// A new cycle for every first subscription (half of the second ones), ending the
    /// previous cycle; some top-ups on top; a few replayed grant ids.
    fn phase_renewal(&mut self) -> anyhow::Result<()> {
        let steps = (self.gen.customers * self.gen.meters.len()) as u64;
        let mut step = 0;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            for mi in 0..self.gen.meters.len() {
                let m = self.gen.meters[mi].clone();
                let subs = self
                    .model
                    .customers
                    .get(&c)
                    .and_then(|x| x.subs.get(&m.name))
                    .cloned()
                    .unwrap_or_default();
                for (k, sub) in subs.iter().enumerate() {
                    if k == 0 || self.gen.rng.random_bool(0.5) {
                        let g = self.gen.cycle_grant(&c, &m, sub);
                        self.send_grant(&g)?;
                    }
                }
                if self.gen.rng.random_bool(0.25) {
                    let base = self.gen.planned_use(&m);
                    let amount = self.gen.amount(&m, base);
                    let g = self.gen.grant(&c, &m, amount, Kind::TopUp);
                    self.send_grant(&g)?;
                }
                self.maybe_replay_grant(&c, 0.05)?;
                self.maybe_bad(step, steps)?;
                step += 1;
            }
        }
        Ok(())
    }

    /// Voids for a random subset of the customers: a grant (often one a kept event drew
    /// from), kept events (ascending ids), repeats of both, unknown ids, replayed grant ids.
    fn phase_voids(&mut self) -> anyhow::Result<()> {
        let steps = self.gen.customers as u64;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            self.maybe_bad(i as u64, steps)?;
            if !self.gen.rng.random_bool(0.4) {
                continue;
            }
            let (events, drawn_from, grants, voided_grants) = match self.model.customers.get(&c) {
                None => Default::default(),
                Some(cm) => {
                    let events: Vec<String> = cm
                        .events
                        .iter()
                        .filter(|(_, e)| !e.voided)
                        .map(|(id, _)| id.clone())
                        .collect();
                    let drawn_from: Vec<String> = cm
                        .events
                        .values()
                        .filter(|e| !e.voided)
                        .flat_map(|e| e.draws.iter().flat_map(|d| d.grants.iter()))
                        .map(|(g, _)| g.clone())
                        .filter(|g| cm.grants.get(g).is_some_and(|x| !x.voided))
                        .collect();
                    let grants: Vec<String> = cm
                        .grants
                        .iter()
                        .filter(|(_, g)| !g.voided)
                        .map(|(id, _)| id.clone())
                        .collect();
                    let voided: Vec<String> = cm
                        .grants
                        .iter()
                        .filter(|(_, g)| g.voided)
                        .map(|(id, _)| id.clone())
                        .collect();
                    (events, drawn_from, grants, voided)
                }
            };
            let mut cmds: Vec<VoidCmd> = Vec::new();
            if self.gen.rng.random_bool(0.3) {
                let pool = if !drawn_from.is_empty() && self.gen.rng.random_bool(0.6) {
                    &drawn_from
                } else {
                    &grants
                };
                if !pool.is_empty() {
                    let g = pool[self.gen.rng.random_range(0..pool.len())].clone();
                    cmds.push(VoidCmd::Grant(g));
                }
            }
            let n = self.gen.rng.random_range(1..=2usize).min(events.len());
            let mut chosen: Vec<String> = Vec::new();
            while chosen.len() < n {
                let e = events[self.gen.rng.random_range(0..events.len())].clone();
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            // Ascending ids: the `void:` adjustments they may create tie-break by id.
            chosen.sort();
            cmds.extend(chosen.iter().cloned().map(VoidCmd::Usage));
            if !chosen.is_empty() && self.gen.rng.random_bool(0.3) {
                cmds.push(VoidCmd::Usage(chosen[0].clone()));
            }
            if let Some(VoidCmd::Grant(g)) = cmds.first().cloned() {
                if self.gen.rng.random_bool(0.3) {
                    cmds.push(VoidCmd::Grant(g));
                }
            }
            if !voided_grants.is_empty() && self.gen.rng.random_bool(0.1) {
                let g = voided_grants[self.gen.rng.random_range(0..voided_grants.len())].clone();
                cmds.push(VoidCmd::Grant(g));
            }
            if self.gen.rng.random_bool(0.08) {
                self.gen.seq += 1;
                cmds.push(VoidCmd::Usage(format!(
                    "{}-unknown{:09}",
                    self.gen.tag, self.gen.seq
                )));
            }
            if self.gen.rng.random_bool(0.05) {
                self.gen.seq += 1;
                cmds.push(VoidCmd::Grant(format!(
                    "{}-unknown{:09}",
                    self.gen.tag, self.gen.seq
                )));
            }
            for v in &cmds {
                self.send_void(&c, v)?;
            }
            self.maybe_replay_grant(&c, 0.1)?;
        }
        Ok(())
    }

    fn phase_mixed(&mut self) -> anyhow::Result<()> {
        let mut granted = vec![false; self.gen.customers];
        let steps = self.gen.events;
        for step in 0..steps {
            // A customer gets its first grants just before its first usage event (on the other
            // topic, so not necessarily processed first), and now and then a top-up.
            let i = self.gen.pick_index();
            if !granted[i] || self.gen.rng.random_bool(0.005) {
                granted[i] = true;
                let c = self.gen.customer(i);
                for mi in 0..self.gen.meters.len() {
                    let m = self.gen.meters[mi].clone();
                    let base = self.gen.planned_use(&m);
                    let amount = self.gen.amount(&m, base);
                    let g = self.gen.grant(&c, &m, amount, Kind::TopUp);
                    self.send_grant(&g)?;
                }
            }
            self.send_usage(i)?;
            self.maybe_bad(step, steps)?;
        }
        Ok(())
    }
}

/// `drawdown produce`: sends one phase of generated records (see the module docs).
pub async fn produce(cfg: &Config, args: ProduceArgs) -> anyhow::Result<()> {
    if args.phase == Phase::Mixed && args.expect.is_some() {
        bail!("--expect cannot be used with --phase mixed: the order of grants relative to usage (two topics) is not defined");
    }
    if args.customers == 0 {
        bail!("--customers must be >= 1");
    }
    if !(0.0..=1.0).contains(&args.duplicates) {
        bail!("--duplicates is a fraction in [0, 1]");
    }
    if cfg.meters.is_empty() {
        bail!("no meters configured");
    }
    // Creates missing topics with the configured partitions (the broker's auto-creation would
    // not co-partition them).
    crate::kafka::admin::ensure_topics(cfg)
        .await
        .context("preparing topics")?;
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || produce_blocking(&cfg, args))
        .await
        .context("produce task")?
}

fn produce_blocking(cfg: &Config, args: ProduceArgs) -> anyhow::Result<()> {
    let mut model = match &args.expect {
        Some(p) => Expectation::load(p)?.unwrap_or_default(),
        None => Expectation::default(),
    };
    if model.phases > 0 && model.prefix != args.prefix {
        bail!(
            "the expectation is for prefix {:?}, not {:?}",
            model.prefix,
            args.prefix
        );
    }
    if let Some((first, _)) = model.due {
        if args.phase != Phase::Expire && now_ms() >= first {
            bail!("activations/expiries are due since {first}: run --phase expire first");
        }
    }
    model.prefix = args.prefix.clone();
    model.phases += 1;
    // Record ids must be unique across phases: with an expectation the phase number makes them
    // so (deterministically); without one, the clock does.
    let run = if args.expect.is_some() {
        format!("p{:03}", model.phases)
    } else {
        format!("t{}", now_ms())
    };
    let phase_code = args.phase as u64;
    let gen = Gen {
        rng: StdRng::seed_from_u64(
            args.seed ^ model.phases.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (phase_code << 56),
        ),
        meters: cfg.meters.iter().map(RefMeter::from_def).collect(),
        prefix: args.prefix.clone(),
        customers: args.customers,
        tag: format!("{}-{run}", args.prefix),
        format: args.format,
        events: args.events,
        seq: 0,
    };
    let sender = Sender::new(cfg, args.rate)?;
    let mut run = Run {
        gen,
        sender,
        model: &mut model,
        duplicates: args.duplicates,
        recent: Vec::new(),
        bad_left: args.bad,
        bad_sent: 0,
    };
    match args.phase {
        Phase::Grants => run.phase_grants()?,
        Phase::Expiring => run.phase_expiring(args.expire_in)?,
        Phase::Expire => run.phase_expire()?,
        Phase::Usage => run.phase_usage()?,
        Phase::Topups => run.phase_topups()?,
        Phase::Renewal => run.phase_renewal()?,
        Phase::Voids => run.phase_voids()?,
        Phase::Mixed => run.phase_mixed()?,
    }
    run.flush_bad()?;
    let bad_sent = run.bad_sent;
    run.model.count_dlq("malformed", bad_sent);
    let (sent, elapsed, counts) = run.sender.finish()?;
    if let Some(p) = &args.expect {
        model.save(p)?;
    }
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "produce: phase={} records={sent} ({}) elapsed={:.1}s rate={:.0}/s",
        format!("{:?}", args.phase).to_lowercase(),
        counts.join(" "),
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// wait-idle
// ------------------------------------------------------------------------------------------

/// `drawdown wait-idle`: waits until the group has committed, on every partition of both input
/// topics, the high watermark (the inputs are written without transactions, so there are no
/// control records and committed == high means everything was processed).
pub async fn wait_idle(cfg: &Config, args: WaitIdleArgs) -> anyhow::Result<()> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || wait_idle_blocking(&cfg, args.timeout))
        .await
        .context("wait-idle task")?
}

fn partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        bail!("topic {topic} does not exist");
    }
    Ok(parts)
}

/// Remaining records per input topic: high watermark minus committed offset.
fn lag(consumer: &BaseConsumer, cfg: &Config) -> anyhow::Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for topic in [&cfg.topics.usage, &cfg.topics.grants] {
        let parts = partitions(consumer, topic)?;
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(topic, *p);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .context("committed offsets")?;
        let mut remaining = 0;
        for p in &parts {
            let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
            let at = match committed.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            remaining += (high - at).max(0);
        }
        out.push((topic.clone(), remaining));
    }
    Ok(out)
}

fn wait_idle_blocking(cfg: &Config, timeout: Duration) -> anyhow::Result<()> {
    let consumer: BaseConsumer = crate::kafka::client_config(&cfg.kafka)
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the consumer")?;
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let lags = match lag(&consumer, cfg) {
            Ok(l) => l,
            Err(e) if started.elapsed() < timeout => {
                eprintln!("wait-idle: {e:#}; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let total: i64 = lags.iter().map(|(_, l)| l).sum();
        let detail: Vec<String> = lags.iter().map(|(t, l)| format!("{t}={l}")).collect();
        if total == 0 {
            println!(
                "wait-idle: idle after {:.1}s (group {})",
                started.elapsed().as_secs_f64(),
                cfg.kafka.group_id
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "wait-idle: timed out after {:?} with lag {} ({})",
                timeout,
                total,
                detail.join(" ")
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "wait-idle: lag={total} ({}) after {:.0}s",
                detail.join(" "),
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ------------------------------------------------------------------------------------------
// verify
// ------------------------------------------------------------------------------------------

/// What the API shows of one (customer, meter), compared as a whole.
#[derive(Clone, Debug, PartialEq)]
struct Totals {
    balance: Decimal,
    credited: Decimal,
    consumed: Decimal,
    overage: Decimal,
    blocked: Decimal,
    expired: Decimal,
    voided: Decimal,
    version: u64,
    /// (grant id, remainder, active), in the listed order (active in draw-down order).
    grants: Vec<(String, Decimal, bool)>,
}

impl From<&Expected> for Totals {
    fn from(e: &Expected) -> Self {
        Self {
            balance: e.balance,
            credited: e.credited,
            consumed: e.consumed,
            overage: e.overage,
            blocked: e.blocked,
            expired: e.expired,
            voided: e.voided,
            version: e.version,
            grants: e
                .slots
                .iter()
                .map(|s| (s.id.clone(), s.remaining, s.active))
                .collect(),
        }
    }
}

impl Totals {
    /// The fields that differ, for the report.
    fn diff(&self, want: &Totals) -> String {
        let mut out = Vec::new();
        let decimals = [
            ("balance", self.balance, want.balance),
            ("credited", self.credited, want.credited),
            ("consumed", self.consumed, want.consumed),
            ("overage", self.overage, want.overage),
            ("blocked", self.blocked, want.blocked),
            ("expired", self.expired, want.expired),
            ("voided", self.voided, want.voided),
        ];
        for (name, got, exp) in decimals {
            if got != exp {
                out.push(format!("{name} {got} != {exp}"));
            }
        }
        if self.version != want.version {
            out.push(format!("version {} != {}", self.version, want.version));
        }
        if self.grants != want.grants {
            out.push(format!("grants {:?} != {:?}", self.grants, want.grants));
        }
        out.join(", ")
    }
}

/// A decimal from a JSON string or number (exact text).
fn dec(v: Option<&Value>) -> Option<Decimal> {
    match v? {
        Value::String(s) => Decimal::from_str(s).ok(),
        Value::Number(n) => Decimal::from_str(&n.to_string()).ok(),
        _ => None,
    }
}

fn totals_of(v: &Value) -> Option<Totals> {
    let grants = v
        .get("grants")?
        .as_array()?
        .iter()
        .map(|g| {
            Some((
                g.get("id")?.as_str()?.to_string(),
                dec(g.get("remaining"))?,
                g.get("active")?.as_bool()?,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Totals {
        balance: dec(v.get("balance"))?,
        credited: dec(v.get("credited"))?,
        consumed: dec(v.get("consumed"))?,
        overage: dec(v.get("overage"))?,
        blocked: dec(v.get("blocked"))?,
        expired: dec(v.get("expired"))?,
        voided: dec(v.get("voided"))?,
        version: v.get("version")?.as_u64()?,
        grants,
    })
}

async fn fetch_totals(
    client: &reqwest::Client,
    base: &str,
    c: &str,
    m: &str,
) -> Result<Totals, String> {
    let url = format!("{base}/v1/customers/{c}/meters/{m}");
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "GET {url}: {status} {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("GET {url}: {e}"))?;
    totals_of(&v).ok_or_else(|| format!("GET {url}: unexpected body {v}"))
}

/// Checks every (customer, meter) against the API, retrying the mismatches until `settle` has
/// passed. Returns the mismatches.
async fn check_api(
    base: &str,
    wanted: Vec<(String, String, Totals)>,
    settle: Duration,
) -> anyhow::Result<Vec<String>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let deadline = Instant::now() + settle;
    let mut pending = wanted;
    loop {
        let mut set = tokio::task::JoinSet::new();
        let mut next = pending.into_iter();
        let mut failed: Vec<((String, String, Totals), String)> = Vec::new();
        loop {
            while set.len() < 32 {
                let Some((c, m, want)) = next.next() else {
                    break;
                };
                let (client, base) = (client.clone(), base.to_string());
                set.spawn(async move {
                    let got = fetch_totals(&client, &base, &c, &m).await;
                    (c, m, want, got)
                });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (c, m, want, got) = joined.context("API check task")?;
            match got {
                Ok(got) if got == want => {}
                Ok(got) => {
                    let why = format!("{c}/{m}: api != expected: {}", got.diff(&want));
                    failed.push(((c, m, want), why));
                }
                Err(e) => failed.push(((c, m, want), e)),
            }
        }
        if failed.is_empty() || Instant::now() > deadline {
            return Ok(failed.into_iter().map(|(_, why)| why).collect());
        }
        pending = failed.into_iter().map(|(w, _)| w).collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A reader's context: end-of-partition is how the reader knows it is done, not an error worth
/// logging (librdkafka also reports it as a "global error").
struct Reader;

impl ClientContext for Reader {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(error = %error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for Reader {}

/// One record as the checks see it.
struct Seen<'a> {
    key: &'a [u8],
    payload: &'a [u8],
    headers: Vec<(&'a str, &'a str)>,
}

impl Seen<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }
}

/// Reads `topic` from the beginning to its end (`read_committed`, manual assignment, no group
/// commits), handing each record to `f`. Returns the records read.
fn read_topic(cfg: &Config, topic: &str, mut f: impl FnMut(&Seen<'_>)) -> anyhow::Result<u64> {
    let consumer: BaseConsumer<Reader> = crate::kafka::client_config(&cfg.kafka)
        .set(
            "group.id",
            format!("{}-verify-{}", cfg.kafka.group_id, now_ms()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "52428800")
        .create_with_context(Reader)
        .context("creating the reader")?;
    let parts = partitions(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while at_end.len() < parts.len() {
        if Instant::now() > deadline {
            bail!("reading {topic}: the end was not reached in 600 s");
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                f(&Seen {
                    key: m.key().unwrap_or_default(),
                    payload: m.payload().unwrap_or_default(),
                    headers,
                });
                n += 1;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
            None => {}
        }
    }
    Ok(n)
}

fn is_protobuf(ct: Option<&str>) -> bool {
    ct.is_some_and(|c| c.starts_with(codec::PROTOBUF) || c.starts_with("application/protobuf"))
}

/// A `balance-changed` record, as far as the checks go.
struct ChangedRec {
    customer: String,
    meter: String,
    version: u64,
    balance: Decimal,
    reason: String,
}

fn decode_changed(ct: Option<&str>, payload: &[u8]) -> Option<ChangedRec> {
    if is_protobuf(ct) {
        let m = pb::BalanceChanged::decode(payload).ok()?;
        Some(ChangedRec {
            customer: m.customer_id,
            meter: m.meter,
            version: m.version,
            balance: Decimal::from_str(&m.balance).ok()?,
            reason: m.reason,
        })
    } else {
        let v: Value = serde_json::from_slice(payload).ok()?;
        Some(ChangedRec {
            customer: v.get("customer_id")?.as_str()?.to_string(),
            meter: v.get("meter")?.as_str()?.to_string(),
            version: v.get("version")?.as_u64()?,
            balance: dec(v.get("balance"))?,
            reason: v.get("reason")?.as_str()?.to_string(),
        })
    }
}

/// (customer, meter, transition) of a `balance-exhausted` record.
fn decode_transition(
    ct: Option<&str>,
    payload: &[u8],
) -> Option<(String, String, ExpectedTransition)> {
    if is_protobuf(ct) {
        use pb::balance_transition::Transition as T;
        let t = pb::BalanceTransition::decode(payload).ok()?.transition?;
        let (kind, c, m, version, threshold) = match t {
            T::Exhausted(x) => ("exhausted", x.customer_id, x.meter, x.version, None),
            T::Restored(x) => ("restored", x.customer_id, x.meter, x.version, None),
            T::Low(x) => (
                "low",
                x.customer_id,
                x.meter,
                x.version,
                Decimal::from_str(&x.threshold).ok(),
            ),
        };
        Some((
            c,
            m,
            ExpectedTransition {
                kind: kind.into(),
                version,
                threshold,
            },
        ))
    } else {
        let v: Value = serde_json::from_slice(payload).ok()?;
        Some((
            v.get("customer_id")?.as_str()?.to_string(),
            v.get("meter")?.as_str()?.to_string(),
            ExpectedTransition {
                kind: v.get("type")?.as_str()?.to_string(),
                version: v.get("version")?.as_u64()?,
                threshold: dec(v.get("threshold")),
            },
        ))
    }
}

/// One `balance-changed` version as seen: how many records, the last balance and reason.
struct VersionSeen {
    count: u32,
    balance: Decimal,
    reason: String,
}

/// What the output topics showed, per (customer, meter) of the expectation.
#[derive(Default)]
struct TopicCheck {
    /// (customer, meter) -> version -> what was seen.
    changed: HashMap<(String, String), BTreeMap<u64, VersionSeen>>,
    changed_records: u64,
    undecodable: u64,
    transitions: HashMap<(String, String), Vec<ExpectedTransition>>,
    /// DLQ records of the run's customers by `error.reason`.
    dlq: BTreeMap<String, u64>,
}

/// The run's customer a DLQ key names (the `--bad` records include keys with `-other`).
fn dlq_customer<'a>(key: &'a [u8], customers: &HashSet<&str>) -> Option<&'a str> {
    let k = std::str::from_utf8(key).ok()?;
    let c = k.strip_suffix("-other").unwrap_or(k);
    customers.contains(c).then_some(k)
}

/// `drawdown verify`: the API, `balance-changed`, `balance-exhausted` and the DLQ against the
/// expectation. Exits non-zero on any mismatch.
pub async fn verify(cfg: &Config, args: VerifyArgs) -> anyhow::Result<()> {
    let exp = Expectation::load(&args.expect)?
        .with_context(|| format!("no expectation at {}", args.expect.display()))?;
    if let Some((first, _)) = exp.due {
        bail!(
            "the expectation has pending activations/expiries (from {first}); run the expire \
             phase first"
        );
    }
    let base = args
        .api
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.api.listen));
    let base = base.trim_end_matches('/').to_string();
    let mut wanted = Vec::new();
    let mut meter_names = BTreeSet::new();
    let mut pruned = 0;
    for (c, cm) in &exp.customers {
        for (m, e) in &cm.meters {
            meter_names.insert(m.clone());
            wanted.push((c.clone(), m.clone(), Totals::from(e)));
            pruned += e.pruned;
        }
    }
    let n_balances = wanted.len();
    let started = Instant::now();
    // (a) the API.
    let api_failures = check_api(&base, wanted, args.settle).await?;

    // (b), (c) and (d): the output topics.
    let exp = Arc::new(exp);
    let (exp2, cfg2) = (exp.clone(), cfg.clone());
    let topics = tokio::task::spawn_blocking(move || -> anyhow::Result<TopicCheck> {
        let mut tc = TopicCheck::default();
        let customers: HashSet<&str> = exp2.customers.keys().map(|c| c.as_str()).collect();
        read_topic(
            &cfg2,
            &cfg2.topics.balance_changed,
            |r| match decode_changed(r.content_type(), r.payload) {
                Some(ch) if customers.contains(ch.customer.as_str()) => {
                    tc.changed_records += 1;
                    let e = tc
                        .changed
                        .entry((ch.customer, ch.meter))
                        .or_default()
                        .entry(ch.version)
                        .or_insert(VersionSeen {
                            count: 0,
                            balance: ch.balance,
                            reason: String::new(),
                        });
                    e.count += 1;
                    e.balance = ch.balance;
                    e.reason = ch.reason;
                }
                Some(_) => {}
                None => tc.undecodable += 1,
            },
        )?;
        read_topic(
            &cfg2,
            &cfg2.topics.balance_exhausted,
            |r| match decode_transition(r.content_type(), r.payload) {
                Some((c, m, t)) if customers.contains(c.as_str()) => {
                    tc.transitions.entry((c, m)).or_default().push(t)
                }
                Some(_) => {}
                None => tc.undecodable += 1,
            },
        )?;
        read_topic(&cfg2, &cfg2.topics.dlq, |r| {
            if dlq_customer(r.key, &customers).is_some() {
                let reason = r.header("error.reason").unwrap_or("?").to_string();
                *tc.dlq.entry(reason).or_default() += 1;
            }
        })?;
        Ok(tc)
    })
    .await
    .context("topic check task")??;

    let mut failures: Vec<String> = api_failures.iter().map(|f| format!("api: {f}")).collect();
    let (mut dups, mut gaps, mut extra, mut wrong_reason) = (0u64, 0u64, 0u64, 0u64);
    let (mut want_tr, mut good_tr) = (0usize, 0usize);
    let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut seen_pairs = HashSet::new();
    for (c, cm) in &exp.customers {
        for (m, e) in &cm.meters {
            let key = (c.clone(), m.clone());
            seen_pairs.insert(key.clone());
            let versions = topics.changed.get(&key);
            let mut missing = 0;
            let mut first_wrong: Option<String> = None;
            let mut codes = e.reasons.chars();
            for v in 1..=e.version {
                let want = codes.next().and_then(Why::from_code);
                if let Some(w) = want {
                    *by_reason.entry(w.label()).or_default() += 1;
                }
                match versions.and_then(|vs| vs.get(&v)) {
                    None => missing += 1,
                    Some(s) => {
                        if s.count > 1 {
                            dups += u64::from(s.count - 1);
                        }
                        if want.is_some_and(|w| Why::from_label(&s.reason) != Some(w)) {
                            wrong_reason += 1;
                            first_wrong.get_or_insert_with(|| {
                                format!(
                                    "v{v} is {:?}, expected {:?}",
                                    s.reason,
                                    want.map(Why::label)
                                )
                            });
                        }
                    }
                }
            }
            if e.reasons.chars().count() as u64 != e.version {
                failures.push(format!(
                    "model: {c}/{m}: {} reasons for {} versions",
                    e.reasons.chars().count(),
                    e.version
                ));
            }
            if let Some(w) = first_wrong {
                failures.push(format!("changed: {c}/{m}: wrong reason: {w}"));
            }
            gaps += missing;
            let beyond = versions
                .map(|vs| vs.range(e.version + 1..).count() as u64)
                .unwrap_or(0);
            extra += beyond;
            if missing > 0 || beyond > 0 {
                failures.push(format!(
                    "changed: {c}/{m}: {missing} versions missing of 1..={}, {beyond} beyond",
                    e.version
                ));
            }
            let last = versions
                .and_then(|vs| vs.get(&e.version))
                .map(|s| s.balance);
            if e.version > 0 && last.is_some() && last != Some(e.balance) {
                failures.push(format!(
                    "changed: {c}/{m}: balance at v{} is {:?}, expected {}",
                    e.version, last, e.balance
                ));
            }
            let got = topics
                .transitions
                .get(&key)
                .map(Vec::as_slice)
                .unwrap_or_default();
            want_tr += e.transitions.len();
            good_tr += e
                .transitions
                .iter()
                .zip(got)
                .take_while(|(w, g)| w == g)
                .count();
            if got != e.transitions.as_slice() {
                let i = e
                    .transitions
                    .iter()
                    .zip(got)
                    .take_while(|(w, g)| w == g)
                    .count();
                failures.push(format!(
                    "transitions: {c}/{m}: {} expected, {} on the topic; first difference at #{i}: expected {:?}, got {:?}",
                    e.transitions.len(),
                    got.len(),
                    e.transitions.get(i),
                    got.get(i)
                ));
            }
        }
    }
    for key in topics.changed.keys().chain(topics.transitions.keys()) {
        if !seen_pairs.contains(key) {
            failures.push(format!(
                "topics: records for {}/{} which the expectation does not have",
                key.0, key.1
            ));
            seen_pairs.insert(key.clone());
        }
    }
    if dups > 0 {
        failures.push(format!("changed: {dups} duplicate versions"));
    }
    if topics.undecodable > 0 {
        failures.push(format!(
            "topics: {} undecodable records",
            topics.undecodable
        ));
    }
    // (d) the DLQ: the voids the ledger must refuse, by reason, and nothing else beyond the
    // malformed records.
    let dlq_total: u64 = topics.dlq.values().sum();
    let want_dlq_total: u64 = exp.dlq.values().sum();
    for reason in ["void_duplicate", "void_unknown"] {
        let (got, want) = (
            topics.dlq.get(reason).copied().unwrap_or(0),
            exp.dlq.get(reason).copied().unwrap_or(0),
        );
        if got != want {
            failures.push(format!("dlq: {got} records {reason}, expected {want}"));
        }
    }
    if dlq_total != want_dlq_total {
        failures.push(format!(
            "dlq: {dlq_total} records {:?}, expected {want_dlq_total} {:?}",
            topics.dlq, exp.dlq
        ));
    }
    let n_customers = exp.customers.len();
    let balances_ok = n_balances - api_failures.len();
    let reasons: Vec<String> = by_reason.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let summary = format!(
        "customers={n_customers} meters={} balances={balances_ok}/{n_balances} changed={} (dups={dups} gaps={gaps} extra={extra} wrong_reason={wrong_reason}) transitions={good_tr}/{want_tr} dlq={dlq_total} (void_duplicate={} void_unknown={}) elapsed={:.1}s\nverify: versions by reason: {}{}",
        meter_names.len(),
        topics.changed_records,
        topics.dlq.get("void_duplicate").copied().unwrap_or(0),
        topics.dlq.get("void_unknown").copied().unwrap_or(0),
        started.elapsed().as_secs_f64(),
        reasons.join(" "),
        if pruned > 0 {
            format!(" (model pruned {pruned} drained grants)")
        } else {
            String::new()
        }
    );
    if failures.is_empty() {
        println!("verify: OK {summary}");
        Ok(())
    } else {
        println!("verify: FAILED {summary}");
        for f in failures.iter().take(20) {
            println!("  {f}");
        }
        if failures.len() > 20 {
            println!("  ... and {} more", failures.len() - 20);
        }
        bail!("verification failed: {} mismatches", failures.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn meter(block: bool, lows: Vec<Low>) -> RefMeter {
        RefMeter {
            name: "m".into(),
            event: "e".into(),
            filter: BTreeMap::new(),
            sum: None,
            block,
            lows,
        }
    }

    fn g(id: &str, amount: &str) -> GrantCmd {
        GrantCmd {
            grant_id: id.into(),
            customer: "c".into(),
            meter: "m".into(),
            amount: d(amount),
            kind: Kind::TopUp,
            priority: 0,
            expires_at: None,
            effective_at: None,
            subscription_id: None,
            rollover: None,
        }
    }

    fn cycle(id: &str, amount: &str, rollover: &str) -> GrantCmd {
        GrantCmd {
            kind: Kind::Cycle,
            priority: 10,
            subscription_id: Some("s1".into()),
            rollover: Some(d(rollover)),
            ..g(id, amount)
        }
    }

    fn kinds(e: &Expected) -> Vec<(&str, u64)> {
        e.transitions
            .iter()
            .map(|t| (t.kind.as_str(), t.version))
            .collect()
    }

    fn remainders(e: &Expected) -> Vec<(&str, Decimal)> {
        e.slots
            .iter()
            .map(|s| (s.id.as_str(), s.remaining))
            .collect()
    }

    /// `balance = credited - consumed - expired + voided`, and the balance is the live one.
    fn books_balance(e: &Expected) {
        assert_eq!(e.balance, e.live_balance());
        assert_eq!(e.balance, e.credited - e.consumed - e.expired + e.voided);
        assert_eq!(e.reasons.chars().count() as u64, e.version);
    }

    #[test]
    fn overage_goes_into_debt_and_a_grant_pays_the_debt_first() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(&m, &g("a", "10"));
        e.usage(&m, d("15.5"));
        assert_eq!(
            (e.balance, e.consumed, e.overage),
            (d("-5.5"), d("15.5"), d("5.5"))
        );
        e.usage(&m, d("2"));
        assert_eq!((e.balance, e.overage), (d("-7.5"), d("7.5")));
        e.grant(&m, &g("b", "3"));
        assert_eq!(
            e.balance,
            d("-4.5"),
            "a grant smaller than the debt only reduces it"
        );
        assert_eq!(remainders(&e), vec![("a", d("0"))], "b went to the debt");
        e.grant(&m, &g("c", "10"));
        assert_eq!(e.balance, d("5.5"));
        books_balance(&e);
        assert_eq!(e.version, 5);
        assert_eq!(e.reasons, "guugg");
        assert_eq!(kinds(&e), vec![("exhausted", 2), ("restored", 5)]);
    }

    #[test]
    fn block_floors_at_zero_and_counts_the_rest_as_blocked() {
        let m = meter(true, vec![]);
        let mut e = Expected::default();
        e.grant(&m, &g("a", "10"));
        e.usage(&m, d("12.5"));
        assert_eq!(
            (e.balance, e.consumed, e.blocked, e.overage),
            (d("0"), d("10"), d("2.5"), d("0"))
        );
        e.usage(&m, d("3"));
        assert_eq!(
            (e.balance, e.consumed, e.blocked),
            (d("0"), d("10"), d("5.5"))
        );
        assert_eq!(e.version, 3, "fully blocked usage still makes a version");
        e.grant(&m, &g("b", "1"));
        e.usage(&m, d("1"));
        books_balance(&e);
        assert_eq!(
            kinds(&e),
            vec![("exhausted", 2), ("restored", 4), ("exhausted", 5)]
        );
    }

    #[test]
    fn zero_quantities_change_nothing() {
        let mut m = meter(false, vec![]);
        m.sum = Some("n".into());
        let mut c = CustomerModel::default();
        let ev = UsageEv {
            id: "e1".into(),
            customer: "c".into(),
            name: "e".into(),
            properties: [("n".to_string(), "0".to_string())].into(),
        };
        assert!(c.usage(&[m], &ev).is_empty());
        assert_eq!(c, CustomerModel::default());
    }

    #[test]
    fn usage_before_any_grant_is_not_an_exhaustion() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.usage(&m, d("1"));
        assert_eq!(e.balance, d("-1"));
        assert!(e.transitions.is_empty());
        e.grant(&m, &g("a", "5"));
        assert!(e.transitions.is_empty(), "never exhausted, so not restored");
    }

    #[test]
    fn low_thresholds_fire_once_and_rearm() {
        let m = meter(false, vec![Low::Units(d("50")), Low::Fraction(d("0.2"))]);
        let mut e = Expected::default();
        e.grant(&m, &g("a", "100")); // thresholds 50 and 20; from 0 up: nothing
        e.usage(&m, d("60")); // 40: below 50
        e.usage(&m, d("5")); // 35: nothing new
        e.usage(&m, d("20")); // 15: below 20
        e.grant(&m, &g("b", "100")); // 115, thresholds 50 and 40: both re-armed
        e.usage(&m, d("80")); // 35: below both again
        let got: Vec<_> = e
            .transitions
            .iter()
            .map(|t| (t.kind.as_str(), t.version, t.threshold))
            .collect();
        assert_eq!(
            got,
            vec![
                ("low", 2, Some(d("50"))),
                ("low", 4, Some(d("20"))),
                ("low", 6, Some(d("50"))),
                ("low", 6, Some(d("40"))),
            ]
        );
    }

    #[test]
    fn usage_draws_by_priority_then_soonest_expiry_then_arrival() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        let late = |id, p, x: Option<i64>| GrantCmd {
            priority: p,
            expires_at: x,
            ..g(id, "10")
        };
        e.grant(&m, &late("never", 5, None));
        e.grant(&m, &late("far", 5, Some(2_000)));
        e.grant(&m, &late("soon", 5, Some(1_000)));
        e.grant(&m, &late("first", 1, None));
        e.grant(&m, &late("second-arrival", 1, None));
        assert_eq!(
            e.slots.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            vec!["first", "second-arrival", "soon", "far", "never"]
        );
        let draw = e.usage(&m, d("25"));
        assert_eq!(
            draw.grants,
            vec![
                ("first".to_string(), d("10")),
                ("second-arrival".to_string(), d("10")),
                ("soon".to_string(), d("5")),
            ]
        );
        assert_eq!(
            remainders(&e)[..3],
            [
                ("first", d("0")),
                ("second-arrival", d("0")),
                ("soon", d("5"))
            ],
            "drained grants stay (a void gives back to them)"
        );
        books_balance(&e);
    }

    #[test]
    fn a_renewal_caps_the_carry_over_and_crosses_once() {
        let m = meter(false, vec![Low::Units(d("10"))]);
        let mut e = Expected::default();
        e.grant(&m, &cycle("c1", "20", "0"));
        e.grant(&m, &g("top", "4"));
        e.usage(&m, d("17")); // c1 (priority 10) after top (0): top 0, c1 7
        assert_eq!(remainders(&e), vec![("top", d("0")), ("c1", d("7"))]);
        assert_eq!(kinds(&e), vec![("low", 3)]);
        e.grant(&m, &cycle("c2", "100", "3"));
        // c1 forfeits its 7 (cycle_end, no transition judged), then c2: one crossing 7 -> 100.
        assert_eq!(e.reasons, "ggucg");
        assert_eq!(e.expired, d("7"));
        assert_eq!(remainders(&e), vec![("top", d("0")), ("c2", d("100"))]);
        assert_eq!(kinds(&e), vec![("low", 3)], "re-armed, nothing emitted");
        assert_eq!(e.cycle_credited, d("100"));
        e.usage(&m, d("95"));
        assert_eq!(kinds(&e), vec![("low", 3), ("low", 6)]);
        // c2 keeps 3 of its 5: still active after its cycle, drawn in its priority's place.
        e.grant(&m, &cycle("c3", "1", "0"));
        assert_eq!(e.expired, d("9"));
        assert_eq!(e.reasons, "ggucgucg");
        assert_eq!(
            remainders(&e),
            vec![("top", d("0")), ("c2", d("3")), ("c3", d("1"))]
        );
        assert!(e.slots[1].cycle_ended);
        // The next renewal does not end c2 again.
        e.grant(&m, &cycle("c4", "1", "0"));
        assert_eq!(e.expired, d("10"));
        assert_eq!(
            remainders(&e),
            vec![("top", d("0")), ("c2", d("3")), ("c4", d("1"))]
        );
        books_balance(&e);
    }

    #[test]
    fn a_renewal_from_an_exhausted_meter_restores_once() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(&m, &cycle("c1", "10", "5"));
        e.usage(&m, d("10"));
        e.grant(&m, &cycle("c2", "10", "0"));
        assert_eq!(e.reasons, "gug", "nothing forfeited: no cycle_end version");
        assert_eq!(kinds(&e), vec![("exhausted", 2), ("restored", 3)]);
        assert_eq!(remainders(&e), vec![("c2", d("10"))], "drained c1 is gone");
        // Another subscription's cycle is not ended.
        let mut other = cycle("o1", "5", "0");
        other.subscription_id = Some("s2".into());
        e.grant(&m, &other);
        e.grant(&m, &cycle("c3", "1", "0"));
        assert_eq!(remainders(&e), vec![("o1", d("5")), ("c3", d("1"))]);
        books_balance(&e);
    }

    #[test]
    fn scheduled_grants_activate_then_expiries_forfeit() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(
            &m,
            &GrantCmd {
                expires_at: Some(2_000),
                ..g("exp", "10")
            },
        );
        e.grant(
            &m,
            &GrantCmd {
                expires_at: Some(2_000),
                ..g("drained", "2")
            },
        );
        e.grant(
            &m,
            &GrantCmd {
                effective_at: Some(1_500),
                ..g("later", "20")
            },
        );
        assert_eq!(e.balance, d("12"), "pending grants are not usable");
        e.usage(&m, d("15")); // same expiry: by arrival, exp then drained; 3 into debt
        assert_eq!(
            remainders(&e),
            vec![("exp", d("0")), ("drained", d("0")), ("later", d("20"))]
        );
        assert_eq!(e.next_due(), Some(1_500));
        e.advance(&m, 1_000);
        assert_eq!(e.version, 4, "nothing due yet");
        e.advance(&m, 2_000);
        // Activated (pays the debt of 3), then the expiring ones: drained, so no version.
        assert_eq!(e.reasons, "ggsua");
        assert_eq!(remainders(&e), vec![("later", d("17"))]);
        assert_eq!(kinds(&e), vec![("exhausted", 4), ("restored", 5)]);
        assert_eq!(e.next_due(), None);
        e.grant(
            &m,
            &GrantCmd {
                expires_at: Some(3_000),
                ..g("x", "4")
            },
        );
        e.usage(&m, d("1"));
        e.advance(&m, 3_000);
        assert_eq!(e.reasons, "ggsuagux");
        assert_eq!(e.expired, d("3"));
        books_balance(&e);
    }

    #[test]
    fn a_void_gives_back_to_the_grants_or_as_an_adjustment() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(
            &m,
            &GrantCmd {
                expires_at: Some(1_000),
                ..g("exp", "5")
            },
        );
        e.grant(
            &m,
            &GrantCmd {
                priority: 50,
                ..g("keep", "5")
            },
        );
        let draw = e.usage(&m, d("12")); // exp 5, keep 5, debt 2
        assert_eq!(draw.debt, d("2"));
        e.advance(&m, 1_000); // exp drained: gone without a version
        e.grant(&m, &g("pay", "3")); // pays the debt 2, 1 left
        e.void_usage(&m, &draw, "ev1");
        // keep gets its 5 back; exp is gone (5) and the debt was repaid (2): adjustment of 7.
        assert_eq!(
            remainders(&e),
            vec![("pay", d("1")), ("keep", d("5")), ("void:ev1", d("7"))]
        );
        assert_eq!(e.slots[2].priority, 255);
        assert_eq!((e.voided, e.overage, e.debt), (d("12"), d("0"), d("0")));
        assert_eq!(e.reasons, "ggugv", "the drained expiry made no version");
        books_balance(&e);
        assert_eq!(kinds(&e), vec![("exhausted", 3), ("restored", 4)]);
    }

    #[test]
    fn a_void_of_usage_still_in_debt_repays_it_and_takes_back_blocked_units() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(&m, &g("a", "1"));
        let draw = e.usage(&m, d("4"));
        e.void_usage(&m, &draw, "ev");
        assert_eq!((e.balance, e.debt, e.overage), (d("1"), d("0"), d("0")));
        assert_eq!(remainders(&e), vec![("a", d("1"))]);
        books_balance(&e);
        let b = meter(true, vec![]);
        let mut e = Expected::default();
        e.grant(&b, &g("a", "1"));
        let draw = e.usage(&b, d("4"));
        e.void_usage(&b, &draw, "ev");
        assert_eq!((e.balance, e.blocked, e.consumed), (d("1"), d("0"), d("1")));
        books_balance(&e);
    }

    #[test]
    fn voids_of_grants_remove_the_remainder_and_repeats_are_refused() {
        let m = meter(false, vec![Low::Fraction(d("0.5"))]);
        let meters = [m.clone()];
        let mut c = CustomerModel::default();
        assert!(c.grant(&m, &cycle("c1", "10", "0")));
        assert!(c.grant(&m, &g("t", "10")));
        assert!(
            !c.grant(&m, &g("t", "99")),
            "a replayed grant id is ignored"
        );
        let ev = UsageEv {
            id: "e1".into(),
            customer: "c".into(),
            name: "e".into(),
            properties: BTreeMap::new(),
        };
        let draws = c.usage(&meters, &ev);
        c.remember("e1", draws, &mut StdRng::seed_from_u64(1));
        assert_eq!(c.void_grant(&meters, "t"), Ok(()));
        let e = &c.meters["m"];
        assert_eq!(
            (e.balance, e.credited, e.cycle_credited),
            (d("10"), d("11"), d("20"))
        );
        assert_eq!(c.void_grant(&meters, "t"), Err("void_duplicate"));
        assert_eq!(c.void_grant(&meters, "nope"), Err("void_unknown"));
        // The event drew 1 from t (priority 0), which is gone: back as an adjustment.
        assert_eq!(c.void_usage(&meters, "e1"), Ok(()));
        assert_eq!(c.void_usage(&meters, "e1"), Err("void_duplicate"));
        assert_eq!(c.void_usage(&meters, "e2"), Err("void_unknown"));
        let e = &c.meters["m"];
        assert_eq!(remainders(e), vec![("c1", d("10")), ("void:e1", d("1"))]);
        // Voiding the cycle grant lowers the cycle's credits too.
        assert_eq!(c.void_grant(&meters, "c1"), Ok(()));
        let e = &c.meters["m"];
        assert_eq!((e.balance, e.cycle_credited), (d("1"), d("10")));
        assert_eq!(e.reasons, "gguwvw");
        books_balance(e);
        assert_eq!(kinds(e), vec![("low", 6)], "1 < 0.5 x 10");
    }

    #[test]
    fn a_void_of_a_grant_already_gone_is_still_a_version() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(
            &m,
            &GrantCmd {
                expires_at: Some(10),
                ..g("x", "3")
            },
        );
        e.advance(&m, 10);
        e.void_grant(&m, "x");
        assert_eq!(e.reasons, "gxw");
        assert_eq!((e.credited, e.expired, e.balance), (d("3"), d("3"), d("0")));
        books_balance(&e);
    }

    #[test]
    fn beyond_sixteen_drained_grants_the_oldest_go() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        for i in 0..20 {
            e.grant(&m, &g(&format!("g{i:02}"), "1"));
        }
        e.usage(&m, d("18"));
        assert_eq!(e.pruned, 2);
        assert_eq!(e.slots.len(), 18);
        assert_eq!(e.slots[0].id, "g02");
        books_balance(&e);
    }

    #[test]
    fn the_expectation_tracks_what_is_due() {
        let m = meter(false, vec![]);
        let mut x = Expectation::default();
        x.due_at(5_000);
        x.due_at(4_000);
        assert_eq!(x.due, Some((4_000, 5_000)));
        x.customer("c").grant(
            &m,
            &GrantCmd {
                expires_at: Some(5_000),
                ..g("a", "2")
            },
        );
        x.advance(&[m], 5_000);
        assert_eq!(x.get("c", "m").unwrap().expired, d("2"));
    }

    #[test]
    fn an_event_feeds_every_meter_it_matches() {
        let cfg = Config::load(
            Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/drawdown.toml")),
            Vec::new(),
        )
        .unwrap();
        let meters: Vec<RefMeter> = cfg.meters.iter().map(RefMeter::from_def).collect();
        let props: BTreeMap<String, String> = [("tokens".to_string(), "12.5".to_string())].into();
        let q: Vec<_> = meters
            .iter()
            .filter_map(|m| {
                m.quantity("llm_completion", &props)
                    .map(|q| (m.name.as_str(), q))
            })
            .collect();
        assert_eq!(q, vec![("tokens", d("12.5")), ("llm_requests", d("1"))]);
    }

    /// A cross-check, in the tests only (the generator never calls the ledger): on random
    /// histories of one customer, the model and `crate::ledger` agree on every total, every
    /// grant's remainder in order, every version's reason and every transition. Time moves
    /// by 2 ms per input and scheduled grants start at odd times, so the ledger's
    /// `(effective_at, grant_id)` tie-breaks are the model's activation order, as in a run.
    #[test]
    fn the_model_agrees_with_the_ledger_on_random_histories() {
        use crate::ledger::{self as l, Book, Input, Ledger, Meters, Output};
        let cfg = Config::load(
            Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/drawdown.toml")),
            Vec::new(),
        )
        .unwrap();
        let ledger = Ledger::new(Meters::new(cfg.meters.clone()).unwrap());
        let meters: Vec<RefMeter> = cfg.meters.iter().map(RefMeter::from_def).collect();
        let cust = l::CustomerId::parse("c").unwrap();
        for case in 0..1000u64 {
            let mut rng = StdRng::seed_from_u64(case);
            let mut book = Book::new(cust.clone());
            let mut model = CustomerModel::default();
            let mut reasons: BTreeMap<String, String> = BTreeMap::new();
            let mut transitions: BTreeMap<String, Vec<ExpectedTransition>> = BTreeMap::new();
            let mut now: i64 = 1_000;
            let mut event_ids: Vec<String> = Vec::new();
            let mut n = 0u32;
            for _ in 0..80 {
                now += 2;
                if rng.random_bool(0.1) {
                    now += 2 * rng.random_range(1..15i64);
                }
                n += 1;
                let m = meters[rng.random_range(0..meters.len())].clone();
                let input = match rng.random_range(0..100) {
                    0..=34 => {
                        let kind =
                            [Kind::Cycle, Kind::TopUp, Kind::Adjustment][rng.random_range(0..3)];
                        let amount = Decimal::from(rng.random_range(1..=120u32));
                        let mut gc = GrantCmd {
                            grant_id: format!("g{n:04}"),
                            customer: "c".into(),
                            meter: m.name.clone(),
                            amount,
                            kind,
                            priority: [0u8, 10, 50, 200][rng.random_range(0..4)],
                            expires_at: None,
                            effective_at: None,
                            subscription_id: None,
                            rollover: None,
                        };
                        if kind == Kind::Cycle {
                            gc.subscription_id = Some(["s1", "s2"][rng.random_range(0..2)].into());
                            gc.rollover = Some(Decimal::from(rng.random_range(0..=60u32)));
                        }
                        if rng.random_bool(0.25) {
                            gc.effective_at = Some(now + 2 * rng.random_range(1..20i64) + 1);
                        }
                        if rng.random_bool(0.3) {
                            gc.expires_at =
                                Some(gc.effective_at.unwrap_or(now) + rng.random_range(1..60i64));
                        }
                        if rng.random_bool(0.05) && n > 1 {
                            gc.grant_id = format!("g{:04}", rng.random_range(1..n));
                        }
                        Input::Grant(l::Grant {
                            grant_id: l::GrantId::parse(gc.grant_id.clone()).unwrap(),
                            customer: cust.clone(),
                            meter: l::MeterName::parse(gc.meter.clone()).unwrap(),
                            amount: gc.amount,
                            kind: match kind {
                                Kind::Cycle => l::GrantKind::Cycle,
                                Kind::TopUp => l::GrantKind::TopUp,
                                Kind::Adjustment => l::GrantKind::Adjustment,
                            },
                            priority: gc.priority,
                            effective_at: gc.effective_at,
                            expires_at: gc.expires_at,
                            subscription_id: gc.subscription_id.clone(),
                            rollover: gc.rollover.unwrap_or_default(),
                        })
                    }
                    35..=79 => {
                        let mut props = BTreeMap::new();
                        for p in meters.iter().filter(|o| o.event == m.event) {
                            if let Some(p) = &p.sum {
                                props.insert(p.clone(), rng.random_range(0..=90u32).to_string());
                            }
                        }
                        let id = format!("e{n:04}");
                        event_ids.push(id.clone());
                        Input::Usage(l::Usage {
                            id: l::EventId::parse(id).unwrap(),
                            customer: cust.clone(),
                            name: m.event.clone(),
                            timestamp_ms: now,
                            properties: props,
                        })
                    }
                    80..=91 if !event_ids.is_empty() => {
                        let id = if rng.random_bool(0.9) {
                            event_ids[rng.random_range(0..event_ids.len())].clone()
                        } else {
                            "unknown".into()
                        };
                        Input::VoidUsage {
                            customer: cust.clone(),
                            event_id: l::EventId::parse(id).unwrap(),
                        }
                    }
                    _ => Input::VoidGrant {
                        customer: cust.clone(),
                        grant_id: l::GrantId::parse(format!("g{:04}", rng.random_range(1..=n)))
                            .unwrap(),
                    },
                };
                // The ledger, as the pipeline drives it: time first, then the input.
                let mut refs = l::Refs::default();
                input.refs(&mut refs);
                for e in refs.events {
                    book.events.entry(e).or_insert(None);
                }
                for g in refs.grants {
                    book.grants.entry(g).or_insert(None);
                }
                let mut out = Vec::new();
                ledger.advance(&mut book, now, &mut out);
                let result = ledger.apply(&mut book, &input, now, &mut out);
                for o in out {
                    match o {
                        Output::Changed(ch) => reasons
                            .entry(ch.meter.to_string())
                            .or_default()
                            .push(Why::from_label(ch.reason.as_str()).unwrap().code()),
                        Output::Transition(t) => transitions
                            .entry(t.meter.to_string())
                            .or_default()
                            .push(ExpectedTransition {
                                kind: format!("{:?}", t.kind).to_lowercase(),
                                version: t.version,
                                threshold: t.threshold,
                            }),
                        _ => {}
                    }
                }
                // The model.
                for (name, e) in model.meters.iter_mut() {
                    if e.next_due().is_some_and(|d| d <= now) {
                        e.advance(ref_meter(&meters, name), now);
                    }
                }
                let refused = match &input {
                    Input::Grant(g) => {
                        let gc = GrantCmd {
                            grant_id: g.grant_id.to_string(),
                            customer: "c".into(),
                            meter: g.meter.to_string(),
                            amount: g.amount,
                            kind: match g.kind {
                                l::GrantKind::Cycle => Kind::Cycle,
                                l::GrantKind::TopUp => Kind::TopUp,
                                l::GrantKind::Adjustment => Kind::Adjustment,
                            },
                            priority: g.priority,
                            expires_at: g.expires_at,
                            effective_at: g.effective_at,
                            subscription_id: g.subscription_id.clone(),
                            rollover: Some(g.rollover),
                        };
                        model.grant(ref_meter(&meters, &gc.meter), &gc);
                        None
                    }
                    Input::Usage(u) => {
                        let ev = UsageEv {
                            id: u.id.to_string(),
                            customer: "c".into(),
                            name: u.name.clone(),
                            properties: u.properties.clone(),
                        };
                        let draws = model.usage(&meters, &ev);
                        model.events.insert(
                            ev.id,
                            EventInfo {
                                draws,
                                voided: false,
                            },
                        );
                        None
                    }
                    Input::VoidUsage { event_id, .. } => {
                        model.void_usage(&meters, event_id.as_str()).err()
                    }
                    Input::VoidGrant { grant_id, .. } => {
                        model.void_grant(&meters, grant_id.as_str()).err()
                    }
                };
                assert_eq!(
                    result.as_ref().err().map(|e| e.reason()),
                    refused,
                    "case {case} op {n}: {input:?}"
                );
                for (name, e) in &model.meters {
                    let got = &book.meters[&l::MeterName::parse(name.clone()).unwrap()];
                    let ledger_view = Totals {
                        balance: got.balance(),
                        credited: got.credited,
                        consumed: got.consumed,
                        overage: got.overage,
                        blocked: got.blocked,
                        expired: got.expired,
                        voided: got.voided,
                        version: got.version,
                        grants: got
                            .grants
                            .iter()
                            .map(|g| (g.id.to_string(), g.remaining, g.active))
                            .collect(),
                    };
                    let want = Totals::from(e);
                    assert_eq!(
                        ledger_view,
                        want,
                        "case {case} op {n} meter {name}: {}",
                        ledger_view.diff(&want)
                    );
                    assert_eq!(
                        reasons.get(name).cloned().unwrap_or_default(),
                        e.reasons,
                        "case {case} op {n} meter {name}"
                    );
                    assert_eq!(
                        transitions.get(name).cloned().unwrap_or_default(),
                        e.transitions,
                        "case {case} op {n} meter {name}"
                    );
                }
            }
        }
    }

    #[test]
    fn reasons_round_trip_their_codes_and_labels() {
        for w in Why::ALL {
            assert_eq!(Why::from_code(w.code()), Some(w));
            assert_eq!(Why::from_label(w.label()), Some(w));
        }
    }

    #[test]
    fn the_expectation_survives_a_round_trip() {
        let m = meter(false, vec![Low::Units(d("1"))]);
        let mut x = Expectation {
            prefix: "cus".into(),
            ..Default::default()
        };
        x.customer("cus-1").grant(&m, &cycle("g", "2.25", "1"));
        x.customer("cus-1").meter("m").usage(&m, d("3"));
        x.count_dlq("void_unknown", 2);
        let back: Expectation = serde_json::from_slice(&serde_json::to_vec(&x).unwrap()).unwrap();
        assert_eq!(back.customers, x.customers);
        assert_eq!(back.dlq, x.dlq);
    }
}
