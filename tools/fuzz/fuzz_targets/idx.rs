//! cargo-fuzz target `idx`: see `clayflow_fuzz::idx` for the input layout and the checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clayflow_fuzz::idx(data));
