//! Compile-time-sized buffers for one model: what a firmware declares as a `static`.
//!
//! ```
//! use clayflow_kernel::{image_len, scratch_len, Buffers, MNIST};
//! static mut BUFFERS: Buffers<{ scratch_len(&MNIST) }, { image_len(&MNIST) }> = Buffers::new();
//! ```

use crate::error::{Buffer, Error};
use crate::flow::{log_prob, sample};
use crate::weights::Model;

/// Scratch plus one image (pixels and values) for a model whose `scratch_len` is at most
/// `S` and whose image has exactly `D` pixels.
#[derive(Debug)]
pub struct Buffers<const S: usize, const D: usize> {
    /// Work memory for the flow.
    pub scratch: [f32; S],
    /// The last sampled image, quantised.
    pub pixels: [u8; D],
    /// The last sampled image, dequantized values in `[0, 1]`.
    pub values: [f32; D],
}

impl<const S: usize, const D: usize> Default for Buffers<S, D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const S: usize, const D: usize> Buffers<S, D> {
    /// Zeroed buffers (usable in a `static` initialiser).
    pub const fn new() -> Self {
        Buffers {
            scratch: [0.0; S],
            pixels: [0; D],
            values: [0.0; D],
        }
    }

    fn check(model: &Model<'_>) -> Result<(), Error> {
        let arch = model.arch();
        if arch.dim() != D {
            return Err(Error::BufferSize {
                buffer: Buffer::Output,
                needed: arch.dim(),
                got: D,
            });
        }
        Ok(())
    }

    /// Samples one image into `pixels` and `values` (see [`crate::sample`]).
    pub fn sample(
        &mut self,
        model: &Model<'_>,
        seed: u64,
        temperature: f32,
    ) -> Result<(&[u8; D], &[f32; D]), Error> {
        Self::check(model)?;
        sample(
            model,
            seed,
            temperature,
            &mut self.scratch,
            &mut self.pixels,
            &mut self.values,
        )?;
        Ok((&self.pixels, &self.values))
    }

    /// `log p(u)` in nats of `pixels` (see [`crate::log_prob`]).
    pub fn log_prob(&mut self, model: &Model<'_>, pixels: &[u8; D]) -> Result<f32, Error> {
        Self::check(model)?;
        log_prob(model, pixels, &mut self.scratch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{image_len, scratch_len};
    use crate::testutil::{blob, random_params, MNIST_OR_MINI as MNIST};
    use crate::weights::DType;

    #[test]
    fn fixed_buffers_sample_like_slices() {
        let b = blob(&MNIST, DType::F16, &random_params(&MNIST, 2, 1.0));
        let model = Model::from_blob(&b).unwrap();
        let mut bufs: std::boxed::Box<Buffers<{ scratch_len(&MNIST) }, { image_len(&MNIST) }>> =
            std::boxed::Box::default();
        let (px, vals) = bufs.sample(&model, 9, 0.7).unwrap();
        let (px, vals) = (*px, *vals);
        let mut scratch = std::vec![0.0; scratch_len(&MNIST)];
        let (mut p2, mut v2) = ([0u8; image_len(&MNIST)], [0f32; image_len(&MNIST)]);
        sample(&model, 9, 0.7, &mut scratch, &mut p2, &mut v2).unwrap();
        assert_eq!(px, p2);
        assert_eq!(vals.map(f32::to_bits), v2.map(f32::to_bits));
        let lp = bufs.log_prob(&model, &px).unwrap();
        assert_eq!(
            lp.to_bits(),
            log_prob(&model, &px, &mut scratch).unwrap().to_bits()
        );
        // A model of another image size is refused.
        let mut small: Buffers<{ scratch_len(&MNIST) }, { image_len(&MNIST) + 1 }> = Buffers::new();
        assert!(small.sample(&model, 1, 1.0).is_err());
    }
}
