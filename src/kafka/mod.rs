//! Kafka: topics, the exactly-once pipeline, restore.
//!
//! # Exactly-once protocol
//! Kafka is the source of truth; RocksDB is a local materialisation that is never ahead of it.
//! An instance runs `pipeline.threads` loops (one per core by default), as Kafka Streams runs
//! stream threads under EOS v2: each loop is a member of the consumer group with its own
//! transactional producer, owns the partitions the group gives it (partition p of both inputs
//! and of the changelog), and runs one commit cycle at a time on its own thread (librdkafka's
//! transaction calls block). The loops share only the RocksDB store (disjoint key ranges) and
//! the status. One cycle:
//! 1. Poll input records (`usage-events`, `credit-grants`, `read_committed`) for up to
//!    `commit_interval`, `max_batch` records or `max_batch_customers` customers, or, once some
//!    are polled, until every served partition is caught up (nothing more on the broker:
//!    waiting would only add latency); release those that may be folded now, each partition's
//!    two topics merged by timestamp ([`pipeline::merge`]; the rest stay held,
//!    uncommitted, for a later cycle); decode them and place them on their partition's stream
//!    time ([`pipeline::stream_time`]); load the touched customers' books
//!    (from the loop's book cache, else RocksDB) and the usage/grant ids they refer to, in one
//!    `multi_get` for the batch; fold the batch in memory with the pure rules
//!    ([`pipeline::fold`]).
//! 2. `begin_transaction`; produce the outputs (`balance-changed`, `balance-exhausted`,
//!    `top-up-requests` for automatic top-ups, DLQ) and the changelog records (partition = input
//!    partition): each touched customer's book once, new grant records, and per partition one
//!    delta per time bucket touched (the usage ids and balance changes of this commit; see the
//!    `store` docs); `send_offsets_to_transaction(next offsets, consumer group metadata)`
//!    (KIP-447 fencing; the next offset of each topic-partition is one past the last record
//!    released, so held records are polled again after a restart); `commit_transaction`.
//! 3. Only after the commit: one RocksDB `WriteBatch` with the state and, per partition, the
//!    changelog offset it now reflects (taken from the delivery reports); then the folded books go
//!    back into the cache.
//! 4. On any transaction error: abort if possible, drop the in-memory work (the cache too), and
//!    rebuild the consumer and producer (a fenced or fatal producer cannot be reused); the new
//!    consumer resumes from the committed offsets and the state is restored from RocksDB +
//!    changelog.
//!
//! Forgetting usage ids older than `pipeline.dedupe_window` is a commit of its own: tombstones for
//! the deltas of the buckets that left the window and the partition's new horizon, so every later
//! load already sees the ids as forgotten.
//!
//! A crash at any point therefore loses nothing and counts nothing twice: before the commit
//! nothing is visible; after it, the outputs, changelog and offsets are all there, and RocksDB
//! (if it missed the write) catches up from the changelog at the next assignment.
//!
//! # Rebalancing
//! Eager, with the `range` assignor, so partition p of both input topics lands on the same
//! member (co-partitioning, as Kafka Streams does). Eager because the loop never has a
//! transaction open while it polls, so a revocation only discards the uncommitted in-memory batch
//! and every assignment restarts from the committed offsets: simple to reason about, at the cost
//! of a short stop of all partitions per rebalance. On assignment each partition's input is
//! paused and handed over in three steps, from the poll loop (never inside the rebalance
//! callback; see `pipeline::assignment`):
//! 1. fetch the group's committed input offsets, *stable* (so a previous owner's open
//!    transaction, stalled or not, is committed or aborted first);
//! 2. restore its state from the changelog (from the RocksDB checkpoint, or from the start after
//!    dropping stale local state) up to the log end as of then, not merely to the first
//!    end-of-partition, which read_committed reports at the last stable offset;
//! 3. resume the input exactly at the offsets of step 1.
//!
//! Until then the partition counts as restoring: not served by the API, not ready. A checkpoint
//! above the changelog's log end (the topic was recreated) drops the local state and restores
//! from scratch, with a warning. On revocation the partition's local state is kept for
//! `state_drop_delay` (a quick return restores from the checkpoint), then dropped, unless another
//! loop of the process owns it by then; state found on disk at start-up and not assigned is
//! dropped the same way.
//!
//! # Failures
//! Any transaction or client error aborts the open transaction if possible, drops the in-memory
//! work and rebuilds the clients with exponential backoff (200 ms to 10 s), reported in
//! `drawdown_pipeline_restarts_total{reason}` and `/readyz`; a broker that is away is retried until
//! it returns. A fenced producer (a zombie: an instance that stalled past its session while the
//! group moved on) fails its commit (KIP-447: the offsets carry the group generation), drops its
//! work and rejoins as a new member. Which instance serves which partition, for the API, is in
//! [`directory`].

pub mod admin;
pub mod api_publisher;
pub mod directory;
pub mod lag;
pub mod pipeline;
mod restore;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rdkafka::ClientConfig;

use crate::config::{KafkaConfig, TopicsConfig};

pub use pipeline::{Pipeline, PipelineError};

/// The Java client's default partitioner: `toPositive(murmur2(key)) % partitions`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let h = murmur2::murmur2(key, murmur2::KAFKA_SEED);
    ((h & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// A librdkafka config with the broker connection and the configured extras.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    c.set("client.id", format!("drawdown-{}", cfg.instance_id));
    for (k, v) in &cfg.extra {
        c.set(k, v);
    }
    c
}

/// The config of a transactional producer with id `transactional_id`: idempotent, keyed with
/// the Java client's partitioner, batched for throughput (the pipeline's producer, and the
/// benchmark's pass-through copier, so both are measured alike).
pub fn transactional_config(cfg: &KafkaConfig, transactional_id: &str) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("transactional.id", transactional_id)
        .set(
            "transaction.timeout.ms",
            cfg.transaction_timeout.as_millis().to_string(),
        )
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "2000000")
        // A full queue makes `send` wait for deliveries; 1 GB (the old setting) let a batch's
        // copies pile up while the broker lagged.
        .set("queue.buffering.max.kbytes", "32768");
    c
}

/// What one pipeline loop reports.
#[derive(Debug, Default, Clone)]
struct LoopState {
    running: bool,
    /// Holds an assignment of the current generation (false from a revocation, or the start,
    /// until the next assignment): a loop still joining makes the instance not ready, since its
    /// join moves partitions.
    assigned: bool,
    owned: BTreeSet<i32>,
    restoring: BTreeMap<i32, i64>,
}

/// What the pipeline tells the API: readiness and ownership, merged over its loops (each owns
/// its own share of the partitions).
#[derive(Debug)]
pub struct PipelineStatus {
    loops: Mutex<Vec<LoopState>>,
    /// Set when the pipeline stopped for good (a fatal error or a panic): never ready again.
    failed: AtomicBool,
}

impl Default for PipelineStatus {
    fn default() -> Self {
        Self::new(1)
    }
}

impl PipelineStatus {
    /// The status of a pipeline of `loops` loops.
    pub fn new(loops: usize) -> Self {
        Self {
            loops: Mutex::new(vec![LoopState::default(); loops.max(1)]),
            failed: AtomicBool::new(false),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&[LoopState]) -> T) -> T {
        f(&self.loops.lock().expect("not poisoned"))
    }

    /// Ready: every loop runs, partitions are owned and none of them is restoring.
    pub fn is_ready(&self) -> bool {
        !self.failed.load(Ordering::Acquire)
            && self.with(|l| {
                l.iter().all(|s| s.running && s.assigned)
                    && l.iter().any(|s| !s.owned.is_empty())
                    && l.iter().all(|s| s.restoring.is_empty())
            })
    }

    /// Whether every loop is connected and consuming (false while one restarts after an error).
    pub fn is_running(&self) -> bool {
        !self.failed.load(Ordering::Acquire) && self.with(|l| l.iter().all(|s| s.running))
    }

    /// Partitions restoring, with the changelog records left to replay.
    pub fn restoring(&self) -> BTreeMap<i32, i64> {
        self.with(|l| l.iter().flat_map(|s| s.restoring.clone()).collect())
    }

    /// The state partitions this instance owns.
    pub fn owned(&self) -> BTreeSet<i32> {
        self.with(|l| l.iter().flat_map(|s| s.owned.clone()).collect())
    }

    /// Whether this instance serves partition `p` now: owned and restored by a running loop.
    pub fn serves(&self, p: i32) -> bool {
        !self.failed.load(Ordering::Acquire)
            && self.with(|l| {
                l.iter()
                    .any(|s| s.running && s.owned.contains(&p) && !s.restoring.contains_key(&p))
            })
    }

    /// Marks the pipeline as stopped for good.
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::Release);
        self.publish();
    }

    /// The handle of loop `id`.
    pub fn for_loop(self: &std::sync::Arc<Self>, id: usize) -> LoopStatus {
        LoopStatus {
            status: self.clone(),
            id,
        }
    }

    fn update(&self, id: usize, f: impl FnOnce(&mut LoopState)) {
        {
            let mut loops = self.loops.lock().expect("not poisoned");
            if let Some(s) = loops.get_mut(id) {
                f(s);
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let (owned, restoring) = (self.owned(), self.restoring());
        metrics::gauge!(crate::metrics::PARTITIONS_OWNED).set(owned.len() as f64);
        metrics::gauge!(crate::metrics::RESTORING_PARTITIONS).set(restoring.len() as f64);
        metrics::gauge!(crate::metrics::RESTORE_REMAINING)
            .set(restoring.values().sum::<i64>() as f64);
        metrics::gauge!(crate::metrics::READY).set(if self.is_ready() { 1.0 } else { 0.0 });
    }
}

/// One loop's handle on the [`PipelineStatus`].
#[derive(Clone, Debug)]
pub struct LoopStatus {
    status: std::sync::Arc<PipelineStatus>,
    id: usize,
}

impl LoopStatus {
    /// The loop's number.
    fn id(&self) -> usize {
        self.id
    }

    /// Marks the whole pipeline as stopped for good.
    fn set_failed(&self) {
        self.status.set_failed();
    }

    fn set_running(&self, running: bool) {
        self.status.update(self.id, |s| s.running = running);
    }

    /// Revoked (or not yet joined): owns nothing, and is not assigned.
    fn set_revoked(&self) {
        self.status.update(self.id, |s| {
            s.owned.clear();
            s.assigned = false;
        });
    }

    /// Assigned `owned` (possibly nothing) in a new generation, of which `restoring` are not
    /// restored yet: one update, so no reader sees them owned and not restoring.
    fn set_assigned(&self, owned: BTreeSet<i32>, restoring: BTreeMap<i32, i64>) {
        self.status.update(self.id, |s| {
            s.owned = owned;
            s.restoring = restoring;
            s.assigned = true;
        });
    }

    fn set_restoring(&self, restoring: BTreeMap<i32, i64>) {
        self.status.update(self.id, |s| s.restoring = restoring);
    }
}

/// Which input topic a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputTopic {
    /// `topics.usage`: usage events.
    Usage,
    /// `topics.grants`: credit commands (grants and voids).
    Grants,
}

impl InputTopic {
    /// Both, in a fixed order.
    pub const ALL: [InputTopic; 2] = [InputTopic::Usage, InputTopic::Grants];

    /// The configured topic name.
    pub fn name(self, topics: &TopicsConfig) -> &str {
        match self {
            InputTopic::Usage => &topics.usage,
            InputTopic::Grants => &topics.grants,
        }
    }

    /// The `topic` label of the metrics (`usage | grants`).
    pub fn label(self) -> &'static str {
        match self {
            InputTopic::Usage => "usage",
            InputTopic::Grants => "grants",
        }
    }
}

/// A topic the pipeline produces to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutputTopic {
    /// `topics.balance_changed`: one `BalanceChanged` per change.
    BalanceChanged,
    /// `topics.balance_exhausted`: the transitions (exhausted, restored, low).
    BalanceExhausted,
    /// `topics.top_up_requests`: automatic top-up requests.
    TopUpRequests,
    /// `topics.dlq`: rejected input.
    Dlq,
    /// The changelog (`<group>-changelog` unless configured).
    Changelog,
}

impl OutputTopic {
    /// Every output topic, in a fixed order.
    pub const ALL: [OutputTopic; 5] = [
        OutputTopic::BalanceChanged,
        OutputTopic::BalanceExhausted,
        OutputTopic::TopUpRequests,
        OutputTopic::Dlq,
        OutputTopic::Changelog,
    ];

    /// The configured topic name.
    pub fn name(self, cfg: &crate::config::Config) -> String {
        let t = &cfg.topics;
        match self {
            OutputTopic::BalanceChanged => t.balance_changed.clone(),
            OutputTopic::BalanceExhausted => t.balance_exhausted.clone(),
            OutputTopic::TopUpRequests => t.top_up_requests.clone(),
            OutputTopic::Dlq => t.dlq.clone(),
            OutputTopic::Changelog => cfg.changelog_topic(),
        }
    }

    /// The `topic` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            OutputTopic::BalanceChanged => "balance_changed",
            OutputTopic::BalanceExhausted => "balance_exhausted",
            OutputTopic::TopUpRequests => "top_up_requests",
            OutputTopic::Dlq => "dlq",
            OutputTopic::Changelog => "changelog",
        }
    }
}

/// The group's committed offsets of `tpl`, fetched stable (a read_committed consumer asks with
/// `require_stable`). librdkafka retries an unstable answer a few times, then returns the
/// partition with `UNSTABLE_OFFSET_COMMIT` and no offset inside an `Ok`: here any partition's
/// error makes the whole fetch an error, so it is never taken for "no committed offset".
pub fn stable_committed_offsets<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    tpl: rdkafka::TopicPartitionList,
    timeout: std::time::Duration,
) -> rdkafka::error::KafkaResult<rdkafka::TopicPartitionList> {
    use rdkafka::consumer::Consumer;
    let c = consumer.committed_offsets(tpl, timeout)?;
    match c.elements().iter().find_map(|e| e.error().err()) {
        Some(e) => Err(e),
        None => Ok(c),
    }
}

/// Whether an offsets fetch failed because a transaction holding offsets is still open (the
/// broker's UNSTABLE_OFFSET_COMMIT, which librdkafka retries until the timeout).
pub fn offsets_not_stable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::OperationTimedOut) | Some(C::UnstableOffsetCommit) | Some(C::RequestTimedOut)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitioner_matches_the_java_client() {
        // Values from the Java client's DefaultPartitioner / Utils.murmur2 test vectors.
        assert_eq!(
            murmur2::murmur2(b"21", murmur2::KAFKA_SEED) as i32,
            -973932308
        );
        assert_eq!(
            murmur2::murmur2(b"foobar", murmur2::KAFKA_SEED) as i32,
            -790332482
        );
        assert_eq!(
            murmur2::murmur2(b"a-little-bit-long-string", murmur2::KAFKA_SEED) as i32,
            -985981536
        );
        assert_eq!(partition_for(b"21", 8), ((-973932308i32 & 0x7fffffff) % 8));
    }
}
