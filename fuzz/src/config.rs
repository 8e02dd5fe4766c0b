//! The config loader: TOML text and `DRAWDOWN__*` overrides into `Config::from_text`, which
//! must answer with a config or an error, never a panic.
//!
//! A fuzz input is the TOML text, then optionally a NUL byte and the environment as
//! `NAME=value` lines (names without the `DRAWDOWN__` prefix are ignored by the loader, as in
//! the real environment). Bytes that are not UTF-8 are replaced, as they cannot be in a file read
//! as text or in an override.

use drawdown::config::Config;
use drawdown::credentials::ApiKeys;

/// One fuzz input.
pub fn run(data: &[u8]) {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(text);
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let Ok(cfg) = Config::from_text(&text, env) else {
        return;
    };
    // What loads is what the service builds on without checking again: the meters form a set,
    // and every API key's hash decodes (the loader checked it is 64 hex digits).
    assert!(cfg.meter_set().is_ok());
    assert!(ApiKeys::new(&cfg.api.keys).is_ok(), "{:?}", cfg.api.keys);
    let _ = cfg.api.check_access();
    assert!(cfg.pipeline.threads() >= 1);
}
