//! cargo fuzz target `portal_token`: see `drawdown_fuzz::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drawdown_fuzz::token::run(data));
