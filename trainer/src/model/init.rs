//! Fresh parameters for an architecture.

use crate::config::{prior_specs, tensor_specs, tensors_per_step};
use crate::invconv;
use clayflow_kernel::arch::COUPLING_TENSORS;
use clayflow_kernel::{Arch, Pcg32, Rng};

/// PyTorch's default `Conv2d` initialisation bound, `1 / sqrt(fan_in)`.
fn init_bound(fan_in: usize) -> f32 {
    1.0 / (fan_in.max(1) as f32).sqrt()
}

/// Fresh parameters for `arch` (host vectors in checkpoint order): PyTorch-default uniform
/// initialisation for the first two convs, the last conv zero (so every coupling starts as
/// the identity), scales 1; for Glow steps ActNorm as the identity (training replaces it by
/// the data-dependent initialisation, [`Flow::data_init`](super::Flow::data_init)) and a
/// random rotation as the 1x1 convolution, LU-factorised; the learned prior as the identity.
/// Deterministic in `seed`.
pub fn init_params(arch: &Arch, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Pcg32::with_stream(seed, 0x1417);
    let mut uniform = |bound: f32| ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
    let specs = tensor_specs(arch);
    let per = tensors_per_step(arch);
    let mut out = Vec::with_capacity(specs.len());
    for (i, &mask) in arch.active_masks().iter().enumerate() {
        let view = arch.step_arch(i);
        let step = &specs[i * per..(i + 1) * per];
        if arch.glow {
            let c = view.flow_shape().0;
            let lu = invconv::init(
                c,
                seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)),
            );
            out.push(vec![0.0; c]);
            out.push(vec![0.0; c]);
            out.push(lu.perm);
            out.push(lu.sign);
            out.push(lu.lower);
            out.push(lu.upper);
            out.push(lu.log_s);
        }
        for spec in &step[per - COUPLING_TENSORS.len()..] {
            let n = spec.len();
            let name = spec.name.as_str();
            let v: Vec<f32> = if name.ends_with(".scale") {
                vec![1.0; n]
            } else if name.contains(".conv2.") {
                vec![0.0; n]
            } else {
                // weight [cout, cin, k, k] or bias [cout]: fan_in = cin * k * k of the conv.
                let j = if name.contains(".conv0.") { 0 } else { 1 };
                let (cin, _, k) = view.conv_shape(mask, j);
                let b = init_bound(cin * k * k);
                (0..n).map(|_| uniform(b)).collect()
            };
            out.push(v);
        }
    }
    // The learned prior starts as the identity (Glow's zero-initialised convolution and top
    // prior): a zero convolution gives s = t = 0 whatever its tanh scale (1, as the seed's).
    for spec in prior_specs(arch) {
        let fill = if spec.name.ends_with(".scale") {
            1.0
        } else {
            0.0
        };
        out.push(vec![fill; spec.len()]);
    }
    out
}
