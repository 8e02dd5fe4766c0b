//! Stream time: the clock the credit rules run on, per partition.
//!
//! A partition's stream time is the highest event time folded so far, less `pipeline.grace`,
//! and never goes back. Time-driven rules (activation, expiry, cycle ends, the dedupe window)
//! run at it, so a backlog after an outage is applied at its own times before the expiries it
//! preceded, and replaying the topics gives the same ledger. Each record is placed on it:
//!
//! | event time `t` of the record (stream time `s` before it) | applied at | stream time after |
//! |---|---|---|
//! | `t >= s` (in order, or late by less than the grace) | `t` | `max(s, t - grace)` |
//! | `t < s` (later than the grace) | `s`, counted as late, `late: true` | `s` |
//! | `t > wall clock + max_future_skew` | dead-lettered (`timestamp_in_future`) | `s` |
//!
//! Example with `grace = 30s`: usage at 10:00:00 moves stream time to 09:59:30; a grant's
//! expiry at 09:59:45 has not happened yet, so usage at 09:59:40 arriving next still draws
//! from it (applied at 09:59:40); usage at 09:59:20 arriving after that is late (applied at
//! 09:59:30, after nothing that expired before it, but counted and flagged).
//!
//! A partition with nothing to fold (caught up, nothing held) advances by the wall clock, to
//! `wall - grace`, so an expiry happens even when no traffic arrives. That is the one input
//! that is not in the data: a replay can differ only where a partition sat idle past an expiry
//! and then received events older than it.

use std::collections::BTreeMap;
use std::time::Duration;

/// An event time beyond the allowed skew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFuture {
    /// The latest event time accepted now.
    pub limit: i64,
}

/// Where a record lands on its partition's stream time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placed {
    /// The time the rules apply it at.
    pub at: i64,
    /// Later than the grace: applied at stream time instead of its own.
    pub late: bool,
}

/// The stream time of each partition.
#[derive(Clone, Debug)]
pub struct StreamTimes {
    times: BTreeMap<i32, i64>,
    grace_ms: i64,
    skew_ms: i64,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl StreamTimes {
    /// Stream times with `grace`, refusing event times more than `max_future_skew` ahead.
    pub fn new(grace: Duration, max_future_skew: Duration) -> Self {
        Self {
            times: BTreeMap::new(),
            grace_ms: ms(grace),
            skew_ms: ms(max_future_skew),
        }
    }

    /// Partition `p`'s stream time (`i64::MIN` before anything was folded).
    pub fn get(&self, p: i32) -> i64 {
        self.times.get(&p).copied().unwrap_or(i64::MIN)
    }

    /// Sets `p`'s stream time if later (a restored partition's).
    pub fn raise(&mut self, p: i32, t: i64) {
        let s = self.times.entry(p).or_insert(i64::MIN);
        *s = (*s).max(t);
    }

    /// Forgets partition `p` (revoked).
    pub fn forget(&mut self, p: i32) {
        self.times.remove(&p);
    }

    /// Every partition's stream time.
    pub fn all(&self) -> &BTreeMap<i32, i64> {
        &self.times
    }

    /// Places a record of partition `p` with event time `t`, at wall clock `wall`, and moves
    /// the stream time past it (see the module docs).
    pub fn place(&mut self, p: i32, t: i64, wall: i64) -> Result<Placed, InFuture> {
        let limit = wall.saturating_add(self.skew_ms);
        if t > limit {
            return Err(InFuture { limit });
        }
        let s = self.times.entry(p).or_insert(i64::MIN);
        let placed = Placed {
            at: t.max(*s),
            late: t < *s,
        };
        *s = (*s).max(t.saturating_sub(self.grace_ms));
        Ok(placed)
    }

    /// Partition `p` has nothing to fold: its stream time follows the wall clock.
    pub fn idle(&mut self, p: i32, wall: i64) {
        self.raise(p, wall.saturating_sub(self.grace_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000;

    fn times() -> StreamTimes {
        StreamTimes::new(Duration::from_secs(30), Duration::from_secs(300))
    }

    #[test]
    fn events_within_the_grace_apply_at_their_own_time() {
        let mut t = times();
        let wall = 1_000 * S;
        assert_eq!(
            t.place(0, 600 * S, wall),
            Ok(Placed {
                at: 600 * S,
                late: false
            })
        );
        assert_eq!(t.get(0), 570 * S);
        // 20 s older than the newest: within the grace.
        assert_eq!(
            t.place(0, 580 * S, wall),
            Ok(Placed {
                at: 580 * S,
                late: false
            })
        );
        assert_eq!(t.get(0), 570 * S, "never goes back");
        // 40 s older: late, applied at stream time.
        assert_eq!(
            t.place(0, 560 * S, wall),
            Ok(Placed {
                at: 570 * S,
                late: true
            })
        );
        assert_eq!(t.get(0), 570 * S);
    }

    #[test]
    fn a_timestamp_too_far_ahead_is_refused_and_moves_nothing() {
        let mut t = times();
        let wall = 1_000 * S;
        t.place(0, 900 * S, wall).unwrap();
        assert_eq!(
            t.place(0, 1_301 * S, wall),
            Err(InFuture { limit: 1_300 * S })
        );
        assert_eq!(t.get(0), 870 * S);
        assert!(
            t.place(0, 1_300 * S, wall).is_ok(),
            "the limit itself is accepted"
        );
    }

    #[test]
    fn partitions_have_their_own_time_and_idle_ones_follow_the_clock() {
        let mut t = times();
        t.place(1, 500 * S, 1_000 * S).unwrap();
        assert_eq!(t.get(2), i64::MIN);
        t.idle(2, 1_000 * S);
        assert_eq!(t.get(2), 970 * S);
        assert_eq!(t.get(1), 470 * S);
        t.idle(1, 400 * S);
        assert_eq!(t.get(1), 470 * S, "an idle step never moves time back");
    }
}
