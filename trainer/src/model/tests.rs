use super::*;
use crate::backend::actnorm;
use crate::backend::cpu::CpuBackend;
use clayflow_kernel::{alternating_masks, blob_len, write_blob, DType, Model, Pcg32, Rng};

pub fn tiny(squeeze: bool, first: Mask, couplings: usize) -> Arch {
    Arch {
        channels: if squeeze { 1 } else { 2 },
        height: 4,
        width: 4,
        squeeze,
        levels: 1,
        glow: false,
        couplings,
        masks: alternating_masks(first),
        kernels: [3, 1, 3],
        hidden: [3, 4],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    }
}

/// A two-level Glow on 1x8x8: squeezed to 4x4x4, two steps, split, squeezed to 8x2x2,
/// two steps.
pub fn tiny_glow(levels: usize, glow: bool) -> Arch {
    Arch {
        height: 8,
        width: 8,
        levels,
        glow,
        couplings: 2 * levels,
        ..tiny(true, Mask::ChannelEven, 2)
    }
}

/// [`tiny_glow`] with Glow's learned prior (a split prior per split, a top prior).
pub fn tiny_prior(levels: usize) -> Arch {
    Arch {
        prior: true,
        ..tiny_glow(levels, true)
    }
}

/// Initial parameters with the last conv made non-zero, so the couplings do something,
/// and (Glow) ActNorm, the LU factors and the learned prior moved off their initial values.
pub fn busy_params(arch: &Arch, seed: u64) -> Vec<Vec<f32>> {
    let mut p = init_params(arch, seed);
    let mut rng = Pcg32::new(seed + 99);
    for (spec, t) in tensor_specs(arch).iter().zip(p.iter_mut()) {
        let glow_spread =
            if spec.name.ends_with(".actnorm.logs") || spec.name.ends_with(".invconv.log_s") {
                0.2
            } else if spec.name.ends_with(".actnorm.bias")
                || spec.name.ends_with(".invconv.lower")
                || spec.name.ends_with(".invconv.upper")
                || spec.name.starts_with("top.")
                || (spec.name.starts_with("prior.") && !spec.name.ends_with(".scale"))
            {
                0.3
            } else {
                0.0
            };
        if glow_spread > 0.0 {
            for v in t.iter_mut() {
                *v += ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * glow_spread;
            }
            continue;
        }
        if spec.name.contains(".conv2.") || spec.name.ends_with(".scale") {
            // conv2 weights ~ U(+-1/sqrt(fan_in)), like the other convs.
            let fan_in: usize = spec.shape.iter().skip(1).product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            for v in t.iter_mut() {
                *v += ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
            }
        }
    }
    p
}

/// A deep Glow in a trained-like state: ActNorm initialised from data, every coupling's
/// last conv at a tenth of the other convs' scale (random parameters at full scale make
/// 32 steps overflow f32, which says nothing about the code).
pub fn settled_flow(arch: Arch, seed: u64) -> Flow {
    let mut p = init_params(&arch, seed);
    let mut rng = Pcg32::new(seed + 7);
    for (spec, t) in tensor_specs(&arch).iter().zip(p.iter_mut()) {
        if spec.name.contains(".conv2.") {
            let fan_in: usize = spec.shape.iter().skip(1).product();
            let bound = 0.1 / (fan_in.max(1) as f32).sqrt();
            for v in t.iter_mut() {
                *v = ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
            }
        }
    }
    let mut f = flow(arch, &p);
    f.data_init(&batch_u(&arch, 8, seed), 8).unwrap();
    f
}

pub fn batch_u(arch: &Arch, batch: usize, seed: u64) -> Vec<f32> {
    let mut rng = Pcg32::new(seed);
    (0..batch * arch.dim())
        .map(|_| (rng.next_u32() >> 8) as f32 / 16_777_216.0)
        .collect()
}

fn flow(arch: Arch, params: &[Vec<f32>]) -> Flow {
    Flow::new(Arc::new(CpuBackend::default()), arch, params).unwrap()
}

#[test]
fn forward_and_inverse_match_the_kernel() {
    for arch in [
        tiny(true, Mask::ChannelEven, 3),
        tiny(false, Mask::CheckerOdd, 2),
        tiny_glow(2, true),
        tiny_glow(2, false),
        tiny_glow(1, true),
        tiny_prior(2),
        tiny_prior(3),
        tiny_prior(1),
        clayflow_kernel::MNIST,
        clayflow_kernel::MNIST_GLOW,
    ] {
        let batch = 3;
        let u = batch_u(&arch, batch, 1);
        let mut f = if arch.couplings > 8 && arch.glow {
            settled_flow(arch, 3)
        } else {
            flow(arch, &busy_params(&arch, 3))
        };
        let stats = f.forward(&u, batch).unwrap();
        let flat: Vec<f32> = f.blob_params().unwrap();
        let mut blob = vec![0u8; blob_len(&arch, DType::F32)];
        write_blob(&arch, DType::F32, &flat, &mut blob).unwrap();
        let model = Model::from_blob(&blob).unwrap();
        let mut scratch = vec![0f32; clayflow_kernel::scratch_len(&arch)];
        let d = arch.dim();
        for i in 0..batch {
            let k =
                clayflow_kernel::log_prob_u(&model, &u[i * d..(i + 1) * d], &mut scratch).unwrap();
            let t = stats.log_prob[i];
            // Same f32 math in a different summation order: relative 1e-5 of the terms.
            assert!(
                (f64::from(k) - t).abs() < 1e-5 * (t.abs() + d as f64),
                "{k} vs {t}"
            );
        }
        // Inverse: kernel and trainer agree on the same latent.
        let z: Vec<f32> = batch_u(&arch, batch, 7)
            .iter()
            .map(|v| (v - 0.5) * 3.0)
            .collect();
        let x = f.inverse(&z, batch).unwrap();
        for i in 0..batch {
            let mut zk = z[i * d..(i + 1) * d].to_vec();
            clayflow_kernel::inverse(&model, &mut zk, &mut scratch).unwrap();
            let diff = zk
                .iter()
                .zip(&x[i * d..(i + 1) * d])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "{arch:?} inverse differs by {diff}");
        }
    }
}

#[test]
fn inverse_undoes_forward() {
    for arch in [
        clayflow_kernel::MNIST,
        clayflow_kernel::MNIST_GLOW,
        tiny_glow(2, true),
        tiny_prior(2),
        tiny_prior(3),
    ] {
        let mut f = if arch.glow && arch.couplings > 8 {
            settled_flow(arch, 5)
        } else {
            flow(arch, &busy_params(&arch, 5))
        };
        let u = batch_u(&arch, 2, 2);
        f.forward(&u, 2).unwrap();
        let z = f.latents().unwrap();
        let back = f.inverse(&z, 2).unwrap();
        let diff = back
            .iter()
            .zip(&u)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-4,
            "{}x{} levels: {diff}",
            arch.levels,
            arch.couplings
        );
    }
}

/// bf16 networks (AMX 1x1 convolutions) on `mnist-glow`: the inverse still undoes the
/// forward pass (both run the same rounded networks), and the log-likelihood and the
/// gradients stay within bf16's rounding of the f32 backend's. Without AMX the backend
/// cannot be built, and the test checks that instead.
#[test]
fn bf16_networks_invert_exactly_and_track_f32() {
    let Some(bf16) = CpuBackend::with_bf16_networks() else {
        assert!(!crate::backend::cpu::conv::bf16_available());
        eprintln!("no AMX-BF16 here: the bf16 networks are not run");
        return;
    };
    assert!(bf16.bf16_networks() && bf16.name().contains("bf16"));
    let arch = clayflow_kernel::MNIST_GLOW;
    let settled = settled_flow(arch, 5);
    let params = settled.params_host().unwrap();
    let batch = 4;
    let u = batch_u(&arch, batch, 2);
    let run = |f: &mut Flow| {
        let stats = f.forward(&u, batch).unwrap();
        let mut grads = f.zeros_like_params().unwrap();
        f.backward(&mut grads).unwrap();
        let g: Vec<f32> = grads
            .iter()
            .flat_map(|g| f.backend().download(g).unwrap())
            .collect();
        (stats.mean_bpd, g)
    };
    let mut f32_flow = flow(arch, &params);
    let mut bf16_flow = Flow::new(Arc::new(bf16), arch, &params).unwrap();
    let (bpd_f, g_f) = run(&mut f32_flow);
    let (bpd_b, g_b) = run(&mut bf16_flow);
    assert!(
        bpd_f != bpd_b,
        "bf16 networks computed exactly what f32 did: not rounding"
    );
    assert!((bpd_f - bpd_b).abs() < 1e-4 * bpd_f, "{bpd_b} vs {bpd_f}");
    let dot: f64 = g_f.iter().zip(&g_b).map(|(a, b)| f64::from(a * b)).sum();
    let norm = |g: &[f32]| g.iter().map(|v| f64::from(v * v)).sum::<f64>().sqrt();
    let cos = dot / (norm(&g_f) * norm(&g_b));
    assert!(cos > 0.9999, "gradient direction: cosine {cos}");
    let z = bf16_flow.latents().unwrap();
    let back = bf16_flow.inverse(&z, batch).unwrap();
    let diff = back
        .iter()
        .zip(&u)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "bf16 inverse misses the forward by {diff}");
}

/// The data-dependent initialisation leaves every ActNorm's output with zero mean and
/// unit variance per channel on the batch it saw; the untrained flow then maps that
/// batch to latents of about unit variance.
#[test]
fn actnorm_data_init_normalises_the_first_batch() {
    let arch = tiny_glow(2, true);
    let mut f = flow(arch, &init_params(&arch, 1));
    let batch = 16;
    let u = batch_u(&arch, batch, 3);
    f.data_init(&u, batch).unwrap();
    let ws = f.ws.as_ref().unwrap();
    // The input of each step's 1x1 convolution is its ActNorm's output.
    for (i, step) in ws.steps.iter().enumerate() {
        let view = arch.step_arch(i);
        let fs = shape4(batch, view.flow_shape());
        let x = f
            .backend()
            .download(&step.glow.as_ref().unwrap().ic_in)
            .unwrap();
        for (c, (mean, sd)) in actnorm::channel_stats(fs, &x).into_iter().enumerate() {
            assert!(mean.abs() < 1e-4, "step {i} channel {c}: mean {mean}");
            assert!((sd - 1.0).abs() < 1e-3, "step {i} channel {c}: std {sd}");
        }
    }
    let z = f.latents().unwrap();
    let var = z.iter().map(|v| f64::from(v * v)).sum::<f64>() / z.len() as f64;
    assert!((0.5..2.0).contains(&var), "latent variance {var}");
}

#[test]
fn fixed_tensors_get_no_gradient_and_are_not_trainable() {
    for arch in [tiny_glow(2, true), tiny_prior(2)] {
        let mut f = flow(arch, &busy_params(&arch, 2));
        let u = batch_u(&arch, 2, 1);
        f.forward(&u, 2).unwrap();
        let mut grads = f.zeros_like_params().unwrap();
        for g in &mut grads {
            f.backend().fill(g, 1.0).unwrap();
        }
        f.backward(&mut grads).unwrap();
        for ((spec, g), t) in tensor_specs(&arch).iter().zip(&grads).zip(f.trainable()) {
            let g = f.backend().download(g).unwrap();
            assert_eq!(t, !is_fixed(&arch, &spec.name));
            if !t {
                assert!(g.iter().all(|&v| v == 0.0), "{} has a gradient", spec.name);
            } else if spec.name.starts_with("prior.") || spec.name.starts_with("top.") {
                assert!(g.iter().any(|&v| v != 0.0), "{} has no gradient", spec.name);
            }
        }
    }
}

/// At its initialisation the learned prior is the identity: the same steps with and
/// without it give bit-identical log-densities and latents, and sampling inverts it.
#[test]
fn the_learned_prior_starts_as_the_identity() {
    for levels in [1, 2, 3] {
        let plain = tiny_glow(levels, true);
        let prior = tiny_prior(levels);
        let p = busy_params(&plain, 4);
        let mut q = p.clone();
        q.extend(init_params(&prior, 4).split_off(p.len()));
        assert_eq!(q.len(), tensor_specs(&prior).len());
        let u = batch_u(&plain, 3, 9);
        let (mut a, mut b) = (flow(plain, &p), flow(prior, &q));
        let (sa, sb) = (a.forward(&u, 3).unwrap(), b.forward(&u, 3).unwrap());
        assert_eq!(sa.log_prob, sb.log_prob, "{levels} levels");
        let (za, zb) = (a.latents().unwrap(), b.latents().unwrap());
        assert_eq!(za, zb);
        assert_eq!(a.inverse(&za, 3).unwrap(), b.inverse(&zb, 3).unwrap());
    }
}

/// Gradient check by central differences along a random +-1 direction in each parameter
/// tensor. The loss (~8 bits/dim) is f32 math summed in f64, so it carries ~1e-6 of
/// rounding noise; with eps = 1e-3 that is ~5e-4 in the difference quotient. A larger eps
/// moves pre-activations across ReLU kinks (eps = 1e-2 already gives 5% errors on conv0),
/// so we keep eps small and accept 1.5e-3 absolute or 2% relative error. Observed errors
/// on the channel-mask model are ~1e-4 relative; a wrong gradient is off by O(1).
#[test]
fn gradients_match_finite_differences() {
    for arch in [
        tiny(true, Mask::ChannelEven, 2),
        tiny(false, Mask::CheckerEven, 2),
        tiny_glow(2, true),
        tiny_glow(2, false),
        tiny_prior(2),
        tiny_prior(1),
    ] {
        let params = busy_params(&arch, 11);
        let batch = 2;
        let u = batch_u(&arch, batch, 4);
        let mut f = flow(arch, &params);
        f.forward(&u, batch).unwrap();
        let mut grads = f.zeros_like_params().unwrap();
        f.backward(&mut grads).unwrap();
        let grads: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| f.backend().download(g).unwrap())
            .collect();
        let mut rng = Pcg32::new(21);
        for (k, spec) in tensor_specs(&arch).iter().enumerate() {
            if is_fixed(&arch, &spec.name) {
                continue;
            }
            let dir: Vec<f32> = (0..spec.len())
                .map(|_| if rng.next_u32() & 1 == 0 { 1.0 } else { -1.0 })
                .collect();
            let analytic: f64 = grads[k]
                .iter()
                .zip(&dir)
                .map(|(g, d)| f64::from(g * d))
                .sum();
            let mut fd_at = |eps: f32| {
                let mut loss_at = |sign: f32| {
                    let mut p = params.clone();
                    for (v, d) in p[k].iter_mut().zip(&dir) {
                        *v += sign * eps * d;
                    }
                    f.set_params(&p).unwrap();
                    f.forward(&u, batch).unwrap().mean_bpd
                };
                (loss_at(1.0) - loss_at(-1.0)) / (2.0 * f64::from(eps))
            };
            // A kink can spoil one step size, rounding noise the smaller one; a wrong
            // gradient fails at both. Noise scales as 1/eps: 1.5e-3 at eps 1e-3.
            let fd = fd_at(1e-3);
            let ok = |fd: f64, abs: f64| {
                let err = (fd - analytic).abs();
                err < abs || err < 0.02 * analytic.abs()
            };
            if !ok(fd, 1.5e-3) {
                let fd2 = fd_at(2.5e-4);
                assert!(
                    ok(fd2, 6e-3),
                    "{}: analytic {analytic} vs finite differences {fd} (eps 1e-3), {fd2} (eps 2.5e-4)",
                    spec.name
                );
            }
        }
    }
}

/// The trainer's inverse never overflows with the Glow scale floor: `mnist-glow`'s shape with
/// narrow networks at full-scale random weights ([`busy_params`]), 1,000 latents at
/// temperature 1. The control, the same weights without the floor, overflows (so the draw
/// is large enough to catch it); the kernel's side is `tests/sampling.rs`.
#[test]
fn the_scale_floor_keeps_every_sample_finite() {
    let arch = |scale_floor| Arch {
        hidden: [8, 8],
        prior: false,
        scale_floor,
        ..clayflow_kernel::MNIST_GLOW
    };
    let params = busy_params(&arch(0.0), 3);
    let (n, d) = (1000, arch(0.0).dim());
    let mut z = vec![0.0f32; n * d];
    clayflow_kernel::Normal::new(Pcg32::new(17))
        .fill(&mut z, 1.0)
        .unwrap();
    let count = |floor| {
        let u = flow(arch(floor), &params).inverse(&z, n).unwrap();
        u.chunks(d)
            .filter(|img| img.iter().any(|v| !v.is_finite()))
            .count()
    };
    let (without, with) = (count(0.0), count(clayflow_kernel::GLOW_SCALE_FLOOR));
    eprintln!("non-finite samples of {n}: {without} without the floor, {with} with it");
    assert!(
        without > 0,
        "the control: without the floor these weights overflow"
    );
    assert_eq!(with, 0);
}
