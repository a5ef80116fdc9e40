//! Data layouts shared by the algorithms: the zero-padded image geometry ([`PadGeo`]) and
//! its copies, the transposes and weight flips, and the small copy / add helpers.

use super::avx2;

/// Geometry of a zero-padded image used by the direct kernels and by `im2col`.
///
/// The image is stored as `[c][hp][wp]` with `hp = h + 2·pad`, `wp = w + 2·pad`. Output
/// pixel `(oy, ox)` lives at `q = oy·wp + ox` on the padded-width grid, and kernel tap
/// `(ci, ki, kj)` of that output reads `xp[ci·plane + ki·wp + kj + q]`. Positions with
/// `ox >= w` are computed but discarded. `q` runs up to `qpad` (a multiple of the SIMD
/// block), and the buffer carries `qpad - qlen` zeros of slack so the last block's reads
/// stay in bounds.
#[derive(Clone, Copy, Debug)]
pub(super) struct PadGeo {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) pad: usize,
    pub(super) wp: usize,
    pub(super) plane: usize,
    /// Last valid output position + 1: `(h-1)·wp + w`.
    qlen: usize,
    /// `qlen` rounded up to the SIMD block.
    pub(super) qpad: usize,
}

impl PadGeo {
    pub(super) fn new(h: usize, w: usize, k: usize, block: usize) -> Self {
        let pad = k / 2;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        let qlen = if h == 0 { 0 } else { (h - 1) * wp + w };
        PadGeo {
            h,
            w,
            k,
            pad,
            wp,
            plane: hp * wp,
            qlen,
            qpad: qlen.div_ceil(block) * block,
        }
    }

    /// Length of the padded buffer for `c` channels, including the read slack.
    pub(super) fn padded_len(&self, c: usize) -> usize {
        c * self.plane + (self.qpad - self.qlen)
    }

    pub(super) fn taps(&self, cin: usize) -> avx2::Taps {
        avx2::Taps {
            cin,
            k: self.k,
            plane: self.plane,
            wp: self.wp,
        }
    }
}

avx2_multiversion! {
    /// Copies `x` (`[c][h][w]`) into `xp` (`[c][hp][wp]` plus slack), zeroing the border.
    pub(super) fn pad_image(x: &[f32], c: usize, g: &PadGeo, xp: &mut [f32]) {
        pad_image_inline(x, c, g, xp)
    }
}

#[inline(always)]
pub(super) fn pad_image_inline(x: &[f32], c: usize, g: &PadGeo, xp: &mut [f32]) {
    let (h, w, pad, wp) = (g.h, g.w, g.pad, g.wp);
    let (planes, slack) = xp.split_at_mut(c * g.plane);
    slack.fill(0.0);
    if h == 0 || w == 0 {
        planes.fill(0.0);
        return;
    }
    // Every element is written exactly once: zero runs for the border, copies inside.
    for (ci, p) in planes.chunks_exact_mut(g.plane).enumerate() {
        p[..pad * wp + pad].fill(0.0);
        for iy in 0..h {
            let a = (iy + pad) * wp + pad;
            copy_small(&mut p[a..a + w], &x[(ci * h + iy) * w..][..w]);
            if iy + 1 < h {
                // right border of this row + left border of the next one
                zero_small(&mut p[a + w..a + w + 2 * pad]);
            }
        }
        p[(h - 1 + pad) * wp + pad + w..].fill(0.0);
    }
}

avx2_multiversion! {
    /// For the AVX-512 weight-gradient kernel: `xsh[((ci·hp + r)·k + kj)·16 + l] =
    /// xp[ci·plane + r·wp + kj + l]` for every padded row `r < hp`, kernel column `kj < k`
    /// and lane `l < 16` (`xp` is a padded image with at least 16 floats of slack).
    pub(super) fn shifted_rows(xp: &[f32], cin: usize, g: &PadGeo, xsh: &mut [f32]) {
        let (k, wp) = (g.k, g.wp);
        let hp = g.plane / wp.max(1);
        let mut dst = xsh.chunks_exact_mut(16);
        for ci in 0..cin {
            for r in 0..hp {
                let src = &xp[ci * g.plane + r * wp..];
                for kj in 0..k {
                    let d: &mut [f32; 16] = dst.next().unwrap().try_into().unwrap();
                    let s: &[f32; 16] = src[kj..kj + 16].try_into().unwrap();
                    *d = *s;
                }
            }
        }
    }
}

avx2_multiversion! {
    /// `dyt[p·ldo + c] = dy[c·hw + p]` for `c < cout`, `p < hw`, in 8 x 8 tiles (contiguous
    /// 8-float reads and writes).
    pub(super) fn transpose_dy(dy: &[f32], cout: usize, hw: usize, dyt: &mut [f32], ldo: usize) {
        const B: usize = 8;
        for c0 in (0..cout).step_by(B) {
            let cn = (cout - c0).min(B);
            for p0 in (0..hw).step_by(B) {
                let pn = (hw - p0).min(B);
                let mut tile = [[0.0f32; B]; B];
                for (c, t) in tile.iter_mut().enumerate().take(cn) {
                    let src = &dy[(c0 + c) * hw + p0..][..pn];
                    t[..pn].copy_from_slice(src);
                }
                for p in 0..pn {
                    let dst = &mut dyt[(p0 + p) * ldo + c0..][..cn];
                    for (c, d) in dst.iter_mut().enumerate() {
                        *d = tile[c][p];
                    }
                }
            }
        }
    }
}

#[inline(always)]
pub(super) fn add_assign(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// `wf[ci][co][i][j] = w[co][ci][k-1-i][k-1-j]`.
pub(super) fn flip_transpose_weights(cout: usize, cin: usize, k: usize, w: &[f32], wf: &mut [f32]) {
    let kk = k * k;
    for co in 0..cout {
        for ci in 0..cin {
            let src = &w[(co * cin + ci) * kk..(co * cin + ci + 1) * kk];
            let dst = &mut wf[(ci * cout + co) * kk..(ci * cout + co + 1) * kk];
            for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                *d = *s;
            }
        }
    }
}

/// `dst.fill(0.0)` for slices of at most 16 elements, without a libc call.
#[inline(always)]
fn zero_small(dst: &mut [f32]) {
    const ZEROS: [f32; 16] = [0.0; 16];
    let n = dst.len();
    copy_small(dst, &ZEROS[..n]);
}

/// `dst.copy_from_slice(src)` for short slices, as a few fixed-size (inlined) moves.
#[inline(always)]
pub(super) fn copy_small(dst: &mut [f32], src: &[f32]) {
    let n = dst.len();
    assert_eq!(n, src.len());
    macro_rules! blk {
        ($at:expr, $len:literal) => {{
            let at = $at;
            let d: &mut [f32; $len] = (&mut dst[at..at + $len]).try_into().unwrap();
            let s: &[f32; $len] = (&src[at..at + $len]).try_into().unwrap();
            *d = *s;
        }};
    }
    if n >= 16 {
        let mut i = 0;
        while i + 16 <= n {
            blk!(i, 16);
            i += 16;
        }
        if i < n {
            blk!(n - 16, 16);
        }
    } else if n >= 8 {
        blk!(0, 8);
        blk!(n - 8, 8);
    } else if n >= 4 {
        blk!(0, 4);
        blk!(n - 4, 4);
    } else {
        // Explicit stores: a 0..n loop could be turned back into a memcpy call.
        if n > 0 {
            dst[0] = src[0];
        }
        if n > 1 {
            dst[1] = src[1];
        }
        if n > 2 {
            dst[2] = src[2];
        }
    }
}
