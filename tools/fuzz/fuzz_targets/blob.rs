//! cargo-fuzz target `blob`: see `clayflow_fuzz::blob` for the input layout and the checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clayflow_fuzz::blob(data));
