//! The entitlement check: may this customer use N more units of a meter?
//!
//! `GET /v1/customers/{id}/meters/{meter}/check?units=N` answers from the owning instance's
//! committed state (forwarded like every customer route), and `POST /v1/checks` answers many
//! (customer, meter, units) at once, each from its owner.
//!
//! | state of the meter | `allowed` | `reason` |
//! |---|---|---|
//! | `available >= units` | true | `ok` |
//! | short, meter in `overage` mode | false | `insufficient` (usage sent anyway is billed as overage) |
//! | short, meter in `block` mode | false | `blocked_mode` (usage sent anyway is refused, counted in `blocked`) |
//! | the meter is not configured | false | `unknown_meter` |
//!
//! `available` is the balance less the units reservations hold ([`MeterState::available`];
//! reservations are made through the pipeline, see the ledger docs). A customer that never had a
//! grant on a configured meter has a balance of 0. The check reads, it never holds units: two
//! callers checking at once may both be told `ok`.
//!
//! The batch form groups the items by the instance that serves their partition: local ones are
//! read here, the others go to their owner in one forwarded request per owner (marked
//! `x-drawdown-forwarded-by`, so a batch hops at most once). An item whose partition has no
//! ready owner gets an `error` instead of an answer; the others are still answered.

use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::route::{target, Target, FORWARDED_BY};
use super::{blocking, customer, ApiError, ApiState};
use crate::kafka::partition_for;
use crate::ledger::{parse_amount, CustomerId, MeterDef, MeterName, MeterState, OnExhausted};

/// The most items in one `POST /v1/checks`.
pub const MAX_BATCH: usize = 1000;

/// Why a check answered as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckReason {
    /// The available units cover the request.
    Ok,
    /// They don't; the meter bills the excess as overage.
    Insufficient,
    /// They don't; the meter refuses usage past zero.
    BlockedMode,
    /// No such meter is configured.
    UnknownMeter,
}

/// The answer to one check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Whether the available units cover the request.
    pub allowed: bool,
    /// The balance now (negative = debt in overage mode).
    pub balance: Decimal,
    /// The balance less the units reserved.
    pub available: Decimal,
    /// Why.
    pub reason: CheckReason,
}

/// The answer for `units` on a meter defined by `def` (`None`: not configured) whose state is
/// `state` (`None`: no grant yet).
pub fn decide(def: Option<&MeterDef>, state: Option<&MeterState>, units: Decimal) -> Check {
    let Some(def) = def else {
        return Check {
            allowed: false,
            balance: Decimal::ZERO,
            available: Decimal::ZERO,
            reason: CheckReason::UnknownMeter,
        };
    };
    let balance = state.map_or(Decimal::ZERO, MeterState::balance);
    let available = state.map_or(Decimal::ZERO, MeterState::available);
    let allowed = available >= units;
    let reason = match (allowed, def.on_exhausted) {
        (true, _) => CheckReason::Ok,
        (false, OnExhausted::Overage) => CheckReason::Insufficient,
        (false, OnExhausted::Block) => CheckReason::BlockedMode,
    };
    Check {
        allowed,
        balance: balance.normalize(),
        available: available.normalize(),
        reason,
    }
}

/// Query of the check.
#[derive(Debug, Deserialize)]
pub struct CheckQuery {
    /// The units to check for: an exact decimal >= 0.
    pub units: Option<String>,
}

fn units(s: Option<&str>) -> Result<Decimal, ApiError> {
    let s = s.ok_or_else(|| ApiError::BadRequest("units is required".into()))?;
    parse_amount(s).map_err(|e| ApiError::BadRequest(format!("units: {e}")))
}

/// Reads one check from the local store (the caller made sure this instance serves it).
fn check_local(
    s: &ApiState,
    c: &CustomerId,
    meter: &str,
    units: Decimal,
) -> Result<Check, ApiError> {
    let Ok(name) = MeterName::parse(meter) else {
        return Ok(decide(None, None, units));
    };
    let Some(def) = s.meters.get(&name) else {
        return Ok(decide(None, None, units));
    };
    let p = partition_for(c.as_str().as_bytes(), s.partitions);
    let state = s.store.meter(p, c, &name)?;
    Ok(decide(Some(def), state.as_ref(), units))
}

/// `GET /v1/customers/{id}/meters/{meter}/check?units=N`.
pub async fn check(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<CheckQuery>, QueryRejection>,
) -> Result<Json<Check>, ApiError> {
    let (Path((id, meter)), Query(q)) = (path?, query?);
    let c = customer(&id)?;
    let n = units(q.units.as_deref())?;
    // Read here, not on the blocking pool: a point read of one hot key (memtable or block
    // cache) takes microseconds, while the hand-off to the blocking pool and back (futex
    // wake-ups, two context switches) cost 14 % of the CPU at 9k checks/s (perf, `make
    // bench-check`). A read that misses the cache blocks this worker for one disk read.
    check_local(&s, &c, &meter, n).map(Json)
}

/// One item of `POST /v1/checks`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckItem {
    /// The customer.
    pub customer_id: String,
    /// The meter.
    pub meter: String,
    /// The units to check for (an exact decimal >= 0, as a string).
    pub units: String,
}

/// `POST /v1/checks` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBatch {
    /// 1 to [`MAX_BATCH`] items.
    pub checks: Vec<CheckItem>,
}

/// An item that could not be answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemError {
    /// `unavailable` (its partition has no ready owner; retry).
    pub code: String,
    /// Why.
    pub message: String,
}

/// One result of `POST /v1/checks`, in the order of the request's items.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// The customer.
    pub customer_id: String,
    /// The meter.
    pub meter: String,
    /// The units checked for.
    pub units: Decimal,
    /// The answer (absent when `error` is set).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// Why there is no answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ItemError>,
}

impl CheckResult {
    /// The result for `item` (of `units`): an answer, or an `unavailable` error saying why.
    fn new(item: &CheckItem, units: Decimal, answer: Result<Check, String>) -> Self {
        let (check, error) = match answer {
            Ok(c) => (Some(c), None),
            Err(message) => (
                None,
                Some(ItemError {
                    code: "unavailable".into(),
                    message,
                }),
            ),
        };
        Self {
            customer_id: item.customer_id.clone(),
            meter: item.meter.clone(),
            units: units.normalize(),
            check,
            error,
        }
    }
}

/// `POST /v1/checks` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct CheckResults {
    /// One per item, in order.
    pub results: Vec<CheckResult>,
}

/// `POST /v1/checks`.
pub async fn check_batch(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<CheckBatch>, JsonRejection>,
) -> Result<Json<CheckResults>, ApiError> {
    let Json(batch) = body?;
    if batch.checks.is_empty() || batch.checks.len() > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "checks must hold 1 to {MAX_BATCH} items"
        )));
    }
    let mut parsed = Vec::with_capacity(batch.checks.len());
    for (i, item) in batch.checks.iter().enumerate() {
        let c = customer(&item.customer_id)
            .map_err(|e| ApiError::BadRequest(format!("checks[{i}].customer_id: {e}")))?;
        let n = units(Some(&item.units))
            .map_err(|e| ApiError::BadRequest(format!("checks[{i}].{e}")))?;
        parsed.push((c, n));
    }
    let forwarded = headers.contains_key(FORWARDED_BY);
    let mut results: Vec<Option<CheckResult>> = vec![None; parsed.len()];
    let mut local = Vec::new();
    let mut remote: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (c, n)) in parsed.iter().enumerate() {
        let p = partition_for(c.as_str().as_bytes(), s.partitions);
        match target(&s, p, forwarded) {
            Target::Here => local.push(i),
            Target::Owner(owner) => remote.entry(owner.api_url).or_default().push(i),
            Target::Unavailable(why) => {
                let why = format!("partition {p} {why}; retry shortly");
                results[i] = Some(CheckResult::new(&batch.checks[i], *n, Err(why)));
            }
        }
    }
    for (url, idx) in remote {
        let sub = CheckBatch {
            checks: idx.iter().map(|&i| batch.checks[i].clone()).collect(),
        };
        let answers = forward(&s, &url, &headers, &sub).await;
        for (k, &i) in idx.iter().enumerate() {
            results[i] = Some(match &answers {
                Ok(a) => a[k].clone(),
                Err(e) => CheckResult::new(
                    &batch.checks[i],
                    parsed[i].1,
                    Err(format!(
                        "the owning instance did not answer: {e}; retry shortly"
                    )),
                ),
            });
        }
    }
    let s2 = s.clone();
    let items: Vec<(usize, CheckItem, CustomerId, Decimal)> = local
        .into_iter()
        .map(|i| (i, batch.checks[i].clone(), parsed[i].0.clone(), parsed[i].1))
        .collect();
    let answered = blocking(move || {
        items
            .into_iter()
            .map(|(i, item, c, n)| {
                let check = check_local(&s2, &c, &item.meter, n)?;
                Ok((i, CheckResult::new(&item, n, Ok(check))))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await?;
    for (i, r) in answered {
        results[i] = Some(r);
    }
    Ok(Json(CheckResults {
        results: results.into_iter().flatten().collect(),
    }))
}

/// Sends `sub` to the instance at `url`, with the caller's credentials.
async fn forward(
    s: &ApiState,
    url: &str,
    headers: &HeaderMap,
    sub: &CheckBatch,
) -> Result<Vec<CheckResult>, String> {
    let mut req = s
        .http
        .post(format!(
            "{}{}",
            url.trim_end_matches('/'),
            super::routes::CHECKS
        ))
        .header(FORWARDED_BY, s.instance_id.as_str())
        .json(sub);
    if let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) {
        req = req.header(axum::http::header::AUTHORIZATION, auth);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let out: CheckResults = resp.json().await.map_err(|e| e.to_string())?;
    if out.results.len() != sub.checks.len() {
        return Err(format!(
            "{} results for {} items",
            out.results.len(),
            sub.checks.len()
        ));
    }
    Ok(out.results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Aggregation;

    fn def(name: &str, on_exhausted: OnExhausted) -> MeterDef {
        MeterDef {
            name: MeterName::parse(name).unwrap(),
            event: name.into(),
            filter: Default::default(),
            aggregation: Aggregation::Count,
            on_exhausted,
            low_balance: Vec::new(),
            top_up_packs: Vec::new(),
            auto_top_up: None,
            burn_window: crate::ledger::default_burn_window(),
            forecast_horizon: crate::ledger::default_forecast_horizon(),
            forecast_alert: None,
        }
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn the_reasons_follow_the_table() {
        let (calls, seats) = (
            def("calls", OnExhausted::Overage),
            def("seats", OnExhausted::Block),
        );
        let (calls, seats) = (Some(&calls), Some(&seats));
        // No grant yet: balance 0, so only 0 units are covered.
        assert_eq!(decide(calls, None, d("0")).reason, CheckReason::Ok);
        let short = decide(calls, None, d("1"));
        assert_eq!(
            (short.allowed, short.reason),
            (false, CheckReason::Insufficient)
        );
        let blocked = decide(seats, None, d("0.5"));
        assert_eq!(
            (blocked.allowed, blocked.reason),
            (false, CheckReason::BlockedMode)
        );
        let unknown = decide(None, None, d("1"));
        assert_eq!(
            (unknown.allowed, unknown.reason),
            (false, CheckReason::UnknownMeter)
        );
    }

    #[test]
    fn what_reservations_hold_is_not_available() {
        use crate::ledger::{GrantId, GrantKind, GrantSlot, Hold, ReservationId};
        let seats = def("seats", OnExhausted::Block);
        let state = MeterState {
            grants: vec![GrantSlot {
                id: GrantId::parse("g").unwrap(),
                kind: GrantKind::TopUp,
                priority: 0,
                effective_at: 0,
                expires_at: None,
                subscription_id: None,
                rollover: Decimal::ZERO,
                amount: d("10"),
                remaining: d("10"),
                active: true,
                cycle_ended: false,
            }],
            reserved: d("7"),
            holds: vec![Hold {
                id: ReservationId::parse("r").unwrap(),
                units: d("7"),
                expires_at: 1,
            }],
            ..MeterState::default()
        };
        let c = decide(Some(&seats), Some(&state), d("4"));
        assert_eq!(
            (c.allowed, c.balance, c.available),
            (false, d("10"), d("3"))
        );
        assert_eq!(c.reason, CheckReason::BlockedMode);
        assert!(decide(Some(&seats), Some(&state), d("3")).allowed);
    }

    #[test]
    fn units_must_be_an_exact_non_negative_decimal() {
        assert_eq!(units(Some("2.5")).unwrap(), d("2.5"));
        for bad in ["-1", "1e3", "abc", "", "0.0000000001", "NaN"] {
            assert!(units(Some(bad)).is_err(), "{bad:?}");
        }
        assert!(units(None).is_err());
    }

    #[test]
    fn a_result_is_either_an_answer_or_an_error() {
        let r = CheckResult {
            customer_id: "c".into(),
            meter: "calls".into(),
            units: d("3"),
            check: Some(Check {
                allowed: true,
                balance: d("5"),
                available: d("5"),
                reason: CheckReason::Ok,
            }),
            error: None,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"customer_id": "c", "meter": "calls", "units": "3",
                "allowed": true, "balance": "5", "available": "5", "reason": "ok"})
        );
        let back: CheckResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }
}
