//! One `Config` tree: a TOML file, then `DRAWDOWN__SECTION__KEY=value` environment overrides.
//!
//! The loader takes the environment as a parameter so tests can drive it. Unknown keys are
//! errors (`deny_unknown_fields`), in the file and in the environment alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ledger::{MeterDef, Meters};

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker connection and group.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Topic names.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// Batching and processing.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Local state.
    #[serde(default)]
    pub store: StoreConfig,
    /// HTTP API.
    #[serde(default)]
    pub api: ApiConfig,
    /// The meters.
    #[serde(default)]
    pub meters: Vec<MeterDef>,
}

/// Broker connection and group.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The consumer group; also the prefix of the changelog topic and transactional ids.
    #[serde(deserialize_with = "text")]
    pub group_id: String,
    /// This instance's stable id; the transactional id is `<group_id>-<instance_id>`, so a
    /// restarted instance fences its own zombie.
    #[serde(deserialize_with = "text")]
    pub instance_id: String,
    /// Partitions of the topics drawdown creates when missing.
    pub partitions: i32,
    /// Replication factor of the topics drawdown creates.
    pub replication_factor: i32,
    /// `transaction.timeout.ms`: keep it short, an open transaction of a crashed producer
    /// blocks `read_committed` readers until it times out.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Extra librdkafka properties for every client (e.g. security settings).
    pub extra: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            group_id: "drawdown".into(),
            instance_id: "0".into(),
            partitions: 8,
            replication_factor: 1,
            transaction_timeout: Duration::from_secs(15),
            extra: BTreeMap::new(),
        }
    }
}

/// Topic names.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Usage events in.
    pub usage: String,
    /// Credit commands in.
    pub grants: String,
    /// `BalanceChanged` out.
    pub balance_changed: String,
    /// Transitions out (`balance_events` is accepted as its former name).
    #[serde(alias = "balance_events")]
    pub balance_exhausted: String,
    /// Rejected input out.
    pub dlq: String,
    /// `TopUpRequested` out (portal, API and automatic top-ups), for the billing system.
    pub top_up_requests: String,
    /// The changelog; default `<group_id>-changelog`.
    pub changelog: Option<String>,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            usage: "usage-events".into(),
            grants: "credit-grants".into(),
            balance_changed: "balance-changed".into(),
            balance_exhausted: "balance-exhausted".into(),
            dlq: "drawdown-dlq".into(),
            top_up_requests: "top-up-requests".into(),
            changelog: None,
        }
    }
}

/// Encoding of the output topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// `application/json`.
    Json,
    /// `application/x-protobuf`.
    Protobuf,
}

/// Batching and processing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// A transaction is committed at least this often while input flows (sooner when the
    /// input is caught up: the batch then holds all there is).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// ... or once this many input records are in the batch.
    pub max_batch: usize,
    /// ... or once the batch's records name this many customers: a batch decodes, folds and
    /// encodes a book per customer, so at a million customers (each record a different one)
    /// this, not `max_batch`, bounds the memory of a batch.
    pub max_batch_customers: usize,
    /// Encoding of output records.
    pub output_format: OutputFormat,
    /// How many movements of each meter are kept for the history API.
    pub history_len: u32,
    /// How often time-driven rules (expiry, activation) are applied without input.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// How long usage event ids are remembered for idempotency.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// How long the local state of a partition that moved to another instance is kept (a quick
    /// return then restores from the checkpoint instead of from scratch).
    #[serde(with = "humantime_serde")]
    pub state_drop_delay: Duration,
    /// The most a graceful shutdown (SIGTERM) may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Pipeline loops, each with its own consumer (a group member) and transactional producer
    /// over its share of the partitions; 0 = one per core.
    pub threads: usize,
    /// The longest a partition's record waits for the other input topic's partition to deliver
    /// what the broker holds, so the two are folded in timestamp order (see `pipeline::merge`).
    /// Normally the wait is one fetch; this bounds it for a partition the broker doesn't serve.
    #[serde(with = "humantime_serde")]
    pub max_idle: Duration,
    /// How far behind the newest event time of a partition its time-driven rules run (stream
    /// time = the highest event time seen - `grace`): events this late still apply at their own
    /// time. Later ones apply at stream time and are counted as late.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// An event time further than this past the wall clock is dead-lettered
    /// (`timestamp_in_future`), and never moves stream time.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
}

impl PipelineConfig {
    /// The number of pipeline loops: `threads`, or the number of cores when 0.
    pub fn threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            commit_interval: Duration::from_millis(100),
            max_batch: 50_000,
            max_batch_customers: 10_000,
            output_format: OutputFormat::Json,
            history_len: 200,
            tick_interval: Duration::from_secs(1),
            dedupe_window: Duration::from_secs(7 * 24 * 3600),
            state_drop_delay: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(30),
            threads: 0,
            max_idle: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            max_future_skew: Duration::from_secs(300),
        }
    }
}

/// Local state (RocksDB).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// RocksDB directory.
    pub path: PathBuf,
    /// Shared block cache, MiB.
    pub block_cache_mb: usize,
    /// Shared write-buffer budget, MiB.
    pub write_buffer_mb: usize,
    /// Decoded books kept in memory across batches, MiB per pipeline thread (0 = none).
    pub book_cache_mb: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/drawdown"),
            block_cache_mb: 128,
            write_buffer_mb: 64,
            book_cache_mb: 64,
        }
    }
}

/// HTTP API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Listen address (port 0 = any free port).
    pub listen: SocketAddr,
    /// `host:port` other instances use to reach this API (forwarding); default: the listen
    /// address (fine on one host; set it to the pod/host name elsewhere).
    pub advertise: Option<String>,
    /// Bearer API keys for services, stored as SHA-256 hashes; several, so a key can be rotated
    /// (add the new one, move the clients, remove the old one).
    pub keys: Vec<ApiKey>,
    /// With no `keys`, drawdown refuses to start unless this is true, and then every route is
    /// open. Local development only.
    pub allow_unauthenticated: bool,
    /// The HMAC-SHA256 key of portal tokens (at least 32 bytes); the same on every instance.
    /// Without it, portal sessions are disabled.
    pub portal_secret: Option<String>,
    /// The longest portal session a service may ask for.
    #[serde(with = "humantime_serde")]
    pub portal_max_ttl: Duration,
    /// The base URL of portal links (`<public_url>/portal?token=...`); default: the `Host` the
    /// session was requested at.
    pub public_url: Option<String>,
    /// Serve `/metrics` on this address instead of `listen` (e.g. a port only Prometheus reaches).
    pub metrics_listen: Option<SocketAddr>,
}

/// One API key: a name (for logs) and the hex SHA-256 of the key (`drawdown api-key` makes one).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Who holds it (shown in logs, never the key).
    pub name: String,
    /// Hex SHA-256 of the key (64 hex digits).
    pub sha256: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            advertise: None,
            keys: Vec::new(),
            allow_unauthenticated: false,
            portal_secret: None,
            portal_max_ttl: Duration::from_secs(24 * 3600),
            public_url: None,
            metrics_listen: None,
        }
    }
}

/// The smallest `api.portal_secret` accepted, in bytes.
pub const MIN_PORTAL_SECRET: usize = 32;

impl ApiConfig {
    /// Checks that the API is not left open by accident: keys are required unless
    /// `allow_unauthenticated` is set, and a portal secret must be long enough. Checked when the
    /// service starts (not when a tool such as the load generator loads the same file).
    pub fn check_access(&self) -> Result<(), ConfigError> {
        if self.keys.is_empty() && !self.allow_unauthenticated {
            return Err(ConfigError::Invalid(
                "api.keys is empty: add a key (`drawdown api-key` makes one) or set \
                 api.allow_unauthenticated = true (local development only)"
                    .into(),
            ));
        }
        if let Some(s) = &self.portal_secret {
            if s.len() < MIN_PORTAL_SECRET {
                return Err(ConfigError::Invalid(format!(
                    "api.portal_secret must be at least {MIN_PORTAL_SECRET} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or does not fit the tree.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads `path` (if given), applies `DRAWDOWN__A__B=v` overrides from `env`, validates.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_text(&text, env)
    }

    /// [`Self::load`] from the file's text: parses `text` as TOML, applies the overrides from
    /// `env`, validates. No I/O; any text and environment give a config or an error.
    pub fn from_text(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut root: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (k, v) in env {
            let Some(rest) = k.strip_prefix("DRAWDOWN__") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            set_path(&mut root, &path, parse_scalar(&v))?;
        }
        let cfg: Config = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.meter_set()?;
        if self.kafka.partitions < 1 {
            return Err(ConfigError::Invalid("kafka.partitions must be >= 1".into()));
        }
        if self.pipeline.max_batch_customers == 0 {
            return Err(ConfigError::Invalid(
                "pipeline.max_batch_customers must be >= 1".into(),
            ));
        }
        if self.pipeline.max_batch == 0 {
            return Err(ConfigError::Invalid(
                "pipeline.max_batch must be >= 1".into(),
            ));
        }
        for k in &self.api.keys {
            let ok = k.sha256.len() == 64 && k.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "api.keys: {:?}: sha256 must be 64 hex digits (the SHA-256 of the key)",
                    k.name
                )));
            }
        }
        if self.pipeline.history_len == 0 {
            return Err(ConfigError::Invalid(
                "pipeline.history_len must be >= 1".into(),
            ));
        }
        Ok(())
    }

    /// The meters as a validated set.
    pub fn meter_set(&self) -> Result<Meters, ConfigError> {
        Meters::new(self.meters.clone()).map_err(ConfigError::Invalid)
    }

    /// The changelog topic's name.
    pub fn changelog_topic(&self) -> String {
        self.topics
            .changelog
            .clone()
            .unwrap_or_else(|| format!("{}-changelog", self.kafka.group_id))
    }
}

/// A text field that also takes a bare number or boolean (`DRAWDOWN__KAFKA__INSTANCE_ID=0`).
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected text, got {other}"
        ))),
    }
}

/// An env value as TOML: integers, booleans and inline arrays/tables as such, else a string.
fn parse_scalar(v: &str) -> toml::Value {
    let doc = format!("v = {v}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(v.into())),
        Err(_) => toml::Value::String(v.into()),
    }
}

fn set_path(
    root: &mut toml::Table,
    path: &[String],
    value: toml::Value,
) -> Result<(), ConfigError> {
    let (last, parents) = path
        .split_last()
        .ok_or_else(|| ConfigError::Invalid("empty key".into()))?;
    let mut table = root;
    for p in parents {
        let entry = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::Invalid(format!("{p} is not a section")))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_without_a_file() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.kafka.partitions, 8);
        assert_eq!(c.changelog_topic(), "drawdown-changelog");
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = Config::load(
            None,
            env(&[
                ("DRAWDOWN__KAFKA__PARTITIONS", "16"),
                ("DRAWDOWN__KAFKA__GROUP_ID", "g1"),
                ("DRAWDOWN__KAFKA__INSTANCE_ID", "0"),
                ("DRAWDOWN__PIPELINE__COMMIT_INTERVAL", "250ms"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.kafka.partitions, 16);
        assert_eq!(c.kafka.group_id, "g1");
        assert_eq!(c.kafka.instance_id, "0");
        assert_eq!(c.pipeline.commit_interval, Duration::from_millis(250));
    }

    #[test]
    fn batch_bounds_must_be_positive() {
        for key in [
            "DRAWDOWN__PIPELINE__MAX_BATCH",
            "DRAWDOWN__PIPELINE__MAX_BATCH_CUSTOMERS",
        ] {
            let err = Config::load(None, env(&[(key, "0")])).unwrap_err();
            assert!(err.to_string().contains(">= 1"), "{key}: {err}");
        }
        let c = Config::load(
            None,
            env(&[("DRAWDOWN__PIPELINE__MAX_BATCH_CUSTOMERS", "500")]),
        )
        .unwrap();
        assert_eq!(c.pipeline.max_batch_customers, 500);
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(Config::load(None, env(&[("DRAWDOWN__KAFKA__NOPE", "1")])).is_err());
    }

    #[test]
    fn an_api_without_keys_needs_an_explicit_opt_out() {
        let c = Config::load(None, env(&[])).unwrap();
        assert!(c.api.check_access().is_err(), "no keys, no opt-out");
        let open = Config::load(
            None,
            env(&[("DRAWDOWN__API__ALLOW_UNAUTHENTICATED", "true")]),
        );
        assert!(open.unwrap().api.check_access().is_ok());
        let hash = "ab".repeat(32);
        let keyed = Config::load(
            None,
            env(&[(
                "DRAWDOWN__API__KEYS",
                &format!(r#"[{{ name = "svc", sha256 = "{hash}" }}]"#),
            )]),
        )
        .unwrap();
        assert!(keyed.api.check_access().is_ok());
        assert!(Config::load(
            None,
            env(&[(
                "DRAWDOWN__API__KEYS",
                r#"[{ name = "svc", sha256 = "nothex" }]"#
            )])
        )
        .is_err());
        let short = Config::load(
            None,
            env(&[
                ("DRAWDOWN__API__ALLOW_UNAUTHENTICATED", "true"),
                ("DRAWDOWN__API__PORTAL_SECRET", "short"),
            ]),
        )
        .unwrap();
        assert!(short.api.check_access().is_err(), "a short portal secret");
    }

    #[test]
    fn the_example_config_is_valid() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/drawdown.toml");
        let c = Config::load(Some(&p), env(&[])).unwrap();
        assert!(!c.meters.is_empty());
    }
}
