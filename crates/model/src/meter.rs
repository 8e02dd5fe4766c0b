//! Meter definitions: which usage events a meter counts, and what happens at its thresholds.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::amount::parse_amount;
use crate::input::Rejected;

/// How a meter turns a matching event into units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aggregation {
    /// One unit per event.
    Count,
    /// The value of this property of the event.
    Sum(String),
}

/// What usage beyond the credits does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnExhausted {
    /// The balance goes negative (a debt); the excess is counted in `overage`.
    Overage,
    /// The balance floors at 0; the excess is counted in `blocked`.
    Block,
}

/// A low-balance threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Low {
    /// So many units.
    Units(Decimal),
    /// This fraction of the credits granted in the current cycle.
    Fraction(Decimal),
}

impl Low {
    /// The threshold in units; `None` for a fraction of a cycle that has no credits yet.
    pub fn units(self, cycle_credited: Decimal) -> Option<Decimal> {
        match self {
            Low::Units(u) => Some(u),
            Low::Fraction(f) if cycle_credited > Decimal::ZERO => Some(f * cycle_credited),
            Low::Fraction(_) => None,
        }
    }
}

/// An automatic top-up: a request for `pack` when the balance crosses below `below`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoTopUp {
    /// The threshold, in units.
    pub below: Decimal,
    /// The pack asked for.
    pub pack: String,
}

/// One meter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meter {
    /// Its name; grants name it.
    pub name: String,
    /// The usage event name it counts.
    pub event: String,
    /// Properties an event must have, with these values (as text), to be counted.
    pub filter: BTreeMap<String, String>,
    /// Count or sum.
    pub aggregation: Aggregation,
    /// Overage or block.
    pub on_exhausted: OnExhausted,
    /// Low-balance thresholds, in this order.
    pub lows: Vec<Low>,
    /// The automatic top-up, if any.
    pub auto_top_up: Option<AutoTopUp>,
}

impl Meter {
    /// Whether this meter counts an event of this name and these properties.
    pub fn counts(&self, name: &str, properties: &BTreeMap<String, String>) -> bool {
        if self.event != name {
            return false;
        }
        for (k, v) in &self.filter {
            if properties.get(k) != Some(v) {
                return false;
            }
        }
        true
    }

    /// The units a counted event adds.
    pub fn quantity(&self, properties: &BTreeMap<String, String>) -> Result<Decimal, Rejected> {
        match &self.aggregation {
            Aggregation::Count => Ok(Decimal::ONE),
            Aggregation::Sum(property) => {
                let text = properties.get(property).ok_or(Rejected::MissingProperty)?;
                parse_amount(text).ok_or(Rejected::InvalidAmount)
            }
        }
    }
}
