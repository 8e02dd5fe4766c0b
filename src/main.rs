//! The `drawdown` command: run the service, generate load, verify balances.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use drawdown::app::Application;
use drawdown::config::Config;
use drawdown::loadgen;

#[derive(Parser)]
#[command(
    version,
    about = "Prepaid credit balances for usage-based billing, from Kafka, exactly once"
)]
struct Cli {
    /// Config file (TOML); `DRAWDOWN__SECTION__KEY` environment variables override it.
    #[arg(
        long,
        short,
        global = true,
        env = "DRAWDOWN_CONFIG",
        default_value = "config/drawdown.toml"
    )]
    config: PathBuf,
    /// Log format (levels from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: consume, fold, publish, serve.
    Run,
    /// Generate a realistic mix of grants and usage (see `loadgen`).
    Produce(loadgen::ProduceArgs),
    /// Check the balances (API) and the output topics against a generator's expectation.
    Verify(loadgen::VerifyArgs),
    /// Wait until the consumer group has committed every input record.
    WaitIdle(loadgen::WaitIdleArgs),
    /// Make a new API key: prints the key (give it to the service) and its `api.keys` entry.
    ApiKey {
        /// The name the key goes by in the config and the logs.
        #[arg(long, default_value = "service")]
        name: String,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::ApiKey { name } = &cli.command {
        // Needs no config: the key is random, the config keeps only its hash.
        let key = drawdown::credentials::new_key();
        println!("key:    {key}");
        println!(
            "config: keys = [{{ name = {name:?}, sha256 = \"{}\" }}]",
            drawdown::credentials::hash_key(&key)
        );
        return Ok(());
    }
    init_logs(cli.log_format);
    let cfg = Config::load(Some(&cli.config), std::env::vars())
        .with_context(|| format!("loading {}", cli.config.display()))?;
    match cli.command {
        Command::Run => {
            let limit = cfg.pipeline.shutdown_timeout;
            let app = Application::build(cfg).await?;
            let shutdown = app.shutdown_handle();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!(
                    timeout_secs = limit.as_secs(),
                    "signal received: draining, committing and leaving the group"
                );
                shutdown.trigger();
                tokio::time::sleep(limit).await;
                tracing::error!(
                    timeout_secs = limit.as_secs(),
                    "graceful shutdown took too long; exiting now"
                );
                std::process::exit(1);
            });
            app.run_until_stopped().await?;
            tracing::info!("drawdown stopped cleanly");
            Ok(())
        }
        Command::Produce(args) => loadgen::produce(&cfg, args).await,
        Command::Verify(args) => loadgen::verify(&cfg, args).await,
        Command::WaitIdle(args) => loadgen::wait_idle(&cfg, args).await,
        Command::ApiKey { .. } => unreachable!("handled above"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
