//! The NEON path (little-endian aarch64): 4 f32 lanes, 32 vector registers (6 rows x 4
//! channels = 24 accumulators); partial rows go through a small stack buffer. f16 weights
//! are widened with the exact scalar conversion (the `float16x4_t` intrinsics need the
//! unstable `f16` type).

use core::arch::aarch64::*;

use super::Simd;

/// Four f32 lanes.
#[derive(Clone, Copy, Debug)]
pub struct V(float32x4_t);

impl Simd for V {
    const NAME: &'static str = "neon";
    const LANES: usize = 4;
    const ROWS: usize = 6;

    #[inline(always)]
    fn splat(v: f32) -> V {
        // SAFETY: register-only; the module is built only with NEON enabled.
        V(unsafe { vdupq_n_f32(v) })
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> V {
        // SAFETY: the caller guarantees 4 readable f32 at p; ld1 has no alignment need.
        V(unsafe { vld1q_f32(p) })
    }

    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> V {
        let mut t = [0f32; 4];
        for (i, v) in t.iter_mut().enumerate().take(n) {
            // SAFETY: i < n and p[0..n] is readable by the caller's contract.
            *v = unsafe { p.add(i).read() };
        }
        // SAFETY: t is 4 f32 on the stack.
        V(unsafe { vld1q_f32(t.as_ptr()) })
    }

    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: the caller guarantees 4 writable f32 at p; st1 has no alignment need.
        unsafe { vst1q_f32(p, self.0) }
    }

    #[inline(always)]
    unsafe fn store_n(self, p: *mut f32, n: usize) {
        let mut t = [0f32; 4];
        // SAFETY: t is 4 f32 on the stack.
        unsafe { vst1q_f32(t.as_mut_ptr(), self.0) };
        for (i, v) in t.iter().enumerate().take(n) {
            // SAFETY: i < n and p[0..n] is writable by the caller's contract.
            unsafe { p.add(i).write(*v) };
        }
    }

    #[inline(always)]
    fn fma(self, a: V, b: V) -> V {
        // SAFETY: register-only; the module is built only with NEON enabled.
        V(unsafe { vfmaq_f32(self.0, a.0, b.0) })
    }

    #[inline(always)]
    fn relu(self) -> V {
        // fmaxnm: the number when one operand is NaN, and +0.0 over -0.0 (the scalar ReLU).
        // SAFETY: register-only; the module is built only with NEON enabled.
        V(unsafe { vmaxnmq_f32(self.0, vdupq_n_f32(0.0)) })
    }
}
