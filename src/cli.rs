//! What the binaries (`drawdown` and `drawdown-loadgen`) share on the command line: the config
//! file (the same one, with the same `DRAWDOWN__*` overrides) and the log format.

use std::path::PathBuf;

use crate::config::{Config, ConfigError};

/// The global flags of every subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct CommonArgs {
    /// Config file (TOML); `DRAWDOWN__SECTION__KEY` environment variables override it.
    #[arg(
        long,
        short,
        global = true,
        env = "DRAWDOWN_CONFIG",
        default_value = "config/drawdown.toml"
    )]
    pub config: PathBuf,
    /// Log format (levels from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line, fields flattened.
    Json,
}

impl CommonArgs {
    /// Installs the global log subscriber: levels from `RUST_LOG` (default `info,rdkafka=warn`).
    pub fn init_logs(&self) {
        use std::io::IsTerminal;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
        let b = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Text => b.init(),
            LogFormat::Json => b.json().flatten_event(true).init(),
        }
    }

    /// The config file with the process environment's overrides.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        Config::load(Some(&self.config), std::env::vars())
    }
}
