//! cargo fuzz target `decode_usage`: see `drawdown_fuzz::decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drawdown_fuzz::decode::run_usage(data));
