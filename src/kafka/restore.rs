//! Restoring a partition's state from the changelog.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::store::{Mutation, Store};

/// Replays changelog partition `p` from the store's checkpoint (or the start, after dropping
/// any stale local state) to its end (`read_committed`, so aborted records are skipped), writing
/// into the store with the checkpoint in the same batch. Returns the records applied.
#[tracing::instrument(skip_all, fields(partition = p))]
pub(super) fn restore_partition(
    consumer: &BaseConsumer,
    store: &Store,
    changelog: &str,
    p: i32,
) -> Result<u64, RestoreError> {
    let started = Instant::now();
    let checkpoint = store.checkpoint(p)?;
    if checkpoint.is_none() {
        store.drop_partition(p)?;
    }
    let (low, high) = consumer.fetch_watermarks(changelog, p, Duration::from_secs(30))?;
    let start = checkpoint.unwrap_or(low).max(low);
    if start >= high {
        tracing::info!(partition = p, checkpoint = ?checkpoint, high, "state up to date, nothing to restore");
        if checkpoint.is_none() {
            store.write(&[], &[(p, start)])?;
        }
        return Ok(0);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(changelog, p, Offset::Offset(start))?;
    consumer.assign(&tpl)?;
    let mut batch: Vec<Mutation> = Vec::with_capacity(10_000);
    let mut next = start;
    let mut applied = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let key = m.key().unwrap_or_default().to_vec();
                batch.push((key, m.payload().map(|v| v.to_vec())));
                next = m.offset() + 1;
                applied += 1;
                if batch.len() >= 10_000 {
                    store.write(&batch, &[(p, next)])?;
                    metrics::counter!(crate::metrics::RESTORE_RECORDS).increment(batch.len() as u64);
                    batch.clear();
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            None if Instant::now() > deadline => return Err(RestoreError::Timeout(p)),
            None => {}
        }
    }
    store.write(&batch, &[(p, next.max(start))])?;
    metrics::counter!(crate::metrics::RESTORE_RECORDS).increment(batch.len() as u64);
    consumer.unassign()?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(partition = p, from = start, to = next, records = applied, secs, "restored from changelog");
    Ok(applied)
}

/// Restore failures.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Reading the changelog failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Writing the store failed.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The end was not reached in time.
    #[error("restore of partition {0} timed out")]
    Timeout(i32),
}
