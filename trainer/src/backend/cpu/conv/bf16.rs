//! bf16 operands with f32 accumulation (AVX-512 BF16, `vdpbf16ps`) for the AVX-512 row
//! kernel's forward convolution, which also runs backward-data (the flipped-kernel
//! convolution). Used for the coupling networks' convolutions when a run asks for it
//! (`clayflow train --bf16`); the kernel's f32/f16 inference never uses it.
//!
//! Input channels go in pairs: one 32-bit lane holds one pixel of channels `2p` (low half)
//! and `2p + 1` (high half; zero when `cin` is odd), and one broadcast holds the two
//! channels' weights of a tap in the same order, so one `vdpbf16ps` does the multiply-adds
//! of both channels. The products of two bf16 values are exact in f32, so the result is
//! the f32 convolution of the rounded operands up to the order of the f32 additions
//! (`tests` checks it against an f64 reference on the rounded operands with the same
//! bound as the f32 kernels). Rounding is to nearest even, and subnormal inputs become
//! zero, as `vcvtneps2bf16` does, so [`round`] and the vector conversion agree bit for bit.
//! The buffers stay `f32` slices: a pair is stored as the `f32` with its bits.

use super::layout::PadGeo;
use super::avx512::SLACK;
use std::arch::x86_64::*;

/// Whether this CPU runs the bf16 kernel (AVX-512F and AVX-512 BF16).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// The bf16 bits of `x`: round to nearest even, subnormals to a signed zero, NaN kept a
/// (quiet) NaN; what `vcvtneps2bf16` computes.
pub(super) fn round_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bf16, as an f32 (the value the kernel multiplies).
pub(crate) fn round(x: f32) -> f32 {
    f32::from_bits(u32::from(round_bits(x)) << 16)
}

/// Two channels' values as one lane: `lo` in the low half, `hi` in the high half.
fn pair(lo: f32, hi: f32) -> f32 {
    f32::from_bits(u32::from(round_bits(lo)) | u32::from(round_bits(hi)) << 16)
}

/// Number of channel pairs of `c` channels.
pub(super) fn pairs(c: usize) -> usize {
    c.div_ceil(2)
}

/// Packs weights `w` (`[cout][cin][k][k]`) for the output channels `co0..co0 + mb` as
/// `wq[((p·k + ki)·k + kj)·mb + m]` = the pair of channels `2p`, `2p + 1` at tap
/// `(ki, kj)` of output channel `co0 + m` (the layout `avx512::fwd_rows` reads).
pub(super) fn pack_weights(
    w: &[f32],
    cin: usize,
    k: usize,
    co0: usize,
    mb: usize,
    wq: &mut [f32],
) {
    let (kk, kc) = (k * k, cin * k * k);
    for p in 0..pairs(cin) {
        for t in 0..kk {
            for m in 0..mb {
                let row = &w[(co0 + m) * kc..][..kc];
                let lo = row[2 * p * kk + t];
                let hi = if 2 * p + 1 < cin {
                    row[(2 * p + 1) * kk + t]
                } else {
                    0.0
                };
                wq[(p * kk + t) * mb + m] = pair(lo, hi);
            }
        }
    }
}

/// Length of the padded pair buffer of `c` channels, slack included.
pub(super) fn padded_len(c: usize, g: &PadGeo) -> usize {
    pairs(c) * g.plane + SLACK
}

/// Copies `x` (`[c][h][w]`, `w <= 16`) into `xq` (`[pairs(c)][hp][wp]` pairs plus
/// [`SLACK`]), rounded to bf16, with a zero border and slack.
///
/// # Panics
///
/// If [`available`] is false, `g.w > 16`, or a slice is too short.
pub(super) fn pad_pairs(x: &[f32], c: usize, g: &PadGeo, xq: &mut [f32]) {
    assert!(available(), "pad_pairs needs AVX-512 BF16");
    assert!(g.w <= 16, "pad_pairs: image wider than 16");
    assert!(x.len() >= c * g.h * g.w, "pad_pairs: x too short");
    assert!(xq.len() >= padded_len(c, g), "pad_pairs: xq too short");
    xq.fill(0.0);
    if g.h == 0 || g.w == 0 {
        return;
    }
    let hw = g.h * g.w;
    for p in 0..pairs(c) {
        let lo = &x[2 * p * hw..][..hw];
        let hi = (2 * p + 1 < c).then(|| &x[(2 * p + 1) * hw..][..hw]);
        for iy in 0..g.h {
            let dst = &mut xq[p * g.plane + (iy + g.pad) * g.wp + g.pad..][..g.w];
            pair_rows(&lo[iy * g.w..][..g.w], hi.map(|h| &h[iy * g.w..][..g.w]), dst);
        }
    }
}

/// `dst[j] = pair(src[2j], src[2j + 1])` for `j < dst.len()`: consecutive values as pairs
/// (a value past the end of `src` is zero), with the vector conversion.
///
/// # Panics
///
/// If [`available`] is false, `dst` is longer than 16 or `src` longer than `2·dst.len()`
/// or shorter than `2·dst.len() - 1`.
pub(super) fn consecutive_pairs(src: &[f32], dst: &mut [f32]) {
    assert!(available(), "consecutive_pairs needs AVX-512 BF16");
    let n = dst.len();
    assert!(n <= 16, "consecutive_pairs: more than 16 pairs");
    assert!(src.len() <= 2 * n && src.len() + 1 >= 2 * n, "consecutive_pairs: bad length");
    let len = src.len();
    let m0: __mmask16 = if len >= 16 { !0 } else { (1u16 << len) - 1 };
    let m1: __mmask16 = if len >= 32 {
        !0
    } else if len > 16 {
        (1u16 << (len - 16)) - 1
    } else {
        0
    };
    let md: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
    // SAFETY: AVX-512F and AVX-512 BF16 are available (asserted); the masked loads read
    // `src[..len]` only, and the masked store writes `dst[..n]`.
    unsafe { consecutive_impl(src.as_ptr(), m0, m1, md, dst.as_mut_ptr()) };
}

/// # Safety
///
/// AVX-512F and AVX-512 BF16 available; lanes of `m0` at `src`, of `m1` at `src + 16`
/// readable, lanes of `md` at `dst` writable.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn consecutive_impl(
    src: *const f32,
    m0: __mmask16,
    m1: __mmask16,
    md: __mmask16,
    dst: *mut f32,
) {
    // SAFETY: the caller guarantees the CPU features and the bounds.
    unsafe {
        let a = _mm512_maskz_loadu_ps(m0, src);
        let b = _mm512_maskz_loadu_ps(m1, src.add(16));
        // The low 16 values from `a`, the high 16 from `b`: 32 values in order, that is 16
        // pairs in order.
        let v = _mm512_cvtne2ps_pbh(b, a);
        _mm512_mask_storeu_epi32(dst.cast(), md, std::mem::transmute::<__m512bh, __m512i>(v));
    }
}

/// `dst[l] = pair(lo[l], hi[l])` (`hi` zero when `None`) for `l < dst.len()`, with the
/// vector conversion (`vcvtneps2bf16`).
///
/// # Panics
///
/// If [`available`] is false, `dst` is longer than 16, or `lo` or `hi` is shorter than
/// `dst`.
pub(super) fn pair_rows(lo: &[f32], hi: Option<&[f32]>, dst: &mut [f32]) {
    assert!(available(), "pair_rows needs AVX-512 BF16");
    let n = dst.len();
    assert!(n <= 16, "pair_rows: more than 16 lanes");
    assert!(lo.len() >= n && hi.is_none_or(|h| h.len() >= n), "pair_rows: short input");
    let mask: __mmask16 = if n == 16 { !0 } else { (1u16 << n) - 1 };
    // SAFETY: AVX-512F and AVX-512 BF16 are available (asserted); the masked loads read
    // lanes `< n` of `lo` and `hi`, and the masked store writes lanes `< n` of `dst`, all
    // at least `n` long (asserted).
    unsafe { pair_row(lo.as_ptr(), hi.map(<[f32]>::as_ptr), mask, dst.as_mut_ptr()) };
}

/// `dst[l] = pair(lo[l], hi[l] or 0)` for the lanes of `mask`.
///
/// # Safety
///
/// AVX-512F and AVX-512 BF16 available; the lanes of `mask` in bounds of all three.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_row(lo: *const f32, hi: Option<*const f32>, mask: __mmask16, dst: *mut f32) {
    // SAFETY: the caller guarantees the CPU features and the bounds.
    unsafe {
        let a = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
            _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, lo)),
        ));
        let b = match hi {
            Some(hi) => _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(std::mem::transmute::<
                __m256bh,
                __m256i,
            >(
                _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, hi)),
            ))),
            None => _mm512_setzero_si512(),
        };
        _mm512_mask_storeu_epi32(dst.cast(), mask, _mm512_or_si512(a, b));
    }
}

/// One `vdpbf16ps`: `acc + lo(w)·lo(x) + hi(w)·hi(x)` in each lane, `w` and `x` holding
/// pairs (as the bits of f32 vectors).
///
/// # Safety
///
/// AVX-512F and AVX-512 BF16 available.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(super) unsafe fn dot_pairs(acc: __m512, w: __m512, x: __m512) -> __m512 {
    // SAFETY: `__m512` and `__m512bh` are both 64 bytes of plain data; the caller
    // guarantees the CPU features.
    unsafe {
        _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512, __m512bh>(w),
            std::mem::transmute::<__m512, __m512bh>(x),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_the_hardware_conversion() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: the vector conversion is not run");
        }
        let mut vals = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.5,
            1.0 + f32::EPSILON,
            f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // subnormal: zero
            -f32::from_bits(0x7f_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let mut s = 0x9e37_79b9u32;
        for _ in 0..4096 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let v = f32::from_bits(s);
            if !v.is_nan() {
                vals.push(v);
            }
        }
        assert_eq!(round_bits(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(round_bits(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(round_bits(f32::MAX), 0x7f80, "rounds up to infinity");
        assert_eq!(round_bits(f32::from_bits(1)), 0);
        assert!(round(f32::NAN).is_nan());
        for v in &vals {
            let want = half::bf16::from_f32(*v);
            if !v.is_subnormal() {
                assert_eq!(round_bits(*v), want.to_bits(), "{v:e}");
            }
        }
        if !available() {
            return;
        }
        let n = vals.len() / 2;
        let g = PadGeo::new(1, n.min(16), 1, 1);
        for chunk in vals.chunks_exact(2 * g.w) {
            let (lo, hi) = chunk.split_at(g.w);
            let mut xq = vec![f32::NAN; padded_len(2, &g)];
            let x: Vec<f32> = lo.iter().chain(hi).copied().collect();
            pad_pairs(&x, 2, &g, &mut xq);
            for l in 0..g.w {
                assert_eq!(xq[l].to_bits(), pair(lo[l], hi[l]).to_bits(), "{:e}", lo[l]);
            }
            assert!(xq[g.w..].iter().all(|v| v.to_bits() == 0), "slack zeroed");
        }
    }
}
