//! Encoding the outputs: `balance-changed`, `balance-exhausted` and `top-up-requests`, JSON or
//! protobuf.

use std::io::Write;

use prost::Message;
use rust_decimal::Decimal;

use super::{pb, top_up_source_label};
use crate::config::OutputFormat;
use crate::ledger::{BalanceChanged, TopUpRequested, Transition, TransitionKind};

/// Encodes a `BalanceChanged` for the `balance-changed` topic.
pub fn encode_changed(c: &BalanceChanged, format: OutputFormat) -> Vec<u8> {
    match format {
        OutputFormat::Json => json_changed(c),
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
            late: c.late,
            reserved: c.reserved.to_string(),
            available: c.available.to_string(),
        }
        .encode_to_vec(),
    }
}

/// Encodes a transition for the `balance-exhausted` topic. JSON carries `"type"`:
/// `exhausted | restored | low | forecast`.
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
                TransitionKind::Forecast => T::Forecast(pb::BalanceForecast {
                    customer_id,
                    meter,
                    version,
                    balance,
                    cause_id,
                    at_ms,
                    runs_out_at_ms: t.runs_out_at.unwrap_or_default(),
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

/// The JSON of a `BalanceChanged`, byte for byte what serde writes for it (the test below holds
/// them together), written straight into one buffer: this is the most written record.
fn json_changed(c: &BalanceChanged) -> Vec<u8> {
    fn text(out: &mut Vec<u8>, s: &str) {
        serde_json::to_writer(&mut *out, s).expect("a Vec grows");
    }
    fn decimal(out: &mut Vec<u8>, d: Decimal) {
        out.push(b'"');
        push_decimal(out, d);
        out.push(b'"');
    }
    fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }
    let mut out = Vec::with_capacity(192 + c.cause_id.len());
    out.extend_from_slice(b"{\"customer_id\":");
    text(&mut out, c.customer_id.as_str());
    out.extend_from_slice(b",\"meter\":");
    text(&mut out, c.meter.as_str());
    out.extend_from_slice(b",\"version\":");
    int(&mut out, c.version);
    out.extend_from_slice(b",\"delta\":");
    decimal(&mut out, c.delta);
    out.extend_from_slice(b",\"reason\":\"");
    out.extend_from_slice(c.reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"cause_id\":");
    text(&mut out, &c.cause_id);
    for (name, d) in [
        ("balance", c.balance),
        ("credited", c.credited),
        ("consumed", c.consumed),
        ("overage", c.overage),
        ("blocked", c.blocked),
        ("reserved", c.reserved),
        ("available", c.available),
    ] {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
        decimal(&mut out, d);
    }
    out.extend_from_slice(b",\"at\":");
    int(&mut out, c.at);
    if c.late {
        out.extend_from_slice(b",\"late\":true");
    }
    out.push(b'}');
    out
}

/// Appends `d` as its `Display` writes it (sign, digits, the scale's decimals), without
/// core::fmt: the mantissa's digits with the point put in.
fn push_decimal(out: &mut Vec<u8>, d: Decimal) {
    let m = d.mantissa();
    let scale = d.scale() as usize;
    if m == 0 && d.is_sign_negative() {
        write!(out, "{d}").expect("a Vec grows"); // "-0": left to rust_decimal
        return;
    }
    if m < 0 {
        out.push(b'-');
    }
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(m.unsigned_abs()).as_bytes();
    if scale == 0 {
        out.extend_from_slice(digits);
    } else if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        out.extend_from_slice(int);
        out.push(b'.');
        out.extend_from_slice(frac);
    } else {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', scale - digits.len()));
        out.extend_from_slice(digits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{CustomerId, MeterName, Reason};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decimals_are_written_as_display_writes_them(m in any::<i64>(), hi in any::<u32>(), scale in 0u32..=28) {
            for d in [Decimal::new(m, scale), Decimal::from_i128_with_scale((i128::from(hi) << 64) | i128::from(m.unsigned_abs()), scale)] {
                let mut out = Vec::new();
                push_decimal(&mut out, d);
                prop_assert_eq!(String::from_utf8(out).unwrap(), d.to_string());
            }
        }

        #[test]
        fn the_hand_written_json_is_what_serde_writes(
            customer in "[a-z\"\\\\é\u{1}]{1,12}",
            cause in "[ -~é\u{7f}]{0,20}",
            version in any::<u64>(),
            at in any::<i64>(),
            amounts in proptest::collection::vec((any::<i64>(), 0u32..=9), 8),
            reason in proptest::sample::select(Reason::ALL.to_vec()),
        ) {
            let d = |i: usize| Decimal::new(amounts[i].0, amounts[i].1);
            let c = BalanceChanged {
                customer_id: CustomerId::parse(customer.replace('\u{1}', "x")).unwrap(),
                meter: MeterName::parse("api_calls").unwrap(),
                version,
                delta: d(0),
                reason,
                cause_id: cause,
                balance: d(1),
                credited: d(2),
                consumed: d(3),
                overage: d(4),
                blocked: d(5),
                reserved: d(6),
                available: d(7),
                at,
                late: version % 2 == 0,
            };
            prop_assert_eq!(
                String::from_utf8(json_changed(&c)).unwrap(),
                String::from_utf8(serde_json::to_vec(&c).unwrap()).unwrap()
            );
        }
    }
}
