//! `bench e2e`: one fixed input, consumed from the start with fresh groups by the copier and by
//! drawdown (one thread, then the default threads), all in one run on the same broker.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use drawdown::config::Config;
use std::io::BufRead;

use super::{cpu_seconds, create_topics, run_config, topic, wait_committed, Drawdown};
use crate::topics::read_topic;

/// `bench e2e`.
#[derive(Clone, Debug, clap::Args)]
pub struct E2eArgs {
    /// The drawdown binary (default: `drawdown` beside this one).
    #[arg(long)]
    pub drawdown: Option<PathBuf>,
    /// Usage events of the input (plus the grants the generator interleaves).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Customers of the input.
    #[arg(long, default_value_t = 10_000)]
    pub customers: usize,
    /// Partitions of the input topics.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Reuse the input of an earlier run (its id, printed by that run) instead of producing.
    #[arg(long)]
    pub input: Option<String>,
    /// Pipeline threads of the "default" drawdown run (0 = one per core, as drawdown does).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where to write the figures (JSON), e.g. for `bench latency --rate-from`.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// One system's figures.
#[derive(Debug, serde::Serialize)]
struct Figures {
    system: String,
    seconds: f64,
    records_per_s: f64,
    cpu_s_per_million: f64,
    written_per_input: f64,
    /// Records beyond one `balance-changed` per change, per usage event (drawdown only).
    extra_per_usage_event: Option<f64>,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("this binary's path")?;
    Ok(exe.with_file_name(name))
}

pub(super) fn config_path() -> PathBuf {
    std::env::var_os("DRAWDOWN_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config/drawdown.toml"))
}

/// Records in `topics` (committed ones only), by topic.
fn count(cfg: &Config, topics: &[String]) -> anyhow::Result<Vec<u64>> {
    topics.iter().map(|t| read_topic(cfg, t, |_| {})).collect()
}

/// Runs `bench e2e`.
pub async fn run(cfg: &Config, args: E2eArgs) -> anyhow::Result<()> {
    let stamp = drawdown::clock::now_ms();
    let input = args.input.clone().unwrap_or_else(|| format!("e2e-{stamp}"));
    let mut base = cfg.clone();
    base.kafka.partitions = args.partitions;
    let inputs = [topic(&input, "usage"), topic(&input, "grants")];
    if args.input.is_none() {
        create_topics(&base, &inputs, args.partitions).await?;
        eprintln!(
            "bench e2e: producing the input {input}: {} usage events, {} customers, {} partitions",
            args.events, args.customers, args.partitions
        );
        let status = Command::new(std::env::current_exe()?)
            .arg("-c")
            .arg(config_path())
            .args([
                "produce",
                "--phase",
                "mixed",
                "--rate",
                "0",
                "--duplicates",
                "0",
            ])
            .args(["--customers", &args.customers.to_string()])
            .args(["--events", &args.events.to_string()])
            .args(["--prefix", &input])
            .env("DRAWDOWN__TOPICS__USAGE", &inputs[0])
            .env("DRAWDOWN__TOPICS__GRANTS", &inputs[1])
            .env("DRAWDOWN__KAFKA__GROUP_ID", format!("{input}-producer"))
            .status()
            .context("running produce")?;
        if !status.success() {
            bail!("produce failed: {status}");
        }
    }
    let total = count(&base, &inputs)?;
    let (usage_events, records) = (total[0], total[0] + total[1]);
    eprintln!("bench e2e: input {input}: {records} records ({usage_events} usage events)");
    let drawdown = match &args.drawdown {
        Some(p) => p.clone(),
        None => sibling("drawdown")?,
    };
    let mut rows = Vec::new();

    // 1. The exactly-once pass-through.
    let run = format!("{input}-copy-{stamp}");
    let c = run_config(&base, &input, &run);
    let out = topic(&run, "copy");
    create_topics(&c, std::slice::from_ref(&out), args.partitions).await?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("-c")
        .arg(config_path())
        .args(["bench", "copy", "--output", &out])
        .env("DRAWDOWN__KAFKA__GROUP_ID", &run)
        .env("DRAWDOWN__TOPICS__USAGE", &inputs[0])
        .env("DRAWDOWN__TOPICS__GRANTS", &inputs[1])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the copier")?;
    let mut lines =
        std::io::BufReader::new(child.stdout.take().context("the copier's stdout")?).lines();
    let first = lines.next().context("the copier said nothing")??;
    if first != "ready" {
        bail!("the copier said {first:?}");
    }
    let t0 = Instant::now();
    let c2 = c.clone();
    let parts = args.partitions;
    let t1 =
        tokio::task::spawn_blocking(move || wait_committed(&c2, parts, Duration::from_secs(1800)))
            .await??;
    let done = lines.next().context("the copier's summary")??;
    let cpu: f64 = done
        .split_whitespace()
        .find_map(|w| w.strip_prefix("cpu_s="))
        .context("cpu_s in the copier's summary")?
        .parse()?;
    child.wait()?;
    let secs = (t1 - t0).as_secs_f64();
    let written = count(&c, std::slice::from_ref(&out))?[0];
    rows.push(Figures {
        system: "exactly-once pass-through (1 output per input)".into(),
        seconds: secs,
        records_per_s: records as f64 / secs,
        cpu_s_per_million: cpu / records as f64 * 1e6,
        written_per_input: written as f64 / records as f64,
        extra_per_usage_event: None,
    });
    eprintln!("bench e2e: {:?}", rows.last());

    // 2. drawdown, one thread, then the default threads.
    let default_threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut outputs: Vec<(usize, Vec<u64>)> = Vec::new();
    for threads in [1, default_threads] {
        let run = format!("{input}-dd{threads}-{stamp}");
        let c = run_config(&base, &input, &run);
        let mut dd = Drawdown::start(&drawdown, &config_path(), &c, threads)?;
        let t0 = dd.ready(Duration::from_secs(120)).await?;
        let cpu0 = cpu_seconds(dd.pid())?;
        let c2 = c.clone();
        let t1 = tokio::task::spawn_blocking(move || {
            wait_committed(&c2, parts, Duration::from_secs(1800))
        })
        .await??;
        let cpu = cpu_seconds(dd.pid())? - cpu0;
        // How the merge went: records folded at stream time or out of timestamp order make
        // the runs differ (the same input must publish the same transitions).
        let order = dd
            .counters(&[
                "drawdown_records_late_total",
                "drawdown_records_unordered_total",
                "drawdown_input_throttled_total",
            ])
            .await?;
        let log = dd.log_path();
        drop(dd);
        let secs = (t1 - t0).as_secs_f64();
        let t = &c.topics;
        let outs = [
            t.balance_changed.clone(),
            t.balance_exhausted.clone(),
            t.top_up_requests.clone(),
            t.dlq.clone(),
            c.changelog_topic(),
        ];
        let n = count(&c, &outs)?;
        let written: u64 = n.iter().sum();
        eprintln!(
            "bench e2e: drawdown threads={threads}: balance-changed={} balance-exhausted={} top-up-requests={} dlq={} changelog={} late={} unordered={} throttled={} ({})",
            n[0], n[1], n[2], n[3], n[4], order[0], order[1], order[2], log.display()
        );
        outputs.push((threads, n[..3].to_vec()));
        rows.push(Figures {
            system: format!("drawdown, pipeline.threads = {threads}"),
            seconds: secs,
            records_per_s: records as f64 / secs,
            cpu_s_per_million: cpu / records as f64 * 1e6,
            written_per_input: written as f64 / records as f64,
            extra_per_usage_event: Some((written - n[0]) as f64 / usage_events as f64),
        });
        eprintln!("bench e2e: {:?}", rows.last());
    }

    if let [(t1, a), (t2, b)] = &outputs[..] {
        if a != b {
            eprintln!(
                "bench e2e: WARNING: threads={t1} and threads={t2} published different outputs from the same input (balance-changed, balance-exhausted, top-up-requests: {a:?} vs {b:?}); see late/unordered above"
            );
        }
    }
    let ceiling = rows[0].records_per_s;
    println!("input {input}: {records} records ({usage_events} usage events, {} customers, {} partitions)", args.customers, args.partitions);
    println!("| system | seconds | records/s | vs pass-through | CPU s / 1M records | records written / input | written beyond balance-changed / usage event |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.0} | {:.0} % | {:.1} | {:.2} | {} |",
            r.system,
            r.seconds,
            r.records_per_s,
            100.0 * r.records_per_s / ceiling,
            r.cpu_s_per_million,
            r.written_per_input,
            r.extra_per_usage_event
                .map_or("-".into(), |x| format!("{x:.3}")),
        );
    }
    if let Some(path) = args.save {
        let json = serde_json::json!({ "input": input, "records": records, "rows": rows });
        std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
