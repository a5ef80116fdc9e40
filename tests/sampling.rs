//! Sampling never overflows: the Glow coupling's scale floor (`Arch::scale_floor`) bounds how
//! far each coupling's inverse can expand, so no latent, however unusual, is blown up to
//! infinity through the 32 couplings of `mnist-glow`.
//!
//! The weights here are random at full scale (every conv He-scaled, biases +-0.1), where the
//! couplings' networks react strongly to large inputs: without the floor, a coupling whose
//! CNN sees an unusually large kept half answers with a very negative `s_raw`, its inverse
//! multiplies by `1 / sigmoid(s_raw + 2)`, and the next couplings see a larger input still,
//! the chain that made 2 in 10,000 samples of a trained `mnist-glow` non-finite. Each test
//! also checks its control: the same weights *without* the floor do overflow, so the draw is
//! large enough to catch the failure.

use clayflow_kernel::{flow, scratch_len, Arch, DType, Model, GLOW_SCALE_FLOOR, MNIST_GLOW};
use clayflow_suite::{blob, random_params};

/// `mnist-glow`'s shape (2 levels x 16 steps on 4x14x14 and 8x7x7) with narrow networks.
fn arch(scale_floor: f32) -> Arch {
    Arch {
        hidden: [8, 8],
        prior: false,
        scale_floor,
        ..MNIST_GLOW
    }
}

/// Samples `n` images at temperature 1 through the kernel (seeds `0..n`) and counts those
/// with a non-finite value.
fn nonfinite_kernel_samples(arch: &Arch, dtype: DType, params: &[f32], n: u64) -> usize {
    let b = blob(arch, dtype, params);
    let model = Model::from_blob(&b).unwrap();
    let mut scratch = vec![0.0f32; scratch_len(arch)];
    let d = arch.dim();
    let (mut pixels, mut values) = (vec![0u8; d], vec![0.0f32; d]);
    (0..n)
        .filter(|&seed| {
            flow::sample(&model, seed, 1.0, &mut scratch, &mut pixels, &mut values).unwrap();
            values.iter().any(|v| !v.is_finite())
        })
        .count()
}

#[test]
fn the_floor_keeps_every_kernel_sample_finite() {
    for (gain, dtype, n) in [
        (1.0, DType::F32, 1000),
        (1.0, DType::F16, 1000),
        (1.5, DType::F32, 200),
    ] {
        let params = random_params(&arch(0.0), 11, gain, 0.0);
        let without = nonfinite_kernel_samples(&arch(0.0), dtype, &params, n);
        let with = nonfinite_kernel_samples(&arch(GLOW_SCALE_FLOOR), dtype, &params, n);
        eprintln!("gain {gain}, {dtype:?}: non-finite samples of {n}: {without} without the floor, {with} with it");
        assert!(
            without > 0,
            "the control: without the floor these weights overflow"
        );
        assert_eq!(
            with, 0,
            "{dtype:?}: {with} of {n} samples non-finite with the floor"
        );
    }
}
