//! cargo fuzz target `ledger`: see `drawdown_fuzz::ledger`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drawdown_fuzz::ledger::run(data));
