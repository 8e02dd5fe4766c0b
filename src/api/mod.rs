//! HTTP API: balances per customer and meter, health, readiness and metrics; access control
//! ([`auth`]), the customer portal and top-up requests ([`portal`]).
//!
//! Reads come from RocksDB, which holds only committed state (it is written after each
//! transaction commits), so an answer never shows an uncommitted change. Errors are one JSON
//! shape, `{"error": {"code": "...", "message": "..."}}`, for every failure: handlers, malformed
//! paths and queries, unknown routes and wrong methods alike.
//!
//! The reference is the OpenAPI 3.1 document `docs/openapi.json`, compiled in and served at
//! `GET /openapi.json`; `tests/ops.rs` checks live responses against it.

pub mod auth;
pub mod check;
pub mod portal;
pub mod reservations;
pub mod route;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::codec::cursor;
use crate::kafka::{partition_for, PipelineStatus};
use crate::ledger::{
    forecast, BalanceChanged, CustomerId, GrantSlot, MeterName, MeterState, Meters, Status,
};
use crate::store::{Store, StoreError};

/// What the handlers share, behind one `Arc`: axum clones the state for every middleware and
/// handler of every request, and a deep copy (the meters' definitions, strings) was 7 % of the
/// CPU of the entitlement check under load (perf, `make bench-check`).
#[derive(Clone)]
pub struct ApiState(Arc<ApiShared>);

impl ApiState {
    /// The state of a router.
    pub fn new(shared: ApiShared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for ApiState {
    type Target = ApiShared;

    fn deref(&self) -> &ApiShared {
        &self.0
    }
}

/// The fields of [`ApiState`].
pub struct ApiShared {
    /// Local state.
    pub store: Store,
    /// Readiness and ownership.
    pub status: Arc<PipelineStatus>,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// Partitions of the input topics.
    pub partitions: i32,
    /// The configured meters.
    pub meters: Meters,
    /// Who serves which partition (for forwarding).
    pub directory: crate::kafka::directory::Directory,
    /// This instance's id.
    pub instance_id: String,
    /// Client for forwarded requests.
    pub http: reqwest::Client,
    /// API keys and the portal token signer.
    pub access: Arc<auth::Access>,
    /// Portal settings and the top-up producer.
    pub portal: Arc<portal::Portal>,
    /// Whether `/metrics` is served here (false when `api.metrics_listen` is set).
    pub metrics_on_main: bool,
}

/// API errors, each mapped to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such customer or meter.
    #[error("{0}")]
    NotFound(String),
    /// A malformed path or query.
    #[error("{0}")]
    BadRequest(String),
    /// The route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No valid credentials.
    #[error("{message}")]
    Unauthorized {
        /// Why (never naming a customer).
        message: String,
        /// Whether a credential was sent (then `WWW-Authenticate` says `invalid_token`).
        token_presented: bool,
    },
    /// Valid credentials that do not reach this resource.
    #[error("{0}")]
    Forbidden(String),
    /// A dependency (the broker) failed; retry.
    #[error("{0}")]
    Unavailable(String),
    /// A feature this instance is not configured for.
    #[error("{0}")]
    NotImplemented(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
            ApiError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = (
            status,
            Json(json!({"error": {"code": code, "message": self.to_string()}})),
        )
            .into_response();
        match &self {
            ApiError::Unauthorized {
                token_presented, ..
            } => {
                let challenge = if *token_presented {
                    r#"Bearer realm="drawdown", error="invalid_token""#
                } else {
                    r#"Bearer realm="drawdown""#
                };
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static(challenge),
                );
            }
            ApiError::Unavailable(_) => {
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            _ => {}
        }
        resp
    }
}

/// One meter in the state response.
#[derive(Debug, Serialize, Deserialize)]
pub struct MeterView {
    /// The meter.
    pub meter: String,
    /// Units available now (negative = debt in overage mode).
    pub balance: Decimal,
    /// Units granted (active grants, net of voids).
    pub credited: Decimal,
    /// Units of usage applied.
    pub consumed: Decimal,
    /// Units used beyond the credits (overage mode).
    pub overage: Decimal,
    /// Units refused (block mode).
    pub blocked: Decimal,
    /// Units forfeited by expiry or cycle end.
    pub expired: Decimal,
    /// Units held by reservations.
    #[serde(default)]
    pub reserved: Decimal,
    /// `balance - reserved`: what may still be used or reserved without touching a hold.
    #[serde(default)]
    pub available: Decimal,
    /// Units given back by voided usage.
    pub voided: Decimal,
    /// active | low | exhausted.
    pub status: Status,
    /// The projection's version.
    pub version: u64,
    /// Processing time of the last change (ms since the epoch).
    pub updated_at: i64,
    /// The usage rate now, in units per hour: exponentially weighted over the meter's
    /// `burn_window` (see the ledger's forecast docs). 0 for a meter never used.
    #[serde(default)]
    pub burn_rate: Decimal,
    /// When the balance reaches 0 at that rate, counting known expiries and pending grants (ms
    /// since the epoch); null when the rate is 0, the balance is already <= 0, or it is further
    /// than the meter's `forecast_horizon`.
    #[serde(default)]
    pub runs_out_at: Option<i64>,
}

impl MeterView {
    /// The view of `s` as of the wall clock (or its last usage, if that is later).
    fn new(meters: &Meters, name: &MeterName, s: &MeterState) -> Self {
        let now = crate::clock::now_ms().max(s.burn_at);
        let (burn_rate, runs_out_at) = match meters.get(name) {
            Some(def) => (
                forecast::burn_rate(s, def, now),
                forecast::runs_out_at(s, def, now),
            ),
            None => (Decimal::ZERO, None),
        };
        Self {
            burn_rate,
            runs_out_at,
            meter: name.to_string(),
            balance: s.balance(),
            credited: s.credited,
            consumed: s.consumed,
            overage: s.overage,
            blocked: s.blocked,
            expired: s.expired,
            reserved: s.reserved,
            available: s.available(),
            voided: s.voided,
            status: s.status(),
            version: s.version,
            updated_at: s.updated_at,
        }
    }
}

/// `GET /v1/customers/{id}/state`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CustomerState {
    /// The customer.
    pub customer_id: String,
    /// Every meter with a projection.
    pub meters: Vec<MeterView>,
}

/// `GET /v1/customers/{id}/meters/{meter}`.
#[derive(Debug, Serialize)]
pub struct MeterDetail {
    /// The customer.
    pub customer_id: String,
    /// Totals.
    #[serde(flatten)]
    pub meter: MeterView,
    /// Grants held, active ones in draw-down order, then pending ones.
    pub grants: Vec<GrantSlot>,
    /// The latest movements, newest first.
    pub recent_events: Vec<BalanceChanged>,
}

/// The routes, as matched (and as the `route` label of the HTTP metrics).
pub mod routes {
    /// Every meter of a customer.
    pub const STATE: &str = "/v1/customers/{id}/state";
    /// One meter with its grants and latest movements.
    pub const METER: &str = "/v1/customers/{id}/meters/{meter}";
    /// A meter's movements, paginated.
    pub const EVENTS: &str = "/v1/customers/{id}/meters/{meter}/events";
    /// May the customer use N more units of the meter?
    pub const CHECK: &str = "/v1/customers/{id}/meters/{meter}/check";
    /// Many checks at once, each answered by its owner.
    pub const CHECKS: &str = "/v1/checks";
    /// Liveness.
    pub const HEALTHZ: &str = "/healthz";
    /// Readiness (restored and consuming).
    pub const READYZ: &str = "/readyz";
    /// Prometheus metrics.
    pub const METRICS: &str = "/metrics";
    /// This API's OpenAPI document.
    pub const OPENAPI: &str = "/openapi.json";
    /// Request a top-up of a meter (publishes `TopUpRequested`).
    pub const TOP_UPS: &str = "/v1/customers/{id}/meters/{meter}/top-ups";
    /// Hold units of a meter (through the pipeline; answered after the commit).
    pub const RESERVATIONS: &str = "/v1/customers/{id}/meters/{meter}/reservations";
    /// Release a reservation.
    pub const RESERVATION: &str = "/v1/customers/{id}/meters/{meter}/reservations/{reservation_id}";
    /// Create a portal session (API key).
    pub const PORTAL_SESSIONS: &str = "/v1/portal-sessions";
    /// The session of the presented portal token.
    pub const PORTAL_SESSION: &str = "/v1/portal-sessions/current";
    /// The portal page.
    pub const PORTAL: &str = "/portal";
    /// The portal page's script and style sheet.
    pub const PORTAL_ASSET: &str = "/portal/{asset}";
    /// All of them.
    pub const ALL: [&str; 16] = [
        STATE,
        METER,
        EVENTS,
        CHECK,
        CHECKS,
        TOP_UPS,
        RESERVATIONS,
        RESERVATION,
        PORTAL_SESSIONS,
        PORTAL_SESSION,
        PORTAL,
        PORTAL_ASSET,
        HEALTHZ,
        READYZ,
        METRICS,
        OPENAPI,
    ];
}

/// The OpenAPI 3.1 document of this API (`docs/openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// The router. Layers run outside in: metrics (`track`), then on the `/v1` routes access
/// control ([`auth::authorize`]), then, on the customer routes, forwarding ([`route::route`]),
/// so a request without valid credentials is never forwarded.
pub fn router(state: ApiState) -> Router {
    crate::metrics::zero_initialise_http(&routes::ALL);
    let authorize = middleware::from_fn_with_state(state.clone(), auth::authorize);
    let customer_routes = Router::new()
        .route(routes::STATE, get(customer_state))
        .route(routes::METER, get(meter_detail))
        .route(routes::EVENTS, get(meter_events))
        .route(routes::CHECK, get(check::check))
        .route(routes::TOP_UPS, post(portal::request_top_up))
        .route(routes::RESERVATIONS, post(reservations::reserve))
        .route(
            routes::RESERVATION,
            axum::routing::delete(reservations::release),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), route::route))
        .route_layer(authorize.clone());
    let session_routes = Router::new()
        .route(routes::PORTAL_SESSIONS, post(portal::create_session))
        .route(routes::PORTAL_SESSION, get(portal::current_session))
        .route(routes::CHECKS, post(check::check_batch))
        .route_layer(authorize);
    let mut r = Router::new()
        .merge(customer_routes)
        .merge(session_routes)
        .route(routes::PORTAL, get(portal::page))
        .route(routes::PORTAL_ASSET, get(portal::asset))
        .route(
            routes::HEALTHZ,
            get(|| async { Json(json!({"status": "ok"})) }),
        )
        .route(routes::READYZ, get(readyz))
        .route(
            routes::OPENAPI,
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON) }),
        );
    if state.metrics_on_main {
        r = r.route(routes::METRICS, get(metrics));
    }
    with_fallbacks(r).with_state(state)
}

/// The router of `api.metrics_listen`: `/metrics` only.
pub fn metrics_router(state: ApiState) -> Router {
    with_fallbacks(Router::new().route(routes::METRICS, get(metrics))).with_state(state)
}

fn with_fallbacks(r: Router<ApiState>) -> Router<ApiState> {
    r.fallback(|req: Request| async move {
        ApiError::NotFound(format!("no route for {}", req.uri().path()))
    })
    .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
    .layer(middleware::from_fn(track))
}

async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn track(req: Request, next: Next) -> Response {
    // Labels without allocating: the matched route is one of the static route templates.
    let route: &'static str = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| routes::ALL.iter().copied().find(|r| *r == p.as_str()))
        .unwrap_or("unmatched");
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = status_label(resp.status());
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!(crate::metrics::HTTP_SECONDS, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// The `status` label: static for the statuses this API answers, text for any other.
fn status_label(status: StatusCode) -> metrics::SharedString {
    let known = match status.as_u16() {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        500 => "500",
        502 => "502",
        503 => "503",
        _ => return status.as_u16().to_string().into(),
    };
    known.into()
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let ready = s.status.is_ready();
    let body = Json(json!({
        "ready": ready,
        "partitions_owned": s.status.owned(),
        "partitions_restoring": s.status.restoring(),
    }));
    if ready {
        (StatusCode::OK, body).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            body,
        )
            .into_response()
    }
}

fn customer(id: &str) -> Result<CustomerId, ApiError> {
    CustomerId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The partitions to look in for a customer: murmur2's first, then the others.
/// The partition holding a customer: murmur2 of the id, as producers key it. Only that one is
/// read (and only once [`route::route`] checked this instance serves it), so state left behind
/// by a partition that moved away is never shown.
fn partitions_for(s: &ApiState, c: &CustomerId) -> Vec<i32> {
    vec![partition_for(c.as_str().as_bytes(), s.partitions)]
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store task panicked")
}

async fn customer_state(
    State(s): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CustomerState>, ApiError> {
    let Path(id) = path?;
    let c = customer(&id)?;
    blocking(move || {
        for p in partitions_for(&s, &c) {
            let meters = s.store.meters(p, &c)?;
            if !meters.is_empty() {
                let meters = meters
                    .iter()
                    .map(|(n, m)| MeterView::new(&s.meters, n, m))
                    .collect();
                return Ok(Json(CustomerState {
                    customer_id: c.to_string(),
                    meters,
                }));
            }
        }
        Err(ApiError::NotFound(format!("customer {c} has no meters")))
    })
    .await
}

fn find_meter(
    s: &ApiState,
    c: &CustomerId,
    meter: &str,
) -> Result<(i32, MeterName, MeterState), ApiError> {
    let name = MeterName::parse(meter).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if s.meters.get(&name).is_none() {
        return Err(ApiError::NotFound(format!(
            "meter {name} is not configured"
        )));
    }
    for p in partitions_for(s, c) {
        if let Some(m) = s.store.meter(p, c, &name)? {
            return Ok((p, name, m));
        }
    }
    Err(ApiError::NotFound(format!(
        "customer {c} has no meter {name}"
    )))
}

async fn meter_detail(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<MeterDetail>, ApiError> {
    let Path((id, meter)) = path?;
    let c = customer(&id)?;
    blocking(move || {
        let (p, name, m) = find_meter(&s, &c, &meter)?;
        let recent_events = s.store.history(p, &c, &name, None, 20)?;
        Ok(Json(MeterDetail {
            customer_id: c.to_string(),
            meter: MeterView::new(&s.meters, &name, &m),
            grants: m.grants.clone(),
            recent_events,
        }))
    })
    .await
}

/// Query of the history endpoint.
#[derive(Debug, Deserialize)]
pub struct Page {
    /// Return movements with a version below this (the previous page's `next_cursor`).
    pub cursor: Option<String>,
    /// Page size (1-500, default 50).
    pub limit: Option<usize>,
}

/// `GET /v1/customers/{id}/meters/{meter}/events`: one page of movements, newest first.
#[derive(Debug, Serialize, Deserialize)]
pub struct MeterEvents {
    /// The customer.
    pub customer_id: String,
    /// The meter.
    pub meter: String,
    /// The movements of this page, newest first.
    pub events: Vec<BalanceChanged>,
    /// The `cursor` of the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

async fn meter_events(
    State(s): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Page>, QueryRejection>,
) -> Result<Json<MeterEvents>, ApiError> {
    let (Path((id, meter)), Query(q)) = (path?, query?);
    let c = customer(&id)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1-500".into()));
    }
    let before = q
        .cursor
        .map(|c| cursor::parse(&c).ok_or_else(|| ApiError::BadRequest("invalid cursor".into())))
        .transpose()?;
    blocking(move || {
        let (p, name, _) = find_meter(&s, &c, &meter)?;
        let events = s.store.history(p, &c, &name, before, limit)?;
        let next_cursor = if events.len() == limit {
            events.last().map(|e| cursor::encode(e.version))
        } else {
            None
        };
        Ok(Json(MeterEvents {
            customer_id: c.to_string(),
            meter: name.to_string(),
            events,
            next_cursor,
        }))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI_JSON).expect("docs/openapi.json is JSON");
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3."),
            "an OpenAPI 3 document"
        );
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut served = routes::ALL.to_vec();
        documented.sort_unstable();
        served.sort_unstable();
        assert_eq!(documented, served);
    }
}
