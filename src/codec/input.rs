//! Decoding the inputs: usage events and credit commands, JSON or protobuf, validated into the
//! ledger's [`Input`].

use std::borrow::Cow;
use std::time::Duration;

use rust_decimal::Decimal;

use super::json::Object;
use super::{is_protobuf, pb, protobuf, required, CodecError};
use crate::ledger::{
    parse_amount, CustomerId, EventId, Grant, GrantId, GrantKind, Input, LedgerError, MeterName,
    ReservationId, Reserve, Usage,
};
use crate::ttl::MAX_RESERVATION_TTL;

/// Decodes a record of the usage topic.
pub fn decode_usage(
    payload: Option<&[u8]>,
    content_type: Option<&str>,
    key: Option<&[u8]>,
) -> Result<Input, CodecError> {
    let bytes = super::payload(payload)?;
    let usage = if is_protobuf(content_type) {
        let m: pb::UsageEvent = protobuf(bytes)?;
        Usage {
            id: EventId::parse(required(m.id, "id")?)?,
            customer: CustomerId::parse(required(m.customer_id, "customer_id")?)?,
            name: required(m.name, "name")?,
            timestamp_ms: m.timestamp_ms,
            properties: m.properties.into_iter().collect(),
            reservation_id: (!m.reservation_id.is_empty())
                .then(|| ReservationId::parse(m.reservation_id))
                .transpose()?,
        }
    } else {
        let obj = Object::parse(bytes)?;
        Usage {
            id: EventId::parse(obj.str("id")?)?,
            customer: CustomerId::parse(obj.str("customer_id")?)?,
            name: obj.str("name")?.into_owned(),
            timestamp_ms: obj.time("timestamp")?.unwrap_or(0),
            properties: obj.properties("properties")?,
            reservation_id: obj
                .opt_str("reservation_id")?
                .map(ReservationId::parse)
                .transpose()?,
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
    let bytes = super::payload(payload)?;
    let input = if is_protobuf(content_type) {
        let m: pb::CreditCommand = protobuf(bytes)?;
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
            pb::credit_command::Command::Reserve(r) => Input::Reserve(Reserve {
                reservation_id: ReservationId::parse(required(
                    r.reservation_id,
                    "reservation_id",
                )?)?,
                customer: CustomerId::parse(required(r.customer_id, "customer_id")?)?,
                meter: MeterName::parse(required(r.meter, "meter")?)?,
                units: positive(&required(r.units, "units")?)?,
                ttl_ms: ttl_ms(r.ttl_ms)?,
            }),
            pb::credit_command::Command::Release(r) => Input::Release {
                customer: CustomerId::parse(required(r.customer_id, "customer_id")?)?,
                reservation_id: ReservationId::parse(required(
                    r.reservation_id,
                    "reservation_id",
                )?)?,
            },
        }
    } else {
        let obj = Object::parse(bytes)?;
        let customer = CustomerId::parse(obj.str("customer_id")?)?;
        match obj.str("type")?.as_ref() {
            "grant" => {
                let kind = match obj.opt_str("kind")?.as_deref() {
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
                let priority = match obj.uint("priority") {
                    Ok(None) => 0,
                    Ok(Some(p)) if p <= 255 => p as u8,
                    _ => {
                        return Err(CodecError::WrongType {
                            field: "priority",
                            message: "must be 0-255".into(),
                        })
                    }
                };
                Input::Grant(Grant {
                    grant_id: GrantId::parse(obj.str("grant_id")?)?,
                    customer,
                    meter: MeterName::parse(obj.str("meter")?)?,
                    amount: positive(
                        &obj.amount("amount")?
                            .ok_or(CodecError::MissingField("amount"))?,
                    )?,
                    kind,
                    priority,
                    effective_at: obj.time("effective_at")?,
                    expires_at: obj.time("expires_at")?,
                    subscription_id: obj.opt_str("subscription_id")?.map(Cow::into_owned),
                    rollover: match obj.amount("rollover")? {
                        Some(r) => parse_amount(&r)?,
                        None => Decimal::ZERO,
                    },
                })
            }
            "void_grant" => Input::VoidGrant {
                customer,
                grant_id: GrantId::parse(obj.str("grant_id")?)?,
            },
            "void_usage" => Input::VoidUsage {
                customer,
                event_id: EventId::parse(obj.str("event_id")?)?,
            },
            "reserve" => Input::Reserve(Reserve {
                reservation_id: ReservationId::parse(obj.str("reservation_id")?)?,
                customer,
                meter: MeterName::parse(obj.str("meter")?)?,
                units: positive(
                    &obj.amount("units")?
                        .ok_or(CodecError::MissingField("units"))?,
                )?,
                ttl_ms: json_ttl(&obj)?,
            }),
            "release" => Input::Release {
                customer,
                reservation_id: ReservationId::parse(obj.str("reservation_id")?)?,
            },
            other => {
                return Err(CodecError::WrongType {
                    field: "type",
                    message: format!(
                        "unknown command type {other:?} (grant | void_grant | void_usage | reserve | release)"
                    ),
                })
            }
        }
    };
    check_key(key, input.customer())?;
    Ok(input)
}

/// A protobuf reservation's `ttl_ms`: 1 ms to [`MAX_RESERVATION_TTL`].
fn ttl_ms(ms: i64) -> Result<i64, CodecError> {
    let max = MAX_RESERVATION_TTL.as_millis() as i64;
    if (1..=max).contains(&ms) {
        Ok(ms)
    } else {
        Err(CodecError::WrongType {
            field: "ttl_ms",
            message: format!("must be 1 to {max} ms, got {ms}"),
        })
    }
}

/// A JSON reservation's `ttl` in ms: whole seconds, or a duration such as `"90s"` or `"10m"`
/// ([`Ttl`]), 1 ms to [`MAX_RESERVATION_TTL`].
fn json_ttl(obj: &Object<'_>) -> Result<i64, CodecError> {
    let ttl = obj
        .duration("ttl", Duration::from_millis(1), MAX_RESERVATION_TTL)?
        .ok_or(CodecError::MissingField("ttl"))?;
    Ok(ttl.as_millis() as i64)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PROTOBUF;
    use prost::Message;

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
            reservation_id: "r1".into(),
        };
        let i = decode_usage(Some(&m.encode_to_vec()), Some(PROTOBUF), None).unwrap();
        assert_eq!(i.customer().as_str(), "c1");
        let Input::Usage(u) = i else { panic!() };
        assert_eq!(u.reservation_id.unwrap().as_str(), "r1");
    }

    #[test]
    fn reservation_commands_decode_in_both_formats() {
        let json = |p: &[u8]| decode_command(Some(p), None, Some(b"c1"));
        let r = json(br#"{"type":"reserve","reservation_id":"r1","customer_id":"c1","meter":"tokens","units":"2.5","ttl":"10m"}"#).unwrap();
        let Input::Reserve(r) = r else { panic!() };
        assert_eq!((r.units, r.ttl_ms), ("2.5".parse().unwrap(), 600_000));
        let r = json(br#"{"type":"reserve","reservation_id":"r1","customer_id":"c1","meter":"tokens","units":3,"ttl":90}"#).unwrap();
        assert!(matches!(r, Input::Reserve(Reserve { ttl_ms: 90_000, .. })));
        // As over HTTP (one reading, `crate::ttl`): `312.0` is whole seconds, 1.5 is not.
        let r = json(br#"{"type":"reserve","reservation_id":"r1","customer_id":"c1","meter":"tokens","units":3,"ttl":312.0}"#).unwrap();
        assert!(matches!(
            r,
            Input::Reserve(Reserve {
                ttl_ms: 312_000,
                ..
            })
        ));
        for bad in [&b"1.5"[..], b"0", b"\"8 days\"", b"true"] {
            let mut p = br#"{"type":"reserve","reservation_id":"r1","customer_id":"c1","meter":"tokens","units":3,"ttl":"#.to_vec();
            p.extend_from_slice(bad);
            p.push(b'}');
            assert!(
                matches!(json(&p), Err(CodecError::WrongType { field: "ttl", .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let rel = json(br#"{"type":"release","reservation_id":"r1","customer_id":"c1"}"#).unwrap();
        assert!(
            matches!(rel, Input::Release { ref reservation_id, .. } if reservation_id.as_str() == "r1")
        );
        let usage = decode_usage(
            Some(br#"{"id":"e1","customer_id":"c1","name":"x","reservation_id":"r1"}"#),
            None,
            None,
        )
        .unwrap();
        assert!(matches!(
            usage,
            Input::Usage(Usage {
                reservation_id: Some(_),
                ..
            })
        ));
        for (bad, reason) in [
            (&br#"{"type":"reserve","reservation_id":"r","customer_id":"c1","meter":"m","units":0,"ttl":9}"#[..], "invalid_amount"),
            (br#"{"type":"reserve","reservation_id":"r","customer_id":"c1","meter":"m","units":1}"#, "missing_field"),
            (br#"{"type":"reserve","reservation_id":"r","customer_id":"c1","meter":"m","units":1,"ttl":"soon"}"#, "wrong_type"),
            (br#"{"type":"reserve","reservation_id":"r","customer_id":"c1","meter":"m","units":1,"ttl":"8d"}"#, "wrong_type"),
            (br#"{"type":"reserve","reservation_id":"r","customer_id":"c1","meter":"m","units":1,"ttl":0}"#, "wrong_type"),
            (br#"{"type":"release","customer_id":"c1"}"#, "missing_field"),
        ] {
            assert_eq!(json(bad).unwrap_err().reason(), reason, "{}", String::from_utf8_lossy(bad));
        }
        let pb_reserve = pb::CreditCommand {
            command: Some(pb::credit_command::Command::Reserve(pb::Reserve {
                reservation_id: "r2".into(),
                customer_id: "c1".into(),
                meter: "tokens".into(),
                units: "4".into(),
                ttl_ms: 1_000,
            })),
        };
        let i = decode_command(Some(&pb_reserve.encode_to_vec()), Some(PROTOBUF), None).unwrap();
        assert!(matches!(i, Input::Reserve(Reserve { ttl_ms: 1_000, .. })));
        let pb_release = pb::CreditCommand {
            command: Some(pb::credit_command::Command::Release(pb::Release {
                customer_id: "c1".into(),
                reservation_id: "r2".into(),
            })),
        };
        let i = decode_command(Some(&pb_release.encode_to_vec()), Some(PROTOBUF), None).unwrap();
        assert!(matches!(i, Input::Release { .. }));
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
