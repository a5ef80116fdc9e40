//! AVX2+FMA kernels for the direct path. Safe wrappers: they check bounds and CPU support.

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
pub(super) fn fwd_rows(mb: usize, xp: &[f32], g: Taps, wb: &[f32], out: &mut [f32], ldo: usize) {
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
pub(super) fn wgrad_rows(mb: usize, xp: &[f32], g: Taps, dye: &[f32], ldd: usize, acc: &mut [f32]) {
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
