//! Consumer lag of the group, per input partition: the `drawdown_consumer_lag_records` gauge.
//!
//! A separate `BaseConsumer` with the pipeline's `group.id` that never subscribes, so it never
//! joins the group (no rebalance), never commits, and costs the pipeline nothing. Every few
//! seconds it reads the group's committed offsets (OffsetFetch) and each input partition's
//! watermarks (ListOffsets):
//! - lag = high watermark - committed offset;
//! - with no committed offset yet, lag = high - low: everything retained is still to be read.
//!
//! It reads with `isolation.level=read_uncommitted`: librdkafka then asks the broker for the
//! last *stable* committed offsets without `require_stable`, which would otherwise stall while
//! the pipeline's transaction (holding the next offsets) is open, which is nearly always. If the
//! inputs are written by transactional producers, each commit marker counts as one record of lag.
//!
//! Every instance reports every partition of the group (not only those it owns), so the lag of
//! a partition whose owner died is still visible; aggregate with `max by (topic, partition)`.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use super::client_config;
use crate::config::Config;
use crate::metrics as m;
use crate::shutdown::Shutdown;

/// One measurement: the lag of one input partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// The topic's role label (`usage` or `grants`), as on the other metrics.
    pub topic: &'static str,
    /// The partition.
    pub partition: i32,
    /// Records not yet committed by the group.
    pub lag: i64,
}

/// Reads the group's committed offsets and the watermarks of the input topics.
pub struct LagMonitor {
    consumer: BaseConsumer,
    topics: Vec<(&'static str, String)>,
    partitions: i32,
    timeout: Duration,
}

impl LagMonitor {
    /// A monitor of `cfg`'s group over `partitions` partitions of each input topic.
    pub fn new(cfg: &Config, partitions: i32) -> KafkaResult<Self> {
        let consumer: BaseConsumer = client_config(&cfg.kafka)
            .set(
                "client.id",
                format!("drawdown-{}-lag", cfg.kafka.instance_id),
            )
            .set("group.id", &cfg.kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .create()?;
        let topics = vec![
            ("usage", cfg.topics.usage.clone()),
            ("grants", cfg.topics.grants.clone()),
        ];
        Ok(Self {
            consumer,
            topics,
            partitions,
            timeout: Duration::from_secs(5),
        })
    }

    /// Measures every input partition once. Blocking (broker round trips).
    pub fn measure(&self) -> KafkaResult<Vec<PartitionLag>> {
        let mut tpl = TopicPartitionList::new();
        for (_, topic) in &self.topics {
            for p in 0..self.partitions {
                tpl.add_partition(topic, p);
            }
        }
        let committed = self.consumer.committed_offsets(tpl, self.timeout)?;
        let mut out = Vec::with_capacity(self.topics.len() * self.partitions as usize);
        for (label, topic) in &self.topics {
            for p in 0..self.partitions {
                let (low, high) = self.consumer.fetch_watermarks(topic, p, self.timeout)?;
                let done = committed
                    .find_partition(topic, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                let lag = high - done.unwrap_or(low);
                out.push(PartitionLag {
                    topic: label,
                    partition: p,
                    lag: lag.max(0),
                });
            }
        }
        Ok(out)
    }

    /// Measures every `every` and sets the gauges until shutdown. Blocking: run it on its own
    /// thread. A failed measurement is counted and logged; the gauges keep their last values.
    pub fn run(self, every: Duration, shutdown: Shutdown) {
        while !shutdown.is_triggered() {
            let started = Instant::now();
            match self.measure() {
                Ok(lags) => {
                    for l in lags {
                        metrics::gauge!(m::CONSUMER_LAG, "topic" => l.topic, "partition" => l.partition.to_string())
                            .set(l.lag as f64);
                    }
                }
                Err(e) => {
                    metrics::counter!(m::CONSUMER_LAG_ERRORS).increment(1);
                    tracing::warn!(error = %e, "measuring the consumer lag failed");
                }
            }
            shutdown.sleep(every.saturating_sub(started.elapsed()));
        }
    }
}
