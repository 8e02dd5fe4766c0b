//! `bench`: the end-to-end benchmarks, against the real broker (not timed assertions: they
//! print figures).
//! - `bench e2e` ([`e2e`]): a fixed pre-produced input consumed with fresh groups by an
//!   exactly-once pass-through copier ([`copier`], the ceiling on this broker), by drawdown with
//!   one pipeline thread and by drawdown with its default threads; records/s, the ratio to the
//!   copier, CPU seconds per million records, Kafka records written per input record.
//! - `bench latency` ([`latency`]): produce -> committed `balance-changed` and
//!   `balance-exhausted` (read with `read_committed`) at a given rate; p50/p99/max.
//! - `bench copy`: the copier itself, run by `e2e` as a process of its own.

mod copier;
mod e2e;
mod latency;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use drawdown::config::Config;
use drawdown::kafka::lag::LagMonitor;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

/// `drawdown-loadgen bench ...`.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Throughput of drawdown against an exactly-once pass-through, on one pre-produced input.
    E2e(e2e::E2eArgs),
    /// Latency from produce to the committed balance records, at a fixed rate.
    Latency(latency::LatencyArgs),
    /// The exactly-once pass-through copier (run by `e2e`).
    Copy(copier::CopyArgs),
}

/// Runs a bench subcommand.
pub async fn run(cfg: &Config, bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::E2e(a) => e2e::run(cfg, a).await,
        Bench::Latency(a) => latency::run(cfg, a).await,
        Bench::Copy(a) => {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || copier::run(&cfg, a))
                .await
                .context("the copier")?
        }
    }
}

/// The topics of one run: `<id>-<role>`.
fn topic(id: &str, role: &str) -> String {
    format!("{id}-{role}")
}

/// `cfg` pointed at group `group`, inputs of `input` and outputs of `run`.
fn run_config(cfg: &Config, input: &str, run: &str) -> Config {
    let mut c = cfg.clone();
    c.kafka.group_id = run.to_string();
    c.topics.usage = topic(input, "usage");
    c.topics.grants = topic(input, "grants");
    c.topics.balance_changed = topic(run, "balance-changed");
    c.topics.balance_exhausted = topic(run, "balance-exhausted");
    c.topics.dlq = topic(run, "dlq");
    c.topics.top_up_requests = topic(run, "top-up-requests");
    c.topics.changelog = Some(topic(run, "changelog"));
    c
}

/// The `DRAWDOWN__*` environment that gives a drawdown process `cfg`'s group and topics.
fn run_env(cfg: &Config) -> Vec<(String, String)> {
    let t = &cfg.topics;
    [
        ("KAFKA__GROUP_ID", cfg.kafka.group_id.clone()),
        (
            "KAFKA__BOOTSTRAP_SERVERS",
            cfg.kafka.bootstrap_servers.clone(),
        ),
        ("KAFKA__PARTITIONS", cfg.kafka.partitions.to_string()),
        ("TOPICS__USAGE", t.usage.clone()),
        ("TOPICS__GRANTS", t.grants.clone()),
        ("TOPICS__BALANCE_CHANGED", t.balance_changed.clone()),
        ("TOPICS__BALANCE_EXHAUSTED", t.balance_exhausted.clone()),
        ("TOPICS__DLQ", t.dlq.clone()),
        ("TOPICS__TOP_UP_REQUESTS", t.top_up_requests.clone()),
        ("TOPICS__CHANGELOG", cfg.changelog_topic()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("DRAWDOWN__{k}"), v))
    .collect()
}

/// Creates `topics` with `partitions` partitions (existing ones are left alone).
async fn create_topics(cfg: &Config, topics: &[String], partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = drawdown::kafka::client_config(&cfg.kafka)
        .create()
        .context("creating the admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                partitions,
                TopicReplication::Fixed(cfg.kafka.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(new.iter(), &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => bail!("creating {t}: {code}"),
        }
    }
    Ok(())
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0) // USER_HZ, 100 on Linux
}

/// Waits until `cfg`'s group has committed every record of its inputs; returns when.
fn wait_committed(cfg: &Config, partitions: i32, timeout: Duration) -> anyhow::Result<Instant> {
    let monitor = LagMonitor::new(cfg, partitions).context("the lag monitor")?;
    let deadline = Instant::now() + timeout;
    loop {
        let lag: i64 = monitor.measure()?.iter().map(|l| l.lag).sum();
        if lag == 0 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "group {} still has {lag} records to commit",
                cfg.kafka.group_id
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A drawdown process of a bench run, stopped (SIGTERM, then SIGKILL) when dropped.
struct Drawdown {
    child: Child,
    api: String,
    dir: tempfile::TempDir,
}

impl Drawdown {
    /// Starts `bin run` with `cfg`'s group and topics, `threads` pipeline threads, a fresh store.
    fn start(bin: &Path, config: &Path, cfg: &Config, threads: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a temp dir")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.path().join("drawdown.log"))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(config)
            .arg("run")
            .envs(run_env(cfg))
            .env("DRAWDOWN__STORE__PATH", dir.path().join("state"))
            .env("DRAWDOWN__API__LISTEN", format!("127.0.0.1:{port}"))
            .env("DRAWDOWN__API__ALLOW_UNAUTHENTICATED", "true")
            .env("DRAWDOWN__PIPELINE__THREADS", threads.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            api: format!("http://127.0.0.1:{port}"),
            dir,
        })
    }

    /// Waits for `/readyz` to answer 200.
    async fn ready(&mut self, timeout: Duration) -> anyhow::Result<Instant> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self.dir.path().join("drawdown.log"))
                    .unwrap_or_default();
                bail!("drawdown exited ({status}):\n{log}");
            }
            if let Ok(r) = http.get(format!("{}/readyz", self.api)).send().await {
                if r.status().is_success() {
                    return Ok(Instant::now());
                }
            }
            if Instant::now() > deadline {
                bail!("drawdown not ready after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of each counter named in `names` on the process's `/metrics` (0 if absent).
    async fn counters(&self, names: &[&str]) -> anyhow::Result<Vec<u64>> {
        let text = reqwest::get(format!("{}/metrics", self.api))
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(names
            .iter()
            .map(|name| {
                text.lines()
                    .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .filter_map(|v| v.trim().parse::<f64>().ok())
                    .sum::<f64>() as u64
            })
            .collect())
    }

    /// The process's log so far.
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("drawdown.log")
    }
}

impl Drop for Drawdown {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percentiles of `samples` (sorted in place): (p50, p99, max).
fn percentiles(samples: &mut [u64]) -> Option<(u64, u64, u64)> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.99), *samples.last().expect("non-empty")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut v), Some((51, 99, 100)));
        assert_eq!(percentiles(&mut []), None);
    }

    #[test]
    fn cpu_seconds_reads_this_process() {
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }
}
