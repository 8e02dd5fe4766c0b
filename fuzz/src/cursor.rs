//! The history cursor: `codec::cursor::parse` accepts exactly the texts docs/openapi.json's
//! pattern for the `cursor` parameter matches, and reads the canonical form back.

use std::sync::LazyLock;

use drawdown::codec::cursor;
use regex::Regex;

/// The pattern of the `cursor` query parameter, from the OpenAPI document itself.
static PATTERN: LazyLock<Regex> = LazyLock::new(|| {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/openapi.json")).expect("OpenAPI JSON");
    let params = doc["paths"]
        .as_object()
        .expect("paths")
        .values()
        .flat_map(|p| p.as_object().expect("a path item").values())
        .filter_map(|op| op["parameters"].as_array())
        .flatten();
    let pattern = params
        .filter(|p| p["name"] == "cursor")
        .find_map(|p| p["schema"]["pattern"].as_str())
        .expect("the cursor parameter has a pattern");
    Regex::new(pattern).expect("the pattern compiles")
});

/// One fuzz input: the text of a `cursor` query parameter.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = cursor::parse(text);
    assert_eq!(
        parsed.is_some(),
        PATTERN.is_match(text),
        "{text:?}: the parser and the documented pattern disagree"
    );
    if let Some(v) = parsed {
        let canonical = cursor::encode(v);
        assert_eq!(cursor::parse(&canonical), Some(v));
        assert_eq!(
            canonical,
            text.trim_start_matches('+')
                .trim_start_matches('0')
                .to_string()
                + if v == 0 { "0" } else { "" },
            "the canonical form drops only the sign and leading zeros"
        );
    }
}
