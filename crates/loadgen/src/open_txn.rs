//! `open-transactions`: what open transactions hold now, as the handover test needs to know
//! when it froze an instance inside one:
//! - `changelog P LSO END`: a changelog partition whose last stable offset (read_committed) is
//!   below its log end (read_uncommitted): a transaction wrote to it and is not resolved;
//! - `offsets pending`: the drawdown group's committed input offsets are not stable (a fetch with
//!   `require_stable`, as read_committed asks, is refused for a second): a transaction has sent
//!   them (`send_offsets_to_transaction`) and is neither committed nor aborted. A live instance's
//!   transaction resolves within milliseconds, so only a stalled one shows.

use std::time::Duration;

use anyhow::Context;
use drawdown::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;

use crate::topics::partitions;

/// Prints what is open (see the module docs); `Ok(true)` if anything is.
pub fn open_transactions(cfg: &Config) -> anyhow::Result<bool> {
    let client = |group: &str, isolation: &str| -> anyhow::Result<BaseConsumer> {
        drawdown::kafka::client_config(&cfg.kafka)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation)
            .create()
            .context("creating a client")
    };
    let probe = format!("{}-open-txn", cfg.kafka.group_id);
    let committed = client(&probe, "read_committed")?;
    let uncommitted = client(&probe, "read_uncommitted")?;
    let topic = cfg.changelog_topic();
    let timeout = Duration::from_secs(10);
    let mut open = false;
    for p in partitions(&uncommitted, &topic)? {
        let (_, lso) = committed.fetch_watermarks(&topic, p, timeout)?;
        let (_, end) = uncommitted.fetch_watermarks(&topic, p, timeout)?;
        if lso < end {
            println!("changelog {p} {lso} {end}");
            open = true;
        }
    }
    // The group's own offsets, fetched stable (never joining the group).
    let group = client(&cfg.kafka.group_id, "read_committed")?;
    let mut tpl = TopicPartitionList::new();
    for t in [&cfg.topics.usage, &cfg.topics.grants] {
        for p in partitions(&group, t)? {
            tpl.add_partition(t, p);
        }
    }
    let fetched = drawdown::kafka::stable_committed_offsets(&group, tpl, Duration::from_secs(1));
    match fetched {
        Ok(_) => {}
        Err(e) if drawdown::kafka::offsets_not_stable(&e) => {
            println!("offsets pending");
            open = true;
        }
        Err(e) => return Err(e).context("fetching the committed offsets"),
    }
    Ok(open)
}
