//! Shared support for the cross-crate tests in `tests/`: random models written through the
//! real blob writer.

/// A measured single-core FMA peak, for the benches' percent-of-peak figures.
pub mod peak;

use clayflow_kernel::arch::{TensorKind, COUPLING_TENSORS};
use clayflow_kernel::{blob_len, write_blob, Arch, DType, Mask, Pcg32, Rng};

/// Uniform in [-1, 1).
pub fn uniform(rng: &mut Pcg32) -> f32 {
    (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0
}

/// Random parameters: conv weights uniform in +-gain/sqrt(fan_in) (He-like: activations keep
/// their scale through the ReLU layers), biases +-0.1, per-channel scales in
/// [1 - scale_spread, 1 + scale_spread] (so |s| <= 1 + scale_spread), each at the shape of
/// its step's level. Glow steps first get ActNorm log-scales and biases in +-0.1 and a
/// well-conditioned 1x1 conv with its exact inverse and log-det ([`random_inv_conv`]); the
/// learned prior's tensors come last. Without Glow steps the draws are the same as before Glow existed (same values per seed).
pub fn random_params(arch: &Arch, seed: u64, gain: f32, scale_spread: f32) -> Vec<f32> {
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
            for _ in 0..n {
                let v = uniform(&mut rng);
                p.push(match kind {
                    TensorKind::Scale => 1.0 + scale_spread * v,
                    TensorKind::ConvWeight(j) => {
                        let (cin, _, k) = view.conv_shape(m, j);
                        gain * v / ((cin * k * k) as f32).sqrt()
                    }
                    TensorKind::ConvBias(_) => 0.1 * v,
                    // COUPLING_TENSORS holds none of the Glow kinds.
                    _ => unreachable!("{kind} is not a coupling tensor"),
                });
            }
        }
    }
    // The learned prior: split prior scales like the couplings', its 3x3 convolution like a
    // coupling's last one at `gain`, the top prior like an ActNorm.
    for l in 0..arch.levels {
        let view = arch.level(l);
        for &kind in arch.prior_tensors(l) {
            let c = view.flow_shape().0;
            for _ in 0..view.tensor_len(Mask::ChannelEven, kind) {
                let v = uniform(&mut rng);
                p.push(match kind {
                    TensorKind::PriorScale => 1.0 + scale_spread * v,
                    TensorKind::PriorWeight => gain * v / ((c / 2 * 9) as f32).sqrt(),
                    _ => 0.1 * v,
                });
            }
        }
    }
    assert_eq!(p.len(), arch.param_count());
    p
}

/// A random invertible `c x c` matrix `W = D Q` (row-major, f32): `Q` a product of random
/// Givens rotations, `D` a diagonal of `exp(+-0.3)` with random signs, so its condition
/// number is at most `e^0.6`. Returns `W`, its inverse computed in f64 from the f32 `W` (then
/// rounded to f32), and `ln|det W|`.
pub fn random_inv_conv(rng: &mut Pcg32, c: usize) -> (Vec<f32>, Vec<f32>, f32) {
    let mut q = vec![0f64; c * c];
    for k in 0..c {
        q[k * c + k] = 1.0;
    }
    for _ in 0..2 * c * c {
        let a = (rng.next_u32() as usize) % c;
        let b = (rng.next_u32() as usize) % c;
        if a == b {
            continue;
        }
        let (sn, cs) = (f64::from(uniform(rng)) * std::f64::consts::PI).sin_cos();
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

pub use clayflow_testkit::invert;

/// The weight blob of `params`.
pub fn blob(arch: &Arch, dtype: DType, params: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; blob_len(arch, dtype)];
    write_blob(arch, dtype, params, &mut out).expect("valid params");
    out
}

/// Largest |a - b| over two slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
