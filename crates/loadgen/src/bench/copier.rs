//! The exactly-once pass-through: what the broker can carry when the work per record is nil.
//!
//! It consumes both input topics (`read_committed`, a group of its own) and, for every record,
//! produces one copy (same key, payload and headers) to one output topic, in transactions that
//! also commit the input offsets (`send_offsets_to_transaction`), batched like drawdown's loop
//! (`pipeline.commit_interval` or `pipeline.max_batch` records). It stops once it has consumed
//! up to the high watermarks it saw at the start, and prints its CPU seconds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drawdown::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

/// `bench copy`.
#[derive(Clone, Debug, clap::Args)]
pub struct CopyArgs {
    /// The topic the copies go to.
    #[arg(long)]
    pub output: String,
}

/// Runs the copier (blocking) with `cfg`'s group and input topics.
pub fn run(cfg: &Config, args: CopyArgs) -> anyhow::Result<()> {
    let k = &cfg.kafka;
    let producer: BaseProducer =
        drawdown::kafka::transactional_config(k, &format!("{}-copier", k.group_id))
            .create()
            .context("the copier's producer")?;
    producer.init_transactions(Duration::from_secs(60))?;
    let consumer: BaseConsumer = drawdown::kafka::client_config(k)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("the copier's consumer")?;
    let inputs = [cfg.topics.usage.as_str(), cfg.topics.grants.as_str()];
    consumer.subscribe(&inputs)?;
    // Where to stop: the high watermarks now.
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in inputs {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        for p in md.topics().iter().flat_map(|t| t.partitions()) {
            let (_, high) = consumer.fetch_watermarks(t, p.id(), Duration::from_secs(10))?;
            ends.insert((t.to_string(), p.id()), high);
        }
    }
    let mut positions: HashMap<(String, i32), i64> = HashMap::new();
    let done = |positions: &HashMap<(String, i32), i64>| {
        ends.iter()
            .all(|(tp, end)| *end == 0 || positions.get(tp).is_some_and(|p| p >= end))
    };
    let mut announced = false;
    let interval = cfg.pipeline.commit_interval;
    let mut copied = 0u64;
    while !done(&positions) {
        let deadline = Instant::now() + interval;
        let mut batch = 0usize;
        let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
        producer.begin_transaction()?;
        while batch < cfg.pipeline.max_batch && Instant::now() < deadline {
            let Some(r) = consumer.poll(deadline.saturating_duration_since(Instant::now())) else {
                continue;
            };
            let m = r?;
            if !announced {
                println!("ready");
                announced = true;
            }
            let mut headers = OwnedHeaders::new();
            if let Some(h) = m.headers() {
                for h in h.iter() {
                    headers = headers.insert(Header {
                        key: h.key,
                        value: h.value,
                    });
                }
            }
            let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&args.output).headers(headers);
            if let Some(key) = m.key() {
                rec = rec.key(key);
            }
            if let Some(p) = m.payload() {
                rec = rec.payload(p);
            }
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        rec = back;
                        producer.poll(Duration::from_millis(5));
                    }
                    Err((e, _)) => bail!("producing a copy: {e}"),
                }
            }
            offsets.insert((m.topic().to_string(), m.partition()), m.offset() + 1);
            batch += 1;
        }
        if offsets.is_empty() {
            producer.abort_transaction(Duration::from_secs(30))?;
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &offsets {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        let meta = consumer
            .group_metadata()
            .context("no consumer group metadata")?;
        producer.send_offsets_to_transaction(&tpl, &meta, Duration::from_secs(30))?;
        producer.commit_transaction(Duration::from_secs(60))?;
        copied += batch as u64;
        positions.extend(offsets);
    }
    println!(
        "done records={copied} cpu_s={:.2}",
        super::cpu_seconds(std::process::id())?
    );
    Ok(())
}
