//! Sampling, one place for every source: a flow on any backend (the run's sample grids,
//! `clayflow sample` of a run or checkpoint) and a kernel blob (`clayflow sample` of an
//! exported model). Image `i` always takes its latents from stream `(seed, i)` of the
//! kernel's generator, so a checkpoint and its blob draw the same images.

use crate::backend::Backend;
use crate::model::Flow;
use crate::report;
use crate::source::Source;
use anyhow::Result;
use clayflow_kernel::{Arch, Model, Pcg32};
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// Draws `n` samples from `flow` at `temperature` (latents from the kernel's generator
/// seeded with `seed`, one stream per image) and returns the quantised pixels.
pub fn sample_pixels(flow: &mut Flow, n: usize, temperature: f32, seed: u64) -> Result<Vec<u8>> {
    let arch = *flow.arch();
    let d = arch.dim();
    let mut z = vec![0.0f32; n * d];
    for (i, chunk) in z.chunks_mut(d).enumerate() {
        let mut normal = clayflow_kernel::Normal::new(Pcg32::with_stream(seed, i as u64));
        normal
            .fill(chunk, temperature)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let u = flow.inverse(&z, n)?;
    let mut pixels = vec![0u8; u.len()];
    clayflow_kernel::preprocess::quantize(&u, arch.bits, &mut pixels)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(pixels)
}

/// Writes `n` samples of `arch` as a square-ish PNG grid (2-pixel gaps; images of 32 pixels
/// or less shown 3x), the layout of a run's `samples.png` and of `clayflow sample`.
pub fn write_grid(path: &Path, pixels: &[u8], n: usize, arch: &Arch) -> Result<()> {
    let cols = (n as f64).sqrt().ceil() as usize;
    let upscale = if arch.height <= 32 { 3 } else { 1 };
    report::write_png_grid(
        path,
        pixels,
        n,
        arch.channels,
        arch.height,
        arch.width,
        cols,
        2,
        upscale,
    )?;
    Ok(())
}

impl Source {
    /// `n` samples (quantised pixels) at `temperature`, image `i` from latent stream
    /// `(seed, i)`: the same images from a checkpoint and from its blob.
    pub fn sample(
        &self,
        backend: Arc<dyn Backend>,
        n: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<Vec<u8>> {
        match self {
            Source::Checkpoint(c) => {
                let mut flow = Flow::new(backend, c.model.to_arch()?, &c.params)?;
                sample_pixels(&mut flow, n, temperature, seed)
            }
            Source::Blob(b) => {
                let model = Model::from_blob(b).map_err(|e| anyhow::anyhow!("{e}"))?;
                let arch = *model.arch();
                let d = arch.dim();
                let mut pixels = vec![0u8; n * d];
                pixels.par_chunks_mut(d).enumerate().try_for_each_init(
                    || {
                        (
                            vec![0.0f32; clayflow_kernel::scratch_len(&arch)],
                            vec![0.0f32; d],
                        )
                    },
                    |(scratch, values), (i, px)| {
                        clayflow_kernel::sample_with(
                            &model,
                            Pcg32::with_stream(seed, i as u64),
                            temperature,
                            scratch,
                            px,
                            values,
                        )
                        .map_err(|e| anyhow::anyhow!("kernel sampling: {e}"))
                    },
                )?;
                Ok(pixels)
            }
        }
    }
}
