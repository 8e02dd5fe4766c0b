//! Event time and input order through the real pipeline: a replay gives the same ledger.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use drawdown::clock::now_ms;
use serde_json::{json, Value};

const S: i64 = 1_000;

/// Waits until `topic` holds `per_key` records for each of `keys` keys (2 minutes at most: the
/// first run fetches a few hundred bytes at a time, slow on a busy machine). On timeout it
/// shows the keys that are short, with their records.
async fn until_each(topic: &str, keys: usize, per_key: usize) {
    let started = Instant::now();
    loop {
        let t = topic.to_string();
        let got = tokio::task::spawn_blocking(move || by_key(&t))
            .await
            .unwrap();
        let done = got.values().filter(|v| v.len() >= per_key).count();
        if done >= keys {
            return;
        }
        let waited = started.elapsed();
        if waited > Duration::from_secs(120) {
            let short: BTreeMap<_, _> = got.iter().filter(|(_, v)| v.len() < per_key).collect();
            panic!("{topic}: {done} of {keys} keys complete after {waited:?}; short: {short:#?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Issue 11: re-consuming both input topics from the start with a new group and an empty store
/// gives the same balances, versions and transitions, on a workload with late events, an
/// expiry that the usage straddles, and the two topics fetched in very different interleavings
/// (the first run fetches a few hundred bytes per partition at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_from_the_start_gives_the_same_ledger() {
    let names = Names::new();
    let grace = [("DRAWDOWN__PIPELINE__GRACE", "30s")];
    let mut first = names.config_with(common::METERS, &grace);
    first
        .kafka
        .extra
        .insert("max.partition.fetch.bytes".into(), "300".into());
    let (usage, grants) = (first.topics.usage.clone(), first.topics.grants.clone());
    // The whole input first: a backlog, so both runs see the same records and only the fetch
    // interleaving differs.
    let t0 = now_ms() - 600 * S;
    let mut recs = Vec::new();
    let customers: Vec<String> = (0..30).map(|i| format!("rp{i}")).collect();
    for c in &customers {
        let call = |id: &str, at: i64| {
            (
                usage.clone(),
                json!({"id": id, "customer_id": c, "name": "api_call", "timestamp": at}),
                at,
            )
        };
        let mut g1 = grant(c, "g1", "api_calls", "10");
        g1["expires_at"] = json!(t0 + 60 * S);
        g1["effective_at"] = json!(t0);
        recs.push((grants.clone(), g1, t0));
        for i in 0..5 {
            recs.push(call(&format!("e{i}"), t0 + (10 + i) * S));
        }
        recs.push((
            grants.clone(),
            grant(c, "g2", "api_calls", "5"),
            t0 + 20 * S,
        ));
        // After g1's expiry: it is forfeited first, then g2 pays.
        for i in 5..8 {
            recs.push(call(&format!("e{i}"), t0 + (65 + i) * S));
        }
        // 57 s behind the newest: late, applied at stream time.
        recs.push(call("e8", t0 + 15 * S));
        // 22 s behind: within the grace, at its own time.
        recs.push(call("e9", t0 + 50 * S));
        recs.push(call("e9", t0 + 51 * S)); // a duplicate
    }
    drawdown::kafka::admin::ensure_topics(&first).await.unwrap();
    send_timed(&recs);
    // Changes per customer: g1, e0-e4, g2, expiry of g1, e5-e7, e8, e9.
    let per_customer = 13;

    let app = spawn_app_with(&names, first.clone()).await;
    until_each(&first.topics.balance_changed, customers.len(), per_customer).await;
    app.stop().await;
    let changed_1 = by_key(&first.topics.balance_changed);
    let transitions_1 = by_key(&first.topics.balance_exhausted);

    // The replay: a new group (so a new changelog), new outputs, an empty store, default fetches.
    let mut replay = names.config_with(common::METERS, &grace);
    replay.kafka.group_id = format!("{}-replay", first.kafka.group_id);
    for t in [
        &mut replay.topics.balance_changed,
        &mut replay.topics.balance_exhausted,
        &mut replay.topics.dlq,
        &mut replay.topics.top_up_requests,
    ] {
        t.push_str("-replay");
    }
    replay.store.path = names.dir.join("state-replay");
    let app = spawn_app_with(&names, replay.clone()).await;
    until_each(
        &replay.topics.balance_changed,
        customers.len(),
        per_customer,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = app.meter_until("rp0", "api_calls", |_| true).await;
    // Both runs merged by time alone: nothing was released by the max_idle escape (the metrics
    // are the process's, so this covers the first run too).
    assert_eq!(app.counter("drawdown_records_unordered_total").await, 0);
    app.stop().await;
    let changed_2 = by_key(&replay.topics.balance_changed);
    let transitions_2 = by_key(&replay.topics.balance_exhausted);

    assert_eq!(changed_1.len(), customers.len());
    for c in &customers {
        assert_eq!(changed_1[c].len(), per_customer, "{c}: {:#?}", changed_1[c]);
        assert_eq!(changed_1[c], changed_2[c], "{c}: the replay differs");
    }
    assert_eq!(transitions_1, transitions_2);
    // The ledger itself: e0-e4 from g1, the rest of g1 (5) expired at its time, e5-e7 and the
    // late e8 and e9 from g2 (5 of 5).
    assert_eq!(m["consumed"], "10");
    assert_eq!(m["expired"], "5");
    assert_eq!(m["balance"], "0");
    let late: Vec<&Value> = changed_1["rp0"]
        .iter()
        .filter(|v| v["late"] == true)
        .collect();
    assert_eq!(late.len(), 1, "only e8 is late");
    assert_eq!(late[0]["cause_id"], "e8");
    assert_eq!(
        late[0]["at"],
        t0 + 42 * S,
        "applied at stream time (newest 72 s - 30 s)"
    );
}
