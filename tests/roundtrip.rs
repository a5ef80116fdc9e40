//! Property tests: every invertible op and whole models satisfy `inverse(forward(x)) ≈ x` and
//! `forward(inverse(z)) ≈ z`, for random weights and inputs, with f32 and f16 weights, on
//! one-level RealNVP models and on multi-level and Glow models (ActNorm, 1x1 conv with its
//! stored f32 inverse, squeeze/split between levels).
//!
//! ## Tolerances
//! Squeeze is a permutation: exact. In a coupling the kept half passes through bit for bit,
//! so the inverse recomputes *bit-identical* `(s, t)`; the only error is in the changed half,
//! `x' = fl(fl(fl(x e^s) + t) - t) e^-s`: four roundings plus `expf`'s < 1 ulp error each
//! way, i.e. `|x' - x| <= ~6 u (|x| + |t| e^|s|)` with `u = 2^-24`. Over a chain that error
//! reaches later couplings' CNN inputs and is amplified by their Lipschitz constant `L` (for
//! He-scaled weights, `L e^|s| ~ 2..4` per coupling). For 12 couplings with `|x|, |t| <~ 10`
//! the first-order bound is `12 * 6u * 20 * 4^2 ~ 1.4e-3` absolute in the latent domain, far
//! above what we observe (~1e-5) but far below a real bug (an `O(1)` error). We assert
//! `2e-3` in the latent (logit) domain and `1e-4` in `u` (the sigmoid's slope is <= 1/4 and
//! dividing by `1 - 2a = 0.9` keeps it so).

use clayflow_kernel::arch::{alternating_masks, Mask, MNIST, MNIST_GLOW};
use clayflow_kernel::coupling::{self, Work};
use clayflow_kernel::preprocess::{logit_forward, logit_inverse};
use clayflow_kernel::squeeze::{squeeze, unsqueeze};
use clayflow_kernel::{forward, inverse, scratch_len, Arch, DType, Model, ScratchLayout};
use clayflow_suite::{blob, max_abs_diff, random_params};
use proptest::prelude::*;

const LATENT_TOL: f32 = 2e-3;
const PIXEL_DOMAIN_TOL: f32 = 1e-4;

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16)]
}

fn mask() -> impl Strategy<Value = Mask> {
    prop_oneof![
        Just(Mask::ChannelEven),
        Just(Mask::ChannelOdd),
        Just(Mask::CheckerEven),
        Just(Mask::CheckerOdd)
    ]
}

/// A small random architecture without squeeze (so any mask kind applies).
fn small_arch() -> impl Strategy<Value = Arch> {
    (
        2usize..5,
        1usize..7,
        1usize..7,
        mask(),
        1usize..5,
        prop::array::uniform3(0usize..3),
        1usize..6,
        1usize..6,
    )
        .prop_filter("checkerboard needs 2 pixels", |(_, h, w, ..)| h * w >= 2)
        .prop_map(|(c, h, w, first, n, ks, h0, h1)| Arch {
            channels: c,
            height: h,
            width: w,
            squeeze: false,
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
        })
}

/// A small random multi-level and/or Glow architecture: 1-3 levels of 1-2 steps, with or
/// without the initial squeeze and Glow steps (and, with them, with or without the learned
/// prior), sides a multiple of every halving, any mask
/// kinds (filtered to what `validate` accepts: a split needs an even channel count, a
/// checkerboard 2 pixels per plane at its level).
fn glow_arch() -> impl Strategy<Value = Arch> {
    (
        1usize..5,
        1usize..3,
        1usize..3,
        any::<bool>(),
        1usize..4,
        1usize..3,
        any::<bool>(),
        mask(),
        prop::array::uniform3(0usize..2),
        1usize..5,
        1usize..5,
        any::<bool>(),
    )
        .prop_map(
            |(c, kh, kw, squeeze, levels, per, glow, first, ks, h0, h1, prior)| {
                let halvings = levels - 1 + usize::from(squeeze);
                Arch {
                    channels: c,
                    height: kh << halvings,
                    width: kw << halvings,
                    squeeze,
                    levels,
                    glow,
                    couplings: levels * per,
                    masks: alternating_masks(first),
                    kernels: [2 * ks[0] + 1, 2 * ks[1] + 1, 2 * ks[2] + 1],
                    hidden: [h0, h1],
                    bits: 8,
                    logit_alpha: 0.05,
                    prior: glow && prior,
                    scale_floor: if glow {
                        clayflow_kernel::GLOW_SCALE_FLOOR
                    } else {
                        0.0
                    },
                }
            },
        )
        .prop_filter("valid architecture", |a| a.validate().is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn glow_and_multi_level_models_round_trip(arch in glow_arch(), seed in any::<u64>(),
                                              dt in dtype(),
                                              us in prop::collection::vec(0.0f32..1.0, 256)) {
        check_model_round_trip(&arch, seed, dt, &us, 1.0)?;
    }

    #[test]
    fn squeeze_round_trips_exactly(c in 1usize..5, h2 in 1usize..8, w2 in 1usize..8, seed in any::<u32>()) {
        let (h, w) = (2 * h2, 2 * w2);
        let x: Vec<f32> = (0..c * h * w).map(|i| (i as u32 ^ seed) as f32).collect();
        let mut y = vec![0.0; x.len()];
        let mut back = vec![0.0; x.len()];
        squeeze(c, h, w, &x, &mut y).unwrap();
        unsqueeze(c, h, w, &y, &mut back).unwrap();
        prop_assert_eq!(&back, &x);
        // And the other way round: unsqueeze then squeeze.
        unsqueeze(c, h, w, &x, &mut y).unwrap();
        squeeze(c, h, w, &y, &mut back).unwrap();
        prop_assert_eq!(&back, &x);
    }

    #[test]
    fn logit_round_trips(u in prop::collection::vec(0.0f32..=1.0, 1..64), alpha in 0.001f32..0.4) {
        let mut x = u.clone();
        logit_forward(&mut x, alpha).unwrap();
        logit_inverse(&mut x, alpha).unwrap();
        // sigmoid(logit(s)) is within a few ulps of s in [alpha, 1 - alpha]; dividing by
        // 1 - 2 alpha >= 0.2 multiplies that by at most 5.
        prop_assert!(max_abs_diff(&x, &u) < 5e-6, "{}", max_abs_diff(&x, &u));
    }

    #[test]
    fn couplings_round_trip_both_ways(arch in small_arch(), seed in any::<u64>(), dt in dtype(),
                                      xs in prop::collection::vec(-4.0f32..4.0, 512)) {
        let params = random_params(&arch, seed, 1.5, 0.5);
        let b = blob(&arch, dt, &params);
        let model = Model::from_blob(&b).unwrap();
        let n = arch.dim();
        let l = ScratchLayout::of(&arch);
        let mut cnn_in = vec![0.0; l.cnn_in];
        let mut a = vec![0.0; l.region_a];
        let mut bb = vec![0.0; l.region_b];
        let mut work = Work { cnn_in: &mut cnn_in, region_a: &mut a, region_b: &mut bb };
        let x: Vec<f32> = xs.iter().cycle().take(n).copied().collect();
        for i in 0..arch.couplings {
            let cw = model.coupling(i).unwrap();
            // x -> y -> x
            let mut y = x.clone();
            coupling::forward(&arch, &cw, &mut y, &mut work).unwrap();
            coupling::inverse(&arch, &cw, &mut y, &mut work).unwrap();
            prop_assert!(max_abs_diff(&y, &x) < 1e-5 * 50.0, "fwd-inv {}", max_abs_diff(&y, &x));
            // z -> x -> z
            let mut z = x.clone();
            coupling::inverse(&arch, &cw, &mut z, &mut work).unwrap();
            coupling::forward(&arch, &cw, &mut z, &mut work).unwrap();
            prop_assert!(max_abs_diff(&z, &x) < 1e-5 * 50.0, "inv-fwd {}", max_abs_diff(&z, &x));
        }
    }

    #[test]
    fn small_models_round_trip(arch in small_arch(), seed in any::<u64>(), dt in dtype(),
                               us in prop::collection::vec(0.0f32..1.0, 256)) {
        check_model_round_trip(&arch, seed, dt, &us, 1.0)?;
    }
}

proptest! {
    // The full 12-coupling MNIST preset: ~65M multiply-adds per direction, so fewer cases.
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn mnist_preset_round_trips(seed in any::<u64>(), dt in dtype(),
                                us in prop::collection::vec(0.0f32..1.0, 784)) {
        check_model_round_trip(&MNIST, seed, dt, &us, 1.0)?;
    }
}

proptest! {
    // The 32-step, 2-level Glow MNIST preset. Gain 0.3: He-scaled random couplings at gain 1
    // widen the latent by ~e^1.5 per step (|z| ~ 1e4 after 32), far from a trained model.
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn mnist_glow_preset_round_trips(seed in any::<u64>(), dt in dtype(),
                                     us in prop::collection::vec(0.0f32..1.0, 784)) {
        check_model_round_trip(&MNIST_GLOW, seed, dt, &us, 0.3)?;
    }
}

fn check_model_round_trip(
    arch: &Arch,
    seed: u64,
    dt: DType,
    us: &[f32],
    gain: f32,
) -> Result<(), TestCaseError> {
    let params = random_params(arch, seed, gain, 0.5);
    let b = blob(arch, dt, &params);
    let model = Model::from_blob(&b).unwrap();
    let mut scratch = vec![0.0; scratch_len(arch)];
    let u: Vec<f32> = us.iter().cycle().take(arch.dim()).copied().collect();
    // u -> z -> u
    let mut x = u.clone();
    forward(&model, &mut x, &mut scratch).unwrap();
    let z = x.clone();
    inverse(&model, &mut x, &mut scratch).unwrap();
    prop_assert!(
        max_abs_diff(&x, &u) < PIXEL_DOMAIN_TOL,
        "u: {}",
        max_abs_diff(&x, &u)
    );
    // z -> u -> z, from a standard-normal-sized latent (the z we just got is one).
    let mut y = z.clone();
    inverse(&model, &mut y, &mut scratch).unwrap();
    forward(&model, &mut y, &mut scratch).unwrap();
    prop_assert!(
        max_abs_diff(&y, &z) < LATENT_TOL,
        "z: {}",
        max_abs_diff(&y, &z)
    );
    Ok(())
}
