//! Which partitions the loop owns, and what a rebalance does to them: on assignment the inputs
//! are paused and the state restored (incrementally, see [`crate::kafka::restore`]), then the
//! input is rewound to anything skipped meanwhile and resumed; on revocation the uncommitted
//! work is dropped and the local state kept for `state_drop_delay`.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::clients::{Clients, RebalanceEvent};
use super::housekeeping::{Deltas, DueIndex};
use super::PipelineError;
use crate::config::TopicsConfig;
use crate::kafka::restore::{Restored, Restorer};
use crate::kafka::{InputTopic, LoopStatus};
use crate::store::{BookCache, Store};

/// The partitions of this loop and the bookkeeping of their moves.
#[derive(Default)]
pub(super) struct Assignment {
    /// The partitions owned now (restored or restoring).
    pub(super) owned: BTreeSet<i32>,
    /// Input positions of records polled for a partition still restoring: they were not
    /// processed, so the partition is rewound there when its restore is done.
    skipped: HashMap<(InputTopic, i32), i64>,
    /// Partitions that moved away, and since when: their local state is dropped after a delay
    /// (it is kept a while so a quick return restores from the checkpoint, not from scratch).
    released: HashMap<i32, Instant>,
}

/// What a rebalance or a finished restore needs to reach.
pub(super) struct Parts<'a> {
    pub(super) clients: &'a Clients,
    pub(super) restorer: &'a mut Restorer,
    pub(super) store: &'a Store,
    pub(super) status: &'a LoopStatus,
    pub(super) due: &'a mut DueIndex,
    pub(super) deltas: &'a mut Deltas,
    pub(super) cache: &'a mut BookCache,
    pub(super) topics: &'a TopicsConfig,
}

impl Assignment {
    /// Remembers that a record of a restoring partition was polled and not processed.
    pub(super) fn skip(&mut self, topic: InputTopic, partition: i32, offset: i64) {
        let e = self.skipped.entry((topic, partition)).or_insert(offset);
        *e = (*e).min(offset);
    }

    /// Handles the rebalance events of the consumer. Whatever was polled is not committed: the
    /// caller drops it; the new assignment starts from the committed offsets.
    pub(super) fn rebalance(
        &mut self,
        events: Vec<RebalanceEvent>,
        x: &mut Parts<'_>,
    ) -> Result<(), PipelineError> {
        for ev in events {
            match ev {
                RebalanceEvent::Revoke => {
                    let now = Instant::now();
                    for p in std::mem::take(&mut self.owned) {
                        self.released.insert(p, now);
                    }
                    x.due.clear();
                    x.deltas.clear();
                    x.cache.clear();
                    self.skipped.clear();
                    x.restorer.cancel_all()?;
                    x.status.set_revoked();
                    tracing::info!("partitions revoked");
                }
                RebalanceEvent::Assign(parts) => {
                    tracing::info!(partitions = ?parts, "partitions assigned");
                    self.owned = parts.clone();
                    for p in &parts {
                        self.released.remove(p);
                    }
                    pause(x.clients, x.topics, &parts, true)?;
                    for p in parts {
                        if let Some(r) = x.restorer.begin(x.store, p)? {
                            self.finish_restore(r, x)?;
                        }
                    }
                    // Owned and restoring change in one step: the API must never see a
                    // partition owned and not (yet) marked restoring, and answer from a store
                    // that lacks its state.
                    x.status
                        .set_assigned(self.owned.clone(), x.restorer.remaining());
                }
            }
        }
        x.status.set_restoring(x.restorer.remaining());
        Ok(())
    }

    /// A partition's state is restored: index its due times, rewind its input to anything
    /// skipped meanwhile, and resume it.
    pub(super) fn finish_restore(
        &mut self,
        r: Restored,
        x: &mut Parts<'_>,
    ) -> Result<(), PipelineError> {
        let p = r.partition;
        x.store.load_meta(p)?;
        let (buckets, next_seq) = x.store.deltas(p)?;
        x.deltas.track(p, buckets, next_seq);
        for (d, customer, meter) in x.store.due_meters(p)? {
            x.due.set(p, &customer, &meter, Some(d));
        }
        // The input resumes at an explicit position: what was skipped while restoring, else
        // the group's committed offset (stable: librdkafka asks with `require_stable` under
        // read_committed), else the start. Left to librdkafka, a partition resumed while its
        // committed offset was still being fetched (a restore with nothing to replay finishes
        // within the rebalance) was seen never to fetch again after a broker restart.
        let mut committed = TopicPartitionList::new();
        for topic in InputTopic::ALL {
            if !self.skipped.contains_key(&(topic, p)) {
                committed.add_partition(topic.name(x.topics), p);
            }
        }
        let committed = if committed.count() > 0 {
            x.clients
                .consumer
                .committed_offsets(committed, Duration::from_secs(30))?
        } else {
            committed
        };
        for topic in InputTopic::ALL {
            let name = topic.name(x.topics);
            let at = match self.skipped.remove(&(topic, p)) {
                Some(off) => Offset::Offset(off),
                None => match committed.find_partition(name, p).map(|e| e.offset()) {
                    Some(Offset::Offset(off)) => Offset::Offset(off),
                    _ => Offset::Beginning,
                },
            };
            x.clients
                .consumer
                .seek(name, p, at, Duration::from_secs(10))?;
        }
        pause(x.clients, x.topics, &BTreeSet::from([p]), false)?;
        tracing::info!(
            partition = p,
            restored_records = r.records,
            secs_since_assignment = r.secs,
            "partition ready"
        );
        Ok(())
    }

    /// Drops the local state of partitions released more than `delay` ago.
    pub(super) fn drop_released(
        &mut self,
        store: &Store,
        delay: Duration,
    ) -> Result<(), PipelineError> {
        let expired: Vec<i32> = self
            .released
            .iter()
            .filter(|(_, t)| t.elapsed() >= delay)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.released.remove(&p);
            store.drop_partition(p)?;
            tracing::info!(
                partition = p,
                "dropped the local state of a partition owned elsewhere"
            );
        }
        Ok(())
    }
}

/// Pauses (or resumes) both input topics' partitions `parts`.
fn pause(
    c: &Clients,
    topics: &TopicsConfig,
    parts: &BTreeSet<i32>,
    pause: bool,
) -> Result<(), PipelineError> {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        for topic in InputTopic::ALL {
            tpl.add_partition(topic.name(topics), *p);
        }
    }
    if pause {
        c.consumer.pause(&tpl)?;
    } else {
        c.consumer.resume(&tpl)?;
    }
    Ok(())
}
