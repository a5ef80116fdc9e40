//! 2D convolution: stride 1, "same" zero padding, odd square kernels, bias, optional ReLU.
//!
//! Cross-correlation as in PyTorch's `Conv2d`: weights `[cout][cin][k][k]`, tensors
//! `[channels][height][width]`. Weights may be f32 or f16 (a [`Tensor`] view); accumulation
//! is always f32.

#![deny(clippy::indexing_slicing)]

mod blocked;
mod pointwise;

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

/// The convolution path this build runs: `"avx512"`, `"avx2"`, `"neon"` (chosen by the
/// target features the crate is compiled with; see the `simd` module) or `"scalar"`.
#[cfg(clayflow_simd)]
pub const PATH: &str = crate::simd::PATH;
/// The convolution path this build runs: `"avx512"`, `"avx2"`, `"neon"` (chosen by the
/// target features the crate is compiled with) or `"scalar"`.
#[cfg(not(clayflow_simd))]
pub const PATH: &str = "scalar";

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
    /// Every output is `bias`, then plus `weight * input` tap by tap in the order input
    /// channel, kernel row, kernel column. On the scalar path ([`PATH`] `"scalar"`, the
    /// default) each product is rounded to f32 and added (no fused multiply-add), so the
    /// result is the same on every IEEE f32 target. Builds with AVX-512, AVX2 + FMA or NEON
    /// enabled run the `simd` module instead (same order, fused multiply-adds; within f32
    /// rounding of the scalar result, see its docs) for every shape it takes. Kernels up to
    /// 15x15 (all the blob format allows) take the register-blocked path; larger ones the
    /// direct one. The two agree exactly (the blocked path adds `w * 0.0` for padding
    /// columns the direct one skips, which changes no value; with finite weights).
    pub fn forward(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Tensor<'_>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
        self.check(input.len(), weight.len(), bias.len(), out.len())?;
        if self.height == 0 || self.width == 0 || self.cout == 0 {
            return Ok(());
        }
        #[cfg(clayflow_simd)]
        if self.kernel <= MAX_K && crate::simd::takes(self) && !crate::simd::force_scalar() {
            return crate::simd::forward(self, input, weight, bias, relu, out);
        }
        self.forward_scalar(input, weight, bias, relu, out)
    }

    /// `out = W input` for a 1x1 convolution without bias or activation (`weight` is the
    /// `cout x cin` matrix): the Glow step's invertible 1x1 convolution, `W` forward and
    /// `W^-1` inverse. The same paths as [`Conv::forward`]'s 1x1 case, sums from 0.
    pub(crate) fn forward_unbiased(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        out: &mut [f32],
    ) -> Result<(), Error> {
        if self.kernel != 1 {
            return Err(Error::InvalidArgument(
                "an unbiased convolution must be 1x1",
            ));
        }
        self.check(input.len(), weight.len(), self.cout, out.len())?;
        if self.height == 0 || self.width == 0 || self.cout == 0 {
            return Ok(());
        }
        if self.cin == 0 {
            out.fill(0.0);
            return Ok(());
        }
        #[cfg(clayflow_simd)]
        if !crate::simd::force_scalar() {
            return crate::simd::pointwise(self, input, weight, None, false, out);
        }
        self.forward_pointwise(input, weight, None, false, out)
    }

    /// The scalar paths (blocked, or direct for kernels over [`MAX_K`]); what
    /// [`Conv::forward`] runs when no SIMD path is compiled in or the shape is too large for
    /// it. Sizes already checked. Not inlined into `forward` in SIMD builds, so its 24 KiB of
    /// stack buffers and the SIMD path's 96 KiB are never in one frame.
    #[cfg_attr(clayflow_simd, inline(never))]
    pub(crate) fn forward_scalar(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Tensor<'_>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
        if self.cin == 0 || self.kernel > MAX_K {
            self.forward_direct(input, weight, bias, relu, out)
        } else if self.kernel == 1 {
            self.forward_pointwise(input, weight, Some(bias), relu, out)
        } else {
            self.forward_blocked(input, weight, bias, relu, out)
        }
    }

    /// The direct algorithm: for each weight tap, one multiply-add over the row segment of
    /// output pixels whose input pixel lies inside the image (so padding costs nothing).
    /// Simple but slow (every multiply-add loads and stores its output); used for kernels
    /// the blocked path does not take, and as its reference in tests.
    fn forward_direct(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Tensor<'_>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
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
                    *v = relu_fn(*v);
                }
            }
        }
        Ok(())
    }
}

/// Output channels computed together (one register block holds `OC x 4` accumulators).
const OC: usize = 4;
/// Largest kernel the blocked path takes (the blob format's limit).
const MAX_K: usize = 15;
/// Capacity of the staged weights, in `[f32; OC]` entries (8 KiB of stack).
const WB: usize = 512;
/// `max(v, 0)`, with `+0.0` for every `v <= 0` and for NaN (the same bits on every target).
#[inline(always)]
fn relu_fn(v: f32) -> f32 {
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// How a block's accumulators start and end for the current input channel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// First input channel: start from the bias.
    First,
    /// First and last (one input channel) with ReLU.
    FirstRelu,
    /// Start from and store to the output.
    Middle,
    /// Last input channel with ReLU: store `relu(acc)`.
    LastRelu,
}

/// Widens IEEE binary16 bits to f32, exactly (the same value `half` gives, bit for bit).
///
/// Normal numbers in integer arithmetic: the 10 mantissa bits move up 13 places and the
/// exponent is rebiased by 127 - 15 = 112. Zeros, subnormals, infinities and NaN (exponent
/// field 0 or 31, rare in weights) take `half`'s general conversion.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let exp = h & 0x7c00;
    if exp != 0 && exp != 0x7c00 {
        let h = u32::from(h);
        f32::from_bits(((h & 0x8000) << 16) | (((h & 0x7fff) << 13) + (112 << 23)))
    } else {
        half::f16::from_bits(h).to_f32()
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index their own fixtures
mod tests {
    use super::*;
    use crate::weights::DType;
    use clayflow_testkit::conv::{conv2d_forward_ref, ConvShape};

    /// The test kit's f64 convolution, rounded to f32.
    fn reference(c: &Conv, input: &[f32], w: &[f32], b: &[f32], relu: bool) -> std::vec::Vec<f32> {
        let s = ConvShape {
            batch: 1,
            cin: c.cin,
            cout: c.cout,
            height: c.height,
            width: c.width,
            kernel: c.kernel,
        };
        let y = conv2d_forward_ref(&s, input, w, b, relu);
        y.iter().map(|&v| v as f32).collect()
    }

    fn tensor(values: &[f32], buf: &mut std::vec::Vec<u8>) {
        buf.clear();
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
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
            (2, 3, 4, 19, 17),
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

    fn tensor_f16(values: &[f32], buf: &mut std::vec::Vec<u8>) {
        buf.clear();
        for v in values {
            buf.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
        }
    }

    /// The blocked path equals the direct one exactly (the same products added in the same
    /// order), across partial channel and pixel blocks, several tiles in both directions,
    /// rows and columns of padding, every kernel size the format allows, f32 and f16.
    #[test]
    fn blocked_equals_direct() {
        let mut seed = 7u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let shapes: &[(usize, usize, usize, usize, usize)] = &[
            (1, 1, 1, 1, 1),
            (2, 5, 3, 7, 3),
            (2, 4, 9, 8, 9),
            (3, 9, 14, 14, 7),
            (2, 3, 40, 37, 5),
            (1, 2, 20, 33, 15),
            (4, 6, 5, 50, 1),
            (1, 1, 16, 16, 13),
            (3, 4, 2, 70, 11),
            (2, 8, 14, 14, 5),
            (8, 4, 14, 14, 3),
        ];
        // Under Miri the first three (partial blocks, every tile edge case at small size).
        let shapes = if cfg!(miri) { &shapes[..3] } else { shapes };
        for &(cin, cout, h, w, k) in shapes {
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
            for dtype in [DType::F32, DType::F16] {
                if dtype == DType::F32 {
                    tensor(&wt, &mut wb);
                    tensor(&b, &mut bb);
                } else {
                    tensor_f16(&wt, &mut wb);
                    tensor_f16(&b, &mut bb);
                }
                let (wten, bten) = (Tensor::new(dtype, &wb), Tensor::new(dtype, &bb));
                for relu in [false, true] {
                    let mut fast = std::vec![f32::NAN; cout * h * w];
                    let mut slow = std::vec![f32::NAN; cout * h * w];
                    c.forward_blocked(&x, wten, bten, relu, &mut fast).unwrap();
                    c.forward_direct(&x, wten, bten, relu, &mut slow).unwrap();
                    for (i, (a, e)) in fast.iter().zip(&slow).enumerate() {
                        assert!(
                            a == e,
                            "{c:?} {dtype:?} relu {relu}: output {i}: {a} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// The 1x1 path equals the direct one exactly (bias, then input channels in order, no
    /// fused multiply-add), over partial channel and pixel blocks, planes of every remainder
    /// modulo the pixel block, more input channels than one staged group ([`WB`]), the Glow
    /// presets' shapes, f32 and f16; and without a bias it equals the direct path with a
    /// zero bias.
    #[test]
    fn pointwise_equals_direct() {
        let mut seed = 5u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let shapes: &[(usize, usize, usize, usize)] = &[
            (1, 1, 1, 1),
            (3, 5, 1, 7),
            (2, 6, 3, 3),
            (4, 4, 14, 14),
            (8, 8, 7, 7),
            (64, 64, 14, 14),
            (64, 64, 7, 7),
            (WB + 37, 6, 2, 5),
            (224, 224, 4, 4),
        ];
        let shapes = if cfg!(miri) { &shapes[..3] } else { shapes };
        for &(cin, cout, h, w) in shapes {
            let c = Conv {
                cin,
                cout,
                height: h,
                width: w,
                kernel: 1,
            };
            let x: std::vec::Vec<f32> = (0..cin * h * w).map(|_| rnd()).collect();
            let wt: std::vec::Vec<f32> = (0..cout * cin).map(|_| rnd()).collect();
            let b: std::vec::Vec<f32> = (0..cout).map(|_| rnd()).collect();
            let zero = std::vec![0f32; cout];
            let (mut wb, mut bb, mut zb) = (
                std::vec::Vec::new(),
                std::vec::Vec::new(),
                std::vec::Vec::new(),
            );
            for dtype in [DType::F32, DType::F16] {
                if dtype == DType::F32 {
                    tensor(&wt, &mut wb);
                    tensor(&b, &mut bb);
                    tensor(&zero, &mut zb);
                } else {
                    tensor_f16(&wt, &mut wb);
                    tensor_f16(&b, &mut bb);
                    tensor_f16(&zero, &mut zb);
                }
                let (wten, bten) = (Tensor::new(dtype, &wb), Tensor::new(dtype, &bb));
                let same = |a: &[f32], e: &[f32], what: &str| {
                    for (i, (a, e)) in a.iter().zip(e).enumerate() {
                        assert!(
                            a.to_bits() == e.to_bits(),
                            "{c:?} {dtype:?} {what}: output {i}: {a} vs {e}"
                        );
                    }
                };
                for relu in [false, true] {
                    let mut fast = std::vec![f32::NAN; cout * h * w];
                    let mut slow = std::vec![f32::NAN; cout * h * w];
                    c.forward_pointwise(&x, wten, Some(bten), relu, &mut fast)
                        .unwrap();
                    c.forward_direct(&x, wten, bten, relu, &mut slow).unwrap();
                    same(&fast, &slow, if relu { "relu" } else { "biased" });
                }
                let mut fast = std::vec![f32::NAN; cout * h * w];
                let mut slow = std::vec![f32::NAN; cout * h * w];
                c.forward_pointwise(&x, wten, None, false, &mut fast)
                    .unwrap();
                c.forward_direct(&x, wten, Tensor::new(dtype, &zb), false, &mut slow)
                    .unwrap();
                same(&fast, &slow, "unbiased");
                // The public entry points: within f32 rounding of it on any path (SIMD
                // builds fuse the multiply-adds).
                let mut any = std::vec![f32::NAN; cout * h * w];
                c.forward_unbiased(&x, wten, &mut any).unwrap();
                for (a, e) in any.iter().zip(&slow) {
                    assert!((a - e).abs() <= 1e-5 * (cin as f32), "{a} vs {e}");
                }
            }
        }
        // Sizes are checked, and only 1x1 kernels have no bias.
        let c = Conv {
            cin: 2,
            cout: 3,
            height: 2,
            width: 2,
            kernel: 1,
        };
        let (x, wb, mut out) = ([0f32; 8], [0u8; 24], [0f32; 12]);
        let w = Tensor::new(DType::F32, &wb);
        assert!(c.forward_unbiased(&x[..7], w, &mut out).is_err());
        assert!(c.forward_unbiased(&x, w, &mut out[..11]).is_err());
        assert!(Conv { kernel: 3, ..c }
            .forward_unbiased(&x, w, &mut out)
            .is_err());
        assert!(c.forward_unbiased(&x, w, &mut out).is_ok());
    }

    /// The integer fast path of the f16 widening agrees with `half` on all 65,536 bit
    /// patterns (NaN with NaN).
    #[test]
    fn f16_widening_matches_half_exhaustively() {
        // Under Miri every 7th pattern (all exponents, signs and subnormal/NaN ranges).
        let step = if cfg!(miri) { 7 } else { 1 };
        for h in (0..=u16::MAX).step_by(step) {
            let (a, e) = (f16_to_f32(h), half::f16::from_bits(h).to_f32());
            assert!(
                a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan()),
                "{h:#06x}: {a} vs {e}"
            );
        }
    }

    /// `tools/simd-test.sh` sets `CLAYFLOW_EXPECT_PATH` to the path its target flags must
    /// select, so a flag that silently fails to enable a path fails here instead of testing
    /// the scalar path twice. (Unset in a plain `cargo test`: nothing to compare.)
    #[test]
    fn compiled_path_is_the_expected_one() {
        if let Ok(want) = std::env::var("CLAYFLOW_EXPECT_PATH") {
            assert_eq!(
                PATH, want,
                "the kernel was built with another convolution path"
            );
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
