//! Access control, portal sessions and top-up requests, against the real broker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The test meters, with top-up packs and an automatic top-up on `api_calls`.
const PORTAL_METERS: &str = r#"
[[meters]]
name = "api_calls"
event = "api_call"
aggregation = { type = "count" }
on_exhausted = "overage"
top_up_packs = ["calls-100", "calls-1000"]
auto_top_up = { below = "5", pack = "calls-100" }

[[meters]]
name = "tokens"
event = "llm_completion"
aggregation = { type = "sum", property = "tokens" }
on_exhausted = "block"
top_up_packs = ["tokens-10k"]
"#;

async fn portal_app() -> TestApp {
    let names = Names::new();
    let cfg = names.config_with(PORTAL_METERS, &[]);
    spawn_app_with(&names, cfg).await
}

/// A request with an optional bearer credential: (status, body, www-authenticate).
async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req = reqwest::Client::new().request(method, format!("{}{}", app.base, path));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body, challenge)
}

async fn get(app: &TestApp, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let (s, b, _) = call(app, reqwest::Method::GET, path, bearer, None).await;
    (s, b)
}

/// A portal session for `customer` (with the API key), returning the token.
async fn session(app: &TestApp, customer: &str, ttl: Value) -> String {
    let (status, body, _) = call(
        app,
        reqwest::Method::POST,
        "/v1/portal-sessions",
        Some(API_KEY),
        Some(json!({"customer_id": customer, "ttl": ttl})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_string()
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_api_key_are_refused() {
    let app = portal_app().await;
    app.grants(&[grant("acme", "g1", "api_calls", "10")]);
    app.meter_until("acme", "api_calls", |b| b["credited"] == "10")
        .await;
    for path in [
        "/v1/customers/acme/state",
        "/v1/customers/acme/meters/api_calls",
        "/v1/customers/acme/meters/api_calls/events",
    ] {
        // No key.
        let (status, body, challenge) = call(&app, reqwest::Method::GET, path, None, None).await;
        assert_eq!(status, 401, "{path}");
        assert_error(&body, "unauthorized");
        assert_eq!(challenge.as_deref(), Some(r#"Bearer realm="drawdown""#));
        assert!(
            !body.to_string().contains("acme"),
            "nothing about the customer"
        );
        // A wrong key, a key hash instead of the key, another scheme.
        let hash = drawdown::credentials::hash_key(API_KEY);
        for wrong in ["not-the-key", hash.as_str()] {
            let (status, body, challenge) =
                call(&app, reqwest::Method::GET, path, Some(wrong), None).await;
            assert_eq!(status, 401, "{path} {wrong}");
            assert_error(&body, "unauthorized");
            assert!(challenge.unwrap().contains("invalid_token"));
            assert!(!body.to_string().contains("acme"));
        }
        let r = reqwest::Client::new()
            .get(format!("{}{path}", app.base))
            .basic_auth("acme", Some(API_KEY))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "Basic is not Bearer");
        // Both configured keys (rotation) work.
        for key in [API_KEY, API_KEY_2] {
            let (status, body) = get(&app, path, Some(key)).await;
            assert_eq!(status, 200, "{path}: {body}");
        }
    }
    // Unknown customers look the same as any other to a service, and are not revealed to others.
    let (status, _) = get(&app, "/v1/customers/nobody/state", None).await;
    assert_eq!(status, 401);
    let (status, _) = get(&app, "/v1/customers/nobody/state", Some(API_KEY)).await;
    assert_eq!(status, 404);
    // Creating sessions and requesting top-ups need credentials too.
    let (status, body, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/portal-sessions",
        None,
        Some(json!({"customer_id": "acme"})),
    )
    .await;
    assert_eq!(status, 401);
    assert_error(&body, "unauthorized");
    let (status, _, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/customers/acme/meters/api_calls/top-ups",
        Some("not-the-key"),
        Some(json!({"pack": "calls-100"})),
    )
    .await;
    assert_eq!(status, 401);
    // Health, readiness, metrics, the OpenAPI document and the portal page stay open.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/portal",
        "/portal/app.js",
        "/portal/app.css",
    ] {
        let (status, _) = get(&app, path, None).await;
        assert_eq!(status, 200, "{path}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_token_reads_only_its_own_customer() {
    let app = portal_app().await;
    app.grants(&[
        grant("cus-a", "g1", "api_calls", "10"),
        grant("cus-b", "g1", "api_calls", "20"),
    ]);
    app.meter_until("cus-b", "api_calls", |b| b["credited"] == "20")
        .await;
    app.meter_until("cus-a", "api_calls", |b| b["credited"] == "10")
        .await;
    let (status, body, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/portal-sessions",
        Some(API_KEY),
        Some(json!({"customer_id": "cus-a", "ttl": "10m"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap();
    assert!(token.starts_with("ddp1."));
    assert_eq!(body["customer_id"], "cus-a");
    assert_eq!(
        body["url"].as_str().unwrap(),
        format!("{}/portal?token={token}", app.base)
    );
    let expires = body["expires_at"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((expires - now - 600_000).abs() < 60_000, "about 10 min");

    for path in [
        "/v1/customers/cus-a/state",
        "/v1/customers/cus-a/meters/api_calls",
        "/v1/customers/cus-a/meters/api_calls/events?limit=5",
    ] {
        let (status, body) = get(&app, path, Some(token)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.to_string().contains("cus-b"));
    }
    for path in [
        "/v1/customers/cus-b/state",
        "/v1/customers/cus-b/meters/api_calls",
        "/v1/customers/cus-b/meters/api_calls/events",
        "/v1/customers/nobody/state",
    ] {
        let (status, body) = get(&app, path, Some(token)).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert_error(&body, "forbidden");
        let text = body.to_string();
        assert!(
            !text.contains("cus-b") && !text.contains("nobody") && !text.contains("20"),
            "nothing about the other customer: {text}"
        );
    }
    let (status, body, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/customers/cus-b/meters/api_calls/top-ups",
        Some(token),
        Some(json!({"pack": "calls-100"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // A portal token cannot mint sessions; the session route tells the page who it is.
    let (status, body, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/portal-sessions",
        Some(token),
        Some(json!({"customer_id": "cus-b"})),
    )
    .await;
    assert_eq!(status, 403);
    assert_error(&body, "forbidden");
    let (status, me) = get(&app, "/v1/portal-sessions/current", Some(token)).await;
    assert_eq!(status, 200);
    assert_eq!(me["customer_id"], "cus-a");
    assert_eq!(me["expires_at"].as_i64(), Some(expires));
    assert_eq!(me["meters"][0]["meter"], "api_calls");
    assert_eq!(
        me["meters"][0]["top_up_packs"],
        json!(["calls-100", "calls-1000"])
    );
    assert_eq!(me["meters"][0]["auto_top_up"]["below"], "5");
    let (status, _) = get(&app, "/v1/portal-sessions/current", Some(API_KEY)).await;
    assert_eq!(status, 403, "the session route takes a portal token");
    // Bad session requests.
    for bad in [
        json!({"customer_id": ""}),
        json!({"customer_id": "cus-a", "ttl": 0}),
        json!({"customer_id": "cus-a", "ttl": "400days"}),
        json!({"customer_id": "cus-a", "extra": 1}),
    ] {
        let (status, body, _) = call(
            &app,
            reqwest::Method::POST,
            "/v1/portal-sessions",
            Some(API_KEY),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_error(&body, "bad_request");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_tampered_portal_tokens_are_refused() {
    let app = portal_app().await;
    app.grants(&[grant("cus-t", "g1", "api_calls", "10")]);
    app.meter_until("cus-t", "api_calls", |b| b["credited"] == "10")
        .await;
    let path = "/v1/customers/cus-t/state";
    let short = session(&app, "cus-t", json!(1)).await;
    let (status, _) = get(&app, path, Some(&short)).await;
    assert_eq!(status, 200, "valid while it lasts");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let (status, body, challenge) =
        call(&app, reqwest::Method::GET, path, Some(&short), None).await;
    assert_eq!(status, 401);
    assert_error(&body, "unauthorized");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert!(challenge.unwrap().contains("invalid_token"));

    let token = session(&app, "cus-t", json!("5m")).await;
    // Claims changed (another customer, a later expiry) under the original signature.
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let forged = drawdown::credentials::PortalSigner::new(b"some other secret of 32 bytes or more")
        .sign(&drawdown::credentials::PortalClaims {
            customer: drawdown::ledger::CustomerId::parse("cus-t").unwrap(),
            expires_at: i64::MAX,
        });
    let (forged_signed, forged_sig) = forged.rsplit_once('.').unwrap();
    let mut flipped = signed.to_string().into_bytes();
    let i = flipped.len() - 3;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    for bad in [
        format!("{forged_signed}.{sig}"),
        format!("{signed}.{forged_sig}"),
        forged.clone(),
        format!("{flipped}.{sig}"),
        format!("{signed}.{}", &sig[1..]),
        format!("{token}x"),
        "ddp1.e30.AAAA".to_string(),
    ] {
        let (status, body) = get(&app, path, Some(&bad)).await;
        assert_eq!(status, 401, "{bad}: {body}");
        assert_error(&body, "unauthorized");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid"));
    }
    let (status, _) = get(&app, path, Some(&token)).await;
    assert_eq!(status, 200, "the untouched token still works");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_request_is_published_once_per_request_id() {
    let app = portal_app().await;
    app.grants(&[grant("cus-p", "g1", "api_calls", "50")]);
    app.meter_until("cus-p", "api_calls", |b| b["credited"] == "50")
        .await;
    let token = session(&app, "cus-p", json!(600)).await;
    let path = "/v1/customers/cus-p/meters/api_calls/top-ups";
    let body = json!({"pack": "calls-1000", "request_id": "7d1c2a44-0b5e-4d8a-9f57-2f1d9d0c6a11"});
    let (status, first, _) = call(
        &app,
        reqwest::Method::POST,
        path,
        Some(&token),
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(first["request_id"], body["request_id"]);
    assert_eq!(first["customer_id"], "cus-p");
    assert_eq!(first["meter"], "api_calls");
    assert_eq!(first["pack"], "calls-1000");
    assert_eq!(first["source"], "portal");
    // A retry of the same click: the same answer, nothing published again.
    let (status, again, _) =
        call(&app, reqwest::Method::POST, path, Some(&token), Some(body)).await;
    assert_eq!(status, 202);
    assert_eq!(again, first);
    // A service may ask too; without a request id, drawdown makes one; one pack needs no name.
    let (status, by_api, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/customers/cus-p/meters/tokens/top-ups",
        Some(API_KEY),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 202, "{by_api}");
    assert_eq!(by_api["source"], "api");
    assert_eq!(by_api["pack"], "tokens-10k");
    assert_eq!(by_api["request_id"].as_str().unwrap().len(), 36, "a UUID");
    // Refused: an unknown pack, no pack where there is a choice, a meter without packs,
    // drawdown's own id prefix.
    for (meter, bad) in [
        ("api_calls", json!({"pack": "calls-1"})),
        ("api_calls", json!({})),
        (
            "api_calls",
            json!({"pack": "calls-100", "request_id": "auto:x"}),
        ),
        ("api_calls", json!({"pack": "calls-100", "request_id": ""})),
        ("api_calls", json!({"pack": "calls-100", "surprise": true})),
    ] {
        let (status, body, _) = call(
            &app,
            reqwest::Method::POST,
            &format!("/v1/customers/cus-p/meters/{meter}/top-ups"),
            Some(&token),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_error(&body, "bad_request");
    }
    let (status, body, _) = call(
        &app,
        reqwest::Method::POST,
        "/v1/customers/cus-p/meters/nope/top-ups",
        Some(&token),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let topic = app.cfg.topics.top_up_requests.clone();
    let recs = read_until(&topic, |r| r.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = read_until(&topic, |r| r.len() >= recs.len()).await;
    assert_eq!(recs.len(), 2, "one record per request id");
    let (key, payload, headers) = recs
        .iter()
        .find(|(_, p, _)| serde_json::from_slice::<Value>(p).unwrap()["source"] == "portal")
        .unwrap();
    assert_eq!(key, "cus-p");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        headers["request-id"],
        "7d1c2a44-0b5e-4d8a-9f57-2f1d9d0c6a11"
    );
    let v: Value = serde_json::from_slice(payload).unwrap();
    assert_eq!(v, first, "the answer is the published record");
    assert!(v["requested_at"].as_i64().unwrap() > 1_700_000_000_000);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_top_up_fires_exactly_once_per_crossing() {
    let app = portal_app().await;
    let topic = app.cfg.topics.top_up_requests.clone();
    app.grants(&[grant("cus-auto", "g1", "api_calls", "10")]);
    app.meter_until("cus-auto", "api_calls", |b| b["credited"] == "10")
        .await;
    let calls = |from: usize, n: usize| -> Vec<Value> {
        (from..from + n)
            .map(|i| api_call("cus-auto", &format!("e{i}")))
            .collect()
    };
    // 10 -> 5: at the threshold, not below it.
    app.usage(&calls(0, 5));
    app.meter_until("cus-auto", "api_calls", |b| b["balance"] == "5")
        .await;
    // 5 -> 4 crosses; 4 -> 0 -> -2 (and a replayed event) do not cross again.
    app.usage(&calls(5, 1));
    app.usage(&calls(6, 6));
    app.usage(&calls(6, 1));
    let m = app
        .meter_until("cus-auto", "api_calls", |b| b["balance"] == "-2")
        .await;
    let crossing_version = m["version"].as_u64().unwrap() - 6;
    let recs = read_until(&topic, |r| !r.is_empty()).await;
    assert_eq!(recs.len(), 1, "exactly one request for the crossing");
    let first: Value = serde_json::from_slice(&recs[0].1).unwrap();
    assert_eq!(recs[0].0, "cus-auto");
    assert_eq!(
        first["request_id"],
        format!("auto:cus-auto:api_calls:{crossing_version}")
    );
    assert_eq!(
        recs[0].2["request-id"],
        first["request_id"].as_str().unwrap()
    );
    assert_eq!(first["source"], "auto");
    assert_eq!(first["pack"], "calls-100");
    assert_eq!(first["balance"], "4");
    assert_eq!(first["threshold"], "5");
    // The billing system grants the pack with grant_id = request_id, twice (a replay): once.
    let id = first["request_id"].as_str().unwrap();
    app.grants(&[
        grant("cus-auto", id, "api_calls", "100"),
        grant("cus-auto", id, "api_calls", "100"),
    ]);
    app.meter_until("cus-auto", "api_calls", |b| b["balance"] == "98")
        .await;
    // Re-armed: 98 -> 4 crosses again, once.
    app.usage(&calls(100, 94));
    app.meter_until("cus-auto", "api_calls", |b| b["balance"] == "4")
        .await;
    app.usage(&calls(200, 3));
    app.meter_until("cus-auto", "api_calls", |b| b["balance"] == "1")
        .await;
    let recs = read_until(&topic, |r| r.len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = read_until(&topic, |r| r.len() >= recs.len()).await;
    assert_eq!(recs.len(), 2, "exactly once per crossing");
    let second: Value = serde_json::from_slice(&recs[1].1).unwrap();
    assert_ne!(second["request_id"], first["request_id"]);
    assert_eq!(second["balance"], "4");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_served_on_their_own_port() {
    let names = Names::new();
    let cfg = names.config_with(
        PORTAL_METERS,
        &[("DRAWDOWN__API__METRICS_LISTEN", "127.0.0.1:0")],
    );
    let app = drawdown::app::Application::build(cfg).await.unwrap();
    let (base, metrics) = (
        format!("http://{}", app.addr()),
        format!("http://{}", app.metrics_addr().unwrap()),
    );
    let shutdown = app.shutdown_handle();
    let task = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("drawdown_build_info"));
    let r = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "not on the API port");
    let r = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    shutdown.trigger();
    task.await.unwrap().unwrap();
}
