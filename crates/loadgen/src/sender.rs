//! The producer: idempotent, keyed with the Java client's partitioner, paced, counted.
//!
//! # Order across the two topics
//! drawdown folds a customer's two input partitions in record-timestamp order, but only among
//! the records the broker holds (`kafka::pipeline::merge`); a producer keeps no order across
//! partitions. So a record of one customer is sent on one topic only once every record of that
//! customer sent on the other topic is acknowledged ([`Sender::send_at`] waits for it). Then
//! drawdown folds each customer's records in the order they were sent, the order the
//! expectation applies them in. Records of one topic need no wait (one partition keeps order).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drawdown::config::Config;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::gen::{InputTopic, Rec};

/// Counts delivery failures (an idempotent producer either delivers in order or fails), and
/// the records not acknowledged yet per (key, topic).
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first: Mutex<Option<String>>,
    /// By key index ([`Sender::keys`]): records in flight on the usage and the grants topic.
    in_flight: Mutex<Vec<[u32; 2]>>,
}

/// The delivery opaque of a record: its key's index and its topic, in one word.
fn opaque(key: usize, topic: InputTopic) -> usize {
    key << 1 | slot(topic)
}

fn slot(topic: InputTopic) -> usize {
    match topic {
        InputTopic::Usage => 0,
        InputTopic::Grants => 1,
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: usize) {
        self.in_flight.lock().expect("not poisoned")[sent >> 1][sent & 1] -= 1;
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::AcqRel);
            self.first
                .lock()
                .expect("not poisoned")
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// The producer, the pacing and the counts by kind of record.
pub struct Sender {
    producer: BaseProducer<Deliveries>,
    usage_topic: String,
    grants_topic: String,
    rate: f64,
    started: Instant,
    sent: u64,
    counts: BTreeMap<&'static str, u64>,
    /// The last record timestamp given.
    last_ts: i64,
    /// The index of each record key, for [`Deliveries::in_flight`] and `last_usage_ts`.
    keys: HashMap<String, usize>,
    /// By key index: the last record timestamp given to a usage record of the key.
    last_usage_ts: Vec<i64>,
}

/// What a phase sent.
pub struct Sent {
    /// Records in all.
    pub records: u64,
    /// From the first record to the flush.
    pub elapsed: Duration,
    /// Records by kind.
    pub counts: BTreeMap<&'static str, u64>,
}

impl Sender {
    /// A producer for `cfg`'s input topics, sending at most `rate` records/s (0: no limit).
    pub fn new(cfg: &Config, rate: f64) -> anyhow::Result<Self> {
        let producer: BaseProducer<Deliveries> = drawdown::kafka::client_config(&cfg.kafka)
            .set("client.id", "drawdown-loadgen")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create_with_context(Deliveries::default())
            .context("creating the producer")?;
        Ok(Self {
            producer,
            usage_topic: cfg.topics.usage.clone(),
            grants_topic: cfg.topics.grants.clone(),
            rate,
            started: Instant::now(),
            sent: 0,
            counts: BTreeMap::new(),
            last_ts: i64::MIN,
            keys: HashMap::new(),
            last_usage_ts: Vec::new(),
        })
    }

    /// Queues `rec`, counted as `what`; waits for room in the queue and for the pace.
    pub fn send(&mut self, rec: &Rec, what: &'static str) -> anyhow::Result<()> {
        let timestamp = self.stamp(rec.topic, &rec.key);
        self.send_at(rec, timestamp, what)
    }

    /// Queues `rec` with the record timestamp `timestamp`, which [`Sender::stamp`] gave for
    /// it just before (no other record in between): for records whose model time must be
    /// drawdown's processing time exactly (a reservation's expiry is its time + ttl).
    /// First waits until the records of the same key on the other topic are acknowledged
    /// (see the module docs).
    pub fn send_at(&mut self, rec: &Rec, timestamp: i64, what: &'static str) -> anyhow::Result<()> {
        let key = self.key_index(&rec.key);
        self.await_other_topic(key, rec.topic)?;
        let topic = match rec.topic {
            InputTopic::Usage => self.usage_topic.as_str(),
            InputTopic::Grants => self.grants_topic.as_str(),
        };
        let headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some(rec.content_type),
        });
        let mut record: BaseRecord<'_, str, [u8], usize> =
            BaseRecord::with_opaque_to(topic, opaque(key, rec.topic))
                .key(rec.key.as_str())
                .payload(rec.payload.as_slice())
                .headers(headers)
                .timestamp(timestamp);
        loop {
            match self.producer.send(record) {
                // Counted after the send: delivery callbacks run only in `poll`, on this thread.
                Ok(()) => {
                    self.in_flight()[key][slot(rec.topic)] += 1;
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    self.producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        self.sent += 1;
        *self.counts.entry(what).or_default() += 1;
        if self.sent.is_multiple_of(1000) {
            self.producer.poll(Duration::ZERO);
            self.check()?;
        }
        if self.rate > 0.0 && self.sent.is_multiple_of(16) {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / self.rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        Ok(())
    }

    /// The index of the record key `key`, given on first sight.
    fn key_index(&mut self, key: &str) -> usize {
        if let Some(&i) = self.keys.get(key) {
            return i;
        }
        let i = self.keys.len();
        self.keys.insert(key.to_owned(), i);
        self.last_usage_ts.push(i64::MIN);
        self.in_flight().push([0, 0]);
        i
    }

    /// The records in flight, by key index and topic slot.
    fn in_flight(&self) -> std::sync::MutexGuard<'_, Vec<[u32; 2]>> {
        self.producer
            .context()
            .in_flight
            .lock()
            .expect("not poisoned")
    }

    /// Waits until no record of key `key` on the topic other than `topic` is in flight.
    fn await_other_topic(&mut self, key: usize, topic: InputTopic) -> anyhow::Result<()> {
        let other = 1 - slot(topic);
        while self.in_flight()[key][other] > 0 {
            self.producer.poll(Duration::from_millis(1));
        }
        self.check()
    }

    /// The record timestamp of the next record, on `topic` with key `key`: the clock, never
    /// going back, and such that drawdown's merge of a partition's two topics (by timestamp,
    /// grants first on a tie) folds a key's records in the order they were sent, the order the
    /// expectation applies them in. Only a grant sent in the same millisecond as an earlier
    /// usage record **of the same key** is moved, one millisecond on. A command (not usage) is
    /// applied at this time by drawdown.
    ///
    /// The rule used to be global (any earlier usage record): at thousands of records/s,
    /// alternating usage and commands pushed every timestamp a millisecond on, and the
    /// reservations phase of the soak ended over 400 ms ahead of the clock; the next phase's
    /// usage (another process, on the clock) then sorted before its last reserves. Per key,
    /// the gap is at most 1 ms: a key changes topic only after an acknowledgement.
    pub fn stamp(&mut self, topic: InputTopic, key: &str) -> i64 {
        let key = self.key_index(key);
        let mut ts = drawdown::clock::now_ms().max(self.last_ts);
        let last_usage = &mut self.last_usage_ts[key];
        if topic == InputTopic::Grants && ts <= *last_usage {
            ts = *last_usage + 1;
        }
        if topic == InputTopic::Usage {
            *last_usage = ts;
        }
        self.last_ts = ts;
        ts
    }

    fn check(&self) -> anyhow::Result<()> {
        let ctx = self.producer.context();
        let failed = ctx.failed.load(Ordering::Acquire);
        if failed > 0 {
            let first = ctx.first.lock().expect("not poisoned").clone();
            bail!(
                "{failed} records were not delivered (first: {})",
                first.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Flushes: every record is acknowledged (or the phase fails).
    pub fn finish(self) -> anyhow::Result<Sent> {
        self.producer
            .flush(Duration::from_secs(120))
            .context("flushing the producer")?;
        self.check()?;
        Ok(Sent {
            records: self.sent,
            elapsed: self.started.elapsed(),
            counts: self.counts,
        })
    }
}
