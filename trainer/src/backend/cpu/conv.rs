//! 2-D convolution on the CPU: forward, backward-data and backward-weight.
//!
//! All tensors are flat `f32` slices in NCHW row-major order. The convolution
//! has stride 1, "same" zero padding (`pad = kernel / 2`) and an odd square
//! kernel; weights are laid out `[cout][cin][k][k]` and the operation is a
//! cross-correlation, exactly like PyTorch's `Conv2d`.
//!
//! # Algorithms
//!
//! * **im2col + sgemm** (`matrixmultiply`), for ops with many output channels:
//!   - forward: `Y[cout, HW] = W[cout, cin·k²] · cols[cin·k², HW]` (small images are
//!     batched, several per GEMM);
//!   - backward-data: a "same" convolution of `dy` with the flipped, channel-transposed
//!     kernel, or, when `cin < cout` and `cout >= 16`, `dcols = Wᵀ · dy` and col2im;
//!   - backward-weight: `dW[cout, k²·cin] += dy[cout, HW] · colsᵀ[HW, k²·cin]` per image,
//!     with channels-last transposed columns so the copies and sgemm's packing are
//!     contiguous.
//! * **direct** (x86-64 with AVX2+FMA, detected at run time; only in builds without
//!   `debug_assertions`, as it is very slow unoptimised), for ops with at most 12 output
//!   channels (`cout` for forward/backward-weight, `cin` for backward-data): sgemm's
//!   16-row tiles would be mostly padding there, and im2col/packing traffic would
//!   dominate. It reads the zero-padded image in place ("implicit GEMM": output pixels are
//!   computed on the padded-width grid, so every kernel tap is a contiguous shifted load).
//!
//! * **direct, AVX-512** (x86-64 with AVX-512F, detected at run time; release builds; images
//!   at most 16 pixels wide, kernels up to 7): one image row is one zmm vector, so there
//!   are no gap columns to waste; lanes past the width read neighbouring padded pixels and
//!   are discarded (forward) or multiplied by zero (weight gradient). Forward and
//!   backward-data (the flipped-kernel convolution) block 8 output channels x 3 rows (24
//!   accumulators), reading each input row once per tap and broadcasting the weights;
//!   backward-weight blocks 3 output channels x one kernel row of taps, reducing over the
//!   rows of all images of a chunk in registers, from 64-byte-aligned copies of the
//!   shifted input rows. For backward-weight with more than 32 output channels it instead
//!   vectorises over output channels: `dWᵀ[tap][cout]` accumulates, per pixel, dy
//!   transposed to `[pixel][cout]` (4 zmm) times 6 broadcast input taps (24
//!   accumulators). For backward-weight of 1x1 and 3x3 kernels with at least 16 input
//!   and at most 32 output channels (the preset's last conv) it vectorises over input
//!   channels instead: the image is copied channels-last (one masked gather per pixel and
//!   16 channels), and `dW[co][tap][ci]` accumulates broadcast dy times 32 channels of
//!   the shifted pixel, 4 output channels x 3 taps x 2 vectors (24 accumulators). The
//!   AVX-512 paths are used for every op they can take.
//!
//! Work is split across images with rayon; each worker keeps its scratch in thread-local
//! buffers that are reused between calls, so the steady state allocates nothing but
//! matrixmultiply's packing buffers.
//!
//! Results are bitwise independent of the number of rayon threads: forward and
//! backward-data are computed image by image, and backward-weight sums per-chunk partials
//! whose chunking depends only on the batch size, in a fixed order. (They can differ in
//! the last bits between builds or CPUs that pick a different algorithm.)
//!
//! # Threading and matrixmultiply
//!
//! The workspace enables matrixmultiply's `threading` feature. Its pool size comes from
//! `MATMUL_NUM_THREADS` and **defaults to the number of physical cores**, and a single
//! large sgemm then forks onto that pool. Since every sgemm here already runs inside a
//! rayon task, set `MATMUL_NUM_THREADS=1` (before the first sgemm) to avoid
//! oversubscription.

use std::cell::Cell;

use rayon::prelude::*;

/// Shape of one convolution problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Number of images (N).
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Image height (same for input and output).
    pub height: usize,
    /// Image width (same for input and output).
    pub width: usize,
    /// Square kernel size; must be odd.
    pub kernel: usize,
}

impl ConvShape {
    /// Number of `f32`s in the input `x` (and in `dx`): `batch * cin * height * width`.
    pub fn input_len(&self) -> usize {
        self.batch * self.cin * self.hw()
    }

    /// Number of `f32`s in the output `y` (and in `dy`): `batch * cout * height * width`.
    pub fn output_len(&self) -> usize {
        self.batch * self.cout * self.hw()
    }

    /// Number of `f32`s in the weights `w` (and in `dw`): `cout * cin * kernel * kernel`.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.kernel * self.kernel
    }

    /// Floating-point operations of the forward pass: `2 * batch * cout * cin * k * k * h * w`
    /// (two per multiply-accumulate, counting the padded taps; bias and ReLU are not counted).
    /// Backward-data and backward-weight cost the same.
    pub fn flops(&self) -> u64 {
        2 * self.batch as u64
            * self.cout as u64
            * self.cin as u64
            * (self.kernel * self.kernel) as u64
            * self.hw() as u64
    }

    /// Zero padding on each side: `kernel / 2`.
    pub fn pad(&self) -> usize {
        self.kernel / 2
    }

    fn hw(&self) -> usize {
        self.height * self.width
    }

    fn check_kernel(&self, op: &str) {
        assert!(
            self.kernel % 2 == 1,
            "{op}: kernel size must be odd, got {}",
            self.kernel
        );
    }
}

/// Ops whose GEMM M dimension (output channels of the op) is at most this use the direct
/// kernel when the CPU supports it.
const DIRECT_MAX_M: usize = 12;

/// Which inner algorithm an op uses (the tests run every one the machine supports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algo {
    /// im2col + matrixmultiply sgemm.
    Gemm,
    /// Implicit-GEMM SIMD kernel on the padded image (needs `simd::available()`).
    Direct,
    /// AVX-512 implicit-GEMM kernel with one image row per vector (needs
    /// `simd512::available()`; images at most 16 wide, kernels at most 7).
    Direct512,
    /// As `Direct512`, but backward-weight vectorises over output channels instead of
    /// pixels (for wide ops); the other ops run `Direct512`.
    Direct512Co,
    /// Backward-weight vectorised over input channels, from a channels-last padded copy
    /// of the image (for 1x1 and 3x3 kernels with many input and few output channels);
    /// the other ops run `Direct512`.
    Direct512Ci,
}

/// Whether the AVX-512 row kernels handle images `w` wide with kernel size `k`.
fn fits512(w: usize, k: usize) -> bool {
    w <= simd512::L && k <= simd512::MAX_K
}

/// Whether the input-channel-vectorised weight-gradient kernel handles kernel size `k`.
fn fits512ci(k: usize) -> bool {
    matches!(k, 1 | 3)
}

/// `algo`, or the best supported substitute when the AVX-512 kernels cannot take the shape.
fn usable(algo: Algo, m: usize, w: usize, k: usize) -> Algo {
    if algo == Algo::Direct512Ci {
        return if fits512ci(k) && simd512::available() {
            algo
        } else {
            usable(Algo::Direct512, m, w, k)
        };
    }
    let is512 = matches!(algo, Algo::Direct512 | Algo::Direct512Co);
    if is512 && !(fits512(w, k) && simd512::available()) {
        if m <= DIRECT_MAX_M && simd::available() {
            Algo::Direct
        } else {
            Algo::Gemm
        }
    } else {
        algo
    }
}

/// Algorithm for an op with `m` output rows (channels) on images `w` wide with kernel
/// size `k`; `wgrad` for backward-weight.
///
/// The AVX-512 kernels beat the alternatives on every preset shape they can take
/// (measured); backward-weight with more than 32 output channels vectorises over the
/// channels (`Direct512Co`), which beats both sgemm and the pixel-vectorised kernel there.
fn pick_algo_for(m: usize, w: usize, k: usize, wgrad: bool) -> Algo {
    if !cfg!(debug_assertions) && fits512(w, k) && simd512::available() {
        if wgrad && m > 32 {
            Algo::Direct512Co
        } else {
            Algo::Direct512
        }
    } else {
        pick_algo(m)
    }
}

/// Algorithm for backward-weight of `s`: the input-channel-vectorised kernel for 1x1 and
/// 3x3 kernels with at least 16 input and at most 32 output channels (there the
/// pixel-vectorised kernel has too few output channels to reuse each input load, and
/// re-reads the whole padded image from L2 once per block of 3 channels), otherwise
/// [`pick_algo_for`].
fn pick_wgrad_algo(s: &ConvShape) -> Algo {
    let a = pick_algo_for(s.cout, s.width, s.kernel, true);
    if a == Algo::Direct512 && fits512ci(s.kernel) && s.cin >= 16 && s.cout <= 32 {
        Algo::Direct512Ci
    } else {
        a
    }
}

fn pick_algo(m: usize) -> Algo {
    // Unoptimised (debug) builds do not inline the SIMD intrinsics, which makes the direct
    // kernels ~100x slower there, far behind the (always optimised) matrixmultiply path;
    // `debug_assertions` is the available proxy. The unit tests exercise both paths.
    if m <= DIRECT_MAX_M && !cfg!(debug_assertions) && simd::available() {
        Algo::Direct
    } else {
        Algo::Gemm
    }
}

/// How backward-data is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataPlan {
    /// Convolution of `dy` with the flipped, channel-transposed kernel.
    Flipped(Algo),
    /// `dcols = Wᵀ · dy` (sgemm), then col2im.
    Col2im,
}

fn pick_data_plan(s: &ConvShape) -> DataPlan {
    // GEMM-to-columns has M = cin·k², K = cout: efficient when cout is not tiny, and its
    // column buffer (∝ cin) is the smaller one when cin < cout. Otherwise convolve with
    // the flipped kernel: a GEMM with M = cin, K = cout·k², or the direct kernel when
    // cin is small.
    let a512 = pick_algo_for(s.cin, s.width, s.kernel, false);
    if a512 == Algo::Direct512 {
        DataPlan::Flipped(a512)
    } else if s.kernel > 1 && s.cin < s.cout && s.cout >= 16 {
        DataPlan::Col2im
    } else {
        DataPlan::Flipped(pick_algo_for(s.cin, s.width, s.kernel, false))
    }
}

/// Defines `fn $name` that runs its body compiled with AVX2+FMA enabled when the CPU has
/// them (so the copy/add loops get 256-bit vectors; the crate's baseline is SSE2), and the
/// baseline build of the same body otherwise. Results are bitwise identical either way:
/// the bodies only copy, add element-wise, or sum in a fixed explicit order.
macro_rules! avx2_multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if simd::available() {
                    // SAFETY: `fast` only adds the AVX2/FMA target features, which the CPU
                    // supports (checked just above); its body is safe code.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

// ---------------------------------------------------------------------------
// Public ops
// ---------------------------------------------------------------------------

/// `y = conv(x, w) + b`, optionally followed by ReLU (`relu = true`); `y` is overwritten.
///
/// `x` is `[batch][cin][h][w]`, `w` is `[cout][cin][k][k]`, `b` is `[cout]`,
/// `y` is `[batch][cout][h][w]`.
///
/// # Panics
///
/// If the kernel size is even, or if any slice length differs from what `s` implies
/// (`input_len`, `weight_len`, `cout`, `output_len`).
pub fn conv2d_forward(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32], relu: bool, y: &mut [f32]) {
    forward_with(
        s,
        x,
        w,
        b,
        relu,
        y,
        pick_algo_for(s.cout, s.width, s.kernel, false),
    );
}

fn forward_with(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    relu: bool,
    y: &mut [f32],
    algo: Algo,
) {
    s.check_kernel("conv2d_forward");
    assert_eq!(x.len(), s.input_len(), "conv2d_forward: x length");
    assert_eq!(w.len(), s.weight_len(), "conv2d_forward: w length");
    assert_eq!(b.len(), s.cout, "conv2d_forward: b length");
    assert_eq!(y.len(), s.output_len(), "conv2d_forward: y length");
    SameConv::new(s.batch, s.cin, s.cout, s.height, s.width, s.kernel).run(
        x,
        w,
        Some(b),
        relu,
        y,
        algo,
    );
}

/// `dx = conv_transpose(dy, w)`: the gradient of `conv2d_forward` (without ReLU) with
/// respect to `x`, given the output gradient `dy`. `dx` is overwritten.
///
/// # Panics
///
/// If the kernel size is even, or if any slice length differs from what `s` implies.
pub fn conv2d_backward_data(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    backward_data_with(s, dy, w, dx, pick_data_plan(s));
}

fn backward_data_with(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32], plan: DataPlan) {
    s.check_kernel("conv2d_backward_data");
    assert_eq!(dy.len(), s.output_len(), "conv2d_backward_data: dy length");
    assert_eq!(w.len(), s.weight_len(), "conv2d_backward_data: w length");
    assert_eq!(dx.len(), s.input_len(), "conv2d_backward_data: dx length");
    let (cin, cout, k) = (s.cin, s.cout, s.kernel);
    let hw = s.hw();
    if dx.is_empty() {
        return;
    }
    if cout == 0 {
        dx.fill(0.0);
        return;
    }
    match plan {
        DataPlan::Flipped(algo) => {
            // For stride 1 and symmetric padding, the transposed convolution is itself a
            // "same" convolution of dy with the spatially flipped, channel-transposed
            // kernel.
            let p = SameConv::new(s.batch, cout, cin, s.height, s.width, k);
            with_scratch(&FLIP_SCRATCH, w.len(), |wf| {
                flip_transpose_weights(cout, cin, k, w, wf);
                p.run(dy, wf, None, false, dx, algo);
            });
        }
        DataPlan::Col2im => {
            // dcols[cin*k*k, hw] = Wᵀ · dy per image, then scatter-add (col2im).
            let kc = cin * k * k;
            dx.par_chunks_mut(cin * hw)
                .zip(dy.par_chunks(cout * hw))
                .for_each(|(dxi, dyi)| {
                    if k == 1 {
                        gemm(kc, cout, hw, w, 1, kc, dyi, hw, 1, 0.0, dxi, hw, 1);
                        return;
                    }
                    with_worker_scratch(kc * hw, |dcols| {
                        gemm(kc, cout, hw, w, 1, kc, dyi, hw, 1, 0.0, dcols, hw, 1);
                        col2im(dcols, cin, s.height, s.width, k, dxi);
                    });
                });
        }
    }
}

/// `dw = Σ_batch dy ⋆ x` and `db = Σ dy` (the gradients of `conv2d_forward` without ReLU
/// with respect to `w` and `b`); both are overwritten.
///
/// The batch is split into chunks whose size depends only on `s.batch`; per-chunk partial
/// sums are added in chunk order, so the result is bitwise reproducible for any number of
/// rayon threads.
///
/// # Panics
///
/// If the kernel size is even, or if any slice length differs from what `s` implies.
pub fn conv2d_backward_weight(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    backward_weight_with(s, x, dy, dw, db, pick_wgrad_algo(s));
}

fn backward_weight_with(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    algo: Algo,
) {
    s.check_kernel("conv2d_backward_weight");
    assert_eq!(x.len(), s.input_len(), "conv2d_backward_weight: x length");
    assert_eq!(
        dy.len(),
        s.output_len(),
        "conv2d_backward_weight: dy length"
    );
    assert_eq!(
        dw.len(),
        s.weight_len(),
        "conv2d_backward_weight: dw length"
    );
    assert_eq!(db.len(), s.cout, "conv2d_backward_weight: db length");
    dw.fill(0.0);
    db.fill(0.0);
    let hw = s.hw();
    if s.batch == 0 || hw == 0 || s.cout == 0 {
        return;
    }
    let (cin, cout, k, h, w) = (s.cin, s.cout, s.kernel, s.height, s.width);
    let kc = cin * k * k;
    let in_img = cin * hw;
    let out_img = cout * hw;
    let algo = if kc == 0 {
        Algo::Gemm
    } else {
        usable(algo, cout, w, k)
    };

    let chunk = s.batch.div_ceil(MAX_WEIGHT_CHUNKS.min(s.batch));
    let nchunks = s.batch.div_ceil(chunk);
    let part_len = dw.len() + cout;
    let geo = PadGeo::new(h, w, k, 8);

    with_call_scratch(nchunks * part_len, |parts| {
        parts
            .par_chunks_mut(part_len)
            .enumerate()
            .for_each(|(chunk_idx, part)| {
                let first = chunk_idx * chunk;
                let imgs = first..(first + chunk).min(s.batch);
                let (pdw, pdb) = part.split_at_mut(kc * cout);
                pdb.fill(0.0);
                for i in imgs.clone() {
                    let dyi = &dy[i * out_img..(i + 1) * out_img];
                    for (co, d) in pdb.iter_mut().enumerate() {
                        *d += sum_f32(&dyi[co * hw..(co + 1) * hw]);
                    }
                }
                match algo {
                    Algo::Gemm => {
                        // Columns in transposed, channels-last order: colsT[hw][(ki,kj,ci)],
                        // so both the im2col copies (k·cin floats) and sgemm's packing of
                        // B are contiguous. The partial comes out as [cout][ki][kj][ci].
                        let gt = PadGeo::new(h, w, k, 1);
                        let xt_len = gt.plane * cin;
                        with_worker_scratch(xt_len + kc * hw, |buf| {
                            let (xt, cols) = buf.split_at_mut(xt_len);
                            for i in imgs.clone() {
                                let dyi = &dy[i * out_img..(i + 1) * out_img];
                                let xi = &x[i * in_img..(i + 1) * in_img];
                                im2col_t(xi, cin, &gt, xt, cols);
                                let beta = if i == first { 0.0 } else { 1.0 };
                                // dW'[cout, kc] (+)= dy[cout, hw] · colsT[hw, kc]
                                gemm(cout, hw, kc, dyi, hw, 1, cols, kc, 1, beta, pdw, kc, 1);
                            }
                        });
                    }
                    Algo::Direct512Ci => {
                        // dWc[co][tap][ci] accumulated image by image, from a channels-last
                        // zero-padded copy of the image (input channels padded to 16).
                        let ldc = cin.div_ceil(simd512::L) * simd512::L;
                        let kk = k * k;
                        let xt_len = (h + k - 1) * (w + k - 1) * ldc;
                        let dwc_len = cout * kk * ldc;
                        with_worker_scratch(xt_len + dwc_len, |buf| {
                            let (xt, dwc) = buf.split_at_mut(xt_len);
                            xt.fill(0.0);
                            dwc.fill(0.0);
                            for i in imgs.clone() {
                                simd512::pad_channels_last(
                                    &x[i * in_img..(i + 1) * in_img],
                                    cin,
                                    h,
                                    w,
                                    k,
                                    ldc,
                                    xt,
                                );
                                let dyi = &dy[i * out_img..(i + 1) * out_img];
                                // Channel blocks outermost: one block of the image (32
                                // channels, 32 KB at 16x16) stays in L1 across the
                                // output-channel blocks.
                                for c0 in (0..ldc).step_by(2 * simd512::L) {
                                    let cvn = ((ldc - c0) / simd512::L).min(2);
                                    for (co0, mb) in blocks(cout, simd512::CI_ROWS) {
                                        simd512::wgrad_ci(
                                            mb,
                                            cvn,
                                            k,
                                            xt,
                                            h,
                                            w,
                                            ldc,
                                            c0,
                                            &dyi[co0 * hw..(co0 + mb) * hw],
                                            &mut dwc[co0 * kk * ldc..(co0 + mb) * kk * ldc],
                                        );
                                    }
                                }
                            }
                            for (co, row) in pdw.chunks_exact_mut(kc).enumerate() {
                                for ci in 0..cin {
                                    for t in 0..kk {
                                        row[ci * kk + t] = dwc[(co * kk + t) * ldc + ci];
                                    }
                                }
                            }
                        });
                    }
                    Algo::Direct512Co => {
                        // dW^T[tap][channel] accumulated image by image, from dy transposed
                        // to [pixel][channel] (channels padded to 16 with zeros).
                        let g1 = PadGeo::new(h, w, k, 1);
                        let xp_len = cin * g1.plane + simd512::SLACK;
                        let ldo = cout.div_ceil(simd512::L) * simd512::L;
                        let len = xp_len + hw * ldo + kc * ldo;
                        with_worker_scratch(len, |buf| {
                            let (xp, rest) = buf.split_at_mut(xp_len);
                            let (dyt, dwt) = rest.split_at_mut(hw * ldo);
                            let dwt = &mut dwt[..kc * ldo];
                            dyt.fill(0.0);
                            dwt.fill(0.0);
                            for i in imgs.clone() {
                                pad_image(&x[i * in_img..(i + 1) * in_img], cin, &g1, xp);
                                let dyi = &dy[i * out_img..(i + 1) * out_img];
                                transpose_dy(dyi, cout, hw, dyt, ldo);
                                simd512::wgrad_cols(xp, g1.taps(cin), h, w, dyt, ldo, dwt);
                            }
                            for (co, row) in pdw.chunks_exact_mut(kc).enumerate() {
                                for (t, d) in row.iter_mut().enumerate() {
                                    *d = dwt[t * ldo + co];
                                }
                            }
                        });
                    }
                    Algo::Direct512 => {
                        // All images of the chunk padded (and dy rows widened to 16 lanes,
                        // zero beyond the width) first, so the kernel keeps its
                        // accumulators in registers across the whole chunk.
                        let g1 = PadGeo::new(h, w, k, 1);
                        let lanes = simd512::L;
                        let xp_len = cin * g1.plane + simd512::SLACK;
                        let xs = cin * (h + k - 1) * k * lanes;
                        let ds = cout * h * lanes;
                        let nimg = imgs.len();
                        // + `lanes` to align the start of `xsh` to 64 bytes.
                        let len = xp_len + nimg * (xs + ds) + lanes;
                        with_worker_scratch(len, |buf| {
                            let (xp, rest) = buf.split_at_mut(xp_len);
                            let al = rest.as_ptr().align_offset(64).min(lanes);
                            let (xsh, dyr) = rest[al..].split_at_mut(nimg * xs);
                            let dyr = &mut dyr[..nimg * ds];
                            dyr.fill(0.0);
                            for (n, i) in imgs.clone().enumerate() {
                                pad_image(&x[i * in_img..(i + 1) * in_img], cin, &g1, xp);
                                shifted_rows(xp, cin, &g1, &mut xsh[n * xs..(n + 1) * xs]);
                                let dyi = &dy[i * out_img..(i + 1) * out_img];
                                let dyn_ = &mut dyr[n * ds..(n + 1) * ds];
                                for (r, row) in dyn_.chunks_exact_mut(lanes).enumerate() {
                                    copy_small(&mut row[..w], &dyi[r * w..(r + 1) * w]);
                                }
                            }
                            for (co0, mb) in blocks(cout, simd512::WG_ROWS) {
                                simd512::wgrad_rows(
                                    mb,
                                    nimg,
                                    xsh,
                                    xs,
                                    g1.taps(cin),
                                    h,
                                    &dyr[co0 * h * lanes..],
                                    ds,
                                    &mut pdw[co0 * kc..(co0 + mb) * kc],
                                );
                            }
                        });
                    }
                    Algo::Direct => {
                        let xp_len = geo.padded_len(cin);
                        let dye_len = cout * geo.qpad;
                        let acc_len = cout * kc * 8;
                        with_worker_scratch(xp_len + dye_len + acc_len, |buf| {
                            let (xp, rest) = buf.split_at_mut(xp_len);
                            let (dye, acc) = rest.split_at_mut(dye_len);
                            acc.fill(0.0);
                            for i in imgs.clone() {
                                pad_image(&x[i * in_img..(i + 1) * in_img], cin, &geo, xp);
                                // dy on the padded-width grid, zero in the gap columns.
                                dye.fill(0.0);
                                let dyi = &dy[i * out_img..(i + 1) * out_img];
                                for co in 0..cout {
                                    for oy in 0..h {
                                        copy_small(
                                            &mut dye[co * geo.qpad + oy * geo.wp..][..w],
                                            &dyi[(co * h + oy) * w..][..w],
                                        );
                                    }
                                }
                                for (co0, mb) in row_blocks(cout) {
                                    simd::wgrad_rows(
                                        mb,
                                        xp,
                                        geo.taps(cin),
                                        &dye[co0 * geo.qpad..(co0 + mb) * geo.qpad],
                                        geo.qpad,
                                        &mut acc[co0 * kc * 8..(co0 + mb) * kc * 8],
                                    );
                                }
                            }
                            for (d, lanes) in pdw.iter_mut().zip(acc.chunks_exact(8)) {
                                *d = hsum8(lanes);
                            }
                        });
                    }
                }
            });
        // Sum the chunk partials into the first one: in parallel over element ranges, each
        // element in chunk order (so the result does not depend on the thread count).
        let (first, rest) = parts.split_at_mut(part_len);
        let rest = &*rest;
        const RANGE: usize = 1 << 14;
        first
            .par_chunks_mut(RANGE)
            .enumerate()
            .for_each(|(r, dst)| {
                for part in rest.chunks_exact(part_len) {
                    add_assign(dst, &part[r * RANGE..r * RANGE + dst.len()]);
                }
            });
        let (pdw, pdb) = first.split_at(dw.len());
        db.copy_from_slice(pdb);
        match algo {
            Algo::Direct | Algo::Direct512 | Algo::Direct512Co | Algo::Direct512Ci => {
                dw.copy_from_slice(pdw)
            }
            Algo::Gemm if kc > 0 => {
                // [cout][ki][kj][ci] -> [cout][ci][ki][kj]
                let kk = k * k;
                dw.par_chunks_mut(kc)
                    .zip(pdw.par_chunks(kc))
                    .for_each(|(d, p)| {
                        for t in 0..kk {
                            for ci in 0..cin {
                                d[ci * kk + t] = p[t * cin + ci];
                            }
                        }
                    });
            }
            Algo::Gemm => {}
        }
    });
}

/// Most chunks the batch is split into by `conv2d_backward_weight` (fixed, so that the
/// summation order, hence the result, does not depend on the thread count).
const MAX_WEIGHT_CHUNKS: usize = 16;

avx2_multiversion! {
    /// Sum of a slice with 16 independent accumulators (vectorises; fixed order, so
    /// deterministic).
    fn sum_f32(v: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let mut chunks = v.chunks_exact(16);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
            *a += x;
        }
        let mut n = 16;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                acc[i] += acc[i + n];
            }
        }
        acc[0]
    }
}

/// Sum of 8 lanes in a fixed pairwise order.
fn hsum8(v: &[f32]) -> f32 {
    ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
}

// ---------------------------------------------------------------------------
// Shared implementation
// ---------------------------------------------------------------------------

/// A stride-1 "same" convolution problem (also used for backward-data with the
/// flipped kernel).
#[derive(Clone, Copy, Debug)]
struct SameConv {
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
}

impl SameConv {
    fn new(batch: usize, cin: usize, cout: usize, h: usize, w: usize, k: usize) -> Self {
        SameConv {
            batch,
            cin,
            cout,
            h,
            w,
            k,
        }
    }

    /// Images per sgemm. Several images are batched into one GEMM (N = imgs * HW) when
    /// the per-image problem is small, which amortises sgemm's fixed costs and its
    /// packing of the weights.
    fn group(&self) -> usize {
        let hw = self.h * self.w;
        let target = 512usize; // columns per GEMM we aim for
        let g = target.div_ceil(hw.max(1)).max(1);
        // Keep enough tasks for load balance on small batches.
        g.min(self.batch.div_ceil(8).max(1))
    }

    fn run(
        &self,
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
        algo: Algo,
    ) {
        let hw = self.h * self.w;
        if self.batch == 0 || hw == 0 || self.cout == 0 {
            return;
        }
        let in_img = self.cin * hw;
        let out_img = self.cout * hw;
        // Direct512Ci only differs from Direct512 in backward-weight.
        let algo = match algo {
            Algo::Direct512Ci => Algo::Direct512,
            a => a,
        };
        let algo = usable(algo, self.cout, self.w, self.k);
        if in_img == 0 {
            // No input channels: the output is just the bias.
            y.par_chunks_mut(out_img)
                .for_each(|yi| fill_bias(yi, hw, bias, relu));
            return;
        }
        match algo {
            Algo::Gemm => {
                let g = self.group();
                y.par_chunks_mut(g * out_img)
                    .zip(x.par_chunks(g * in_img))
                    .for_each(|(yg, xg)| self.run_group(xg, wt, bias, relu, yg));
            }
            Algo::Direct => self.run_direct(x, wt, bias, relu, y),
            Algo::Direct512 | Algo::Direct512Co | Algo::Direct512Ci => {
                self.run_direct512(x, wt, bias, relu, y)
            }
        }
    }

    fn run_group(&self, x: &[f32], wt: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
        let (cin, cout, k) = (self.cin, self.cout, self.k);
        let hw = self.h * self.w;
        let kc = cin * k * k;
        let imgs = x.len() / (cin * hw);
        let n = imgs * hw;
        if imgs == 1 {
            let cols_len = if k == 1 { 0 } else { kc * hw };
            with_worker_scratch(cols_len, |cols| {
                let b: &[f32] = if k == 1 {
                    x
                } else {
                    im2col(x, cin, self.h, self.w, k, cols, hw);
                    cols
                };
                let beta = if bias.is_some() {
                    fill_bias(y, hw, bias, false);
                    1.0
                } else {
                    0.0
                };
                gemm(cout, kc, hw, wt, kc, 1, b, hw, 1, beta, y, hw, 1);
                if relu {
                    relu_inplace(y);
                }
            });
            return;
        }
        with_worker_scratch(kc * n + cout * n, |buf| {
            let (cols, out) = buf.split_at_mut(kc * n);
            for i in 0..imgs {
                let xi = &x[i * cin * hw..(i + 1) * cin * hw];
                if k == 1 {
                    for c in 0..cin {
                        cols[c * n + i * hw..c * n + (i + 1) * hw]
                            .copy_from_slice(&xi[c * hw..(c + 1) * hw]);
                    }
                } else {
                    im2col(xi, cin, self.h, self.w, k, &mut cols[i * hw..], n);
                }
            }
            gemm(cout, kc, n, wt, kc, 1, cols, n, 1, 0.0, out, n, 1);
            for i in 0..imgs {
                for co in 0..cout {
                    let src = &out[co * n + i * hw..co * n + (i + 1) * hw];
                    let dst = &mut y[(i * cout + co) * hw..(i * cout + co + 1) * hw];
                    let b = bias.map_or(0.0, |b| b[co]);
                    bias_relu_rows(dst, hw, src, hw, 1, hw, b, relu);
                }
            }
        });
    }

    /// AVX-512 direct convolution (one image row per vector), one image per rayon task.
    fn run_direct512(
        &self,
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        let (cin, cout, k, h, w) = (self.cin, self.cout, self.k, self.h, self.w);
        let hw = h * w;
        let kc = cin * k * k;
        let geo = PadGeo::new(h, w, k, 1);
        let xp_len = cin * geo.plane + simd512::SLACK;
        with_call_scratch(cout * kc, |wpack| {
            // Per row block, weights as [tap][row] so one tap's rows are adjacent.
            for (co0, mb) in blocks(cout, simd512::FWD_ROWS) {
                let blk = &mut wpack[co0 * kc..(co0 + mb) * kc];
                for t in 0..kc {
                    for m in 0..mb {
                        blk[t * mb + m] = wt[(co0 + m) * kc + t];
                    }
                }
            }
            let wpack = &*wpack;
            y.par_chunks_mut(cout * hw)
                .zip(x.par_chunks(cin * hw))
                .for_each(|(yi, xi)| {
                    with_worker_scratch(xp_len, |xp| {
                        pad_image(xi, cin, &geo, xp);
                        for (co0, mb) in blocks(cout, simd512::FWD_ROWS) {
                            // Bias (0 without one: `s + 0.0`, as before) and ReLU are
                            // applied in registers, and the rows stored straight into `y`.
                            let mut bv = [0.0f32; simd512::FWD_ROWS];
                            if let Some(b) = bias {
                                bv[..mb].copy_from_slice(&b[co0..co0 + mb]);
                            }
                            simd512::fwd_rows(
                                mb,
                                xp,
                                geo.taps(cin),
                                h,
                                w,
                                &wpack[co0 * kc..(co0 + mb) * kc],
                                &bv,
                                relu,
                                &mut yi[co0 * hw..(co0 + mb) * hw],
                            );
                        }
                    });
                });
        });
    }

    /// Direct (implicit-GEMM) convolution, one image per rayon task.
    fn run_direct(&self, x: &[f32], wt: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
        let (cin, cout, k, h, w) = (self.cin, self.cout, self.k, self.h, self.w);
        let hw = h * w;
        let kc = cin * k * k;
        let geo = PadGeo::new(h, w, k, 16);
        let xp_len = geo.padded_len(cin);
        with_call_scratch(cout * kc, |wpack| {
            // Per row block, weights as [tap][row] so one tap's rows are adjacent.
            for (co0, mb) in row_blocks(cout) {
                let blk = &mut wpack[co0 * kc..(co0 + mb) * kc];
                for t in 0..kc {
                    for m in 0..mb {
                        blk[t * mb + m] = wt[(co0 + m) * kc + t];
                    }
                }
            }
            let wpack = &*wpack;
            y.par_chunks_mut(cout * hw)
                .zip(x.par_chunks(cin * hw))
                .for_each(|(yi, xi)| {
                    with_worker_scratch(xp_len + cout * geo.qpad, |buf| {
                        let (xp, out) = buf.split_at_mut(xp_len);
                        pad_image(xi, cin, &geo, xp);
                        for (co0, mb) in row_blocks(cout) {
                            simd::fwd_rows(
                                mb,
                                xp,
                                geo.taps(cin),
                                &wpack[co0 * kc..(co0 + mb) * kc],
                                &mut out[co0 * geo.qpad..(co0 + mb) * geo.qpad],
                                geo.qpad,
                            );
                        }
                        for co in 0..cout {
                            let bv = bias.map_or(0.0, |b| b[co]);
                            bias_relu_rows(
                                &mut yi[co * hw..(co + 1) * hw],
                                w,
                                &out[co * geo.qpad..(co + 1) * geo.qpad],
                                geo.wp,
                                h,
                                w,
                                bv,
                                relu,
                            );
                        }
                    });
                });
        });
    }
}

/// Splits `m` rows into blocks of at most [`simd::MAX_ROWS`] rows, as even as possible.
fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
    blocks(m, simd::MAX_ROWS)
}

/// Splits `m` rows into blocks of at most `max` rows, as even as possible.
fn blocks(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = m.div_ceil(max);
    let (base, extra) = m.checked_div(nb).map_or((0, 0), |b| (b, m - b * nb));
    (0..nb).map(move |b| {
        let start = b * base + b.min(extra);
        (start, base + usize::from(b < extra))
    })
}

/// Geometry of a zero-padded image used by the direct kernels and by `im2col`.
///
/// The image is stored as `[c][hp][wp]` with `hp = h + 2·pad`, `wp = w + 2·pad`. Output
/// pixel `(oy, ox)` lives at `q = oy·wp + ox` on the padded-width grid, and kernel tap
/// `(ci, ki, kj)` of that output reads `xp[ci·plane + ki·wp + kj + q]`. Positions with
/// `ox >= w` are computed but discarded. `q` runs up to `qpad` (a multiple of the SIMD
/// block), and the buffer carries `qpad - qlen` zeros of slack so the last block's reads
/// stay in bounds.
#[derive(Clone, Copy, Debug)]
struct PadGeo {
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    wp: usize,
    plane: usize,
    /// Last valid output position + 1: `(h-1)·wp + w`.
    qlen: usize,
    /// `qlen` rounded up to the SIMD block.
    qpad: usize,
}

impl PadGeo {
    fn new(h: usize, w: usize, k: usize, block: usize) -> Self {
        let pad = k / 2;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let qlen = if h == 0 { 0 } else { (h - 1) * wp + w };
        PadGeo {
            h,
            w,
            k,
            pad,
            wp,
            plane: hp * wp,
            qlen,
            qpad: qlen.div_ceil(block) * block,
        }
    }

    /// Length of the padded buffer for `c` channels, including the read slack.
    fn padded_len(&self, c: usize) -> usize {
        c * self.plane + (self.qpad - self.qlen)
    }

    fn taps(&self, cin: usize) -> simd::Taps {
        simd::Taps {
            cin,
            k: self.k,
            plane: self.plane,
            wp: self.wp,
        }
    }
}

avx2_multiversion! {
    /// Copies `x` (`[c][h][w]`) into `xp` (`[c][hp][wp]` plus slack), zeroing the border.
    fn pad_image(x: &[f32], c: usize, g: &PadGeo, xp: &mut [f32]) {
        pad_image_inline(x, c, g, xp)
    }
}

#[inline(always)]
fn pad_image_inline(x: &[f32], c: usize, g: &PadGeo, xp: &mut [f32]) {
    let (h, w, pad, wp) = (g.h, g.w, g.pad, g.wp);
    let (planes, slack) = xp.split_at_mut(c * g.plane);
    slack.fill(0.0);
    if h == 0 || w == 0 {
        planes.fill(0.0);
        return;
    }
    // Every element is written exactly once: zero runs for the border, copies inside.
    for (ci, p) in planes.chunks_exact_mut(g.plane).enumerate() {
        p[..pad * wp + pad].fill(0.0);
        for iy in 0..h {
            let a = (iy + pad) * wp + pad;
            copy_small(&mut p[a..a + w], &x[(ci * h + iy) * w..][..w]);
            if iy + 1 < h {
                // right border of this row + left border of the next one
                zero_small(&mut p[a + w..a + w + 2 * pad]);
            }
        }
        p[(h - 1 + pad) * wp + pad + w..].fill(0.0);
    }
}

avx2_multiversion! {
    /// For the AVX-512 weight-gradient kernel: `xsh[((ci·hp + r)·k + kj)·16 + l] =
    /// xp[ci·plane + r·wp + kj + l]` for every padded row `r < hp`, kernel column `kj < k`
    /// and lane `l < 16` (`xp` is a padded image with at least 16 floats of slack).
    fn shifted_rows(xp: &[f32], cin: usize, g: &PadGeo, xsh: &mut [f32]) {
        let (k, wp) = (g.k, g.wp);
        let hp = g.plane / wp.max(1);
        let mut dst = xsh.chunks_exact_mut(16);
        for ci in 0..cin {
            for r in 0..hp {
                let src = &xp[ci * g.plane + r * wp..];
                for kj in 0..k {
                    let d: &mut [f32; 16] = dst.next().unwrap().try_into().unwrap();
                    let s: &[f32; 16] = src[kj..kj + 16].try_into().unwrap();
                    *d = *s;
                }
            }
        }
    }
}

avx2_multiversion! {
    /// `dyt[p·ldo + c] = dy[c·hw + p]` for `c < cout`, `p < hw`, in 8 x 8 tiles (contiguous
    /// 8-float reads and writes).
    fn transpose_dy(dy: &[f32], cout: usize, hw: usize, dyt: &mut [f32], ldo: usize) {
        const B: usize = 8;
        for c0 in (0..cout).step_by(B) {
            let cn = (cout - c0).min(B);
            for p0 in (0..hw).step_by(B) {
                let pn = (hw - p0).min(B);
                let mut tile = [[0.0f32; B]; B];
                for (c, t) in tile.iter_mut().enumerate().take(cn) {
                    let src = &dy[(c0 + c) * hw + p0..][..pn];
                    t[..pn].copy_from_slice(src);
                }
                for p in 0..pn {
                    let dst = &mut dyt[(p0 + p) * ldo + c0..][..cn];
                    for (c, d) in dst.iter_mut().enumerate() {
                        *d = tile[c][p];
                    }
                }
            }
        }
    }
}

/// Writes the bias (or zero) into every row of `y` (`[c][hw]`), with optional ReLU.
fn fill_bias(y: &mut [f32], hw: usize, bias: Option<&[f32]>, relu: bool) {
    for (c, row) in y.chunks_exact_mut(hw).enumerate() {
        let v = bias.map_or(0.0, |b| b[c]);
        row.fill(if relu { v.max(0.0) } else { v });
    }
}

avx2_multiversion! {
    /// `dst[r·dst_rs + j] = src[r·src_rs + j] + b` (then ReLU if `relu`) for `r < rows`,
    /// `j < len`.
    fn bias_relu_rows(
        dst: &mut [f32],
        dst_rs: usize,
        src: &[f32],
        src_rs: usize,
        rows: usize,
        len: usize,
        b: f32,
        relu: bool,
    ) {
        for r in 0..rows {
            let d = &mut dst[r * dst_rs..][..len];
            let s = &src[r * src_rs..][..len];
            if relu {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = (s + b).max(0.0);
                }
            } else {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = s + b;
                }
            }
        }
    }
}

fn relu_inplace(y: &mut [f32]) {
    for v in y {
        *v = v.max(0.0);
    }
}

#[inline(always)]
fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `wf[ci][co][i][j] = w[co][ci][k-1-i][k-1-j]`.
fn flip_transpose_weights(cout: usize, cin: usize, k: usize, w: &[f32], wf: &mut [f32]) {
    let kk = k * k;
    for co in 0..cout {
        for ci in 0..cin {
            let src = &w[(co * cin + ci) * kk..(co * cin + ci + 1) * kk];
            let dst = &mut wf[(ci * cout + co) * kk..(ci * cout + co + 1) * kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
}

/// im2col for a "same", stride-1 convolution of one image `x` (`[c][h][w]`).
///
/// Writes row `r = (ci * k + ki) * k + kj` of the column matrix at `cols[r * ld ..]`:
/// `cols[r * ld + oy * w + ox] = x[ci][oy + ki - pad][ox + kj - pad]` (zero outside).
///
/// The image is first copied into a zero-bordered buffer, so that every (row, oy)
/// segment is a plain copy of `w` floats; the copies are done inline (no libc call
/// per 14-float segment).
fn im2col(x: &[f32], c: usize, h: usize, w: usize, k: usize, cols: &mut [f32], ld: usize) {
    let g = PadGeo::new(h, w, k, 1);
    with_scratch(&PAD_SCRATCH, g.padded_len(c), |xp| {
        im2col_padded(x, c, &g, xp, cols, ld)
    });
}

avx2_multiversion! {
    /// `im2col` given the padded-image scratch `xp`.
    fn im2col_padded(x: &[f32], c: usize, g: &PadGeo, xp: &mut [f32], cols: &mut [f32], ld: usize) {
        let (h, w, k) = (g.h, g.w, g.k);
        let hw = h * w;
        pad_image_inline(x, c, g, xp);
        for ci in 0..c {
            for ki in 0..k {
                for kj in 0..k {
                    let r = (ci * k + ki) * k + kj;
                    let row = &mut cols[r * ld..r * ld + hw];
                    let src = &xp[ci * g.plane + ki * g.wp + kj..];
                    for oy in 0..h {
                        copy_small(
                            &mut row[oy * w..(oy + 1) * w],
                            &src[oy * g.wp..oy * g.wp + w],
                        );
                    }
                }
            }
        }
    }
}

avx2_multiversion! {
/// Transposed, channels-last im2col of one image `x` (`[c][h][w]`), via the zero-padded
/// channels-last copy `xt` (`[hp][wp][c]`, `g.plane * c` floats):
/// `cols[(oy·w + ox)·kc + (ki·k + kj)·c + ci] = x[ci][oy + ki - pad][ox + kj - pad]`.
fn im2col_t(x: &[f32], c: usize, g: &PadGeo, xt: &mut [f32], cols: &mut [f32]) {
    let (h, w, k, wp) = (g.h, g.w, g.k, g.wp);
    let kc = c * k * k;
    xt.fill(0.0);
    for ci in 0..c {
        for iy in 0..h {
            let src = &x[(ci * h + iy) * w..][..w];
            let base = ((iy + g.pad) * wp + g.pad) * c + ci;
            for (ix, &v) in src.iter().enumerate() {
                xt[base + ix * c] = v;
            }
        }
    }
    let run = k * c;
    for oy in 0..h {
        for ox in 0..w {
            let dst = &mut cols[(oy * w + ox) * kc..][..kc];
            for ki in 0..k {
                let src = &xt[((oy + ki) * wp + ox) * c..][..run];
                copy_small(&mut dst[ki * run..(ki + 1) * run], src);
            }
        }
    }
}
}

/// `dst.fill(0.0)` for slices of at most 16 elements, without a libc call.
#[inline(always)]
fn zero_small(dst: &mut [f32]) {
    const ZEROS: [f32; 16] = [0.0; 16];
    let n = dst.len();
    copy_small(dst, &ZEROS[..n]);
}

/// `dst.copy_from_slice(src)` for short slices, as a few fixed-size (inlined) moves.
#[inline(always)]
fn copy_small(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len());
    macro_rules! blk {
        ($at:expr, $len:literal) => {{
            let at = $at;
            let d: &mut [f32; $len] = (&mut dst[at..at + $len]).try_into().unwrap();
            let s: &[f32; $len] = (&src[at..at + $len]).try_into().unwrap();
            *d = *s;
        }};
    }
    if n >= 16 {
        let mut i = 0;
        while i + 16 <= n {
            blk!(i, 16);
            i += 16;
        }
        if i < n {
            blk!(n - 16, 16);
        }
    } else if n >= 8 {
        blk!(0, 8);
        blk!(n - 8, 8);
    } else if n >= 4 {
        blk!(0, 4);
        blk!(n - 4, 4);
    } else {
        // Explicit stores: a 0..n loop could be turned back into a memcpy call.
        if n > 0 {
            dst[0] = src[0];
        }
        if n > 1 {
            dst[1] = src[1];
        }
        if n > 2 {
            dst[2] = src[2];
        }
    }
}

avx2_multiversion! {
/// Adjoint of `im2col` (with `ld = h * w`): `x = 0`, then every column entry is added
/// back to the input pixel it was read from.
fn col2im(cols: &[f32], c: usize, h: usize, w: usize, k: usize, x: &mut [f32]) {
    let pad = k / 2;
    let hw = h * w;
    x.fill(0.0);
    for ci in 0..c {
        let xc = &mut x[ci * hw..(ci + 1) * hw];
        for ki in 0..k {
            let oy0 = pad.saturating_sub(ki).min(h);
            let oy1 = (h + pad).saturating_sub(ki).min(h).max(oy0);
            for kj in 0..k {
                let r = (ci * k + ki) * k + kj;
                let row = &cols[r * hw..(r + 1) * hw];
                let ox0 = pad.saturating_sub(kj).min(w);
                let ox1 = (w + pad).saturating_sub(kj).min(w).max(ox0);
                if ox0 == ox1 {
                    continue;
                }
                for oy in oy0..oy1 {
                    let iy = oy + ki - pad;
                    let src = &row[oy * w + ox0..oy * w + ox1];
                    let dst = &mut xc[iy * w + ox0 + kj - pad..iy * w + ox1 + kj - pad];
                    add_assign(dst, src);
                }
            }
        }
    }
}
}

// ---------------------------------------------------------------------------
// Direct SIMD kernels
// ---------------------------------------------------------------------------

/// AVX2+FMA kernels for the direct path. Safe wrappers: they check bounds and CPU support.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// Most rows (output channels) one kernel call handles.
    pub(super) const MAX_ROWS: usize = 6;

    /// Tap geometry: tap `t = (ci·k + ki)·k + kj` reads at `ci·plane + ki·wp + kj`.
    #[derive(Clone, Copy, Debug)]
    pub(super) struct Taps {
        pub(super) cin: usize,
        pub(super) k: usize,
        pub(super) plane: usize,
        pub(super) wp: usize,
    }

    impl Taps {
        fn count(&self) -> usize {
            self.cin * self.k * self.k
        }
        /// Largest tap offset (requires at least one tap).
        pub(super) fn max_offset(&self) -> usize {
            (self.cin - 1) * self.plane + (self.k - 1) * (self.wp + 1)
        }
        pub(super) fn offset(&self, t: usize) -> usize {
            let kk = self.k * self.k;
            let (ci, r) = (t / kk, t % kk);
            ci * self.plane + (r / self.k) * self.wp + r % self.k
        }
    }

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `out[m·ldo + q] = Σ_t wb[t·mb + m] · xp[offset(t) + q]` for `m < mb`, `q < ldo`
    /// (`ldo` a multiple of 16).
    ///
    /// # Panics
    ///
    /// If AVX2/FMA are unavailable, `mb` is not in `1..=MAX_ROWS`, or a slice is too short.
    pub(super) fn fwd_rows(
        mb: usize,
        xp: &[f32],
        g: Taps,
        wb: &[f32],
        out: &mut [f32],
        ldo: usize,
    ) {
        assert!(available(), "direct conv kernel needs AVX2 and FMA");
        let kc = g.count();
        assert!(kc > 0 && ldo & 15 == 0, "fwd_rows: bad ldo");
        assert!(g.max_offset() + ldo <= xp.len(), "fwd_rows: xp too short");
        assert!(wb.len() >= kc * mb, "fwd_rows: weights too short");
        assert!(out.len() >= mb * ldo, "fwd_rows: out too short");
        // SAFETY: AVX2 and FMA are available (checked above). Every load is at
        // `xp + offset(t) + q + j` with `offset(t) <= max_offset`, `q + j < ldo`, inside
        // `xp` by the assert; weight reads are `< kc·mb <= wb.len()`; stores are
        // `< mb·ldo <= out.len()`.
        unsafe {
            match mb {
                1 => fwd_rows_impl::<1>(xp.as_ptr(), g, wb.as_ptr(), out.as_mut_ptr(), ldo),
                2 => fwd_rows_impl::<2>(xp.as_ptr(), g, wb.as_ptr(), out.as_mut_ptr(), ldo),
                3 => fwd_rows_impl::<3>(xp.as_ptr(), g, wb.as_ptr(), out.as_mut_ptr(), ldo),
                4 => fwd_rows_impl::<4>(xp.as_ptr(), g, wb.as_ptr(), out.as_mut_ptr(), ldo),
                5 => fwd_rows_impl::<5>(xp.as_ptr(), g, wb.as_ptr(), out.as_mut_ptr(), ldo),
                6 => fwd_rows_impl::<6>(xp.as_ptr(), g, wb.as_ptr(), out.as_mut_ptr(), ldo),
                _ => panic!("fwd_rows: bad row count {mb}"),
            }
        }
    }

    /// # Safety
    ///
    /// See [`fwd_rows`]: AVX2+FMA available and all accesses in bounds.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fwd_rows_impl<const MB: usize>(
        xp: *const f32,
        g: Taps,
        wb: *const f32,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: the caller guarantees the CPU features and the bounds.
        unsafe {
            let mut q = 0;
            while q < ldo {
                let mut acc = [[_mm256_setzero_ps(); 2]; MB];
                let mut wt = wb;
                for ci in 0..g.cin {
                    for ki in 0..g.k {
                        let row = xp.add(ci * g.plane + ki * g.wp + q);
                        for kj in 0..g.k {
                            let x0 = _mm256_loadu_ps(row.add(kj));
                            let x1 = _mm256_loadu_ps(row.add(kj + 8));
                            for (m, a) in acc.iter_mut().enumerate() {
                                let wv = _mm256_broadcast_ss(&*wt.add(m));
                                a[0] = _mm256_fmadd_ps(wv, x0, a[0]);
                                a[1] = _mm256_fmadd_ps(wv, x1, a[1]);
                            }
                            wt = wt.add(MB);
                        }
                    }
                }
                for (m, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.add(m * ldo + q), a[0]);
                    _mm256_storeu_ps(out.add(m * ldo + q + 8), a[1]);
                }
                q += 16;
            }
        }
    }

    /// Weight-gradient partials: for `m < mb` and every tap `t`,
    /// `acc[(m·kc + t)·8 + l] += Σ_{q ≡ l mod 8, q < ldd} dye[m·ldd + q] · xp[offset(t) + q]`
    /// (`ldd` a multiple of 8).
    ///
    /// # Panics
    ///
    /// If AVX2/FMA are unavailable, `mb` is not in `1..=MAX_ROWS`, or a slice is too short.
    pub(super) fn wgrad_rows(
        mb: usize,
        xp: &[f32],
        g: Taps,
        dye: &[f32],
        ldd: usize,
        acc: &mut [f32],
    ) {
        assert!(available(), "direct conv kernel needs AVX2 and FMA");
        let kc = g.count();
        assert!(kc > 0 && ldd & 7 == 0, "wgrad_rows: bad ldd");
        assert!(g.max_offset() + ldd <= xp.len(), "wgrad_rows: xp too short");
        assert!(dye.len() >= mb * ldd, "wgrad_rows: dy too short");
        assert!(acc.len() >= mb * kc * 8, "wgrad_rows: acc too short");
        // SAFETY: features checked above; loads are at `xp + offset(t) + q + j` with
        // `offset(t) <= max_offset` and `q + j < ldd`, and `dye + m·ldd + q + j` with
        // `m < mb`; accumulator accesses are `< mb·kc·8`; all within the asserted lengths.
        unsafe {
            match mb {
                1 => wgrad_rows_impl::<1>(xp.as_ptr(), g, dye.as_ptr(), ldd, acc.as_mut_ptr()),
                2 => wgrad_rows_impl::<2>(xp.as_ptr(), g, dye.as_ptr(), ldd, acc.as_mut_ptr()),
                3 => wgrad_rows_impl::<3>(xp.as_ptr(), g, dye.as_ptr(), ldd, acc.as_mut_ptr()),
                4 => wgrad_rows_impl::<4>(xp.as_ptr(), g, dye.as_ptr(), ldd, acc.as_mut_ptr()),
                5 => wgrad_rows_impl::<5>(xp.as_ptr(), g, dye.as_ptr(), ldd, acc.as_mut_ptr()),
                6 => wgrad_rows_impl::<6>(xp.as_ptr(), g, dye.as_ptr(), ldd, acc.as_mut_ptr()),
                _ => panic!("wgrad_rows: bad row count {mb}"),
            }
        }
    }

    /// # Safety
    ///
    /// See [`wgrad_rows`]: AVX2+FMA available and all accesses in bounds.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn wgrad_rows_impl<const MB: usize>(
        xp: *const f32,
        g: Taps,
        dye: *const f32,
        ldd: usize,
        acc: *mut f32,
    ) {
        let kc = g.count();
        let mut t = 0;
        // SAFETY: forwarded caller guarantees.
        unsafe {
            // Register budget (16 ymm): MB·NT accumulators + NT x vectors + 1 dy vector.
            if MB <= 4 {
                while t + 3 <= kc {
                    let offs = [g.offset(t), g.offset(t + 1), g.offset(t + 2)];
                    wgrad_tile::<MB, 3>(xp, offs, dye, ldd, acc, kc, t);
                    t += 3;
                }
            }
            while t + 2 <= kc {
                wgrad_tile::<MB, 2>(xp, [g.offset(t), g.offset(t + 1)], dye, ldd, acc, kc, t);
                t += 2;
            }
            if t < kc {
                wgrad_tile::<MB, 1>(xp, [g.offset(t)], dye, ldd, acc, kc, t);
            }
        }
    }

    /// # Safety
    ///
    /// See [`wgrad_rows`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn wgrad_tile<const MB: usize, const NT: usize>(
        xp: *const f32,
        offs: [usize; NT],
        dye: *const f32,
        ldd: usize,
        acc: *mut f32,
        kc: usize,
        t0: usize,
    ) {
        // SAFETY: forwarded caller guarantees.
        unsafe {
            let mut a = [[_mm256_setzero_ps(); NT]; MB];
            let mut q = 0;
            while q < ldd {
                let mut xv = [_mm256_setzero_ps(); NT];
                for (j, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(xp.add(offs[j] + q));
                }
                for (m, am) in a.iter_mut().enumerate() {
                    let d = _mm256_loadu_ps(dye.add(m * ldd + q));
                    for (j, v) in am.iter_mut().enumerate() {
                        *v = _mm256_fmadd_ps(d, xv[j], *v);
                    }
                }
                q += 8;
            }
            for (m, am) in a.iter().enumerate() {
                for (j, v) in am.iter().enumerate() {
                    let p = acc.add((m * kc + t0 + j) * 8);
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), *v));
                }
            }
        }
    }
}

/// Stub for targets without the x86-64 kernels: the direct path is never selected.
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub(super) const MAX_ROWS: usize = 6;

    #[derive(Clone, Copy, Debug)]
    #[allow(dead_code)]
    pub(super) struct Taps {
        pub(super) cin: usize,
        pub(super) k: usize,
        pub(super) plane: usize,
        pub(super) wp: usize,
    }

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn fwd_rows(_: usize, _: &[f32], _: Taps, _: &[f32], _: &mut [f32], _: usize) {
        unreachable!("direct conv kernel is only built for x86-64")
    }

    pub(super) fn wgrad_rows(_: usize, _: &[f32], _: Taps, _: &[f32], _: usize, _: &mut [f32]) {
        unreachable!("direct conv kernel is only built for x86-64")
    }
}

/// AVX-512F kernels for the direct path on images at most 16 pixels wide: one output row
/// is one zmm (lanes `>= w` are computed on neighbouring padded pixels and discarded), so
/// no padded-width gap columns are wasted. Safe wrappers check bounds and CPU support.
#[cfg(target_arch = "x86_64")]
mod simd512 {
    use super::simd::Taps;
    use std::arch::x86_64::*;

    /// Lanes per row.
    pub(super) const L: usize = 16;
    /// Most output channels one forward kernel call handles.
    pub(super) const FWD_ROWS: usize = 8;
    /// Most output channels one weight-gradient kernel call handles.
    pub(super) const WG_ROWS: usize = 3;
    /// Most output channels one input-channel-vectorised weight-gradient call handles.
    pub(super) const CI_ROWS: usize = 4;
    /// Largest kernel size the weight-gradient kernel handles.
    pub(super) const MAX_K: usize = 7;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// Reads of the kernels reach `xp[max_offset + (h-1)·wp + 15]`; the padded buffer
    /// (`cin·plane` floats) needs this much zero slack after it.
    pub(super) const SLACK: usize = L;

    fn needed(g: &Taps, h: usize) -> usize {
        (g.cin - 1) * g.plane + (h - 1 + g.k - 1) * g.wp + (g.k - 1) + L
    }

    /// `y[(m·h + oy)·w + l] = act(bias[m] + Σ_{ci,ki,kj} wb[t·mb + m] ·
    /// xp[ci·plane + (oy+ki)·wp + kj + l])` with `t = (ci·k + ki)·k + kj`, for `m < mb`, `oy < h`, `l < w`, where
    /// `act` is ReLU if `relu`, else the identity (the sum is formed first, then the bias
    /// added, then the ReLU: the same roundings as a separate bias pass).
    ///
    /// # Panics
    ///
    /// If AVX-512F is unavailable, `mb` is not in `1..=FWD_ROWS`, `w` not in `1..=16`, or a
    /// slice is too short.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fwd_rows(
        mb: usize,
        xp: &[f32],
        g: Taps,
        h: usize,
        w: usize,
        wb: &[f32],
        bias: &[f32],
        relu: bool,
        y: &mut [f32],
    ) {
        assert!(available(), "direct conv kernel needs AVX-512F");
        let kc = g.cin * g.k * g.k;
        assert!(kc > 0 && h > 0, "fwd_rows: empty");
        assert!((1..=L).contains(&w), "fwd_rows: bad width");
        assert!(needed(&g, h) <= xp.len(), "fwd_rows: xp too short");
        assert!(wb.len() >= kc * mb, "fwd_rows: weights too short");
        assert!(bias.len() >= mb, "fwd_rows: bias too short");
        assert!(y.len() >= mb * h * w, "fwd_rows: y too short");
        let o = Out {
            h,
            w,
            mask: if w == L { !0 } else { (1u16 << w) - 1 },
            relu,
        };
        // Blocks of NR rows, then the remaining `h % NR` rows in one call (not row by row:
        // a one-row call has only `mb` independent accumulators, too few to hide the FMA
        // latency, and it re-reads the whole padded input once per row).
        macro_rules! go {
            ($mb:literal, $nr:literal, [$($t:literal),*]) => {{
                let mut oy = 0;
                while oy + $nr <= h {
                    // SAFETY: AVX-512F is available (asserted); loads are at
                    // `xp + ci·plane + (oy+r+ki)·wp + kj + l` with `oy + r < h`, at most
                    // `needed - 1 < xp.len()`; weight reads `< kc·mb`, bias reads `< mb`;
                    // masked stores write lanes `l < w` at `(m·h + oy + r)·w + l < mb·h·w
                    // <= y.len()`.
                    unsafe {
                        fwd_impl::<$mb, $nr>(
                            xp.as_ptr(), g, oy, wb.as_ptr(), bias.as_ptr(), o, y.as_mut_ptr(),
                        )
                    };
                    oy += $nr;
                }
                match h - oy {
                    $(
                        // SAFETY: as above, with the last `$t` rows (`oy + $t == h`).
                        $t => unsafe {
                            fwd_impl::<$mb, $t>(
                                xp.as_ptr(), g, oy, wb.as_ptr(), bias.as_ptr(), o, y.as_mut_ptr(),
                            )
                        },
                    )*
                    _ => {}
                }
            }};
        }
        match mb {
            1 => go!(1, 6, [1, 2, 3, 4, 5]),
            2 => go!(2, 6, [1, 2, 3, 4, 5]),
            3 => go!(3, 6, [1, 2, 3, 4, 5]),
            4 => go!(4, 5, [1, 2, 3, 4]),
            5 => go!(5, 4, [1, 2, 3]),
            6 => go!(6, 3, [1, 2]),
            7 => go!(7, 3, [1, 2]),
            8 => go!(8, 3, [1, 2]),
            _ => panic!("fwd_rows: bad row count {mb}"),
        }
    }

    /// Output geometry of [`fwd_impl`].
    #[derive(Clone, Copy)]
    struct Out {
        h: usize,
        w: usize,
        /// Lanes `< w`.
        mask: __mmask16,
        relu: bool,
    }

    /// # Safety
    ///
    /// See [`fwd_rows`]: AVX-512F available, `oy0 + NR <= h`, and all accesses in bounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn fwd_impl<const MB: usize, const NR: usize>(
        xp: *const f32,
        g: Taps,
        oy0: usize,
        wb: *const f32,
        bias: *const f32,
        o: Out,
        y: *mut f32,
    ) {
        // SAFETY: the caller guarantees the CPU features and the bounds.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NR]; MB];
            let mut wt = wb;
            for ci in 0..g.cin {
                for ki in 0..g.k {
                    let row = xp.add(ci * g.plane + (oy0 + ki) * g.wp);
                    for kj in 0..g.k {
                        let mut xv = [_mm512_setzero_ps(); NR];
                        for (r, v) in xv.iter_mut().enumerate() {
                            *v = _mm512_loadu_ps(row.add(r * g.wp + kj));
                        }
                        for (m, a) in acc.iter_mut().enumerate() {
                            let wv = _mm512_set1_ps(*wt.add(m));
                            for (r, v) in a.iter_mut().enumerate() {
                                *v = _mm512_fmadd_ps(wv, xv[r], *v);
                            }
                        }
                        wt = wt.add(MB);
                    }
                }
            }
            for (m, a) in acc.iter().enumerate() {
                let b = _mm512_set1_ps(*bias.add(m));
                for (r, v) in a.iter().enumerate() {
                    let mut v = _mm512_add_ps(*v, b);
                    if o.relu {
                        // As `f32::max(v, 0.0)`: max_ps returns its second operand (0)
                        // when v is NaN.
                        v = _mm512_max_ps(v, _mm512_setzero_ps());
                    }
                    _mm512_mask_storeu_ps(y.add((m * o.h + oy0 + r) * o.w), o.mask, v);
                }
            }
        }
    }

    /// Weight gradient of `imgs` images: for `m < mb` and every tap `t = (ci·k + ki)·k + kj`,
    /// `dw[m·kc + t] = Σ_{n < imgs, oy < h, l < 16} dyr[n·ds + (m·h + oy)·16 + l] ·
    /// xsh[n·xs + ((ci·hp + oy + ki)·k + kj)·16 + l]` (`dw` is overwritten, `hp = h + k - 1`),
    /// where `xsh` holds, for every padded row and kernel column, the 16 floats that tap
    /// reads (see `shifted_rows`; aligned copies avoid cache-line-split loads). Each lane
    /// sums over images then rows, and the 16 lanes are added in a fixed order.
    ///
    /// # Panics
    ///
    /// If AVX-512F is unavailable, `mb` is not in `1..=WG_ROWS`, `k` is not one of
    /// 1, 3, 5, 7, or a slice is too short.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn wgrad_rows(
        mb: usize,
        imgs: usize,
        xp: &[f32],
        xs: usize,
        g: Taps,
        h: usize,
        dyr: &[f32],
        ds: usize,
        dw: &mut [f32],
    ) {
        assert!(available(), "direct conv kernel needs AVX-512F");
        let kc = g.cin * g.k * g.k;
        assert!(kc > 0 && h > 0 && imgs > 0, "wgrad_rows: empty");
        let hp = h + g.k - 1;
        assert!(
            (imgs - 1) * xs + g.cin * hp * g.k * L <= xp.len(),
            "wgrad_rows: xp too short"
        );
        assert!(
            (imgs - 1) * ds + mb * h * L <= dyr.len(),
            "wgrad_rows: dy too short"
        );
        assert!(dw.len() >= mb * kc, "wgrad_rows: dw too short");
        let p = Wg {
            imgs,
            xs,
            ds,
            h,
            hp,
            cin: g.cin,
        };
        macro_rules! go {
            ($mb:literal, $nt:literal) => {
                // SAFETY: AVX-512F is available (asserted); x loads are at
                // `xp + n·xs + ((ci·hp + oy + ki)·k + kj)·16 + l` (`n < imgs`, `oy < h`,
                // `ci < cin`), below `(imgs-1)·xs + cin·hp·k·16`; dy loads are `< (imgs-1)·ds + mb·h·16`;
                // stores `< mb·kc <= dw.len()`.
                unsafe { wgrad_impl::<$mb, $nt>(xp.as_ptr(), dyr.as_ptr(), p, dw.as_mut_ptr()) }
            };
        }
        match (mb, g.k) {
            (1, 1) => go!(1, 1),
            (2, 1) => go!(2, 1),
            (3, 1) => go!(3, 1),
            (1, 3) => go!(1, 3),
            (2, 3) => go!(2, 3),
            (3, 3) => go!(3, 3),
            (1, 5) => go!(1, 5),
            (2, 5) => go!(2, 5),
            (3, 5) => go!(3, 5),
            (1, 7) => go!(1, 7),
            (2, 7) => go!(2, 7),
            (3, 7) => go!(3, 7),
            _ => panic!("wgrad_rows: bad rows {mb} / kernel {}", g.k),
        }
    }

    /// Loop geometry of [`wgrad_impl`].
    #[derive(Clone, Copy)]
    struct Wg {
        imgs: usize,
        xs: usize,
        ds: usize,
        h: usize,
        hp: usize,
        cin: usize,
    }

    /// Sum of the 16 lanes in a fixed pairwise order: halves added lane-wise (16 -> 8 ->
    /// 4 -> 2 -> 1).
    ///
    /// # Safety
    ///
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn hsum16(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        let s8 = _mm256_add_ps(lo, hi);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        _mm_cvtss_f32(s1)
    }

    /// # Safety
    ///
    /// See [`wgrad_rows`]: AVX-512F available, `p.g.k == K`, and all accesses in bounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn wgrad_impl<const MB: usize, const K: usize>(
        xp: *const f32,
        dyr: *const f32,
        p: Wg,
        dw: *mut f32,
    ) {
        let kc = p.cin * K * K;
        // SAFETY: the caller guarantees the CPU features and the bounds.
        unsafe {
            for ci in 0..p.cin {
                for ki in 0..K {
                    let t0 = (ci * K + ki) * K;
                    let mut a = [[_mm512_setzero_ps(); K]; MB];
                    for n in 0..p.imgs {
                        let base = xp.add(n * p.xs + (ci * p.hp + ki) * K * L);
                        let dn = dyr.add(n * p.ds);
                        for oy in 0..p.h {
                            let row = base.add(oy * K * L);
                            let mut d = [_mm512_setzero_ps(); MB];
                            for (m, dv) in d.iter_mut().enumerate() {
                                *dv = _mm512_loadu_ps(dn.add((m * p.h + oy) * L));
                            }
                            for j in 0..K {
                                let xv = _mm512_loadu_ps(row.add(j * L));
                                for (m, am) in a.iter_mut().enumerate() {
                                    am[j] = _mm512_fmadd_ps(d[m], xv, am[j]);
                                }
                            }
                        }
                    }
                    for (m, am) in a.iter().enumerate() {
                        for (j, v) in am.iter().enumerate() {
                            *dw.add(m * kc + t0 + j) = hsum16(*v);
                        }
                    }
                }
            }
        }
    }
    /// Channels-last padded copy of one image `x` (`[c][h][w]`): writes
    /// `xt[(r·wp + q)·ldc + ci] = x[ci][r - pad][q - pad]` for the pixels inside the image
    /// and `ci < c` (`wp = w + k - 1`, `pad = k / 2`), and nothing else: the caller zeroes
    /// `xt` once, and the border and the channels `c..ldc` stay zero for every image.
    /// Sixteen channels of a pixel are one masked gather and one contiguous store.
    ///
    /// # Panics
    ///
    /// If AVX-512F is unavailable, `ldc < c`, `x` is not `c·h·w` long, `xt` is shorter than
    /// `(h + k - 1)·(w + k - 1)·ldc`, or `c·h·w` does not fit an `i32` gather index.
    pub(super) fn pad_channels_last(
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        ldc: usize,
        xt: &mut [f32],
    ) {
        assert!(available(), "direct conv kernel needs AVX-512F");
        let hw = h * w;
        assert!(c <= ldc && x.len() == c * hw, "pad_channels_last: bad x");
        assert!(k >= 1, "pad_channels_last: bad kernel");
        let wp = w + k - 1;
        assert!(
            xt.len() >= (h + k - 1) * wp * ldc,
            "pad_channels_last: xt too short"
        );
        assert!(
            i32::try_from(x.len()).is_ok(),
            "pad_channels_last: image too large"
        );
        // SAFETY: AVX-512F is available (asserted) and the bounds hold (see the impl).
        unsafe { pad_channels_last_impl(x, c, h, w, k, ldc, xt) }
    }

    /// # Safety
    ///
    /// See [`pad_channels_last`]: AVX-512F available and its asserts hold.
    #[target_feature(enable = "avx512f")]
    unsafe fn pad_channels_last_impl(
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        ldc: usize,
        xt: &mut [f32],
    ) {
        let (hw, wp, pad) = (h * w, w + k - 1, k / 2);
        // SAFETY: AVX-512F is available (caller). Gathered lanes `l < n` read
        // `x[(cb + l)·hw + iy·w + ix]` with `cb + l < c`, `iy < h`, `ix < w`: inside `x`, and
        // the index `(cb + l)·hw < x.len()` fits i32 (asserted); masked-off lanes read
        // nothing. Stores write lanes `l < n` at `((iy + pad)·wp + pad + ix)·ldc + cb + l`
        // with `iy + pad < h + k - 1`, `pad + ix < wp`, `cb + l < c <= ldc`: inside `xt`.
        unsafe {
            let step = _mm512_set1_epi32(hw as i32);
            let idx = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                step,
            );
            let mut cb = 0;
            while cb < c {
                let n = (c - cb).min(L);
                let mask: __mmask16 = if n == L { !0 } else { (1u16 << n) - 1 };
                let src = x.as_ptr().add(cb * hw);
                for iy in 0..h {
                    let dst = xt.as_mut_ptr().add(((iy + pad) * wp + pad) * ldc + cb);
                    for ix in 0..w {
                        let v = _mm512_mask_i32gather_ps::<4>(
                            _mm512_setzero_ps(),
                            mask,
                            idx,
                            src.add(iy * w + ix).cast(),
                        );
                        _mm512_mask_storeu_ps(dst.add(ix * ldc), mask, v);
                    }
                }
                cb += n;
            }
        }
    }

    /// Weight gradient vectorised over input channels: for `m < mb`, every tap
    /// `(ki, kj)` of a `k x k` kernel and channel `c` in `c0..c0 + 16·cvn`,
    /// `dwc[(m·k·k + ki·k + kj)·ldc + c] += Σ_{oy < h, ox < w} dy[m·h·w + oy·w + ox] ·
    /// xt[((oy + ki)·wp + ox + kj)·ldc + c]`, where `xt` is the image zero-padded and
    /// channels-last (`wp = w + k - 1`, see `pad_channels_last`). Each lane sums over the
    /// pixels in order, so the result is deterministic.
    ///
    /// # Panics
    ///
    /// If AVX-512F is unavailable, `mb` is not in `1..=CI_ROWS`, `cvn` not 1 or 2, `k` not
    /// 1 or 3, `ldc` not a multiple of 16 with `c0 + 16·cvn <= ldc`, or a slice is too short.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn wgrad_ci(
        mb: usize,
        cvn: usize,
        k: usize,
        xt: &[f32],
        h: usize,
        w: usize,
        ldc: usize,
        c0: usize,
        dy: &[f32],
        dwc: &mut [f32],
    ) {
        assert!(available(), "direct conv kernel needs AVX-512F");
        assert!(
            ldc.is_multiple_of(L) && c0 + cvn * L <= ldc,
            "wgrad_ci: bad channel block"
        );
        assert!(
            xt.len() >= (h + k - 1) * (w + k - 1) * ldc,
            "wgrad_ci: xt too short"
        );
        assert!(dy.len() >= mb * h * w, "wgrad_ci: dy too short");
        assert!(dwc.len() >= mb * k * k * ldc, "wgrad_ci: dw too short");
        let p = Wi { h, w, ldc };
        macro_rules! go {
            ($mb:literal, $cv:literal, $k:literal) => {
                // SAFETY: AVX-512F is available (asserted); x loads are at
                // `((oy + ki)·wp + ox + kj)·ldc + c0 + v·16 + l` with `oy + ki < h + k - 1`,
                // `ox + kj < wp`, `c0 + v·16 + l < ldc`: inside `xt` (asserted); dy reads
                // are `< mb·h·w`; dw accesses `< mb·k·k·ldc` (asserted).
                unsafe {
                    wgrad_ci_impl::<$mb, $cv, $k>(
                        xt.as_ptr().add(c0),
                        p,
                        dy.as_ptr(),
                        dwc.as_mut_ptr().add(c0),
                    )
                }
            };
        }
        match (mb, cvn, k) {
            (1, 1, 1) => go!(1, 1, 1),
            (2, 1, 1) => go!(2, 1, 1),
            (3, 1, 1) => go!(3, 1, 1),
            (4, 1, 1) => go!(4, 1, 1),
            (1, 2, 1) => go!(1, 2, 1),
            (2, 2, 1) => go!(2, 2, 1),
            (3, 2, 1) => go!(3, 2, 1),
            (4, 2, 1) => go!(4, 2, 1),
            (1, 1, 3) => go!(1, 1, 3),
            (2, 1, 3) => go!(2, 1, 3),
            (3, 1, 3) => go!(3, 1, 3),
            (4, 1, 3) => go!(4, 1, 3),
            (1, 2, 3) => go!(1, 2, 3),
            (2, 2, 3) => go!(2, 2, 3),
            (3, 2, 3) => go!(3, 2, 3),
            (4, 2, 3) => go!(4, 2, 3),
            _ => panic!("wgrad_ci: bad block {mb} x {cvn} / kernel {k}"),
        }
    }

    /// Loop geometry of [`wgrad_ci_impl`].
    #[derive(Clone, Copy)]
    struct Wi {
        h: usize,
        w: usize,
        ldc: usize,
    }

    /// # Safety
    ///
    /// See [`wgrad_ci`]: AVX-512F available; `xt` and `dwc` point at channel `c0`, and all
    /// accesses are in bounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn wgrad_ci_impl<const MB: usize, const CV: usize, const K: usize>(
        xt: *const f32,
        p: Wi,
        dy: *const f32,
        dwc: *mut f32,
    ) {
        let (hw, wp, ldc) = (p.h * p.w, p.w + K - 1, p.ldc);
        // SAFETY: the caller guarantees the CPU features and the bounds.
        unsafe {
            for ki in 0..K {
                // Accumulators for output channel m, tap (ki, j), channel vector v.
                let mut a = [[[_mm512_setzero_ps(); CV]; K]; MB];
                for (m, am) in a.iter_mut().enumerate() {
                    for (j, amj) in am.iter_mut().enumerate() {
                        for (v, av) in amj.iter_mut().enumerate() {
                            *av = _mm512_loadu_ps(dwc.add((m * K * K + ki * K + j) * ldc + v * L));
                        }
                    }
                }
                for oy in 0..p.h {
                    let xrow = xt.add((oy + ki) * wp * ldc);
                    let drow = dy.add(oy * p.w);
                    for ox in 0..p.w {
                        let xb = xrow.add(ox * ldc);
                        let mut xv = [[_mm512_setzero_ps(); CV]; K];
                        for (j, xj) in xv.iter_mut().enumerate() {
                            for (v, x) in xj.iter_mut().enumerate() {
                                *x = _mm512_loadu_ps(xb.add(j * ldc + v * L));
                            }
                        }
                        for (m, am) in a.iter_mut().enumerate() {
                            let d = _mm512_set1_ps(*drow.add(m * hw + ox));
                            for (j, amj) in am.iter_mut().enumerate() {
                                for (v, av) in amj.iter_mut().enumerate() {
                                    *av = _mm512_fmadd_ps(d, xv[j][v], *av);
                                }
                            }
                        }
                    }
                }
                for (m, am) in a.iter().enumerate() {
                    for (j, amj) in am.iter().enumerate() {
                        for (v, av) in amj.iter().enumerate() {
                            _mm512_storeu_ps(dwc.add((m * K * K + ki * K + j) * ldc + v * L), *av);
                        }
                    }
                }
            }
        }
    }

    /// Weight gradient vectorised over output channels (for wide ops): for every tap `t`
    /// and channel `c < ldo`,
    /// `dwt[t·ldo + c] += Σ_{oy < h, ox < w} xp[offset(t) + oy·wp + ox] · dyt[(oy·w + ox)·ldo + c]`
    /// (`ldo` a multiple of 16; `dyt` is dy transposed to `[pixel][channel]`).
    ///
    /// # Panics
    ///
    /// If AVX-512F is unavailable or a slice is too short.
    pub(super) fn wgrad_cols(
        xp: &[f32],
        g: Taps,
        h: usize,
        w: usize,
        dyt: &[f32],
        ldo: usize,
        dwt: &mut [f32],
    ) {
        assert!(available(), "direct conv kernel needs AVX-512F");
        let kc = g.cin * g.k * g.k;
        assert!(
            kc > 0 && h > 0 && w > 0 && ldo.is_multiple_of(L),
            "wgrad_cols: bad shape"
        );
        assert!(w + g.k - 1 <= g.wp, "wgrad_cols: bad row pitch");
        assert!(
            g.max_offset() + (h - 1) * g.wp + w <= xp.len(),
            "wgrad_cols: xp too short"
        );
        assert!(dyt.len() >= h * w * ldo, "wgrad_cols: dy too short");
        assert!(dwt.len() >= kc * ldo, "wgrad_cols: dw too short");
        let p = Wc {
            h,
            w,
            wp: g.wp,
            ldo,
        };
        let cvs = ldo / L;
        let mut t0 = 0;
        while t0 < kc {
            let nt = (kc - t0).min(6);
            let mut offs = [0usize; 6];
            for (j, o) in offs.iter_mut().enumerate().take(nt) {
                *o = g.offset(t0 + j);
            }
            let mut cb = 0;
            while cb < cvs {
                let cv = (cvs - cb).min(4);
                macro_rules! go {
                    ($cv:literal, $nt:literal) => {{
                        let o: [usize; $nt] = offs[..$nt].try_into().unwrap();
                        // SAFETY: AVX-512F is available (asserted); x reads are at
                        // `offset(t) + oy·wp + ox <= max_offset + (h-1)·wp + w - 1`;
                        // dy reads `< h·w·ldo`; accumulator accesses are at
                        // `(t0 + j)·ldo + (cb + v)·16 + l < kc·ldo`.
                        unsafe {
                            wgrad_cols_impl::<$cv, $nt>(
                                xp.as_ptr(),
                                o,
                                p,
                                dyt.as_ptr().add(cb * L),
                                dwt.as_mut_ptr().add(t0 * ldo + cb * L),
                            )
                        }
                    }};
                }
                match (cv, nt) {
                    (1, 1) => go!(1, 1),
                    (1, 2) => go!(1, 2),
                    (1, 3) => go!(1, 3),
                    (1, 4) => go!(1, 4),
                    (1, 5) => go!(1, 5),
                    (1, 6) => go!(1, 6),
                    (2, 1) => go!(2, 1),
                    (2, 2) => go!(2, 2),
                    (2, 3) => go!(2, 3),
                    (2, 4) => go!(2, 4),
                    (2, 5) => go!(2, 5),
                    (2, 6) => go!(2, 6),
                    (3, 1) => go!(3, 1),
                    (3, 2) => go!(3, 2),
                    (3, 3) => go!(3, 3),
                    (3, 4) => go!(3, 4),
                    (3, 5) => go!(3, 5),
                    (3, 6) => go!(3, 6),
                    (4, 1) => go!(4, 1),
                    (4, 2) => go!(4, 2),
                    (4, 3) => go!(4, 3),
                    (4, 4) => go!(4, 4),
                    (4, 5) => go!(4, 5),
                    _ => go!(4, 6),
                }
                cb += cv;
            }
            t0 += nt;
        }
    }

    /// Loop geometry of [`wgrad_cols_impl`].
    #[derive(Clone, Copy)]
    struct Wc {
        h: usize,
        w: usize,
        wp: usize,
        ldo: usize,
    }

    /// # Safety
    ///
    /// See [`wgrad_cols`]: AVX-512F available; `dyt` and `dwt` point at the first channel
    /// of this block, and all accesses are in bounds.
    #[target_feature(enable = "avx512f")]
    unsafe fn wgrad_cols_impl<const CV: usize, const NT: usize>(
        xp: *const f32,
        offs: [usize; NT],
        p: Wc,
        dyt: *const f32,
        dwt: *mut f32,
    ) {
        // SAFETY: the caller guarantees the CPU features and the bounds.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); CV]; NT];
            for (j, aj) in a.iter_mut().enumerate() {
                for (v, av) in aj.iter_mut().enumerate() {
                    *av = _mm512_loadu_ps(dwt.add(j * p.ldo + v * L));
                }
            }
            for oy in 0..p.h {
                let xrow = xp.add(oy * p.wp);
                let drow = dyt.add(oy * p.w * p.ldo);
                for ox in 0..p.w {
                    let mut d = [_mm512_setzero_ps(); CV];
                    for (v, dv) in d.iter_mut().enumerate() {
                        *dv = _mm512_loadu_ps(drow.add(ox * p.ldo + v * L));
                    }
                    for (j, aj) in a.iter_mut().enumerate() {
                        let xb = _mm512_set1_ps(*xrow.add(offs[j] + ox));
                        for (v, av) in aj.iter_mut().enumerate() {
                            *av = _mm512_fmadd_ps(xb, d[v], *av);
                        }
                    }
                }
            }
            for (j, aj) in a.iter().enumerate() {
                for (v, av) in aj.iter().enumerate() {
                    _mm512_storeu_ps(dwt.add(j * p.ldo + v * L), *av);
                }
            }
        }
    }
}

/// Stub for targets without the x86-64 kernels: the AVX-512 path is never selected.
#[cfg(not(target_arch = "x86_64"))]
mod simd512 {
    use super::simd::Taps;
    pub(super) const L: usize = 16;
    pub(super) const FWD_ROWS: usize = 8;
    pub(super) const WG_ROWS: usize = 3;
    pub(super) const CI_ROWS: usize = 4;
    pub(super) const MAX_K: usize = 7;
    pub(super) const SLACK: usize = L;

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn pad_channels_last(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn wgrad_ci(
        _: usize,
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &[f32],
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fwd_rows(
        _: usize,
        _: &[f32],
        _: Taps,
        _: usize,
        _: usize,
        _: &[f32],
        _: &[f32],
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    pub(super) fn wgrad_cols(
        _: &[f32],
        _: Taps,
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn wgrad_rows(
        _: usize,
        _: usize,
        _: &[f32],
        _: usize,
        _: Taps,
        _: usize,
        _: &[f32],
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512 conv kernel is only built for x86-64")
    }
}

// ---------------------------------------------------------------------------
// Scratch buffers and the sgemm wrapper
// ---------------------------------------------------------------------------

thread_local! {
    /// Scratch of the rayon task running on this thread (columns, padded images).
    static WORKER_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Per-call scratch of the calling thread (repacked weights, weight-gradient partials).
    static CALL_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Flipped, channel-transposed weights of backward-data (calling thread).
    static FLIP_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// Zero-padded copy of one image, used inside `im2col`.
    static PAD_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a `len`-element scratch slice taken from `key` (contents unspecified).
///
/// The buffer is moved out of the thread-local while `f` runs, so a nested use on the
/// same thread (e.g. rayon work-stealing another convolution while this one waits) just
/// gets a fresh buffer instead of aliasing this one.
fn with_scratch<R>(
    key: &'static std::thread::LocalKey<Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut v = key.with(Cell::take);
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    key.with(|c| {
        let other = c.take();
        c.set(if other.len() > v.len() { other } else { v });
    });
    r
}

fn with_worker_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch(&WORKER_SCRATCH, len, f)
}

fn with_call_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_scratch(&CALL_SCRATCH, len, f)
}

/// Highest index touched by a `rows x cols` strided matrix, plus one (0 if empty).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C = A · B + beta · C` with non-negative strides, bounds-checked.
/// `A` is `m x k`, `B` is `k x n`, `C` is `m x n`. When `beta == 0`, `C` is not read.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    assert!(span(m, k, rsa, csa) <= a.len(), "gemm: A out of bounds");
    assert!(span(k, n, rsb, csb) <= b.len(), "gemm: B out of bounds");
    assert!(span(m, n, rsc, csc) <= c.len(), "gemm: C out of bounds");
    assert!(m <= 1 || n == 0 || rsc != 0, "gemm: C rows alias");
    assert!(n <= 1 || m == 0 || csc != 0, "gemm: C columns alias");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above guarantee every element of A, B and C that sgemm
    // addresses lies inside the corresponding slice; all strides are non-negative and
    // fit in isize because the slices do; C's rows and columns have non-zero strides (and
    // every call site passes a dense row- or column-major C, so no two (i, j) alias);
    // `c` is a unique borrow, so it does not overlap `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

// ---------------------------------------------------------------------------
// Reference implementations
// ---------------------------------------------------------------------------

/// Plain, slow, obviously-correct `f64` implementations of the three ops, for tests.
///
/// Inputs are the same `f32` slices as the fast ops (converted exactly to `f64`); outputs
/// are `Vec<f64>`. Passing element-wise absolute values of the inputs (and `relu =
/// false`) yields `Σ |terms|` for each output, the natural scale for error bounds.
pub mod reference {
    use super::ConvShape;

    /// Output positions `o` (in `0..len`) whose input position `o + t - pad` is in `0..len`.
    fn valid(len: usize, t: usize, pad: usize) -> std::ops::Range<usize> {
        let lo = pad.saturating_sub(t).min(len);
        let hi = (len + pad).saturating_sub(t).min(len).max(lo);
        lo..hi
    }

    /// Enumerates every multiply-accumulate of the convolution
    /// `y[n][co][oy][ox] += w[co][ci][ki][kj] * x[n][ci][oy + ki - pad][ox + kj - pad]`
    /// (in-bounds taps only) as runs along `ox`: `f(yi, xi, len, wi)` stands for the MACs
    /// between `y[yi + j]` and `x[xi + j]` for `j < len`, with weight `w[wi]` (flat indices).
    fn for_each_mac_run(s: &ConvShape, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (h, wd, k, pad) = (s.height, s.width, s.kernel, s.kernel / 2);
        for n in 0..s.batch {
            for co in 0..s.cout {
                for ci in 0..s.cin {
                    for ki in 0..k {
                        for kj in 0..k {
                            let wi = ((co * s.cin + ci) * k + ki) * k + kj;
                            let oxs = valid(wd, kj, pad);
                            if oxs.is_empty() {
                                continue;
                            }
                            for oy in valid(h, ki, pad) {
                                let iy = oy + ki - pad;
                                let ix0 = oxs.start + kj - pad;
                                let yi = ((n * s.cout + co) * h + oy) * wd + oxs.start;
                                let xi = ((n * s.cin + ci) * h + iy) * wd + ix0;
                                f(yi, xi, oxs.len(), wi);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `acc[a0 + j] += c * v[v0 + j]` for `j < len`, in f64.
    fn axpy(acc: &mut [f64], a0: usize, c: f64, v: &[f32], v0: usize, len: usize) {
        for (a, &x) in acc[a0..a0 + len].iter_mut().zip(&v[v0..v0 + len]) {
            *a += c * f64::from(x);
        }
    }

    /// `Σ_j a[a0 + j] * b[b0 + j]` for `j < len`, in f64.
    fn dot(a: &[f32], a0: usize, b: &[f32], b0: usize, len: usize) -> f64 {
        let pairs = a[a0..a0 + len].iter().zip(&b[b0..b0 + len]);
        pairs.map(|(&p, &q)| f64::from(p) * f64::from(q)).sum()
    }

    /// Reference of `conv2d_forward`: `y = conv(x, w) + b`, then ReLU if `relu`.
    pub fn conv2d_forward_ref(
        s: &ConvShape,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        relu: bool,
    ) -> Vec<f64> {
        assert_eq!(x.len(), s.input_len());
        assert_eq!(w.len(), s.weight_len());
        assert_eq!(b.len(), s.cout);
        let hw = s.height * s.width;
        let mut y: Vec<f64> = (0..s.output_len())
            .map(|i| f64::from(b[(i / hw) % s.cout]))
            .collect();
        for_each_mac_run(s, |yi, xi, len, wi| {
            axpy(&mut y, yi, f64::from(w[wi]), x, xi, len)
        });
        if relu {
            for v in &mut y {
                *v = v.max(0.0);
            }
        }
        y
    }

    /// Reference of `conv2d_backward_data`: `dx = conv_transpose(dy, w)`.
    pub fn conv2d_backward_data_ref(s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f64> {
        assert_eq!(dy.len(), s.output_len());
        assert_eq!(w.len(), s.weight_len());
        let mut dx = vec![0.0f64; s.input_len()];
        for_each_mac_run(s, |yi, xi, len, wi| {
            axpy(&mut dx, xi, f64::from(w[wi]), dy, yi, len)
        });
        dx
    }

    /// Reference of `conv2d_backward_weight`: returns `(dw, db)`.
    pub fn conv2d_backward_weight_ref(
        s: &ConvShape,
        x: &[f32],
        dy: &[f32],
    ) -> (Vec<f64>, Vec<f64>) {
        assert_eq!(x.len(), s.input_len());
        assert_eq!(dy.len(), s.output_len());
        let hw = s.height * s.width;
        let mut dw = vec![0.0f64; s.weight_len()];
        let mut db = vec![0.0f64; s.cout];
        for (i, &v) in dy.iter().enumerate() {
            db[(i / hw) % s.cout] += f64::from(v);
        }
        for_each_mac_run(s, |yi, xi, len, wi| dw[wi] += dot(x, xi, dy, yi, len));
        (dw, db)
    }
}

#[cfg(test)]
mod tests {
    use super::reference::*;
    use super::*;
    use proptest::prelude::*;

    /// Unit roundoff of f32.
    const U: f64 = f32::EPSILON as f64 / 2.0;

    /// Tiny deterministic generator (splitmix64) so tests need no RNG dependency.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn f(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f()).collect()
        }
    }

    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|x| x.abs()).collect()
    }

    /// Checks `|got - want| <= (terms + 2) * u * mag + tiny` element-wise.
    ///
    /// Justification: each output is a sum of `terms` products of exactly representable
    /// f32 values. Whatever the summation order (GEMM blocking, chunked partial sums) and
    /// whether products are fused (FMA) or rounded, the f32 result differs from the exact
    /// value by at most `terms * u * Σ|terms|` to first order (Higham, Thm 3.1/3.5); the
    /// `+ 2` covers the bias add and the final partial-sum adds. `mag` is `Σ|terms|`,
    /// computed by the f64 reference on absolute values. The reference's own f64 error
    /// is ~1e-16 relative, negligible. A real indexing bug drops or adds a whole term,
    /// an error of order `mag / terms`, far above this bound for the sizes tested.
    fn assert_close(what: &str, got: &[f32], want: &[f64], mag: &[f64], terms: usize) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let tol_f = (terms as f64 + 2.0) * U;
        for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
            let tol = tol_f * m + 1e-30;
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}[{i}]: got {g}, want {w}, |diff| {} > tol {tol} (mag {m})",
                (f64::from(g) - w).abs()
            );
        }
    }

    /// Every algorithm this machine can run.
    fn algos() -> Vec<Algo> {
        let mut v = vec![Algo::Gemm];
        if simd::available() {
            v.push(Algo::Direct);
        }
        if simd512::available() {
            v.push(Algo::Direct512);
            v.push(Algo::Direct512Co);
            v.push(Algo::Direct512Ci);
        }
        v
    }

    /// Every backward-data plan this machine can run.
    fn data_plans() -> Vec<DataPlan> {
        let mut v = vec![DataPlan::Col2im];
        v.extend(algos().into_iter().map(DataPlan::Flipped));
        v
    }

    /// Forward with every algorithm (and through the public entry point) vs the reference.
    fn check_forward(s: &ConvShape, rng: &mut Rng, relu: bool) {
        let x = rng.vec(s.input_len());
        let w = rng.vec(s.weight_len());
        let b = rng.vec(s.cout);
        let want = conv2d_forward_ref(s, &x, &w, &b, relu);
        let mag = conv2d_forward_ref(s, &abs(&x), &abs(&w), &abs(&b), false);
        let terms = s.cin * s.kernel * s.kernel + 1;
        let mut y = vec![f32::NAN; s.output_len()];
        conv2d_forward(s, &x, &w, &b, relu, &mut y);
        assert_close(&format!("forward y {s:?}"), &y, &want, &mag, terms);
        for algo in algos() {
            let mut y = vec![f32::NAN; s.output_len()];
            forward_with(s, &x, &w, &b, relu, &mut y, algo);
            assert_close(&format!("forward y {algo:?} {s:?}"), &y, &want, &mag, terms);
        }
    }

    fn check_backward_data(s: &ConvShape, rng: &mut Rng) {
        let dy = rng.vec(s.output_len());
        let w = rng.vec(s.weight_len());
        let want = conv2d_backward_data_ref(s, &dy, &w);
        let mag = conv2d_backward_data_ref(s, &abs(&dy), &abs(&w));
        let terms = s.cout * s.kernel * s.kernel;
        let mut dx = vec![f32::NAN; s.input_len()];
        conv2d_backward_data(s, &dy, &w, &mut dx);
        assert_close(&format!("backward dx {s:?}"), &dx, &want, &mag, terms);
        for plan in data_plans() {
            let mut dx = vec![f32::NAN; s.input_len()];
            backward_data_with(s, &dy, &w, &mut dx, plan);
            assert_close(
                &format!("backward dx {plan:?} {s:?}"),
                &dx,
                &want,
                &mag,
                terms,
            );
        }
    }

    fn check_backward_weight(s: &ConvShape, rng: &mut Rng) {
        let x = rng.vec(s.input_len());
        let dy = rng.vec(s.output_len());
        let (want_w, want_b) = conv2d_backward_weight_ref(s, &x, &dy);
        let (mag_w, mag_b) = conv2d_backward_weight_ref(s, &abs(&x), &abs(&dy));
        // The direct kernel also runs over the zero "gap" columns of the padded-width
        // grid (exact zero products, but they lengthen the summation), so count them.
        let terms = s.batch * s.height * (s.width + 2 * s.pad()) + 8;
        let mut dw = vec![f32::NAN; s.weight_len()];
        let mut db = vec![f32::NAN; s.cout];
        conv2d_backward_weight(s, &x, &dy, &mut dw, &mut db);
        assert_close(&format!("dw {s:?}"), &dw, &want_w, &mag_w, terms);
        assert_close(&format!("db {s:?}"), &db, &want_b, &mag_b, terms);
        for algo in algos() {
            let mut dw = vec![f32::NAN; s.weight_len()];
            let mut db = vec![f32::NAN; s.cout];
            backward_weight_with(s, &x, &dy, &mut dw, &mut db, algo);
            assert_close(&format!("dw {algo:?} {s:?}"), &dw, &want_w, &mag_w, terms);
            assert_close(&format!("db {algo:?} {s:?}"), &db, &want_b, &mag_b, terms);
        }
    }

    fn shape_strategy() -> impl Strategy<Value = ConvShape> {
        (
            1usize..=3,
            1usize..=5,
            1usize..=5,
            1usize..=9,
            1usize..=9,
            0usize..4,
        )
            .prop_map(|(batch, cin, cout, height, width, ki)| ConvShape {
                batch,
                cin,
                cout,
                height,
                width,
                kernel: [1, 3, 5, 7][ki],
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn forward_matches_reference(s in shape_strategy(), seed: u64, relu: bool) {
            check_forward(&s, &mut Rng(seed), relu);
        }

        #[test]
        fn backward_data_matches_reference(s in shape_strategy(), seed: u64) {
            check_backward_data(&s, &mut Rng(seed));
        }

        #[test]
        fn backward_weight_matches_reference(s in shape_strategy(), seed: u64) {
            check_backward_weight(&s, &mut Rng(seed));
        }
    }

    /// The model's conv shapes (MNIST 14x14 and colour 16x16 presets), at batch 2.
    fn preset_shapes(batch: usize) -> Vec<ConvShape> {
        let mk = |cin, cout, hw, kernel| ConvShape {
            batch,
            cin,
            cout,
            height: hw,
            width: hw,
            kernel,
        };
        vec![
            mk(2, 8, 14, 5),
            mk(8, 64, 14, 7),
            mk(64, 4, 14, 3),
            mk(6, 24, 16, 5),
            mk(24, 192, 16, 7),
            mk(192, 12, 16, 3),
        ]
    }

    #[test]
    fn preset_shapes_match_reference() {
        let mut rng = Rng(7);
        for s in preset_shapes(2) {
            check_forward(&s, &mut rng, true);
            check_backward_data(&s, &mut rng);
            check_backward_weight(&s, &mut rng);
        }
    }

    /// Larger batches exercise the multi-image GEMM grouping and the chunked
    /// weight-gradient reduction (more images than chunks).
    #[test]
    fn grouped_batches_match_reference() {
        let mut rng = Rng(11);
        for s in [
            ConvShape {
                batch: 37,
                cin: 3,
                cout: 5,
                height: 6,
                width: 5,
                kernel: 3,
            },
            ConvShape {
                batch: 40,
                cin: 4,
                cout: 2,
                height: 4,
                width: 4,
                kernel: 1,
            },
            ConvShape {
                batch: 19,
                cin: 2,
                cout: 3,
                height: 7,
                width: 7,
                kernel: 5,
            },
        ] {
            check_forward(&s, &mut rng, false);
            check_forward(&s, &mut rng, true);
            check_backward_data(&s, &mut rng);
            check_backward_weight(&s, &mut rng);
        }
    }

    /// `<dy, conv(x)> == <conv_transpose(dy), x>` and `<dy, conv(x, w)> == <dw(x, dy), w>`
    /// (bias zero), both sides accumulated in f64.
    #[test]
    fn backward_ops_are_adjoints() {
        let mut rng = Rng(3);
        let mut shapes = preset_shapes(2);
        shapes.push(ConvShape {
            batch: 3,
            cin: 3,
            cout: 2,
            height: 5,
            width: 8,
            kernel: 7,
        });
        for s in shapes {
            let x = rng.vec(s.input_len());
            let w = rng.vec(s.weight_len());
            let dy = rng.vec(s.output_len());
            let zero_b = vec![0.0; s.cout];
            let mut y = vec![0.0; s.output_len()];
            conv2d_forward(&s, &x, &w, &zero_b, false, &mut y);
            let mut dx = vec![0.0; s.input_len()];
            conv2d_backward_data(&s, &dy, &w, &mut dx);
            let mut dw = vec![0.0; s.weight_len()];
            let mut db = vec![0.0; s.cout];
            conv2d_backward_weight(&s, &x, &dy, &mut dw, &mut db);

            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter()
                    .zip(b)
                    .map(|(&p, &q)| f64::from(p) * f64::from(q))
                    .sum()
            };
            let lhs = dot(&dy, &y);
            // Scale: Σ|dy| * |conv|(|x|, |w|); each f32 value carries relative error
            // <= (terms + 2) u, so the inner products agree to that times the scale.
            let mag_y = conv2d_forward_ref(&s, &abs(&x), &abs(&w), &zero_b, false);
            let scale: f64 = dy
                .iter()
                .zip(&mag_y)
                .map(|(&d, &m)| f64::from(d.abs()) * m)
                .sum();
            let terms = (s.cin * s.kernel * s.kernel)
                .max(s.cout * s.kernel * s.kernel)
                .max(s.batch * s.height * s.width);
            let tol = 2.0 * (terms as f64 + 2.0) * U * scale;
            let rhs_x = dot(&dx, &x);
            let rhs_w = dot(&dw, &w);
            assert!(
                (lhs - rhs_x).abs() <= tol,
                "{s:?}: <dy,y>={lhs} <dx,x>={rhs_x} tol {tol}"
            );
            assert!(
                (lhs - rhs_w).abs() <= tol,
                "{s:?}: <dy,y>={lhs} <dw,w>={rhs_w} tol {tol}"
            );
            // db is the adjoint of broadcasting the bias.
            let sum_dy: f64 = dy.iter().map(|&v| f64::from(v)).sum();
            let db_sum: f64 = db.iter().map(|&v| f64::from(v)).sum();
            let tol_b = (s.batch * s.height * s.width + 2) as f64
                * U
                * dy.iter().map(|v| f64::from(v.abs())).sum::<f64>();
            assert!((sum_dy - db_sum).abs() <= tol_b);
        }
    }

    /// Central finite differences of `L(w, b) = <dy, conv(x, w) + b>` match `dw`, `db`,
    /// and of `L(x)` match `dx`.
    #[test]
    fn finite_difference_gradients() {
        let s = ConvShape {
            batch: 2,
            cin: 2,
            cout: 3,
            height: 5,
            width: 4,
            kernel: 3,
        };
        let mut rng = Rng(5);
        let x = rng.vec(s.input_len());
        let w = rng.vec(s.weight_len());
        let b = rng.vec(s.cout);
        let dy = rng.vec(s.output_len());
        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let mut y = vec![0.0; s.output_len()];
            conv2d_forward(&s, x, w, b, false, &mut y);
            y.iter()
                .zip(&dy)
                .map(|(&p, &q)| f64::from(p) * f64::from(q))
                .sum()
        };
        let mut dw = vec![0.0; s.weight_len()];
        let mut db = vec![0.0; s.cout];
        conv2d_backward_weight(&s, &x, &dy, &mut dw, &mut db);
        let mut dx = vec![0.0; s.input_len()];
        conv2d_backward_data(&s, &dy, &w, &mut dx);

        // L is affine in each argument, so the central difference is exact up to the f32
        // rounding of the forward pass (~1e-6 * |L|); h = 0.5 is exactly representable.
        let h = 0.5f32;
        let tol = 1e-3;
        let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * f64::from(h));
        for i in 0..w.len() {
            let g = fd(&|d| {
                let mut wp = w.clone();
                wp[i] += d;
                loss(&x, &wp, &b)
            });
            assert!(
                (g - f64::from(dw[i])).abs() <= tol,
                "dw[{i}]: fd {g} vs {}",
                dw[i]
            );
        }
        for i in 0..b.len() {
            let g = fd(&|d| {
                let mut bp = b.clone();
                bp[i] += d;
                loss(&x, &w, &bp)
            });
            assert!(
                (g - f64::from(db[i])).abs() <= tol,
                "db[{i}]: fd {g} vs {}",
                db[i]
            );
        }
        for i in 0..x.len() {
            let g = fd(&|d| {
                let mut xp = x.clone();
                xp[i] += d;
                loss(&xp, &w, &b)
            });
            assert!(
                (g - f64::from(dx[i])).abs() <= tol,
                "dx[{i}]: fd {g} vs {}",
                dx[i]
            );
        }
    }

    #[test]
    fn relu_is_fused() {
        let s = ConvShape {
            batch: 3,
            cin: 4,
            cout: 6,
            height: 7,
            width: 9,
            kernel: 3,
        };
        let mut rng = Rng(9);
        let x = rng.vec(s.input_len());
        let w = rng.vec(s.weight_len());
        let b = rng.vec(s.cout);
        let mut y = vec![0.0; s.output_len()];
        let mut yr = vec![0.0; s.output_len()];
        conv2d_forward(&s, &x, &w, &b, false, &mut y);
        conv2d_forward(&s, &x, &w, &b, true, &mut yr);
        assert!(y.iter().any(|&v| v < 0.0) && y.iter().any(|&v| v > 0.0));
        for (&a, &r) in y.iter().zip(&yr) {
            assert_eq!(r, a.max(0.0));
        }
    }

    /// Results are bitwise identical across runs and rayon thread counts (batch 21 is
    /// split into 11 weight-gradient chunks of 2 images).
    #[test]
    fn deterministic_across_thread_counts() {
        let s = ConvShape {
            batch: 21,
            cin: 8,
            cout: 16,
            height: 14,
            width: 14,
            kernel: 5,
        };
        let mut rng = Rng(13);
        let x = rng.vec(s.input_len());
        let w = rng.vec(s.weight_len());
        let b = rng.vec(s.cout);
        let dy = rng.vec(s.output_len());
        let run = |threads: usize, algo: Algo, plan: DataPlan| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut y = vec![0.0; s.output_len()];
                forward_with(&s, &x, &w, &b, true, &mut y, algo);
                let mut dx = vec![0.0; s.input_len()];
                backward_data_with(&s, &dy, &w, &mut dx, plan);
                let mut dw = vec![0.0; s.weight_len()];
                let mut db = vec![0.0; s.cout];
                backward_weight_with(&s, &x, &dy, &mut dw, &mut db, algo);
                (y, dx, dw, db)
            })
        };
        // Every data plan, and every algorithm, at least once.
        let algos = algos();
        for (i, plan) in data_plans().into_iter().enumerate() {
            let algo = algos[i % algos.len()];
            let a = run(1, algo, plan);
            assert!(a == run(3, algo, plan), "{algo:?} {plan:?}");
            assert!(a == run(2, algo, plan), "{algo:?} {plan:?}");
            assert!(a == run(2, algo, plan), "{algo:?} {plan:?}");
        }
    }

    /// The input-channel-vectorised weight gradient (3x3, ragged 20 input channels) gives
    /// the same bits for any thread count, and the same as the public entry point.
    #[test]
    fn wgrad_ci_deterministic_across_thread_counts() {
        let s = ConvShape {
            batch: 21,
            cin: 20,
            cout: 5,
            height: 14,
            width: 13,
            kernel: 3,
        };
        let mut rng = Rng(17);
        let x = rng.vec(s.input_len());
        let dy = rng.vec(s.output_len());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut dw = vec![0.0; s.weight_len()];
                let mut db = vec![0.0; s.cout];
                backward_weight_with(&s, &x, &dy, &mut dw, &mut db, Algo::Direct512Ci);
                (dw, db)
            })
        };
        let a = run(1);
        assert!(a == run(2));
        assert!(a == run(3));
        let (want, _) = conv2d_backward_weight_ref(&s, &x, &dy);
        let (mag, _) = conv2d_backward_weight_ref(&s, &abs(&x), &abs(&dy));
        assert_close("dw ci", &a.0, &want, &mag, s.batch * s.height * s.width + 8);
    }

    #[test]
    fn degenerate_shapes() {
        // Zero batch / zero input channels: outputs are bias-only, gradients are zero.
        let s = ConvShape {
            batch: 2,
            cin: 0,
            cout: 3,
            height: 2,
            width: 3,
            kernel: 3,
        };
        let b = [1.0, -2.0, 3.0];
        let mut y = vec![f32::NAN; s.output_len()];
        conv2d_forward(&s, &[], &[], &b, true, &mut y);
        assert_eq!(&y[..6], &[1.0; 6]);
        assert_eq!(&y[6..12], &[0.0; 6]);
        let dy = vec![1.0; s.output_len()];
        let mut db = [f32::NAN; 3];
        conv2d_backward_weight(&s, &[], &dy, &mut [], &mut db);
        assert_eq!(db, [12.0; 3]);
        conv2d_backward_data(&s, &dy, &[], &mut []);
        let s0 = ConvShape { batch: 0, ..s };
        conv2d_forward(&s0, &[], &[], &b, false, &mut []);
    }

    #[test]
    #[should_panic(expected = "conv2d_forward: w length")]
    fn length_mismatch_panics() {
        let s = ConvShape {
            batch: 1,
            cin: 1,
            cout: 1,
            height: 2,
            width: 2,
            kernel: 3,
        };
        conv2d_forward(&s, &[0.0; 4], &[0.0; 8], &[0.0], false, &mut [0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "kernel size must be odd")]
    fn even_kernel_panics() {
        let s = ConvShape {
            batch: 1,
            cin: 1,
            cout: 1,
            height: 2,
            width: 2,
            kernel: 2,
        };
        conv2d_forward(&s, &[0.0; 4], &[0.0; 4], &[0.0], false, &mut [0.0; 4]);
    }

    /// Throughput of the model's convolutions at batch 64:
    /// `MATMUL_NUM_THREADS=1 cargo test --release -p clayflow-trainer -- --ignored --nocapture conv_timing`
    #[test]
    #[ignore]
    fn conv_timing() {
        use std::time::Instant;
        let batch: usize = std::env::var("CONV_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64);
        let threads_list: Vec<usize> = match std::env::var("CONV_THREADS") {
            Ok(v) => vec![v.parse().unwrap()],
            Err(_) => vec![1, 2],
        };
        for threads in threads_list {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            println!("--- {threads} rayon thread(s), batch {batch}");
            pool.install(|| {
                let mut total = 0.0;
                let only: Option<usize> = std::env::var("CONV_ONLY").ok().and_then(|v| v.parse().ok());
                for (si, s) in preset_shapes(batch).into_iter().enumerate() {
                    if only.is_some_and(|o| o != si) {
                        continue;
                    }
                    let mut rng = Rng(1);
                    let x = rng.vec(s.input_len());
                    let w = rng.vec(s.weight_len());
                    let b = rng.vec(s.cout);
                    let dy = rng.vec(s.output_len());
                    let mut y = vec![0.0; s.output_len()];
                    let mut dx = vec![0.0; s.input_len()];
                    let mut dw = vec![0.0; s.weight_len()];
                    let mut db = vec![0.0; s.cout];
                    let secs: f64 = std::env::var("CONV_SECS")
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.3);
                    let time = |f: &mut dyn FnMut()| {
                        f();
                        let mut best = f64::INFINITY;
                        let t0 = Instant::now();
                        let mut reps = 0;
                        while reps < 5 || (t0.elapsed().as_secs_f64() < secs && reps < 1000) {
                            let t = Instant::now();
                            f();
                            best = best.min(t.elapsed().as_secs_f64());
                            reps += 1;
                        }
                        best
                    };
                    let ops = std::env::var("CONV_OPS").unwrap_or_else(|_| "fdw".into());
                    let time_if = |c: char, f: &mut dyn FnMut()| if ops.contains(c) { time(f) } else { f64::NAN };
                    // CONV_ALGO=gemm|direct and CONV_DPLAN=col2im|flip_gemm|flip_direct
                    // override the automatic choices (for tuning).
                    let algo = match std::env::var("CONV_ALGO").as_deref() {
                        Ok("gemm") => Some(Algo::Gemm),
                        Ok("direct") => Some(Algo::Direct),
                        Ok("direct512") => Some(Algo::Direct512),
                        Ok("direct512co") => Some(Algo::Direct512Co),
                        Ok("direct512ci") => Some(Algo::Direct512Ci),
                        _ => None,
                    };
                    let plan = match std::env::var("CONV_DPLAN").as_deref() {
                        Ok("col2im") => DataPlan::Col2im,
                        Ok("flip_gemm") => DataPlan::Flipped(Algo::Gemm),
                        Ok("flip_direct") => DataPlan::Flipped(Algo::Direct),
                        Ok("flip_direct512") => DataPlan::Flipped(Algo::Direct512),
                        _ => pick_data_plan(&s),
                    };
                    let fa = algo.unwrap_or(pick_algo_for(s.cout, s.width, s.kernel, false));
                    let wa = algo.unwrap_or(pick_wgrad_algo(&s));
                    let tf = time_if('f', &mut || forward_with(&s, &x, &w, &b, true, &mut y, fa));
                    let td = time_if('d', &mut || backward_data_with(&s, &dy, &w, &mut dx, plan));
                    let tw = time_if('w', &mut || {
                        backward_weight_with(&s, &x, &dy, &mut dw, &mut db, wa)
                    });
                    let gf = s.flops() as f64 * 1e-9;
                    if s.height == 14 {
                        total += tf + td + tw;
                    }
                    println!(
                        "{}->{} k{} {}x{}: fwd {:7.3} ms ({:5.1} GF/s)  bwd_data {:7.3} ms ({:5.1})  bwd_w {:7.3} ms ({:5.1})",
                        s.cin, s.cout, s.kernel, s.height, s.width,
                        tf * 1e3, gf / tf, td * 1e3, gf / td, tw * 1e3, gf / tw
                    );
                }
                println!("MNIST preset total (3 convs x 3 ops): {:.3} ms", total * 1e3);
            });
        }
    }
}
