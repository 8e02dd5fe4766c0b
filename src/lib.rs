//! drawdown: prepaid credit balances for usage-based billing, in real time, from Kafka,
//! exactly once.
//!
//! # Layout
//! - [`ledger`]: the credit rules, pure (state, input, now) -> (state, outputs); no I/O.
//! - [`codec`]: JSON / protobuf records <-> domain types, validated once at the edge.
//! - [`store`]: RocksDB, the local materialisation of the changelog, with checkpoints.
//! - [`kafka`]: topics, the exactly-once consume-fold-transact loop (each partition's two input
//!   topics merged by timestamp, rules on per-partition stream time), restore and handover.
//! - [`api`]: the HTTP API (balances, history, health, readiness, metrics), access control,
//!   the customer portal and top-up requests.
//! - [`credentials`]: API keys (hashed) and signed, customer-scoped portal tokens, without HTTP.
//! - [`metrics`]: every metric name and description.
//! - [`config`]: one `Config` tree: TOML + `DRAWDOWN__*` environment overrides.
//! - [`shutdown`]: the one shutdown signal every loop listens to.
//! - [`app`]: wiring and graceful shutdown.
//! - [`cli`]: the command-line flags and log setup the binaries share.
//! - [`clock`]: the wall clock, read in one place.
//!
//! # Features
//! `service` (default) is the running service: [`store`], [`kafka`], [`api`], [`app`], [`cli`],
//! [`metrics`] and [`shutdown`], with RocksDB, librdkafka, axum and tokio. Without it
//! (`default-features = false`) the crate is its pure core, [`ledger`], [`codec`], [`config`],
//! [`credentials`] and [`clock`], which builds in seconds with no C/C++ dependency: what the
//! fuzz targets in `fuzz/` link (see README.md, "Fuzzing").
//!
//! Beside this crate, in the same workspace: `crates/model` (`drawdown-model`), the one
//! reference model of the credit rules the property tests compare [`ledger`] with, and
//! `crates/loadgen` (`drawdown-loadgen`), the load generator and verifier (`produce`,
//! `wait-idle`, `verify`).
#![warn(missing_docs)]

#[cfg(feature = "service")]
pub mod api;
#[cfg(feature = "service")]
pub mod app;
#[cfg(feature = "service")]
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod credentials;
#[cfg(feature = "service")]
pub mod kafka;
pub mod ledger;
#[cfg(feature = "service")]
pub mod metrics;
#[cfg(feature = "service")]
pub mod shutdown;
#[cfg(feature = "service")]
pub mod store;
pub mod ttl;
