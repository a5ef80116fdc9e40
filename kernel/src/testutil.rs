//! Helpers for the kernel's own tests: random models written through the real blob writer.

use crate::arch::{Arch, TensorKind, COUPLING_TENSORS};
use crate::base::{Pcg32, Rng};
use crate::weights::{blob_len, write_blob, DType};
use std::vec::Vec;

/// Uniform in [-1, 1).
pub fn uniform(rng: &mut Pcg32) -> f32 {
    (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0
}

/// Random parameters: conv weights uniform in +-gain/sqrt(fan_in), biases +-0.1, scales in
/// [0.5, 1.5] (so |s| <= 1.5).
pub fn random_params(arch: &Arch, seed: u64, gain: f32) -> Vec<f32> {
    let mut rng = Pcg32::new(seed);
    let mut p = Vec::with_capacity(arch.param_count());
    for &m in arch.active_masks() {
        for kind in COUPLING_TENSORS {
            let n = arch.tensor_len(m, kind);
            let bound = match kind {
                TensorKind::Scale => 0.0,
                TensorKind::ConvWeight(j) => {
                    let (cin, _, k) = arch.conv_shape(m, j);
                    gain / ((cin * k * k) as f32).sqrt()
                }
                TensorKind::ConvBias(_) => 0.1,
            };
            for _ in 0..n {
                let v = uniform(&mut rng);
                p.push(if kind == TensorKind::Scale {
                    1.0 + 0.5 * v
                } else {
                    bound * v
                });
            }
        }
    }
    p
}

/// The blob of `params`.
pub fn blob(arch: &Arch, dtype: DType, params: &[f32]) -> Vec<u8> {
    let mut out = std::vec![0u8; blob_len(arch, dtype)];
    let n = write_blob(arch, dtype, params, &mut out).expect("valid params");
    assert_eq!(n, out.len());
    out
}
