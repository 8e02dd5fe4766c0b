//! cargo fuzz target `history_cursor`: see `drawdown_fuzz::cursor`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drawdown_fuzz::cursor::run(data));
