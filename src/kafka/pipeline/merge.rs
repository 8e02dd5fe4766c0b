//! The order in which a partition's input is folded: its two topics merged by time.
//!
//! A customer's grants arrive on `credit-grants` and its usage on `usage-events`, partition p of
//! each. librdkafka interleaves the partitions of one fetch arbitrarily, so poll order says
//! nothing about which came first: a grant produced (and acknowledged) before the usage it
//! funds could be folded after it. The merge restores the order, as Kafka Streams does across
//! the partitions of a task:
//! - each topic-partition is a queue in offset order (its own order is never changed, so the
//!   committed offsets stay contiguous);
//! - of the two heads, the one with the smaller `(record timestamp, topic, offset)` is folded
//!   first (grants before usage on a tie);
//! - a head is folded while the other queue is empty only if the other topic-partition is
//!   **caught up** (librdkafka's last fetch response says there is nothing more on the broker
//!   past what was polled), or after waiting `pipeline.max_idle` for it. Otherwise it is held,
//!   uncommitted, for a later batch.
//!
//! So a batch is deterministic given the input. Like Kafka Streams with `max.task.idle.ms = 0`,
//! the merge never waits for records not yet produced, but does wait for records the broker
//! already holds (or may hold: before the first fetch response of a topic-partition its end is
//! unknown). That wait is as long as the fetcher takes, normally one fetch round trip; the
//! first fetch after an assignment (an offset lookup, then a fetch) took over a second on a
//! busy machine here.
//!
//! **Backpressure, not a cap.** A queue that reaches `pipeline.max_batch` records while it
//! waits is *throttled*: the loop pauses that topic-partition in librdkafka (its prefetched
//! records are dropped there and fetched again from the position after the last one polled)
//! and resumes it once the queue is down to half ([`Merge::throttle`]).
//! Without it, one topic-partition could fill librdkafka's whole prefetch queue (16 MB, about
//! 90k records) before the other's first fetch: the usage of a partition was then released
//! ahead of the grants still to be fetched, and the 1- and 2-thread runs of the benchmark
//! published different transitions from the same input (2026-12-03, 2 runs in 3). The
//! prefetch queue then drains and the other topic-partition is fetched, as Kafka Streams
//! pauses a partition whose buffer is full.
//!
//! `max_idle` (10 s of polling) bounds the wait for a topic-partition the broker does not
//! deliver (say its leader is down): the order then depends on arrival timing, and each record
//! so released is counted ([`Merge::take_unordered`], the metric
//! `drawdown_records_unordered_total`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use crate::kafka::InputTopic;

/// What the merge needs of a record.
pub(super) trait Timed {
    /// Its topic.
    fn topic(&self) -> InputTopic;
    /// Its partition.
    fn partition(&self) -> i32;
    /// Its offset.
    fn offset(&self) -> i64;
    /// Its record timestamp (ms), if any (a record without one sorts first).
    fn timestamp(&self) -> Option<i64>;
}

fn key<T: Timed>(r: &T) -> (i64, u8, i64) {
    let topic = match r.topic() {
        InputTopic::Grants => 0,
        InputTopic::Usage => 1,
    };
    (r.timestamp().unwrap_or(i64::MIN), topic, r.offset())
}

fn slot(t: InputTopic) -> usize {
    match t {
        InputTopic::Grants => 0,
        InputTopic::Usage => 1,
    }
}

fn other(t: InputTopic) -> InputTopic {
    match t {
        InputTopic::Grants => InputTopic::Usage,
        InputTopic::Usage => InputTopic::Grants,
    }
}

/// What [`Merge::throttle`] asks of the source.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Throttle {
    /// Topic-partitions to pause: their queue is full.
    pub(super) pause: Vec<(InputTopic, i32)>,
    /// Topic-partitions to resume: their queue is down to half.
    pub(super) resume: Vec<(InputTopic, i32)>,
}

/// The records polled and not folded yet, per partition and topic.
#[derive(Debug)]
pub(super) struct Merge<T> {
    queues: BTreeMap<i32, [VecDeque<T>; 2]>,
    /// Since when a head has been held waiting for the other topic-partition.
    /// (On the polling clock: see [`Merge::release`].)
    waiting: HashMap<(InputTopic, i32), Duration>,
    max_idle: Duration,
    /// The records a topic-partition's queue holds before it is throttled (paused at the
    /// source), so a lagging topic-partition cannot make the merge hold the other's whole
    /// backlog in memory.
    max_held: usize,
    /// Topic-partitions throttled: paused by the loop until their queue is down to half.
    throttled: BTreeSet<(InputTopic, i32)>,
    /// Records released by the `max_idle` escape since the last [`Merge::take_unordered`].
    unordered: u64,
}

impl<T: Timed> Merge<T> {
    /// An empty merge that waits at most `max_idle` for a lagging topic-partition, and
    /// throttles a topic-partition holding `max_held` records.
    pub(super) fn new(max_idle: Duration, max_held: usize) -> Self {
        Self {
            queues: BTreeMap::new(),
            waiting: HashMap::new(),
            max_idle,
            max_held: max_held.max(1),
            throttled: BTreeSet::new(),
            unordered: 0,
        }
    }

    /// Adds a polled record (records of one topic-partition come in offset order).
    pub(super) fn push(&mut self, r: T) {
        let q = self.queues.entry(r.partition()).or_default();
        q[slot(r.topic())].push_back(r);
    }

    /// After a [`Merge::release`]: the topic-partitions still holding `max_held` records or
    /// more, newly throttled (the caller pauses them), and those throttled that are down to
    /// half of it, no longer throttled (the caller resumes them).
    pub(super) fn throttle(&mut self) -> Throttle {
        let len = |queues: &BTreeMap<i32, [VecDeque<T>; 2]>, t: InputTopic, p: i32| {
            queues.get(&p).map_or(0, |q| q[slot(t)].len())
        };
        let mut out = Throttle::default();
        for (&p, q) in &self.queues {
            for t in InputTopic::ALL {
                if q[slot(t)].len() >= self.max_held && self.throttled.insert((t, p)) {
                    out.pause.push((t, p));
                }
            }
        }
        let low = self.max_held / 2;
        self.throttled.retain(|&(t, p)| {
            let keep = len(&self.queues, t, p) > low;
            if !keep {
                out.resume.push((t, p));
            }
            keep
        });
        out
    }

    /// Records held, not yet released.
    pub(super) fn held(&self) -> usize {
        self.queues.values().map(|[a, b]| a.len() + b.len()).sum()
    }

    /// How many records were released by the `max_idle` escape (folded without knowing that
    /// the other topic-partition had nothing earlier) since the last call.
    pub(super) fn take_unordered(&mut self) -> u64 {
        std::mem::take(&mut self.unordered)
    }

    /// Whether records of partition `p` are held.
    pub(super) fn holds(&self, p: i32) -> bool {
        self.queues.contains_key(&p)
    }

    /// Forgets everything held, and what was throttled (a rebalance or an error: the input
    /// resumes at the committed offsets, so the records are polled again, and the handover
    /// pauses and resumes every partition itself).
    pub(super) fn clear(&mut self) {
        self.queues.clear();
        self.waiting.clear();
        self.throttled.clear();
    }

    /// Takes, per partition and in merged order, every record that may be folded now.
    /// `now` is the loop's *polling clock*, the time spent polling so far: a batch that takes
    /// long to fold and commit does not count as waiting for the other topic, so under load the
    /// `max_idle` escape (the one order that depends on timing) is not taken needlessly.
    /// `caught_up(topic, p)` says whether that topic-partition has nothing more on the broker
    /// past what was polled.
    pub(super) fn release(
        &mut self,
        now: Duration,
        caught_up: impl Fn(InputTopic, i32) -> bool,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (&p, q) in self.queues.iter_mut() {
            loop {
                let next = match (q[0].front(), q[1].front()) {
                    (Some(g), Some(u)) => {
                        self.waiting.remove(&(InputTopic::Grants, p));
                        self.waiting.remove(&(InputTopic::Usage, p));
                        if key(g) <= key(u) {
                            InputTopic::Grants
                        } else {
                            InputTopic::Usage
                        }
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        let t = if q[0].is_empty() {
                            InputTopic::Usage
                        } else {
                            InputTopic::Grants
                        };
                        let since = *self.waiting.entry((t, p)).or_insert(now);
                        if caught_up(other(t), p) {
                            t
                        } else if now.saturating_sub(since) >= self.max_idle {
                            self.unordered += 1;
                            t
                        } else {
                            break;
                        }
                    }
                    (None, None) => {
                        self.waiting.remove(&(InputTopic::Grants, p));
                        self.waiting.remove(&(InputTopic::Usage, p));
                        break;
                    }
                };
                out.extend(q[slot(next)].pop_front());
            }
        }
        self.queues
            .retain(|_, [a, b]| !a.is_empty() || !b.is_empty());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, Eq)]
    struct R(InputTopic, i32, i64, i64);

    impl Timed for R {
        fn topic(&self) -> InputTopic {
            self.0
        }
        fn partition(&self) -> i32 {
            self.1
        }
        fn offset(&self) -> i64 {
            self.2
        }
        fn timestamp(&self) -> Option<i64> {
            Some(self.3)
        }
    }

    const U: InputTopic = InputTopic::Usage;
    const G: InputTopic = InputTopic::Grants;

    fn merge() -> Merge<R> {
        Merge::new(Duration::from_millis(500), 1000)
    }

    #[test]
    fn a_full_queue_is_throttled_not_released_out_of_order_and_resumed_at_half() {
        let mut m = Merge::new(Duration::from_secs(10), 4);
        for o in 0..5 {
            m.push(R(U, 0, o, 10 + o));
        }
        // 5 held, waiting for the grants (not caught up): nothing is released out of order;
        // the usage topic-partition is paused instead, once.
        assert!(m.release(Duration::ZERO, |_, _| false).is_empty());
        assert_eq!(m.take_unordered(), 0);
        let t = m.throttle();
        assert_eq!((t.pause, t.resume), (vec![(U, 0)], vec![]));
        assert_eq!(m.throttle(), Throttle::default(), "paused once");
        // The grants arrive (the prefetch queue drained): the merge goes on in order.
        m.push(R(G, 0, 0, 12));
        m.push(R(G, 0, 1, 30));
        let out = m.release(Duration::ZERO, |_, _| false);
        assert_eq!(
            out,
            [
                R(U, 0, 0, 10),
                R(U, 0, 1, 11),
                R(G, 0, 0, 12),
                R(U, 0, 2, 12),
                R(U, 0, 3, 13),
                R(U, 0, 4, 14)
            ]
        );
        // The usage queue is empty (under half of the cap of 4): resumed. The grant at 30
        // waits for the usage topic-partition.
        assert_eq!(m.held(), 1);
        let t = m.throttle();
        assert_eq!((t.pause, t.resume), (vec![], vec![(U, 0)]));
        assert_eq!(m.take_unordered(), 0);
        // A rebalance forgets the throttling (the handover pauses and resumes by itself).
        for o in 5..9 {
            m.push(R(U, 0, o, 40 + o));
        }
        assert_eq!(m.throttle().pause, [(U, 0)]);
        m.clear();
        assert_eq!(m.throttle(), Throttle::default());
    }

    #[test]
    fn a_grant_polled_after_the_usage_it_preceded_is_folded_first() {
        let mut m = merge();
        let t0 = Duration::ZERO;
        // The usage comes in one poll; the grants partition is behind (not caught up).
        m.push(R(U, 3, 0, 2_000));
        assert!(m.release(t0, |_, _| false).is_empty(), "held");
        m.push(R(G, 3, 0, 1_000));
        m.push(R(U, 3, 1, 2_500));
        let out = m.release(t0, |_, _| false);
        assert_eq!(out, [R(G, 3, 0, 1_000)]);
        // The usage waits for the grants partition (a grant before it may be on its way),
        // until that is caught up.
        assert_eq!(m.held(), 2);
        assert_eq!(
            m.release(t0, |t, _| t == G),
            [R(U, 3, 0, 2_000), R(U, 3, 1, 2_500)]
        );
        assert_eq!(m.held(), 0);
    }

    #[test]
    fn a_topic_partition_that_stays_behind_is_waited_for_at_most_max_idle() {
        let mut m = merge();
        let t0 = Duration::ZERO;
        m.push(R(U, 0, 0, 10));
        assert!(m.release(t0, |_, _| false).is_empty());
        assert!(m
            .release(t0 + Duration::from_millis(499), |_, _| false)
            .is_empty());
        assert_eq!(
            m.release(t0 + Duration::from_millis(500), |_, _| false),
            [R(U, 0, 0, 10)]
        );
        assert_eq!(m.take_unordered(), 1, "the escape is counted");
        assert_eq!(m.take_unordered(), 0);
        // Released because the other side is caught up: in order, not counted.
        m.push(R(U, 0, 1, 11));
        assert_eq!(m.release(t0, |_, _| true), [R(U, 0, 1, 11)]);
        assert_eq!(m.take_unordered(), 0);
    }

    #[test]
    fn each_topic_partition_keeps_its_offset_order_and_ties_go_to_grants() {
        let mut m = merge();
        // Usage out of time order within its partition: offset order is kept.
        m.push(R(U, 1, 0, 50));
        m.push(R(U, 1, 1, 10));
        m.push(R(G, 1, 0, 50));
        m.push(R(G, 1, 1, 60));
        let out = m.release(Duration::ZERO, |_, _| true);
        assert_eq!(
            out,
            [
                R(G, 1, 0, 50),
                R(U, 1, 0, 50),
                R(U, 1, 1, 10),
                R(G, 1, 1, 60)
            ]
        );
    }

    #[test]
    fn partitions_are_merged_independently() {
        let mut m = merge();
        m.push(R(U, 0, 0, 5));
        m.push(R(U, 1, 0, 5));
        m.push(R(G, 1, 0, 1));
        let out = m.release(Duration::ZERO, |_, p| p == 1);
        assert_eq!(out, [R(G, 1, 0, 1), R(U, 1, 0, 5)], "partition 0 waits");
        assert_eq!(m.held(), 1);
    }

    #[test]
    fn merging_is_the_same_however_the_records_were_polled() {
        use proptest::prelude::*;
        proptest!(|(recs in proptest::collection::vec((any::<bool>(), 0i64..100), 0..40), cuts in proptest::collection::vec(any::<bool>(), 0..40))| {
            // One partition; offsets per topic in order.
            let mut next = [0i64; 2];
            let all: Vec<R> = recs.iter().map(|(grant, ts)| {
                let t = if *grant { G } else { U };
                let o = next[slot(t)];
                next[slot(t)] += 1;
                R(t, 0, o, *ts)
            }).collect();
            // Everything at once, both topics caught up at the end.
            let mut whole = merge();
            for r in all.clone() { whole.push(r); }
            let expected = whole.release(Duration::ZERO, |_, _| true);
            // The same records in polls of arbitrary size, each topic interleaved differently;
            // a topic counts as caught up once all of it was polled.
            let mut m = merge();
            let (gs, us): (Vec<R>, Vec<R>) = all.iter().cloned().partition(|r| r.0 == G);
            let (mut gi, mut ui) = (0, 0);
            let mut got = Vec::new();
            let mut c = cuts.iter().cycle();
            while gi < gs.len() || ui < us.len() {
                if (c.next().copied().unwrap_or(true) && gi < gs.len()) || ui >= us.len() {
                    m.push(gs[gi].clone()); gi += 1;
                } else {
                    m.push(us[ui].clone()); ui += 1;
                }
                let (gd, ud) = (gi == gs.len(), ui == us.len());
                got.extend(m.release(Duration::ZERO, |t, _| if t == G { gd } else { ud }));
            }
            got.extend(m.release(Duration::ZERO, |_, _| true));
            prop_assert_eq!(got, expected);
        });
    }
}
