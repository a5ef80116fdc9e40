//! Host side of the Cortex-M4F firmware's bit-identity check (`tools/firmware`).
//!
//! `tools/firmware/ci.sh` runs the firmware in QEMU and compares its `checksum:` and
//! `digit:` lines with `examples/firmware_host.rs`; this test pins the host's values, so a
//! change to the kernel's arithmetic (operation order, a fused multiply-add, a different
//! `libm`) shows up here too, on any machine, without QEMU. It also checks that the embedded
//! inputs are what the firmware claims they are.

// Shared with the firmware, which uses the parts this test does not (ASCII art, PGM).
#[allow(dead_code)]
#[path = "../tools/firmware/src/shared.rs"]
mod shared;

use clayflow_kernel::{
    bits_per_dim, log_prob, sample, scratch_len, DType, Model, MNIST, MNIST_GLOW,
};
use clayflow_trainer::data::load_idx_pair;
use std::path::Path;

static BLOB_F16: &[u8] = include_bytes!("../tools/firmware/model-f16.cfw");
static BLOB_F32: &[u8] = include_bytes!("../tools/firmware/model-f32.cfw");
static DIGIT: &[u8; 784] = include_bytes!("../tools/firmware/digit.bin");

/// FNV-1a of the f32 sample (seed `shared::SEED`, temperature `shared::TEMPERATURE`, f16
/// blob), as the firmware printed it under QEMU when this was pinned.
const PINNED_CHECKSUM: u32 = 0xf914_cacd;
/// Bits of the held-out digit's bits/dim (1.5806427) on the same run.
const PINNED_BPD_BITS: u32 = 0x3fca_5280;

const UPDATE: &str = "the kernel's f32 results changed. If that is intended, run \
    tools/firmware/ci.sh (device and host must still agree) and update the pinned constants \
    in tests/firmware_checksum.rs to the new host values";

#[test]
fn host_sample_checksum_and_bits_per_dim_are_pinned() {
    let model = Model::from_blob(BLOB_F16).unwrap();
    let mut scratch = vec![0f32; scratch_len(model.arch())];
    let (mut pixels, mut values) = ([0u8; 784], [0f32; 784]);
    sample(
        &model,
        shared::SEED,
        shared::TEMPERATURE,
        &mut scratch,
        &mut pixels,
        &mut values,
    )
    .unwrap();
    let checksum = shared::fnv1a32(&values);
    assert_eq!(checksum, PINNED_CHECKSUM, "sample checksum: {UPDATE}");
    // A digit-like sample, not a blank or saturated image.
    let lit = pixels.iter().filter(|&&p| p > 128).count();
    assert!((30..400).contains(&lit), "{lit} bright pixels");
    let bpd = bits_per_dim(model.arch(), log_prob(&model, DIGIT, &mut scratch).unwrap());
    assert_eq!(bpd.to_bits(), PINNED_BPD_BITS, "bits/dim {bpd}: {UPDATE}");
    // The trained model scores a held-out digit far below 8 bits/dim (uniform noise).
    assert!((0.5..3.0).contains(&bpd), "{bpd}");
}

#[test]
fn embedded_digit_is_the_first_held_out_image() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let ds = load_idx_pair(
        &data.join("mnist8k-train-images-idx3-ubyte.gz"),
        Some(&data.join("mnist8k-train-labels-idx1-ubyte.gz")),
    )
    .unwrap();
    assert_eq!(ds.get(shared::DIGIT_INDEX), Some(&DIGIT[..]));
    assert_eq!(ds.label(shared::DIGIT_INDEX), Some(shared::DIGIT_LABEL));
    let (_, held_out) = ds.split_last(1000).unwrap();
    assert_eq!(held_out.get(0), Some(&DIGIT[..]));
}

#[test]
fn embedded_blobs_are_the_mnist_preset() {
    for (blob, dtype, len) in [
        (BLOB_F16, DType::F16, 668_936),
        (BLOB_F32, DType::F32, 1_337_816),
    ] {
        let model = Model::from_blob(blob).unwrap();
        assert_eq!(*model.arch(), MNIST);
        assert_eq!(model.dtype(), dtype);
        assert_eq!(blob.len(), len);
    }
}

/// The `glow` firmware variant's blob (`tools/firmware/model-glow-f16.cfw`): the
/// `MNIST_GLOW` preset with deterministic random weights (no trained Glow model exists yet),
/// to measure flash, RAM and instructions. It is exactly what this test generates; with
/// `CLAYFLOW_WRITE_GLOW_BLOB=1` the test (re)writes the file instead of comparing.
#[test]
fn glow_firmware_blob_is_the_generated_one() {
    let params = clayflow_suite::random_params(&MNIST_GLOW, 2026, 0.3, 0.5);
    let blob = clayflow_suite::blob(&MNIST_GLOW, DType::F16, &params);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/firmware/model-glow-f16.cfw");
    if std::env::var_os("CLAYFLOW_WRITE_GLOW_BLOB").is_some() {
        std::fs::write(&path, &blob).unwrap();
    }
    let committed = std::fs::read(&path).unwrap();
    assert!(
        committed == blob,
        "{} is not the generated blob",
        path.display()
    );
    let model = Model::from_blob(&committed).unwrap();
    assert_eq!(model.arch().active_masks(), MNIST_GLOW.active_masks());
    assert_eq!(committed.len(), 614_668);
    // It samples, and scores the digit, without error.
    let mut scratch = vec![0f32; scratch_len(model.arch())];
    let (mut pixels, mut values) = ([0u8; 784], [0f32; 784]);
    sample(
        &model,
        shared::SEED,
        shared::TEMPERATURE,
        &mut scratch,
        &mut pixels,
        &mut values,
    )
    .unwrap();
    assert!(log_prob(&model, DIGIT, &mut scratch).unwrap().is_finite());
}
