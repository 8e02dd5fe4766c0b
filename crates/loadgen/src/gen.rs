//! What records to make: ids, customers, amounts and encodings of one phase.
//!
//! Records are test input, so they are built here rather than with the service's encoders, on
//! purpose varied the way real producers vary: RFC 3339 or millisecond timestamps, sum
//! quantities as JSON numbers or strings, JSON or protobuf, and malformed records. The
//! `content-type` header comes from `drawdown::codec`.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use drawdown::clock::now_ms;
use drawdown::codec::{self, pb};
use drawdown::config::OutputFormat;
use drawdown_model::{Aggregation, Grant, GrantKind, Meter, Reserve, Rules, Usage};
use prost::Message as _;
use rand::rngs::StdRng;
use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Which input topic a record goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputTopic {
    /// `topics.usage`.
    Usage,
    /// `topics.grants` (grants and voids).
    Grants,
}

/// One record to send.
#[derive(Clone, Debug)]
pub struct Rec {
    /// Where.
    pub topic: InputTopic,
    /// The record key (the customer, except for the misrouted bad records).
    pub key: String,
    /// The encoded message.
    pub payload: Vec<u8>,
    /// Its `content-type` header.
    pub content_type: &'static str,
}

/// A void, before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoidCmd {
    /// `VoidUsage` of this event id.
    Usage(String),
    /// `VoidGrant` of this grant id.
    Grant(String),
}

/// A reservation command, before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReservationCmd {
    /// Hold units.
    Reserve(Reserve),
    /// End the hold of this reservation id.
    Release(String),
}

/// Priorities of generated top-ups and adjustments: 255 is left to the rules' `void:`
/// adjustments (see `produce`'s module docs).
const TOPUP_PRIORITIES: [u8; 6] = [0, 10, 10, 50, 100, 200];

/// How old a late usage event's time is: more than drawdown's default grace (30 s).
pub const LATE_BY: Duration = Duration::from_secs(120);

/// A year, in ms: far expiries never come due during a run.
const FAR: i64 = 365 * 24 * 3600 * 1000;

/// The sum property of a meter, if it sums one.
pub fn sum_property(m: &Meter) -> Option<&str> {
    match &m.aggregation {
        Aggregation::Sum(p) => Some(p),
        Aggregation::Count => None,
    }
}

/// The generator of one phase.
pub struct Gen {
    /// Seeded per phase.
    pub rng: StdRng,
    /// The configured meters, as the model's.
    pub rules: Rules,
    /// Customer ids are `<prefix>-<i>`.
    pub prefix: String,
    /// How many customers.
    pub customers: usize,
    /// Unique per phase: part of every record id (zero-padded, so ids sort in sending order).
    pub tag: String,
    /// JSON or protobuf.
    pub format: OutputFormat,
    /// Planned usage volume, to size the grants.
    pub events: u64,
    /// Last id number used.
    pub seq: u64,
    /// Fraction of usage events sent with an event time [`LATE_BY`] in the past.
    pub late: f64,
    /// Whether late events may be sent now (see `Expectation::late_allowed`).
    pub late_allowed: bool,
}

impl Gen {
    /// The configured meters.
    pub fn meters(&self) -> &[Meter] {
        self.rules.meters()
    }

    /// The id of customer `i`.
    pub fn customer(&self, i: usize) -> String {
        format!("{}-{i}", self.prefix)
    }

    /// The index of a customer, skewed: a fifth of the traffic comes from a tenth of them.
    pub fn pick_index(&mut self) -> usize {
        let hot = (self.customers / 10).max(1);
        if self.rng.random_bool(0.2) {
            self.rng.random_range(0..hot)
        } else {
            self.rng.random_range(0..self.customers)
        }
    }

    /// A new id of this phase (`<tag>-<what><9 digits>`).
    pub fn next_id(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("{}-{what}{:09}", self.tag, self.seq)
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

    /// A usage event of customer `i` for a random meter (and every meter counting the same
    /// event); returns the customer id and the event.
    pub fn usage_event(&mut self, i: usize) -> (String, Usage) {
        let k = self.rng.random_range(0..self.meters().len());
        self.usage_event_of(i, k)
    }

    /// A usage event of customer `i` that meter `k` counts (and every meter counting the same
    /// event); returns the customer id and the event.
    pub fn usage_event_of(&mut self, i: usize, k: usize) -> (String, Usage) {
        let customer = self.customer(i);
        let chosen = self.meters()[k].clone();
        let mut properties = chosen.filter.clone();
        // Every sum property of the meters counting this event gets a value.
        let sums: BTreeSet<String> = self
            .meters()
            .iter()
            .filter(|m| m.event == chosen.event)
            .filter_map(|m| sum_property(m).map(String::from))
            .collect();
        for p in sums {
            if let std::collections::btree_map::Entry::Vacant(slot) = properties.entry(p) {
                slot.insert(self.sum_value().to_string());
            }
        }
        properties
            .entry("region".into())
            .or_insert_with(|| ["eu", "us", "ap"][self.seq as usize % 3].into());
        let id = self.next_id("e");
        let usage = Usage {
            id,
            name: chosen.event,
            properties,
            reservation: None,
        };
        (customer, usage)
    }

    /// Usage of `m` per customer expected from one usage phase of `events` events.
    pub fn planned_use(&self, m: &Meter) -> Decimal {
        let meters = self.meters();
        let same = meters.iter().filter(|o| o.event == m.event).count() as u64;
        let per_customer = Decimal::from(self.events.max(1)) * Decimal::from(same)
            / Decimal::from(meters.len() as u64 * self.customers.max(1) as u64);
        let mean = if sum_property(m).is_some() {
            Decimal::from(250)
        } else {
            Decimal::ONE
        };
        per_customer * mean
    }

    /// An amount around `base`: from a fifth to three times it, whole units for count meters,
    /// sometimes with one decimal for sum meters. At least 1.
    pub fn amount(&mut self, m: &Meter, base: Decimal) -> Decimal {
        let pct = Decimal::from(self.rng.random_range(20..=300u32));
        let scale = if sum_property(m).is_some() && self.rng.random_bool(0.3) {
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
    pub fn new_grant(
        &mut self,
        m: &Meter,
        amount: Decimal,
        kind: GrantKind,
        priority: u8,
    ) -> Grant {
        self.seq += 1;
        Grant {
            id: format!("{}-g{:09}-{}", self.tag, self.seq, m.name),
            meter: m.name.clone(),
            amount,
            kind,
            priority,
            effective_at: None,
            expires_at: None,
            subscription: None,
            rollover: Decimal::ZERO,
        }
    }

    /// A top-up or adjustment, varied priority, a fifth of them with a far expiry.
    pub fn grant(&mut self, m: &Meter, amount: Decimal, kind: GrantKind) -> Grant {
        let priority = TOPUP_PRIORITIES[self.rng.random_range(0..TOPUP_PRIORITIES.len())];
        let mut g = self.new_grant(m, amount, kind, priority);
        g.expires_at = self.rng.random_bool(0.2).then(|| now_ms() + FAR);
        g
    }

    /// A cycle grant of subscription `sub`: rollover none, a quarter or all of it.
    pub fn cycle_grant(&mut self, m: &Meter, sub: &str) -> Grant {
        let base = self.planned_use(m);
        let amount = self.amount(m, base);
        let priority = [10u8, 50][self.rng.random_range(0..2)];
        let mut g = self.new_grant(m, amount, GrantKind::Cycle, priority);
        g.subscription = Some(sub.into());
        g.rollover = match self.rng.random_range(0..10) {
            0..=3 => Decimal::ZERO,
            4..=6 => (amount / Decimal::from(4)).round_dp(1).normalize(),
            _ => amount,
        };
        g
    }

    fn content_type(&self) -> &'static str {
        codec::content_type(self.format)
    }

    /// The event time of the next usage event: now, or (a `late` fraction of them) [`LATE_BY`]
    /// ago.
    fn event_time(&mut self) -> i64 {
        if self.late > 0.0 && self.late_allowed && self.rng.random_bool(self.late) {
            now_ms() - LATE_BY.as_millis() as i64
        } else {
            now_ms()
        }
    }

    /// A usage event as a record.
    pub fn encode_usage(&mut self, customer: &str, e: &Usage) -> Rec {
        let payload = match self.format {
            OutputFormat::Json => {
                let sums: BTreeSet<String> = self
                    .meters()
                    .iter()
                    .filter_map(|m| sum_property(m).map(String::from))
                    .collect();
                let mut props = serde_json::Map::new();
                for (k, v) in &e.properties {
                    let value = if sums.contains(k) && self.rng.random_bool(0.7) {
                        Value::Number(serde_json::Number::from_str(v).expect("a decimal"))
                    } else {
                        Value::String(v.clone())
                    };
                    props.insert(k.clone(), value);
                }
                let at = self.event_time();
                let timestamp = if self.rng.random_bool(0.5) {
                    Value::String(
                        humantime::format_rfc3339_millis(
                            SystemTime::UNIX_EPOCH + Duration::from_millis(at as u64),
                        )
                        .to_string(),
                    )
                } else {
                    Value::from(at)
                };
                let mut v = json!({
                    "id": e.id, "customer_id": customer, "name": e.name,
                    "timestamp": timestamp, "properties": props,
                });
                if let Some(r) = &e.reservation {
                    v["reservation_id"] = Value::from(r.as_str());
                }
                serde_json::to_vec(&v).expect("serialisable")
            }
            OutputFormat::Protobuf => pb::UsageEvent {
                id: e.id.clone(),
                customer_id: customer.into(),
                name: e.name.clone(),
                timestamp_ms: self.event_time(),
                properties: e.properties.clone().into_iter().collect(),
                reservation_id: e.reservation.clone().unwrap_or_default(),
            }
            .encode_to_vec(),
        };
        self.rec(InputTopic::Usage, customer, payload)
    }

    /// A grant as a record (`rollover` only on cycle grants).
    pub fn encode_grant(&self, customer: &str, g: &Grant) -> Rec {
        let rollover = (g.kind == GrantKind::Cycle).then(|| g.rollover.to_string());
        let payload = match self.format {
            OutputFormat::Json => {
                let mut v = json!({
                    "type": "grant", "grant_id": g.id, "customer_id": customer,
                    "meter": g.meter, "amount": g.amount.to_string(), "kind": g.kind.label(),
                    "priority": g.priority,
                });
                let optional = [
                    ("expires_at", g.expires_at.map(Value::from)),
                    ("effective_at", g.effective_at.map(Value::from)),
                    ("subscription_id", g.subscription.clone().map(Value::from)),
                    ("rollover", rollover.map(Value::from)),
                ];
                for (field, value) in optional {
                    if let Some(value) = value {
                        v[field] = value;
                    }
                }
                serde_json::to_vec(&v).expect("serialisable")
            }
            OutputFormat::Protobuf => pb::CreditCommand {
                command: Some(pb::credit_command::Command::Grant(pb::Grant {
                    grant_id: g.id.clone(),
                    customer_id: customer.into(),
                    meter: g.meter.clone(),
                    amount: g.amount.to_string(),
                    kind: match g.kind {
                        GrantKind::Cycle => pb::GrantKind::Cycle as i32,
                        GrantKind::TopUp => pb::GrantKind::TopUp as i32,
                        GrantKind::Adjustment => pb::GrantKind::Adjustment as i32,
                    },
                    priority: u32::from(g.priority),
                    effective_at_ms: g.effective_at.unwrap_or(0),
                    expires_at_ms: g.expires_at.unwrap_or(0),
                    subscription_id: g.subscription.clone().unwrap_or_default(),
                    rollover: rollover.unwrap_or_default(),
                })),
            }
            .encode_to_vec(),
        };
        self.rec(InputTopic::Grants, customer, payload)
    }

    /// A void as a record.
    pub fn encode_void(&self, customer: &str, v: &VoidCmd) -> Rec {
        use pb::credit_command::Command;
        let payload = match (self.format, v) {
            (OutputFormat::Json, VoidCmd::Usage(id)) => {
                json!({"type": "void_usage", "customer_id": customer, "event_id": id})
                    .to_string()
                    .into_bytes()
            }
            (OutputFormat::Json, VoidCmd::Grant(id)) => {
                json!({"type": "void_grant", "customer_id": customer, "grant_id": id})
                    .to_string()
                    .into_bytes()
            }
            (OutputFormat::Protobuf, v) => {
                let command = match v {
                    VoidCmd::Usage(id) => Command::VoidUsage(pb::VoidUsage {
                        customer_id: customer.into(),
                        event_id: id.clone(),
                    }),
                    VoidCmd::Grant(id) => Command::VoidGrant(pb::VoidGrant {
                        customer_id: customer.into(),
                        grant_id: id.clone(),
                    }),
                };
                pb::CreditCommand {
                    command: Some(command),
                }
                .encode_to_vec()
            }
        };
        self.rec(InputTopic::Grants, customer, payload)
    }

    /// A reservation command as a record. The JSON form gives the ttl as a duration in ms
    /// (`"3600000ms"`) or, when whole, as seconds.
    pub fn encode_reservation(&self, customer: &str, cmd: &ReservationCmd) -> Rec {
        use pb::credit_command::Command;
        let payload = match (self.format, cmd) {
            (OutputFormat::Json, ReservationCmd::Reserve(r)) => {
                let ttl = if r.ttl % 1000 == 0 {
                    Value::from(r.ttl / 1000)
                } else {
                    Value::from(format!("{}ms", r.ttl))
                };
                json!({
                    "type": "reserve", "reservation_id": r.id, "customer_id": customer,
                    "meter": r.meter, "units": r.units.to_string(), "ttl": ttl,
                })
                .to_string()
                .into_bytes()
            }
            (OutputFormat::Json, ReservationCmd::Release(id)) => {
                json!({"type": "release", "customer_id": customer, "reservation_id": id})
                    .to_string()
                    .into_bytes()
            }
            (OutputFormat::Protobuf, cmd) => {
                let command = match cmd {
                    ReservationCmd::Reserve(r) => Command::Reserve(pb::Reserve {
                        reservation_id: r.id.clone(),
                        customer_id: customer.into(),
                        meter: r.meter.clone(),
                        units: r.units.to_string(),
                        ttl_ms: r.ttl,
                    }),
                    ReservationCmd::Release(id) => Command::Release(pb::Release {
                        customer_id: customer.into(),
                        reservation_id: id.clone(),
                    }),
                };
                pb::CreditCommand {
                    command: Some(command),
                }
                .encode_to_vec()
            }
        };
        self.rec(InputTopic::Grants, customer, payload)
    }

    fn rec(&self, topic: InputTopic, customer: &str, payload: Vec<u8>) -> Rec {
        Rec {
            topic,
            key: customer.into(),
            payload,
            content_type: self.content_type(),
        }
    }

    /// A malformed record of kind `k % 8`; none of them may change any state.
    pub fn bad_record(&mut self, k: u64) -> Rec {
        let i = self.pick_index();
        let customer = self.customer(i);
        let id = self.next_id("bad");
        let json_rec = |topic, v: Value| Rec {
            topic,
            key: customer.clone(),
            payload: serde_json::to_vec(&v).expect("serialisable"),
            content_type: codec::JSON,
        };
        let first = &self.meters()[0];
        let (some_meter, some_event) = (first.name.clone(), first.event.clone());
        match k % 8 {
            0 => Rec {
                topic: InputTopic::Usage,
                key: customer.clone(),
                payload: vec![0xff, 0x00, 0x13, 0x37],
                content_type: codec::JSON,
            },
            1 => json_rec(
                InputTopic::Usage,
                json!({"id": id, "customer_id": 42, "name": "api_call"}),
            ),
            2 => json_rec(
                InputTopic::Usage,
                json!({"customer_id": customer, "name": some_event}),
            ),
            3 => json_rec(
                InputTopic::Grants,
                json!({"type": "grant", "grant_id": id, "customer_id": customer, "meter": some_meter, "amount": "-5"}),
            ),
            4 => json_rec(
                InputTopic::Grants,
                json!({"type": "grant", "grant_id": id, "customer_id": customer, "meter": "no_such_meter", "amount": "5"}),
            ),
            5 => Rec {
                topic: InputTopic::Grants,
                key: customer.clone(),
                payload: vec![0x0a, 0xff, 0xff, 0x01],
                content_type: codec::PROTOBUF,
            },
            6 => match self.meters().iter().find(|m| sum_property(m).is_some()) {
                // A sum meter's event without its property: rejected as a whole.
                Some(m) => json_rec(
                    InputTopic::Usage,
                    json!({"id": id, "customer_id": customer, "name": m.event}),
                ),
                None => json_rec(
                    InputTopic::Grants,
                    json!({"type": "refund", "customer_id": customer}),
                ),
            },
            _ => Rec {
                // The key names another customer than the payload.
                topic: InputTopic::Usage,
                key: format!("{customer}-other"),
                payload: serde_json::to_vec(
                    &json!({"id": id, "customer_id": customer, "name": some_event}),
                )
                .expect("serialisable"),
                content_type: codec::JSON,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use drawdown::codec::{decode_command, decode_usage};
    use drawdown::ledger::Input;
    use rand::SeedableRng;

    use super::*;

    fn gen(format: OutputFormat) -> Gen {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/drawdown.toml");
        let cfg = drawdown::config::Config::load(Some(&path), Vec::new()).unwrap();
        Gen {
            rng: StdRng::seed_from_u64(3),
            rules: crate::expect::rules(&cfg),
            prefix: "cus".into(),
            customers: 10,
            tag: "cus-p001".into(),
            format,
            events: 1_000,
            seq: 0,
            late: 0.0,
            late_allowed: false,
        }
    }

    /// What the generator means is what the service's codec reads, in both formats.
    #[test]
    fn generated_records_decode_to_what_the_model_was_given() {
        for format in [OutputFormat::Json, OutputFormat::Protobuf] {
            let mut g = gen(format);
            for _ in 0..50 {
                let i = g.pick_index();
                let (customer, e) = g.usage_event(i);
                let rec = g.encode_usage(&customer, &e);
                let Input::Usage(u) = decode_usage(
                    Some(&rec.payload),
                    Some(rec.content_type),
                    Some(rec.key.as_bytes()),
                )
                .unwrap() else {
                    panic!("not usage")
                };
                assert_eq!(
                    (u.id.as_str(), u.customer.as_str()),
                    (e.id.as_str(), customer.as_str())
                );
                assert_eq!(u.name, e.name);
                for (k, v) in &e.properties {
                    let (got, want) = (Decimal::from_str(&u.properties[k]), Decimal::from_str(v));
                    match (got, want) {
                        (Ok(got), Ok(want)) => assert_eq!(got, want, "{k}"),
                        _ => assert_eq!(&u.properties[k], v),
                    }
                }
                let m = g.meters()[i % g.meters().len()].clone();
                let mut grant = g.cycle_grant(&m, "sub");
                grant.expires_at = Some(now_ms() + FAR);
                let rec = g.encode_grant(&customer, &grant);
                let Input::Grant(got) =
                    decode_command(Some(&rec.payload), Some(rec.content_type), None).unwrap()
                else {
                    panic!("not a grant")
                };
                assert_eq!(got.grant_id.as_str(), grant.id);
                assert_eq!((got.amount, got.rollover), (grant.amount, grant.rollover));
                assert_eq!(
                    (got.priority, got.expires_at),
                    (grant.priority, grant.expires_at)
                );
                assert_eq!(got.subscription_id, grant.subscription);
                let void = g.encode_void(&customer, &VoidCmd::Usage(e.id.clone()));
                let decoded =
                    decode_command(Some(&void.payload), Some(void.content_type), None).unwrap();
                assert!(
                    matches!(decoded, Input::VoidUsage { event_id, .. } if event_id.as_str() == e.id)
                );
            }
        }
    }

    /// Reservation commands and settling usage, in both formats, ttl to the millisecond.
    #[test]
    fn reservation_records_decode_to_what_the_model_was_given() {
        for format in [OutputFormat::Json, OutputFormat::Protobuf] {
            let mut g = gen(format);
            for ttl in [3_600_000, 61_234] {
                let r = Reserve {
                    id: "cus-p001-r000000001".into(),
                    meter: "tokens".into(),
                    units: Decimal::new(125, 1),
                    ttl,
                };
                let rec = g.encode_reservation("cus-1", &ReservationCmd::Reserve(r.clone()));
                let Input::Reserve(got) =
                    decode_command(Some(&rec.payload), Some(rec.content_type), None).unwrap()
                else {
                    panic!("not a reservation")
                };
                assert_eq!(
                    (got.reservation_id.as_str(), got.meter.as_str()),
                    (r.id.as_str(), "tokens")
                );
                assert_eq!((got.units, got.ttl_ms), (r.units, ttl));
            }
            let rec = g.encode_reservation("cus-1", &ReservationCmd::Release("r-9".into()));
            let decoded = decode_command(Some(&rec.payload), Some(rec.content_type), None);
            assert!(
                matches!(decoded, Ok(Input::Release { reservation_id, .. }) if reservation_id.as_str() == "r-9")
            );
            let k = g.meters().iter().position(|m| m.name == "tokens").unwrap();
            let (customer, mut e) = g.usage_event_of(1, k);
            e.reservation = Some("r-9".into());
            let rec = g.encode_usage(&customer, &e);
            let Input::Usage(u) =
                decode_usage(Some(&rec.payload), Some(rec.content_type), None).unwrap()
            else {
                panic!("not usage")
            };
            assert_eq!(u.reservation_id.map(|r| r.to_string()), Some("r-9".into()));
        }
    }

    #[test]
    fn bad_records_are_refused_by_the_codec_or_the_rules() {
        let mut g = gen(OutputFormat::Json);
        for k in 0..8 {
            let rec = g.bad_record(k);
            let (p, ct, key) = (
                Some(rec.payload.as_slice()),
                Some(rec.content_type),
                Some(rec.key.as_bytes()),
            );
            let decoded = match rec.topic {
                InputTopic::Usage => decode_usage(p, ct, key),
                InputTopic::Grants => decode_command(p, ct, key),
            };
            // Kinds 4 (unknown meter) and 6 (missing property) decode; the rules refuse them.
            assert_eq!(
                decoded.is_ok(),
                k == 4 || k == 6,
                "bad record {k}: {decoded:?}"
            );
        }
    }
}
