//! Access control: who may call which route.
//!
//! Every `/v1` route takes `Authorization: Bearer <credential>`, where the credential is either a
//! service's **API key** (any route, any customer) or a customer's **portal token** (only that
//! customer's state, meters, history, checks and top-ups, plus `GET /v1/portal-sessions/current`).
//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and the portal page itself (which holds no
//! data; it calls the API with the token) are open.
//!
//! | credential | customer routes | `POST /v1/portal-sessions`, `POST /v1/checks` | `GET /v1/portal-sessions/current` |
//! |---|---|---|---|
//! | none, or not a key / valid token | 401 | 401 | 401 |
//! | expired portal token | 401 | 401 | 401 |
//! | API key | any customer | yes | 403 |
//! | portal token for customer A | A only; others 403 | 403 | yes |
//!
//! With no keys configured and `api.allow_unauthenticated = true` (local development), a request
//! without a portal token is let in as an anonymous service; a portal token is still checked and
//! scoped. Errors never name another customer or say whether it exists. Forwarded requests carry
//! the `Authorization` header unchanged and are checked again by the instance that answers.

use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{routes, ApiError, ApiState};
use crate::config::ApiConfig;
use crate::credentials::{ApiKeys, PortalClaims, PortalSigner, TokenError, PORTAL_TOKEN_PREFIX};

/// Who is calling, as established by [`authorize`] (a request extension for the handlers).
#[derive(Clone, Debug)]
pub enum Principal {
    /// A service: the name of its API key (`anonymous` when the API is open).
    Service(String),
    /// A customer's portal session.
    Portal(PortalClaims),
}

/// The credentials the API accepts.
#[derive(Debug)]
pub struct Access {
    keys: ApiKeys,
    open: bool,
    portal: Option<PortalSigner>,
}

impl Access {
    /// From `[api]` (already checked by [`ApiConfig::check_access`]).
    pub fn new(cfg: &ApiConfig) -> Result<Self, String> {
        let keys = ApiKeys::new(&cfg.keys)?;
        Ok(Self {
            open: keys.is_empty() && cfg.allow_unauthenticated,
            keys,
            portal: cfg
                .portal_secret
                .as_ref()
                .map(|s| PortalSigner::new(s.as_bytes())),
        })
    }

    /// The portal token signer, when portal sessions are enabled (`api.portal_secret`).
    pub fn portal(&self) -> Option<&PortalSigner> {
        self.portal.as_ref()
    }

    /// Whether the API lets requests without credentials in (no keys, explicit opt-out).
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Who presents `authorization` at `now` (ms).
    pub fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
        now: i64,
    ) -> Result<Principal, ApiError> {
        let anonymous = || Principal::Service("anonymous".into());
        let Some(value) = authorization else {
            return if self.open {
                Ok(anonymous())
            } else {
                Err(ApiError::Unauthorized {
                    message:
                        "missing credentials: send Authorization: Bearer <API key or portal token>"
                            .into(),
                    token_presented: false,
                })
            };
        };
        let invalid = |message: &str| ApiError::Unauthorized {
            message: message.into(),
            token_presented: true,
        };
        let credential = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(|| invalid("the Authorization header must be: Bearer <credential>"))?;
        if credential.starts_with(PORTAL_TOKEN_PREFIX) {
            let signer = self
                .portal
                .as_ref()
                .ok_or_else(|| invalid("invalid portal token"))?;
            return match signer.verify(credential, now) {
                Ok(claims) => Ok(Principal::Portal(claims)),
                Err(TokenError::Expired) => Err(invalid("portal token expired")),
                Err(TokenError::Invalid) => Err(invalid("invalid portal token")),
            };
        }
        if let Some(name) = self.keys.verify(credential) {
            return Ok(Principal::Service(name.to_string()));
        }
        if self.open {
            return Ok(anonymous());
        }
        Err(invalid("invalid API key"))
    }
}

/// Whether `principal` may call `route` (with these path parameters).
fn permit(route: &str, params: &RawPathParams, principal: &Principal) -> Result<(), ApiError> {
    match principal {
        Principal::Service(_) if route == routes::PORTAL_SESSION => Err(ApiError::Forbidden(
            "this route takes a portal token".into(),
        )),
        Principal::Service(_) => Ok(()),
        Principal::Portal(_) if route == routes::PORTAL_SESSION => Ok(()),
        Principal::Portal(_) if route == routes::PORTAL_SESSIONS => Err(ApiError::Forbidden(
            "creating portal sessions takes an API key".into(),
        )),
        Principal::Portal(_) if route == routes::CHECKS => {
            Err(ApiError::Forbidden("batch checks take an API key".into()))
        }
        Principal::Portal(_) if route == routes::RESERVATIONS || route == routes::RESERVATION => {
            Err(ApiError::Forbidden("reservations take an API key".into()))
        }
        Principal::Portal(claims) => {
            let id = params.iter().find(|(k, _)| *k == "id").map(|(_, v)| v);
            if id == Some(claims.customer.as_str()) {
                Ok(())
            } else {
                Err(ApiError::Forbidden(
                    "this portal token does not grant access to that customer".into(),
                ))
            }
        }
    }
}

/// Middleware on the `/v1` routes: authenticate, authorise, and hand the [`Principal`] on.
pub async fn authorize(
    State(s): State<ApiState>,
    matched: MatchedPath,
    params: RawPathParams,
    mut req: Request,
    next: Next,
) -> Response {
    let now = crate::clock::now_ms();
    let principal = match s
        .access
        .authenticate(req.headers().get(AUTHORIZATION), now)
        .and_then(|p| permit(matched.as_str(), &params, &p).map(|()| p))
    {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Principal::Service(name) = &principal {
        tracing::debug!(key = %name, route = matched.as_str(), "service request");
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;
    use crate::credentials::hash_key;
    use crate::ledger::CustomerId;

    fn cfg(keys: &[&str], open: bool) -> ApiConfig {
        ApiConfig {
            keys: keys
                .iter()
                .map(|k| ApiKey {
                    name: format!("key-{k}"),
                    sha256: hash_key(k),
                })
                .collect(),
            allow_unauthenticated: open,
            portal_secret: Some("s".repeat(32)),
            ..ApiConfig::default()
        }
    }

    fn bearer(v: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {v}")).unwrap()
    }

    fn status(r: Result<Principal, ApiError>) -> String {
        match r {
            Ok(Principal::Service(n)) => format!("service {n}"),
            Ok(Principal::Portal(c)) => format!("portal {}", c.customer),
            Err(e) => format!("{}", e.into_response().status().as_u16()),
        }
    }

    #[test]
    fn keys_and_tokens_are_told_apart() {
        let a = Access::new(&cfg(&["k1"], false)).unwrap();
        let token = a.portal().unwrap().sign(&PortalClaims {
            customer: CustomerId::parse("cus_a").unwrap(),
            expires_at: 10_000,
        });
        assert_eq!(status(a.authenticate(None, 0)), "401");
        assert_eq!(
            status(a.authenticate(Some(&bearer("k1")), 0)),
            "service key-k1"
        );
        assert_eq!(status(a.authenticate(Some(&bearer("k2")), 0)), "401");
        let basic = HeaderValue::from_static("Basic azE=");
        assert_eq!(status(a.authenticate(Some(&basic), 0)), "401");
        assert_eq!(
            status(a.authenticate(Some(&bearer(&token)), 0)),
            "portal cus_a"
        );
        assert_eq!(status(a.authenticate(Some(&bearer(&token)), 10_000)), "401");
    }

    #[test]
    fn an_open_api_still_checks_portal_tokens() {
        let a = Access::new(&cfg(&[], true)).unwrap();
        assert!(a.is_open());
        assert_eq!(status(a.authenticate(None, 0)), "service anonymous");
        assert_eq!(
            status(a.authenticate(Some(&bearer("anything")), 0)),
            "service anonymous"
        );
        assert_eq!(status(a.authenticate(Some(&bearer("ddp1.x.y")), 0)), "401");
        let keyed = Access::new(&cfg(&["k1"], true)).unwrap();
        assert!(!keyed.is_open(), "keys configured: always required");
        assert_eq!(status(keyed.authenticate(None, 0)), "401");
    }
}
