//! Golden values: the kernel against an independent float64 numpy implementation of
//! MATH.md (`tools/golden/golden.py`), on two tiny fixed models whose parameters are a
//! closed-form formula (so no RNG is shared). A change in the kernel's math (logit, squeeze
//! layout, masks, conv, coupling, base density, bits/dim, inverse, quantisation) moves these
//! values far outside the tolerances below; f32 rounding does not.
//!
//! Model A: 1x4x6 squeezed to 4x2x3, couplings ChannelEven/Odd/Even, kernels [3, 1, 3],
//! hidden [4, 5], 8 bits, alpha 0.05. Model B: 2x4x4, no squeeze, CheckerEven/Odd, kernels
//! [3, 3, 1], hidden [3, 4], 5 bits, alpha 0.1. See the fixtures' headers for the formulas.
//!
//! Tolerances. The kernel computes in f32 (unit roundoff 6e-8) from the same f32 (or f16)
//! weights as the reference, so only its f32 rounding separates the two.
//! * z: each conv output is a sum of at most 45 products of magnitude <~ 1, so its relative
//!   error is <~ 45 * 6e-8 ~ 3e-6 of the sum of |terms| (typically far less); through tanh,
//!   exp(s) with |s| < 0.8 and three couplings this stays at a few 1e-6 on z of order
//!   0.05..4 (observed: <= 1.7e-6). `Z_TOL * max(1, |z|)` with `Z_TOL = 2e-5`: >10x the
//!   observed error, 25x below the effect of rounding the weights to f16 (up to 5e-4 in z).
//! * Log-det and log p: sums of 24..32 logs, s values and squares, |terms| <~ 3 and totals
//!   <~ 50, accumulated in f32: naive-summation bound 32 * 6e-8 * 50 ~ 1e-4, observed
//!   <= 8.5e-6. `LOGP_TOL = 2e-4` absolute (1e-5..1.5e-5 relative at these values), far
//!   tighter than 1e-3 relative and below the f32-vs-f16-weights difference (6e-4..2e-3).
//! * Bits/dim = -log p / (D ln 2) + n, so the log p tolerance / (D ln 2 = 16.6..22.2) plus
//!   the f32 rounding of a value near 8: `BPD_TOL = 1.5e-5` absolute (observed <= 3.6e-7).
//! * Inverse u: the same couplings, then a sigmoid (slope <= 1/4) over 1 - 2a, which shrinks
//!   the error: `U_TOL = 1e-5` absolute (observed <= 1.3e-7).
//! * Pixels: equal, except where the reference `u * 2^bits` lies within `U_TOL * 2^bits`
//!   of an integer, where +-1 is allowed (none does here: the nearest is 0.025 away).

use clayflow_kernel::arch::{TensorKind, COUPLING_TENSORS};
use clayflow_kernel::preprocess::quantize;
use clayflow_kernel::{
    alternating_masks, bits_per_dim, blob_len, forward, inverse, log_prob, scratch_len, write_blob,
    Arch, DType, Mask, Model,
};
use std::collections::HashMap;

const Z_TOL: f64 = 2e-5;
const LOGP_TOL: f64 = 2e-4;
const BPD_TOL: f64 = 1.5e-5;
const U_TOL: f64 = 1e-5;

const MODEL_A: Arch = Arch {
    channels: 1,
    height: 4,
    width: 6,
    squeeze: true,
    levels: 1,
    glow: false,
    couplings: 3,
    masks: alternating_masks(Mask::ChannelEven),
    kernels: [3, 1, 3],
    hidden: [4, 5],
    bits: 8,
    logit_alpha: 0.05,
    prior: false,
    scale_floor: 0.0,
};

const MODEL_B: Arch = Arch {
    channels: 2,
    height: 4,
    width: 4,
    squeeze: false,
    levels: 1,
    glow: false,
    couplings: 2,
    masks: alternating_masks(Mask::CheckerEven),
    kernels: [3, 3, 1],
    hidden: [3, 4],
    bits: 5,
    logit_alpha: 0.1,
    prior: false,
    scale_floor: 0.0,
};

/// The fixture: `key v1 v2 ...` per line, `#` comments.
struct Fixture(HashMap<String, Vec<f64>>);

impl Fixture {
    fn parse(text: &str) -> Fixture {
        let mut map = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let key = words.next().expect("a key").to_string();
            let values = words
                .map(|w| {
                    w.parse::<f64>()
                        .unwrap_or_else(|e| panic!("{key}: {w}: {e}"))
                })
                .collect();
            assert!(map.insert(key.clone(), values).is_none(), "duplicate {key}");
        }
        Fixture(map)
    }

    fn get(&self, key: &str) -> &[f64] {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("fixture has no key {key}"))
    }

    fn one(&self, key: &str) -> f64 {
        let v = self.get(key);
        assert_eq!(v.len(), 1, "{key}");
        v[0]
    }
}

/// The parameter formula of `golden.py`, over the global flat index `i` in blob order:
/// scales `0.8 + 0.05 * (i % 5)`, conv weights and biases `0.3 * sin(0.7 i + 0.1)`, in f64
/// rounded to f32.
fn params(arch: &Arch) -> Vec<f32> {
    let mut p = Vec::with_capacity(arch.param_count());
    for &m in arch.active_masks() {
        for kind in COUPLING_TENSORS {
            for _ in 0..arch.tensor_len(m, kind) {
                let i = p.len();
                let v = match kind {
                    TensorKind::Scale => 0.8 + 0.05 * (i % 5) as f64,
                    _ => 0.3 * (0.7 * i as f64 + 0.1).sin(),
                };
                p.push(v as f32);
            }
        }
    }
    p
}

fn blob(arch: &Arch, dtype: DType, params: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; blob_len(arch, dtype)];
    let n = write_blob(arch, dtype, params, &mut out).expect("write_blob");
    assert_eq!(n, out.len());
    out
}

/// Asserts `|got - want| <= tol(want)` element-wise; returns the largest error / tolerance.
fn close(what: &str, got: &[f32], want: &[f64], tol: impl Fn(f64) -> f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut max_err) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let t = tol(w);
        assert!(
            err <= t,
            "{what}[{i}]: kernel {g} vs reference {w} (error {err:.3e} > tolerance {t:.3e})"
        );
        if t > 0.0 {
            worst = worst.max(err / t);
        }
        max_err = max_err.max(err);
    }
    eprintln!("{what}: largest error {max_err:.2e}");
    worst
}

fn rel(tol: f64) -> impl Fn(f64) -> f64 {
    move |w: f64| tol * w.abs().max(1.0)
}

fn check_model(arch: &Arch, text: &str) {
    let fx = Fixture::parse(text);
    let name = format!("{}x{}x{}", arch.channels, arch.height, arch.width);

    // The test's inputs are the fixture's: same formulas on both sides.
    let p = params(arch);
    assert_eq!(fx.one("param_count") as usize, arch.param_count());
    let p_ref: Vec<f32> = fx.get("params").iter().map(|&v| v as f32).collect();
    assert_eq!(p, p_ref, "{name}: parameter formula differs from golden.py");
    let d = arch.dim();
    let levels = 1u32 << arch.bits;
    let pixels: Vec<u8> = (0..d)
        .map(|i| ((37 * i + 11) % levels as usize) as u8)
        .collect();
    let fx_pixels: Vec<u8> = fx.get("pixels").iter().map(|&v| v as u8).collect();
    assert_eq!(pixels, fx_pixels, "{name}: pixel formula");
    let u: Vec<f32> = pixels
        .iter()
        .map(|&x| (f32::from(x) + 0.5) / levels as f32)
        .collect();
    close("u", &u, fx.get("u"), |_| 0.0);
    let z_in: Vec<f32> = (0..d).map(|i| (1.3 * i as f64).sin() as f32).collect();
    close("z_in", &z_in, fx.get("z_in"), |_| 0.0);

    for (dtype, tag) in [(DType::F32, "f32"), (DType::F16, "f16")] {
        let what = |k: &str| format!("{name} {tag} {k}");
        let b = blob(arch, dtype, &p);
        let model = Model::from_blob(&b).expect("from_blob");
        let mut scratch = vec![0f32; scratch_len(arch)];
        let mut worst = 0f64;

        // Forward: u -> z and the total log-det.
        let mut z = u.clone();
        let log_det = forward(&model, &mut z, &mut scratch).expect("forward");
        worst = worst.max(close(
            &what("z"),
            &z,
            fx.get(&format!("z_{tag}")),
            rel(Z_TOL),
        ));
        let want_ld = fx.one(&format!("log_det_{tag}"));
        worst = worst.max(close(&what("log_det"), &[log_det], &[want_ld], |_| {
            LOGP_TOL
        }));

        // Each coupling's log-det, through the models made of the first k couplings (their
        // parameters are a prefix of the flat vector): localises a wrong coupling.
        let logit_ld = fx.one(&format!("log_det_logit_{tag}"));
        let mut cumulative = logit_ld;
        for (k, &c) in fx
            .get(&format!("coupling_log_det_{tag}"))
            .iter()
            .enumerate()
        {
            cumulative += c;
            let prefix = Arch {
                couplings: k + 1,
                ..*arch
            };
            let pb = blob(&prefix, dtype, &p[..prefix.param_count()]);
            let pm = Model::from_blob(&pb).expect("prefix from_blob");
            let mut x = u.clone();
            let ld = forward(&pm, &mut x, &mut scratch).expect("prefix forward");
            worst = worst.max(close(
                &what(&format!("log-det after coupling {k}")),
                &[ld],
                &[cumulative],
                |_| LOGP_TOL,
            ));
        }

        // log p of the pixel image (midpoint dequantization) and bits/dim.
        let lp = log_prob(&model, &pixels, &mut scratch).expect("log_prob");
        let want_lp = fx.one(&format!("log_p_{tag}"));
        worst = worst.max(close(&what("log_p"), &[lp], &[want_lp], |_| LOGP_TOL));
        let bpd = bits_per_dim(arch, lp);
        let want_bpd = fx.one(&format!("bits_per_dim_{tag}"));
        worst = worst.max(close(&what("bits/dim"), &[bpd], &[want_bpd], |_| BPD_TOL));

        // Inverse: z_in -> u, then pixels.
        let mut x = z_in.clone();
        inverse(&model, &mut x, &mut scratch).expect("inverse");
        let want_u = fx.get(&format!("inverse_u_{tag}"));
        worst = worst.max(close(&what("inverse u"), &x, want_u, |_| U_TOL));
        let mut px = vec![0u8; d];
        quantize(&x, arch.bits, &mut px).expect("quantize");
        let want_px = fx.get(&format!("inverse_pixels_{tag}"));
        for (i, ((&got, &want), &wu)) in px.iter().zip(want_px).zip(want_u).enumerate() {
            let scaled = wu * f64::from(levels);
            let near_edge = (scaled - scaled.round()).abs() <= U_TOL * f64::from(levels);
            let diff = (f64::from(got) - want).abs();
            assert!(
                diff == 0.0 || (near_edge && diff <= 1.0),
                "{} pixel {i}: kernel {got} vs reference {want} (u*2^bits = {scaled})",
                what("inverse")
            );
        }
        eprintln!("{name} {tag}: largest error / tolerance = {worst:.3}");
    }
}

#[test]
fn model_a_squeeze_and_channel_masks_match_the_reference() {
    check_model(&MODEL_A, include_str!("fixtures/golden_a.txt"));
}

#[test]
fn model_b_checkerboard_masks_match_the_reference() {
    check_model(&MODEL_B, include_str!("fixtures/golden_b.txt"));
}
