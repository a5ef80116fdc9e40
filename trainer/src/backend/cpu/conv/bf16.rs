//! f32 to bf16 conversions for the AMX kernels (`amx`): round to nearest even, subnormals
//! to zero, as `vcvtneps2bf16` does, so [`round`] (scalar) and the vector conversions agree
//! bit for bit. Two bf16 values travel as one 32-bit *pair* (the first in the low half),
//! the unit `tdpbf16ps` multiplies; buffers of pairs stay `f32` slices holding the bits.
//!
//! The AVX-512 BF16 dot product `vdpbf16ps` was tried for the 3x3 convolutions and lost to
//! the f32 kernels on this project's Xeon (BENCHMARKS section 14): only the conversions are
//! used.

use std::arch::x86_64::*;

/// Whether this CPU has the vector conversions (AVX-512F and AVX-512 BF16).
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
    assert!(
        src.len() <= 2 * n && src.len() + 1 >= 2 * n,
        "consecutive_pairs: bad length"
    );
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
    assert!(
        lo.len() >= n && hi.is_none_or(|h| h.len() >= n),
        "pair_rows: short input"
    );
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
        let pair = |lo: f32, hi: f32| u32::from(round_bits(lo)) | u32::from(round_bits(hi)) << 16;
        for chunk in vals.chunks(32) {
            // Consecutive values as pairs, and two rows as pairs, every length up to 16.
            let n = chunk.len().div_ceil(2);
            let mut got = vec![f32::NAN; n];
            consecutive_pairs(chunk, &mut got);
            for (j, g) in got.iter().enumerate() {
                let hi = chunk.get(2 * j + 1).copied().unwrap_or(0.0);
                assert_eq!(g.to_bits(), pair(chunk[2 * j], hi), "{:e}", chunk[2 * j]);
            }
            let (lo, hi) = chunk.split_at(chunk.len() / 2);
            let n = lo.len();
            let mut got = vec![f32::NAN; n];
            pair_rows(lo, Some(&hi[..n]), &mut got);
            for l in 0..n {
                assert_eq!(got[l].to_bits(), pair(lo[l], hi[l]), "{:e}", lo[l]);
            }
            pair_rows(lo, None, &mut got);
            for l in 0..n {
                assert_eq!(got[l].to_bits(), pair(lo[l], 0.0));
            }
        }
    }
}
