//! The consume -> fold -> transact -> materialise loop (the protocol is in the `kafka` module
//! docs). One file per job:
//! - this file: [`Pipeline`] (restarts with backoff) and the loop, whose state is [`Loop`];
//! - [`clients`]: the consumer and the transactional producer, with their callbacks;
//! - [`merge`]: the order of a partition's input (its two topics merged by timestamp);
//! - [`stream_time`]: the clock the rules run on, per partition (event time less a grace);
//! - [`fold`]: the pure part, records + books + stream times -> [`fold::Commit`];
//! - [`transaction`]: one Kafka transaction per commit;
//! - [`assignment`]: rebalances, restore hand-off;
//! - [`claims`]: which loop owns what, and dropping the state of released partitions;
//! - [`housekeeping`]: the due index (ticks) and the dedupe-window purge.

mod assignment;
mod claims;
mod clients;
pub mod fold;
mod housekeeping;
mod merge;
pub mod stream_time;
mod transaction;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::Message;

use self::assignment::{Assignment, Parts};
use self::claims::Claims;
use self::clients::{Clients, ConsumerCtx};
use self::fold::{Folder, InputRecord};
use self::housekeeping::Housekeeping;
use self::merge::{Merge, Timed};
use self::stream_time::StreamTimes;
use self::transaction::TopicNames;
use super::restore::{RestoreError, Restorer};
use super::{InputTopic, LoopStatus, PipelineStatus};
use crate::config::Config;
use crate::ledger::Ledger;
use crate::metrics as m;
use crate::shutdown::Shutdown;
use crate::store::{BookCache, Store, StoreError};

/// With records in the batch, how long a poll waits before the loop checks whether the input is
/// caught up (and ends the window early).
const CAUGHT_UP_CHECK: Duration = Duration::from_millis(2);

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
    /// A pipeline thread panicked.
    #[error("a pipeline thread panicked: {0}")]
    Panicked(String),
    /// The topics' partition counts changed while running (partitions were added to a topic):
    /// the inputs and the changelog are no longer co-partitioned.
    #[error(
        "partition {partition} was assigned, but the topics had {count} partitions at start-up: \
         partitions were added to an input topic while running. The inputs and the changelog \
         must have the same count: add the same partitions to the other input topic and to the \
         changelog, then restart (a customer's partition changes with the count: see the runbook)"
    )]
    PartitionsChanged {
        /// The unexpected partition.
        partition: i32,
        /// The count at start-up.
        count: i32,
    },
}

impl PipelineError {
    /// The `reason` label of `drawdown_pipeline_restarts_total`.
    fn reason(&self) -> &'static str {
        match self {
            PipelineError::Kafka(k) if is_fenced(k) => "fenced",
            PipelineError::Kafka(_) => "kafka",
            PipelineError::Store(_) => "store",
            PipelineError::Restore(_) => "restore",
            PipelineError::Delivery(_) => "delivery",
            PipelineError::Panicked(_) => "panic",
            PipelineError::PartitionsChanged { .. } => "partitions",
        }
    }

    /// Whether retrying cannot help: the state is of another format, a thread panicked, or the
    /// partition counts changed under a running pipeline.
    pub fn is_fatal(&self) -> bool {
        match self {
            PipelineError::Store(e) | PipelineError::Restore(RestoreError::Store(e)) => {
                e.is_fatal()
            }
            PipelineError::Panicked(_) | PipelineError::PartitionsChanged { .. } => true,
            _ => false,
        }
    }
}

fn is_fenced(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::Fenced) | Some(C::ProducerFenced) | Some(C::InvalidProducerEpoch)
    )
}

/// The exactly-once pipeline of one instance.
pub struct Pipeline {
    cfg: Arc<Config>,
    folder: Folder,
    store: Store,
    status: Arc<PipelineStatus>,
    shutdown: Shutdown,
    claims: Claims,
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
    ) -> Result<Self, StoreError> {
        let folder = Folder::new(ledger, &cfg, partitions);
        let claims = Claims::new(store.partitions()?);
        Ok(Self {
            cfg,
            folder,
            store,
            status,
            shutdown,
            claims,
        })
    }

    /// Runs `pipeline.threads` loops until shutdown, each rebuilding its clients (with backoff)
    /// after any error. Blocking: run it on a dedicated thread. Returns the error that stopped
    /// it for good (a fatal one, or a panic), after triggering shutdown.
    pub fn run(self) -> Result<(), PipelineError> {
        let threads = self.cfg.pipeline.threads();
        let this = &self;
        let result = std::thread::scope(|scope| {
            let span = tracing::Span::current();
            let handles: Vec<_> = (0..threads)
                .map(|id| {
                    let span = span.clone();
                    std::thread::Builder::new()
                        .name(format!("pipeline-{id}"))
                        .spawn_scoped(scope, move || span.in_scope(|| this.supervise(id)))
                        .expect("spawning a pipeline thread")
                })
                .collect();
            let mut first = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(PipelineError::Panicked("unknown".into())));
                if first.is_ok() {
                    first = r;
                }
            }
            first
        });
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "flushing the store at shutdown failed");
        }
        tracing::info!("pipeline stopped");
        result
    }

    /// Runs loop `id`, restarting it after errors, until shutdown or a fatal error (which
    /// stops every loop: the process must exit and be restarted or fixed).
    fn supervise(&self, id: usize) -> Result<(), PipelineError> {
        let status = self.status.for_loop(id);
        stop_on_failure(&status, &self.shutdown, || self.restart_loop(id, &status))
    }

    fn restart_loop(&self, id: usize, status: &LoopStatus) -> Result<(), PipelineError> {
        let mut backoff = Duration::from_millis(200);
        while !self.shutdown.is_triggered() {
            let started = Instant::now();
            let result = Clients::new(&self.cfg, id)
                .and_then(|clients| Loop::new(self, &clients, status.clone())?.run());
            match result {
                Ok(()) => break,
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(200); // it had recovered: start over
                    }
                    status.set_running(false);
                    let reason = e.reason();
                    metrics::counter!(m::PIPELINE_RESTARTS, "reason" => reason).increment(1);
                    tracing::warn!(error = %e, reason, thread = id, backoff_ms = backoff.as_millis() as u64, "pipeline stopped; restarting");
                    self.shutdown.sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        Ok(())
    }
}

/// Runs loop `status` with `run`. If it fails for good or panics, the instance is failed at once
/// (`/readyz` 503, no partition served or announced) and shutdown is triggered, so the process
/// exits non-zero and its orchestrator restarts it; its partitions move to other members.
fn stop_on_failure(
    status: &LoopStatus,
    shutdown: &Shutdown,
    run: impl FnOnce() -> Result<(), PipelineError>,
) -> Result<(), PipelineError> {
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(PipelineError::Panicked(what))
        });
    if let Err(e) = &result {
        tracing::error!(error = %e, thread = status.id(), "the pipeline cannot go on: stopping drawdown");
        status.set_failed();
        shutdown.trigger();
    }
    status.set_running(false);
    result
}

/// What one poll of the loop brought.
enum Polled<'c> {
    /// Records to fold (possibly none) in merged order, still in librdkafka's buffers.
    Batch(Vec<Fetched<'c>>),
    /// The assignment changed: what was polled is dropped.
    Rebalanced,
}

/// The state of one run of the loop (rebuilt from scratch after any error).
struct Loop<'a> {
    p: &'a Pipeline,
    status: LoopStatus,
    clients: &'a Clients,
    restorer: Restorer,
    assignment: Assignment,
    housekeeping: Housekeeping,
    cache: BookCache,
    names: TopicNames,
    /// Records polled and not folded yet (waiting for the other topic's partition).
    merge: Merge<Fetched<'a>>,
    /// The stream time of each partition of the loop.
    times: StreamTimes,
    /// Time spent polling so far: the merge's clock for `max_idle`.
    polling: Duration,
}

/// A polled record and its topic.
struct Fetched<'c> {
    msg: BorrowedMessage<'c>,
    topic: InputTopic,
}

impl Timed for Fetched<'_> {
    fn topic(&self) -> InputTopic {
        self.topic
    }
    fn partition(&self) -> i32 {
        self.msg.partition()
    }
    fn offset(&self) -> i64 {
        self.msg.offset()
    }
    fn timestamp(&self) -> Option<i64> {
        self.msg.timestamp().to_millis()
    }
}

impl<'a> Loop<'a> {
    fn new(
        p: &'a Pipeline,
        clients: &'a Clients,
        status: LoopStatus,
    ) -> Result<Self, PipelineError> {
        let l = Self {
            p,
            status,
            clients,
            restorer: Restorer::new(&p.cfg)?,
            assignment: Assignment::default(),
            housekeeping: Housekeeping::new(&p.cfg.pipeline),
            cache: BookCache::new(p.cfg.store.book_cache_mb << 20),
            names: TopicNames::new(&p.cfg),
            merge: Merge::new(p.cfg.pipeline.max_idle, p.cfg.pipeline.max_batch),
            times: StreamTimes::new(p.cfg.pipeline.grace, p.cfg.pipeline.max_future_skew),
            polling: Duration::ZERO,
        };
        l.status.set_revoked();
        p.claims.release_all(l.status.id());
        l.status.set_restoring(l.restorer.remaining());
        l.status.set_running(true);
        Ok(l)
    }

    fn parts(&mut self) -> Parts<'_> {
        Parts {
            clients: self.clients,
            restorer: &mut self.restorer,
            store: &self.p.store,
            status: &self.status,
            due: &mut self.housekeeping.due,
            deltas: &mut self.housekeeping.deltas,
            cache: &mut self.cache,
            topics: &self.p.cfg.topics,
            claims: &self.p.claims,
            loop_id: self.status.id(),
            transaction_timeout: self.p.cfg.kafka.transaction_timeout,
            times: &mut self.times,
            partitions: self.p.folder.partitions(),
        }
    }

    fn run(&mut self) -> Result<(), PipelineError> {
        tracing::info!(group = %self.p.cfg.kafka.group_id, "pipeline started");
        loop {
            if self.p.shutdown.is_triggered() {
                tracing::info!("shutdown: last batch committed; leaving the group");
                self.clients.consumer.unsubscribe();
                return Ok(());
            }
            self.restore_step()?;
            let messages = match self.poll()? {
                Polled::Rebalanced => {
                    self.merge.clear();
                    let events = self.clients.consumer.context().take_events();
                    let mut assignment = std::mem::take(&mut self.assignment);
                    let result = assignment.rebalance(events, &mut self.parts());
                    self.assignment = assignment;
                    result?;
                    continue;
                }
                Polled::Batch(messages) => messages,
            };
            let records: Vec<InputRecord<'_>> = messages.iter().map(input_record).collect();
            let delay = self.p.cfg.pipeline.state_drop_delay;
            self.p.claims.drop_expired(&self.p.store, delay)?;
            self.forget()?;
            let ticks = self.housekeeping.ticks(&self.p.store, &self.times)?;
            if records.is_empty() && ticks.is_empty() {
                continue;
            }
            self.commit(records, ticks)?;
        }
    }

    /// Moves the partitions being handed over along: settles those waiting for stable
    /// offsets, and replays changelog records of those restoring, for a short while.
    fn restore_step(&mut self) -> Result<(), PipelineError> {
        if self.assignment.is_settled(&self.restorer) {
            return Ok(());
        }
        let mut assignment = std::mem::take(&mut self.assignment);
        let mut result = assignment.settle(&mut self.parts());
        if result.is_ok() && !self.restorer.is_idle() {
            result = self
                .restorer
                .step(&self.p.store, Duration::from_millis(50))
                .map_err(PipelineError::from)
                .and_then(|done| {
                    done.into_iter()
                        .try_for_each(|r| assignment.finish_restore(r, &mut self.parts()))
                });
        }
        self.status
            .set_restoring(assignment.unready(&self.restorer));
        self.assignment = assignment;
        result
    }

    /// Polls input into the merge for up to `commit_interval` (10 ms while restoring), until
    /// the window's records reach `max_batch` or name `max_batch_customers` customers, or
    /// until, with records in the batch, every served partition is caught up; then releases
    /// what may be folded now, in merged order. A served partition with nothing to fold and
    /// nothing more on the broker is idle: its stream time follows the wall clock.
    fn poll(&mut self) -> Result<Polled<'a>, PipelineError> {
        let cfg = &self.p.cfg.pipeline;
        let window = if self.assignment.is_settled(&self.restorer) {
            cfg.commit_interval
        } else {
            Duration::from_millis(10)
        };
        let deadline = Instant::now() + window;
        let restoring = self.assignment.unready(&self.restorer);
        let consumer: &'a BaseConsumer<ConsumerCtx> = &self.clients.consumer;
        let mut size = BatchSize::new(cfg.max_batch, cfg.max_batch_customers);
        // Kept when the window ends because everything is caught up.
        let mut caught_up = None;
        while !size.is_full() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && size.records > 0 {
                break;
            }
            // Once the batch has records, the queue is checked in short polls: when it runs
            // dry and nothing more is on the broker, the window ends early (waiting longer
            // only delays what was polled).
            let wait = if size.records > 0 {
                left.min(CAUGHT_UP_CHECK)
            } else {
                left
            };
            let polled = consumer.poll(wait.max(Duration::from_millis(1)));
            if consumer.context().rebalanced() {
                return Ok(Polled::Rebalanced);
            }
            match polled {
                // A partition not served yet is paused; anything fetched before the pause is
                // dropped (it resumes at its committed offsets).
                Some(Ok(msg)) if !restoring.contains_key(&msg.partition()) => {
                    size.add(msg.partition(), msg.key());
                    let topic = topic_of(&msg, &self.p.cfg.topics.usage);
                    self.merge.push(Fetched { msg, topic });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "consumer error (librdkafka retries)");
                }
                None if size.records > 0 => {
                    let set = self.caught_up();
                    let served = self
                        .assignment
                        .owned
                        .iter()
                        .filter(|p| !restoring.contains_key(p));
                    if served.copied().all(|p| both_caught_up(&set, p)) {
                        caught_up = Some(set);
                        break;
                    }
                }
                None => {}
            }
            if left.is_zero() || self.p.shutdown.is_triggered() {
                break;
            }
        }
        self.polling += window.min(Instant::now().saturating_duration_since(deadline - window));
        let caught_up = caught_up.unwrap_or_else(|| self.caught_up());
        let batch = self
            .merge
            .release(self.polling, |t, p| caught_up.contains(&(t, p)));
        metrics::gauge!(m::RECORDS_HELD, "thread" => self.status.id().to_string())
            .set(self.merge.held() as f64);
        let unordered = self.merge.take_unordered();
        if unordered > 0 {
            metrics::counter!(m::RECORDS_UNORDERED).increment(unordered);
        }
        // Backpressure (see `merge`): a full queue's topic-partition is paused at the source,
        // so librdkafka's prefetch drains and the other topic's partition is fetched.
        let throttle = self.merge.throttle();
        if !throttle.pause.is_empty() {
            tracing::debug!(paused = ?throttle.pause, "input throttled");
            metrics::counter!(m::INPUT_THROTTLED).increment(throttle.pause.len() as u64);
        }
        let topics = &self.p.cfg.topics;
        clients::set_paused(consumer, topics, throttle.pause, true)?;
        let served = |&(_, p): &(InputTopic, i32)| {
            self.assignment.owned.contains(&p) && !restoring.contains_key(&p)
        };
        clients::set_paused(
            consumer,
            topics,
            throttle.resume.into_iter().filter(served),
            false,
        )?;
        let wall = crate::clock::now_ms();
        let in_batch: std::collections::BTreeSet<i32> =
            batch.iter().map(|f| f.msg.partition()).collect();
        for p in &self.assignment.owned {
            let quiet = !restoring.contains_key(p)
                && !in_batch.contains(p)
                && both_caught_up(&caught_up, *p);
            if quiet && !self.merge.holds(*p) {
                self.times.idle(*p, wall);
            }
        }
        Ok(Polled::Batch(batch))
    }

    /// The input topic-partitions with nothing more on the broker past what was polled, as
    /// far as librdkafka's last fetch responses tell (no request is made).
    fn caught_up(&self) -> std::collections::HashSet<(InputTopic, i32)> {
        let consumer = &self.clients.consumer;
        let Ok(position) = consumer.position() else {
            return Default::default();
        };
        let mut out = std::collections::HashSet::new();
        for e in position.elements() {
            let topic = if e.topic() == self.p.cfg.topics.usage {
                InputTopic::Usage
            } else {
                InputTopic::Grants
            };
            let Some((low, high)) = clients::cached_watermarks(consumer, e.topic(), e.partition())
            else {
                continue;
            };
            // Where the loop stands: librdkafka's position once a record was polled since the
            // partition resumed, else the offset it resumed at. (Without the latter, a
            // partition resumed at its end, with nothing new to poll, never counted as caught
            // up, and the other topic's records waited out `max_idle` after every restart.)
            let polled = match e.offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => low,
            };
            let resumed = self.assignment.resumed.get(&(topic, e.partition()));
            let at = polled.max(resumed.copied().unwrap_or(low));
            if at >= high {
                out.insert((topic, e.partition()));
            }
        }
        out
    }

    /// Commits `commit` in one transaction, then writes its state and checkpoints locally.
    fn transact(&mut self, commit: &mut fold::Commit) -> Result<(), PipelineError> {
        let timeout = self.p.cfg.kafka.transaction_timeout;
        let checkpoints = transaction::transact(self.clients, &self.names, commit, timeout)?;
        self.p
            .store
            .write_timed(&commit.state, &checkpoints, self.times.all())?;
        Ok(())
    }

    /// Drops the time buckets that left the dedupe window, in a commit of their own (so the
    /// new horizon applies to every later load).
    fn forget(&mut self) -> Result<(), PipelineError> {
        let drop = self.housekeeping.drop(&self.p.store, &self.times)?;
        if drop.writes.is_empty() {
            return Ok(());
        }
        let mut commit = fold::Commit {
            state: drop.writes,
            ..Default::default()
        };
        self.transact(&mut commit)?;
        self.housekeeping.dropped(&drop.emptied);
        tracing::debug!(
            records = commit.state.len(),
            "dropped time buckets of usage ids"
        );
        Ok(())
    }

    /// One commit cycle: decode, load, fold, transact, then write the store.
    #[tracing::instrument(skip_all, fields(records = records.len()))]
    fn commit(
        &mut self,
        records: Vec<InputRecord<'_>>,
        ticks: Vec<crate::store::Due>,
    ) -> Result<(), PipelineError> {
        let started = Instant::now();
        let wall = crate::clock::now_ms();
        let folder = &self.p.folder;
        let mut decoded = folder.decode(&records, &mut self.times, wall);
        for due in ticks {
            decoded.tick(due);
        }
        let books = self
            .p
            .store
            .load_books(&decoded.requests(), &mut self.cache)?;
        let mut commit = folder.fold(
            &records,
            decoded,
            books,
            self.housekeeping.deltas.next_seq(),
            &self.times,
        );
        let outputs = commit.outputs.len();
        self.transact(&mut commit)?;
        self.housekeeping.due.written(&commit.due_floor);
        self.housekeeping.deltas.committed(&commit.deltas);
        for (p, book) in commit.books {
            self.cache.put(p, book.customer, book.meters);
        }
        commit.counts.publish();
        let elapsed = started.elapsed().as_secs_f64();
        metrics::histogram!(m::TXN_COMMIT_SECONDS).record(elapsed);
        metrics::histogram!(m::BATCH_RECORDS).record(records.len() as f64);
        let done = crate::clock::now_ms();
        // One registry lookup per batch, not per record.
        let latency = metrics::histogram!(m::E2E_LATENCY_SECONDS);
        for r in &records {
            if let Some(ts) = r.timestamp {
                latency.record((done - ts).max(0) as f64 / 1000.0);
            }
        }
        tracing::debug!(
            records = records.len(),
            outputs,
            secs = elapsed,
            "batch committed"
        );
        Ok(())
    }
}

/// How much a poll window has taken in: records, and the customers they name (a batch holds a
/// decoded book for each, so at a million customers the customers bound its memory).
struct BatchSize {
    max_records: usize,
    max_customers: usize,
    records: usize,
    /// Hashes of (partition, key): the key is the customer id. Kept as they are, not hashed
    /// again by the set (one hash per polled record).
    customers: std::collections::HashSet<u64, std::hash::BuildHasherDefault<Prehashed>>,
}

/// The hasher of a set of hashes: a hash is its own hash.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64s are hashed here; anything else is folded in rather than a panic.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl BatchSize {
    fn new(max_records: usize, max_customers: usize) -> Self {
        Self {
            max_records,
            max_customers,
            records: 0,
            customers: Default::default(),
        }
    }

    fn add(&mut self, partition: i32, key: Option<&[u8]>) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (partition, key).hash(&mut h);
        self.records += 1;
        self.customers.insert(h.finish());
    }

    fn is_full(&self) -> bool {
        self.records >= self.max_records || self.customers.len() >= self.max_customers
    }
}

/// Whether both input topics of partition `p` are in `caught_up` (see [`Loop::caught_up`]).
fn both_caught_up(caught_up: &std::collections::HashSet<(InputTopic, i32)>, p: i32) -> bool {
    InputTopic::ALL.iter().all(|t| caught_up.contains(&(*t, p)))
}

fn topic_of(m: &BorrowedMessage<'_>, usage_topic: &str) -> InputTopic {
    if m.topic() == usage_topic {
        InputTopic::Usage
    } else {
        InputTopic::Grants
    }
}

/// A record as the fold reads it, borrowed from librdkafka's buffer (nothing is copied).
fn input_record<'m>(f: &'m Fetched<'_>) -> InputRecord<'m> {
    let m = &f.msg;
    let content_type = m.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key.eq_ignore_ascii_case("content-type"))
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    });
    InputRecord {
        topic: f.topic,
        partition: m.partition(),
        offset: m.offset(),
        timestamp: m.timestamp().to_millis(),
        key: m.key(),
        payload: m.payload(),
        content_type,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn a_panicking_loop_fails_the_instance_and_stops_the_process() {
        let status = Arc::new(PipelineStatus::new(2));
        let shutdown = Shutdown::default();
        for id in 0..2 {
            let l = status.for_loop(id);
            l.set_running(true);
            l.set_assigned(BTreeSet::from([id as i32]), BTreeMap::new());
        }
        assert!(status.is_ready() && status.serves(0) && status.serves(1));
        let result = stop_on_failure(&status.for_loop(1), &shutdown, || {
            panic!("a bug in the fold")
        });
        assert!(
            matches!(&result, Err(PipelineError::Panicked(m)) if m == "a bug in the fold"),
            "{result:?}"
        );
        assert!(
            result.unwrap_err().is_fatal(),
            "no retry: the process exits"
        );
        assert!(shutdown.is_triggered());
        assert!(!status.is_ready(), "/readyz turns 503 at once");
        assert!(
            !status.serves(0) && !status.serves(1),
            "no partition is served or announced, not even the other loop's"
        );
    }

    #[test]
    fn a_window_is_full_at_max_records_or_max_customers() {
        let mut size = BatchSize::new(5, 2);
        size.add(0, Some(b"alice"));
        size.add(0, Some(b"alice"));
        size.add(0, Some(b"alice"));
        assert!(!size.is_full(), "one customer, three records");
        size.add(1, Some(b"alice"));
        assert!(
            size.is_full(),
            "the same key in another partition is another customer"
        );
        let mut size = BatchSize::new(3, 10);
        for c in [b"a", b"b", b"c"] {
            assert!(!size.is_full());
            size.add(0, Some(c));
        }
        assert!(size.is_full(), "three records");
    }

    #[test]
    fn a_loop_that_stops_cleanly_leaves_the_instance_alone() {
        let status = Arc::new(PipelineStatus::new(1));
        let shutdown = Shutdown::default();
        stop_on_failure(&status.for_loop(0), &shutdown, || Ok(())).unwrap();
        assert!(!shutdown.is_triggered());
        status.for_loop(0).set_running(true);
        assert!(status.is_running(), "not failed: it may run again");
    }
}
