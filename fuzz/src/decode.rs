//! The input decoders: usage events and credit commands, JSON and protobuf.
//!
//! A fuzz input is `[content-type selector, key selector, payload...]`. Whatever decodes must be
//! valid as the ledger expects it, and must decode to the same [`Input`] when written in the
//! other format (the two decoders are two implementations of one contract, `docs/topics.md`).

use std::time::Duration;

use drawdown::codec::{self, pb, CodecError, JSON, PROTOBUF};
use drawdown::config::OutputFormat;
use drawdown::ledger::{check_amount, check_id, Grant, GrantKind, Input, Reserve, Usage};
use prost::Message;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

/// The longest reservation ttl the decoders accept, in ms.
const MAX_TTL_MS: i64 = drawdown::ttl::MAX_RESERVATION_TTL.as_millis() as i64;

/// The customer of the seeds; a key selector can name it.
pub const CUSTOMER: &str = "cus_1";

/// The record header the first byte selects: none, JSON, the protobuf types (with parameters
/// and spaces as producers send them), or something else (read as JSON).
pub fn content_type(selector: u8) -> Option<&'static str> {
    match selector % 7 {
        0 => None,
        1 => Some(JSON),
        2 => Some(PROTOBUF),
        3 => Some("application/protobuf"),
        4 => Some(" application/x-protobuf ; proto=drawdown.v1.UsageEvent"),
        5 => Some("application/x-protobuf2"),
        _ => Some("text/plain"),
    }
}

/// The record key the second byte selects: none, empty, or the seeds' customer.
pub fn key(selector: u8) -> Option<&'static [u8]> {
    match selector % 3 {
        0 => None,
        1 => Some(b""),
        _ => Some(CUSTOMER.as_bytes()),
    }
}

type Decoder = fn(Option<&[u8]>, Option<&str>, Option<&[u8]>) -> Result<Input, CodecError>;

/// A usage record.
pub fn run_usage(data: &[u8]) {
    run(data, codec::decode_usage, true);
}

/// A credit command record.
pub fn run_command(data: &[u8]) {
    run(data, codec::decode_command, false);
}

fn run(data: &[u8], decode: Decoder, usage: bool) {
    let [ct, k, payload @ ..] = data else { return };
    let (ct, key) = (content_type(*ct), key(*k));
    let decoded = decode(Some(payload), ct, key);
    // The format `format_of` names for the header is the one the decoder used.
    let canonical = match codec::format_of(ct) {
        OutputFormat::Json => JSON,
        OutputFormat::Protobuf => PROTOBUF,
    };
    let again = decode(Some(payload), Some(canonical), key);
    assert_eq!(
        describe(&decoded),
        describe(&again),
        "content-type {ct:?} read as {canonical}"
    );
    let Ok(input) = decoded else { return };
    assert_eq!(usage, matches!(input, Input::Usage(_)), "{input:?}");
    check_valid(&input, key);
    // The same input written in the other format decodes to the same value.
    let protobuf = canonical == PROTOBUF;
    let other = if protobuf {
        to_json(&input).map(|v| (v.to_string().into_bytes(), None))
    } else {
        to_protobuf(&input).map(|b| (b, Some(PROTOBUF)))
    };
    if let Some((bytes, other_ct)) = other {
        let back = decode(Some(&bytes), other_ct, key);
        assert_eq!(
            back.as_ref().ok(),
            Some(&input),
            "{} -> {}: {back:?}",
            if protobuf { "protobuf" } else { "JSON" },
            String::from_utf8_lossy(&bytes)
        );
    }
}

fn describe(r: &Result<Input, CodecError>) -> Result<&Input, String> {
    r.as_ref().map_err(|e| e.to_string())
}

fn id(s: &str) {
    check_id("id", s).unwrap_or_else(|e| panic!("decoded an invalid id {s:?}: {e}"));
}

fn amount(d: Decimal, positive: bool) {
    assert_eq!(check_amount(d).ok(), Some(d), "decoded amount {d}");
    assert!(!positive || d > Decimal::ZERO, "decoded amount {d}");
}

/// What the ledger may assume of a decoded input.
fn check_valid(input: &Input, key: Option<&[u8]>) {
    let customer = input.customer().as_str();
    id(customer);
    if let Some(k) = key.filter(|k| !k.is_empty()) {
        assert_eq!(k, customer.as_bytes(), "the key is the customer");
    }
    match input {
        Input::Usage(u) => {
            id(u.id.as_str());
            if let Some(r) = &u.reservation_id {
                id(r.as_str());
            }
        }
        Input::Grant(g) => {
            id(g.grant_id.as_str());
            id(g.meter.as_str());
            amount(g.amount, true);
            amount(g.rollover, false);
        }
        Input::VoidGrant { grant_id, .. } => id(grant_id.as_str()),
        Input::VoidUsage { event_id, .. } => id(event_id.as_str()),
        Input::Reserve(r) => {
            id(r.reservation_id.as_str());
            id(r.meter.as_str());
            amount(r.units, true);
            assert!((1..=MAX_TTL_MS).contains(&r.ttl_ms), "ttl {}", r.ttl_ms);
        }
        Input::Release { reservation_id, .. } => id(reservation_id.as_str()),
    }
}

/// A time field in JSON: integer ms >= 0; `None` when JSON cannot carry it.
fn json_time(ms: i64) -> Option<Value> {
    (ms >= 0).then(|| json!(ms))
}

/// `input` as the JSON decoder reads it, or `None` where JSON cannot say the same (a negative
/// time: JSON times are >= 0).
pub fn to_json(input: &Input) -> Option<Value> {
    let mut o = Map::new();
    let mut put = |k: &str, v: Value| o.insert(k.to_string(), v);
    put("customer_id", json!(input.customer().as_str()));
    match input {
        Input::Usage(Usage {
            id,
            name,
            timestamp_ms,
            properties,
            reservation_id,
            ..
        }) => {
            put("id", json!(id.as_str()));
            put("name", json!(name));
            if *timestamp_ms != 0 {
                put("timestamp", json_time(*timestamp_ms)?);
            }
            put("properties", json!(properties));
            if let Some(r) = reservation_id {
                put("reservation_id", json!(r.as_str()));
            }
        }
        Input::Grant(g) => {
            put("type", json!("grant"));
            put("grant_id", json!(g.grant_id.as_str()));
            put("meter", json!(g.meter.as_str()));
            put("amount", json!(g.amount.to_string()));
            let kind = match g.kind {
                GrantKind::Cycle => "cycle",
                GrantKind::TopUp => "top_up",
                GrantKind::Adjustment => "adjustment",
            };
            put("kind", json!(kind));
            put("priority", json!(g.priority));
            if let Some(t) = g.effective_at {
                put("effective_at", json_time(t)?);
            }
            if let Some(t) = g.expires_at {
                put("expires_at", json_time(t)?);
            }
            if let Some(s) = &g.subscription_id {
                put("subscription_id", json!(s));
            }
            put("rollover", json!(g.rollover.to_string()));
        }
        Input::VoidGrant { grant_id, .. } => {
            put("type", json!("void_grant"));
            put("grant_id", json!(grant_id.as_str()));
        }
        Input::VoidUsage { event_id, .. } => {
            put("type", json!("void_usage"));
            put("event_id", json!(event_id.as_str()));
        }
        Input::Reserve(r) => {
            put("type", json!("reserve"));
            put("reservation_id", json!(r.reservation_id.as_str()));
            put("meter", json!(r.meter.as_str()));
            put("units", json!(r.units.to_string()));
            // Whole seconds as a number, anything else as a duration ("1s 500ms").
            let ttl = if r.ttl_ms % 1000 == 0 {
                json!(r.ttl_ms / 1000)
            } else {
                json!(
                    humantime::format_duration(Duration::from_millis(r.ttl_ms as u64)).to_string()
                )
            };
            put("ttl", ttl);
        }
        Input::Release { reservation_id, .. } => {
            put("type", json!("release"));
            put("reservation_id", json!(reservation_id.as_str()));
        }
    }
    Some(Value::Object(o))
}

/// A protobuf time field: 0 means unset, so `Some(0)` cannot be said.
fn pb_time(t: Option<i64>) -> Option<i64> {
    match t {
        None => Some(0),
        Some(0) => None,
        Some(t) => Some(t),
    }
}

/// `input` as the protobuf decoder reads it, or `None` where protobuf cannot say the same: an
/// empty string (protobuf's unset), a time of exactly 0.
pub fn to_protobuf(input: &Input) -> Option<Vec<u8>> {
    use pb::credit_command::Command;
    let customer_id = input.customer().to_string();
    let command = |c: Command| pb::CreditCommand { command: Some(c) }.encode_to_vec();
    Some(match input {
        Input::Usage(u) => {
            if u.name.is_empty() {
                return None;
            }
            pb::UsageEvent {
                id: u.id.to_string(),
                customer_id,
                name: u.name.clone(),
                timestamp_ms: u.timestamp_ms,
                properties: u.properties.clone().into_iter().collect(),
                reservation_id: u
                    .reservation_id
                    .as_ref()
                    .map_or_else(String::new, |r| r.to_string()),
            }
            .encode_to_vec()
        }
        Input::Grant(Grant {
            grant_id,
            meter,
            amount,
            kind,
            priority,
            effective_at,
            expires_at,
            subscription_id,
            rollover,
            ..
        }) => {
            if subscription_id.as_deref() == Some("") {
                return None;
            }
            command(Command::Grant(pb::Grant {
                grant_id: grant_id.to_string(),
                customer_id,
                meter: meter.to_string(),
                amount: amount.to_string(),
                kind: match kind {
                    GrantKind::Cycle => pb::GrantKind::Cycle,
                    GrantKind::TopUp => pb::GrantKind::TopUp,
                    GrantKind::Adjustment => pb::GrantKind::Adjustment,
                } as i32,
                priority: u32::from(*priority),
                effective_at_ms: pb_time(*effective_at)?,
                expires_at_ms: pb_time(*expires_at)?,
                subscription_id: subscription_id.clone().unwrap_or_default(),
                rollover: if rollover.is_zero() {
                    String::new()
                } else {
                    rollover.to_string()
                },
            }))
        }
        Input::VoidGrant { grant_id, .. } => command(Command::VoidGrant(pb::VoidGrant {
            customer_id,
            grant_id: grant_id.to_string(),
        })),
        Input::VoidUsage { event_id, .. } => command(Command::VoidUsage(pb::VoidUsage {
            customer_id,
            event_id: event_id.to_string(),
        })),
        Input::Reserve(Reserve {
            reservation_id,
            meter,
            units,
            ttl_ms,
            ..
        }) => command(Command::Reserve(pb::Reserve {
            reservation_id: reservation_id.to_string(),
            customer_id,
            meter: meter.to_string(),
            units: units.to_string(),
            ttl_ms: *ttl_ms,
        })),
        Input::Release { reservation_id, .. } => command(Command::Release(pb::Release {
            customer_id,
            reservation_id: reservation_id.to_string(),
        })),
    })
}
