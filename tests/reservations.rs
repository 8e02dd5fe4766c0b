//! Reservations through the real pipeline: commands on `credit-grants`, usage that settles them,
//! `balance-changed` with `reserved` and `available`.

mod common;

use common::*;
use drawdown::clock::now_ms;
use serde_json::{json, Value};

fn reserve(customer: &str, id: &str, units: &str, ttl: Value) -> Value {
    json!({"type": "reserve", "reservation_id": id, "customer_id": customer, "meter": "tokens",
           "units": units, "ttl": ttl})
}

fn settle(customer: &str, id: &str, tokens: u32, reservation: &str) -> Value {
    json!({"id": id, "customer_id": customer, "name": "llm_completion", "timestamp": now_ms(),
           "properties": {"tokens": tokens, "model": "small"}, "reservation_id": reservation})
}

/// (reason, delta, balance, reserved, available) of `customer`'s `tokens` changes, in order.
fn changes(app: &TestApp, customer: &str) -> Vec<(String, String, String, String, String)> {
    let mut out: Vec<(u64, Value)> = app
        .read_all(&app.cfg.topics.balance_changed)
        .into_iter()
        .filter(|(k, _, _)| k == customer)
        .map(|(_, v, _)| serde_json::from_slice::<Value>(&v).unwrap())
        .filter(|v| v["meter"] == "tokens")
        .map(|v| (v["version"].as_u64().unwrap(), v))
        .collect();
    out.sort_by_key(|(version, _)| *version);
    out.into_iter()
        .map(|(_, v)| {
            let s = |f: &str| v[f].as_str().unwrap().to_string();
            (
                s("reason"),
                s("delta"),
                s("balance"),
                s("reserved"),
                s("available"),
            )
        })
        .collect()
}

fn row(
    reason: &str,
    delta: &str,
    balance: &str,
    reserved: &str,
    available: &str,
) -> (String, String, String, String, String) {
    (
        reason.into(),
        delta.into(),
        balance.into(),
        reserved.into(),
        available.into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_settle_release_and_expire_through_the_pipeline() {
    let app = spawn_app(&Names::new()).await;
    app.grants(&[grant("r1c", "g1", "tokens", "100")]);
    app.meter_until("r1c", "tokens", |b| b["credited"] == "100")
        .await;
    // Hold 30: the balance stays, available drops.
    app.grants(&[reserve("r1c", "job-1", "30", json!("10m"))]);
    let m = app
        .meter_until("r1c", "tokens", |b| b["reserved"] == "30")
        .await;
    assert_eq!(
        (m["balance"].as_str(), m["available"].as_str()),
        (Some("100"), Some("70"))
    );
    // The same id again, with other units: the first answer stands.
    app.grants(&[reserve("r1c", "job-1", "99", json!(60))]);
    // Settled with less than it held (20): the rest is free again.
    app.usage(&[settle("r1c", "e1", 20, "job-1")]);
    app.meter_until("r1c", "tokens", |b| b["consumed"] == "20")
        .await;
    // Hold 50 and settle with more (60): nobody else holds anything, so all 60 are drawn.
    app.grants(&[reserve("r1c", "job-2", "50", json!(600))]);
    app.meter_until("r1c", "tokens", |b| b["reserved"] == "50")
        .await;
    app.usage(&[settle("r1c", "e2", 60, "job-2")]);
    app.meter_until("r1c", "tokens", |b| b["consumed"] == "80")
        .await;
    // Hold 10 and release it.
    app.grants(&[reserve("r1c", "job-3", "10", json!("1h"))]);
    app.meter_until("r1c", "tokens", |b| b["reserved"] == "10")
        .await;
    app.grants(&[json!({"type": "release", "reservation_id": "job-3", "customer_id": "r1c"})]);
    app.meter_until("r1c", "tokens", |b| {
        b["reserved"] == "0" && b["version"] == 7
    })
    .await;
    // Hold 5 for 2 s: it ends by itself, in stream time (grace 1 s in the tests).
    app.grants(&[reserve("r1c", "job-4", "5", json!("2s"))]);
    app.meter_until("r1c", "tokens", |b| b["reserved"] == "5")
        .await;
    let m = app
        .meter_until("r1c", "tokens", |b| {
            b["reserved"] == "0" && b["version"] == 9
        })
        .await;
    assert_eq!(
        (m["balance"].as_str(), m["available"].as_str()),
        (Some("20"), Some("20"))
    );
    let topic = app.cfg.topics.balance_changed.clone();
    read_until(&topic, |r| {
        r.iter().filter(|(k, _, _)| k == "r1c").count() >= 10
    })
    .await;
    assert_eq!(
        changes(&app, "r1c"),
        [
            row("grant", "100", "100", "0", "100"),
            row("reserved", "0", "100", "30", "70"),
            row("settled", "-20", "80", "0", "80"),
            row("reserved", "0", "80", "50", "30"),
            row("settled", "-60", "20", "0", "20"),
            row("reserved", "0", "20", "10", "10"),
            row("released", "0", "20", "0", "20"),
            row("reserved", "0", "20", "5", "15"),
            row("reservation_expired", "0", "20", "0", "20"),
        ]
    );
    // Nothing went to the dead-letter topic: a repeated reservation id is no error.
    assert!(app
        .read_all(&app.cfg.topics.dlq)
        .iter()
        .all(|(k, _, _)| k != "r1c"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_meter_keeps_held_units_from_plain_usage_and_bad_commands_are_dead_lettered() {
    let app = spawn_app(&Names::new()).await;
    app.grants(&[grant("r2c", "g1", "tokens", "100")]);
    app.meter_until("r2c", "tokens", |b| b["credited"] == "100")
        .await;
    app.grants(&[reserve("r2c", "job-1", "80", json!(600))]);
    app.meter_until("r2c", "tokens", |b| b["reserved"] == "80")
        .await;
    // Plain usage of 50: only the 20 nobody holds are drawn, 30 are blocked.
    app.usage(&[
        json!({"id": "e1", "customer_id": "r2c", "name": "llm_completion",
        "timestamp": now_ms(), "properties": {"tokens": 50, "model": "small"}}),
    ]);
    let m = app
        .meter_until("r2c", "tokens", |b| b["blocked"] == "30")
        .await;
    assert_eq!(
        (m["balance"].as_str(), m["available"].as_str()),
        (Some("80"), Some("0"))
    );
    // More than is available is refused on a block meter: nothing changes.
    app.grants(&[
        reserve("r2c", "job-2", "1", json!(600)),
        json!({"type": "release", "reservation_id": "nope", "customer_id": "r2c"}),
        reserve("r2c", "job-3", "0", json!(600)),
        reserve("r2c", "job-4", "1", json!("8d")),
    ]);
    let dlq = app.cfg.topics.dlq.clone();
    let recs = read_until(&dlq, |r| {
        r.iter().filter(|(k, _, _)| k == "r2c").count() >= 3
    })
    .await;
    let mut reasons: Vec<String> = recs
        .iter()
        .filter(|(k, _, _)| k == "r2c")
        .map(|(_, _, h)| h["error.reason"].clone())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["invalid_amount", "reservation_unknown", "wrong_type"]
    );
    let m = app
        .meter_until("r2c", "tokens", |b| b["reserved"] == "80")
        .await;
    assert_eq!(m["version"], 3, "the refused reservation changed nothing");
    app.stop().await;
}

async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = app.http.request(method, format!("{}{}", app.base, path));
    if let Some(b) = body {
        req = req.json(&b);
    }
    answer(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_routes_answer_after_the_commit_and_repeat_the_first_answer() {
    use reqwest::Method;
    let app = spawn_app(&Names::new()).await;
    app.grants(&[grant("r3c", "g1", "tokens", "100")]);
    app.meter_until("r3c", "tokens", |b| b["credited"] == "100")
        .await;
    let path = "/v1/customers/r3c/meters/tokens/reservations";
    let (status, body) = call(
        &app,
        Method::POST,
        path,
        Some(json!({"reservation_id": "job-1", "units": "30", "ttl": "10m"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "held");
    assert_eq!(body["units"], "30");
    // Answered after the commit: the state already shows the hold.
    let (_, m) = app.get("/v1/customers/r3c/meters/tokens").await;
    assert_eq!(
        (m["reserved"].as_str(), m["available"].as_str()),
        (Some("30"), Some("70"))
    );
    let (_, check) = app
        .get("/v1/customers/r3c/meters/tokens/check?units=71")
        .await;
    assert_eq!(
        check["allowed"], false,
        "the check answers from available: {check}"
    );
    // A repeat with other units gets the first answer.
    let (status, again) = call(
        &app,
        Method::POST,
        path,
        Some(json!({"reservation_id": "job-1", "units": 5})),
    )
    .await;
    assert_eq!(
        (status, &again["units"], &again["expires_at"]),
        (200, &body["units"], &body["expires_at"])
    );
    // A block meter refuses what available cannot cover: 409, and so again.
    let (status, refused) = call(
        &app,
        Method::POST,
        path,
        Some(json!({"reservation_id": "job-2", "units": "71"})),
    )
    .await;
    assert_eq!(
        (status, refused["status"].as_str()),
        (409, Some("insufficient"))
    );
    // Release: 200, the hold is gone; again: ended; unknown: 404.
    let one = format!("{path}/job-1");
    let (status, released) = call(&app, Method::DELETE, &one, None).await;
    assert_eq!(
        (status, released["status"].as_str()),
        (200, Some("released"))
    );
    let (_, m) = app.get("/v1/customers/r3c/meters/tokens").await;
    assert_eq!(m["reserved"], "0");
    let (status, ended) = call(&app, Method::DELETE, &one, None).await;
    assert_eq!((status, ended["status"].as_str()), (200, Some("ended")));
    let (status, _) = call(&app, Method::DELETE, &format!("{path}/nope"), None).await;
    assert_eq!(status, 404);
    // Bad requests are 4xx and publish nothing.
    for bad in [
        json!({"reservation_id": "x", "units": "0"}),
        json!({"reservation_id": "x", "units": "-1"}),
        json!({"reservation_id": "x", "units": "1", "ttl": "8d"}),
        json!({"reservation_id": "x", "units": "1", "ttl": 0}),
        json!({"reservation_id": "", "units": "1"}),
        json!({"units": "1"}),
        json!({"reservation_id": "x", "units": "1", "extra": true}),
    ] {
        let (status, body) = call(&app, Method::POST, path, Some(bad.clone())).await;
        assert!((400..500).contains(&status), "{bad} -> {status} {body}");
    }
    let (status, _) = call(
        &app,
        Method::POST,
        "/v1/customers/r3c/meters/nope/reservations",
        Some(json!({"reservation_id": "x", "units": "1"})),
    )
    .await;
    assert_eq!(status, 404);
    app.stop().await;
}
