//! Cross-crate properties: the trainer's batched model and the kernel are the same function.
//! For random architectures, weights and inputs, the trainer's log-density equals the
//! kernel's, the trainer's inverse equals the kernel's, and the trainer's own round trips
//! hold, with f32 and (f16-rounded) weights.

use clayflow_kernel::arch::{alternating_masks, Mask};
use clayflow_kernel::{scratch_len, Arch, DType, Model};
use clayflow_suite::{blob, random_params};
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::config::tensor_specs;
use clayflow_trainer::model::Flow;
use proptest::prelude::*;
use std::sync::Arc;

fn arch() -> impl Strategy<Value = Arch> {
    let mask = prop_oneof![
        Just(Mask::ChannelEven),
        Just(Mask::ChannelOdd),
        Just(Mask::CheckerEven),
        Just(Mask::CheckerOdd)
    ];
    (
        1usize..4,
        1usize..4,
        1usize..4,
        any::<bool>(),
        mask,
        1usize..5,
        prop::array::uniform3(0usize..3),
        1usize..6,
        1usize..6,
    )
        .prop_map(|(c, h2, w2, squeeze, first, n, ks, h0, h1)| {
            // Channel masks need >= 2 channels: without squeeze use at least 2.
            let c = if squeeze || !first.is_channel() {
                c
            } else {
                c.max(2)
            };
            Arch {
                channels: c,
                height: 2 * h2,
                width: 2 * w2,
                squeeze,
                levels: 1,
                glow: false,
                couplings: n,
                masks: alternating_masks(first),
                kernels: [2 * ks[0] + 1, 2 * ks[1] + 1, 2 * ks[2] + 1],
                hidden: [h0, h1],
                bits: 8,
                logit_alpha: 0.05,
                prior: false,
                scale_floor: 0.0,
            }
        })
}

/// Splits a flat parameter vector into the trainer's per-tensor vectors.
fn tensors(arch: &Arch, flat: &[f32]) -> Vec<Vec<f32>> {
    let mut rest = flat;
    tensor_specs(arch)
        .iter()
        .map(|s| {
            let (a, b) = rest.split_at(s.len());
            rest = b;
            a.to_vec()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn trainer_and_kernel_agree(arch in arch(), seed in any::<u64>(), f16 in any::<bool>(), batch in 1usize..4,
                                us in prop::collection::vec(0.0f32..1.0, 64)) {
        prop_assume!(arch.validate().is_ok());
        let mut flat = random_params(&arch, seed, 1.0, 0.5);
        let dtype = if f16 { DType::F16 } else { DType::F32 };
        if f16 {
            clayflow_kernel::weights::round_to_f16(&mut flat);
        }
        let b = blob(&arch, dtype, &flat);
        let model = Model::from_blob(&b).unwrap();
        let mut flow = Flow::new(Arc::new(CpuBackend::default()), arch, &tensors(&arch, &flat)).unwrap();
        let d = arch.dim();
        let u: Vec<f32> = us.iter().cycle().take(batch * d).copied().collect();
        let stats = flow.forward(&u, batch).unwrap();
        let mut scratch = vec![0.0f32; scratch_len(&arch)];
        for i in 0..batch {
            let k = clayflow_kernel::log_prob_u(&model, &u[i * d..(i + 1) * d], &mut scratch).unwrap();
            let t = stats.log_prob[i];
            // Same f32 operations, different summation order: ~1e-6 relative per term.
            prop_assert!((f64::from(k) - t).abs() <= 1e-4 * (1.0 + t.abs() + d as f64), "kernel {} vs trainer {}", k, t);
        }
        // Inverse of the same latents.
        let z: Vec<f32> = us.iter().cycle().skip(7).take(batch * d).map(|v| 4.0 * v - 2.0).collect();
        let x = flow.inverse(&z, batch).unwrap();
        for i in 0..batch {
            let mut zk = z[i * d..(i + 1) * d].to_vec();
            clayflow_kernel::inverse(&model, &mut zk, &mut scratch).unwrap();
            let diff = zk.iter().zip(&x[i * d..(i + 1) * d]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            prop_assert!(diff < 1e-5, "inverse differs by {}", diff);
        }
        // The trainer's own round trip u -> z -> u (z recovered through the kernel's forward).
        let mut zk = u[..d].to_vec();
        clayflow_kernel::forward(&model, &mut zk, &mut scratch).unwrap();
        let back = flow.inverse(&zk, 1).unwrap();
        let diff = back.iter().zip(&u[..d]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        prop_assert!(diff < 1e-4, "round trip differs by {}", diff);
    }
}
