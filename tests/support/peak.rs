//! One core's measured peak of the floating-point instruction the active kernel path is
//! built on: 512-bit FMA (AVX-512), 256-bit FMA (AVX2 + FMA), 128-bit FMA (NEON), and for
//! the scalar build (x86_64 baseline) 128-bit SSE multiply + add (no FMA in the baseline;
//! the scalar path's 4-wide blocks are at best this).
//!
//! The loop runs [`CHAINS`] independent accumulator chains, enough to cover FMA latency
//! (4 cycles) times the FMA ports (2) on current x86 cores, so the figure is the throughput
//! limit, not the latency limit. It is a measurement, not a datasheet number: frequency
//! scaling under AVX-512 load and other processes on the core are included.

use std::hint::black_box;
use std::time::Instant;

/// Independent accumulator chains in the peak loop.
pub const CHAINS: usize = 12;

/// The active path's vector instruction: a name, and one round of `CHAINS` multiply-adds
/// over `iters` iterations; returns the FLOP executed.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod imp {
    use super::CHAINS;
    use std::arch::x86_64::*;
    pub const NAME: &str = "avx512 FMA (16 lanes)";
    pub fn run(iters: u64, a: f32, b: f32) -> (f32, u64) {
        // SAFETY: this module is built only with AVX-512F enabled; register-only intrinsics.
        unsafe {
            let (va, vb) = (_mm512_set1_ps(a), _mm512_set1_ps(b));
            let mut acc = [_mm512_set1_ps(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, va, vb);
                }
            }
            let mut s = _mm512_setzero_ps();
            for x in acc {
                s = _mm512_add_ps(s, x);
            }
            (_mm512_reduce_add_ps(s), iters * (CHAINS as u64) * 32)
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma",
    not(target_feature = "avx512f")
))]
mod imp {
    use super::CHAINS;
    use std::arch::x86_64::*;
    pub const NAME: &str = "avx2 FMA (8 lanes)";
    pub fn run(iters: u64, a: f32, b: f32) -> (f32, u64) {
        // SAFETY: this module is built only with AVX2 and FMA enabled; register-only.
        unsafe {
            let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
            let mut acc = [_mm256_set1_ps(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm256_fmadd_ps(*x, va, vb);
                }
            }
            let mut t = [0f32; 8];
            let mut s = _mm256_setzero_ps();
            for x in acc {
                s = _mm256_add_ps(s, x);
            }
            _mm256_storeu_ps(t.as_mut_ptr(), s);
            (t.iter().sum(), iters * (CHAINS as u64) * 16)
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    use super::CHAINS;
    use std::arch::aarch64::*;
    pub const NAME: &str = "neon FMA (4 lanes)";
    pub fn run(iters: u64, a: f32, b: f32) -> (f32, u64) {
        // SAFETY: this module is built only with NEON enabled; register-only intrinsics.
        unsafe {
            let (va, vb) = (vdupq_n_f32(a), vdupq_n_f32(b));
            let mut acc = [vdupq_n_f32(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = vfmaq_f32(vb, *x, va);
                }
            }
            let mut s = vdupq_n_f32(0.0);
            for x in acc {
                s = vaddq_f32(s, x);
            }
            (vaddvq_f32(s), iters * (CHAINS as u64) * 8)
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    not(all(target_feature = "avx2", target_feature = "fma"))
))]
mod imp {
    use super::CHAINS;
    use std::arch::x86_64::*;
    pub const NAME: &str = "scalar build: SSE mulps + addps (4 lanes)";
    pub fn run(iters: u64, a: f32, b: f32) -> (f32, u64) {
        // SAFETY: SSE is part of the x86_64 baseline; register-only intrinsics.
        unsafe {
            let (va, vb) = (_mm_set1_ps(a), _mm_set1_ps(b));
            let mut acc = [_mm_set1_ps(1.0); CHAINS];
            for _ in 0..iters {
                for x in acc.iter_mut() {
                    *x = _mm_add_ps(_mm_mul_ps(*x, va), vb);
                }
            }
            let mut s = _mm_setzero_ps();
            for x in acc {
                s = _mm_add_ps(s, x);
            }
            let mut t = [0f32; 4];
            _mm_storeu_ps(t.as_mut_ptr(), s);
            (t.iter().sum(), iters * (CHAINS as u64) * 8)
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod imp {
    use super::CHAINS;
    pub const NAME: &str = "scalar build: f32 mul + add";
    pub fn run(iters: u64, a: f32, b: f32) -> (f32, u64) {
        let mut acc = [1f32; CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = *x * a + b;
            }
        }
        (acc.iter().sum(), iters * (CHAINS as u64) * 2)
    }
}

/// Name of the instruction the peak is measured for.
pub const PEAK_INSTRUCTION: &str = imp::NAME;

/// Measured single-thread peak in GFLOP/s (one FMA or mul+add = 2 FLOP per lane): the best
/// of `rounds` runs of about `ms` milliseconds each.
pub fn fma_peak_gflops(rounds: usize, ms: u64) -> f64 {
    // Calibrate the iteration count to the requested duration.
    let mut iters = 1u64 << 16;
    loop {
        let t = Instant::now();
        black_box(imp::run(
            black_box(iters),
            black_box(0.999),
            black_box(1e-3),
        ));
        let el = t.elapsed().as_secs_f64();
        if el * 1e3 >= ms as f64 / 4.0 || iters > 1 << 34 {
            iters = ((iters as f64) * (ms as f64 / 1e3) / el.max(1e-9)).max(1.0) as u64;
            break;
        }
        iters *= 4;
    }
    let mut best = 0f64;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let (_, flop) = black_box(imp::run(
            black_box(iters),
            black_box(0.999),
            black_box(1e-3),
        ));
        let g = flop as f64 / t.elapsed().as_secs_f64() / 1e9;
        best = best.max(g);
    }
    best
}
