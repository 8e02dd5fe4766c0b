//! Why an input is rejected: one error type for the whole ledger, with bounded labels.

use std::fmt;

/// Why an input was rejected. The reason (`reason()`) is a short stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// An identifier is empty, too long or has control characters.
    #[error("invalid {kind}: {why}")]
    InvalidId {
        /// Which identifier.
        kind: &'static str,
        /// What is wrong with it.
        why: IdProblem,
    },
    /// An amount is negative, not an exact decimal, too large or too precise.
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    /// A sum meter's property is missing from the event.
    #[error("missing property {0:?} needed by a sum meter")]
    MissingProperty(String),
    /// A grant refers to a meter that is not configured.
    #[error("unknown meter {0:?}")]
    UnknownMeter(String),
    /// A grant field is inconsistent (e.g. a cycle grant without subscription).
    #[error("invalid grant: {0}")]
    InvalidGrant(String),
    /// A void refers to an event or grant that is unknown (or older than the dedupe window).
    #[error("void of unknown {0}")]
    VoidUnknown(&'static str),
    /// A void refers to an event or grant already voided.
    #[error("{0} already voided")]
    AlreadyVoided(&'static str),
    /// A reservation's units or ttl are out of range.
    #[error("invalid reservation: {0}")]
    InvalidReservation(String),
    /// A release refers to a reservation that is unknown (or older than the dedupe window).
    #[error("release of an unknown reservation")]
    ReservationUnknown,
}

impl LedgerError {
    /// A short, bounded label for metrics and the DLQ's `error.reason` header.
    pub fn reason(&self) -> &'static str {
        match self {
            LedgerError::InvalidId { .. } => "invalid_id",
            LedgerError::InvalidAmount(_) => "invalid_amount",
            LedgerError::MissingProperty(_) => "missing_property",
            LedgerError::UnknownMeter(_) => "unknown_meter",
            LedgerError::InvalidGrant(_) => "invalid_grant",
            LedgerError::VoidUnknown(_) => "void_unknown",
            LedgerError::AlreadyVoided(_) => "void_duplicate",
            LedgerError::InvalidReservation(_) => "invalid_reservation",
            LedgerError::ReservationUnknown => "reservation_unknown",
        }
    }
}

/// What is wrong with an identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdProblem {
    /// It is empty.
    Empty,
    /// It is longer than this many bytes (the limit, [`super::MAX_ID_LEN`]).
    TooLong(usize),
    /// It contains control characters.
    ControlCharacters,
}

impl fmt::Display for IdProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdProblem::Empty => f.write_str("empty"),
            IdProblem::TooLong(max) => write!(f, "longer than {max} bytes"),
            IdProblem::ControlCharacters => f.write_str("contains control characters"),
        }
    }
}
