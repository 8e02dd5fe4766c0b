//! The Kafka clients of one run of the loop: the group consumer (with its rebalance events) and
//! the transactional producer (with its delivery reports). Rebuilt after any error.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message};

use super::PipelineError;
use crate::config::Config;
use crate::kafka::InputTopic;
use crate::metrics as m;

/// Rebalance events, handed from librdkafka's callback to the loop.
#[derive(Debug)]
pub(super) enum RebalanceEvent {
    Assign(BTreeSet<i32>),
    Revoke,
}

pub(super) struct ConsumerCtx {
    events: Mutex<Vec<RebalanceEvent>>,
}

impl ConsumerCtx {
    /// Whether a rebalance happened since the last [`Self::take_events`].
    pub(super) fn rebalanced(&self) -> bool {
        !self.events.lock().expect("not poisoned").is_empty()
    }

    pub(super) fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().expect("not poisoned"))
    }
}

impl ClientContext for ConsumerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        broker_trouble(error, reason);
    }
}

/// Connection trouble is expected while a broker restarts: librdkafka retries and the pipeline
/// rebuilds itself on a transaction error, so it is a warning (and a metric), not an error.
fn broker_trouble(error: KafkaError, reason: &str) {
    use rdkafka::types::RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(C::AllBrokersDown) | Some(C::BrokerTransportFailure) | Some(C::Resolve) => {
            metrics::counter!(m::BROKER_ERRORS).increment(1);
            tracing::warn!(error = %error, reason, "broker unreachable; librdkafka retries");
        }
        _ => tracing::error!(error = %error, reason, "librdkafka error"),
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = r {
            metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
            self.events
                .lock()
                .expect("not poisoned")
                .push(RebalanceEvent::Revoke);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = r {
            metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
            let parts = tpl.elements().iter().map(|e| e.partition()).collect();
            self.events
                .lock()
                .expect("not poisoned")
                .push(RebalanceEvent::Assign(parts));
        }
    }
}

/// Collects delivery reports: the highest changelog offset per partition, and failures.
#[derive(Default)]
pub(super) struct ProducerCtx {
    changelog: String,
    delivered: AtomicU64,
    changelog_offsets: Mutex<HashMap<i32, i64>>,
    failure: Mutex<Option<String>>,
}

impl ProducerCtx {
    /// Forgets the reports of the previous transaction.
    pub(super) fn reset(&self) {
        self.changelog_offsets.lock().expect("not poisoned").clear();
        *self.failure.lock().expect("not poisoned") = None;
        self.delivered.store(0, Ordering::Release);
    }

    /// Delivery reports received since [`Self::reset`].
    pub(super) fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Acquire)
    }

    /// The first delivery failure since [`Self::reset`].
    pub(super) fn take_failure(&self) -> Option<String> {
        self.failure.lock().expect("not poisoned").take()
    }

    /// The next changelog offset per partition, from the delivery reports.
    pub(super) fn changelog_checkpoints(&self) -> Vec<(i32, i64)> {
        let offs = self.changelog_offsets.lock().expect("not poisoned");
        offs.iter().map(|(p, o)| (*p, o + 1)).collect()
    }
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        broker_trouble(error, reason);
    }
}

impl ProducerContext for ProducerCtx {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(msg) => {
                if msg.topic() == self.changelog {
                    let mut offs = self.changelog_offsets.lock().expect("not poisoned");
                    let e = offs.entry(msg.partition()).or_insert(-1);
                    *e = (*e).max(msg.offset());
                }
            }
            Err((e, _)) => {
                self.failure
                    .lock()
                    .expect("not poisoned")
                    .get_or_insert_with(|| e.to_string());
            }
        }
        self.delivered.fetch_add(1, Ordering::AcqRel);
    }
}

/// The clients of one run of the loop.
pub(super) struct Clients {
    pub(super) consumer: BaseConsumer<ConsumerCtx>,
    pub(super) producer: BaseProducer<ProducerCtx>,
}

impl Clients {
    /// A transactional producer (initialised: this fences an earlier incarnation) and a group
    /// consumer subscribed to both inputs.
    ///
    /// Loop `id` of an instance has the transactional id `<group>-<instance>` (loop 0) or
    /// `<group>-<instance>-<id>`, stable across restarts, so a restart fences its own zombie.
    pub(super) fn new(cfg: &Config, id: usize) -> Result<Self, PipelineError> {
        let k = &cfg.kafka;
        let suffix = if id == 0 {
            String::new()
        } else {
            format!("-{id}")
        };
        let producer: BaseProducer<ProducerCtx> = crate::kafka::transactional_config(
            k,
            &format!("{}-{}{suffix}", k.group_id, k.instance_id),
        )
        .set("client.id", format!("drawdown-{}{suffix}", k.instance_id))
        .create_with_context(ProducerCtx {
            changelog: cfg.changelog_topic(),
            ..Default::default()
        })?;
        producer.init_transactions(Duration::from_secs(60))?;
        let consumer: BaseConsumer<ConsumerCtx> = crate::kafka::client_config(k)
            .set("client.id", format!("drawdown-{}{suffix}", k.instance_id))
            .set("group.id", &k.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "600000")
            .set("fetch.wait.max.ms", "50")
            // The prefetch queue, per loop: librdkafka's default (64 MB of payload, and about
            // as much again in per-message overhead) held ~400 MB over two loops under a
            // backlog (heaptrack, 1M customers). 16 MB is still over a second of input at the
            // loop's peak.
            .set("queued.max.messages.kbytes", "16384")
            .create_with_context(ConsumerCtx {
                events: Mutex::new(Vec::new()),
            })?;
        let topics: Vec<&str> = InputTopic::ALL
            .iter()
            .map(|t| t.name(&cfg.topics))
            .collect();
        consumer.subscribe(&topics)?;
        Ok(Self { consumer, producer })
    }
}

/// Pauses (or resumes) the input topic-partitions `tps` (the handover's partitions, both
/// topics; the merge's throttled ones). Pausing drops what librdkafka prefetched of them; on
/// resume they are fetched from the position after the last record polled (or where a seek put
/// them), so nothing is skipped or polled twice.
pub(super) fn set_paused(
    consumer: &BaseConsumer<ConsumerCtx>,
    topics: &crate::config::TopicsConfig,
    tps: impl IntoIterator<Item = (crate::kafka::InputTopic, i32)>,
    pause: bool,
) -> Result<(), KafkaError> {
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (t, p) in tps {
        tpl.add_partition(t.name(topics), p);
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    if pause {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    }
}

/// The low and high watermarks of `topic` [`partition`] as librdkafka last saw them in a fetch
/// response (no request is made; `None` before the first). rust-rdkafka only offers the
/// querying form, which costs a round trip to the broker.
pub(super) fn cached_watermarks(
    consumer: &BaseConsumer<ConsumerCtx>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client pointer is valid while `consumer` lives; librdkafka reads `topic`
    // only during the call and writes only the two out-parameters.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some((low.max(0), high))
}
