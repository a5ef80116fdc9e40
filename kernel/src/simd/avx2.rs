//! The AVX2 + FMA path: 8 f32 lanes, 16 vector registers (2 rows x 4 channels = 8
//! accumulators, leaving room for the row vectors and broadcasts), `vmaskmovps` for partial
//! rows, and `vcvtph2ps` for f16 weights when F16C is enabled too.

#[cfg(target_arch = "x86")]
use core::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::Simd;
#[cfg_attr(not(target_feature = "f16c"), allow(unused_imports))]
use core::mem::MaybeUninit;

/// Eight f32 lanes.
#[derive(Clone, Copy, Debug)]
pub struct V(__m256);

/// Lane mask (all bits set in lanes `0..n`) for `vmaskmovps`.
#[inline(always)]
fn first(n: usize) -> __m256i {
    let n = i32::try_from(n).unwrap_or(8);
    // SAFETY: register-only; the module is built only with AVX2 and FMA enabled.
    unsafe {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }
}

impl Simd for V {
    const NAME: &'static str = "avx2";
    const LANES: usize = 8;
    const ROWS: usize = 2;

    #[inline(always)]
    fn splat(v: f32) -> V {
        // SAFETY: register-only; the module is built only with AVX2 and FMA enabled.
        V(unsafe { _mm256_set1_ps(v) })
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 8 readable f32 at p; loadu has no alignment need.
        V(unsafe { _mm256_loadu_ps(p) })
    }

    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> V {
        // SAFETY: vmaskmovps does not access masked-off lanes (no fault); lanes 0..n are
        // readable by the caller's contract.
        V(unsafe { _mm256_maskload_ps(p, first(n)) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 8 writable f32 at p; storeu has no alignment need.
        unsafe { _mm256_storeu_ps(p, self.0) }
    }

    #[inline(always)]
    unsafe fn store_n(self, p: *mut f32, n: usize) {
        // SAFETY: only lanes 0..n are written, and the caller guarantees they are writable.
        unsafe { _mm256_maskstore_ps(p, first(n), self.0) }
    }

    #[inline(always)]
    fn fma(self, a: V, b: V) -> V {
        // SAFETY: register-only; the module is built only with AVX2 and FMA enabled.
        V(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
    }

    #[inline(always)]
    fn relu(self) -> V {
        // maxps returns its second operand when either is NaN or both are zero: +0.0 for
        // NaN and -0.0, as the scalar ReLU does.
        // SAFETY: register-only; the module is built only with AVX2 and FMA enabled.
        V(unsafe { _mm256_max_ps(self.0, _mm256_setzero_ps()) })
    }

    #[cfg(target_feature = "f16c")]
    #[inline(always)]
    fn widen_f16(src: &[u8], dst: &mut [MaybeUninit<f32>]) {
        let mut s = src.chunks_exact(16);
        let mut d = dst.chunks_exact_mut(8);
        for (sb, db) in (&mut s).zip(&mut d) {
            // SAFETY: sb holds 16 bytes = 8 f16 (unaligned load), db 8 f32.
            unsafe {
                let h = _mm_loadu_si128(sb.as_ptr().cast::<__m128i>());
                _mm256_storeu_ps(db.as_mut_ptr().cast::<f32>(), _mm256_cvtph_ps(h));
            }
        }
        for (dv, b) in d
            .into_remainder()
            .iter_mut()
            .zip(s.remainder().chunks_exact(2))
        {
            let h = b.first_chunk::<2>().map_or(0, |b| u16::from_le_bytes(*b));
            *dv = MaybeUninit::new(crate::conv::f16_to_f32(h));
        }
    }
}
