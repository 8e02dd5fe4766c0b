//! The `ttl` of a request, as JSON writes it: whole seconds or a duration text. One reading for
//! the HTTP API (reservations, portal sessions) and the `reserve` command on `credit-grants`.

use std::time::Duration;

use rust_decimal::Decimal;

/// The longest hold a reservation may ask for: 7 days.
pub const MAX_RESERVATION_TTL: Duration = Duration::from_secs(7 * 86_400);

/// A `ttl` value as written in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl<'a> {
    /// A number, as written: whole seconds (`90`, also `90.0` or `9e1`).
    Seconds(&'a str),
    /// A string: a duration such as `"90s"`, `"10m"` or `"1h 30m"`.
    Text(&'a str),
}

impl Ttl<'_> {
    /// The duration, if it lies between `min` and `max`; else why not, in words.
    pub fn within(self, min: Duration, max: Duration) -> Result<Duration, String> {
        let ttl = match self {
            Ttl::Seconds(n) => n
                .parse::<Decimal>()
                .or_else(|_| Decimal::from_scientific(n))
                .ok()
                .filter(|d| d.fract().is_zero())
                .and_then(|d| u64::try_from(d).ok())
                .map(Duration::from_secs)
                .ok_or_else(|| format!("ttl must be whole seconds >= 0, got {n}"))?,
            Ttl::Text(s) => humantime::parse_duration(s).map_err(|e| {
                format!("ttl must be seconds or a duration such as \"15m\", got {s:?}: {e}")
            })?,
        };
        if ttl < min || ttl > max {
            return Err(format!(
                "ttl must be between {} and {}, got {}",
                humantime::format_duration(min),
                humantime::format_duration(max),
                humantime::format_duration(ttl)
            ));
        }
        Ok(ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn seconds_and_durations_read_alike() {
        let read = |t: Ttl<'_>| t.within(MS, MAX_RESERVATION_TTL);
        assert_eq!(read(Ttl::Seconds("90")), Ok(Duration::from_secs(90)));
        assert_eq!(read(Ttl::Seconds("312.0")), Ok(Duration::from_secs(312)));
        assert_eq!(read(Ttl::Seconds("9e1")), Ok(Duration::from_secs(90)));
        assert_eq!(read(Ttl::Text("90s")), Ok(Duration::from_secs(90)));
        assert_eq!(read(Ttl::Text("250ms")), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn fractions_negatives_junk_and_out_of_range_are_refused() {
        let read = |t: Ttl<'_>| t.within(Duration::from_secs(1), MAX_RESERVATION_TTL);
        for bad in ["1.5", "-3", "1e400", "", "0"] {
            assert!(read(Ttl::Seconds(bad)).is_err(), "{bad}");
        }
        for bad in ["soon", "", "8 days", "500ms"] {
            assert!(read(Ttl::Text(bad)).is_err(), "{bad}");
        }
        assert!(read(Ttl::Seconds("604801")).is_err());
        assert_eq!(read(Ttl::Seconds("604800")), Ok(MAX_RESERVATION_TTL));
    }
}
