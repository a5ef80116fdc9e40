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
//! * **bf16 on AMX** (x86-64 with AMX-BF16, Linux; only through the `_bf16` entry points,
//!   which the CPU backend calls for the coupling networks when a run asks for bf16): 1x1
//!   convolutions as a matrix product per image on the tiles (`tdpbf16ps`), operands
//!   rounded to bf16, sums in f32. Larger kernels stay f32: on small images neither AMX
//!   nor AVX-512 BF16's `vdpbf16ps` beat the f32 kernels (BENCHMARKS section 14).
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
//! # Modules
//!
//! `select` picks the algorithm of each op; `same_conv` runs forward and the
//! flipped-kernel backward-data, `backward_weight` the weight gradient; `im2col` (and
//! col2im), `layout` (padded images, transposes, small copies), `gemm` (the sgemm
//! wrapper) and `scratch` (thread-local buffers) serve them; `avx2` and `avx512` hold
//! the x86-64 kernels, `amx` the AMX products and their packing, `amx_conv` the 1x1
//! convolutions on them, `bf16` the conversions (`fallback` stubs them elsewhere). Tests
//! only: `tests`, against the plain f64 references of `clayflow-testkit`.
//!
//! # Threading and matrixmultiply
//!
//! The workspace enables matrixmultiply's `threading` feature. Its pool size comes from
//! `MATMUL_NUM_THREADS` and **defaults to the number of physical cores**, and a single
//! large sgemm then forks onto that pool. Since every sgemm here already runs inside a
//! rayon task, set `MATMUL_NUM_THREADS=1` (before the first sgemm) to avoid
//! oversubscription.

/// Defines `fn $name` that runs its body compiled with AVX2+FMA enabled when the CPU has
/// them (so the copy/add loops get 256-bit vectors; the crate's baseline is SSE2), and the
/// baseline build of the same body otherwise. Results are bitwise identical either way:
/// the bodies only copy, add element-wise, or sum in a fixed explicit order.
macro_rules! avx2_multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
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
                if $crate::backend::cpu::conv::avx2::available() {
                    // SAFETY: `fast` only adds the AVX2/FMA target features, which the CPU
                    // supports (checked just above); its body is safe code.
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

mod backward_weight;
mod gemm;
mod im2col;
mod layout;
mod same_conv;
mod scratch;
mod select;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod amx_conv;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod bf16;
// Stubs of `avx2`, `avx512`, `bf16`, `amx` and `amx_conv` for targets without the x86-64 kernels.
#[cfg(not(target_arch = "x86_64"))]
mod fallback;
#[cfg(not(target_arch = "x86_64"))]
use fallback::{amx, amx_conv, avx2, avx512, bf16};

#[cfg(test)]
mod tests;

use rayon::prelude::*;

// `ConvShape` lives with the other backend types (`backend/types.rs`); re-exported here for
// the ops' callers (`backend::cpu::conv::ConvShape`, e.g. benches/conv_cpu.rs).
pub use crate::backend::ConvShape;

use backward_weight::backward_weight_with;
use gemm::gemm;
use im2col::col2im;
use layout::flip_transpose_weights;
use same_conv::SameConv;
use scratch::{with_scratch, with_worker_scratch, FLIP_SCRATCH};
use select::{pick_algo_for, pick_data_plan, pick_wgrad_algo, Algo, DataPlan};

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

/// Whether this CPU runs the bf16 convolutions of [`conv2d_forward_bf16`] and its
/// backward ops: AMX-BF16 with the kernel's permission for the tile state (without it they
/// are the f32 ops).
pub fn bf16_available() -> bool {
    amx::available()
}

/// `x` rounded to bf16 (to nearest even; subnormals to zero), as the bf16 kernels round
/// their operands.
pub fn round_bf16(x: f32) -> f32 {
    bf16::round(x)
}

/// [`conv2d_forward`] with `x` and `w` rounded to bf16 and the products summed in f32, for
/// 1x1 kernels on a CPU with AMX-BF16 ([`bf16_available`]): a matrix product per image on
/// the tiles (`tdpbf16ps`). Otherwise, and for larger kernels (where neither AMX nor AVX-512
/// BF16 beat the f32 kernels on small images, BENCHMARKS section 14), exactly
/// [`conv2d_forward`]. The choice is the same in every build: unlike the choice between
/// the f32 kernels, it changes the result. The bias, the sums and the output stay f32.
///
/// # Panics
///
/// As [`conv2d_forward`].
pub fn conv2d_forward_bf16(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    relu: bool,
    y: &mut [f32],
) {
    if amx_conv::takes(s) {
        check_forward_lengths(s, x, w, b, y);
        return amx_conv::forward(s, x, w, b, relu, y);
    }
    conv2d_forward(s, x, w, b, relu, y);
}

/// [`conv2d_backward_data`] with `dy` and `w` rounded to bf16 and the products summed in
/// f32, where [`conv2d_forward_bf16`] rounds; otherwise exactly [`conv2d_backward_data`].
///
/// # Panics
///
/// As [`conv2d_backward_data`].
pub fn conv2d_backward_data_bf16(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    if amx_conv::takes(s) {
        check_data_lengths(s, dy, w, dx);
        return amx_conv::backward_data(s, dy, w, dx);
    }
    conv2d_backward_data(s, dy, w, dx);
}

/// [`conv2d_backward_weight`] with `x` and `dy` rounded to bf16 and the products summed in
/// f32, where [`conv2d_forward_bf16`] rounds; otherwise exactly [`conv2d_backward_weight`].
/// The bias gradient is summed in f32 from the unrounded `dy`.
///
/// # Panics
///
/// As [`conv2d_backward_weight`].
pub fn conv2d_backward_weight_bf16(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    if amx_conv::takes(s) {
        check_weight_lengths(s, x, dy, dw, db);
        return amx_conv::backward_weight(s, x, dy, dw, db);
    }
    conv2d_backward_weight(s, x, dy, dw, db);
}

fn check_forward_lengths(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32], y: &[f32]) {
    s.check_kernel("conv2d_forward");
    assert_eq!(x.len(), s.input_len(), "conv2d_forward: x length");
    assert_eq!(w.len(), s.weight_len(), "conv2d_forward: w length");
    assert_eq!(b.len(), s.cout, "conv2d_forward: b length");
    assert_eq!(y.len(), s.output_len(), "conv2d_forward: y length");
}

fn check_data_lengths(s: &ConvShape, dy: &[f32], w: &[f32], dx: &[f32]) {
    s.check_kernel("conv2d_backward_data");
    assert_eq!(dy.len(), s.output_len(), "conv2d_backward_data: dy length");
    assert_eq!(w.len(), s.weight_len(), "conv2d_backward_data: w length");
    assert_eq!(dx.len(), s.input_len(), "conv2d_backward_data: dx length");
}

fn check_weight_lengths(s: &ConvShape, x: &[f32], dy: &[f32], dw: &[f32], db: &[f32]) {
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
    check_forward_lengths(s, x, w, b, y);
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
    check_data_lengths(s, dy, w, dx);
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
