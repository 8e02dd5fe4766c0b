//! The `drawdown` command: run the service, make API keys. (The load generator and the
//! verifier are the separate `drawdown-loadgen` binary.)

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::Subcommand;
use drawdown::app::Application;
use drawdown::cli::Cli;

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: consume, fold, publish, serve.
    Run,
    /// Make a new API key: prints the key (give it to the service) and its `api.keys` entry.
    ApiKey {
        /// The name the key goes by in the config and the logs.
        #[arg(long, default_value = "service")]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// Caps glibc's malloc at 2 arenas, unless `MALLOC_ARENA_MAX` says otherwise. Rust code uses
/// mimalloc; RocksDB and librdkafka use glibc's malloc, which by default gives each of their
/// threads (~50 here) its own arena, up to 8 per core, and keeps what each arena once held. At
/// 1M customers those arenas held ~1 GB of the 1.9 GB resident (`/proc/PID/smaps`: fourteen
/// full 64 MiB heaps), against ~620 MB with 2 arenas.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in main, before any other thread exists; mallopt only
        // sets a parameter of the allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::<Command>::parse_as(
        "drawdown",
        "Prepaid credit balances for usage-based billing, from Kafka, exactly once",
    );
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
    cli.common.init_logs();
    let cfg = cli
        .common
        .load_config()
        .with_context(|| format!("loading {}", cli.common.config.display()))?;
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
