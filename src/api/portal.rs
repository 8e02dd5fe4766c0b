//! The customer portal: sessions (signed, customer-scoped tokens), the page, and top-up requests.
//!
//! A service creates a session with its API key (`POST /v1/portal-sessions`) and sends the
//! customer to the returned URL, `<public_url>/portal?token=...`. The page (plain HTML, CSS and JS
//! compiled into the binary, no external resources) keeps the token in the tab's session storage,
//! removes it from the address bar, and polls the customer's routes every second with it.
//!
//! **Top-up contract.** "Top up" posts `{pack, request_id}` (a fresh UUID per click) to
//! `POST /v1/customers/{id}/meters/{meter}/top-ups`; drawdown publishes a `TopUpRequested` to
//! `topics.top_up_requests` and answers 202. The billing system charges the pack, deduping on
//! `request_id`, and grants it on `credit-grants` with `grant_id = request_id`; drawdown ignores a
//! replayed grant id. The page shows the request as pending until a grant or a movement with that
//! id appears on the meter. A repeated `request_id` within [`DEDUPE_WINDOW`] is answered with the
//! original request and not published again.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::Principal;
use super::{customer, ApiError, ApiState};
use crate::clock::now_ms;
use crate::credentials::PortalClaims;
use crate::kafka::api_publisher::ApiPublisher;
use crate::ledger::{check_id, MeterName, TopUpRequested, TopUpSource};
use crate::ttl::Ttl;

/// How long a top-up `request_id` is remembered to answer retries without publishing again.
pub const DEDUPE_WINDOW: Duration = Duration::from_secs(600);
/// The most request ids remembered (the oldest are forgotten first).
const DEDUPE_MAX: usize = 100_000;
/// A session's length when the request names none.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

const INDEX_HTML: &str = include_str!("portal/index.html");
const APP_JS: &str = include_str!("portal/app.js");
const APP_CSS: &str = include_str!("portal/app.css");

/// The portal's settings and the top-up producer, shared by the handlers.
pub struct Portal {
    /// `api.public_url`, without a trailing slash.
    pub public_url: Option<String>,
    /// The listen address, the base of portal URLs when neither `public_url` nor `Host` is known.
    pub listen: String,
    /// `api.portal_max_ttl`.
    pub max_ttl: Duration,
    /// Publishes portal and API top-up requests.
    pub publisher: ApiPublisher,
    recent: tokio::sync::Mutex<Recent>,
}

impl Portal {
    /// The portal of this instance.
    pub fn new(
        public_url: Option<String>,
        listen: String,
        max_ttl: Duration,
        publisher: ApiPublisher,
    ) -> Self {
        Self {
            public_url: public_url.map(|u| u.trim_end_matches('/').to_string()),
            listen,
            max_ttl,
            publisher,
            recent: tokio::sync::Mutex::new(Recent::default()),
        }
    }
}

/// Recently published top-up requests, by (customer, request id).
#[derive(Default)]
struct Recent {
    by_key: HashMap<(String, String), TopUpRequested>,
    order: VecDeque<(Instant, (String, String))>,
}

impl Recent {
    fn prune(&mut self, now: Instant) {
        while let Some((at, key)) = self.order.front() {
            if now.duration_since(*at) < DEDUPE_WINDOW && self.order.len() <= DEDUPE_MAX {
                break;
            }
            self.by_key.remove(key);
            self.order.pop_front();
        }
    }
}

/// `POST /v1/portal-sessions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The customer the session may read.
    pub customer_id: String,
    /// Seconds (a number) or a duration (`"15m"`); default 1 h, at most `api.portal_max_ttl`.
    #[serde(default)]
    pub ttl: Option<Value>,
}

/// A portal session.
#[derive(Debug, Serialize, Deserialize)]
pub struct Session {
    /// The bearer token (`ddp1.` ...), for the portal page or a customer-side client.
    pub token: String,
    /// The portal page with the token.
    pub url: String,
    /// The customer it is scoped to.
    pub customer_id: String,
    /// Expiry, ms since the epoch.
    pub expires_at: i64,
}

fn ttl_of(v: Option<&Value>, max: Duration) -> Result<Duration, ApiError> {
    duration_of(v, DEFAULT_TTL.min(max), Duration::from_secs(1), max)
}

/// A `ttl` of a request body ([`Ttl`]: whole seconds, or a duration such as `"15m"`);
/// `default` when absent or null; between `min` and `max`.
pub(super) fn duration_of(
    v: Option<&Value>,
    default: Duration,
    min: Duration,
    max: Duration,
) -> Result<Duration, ApiError> {
    let seconds;
    let ttl = match v {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::Number(n)) => {
            seconds = n.to_string();
            Ttl::Seconds(&seconds)
        }
        Some(Value::String(s)) => Ttl::Text(s),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "ttl must be seconds or a duration such as \"15m\"".into(),
            ))
        }
    };
    ttl.within(min, max).map_err(ApiError::BadRequest)
}

/// The base URL of portal links: `public_url`, else the `Host` the request came to (the caller
/// is an authenticated service), else the listen address.
fn base_url(p: &Portal, headers: &HeaderMap) -> String {
    if let Some(u) = &p.public_url {
        return u.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    format!("http://{}", host.unwrap_or(&p.listen))
}

/// `POST /v1/portal-sessions` (API key): a token scoped to one customer, and its portal URL.
pub async fn create_session(
    State(s): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<SessionRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Session>), ApiError> {
    let Json(req) = body?;
    let signer = s.access.portal().ok_or_else(|| {
        ApiError::NotImplemented(
            "portal sessions are disabled on this instance (api.portal_secret is not set)".into(),
        )
    })?;
    let c = customer(&req.customer_id)?;
    let ttl = ttl_of(req.ttl.as_ref(), s.portal.max_ttl)?;
    let expires_at = now_ms() + ttl.as_millis() as i64;
    let token = signer.sign(&PortalClaims {
        customer: c.clone(),
        expires_at,
    });
    let url = format!("{}/portal?token={token}", base_url(&s.portal, &headers));
    Ok((
        StatusCode::CREATED,
        Json(Session {
            token,
            url,
            customer_id: c.to_string(),
            expires_at,
        }),
    ))
}

/// One meter as the portal offers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct PortalMeter {
    /// The meter.
    pub meter: String,
    /// The packs "Top up" may request.
    pub top_up_packs: Vec<String>,
    /// The automatic top-up, if configured.
    pub auto_top_up: Option<AutoTopUpView>,
}

/// A meter's automatic top-up.
#[derive(Debug, Serialize, Deserialize)]
pub struct AutoTopUpView {
    /// Requested when the balance crosses below this.
    pub below: Decimal,
    /// The pack requested.
    pub pack: String,
}

/// `GET /v1/portal-sessions/current`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CurrentSession {
    /// The customer of the token.
    pub customer_id: String,
    /// The token's expiry, ms since the epoch.
    pub expires_at: i64,
    /// The configured meters and their top-up packs.
    pub meters: Vec<PortalMeter>,
}

/// `GET /v1/portal-sessions/current` (portal token): whose session this is, and what it offers.
pub async fn current_session(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<CurrentSession>, ApiError> {
    let Principal::Portal(claims) = principal else {
        return Err(ApiError::Forbidden(
            "this route takes a portal token".into(),
        ));
    };
    let meters = s
        .meters
        .all()
        .iter()
        .map(|d| PortalMeter {
            meter: d.name.to_string(),
            top_up_packs: d.packs().into_iter().map(String::from).collect(),
            auto_top_up: d.auto_top_up.as_ref().map(|a| AutoTopUpView {
                below: a.below,
                pack: a.pack.clone(),
            }),
        })
        .collect();
    Ok(Json(CurrentSession {
        customer_id: claims.customer.to_string(),
        expires_at: claims.expires_at,
        meters,
    }))
}

/// `POST .../top-ups` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUpBody {
    /// One of the meter's packs; may be left out when it offers exactly one.
    #[serde(default)]
    pub pack: Option<String>,
    /// The idempotency key (e.g. a UUID per click); drawdown makes one when it is left out.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// `POST /v1/customers/{id}/meters/{meter}/top-ups` (portal token or API key): publishes a
/// `TopUpRequested` and answers 202 with it.
pub async fn request_top_up(
    State(s): State<ApiState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<TopUpBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path((id, meter)) = path?;
    let Json(body) = body?;
    let c = customer(&id)?;
    let name = MeterName::parse(meter).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let def = s
        .meters
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("meter {name} is not configured")))?;
    let packs = def.packs();
    let pack = match (body.pack, packs.as_slice()) {
        (_, []) => {
            return Err(ApiError::BadRequest(format!(
                "meter {name} offers no top-up packs"
            )))
        }
        (Some(p), _) if packs.contains(&p.as_str()) => p,
        (Some(p), _) => {
            return Err(ApiError::BadRequest(format!(
                "meter {name} has no pack {p:?} (offered: {})",
                packs.join(", ")
            )))
        }
        (None, [only]) => only.to_string(),
        (None, _) => {
            return Err(ApiError::BadRequest(format!(
                "choose a pack: {}",
                packs.join(", ")
            )))
        }
    };
    let request_id = match body.request_id {
        Some(r) => {
            check_id("request_id", &r).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            if r.starts_with("auto:") {
                return Err(ApiError::BadRequest(
                    "request ids starting with auto: are drawdown's own".into(),
                ));
            }
            r
        }
        None => uuid::Uuid::new_v4().to_string(),
    };
    let source = match principal {
        Principal::Portal(_) => TopUpSource::Portal,
        Principal::Service(_) => TopUpSource::Api,
    };
    let request = TopUpRequested {
        request_id,
        customer_id: c,
        meter: name,
        pack,
        requested_at: now_ms(),
        source,
        balance: None,
        threshold: None,
    };
    let key = (request.customer_id.to_string(), request.request_id.clone());
    // Held across the publish, so two concurrent retries of one request publish it once.
    let mut recent = s.portal.recent.lock().await;
    recent.prune(Instant::now());
    if let Some(original) = recent.by_key.get(&key) {
        return Ok((StatusCode::ACCEPTED, Json(original.clone())).into_response());
    }
    s.portal.publisher.publish(&request).await.map_err(|e| {
        tracing::warn!(error = %e, "top-up request not published");
        ApiError::Unavailable("the top-up request could not be published; retry".into())
    })?;
    metrics::counter!(
        crate::metrics::TOP_UP_REQUESTS,
        "source" => crate::codec::top_up_source_label(source)
    )
    .increment(1);
    recent.order.push_back((Instant::now(), key.clone()));
    recent.by_key.insert(key, request.clone());
    Ok((StatusCode::ACCEPTED, Json(request)).into_response())
}

fn static_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 5] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ]
}

/// `GET /portal`: the page (it reads the token from its own URL).
pub async fn page() -> Response {
    (
        static_headers("text/html; charset=utf-8"),
        [(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )],
        INDEX_HTML,
    )
        .into_response()
}

/// `GET /portal/{asset}`: the page's script and style sheet.
pub async fn asset(path: Result<Path<String>, PathRejection>) -> Result<Response, ApiError> {
    let Path(name) = path?;
    let (body, ctype) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return Err(ApiError::NotFound(format!("no portal asset {name}"))),
    };
    Ok((static_headers(ctype), body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_lengths_are_bounded() {
        let max = Duration::from_secs(7200);
        assert_eq!(ttl_of(None, max).unwrap(), Duration::from_secs(3600));
        assert_eq!(
            ttl_of(None, Duration::from_secs(60)).unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            ttl_of(Some(&serde_json::json!(90)), max).unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            ttl_of(Some(&serde_json::json!("15m")), max).unwrap(),
            Duration::from_secs(900)
        );
        let whole: serde_json::Value = serde_json::from_str("312.0").unwrap();
        assert_eq!(ttl_of(Some(&whole), max).unwrap(), Duration::from_secs(312));
        for bad in [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!("3h"),
            serde_json::json!("soon"),
            serde_json::json!([]),
        ] {
            assert!(ttl_of(Some(&bad), max).is_err(), "{bad}");
        }
    }
}
