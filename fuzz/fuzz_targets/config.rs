//! cargo fuzz target `config`: see `drawdown_fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drawdown_fuzz::config::run(data));
