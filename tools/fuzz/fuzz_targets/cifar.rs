//! cargo-fuzz target `cifar`: see `clayflow_fuzz::cifar` for the input layout and the checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| clayflow_fuzz::cifar(data));
