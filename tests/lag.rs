//! The lag monitor (`kafka::lag`), which `drawdown-loadgen wait-idle` relies on: an input record
//! counts as done only once the transaction that committed its offset has committed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use drawdown::kafka::lag::LagMonitor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The lag of partition 0 of the usage topic.
fn lag(monitor: &LagMonitor) -> i64 {
    let lags = monitor.measure().unwrap();
    let p0 = lags.iter().find(|l| l.topic == "usage" && l.partition == 0);
    p0.unwrap().lag
}

/// The lags seen over `secs` seconds, deduplicated in order.
fn lags_over(monitor: &LagMonitor, secs: u64) -> Vec<i64> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut seen = vec![lag(monitor)];
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
        let l = lag(monitor);
        if seen.last() != Some(&l) {
            seen.push(l);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_committed_in_an_open_or_aborted_transaction_are_not_progress() {
    let names = Names::new();
    let cfg = names.config();
    drawdown::kafka::admin::ensure_topics(&cfg).await.unwrap();
    let usage = cfg.topics.usage.clone();
    tokio::task::spawn_blocking(move || {
        let plain: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("enable.idempotence", "true")
            .create()
            .unwrap();
        for _ in 0..5 {
            let rec = BaseRecord::<str, str>::to(&usage)
                .partition(0)
                .key("c")
                .payload("{}");
            plain.send(rec).map_err(|(e, _)| e).unwrap();
        }
        plain.flush(Duration::from_secs(30)).unwrap();
        let monitor = LagMonitor::new(&cfg, 3).unwrap();
        assert_eq!(lag(&monitor), 5, "nothing committed yet");

        // The group's offsets, committed the way the pipeline commits them.
        let group: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", &cfg.kafka.group_id)
            .create()
            .unwrap();
        let meta = group.group_metadata().unwrap();
        let txn: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("transactional.id", format!("{}-lag-test", names.id))
            .create()
            .unwrap();
        let t = Duration::from_secs(30);
        txn.init_transactions(t).unwrap();
        let offsets = |o| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&usage, 0, Offset::Offset(o))
                .unwrap();
            tpl
        };
        txn.begin_transaction().unwrap();
        txn.send_offsets_to_transaction(&offsets(3), &meta, t)
            .unwrap();
        assert_eq!(lags_over(&monitor, 2), [5], "while open, nothing is done");
        txn.abort_transaction(t).unwrap();
        assert_eq!(
            lags_over(&monitor, 2),
            [5],
            "an aborted commit is no progress"
        );

        txn.begin_transaction().unwrap();
        txn.send_offsets_to_transaction(&offsets(5), &meta, t)
            .unwrap();
        assert_eq!(lags_over(&monitor, 2), [5], "the transaction is still open");
        txn.commit_transaction(t).unwrap();
        let after = lags_over(&monitor, 2);
        assert_eq!(after.last(), Some(&0), "committed: {after:?}");
    })
    .await
    .unwrap();
}
