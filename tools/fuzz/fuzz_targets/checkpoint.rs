//! cargo-fuzz target `checkpoint`: see `clayflow_fuzz::checkpoint` for the input layout and the checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clayflow_fuzz::checkpoint(data));
