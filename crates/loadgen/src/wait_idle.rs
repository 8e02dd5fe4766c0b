//! `wait-idle`: waits until the service's consumer group has committed every input record.
//!
//! It measures with drawdown's own lag monitor ([`LagMonitor`]): the group's committed offset
//! of each input partition against its high watermark. Lag 0 everywhere means every record
//! sent so far was processed *and committed*:
//! - the inputs are written by idempotent, non-transactional producers, so they hold no
//!   control records: the high watermark is one past the last record, and `produce` flushes
//!   (every record acknowledged) before it returns;
//! - the group commits its offsets only inside its transactions
//!   (`send_offsets_to_transaction`), and the group coordinator keeps a transactional offset
//!   commit apart until its transaction commits. The monitor fetches without `require_stable`
//!   (`isolation.level=read_uncommitted`): while a transaction is open it gets the last
//!   committed offsets instead of waiting or failing, so it can under-report progress but
//!   never count records of an open (or later aborted) transaction as done. (Checked against
//!   the broker by `tests/lag.rs`.)
//! - a partition without a committed offset counts everything retained (high - low) as lag.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drawdown::config::Config;
use drawdown::kafka::lag::LagMonitor;
use rdkafka::consumer::BaseConsumer;

use crate::args::WaitIdleArgs;
use crate::topics::partitions;

/// `wait-idle` (see the module docs).
pub async fn wait_idle(cfg: &Config, args: WaitIdleArgs) -> anyhow::Result<()> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || wait_idle_blocking(&cfg, args.timeout))
        .await
        .context("wait-idle task")?
}

/// The partition count of the (co-partitioned) input topics.
fn input_partitions(cfg: &Config) -> anyhow::Result<i32> {
    let consumer: BaseConsumer = drawdown::kafka::client_config(&cfg.kafka)
        .create()
        .context("creating the metadata client")?;
    let usage = partitions(&consumer, &cfg.topics.usage)?.len();
    let grants = partitions(&consumer, &cfg.topics.grants)?.len();
    if usage != grants {
        bail!("the input topics have {usage} and {grants} partitions: not co-partitioned");
    }
    Ok(usage as i32)
}

/// The lag of the input topics, summed per topic (`usage`, `grants`).
fn measure(
    monitor: &mut Option<LagMonitor>,
    cfg: &Config,
) -> anyhow::Result<BTreeMap<&'static str, i64>> {
    if monitor.is_none() {
        let n = input_partitions(cfg)?;
        *monitor = Some(LagMonitor::new(cfg, n).context("creating the lag monitor")?);
    }
    let lags = monitor
        .as_ref()
        .expect("created above")
        .measure()
        .context("measuring the lag")?;
    let mut by_topic = BTreeMap::new();
    for l in lags {
        *by_topic.entry(l.topic).or_default() += l.lag;
    }
    Ok(by_topic)
}

fn wait_idle_blocking(cfg: &Config, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut monitor = None;
    loop {
        let lags = match measure(&mut monitor, cfg) {
            Ok(l) => l,
            Err(e) if started.elapsed() < timeout => {
                eprintln!("wait-idle: {e:#}; retrying");
                monitor = None;
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        let total: i64 = lags.values().sum();
        let detail: Vec<String> = lags.iter().map(|(t, l)| format!("{t}={l}")).collect();
        if total == 0 {
            println!(
                "wait-idle: idle after {:.1}s (group {})",
                started.elapsed().as_secs_f64(),
                cfg.kafka.group_id
            );
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "wait-idle: timed out after {:?} with lag {} ({})",
                timeout,
                total,
                detail.join(" ")
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            println!(
                "wait-idle: lag={total} ({}) after {:.0}s",
                detail.join(" "),
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
