//! The stride-1 "same" convolution behind forward and (with the flipped kernel)
//! backward-data: im2col + sgemm on groups of images, or the direct kernels image by image;
//! and its bias / ReLU epilogues.

use rayon::prelude::*;

use super::gemm::gemm;
use super::im2col::im2col;
use super::layout::{pad_image, PadGeo};
use super::scratch::{with_call_scratch, with_worker_scratch};
use super::select::{usable, Algo};
use super::{avx2, avx512};

/// A stride-1 "same" convolution problem (also used for backward-data with the
/// flipped kernel).
#[derive(Clone, Copy, Debug)]
pub(super) struct SameConv {
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
}

impl SameConv {
    pub(super) fn new(batch: usize, cin: usize, cout: usize, h: usize, w: usize, k: usize) -> Self {
        SameConv {
            batch,
            cin,
            cout,
            h,
            w,
            k,
        }
    }

    /// Images per sgemm. Several images are batched into one GEMM (N = imgs * HW) when
    /// the per-image problem is small, which amortises sgemm's fixed costs and its
    /// packing of the weights.
    fn group(&self) -> usize {
        let hw = self.h * self.w;
        let target = 512usize; // columns per GEMM we aim for
        let g = target.div_ceil(hw.max(1)).max(1);
        // Keep enough tasks for load balance on small batches.
        g.min(self.batch.div_ceil(8).max(1))
    }

    pub(super) fn run(
        &self,
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
        algo: Algo,
    ) {
        let hw = self.h * self.w;
        if self.batch == 0 || hw == 0 || self.cout == 0 {
            return;
        }
        let in_img = self.cin * hw;
        let out_img = self.cout * hw;
        // Direct512Ci only differs from Direct512 in backward-weight.
        let algo = match algo {
            Algo::Direct512Ci => Algo::Direct512,
            a => a,
        };
        let algo = usable(algo, self.cout, self.w, self.k);
        if in_img == 0 {
            // No input channels: the output is just the bias.
            y.par_chunks_mut(out_img)
                .for_each(|yi| fill_bias(yi, hw, bias, relu));
            return;
        }
        match algo {
            Algo::Gemm => {
                let g = self.group();
                y.par_chunks_mut(g * out_img)
                    .zip(x.par_chunks(g * in_img))
                    .for_each(|(yg, xg)| self.run_group(xg, wt, bias, relu, yg));
            }
            Algo::Direct => self.run_direct(x, wt, bias, relu, y),
            Algo::Direct512 | Algo::Direct512Co | Algo::Direct512Ci => {
                self.run_direct512(x, wt, bias, relu, y)
            }
        }
    }

    fn run_group(&self, x: &[f32], wt: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
        let (cin, cout, k) = (self.cin, self.cout, self.k);
        let hw = self.h * self.w;
        let kc = cin * k * k;
        let imgs = x.len() / (cin * hw);
        let n = imgs * hw;
        if imgs == 1 {
            let cols_len = if k == 1 { 0 } else { kc * hw };
            with_worker_scratch(cols_len, |cols| {
                let b: &[f32] = if k == 1 {
                    x
                } else {
                    im2col(x, cin, self.h, self.w, k, cols, hw);
                    cols
                };
                let beta = if bias.is_some() {
                    fill_bias(y, hw, bias, false);
                    1.0
                } else {
                    0.0
                };
                gemm(cout, kc, hw, wt, kc, 1, b, hw, 1, beta, y, hw, 1);
                if relu {
                    relu_inplace(y);
                }
            });
            return;
        }
        with_worker_scratch(kc * n + cout * n, |buf| {
            let (cols, out) = buf.split_at_mut(kc * n);
            for i in 0..imgs {
                let xi = &x[i * cin * hw..(i + 1) * cin * hw];
                if k == 1 {
                    for c in 0..cin {
                        cols[c * n + i * hw..c * n + (i + 1) * hw]
                            .copy_from_slice(&xi[c * hw..(c + 1) * hw]);
                    }
                } else {
                    im2col(xi, cin, self.h, self.w, k, &mut cols[i * hw..], n);
                }
            }
            gemm(cout, kc, n, wt, kc, 1, cols, n, 1, 0.0, out, n, 1);
            for i in 0..imgs {
                for co in 0..cout {
                    let src = &out[co * n + i * hw..co * n + (i + 1) * hw];
                    let dst = &mut y[(i * cout + co) * hw..(i * cout + co + 1) * hw];
                    let b = bias.map_or(0.0, |b| b[co]);
                    bias_relu_rows(dst, hw, src, hw, 1, hw, b, relu);
                }
            }
        });
    }

    /// AVX-512 direct convolution (one image row per vector), one image per rayon task.
    fn run_direct512(
        &self,
        x: &[f32],
        wt: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        let (cin, cout, k, h, w) = (self.cin, self.cout, self.k, self.h, self.w);
        let hw = h * w;
        let kc = cin * k * k;
        let geo = PadGeo::new(h, w, k, 1);
        let xp_len = cin * geo.plane + avx512::SLACK;
        with_call_scratch(cout * kc, |wpack| {
            // Per row block, weights as [tap][row] so one tap's rows are adjacent.
            for (co0, mb) in blocks(cout, avx512::FWD_ROWS) {
                let blk = &mut wpack[co0 * kc..(co0 + mb) * kc];
                for t in 0..kc {
                    for m in 0..mb {
                        blk[t * mb + m] = wt[(co0 + m) * kc + t];
                    }
                }
            }
            let wpack = &*wpack;
            y.par_chunks_mut(cout * hw)
                .zip(x.par_chunks(cin * hw))
                .for_each(|(yi, xi)| {
                    with_worker_scratch(xp_len, |xp| {
                        pad_image(xi, cin, &geo, xp);
                        for (co0, mb) in blocks(cout, avx512::FWD_ROWS) {
                            // Bias (0 without one: `s + 0.0`, as before) and ReLU are
                            // applied in registers, and the rows stored straight into `y`.
                            let mut bv = [0.0f32; avx512::FWD_ROWS];
                            if let Some(b) = bias {
                                bv[..mb].copy_from_slice(&b[co0..co0 + mb]);
                            }
                            avx512::fwd_rows(
                                mb,
                                xp,
                                geo.taps(cin),
                                h,
                                w,
                                &wpack[co0 * kc..(co0 + mb) * kc],
                                &bv,
                                relu,
                                &mut yi[co0 * hw..(co0 + mb) * hw],
                            );
                        }
                    });
                });
        });
    }

    /// Direct (implicit-GEMM) convolution, one image per rayon task.
    fn run_direct(&self, x: &[f32], wt: &[f32], bias: Option<&[f32]>, relu: bool, y: &mut [f32]) {
        let (cin, cout, k, h, w) = (self.cin, self.cout, self.k, self.h, self.w);
        let hw = h * w;
        let kc = cin * k * k;
        let geo = PadGeo::new(h, w, k, 16);
        let xp_len = geo.padded_len(cin);
        with_call_scratch(cout * kc, |wpack| {
            // Per row block, weights as [tap][row] so one tap's rows are adjacent.
            for (co0, mb) in row_blocks(cout) {
                let blk = &mut wpack[co0 * kc..(co0 + mb) * kc];
                for t in 0..kc {
                    for m in 0..mb {
                        blk[t * mb + m] = wt[(co0 + m) * kc + t];
                    }
                }
            }
            let wpack = &*wpack;
            y.par_chunks_mut(cout * hw)
                .zip(x.par_chunks(cin * hw))
                .for_each(|(yi, xi)| {
                    with_worker_scratch(xp_len + cout * geo.qpad, |buf| {
                        let (xp, out) = buf.split_at_mut(xp_len);
                        pad_image(xi, cin, &geo, xp);
                        for (co0, mb) in row_blocks(cout) {
                            avx2::fwd_rows(
                                mb,
                                xp,
                                geo.taps(cin),
                                &wpack[co0 * kc..(co0 + mb) * kc],
                                &mut out[co0 * geo.qpad..(co0 + mb) * geo.qpad],
                                geo.qpad,
                            );
                        }
                        for co in 0..cout {
                            let bv = bias.map_or(0.0, |b| b[co]);
                            bias_relu_rows(
                                &mut yi[co * hw..(co + 1) * hw],
                                w,
                                &out[co * geo.qpad..(co + 1) * geo.qpad],
                                geo.wp,
                                h,
                                w,
                                bv,
                                relu,
                            );
                        }
                    });
                });
        });
    }
}

/// Splits `m` rows into blocks of at most [`avx2::MAX_ROWS`] rows, as even as possible.
pub(super) fn row_blocks(m: usize) -> impl Iterator<Item = (usize, usize)> {
    blocks(m, avx2::MAX_ROWS)
}

/// Splits `m` rows into blocks of at most `max` rows, as even as possible.
pub(super) fn blocks(m: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = m.div_ceil(max);
    let (base, extra) = m.checked_div(nb).map_or((0, 0), |b| (b, m - b * nb));
    (0..nb).map(move |b| {
        let start = b * base + b.min(extra);
        (start, base + usize::from(b < extra))
    })
}

/// Writes the bias (or zero) into every row of `y` (`[c][hw]`), with optional ReLU.
fn fill_bias(y: &mut [f32], hw: usize, bias: Option<&[f32]>, relu: bool) {
    for (c, row) in y.chunks_exact_mut(hw).enumerate() {
        let v = bias.map_or(0.0, |b| b[c]);
        row.fill(if relu { v.max(0.0) } else { v });
    }
}

avx2_multiversion! {
    /// `dst[r·dst_rs + j] = src[r·src_rs + j] + b` (then ReLU if `relu`) for `r < rows`,
    /// `j < len`.
    fn bias_relu_rows(
        dst: &mut [f32],
        dst_rs: usize,
        src: &[f32],
        src_rs: usize,
        rows: usize,
        len: usize,
        b: f32,
        relu: bool,
    ) {
        for r in 0..rows {
            let d = &mut dst[r * dst_rs..][..len];
            let s = &src[r * src_rs..][..len];
            if relu {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = (s + b).max(0.0);
                }
            } else {
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = s + b;
                }
            }
        }
    }
}

fn relu_inplace(y: &mut [f32]) {
    for v in y {
        *v = v.max(0.0);
    }
}
