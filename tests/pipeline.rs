//! The pipeline end to end, against the real broker and real RocksDB.

mod common;

use common::*;
use drawdown::codec::pb;
use prost::Message;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn dec(v: &Value) -> rust_decimal::Decimal {
    v.as_str().expect("decimal as string").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_then_usage_gives_the_right_balance() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    app.grants(&[
        grant("alice", "g1", "api_calls", "10"),
        grant("alice", "g2", "tokens", "1000.5"),
    ]);
    app.usage(&[
        api_call("alice", "e1"),
        api_call("alice", "e2"),
        api_call("alice", "e3"),
        llm("alice", "e4", "200.25"),
    ]);
    let m = app
        .meter_until("alice", "api_calls", |b| b["consumed"] == "3")
        .await;
    assert_eq!(dec(&m["balance"]), "7".parse().unwrap());
    assert_eq!(m["credited"], "10");
    let t = app
        .meter_until("alice", "tokens", |b| b["consumed"] == "200.25")
        .await;
    assert_eq!(t["balance"], "800.25");
    // The same event fed the request counter too, in overage (no credits: negative balance).
    let r = app
        .meter_until("alice", "llm_requests", |b| b["consumed"] == "1")
        .await;
    assert_eq!(r["balance"], "-1");
    assert_eq!(r["overage"], "1");
    let (status, state) = app.get("/v1/customers/alice/state").await;
    assert_eq!(status, 200);
    assert_eq!(state["meters"].as_array().unwrap().len(), 3);
    let (status, body) = app.get("/v1/customers/nobody/state").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    app.stop().await;
}

/// `max_batch_customers = 1`: every poll window ends at its first customer, so records that
/// wait on the broker are folded in many small batches. Balances and versions stay exact.
/// A grant `g1` of 5 `api_calls` for each of `customers`.
fn funded(customers: &[String]) -> Vec<Value> {
    customers
        .iter()
        .map(|c| grant(c, "g1", "api_calls", "5"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_one_customer_each_fold_exactly() {
    let names = Names::new();
    let cfg = names.config_with(
        common::METERS,
        &[("DRAWDOWN__PIPELINE__MAX_BATCH_CUSTOMERS", "1")],
    );
    assert_eq!(cfg.pipeline.max_batch_customers, 1);
    let app = spawn_app_with(&names, cfg).await;
    let customers: Vec<String> = (0..12).map(|i| format!("cust-{i}")).collect();
    app.grants(&funded(&customers));
    // Interleaved: consecutive records name different customers.
    let usage: Vec<Value> = (0..3)
        .flat_map(|n| customers.iter().map(move |c| api_call(c, &format!("e{n}"))))
        .collect();
    app.usage(&usage);
    for c in &customers {
        let m = app
            .meter_until(c, "api_calls", |b| b["consumed"] == "3")
            .await;
        assert_eq!(m["balance"], "2", "{c}");
        assert_eq!(m["version"], 4, "{c}: the grant and three events");
    }
    let topic = app.cfg.topics.balance_changed.clone();
    let recs = read_until(&topic, |r| r.len() >= 48).await;
    let mut versions: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (k, v, _) in &recs {
        let v: Value = serde_json::from_slice(v).unwrap();
        if v["meter"] == "api_calls" {
            versions
                .entry(k.clone())
                .or_default()
                .push(v["version"].as_u64().unwrap());
        }
    }
    assert_eq!(versions.len(), 12);
    for (c, vs) in versions {
        assert_eq!(vs, [1, 2, 3, 4], "{c}: each version once, in order");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_then_restored_on_top_up() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    app.grants(&[grant("bob", "g1", "api_calls", "2")]);
    app.meter_until("bob", "api_calls", |b| b["credited"] == "2")
        .await;
    app.usage(&[
        api_call("bob", "e1"),
        api_call("bob", "e2"),
        api_call("bob", "e3"),
    ]);
    let m = app
        .meter_until("bob", "api_calls", |b| b["consumed"] == "3")
        .await;
    assert_eq!(m["status"], "exhausted");
    assert_eq!(m["balance"], "-1");
    app.grants(&[grant("bob", "g2", "api_calls", "10")]);
    let m = app
        .meter_until("bob", "api_calls", |b| b["credited"] == "12")
        .await;
    assert_eq!(m["balance"], "9", "the top-up paid the debt first");
    let topic = app.cfg.topics.balance_exhausted.clone();
    let recs = read_until(&topic, |r| r.len() >= 2).await;
    let kinds: Vec<String> = recs
        .iter()
        .map(|(k, v, h)| {
            assert_eq!(k, "bob");
            let v: Value = serde_json::from_slice(v).unwrap();
            assert_eq!(h["type"], v["type"].as_str().unwrap());
            v["type"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(kinds, ["exhausted", "restored"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_event_is_counted_once() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    app.grants(&[
        grant("carol", "g1", "api_calls", "10"),
        grant("carol", "g1", "api_calls", "10"),
    ]);
    app.usage(&[
        api_call("carol", "e1"),
        api_call("carol", "e1"),
        api_call("carol", "e2"),
    ]);
    app.usage(&[api_call("carol", "e1")]);
    app.usage(&[api_call("carol", "e3")]);
    let m = app
        .meter_until("carol", "api_calls", |b| b["consumed"] == "3")
        .await;
    assert_eq!(m["credited"], "10", "the replayed grant id is ignored");
    assert_eq!(m["balance"], "7");
    assert_eq!(m["version"], 4, "one version per applied input");
    let topic = app.cfg.topics.balance_changed.clone();
    let recs = read_until(&topic, |r| r.len() >= 4).await;
    let versions: Vec<u64> = recs
        .iter()
        .map(|(_, v, _)| {
            serde_json::from_slice::<Value>(v).unwrap()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_goes_to_the_dlq_and_the_pipeline_goes_on() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    let metrics_before = app.get("/metrics").await.1;
    let count = |text: &Value, reason: &str| -> f64 {
        text.as_str()
            .unwrap_or("")
            .lines()
            .filter(|l| {
                l.starts_with("drawdown_records_rejected_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    app.grants(&[grant("dave", "g1", "api_calls", "10")]);
    let usage = app.cfg.topics.usage.clone();
    let grants = app.cfg.topics.grants.clone();
    // Good, bad of every kind, good again: in one go, so they share batches.
    app.send(
        &usage,
        &[(
            "dave",
            serde_json::to_vec(&api_call("dave", "e1")).unwrap(),
            None,
        )],
    );
    let bad_usage: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("dave", b"\xff\xfe not json".to_vec(), None),
        ("dave", b"\x08\x96\x01\xff".to_vec(), Some("application/x-protobuf")),
        ("dave", br#"{"id":"x1","customer_id":"dave","name":42}"#.to_vec(), None),
        ("dave", br#"{"customer_id":"dave","name":"api_call"}"#.to_vec(), None),
        ("dave", br#"{"id":"x2","customer_id":"dave","name":"llm_completion","properties":{"tokens":-5}}"#.to_vec(), None),
        ("dave", br#"{"id":"x3","customer_id":"dave","name":"llm_completion","properties":{"tokens":"NaN"}}"#.to_vec(), None),
        ("dave", br#"{"id":"x4","customer_id":"dave","name":"llm_completion","properties":{"tokens":1e999}}"#.to_vec(), None),
        ("dave", br#"{"id":"x5","customer_id":"dave","name":"llm_completion","properties":{"model":"big"}}"#.to_vec(), None),
        ("dave", br#"{"id":"x6","customer_id":"dave","name":"llm_completion","properties":{"tokens":99999999999999999999999}}"#.to_vec(), None),
        ("dave", Vec::new(), None),
    ];
    app.send(&usage, &bad_usage);
    let bad_grants: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("dave", serde_json::to_vec(&grant("dave", "g9", "no_such_meter", "5")).unwrap(), None),
        ("dave", serde_json::to_vec(&grant("dave", "g10", "api_calls", "-5")).unwrap(), None),
        ("dave", br#"{"type":"grant","grant_id":"g11","customer_id":"dave","meter":"api_calls","amount":"1.5.5"}"#.to_vec(), None),
        ("dave", br#"{"type":"refund","customer_id":"dave"}"#.to_vec(), None),
        ("dave", br#"{"type":"void_usage","customer_id":"dave","event_id":"never-seen"}"#.to_vec(), None),
    ];
    app.send(&grants, &bad_grants);
    app.send(
        &usage,
        &[(
            "dave",
            serde_json::to_vec(&api_call("dave", "e2")).unwrap(),
            None,
        )],
    );
    let m = app
        .meter_until("dave", "api_calls", |b| b["consumed"] == "2")
        .await;
    assert_eq!(m["balance"], "8");
    let dlq = app.cfg.topics.dlq.clone();
    let total = bad_usage.len() + bad_grants.len();
    let recs = read_until(&dlq, |r| r.len() >= total).await;
    assert_eq!(recs.len(), total);
    let mut reasons: Vec<String> = recs
        .iter()
        .map(|(_, _, h)| h["error.reason"].clone())
        .collect();
    reasons.sort();
    let mut want = vec![
        "undecodable",
        "undecodable",
        "wrong_type",
        "missing_field",
        "invalid_amount",
        "invalid_amount",
        "invalid_amount",
        "missing_property",
        "invalid_amount",
        "empty",
        "unknown_meter",
        "invalid_amount",
        "invalid_amount",
        "wrong_type",
        "void_unknown",
    ];
    want.sort();
    assert_eq!(reasons, want);
    for (_, payload, h) in &recs {
        assert!(h.contains_key("error.stage"));
        assert!(
            h.contains_key("source.topic")
                && h.contains_key("source.offset")
                && h.contains_key("source.partition")
        );
        let src = &h["source.topic"];
        let offset: i64 = h["source.offset"].parse().unwrap();
        assert!(offset >= 0);
        if src == &usage {
            assert!(
                bad_usage.iter().any(|(_, p, _)| p == payload),
                "the original bytes are kept"
            );
        }
    }
    // The counters moved by at least as much (other tests may add to them concurrently).
    let after = app.get("/metrics").await.1;
    for reason in [
        "undecodable",
        "wrong_type",
        "missing_field",
        "invalid_amount",
        "missing_property",
        "empty",
        "unknown_meter",
        "void_unknown",
    ] {
        let n = want.iter().filter(|w| **w == reason).count() as f64;
        assert!(
            count(&after, reason) - count(&metrics_before, reason) >= n,
            "counter for {reason}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_input_is_decoded_by_content_type() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    let g = pb::CreditCommand {
        command: Some(pb::credit_command::Command::Grant(pb::Grant {
            grant_id: "g1".into(),
            customer_id: "erin".into(),
            meter: "tokens".into(),
            amount: "100".into(),
            kind: pb::GrantKind::TopUp as i32,
            ..Default::default()
        })),
    };
    let u = pb::UsageEvent {
        id: "e1".into(),
        customer_id: "erin".into(),
        name: "llm_completion".into(),
        timestamp_ms: 1,
        properties: [("tokens".to_string(), "150".to_string())]
            .into_iter()
            .collect(),
        reservation_id: String::new(),
    };
    let (usage, grants) = (app.cfg.topics.usage.clone(), app.cfg.topics.grants.clone());
    app.send(
        &grants,
        &[("erin", g.encode_to_vec(), Some("application/x-protobuf"))],
    );
    app.meter_until("erin", "tokens", |b| b["credited"] == "100")
        .await;
    app.send(
        &usage,
        &[("erin", u.encode_to_vec(), Some("application/x-protobuf"))],
    );
    let m = app
        .meter_until("erin", "tokens", |b| b["version"] == 2)
        .await;
    assert_eq!(m["balance"], "0", "block mode floors at zero");
    assert_eq!(m["blocked"], "50");
    assert_eq!(m["consumed"], "100");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_restored_from_the_changelog_after_losing_the_disk() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    app.grants(&[grant("frank", "g1", "api_calls", "5")]);
    app.usage(&[api_call("frank", "e1"), api_call("frank", "e2")]);
    app.meter_until("frank", "api_calls", |b| b["version"] == 3)
        .await;
    app.stop().await;
    std::fs::remove_dir_all(names.dir.join("state")).unwrap();
    let app = spawn_app(&names).await;
    let m = app
        .meter_until("frank", "api_calls", |b| b["version"] == 3)
        .await;
    assert_eq!(m["balance"], "3");
    // The duplicate is still known after the restore, and new input continues the versions.
    app.usage(&[api_call("frank", "e1"), api_call("frank", "e3")]);
    let m = app
        .meter_until("frank", "api_calls", |b| b["version"] == 4)
        .await;
    assert_eq!(m["balance"], "2");
    let (_, events) = app
        .get("/v1/customers/frank/meters/api_calls/events?limit=2")
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 2);
    assert_eq!(events["events"][0]["version"], 4);
    let cursor = events["next_cursor"].as_str().unwrap().to_string();
    let (_, page2) = app
        .get(&format!(
            "/v1/customers/frank/meters/api_calls/events?limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(page2["events"][0]["version"], 2);
    let _ = json!(null);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_comes_from_state_not_restored_yet() {
    let names = Names::new();
    let app = spawn_app(&names).await;
    let customers: Vec<String> = (0..2000).map(|i| format!("r{i}")).collect();
    app.grants(&funded(&customers));
    for c in customers.iter().rev().take(50) {
        app.meter_until(c, "api_calls", |b| b["version"] == 1).await;
    }
    app.stop().await;
    std::fs::remove_dir_all(names.dir.join("state")).unwrap();
    // A new instance on an empty disk, asked from the first moment: every answer is either
    // "not here yet" (503) or the restored balance, and ready means restored.
    let app = start_app_with(&names, names.config()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut ready_seen, mut answered, mut unavailable) = (0, 0, 0);
    for i in 0usize.. {
        assert!(Instant::now() < deadline, "not ready within 60 s");
        let c = &customers[(i * 7919) % customers.len()];
        let (status, body) = app.get("/readyz").await;
        let (mstatus, m) = app
            .get(&format!("/v1/customers/{c}/meters/api_calls"))
            .await;
        match mstatus {
            200 => {
                answered += 1;
                assert_eq!(
                    m["balance"], "5",
                    "{c}: answered from unrestored state: {m}"
                );
            }
            503 => unavailable += 1,
            other => panic!("{c}: {other} {m}"),
        }
        if status == 200 {
            assert_eq!(body["ready"], true);
            ready_seen += 1;
            if ready_seen >= 50 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        answered >= 40,
        "answered {answered}, unavailable {unavailable}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_state_ahead_of_a_recreated_changelog_is_dropped_and_restored_from_scratch() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let names = Names::new();
    let app = spawn_app(&names).await;
    let grants: Vec<Value> = (0..20)
        .map(|i| grant(&format!("hank{i}"), "g1", "api_calls", "5"))
        .collect();
    app.grants(&grants);
    for i in 0..20 {
        app.meter_until(&format!("hank{i}"), "api_calls", |b| b["version"] == 1)
            .await;
    }
    app.stop().await;
    // The changelog is deleted and recreated empty: the store's checkpoints are now above its
    // log end, and the store no longer reflects it.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let changelog = names.config().changelog_topic();
    admin
        .delete_topics(&[&changelog], &AdminOptions::new())
        .await
        .unwrap();
    // Deletion is asynchronous; the app recreates the topic when it is gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(&changelog), Duration::from_secs(5))
            .unwrap();
        if md.topics()[0].partitions().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "changelog not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let app = spawn_app(&names).await;
    // The state comes from the (empty) changelog, not from the stale store.
    for i in 0..20 {
        let (status, body) = app
            .get(&format!("/v1/customers/hank{i}/meters/api_calls"))
            .await;
        assert_eq!(
            status, 404,
            "hank{i}: served from a store the changelog does not back: {body}"
        );
    }
    // And the pipeline goes on from there.
    app.grants(&[grant("hank0", "g2", "api_calls", "3")]);
    let m = app
        .meter_until("hank0", "api_calls", |b| b["version"] == 1)
        .await;
    assert_eq!(m["balance"], "3");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_to_an_input_topic_while_running_stop_drawdown_with_a_clear_error() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let names = Names::new();
    let mut cfg = names.config();
    // librdkafka notices new partitions at its next metadata refresh (5 min by default).
    cfg.kafka
        .extra
        .insert("topic.metadata.refresh.interval.ms".into(), "1000".into());
    let app = spawn_app_with(&names, cfg).await;
    app.grants(&[grant("ivy", "g1", "api_calls", "5")]);
    app.meter_until("ivy", "api_calls", |b| b["version"] == 1)
        .await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let usage = app.cfg.topics.usage.clone();
    let created = admin
        .create_partitions(&[NewPartitions::new(&usage, 5)], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    // Stopped for good with the reason (and never ready on the way out).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !app.task.is_finished() {
        assert!(Instant::now() < deadline, "still running");
        if let Ok(r) = app.http.get(format!("{}/readyz", app.base)).send().await {
            if r.status() != 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Ok(r) = app.http.get(format!("{}/readyz", app.base)).send().await {
        assert_eq!(r.status(), 503, "a stopping instance is not ready");
    }
    let err = app.task.await.unwrap().unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("partitions were added to an input topic"),
        "{text}"
    );
}
