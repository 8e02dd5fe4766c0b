//! Meter definitions (from config) and how a usage event maps to units on each meter.

use std::collections::BTreeMap;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::error::LedgerError;
use super::ids::{check_id, parse_amount, MeterName};

/// How a meter turns matching events into units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", deny_unknown_fields)]
pub enum Aggregation {
    /// One unit per matching event.
    Count,
    /// The value of a numeric property (an exact decimal, >= 0) of each matching event.
    Sum {
        /// The property summed.
        property: String,
    },
}

/// What happens to usage once the balance is used up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    /// Usage goes on; the balance goes negative (a debt paid first by the next grant); the excess
    /// is counted in `overage`, billable at the metered price.
    Overage,
    /// Credits-only: the balance floors at 0 and the excess is counted in `blocked`.
    Block,
}

/// A low-balance threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Threshold {
    /// An absolute number of units.
    Units(Decimal),
    /// A fraction (0..1) of the credits granted in the current cycle.
    Fraction(Decimal),
}

impl Threshold {
    /// The threshold in units, given the credits granted in the current cycle; `None` when a
    /// fractional threshold has nothing to be a fraction of yet.
    pub fn units(&self, cycle_credited: Decimal) -> Option<Decimal> {
        match *self {
            Threshold::Units(u) => Some(u),
            Threshold::Fraction(f) if cycle_credited > Decimal::ZERO => Some(f * cycle_credited),
            Threshold::Fraction(_) => None,
        }
    }
}

/// Automatic top-up: when the balance crosses below `below`, drawdown itself publishes one
/// `TopUpRequested` for `pack` (re-armed once the balance is back at or above `below`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoTopUp {
    /// The threshold, in units (>= 0).
    pub below: Decimal,
    /// The pack the billing system is asked to charge and grant.
    pub pack: String,
}

/// One meter, as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterDef {
    /// The meter's name; grants and balances refer to it.
    pub name: MeterName,
    /// The usage event `name` this meter counts.
    pub event: String,
    /// Only events whose properties equal all of these (as text) are counted.
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Count of events or sum of a property.
    pub aggregation: Aggregation,
    /// Overage (negative balance allowed) or block (credits only).
    pub on_exhausted: OnExhausted,
    /// Low-balance thresholds; `BalanceLow` fires once per threshold crossed downwards.
    #[serde(default)]
    pub low_balance: Vec<Threshold>,
    /// Packs a customer may request from the portal ("Top up"); the billing system knows what
    /// each one costs and grants.
    #[serde(default)]
    pub top_up_packs: Vec<String>,
    /// Automatic top-up when the balance crosses below a threshold.
    #[serde(default)]
    pub auto_top_up: Option<AutoTopUp>,
    /// The time constant of the burn rate's exponential weighting (see
    /// [`super::forecast`]); default 1 hour.
    #[serde(default = "default_burn_window", with = "humantime_serde")]
    pub burn_window: Duration,
    /// `runs_out_at` is given when it is at most this far ahead; default 30 days.
    #[serde(default = "default_forecast_horizon", with = "humantime_serde")]
    pub forecast_horizon: Duration,
    /// The `forecast` transition fires when `runs_out_at` comes within this much; off when unset.
    #[serde(default, with = "humantime_serde")]
    pub forecast_alert: Option<Duration>,
}

/// The default `burn_window`: one hour.
pub fn default_burn_window() -> Duration {
    Duration::from_secs(3600)
}

/// The default `forecast_horizon`: 30 days.
pub fn default_forecast_horizon() -> Duration {
    Duration::from_secs(30 * 86_400)
}

impl MeterDef {
    /// Whether a usage event with this name and properties is counted by this meter.
    pub fn matches(&self, name: &str, properties: &BTreeMap<String, String>) -> bool {
        self.event == name
            && self
                .filter
                .iter()
                .all(|(k, v)| properties.get(k).is_some_and(|p| p == v))
    }

    /// The packs offered for this meter: `top_up_packs`, then the automatic top-up's pack.
    pub fn packs(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.top_up_packs.iter().map(String::as_str).collect();
        if let Some(a) = &self.auto_top_up {
            if !out.contains(&a.pack.as_str()) {
                out.push(&a.pack);
            }
        }
        out
    }

    /// The units a matching event adds to this meter.
    pub fn quantity(&self, properties: &BTreeMap<String, String>) -> Result<Decimal, LedgerError> {
        match &self.aggregation {
            Aggregation::Count => Ok(Decimal::ONE),
            Aggregation::Sum { property } => {
                let raw = properties
                    .get(property)
                    .ok_or_else(|| LedgerError::MissingProperty(property.clone()))?;
                parse_amount(raw)
            }
        }
    }
}

/// The configured meters, in a fixed order.
#[derive(Clone, Debug, Default)]
pub struct Meters {
    defs: Vec<MeterDef>,
}

impl Meters {
    /// Builds the set, rejecting duplicate names and bad thresholds.
    pub fn new(defs: Vec<MeterDef>) -> Result<Self, String> {
        let mut seen = std::collections::BTreeSet::new();
        for d in &defs {
            if !seen.insert(d.name.clone()) {
                return Err(format!("meter {} is defined twice", d.name));
            }
            for t in &d.low_balance {
                if let Threshold::Fraction(f) = t {
                    if *f <= Decimal::ZERO || *f >= Decimal::ONE {
                        return Err(format!("meter {}: fraction {f} is not in (0, 1)", d.name));
                    }
                }
            }
            for pack in d.packs() {
                if let Err(e) = check_id("top-up pack", pack) {
                    return Err(format!("meter {}: {e}", d.name));
                }
            }
            if let Some(a) = &d.auto_top_up {
                if a.below.is_sign_negative() && !a.below.is_zero() {
                    return Err(format!("meter {}: auto_top_up.below must be >= 0", d.name));
                }
            }
            if d.burn_window < Duration::from_secs(1) {
                return Err(format!("meter {}: burn_window must be at least 1s", d.name));
            }
            if let Some(alert) = d.forecast_alert {
                if alert.is_zero() || alert > d.forecast_horizon {
                    return Err(format!(
                        "meter {}: forecast_alert must be > 0 and at most forecast_horizon",
                        d.name
                    ));
                }
            }
            if d.low_balance.len() > 32 {
                return Err(format!(
                    "meter {}: at most 32 low-balance thresholds",
                    d.name
                ));
            }
        }
        Ok(Self { defs })
    }

    /// The meter with this name.
    pub fn get(&self, name: &MeterName) -> Option<&MeterDef> {
        self.defs.iter().find(|d| &d.name == name)
    }

    /// All meters.
    pub fn all(&self) -> &[MeterDef] {
        &self.defs
    }

    /// The units a usage event adds to each meter it matches; empty when it matches none.
    /// Fails (as a whole) if any matching meter cannot read its quantity.
    pub fn quantities(
        &self,
        name: &str,
        properties: &BTreeMap<String, String>,
    ) -> Result<Vec<(&MeterDef, Decimal)>, LedgerError> {
        self.defs
            .iter()
            .filter(|d| d.matches(name, properties))
            .map(|d| d.quantity(properties).map(|q| (d, q)))
            .collect()
    }
}
