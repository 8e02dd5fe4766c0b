//! `drawdown-loadgen`: generates load for drawdown and checks what drawdown made of it.
//!
//! - `produce` ([`produce`]): one phase of generated grants, usage and voids, applied as they
//!   are sent to an expectation built on `drawdown-model` ([`expect`]);
//! - `wait-idle` ([`wait_idle`]): until drawdown's group has committed every input record;
//! - `verify` ([`verify`]): the API and the output topics against the expectation;
//! - `open-transactions` ([`open_txn`]): what open transactions hold now (for the handover test);
//! - `bench e2e|latency` ([`bench`]): throughput against an exactly-once pass-through, and
//!   latency to the committed outputs.
//!
//! It reads the service's config (`-c`, `DRAWDOWN_CONFIG`, `DRAWDOWN__*` overrides) for the
//! broker, the topics, the group and the meters, and reads and writes records through
//! `drawdown::codec`.

mod args;
mod bench;
mod expect;
mod gen;
mod open_txn;
mod produce;
mod sender;
mod topics;
mod verify;
mod wait_idle;

use anyhow::Context;
use clap::Subcommand;
use drawdown::cli::Cli;

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a realistic mix of grants and usage (one phase).
    Produce(args::ProduceArgs),
    /// Check the balances (API) and the output topics against a generator's expectation.
    Verify(args::VerifyArgs),
    /// Wait until the consumer group has committed every input record.
    WaitIdle(args::WaitIdleArgs),
    /// Print what open transactions hold now (changelog partitions below their log end, input
    /// offsets not stable); exit 1 if nothing.
    OpenTransactions,
    /// End-to-end benchmarks against the broker (throughput against a pass-through, latency).
    #[command(subcommand)]
    Bench(bench::Bench),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::<Command>::parse_as(
        "drawdown-loadgen",
        "Load generator and verifier for drawdown",
    );
    cli.common.init_logs();
    let cfg = cli
        .common
        .load_config()
        .with_context(|| format!("loading {}", cli.common.config.display()))?;
    match cli.command {
        Command::Produce(args) => produce::produce(&cfg, args).await,
        Command::Verify(args) => verify::verify(&cfg, args).await,
        Command::WaitIdle(args) => wait_idle::wait_idle(&cfg, args).await,
        Command::Bench(b) => bench::run(&cfg, b).await,
        Command::OpenTransactions => {
            if !tokio::task::spawn_blocking(move || open_txn::open_transactions(&cfg))
                .await
                .context("open-transactions task")??
            {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
