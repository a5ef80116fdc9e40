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

/// Samples drawn from a model: the quantised pixels and which images came out non-finite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Samples {
    /// `n` images of `arch.dim()` pixels each.
    pub pixels: Vec<u8>,
    /// Indices of the images with at least one non-finite value before quantisation. Their
    /// NaN values are drawn black (level 0), +inf white and -inf black
    /// ([`quantize_one`](clayflow_kernel::preprocess::quantize_one)).
    pub nonfinite: Vec<usize>,
}

impl Samples {
    /// The line telling the user about non-finite samples (`None` when every sample is
    /// finite), e.g. `3 of 64 samples had non-finite pixels (...): images 4, 9, 17`.
    pub fn nonfinite_note(&self, n: usize) -> Option<String> {
        if self.nonfinite.is_empty() {
            return None;
        }
        let shown: Vec<String> = self
            .nonfinite
            .iter()
            .take(20)
            .map(|i| i.to_string())
            .collect();
        let more = if self.nonfinite.len() > shown.len() {
            ", ..."
        } else {
            ""
        };
        Some(format!(
            "{} of {n} samples had non-finite pixels (the inverse overflowed; NaN drawn black, \
             +inf white, -inf black): images {}{more}",
            self.nonfinite.len(),
            shown.join(", ")
        ))
    }
}

/// Indices of the images in `values` (consecutive images of `dim` values each) that hold at
/// least one non-finite value. A trailing partial image counts as an image.
pub fn nonfinite_images(values: &[f32], dim: usize) -> Vec<usize> {
    values
        .chunks(dim.max(1))
        .enumerate()
        .filter(|(_, img)| img.iter().any(|v| !v.is_finite()))
        .map(|(i, _)| i)
        .collect()
}

/// Draws `n` samples from `flow` at `temperature` (latents from the kernel's generator
/// seeded with `seed`, one stream per image) and returns the quantised pixels.
pub fn sample_pixels(flow: &mut Flow, n: usize, temperature: f32, seed: u64) -> Result<Vec<u8>> {
    Ok(sample_images(flow, n, temperature, seed)?.pixels)
}

/// [`sample_pixels`], also telling which images came out non-finite.
pub fn sample_images(flow: &mut Flow, n: usize, temperature: f32, seed: u64) -> Result<Samples> {
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
    Ok(Samples {
        pixels,
        nonfinite: nonfinite_images(&u, d),
    })
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
    /// `n` samples at `temperature`, image `i` from latent stream `(seed, i)`: the same
    /// images from a checkpoint and from its blob.
    pub fn sample(
        &self,
        backend: Arc<dyn Backend>,
        n: usize,
        temperature: f32,
        seed: u64,
    ) -> Result<Samples> {
        match self {
            Source::Checkpoint(c) => {
                let mut flow = Flow::new(backend, c.model.to_arch()?, &c.params)?;
                sample_images(&mut flow, n, temperature, seed)
            }
            Source::Blob(b) => {
                let model = Model::from_blob(b).map_err(|e| anyhow::anyhow!("{e}"))?;
                let arch = *model.arch();
                let d = arch.dim();
                let mut pixels = vec![0u8; n * d];
                let mut finite = vec![true; n];
                pixels
                    .par_chunks_mut(d)
                    .zip(finite.par_iter_mut())
                    .enumerate()
                    .try_for_each_init(
                        || {
                            (
                                vec![0.0f32; clayflow_kernel::scratch_len(&arch)],
                                vec![0.0f32; d],
                            )
                        },
                        |(scratch, values), (i, (px, ok))| {
                            clayflow_kernel::sample_with(
                                &model,
                                Pcg32::with_stream(seed, i as u64),
                                temperature,
                                scratch,
                                px,
                                values,
                            )
                            .map_err(|e| anyhow::anyhow!("kernel sampling: {e}"))?;
                            *ok = nonfinite_images(values, d).is_empty();
                            Ok::<(), anyhow::Error>(())
                        },
                    )?;
                let nonfinite = (0..n).filter(|&i| !finite[i]).collect();
                Ok(Samples { pixels, nonfinite })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_images_names_each_image_with_a_bad_value() {
        let d = 4;
        let mut v = vec![0.5f32; 5 * d];
        assert!(nonfinite_images(&v, d).is_empty());
        v[d + 3] = f32::NAN; // image 1, last value
        v[3 * d] = f32::INFINITY; // image 3, first value
        v[3 * d + 1] = f32::NEG_INFINITY; // image 3 again: counted once
        v[4 * d + 2] = f32::NEG_INFINITY; // image 4
        assert_eq!(nonfinite_images(&v, d), vec![1, 3, 4]);
        // Huge but finite values are not flagged.
        assert!(nonfinite_images(&[f32::MAX, -f32::MAX, 0.0], 3).is_empty());
        // A zero dimension never panics.
        assert_eq!(nonfinite_images(&[f32::NAN], 0), vec![0]);
    }

    #[test]
    fn the_note_counts_and_names_the_bad_images() {
        let ok = Samples {
            pixels: vec![0; 8],
            nonfinite: vec![],
        };
        assert_eq!(ok.nonfinite_note(8), None);
        let bad = Samples {
            pixels: vec![0; 64],
            nonfinite: vec![2, 5, 40],
        };
        let note = bad.nonfinite_note(64).unwrap();
        assert!(
            note.starts_with("3 of 64 samples had non-finite pixels"),
            "{note}"
        );
        assert!(note.ends_with("images 2, 5, 40"), "{note}");
        let many = Samples {
            pixels: vec![],
            nonfinite: (0..30).collect(),
        };
        assert!(many.nonfinite_note(30).unwrap().ends_with("19, ..."));
    }
}
