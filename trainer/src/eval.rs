//! Scoring: bits/dim of a model on a data set with the fixed evaluation noise, for a flow on
//! any backend (validation during training, `clayflow eval` of a run or checkpoint) and for a
//! kernel blob (`clayflow eval` of an exported model, and the export's agreement check).

use crate::backend::Backend;
use crate::data::Dataset;
use crate::model::{bpd, Flow};
use crate::source::Source;
use anyhow::{bail, Context, Result};
use clayflow_kernel::{preprocess::dequantize, Model, Pcg32, Rng};
use rayon::prelude::*;
use std::sync::Arc;

/// Seed of the fixed dequantization noise used for every validation / evaluation score, so
/// scores are comparable across runs, checkpoints, and the kernel.
pub const EVAL_NOISE_SEED: u64 = 0x5eed_e7a1;

/// Uniform in `[0, 1)` with 24 bits.
pub(crate) fn uniform01(rng: &mut Pcg32) -> f32 {
    (rng.next_u32() >> 8) as f32 / 16_777_216.0
}

/// The fixed evaluation noise of image `i` (see [`EVAL_NOISE_SEED`]).
pub fn eval_noise(i: usize) -> Pcg32 {
    Pcg32::with_stream(EVAL_NOISE_SEED, i as u64)
}

/// Dequantizes image `i` with its fixed evaluation noise.
pub fn eval_u(ds: &Dataset, i: usize, bits: u32, out: &mut [f32]) -> Result<()> {
    let img = ds.get(i).context("image index out of range")?;
    let mut rng = eval_noise(i);
    dequantize(img, bits, |_| uniform01(&mut rng), out)
        .map_err(|e| anyhow::anyhow!("image {i}: {e}"))
}

/// Mean bits/dim of `flow` on `ds` with the fixed evaluation noise, in batches of `batch`
/// (the last batch padded by repeating images; padding is not scored).
pub fn evaluate(flow: &mut Flow, ds: &Dataset, batch: usize) -> Result<f64> {
    if ds.is_empty() {
        bail!("cannot evaluate on an empty data set");
    }
    Ok(evaluate_sum(flow, ds, 0..ds.len(), batch)? / ds.len() as f64)
}

/// The sum of the bits/dim of images `range` of `ds` (their fixed evaluation noise, as
/// [`evaluate`]): data-parallel validation scores one slice per rank and adds the sums.
pub fn evaluate_sum(
    flow: &mut Flow,
    ds: &Dataset,
    range: std::ops::Range<usize>,
    batch: usize,
) -> Result<f64> {
    let d = ds.image_len();
    let arch = *flow.arch();
    if range.end > ds.len() || batch == 0 {
        bail!(
            "cannot evaluate images {range:?} of {} in batches of {batch}",
            ds.len()
        );
    }
    let mut total = 0.0;
    let mut u = vec![0.0f32; batch * d];
    let mut start = range.start;
    while start < range.end {
        let n = batch.min(range.end - start);
        for k in 0..batch {
            let i = start + k.min(n - 1);
            eval_u(ds, i, arch.bits, &mut u[k * d..(k + 1) * d])?;
        }
        let stats = flow.forward(&u, batch)?;
        total += stats.log_prob[..n]
            .iter()
            .map(|lp| bpd(&arch, *lp))
            .sum::<f64>();
        start += n;
    }
    Ok(total)
}

/// Per-image bits/dim of dequantized images `u` (concatenated) through the kernel, in
/// parallel (one scratch buffer per worker).
pub fn kernel_bpd_of(model: &Model<'_>, u: &[f32]) -> Result<Vec<f64>> {
    let arch = *model.arch();
    let d = arch.dim();
    u.par_chunks(d)
        .map_init(
            || vec![0.0f32; clayflow_kernel::scratch_len(&arch)],
            |scratch, img| {
                let lp = clayflow_kernel::log_prob_u(model, img, scratch)
                    .map_err(|e| anyhow::anyhow!("kernel: {e}"))?;
                Ok(f64::from(clayflow_kernel::bits_per_dim(&arch, lp)))
            },
        )
        .collect()
}

impl Source {
    /// Mean bits/dim over `ds` with the fixed evaluation noise.
    pub fn evaluate(&self, backend: Arc<dyn Backend>, ds: &Dataset, batch: usize) -> Result<f64> {
        match self {
            Source::Checkpoint(c) => {
                let mut flow = Flow::new(backend, c.model.to_arch()?, &c.params)?;
                evaluate(&mut flow, ds, batch)
            }
            Source::Blob(b) => {
                let model = Model::from_blob(b).map_err(|e| anyhow::anyhow!("{e}"))?;
                let arch = *model.arch();
                let d = arch.dim();
                let mut total = 0.0;
                let mut u = vec![0.0f32; batch * d];
                let mut start = 0;
                while start < ds.len() {
                    let n = batch.min(ds.len() - start);
                    for k in 0..n {
                        eval_u(ds, start + k, arch.bits, &mut u[k * d..(k + 1) * d])?;
                    }
                    total += kernel_bpd_of(&model, &u[..n * d])?.iter().sum::<f64>();
                    start += n;
                }
                Ok(total / ds.len().max(1) as f64)
            }
        }
    }
}
