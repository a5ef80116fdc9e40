//! 2D convolution: stride 1, "same" zero padding, odd square kernels, bias, optional ReLU.
//!
//! Cross-correlation as in PyTorch's `Conv2d`: weights `[cout][cin][k][k]`, tensors
//! `[channels][height][width]`. Weights may be f32 or f16 (a [`Tensor`] view); accumulation
//! is always f32.

#![deny(clippy::indexing_slicing)]

use crate::error::{Buffer, Error};
use crate::weights::{DType, Tensor};

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

    /// The 1x1 ("pointwise") convolution, a matrix product over the flattened plane:
    /// `out[o][p] = bias[o] + sum_i w[o][i] * in[i][p]` (`cin >= 1`, sizes checked).
    ///
    /// A 1x1 kernel needs no padding, so there is no window: the input planes are read in
    /// place. Per block of [`OC`] output channels, the block's weights are widened once into
    /// a stack buffer laid out `[ic][oc]` (up to [`WB`] input channels at a time; more are
    /// taken in groups, the accumulators going through the output in between). Then the
    /// flattened plane is swept in blocks of [`PW_PIXELS`] (then 4, 2, 1) pixels with
    /// `OC x pixels` accumulators in registers over every input channel of the group: per
    /// input channel, `pixels` input loads and [`OC`] weight loads feed `OC x pixels`
    /// multiply-adds. The sum runs in the same order as on the other paths (bias, then input
    /// channel), so the result is bit-identical to [`Conv::forward_blocked`] and
    /// [`Conv::forward_direct`].
    ///
    /// Without a bias (`None`, the Glow step's invertible 1x1 convolution) the sums start
    /// from 0.
    pub(crate) fn forward_pointwise(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Option<Tensor<'_>>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let cin = self.cin;
        let plane = self.height * self.width;
        if self.kernel != 1 || cin == 0 {
            return Err(INTERNAL);
        }
        let mut wbuf = [[0f32; OC]; WB];
        for (ob, out_block) in out.chunks_mut(OC * plane).enumerate() {
            let oc0 = ob * OC;
            let ocn = out_block.len() / plane;
            let mut bbuf = [0f32; OC];
            if let Some(bias) = bias {
                for (j, b) in bbuf.iter_mut().enumerate().take(ocn) {
                    *b = bias
                        .slice(oc0 + j, 1)
                        .and_then(|t| t.iter().next())
                        .ok_or(INTERNAL)?;
                }
            }
            for ic0 in (0..cin).step_by(WB) {
                let g = WB.min(cin - ic0);
                let wk = wbuf.get_mut(..g).ok_or(INTERNAL)?;
                stage_pointwise(wk, weight, oc0, ocn, ic0, cin)?;
                let wk = wbuf.get(..g).ok_or(INTERNAL)?;
                let ins = input.get(ic0 * plane..(ic0 + g) * plane).ok_or(INTERNAL)?;
                let mode = match (ic0 == 0, relu && ic0 + g == cin) {
                    (true, true) => Mode::FirstRelu,
                    (true, false) => Mode::First,
                    (false, true) => Mode::LastRelu,
                    (false, false) => Mode::Middle,
                };
                let pw = Pointwise {
                    ins,
                    wk,
                    plane,
                    bias: &bbuf,
                    mode,
                };
                let mut p = 0;
                while p < plane {
                    let left = plane - p;
                    p += if left >= PW_PIXELS {
                        pw.block::<PW_PIXELS>(p, out_block)?
                    } else if left >= 4 {
                        pw.block::<4>(p, out_block)?
                    } else if left >= 2 {
                        pw.block::<2>(p, out_block)?
                    } else {
                        pw.block::<1>(p, out_block)?
                    };
                }
            }
        }
        Ok(())
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

    /// The register-blocked algorithm (kernel <= [`MAX_K`], `cin >= 1`).
    ///
    /// The output plane is cut into tiles whose zero-padded input window (tile plus `k - 1`
    /// rows and columns) fits a fixed stack buffer. Per tile and input channel the window is
    /// filled once; per block of [`OC`] output channels that channel's weights are widened to
    /// f32 once into a stack buffer laid out `[ky][kx][oc]`. Then each row of the tile is swept
    /// in blocks of 4, 2 or 1 pixels with `OC x pixels` accumulators held in registers over the
    /// block's taps. Taps that read only padding for every pixel of the block are skipped
    /// (kernel rows outside the image, and the kernel columns left of the first or right of
    /// the last pixel's image columns); the few padding taps left multiply real zeros from the
    /// window. Accumulators start from the bias at the first input channel, are written back
    /// after each one, and get the ReLU at the last.
    fn forward_blocked(
        &self,
        input: &[f32],
        weight: Tensor<'_>,
        bias: Tensor<'_>,
        relu: bool,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let (cin, h, w, k) = (self.cin, self.height, self.width, self.kernel);
        let plane = h * w;
        let kk = k * k;
        let p = k / 2;
        // Tile width: its window row (tile + k - 1) fits WIN_COLS; at least 18 since k <= 15.
        let tw_max = WIN_COLS.saturating_sub(k - 1).max(1);
        let mut window = [0f32; WIN_GROUP];
        let mut wbuf = [[0f32; OC]; WB];
        let mut bbuf = [0f32; OC];
        for tx0 in (0..w).step_by(tw_max) {
            let tw = (w - tx0).min(tw_max);
            let ws = tw + k - 1;
            // ws <= WIN_COLS, so WIN / ws >= 32 > k - 1: at least one row per tile.
            let th_max = (WIN / ws).saturating_sub(k - 1).max(1);
            for ty0 in (0..h).step_by(th_max) {
                let th = (h - ty0).min(th_max);
                // One input channel's window; a group of them side by side.
                let wlen = (th + k - 1) * ws;
                let group = (WIN_GROUP / wlen).min(WB / kk).min(cin).max(1);
                let wins = window.get_mut(..group * wlen).ok_or(INTERNAL)?;
                wins.fill(0.0);
                let region = Region::of(ws, w, h, tx0, ty0, th, p);
                let tile = Tile {
                    ws,
                    plane,
                    w,
                    h,
                    k,
                    tx0,
                    ty0,
                    tw,
                    th,
                };
                for ic0 in (0..cin).step_by(group) {
                    let g = group.min(cin - ic0);
                    let ins = input.get(ic0 * plane..).ok_or(INTERNAL)?;
                    let pairs = wins.chunks_exact_mut(wlen).zip(ins.chunks_exact(plane));
                    for (win, in_plane) in pairs.take(g) {
                        region.copy(in_plane, win)?;
                    }
                    let first = ic0 == 0;
                    let mode = match (first, relu && ic0 + g == cin) {
                        (true, true) => Mode::FirstRelu,
                        (true, false) => Mode::First,
                        (false, true) => Mode::LastRelu,
                        (false, false) => Mode::Middle,
                    };
                    for (ob, out_block) in out.chunks_mut(OC * plane).enumerate() {
                        let oc0 = ob * OC;
                        let ocn = out_block.len() / plane;
                        for (gi, wb) in wbuf.chunks_exact_mut(kk).take(g).enumerate() {
                            stage_weights(wb, weight, oc0, ocn, ic0 + gi, cin, kk)?;
                        }
                        if first {
                            for (j, b) in bbuf.iter_mut().enumerate() {
                                *b = if j < ocn {
                                    bias.slice(oc0 + j, 1)
                                        .and_then(|t| t.iter().next())
                                        .ok_or(INTERNAL)?
                                } else {
                                    0.0
                                };
                            }
                        }
                        let wk = wbuf.get(..g * kk).ok_or(INTERNAL)?;
                        let win = wins.get(..g * wlen).ok_or(INTERNAL)?;
                        tile.sweep(win, wlen, wk, &bbuf, mode, out_block)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Output channels computed together (one register block holds `OC x 4` accumulators).
const OC: usize = 4;
/// Pixels per register block of the 1x1 path: `OC x PW_PIXELS` accumulators, the pixels'
/// inputs and one weight fit the Cortex-M4F's 32 single-precision registers.
const PW_PIXELS: usize = 4;
/// Largest kernel the blocked path takes (the blob format's limit).
const MAX_K: usize = 15;
/// Capacity of one input channel's zero-padded window, in f32 (sets the tile size).
const WIN: usize = 1024;
/// Capacity of a group of windows, in f32 (16 KiB of stack): the accumulators stay in
/// registers over as many input channels as fit.
const WIN_GROUP: usize = 4 * 1024;
/// Capacity of the staged weights, in `[f32; OC]` entries (8 KiB of stack).
const WB: usize = 512;
/// Widest window row, in f32 (padding included).
const WIN_COLS: usize = 32;

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

/// One output tile and its window geometry.
struct Tile {
    /// Window row stride (`tw + k - 1`).
    ws: usize,
    /// Output plane size.
    plane: usize,
    /// Image width and height.
    w: usize,
    h: usize,
    /// Kernel size.
    k: usize,
    /// Tile origin and size in output pixels.
    tx0: usize,
    ty0: usize,
    tw: usize,
    th: usize,
}

impl Tile {
    /// One input channel's contribution to one block of output channels over the tile.
    fn sweep(
        &self,
        win: &[f32],
        wlen: usize,
        wk: &[[f32; OC]],
        bias: &[f32; OC],
        mode: Mode,
        out: &mut [f32],
    ) -> Result<(), Error> {
        let p = self.k / 2;
        for oy in 0..self.th {
            let y = self.ty0 + oy;
            // Kernel rows whose input row y + ky - p lies in [0, h).
            let ky_lo = p.saturating_sub(y);
            let ky_hi = (self.h + p - y).min(self.k);
            let rows = Rows {
                win,
                wlen,
                wk,
                kk: self.k * self.k,
                row_off: (oy + ky_lo) * self.ws,
                w_lo: ky_lo * self.k,
                w_hi: ky_hi * self.k,
            };
            let mut x0 = 0;
            while x0 < self.tw {
                let left = self.tw - x0;
                let at = y * self.w + self.tx0 + x0;
                let b = Block {
                    rows: &rows,
                    x0,
                    x: self.tx0 + x0,
                    at,
                };
                x0 += if left >= 4 {
                    self.block::<4>(&b, bias, mode, out)?
                } else if left == 3 {
                    self.block::<3>(&b, bias, mode, out)?
                } else if left >= 2 {
                    self.block::<2>(&b, bias, mode, out)?
                } else {
                    self.block::<1>(&b, bias, mode, out)?
                };
            }
        }
        Ok(())
    }

    /// The block of `N` pixels `b.x .. b.x + N` of one output row, for `OC` channels.
    /// Returns `N`.
    #[inline(always)]
    fn block<const N: usize>(
        &self,
        b: &Block<'_>,
        bias: &[f32; OC],
        mode: Mode,
        out: &mut [f32],
    ) -> Result<usize, Error> {
        let (k, p) = (self.k, self.k / 2);
        let mut acc = [[0f32; N]; OC];
        if matches!(mode, Mode::First | Mode::FirstRelu) {
            for (a, &bv) in acc.iter_mut().zip(bias) {
                *a = [bv; N];
            }
        } else {
            for (a, op) in acc.iter_mut().zip(out.chunks_exact(self.plane)) {
                *a = *op
                    .get(b.at..)
                    .and_then(|s| s.first_chunk::<N>())
                    .ok_or(INTERNAL)?;
            }
        }
        // Kernel columns for which at least one pixel of the block reads inside the image:
        // pixel x + i reads column x + i + kx - p.
        let kx_lo = p.saturating_sub(b.x + N - 1);
        let kx_hi = (self.w + p - b.x).min(k);
        let full = kx_lo == 0 && kx_hi == k;
        let nk = kx_hi.saturating_sub(kx_lo);
        let r = b.rows;
        let ws = self.ws;
        // Window column of the block's first tap.
        let col = b.x0 + kx_lo;
        // Kernel sizes known at compile time: one call runs every channel and kernel row of
        // the group with the accumulators in registers throughout.
        let acc = match (full, k, N) {
            (true, 3, 4) => channels_k::<N, 3, 6>(acc, r, col, ws)?,
            (true, 3, 3) => channels_k::<N, 3, 5>(acc, r, col, ws)?,
            (true, 3, 2) => channels_k::<N, 3, 4>(acc, r, col, ws)?,
            (true, 5, 4) => channels_k::<N, 5, 8>(acc, r, col, ws)?,
            (true, 7, 4) => channels_k::<N, 7, 10>(acc, r, col, ws)?,
            (true, 7, 2) => channels_k::<N, 7, 8>(acc, r, col, ws)?,
            _ => {
                // The group's input channels in order; per channel, kernel rows
                // ky_lo..ky_hi, window rows from ky_lo on, from the block's first tap column.
                for (wg, kg) in r.win.chunks_exact(r.wlen).zip(r.wk.chunks_exact(r.kk)) {
                    let rows = wg.get(r.row_off + col..).ok_or(INTERNAL)?;
                    let wrows = kg.get(r.w_lo..r.w_hi).ok_or(INTERNAL)?;
                    for (row, wrow) in rows.chunks(ws).zip(wrows.chunks_exact(k)) {
                        let wrow = wrow.get(kx_lo..kx_lo + nk).ok_or(INTERNAL)?;
                        taps::<N>(&mut acc, row, wrow)?;
                    }
                }
                acc
            }
        };
        self.finish(b, acc, mode, out)
    }

    /// Stores a block's accumulators (with the ReLU of the last group). Returns `N`.
    #[inline(always)]
    fn finish<const N: usize>(
        &self,
        b: &Block<'_>,
        acc: [[f32; N]; OC],
        mode: Mode,
        out: &mut [f32],
    ) -> Result<usize, Error> {
        for (a, op) in acc.iter().zip(out.chunks_exact_mut(self.plane)) {
            let seg = op
                .get_mut(b.at..)
                .and_then(|s| s.first_chunk_mut::<N>())
                .ok_or(INTERNAL)?;
            if matches!(mode, Mode::LastRelu | Mode::FirstRelu) {
                for (d, &v) in seg.iter_mut().zip(a) {
                    *d = relu_fn(v);
                }
            } else {
                *seg = *a;
            }
        }
        Ok(N)
    }
}

/// What one output row reads: a group of input channels' windows and staged weights.
struct Rows<'a> {
    /// The group's windows, `wlen` values each.
    win: &'a [f32],
    wlen: usize,
    /// The group's staged weights, `kk` entries (`[ky][kx]`) each.
    wk: &'a [[f32; OC]],
    kk: usize,
    /// Offset in a window of the first kernel row used (`ky_lo`), at column 0.
    row_off: usize,
    /// Staged-weight entries of the kernel rows used, `ky_lo * k .. ky_hi * k`.
    w_lo: usize,
    w_hi: usize,
}

/// Where a pixel block reads and writes.
struct Block<'a> {
    /// The row's inputs.
    rows: &'a Rows<'a>,
    /// First pixel's column in the tile (= its first window column for kx = 0).
    x0: usize,
    /// First pixel's column in the image.
    x: usize,
    /// First pixel's index in an output plane.
    at: usize,
}

/// `acc[j][i] += w[kx][j] * row[kx + i]` for each `kx` of `wk`, in order: one kernel row's
/// taps for `OC` channels and `N` pixels (`row` starts at the first tap's window column).
#[inline(always)]
fn taps<const N: usize>(
    acc: &mut [[f32; N]; OC],
    row: &[f32],
    wk: &[[f32; OC]],
) -> Result<(), Error> {
    for (wv, xs) in wk.iter().zip(row.windows(N)) {
        let xs = xs.first_chunk::<N>().ok_or(INTERNAL)?;
        for (a, &wj) in acc.iter_mut().zip(wv) {
            for (a, &x) in a.iter_mut().zip(xs) {
                *a += wj * x;
            }
        }
    }
    if row.len() + 1 < N + wk.len() {
        return Err(INTERNAL);
    }
    Ok(())
}

/// [`taps_k`] over every input channel of the group and its kernel rows `ky_lo..ky_hi`
/// (window rows `ws` apart, `K` weights per row), from window column `col`: the whole
/// contribution of a group to one block, with the accumulators in registers throughout (not
/// inlined, so they get the register file). Returns the accumulators.
#[inline(never)]
fn channels_k<const N: usize, const K: usize, const M: usize>(
    acc: [[f32; N]; OC],
    r: &Rows<'_>,
    col: usize,
    ws: usize,
) -> Result<[[f32; N]; OC], Error> {
    let mut a = acc;
    for (wg, kg) in r.win.chunks_exact(r.wlen).zip(r.wk.chunks_exact(r.kk)) {
        let rows = wg.get(r.row_off + col..).ok_or(INTERNAL)?;
        let wrows = kg.get(r.w_lo..r.w_hi).ok_or(INTERNAL)?;
        for (row, wrow) in rows.chunks(ws).zip(wrows.chunks_exact(K)) {
            taps_k::<N, K, M>(&mut a, row, wrow)?;
        }
    }
    Ok(a)
}

/// [`taps`] for a whole kernel row of a kernel size known at compile time: the compiler
/// unrolls it and loads each window value once for all the taps that use it.
#[inline(always)]
fn taps_k<const N: usize, const K: usize, const M: usize>(
    acc: &mut [[f32; N]; OC],
    row: &[f32],
    wk: &[[f32; OC]],
) -> Result<(), Error> {
    // M = N + K - 1 window values (stable Rust cannot compute it from N and K).
    let wk = wk.first_chunk::<K>().ok_or(INTERNAL)?;
    let row = row.first_chunk::<M>().ok_or(INTERNAL)?;
    for (kx, wv) in wk.iter().enumerate() {
        let xs = row
            .get(kx..)
            .and_then(|s| s.first_chunk::<N>())
            .ok_or(INTERNAL)?;
        for (a, &wj) in acc.iter_mut().zip(wv) {
            for (a, &x) in a.iter_mut().zip(xs) {
                *a += wj * x;
            }
        }
    }
    Ok(())
}

/// One input-channel group of a 1x1 convolution for one block of [`OC`] output channels.
struct Pointwise<'a> {
    /// The group's input planes, `plane` values each.
    ins: &'a [f32],
    /// The group's staged weights, `[ic][oc]`.
    wk: &'a [[f32; OC]],
    plane: usize,
    /// The block's biases (used by the first group).
    bias: &'a [f32; OC],
    mode: Mode,
}

impl Pointwise<'_> {
    /// Pixels `p .. p + N` of the block's output planes (`out`, `plane` values each), over
    /// the group's input channels. Returns `N`.
    #[inline(always)]
    fn block<const N: usize>(&self, p: usize, out: &mut [f32]) -> Result<usize, Error> {
        let mut acc = [[0f32; N]; OC];
        if matches!(self.mode, Mode::First | Mode::FirstRelu) {
            for (a, &bv) in acc.iter_mut().zip(self.bias) {
                *a = [bv; N];
            }
        } else {
            for (a, op) in acc.iter_mut().zip(out.chunks_exact(self.plane)) {
                *a = *op
                    .get(p..)
                    .and_then(|s| s.first_chunk::<N>())
                    .ok_or(INTERNAL)?;
            }
        }
        // Input channel i's pixels p.. start at i * plane + p: chunks of `plane` from p (the
        // last one is shorter by p, still at least N long).
        let from = self.ins.get(p..).ok_or(INTERNAL)?;
        pointwise_taps::<N>(&mut acc, from, self.plane, self.wk)?;
        for (a, op) in acc.iter().zip(out.chunks_exact_mut(self.plane)) {
            let seg = op
                .get_mut(p..)
                .and_then(|s| s.first_chunk_mut::<N>())
                .ok_or(INTERNAL)?;
            if matches!(self.mode, Mode::LastRelu | Mode::FirstRelu) {
                for (d, &v) in seg.iter_mut().zip(a) {
                    *d = relu_fn(v);
                }
            } else {
                *seg = *a;
            }
        }
        Ok(N)
    }
}

/// `acc[j][i] += wk[ic][j] * x[ic][i]` over the input channels in order, `x[ic]` being the
/// first `N` values of the `ic`-th chunk of `from` (chunks `plane` apart). Not inlined, so
/// the accumulators get the whole register file.
#[inline(never)]
fn pointwise_taps<const N: usize>(
    acc: &mut [[f32; N]; OC],
    from: &[f32],
    plane: usize,
    wk: &[[f32; OC]],
) -> Result<(), Error> {
    #[inline(always)]
    fn tap<const N: usize>(a: &mut [[f32; N]; OC], xs: &[f32; N], wv: &[f32; OC]) {
        for (a, &wj) in a.iter_mut().zip(wv) {
            for (a, &x) in a.iter_mut().zip(xs) {
                *a += wj * x;
            }
        }
    }
    let mut a = *acc;
    // Whole `plane`-long chunks (every channel but the last when p > 0): their length is
    // loop-invariant, so the per-channel length check leaves the loop.
    let mut chunks = from.chunks_exact(plane);
    let mut used = 0;
    for (xs, wv) in (&mut chunks).zip(wk) {
        tap(&mut a, xs.first_chunk::<N>().ok_or(INTERNAL)?, wv);
        used += 1;
    }
    // The last channel's shorter chunk (`plane - p` values), if any.
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let wv = wk.get(used).ok_or(INTERNAL)?;
        tap(&mut a, rest.first_chunk::<N>().ok_or(INTERNAL)?, wv);
    }
    *acc = a;
    Ok(())
}

/// Widens the 1x1 weights `w[oc0 + j][ic0 + i]` (`j < ocn`, `i < wk.len()`) into
/// `wk[i][j]`, zeros for the lanes `j >= ocn` of a partial block. Row `oc0 + j` of the
/// weight matrix is contiguous in the blob, so each is one slice.
fn stage_pointwise(
    wk: &mut [[f32; OC]],
    weight: Tensor<'_>,
    oc0: usize,
    ocn: usize,
    ic0: usize,
    cin: usize,
) -> Result<(), Error> {
    for j in 0..OC {
        if j < ocn {
            let row = weight
                .slice((oc0 + j) * cin + ic0, wk.len())
                .ok_or(INTERNAL)?;
            for (slot, v) in wk.iter_mut().zip(row.iter()) {
                if let Some(s) = slot.get_mut(j) {
                    *s = v;
                }
            }
        } else {
            for slot in wk.iter_mut() {
                if let Some(s) = slot.get_mut(j) {
                    *s = 0.0;
                }
            }
        }
    }
    Ok(())
}

/// Widens the weights `w[oc0 + j][ic][..][..]` (`j < ocn`) into `wbuf[ky * k + kx][j]`,
/// zeros for the lanes `j >= ocn` of a partial block.
fn stage_weights(
    wbuf: &mut [[f32; OC]],
    weight: Tensor<'_>,
    oc0: usize,
    ocn: usize,
    ic: usize,
    cin: usize,
    kk: usize,
) -> Result<(), Error> {
    let wb = wbuf.get_mut(..kk).ok_or(INTERNAL)?;
    for j in 0..OC {
        if j < ocn {
            let t = weight
                .slice(((oc0 + j) * cin + ic) * kk, kk)
                .ok_or(INTERNAL)?;
            match t.raw() {
                (DType::F16, bytes) => {
                    for (slot, b) in wb.iter_mut().zip(bytes.chunks_exact(2)) {
                        let h = b.first_chunk::<2>().map_or(0, |b| u16::from_le_bytes(*b));
                        if let Some(s) = slot.get_mut(j) {
                            *s = f16_to_f32(h);
                        }
                    }
                }
                (DType::F32, bytes) => {
                    for (slot, b) in wb.iter_mut().zip(bytes.chunks_exact(4)) {
                        let v = b.first_chunk::<4>().map_or(0.0, |b| f32::from_le_bytes(*b));
                        if let Some(s) = slot.get_mut(j) {
                            *s = v;
                        }
                    }
                }
            }
        } else {
            for slot in wb.iter_mut() {
                if let Some(s) = slot.get_mut(j) {
                    *s = 0.0;
                }
            }
        }
    }
    Ok(())
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

/// Where a tile's window overlaps the image: window row `r`, column `c` hold input pixel
/// `(ty0 + r - p, tx0 + c - p)`; everything else in the window stays 0 (the padding).
#[derive(Clone, Copy)]
struct Region {
    /// Window row stride.
    ws: usize,
    /// Image width.
    w: usize,
    /// First window row inside the image, and the input row it holds.
    r_lo: usize,
    iy_lo: usize,
    /// Rows inside the image.
    rows: usize,
    /// First window column inside the image, and the input column it holds.
    c_lo: usize,
    ix_lo: usize,
    /// Columns inside the image.
    cols: usize,
}

impl Region {
    fn of(ws: usize, w: usize, h: usize, tx0: usize, ty0: usize, th: usize, p: usize) -> Region {
        let wr = th + 2 * p;
        let r_lo = p.saturating_sub(ty0);
        let iy_lo = ty0 + r_lo - p;
        let iy_hi = (ty0 + wr - p).min(h);
        let c_lo = p.saturating_sub(tx0);
        let ix_lo = tx0 + c_lo - p;
        let ix_hi = (tx0 + ws - p).min(w);
        Region {
            ws,
            w,
            r_lo,
            iy_lo,
            rows: iy_hi.saturating_sub(iy_lo),
            c_lo,
            ix_lo,
            cols: ix_hi.saturating_sub(ix_lo),
        }
    }

    /// Copies the overlapping part of `in_plane` into `win`.
    fn copy(&self, in_plane: &[f32], win: &mut [f32]) -> Result<(), Error> {
        let Region {
            ws,
            w,
            r_lo,
            iy_lo,
            rows,
            c_lo,
            ix_lo,
            cols,
        } = *self;
        if cols == 0 || ws == 0 || w == 0 {
            return Ok(());
        }
        let dst = win.get_mut(r_lo * ws..).ok_or(INTERNAL)?;
        let src = in_plane.get(iy_lo * w..).ok_or(INTERNAL)?;
        for (d, s) in dst.chunks_mut(ws).zip(src.chunks(w)).take(rows) {
            let s = s.get(ix_lo..ix_lo + cols).ok_or(INTERNAL)?;
            let d = d.get_mut(c_lo..c_lo + cols).ok_or(INTERNAL)?;
            for (d, &s) in d.iter_mut().zip(s) {
                *d = s;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index their own fixtures
mod tests {
    use super::*;

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
