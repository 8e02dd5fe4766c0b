//! What the binaries (`drawdown` and `drawdown-loadgen`) share on the command line: the config
//! file (the same one, with the same `DRAWDOWN__*` overrides) and the log format.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Subcommand};

use crate::config::{Config, ConfigError};

/// A binary's command line: the flags every subcommand takes, then the subcommand.
#[derive(Debug, clap::Parser)]
pub struct Cli<C: Subcommand> {
    /// The global flags.
    #[command(flatten)]
    pub common: CommonArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: C,
}

impl<C: Subcommand> Cli<C> {
    /// Parses the process's arguments as the binary `name` (as its help and errors name it).
    pub fn parse_as(name: &'static str, about: &'static str) -> Self {
        Self::parse_from_as(name, about, std::env::args_os())
    }

    /// [`Self::parse_as`] over these arguments (the first is the program); exits on an error
    /// or `--help`, as clap does.
    pub fn parse_from_as<I, T>(name: &'static str, about: &'static str, args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command()
            .name(name)
            .bin_name(name)
            .about(about)
            .version(env!("CARGO_PKG_VERSION"))
            .get_matches_from(args);
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, clap::Subcommand)]
    enum Command {
        Go {
            #[arg(long)]
            far: bool,
        },
    }

    #[test]
    fn the_common_flags_go_before_or_after_the_subcommand() {
        let cli = Cli::<Command>::parse_from_as("x", "test", ["x", "-c", "a.toml", "go", "--far"]);
        assert_eq!(cli.common.config, PathBuf::from("a.toml"));
        assert_eq!(cli.command, Command::Go { far: true });
        let cli = Cli::<Command>::parse_from_as("x", "test", ["x", "go", "--log-format", "json"]);
        assert_eq!(cli.common.log_format, LogFormat::Json);
    }
}
