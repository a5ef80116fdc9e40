//! AVX-512F kernels for the direct path on images at most 16 pixels wide: one output row
//! is one zmm (lanes `>= w` are computed on neighbouring padded pixels and discarded), so
//! no padded-width gap columns are wasted. Safe wrappers check bounds and CPU support.

use super::avx2::Taps;
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
