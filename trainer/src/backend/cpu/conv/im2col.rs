//! im2col (plain and transposed channels-last) and its adjoint col2im, for the sgemm path.

use super::layout::{add_assign, copy_small, pad_image_inline, PadGeo};
use super::scratch::{with_scratch, PAD_SCRATCH};

/// im2col for a "same", stride-1 convolution of one image `x` (`[c][h][w]`).
///
/// Writes row `r = (ci * k + ki) * k + kj` of the column matrix at `cols[r * ld ..]`:
/// `cols[r * ld + oy * w + ox] = x[ci][oy + ki - pad][ox + kj - pad]` (zero outside).
///
/// The image is first copied into a zero-bordered buffer, so that every (row, oy)
/// segment is a plain copy of `w` floats; the copies are done inline (no libc call
/// per 14-float segment).
pub(super) fn im2col(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    cols: &mut [f32],
    ld: usize,
) {
    let g = PadGeo::new(h, w, k, 1);
    with_scratch(&PAD_SCRATCH, g.padded_len(c), |xp| {
        im2col_padded(x, c, &g, xp, cols, ld)
    });
}

avx2_multiversion! {
    /// `im2col` given the padded-image scratch `xp`.
    fn im2col_padded(x: &[f32], c: usize, g: &PadGeo, xp: &mut [f32], cols: &mut [f32], ld: usize) {
        let (h, w, k) = (g.h, g.w, g.k);
        let hw = h * w;
        pad_image_inline(x, c, g, xp);
        for ci in 0..c {
            for ki in 0..k {
                for kj in 0..k {
                    let r = (ci * k + ki) * k + kj;
                    let row = &mut cols[r * ld..r * ld + hw];
                    let src = &xp[ci * g.plane + ki * g.wp + kj..];
                    for oy in 0..h {
                        copy_small(
                            &mut row[oy * w..(oy + 1) * w],
                            &src[oy * g.wp..oy * g.wp + w],
                        );
                    }
                }
            }
        }
    }
}

avx2_multiversion! {
/// Transposed, channels-last im2col of one image `x` (`[c][h][w]`), via the zero-padded
/// channels-last copy `xt` (`[hp][wp][c]`, `g.plane * c` floats):
/// `cols[(oy·w + ox)·kc + (ki·k + kj)·c + ci] = x[ci][oy + ki - pad][ox + kj - pad]`.
pub(super) fn im2col_t(x: &[f32], c: usize, g: &PadGeo, xt: &mut [f32], cols: &mut [f32]) {
    let (h, w, k, wp) = (g.h, g.w, g.k, g.wp);
    let kc = c * k * k;
    xt.fill(0.0);
    for ci in 0..c {
        for iy in 0..h {
            let src = &x[(ci * h + iy) * w..][..w];
            let base = ((iy + g.pad) * wp + g.pad) * c + ci;
            for (ix, &v) in src.iter().enumerate() {
                xt[base + ix * c] = v;
            }
        }
    }
    let run = k * c;
    for oy in 0..h {
        for ox in 0..w {
            let dst = &mut cols[(oy * w + ox) * kc..][..kc];
            for ki in 0..k {
                let src = &xt[((oy + ki) * wp + ox) * c..][..run];
                copy_small(&mut dst[ki * run..(ki + 1) * run], src);
            }
        }
    }
}
}

avx2_multiversion! {
/// Adjoint of `im2col` (with `ld = h * w`): `x = 0`, then every column entry is added
/// back to the input pixel it was read from.
pub(super) fn col2im(cols: &[f32], c: usize, h: usize, w: usize, k: usize, x: &mut [f32]) {
    let pad = k / 2;
    let hw = h * w;
    x.fill(0.0);
    for ci in 0..c {
        let xc = &mut x[ci * hw..(ci + 1) * hw];
        for ki in 0..k {
            let oy0 = pad.saturating_sub(ki).min(h);
            let oy1 = (h + pad).saturating_sub(ki).min(h).max(oy0);
            for kj in 0..k {
                let r = (ci * k + ki) * k + kj;
                let row = &cols[r * hw..(r + 1) * hw];
                let ox0 = pad.saturating_sub(kj).min(w);
                let ox1 = (w + pad).saturating_sub(kj).min(w).max(ox0);
                if ox0 == ox1 {
                    continue;
                }
                for oy in oy0..oy1 {
                    let iy = oy + ki - pad;
                    let src = &row[oy * w + ox0..oy * w + ox1];
                    let dst = &mut xc[iy * w + ox0 + kj - pad..iy * w + ox1 + kj - pad];
                    add_assign(dst, src);
                }
            }
        }
    }
}
}
