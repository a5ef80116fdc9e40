//! Shared support for the cross-crate tests in `tests/`: random models written through the
//! real blob writer.

/// A measured single-core FMA peak, for the benches' percent-of-peak figures.
pub mod peak;

use clayflow_kernel::arch::{TensorKind, COUPLING_TENSORS};
use clayflow_kernel::{blob_len, write_blob, Arch, DType, Pcg32, Rng};

/// Uniform in [-1, 1).
pub fn uniform(rng: &mut Pcg32) -> f32 {
    (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0
}

/// Random parameters: conv weights uniform in +-gain/sqrt(fan_in) (He-like: activations keep
/// their scale through the ReLU layers), biases +-0.1, per-channel scales in
/// [1 - scale_spread, 1 + scale_spread] (so |s| <= 1 + scale_spread).
pub fn random_params(arch: &Arch, seed: u64, gain: f32, scale_spread: f32) -> Vec<f32> {
    let mut rng = Pcg32::new(seed);
    let mut p = Vec::with_capacity(arch.param_count());
    for &m in arch.active_masks() {
        for kind in COUPLING_TENSORS {
            let n = arch.tensor_len(m, kind);
            for _ in 0..n {
                let v = uniform(&mut rng);
                p.push(match kind {
                    TensorKind::Scale => 1.0 + scale_spread * v,
                    TensorKind::ConvWeight(j) => {
                        let (cin, _, k) = arch.conv_shape(m, j);
                        gain * v / ((cin * k * k) as f32).sqrt()
                    }
                    TensorKind::ConvBias(_) => 0.1 * v,
                });
            }
        }
    }
    p
}

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
