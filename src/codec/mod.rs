//! JSON / protobuf <-> domain types, with validation.
//!
//! The `content-type` record header selects the decoder: `application/x-protobuf` (also
//! `application/protobuf`) for protobuf, anything else or none for JSON. Validation happens
//! here once: ids, amounts (exact decimals; no floats anywhere) and timestamps; the rules only
//! ever see [`crate::ledger::Input`]. Every failure is a [`CodecError`] with a bounded `reason()`.
//!
//! JSON numbers are read with their exact text (serde_json `arbitrary_precision`), so `0.1`
//! is exactly one tenth; amounts may also be given as strings.
//!
//! # Layout
//! - [`input`]: decoding usage events and credit commands (via `json` for JSON: fields read
//!   from the raw text, no tree built);
//! - [`output`]: encoding the balance records; [`read`]: reading them back (tools and tests);
//! - [`cursor`]: the history's page cursor.

pub mod cursor;
mod input;
mod json;
mod output;
mod read;

pub use input::{decode_command, decode_usage};
pub use output::{encode_changed, encode_top_up, encode_transition};
pub use read::{decode_changed, decode_top_up, decode_transition};

use crate::config::OutputFormat;
use crate::ledger::{LedgerError, TopUpRequested, TopUpSource, TransitionKind};

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
    /// The record is not in the partition murmur2(customer_id) gives, or has no key: applying
    /// it would split the customer's ledger across two partitions (see `docs/topics.md`).
    #[error("misrouted: {0}")]
    Misrouted(String),
    /// The event time is further ahead of the clock than `pipeline.max_future_skew` allows.
    #[error("event time {at} is more than the allowed skew ahead of the clock (latest accepted now: {limit})")]
    TimestampInFuture {
        /// The event time (ms).
        at: i64,
        /// The latest accepted (ms).
        limit: i64,
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
            CodecError::Misrouted(_) => "misrouted",
            CodecError::TimestampInFuture { .. } => "timestamp_in_future",
        }
    }
}

/// The payload of a record, which must not be empty.
fn payload(payload: Option<&[u8]>) -> Result<&[u8], CodecError> {
    payload.filter(|p| !p.is_empty()).ok_or(CodecError::Empty)
}

/// A protobuf message, or why it does not decode.
fn protobuf<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, CodecError> {
    M::decode(bytes).map_err(|e| CodecError::Undecodable {
        format: "protobuf",
        message: e.to_string(),
    })
}

/// A protobuf string field that must be set.
fn required(s: String, field: &'static str) -> Result<String, CodecError> {
    if s.is_empty() {
        Err(CodecError::MissingField(field))
    } else {
        Ok(s)
    }
}

fn is_protobuf(content_type: Option<&str>) -> bool {
    matches!(
        content_type.map(|c| c.split(';').next().unwrap_or("").trim()),
        Some("application/x-protobuf") | Some("application/protobuf")
    )
}

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

/// The headers of a `top-up-requests` record: `content-type`, and `request-id` (so billing can
/// dedupe without decoding).
pub fn top_up_headers(t: &TopUpRequested, format: OutputFormat) -> [(&'static str, String); 2] {
    [
        ("content-type", content_type(format).to_string()),
        ("request-id", t.request_id.clone()),
    ]
}

/// The `source` label of a top-up request (`auto | portal | api`), also a metric label.
pub fn top_up_source_label(source: TopUpSource) -> &'static str {
    match source {
        TopUpSource::Auto => "auto",
        TopUpSource::Portal => "portal",
        TopUpSource::Api => "api",
    }
}

/// The transition type label (`exhausted | restored | low | forecast`), also used as a record
/// header.
pub fn transition_label(kind: TransitionKind) -> &'static str {
    match kind {
        TransitionKind::Exhausted => "exhausted",
        TransitionKind::Restored => "restored",
        TransitionKind::Low => "low",
        TransitionKind::Forecast => "forecast",
    }
}
