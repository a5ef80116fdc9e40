//! Export: checkpoint -> kernel weight blob, verified against the trainer before it is
//! written; and loading any model source (run folder, checkpoint, or blob) for eval/sample.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint};
use crate::config::tensor_specs;
use crate::data::Dataset;
use crate::eval::{eval_u, kernel_bpd_of};
use crate::fsutil;
use crate::model::{bpd, Flow};
use anyhow::{bail, Context, Result};
use clayflow_kernel::{
    blob_len, weights::round_to_f16, write_blob, Arch, DType, Model, Normal, Pcg32,
};
use std::path::Path;
use std::sync::Arc;

/// Agreement between the kernel (reading the blob) and the trainer on a check batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Agreement {
    /// Images scored.
    pub images: usize,
    /// Largest |bits/dim difference| between kernel and trainer.
    pub max_bpd_diff: f64,
    /// Largest |u difference| of samples drawn from the same latents.
    pub max_sample_diff: f32,
    /// Sample pixels that differ (quantisation boundary cases).
    pub pixels_differing: usize,
    /// Mean bits/dim of the check batch according to the kernel.
    pub kernel_bpd: f64,
}

/// Largest bits/dim disagreement accepted (f32 math in two summation orders agrees to
/// ~1e-5 bits/dim; a misplaced tensor is off by whole bits).
pub const MAX_BPD_DIFF: f64 = 1e-3;
/// Largest sample disagreement accepted, in `u` units (one pixel level is 1/256).
pub const MAX_SAMPLE_DIFF: f32 = 1e-3;

/// Encodes `ckpt` as a blob of `dtype`. A Glow model's 1x1 convolutions are stored as `W`,
/// `W^-1` and `log|det W|`, composed and inverted here in f64 from the checkpoint's LU
/// factors, so the device never inverts a matrix.
pub fn encode(ckpt: &Checkpoint, dtype: DType) -> Result<(Arch, Vec<u8>)> {
    let arch = ckpt.model.to_arch()?;
    let params = if arch.glow {
        Flow::new(Arc::new(CpuBackend::default()), arch, &ckpt.params)?.blob_params()?
    } else {
        ckpt.flat_params()
    };
    let mut blob = vec![0u8; blob_len(&arch, dtype)];
    write_blob(&arch, dtype, &params, &mut blob)
        .map_err(|e| anyhow::anyhow!("cannot encode the weights: {e}"))?;
    Ok((arch, blob))
}

/// Checks that the kernel reading `blob` and the trainer holding `params` (rounded to f16
/// when the blob is f16) agree on log-densities of `check` images and on samples.
pub fn verify(
    backend: Arc<dyn Backend>,
    blob: &[u8],
    params: &[Vec<f32>],
    check: &Dataset,
    n: usize,
) -> Result<Agreement> {
    let model =
        Model::from_blob(blob).map_err(|e| anyhow::anyhow!("the blob does not parse: {e}"))?;
    let arch = *model.arch();
    let mut p = params.to_vec();
    if model.dtype() == DType::F16 {
        // An f16 blob stores the coupling tensors in f16; a Glow step's ActNorm and 1x1
        // convolution stay f32.
        for (t, spec) in p.iter_mut().zip(tensor_specs(&arch)) {
            if spec.name.starts_with("coupling.") {
                round_to_f16(t);
            }
        }
    }
    let mut flow = Flow::new(backend, arch, &p)?;
    let n = n.min(check.len()).max(1);
    let d = arch.dim();
    let mut u = vec![0.0f32; n * d];
    for i in 0..n {
        eval_u(check, i, arch.bits, &mut u[i * d..(i + 1) * d])?;
    }
    let stats = flow.forward(&u, n)?;
    let kernel: Vec<f64> = kernel_bpd_of(&model, &u)?;
    let mut max_bpd_diff = 0.0f64;
    for (k, t) in kernel.iter().zip(&stats.log_prob) {
        max_bpd_diff = max_bpd_diff.max((k - bpd(&arch, *t)).abs());
    }
    // Samples from the same latents: the trainer's batched inverse against the kernel's.
    let s = n.min(16);
    let seed = 0xc0ffee;
    let mut z = vec![0.0f32; s * d];
    for (i, zi) in z.chunks_mut(d).enumerate() {
        Normal::new(Pcg32::with_stream(seed, i as u64))
            .fill(zi, 0.8)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let u_trainer = flow.inverse(&z, s)?;
    let mut scratch = vec![0.0f32; clayflow_kernel::scratch_len(&arch)];
    let mut max_sample_diff = 0.0f32;
    let mut pixels_differing = 0;
    let (mut pk, mut pt) = (vec![0u8; d], vec![0u8; d]);
    for (zi, ut) in z.chunks_mut(d).zip(u_trainer.chunks(d)) {
        clayflow_kernel::inverse(&model, zi, &mut scratch).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (a, b) in zi.iter().zip(ut) {
            max_sample_diff = max_sample_diff.max((a - b).abs());
        }
        let q = |u: &[f32], out: &mut [u8]| {
            clayflow_kernel::preprocess::quantize(u, arch.bits, out)
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        q(zi, &mut pk)?;
        q(ut, &mut pt)?;
        pixels_differing += pk.iter().zip(&pt).filter(|(a, b)| a != b).count();
    }
    Ok(Agreement {
        images: n,
        max_bpd_diff,
        max_sample_diff,
        pixels_differing,
        kernel_bpd: kernel.iter().sum::<f64>() / n as f64,
    })
}

/// Exports the checkpoint at `from` (a run folder: its latest checkpoint; or a checkpoint
/// folder) to `out` as `dtype`, after verifying kernel/trainer agreement on `check`.
/// Refuses to write a blob that disagrees. [`export_checkpoint`] exports a checkpoint
/// already loaded (`clayflow export` loads a run's best).
pub fn export(
    backend: Arc<dyn Backend>,
    from: &Path,
    out: &Path,
    dtype: DType,
    check: &Dataset,
) -> Result<Agreement> {
    let (ckpt, dir) = checkpoint::load(from)?;
    export_checkpoint(backend, &ckpt, &dir, out, dtype, check)
}

/// [`export`] of `ckpt`, loaded from the folder `dir` (named in errors).
pub fn export_checkpoint(
    backend: Arc<dyn Backend>,
    ckpt: &Checkpoint,
    dir: &Path,
    out: &Path,
    dtype: DType,
    check: &Dataset,
) -> Result<Agreement> {
    let (_, blob) = encode(ckpt, dtype)?;
    let agreement = verify(backend, &blob, &ckpt.params, check, 64)
        .with_context(|| format!("verifying the export of {}", dir.display()))?;
    if !(agreement.max_bpd_diff <= MAX_BPD_DIFF && agreement.max_sample_diff <= MAX_SAMPLE_DIFF) {
        bail!(
            "refusing to write {}: kernel and trainer disagree (bits/dim by {:.3e}, limit {MAX_BPD_DIFF:e}; samples by {:.3e}, limit {MAX_SAMPLE_DIFF:e})",
            out.display(),
            agreement.max_bpd_diff,
            agreement.max_sample_diff
        );
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    fsutil::atomic_write(out, &blob).with_context(|| format!("writing {}", out.display()))?;
    Ok(agreement)
}
