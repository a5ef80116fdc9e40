//! 2D convolution: stride 1, "same" zero padding, odd square kernels, bias, optional ReLU.
//!
//! Cross-correlation as in PyTorch's `Conv2d`: weights `[cout][cin][k][k]`, tensors
//! `[channels][height][width]`. Weights may be f32 or f16 (a [`Tensor`] view); accumulation
//! is always f32.

use crate::error::{Buffer, Error};
use crate::weights::Tensor;

/// Shape of one convolution (a single image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Height of input and output.
    pub height: usize,
    /// Width of input and output.
    pub width: usize,
    /// Kernel size (odd).
    pub kernel: usize,
}

pub(crate) const INTERNAL: Error = Error::InvalidArgument("internal size invariant broken");

fn size(buffer: Buffer, needed: usize, got: usize) -> Result<(), Error> {
    if needed == got {
        Ok(())
    } else {
        Err(Error::BufferSize {
            buffer,
            needed,
            got,
        })
    }
}

impl Conv {
    /// Checks the buffer lengths against the shape; every later index is then in range.
    fn check(&self, input: usize, weight: usize, bias: usize, out: usize) -> Result<(), Error> {
        if self.kernel.is_multiple_of(2) {
            return Err(Error::InvalidArgument(
                "convolution kernel size must be odd",
            ));
        }
        let plane = self
            .height
            .checked_mul(self.width)
            .ok_or(Error::InvalidArgument("convolution shape overflows"))?;
        let need = |a: usize, b: usize| {
            a.checked_mul(b)
                .ok_or(Error::InvalidArgument("convolution shape overflows"))
        };
        size(Buffer::Input, need(self.cin, plane)?, input)?;
        size(Buffer::Output, need(self.cout, plane)?, out)?;
        let wlen = need(need(self.cout, self.cin)?, need(self.kernel, self.kernel)?)?;
        size(Buffer::Weights, wlen, weight)?;
        size(Buffer::Weights, self.cout, bias)
    }

    /// `out = conv(input, weight) + bias`, then ReLU when `relu`.
    ///
    /// The direct algorithm: for each weight tap, one multiply-add over the row segment of
    /// output pixels whose input pixel lies inside the image (so padding costs nothing).
    pub fn forward(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Tensor<'_>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
        self.check(input.len(), weight.len(), bias.len(), out.len())?;
        let (h, w, k) = (self.height, self.width, self.kernel);
        let plane = h * w;
        if plane == 0 {
            return Ok(());
        }
        let p = k / 2;
        let mut taps = weight.iter();
        for (out_plane, b) in out.chunks_exact_mut(plane).zip(bias.iter()) {
            out_plane.fill(b);
            for in_plane in input.chunks_exact(plane) {
                for ky in 0..k {
                    // Output rows whose input row oy + ky - p lies in [0, h).
                    let oy_lo = p.saturating_sub(ky);
                    let oy_hi = (h + p).saturating_sub(ky).min(h);
                    for kx in 0..k {
                        let wv = taps.next().ok_or(INTERNAL)?;
                        let ox_lo = p.saturating_sub(kx);
                        let ox_hi = (w + p).saturating_sub(kx).min(w);
                        if ox_lo >= ox_hi {
                            continue;
                        }
                        let n = ox_hi - ox_lo;
                        for oy in oy_lo..oy_hi {
                            let iy = oy + ky - p;
                            let ix = ox_lo + kx - p;
                            let orow = out_plane
                                .get_mut(oy * w + ox_lo..oy * w + ox_lo + n)
                                .ok_or(INTERNAL)?;
                            let irow =
                                in_plane.get(iy * w + ix..iy * w + ix + n).ok_or(INTERNAL)?;
                            for (o, &i) in orow.iter_mut().zip(irow) {
                                *o += wv * i;
                            }
                        }
                    }
                }
            }
            if relu {
                for v in out_plane.iter_mut() {
                    *v = v.max(0.0);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::DType;

    fn tensor(values: &[f32], buf: &mut std::vec::Vec<u8>) {
        buf.clear();
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Naive f64 reference: out[o][y][x] = b[o] + sum w[o][i][ky][kx] * in[i][y+ky-p][x+kx-p].
    fn reference(c: &Conv, input: &[f32], w: &[f32], b: &[f32], relu: bool) -> std::vec::Vec<f32> {
        let (h, wd, k) = (c.height as isize, c.width as isize, c.kernel as isize);
        let p = k / 2;
        let mut out = std::vec![0f32; c.cout * c.height * c.width];
        for o in 0..c.cout {
            for y in 0..h {
                for x in 0..wd {
                    let mut acc = b[o] as f64;
                    for i in 0..c.cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (y + ky - p, x + kx - p);
                                if iy < 0 || ix < 0 || iy >= h || ix >= wd {
                                    continue;
                                }
                                let wi = ((o * c.cin + i) as isize * k + ky) * k + kx;
                                let xi = (i as isize * h + iy) * wd + ix;
                                acc += w[wi as usize] as f64 * input[xi as usize] as f64;
                            }
                        }
                    }
                    let v = if relu { acc.max(0.0) } else { acc };
                    out[(o * c.height + y as usize) * c.width + x as usize] = v as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_naive_reference_for_each_kernel_size() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(cin, cout, h, w, k) in &[
            (1, 1, 1, 1, 3),
            (2, 3, 5, 4, 3),
            (3, 2, 6, 7, 5),
            (2, 4, 9, 8, 7),
            (1, 2, 3, 2, 7),
            (4, 3, 4, 4, 1),
        ] {
            let c = Conv {
                cin,
                cout,
                height: h,
                width: w,
                kernel: k,
            };
            let x: std::vec::Vec<f32> = (0..cin * h * w).map(|_| rnd()).collect();
            let wt: std::vec::Vec<f32> = (0..cout * cin * k * k).map(|_| rnd()).collect();
            let b: std::vec::Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let (mut wb, mut bb) = (std::vec::Vec::new(), std::vec::Vec::new());
            tensor(&wt, &mut wb);
            tensor(&b, &mut bb);
            for relu in [false, true] {
                let mut out = std::vec![0f32; cout * h * w];
                c.forward(
                    &x,
                    Tensor::new(DType::F32, &wb),
                    Tensor::new(DType::F32, &bb),
                    relu,
                    &mut out,
                )
                .unwrap();
                let r = reference(&c, &x, &wt, &b, relu);
                for (a, e) in out.iter().zip(&r) {
                    // |terms| <= 0.25 each, at most cin*k*k + 1 of them: f32 rounding error is
                    // far below 1e-5 for these sizes.
                    assert!((a - e).abs() < 1e-5, "{a} vs {e} (k={k})");
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors_not_panics() {
        let c = Conv {
            cin: 2,
            cout: 3,
            height: 4,
            width: 4,
            kernel: 3,
        };
        let x = [0f32; 32];
        let wb = [0u8; 2 * 3 * 9 * 4];
        let bb = [0u8; 12];
        let mut out = [0f32; 48];
        let w = Tensor::new(DType::F32, &wb);
        let b = Tensor::new(DType::F32, &bb);
        assert!(c.forward(&x[..31], w, b, false, &mut out).is_err());
        assert!(c.forward(&x, w, b, false, &mut out[..47]).is_err());
        assert!(c
            .forward(&x, Tensor::new(DType::F32, &wb[..8]), b, false, &mut out)
            .is_err());
        assert!(c
            .forward(&x, w, Tensor::new(DType::F16, &bb), false, &mut out)
            .is_err());
        let even = Conv { kernel: 2, ..c };
        assert!(even.forward(&x, w, b, false, &mut out).is_err());
        assert!(c.forward(&x, w, b, false, &mut out).is_ok());
    }
}
