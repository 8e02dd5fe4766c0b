//! Topic creation and the co-partitioning check at start-up.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Config;

/// Why the topics are not usable.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The broker could not be reached or refused.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Creating a topic failed.
    #[error("creating topic {topic}: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: RDKafkaErrorCode,
    },
    /// Inputs and changelog are not co-partitioned.
    #[error("topics are not co-partitioned: {0}")]
    Partitions(String),
}

/// Creates the topics drawdown uses when missing (the changelog compacted), then checks that
/// the inputs and the changelog have the same partition count. Returns that count.
pub async fn ensure_topics(cfg: &Config) -> Result<i32, AdminError> {
    let admin: AdminClient<DefaultClientContext> = super::client_config(&cfg.kafka).create()?;
    let n = cfg.kafka.partitions;
    let rf = cfg.kafka.replication_factor;
    let changelog = cfg.changelog_topic();
    let t = &cfg.topics;
    let plain = [
        &t.usage,
        &t.grants,
        &t.balance_changed,
        &t.balance_exhausted,
        &t.dlq,
        &t.top_up_requests,
    ];
    let mut topics: Vec<NewTopic> = plain
        .iter()
        .map(|name| NewTopic::new(name, n, TopicReplication::Fixed(rf)))
        .collect();
    topics.push(
        NewTopic::new(&changelog, n, TopicReplication::Fixed(rf))
            .set("cleanup.policy", "compact")
            .set("min.compaction.lag.ms", "0")
            .set("segment.bytes", "67108864")
            // Roll at least every 10 min so a quiet changelog is compacted too; keep tombstones
            // (they only ever delete deltas of dropped buckets, whose ids the partition's horizon
            // forgets anyway) for a minute, not the default day.
            .set("segment.ms", "600000")
            .set("delete.retention.ms", "60000"),
    );
    let directory = super::directory::topic(cfg);
    topics.push(
        NewTopic::new(&directory, 1, TopicReplication::Fixed(rf))
            .set("cleanup.policy", "compact")
            .set("segment.ms", "600000"),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(topics.iter(), &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(AdminError::Create { topic, code }),
        }
    }
    let cfg2 = cfg.clone();
    let counts = tokio::task::spawn_blocking(move || partition_counts(&cfg2))
        .await
        .expect("metadata task")?;
    let want = counts[0].1;
    if let Some((name, c)) = counts.iter().find(|(_, c)| *c != want) {
        return Err(AdminError::Partitions(format!(
            "{} has {want} partitions but {name} has {c}; the inputs and the changelog must match",
            counts[0].0
        )));
    }
    Ok(want)
}

/// Partition counts of the inputs and the changelog (waiting for new topics' metadata).
fn partition_counts(cfg: &Config) -> Result<Vec<(String, i32)>, AdminError> {
    let consumer: BaseConsumer = super::client_config(&cfg.kafka).create()?;
    let names = [
        cfg.topics.usage.clone(),
        cfg.topics.grants.clone(),
        cfg.changelog_topic(),
    ];
    let mut out = Vec::new();
    for name in names {
        // A topic just created (here or by another instance starting at the same time) can
        // show no partitions for a while on a broker that has just started: seen for more
        // than 5 s with three instances starting together.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let md = consumer.fetch_metadata(Some(&name), Duration::from_secs(10))?;
            let c = md
                .topics()
                .first()
                .map(|t| t.partitions().len() as i32)
                .unwrap_or(0);
            if c > 0 || std::time::Instant::now() >= deadline {
                out.push((name, c));
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(out)
}
