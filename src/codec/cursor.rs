//! The history's page cursor (`GET .../events?cursor=`, answered as `next_cursor`): the version
//! of the last movement of a page, in decimal; the next page holds the movements below it.
//!
//! What [`parse`] accepts is what `docs/openapi.json` documents for the `cursor` parameter: an
//! unsigned 64-bit integer in decimal digits, leading zeros and one leading `+` allowed, nothing
//! else (no sign `-`, no spaces, nothing above `u64::MAX`). [`encode`] writes the canonical
//! form, which [`parse`] reads back as the same version.

/// The cursor of the page that ends at the movement with this `version`.
pub fn encode(version: u64) -> String {
    version.to_string()
}

/// The version a cursor stands for, or `None` if it is not one.
pub fn parse(text: &str) -> Option<u64> {
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_accept_what_the_api_documents() {
        for v in [0, 1, 42, u64::MAX] {
            assert_eq!(parse(&encode(v)), Some(v));
        }
        assert_eq!(parse("+007"), Some(7));
        assert_eq!(parse("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "+",
            "-1",
            " 1",
            "1 ",
            "1e3",
            "0x10",
            "18446744073709551616",
            "++1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
