//! Which algorithm each op uses: the direct kernels where the CPU has them and the shape
//! fits, im2col + sgemm otherwise.

use super::{avx2, avx512, ConvShape};

/// Ops whose GEMM M dimension (output channels of the op) is at most this use the direct
/// kernel when the CPU supports it.
const DIRECT_MAX_M: usize = 12;

/// Which inner algorithm an op uses (the tests run every one the machine supports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Algo {
    /// im2col + matrixmultiply sgemm.
    Gemm,
    /// Implicit-GEMM SIMD kernel on the padded image (needs `avx2::available()`).
    Direct,
    /// AVX-512 implicit-GEMM kernel with one image row per vector (needs
    /// `avx512::available()`; images at most 16 wide, kernels at most 7).
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
    w <= avx512::L && k <= avx512::MAX_K
}

/// Whether the input-channel-vectorised weight-gradient kernel handles kernel size `k`.
fn fits512ci(k: usize) -> bool {
    matches!(k, 1 | 3)
}

/// `algo`, or the best supported substitute when the AVX-512 kernels cannot take the shape.
pub(super) fn usable(algo: Algo, m: usize, w: usize, k: usize) -> Algo {
    if algo == Algo::Direct512Ci {
        return if fits512ci(k) && avx512::available() {
            algo
        } else {
            usable(Algo::Direct512, m, w, k)
        };
    }
    let is512 = matches!(algo, Algo::Direct512 | Algo::Direct512Co);
    if is512 && !(fits512(w, k) && avx512::available()) {
        if m <= DIRECT_MAX_M && avx2::available() {
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
pub(super) fn pick_algo_for(m: usize, w: usize, k: usize, wgrad: bool) -> Algo {
    if !cfg!(debug_assertions) && fits512(w, k) && avx512::available() {
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
pub(super) fn pick_wgrad_algo(s: &ConvShape) -> Algo {
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
    if m <= DIRECT_MAX_M && !cfg!(debug_assertions) && avx2::available() {
        Algo::Direct
    } else {
        Algo::Gemm
    }
}

/// How backward-data is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DataPlan {
    /// Convolution of `dy` with the flipped, channel-transposed kernel.
    Flipped(Algo),
    /// `dcols = Wᵀ · dy` (sgemm), then col2im.
    Col2im,
}

pub(super) fn pick_data_plan(s: &ConvShape) -> DataPlan {
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
