//! Helpers for the kernel's own tests: random models written through the real blob writer.

use crate::arch::{Arch, Mask, TensorKind, COUPLING_TENSORS, MNIST, PRIOR_KERNEL};
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
/// [0.5, 1.5] (so |s| <= 1.5); each at the shape of its step's level. Glow steps get ActNorm
/// log-scales and biases in +-0.1 and a well-conditioned 1x1 conv ([`random_inv_conv`]).
/// Without Glow steps the draws are those of the seed's generator (same values per seed).
/// The learned prior's tensors ([`Arch::prior`]) come last, random too (scales around 1).
pub fn random_params(arch: &Arch, seed: u64, gain: f32) -> Vec<f32> {
    let mut rng = Pcg32::new(seed);
    let mut p = Vec::with_capacity(arch.param_count());
    for (i, &m) in arch.active_masks().iter().enumerate() {
        let view = arch.step_arch(i);
        if arch.glow {
            let c = view.flow_shape().0;
            for _ in 0..2 * c {
                p.push(0.1 * uniform(&mut rng));
            }
            let (w, w_inv, logdet) = random_inv_conv(&mut rng, c);
            p.extend_from_slice(&w);
            p.extend_from_slice(&w_inv);
            p.push(logdet);
        }
        for kind in COUPLING_TENSORS {
            let n = view.tensor_len(m, kind);
            let bound = match kind {
                TensorKind::Scale => 0.0,
                TensorKind::ConvWeight(j) => {
                    let (cin, _, k) = view.conv_shape(m, j);
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
    // The learned prior's tensors, after every step's (so the draws above are unchanged):
    // scales in [0.5, 1.5], conv weights +-gain/sqrt(fan_in), biases and the top ActNorm
    // in +-0.1.
    for l in 0..arch.levels {
        let view = arch.level(l);
        for &kind in arch.prior_tensors(l) {
            let c = view.flow_shape().0;
            for _ in 0..view.tensor_len(Mask::ChannelEven, kind) {
                let v = uniform(&mut rng);
                p.push(match kind {
                    TensorKind::PriorScale => 1.0 + 0.5 * v,
                    TensorKind::PriorWeight => {
                        gain / ((c / 2 * PRIOR_KERNEL * PRIOR_KERNEL) as f32).sqrt() * v
                    }
                    _ => 0.1 * v,
                });
            }
        }
    }
    assert_eq!(p.len(), arch.param_count());
    p
}

/// A random invertible `c x c` matrix `W = D Q` (row-major, f32): `Q` a product of random
/// Givens rotations, `D` a diagonal of `exp(+-0.3)` with random signs, so the condition
/// number is at most `e^0.6`. Returns `W`, its inverse computed in f64 from the f32 `W`
/// (then rounded), and `ln|det W|` (f64, rounded).
pub fn random_inv_conv(rng: &mut Pcg32, c: usize) -> (Vec<f32>, Vec<f32>, f32) {
    let mut q = std::vec![0f64; c * c];
    for k in 0..c {
        q[k * c + k] = 1.0;
    }
    for _ in 0..2 * c * c {
        let a = (rng.next_u32() as usize) % c;
        let b = (rng.next_u32() as usize) % c;
        if a == b {
            continue;
        }
        let th = f64::from(uniform(rng)) * core::f64::consts::PI;
        let (sn, cs) = th.sin_cos();
        for col in 0..c {
            let (x, y) = (q[a * c + col], q[b * c + col]);
            q[a * c + col] = cs * x - sn * y;
            q[b * c + col] = sn * x + cs * y;
        }
    }
    for row in 0..c {
        let d = (0.3 * f64::from(uniform(rng))).exp();
        let sign = if rng.next_u32() & 1 == 0 { 1.0 } else { -1.0 };
        for col in 0..c {
            q[row * c + col] *= d * sign;
        }
    }
    let w: Vec<f32> = q.iter().map(|&v| v as f32).collect();
    let (inv, logdet) = invert(&w.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(), c);
    (w, inv.iter().map(|&v| v as f32).collect(), logdet as f32)
}

/// The blob of `params`.
pub fn blob(arch: &Arch, dtype: DType, params: &[f32]) -> Vec<u8> {
    let mut out = std::vec![0u8; blob_len(arch, dtype)];
    let n = write_blob(arch, dtype, params, &mut out).expect("valid params");
    assert_eq!(n, out.len());
    out
}

pub use clayflow_testkit::invert;
