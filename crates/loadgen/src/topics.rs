//! Reading topics: their partitions, and every committed record from the beginning to the end.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drawdown::clock::now_ms;
use drawdown::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

/// The partitions of `topic` (an error if it does not exist).
pub fn partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> anyhow::Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        bail!("topic {topic} does not exist");
    }
    Ok(parts)
}

/// A reader's context: end-of-partition is how the reader knows it is done, not an error worth
/// logging (librdkafka also reports it as a "global error").
struct Reader;

impl ClientContext for Reader {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(error = %error, reason, "librdkafka error");
        }
    }
}

impl ConsumerContext for Reader {}

/// One record as the checks see it.
pub struct Seen<'a> {
    /// Its key (empty if none).
    pub key: &'a [u8],
    /// Its payload (empty if none).
    pub payload: &'a [u8],
    /// Its headers with text values.
    pub headers: Vec<(&'a str, &'a str)>,
}

impl Seen<'_> {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The `content-type` header.
    pub fn content_type(&self) -> Option<&str> {
        self.header("content-type")
    }
}

/// Reads `topic` from the beginning to its end (`read_committed`, manual assignment, no group
/// commits), handing each record to `f`. Returns the records read.
pub fn read_topic(cfg: &Config, topic: &str, mut f: impl FnMut(&Seen<'_>)) -> anyhow::Result<u64> {
    let consumer: BaseConsumer<Reader> = drawdown::kafka::client_config(&cfg.kafka)
        .set(
            "group.id",
            format!("{}-verify-{}", cfg.kafka.group_id, now_ms()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "52428800")
        .create_with_context(Reader)
        .context("creating the reader")?;
    let parts = partitions(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while at_end.len() < parts.len() {
        if Instant::now() > deadline {
            bail!("reading {topic}: the end was not reached in 600 s");
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?)))
                            .collect()
                    })
                    .unwrap_or_default();
                f(&Seen {
                    key: m.key().unwrap_or_default(),
                    payload: m.payload().unwrap_or_default(),
                    headers,
                });
                n += 1;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
            None => {}
        }
    }
    Ok(n)
}
