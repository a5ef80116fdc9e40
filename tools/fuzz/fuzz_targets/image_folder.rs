//! cargo-fuzz target `image_folder`: see `clayflow_fuzz::image_folder` for the input layout
//! and the checks.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: {
        // The loader decodes with rayon; one worker keeps the fuzzer to one core.
        std::env::set_var("RAYON_NUM_THREADS", "1");
    },
    |data: &[u8]| clayflow_fuzz::image_folder(data)
);
