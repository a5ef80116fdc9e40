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

/// The default firmware's blob (`tools/firmware/model-glow-f16.cfw`): the trained
/// `mnist-glow` model (f16 coupling weights, f32 Glow tensors, blob version 3), exported from
/// the run the firmware README names.
static BLOB_GLOW: &[u8] = include_bytes!("../tools/firmware/model-glow-f16.cfw");

/// FNV-1a of the trained `mnist-glow` sample (seed `shared::SEED`, temperature
/// `shared::TEMPERATURE`), as the firmware printed it under QEMU when this was pinned.
const GLOW_CHECKSUM: u32 = 0x09bf_e03d;
/// Bits/dim of the held-out digit, its negative and uniform noise (`shared::SCORED`) under
/// the trained `mnist-glow` model, as the firmware printed them: 1.0984516, 10.679215,
/// 18.796482.
const GLOW_SCORES: [u32; 3] = [0x3f8c_9a10, 0x412a_de10, 0x4196_5f32];
/// The same three under the seed's MNIST model: 1.5806427, 53.719563, 34.319073.
const SEED_SCORES: [u32; 3] = [0x3fca_5280, 0x4256_e0d5, 0x4209_46bb];

/// Bits/dim of the three scored inputs under `blob`'s model, through the kernel.
fn scores(blob: &[u8]) -> [f32; 3] {
    let model = Model::from_blob(blob).unwrap();
    let mut scratch = vec![0f32; scratch_len(model.arch())];
    [*DIGIT, shared::negative(DIGIT), shared::noise()].map(|image| {
        bits_per_dim(
            model.arch(),
            log_prob(&model, &image, &mut scratch).unwrap(),
        )
    })
}

#[test]
fn glow_sample_checksum_and_scores_are_pinned() {
    let model = Model::from_blob(BLOB_GLOW).unwrap();
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
    assert_eq!(checksum, GLOW_CHECKSUM, "glow sample checksum: {UPDATE}");
    let lit = pixels.iter().filter(|&&p| p > 128).count();
    assert!((30..400).contains(&lit), "{lit} bright pixels");
    let bpd = scores(BLOB_GLOW);
    assert_eq!(
        bpd.map(f32::to_bits),
        GLOW_SCORES,
        "glow bits/dim of digit, negative, noise {bpd:?}: {UPDATE}"
    );
}

/// The anomaly score the firmware shows: under either trained model the real digit is far
/// more likely than its negative or uniform noise (several bits per pixel apart), and the
/// seed model's scores are pinned like the Glow model's.
#[test]
fn the_digit_scores_clearly_lowest_on_both_models() {
    for (name, blob) in [("mnist-glow", BLOB_GLOW), ("mnist", BLOB_F16)] {
        let [digit, negative, noise] = scores(blob);
        assert!((0.5..2.0).contains(&digit), "{name}: digit {digit}");
        assert!(
            negative > digit + 3.0,
            "{name}: negative {negative} vs digit {digit}"
        );
        assert!(
            noise > digit + 3.0,
            "{name}: noise {noise} vs digit {digit}"
        );
    }
    let bpd = scores(BLOB_F16);
    assert_eq!(
        bpd.map(f32::to_bits),
        SEED_SCORES,
        "seed scores {bpd:?}: {UPDATE}"
    );
}

#[test]
fn the_glow_blob_is_a_version_3_mnist_glow_model() {
    let model = Model::from_blob(BLOB_GLOW).unwrap();
    assert_eq!(model.arch().active_masks(), MNIST_GLOW.active_masks());
    assert_eq!(model.arch().levels, 2);
    assert!(model.arch().glow);
    assert_eq!(model.dtype(), DType::F16);
    assert_eq!(model.version(), 3);
    assert_eq!(
        BLOB_GLOW.len(),
        clayflow_kernel::blob_len(&MNIST_GLOW, DType::F16)
    );
    assert_eq!(BLOB_GLOW.len(), 614_476);
}

/// The two non-digit inputs are what their names say.
#[test]
fn the_scored_non_digits_are_the_negative_and_noise() {
    let neg = shared::negative(DIGIT);
    assert!(neg.iter().zip(DIGIT).all(|(&n, &d)| n == 255 - d));
    let noise = shared::noise();
    assert_eq!(noise, shared::noise(), "deterministic");
    // Roughly uniform: every quarter of the byte range holds 15-35% of the pixels.
    for q in 0..4u8 {
        let n = noise.iter().filter(|&&p| p / 64 == q).count();
        assert!((117..275).contains(&n), "quarter {q}: {n} of 784");
    }
}
