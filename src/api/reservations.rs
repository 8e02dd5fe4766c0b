//! Reservations over HTTP: `POST /v1/customers/{id}/meters/{meter}/reservations` and
//! `DELETE /v1/customers/{id}/meters/{meter}/reservations/{reservation_id}` (API key only).
//!
//! A reservation is a state change like any other, so it goes through the pipeline: the handler
//! hands a `reserve` / `release` command to it on `credit-grants` (keyed by the customer, exactly
//! as a producer would), and answers once the owning instance has committed it. The routing
//! middleware has already forwarded the request to that owner, so the handler waits on its own
//! store, woken by each write of committed state ([`Store::subscribe_writes`], no polling): for
//! the reservation's record (its first answer), or for the hold to be gone. That takes about
//! one commit interval. A repeated `reservation_id` is answered from the record at
//! once, with the first answer, whatever the repeat asked for.
//!
//! | outcome | status |
//! |---|---|
//! | held (now, or by an earlier request with this id) | 200 `{"status": "held", ...}` |
//! | refused: a `block` meter whose `available` does not cover it, or too many holds | 409 `{"status": "insufficient" \| "too_many", ...}` |
//! | released (or ended before: settled, released, expired) | 200 `{"status": "released" \| "ended", ...}` |
//! | unknown reservation (DELETE) | 404 |
//! | not committed within [`WAIT`] (the partition moved, the broker is slow) | 503, `Retry-After: 1`; retrying with the same id is safe |

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::portal::duration_of;
use super::{customer, partitions_for, ApiError, ApiState};
use crate::ledger::{
    parse_amount, CustomerId, MeterName, ReservationId, ReservationOutcome, ReservationRecord,
};
use crate::ttl::MAX_RESERVATION_TTL;

/// How long a request waits for the pipeline to commit its command (within the 10 s a forwarding
/// instance waits for the owner).
pub const WAIT: Duration = Duration::from_secs(8);

/// The default hold, when a request names no `ttl`.
const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// `POST .../reservations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    /// The idempotency key.
    pub reservation_id: String,
    /// Units to hold: an exact decimal > 0, as a string or a number.
    pub units: Value,
    /// Seconds, or a duration such as `"10m"`; default 10 minutes, at most 7 days.
    #[serde(default)]
    pub ttl: Option<Value>,
}

/// A reservation, as answered.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reservation {
    /// The reservation.
    pub reservation_id: String,
    /// Whose.
    pub customer_id: String,
    /// Which meter.
    pub meter: String,
    /// Units asked for (the first request's).
    pub units: Decimal,
    /// When the hold ends by itself (ms since the epoch, stream time).
    pub expires_at: i64,
    /// `held`, `insufficient`, `too_many` (POST); `released`, `ended` (DELETE).
    pub status: String,
}

impl Reservation {
    fn of(c: &CustomerId, id: &ReservationId, r: &ReservationRecord, status: &str) -> Self {
        Self {
            reservation_id: id.to_string(),
            customer_id: c.to_string(),
            meter: r.meter.to_string(),
            units: r.units.normalize(),
            expires_at: r.expires_at,
            status: status.into(),
        }
    }
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn units(v: &Value) -> Result<Decimal, ApiError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(bad("units: an exact decimal > 0, as a string or a number")),
    };
    let d = parse_amount(&text).map_err(|e| bad(format!("units: {e}")))?;
    if d.is_zero() {
        return Err(bad("units must be > 0"));
    }
    Ok(d)
}

/// Waits for `done` to hold, at most [`WAIT`]: checked (on the blocking pool) after each write
/// of committed state to the store. `writes` was subscribed before the command was handed over,
/// so no commit is missed.
async fn wait_for<T: Send + 'static>(
    mut writes: tokio::sync::watch::Receiver<u64>,
    done: impl Fn() -> Result<Option<T>, ApiError> + Send + Sync + 'static,
) -> Result<T, ApiError> {
    let done = std::sync::Arc::new(done);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let check = done.clone();
        let got = tokio::task::spawn_blocking(move || check())
            .await
            .expect("store task panicked")?;
        if let Some(v) = got {
            return Ok(v);
        }
        match tokio::time::timeout_at(deadline, writes.changed()).await {
            Ok(Ok(())) => {}
            // The store is gone (shutting down), or no commit in time.
            Ok(Err(_)) | Err(_) => {
                return Err(ApiError::Unavailable(
                    "the reservation was handed to the pipeline but not committed in time; retry with the same reservation_id".into(),
                ))
            }
        }
    }
}

fn answer(status: StatusCode, r: Reservation) -> Response {
    (status, Json(r)).into_response()
}

/// The reservation's record in this instance's store, if there.
fn record(
    s: &ApiState,
    c: &CustomerId,
    id: &ReservationId,
) -> Result<Option<(i32, ReservationRecord)>, ApiError> {
    for p in partitions_for(s, c) {
        if let Some(r) = s.store.reservation(p, c, id)? {
            return Ok(Some((p, r)));
        }
    }
    Ok(None)
}

fn posted(c: &CustomerId, id: &ReservationId, r: &ReservationRecord) -> Response {
    match r.outcome {
        ReservationOutcome::Held => answer(StatusCode::OK, Reservation::of(c, id, r, "held")),
        ReservationOutcome::Insufficient => answer(
            StatusCode::CONFLICT,
            Reservation::of(c, id, r, "insufficient"),
        ),
        ReservationOutcome::TooMany => {
            answer(StatusCode::CONFLICT, Reservation::of(c, id, r, "too_many"))
        }
    }
}

/// `POST /v1/customers/{id}/meters/{meter}/reservations`.
pub async fn reserve(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<ReserveBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path((id, meter)) = path?;
    let Json(body) = body?;
    let c = customer(&id)?;
    let name = MeterName::parse(meter).map_err(bad)?;
    if s.meters.get(&name).is_none() {
        return Err(ApiError::NotFound(format!(
            "meter {name} is not configured"
        )));
    }
    let rid = ReservationId::parse(body.reservation_id).map_err(bad)?;
    let units = units(&body.units)?;
    let ttl = duration_of(
        body.ttl.as_ref(),
        DEFAULT_TTL,
        Duration::from_millis(1),
        MAX_RESERVATION_TTL,
    )?;
    let (st, cc, r2) = (s.clone(), c.clone(), rid.clone());
    let known = tokio::task::spawn_blocking(move || record(&st, &cc, &r2))
        .await
        .expect("store task panicked")?;
    if let Some((_, r)) = known {
        return Ok(posted(&c, &rid, &r));
    }
    let command = json!({
        "type": "reserve", "reservation_id": rid.as_str(), "customer_id": c.as_str(),
        "meter": name.as_str(), "units": units.to_string(),
        "ttl": format!("{}ms", ttl.as_millis()),
    });
    let writes = s.store.subscribe_writes();
    publish(&s, &c, &command).await?;
    let (st, cc, r2) = (s.clone(), c.clone(), rid.clone());
    let (_, r) = wait_for(writes, move || record(&st, &cc, &r2)).await?;
    Ok(posted(&c, &rid, &r))
}

async fn publish(s: &ApiState, c: &CustomerId, command: &Value) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(command).expect("serialisable");
    s.portal
        .publisher
        .command(c.as_str(), &bytes)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "reservation command not published");
            ApiError::Unavailable(format!("the command could not be published: {e}"))
        })
}

/// Whether the meter still holds the reservation.
fn holds(
    s: &ApiState,
    p: i32,
    c: &CustomerId,
    meter: &MeterName,
    id: &ReservationId,
) -> Result<bool, ApiError> {
    Ok(s.store
        .meter(p, c, meter)?
        .is_some_and(|m| m.holds.iter().any(|h| &h.id == id)))
}

/// `DELETE /v1/customers/{id}/meters/{meter}/reservations/{reservation_id}`.
pub async fn release(
    State(s): State<ApiState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path((id, meter, reservation)) = path?;
    let c = customer(&id)?;
    let name = MeterName::parse(meter).map_err(bad)?;
    let rid = ReservationId::parse(reservation).map_err(bad)?;
    let (st, cc, r2) = (s.clone(), c.clone(), rid.clone());
    let known = tokio::task::spawn_blocking(move || record(&st, &cc, &r2))
        .await
        .expect("store task panicked")?;
    let Some((p, r)) = known.filter(|(_, r)| r.meter == name) else {
        return Err(ApiError::NotFound(format!(
            "customer {c} has no reservation {rid} on meter {name}"
        )));
    };
    let (st, cc, n2, r2) = (s.clone(), c.clone(), name.clone(), rid.clone());
    let held = tokio::task::spawn_blocking(move || holds(&st, p, &cc, &n2, &r2))
        .await
        .expect("store task panicked")?;
    if !held {
        return Ok(answer(
            StatusCode::OK,
            Reservation::of(&c, &rid, &r, "ended"),
        ));
    }
    let command = json!({
        "type": "release", "reservation_id": rid.as_str(), "customer_id": c.as_str(),
    });
    let writes = s.store.subscribe_writes();
    publish(&s, &c, &command).await?;
    let (st, cc, n2, r2) = (s.clone(), c.clone(), name.clone(), rid.clone());
    wait_for(writes, move || {
        Ok((!holds(&st, p, &cc, &n2, &r2)?).then_some(()))
    })
    .await?;
    Ok(answer(
        StatusCode::OK,
        Reservation::of(&c, &rid, &r, "released"),
    ))
}
