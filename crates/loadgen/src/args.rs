//! The subcommands' flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use drawdown::config::OutputFormat;

/// What `produce` sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Cycle grants, top-ups and adjustments per customer x meter.
    Grants,
    /// Grants expiring (or starting) `--expire-in` from now.
    Expiring,
    /// The time barrier after `expiring` and the usage it covers (sends nothing).
    Expire,
    /// `--events` usage events (plus `--duplicates`).
    Usage,
    /// Top-ups for a random subset, restoring some exhausted meters.
    Topups,
    /// A new billing cycle for every subscription.
    Renewal,
    /// Voids of usage and grants, repeated and unknown ones.
    Voids,
    /// Usage with grants interleaved (no exact expectation).
    Mixed,
    /// Reservations held, settled by usage, released, repeated (`--events` steps).
    Reservations,
}

/// `drawdown-loadgen produce`.
#[derive(Clone, Debug, clap::Args)]
pub struct ProduceArgs {
    /// What to send.
    #[arg(long, value_enum, default_value_t = Phase::Mixed)]
    pub phase: Phase,
    /// Number of customers (`<prefix>-0` ..).
    #[arg(long, default_value_t = 100)]
    pub customers: usize,
    /// Customer id prefix.
    #[arg(long, default_value = "cus")]
    pub prefix: String,
    /// Usage events to send (usage, mixed); for the grant phases, the usage volume per usage
    /// phase that the amounts are sized for.
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    /// Target rate in records/s (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Record encoding: json or protobuf (the `content-type` header says which).
    #[arg(long, default_value = "json", value_parser = format_parser())]
    pub format: OutputFormat,
    /// Fraction of usage events re-sent with the same id.
    #[arg(long, default_value_t = 0.01)]
    pub duplicates: f64,
    /// Fraction of usage events whose event time is 2 minutes old (later than drawdown's
    /// default grace: applied at stream time, flagged `late`).
    #[arg(long, default_value_t = 0.0)]
    pub late: f64,
    /// `expiring`: how far in the future the grants expire (must cover the processing of
    /// everything sent before the `expire` barrier).
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub expire_in: Duration,
    /// RNG seed (with `--expect`, each phase also mixes in its sequence number).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Expectation file: loaded if present, updated with this phase, saved.
    #[arg(long)]
    pub expect: Option<PathBuf>,
    /// Additionally send this many malformed records (they must land in the DLQ).
    #[arg(long, default_value_t = 0)]
    pub bad: u64,
}

/// `drawdown-loadgen verify`.
#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// The expectation file written by `produce --expect`.
    #[arg(long)]
    pub expect: PathBuf,
    /// Base URL of the API (default `http://<api.listen>`).
    #[arg(long)]
    pub api: Option<String>,
    /// How long the balances may take to catch up before a mismatch is final.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
}

/// `drawdown-loadgen wait-idle`.
#[derive(Clone, Debug, clap::Args)]
pub struct WaitIdleArgs {
    /// Give up (non-zero exit) after this long.
    #[arg(long, default_value = "600s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// `600` (seconds) or a humantime duration (`10m`).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(s).map_err(|e| e.to_string()),
    }
}

/// `json` or `protobuf`, as the service's `pipeline.output_format` names them.
fn format_parser() -> impl TypedValueParser<Value = OutputFormat> {
    PossibleValuesParser::new(["json", "protobuf"]).map(|s| match s.as_str() {
        "protobuf" => OutputFormat::Protobuf,
        _ => OutputFormat::Json,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        produce: ProduceArgs,
    }

    #[test]
    fn formats_and_timeouts_parse_as_before() {
        let cli = Cli::try_parse_from(["x", "--format", "protobuf", "--expire-in", "90"]).unwrap();
        assert_eq!(cli.produce.format, OutputFormat::Protobuf);
        assert_eq!(cli.produce.expire_in, Duration::from_secs(90));
        let cli = Cli::try_parse_from(["x", "--expire-in", "2m"]).unwrap();
        assert_eq!(cli.produce.format, OutputFormat::Json);
        assert_eq!(cli.produce.expire_in, Duration::from_secs(120));
        assert!(Cli::try_parse_from(["x", "--format", "xml"]).is_err());
    }
}
