//! Reading the outputs back (the load generator's verifier, tools and tests): the inverse of
//! [`super::output`].

use rust_decimal::Decimal;
use serde_json::Value;

use super::{is_protobuf, pb, protobuf, required, top_up_source_label, CodecError};
use crate::ledger::{
    BalanceChanged, CustomerId, MeterName, TopUpRequested, TopUpSource, Transition, TransitionKind,
};

fn parse_json(bytes: &[u8]) -> Result<Value, CodecError> {
    serde_json::from_slice(bytes).map_err(undecodable_json)
}

/// Decodes a record of the `balance-changed` topic (as [`super::encode_changed`] writes it).
pub fn decode_changed(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
) -> Result<BalanceChanged, CodecError> {
    let bytes = super::payload(payload)?;
    if !is_protobuf(content_type) {
        return serde_json::from_slice(bytes).map_err(undecodable_json);
    }
    let m: pb::BalanceChanged = protobuf(bytes)?;
    let balance = output_decimal("balance", &m.balance)?;
    // "" in records written before reservations: nothing held, the whole balance available.
    let reserved = match m.reserved.as_str() {
        "" => Decimal::ZERO,
        r => output_decimal("reserved", r)?,
    };
    let available = match m.available.as_str() {
        "" => balance - reserved,
        a => output_decimal("available", a)?,
    };
    Ok(BalanceChanged {
        customer_id: CustomerId::parse(m.customer_id)?,
        meter: MeterName::parse(m.meter)?,
        version: m.version,
        delta: output_decimal("delta", &m.delta)?,
        reason: reason_of(&m.reason)?,
        cause_id: m.cause_id,
        balance,
        credited: output_decimal("credited", &m.credited)?,
        consumed: output_decimal("consumed", &m.consumed)?,
        overage: output_decimal("overage", &m.overage)?,
        blocked: output_decimal("blocked", &m.blocked)?,
        reserved,
        available,
        at: m.at_ms,
        late: m.late,
    })
}

/// Decodes a record of the `balance-exhausted` topic (as [`super::encode_transition`] writes it).
pub fn decode_transition(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
) -> Result<Transition, CodecError> {
    use pb::balance_transition::Transition as T;
    let bytes = super::payload(payload)?;
    if !is_protobuf(content_type) {
        let mut v = parse_json(bytes)?;
        if let Some(o) = v.as_object_mut() {
            if let Some(kind) = o.remove("type") {
                o.insert("kind".into(), kind);
            }
        }
        return serde_json::from_value(v).map_err(undecodable_json);
    }
    let m: pb::BalanceTransition = protobuf(bytes)?;
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
    let (kind, ([customer, meter, balance, cause_id], version, at), threshold, runs_out_at) =
        match m.transition.ok_or(CodecError::MissingField("transition"))? {
            T::Exhausted(x) => (TransitionKind::Exhausted, common!(x), None, None),
            T::Restored(x) => (TransitionKind::Restored, common!(x), None, None),
            T::Low(x) => {
                let threshold = output_decimal("threshold", &x.threshold)?;
                (TransitionKind::Low, common!(x), Some(threshold), None)
            }
            T::Forecast(x) => {
                let runs_out_at = Some(x.runs_out_at_ms);
                (TransitionKind::Forecast, common!(x), None, runs_out_at)
            }
        };
    Ok(Transition {
        kind,
        customer_id: CustomerId::parse(customer)?,
        meter: MeterName::parse(meter)?,
        version,
        balance: output_decimal("balance", &balance)?,
        threshold,
        runs_out_at,
        cause_id,
        at,
    })
}

/// Decodes a record of the `top-up-requests` topic (as [`super::encode_top_up`] writes it).
pub fn decode_top_up(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
) -> Result<TopUpRequested, CodecError> {
    let bytes = super::payload(payload)?;
    if !is_protobuf(content_type) {
        return serde_json::from_slice(bytes).map_err(undecodable_json);
    }
    let m: pb::TopUpRequested = protobuf(bytes)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{
        content_type, encode_changed, encode_top_up, encode_transition, format_of, PROTOBUF,
    };
    use crate::config::OutputFormat;
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
            reserved: "1.5".parse().unwrap(),
            available: "2".parse().unwrap(),
            at: 1_767_225_600_000,
            late: true,
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
            runs_out_at: (kind == TransitionKind::Forecast).then_some(1_767_312_000_000),
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
                TransitionKind::Forecast,
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
