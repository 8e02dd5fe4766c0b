//! Domain newtypes, validated once at the edge (the codec) so the rules never see raw input.

use std::fmt;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::error::{IdProblem, LedgerError};

/// The longest identifier (customer, event, grant, meter) accepted, in bytes.
pub const MAX_ID_LEN: usize = 200;

/// Checks an identifier of any kind (ids, pack names, request ids): non-empty, at most
/// [`MAX_ID_LEN`] bytes, no control characters. `kind` names it in the error.
pub fn check_id(kind: &'static str, s: &str) -> Result<(), LedgerError> {
    let why = if s.is_empty() {
        IdProblem::Empty
    } else if s.len() > MAX_ID_LEN {
        IdProblem::TooLong(MAX_ID_LEN)
    } else if s.chars().any(char::is_control) {
        IdProblem::ControlCharacters
    } else {
        return Ok(());
    };
    Err(LedgerError::InvalidId { kind, why })
}

// An id is immutable text shared by reference count: the fold clones the customer and the meter
// into every output and state record, and a clone is a counter increment, not an allocation.
macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s`: non-empty, at most [`MAX_ID_LEN`] bytes, no control characters.
            pub fn parse(s: impl AsRef<str>) -> Result<Self, LedgerError> {
                let s = s.as_ref();
                check_id($kind, s)?;
                Ok(Self(Arc::from(s)))
            }
            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The customer a record belongs to; also the Kafka record key.
    CustomerId,
    "customer_id"
);
id_type!(
    /// A meter's name, as configured.
    MeterName,
    "meter"
);
id_type!(
    /// A usage event's idempotency key (unique per customer).
    EventId,
    "event_id"
);
id_type!(
    /// A grant's idempotency key (unique per customer).
    GrantId,
    "grant_id"
);
id_type!(
    /// A reservation's idempotency key (unique per customer).
    ReservationId,
    "reservation_id"
);

/// The largest magnitude accepted for any amount: far beyond any real credit balance, and
/// small enough that sums of millions of them never overflow a `Decimal` (96-bit mantissa).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000; // 1e15

/// The most decimal places accepted in an amount.
pub const MAX_SCALE: u32 = 9;

/// Parses an exact decimal amount from text. Rejects NaN/infinity (not representable),
/// exponents, more than [`MAX_SCALE`] decimals, magnitudes above [`MAX_AMOUNT`] and negatives.
pub fn parse_amount(s: &str) -> Result<Decimal, LedgerError> {
    let t = s.trim();
    let bad = || LedgerError::InvalidAmount(format!("not an exact decimal: {s:?}"));
    // `Decimal::from_str` also accepts exponents ("1e3") and `_` separators: plain digits only.
    if !t
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+'))
    {
        return Err(bad());
    }
    // It also rounds past 28 digits ("0.000…0001" parses as 0): judge the precision on the text.
    let decimals = t
        .split_once('.')
        .map_or("", |(_, f)| f)
        .trim_end_matches('0');
    if decimals.len() > MAX_SCALE as usize {
        return Err(LedgerError::InvalidAmount(format!(
            "more than {MAX_SCALE} decimal places: {s:?}"
        )));
    }
    let d = t.parse::<Decimal>().map_err(|_| bad())?;
    check_amount(d)
}

/// Checks a decoded amount against the limits of [`parse_amount`].
pub fn check_amount(d: Decimal) -> Result<Decimal, LedgerError> {
    if d.is_sign_negative() && !d.is_zero() {
        return Err(LedgerError::InvalidAmount(format!("negative: {d}")));
    }
    if d.scale() > MAX_SCALE && d.normalize().scale() > MAX_SCALE {
        return Err(LedgerError::InvalidAmount(format!(
            "more than {MAX_SCALE} decimal places: {d}"
        )));
    }
    if d > Decimal::from(MAX_AMOUNT) {
        return Err(LedgerError::InvalidAmount(format!("too large: {d}")));
    }
    Ok(d.normalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_exact_and_bounded() {
        assert_eq!(
            parse_amount("0.1").unwrap() + parse_amount("0.2").unwrap(),
            parse_amount("0.3").unwrap()
        );
        assert!(parse_amount("-1").is_err());
        assert!(parse_amount("NaN").is_err());
        assert!(parse_amount("inf").is_err());
        assert!(parse_amount("1e3").is_err());
        assert!(parse_amount("1000000000000000.1").is_err());
        assert!(parse_amount("0.0000000001").is_err());
        assert_eq!(parse_amount("2.500").unwrap().to_string(), "2.5");
    }

    #[test]
    fn ids_are_validated() {
        assert!(CustomerId::parse("").is_err());
        assert!(CustomerId::parse("a\0b").is_err());
        assert!(CustomerId::parse("x".repeat(201)).is_err());
        assert_eq!(CustomerId::parse("cus_1").unwrap().as_str(), "cus_1");
    }
}
