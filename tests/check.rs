//! The entitlement check, single and batch, against the real broker.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

async fn check(app: &TestApp, customer: &str, meter: &str, units: &str) -> (u16, Value) {
    app.get(&format!(
        "/v1/customers/{customer}/meters/{meter}/check?units={units}"
    ))
    .await
}

async fn batch(app: &TestApp, bearer: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/checks", app.base))
        .json(&body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    answer(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_answers_from_the_balance_and_the_meter_mode() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    app.grants(&[
        grant("ck-1", "g1", "api_calls", "10"),
        grant("ck-1", "g2", "tokens", "100"),
    ]);
    app.usage(&[llm("ck-1", "e1", "40")]);
    app.meter_until("ck-1", "api_calls", |m| m["balance"] == "10")
        .await;
    app.meter_until("ck-1", "tokens", |m| m["balance"] == "60")
        .await;

    let answer = |allowed: bool, balance: &str, reason: &str| json!({"allowed": allowed, "balance": balance, "available": balance, "reason": reason});
    assert_eq!(
        check(&app, "ck-1", "api_calls", "10").await,
        (200, answer(true, "10", "ok"))
    );
    assert_eq!(
        check(&app, "ck-1", "api_calls", "10.5").await,
        (200, answer(false, "10", "insufficient")),
        "an overage meter: short"
    );
    assert_eq!(
        check(&app, "ck-1", "tokens", "61").await,
        (200, answer(false, "60", "blocked_mode")),
        "a block meter: short"
    );
    assert_eq!(
        check(&app, "ck-1", "tokens", "0").await,
        (200, answer(true, "60", "ok"))
    );
    // A configured meter without a grant has a balance of 0 (then goes into debt).
    assert_eq!(
        check(&app, "ck-3", "api_calls", "1").await,
        (200, answer(false, "0", "insufficient"))
    );
    assert_eq!(
        check(&app, "ck-1", "llm_requests", "0").await,
        (200, answer(false, "-1", "insufficient")),
        "the completion counted on llm_requests without a grant: in debt"
    );
    assert_eq!(
        check(&app, "ck-1", "no_such_meter", "1").await,
        (200, answer(false, "0", "unknown_meter"))
    );
    for bad in ["-1", "abc", "1e3", "0.0000000001"] {
        let (status, body) = check(&app, "ck-1", "api_calls", bad).await;
        assert_eq!(status, 400, "units={bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_request");
    }
    let (status, _) = app.get("/v1/customers/ck-1/meters/api_calls/check").await;
    assert_eq!(status, 400, "units is required");
    let anonymous = reqwest::get(format!(
        "{}/v1/customers/ck-1/meters/api_calls/check?units=1",
        app.base
    ))
    .await
    .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    // The batch form, results in the order of the items.
    let (status, body) = batch(
        &app,
        Some(API_KEY),
        json!({"checks": [
            {"customer_id": "ck-1", "meter": "tokens", "units": "61"},
            {"customer_id": "ck-2", "meter": "api_calls", "units": "0"},
            {"customer_id": "ck-1", "meter": "api_calls", "units": "3"},
            {"customer_id": "ck-1", "meter": "nope", "units": "1"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = body["results"].as_array().unwrap();
    let reasons: Vec<&str> = r.iter().map(|x| x["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, ["blocked_mode", "ok", "ok", "unknown_meter"]);
    assert_eq!(r[0]["customer_id"], "ck-1");
    assert_eq!(r[0]["units"], "61");
    assert_eq!(r[2]["balance"], "10");
    for bad in [
        json!({"checks": []}),
        json!({"checks": [{"customer_id": "ck-1", "meter": "tokens", "units": "-1"}]}),
        json!({"checks": [{"customer_id": "", "meter": "tokens", "units": "1"}]}),
        json!({"checks": [{"customer_id": "ck-1", "meter": "tokens"}]}),
        json!({"checks": vec![json!({"customer_id": "c", "meter": "m", "units": "1"}); 1001]}),
        json!([1, 2]),
    ] {
        let (status, body) = batch(&app, Some(API_KEY), bad).await;
        assert_eq!(status, 400, "{body}");
    }
    let (status, _) = batch(&app, None, json!({"checks": []})).await;
    assert_eq!(status, 401);
    // A portal token reads its own customer's check, but not the batch form.
    let (_, session) = {
        let r = app
            .http
            .post(format!("{}/v1/portal-sessions", app.base))
            .json(&json!({"customer_id": "ck-1"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let token = session["token"].as_str().expect("a portal token");
    let (status, _) = batch(
        &app,
        Some(token),
        json!({"checks": [{"customer_id": "ck-1", "meter": "tokens", "units": "1"}]}),
    )
    .await;
    assert_eq!(status, 403);
    let own = reqwest::Client::new()
        .get(format!(
            "{}/v1/customers/ck-1/meters/tokens/check?units=1",
            app.base
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status().as_u16(), 200);
    app.stop().await;
}

/// The partitions an instance serves, per its `/readyz`.
async fn owned(app: &TestApp) -> Vec<i32> {
    let (_, body) = app.get("/readyz").await;
    body["partitions_owned"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_i64)
                .map(|p| p as i32)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_answered_by_the_owner_of_each_customer() {
    let names = Names::new();
    let a = spawn_app(&names).await;
    let mut cfg_b = names.config();
    cfg_b.store.path = names.dir.join("state-b");
    cfg_b.kafka.instance_id = "1".into();
    let b = start_app_with(&names, cfg_b).await;
    // Both serve a share of the 3 partitions.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (oa, ob) = (owned(&a).await, owned(&b).await);
        if !oa.is_empty() && !ob.is_empty() && oa.len() + ob.len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no split: {oa:?} {ob:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.wait_ready().await;
    b.wait_ready().await;
    let customers: Vec<String> = (0..12).map(|i| format!("fw-{i}")).collect();
    let grants: Vec<Value> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| grant(c, "g", "api_calls", &(i + 1).to_string()))
        .collect();
    a.grants(&grants);
    for c in &customers {
        a.meter_until(c, "api_calls", |_| true).await;
    }
    let ob = owned(&b).await;
    let on_b = customers
        .iter()
        .filter(|c| ob.contains(&drawdown::kafka::partition_for(c.as_bytes(), 3)))
        .count();
    assert!(on_b > 0, "some customers are served by the other instance");
    let items: Vec<Value> = customers
        .iter()
        .map(|c| json!({"customer_id": c, "meter": "api_calls", "units": "5"}))
        .collect();
    let (status, body) = batch(&a, Some(API_KEY), json!({ "checks": items })).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), customers.len());
    for (i, (c, r)) in customers.iter().zip(results).enumerate() {
        assert_eq!(r["customer_id"], c.as_str(), "in order");
        assert!(r.get("error").is_none(), "{r}");
        assert_eq!(r["balance"], (i + 1).to_string(), "{c}");
        assert_eq!(r["allowed"], i + 1 >= 5, "{c}");
    }
    b.stop().await;
    a.stop().await;
}
