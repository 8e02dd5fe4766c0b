//! `bench latency`: how long from producing a usage event (or a top-up) to its committed
//! `balance-changed` and `balance-exhausted` records, read with `read_committed` as an
//! enforcing service reads them.
//!
//! drawdown runs with its default threads on fresh topics. Every customer cycles through a
//! top-up of 8 units of the first meter, then 9 usage events of it, so each cycle crosses to
//! exhausted and back (restored), at `--rate` records/s for `--seconds`. Each record's id
//! carries its send time (µs); the reader takes `now - send time` of the record's `cause_id`
//! when the committed record arrives.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use drawdown::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{create_topics, percentiles, run_config, Drawdown};

/// `bench latency`.
#[derive(Clone, Debug, clap::Args)]
pub struct LatencyArgs {
    /// The drawdown binary (default: `drawdown` beside this one).
    #[arg(long)]
    pub drawdown: Option<PathBuf>,
    /// Records/s to send.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Take half of the peak records/s that `bench e2e --save FILE` measured (default threads).
    #[arg(long)]
    pub rate_from: Option<PathBuf>,
    /// How long to send.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Customers.
    #[arg(long, default_value_t = 10_000)]
    pub customers: usize,
    /// Partitions.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The send time carried by an id `lat-<seq>-<µs>`.
fn sent_us(id: &str) -> Option<u64> {
    id.strip_prefix("lat")?.rsplit('-').next()?.parse().ok()
}

fn half_peak(path: &PathBuf) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let peak = v["rows"]
        .as_array()
        .and_then(|rows| rows.last())
        .and_then(|r| r["records_per_s"].as_f64())
        .context("records_per_s of the last row")?;
    Ok(peak / 2.0)
}

/// Runs `bench latency`.
pub async fn run(cfg: &Config, args: LatencyArgs) -> anyhow::Result<()> {
    let rate = match (args.rate, &args.rate_from) {
        (Some(r), _) => r,
        (None, Some(p)) => half_peak(p)?,
        (None, None) => bail!("give --rate or --rate-from"),
    };
    let id = format!("lat-{}", drawdown::clock::now_ms());
    let mut c = run_config(cfg, &id, &id);
    c.kafka.partitions = args.partitions;
    create_topics(
        &c,
        &[c.topics.usage.clone(), c.topics.grants.clone()],
        args.partitions,
    )
    .await?;
    let meter = cfg
        .meters
        .iter()
        .find(|m| {
            matches!(m.aggregation, drawdown::ledger::Aggregation::Count) && m.filter.is_empty()
        })
        .context("a count meter without filters in the config")?
        .clone();
    let bin = match &args.drawdown {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("drawdown"),
    };
    let mut dd = Drawdown::start(&bin, &super::e2e::config_path(), &c, 0)?;
    dd.ready(Duration::from_secs(120)).await?;

    // The reader, positioned at the end of both output topics before anything is sent.
    let reader: BaseConsumer = drawdown::kafka::client_config(&c.kafka)
        .set("group.id", format!("{id}-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in [&c.topics.balance_changed, &c.topics.balance_exhausted] {
        for p in 0..args.partitions {
            tpl.add_partition_offset(t, p, Offset::End)?;
        }
    }
    reader.assign(&tpl)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (changed_topic, exhausted_topic) = (
        c.topics.balance_changed.clone(),
        c.topics.balance_exhausted.clone(),
    );
    let stop2 = stop.clone();
    let reading = std::thread::spawn(move || {
        let mut lat: HashMap<&'static str, Vec<u64>> = HashMap::new();
        while !stop2.load(Ordering::Acquire) {
            let Some(Ok(m)) = reader.poll(Duration::from_millis(50)) else {
                continue;
            };
            let now = now_us();
            let which = if m.topic() == changed_topic {
                "balance-changed"
            } else if m.topic() == exhausted_topic {
                "balance-exhausted"
            } else {
                continue;
            };
            let cause = m
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .and_then(|v| v["cause_id"].as_str().and_then(sent_us));
            if let Some(sent) = cause {
                lat.entry(which).or_default().push(now.saturating_sub(sent));
            }
        }
        lat
    });

    // The sender.
    let producer: BaseProducer = drawdown::kafka::client_config(&c.kafka)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .create()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let mut sent = 0u64;
    while Instant::now() < until {
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let customer = format!("{id}-{}", sent as usize % args.customers);
            let step = (sent as usize / args.customers) % 10;
            let ident = format!(
                "lat{}-{sent}-{}",
                if step == 0 { "g" } else { "u" },
                now_us()
            );
            let (topic, payload) = if step == 0 {
                (
                    &c.topics.grants,
                    serde_json::json!({"type": "grant", "grant_id": ident, "customer_id": customer,
                        "meter": meter.name.as_str(), "amount": "8", "kind": "top_up"}),
                )
            } else {
                (
                    &c.topics.usage,
                    serde_json::json!({"id": ident, "customer_id": customer,
                        "name": meter.event, "timestamp": drawdown::clock::now_ms()}),
                )
            };
            let payload = serde_json::to_vec(&payload)?;
            let headers = OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
            let mut rec = BaseRecord::to(topic)
                .key(customer.as_str())
                .payload(payload.as_slice())
                .headers(headers);
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        rec = back;
                        producer.poll(Duration::from_millis(1));
                    }
                }
            }
            sent += 1;
        }
        producer.poll(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(30))?;
    let achieved = sent as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(10)).await; // let the last ones commit
    stop.store(true, Ordering::Release);
    let mut lat = reading
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?;
    drop(dd);
    println!(
        "bench latency: rate={rate:.0}/s sent={sent} achieved={achieved:.0}/s seconds={}",
        args.seconds
    );
    println!("| record (read_committed) | count | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for which in ["balance-changed", "balance-exhausted"] {
        let v = lat.entry(which).or_default();
        let n = v.len();
        match percentiles(v) {
            Some((p50, p99, max)) => println!(
                "| {which} | {n} | {:.1} | {:.1} | {:.1} |",
                p50 as f64 / 1e3,
                p99 as f64 / 1e3,
                max as f64 / 1e3
            ),
            None => println!("| {which} | 0 | - | - | - |"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_send_time() {
        assert_eq!(
            sent_us("latu-17-1764633600000000"),
            Some(1_764_633_600_000_000)
        );
        assert_eq!(sent_us("latg-0-5"), Some(5));
        assert_eq!(sent_us("e1"), None);
    }
}
