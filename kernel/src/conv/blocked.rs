//! The blocked path of 3x3 to 15x15 convolutions: output tiles over zero-padded input
//! windows, `OC x pixels` accumulators in registers over every tap of a group of input
//! channels (see [`Conv::forward_blocked`]).

use super::{f16_to_f32, relu_fn, Conv, Mode, INTERNAL, OC, WB};
use crate::error::Error;
use crate::weights::{DType, Tensor};

/// Capacity of one input channel's zero-padded window, in f32 (sets the tile size).
const WIN: usize = 1024;
/// Capacity of a group of windows, in f32 (16 KiB of stack): the accumulators stay in
/// registers over as many input channels as fit.
const WIN_GROUP: usize = 4 * 1024;
/// Widest window row, in f32 (padding included).
const WIN_COLS: usize = 32;

impl Conv {
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
    pub(super) fn forward_blocked(
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
