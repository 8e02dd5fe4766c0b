//! Routing a customer request to the instance that serves the customer's partition.
//!
//! Requests are **forwarded** (proxied), not redirected: clients (services, the portal page)
//! then need to reach only one address (a Service or load balancer), credentials are passed on
//! unchanged, and a client never sees internal instance addresses. A forwarded request carries
//! `x-drawdown-forwarded-by`; an instance that receives one for a partition it does not serve
//! answers 503 instead of forwarding again, so a request hops at most once. The answer is either
//! from the partition's current owner (which serves only restored, committed state) or a 503 with
//! `Retry-After`: never stale local state presented as current.

use axum::body::Body;
use axum::extract::{RawPathParams, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ApiState;
use crate::kafka::directory::Announcement;
use crate::kafka::partition_for;
use crate::ledger::CustomerId;

/// The header marking a forwarded request (its value: the forwarding instance).
pub const FORWARDED_BY: &str = "x-drawdown-forwarded-by";
/// The header naming the instance that answered.
pub const SERVED_BY: &str = "x-drawdown-served-by";

fn unavailable(p: i32, why: &str) -> Response {
    let body = Json(
        json!({"error": {"code": "unavailable", "message": format!("partition {p} {why}; retry shortly")}}),
    );
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// Where a request for a partition is answered.
pub(super) enum Target {
    /// Here: this instance serves the partition.
    Here,
    /// By its owner, another instance.
    Owner(Announcement),
    /// Nowhere now (why, for the message): retry.
    Unavailable(&'static str),
}

/// Where a request for partition `p` is answered; `forwarded`: it was forwarded to us already
/// (so it is never forwarded again).
pub(super) fn target(s: &ApiState, p: i32, forwarded: bool) -> Target {
    if s.status.serves(p) {
        return Target::Here;
    }
    if forwarded {
        return Target::Unavailable("is moving between instances");
    }
    match s
        .directory
        .owner(p)
        .filter(|o| o.instance_id != s.instance_id)
    {
        Some(owner) => Target::Owner(owner),
        None => Target::Unavailable("has no ready owner (rebalance or restore in progress)"),
    }
}

/// Middleware on the customer routes: serve locally, forward to the owner, or 503.
pub async fn route(
    State(s): State<ApiState>,
    params: RawPathParams,
    req: Request,
    next: Next,
) -> Response {
    let Some(id) = params
        .iter()
        .find(|(k, _)| *k == "id")
        .map(|(_, v)| v.to_owned())
    else {
        return next.run(req).await;
    };
    let Ok(customer) = CustomerId::parse(id) else {
        return next.run(req).await; // the handler answers 400
    };
    let p = partition_for(customer.as_str().as_bytes(), s.partitions);
    let owner = match target(&s, p, req.headers().contains_key(FORWARDED_BY)) {
        Target::Here => {
            let mut resp = next.run(req).await;
            if let Ok(v) = HeaderValue::from_str(&s.instance_id) {
                resp.headers_mut().insert(SERVED_BY, v);
            }
            return resp;
        }
        Target::Unavailable(why) => return unavailable(p, why),
        Target::Owner(owner) => owner,
    };
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let url = format!("{}{}", owner.api_url.trim_end_matches('/'), path);
    let mut fwd = s
        .http
        .request(req.method().clone(), &url)
        .header(FORWARDED_BY, s.instance_id.as_str());
    for (k, v) in req.headers() {
        if k == "host" || k == "content-length" {
            continue;
        }
        fwd = fwd.header(k, v);
    }
    let body = match axum::body::to_bytes(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response(),
    };
    match fwd.body(body).send().await {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut out = Response::builder().status(status);
            for (k, v) in r.headers() {
                if k == "transfer-encoding" || k == "connection" || k == "content-length" {
                    continue;
                }
                out = out.header(k, v);
            }
            let bytes = r.bytes().await.unwrap_or_default();
            out.body(Body::from(bytes))
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, owner = %owner.instance_id, "forwarding failed");
            unavailable(p, "owner unreachable")
        }
    }
}
