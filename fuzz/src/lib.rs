//! The checks behind drawdown's fuzz targets, one module per target. Each target in
//! `fuzz_targets/` is one line calling its `run`; keeping the checks here lets the tests below
//! run them over the committed seed corpora (`corpus/<target>/`) with a plain `cargo test`.
//!
//! | target | what it feeds | what it checks besides "no panic" |
//! |---|---|---|
//! | `decode_usage`, `decode_command` | a record (content-type, key, payload) to `codec::decode_usage` / `decode_command` | what decodes is valid (ids, amounts, ttl, key); the other format decodes the same input to the same value; `format_of` picks the decoder's format |
//! | `portal_token` | a token to `PortalSigner::verify` with a fixed secret; claims to `sign` | only the signed token verifies, as `Expired` from its `exp` on; sign then verify round-trips; any change to a token invalidates it |
//! | `history_cursor` | text to `codec::cursor::parse` | accepted exactly when docs/openapi.json's pattern matches; canonical form round-trips |
//! | `config` | TOML text and `DRAWDOWN__*` overrides to `Config::from_text` | an error, never a panic |
//! | `ledger` | a sequence of grants, usage, voids, reservations, time, commits and replays to `Ledger` | the bookkeeping identity and the meters' invariants after every step; a rejected or duplicate input changes nothing; versions and deltas of the outputs; what the dirty keys persist is the book |

pub mod config;
pub mod cursor;
pub mod decode;
pub mod ledger;
pub mod token;

#[cfg(test)]
mod seeds;
