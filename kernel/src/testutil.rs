//! Helpers for the kernel's own tests: random models written through the real blob writer.

use crate::arch::{Arch, TensorKind, COUPLING_TENSORS, MNIST};
use crate::base::{Pcg32, Rng};
use crate::weights::{blob_len, write_blob, DType};
use std::vec::Vec;

/// The MNIST preset's family (1 channel squeezed, alternating channel masks, kernels 5, 7,
/// 3) at 4x4 pixels, 2 couplings, hidden widths 4: what full-size tests use under Miri,
/// which interprets a few thousand multiply-adds per second (one MNIST image is ~65M).
pub const MINI_MNIST: Arch = Arch {
    height: 4,
    width: 4,
    couplings: 2,
    hidden: [4, 4],
    ..MNIST
};

/// [`MNIST`] natively, [`MINI_MNIST`] under Miri.
pub const MNIST_OR_MINI: Arch = if cfg!(miri) { MINI_MNIST } else { MNIST };

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
                _ => 0.0,
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
