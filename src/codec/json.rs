//! Reading a JSON input object field by field, without building a tree of it: the object is
//! parsed once into its (key, raw value) pairs, borrowed from the record, and each field is
//! decoded only when asked for, with the codec's errors. Keys repeated in an object: the last
//! one counts (as a JSON object tree would keep it).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::CodecError;
use crate::ttl::Ttl;

/// A string, borrowed unless it has escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// One JSON object: its keys and their values as raw text.
pub(super) struct Object<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((Text(k), v)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    fields.push((k, v));
                }
                Ok(Object(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// What a raw JSON value is, by its first character.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Null,
    String,
    Number,
    Bool,
    Object,
    Array,
}

fn shape(raw: &RawValue) -> Shape {
    match raw.get().as_bytes().first() {
        Some(b'n') => Shape::Null,
        Some(b'"') => Shape::String,
        Some(b't') | Some(b'f') => Shape::Bool,
        Some(b'{') => Shape::Object,
        Some(b'[') => Shape::Array,
        _ => Shape::Number,
    }
}

fn undecodable(e: serde_json::Error) -> CodecError {
    CodecError::Undecodable {
        format: "json",
        message: e.to_string(),
    }
}

fn string<'a>(raw: &'a RawValue) -> Result<Cow<'a, str>, CodecError> {
    serde_json::from_str::<Text<'a>>(raw.get())
        .map(|t| t.0)
        .map_err(undecodable)
}

impl<'a> Object<'a> {
    /// The object of a record: `WrongType` if it is JSON but not an object.
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Self, CodecError> {
        let text = std::str::from_utf8(bytes).map_err(|e| CodecError::Undecodable {
            format: "json",
            message: e.to_string(),
        })?;
        if !text.trim_start().starts_with('{') {
            // Valid JSON of another kind is a wrong type; anything else is not JSON at all.
            serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(undecodable)?;
            return Err(CodecError::WrongType {
                field: "<root>",
                message: "expected a JSON object".into(),
            });
        }
        serde_json::from_str(text).map_err(undecodable)
    }

    /// The raw value of `field` (the last one if repeated), unless absent or null.
    fn get(&self, field: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == field)
            .map(|(_, v)| *v)
            .filter(|v| shape(v) != Shape::Null)
    }

    /// A required string field.
    pub(super) fn str(&self, field: &'static str) -> Result<Cow<'a, str>, CodecError> {
        self.opt_str(field)?.ok_or(CodecError::MissingField(field))
    }

    /// An optional string field.
    pub(super) fn opt_str(&self, field: &'static str) -> Result<Option<Cow<'a, str>>, CodecError> {
        match self.get(field) {
            None => Ok(None),
            Some(raw) if shape(raw) == Shape::String => string(raw).map(Some),
            Some(raw) => Err(CodecError::WrongType {
                field,
                message: format!("expected a string, got {}", raw.get()),
            }),
        }
    }

    /// An amount as exact text: a JSON number (its literal text) or a string.
    pub(super) fn amount(&self, field: &'static str) -> Result<Option<Cow<'a, str>>, CodecError> {
        match self.get(field) {
            None => Ok(None),
            Some(raw) if shape(raw) == Shape::String => string(raw).map(Some),
            Some(raw) if shape(raw) == Shape::Number => Ok(Some(Cow::Borrowed(raw.get()))),
            Some(raw) => Err(CodecError::WrongType {
                field,
                message: format!("expected a number, got {}", raw.get()),
            }),
        }
    }

    /// A small non-negative integer field.
    pub(super) fn uint(&self, field: &'static str) -> Result<Option<u64>, CodecError> {
        match self.get(field) {
            None => Ok(None),
            Some(raw) => raw
                .get()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| CodecError::WrongType {
                    field,
                    message: format!("expected a non-negative integer, got {}", raw.get()),
                }),
        }
    }

    /// A duration field ([`Ttl`]: whole seconds or a duration text) between `min` and `max`.
    pub(super) fn duration(
        &self,
        field: &'static str,
        min: Duration,
        max: Duration,
    ) -> Result<Option<Duration>, CodecError> {
        let Some(raw) = self.get(field) else {
            return Ok(None);
        };
        let read = match shape(raw) {
            Shape::Number => Ttl::Seconds(raw.get()).within(min, max),
            Shape::String => Ttl::Text(&string(raw)?).within(min, max),
            _ => Err(format!(
                "expected seconds or a duration such as \"15m\", got {}",
                raw.get()
            )),
        };
        read.map(Some)
            .map_err(|message| CodecError::WrongType { field, message })
    }

    /// A timestamp: RFC 3339 text or integer milliseconds since the epoch.
    pub(super) fn time(&self, field: &'static str) -> Result<Option<i64>, CodecError> {
        let Some(raw) = self.get(field) else {
            return Ok(None);
        };
        match shape(raw) {
            Shape::Number => raw
                .get()
                .parse::<i64>()
                .ok()
                .filter(|ms| *ms >= 0)
                .map(Some)
                .ok_or(CodecError::WrongType {
                    field,
                    message: "expected integer milliseconds >= 0".into(),
                }),
            Shape::String => {
                let s = string(raw)?;
                humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
                    .or_else(|_| humantime::parse_rfc3339(&s))
                    .map(|t| {
                        Some(
                            t.duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as i64),
                        )
                    })
                    .map_err(|e| CodecError::WrongType {
                        field,
                        message: format!("not RFC 3339: {e}"),
                    })
            }
            _ => Err(CodecError::WrongType {
                field,
                message: "expected RFC 3339 text or milliseconds".into(),
            }),
        }
    }

    /// An object of properties whose values are strings, numbers (their exact text), booleans
    /// or null (as empty text).
    pub(super) fn properties(
        &self,
        field: &'static str,
    ) -> Result<BTreeMap<String, String>, CodecError> {
        let mut out = BTreeMap::new();
        let Some(raw) = self.get(field) else {
            return Ok(out);
        };
        if shape(raw) != Shape::Object {
            return Err(CodecError::WrongType {
                field,
                message: "expected an object".into(),
            });
        }
        let inner: Object<'a> = serde_json::from_str(raw.get()).map_err(undecodable)?;
        for (k, v) in inner.0 {
            let text = match shape(v) {
                Shape::String => string(v)?.into_owned(),
                Shape::Number | Shape::Bool => v.get().to_string(),
                Shape::Null => String::new(),
                Shape::Object | Shape::Array => {
                    return Err(CodecError::WrongType {
                        field,
                        message: "property values must be strings, numbers or booleans".into(),
                    })
                }
            };
            out.insert(k.into_owned(), text);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_from_the_raw_text_exactly() {
        let o = Object::parse(
            br#" {"a":"x\"y","n":0.10,"t":"2026-01-01T00:00:00Z","p":{"k":1e2,"b":true,"z":null},"a":"last","nul":null}"#,
        )
        .unwrap();
        assert_eq!(o.str("a").unwrap(), "last");
        assert_eq!(o.amount("n").unwrap().unwrap(), "0.10");
        assert_eq!(o.time("t").unwrap(), Some(1_767_225_600_000));
        assert_eq!(o.opt_str("nul").unwrap(), None);
        assert_eq!(o.opt_str("missing").unwrap(), None);
        let p = o.properties("p").unwrap();
        assert_eq!(
            (p["k"].as_str(), p["b"].as_str(), p["z"].as_str()),
            ("1e2", "true", "")
        );
        assert_eq!(o.str("n").unwrap_err().reason(), "wrong_type");
        assert_eq!(Object::parse(b"[1]").err().unwrap().reason(), "wrong_type");
        assert_eq!(
            Object::parse(b"{\"a\":").err().unwrap().reason(),
            "undecodable"
        );
        assert_eq!(
            Object::parse(b"\xff").err().unwrap().reason(),
            "undecodable"
        );
    }
}
