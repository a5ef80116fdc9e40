//! Shared by the PyTorch golden tests (`tests/pytorch_golden.rs`, RealNVP, and
//! `tests/pytorch_golden_glow.rs`, Glow): the fixture reader, the collected checks, the
//! kernel and trainer checks with their tolerances (explained in `pytorch_golden.rs`), and
//! the closed-form weight hash of `tools/reference/make_fixtures.py`.

use clayflow_kernel::preprocess::quantize;
use clayflow_kernel::{scratch_len, Arch, Model};
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::config::tensor_specs;
use clayflow_trainer::model::Flow;
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;
use std::sync::Arc;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture file, read whole.
pub struct Fixture {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &'static str) -> Fixture {
        let path = root()
            .join("tests/fixtures")
            .join(format!("pytorch_{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; the fixtures are committed (regenerate with \
                 tools/reference/make_fixtures.py)",
                path.display()
            )
        });
        Fixture { name, bytes }
    }

    pub fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("fixture {}: {e}", self.name))
    }

    pub fn has(&self, key: &str) -> bool {
        self.st().tensor(key).is_ok()
    }

    /// Tensor `key` as f64 (from F64 or F32 storage).
    pub fn f64s(&self, key: &str) -> Vec<f64> {
        let st = self.st();
        let t = st
            .tensor(key)
            .unwrap_or_else(|e| panic!("fixture {}: tensor {key}: {e}", self.name));
        match t.dtype() {
            Dtype::F64 => t
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            d => panic!("fixture {}: tensor {key} is {d:?}, not a float", self.name),
        }
    }

    /// Tensor `key`, which must be stored as F32 (inputs: exact f32 values).
    pub fn f32s(&self, key: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "fixture {}: {key}", self.name);
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn u8s(&self, key: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::U8, "fixture {}: {key}", self.name);
        t.data().to_vec()
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "fixture {}: {key}", self.name);
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn meta(&self, key: &str) -> String {
        let (_, m) = SafeTensors::read_metadata(&self.bytes).unwrap();
        m.metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_else(|| panic!("fixture {}: no metadata {key}", self.name))
    }
}

/// Collects every comparison, prints them all, then fails on any over its bound (so one
/// run shows the whole picture).
#[derive(Default)]
pub struct Checks {
    pub rows: Vec<(String, f64, f64)>,
}

impl Checks {
    pub fn check(&mut self, what: impl Into<String>, err: f64, tol: f64) {
        self.rows.push((what.into(), err, tol));
    }

    pub fn finish(self, title: &str) {
        println!("--- {title}");
        let mut bad = Vec::new();
        for (what, err, tol) in &self.rows {
            let ok = err.is_finite() && err <= tol;
            println!(
                "{} {what}: {err:.3e} (bound {tol:.1e})",
                if ok { "ok  " } else { "FAIL" }
            );
            if !ok {
                bad.push(format!("{what}: {err:.3e} > {tol:.1e}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{title}: {} checks failed (all printed above), first: {}",
            bad.len(),
            bad[..bad.len().min(5)].join("; ")
        );
    }
}

pub fn max_abs(a: impl IntoIterator<Item = f64>, b: &[f64]) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The scale of log p's terms for image `i`: |log_det| + |z|^2 / 2 + D.
pub fn lp_scale(f: &Fixture, arch: &Arch, i: usize) -> f64 {
    let d = arch.dim();
    let z = f.f64s("z");
    let sq: f64 = z[i * d..(i + 1) * d].iter().map(|v| v * v).sum();
    f.f64s("log_det")[i].abs() + 0.5 * sq + d as f64
}

pub const LP_REL: f64 = 2e-6;
pub const Z_REL: f64 = 1e-4;
pub const U_ABS: f64 = 1e-4;
/// f32 rounding of the kernel's final bits/dim value (near 8).
pub const BPD_ROUND: f64 = 2e-6;

/// The bits/dim bound of image `i`: the log p bound in bits per dimension, plus rounding.
pub fn bpd_tol(f: &Fixture, arch: &Arch, i: usize) -> f64 {
    LP_REL * lp_scale(f, arch, i) / (arch.dim() as f64 * std::f64::consts::LN_2) + BPD_ROUND
}
/// Multiple of PyTorch's own f32 gradient error allowed per tensor, and for all values.
pub const GRAD_VS_TORCH: f64 = 4.0;
pub const GRAD_VS_TORCH_ALL: f64 = 3.0;
/// Relative (to the tensor's reference norm) and absolute (to the mean tensor norm)
/// allowances on top.
pub const GRAD_REL: f64 = 1e-4;
pub const GRAD_FLOOR: f64 = 1e-6;

/// Kernel checks: forward (z, log-det), log_prob_u, bits/dim, inverse and quantisation.
pub fn check_kernel(f: &Fixture, blob: &[u8], checks: &mut Checks) {
    let model = Model::from_blob(blob).unwrap();
    let arch = *model.arch();
    let d = arch.dim();
    let u = f.f32s("u");
    let batch = u.len() / d;
    let (z_ref, ld_ref, lp_ref, bpd_ref) = (
        f.f64s("z"),
        f.f64s("log_det"),
        f.f64s("log_prob"),
        f.f64s("bpd"),
    );
    let mut scratch = vec![0f32; scratch_len(&arch)];
    for i in 0..batch {
        let ui = &u[i * d..(i + 1) * d];
        let mut x = ui.to_vec();
        let ld = clayflow_kernel::forward(&model, &mut x, &mut scratch).unwrap();
        let zr = &z_ref[i * d..(i + 1) * d];
        let zmax = zr.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        checks.check(
            format!("kernel z[{i}] max|err| / (1 + max|z|)"),
            max_abs(x.iter().map(|&v| f64::from(v)), zr) / (1.0 + zmax),
            Z_REL,
        );
        let scale = lp_scale(f, &arch, i);
        checks.check(
            format!("kernel log_det[{i}] |err| / scale"),
            (f64::from(ld) - ld_ref[i]).abs() / scale,
            LP_REL,
        );
        let lp = clayflow_kernel::log_prob_u(&model, ui, &mut scratch).unwrap();
        checks.check(
            format!("kernel log_prob[{i}] |err| / scale"),
            (f64::from(lp) - lp_ref[i]).abs() / scale,
            LP_REL,
        );
        let bpd = clayflow_kernel::bits_per_dim(&arch, lp);
        checks.check(
            format!("kernel bpd[{i}] |err|"),
            (f64::from(bpd) - bpd_ref[i]).abs(),
            bpd_tol(f, &arch, i),
        );
    }
    let z_in = f.f32s("z_in");
    let su_ref = f.f64s("sample_u");
    let levels = f64::from(1u32 << arch.bits);
    for (k, (z, su)) in z_in.chunks(d).zip(su_ref.chunks(d)).enumerate() {
        let mut v = z.to_vec();
        clayflow_kernel::inverse(&model, &mut v, &mut scratch).unwrap();
        checks.check(
            format!("kernel inverse[{k}] max|u err|"),
            max_abs(v.iter().map(|&x| f64::from(x)), su),
            U_ABS,
        );
        let mut px = vec![0u8; d];
        quantize(&v, arch.bits, &mut px).unwrap();
        // Pixels differing although the reference is not within U_ABS of a level boundary.
        let wrong = px
            .iter()
            .zip(su)
            .filter(|&(&p, &r)| {
                let want = (r * levels).floor().clamp(0.0, levels - 1.0);
                let near = ((r * levels) - (r * levels).round()).abs() < U_ABS * levels;
                f64::from(p) != want && !near
            })
            .count();
        checks.check(
            format!("kernel sample[{k}] pixels off (away from level boundaries)"),
            wrong as f64,
            0.0,
        );
    }
}

/// Trainer checks: per-image log p, the loss, the gradients and the inverse.
pub fn check_trainer(f: &Fixture, arch: Arch, params: &[Vec<f32>], checks: &mut Checks) {
    let d = arch.dim();
    let u = f.f32s("u");
    let batch = u.len() / d;
    let mut flow = Flow::new(Arc::new(CpuBackend::default()), arch, params).unwrap();
    let stats = flow.forward(&u, batch).unwrap();
    let lp_ref = f.f64s("log_prob");
    for (i, (lp, r)) in stats.log_prob.iter().zip(&lp_ref).enumerate() {
        checks.check(
            format!("trainer log_prob[{i}] |err| / scale"),
            (lp - r).abs() / lp_scale(f, &arch, i),
            LP_REL,
        );
    }
    checks.check(
        "trainer loss (mean bpd) |err|",
        (stats.mean_bpd - f.f64s("loss")[0]).abs(),
        (0..batch).map(|i| bpd_tol(f, &arch, i)).sum::<f64>() / batch as f64,
    );

    let mut grads = flow.zeros_like_params().unwrap();
    flow.backward(&mut grads).unwrap();
    let grads: Vec<Vec<f64>> = grads
        .iter()
        .map(|g| {
            flow.backend()
                .download(g)
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect()
        })
        .collect();
    let specs = tensor_specs(&arch);
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let dist = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
    };
    let full_norms: Option<Vec<f64>> = f.has("grad_norm").then(|| f.f64s("grad_norm"));
    // The mean per-tensor gradient norm, for the additive floor.
    let mean_norm = match &full_norms {
        Some(n) => n.iter().sum::<f64>() / n.len() as f64,
        None => {
            specs
                .iter()
                .map(|s| norm(&f.f64s(&format!("grad.{}", s.name))))
                .sum::<f64>()
                / specs.len() as f64
        }
    };
    let torch_err = f.f64s("torch_f32_grad_err");
    let (mut e_all, mut n_all, mut t_all) = (0.0f64, 0.0f64, 0.0f64);
    let mut compared = 0usize;
    for (k, (spec, g)) in specs.iter().zip(&grads).enumerate() {
        let full = format!("grad.{}", spec.name);
        let sub = format!("grad_sub.{}", spec.name);
        let (ours, want): (Vec<f64>, Vec<f64>) = if f.has(&full) {
            (g.clone(), f.f64s(&full))
        } else {
            let stride: usize = f.meta("sub_stride").parse().unwrap();
            (g.iter().step_by(stride).copied().collect(), f.f64s(&sub))
        };
        assert_eq!(ours.len(), want.len(), "{}: gradient length", spec.name);
        compared += ours.len();
        let (e, n) = (dist(&ours, &want), norm(&want));
        e_all += e * e;
        n_all += n * n;
        t_all += torch_err[k] * torch_err[k];
        let bound =
            |n_ref: f64| GRAD_VS_TORCH * torch_err[k] + GRAD_REL * n_ref + GRAD_FLOOR * mean_norm;
        checks.check(
            format!(
                "trainer grad {} ({} values) ||err|| / bound (PyTorch f32: {:.2})",
                spec.name,
                ours.len(),
                torch_err[k] / bound(n)
            ),
            e / bound(n),
            1.0,
        );
        if let Some(norms) = &full_norms {
            // Norm and signed projection over *every* element of the tensor.
            let b = bound(norms[k]);
            checks.check(
                format!("trainer grad {} full norm |err| / bound", spec.name),
                (norm(g) - norms[k]).abs() / b,
                1.0,
            );
            let signs = hash_signs(k, g.len());
            let proj: f64 = g.iter().zip(&signs).map(|(a, s)| a * s).sum();
            checks.check(
                format!("trainer grad {} signed projection |err| / bound", spec.name),
                (proj - f.f64s("grad_proj")[k]).abs() / b,
                1.0,
            );
        }
    }
    checks.check(
        format!(
            "trainer grad, all {compared} compared values, ||err|| / ||g|| (PyTorch f32: {:.2e})",
            (t_all / n_all).sqrt()
        ),
        (e_all / n_all).sqrt(),
        GRAD_VS_TORCH_ALL * (t_all / n_all).sqrt() + GRAD_REL,
    );

    let z_in = f.f32s("z_in");
    let n = z_in.len() / d;
    let su = flow.inverse(&z_in, n).unwrap();
    checks.check(
        "trainer inverse max|u err|",
        max_abs(su.iter().map(|&x| f64::from(x)), &f.f64s("sample_u")),
        U_ABS,
    );
}

// ------------------------------------------------------------------ closed-form weights

/// splitmix64's output function of `x` plus the golden gamma (make_fixtures.py).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `r` in [0, 1) with 24 bits for element `i` of tensor `t`.
pub fn hash_uniform(t: usize, i: usize) -> f64 {
    (splitmix64(((t as u64) << 32) | i as u64) >> 40) as f64 / 16_777_216.0
}

/// The +-1 projection vector of tensor `t`.
pub fn hash_signs(t: usize, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            if splitmix64(((1000 + t as u64) << 32) | i as u64) & 1 == 0 {
                1.0
            } else {
                -1.0
            }
        })
        .collect()
}

pub fn read_blob(rel: &str, crc_meta: &str) -> Vec<u8> {
    let blob = std::fs::read(root().join(rel)).unwrap();
    let crc = u32::from_le_bytes(blob[blob.len() - 4..].try_into().unwrap());
    assert_eq!(
        format!("{crc:#010x}"),
        crc_meta,
        "{rel} is not the blob the fixture was made from; rerun \
         tools/reference/make_fixtures.py if it was replaced on purpose"
    );
    blob
}

/// The fixture's pixels are the digits of data/ it says, and `u` dequantises them.
pub fn check_inputs(f: &Fixture, pixels_ok: impl Fn(&[u8]) -> bool, arch: &Arch) {
    let px = f.u8s("pixels");
    assert!(
        pixels_ok(&px),
        "fixture {}: pixels are not from data/",
        f.name
    );
    let u = f.f32s("u");
    assert_eq!(u.len(), px.len());
    let levels = f32::from(1u16 << arch.bits);
    for (v, p) in u.iter().zip(&px) {
        // u = (x + v) / 2^bits with v in [0, 1).
        let x = v * levels - f32::from(*p);
        assert!(
            (0.0..=1.0).contains(&x),
            "u {v} does not dequantise pixel {p}"
        );
    }
}
