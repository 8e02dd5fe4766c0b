//! Which partitions the loop owns, and what a rebalance does to them.
//!
//! # The handover of a partition
//! On assignment the partition's inputs are paused, and it goes through three steps before its
//! input resumes. Until the last one it counts as restoring: not served, not ready.
//! 1. **Settle.** Fetch the group's committed input offsets, *stable* (librdkafka asks with
//!    `require_stable` under read_committed: the broker refuses while a transaction holding
//!    offsets for the partition is open). The previous owner may be stalled inside a
//!    transaction that holds both its changelog records and its offsets; it commits or aborts
//!    (at the latest when the transaction times out), and only then is the answer given. A fetch
//!    that is refused is retried at the next turn of the loop, which keeps polling meanwhile; for
//!    at most twice the transaction timeout (+10 s), after which the loop starts over with new
//!    clients. If that repeats, the broker most likely holds a *hanging* transaction: a broker
//!    stopped in the middle of a transaction can reload its coordinator's state from before
//!    it, so the transaction's records and offsets stay open on the partitions and nobody ends
//!    it (seen with Kafka 4.4; `kafka-transactions.sh find-hanging` lists it). Only an abort
//!    marker written by an operator ends it (runbook, DrawdownStalled); drawdown then goes on
//!    from the last committed offsets, which is what the hanging transaction's producer did.
//! 2. **Restore** the state from the changelog, incrementally, up to the log end as of now (see
//!    [`crate::kafka::restore`]): every transaction of the previous owner is resolved, so this
//!    includes all it committed.
//! 3. **Resume** the input exactly at the offsets of step 1: everything before them is in the
//!    restored state, nothing after them is.
//!
//! Restoring first and fetching the offsets after (as before this design) lost a batch: the
//! restore stopped at the open transaction's first record, the offsets fetch then waited for it
//! to commit, and the partition resumed after that batch without its state.
//!
//! On revocation the uncommitted work is dropped and the local state kept for
//! `state_drop_delay` (see [`super::claims`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::claims::Claims;
use super::clients::{Clients, RebalanceEvent};
use super::housekeeping::{Deltas, DueFloors};
use super::stream_time::StreamTimes;
use super::PipelineError;
use crate::config::TopicsConfig;
use crate::kafka::restore::{Restored, Restorer};
use crate::kafka::{offsets_not_stable, stable_committed_offsets, InputTopic, LoopStatus};
use crate::store::{BookCache, Store};

/// How long one attempt to fetch a partition's stable offsets may block the loop.
const SETTLE_ATTEMPT: Duration = Duration::from_millis(200);

/// The partitions of this loop and the bookkeeping of their moves.
#[derive(Default)]
pub(super) struct Assignment {
    /// The partitions owned now (settling, restoring or serving).
    pub(super) owned: BTreeSet<i32>,
    /// Partitions waiting for stable committed offsets, since when.
    settling: BTreeMap<i32, Instant>,
    /// Where each partition's input resumes once restored (from its stable committed offsets).
    resume_at: HashMap<(InputTopic, i32), Offset>,
    /// The offset each input topic-partition was last resumed at (absent: from the beginning).
    /// Until a record of it is polled, librdkafka reports no position for it, and this is
    /// where it stands (see `Loop::caught_up`).
    pub(super) resumed: HashMap<(InputTopic, i32), i64>,
    /// Partitions restored whose input could not be put at its offsets yet, since when: a seek
    /// fails with "Erroneous state" while the group rebalances again (seen when instances
    /// restart together). Retried at each step instead of restarting the loop, which made the
    /// others rebalance, and their seeks fail, in turn.
    resuming: BTreeMap<i32, Instant>,
}

/// What a rebalance or a finished restore needs to reach.
pub(super) struct Parts<'a> {
    pub(super) clients: &'a Clients,
    pub(super) restorer: &'a mut Restorer,
    pub(super) store: &'a Store,
    pub(super) status: &'a LoopStatus,
    pub(super) due: &'a mut DueFloors,
    pub(super) deltas: &'a mut Deltas,
    pub(super) cache: &'a mut BookCache,
    pub(super) topics: &'a TopicsConfig,
    /// The claims of every loop of the process, and this loop's number.
    pub(super) claims: &'a Claims,
    pub(super) loop_id: usize,
    /// The transaction timeout: a partition settling longer than twice it (+10 s) makes the
    /// loop start over with new clients.
    pub(super) transaction_timeout: Duration,
    /// The partitions' stream times.
    pub(super) times: &'a mut StreamTimes,
    /// The partition count of the topics at start-up.
    pub(super) partitions: i32,
}

impl Assignment {
    /// Partitions not served yet (settling or restoring), with the changelog records left to
    /// replay (0 while settling).
    pub(super) fn unready(&self, restorer: &Restorer) -> BTreeMap<i32, i64> {
        let mut out = restorer.remaining();
        for p in self.settling.keys().chain(self.resuming.keys()) {
            out.entry(*p).or_insert(0);
        }
        out
    }

    /// Whether nothing is settling or restoring.
    pub(super) fn is_settled(&self, restorer: &Restorer) -> bool {
        self.settling.is_empty() && self.resuming.is_empty() && restorer.is_idle()
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
                    for p in &self.owned {
                        x.times.forget(*p);
                    }
                    x.claims
                        .release(x.loop_id, &std::mem::take(&mut self.owned));
                    x.due.clear();
                    x.deltas.clear();
                    x.cache.clear();
                    self.settling.clear();
                    self.resuming.clear();
                    self.resume_at.clear();
                    x.restorer.cancel_all()?;
                    x.status.set_revoked();
                    tracing::info!("partitions revoked");
                }
                RebalanceEvent::Assign(parts) => {
                    tracing::info!(partitions = ?parts, "partitions assigned");
                    check_partitions(&parts, x.partitions)?;
                    self.owned = parts.clone();
                    // Before the restore reads the checkpoint: no loop drops it from now on.
                    x.claims.claim(x.loop_id, &parts);
                    pause(x.clients, x.topics, &parts, true)?;
                    let now = Instant::now();
                    self.settling = parts.iter().map(|p| (*p, now)).collect();
                    // Owned and restoring change in one step: the API must never see a
                    // partition owned and not (yet) marked restoring, and answer from a store
                    // that lacks its state.
                    x.status
                        .set_assigned(self.owned.clone(), self.unready(x.restorer));
                    self.settle(x)?;
                }
            }
        }
        x.status.set_restoring(self.unready(x.restorer));
        Ok(())
    }

    /// Step 1 of the handover, for every partition settling: those whose committed offsets are
    /// stable go on to their restore (and, if it has nothing to replay, resume at once).
    pub(super) fn settle(&mut self, x: &mut Parts<'_>) -> Result<(), PipelineError> {
        let resuming: Vec<i32> = self.resuming.keys().copied().collect();
        for p in resuming {
            self.resume(p, x)?;
        }
        let settling: Vec<(i32, Instant)> = self.settling.iter().map(|(p, t)| (*p, *t)).collect();
        for (p, since) in settling {
            let mut tpl = TopicPartitionList::new();
            for topic in InputTopic::ALL {
                tpl.add_partition(topic.name(x.topics), p);
            }
            let fetched = stable_committed_offsets(&x.clients.consumer, tpl, SETTLE_ATTEMPT);
            let committed = match fetched {
                Ok(c) => c,
                Err(e) if offsets_not_stable(&e) => {
                    // An open transaction is resolved within its timeout (the coordinator aborts
                    // it then). Waiting much longer means the client is stuck (seen after a
                    // broker restart: every fetch timed out for minutes): start over with new
                    // clients, as for any other client error.
                    let waited = since.elapsed();
                    if waited > x.transaction_timeout * 2 + Duration::from_secs(10) {
                        tracing::warn!(partition = p, waited_secs = waited.as_secs(), error = %e,
                            "the committed offsets were not fetched within twice the transaction timeout: restarting the consumer; if this repeats, a transaction may be hanging on the broker (runbook: DrawdownStalled)");
                        return Err(e.into());
                    }
                    tracing::debug!(partition = p, error = %e, "committed offsets not stable yet");
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for topic in InputTopic::ALL {
                let at = match committed
                    .find_partition(topic.name(x.topics), p)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(off)) => Offset::Offset(off),
                    _ => Offset::Beginning,
                };
                self.resume_at.insert((topic, p), at);
            }
            self.settling.remove(&p);
            tracing::debug!(
                partition = p,
                waited_ms = since.elapsed().as_millis() as u64,
                "committed offsets stable"
            );
            if let Some(r) = x.restorer.begin(x.store, p)? {
                self.finish_restore(r, x)?;
            }
        }
        Ok(())
    }

    /// Step 3: a partition's state is restored: read its due index from the start, put its
    /// input at the stable committed offsets, and resume it.
    pub(super) fn finish_restore(
        &mut self,
        r: Restored,
        x: &mut Parts<'_>,
    ) -> Result<(), PipelineError> {
        let p = r.partition;
        x.store.load_meta(p)?;
        x.times.forget(p);
        if let Some(t) = x.store.stream_time(p)? {
            x.times.raise(p, t);
        }
        let (buckets, next_seq) = x.store.deltas(p)?;
        x.deltas.track(p, buckets, next_seq);
        x.due.start(p);
        tracing::info!(
            partition = p,
            restored_records = r.records,
            secs_since_assignment = r.secs,
            "partition ready"
        );
        self.resuming.insert(p, Instant::now());
        self.resume(p, x)
    }

    /// Puts partition `p`'s input at its stable committed offsets and resumes it; if a seek
    /// fails, it stays paused (not served) and is retried at the next step, for up to twice
    /// the transaction timeout (+10 s), then the loop starts over with new clients.
    fn resume(&mut self, p: i32, x: &mut Parts<'_>) -> Result<(), PipelineError> {
        for topic in InputTopic::ALL {
            let at = self
                .resume_at
                .get(&(topic, p))
                .copied()
                .unwrap_or(Offset::Beginning);
            if let Err(e) =
                x.clients
                    .consumer
                    .seek(topic.name(x.topics), p, at, Duration::from_secs(10))
            {
                let waited = self
                    .resuming
                    .get(&p)
                    .map_or(Duration::ZERO, Instant::elapsed);
                if waited > x.transaction_timeout * 2 + Duration::from_secs(10) {
                    return Err(e.into());
                }
                tracing::info!(partition = p, error = %e, "seek failed; retrying");
                return Ok(());
            }
            match at {
                Offset::Offset(o) => self.resumed.insert((topic, p), o),
                _ => self.resumed.remove(&(topic, p)),
            };
        }
        for topic in InputTopic::ALL {
            self.resume_at.remove(&(topic, p));
        }
        pause(x.clients, x.topics, &BTreeSet::from([p]), false)?;
        self.resuming.remove(&p);
        tracing::info!(partition = p, "input resumed");
        Ok(())
    }
}

/// `parts` within the partition count the pipeline started with: partitions added to a topic
/// while running would be folded without a changelog partition (or with another topic's
/// partition missing), so the pipeline stops with [`PipelineError::PartitionsChanged`].
fn check_partitions(parts: &BTreeSet<i32>, count: i32) -> Result<(), PipelineError> {
    match parts.iter().find(|p| **p >= count) {
        Some(p) => Err(PipelineError::PartitionsChanged {
            partition: *p,
            count,
        }),
        None => Ok(()),
    }
}

/// Pauses (or resumes) both input topics' partitions `parts`.
fn pause(
    c: &Clients,
    topics: &TopicsConfig,
    parts: &BTreeSet<i32>,
    pause: bool,
) -> Result<(), PipelineError> {
    let tps = parts.iter().flat_map(|p| InputTopic::ALL.map(|t| (t, *p)));
    Ok(super::clients::set_paused(&c.consumer, topics, tps, pause)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_beyond_the_start_up_count_stops_the_pipeline_for_good() {
        assert!(check_partitions(&BTreeSet::from([0, 7]), 8).is_ok());
        let e = check_partitions(&BTreeSet::from([3, 9]), 8).unwrap_err();
        assert!(e.is_fatal());
        assert!(e.to_string().contains("partition 9 was assigned"), "{e}");
    }
}
