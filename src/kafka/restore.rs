//! Restoring partitions' state from the changelog, incrementally, from the poll loop.
//!
//! The loop calls [`Restorer::step`] between polls of the group consumer, so a long restore
//! never stops the member from heartbeating or handling a rebalance (restoring inside the
//! rebalance callback, or for longer than `max.poll.interval.ms` without polling, gets the member
//! evicted). The partition's input stays paused until its restore is done.
//!
//! # Where a restore ends
//! A restore replays, read_committed, until its position reaches the changelog's **log end**
//! (read_uncommitted high watermark) as queried when it began. Not the first end-of-partition:
//! under read_committed that comes at the last stable offset (LSO), below any open transaction,
//! and the records of a transaction that commits a moment later would be missed. (librdkafka's
//! `query_watermark_offsets` honours `isolation.level`: a read_committed client is told the LSO.)
//! The loop begins a restore only after the partition's committed input offsets are stable (see
//! `pipeline::assignment`), so every transaction of the previous owner is resolved by then and the
//! LSO reaches that log end. The position advances past aborted records and transaction markers.
//!
//! A checkpoint above the log end means the changelog is not the one the store was built from
//! (the topic was deleted and recreated, or truncated): the local state is dropped and the
//! partition restored from scratch, with a warning. A checkpoint above the LSO but within the
//! log end is normal (a committed transaction whose markers are still being written).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use rdkafka::ClientContext;

use crate::config::Config;
use crate::metrics as m;
use crate::store::{Replay, Store};

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

/// Restore failures.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Reading the changelog failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Writing the store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

struct Progress {
    /// Next changelog offset to apply.
    next: i64,
    /// The log end when the restore began: it is done when its position reaches it.
    high: i64,
    records: u64,
    started: Instant,
    /// The records read since the last write (begun at the first of them).
    pending: Option<Replay>,
}

/// A finished restore.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// The partition.
    pub partition: i32,
    /// Changelog records applied.
    pub records: u64,
    /// Time from assignment to done.
    pub secs: f64,
}

/// Replays changelog partitions into the store.
pub(super) struct Restorer {
    consumer: BaseConsumer<QuietEof>,
    /// read_uncommitted, for the log end only (never assigned).
    ends: BaseConsumer<QuietEof>,
    changelog: String,
    active: BTreeMap<i32, Progress>,
}

const FLUSH_EVERY: usize = 20_000;

impl Restorer {
    /// A restorer with its own consumer of `cfg`'s changelog (assigned partitions by hand,
    /// never joining a group).
    pub(super) fn new(cfg: &Config) -> Result<Self, KafkaError> {
        let consumer = super::client_config(&cfg.kafka)
            .set("group.id", format!("{}-restore", cfg.kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "20")
            .set("max.partition.fetch.bytes", "16777216")
            .set("fetch.max.bytes", "67108864")
            .create_with_context(QuietEof)?;
        let ends = super::client_config(&cfg.kafka)
            .set("group.id", format!("{}-restore", cfg.kafka.group_id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .create_with_context(QuietEof)?;
        Ok(Self {
            consumer,
            ends,
            changelog: cfg.changelog_topic(),
            active: BTreeMap::new(),
        })
    }

    /// Partitions still restoring, with the records left (as of the start).
    pub(super) fn remaining(&self) -> BTreeMap<i32, i64> {
        self.active
            .iter()
            .map(|(p, pr)| (*p, (pr.high - pr.next).max(0)))
            .collect()
    }

    pub(super) fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    /// Starts restoring `p` from the store's checkpoint (or from the start, after dropping any
    /// stale local state). Returns `Some` when there is nothing to replay.
    pub(super) fn begin(
        &mut self,
        store: &Store,
        p: i32,
    ) -> Result<Option<Restored>, RestoreError> {
        let started = Instant::now();
        let mut checkpoint = store.checkpoint(p)?;
        let timeout = Duration::from_secs(30);
        let (low, _) = self
            .consumer
            .fetch_watermarks(&self.changelog, p, timeout)?;
        let (_, high) = self.ends.fetch_watermarks(&self.changelog, p, timeout)?;
        if let Some(c) = checkpoint.filter(|c| *c > high) {
            tracing::warn!(
                partition = p,
                checkpoint = c,
                log_end = high,
                "the local state is ahead of the changelog (was the changelog topic recreated?): \
                 dropping it and restoring the partition from scratch"
            );
            checkpoint = None;
        }
        if checkpoint.is_none() {
            store.drop_partition(p)?;
        }
        let start = checkpoint.unwrap_or(low).max(low);
        if start >= high {
            if checkpoint.is_none() {
                store.restore(p, &[], start)?;
            }
            tracing::info!(partition = p, checkpoint = ?checkpoint, log_end = high, "state up to date, nothing to restore");
            return Ok(Some(Restored {
                partition: p,
                records: 0,
                secs: started.elapsed().as_secs_f64(),
            }));
        }
        tracing::info!(
            partition = p,
            from = start,
            to = high,
            "restoring from the changelog"
        );
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.changelog, p, Offset::Offset(start))?;
        self.consumer.incremental_assign(&tpl)?;
        self.active.insert(
            p,
            Progress {
                next: start,
                high,
                records: 0,
                started,
                pending: None,
            },
        );
        Ok(None)
    }

    /// Applies changelog records for up to `budget`; returns the partitions whose position
    /// reached the log end they began with.
    pub(super) fn step(
        &mut self,
        store: &Store,
        budget: Duration,
    ) -> Result<Vec<Restored>, RestoreError> {
        let deadline = Instant::now() + budget;
        let mut done = Vec::new();
        while !self.active.is_empty() && Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(20)) {
                Some(Ok(msg)) => {
                    let p = msg.partition();
                    let Some(pr) = self.active.get_mut(&p) else {
                        continue;
                    };
                    let r = match &mut pr.pending {
                        Some(r) => r,
                        None => pr.pending.insert(store.replay(p)?),
                    };
                    store.replay_record(r, msg.key().unwrap_or_default(), msg.payload())?;
                    pr.next = msg.offset() + 1;
                    pr.records += 1;
                    if r.len() >= FLUSH_EVERY {
                        let r = pr.pending.take().expect("just added to");
                        metrics::counter!(m::RESTORE_RECORDS).increment(r.len() as u64);
                        store.finish_replay(r, pr.next)?;
                    }
                    if pr.next >= pr.high {
                        done.push(self.finish(store, p)?);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {
                    // At the LSO: done if the position (past markers and aborted records) is
                    // at the log end; else a transaction is still being resolved.
                    for p in self.at_log_end()? {
                        done.push(self.finish(store, p)?);
                    }
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    /// The active partitions whose consumer position reached their log end.
    fn at_log_end(&self) -> Result<Vec<i32>, RestoreError> {
        let position = self.consumer.position()?;
        Ok(self
            .active
            .iter()
            .filter(|(p, pr)| {
                let at = match position
                    .find_partition(&self.changelog, **p)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => o,
                    _ => pr.next,
                };
                at.max(pr.next) >= pr.high
            })
            .map(|(p, _)| *p)
            .collect())
    }

    /// Writes what is pending of `p`'s restore with its checkpoint, and stops reading `p`.
    fn finish(&mut self, store: &Store, p: i32) -> Result<Restored, RestoreError> {
        let pr = self.active.remove(&p).expect("an active restore");
        let r = match pr.pending {
            Some(r) => r,
            None => store.replay(p)?,
        };
        metrics::counter!(m::RESTORE_RECORDS).increment(r.len() as u64);
        store.finish_replay(r, pr.next.max(pr.high))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.changelog, p);
        self.consumer.incremental_unassign(&tpl)?;
        let secs = pr.started.elapsed().as_secs_f64();
        let rate = pr.records as f64 / secs.max(1e-9);
        tracing::info!(
            partition = p,
            records = pr.records,
            secs,
            records_per_sec = rate as u64,
            "restored from the changelog"
        );
        Ok(Restored {
            partition: p,
            records: pr.records,
            secs,
        })
    }

    /// Abandons every restore in progress (on revocation). What was written stays valid: each
    /// write carried its checkpoint.
    pub(super) fn cancel_all(&mut self) -> Result<(), RestoreError> {
        if !self.active.is_empty() {
            self.active.clear();
            self.consumer.unassign()?;
        }
        Ok(())
    }
}
