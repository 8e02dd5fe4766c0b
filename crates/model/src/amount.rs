//! Exact decimal amounts from text, as the rules accept them.

use std::str::FromStr;

use rust_decimal::Decimal;

/// The most decimal places an amount may have (trailing zeros aside).
const MAX_DECIMALS: usize = 9;

/// The largest amount accepted: 10^15.
const MAX_AMOUNT: i64 = 1_000_000_000_000_000;

/// Reads an amount: surrounding white space, an optional sign, digits with at most one decimal
/// point (at least one digit), at most nine decimal places once trailing zeros are dropped, at
/// most 10^15, not negative (`-0` is 0). No exponents, separators, NaN or infinities. `None`
/// when the text is not such an amount.
pub fn parse_amount(text: &str) -> Option<Decimal> {
    let t = text.trim();
    let (negative, unsigned) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || whole.len() + fraction.len() == 0 {
        return None;
    }
    let whole = whole.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    // 10^15 has 16 digits: anything longer is too large, and the text built below stays well
    // within what a Decimal holds exactly.
    if fraction.len() > MAX_DECIMALS || whole.len() > 16 {
        return None;
    }
    let plain = format!(
        "{}.{}",
        if whole.is_empty() { "0" } else { whole },
        fraction
    );
    let value = Decimal::from_str(plain.trim_end_matches('.')).ok()?;
    if value > Decimal::from(MAX_AMOUNT) || (negative && !value.is_zero()) {
        return None;
    }
    Some(value.normalize())
}
