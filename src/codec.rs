//! JSON / protobuf <-> domain types, with validation.
//!
//! The `content-type` record header selects the decoder: `application/x-protobuf` (also
//! `application/protobuf`) for protobuf, anything else or none for JSON. Validation happens
//! here once: ids, amounts (exact decimals; no floats anywhere) and timestamps; the rules only
//! ever see [`crate::ledger::Input`]. Every failure is a [`CodecError`] with a bounded `reason()`.
//!
//! JSON numbers are read with their exact text (serde_json `arbitrary_precision`), so `0.1`
//! is exactly one tenth; amounts may also be given as strings.

use std::collections::BTreeMap;

use prost::Message;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::config::OutputFormat;
use crate::ledger::{
    parse_amount, BalanceChanged, CustomerId, EventId, Grant, GrantId, GrantKind, Input,
    LedgerError, MeterName, TopUpRequested, TopUpSource, Transition, TransitionKind, Usage,
};

/// Generated protobuf types (`proto/drawdown/v1`).
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/drawdown.v1.rs"));
}

/// The `content-type` of JSON records.
pub const JSON: &str = "application/json";
/// The `content-type` of protobuf records.
pub const PROTOBUF: &str = "application/x-protobuf";

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Empty payload (a tombstone) where a message was expected.
    #[error("empty payload")]
    Empty,
    /// Not JSON / not protobuf at all.
    #[error("undecodable {format}: {message}")]
    Undecodable {
        /// json or protobuf.
        format: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// A required field is missing.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A field has the wrong type.
    #[error("field {field}: {message}")]
    WrongType {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A value failed validation.
    #[error(transparent)]
    Invalid(#[from] LedgerError),
    /// The record key differs from the payload's customer id.
    #[error("record key {key:?} differs from customer_id {customer:?}")]
    KeyMismatch {
        /// The key.
        key: String,
        /// The payload's customer.
        customer: String,
    },
}

impl CodecError {
    /// A short, bounded label for metrics and the DLQ's `error.reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::Empty => "empty",
            CodecError::Undecodable { .. } => "undecodable",
            CodecError::MissingField(_) => "missing_field",
            CodecError::WrongType { .. } => "wrong_type",
            CodecError::Invalid(e) => e.reason(),
            CodecError::KeyMismatch { .. } => "key_mismatch",
        }
    }
}

fn is_protobuf(content_type: Option<&str>) -> bool {
    matches!(
        content_type.map(|c| c.split(';').next().unwrap_or("").trim()),
        Some("application/x-protobuf") | Some("application/protobuf")
    )
}

/// Decodes a record of the usage topic.
pub fn decode_usage(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
    key: Option<&[u8]>,
) -> Result<Input, CodecError> {
    let bytes = payload.filter(|p| !p.is_empty()).ok_or(CodecError::Empty)?;
    let usage = if is_protobuf(content_type) {
        let m = pb::UsageEvent::decode(bytes).map_err(|e| CodecError::Undecodable {
            format: "protobuf",
            message: e.to_string(),
        })?;
        Usage {
            id: EventId::parse(required(m.id, "id")?)?,
            customer: CustomerId::parse(required(m.customer_id, "customer_id")?)?,
            name: required(m.name, "name")?,
            timestamp_ms: m.timestamp_ms,
            properties: m.properties.into_iter().collect(),
        }
    } else {
        let v = parse_json(bytes)?;
        let obj = v.as_object().ok_or(CodecError::WrongType {
            field: "<root>",
            message: "expected a JSON object".into(),
        })?;
        let mut properties = BTreeMap::new();
        match obj.get("properties") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    properties.insert(k.clone(), property_text(v)?);
                }
            }
            Some(_) => {
                return Err(CodecError::WrongType {
                    field: "properties",
                    message: "expected an object".into(),
                })
            }
        }
        Usage {
            id: EventId::parse(json_str(obj, "id")?)?,
            customer: CustomerId::parse(json_str(obj, "customer_id")?)?,
            name: json_str(obj, "name")?,
            timestamp_ms: json_time(obj, "timestamp")?.unwrap_or(0),
            properties,
        }
    };
    check_key(key, &usage.customer)?;
    Ok(Input::Usage(usage))
}

/// Decodes a record of the credit-grants topic.
pub fn decode_command(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
    key: Option<&[u8]>,
) -> Result<Input, CodecError> {
    let bytes = payload.filter(|p| !p.is_empty()).ok_or(CodecError::Empty)?;
    let input = if is_protobuf(content_type) {
        let m = pb::CreditCommand::decode(bytes).map_err(|e| CodecError::Undecodable {
            format: "protobuf",
            message: e.to_string(),
        })?;
        match m.command.ok_or(CodecError::MissingField("command"))? {
            pb::credit_command::Command::Grant(g) => Input::Grant(Grant {
                grant_id: GrantId::parse(required(g.grant_id, "grant_id")?)?,
                customer: CustomerId::parse(required(g.customer_id, "customer_id")?)?,
                meter: MeterName::parse(required(g.meter, "meter")?)?,
                amount: positive(&required(g.amount, "amount")?)?,
                kind: match pb::GrantKind::try_from(g.kind) {
                    Ok(pb::GrantKind::Cycle) => GrantKind::Cycle,
                    Ok(pb::GrantKind::TopUp) | Ok(pb::GrantKind::Unspecified) => GrantKind::TopUp,
                    Ok(pb::GrantKind::Adjustment) => GrantKind::Adjustment,
                    Err(_) => {
                        return Err(CodecError::WrongType {
                            field: "kind",
                            message: format!("unknown kind {}", g.kind),
                        })
                    }
                },
                priority: u8::try_from(g.priority).map_err(|_| CodecError::WrongType {
                    field: "priority",
                    message: "must be 0-255".into(),
                })?,
                effective_at: (g.effective_at_ms != 0).then_some(g.effective_at_ms),
                expires_at: (g.expires_at_ms != 0).then_some(g.expires_at_ms),
                subscription_id: (!g.subscription_id.is_empty()).then_some(g.subscription_id),
                rollover: if g.rollover.is_empty() {
                    Decimal::ZERO
                } else {
                    parse_amount(&g.rollover)?
                },
            }),
            pb::credit_command::Command::VoidGrant(v) => Input::VoidGrant {
                customer: CustomerId::parse(required(v.customer_id, "customer_id")?)?,
                grant_id: GrantId::parse(required(v.grant_id, "grant_id")?)?,
            },
            pb::credit_command::Command::VoidUsage(v) => Input::VoidUsage {
                customer: CustomerId::parse(required(v.customer_id, "customer_id")?)?,
                event_id: EventId::parse(required(v.event_id, "event_id")?)?,
            },
        }
    } else {
        let v = parse_json(bytes)?;
        let obj = v.as_object().ok_or(CodecError::WrongType {
            field: "<root>",
            message: "expected a JSON object".into(),
        })?;
        let customer = CustomerId::parse(json_str(obj, "customer_id")?)?;
        match json_str(obj, "type")?.as_str() {
            "grant" => {
                let kind = match json_opt_str(obj, "kind")?.as_deref() {
                    None | Some("top_up") => GrantKind::TopUp,
                    Some("cycle") => GrantKind::Cycle,
                    Some("adjustment") => GrantKind::Adjustment,
                    Some(other) => {
                        return Err(CodecError::WrongType {
                            field: "kind",
                            message: format!("unknown kind {other:?}"),
                        })
                    }
                };
                let priority = match obj.get("priority") {
                    None | Some(Value::Null) => 0,
                    Some(p) => p.as_u64().and_then(|p| u8::try_from(p).ok()).ok_or(
                        CodecError::WrongType {
                            field: "priority",
                            message: "must be 0-255".into(),
                        },
                    )?,
                };
                Input::Grant(Grant {
                    grant_id: GrantId::parse(json_str(obj, "grant_id")?)?,
                    customer,
                    meter: MeterName::parse(json_str(obj, "meter")?)?,
                    amount: positive(
                        &json_amount(obj, "amount")?.ok_or(CodecError::MissingField("amount"))?,
                    )?,
                    kind,
                    priority,
                    effective_at: json_time(obj, "effective_at")?,
                    expires_at: json_time(obj, "expires_at")?,
                    subscription_id: json_opt_str(obj, "subscription_id")?,
                    rollover: match json_amount(obj, "rollover")? {
                        Some(r) => parse_amount(&r)?,
                        None => Decimal::ZERO,
                    },
                })
            }
            "void_grant" => Input::VoidGrant {
                customer,
                grant_id: GrantId::parse(json_str(obj, "grant_id")?)?,
            },
            "void_usage" => Input::VoidUsage {
                customer,
                event_id: EventId::parse(json_str(obj, "event_id")?)?,
            },
            other => {
                return Err(CodecError::WrongType {
                    field: "type",
                    message: format!(
                        "unknown command type {other:?} (grant | void_grant | void_usage)"
                    ),
                })
            }
        }
    };
    check_key(key, input.customer())?;
    Ok(input)
}

fn check_key(key: Option<&[u8]>, customer: &CustomerId) -> Result<(), CodecError> {
    match key {
        Some(k) if !k.is_empty() && k != customer.as_str().as_bytes() => {
            Err(CodecError::KeyMismatch {
                key: String::from_utf8_lossy(k).into_owned(),
                customer: customer.to_string(),
            })
        }
        _ => Ok(()),
    }
}

fn positive(text: &str) -> Result<Decimal, CodecError> {
    let d = parse_amount(text)?;
    if d.is_zero() {
        return Err(LedgerError::InvalidAmount("amount must be > 0".into()).into());
    }
    Ok(d)
}

fn required(s: String, field: &'static str) -> Result<String, CodecError> {
    if s.is_empty() {
        Err(CodecError::MissingField(field))
    } else {
        Ok(s)
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, CodecError> {
    serde_json::from_slice(bytes).map_err(|e| CodecError::Undecodable {
        format: "json",
        message: e.to_string(),
    })
}

fn json_str(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<String, CodecError> {
    json_opt_str(obj, field)?.ok_or(CodecError::MissingField(field))
}

fn json_opt_str(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, CodecError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(CodecError::WrongType {
            field,
            message: format!("expected a string, got {other}"),
        }),
    }
}

/// An amount as exact text: a JSON number (exact, thanks to `arbitrary_precision`) or a string.
fn json_amount(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, CodecError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(CodecError::WrongType {
            field,
            message: format!("expected a number, got {other}"),
        }),
    }
}

/// A timestamp: RFC 3339 text or integer milliseconds since the epoch.
fn json_time(
    obj: &serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<i64>, CodecError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64()
                .filter(|ms| *ms >= 0)
                .map(Some)
                .ok_or(CodecError::WrongType {
                    field,
                    message: "expected integer milliseconds >= 0".into(),
                })
        }
        Some(Value::String(s)) => humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(s))
            .map(|t| {
                Some(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0),
                )
            })
            .map_err(|e| CodecError::WrongType {
                field,
                message: format!("not RFC 3339: {e}"),
            }),
        Some(_) => Err(CodecError::WrongType {
            field,
            message: "expected RFC 3339 text or milliseconds".into(),
        }),
    }
}

fn property_text(v: &Value) -> Result<String, CodecError> {
    Ok(match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        _ => {
            return Err(CodecError::WrongType {
                field: "properties",
                message: "property values must be strings, numbers or booleans".into(),
            })
        }
    })
}

/// The headers of a `top-up-requests` record: `content-type`, and `request-id` (so billing can
/// dedupe without decoding).
pub fn top_up_headers(t: &TopUpRequested, format: OutputFormat) -> [(&'static str, String); 2] {
    [
        ("content-type", content_type(format).to_string()),
        ("request-id", t.request_id.clone()),
    ]
}

/// Encodes a `BalanceChanged` for the `balance-changed` topic.
pub fn encode_changed(c: &BalanceChanged, format: OutputFormat) -> Vec<u8> {
    match format {
        OutputFormat::Json => serde_json::to_vec(c).expect("serialisable"),
        OutputFormat::Protobuf => pb::BalanceChanged {
            customer_id: c.customer_id.to_string(),
            meter: c.meter.to_string(),
            version: c.version,
            delta: c.delta.to_string(),
            reason: c.reason.as_str().into(),
            cause_id: c.cause_id.clone(),
            balance: c.balance.to_string(),
            credited: c.credited.to_string(),
            consumed: c.consumed.to_string(),
            overage: c.overage.to_string(),
            blocked: c.blocked.to_string(),
            at_ms: c.at,
        }
        .encode_to_vec(),
    }
}

/// Encodes a transition for the `balance-exhausted` topic. JSON carries `"type"`:
/// `exhausted | restored | low`.
pub fn encode_transition(t: &Transition, format: OutputFormat) -> Vec<u8> {
    match format {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(t).expect("serialisable");
            if let Some(o) = v.as_object_mut() {
                if let Some(kind) = o.remove("kind") {
                    o.insert("type".into(), kind);
                }
            }
            serde_json::to_vec(&v).expect("serialisable")
        }
        OutputFormat::Protobuf => {
            use pb::balance_transition::Transition as T;
            let (customer_id, meter, version, balance, cause_id, at_ms) = (
                t.customer_id.to_string(),
                t.meter.to_string(),
                t.version,
                t.balance.to_string(),
                t.cause_id.clone(),
                t.at,
            );
            let inner = match t.kind {
                TransitionKind::Exhausted => T::Exhausted(pb::BalanceExhausted {
                    customer_id,
                    meter,
                    version,
                    balance,
                    cause_id,
                    at_ms,
                }),
                TransitionKind::Restored => T::Restored(pb::BalanceRestored {
                    customer_id,
                    meter,
                    version,
                    balance,
                    cause_id,
                    at_ms,
                }),
                TransitionKind::Low => T::Low(pb::BalanceLow {
                    customer_id,
                    meter,
                    version,
                    balance,
                    threshold: t.threshold.map(|d| d.to_string()).unwrap_or_default(),
                    cause_id,
                    at_ms,
                }),
            };
            pb::BalanceTransition {
                transition: Some(inner),
            }
            .encode_to_vec()
        }
    }
}

/// Encodes a top-up request for the `top-up-requests` topic (JSON: the fields of
/// [`TopUpRequested`], `requested_at` in ms, `balance` and `threshold` only on automatic ones).
pub fn encode_top_up(t: &TopUpRequested, format: OutputFormat) -> Vec<u8> {
    match format {
        OutputFormat::Json => serde_json::to_vec(t).expect("serialisable"),
        OutputFormat::Protobuf => pb::TopUpRequested {
            request_id: t.request_id.clone(),
            customer_id: t.customer_id.to_string(),
            meter: t.meter.to_string(),
            pack: t.pack.clone(),
            requested_at_ms: t.requested_at,
            source: top_up_source_label(t.source).into(),
            balance: t.balance.map(|d| d.to_string()).unwrap_or_default(),
            threshold: t.threshold.map(|d| d.to_string()).unwrap_or_default(),
        }
        .encode_to_vec(),
    }
}

/// The `source` label of a top-up request (`auto | portal | api`), also a metric label.
pub fn top_up_source_label(source: TopUpSource) -> &'static str {
    match source {
        TopUpSource::Auto => "auto",
        TopUpSource::Portal => "portal",
        TopUpSource::Api => "api",
    }
}

/// The transition type label (`exhausted | restored | low`), also used as a record header.
pub fn transition_label(kind: TransitionKind) -> &'static str {
    match kind {
        TransitionKind::Exhausted => "exhausted",
        TransitionKind::Restored => "restored",
        TransitionKind::Low => "low",
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the outputs back (the load generator's verifier, tools and tests) and the
// format <-> content-type mapping both directions use.
// ---------------------------------------------------------------------------------------------

/// The `content-type` header of records encoded as `format`.
pub fn content_type(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Json => JSON,
        OutputFormat::Protobuf => PROTOBUF,
    }
}

/// The format a `content-type` header selects, as the decoders read it: protobuf for
/// `application/x-protobuf` or `application/protobuf` (parameters ignored), JSON otherwise.
pub fn format_of(content_type: Option<&str>) -> OutputFormat {
    if is_protobuf(content_type) {
        OutputFormat::Protobuf
    } else {
        OutputFormat::Json
    }
}

/// Decodes a record of the `balance-changed` topic (as [`encode_changed`] writes it).
pub fn decode_changed(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
) -> Result<BalanceChanged, CodecError> {
    let bytes = payload.filter(|p| !p.is_empty()).ok_or(CodecError::Empty)?;
    if !is_protobuf(content_type) {
        return serde_json::from_slice(bytes).map_err(undecodable_json);
    }
    let m = pb::BalanceChanged::decode(bytes).map_err(undecodable_protobuf)?;
    Ok(BalanceChanged {
        customer_id: CustomerId::parse(m.customer_id)?,
        meter: MeterName::parse(m.meter)?,
        version: m.version,
        delta: output_decimal("delta", &m.delta)?,
        reason: reason_of(&m.reason)?,
        cause_id: m.cause_id,
        balance: output_decimal("balance", &m.balance)?,
        credited: output_decimal("credited", &m.credited)?,
        consumed: output_decimal("consumed", &m.consumed)?,
        overage: output_decimal("overage", &m.overage)?,
        blocked: output_decimal("blocked", &m.blocked)?,
        at: m.at_ms,
    })
}

/// Decodes a record of the `balance-exhausted` topic (as [`encode_transition`] writes it).
pub fn decode_transition(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
) -> Result<Transition, CodecError> {
    use pb::balance_transition::Transition as T;
    let bytes = payload.filter(|p| !p.is_empty()).ok_or(CodecError::Empty)?;
    if !is_protobuf(content_type) {
        let mut v = parse_json(bytes)?;
        if let Some(o) = v.as_object_mut() {
            if let Some(kind) = o.remove("type") {
                o.insert("kind".into(), kind);
            }
        }
        return serde_json::from_value(v).map_err(undecodable_json);
    }
    let m = pb::BalanceTransition::decode(bytes).map_err(undecodable_protobuf)?;
    // The three messages share their fields.
    macro_rules! common {
        ($x:expr) => {
            (
                [$x.customer_id, $x.meter, $x.balance, $x.cause_id],
                $x.version,
                $x.at_ms,
            )
        };
    }
    let (kind, ([customer, meter, balance, cause_id], version, at), threshold) =
        match m.transition.ok_or(CodecError::MissingField("transition"))? {
            T::Exhausted(x) => (TransitionKind::Exhausted, common!(x), None),
            T::Restored(x) => (TransitionKind::Restored, common!(x), None),
            T::Low(x) => {
                let threshold = output_decimal("threshold", &x.threshold)?;
                (TransitionKind::Low, common!(x), Some(threshold))
            }
        };
    Ok(Transition {
        kind,
        customer_id: CustomerId::parse(customer)?,
        meter: MeterName::parse(meter)?,
        version,
        balance: output_decimal("balance", &balance)?,
        threshold,
        cause_id,
        at,
    })
}

/// Decodes a record of the `top-up-requests` topic (as [`encode_top_up`] writes it).
pub fn decode_top_up(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
) -> Result<TopUpRequested, CodecError> {
    let bytes = payload.filter(|p| !p.is_empty()).ok_or(CodecError::Empty)?;
    if !is_protobuf(content_type) {
        return serde_json::from_slice(bytes).map_err(undecodable_json);
    }
    let m = pb::TopUpRequested::decode(bytes).map_err(undecodable_protobuf)?;
    let optional = |field, text: &str| {
        (!text.is_empty())
            .then(|| output_decimal(field, text))
            .transpose()
    };
    Ok(TopUpRequested {
        request_id: required(m.request_id, "request_id")?,
        customer_id: CustomerId::parse(m.customer_id)?,
        meter: MeterName::parse(m.meter)?,
        pack: required(m.pack, "pack")?,
        requested_at: m.requested_at_ms,
        source: [TopUpSource::Auto, TopUpSource::Portal, TopUpSource::Api]
            .into_iter()
            .find(|s| top_up_source_label(*s) == m.source)
            .ok_or_else(|| CodecError::WrongType {
                field: "source",
                message: format!("unknown source {:?}", m.source),
            })?,
        balance: optional("balance", &m.balance)?,
        threshold: optional("threshold", &m.threshold)?,
    })
}

/// A decimal of an output record: any exact decimal (balances and deltas may be negative).
fn output_decimal(field: &'static str, text: &str) -> Result<Decimal, CodecError> {
    text.parse().map_err(|_| CodecError::WrongType {
        field,
        message: format!("not a decimal: {text:?}"),
    })
}

/// The reason with this label (its serde name, as on the JSON records).
fn reason_of(label: &str) -> Result<crate::ledger::Reason, CodecError> {
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::{Deserialize, IntoDeserializer};
    let text: StrDeserializer<'_, Error> = label.into_deserializer();
    crate::ledger::Reason::deserialize(text).map_err(|_| CodecError::WrongType {
        field: "reason",
        message: format!("unknown reason {label:?}"),
    })
}

fn undecodable_json(e: serde_json::Error) -> CodecError {
    CodecError::Undecodable {
        format: "json",
        message: e.to_string(),
    }
}

fn undecodable_protobuf(e: prost::DecodeError) -> CodecError {
    CodecError::Undecodable {
        format: "protobuf",
        message: e.to_string(),
    }
}

#[cfg(test)]
mod output_decoding_tests {
    use super::*;
    use crate::ledger::Reason;

    fn changed() -> BalanceChanged {
        BalanceChanged {
            customer_id: CustomerId::parse("c1").unwrap(),
            meter: MeterName::parse("api_calls").unwrap(),
            version: 7,
            delta: "-1.5".parse().unwrap(),
            reason: Reason::VoidUsage,
            cause_id: "e1".into(),
            balance: "-0.5".parse().unwrap(),
            credited: "10".parse().unwrap(),
            consumed: "10.5".parse().unwrap(),
            overage: "0.5".parse().unwrap(),
            blocked: Decimal::ZERO,
            at: 1_767_225_600_000,
        }
    }

    fn transition(kind: TransitionKind) -> Transition {
        Transition {
            kind,
            customer_id: CustomerId::parse("c1").unwrap(),
            meter: MeterName::parse("tokens").unwrap(),
            version: 3,
            balance: "2.25".parse().unwrap(),
            threshold: (kind == TransitionKind::Low).then(|| "2.5".parse().unwrap()),
            cause_id: "g1".into(),
            at: 5,
        }
    }

    #[test]
    fn outputs_read_back_as_written_in_both_formats() {
        for format in [OutputFormat::Json, OutputFormat::Protobuf] {
            let ct = Some(content_type(format));
            assert_eq!(format_of(ct), format);
            for reason in [Reason::VoidUsage, Reason::GrantScheduled, Reason::CycleEnd] {
                let c = BalanceChanged {
                    reason,
                    ..changed()
                };
                let bytes = encode_changed(&c, format);
                assert_eq!(decode_changed(Some(&bytes), ct).unwrap(), c);
            }
            for kind in [
                TransitionKind::Exhausted,
                TransitionKind::Restored,
                TransitionKind::Low,
            ] {
                let t = transition(kind);
                let bytes = encode_transition(&t, format);
                assert_eq!(decode_transition(Some(&bytes), ct).unwrap(), t);
            }
            let auto = TopUpRequested {
                request_id: "auto:c1:api_calls:4".into(),
                customer_id: CustomerId::parse("c1").unwrap(),
                meter: MeterName::parse("api_calls").unwrap(),
                pack: "calls-1000".into(),
                requested_at: 9,
                source: TopUpSource::Auto,
                balance: Some("49".parse().unwrap()),
                threshold: Some("50".parse().unwrap()),
            };
            let portal = TopUpRequested {
                source: TopUpSource::Portal,
                balance: None,
                threshold: None,
                ..auto.clone()
            };
            for t in [auto, portal] {
                let bytes = encode_top_up(&t, format);
                assert_eq!(decode_top_up(Some(&bytes), ct).unwrap(), t);
            }
        }
    }

    #[test]
    fn the_content_type_selects_the_format_as_for_the_inputs() {
        for ct in [
            "application/x-protobuf",
            "application/protobuf",
            "application/x-protobuf; messageType=drawdown.v1.BalanceChanged",
        ] {
            assert_eq!(format_of(Some(ct)), OutputFormat::Protobuf, "{ct}");
        }
        for ct in [None, Some("application/json"), Some("text/plain")] {
            assert_eq!(format_of(ct), OutputFormat::Json, "{ct:?}");
        }
        assert_eq!(decode_changed(None, None).unwrap_err().reason(), "empty");
        assert_eq!(
            decode_transition(Some(b"\x0a\xff"), Some(PROTOBUF))
                .unwrap_err()
                .reason(),
            "undecodable"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_usage_decodes_with_exact_numbers() {
        let i = decode_usage(
            Some(br#"{"id":"e1","customer_id":"c1","name":"llm_completion","timestamp":"2026-01-01T00:00:00Z","properties":{"tokens":0.1,"model":"x"}}"#),
            None,
            Some(b"c1"),
        )
        .unwrap();
        let Input::Usage(u) = i else { panic!() };
        assert_eq!(u.properties["tokens"], "0.1");
        assert_eq!(u.timestamp_ms, 1_767_225_600_000);
    }

    #[test]
    fn protobuf_usage_decodes() {
        let m = pb::UsageEvent {
            id: "e1".into(),
            customer_id: "c1".into(),
            name: "api_call".into(),
            timestamp_ms: 5,
            properties: Default::default(),
        };
        let i = decode_usage(Some(&m.encode_to_vec()), Some(PROTOBUF), None).unwrap();
        assert_eq!(i.customer().as_str(), "c1");
    }

    #[test]
    fn bad_inputs_have_reasons() {
        let r = |p: &[u8]| decode_command(Some(p), None, None).unwrap_err().reason();
        assert_eq!(r(b"\xff\x00"), "undecodable");
        assert_eq!(
            r(br#"{"type":"grant","customer_id":"c","meter":"m","amount":5}"#),
            "missing_field"
        );
        assert_eq!(
            r(br#"{"type":"grant","customer_id":"c","grant_id":"g","meter":"m","amount":-5}"#),
            "invalid_amount"
        );
        assert_eq!(
            r(br#"{"type":"grant","customer_id":"c","grant_id":"g","meter":"m","amount":"NaN"}"#),
            "invalid_amount"
        );
        assert_eq!(
            r(br#"{"type":"grant","customer_id":"c","grant_id":"g","meter":"m","amount":1e400}"#),
            "invalid_amount"
        );
        assert_eq!(
            r(br#"{"type":"grant","customer_id":5,"grant_id":"g","meter":"m","amount":1}"#),
            "wrong_type"
        );
        assert_eq!(
            decode_command(None, None, None).unwrap_err().reason(),
            "empty"
        );
        assert_eq!(
            decode_usage(
                Some(br#"{"id":"e","customer_id":"c","name":"n"}"#),
                None,
                Some(b"d")
            )
            .unwrap_err()
            .reason(),
            "key_mismatch"
        );
    }
}
