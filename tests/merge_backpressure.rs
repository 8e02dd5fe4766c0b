//! Backpressure in the merge of a partition's two input topics, through the real pipeline (its
//! own test binary: it asserts on the process's counters, which tests running beside it in one
//! process would add to).

mod common;

use common::*;
use drawdown::clock::now_ms;
use serde_json::json;

const S: i64 = 1_000;

/// One input topic's partition arriving far ahead of the other's (here the usage, in one fetch,
/// while the grants before it take dozens) is held back, not released out of order: once the
/// merge holds `max_batch` of its records it is paused at the source until the grants come.
/// Before that, the usage was folded ahead of its grant (overage, a late grant), and the 1- and
/// 2-thread runs of `bench e2e` published different transitions from one input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_far_ahead_of_the_other_is_paused_not_folded_out_of_order() {
    let names = Names::new();
    let mut cfg = names.config_with(
        common::METERS,
        &[
            ("DRAWDOWN__KAFKA__PARTITIONS", "1"),
            ("DRAWDOWN__PIPELINE__MAX_BATCH", "200"),
            // Longer than the test: only the backpressure can keep the order.
            ("DRAWDOWN__PIPELINE__MAX_IDLE", "10min"),
        ],
    );
    // Small fetches: the grants partition (2 MB) takes dozens of them, the usage a few.
    cfg.kafka
        .extra
        .insert("max.partition.fetch.bytes".into(), "65536".into());
    let (usage, grants) = (cfg.topics.usage.clone(), cfg.topics.grants.clone());
    let t0 = now_ms() - 3_600 * S;
    let mut recs = Vec::new();
    // 12,000 grants of other customers first, then the flood customer's own grant.
    for i in 0..12_000i64 {
        let c = format!("other{}", i % 3_000);
        recs.push((
            grants.clone(),
            grant(&c, &format!("f{i}"), "api_calls", "1"),
            t0 + i,
        ));
    }
    recs.push((
        grants.clone(),
        grant("flood", "g", "api_calls", "1000"),
        t0 + 500 * S,
    ));
    // Its 1,000 calls, all after that grant.
    for i in 0..1_000i64 {
        let at = t0 + 1_000 * S + i;
        recs.push((
            usage.clone(),
            json!({"id": format!("e{i}"), "customer_id": "flood", "name": "api_call", "timestamp": at}),
            at,
        ));
    }
    drawdown::kafka::admin::ensure_topics(&cfg).await.unwrap();
    send_timed(&recs);

    let app = spawn_app_with(&names, cfg.clone()).await;
    let m = app
        .meter_until("flood", "api_calls", |m| m["consumed"] == "1000")
        .await;
    let unordered = app.counter("drawdown_records_unordered_total").await;
    let late = app.counter("drawdown_records_late_total").await;
    let throttled = app.counter("drawdown_input_throttled_total").await;
    app.stop().await;
    assert_eq!(m["balance"], "0", "{m}");
    assert_eq!(m["overage"], "0", "the grant paid every call");
    let changed = by_key(&cfg.topics.balance_changed);
    let flood = &changed["flood"];
    assert_eq!(flood.len(), 1_001);
    assert_eq!(flood[0]["reason"], "grant", "the grant first: {}", flood[0]);
    assert!(flood.iter().all(|v| v["late"] != true), "nothing late");
    assert_eq!(unordered, 0);
    assert_eq!(late, 0);
    assert!(
        throttled > 0,
        "the usage partition was paused while the grants were fetched"
    );
}
