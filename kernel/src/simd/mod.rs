//! Compile-time SIMD paths of the convolution (AVX-512, AVX2 + FMA, NEON).
//!
//! Which path is built is decided by the target flags the user compiles with, never at run
//! time (the kernel is `no_std`): `-C target-feature=+avx512f` (or a `-C target-cpu` that has
//! it) selects [`avx512`], `+avx2,+fma` selects [`avx2`], little-endian aarch64 with NEON
//! (the default there) selects [`neon`]; everything else keeps the scalar register-blocked
//! code of [`crate::conv`], which the Cortex-M firmware and its pinned checksum use.
//!
//! # Algorithm
//!
//! One vector holds `LANES` consecutive output pixels of one row (a 14-pixel MNIST row is one
//! AVX-512 vector with two idle lanes, two AVX2 vectors, four NEON vectors). For a block of
//! `R` output rows, one column chunk and `C` output channels, `R x C` accumulator vectors
//! stay in registers over every tap of every input channel of a group: per tap
//! `(ic, ky, kx)` it loads the `R` input row vectors (unaligned, from a zero-padded copy of
//! the input, the "window") and broadcasts `C` weights, then does `R x C` fused
//! multiply-adds. The window makes padding taps multiply real zeros, so there are no edge
//! cases inside the loop; lanes past the row's end compute values that are never stored.
//! f32 weights are broadcast straight from the blob; f16 weights are widened once per call
//! (per input-channel group and output-channel block) into a stack buffer.
//!
//! # Difference from the scalar path
//!
//! Every output is still `bias + sum of w * x` over the taps in the order input channel,
//! kernel row, kernel column, but each step is one fused multiply-add (one rounding) instead
//! of a rounded product and a rounded sum, and padding taps add `w * 0`. Both results are
//! within the classic bound `gamma_n * (|b| + sum |w x|)` of the exact sum (`n = cin k^2 + 1`
//! terms, `gamma_n = n u / (1 - n u)`, `u = 2^-24`), so they differ by at most twice that;
//! in practice (sums of mixed-sign terms) by a few ulps of the largest partial sum. The tests
//! in this module check the bound against an f64 reference; `tests` compares with the scalar
//! path.
//!
//! # Stack
//!
//! The window ([`WIN`] f32 = 64 KiB) and the widened f16 weights ([`STAGE`] f32 = 32 KiB)
//! live on the stack of [`forward`] (not inlined, nor is the scalar path in these builds, so
//! the two paths' buffers never share a frame): 96 KiB against the scalar path's 24 KiB. A
//! whole sample fits a 128 KiB thread stack (`tests/stack.rs`), far below a host thread's
//! 2 MiB; these paths are for hosts and application processors, not the Cortex-M firmware,
//! which builds the scalar path.

use crate::conv::{Conv, INTERNAL};
use crate::error::Error;
use crate::weights::{DType, Tensor};
use core::mem::MaybeUninit;

#[cfg(clayflow_simd = "avx512")]
pub mod avx512;
#[cfg(clayflow_simd = "avx512")]
use avx512::V;

#[cfg(clayflow_simd = "avx2")]
pub mod avx2;
#[cfg(clayflow_simd = "avx2")]
use avx2::V;

#[cfg(clayflow_simd = "neon")]
pub mod neon;
#[cfg(clayflow_simd = "neon")]
use neon::V;

/// Name of the active path, for benches and reports: `"avx512"`, `"avx2"` or `"neon"`.
pub const PATH: &str = V::NAME;

/// Capacity of a group of input-channel windows, in f32 (64 KiB of stack).
pub(crate) const WIN: usize = 16 * 1024;
/// Capacity of the widened f16 weights of one group and channel block, in f32 (32 KiB).
pub(crate) const STAGE: usize = 8 * 1024;
/// Output channels per register block.
const C: usize = 4;

/// One SIMD vector of f32 lanes: the few operations the convolution needs.
///
/// # Safety
///
/// Implementations may only be built when the target features they use are enabled at
/// compile time (the `cfg`s above); the pointer functions read or write exactly the lanes
/// their documentation names.
pub(crate) trait Simd: Copy {
    /// Path name.
    const NAME: &'static str;
    /// f32 lanes per vector.
    const LANES: usize;
    /// Most output rows per register block (`ROWS x C` accumulators must fit the registers).
    const ROWS: usize;
    /// All lanes `v`.
    fn splat(v: f32) -> Self;
    /// Lanes `p[0..LANES]`.
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load(p: *const f32) -> Self;
    /// Lanes `p[0..n]`, the rest zero; reads only `p[0..n]`.
    ///
    /// # Safety
    /// `1 <= n <= LANES` and `p .. p + n` readable.
    unsafe fn load_n(p: *const f32, n: usize) -> Self;
    /// Writes all lanes to `p[0..LANES]`.
    ///
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store(self, p: *mut f32);
    /// Writes lanes `0..n` to `p[0..n]` and nothing else.
    ///
    /// # Safety
    /// `1 <= n <= LANES` and `p .. p + n` writable.
    unsafe fn store_n(self, p: *mut f32, n: usize);
    /// `self + a * b`, fused (one rounding).
    fn fma(self, a: Self, b: Self) -> Self;
    /// `max(self, 0)` with `+0.0` for `-0.0` and NaN lanes (the scalar path's ReLU).
    fn relu(self) -> Self;
    /// Widens the little-endian f16 values in `src` (pairs of bytes) into `dst`, writing
    /// every element of `dst` when `src` holds `2 * dst.len()` bytes.
    fn widen_f16(src: &[u8], dst: &mut [MaybeUninit<f32>]) {
        for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
            let h = b.first_chunk::<2>().map_or(0, |b| u16::from_le_bytes(*b));
            *d = MaybeUninit::new(crate::conv::f16_to_f32(h));
        }
    }
}

#[cfg(test)]
std::thread_local! {
    /// Tests only: run the scalar path on this thread (to compare whole models).
    pub(crate) static FORCE_SCALAR: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Tests only: whether this thread asked for the scalar path; always false in builds.
#[inline(always)]
pub(crate) fn force_scalar() -> bool {
    #[cfg(test)]
    {
        FORCE_SCALAR.with(|f| f.get())
    }
    #[cfg(not(test))]
    {
        false
    }
}

/// True when the SIMD path takes this shape (the caller falls back to the scalar path
/// otherwise): one input channel's window must fit [`WIN`] and one channel's widened taps
/// times [`C`] must fit [`STAGE`]. Every preset shape, and any image up to about 100x100
/// pixels with a 7x7 kernel, qualifies.
pub(crate) fn takes(conv: &Conv) -> bool {
    geometry(conv).is_some()
}

/// Window geometry: `(row stride, values per channel, channels per group)`.
fn geometry(conv: &Conv) -> Option<(usize, usize, usize)> {
    let (k, w, h) = (conv.kernel, conv.width, conv.height);
    if conv.cin == 0 || k == 0 || w == 0 || h == 0 || conv.cout == 0 {
        return None;
    }
    // Column chunks of LANES pixels; the last chunk's full-width loads read up to column
    // chunks * LANES + k - 2 of the window, so the stride leaves room for them.
    let chunks = w.div_ceil(V::LANES);
    let ws = chunks.checked_mul(V::LANES)?.checked_add(k - 1)?;
    let wlen = h.checked_add(k - 1)?.checked_mul(ws)?;
    let kk = k.checked_mul(k)?;
    let by_win = WIN.checked_div(wlen)?;
    let by_stage = STAGE.checked_div(kk.checked_mul(C)?)?;
    let group = by_win.min(by_stage).min(conv.cin);
    (group >= 1).then_some((ws, wlen, group))
}

/// How a register block's accumulators start and end for the current input-channel group.
#[derive(Clone, Copy)]
struct Mode {
    /// First group: start from the bias (else from the output).
    first: bool,
    /// Last group with ReLU: store `relu(acc)`.
    relu: bool,
}

/// The SIMD convolution; same contract as [`Conv::forward`] (whose checks have passed:
/// every buffer has exactly the length the shape needs) for shapes [`takes`] accepts:
/// [`pointwise`] for 1x1 kernels, else [`windowed`]. (Each keeps its stack buffers in its
/// own frame; neither calls the other.)
#[inline(always)]
pub(crate) fn forward(
    conv: &Conv,
    input: &[f32],
    weight: Tensor<'_>,
    bias: Tensor<'_>,
    relu: bool,
    out: &mut [f32],
) -> Result<(), Error> {
    if conv.kernel == 1 {
        pointwise(conv, input, weight, Some(bias), relu, out)
    } else {
        windowed(conv, input, weight, bias, relu, out)
    }
}

/// The windowed algorithm (module docs), for any kernel size [`takes`] accepts. Not
/// inlined: its 96 KiB of stack buffers stay in its own frame.
#[inline(never)]
fn windowed(
    conv: &Conv,
    input: &[f32],
    weight: Tensor<'_>,
    bias: Tensor<'_>,
    relu: bool,
    out: &mut [f32],
) -> Result<(), Error> {
    let (ws, wlen, group) = geometry(conv).ok_or(INTERNAL)?;
    let (cin, cout, h, w, k) = (conv.cin, conv.cout, conv.height, conv.width, conv.kernel);
    let plane = h.checked_mul(w).ok_or(INTERNAL)?;
    let kk = k * k;
    // Re-check what `Conv::check` established, here where the pointer arithmetic relies on it.
    if input.len() != cin.checked_mul(plane).ok_or(INTERNAL)?
        || out.len() != cout.checked_mul(plane).ok_or(INTERNAL)?
        || weight.len()
            != cout
                .checked_mul(cin)
                .and_then(|n| n.checked_mul(kk))
                .ok_or(INTERNAL)?
        || bias.len() != cout
    {
        return Err(INTERNAL);
    }
    // Uninitialised (zeroing 96 KiB per call cost ~4% of a sample); each group writes every
    // value of the prefix it reads, and only reads go through raw pointers.
    let mut window = Aligned([const { MaybeUninit::<f32>::uninit() }; WIN]);
    let mut stage = Aligned([const { MaybeUninit::<f32>::uninit() }; STAGE]);
    let p = k / 2;
    let chunks = w.div_ceil(V::LANES);
    for ic0 in (0..cin).step_by(group) {
        let g = group.min(cin - ic0);
        // Fill the group's windows: window row r, column c hold input (r - p, c - p), zero
        // outside the image. Every value of the g windows is written.
        let wins = window.0.get_mut(..g * wlen).ok_or(INTERNAL)?;
        let ins = input.get(ic0 * plane..(ic0 + g) * plane).ok_or(INTERNAL)?;
        // Zeros everywhere (vector stores), then the image rows over them (masked vector
        // copies). This is a large share of the cheap 3x3 layers' time, hence the care.
        let mut zchunks = wins.chunks_exact_mut(V::LANES);
        for c in &mut zchunks {
            // SAFETY: c is LANES writable values.
            unsafe { V::splat(0.0).store(c.as_mut_ptr().cast::<f32>()) };
        }
        zchunks.into_remainder().fill(MaybeUninit::new(0.0));
        for (win, in_plane) in wins.chunks_exact_mut(wlen).zip(ins.chunks_exact(plane)) {
            let rows = win.get_mut(p * ws..(p + h) * ws).ok_or(INTERNAL)?;
            for (dst, src) in rows.chunks_exact_mut(ws).zip(in_plane.chunks_exact(w)) {
                let dst = dst.get_mut(p..p + w).ok_or(INTERNAL)?;
                for (d, s) in dst.chunks_mut(V::LANES).zip(src.chunks(V::LANES)) {
                    let n = d.len().min(s.len());
                    if n == 0 {
                        return Err(INTERNAL);
                    }
                    // SAFETY: 1 <= n <= LANES values readable at s and writable at d.
                    unsafe {
                        V::load_n(s.as_ptr(), n).store_n(d.as_mut_ptr().cast::<f32>(), n);
                    }
                }
            }
        }
        let mode = Mode {
            first: ic0 == 0,
            relu: relu && ic0 + g == cin,
        };
        for oc0 in (0..cout).step_by(C) {
            let cn = C.min(cout - oc0);
            // The block's weights: channel j's taps of this group at wp + j * wstride.
            let (wp, wstride) = match weight.raw() {
                (DType::F32, bytes) => {
                    let first = (oc0 * cin + ic0) * kk;
                    // Channel cn - 1's last tap of the group; bytes holds cout*cin*kk f32.
                    let last = ((oc0 + cn - 1) * cin + ic0 + g) * kk;
                    let span = bytes.get(first * 4..last * 4).ok_or(INTERNAL)?;
                    (span.as_ptr().cast::<f32>(), cin * kk)
                }
                (DType::F16, bytes) => {
                    // Every value of the cn * g * kk prefix is written here.
                    let st = stage.0.get_mut(..cn * g * kk).ok_or(INTERNAL)?;
                    for (j, dst) in st.chunks_exact_mut(g * kk).enumerate() {
                        let at = ((oc0 + j) * cin + ic0) * kk;
                        let src = bytes.get(at * 2..(at + g * kk) * 2).ok_or(INTERNAL)?;
                        if src.len() != 2 * dst.len() {
                            return Err(INTERNAL);
                        }
                        V::widen_f16(src, dst);
                    }
                    (st.as_ptr().cast::<f32>(), g * kk)
                }
            };
            let mut bv = [0f32; C];
            if mode.first {
                for (j, b) in bv.iter_mut().enumerate().take(cn) {
                    *b = bias
                        .slice(oc0 + j, 1)
                        .and_then(|t| t.iter().next())
                        .ok_or(INTERNAL)?;
                }
            }
            let outs = out
                .get_mut(oc0 * plane..(oc0 + cn) * plane)
                .ok_or(INTERNAL)?;
            let blk = Block {
                win: wins.as_ptr().cast::<f32>(),
                ws,
                wlen,
                g,
                k,
                wp,
                wstride,
                out: outs.as_mut_ptr(),
                plane,
                w,
                bias: bv,
                mode,
            };
            // Rows in blocks of at most ROWS, as even as possible (14 = 5 + 5 + 4 for 6).
            let nb = h.div_ceil(V::ROWS);
            let (base, extra) = (h / nb, h % nb);
            let mut y0 = 0;
            for b in 0..nb {
                let rows = base + usize::from(b < extra);
                for ch in 0..chunks {
                    let x0 = ch * V::LANES;
                    let lanes = V::LANES.min(w - x0);
                    // SAFETY: y0 + rows <= h, x0 + lanes <= w, cn <= C, and `blk` was built
                    // from buffers checked above to hold g windows of wlen values (window
                    // row r < h + k - 1, column < chunks * LANES + k - 1 = ws), cn
                    // channels of g * kk taps at wstride from wp, and cn output planes.
                    unsafe { dispatch(&blk, y0, rows, x0, lanes, cn) };
                }
                y0 += rows;
            }
        }
    }
    Ok(())
}

/// The 1x1 convolution as a matrix product over the flattened plane: `out[o][p] = bias[o]
/// + sum_i w[o][i] in[i][p]` (sums from 0 without a bias), ReLU when `relu`. Same contract
/// as [`forward`] (the bias, when given, has `cout` values).
///
/// No window: a 1x1 kernel reads no padding, so the input planes are read in place. The
/// flattened plane is cut into chunks of `LANES` pixels; a register block is `R` consecutive
/// chunks (`R <= V::ROWS`) x [`C`] output channels, held over every input channel: per input
/// channel `R` vector loads, [`C`] weight broadcasts, `R x C` fused multiply-adds. Weights
/// are read from the blob's `[o][i]` rows (f32) or widened once per channel block and input
/// group into the stack buffer (f16). Same order as the scalar path (bias, then input
/// channel), with fused multiply-adds.
#[inline(never)]
pub(crate) fn pointwise(
    conv: &Conv,
    input: &[f32],
    weight: Tensor<'_>,
    bias: Option<Tensor<'_>>,
    relu: bool,
    out: &mut [f32],
) -> Result<(), Error> {
    let (cin, cout) = (conv.cin, conv.cout);
    let plane = conv.height.checked_mul(conv.width).ok_or(INTERNAL)?;
    if conv.kernel != 1
        || cin == 0
        || input.len() != cin.checked_mul(plane).ok_or(INTERNAL)?
        || out.len() != cout.checked_mul(plane).ok_or(INTERNAL)?
        || weight.len() != cout.checked_mul(cin).ok_or(INTERNAL)?
        || bias.is_some_and(|b| b.len() != cout)
    {
        return Err(INTERNAL);
    }
    if plane == 0 || cout == 0 {
        return Ok(());
    }
    let mut stage = Aligned([const { MaybeUninit::<f32>::uninit() }; STAGE]);
    // Input channels per group: C rows of widened f16 weights fit the stage buffer.
    let group = STAGE / C;
    let chunks = plane.div_ceil(V::LANES);
    for ic0 in (0..cin).step_by(group) {
        let g = group.min(cin - ic0);
        let mode = Mode {
            first: ic0 == 0,
            relu: relu && ic0 + g == cin,
        };
        let ins = input.get(ic0 * plane..(ic0 + g) * plane).ok_or(INTERNAL)?;
        for oc0 in (0..cout).step_by(C) {
            let cn = C.min(cout - oc0);
            let (wp, wstride) = match weight.raw() {
                (DType::F32, bytes) => {
                    let first = oc0 * cin + ic0;
                    let last = (oc0 + cn - 1) * cin + ic0 + g;
                    let span = bytes.get(first * 4..last * 4).ok_or(INTERNAL)?;
                    (span.as_ptr().cast::<f32>(), cin)
                }
                (DType::F16, bytes) => {
                    // Every value of the cn * g prefix is written here.
                    let st = stage.0.get_mut(..cn * g).ok_or(INTERNAL)?;
                    for (j, dst) in st.chunks_exact_mut(g).enumerate() {
                        let at = (oc0 + j) * cin + ic0;
                        let src = bytes.get(at * 2..(at + g) * 2).ok_or(INTERNAL)?;
                        if src.len() != 2 * dst.len() {
                            return Err(INTERNAL);
                        }
                        V::widen_f16(src, dst);
                    }
                    (st.as_ptr().cast::<f32>(), g)
                }
            };
            let mut bv = [0f32; C];
            if let (true, Some(bias)) = (mode.first, bias) {
                for (j, b) in bv.iter_mut().enumerate().take(cn) {
                    *b = bias
                        .slice(oc0 + j, 1)
                        .and_then(|t| t.iter().next())
                        .ok_or(INTERNAL)?;
                }
            }
            let outs = out
                .get_mut(oc0 * plane..(oc0 + cn) * plane)
                .ok_or(INTERNAL)?;
            let blk = PwBlock {
                ins: ins.as_ptr(),
                g,
                wp,
                wstride,
                out: outs.as_mut_ptr(),
                plane,
                bias: bv,
                mode,
            };
            let mut ch = 0;
            while ch < chunks {
                let r = V::ROWS.min(chunks - ch);
                // SAFETY: chunks ch .. ch + r lie in the plane (the last may be partial: its
                // lanes are clamped to the plane inside), cn <= C, and `blk` was built from
                // buffers checked above to hold g input planes, cn rows of g weights at
                // wstride from wp, and cn output planes.
                unsafe { pw_dispatch(&blk, ch, r, cn) };
                ch += r;
            }
        }
    }
    Ok(())
}

/// One output-channel block of a 1x1 convolution (raw pointers into buffers whose sizes
/// [`pointwise`] checked).
struct PwBlock {
    /// The group's `g` input planes, `plane` values each.
    ins: *const f32,
    g: usize,
    /// Channel `j`'s weight for the group's input channel `i` is at `wp + j * wstride + i`
    /// (f32, maybe unaligned).
    wp: *const f32,
    wstride: usize,
    /// Channel `j`'s output plane starts at `out + j * plane`.
    out: *mut f32,
    plane: usize,
    bias: [f32; C],
    mode: Mode,
}

/// [`pw_tile`] with the chunk and channel counts as compile-time constants.
///
/// # Safety
/// As for [`pw_tile`].
#[inline(always)]
unsafe fn pw_dispatch(b: &PwBlock, ch: usize, chunks: usize, cn: usize) {
    macro_rules! by_chunks {
        ($c:literal) => {
            // SAFETY: the caller's contract, with R = chunks and cn = $c.
            unsafe {
                match chunks {
                    1 => pw_tile::<1, $c>(b, ch),
                    2 => pw_tile::<2, $c>(b, ch),
                    3 => pw_tile::<3, $c>(b, ch),
                    4 => pw_tile::<4, $c>(b, ch),
                    5 => pw_tile::<5, $c>(b, ch),
                    _ => pw_tile::<6, $c>(b, ch),
                }
            }
        };
    }
    match cn {
        1 => by_chunks!(1),
        2 => by_chunks!(2),
        3 => by_chunks!(3),
        _ => by_chunks!(4),
    }
}

/// Chunks `ch .. ch + R` of `LANES` pixels of the flattened plane (the last may be partial),
/// channels `0 .. N` of the block, over the group's input channels: `R x N` accumulators in
/// registers.
///
/// # Safety
/// `R <= V::ROWS`, chunk `ch + R - 1` starts inside the plane, `N` is at most the block's
/// channel count, and the block's pointers are valid for the extents documented on
/// [`PwBlock`].
#[inline(never)]
unsafe fn pw_tile<const R: usize, const N: usize>(b: &PwBlock, ch: usize) {
    let lanes = |r: usize| V::LANES.min(b.plane - (ch + r) * V::LANES);
    // Only the last chunk of the plane can be partial.
    let full = (ch + R) * V::LANES <= b.plane;
    let mut acc = [[V::splat(0.0); N]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        let at = (ch + r) * V::LANES;
        for (j, a) in row.iter_mut().enumerate() {
            *a = if b.mode.first {
                V::splat(b.bias.get(j).copied().unwrap_or(0.0))
            } else {
                // SAFETY: channel j < N of the block, pixels at .. at + lanes(r) <= plane.
                unsafe { V::load_n(b.out.add(j * b.plane + at), lanes(r)) }
            };
        }
    }
    for i in 0..b.g {
        // SAFETY: input plane i < g of the group.
        let xp = unsafe { b.ins.add(i * b.plane + ch * V::LANES) };
        let mut xs = [V::splat(0.0); R];
        for (r, x) in xs.iter_mut().enumerate() {
            // SAFETY: pixels (ch + r) * LANES .. + LANES of plane i when full, else only the
            // lanes(r) that lie in the plane.
            *x = unsafe {
                if full {
                    V::load(xp.add(r * V::LANES))
                } else {
                    V::load_n(xp.add(r * V::LANES), lanes(r))
                }
            };
        }
        for j in 0..N {
            // SAFETY: weight i < g of channel j < N; may be unaligned.
            let wv = V::splat(unsafe { b.wp.add(j * b.wstride + i).read_unaligned() });
            for (row, x) in acc.iter_mut().zip(&xs) {
                if let Some(a) = row.get_mut(j) {
                    *a = a.fma(*x, wv);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let at = (ch + r) * V::LANES;
        for (j, a) in row.iter().enumerate() {
            let v = if b.mode.relu { a.relu() } else { *a };
            // SAFETY: as for the loads above: channel j, pixels at .. at + lanes(r).
            unsafe { v.store_n(b.out.add(j * b.plane + at), lanes(r)) };
        }
    }
}

/// 64-byte aligned stack buffer (whole cache lines; aligned vector loads where they fall).
#[repr(C, align(64))]
struct Aligned<const N: usize>([MaybeUninit<f32>; N]);

/// One output-channel block's inputs, weights and outputs (raw pointers into buffers whose
/// sizes [`forward`] checked).
struct Block {
    /// The group's windows: `g` of `wlen` values (all initialised), rows `ws` apart.
    win: *const f32,
    ws: usize,
    wlen: usize,
    g: usize,
    /// Kernel size.
    k: usize,
    /// Channel `j`'s tap `ic * k * k + ky * k + kx` of the group is at `wp + j * wstride +`
    /// that offset (f32, maybe unaligned: read with `read_unaligned`).
    wp: *const f32,
    wstride: usize,
    /// Channel `j`'s output plane starts at `out + j * plane`; rows `w` apart.
    out: *mut f32,
    plane: usize,
    w: usize,
    /// The block's biases (used for the first group).
    bias: [f32; C],
    mode: Mode,
}

/// [`tile`] with the row and channel counts as compile-time constants.
///
/// # Safety
/// As for [`tile`].
#[inline(always)]
unsafe fn dispatch(b: &Block, y0: usize, rows: usize, x0: usize, lanes: usize, cn: usize) {
    macro_rules! by_rows {
        ($c:literal) => {
            // SAFETY: the caller's contract, with R = rows and cn = $c.
            unsafe {
                match rows {
                    1 => tile::<1, $c>(b, y0, x0, lanes),
                    2 => tile::<2, $c>(b, y0, x0, lanes),
                    3 => tile::<3, $c>(b, y0, x0, lanes),
                    4 => tile::<4, $c>(b, y0, x0, lanes),
                    5 => tile::<5, $c>(b, y0, x0, lanes),
                    _ => tile::<6, $c>(b, y0, x0, lanes),
                }
            }
        };
    }
    match cn {
        1 => by_rows!(1),
        2 => by_rows!(2),
        3 => by_rows!(3),
        _ => by_rows!(4),
    }
}

/// Output rows `y0 .. y0 + R`, pixels `x0 .. x0 + lanes` of each, channels `0 .. N` of the
/// block, over the group's input channels: `R x N` accumulators in registers.
///
/// # Safety
/// `R <= V::ROWS` rows from `y0` and `lanes <= LANES` pixels from `x0` lie inside the output
/// plane, `x0` is a multiple of `LANES`, `N` is at most the block's channel count, and the
/// block's pointers are valid for the extents documented on [`Block`].
#[inline(never)]
unsafe fn tile<const R: usize, const N: usize>(b: &Block, y0: usize, x0: usize, lanes: usize) {
    let k = b.k;
    let mut acc = [[V::splat(0.0); N]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, a) in row.iter_mut().enumerate() {
            *a = if b.mode.first {
                V::splat(b.bias.get(j).copied().unwrap_or(0.0))
            } else {
                // SAFETY: channel j < N of the block, row y0 + r < h, lanes from x0 <= w.
                unsafe { V::load_n(b.out.add(j * b.plane + (y0 + r) * b.w + x0), lanes) }
            };
        }
    }
    for ic in 0..b.g {
        // SAFETY: window ic < g starts at ic * wlen; row y0 (+ r + ky < h + k - 1 below).
        let wrow = unsafe { b.win.add(ic * b.wlen + y0 * b.ws + x0) };
        // SAFETY: tap ic * k * k of each channel is inside its g * k * k taps.
        let wtap = unsafe { b.wp.add(ic * k * k) };
        for ky in 0..k {
            for kx in 0..k {
                let mut xs = [V::splat(0.0); R];
                for (r, x) in xs.iter_mut().enumerate() {
                    // SAFETY: window row y0 + r + ky <= h - 1 + k - 1, columns x0 + kx ..
                    // x0 + kx + LANES <= chunks * LANES + k - 1 = ws: inside window ic.
                    *x = unsafe { V::load(wrow.add((r + ky) * b.ws + kx)) };
                }
                for j in 0..N {
                    // SAFETY: tap ky * k + kx < k * k of channel j < N; may be unaligned.
                    let wv = unsafe { wtap.add(j * b.wstride + ky * k + kx).read_unaligned() };
                    let wv = V::splat(wv);
                    for (row, x) in acc.iter_mut().zip(&xs) {
                        if let Some(a) = row.get_mut(j) {
                            *a = a.fma(*x, wv);
                        }
                    }
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            let v = if b.mode.relu { a.relu() } else { *a };
            // SAFETY: as for the loads above: channel j, row y0 + r, lanes from x0.
            unsafe { v.store_n(b.out.add(j * b.plane + (y0 + r) * b.w + x0), lanes) };
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // tests index their own fixtures
mod tests {
    use super::*;
    use std::vec::Vec;

    fn bytes(values: &[f32], dtype: DType) -> Vec<u8> {
        let mut b = Vec::new();
        for &v in values {
            match dtype {
                DType::F32 => b.extend_from_slice(&v.to_le_bytes()),
                DType::F16 => b.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            }
        }
        b
    }

    /// The exact sums (f64, the test kit's convolution) and their magnitudes
    /// `|b| + sum |w x|`.
    fn reference(c: &Conv, x: &[f32], w: Tensor<'_>, b: Tensor<'_>) -> (Vec<f64>, Vec<f64>) {
        use clayflow_testkit::conv::{conv2d_forward_ref, ConvShape};
        let s = ConvShape {
            batch: 1,
            cin: c.cin,
            cout: c.cout,
            height: c.height,
            width: c.width,
            kernel: c.kernel,
        };
        let (wv, bv): (Vec<f32>, Vec<f32>) = (w.iter().collect(), b.iter().collect());
        let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<f32>>();
        let exact = conv2d_forward_ref(&s, x, &wv, &bv, false);
        let mag = conv2d_forward_ref(&s, &abs(x), &abs(&wv), &abs(&bv), false);
        (exact, mag)
    }

    /// The SIMD path is within the rounding bound `gamma_n (|b| + sum |w x|)` of the exact
    /// sum and within twice that of the scalar path, for every shape kind: partial channel
    /// blocks (cout % 4 != 0), partial row blocks and column chunks, widths above one vector,
    /// several input-channel groups (cin = 192 at 3x3 needs 4 groups of the 64 KiB window),
    /// every kernel size, f32 and f16 weights, with and without ReLU.
    #[test]
    fn simd_is_within_the_rounding_bound_of_exact_and_scalar() {
        let mut seed = 11u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Under Miri (which checks the unsafe loads and stores of this module, at about a
        // millionth of the speed), three tiny shapes: a partial channel and row block, a row
        // wider than one vector with a 5x5 kernel, and the 1x1 path.
        let miri: &[(usize, usize, usize, usize, usize)] =
            &[(2, 5, 3, 7, 3), (1, 2, 2, 17, 5), (3, 6, 2, 9, 1)];
        let all: &[(usize, usize, usize, usize, usize)] = &[
            (1, 1, 1, 1, 1),
            (2, 5, 3, 7, 3),
            (2, 8, 14, 14, 5),
            (8, 64, 14, 14, 7),
            (64, 4, 14, 14, 3),
            (6, 24, 16, 16, 5),
            (24, 13, 16, 16, 7),
            (192, 12, 16, 16, 3),
            (3, 9, 17, 33, 7),
            (2, 3, 40, 37, 5),
            (1, 2, 20, 33, 15),
            (4, 6, 5, 50, 1),
            (3, 4, 2, 70, 11),
            // The 1x1 path: the Glow presets' shapes (coupling middle layer, invertible
            // 1x1 convolution), partial chunks and channel blocks, two input groups.
            (64, 64, 14, 14, 1),
            (64, 64, 7, 7, 1),
            (4, 4, 14, 14, 1),
            (8, 8, 7, 7, 1),
            (224, 224, 16, 16, 1),
            (224, 224, 8, 8, 1),
            (224, 224, 4, 4, 1),
            (STAGE / C + 3, 5, 3, 3, 1),
            (2, 3, 1, 1, 1),
        ];
        let shapes = if cfg!(miri) { miri } else { all };
        let mut worst = 0f64;
        for &(cin, cout, h, w, k) in shapes {
            let c = Conv {
                cin,
                cout,
                height: h,
                width: w,
                kernel: k,
            };
            assert!(takes(&c), "{c:?}");
            let x: Vec<f32> = (0..cin * h * w).map(|_| rnd()).collect();
            let wt: Vec<f32> = (0..cout * cin * k * k).map(|_| rnd()).collect();
            let bs: Vec<f32> = (0..cout).map(|_| rnd()).collect();
            for dtype in [DType::F32, DType::F16] {
                let (wb, bb) = (bytes(&wt, dtype), bytes(&bs, dtype));
                let (wten, bten) = (Tensor::new(dtype, &wb), Tensor::new(dtype, &bb));
                let (exact, mag) = reference(&c, &x, wten, bten);
                let n = (cin * k * k + 1) as f64;
                let u = f64::from(f32::EPSILON) / 2.0;
                let gamma = n * u / (1.0 - n * u);
                for relu in [false, true] {
                    let mut fast = std::vec![f32::NAN; cout * h * w];
                    let mut slow = std::vec![f32::NAN; cout * h * w];
                    forward(&c, &x, wten, bten, relu, &mut fast).unwrap();
                    c.forward_scalar(&x, wten, bten, relu, &mut slow).unwrap();
                    for i in 0..fast.len() {
                        let e = if relu { exact[i].max(0.0) } else { exact[i] };
                        let (a, s) = (f64::from(fast[i]), f64::from(slow[i]));
                        let bound = gamma * mag[i];
                        assert!(
                            (a - e).abs() <= bound && (a - s).abs() <= 2.0 * bound,
                            "{c:?} {dtype:?} relu {relu} output {i}: simd {a} scalar {s} \
                             exact {e} bound {bound}"
                        );
                        if bound > 0.0 {
                            worst = worst.max((a - s).abs() / bound);
                        }
                    }
                }
            }
        }
        std::eprintln!("{PATH}: largest |simd - scalar| / gamma_n bound = {worst:.4}");
    }

    /// The path's bulk f16 widening agrees with the exact scalar one on all 65,536 bit
    /// patterns (NaN with NaN), at every tail length.
    #[test]
    fn f16_widening_matches_scalar_exhaustively() {
        let src: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        let mut buf = std::vec![MaybeUninit::new(0f32); 1 << 16];
        V::widen_f16(&src, &mut buf);
        // SAFETY: initialised to 0.0 above, then overwritten.
        let dst: Vec<f32> = buf.iter().map(|v| unsafe { v.assume_init() }).collect();
        for (h, a) in (0..=u16::MAX).zip(&dst) {
            let e = crate::conv::f16_to_f32(h);
            assert!(
                a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan()),
                "{h:#06x}: {a} vs {e}"
            );
        }
        for n in 0..40usize {
            let mut d = std::vec![MaybeUninit::new(f32::NAN); n];
            V::widen_f16(&src[2 * 1000..2 * (1000 + n)], &mut d);
            for (i, a) in d.iter().enumerate() {
                // SAFETY: initialised to NaN above, then overwritten.
                let a = unsafe { a.assume_init() };
                assert_eq!(
                    a.to_bits(),
                    crate::conv::f16_to_f32(1000 + i as u16).to_bits()
                );
            }
        }
    }

    /// A whole MNIST-preset sample and log_prob on this path against the scalar path (same
    /// thread, scalar forced): the fused multiply-adds change the sample's values in [0, 1]
    /// and log p (relative) by about 2e-7 on AVX-512 (printed); asserted below 1e-5, 50x
    /// margin, still far below any real error (which moves values by O(1e-2) or more).
    #[test]
    fn whole_model_stays_close_to_the_scalar_path() {
        use crate::testutil::{blob, random_params, MNIST_OR_MINI};
        use crate::{image_len, log_prob, sample, scratch_len, Model};
        const N: usize = image_len(&MNIST_OR_MINI);
        let params = random_params(&MNIST_OR_MINI, 5, 1.0);
        for dtype in [DType::F32, DType::F16] {
            let b = blob(&MNIST_OR_MINI, dtype, &params);
            let model = Model::from_blob(&b).unwrap();
            let mut scratch = std::vec![0f32; scratch_len(&MNIST_OR_MINI)];
            let run = |scalar: bool, scratch: &mut [f32]| {
                FORCE_SCALAR.with(|f| f.set(scalar));
                let (mut px, mut v) = ([0u8; N], [0f32; N]);
                sample(&model, 42, 0.8, scratch, &mut px, &mut v).unwrap();
                let lp = log_prob(&model, &px, scratch).unwrap();
                let lp_simd_px = if scalar { None } else { Some(px) };
                FORCE_SCALAR.with(|f| f.set(false));
                (v, lp, lp_simd_px)
            };
            let (v_simd, lp_simd, px_simd) = run(false, &mut scratch);
            let (v_scalar, _, _) = run(true, &mut scratch);
            // log p of the same pixels on both paths.
            FORCE_SCALAR.with(|f| f.set(true));
            let lp_scalar = log_prob(&model, &px_simd.unwrap(), &mut scratch).unwrap();
            FORCE_SCALAR.with(|f| f.set(false));
            let dv = v_simd
                .iter()
                .zip(&v_scalar)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let dlp = (lp_simd - lp_scalar).abs() / lp_scalar.abs().max(1.0);
            std::eprintln!(
                "{PATH} vs scalar, {dtype:?}: sample max |dv| = {dv:e}, log p {lp_simd} vs \
                 {lp_scalar} (rel {dlp:e})"
            );
            assert!(dv < 1e-5, "{dv}");
            assert!(dlp < 1e-5, "{dlp}");
        }
    }

    /// ReLU of NaN and -0.0 is +0.0, bit for bit as on the scalar path.
    #[test]
    fn relu_matches_the_scalar_relu_on_nan_and_signed_zero() {
        let c = Conv {
            cin: 1,
            cout: 3,
            height: 1,
            width: 1,
            kernel: 1,
        };
        // 1x1 kernel: out = b + w * x with x = 1: NaN, -0.0 (0 * -0 + -0), and -2.
        let wb = bytes(&[f32::NAN, -0.0, 1.0], DType::F32);
        let bb = bytes(&[0.0, -0.0, -3.0], DType::F32);
        let (w, b) = (Tensor::new(DType::F32, &wb), Tensor::new(DType::F32, &bb));
        let mut out = [1f32; 3];
        forward(&c, &[1.0], w, b, true, &mut out).unwrap();
        assert_eq!(out.map(f32::to_bits), [0.0f32.to_bits(); 3]);
    }

    /// Shapes whose single-channel window exceeds the stack buffer are not taken (the
    /// scalar path runs them), and empty ones neither.
    #[test]
    fn oversized_and_empty_shapes_are_declined() {
        let big = Conv {
            cin: 1,
            cout: 1,
            height: 1024,
            width: 1024,
            kernel: 3,
        };
        assert!(!takes(&big));
        assert!(!takes(&Conv { cin: 0, ..big }));
        assert!(takes(&Conv {
            height: 64,
            width: 64,
            ..big
        }));
    }
}
