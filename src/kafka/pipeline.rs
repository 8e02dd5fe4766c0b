//! The consume -> fold -> transact -> materialise loop (see the module docs of `kafka`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::restore::{RestoreError, Restored, Restorer};
use super::{partition_for, PipelineStatus, Shutdown};
use crate::codec::{self, CodecError};
use crate::config::{Config, OutputFormat};
use crate::ledger::{Applied, Book, CustomerId, Dirty, Input, Ledger, MeterName, Output, Refs};
use crate::metrics as m;
use crate::store::{self, Mutation, Store, StoreError};

/// Why a pipeline run stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A Kafka call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Restoring a partition failed.
    #[error("restore: {0}")]
    Restore(#[from] RestoreError),
    /// A produced record was not delivered.
    #[error("delivery failed: {0}")]
    Delivery(String),
}

/// A client context that does not log end-of-partition as an error (the restorer asks for it).
pub(super) struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_))
            && error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        {
            tracing::error!(error = %error, reason, "librdkafka error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for QuietEof {}

/// Rebalance events, handed from librdkafka's callback to the loop.
#[derive(Debug)]
enum RebalanceEvent {
    Assign(BTreeSet<i32>),
    Revoke,
}

struct ConsumerCtx {
    events: Mutex<Vec<RebalanceEvent>>,
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
struct ProducerCtx {
    changelog: String,
    delivered: AtomicU64,
    changelog_offsets: Mutex<HashMap<i32, i64>>,
    failure: Mutex<Option<String>>,
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

/// An input record, copied out of librdkafka's buffer.
struct Rec {
    usage: bool,
    partition: i32,
    offset: i64,
    timestamp: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Rec {
    fn from_message(m: &BorrowedMessage<'_>, usage_topic: &str) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(|v| v.to_vec()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Rec {
            usage: m.topic() == usage_topic,
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
            key: m.key().map(|k| k.to_vec()),
            payload: m.payload().map(|p| p.to_vec()),
            headers,
        }
    }

    fn content_type(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// One record to produce in the transaction.
struct Out {
    topic: Topic,
    key: Vec<u8>,
    payload: Option<Vec<u8>>,
    partition: Option<i32>,
    headers: Vec<(&'static str, Vec<u8>)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Topic {
    Changed,
    Events,
    Dlq,
    Changelog,
    TopUps,
}

/// When each owned meter next has a time-driven change (activation or expiry), so the tick
/// touches only what is due instead of scanning the store.
#[derive(Default)]
struct DueIndex {
    by_time: BTreeSet<(i64, i32, CustomerId, MeterName)>,
    by_key: HashMap<(i32, CustomerId, MeterName), i64>,
}

impl DueIndex {
    fn set(&mut self, p: i32, c: &CustomerId, m: &MeterName, due: Option<i64>) {
        let key = (p, c.clone(), m.clone());
        if let Some(old) = self.by_key.remove(&key) {
            self.by_time.remove(&(old, p, c.clone(), m.clone()));
        }
        if let Some(d) = due {
            self.by_time.insert((d, p, c.clone(), m.clone()));
            self.by_key.insert(key, d);
        }
    }

    /// The customers with something due at `now`, at most `limit` meters' worth.
    fn due(&self, now: i64, limit: usize) -> Vec<(i32, CustomerId)> {
        let mut out: Vec<(i32, CustomerId)> = self
            .by_time
            .iter()
            .take_while(|(d, ..)| *d <= now)
            .take(limit)
            .map(|(_, p, c, _)| (*p, c.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn clear(&mut self) {
        self.by_time.clear();
        self.by_key.clear();
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// A batch is folded per (partition, customer).
type GroupKey = (i32, CustomerId);

/// Work that is not driven by input records.
#[derive(Default)]
struct Housekeeping {
    /// Customers with grants to activate or expire now.
    ticks: Vec<(i32, CustomerId)>,
    /// Event records older than the dedupe window, to forget.
    forget: Vec<Vec<u8>>,
}

/// The exactly-once pipeline of one instance.
pub struct Pipeline {
    cfg: Arc<Config>,
    ledger: Ledger,
    store: Store,
    status: Arc<PipelineStatus>,
    shutdown: Shutdown,
    meter_names: Vec<MeterName>,
    partitions: i32,
}

/// The clients of one run of the loop; rebuilt after any transaction error.
struct Clients {
    consumer: BaseConsumer<ConsumerCtx>,
    producer: BaseProducer<ProducerCtx>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Pipeline {
    /// A pipeline over `store`, for topics with `partitions` partitions.
    pub fn new(
        cfg: Arc<Config>,
        ledger: Ledger,
        store: Store,
        status: Arc<PipelineStatus>,
        shutdown: Shutdown,
        partitions: i32,
    ) -> Self {
        let meter_names = ledger
            .meters()
            .all()
            .iter()
            .map(|d| d.name.clone())
            .collect();
        Self {
            cfg,
            ledger,
            store,
            status,
            shutdown,
            meter_names,
            partitions,
        }
    }

    /// Runs until shutdown, rebuilding the clients (with backoff) after any error.
    /// Blocking: run it on a dedicated thread.
    pub fn run(self) {
        let mut backoff = Duration::from_millis(200);
        while !self.shutdown.is_triggered() {
            let started = Instant::now();
            match self.run_once() {
                Ok(()) => break,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(200); // it had recovered: start over
                    }
                    self.status.set_running(false);
                    let reason = match &e {
                        PipelineError::Kafka(k) if is_fenced(k) => "fenced",
                        PipelineError::Kafka(_) => "kafka",
                        PipelineError::Store(_) => "store",
                        PipelineError::Restore(_) => "restore",
                        PipelineError::Delivery(_) => "delivery",
                    };
                    metrics::counter!(m::PIPELINE_RESTARTS, "reason" => reason).increment(1);
                    tracing::warn!(error = %e, reason, backoff_ms = backoff.as_millis() as u64, "pipeline stopped; restarting");
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !self.shutdown.is_triggered() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        self.status.set_running(false);
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "flushing the store at shutdown failed");
        }
        tracing::info!("pipeline stopped");
    }

    fn clients(&self) -> Result<Clients, PipelineError> {
        let k = &self.cfg.kafka;
        let producer: BaseProducer<ProducerCtx> = super::client_config(k)
            .set(
                "transactional.id",
                format!("{}-{}", k.group_id, k.instance_id),
            )
            .set(
                "transaction.timeout.ms",
                k.transaction_timeout.as_millis().to_string(),
            )
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "2000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .create_with_context(ProducerCtx {
                changelog: self.cfg.changelog_topic(),
                ..Default::default()
            })?;
        producer.init_transactions(Duration::from_secs(60))?;
        let consumer: BaseConsumer<ConsumerCtx> = super::client_config(k)
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
            .create_with_context(ConsumerCtx {
                events: Mutex::new(Vec::new()),
            })?;
        consumer.subscribe(&[&self.cfg.topics.usage, &self.cfg.topics.grants])?;
        Ok(Clients { consumer, producer })
    }

    fn run_once(&self) -> Result<(), PipelineError> {
        let c = self.clients()?;
        let mut restorer = Restorer::new(
            super::client_config(&self.cfg.kafka)
                .set("group.id", format!("{}-restore", self.cfg.kafka.group_id))
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed")
                .set("enable.partition.eof", "true")
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", "20")
                .create_with_context(QuietEof)?,
            self.cfg.changelog_topic(),
        );
        let mut owned: BTreeSet<i32> = BTreeSet::new();
        // Input positions of records polled for a partition still restoring: they were not
        // processed, so the partition is rewound there when its restore is done.
        let mut skipped: HashMap<(bool, i32), i64> = HashMap::new();
        // Partitions that moved away, and since when: their local state is dropped after a delay
        // (it is kept a while so a quick return restores from the checkpoint, not from scratch).
        let mut released: HashMap<i32, Instant> = HashMap::new();
        self.status.set_owned(owned.clone());
        self.status.set_restoring(restorer.remaining());
        self.status.set_running(true);
        let interval = self.cfg.pipeline.commit_interval;
        let max_batch = self.cfg.pipeline.max_batch;
        let tick_interval = self.cfg.pipeline.tick_interval;
        let purge_interval = (self.cfg.pipeline.dedupe_window / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        let drop_delay = self.cfg.pipeline.state_drop_delay;
        let mut due = DueIndex::default();
        let mut last_tick = Instant::now();
        let mut last_purge = Instant::now();
        tracing::info!(group = %self.cfg.kafka.group_id, "pipeline started");
        loop {
            if self.shutdown.is_triggered() {
                tracing::info!("shutdown: last batch committed; leaving the group");
                c.consumer.unsubscribe();
                return Ok(());
            }
            if !restorer.is_idle() {
                for r in restorer.step(&self.store, Duration::from_millis(50))? {
                    self.finish_restore(&c, r, &mut due, &mut skipped)?;
                }
                self.status.set_restoring(restorer.remaining());
            }
            let mut batch: Vec<Rec> = Vec::new();
            let window = if restorer.is_idle() {
                interval
            } else {
                Duration::from_millis(10)
            };
            let deadline = Instant::now() + window;
            let mut rebalanced = false;
            let restoring = restorer.remaining();
            while batch.len() < max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() && !batch.is_empty() {
                    break;
                }
                let polled = c.consumer.poll(left.max(Duration::from_millis(1)));
                if !c
                    .consumer
                    .context()
                    .events
                    .lock()
                    .expect("not poisoned")
                    .is_empty()
                {
                    rebalanced = true;
                    break;
                }
                match polled {
                    Some(Ok(msg)) => {
                        let rec = Rec::from_message(&msg, &self.cfg.topics.usage);
                        if restoring.contains_key(&rec.partition) {
                            let e = skipped
                                .entry((rec.usage, rec.partition))
                                .or_insert(rec.offset);
                            *e = (*e).min(rec.offset);
                        } else {
                            batch.push(rec);
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "consumer error (librdkafka retries)");
                    }
                    None => {}
                }
                if left.is_zero() || self.shutdown.is_triggered() {
                    break;
                }
            }
            if rebalanced {
                // Whatever was polled is not committed: drop it; the new assignment starts from
                // the committed offsets.
                let events =
                    std::mem::take(&mut *c.consumer.context().events.lock().expect("not poisoned"));
                for ev in events {
                    match ev {
                        RebalanceEvent::Revoke => {
                            let now = Instant::now();
                            for p in std::mem::take(&mut owned) {
                                released.insert(p, now);
                            }
                            due.clear();
                            skipped.clear();
                            restorer.cancel_all()?;
                            self.status.set_owned(BTreeSet::new());
                            tracing::info!("partitions revoked");
                        }
                        RebalanceEvent::Assign(parts) => {
                            tracing::info!(partitions = ?parts, "partitions assigned");
                            owned = parts.clone();
                            self.status.set_owned(owned.clone());
                            for p in &parts {
                                released.remove(p);
                            }
                            self.pause(&c, &parts, true)?;
                            for p in parts {
                                if let Some(r) = restorer.begin(&self.store, p)? {
                                    self.finish_restore(&c, r, &mut due, &mut skipped)?;
                                }
                            }
                        }
                    }
                }
                self.status.set_restoring(restorer.remaining());
                continue;
            }
            if !released.is_empty() {
                let expired: Vec<i32> = released
                    .iter()
                    .filter(|(_, t)| t.elapsed() >= drop_delay)
                    .map(|(p, _)| *p)
                    .collect();
                for p in expired {
                    released.remove(&p);
                    self.store.drop_partition(p)?;
                    tracing::info!(
                        partition = p,
                        "dropped the local state of a partition owned elsewhere"
                    );
                }
            }
            let mut chores = Housekeeping::default();
            if last_tick.elapsed() >= tick_interval {
                last_tick = Instant::now();
                chores.ticks = due.due(now_ms(), 10_000);
            }
            if last_purge.elapsed() >= purge_interval && restorer.is_idle() {
                last_purge = Instant::now();
                let cutoff = now_ms() - self.cfg.pipeline.dedupe_window.as_millis() as i64;
                for p in &owned {
                    chores
                        .forget
                        .extend(self.store.expired_events(*p, cutoff, 10_000)?);
                }
                if !chores.forget.is_empty() {
                    tracing::info!(
                        records = chores.forget.len(),
                        "forgetting usage ids older than the dedupe window"
                    );
                }
            }
            if batch.is_empty() && chores.ticks.is_empty() && chores.forget.is_empty() {
                continue;
            }
            self.process(&c, batch, chores, &mut due)?;
        }
    }

    /// Pauses (or resumes) both input topics' partition `p`s.
    fn pause(&self, c: &Clients, parts: &BTreeSet<i32>, pause: bool) -> Result<(), PipelineError> {
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            tpl.add_partition(&self.cfg.topics.usage, *p);
            tpl.add_partition(&self.cfg.topics.grants, *p);
        }
        if pause {
            c.consumer.pause(&tpl)?;
        } else {
            c.consumer.resume(&tpl)?;
        }
        Ok(())
    }

    /// A partition's state is restored: index its due times, rewind its input to anything
    /// skipped meanwhile, and resume it.
    fn finish_restore(
        &self,
        c: &Clients,
        r: Restored,
        due: &mut DueIndex,
        skipped: &mut HashMap<(bool, i32), i64>,
    ) -> Result<(), PipelineError> {
        let p = r.partition;
        for (d, customer, meter) in self.store.due_meters(p)? {
            due.set(p, &customer, &meter, Some(d));
        }
        for usage in [true, false] {
            if let Some(off) = skipped.remove(&(usage, p)) {
                let topic = if usage {
                    &self.cfg.topics.usage
                } else {
                    &self.cfg.topics.grants
                };
                c.consumer
                    .seek(topic, p, Offset::Offset(off), Duration::from_secs(10))?;
            }
        }
        self.pause(c, &BTreeSet::from([p]), false)?;
        tracing::info!(
            partition = p,
            restored_records = r.records,
            secs_since_assignment = r.secs,
            "partition ready"
        );
        Ok(())
    }

    /// Folds a batch, commits it in one transaction, then writes the store.
    #[tracing::instrument(skip_all, fields(records = batch.len()))]
    fn process(
        &self,
        c: &Clients,
        batch: Vec<Rec>,
        chores: Housekeeping,
        due: &mut DueIndex,
    ) -> Result<(), PipelineError> {
        let started = Instant::now();
        let now = now_ms();
        let format = self.cfg.pipeline.output_format;
        let mut outs: Vec<Out> = Vec::with_capacity(batch.len() * 3);
        // Forgotten ids first, so anything this batch writes wins.
        let mut mutations: Vec<Mutation> = chores.forget.into_iter().map(|k| (k, None)).collect();
        let mut due_updates: Vec<(i32, CustomerId, MeterName, Option<i64>)> = Vec::new();
        // Next offsets to commit per (usage?, partition).
        let mut offsets: BTreeMap<(bool, i32), i64> = BTreeMap::new();
        // Decode, then group by (partition, customer), keeping order.
        let mut groups: Vec<(GroupKey, Vec<(usize, Input)>)> = Vec::new();
        let mut index: HashMap<(i32, CustomerId), usize> = HashMap::new();
        let mut counts: HashMap<(bool, &'static str), u64> = HashMap::new();
        for (i, r) in batch.iter().enumerate() {
            offsets.insert((r.usage, r.partition), r.offset + 1);
            *counts.entry((r.usage, "consumed")).or_default() += 1;
            let decoded = if r.usage {
                codec::decode_usage(r.payload.as_deref(), r.content_type(), r.key.as_deref())
            } else {
                codec::decode_command(r.payload.as_deref(), r.content_type(), r.key.as_deref())
            };
            match decoded {
                Ok(input) => {
                    let customer = input.customer().clone();
                    if partition_for(customer.as_str().as_bytes(), self.partitions) != r.partition {
                        metrics::counter!(m::RECORDS_MISROUTED).increment(1);
                    }
                    let k = (r.partition, customer);
                    let gi = *index.entry(k.clone()).or_insert_with(|| {
                        groups.push((k, Vec::new()));
                        groups.len() - 1
                    });
                    groups[gi].1.push((i, input));
                }
                Err(e) => outs.push(self.dead_letter(r, "decode", &e.to_string(), e.reason())),
            }
        }
        for k in chores.ticks {
            if !index.contains_key(&k) {
                index.insert(k.clone(), groups.len());
                groups.push((k, Vec::new()));
            }
        }
        let history_len = self.cfg.pipeline.history_len as u64;
        let mut results: Vec<Output> = Vec::new();
        for ((p, customer), inputs) in groups {
            let mut refs = Refs::default();
            for (_, input) in &inputs {
                input.refs(&mut refs);
            }
            let mut book: Book = self
                .store
                .load_book(p, &customer, &self.meter_names, &refs)?;
            // Time first: what expired or became active by now, for every meter of the customer.
            self.ledger.advance(&mut book, now, &mut results);
            for (i, input) in &inputs {
                let r = &batch[*i];
                match self.ledger.apply(&mut book, input, now, &mut results) {
                    Ok(Applied::Applied) => *counts.entry((r.usage, "applied")).or_default() += 1,
                    Ok(Applied::Duplicate) => {
                        *counts.entry((r.usage, "duplicate")).or_default() += 1
                    }
                    Ok(Applied::NoMeter) => metrics::counter!(m::RECORDS_UNMETERED).increment(1),
                    Err(e) => {
                        let e = CodecError::Invalid(e);
                        outs.push(self.dead_letter(r, "apply", &e.to_string(), e.reason()));
                    }
                }
            }
            for out in results.drain(..) {
                match out {
                    Output::Changed(ch) => {
                        let slot = (ch.version % history_len) as u32;
                        mutations.push((
                            store::history_key(p, &customer, &ch.meter, slot),
                            Some(store::encode(&ch)),
                        ));
                        outs.push(Out {
                            topic: Topic::Changed,
                            key: customer.as_str().as_bytes().to_vec(),
                            payload: Some(codec::encode_changed(&ch, format)),
                            partition: None,
                            headers: vec![("content-type", content_type(format).into())],
                        });
                    }
                    Output::Transition(t) => {
                        let label = codec::transition_label(t.kind);
                        metrics::counter!(m::TRANSITIONS, "kind" => label).increment(1);
                        outs.push(Out {
                            topic: Topic::Events,
                            key: customer.as_str().as_bytes().to_vec(),
                            payload: Some(codec::encode_transition(&t, format)),
                            partition: None,
                            headers: vec![
                                ("content-type", content_type(format).into()),
                                ("type", label.into()),
                            ],
                        });
                    }
                    Output::TopUp(t) => {
                        let source = codec::top_up_source_label(t.source);
                        metrics::counter!(m::TOP_UP_REQUESTS, "source" => source).increment(1);
                        outs.push(Out {
                            topic: Topic::TopUps,
                            key: customer.as_str().as_bytes().to_vec(),
                            payload: Some(codec::encode_top_up(&t, format)),
                            partition: None,
                            headers: vec![
                                ("content-type", content_type(format).into()),
                                ("request-id", t.request_id.into_bytes()),
                            ],
                        });
                    }
                }
            }
            for d in book.take_dirty() {
                let (key, value) = match &d {
                    Dirty::Meter(name) => {
                        let state = book.meters.get(name);
                        due_updates.push((
                            p,
                            customer.clone(),
                            name.clone(),
                            state.and_then(|s| s.next_due()),
                        ));
                        (
                            store::meter_key(p, &customer, name),
                            state.map(store::encode),
                        )
                    }
                    Dirty::Event(id) => (
                        store::event_key(p, &customer, id.as_str()),
                        book.events
                            .get(id)
                            .and_then(|r| r.as_ref())
                            .map(store::encode),
                    ),
                    Dirty::Grant(id) => (
                        store::grant_key(p, &customer, id.as_str()),
                        book.grants
                            .get(id)
                            .and_then(|r| r.as_ref())
                            .map(store::encode),
                    ),
                };
                mutations.push((key, value));
            }
        }
        // Changelog: every mutation, to the partition it belongs to (encoded in the key).
        for (k, v) in &mutations {
            let p = i32::from(u16::from_be_bytes([k[1], k[2]]));
            outs.push(Out {
                topic: Topic::Changelog,
                key: k.clone(),
                payload: v.clone(),
                partition: Some(p),
                headers: vec![],
            });
        }
        let checkpoints = self.transact(c, &outs, &offsets)?;
        self.store.write(&mutations, &checkpoints)?;
        for (p, customer, meter, d) in due_updates {
            due.set(p, &customer, &meter, d);
        }
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!(m::TXN_COMMIT_SECONDS).record(elapsed);
        metrics::histogram!(m::BATCH_RECORDS).record(batch.len() as f64);
        let done = now_ms();
        for r in &batch {
            if let Some(ts) = r.timestamp {
                metrics::histogram!(m::E2E_LATENCY_SECONDS)
                    .record((done - ts).max(0) as f64 / 1000.0);
            }
        }
        for ((usage, what), n) in counts {
            let topic = if usage { "usage" } else { "grants" };
            let name = match what {
                "consumed" => m::RECORDS_CONSUMED,
                "applied" => m::RECORDS_APPLIED,
                _ => m::RECORDS_DUPLICATE,
            };
            metrics::counter!(name, "topic" => topic).increment(n);
        }
        let mut produced: HashMap<Topic, u64> = HashMap::new();
        for o in &outs {
            *produced.entry(o.topic).or_default() += 1;
        }
        for (t, n) in produced {
            let label = match t {
                Topic::Changed => "balance_changed",
                Topic::Events => "balance_events",
                Topic::Dlq => "dlq",
                Topic::Changelog => "changelog",
                Topic::TopUps => "top_up_requests",
            };
            metrics::counter!(m::OUTPUTS_PRODUCED, "topic" => label).increment(n);
            if t == Topic::Dlq {
                // counted per reason in dead_letter
            }
        }
        tracing::debug!(
            records = batch.len(),
            outputs = outs.len(),
            secs = elapsed,
            due = due.len(),
            "batch committed"
        );
        Ok(())
    }

    /// One transaction: produce `outs`, commit `offsets` with the group metadata, commit.
    /// Returns the changelog checkpoints (next offset per partition) the store may now record.
    fn transact(
        &self,
        c: &Clients,
        outs: &[Out],
        offsets: &BTreeMap<(bool, i32), i64>,
    ) -> Result<Vec<(i32, i64)>, PipelineError> {
        let ctx = c.producer.context();
        ctx.changelog_offsets.lock().expect("not poisoned").clear();
        *ctx.failure.lock().expect("not poisoned") = None;
        ctx.delivered.store(0, Ordering::Release);
        c.producer.begin_transaction()?;
        let result = (|| -> Result<(), PipelineError> {
            let t = &self.cfg.topics;
            let changelog = self.cfg.changelog_topic();
            for o in outs {
                let topic = match o.topic {
                    Topic::Changed => t.balance_changed.as_str(),
                    Topic::Events => t.balance_events.as_str(),
                    Topic::Dlq => t.dlq.as_str(),
                    Topic::Changelog => changelog.as_str(),
                    Topic::TopUps => t.top_up_requests.as_str(),
                };
                let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
                for (k, v) in &o.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v.as_slice()),
                    });
                }
                let mut rec: BaseRecord<'_, [u8], [u8]> =
                    BaseRecord::to(topic).key(o.key.as_slice()).headers(headers);
                if let Some(p) = &o.payload {
                    rec = rec.payload(p.as_slice());
                }
                if let Some(p) = o.partition {
                    rec = rec.partition(p);
                }
                loop {
                    match c.producer.send(rec) {
                        Ok(()) => break,
                        Err((
                            KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull,
                            ),
                            back,
                        )) => {
                            rec = back;
                            c.producer.poll(Duration::from_millis(10));
                        }
                        Err((e, _)) => return Err(e.into()),
                    }
                }
            }
            // Wait for every delivery report: they carry the changelog offsets.
            let want = outs.len() as u64;
            let deadline = Instant::now() + self.cfg.kafka.transaction_timeout;
            while ctx.delivered.load(Ordering::Acquire) < want {
                if Instant::now() > deadline {
                    return Err(PipelineError::Delivery(
                        "timed out waiting for delivery reports".into(),
                    ));
                }
                c.producer.poll(Duration::from_millis(5));
            }
            if let Some(f) = ctx.failure.lock().expect("not poisoned").take() {
                return Err(PipelineError::Delivery(f));
            }
            let mut tpl = TopicPartitionList::new();
            for ((usage, p), off) in offsets {
                let topic = if *usage { &t.usage } else { &t.grants };
                tpl.add_partition_offset(topic, *p, Offset::Offset(*off))?;
            }
            if tpl.count() > 0 {
                let meta = c
                    .consumer
                    .group_metadata()
                    .ok_or_else(|| PipelineError::Delivery("no consumer group metadata".into()))?;
                c.producer
                    .send_offsets_to_transaction(&tpl, &meta, Duration::from_secs(30))?;
            }
            c.producer.commit_transaction(Duration::from_secs(60))?;
            Ok(())
        })();
        if let Err(e) = result {
            let reason = match &e {
                PipelineError::Kafka(k) if is_fenced(k) => "fenced",
                _ => "error",
            };
            metrics::counter!(m::TXN_ABORTED, "reason" => reason).increment(1);
            if let Err(abort) = c.producer.abort_transaction(Duration::from_secs(30)) {
                tracing::warn!(error = %abort, "abort_transaction failed");
            }
            return Err(e);
        }
        metrics::counter!(m::TXN_COMMITTED).increment(1);
        let offs = ctx.changelog_offsets.lock().expect("not poisoned");
        Ok(offs.iter().map(|(p, o)| (*p, o + 1)).collect())
    }

    fn dead_letter(
        &self,
        r: &Rec,
        stage: &'static str,
        message: &str,
        reason: &'static str,
    ) -> Out {
        metrics::counter!(m::RECORDS_REJECTED, "reason" => reason, "stage" => stage).increment(1);
        tracing::debug!(
            partition = r.partition,
            offset = r.offset,
            reason,
            stage,
            message,
            "record rejected"
        );
        let source = if r.usage {
            &self.cfg.topics.usage
        } else {
            &self.cfg.topics.grants
        };
        let mut headers: Vec<(&'static str, Vec<u8>)> = vec![
            ("error.reason", reason.as_bytes().to_vec()),
            ("error.stage", stage.as_bytes().to_vec()),
            ("error.message", message.as_bytes().to_vec()),
            ("source.topic", source.as_bytes().to_vec()),
            ("source.partition", r.partition.to_string().into_bytes()),
            ("source.offset", r.offset.to_string().into_bytes()),
        ];
        if let Some(ct) = r.content_type() {
            headers.push(("content-type", ct.as_bytes().to_vec()));
        }
        Out {
            topic: Topic::Dlq,
            key: r.key.clone().unwrap_or_default(),
            payload: r.payload.clone(),
            partition: None,
            headers,
        }
    }
}

fn content_type(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Json => codec::JSON,
        OutputFormat::Protobuf => codec::PROTOBUF,
    }
}

fn is_fenced(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::Fenced) | Some(C::ProducerFenced) | Some(C::InvalidProducerEpoch)
    )
}
