//! Which instance serves which partition: every instance announces its API address and the
//! partitions it serves on a small compacted topic (`<group>-instances`, keyed by instance id),
//! and reads everyone's announcements back, so any instance can route a request for any
//! customer (murmur2 of the customer id gives the partition).
//!
//! An announcement is trusted for [`FRESH_FOR`] after it was made; instances re-announce every
//! second and at once when what they serve changes (a revoke announces "nothing" before the
//! state moves), and a stopping instance announces "nothing" last. When two fresh announcements
//! claim a partition (a handover), the newer wins; the API answers 503 rather than guess when no
//! fresh owner is known.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::PipelineStatus;
use crate::config::Config;
use crate::shutdown::Shutdown;

/// How long an announcement is trusted.
pub const FRESH_FOR: Duration = Duration::from_secs(5);

/// One instance's announcement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The instance (`kafka.instance_id`).
    pub instance_id: String,
    /// Its API base URL.
    pub api_url: String,
    /// The partitions it serves (owned and restored).
    pub serving: BTreeSet<i32>,
    /// When it said so (ms since the epoch).
    pub at_ms: i64,
}

/// Everyone's latest announcement.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    inner: Arc<RwLock<HashMap<String, (Announcement, Instant)>>>,
}

impl Directory {
    /// The instance serving partition `p`, if a fresh announcement says so (newest wins).
    pub fn owner(&self, p: i32) -> Option<Announcement> {
        let map = self.inner.read().expect("not poisoned");
        map.values()
            .filter(|(a, seen)| seen.elapsed() < FRESH_FOR && a.serving.contains(&p))
            .max_by_key(|(a, _)| a.at_ms)
            .map(|(a, _)| a.clone())
    }

    /// Every fresh announcement (for `/readyz` and debugging).
    pub fn instances(&self) -> Vec<Announcement> {
        let map = self.inner.read().expect("not poisoned");
        let mut v: Vec<Announcement> = map
            .values()
            .filter(|(_, seen)| seen.elapsed() < FRESH_FOR)
            .map(|(a, _)| a.clone())
            .collect();
        v.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        v
    }

    fn record(&self, a: Announcement) {
        let mut map = self.inner.write().expect("not poisoned");
        let newer = map
            .get(&a.instance_id)
            .is_none_or(|(old, _)| old.at_ms <= a.at_ms);
        if newer {
            map.insert(a.instance_id.clone(), (a, Instant::now()));
        }
    }
}

/// The directory topic's name.
pub fn topic(cfg: &Config) -> String {
    format!("{}-instances", cfg.kafka.group_id)
}

/// Runs the announcer and the reader on one dedicated thread until shutdown, then announces
/// that this instance serves nothing.
pub fn run(
    cfg: Arc<Config>,
    api_url: String,
    status: Arc<PipelineStatus>,
    directory: Directory,
    shutdown: Shutdown,
) {
    let topic = topic(&cfg);
    let producer: BaseProducer = match super::client_config(&cfg.kafka)
        .set("linger.ms", "0")
        .set("message.timeout.ms", "5000")
        .create()
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "directory producer");
            return;
        }
    };
    let reader: BaseConsumer = match super::client_config(&cfg.kafka)
        .set("group.id", format!("{}-directory", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "directory reader");
            return;
        }
    };
    let mut tpl = TopicPartitionList::new();
    if let Err(e) = tpl
        .add_partition_offset(&topic, 0, Offset::Beginning)
        .and_then(|_| reader.assign(&tpl))
    {
        tracing::error!(error = %e, "directory reader assignment");
        return;
    }
    let announce = |serving: BTreeSet<i32>| {
        let a = Announcement {
            instance_id: cfg.kafka.instance_id.clone(),
            api_url: api_url.clone(),
            serving,
            at_ms: crate::clock::now_ms(),
        };
        let payload = serde_json::to_vec(&a).expect("serialisable");
        let rec = BaseRecord::to(&topic)
            .key(cfg.kafka.instance_id.as_str())
            .payload(&payload)
            .partition(0);
        if let Err((e, _)) = producer.send(rec) {
            tracing::debug!(error = %e, "announcement not queued");
        }
        producer.poll(Duration::ZERO);
    };
    let serving = || -> BTreeSet<i32> {
        status
            .owned()
            .into_iter()
            .filter(|p| status.serves(*p))
            .collect()
    };
    let mut last = BTreeSet::new();
    let mut last_at = Instant::now() - Duration::from_secs(10);
    while !shutdown.is_triggered() {
        let now_serving = serving();
        if now_serving != last || last_at.elapsed() >= Duration::from_secs(1) {
            announce(now_serving.clone());
            last = now_serving;
            last_at = Instant::now();
        }
        match reader.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if let Some(a) = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<Announcement>(p).ok())
                {
                    directory.record(a);
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "directory reader"),
            None => {}
        }
    }
    announce(BTreeSet::new());
    let _ = producer.flush(Duration::from_secs(2));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(id: &str, serving: &[i32], at_ms: i64) -> Announcement {
        Announcement {
            instance_id: id.into(),
            api_url: format!("http://{id}"),
            serving: serving.iter().copied().collect(),
            at_ms,
        }
    }

    #[test]
    fn the_newest_fresh_claim_owns_a_partition() {
        let d = Directory::default();
        d.record(ann("a", &[0, 1], 10));
        d.record(ann("b", &[1, 2], 20));
        assert_eq!(d.owner(0).unwrap().instance_id, "a");
        assert_eq!(d.owner(1).unwrap().instance_id, "b");
        assert!(d.owner(3).is_none());
        // An older announcement of the same instance never overrides a newer one.
        d.record(ann("b", &[], 30));
        d.record(ann("b", &[1, 2], 25));
        assert_eq!(d.owner(1).unwrap().instance_id, "a");
    }
}
