//! The load generator (`drawdown produce`), its own reference arithmetic, and the verifier
//! (`drawdown verify`, `drawdown wait-idle`).
//!
//! # What is generated
//! `produce --phase` chooses the records, for customers `<prefix>-0 .. <prefix>-(N-1)` over the
//! configured meters, keyed by `customer_id`, written by an idempotent producer with the Java
//! client's partitioner (`murmur2_random`), as JSON or protobuf (`content-type` header):
//! - `grants`: one grant per customer x meter (`top_up` or `adjustment`, varied priorities, some
//!   with a far expiry), sized around the usage planned by `--events` so that some customers run
//!   out and some do not;
//! - `usage`: `--events` usage events; the event names are the meters' `event`s, sum meters get
//!   exact decimal quantities (`"12.5"`), and an event matching several meters (the example's
//!   `llm_completion` feeds `tokens` and `llm_requests`) draws from each. `--duplicates F`
//!   re-sends a fraction of them with the same id (they must be counted once);
//! - `topups`: top-ups for a random subset, restoring most of the exhausted meters (and, on
//!   purpose, paying only part of some debts so they stay exhausted);
//! - `mixed`: usage with grants and top-ups interleaved, for demos and throughput. The relative
//!   order of two topics is not defined, so nothing exact can be predicted: `--expect` is refused.
//!
//! `--bad N` adds N malformed records (garbage bytes, wrong types, missing fields, a negative
//! amount, an unknown meter, ...) that must end in the DLQ and change nothing.
//!
//! # The expectation
//! `--expect FILE` keeps, across phases, what drawdown must end with, computed by the generator's
//! own arithmetic ([`Expected`]), deliberately independent of `crate::ledger`: per (customer,
//! meter) the totals, the version (one per applied grant and per applied usage event with a
//! quantity > 0; duplicates none) and the ordered transitions (exhausted, restored, low). It is
//! exact within a phase because each customer's records go to one partition of one topic, in
//! order (idempotent producer), and phases are separated by `wait-idle`. Cycle grants, expiries
//! and voids are not generated: modelling them needs the per-grant draw-down order, which the
//! ledger's own property tests cover.
//!
//! # Verification
//! `verify` compares the expectation with (a) the HTTP API, (b) every `balance-changed` record of
//! the expectation's customers (exactly one per version, no gaps, the last balance) and (c) the
//! transitions on `balance-exhausted`, one for one. `wait-idle` waits until the consumer group
//! has committed every input record.

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
    /// One initial grant per customer x meter.
    Grants,
    /// `--events` usage events (plus `--duplicates`).
    Usage,
    /// Top-ups for a random subset, restoring some exhausted meters.
    Topups,
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
    /// Usage events to send (usage, mixed); for grants and topups, the usage volume per usage
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
// The reference arithmetic
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

/// What one (customer, meter) must show, computed with plain arithmetic:
/// - a grant adds to `credited` and `balance` (in overage mode it pays the debt first, which
///   is the same sum: `balance = credited - consumed` always);
/// - usage `q` in overage mode: `consumed += q`, the part beyond a positive balance is
///   `overage`, `balance -= q`; in block mode only `min(q, balance)` is drawn (`consumed`), the
///   rest is `blocked`, and the balance floors at 0;
/// - every applied grant and every applied usage with `q > 0` is one version;
/// - `exhausted` when the balance goes from > 0 to <= 0 (unless already exhausted), `restored`
///   when exhausted and > 0 again; `low(t)` when it goes from >= t to < t while armed, re-armed
///   when >= t again, t being units or a fraction of the credits granted (no cycles are
///   generated, so "granted in the current cycle" is everything credited).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Expected {
    credited: Decimal,
    consumed: Decimal,
    overage: Decimal,
    blocked: Decimal,
    balance: Decimal,
    version: u64,
    exhausted: bool,
    /// Per threshold: armed (`true` until it fires).
    low_armed: Vec<bool>,
    transitions: Vec<ExpectedTransition>,
}

impl Expected {
    fn grant(&mut self, m: &RefMeter, amount: Decimal) {
        let before = self.balance;
        self.credited += amount;
        self.balance += amount;
        self.changed(m, before);
    }

    fn usage(&mut self, m: &RefMeter, q: Decimal) {
        if q.is_zero() {
            return;
        }
        let before = self.balance;
        let available = self.balance.max(Decimal::ZERO);
        if m.block {
            let drawn = q.min(available);
            self.consumed += drawn;
            self.blocked += q - drawn;
            self.balance -= drawn;
        } else {
            self.consumed += q;
            self.overage += q - q.min(available);
            self.balance -= q;
        }
        self.changed(m, before);
    }

    fn changed(&mut self, m: &RefMeter, before: Decimal) {
        self.version += 1;
        let after = self.balance;
        let zero = Decimal::ZERO;
        let mut push = |kind: &str, threshold| {
            self.transitions.push(ExpectedTransition {
                kind: kind.into(),
                version: self.version,
                threshold,
            })
        };
        if before > zero && after <= zero && !self.exhausted {
            self.exhausted = true;
            push("exhausted", None);
        } else if self.exhausted && after > zero {
            self.exhausted = false;
            push("restored", None);
        }
        self.low_armed.resize(m.lows.len(), true);
        for (i, low) in m.lows.iter().enumerate() {
            let t = match *low {
                Low::Units(u) => u,
                Low::Fraction(_) if self.credited <= zero => continue,
                Low::Fraction(f) => f * self.credited,
            };
            if self.low_armed[i] && before >= t && after < t {
                self.low_armed[i] = false;
                self.transitions.push(ExpectedTransition {
                    kind: "low".into(),
                    version: self.version,
                    threshold: Some(t),
                });
            } else if !self.low_armed[i] && after >= t {
                self.low_armed[i] = true;
            }
        }
    }
}

/// The expectation file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Expectation {
    /// Customer id prefix of the run.
    prefix: String,
    /// Phases produced so far (part of the record ids and of the RNG seed).
    phases: u64,
    /// customer -> meter -> expected.
    customers: BTreeMap<String, BTreeMap<String, Expected>>,
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
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(())
    }

    fn meter(&mut self, customer: &str, meter: &str) -> &mut Expected {
        self.customers
            .entry(customer.into())
            .or_default()
            .entry(meter.into())
            .or_default()
    }

    fn get(&self, customer: &str, meter: &str) -> Option<&Expected> {
        self.customers.get(customer).and_then(|m| m.get(meter))
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
    /// Unique per phase: part of every record id.
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
    kind: &'static str,
    priority: u8,
    expires_at: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
            id: format!("{}-e{}", self.tag, self.seq),
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

    fn grant(
        &mut self,
        customer: &str,
        m: &RefMeter,
        amount: Decimal,
        kind: &'static str,
    ) -> GrantCmd {
        self.seq += 1;
        let expires_at = self
            .rng
            .random_bool(0.2)
            .then(|| now_ms() + 365 * 24 * 3600 * 1000);
        GrantCmd {
            grant_id: format!("{}-g{}-{}", self.tag, self.seq, m.name),
            customer: customer.into(),
            meter: m.name.clone(),
            amount,
            kind,
            priority: [0u8, 10, 10, 50, 255][self.rng.random_range(0..5)],
            expires_at,
        }
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
                    "meter": g.meter, "amount": g.amount.to_string(), "kind": g.kind,
                    "priority": g.priority,
                });
                if let Some(x) = g.expires_at {
                    v["expires_at"] = Value::from(x);
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
                        "adjustment" => pb::GrantKind::Adjustment as i32,
                        _ => pb::GrantKind::TopUp as i32,
                    },
                    priority: u32::from(g.priority),
                    effective_at_ms: 0,
                    expires_at_ms: g.expires_at.unwrap_or(0),
                    subscription_id: String::new(),
                    rollover: String::new(),
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

impl Run<'_> {
    fn send_usage(&mut self, customer: usize) -> anyhow::Result<()> {
        let e = self.gen.usage_event(customer);
        for m in &self.gen.meters {
            if let Some(q) = m.quantity(&e.name, &e.properties) {
                if !q.is_zero() {
                    self.model.meter(&e.customer, &m.name).usage(m, q);
                }
            }
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
        Ok(())
    }

    fn send_grant(&mut self, g: &GrantCmd) -> anyhow::Result<()> {
        let m = self
            .gen
            .meters
            .iter()
            .find(|m| m.name == g.meter)
            .expect("a configured meter");
        self.model.meter(&g.customer, &g.meter).grant(m, g.amount);
        let rec = self.gen.encode_grant(g);
        self.sender.send(&rec, "grants")
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

    fn phase_grants(&mut self) -> anyhow::Result<()> {
        let steps = (self.gen.customers * self.gen.meters.len()) as u64;
        let mut step = 0;
        for i in 0..self.gen.customers {
            let c = self.gen.customer(i);
            for mi in 0..self.gen.meters.len() {
                let m = self.gen.meters[mi].clone();
                let base = self.gen.planned_use(&m);
                let amount = self.gen.amount(&m, base);
                let kind = if self.gen.rng.random_bool(0.8) {
                    "top_up"
                } else {
                    "adjustment"
                };
                let g = self.gen.grant(&c, &m, amount, kind);
                self.send_grant(&g)?;
                self.maybe_bad(step, steps)?;
                step += 1;
            }
        }
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
                    let g = self.gen.grant(&c, &m, amount, "top_up");
                    self.send_grant(&g)?;
                }
                self.maybe_bad(step, steps)?;
                step += 1;
            }
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
                    let g = self.gen.grant(&c, &m, amount, "top_up");
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
    model.prefix = args.prefix.clone();
    model.phases += 1;
    // Record ids must be unique across phases: with an expectation the phase number makes them
    // so (deterministically); without one, the clock does.
    let run = if args.expect.is_some() {
        format!("p{}", model.phases)
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
        Phase::Usage => run.phase_usage()?,
        Phase::Topups => run.phase_topups()?,
        Phase::Mixed => run.phase_mixed()?,
    }
    run.flush_bad()?;
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

/// The totals compared with the API.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Totals {
    balance: Decimal,
    credited: Decimal,
    consumed: Decimal,
    overage: Decimal,
    blocked: Decimal,
    version: u64,
}

impl From<&Expected> for Totals {
    fn from(e: &Expected) -> Self {
        Self {
            balance: e.balance,
            credited: e.credited,
            consumed: e.consumed,
            overage: e.overage,
            blocked: e.blocked,
            version: e.version,
        }
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
    Some(Totals {
        balance: dec(v.get("balance"))?,
        credited: dec(v.get("credited"))?,
        consumed: dec(v.get("consumed"))?,
        overage: dec(v.get("overage"))?,
        blocked: dec(v.get("blocked"))?,
        version: v.get("version")?.as_u64()?,
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
                Ok(got) => failed.push((
                    (c.clone(), m.clone(), want),
                    format!("{c}/{m}: api {got:?} != expected {want:?}"),
                )),
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

/// Reads `topic` from the beginning to its end (`read_committed`, manual assignment, no group
/// commits), handing each record's content type and payload to `f`. Returns the records read.
fn read_topic(
    cfg: &Config,
    topic: &str,
    mut f: impl FnMut(Option<&str>, &[u8]),
) -> anyhow::Result<u64> {
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
                let ct = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key.eq_ignore_ascii_case("content-type"))
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                });
                f(ct, m.payload().unwrap_or_default());
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

/// (customer, meter, version, balance) of a `balance-changed` record.
fn decode_changed(ct: Option<&str>, payload: &[u8]) -> Option<(String, String, u64, Decimal)> {
    if is_protobuf(ct) {
        let m = pb::BalanceChanged::decode(payload).ok()?;
        Some((
            m.customer_id,
            m.meter,
            m.version,
            Decimal::from_str(&m.balance).ok()?,
        ))
    } else {
        let v: Value = serde_json::from_slice(payload).ok()?;
        Some((
            v.get("customer_id")?.as_str()?.to_string(),
            v.get("meter")?.as_str()?.to_string(),
            v.get("version")?.as_u64()?,
            dec(v.get("balance"))?,
        ))
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

/// What the output topics showed, per (customer, meter) of the expectation.
#[derive(Default)]
struct TopicCheck {
    /// (customer, meter) -> version -> (count, balance).
    changed: HashMap<(String, String), BTreeMap<u64, (u32, Decimal)>>,
    changed_records: u64,
    undecodable: u64,
    transitions: HashMap<(String, String), Vec<ExpectedTransition>>,
}

/// `drawdown verify`: the API, `balance-changed` and `balance-exhausted` against the
/// expectation. Exits non-zero on any mismatch.
pub async fn verify(cfg: &Config, args: VerifyArgs) -> anyhow::Result<()> {
    let exp = Expectation::load(&args.expect)?
        .with_context(|| format!("no expectation at {}", args.expect.display()))?;
    let base = args
        .api
        .clone()
        .unwrap_or_else(|| format!("http://{}", cfg.api.listen));
    let base = base.trim_end_matches('/').to_string();
    let mut wanted = Vec::new();
    let mut meter_names = BTreeSet::new();
    for (c, meters) in &exp.customers {
        for (m, e) in meters {
            meter_names.insert(m.clone());
            wanted.push((c.clone(), m.clone(), Totals::from(e)));
        }
    }
    let n_balances = wanted.len();
    let started = Instant::now();
    // (a) the API.
    let api_failures = check_api(&base, wanted, args.settle).await?;

    // (b) and (c) the output topics.
    let exp = Arc::new(exp);
    let (exp2, cfg2) = (exp.clone(), cfg.clone());
    let topics = tokio::task::spawn_blocking(move || -> anyhow::Result<TopicCheck> {
        let mut tc = TopicCheck::default();
        let customers: HashSet<&str> = exp2.customers.keys().map(|c| c.as_str()).collect();
        read_topic(
            &cfg2,
            &cfg2.topics.balance_changed,
            |ct, payload| match decode_changed(ct, payload) {
                Some((c, m, version, balance)) if customers.contains(c.as_str()) => {
                    tc.changed_records += 1;
                    let e = tc
                        .changed
                        .entry((c, m))
                        .or_default()
                        .entry(version)
                        .or_insert((0, balance));
                    e.0 += 1;
                    e.1 = balance;
                }
                Some(_) => {}
                None => tc.undecodable += 1,
            },
        )?;
        read_topic(
            &cfg2,
            &cfg2.topics.balance_events,
            |ct, payload| match decode_transition(ct, payload) {
                Some((c, m, t)) if customers.contains(c.as_str()) => {
                    tc.transitions.entry((c, m)).or_default().push(t)
                }
                Some(_) => {}
                None => tc.undecodable += 1,
            },
        )?;
        Ok(tc)
    })
    .await
    .context("topic check task")??;

    let mut failures: Vec<String> = api_failures.iter().map(|f| format!("api: {f}")).collect();
    let (mut dups, mut gaps, mut extra) = (0u64, 0u64, 0u64);
    let (mut want_tr, mut good_tr) = (0usize, 0usize);
    let mut seen_pairs = HashSet::new();
    for (c, meters) in &exp.customers {
        for (m, e) in meters {
            let key = (c.clone(), m.clone());
            seen_pairs.insert(key.clone());
            let versions = tc_versions(&topics, &key);
            let mut missing = 0;
            for v in 1..=e.version {
                match versions.and_then(|vs| vs.get(&v)) {
                    None => missing += 1,
                    Some((n, _)) if *n > 1 => dups += u64::from(n - 1),
                    Some(_) => {}
                }
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
            let last = versions.and_then(|vs| vs.get(&e.version)).map(|(_, b)| *b);
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
    let n_customers = exp.customers.len();
    let balances_ok = n_balances - api_failures.len();
    let summary = format!(
        "customers={n_customers} meters={} balances={balances_ok}/{n_balances} changed={} (dups={dups} gaps={gaps} extra={extra}) transitions={good_tr}/{want_tr} elapsed={:.1}s",
        meter_names.len(),
        topics.changed_records,
        started.elapsed().as_secs_f64()
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

fn tc_versions<'a>(
    tc: &'a TopicCheck,
    key: &(String, String),
) -> Option<&'a BTreeMap<u64, (u32, Decimal)>> {
    tc.changed.get(key)
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

    fn kinds(e: &Expected) -> Vec<(&str, u64)> {
        e.transitions
            .iter()
            .map(|t| (t.kind.as_str(), t.version))
            .collect()
    }

    #[test]
    fn overage_goes_into_debt_and_a_grant_pays_the_debt_first() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.grant(&m, d("10"));
        e.usage(&m, d("15.5"));
        assert_eq!(
            (e.balance, e.consumed, e.overage),
            (d("-5.5"), d("15.5"), d("5.5"))
        );
        e.usage(&m, d("2"));
        assert_eq!((e.balance, e.overage), (d("-7.5"), d("7.5")));
        e.grant(&m, d("3"));
        assert_eq!(
            e.balance,
            d("-4.5"),
            "a grant smaller than the debt only reduces it"
        );
        e.grant(&m, d("10"));
        assert_eq!(e.balance, d("5.5"));
        assert_eq!(e.balance, e.credited - e.consumed);
        assert_eq!(e.version, 5);
        assert_eq!(kinds(&e), vec![("exhausted", 2), ("restored", 5)]);
    }

    #[test]
    fn block_floors_at_zero_and_counts_the_rest_as_blocked() {
        let m = meter(true, vec![]);
        let mut e = Expected::default();
        e.grant(&m, d("10"));
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
        e.grant(&m, d("1"));
        e.usage(&m, d("1"));
        assert_eq!(
            kinds(&e),
            vec![("exhausted", 2), ("restored", 4), ("exhausted", 5)]
        );
    }

    #[test]
    fn zero_quantities_change_nothing() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.usage(&m, Decimal::ZERO);
        assert_eq!(e, Expected::default());
    }

    #[test]
    fn usage_before_any_grant_is_not_an_exhaustion() {
        let m = meter(false, vec![]);
        let mut e = Expected::default();
        e.usage(&m, d("1"));
        assert_eq!(e.balance, d("-1"));
        assert!(e.transitions.is_empty());
        e.grant(&m, d("5"));
        assert!(e.transitions.is_empty(), "never exhausted, so not restored");
    }

    #[test]
    fn low_thresholds_fire_once_and_rearm() {
        let m = meter(false, vec![Low::Units(d("50")), Low::Fraction(d("0.2"))]);
        let mut e = Expected::default();
        e.grant(&m, d("100")); // thresholds 50 and 20; from 0 up: nothing
        e.usage(&m, d("60")); // 40: below 50
        e.usage(&m, d("5")); // 35: nothing new
        e.usage(&m, d("20")); // 15: below 20
        e.grant(&m, d("100")); // 115, thresholds 50 and 40: both re-armed
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

    #[test]
    fn the_expectation_survives_a_round_trip() {
        let m = meter(false, vec![Low::Units(d("1"))]);
        let mut x = Expectation {
            prefix: "cus".into(),
            ..Default::default()
        };
        x.meter("cus-1", "m").grant(&m, d("2.25"));
        x.meter("cus-1", "m").usage(&m, d("3"));
        let back: Expectation = serde_json::from_slice(&serde_json::to_vec(&x).unwrap()).unwrap();
        assert_eq!(back.get("cus-1", "m"), x.get("cus-1", "m"));
    }
}
