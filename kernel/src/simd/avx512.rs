//! The AVX-512F path: 16 f32 lanes, 32 vector registers (6 rows x 4 channels = 24
//! accumulators), masked loads and stores for partial rows, F16C-style widening of f16
//! weights with `vcvtph2ps`.

#[cfg(target_arch = "x86")]
use core::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::Simd;
use core::mem::MaybeUninit;

/// Sixteen f32 lanes.
#[derive(Clone, Copy, Debug)]
pub struct V(__m512);

/// Mask of the first `n` lanes (`n <= 16`).
#[inline(always)]
fn first(n: usize) -> __mmask16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n).wrapping_sub(1)
    }
}

impl Simd for V {
    const NAME: &'static str = "avx512";
    const LANES: usize = 16;
    const ROWS: usize = 6;

    #[inline(always)]
    fn splat(v: f32) -> V {
        // SAFETY: register-only; the module is built only with AVX-512F enabled.
        V(unsafe { _mm512_set1_ps(v) })
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 16 readable f32 at p; loadu has no alignment need.
        V(unsafe { _mm512_loadu_ps(p) })
    }

    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> V {
        // SAFETY: masked-off lanes are not accessed (no fault, no read); lanes 0..n are
        // readable by the caller's contract.
        V(unsafe { _mm512_maskz_loadu_ps(first(n), p) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 16 writable f32 at p; storeu has no alignment need.
        unsafe { _mm512_storeu_ps(p, self.0) }
    }

    #[inline(always)]
    unsafe fn store_n(self, p: *mut f32, n: usize) {
        // SAFETY: only lanes 0..n are written, and the caller guarantees they are writable.
        unsafe { _mm512_mask_storeu_ps(p, first(n), self.0) }
    }

    #[inline(always)]
    fn fma(self, a: V, b: V) -> V {
        // SAFETY: register-only; the module is built only with AVX-512F enabled.
        V(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
    }

    #[inline(always)]
    fn relu(self) -> V {
        // maxps returns its second operand when either is NaN or both are zero: +0.0 for
        // NaN and -0.0, as the scalar ReLU does.
        // SAFETY: register-only; the module is built only with AVX-512F enabled.
        V(unsafe { _mm512_max_ps(self.0, _mm512_setzero_ps()) })
    }

    #[inline(always)]
    fn widen_f16(src: &[u8], dst: &mut [MaybeUninit<f32>]) {
        let mut s = src.chunks_exact(32);
        let mut d = dst.chunks_exact_mut(16);
        for (sb, db) in (&mut s).zip(&mut d) {
            // SAFETY: sb holds 32 bytes = 16 f16 (unaligned load), db 16 f32.
            unsafe {
                let h = _mm256_loadu_si256(sb.as_ptr().cast::<__m256i>());
                _mm512_storeu_ps(db.as_mut_ptr().cast::<f32>(), _mm512_cvtph_ps(h));
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
