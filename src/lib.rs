//! drawdown: prepaid credit balances for usage-based billing, in real time, from Kafka,
//! exactly once.
//!
//! # Layout
//! - [`ledger`]: the credit rules, pure (state, input, now) -> (state, outputs); no I/O.
//! - [`codec`]: JSON / protobuf records <-> domain types, validated once at the edge.
//! - [`store`]: RocksDB, the local materialisation of the changelog, with checkpoints.
//! - [`kafka`]: topics, the exactly-once consume-fold-transact loop, restore.
//! - [`api`]: the HTTP API (balances, history, health, readiness, metrics), access control,
//!   the customer portal and top-up requests.
//! - [`credentials`]: API keys (hashed) and signed, customer-scoped portal tokens, without HTTP.
//! - [`metrics`]: every metric name and description.
//! - [`config`]: one `Config` tree: TOML + `DRAWDOWN__*` environment overrides.
//! - [`shutdown`]: the one shutdown signal every loop listens to; [`clock`]: the wall clock.
//! - [`app`]: wiring and graceful shutdown.
//! - [`loadgen`]: the load generator with its own reference arithmetic, and the verifier.
#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod clock;
pub mod codec;
pub mod config;
pub mod credentials;
pub mod kafka;
pub mod ledger;
pub mod loadgen;
pub mod metrics;
pub mod shutdown;
pub mod store;
