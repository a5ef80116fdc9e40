//! Backward-weight: the batch split into a fixed number of chunks, each chunk's partial
//! gradient computed by the chosen algorithm, the partials added in chunk order.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::gemm;
use super::im2col::im2col_t;
use super::layout::{add_assign, copy_small, pad_image, shifted_rows, transpose_dy, PadGeo};
use super::same_conv::{blocks, row_blocks};
use super::scratch::{with_call_scratch, with_worker_scratch};
use super::select::{usable, Algo};
use super::{avx2, avx512, check_weight_lengths, ConvShape};

/// [`conv2d_backward_weight`](super::conv2d_backward_weight) with the algorithm `algo` (the
/// tests run every one the machine supports).
pub(super) fn backward_weight_with(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    algo: Algo,
) {
    check_weight_lengths(s, x, dy, dw, db);
    dw.fill(0.0);
    db.fill(0.0);
    let hw = s.hw();
    if s.batch == 0 || hw == 0 || s.cout == 0 {
        return;
    }
    let (cin, cout, k, h, w) = (s.cin, s.cout, s.kernel, s.height, s.width);
    let kc = cin * k * k;
    let in_img = cin * hw;
    let out_img = cout * hw;
    let algo = if kc == 0 {
        Algo::Gemm
    } else {
        usable(algo, cout, w, k)
    };

    let geo = PadGeo::new(h, w, k, 8);

    chunked_sum(
        s,
        dy,
        dw,
        db,
        |imgs, pdw| {
            let first = imgs.start;
            match algo {
                Algo::Gemm => {
                    // Columns in transposed, channels-last order: colsT[hw][(ki,kj,ci)],
                    // so both the im2col copies (k·cin floats) and sgemm's packing of
                    // B are contiguous. The partial comes out as [cout][ki][kj][ci].
                    let gt = PadGeo::new(h, w, k, 1);
                    let xt_len = gt.plane * cin;
                    with_worker_scratch(xt_len + kc * hw, |buf| {
                        let (xt, cols) = buf.split_at_mut(xt_len);
                        for i in imgs.clone() {
                            let dyi = &dy[i * out_img..(i + 1) * out_img];
                            let xi = &x[i * in_img..(i + 1) * in_img];
                            im2col_t(xi, cin, &gt, xt, cols);
                            let beta = if i == first { 0.0 } else { 1.0 };
                            // dW'[cout, kc] (+)= dy[cout, hw] · colsT[hw, kc]
                            gemm(cout, hw, kc, dyi, hw, 1, cols, kc, 1, beta, pdw, kc, 1);
                        }
                    });
                }
                Algo::Direct512Ci => {
                    // dWc[co][tap][ci] accumulated image by image, from a channels-last
                    // zero-padded copy of the image (input channels padded to 16).
                    let ldc = cin.div_ceil(avx512::L) * avx512::L;
                    let kk = k * k;
                    let xt_len = (h + k - 1) * (w + k - 1) * ldc;
                    let dwc_len = cout * kk * ldc;
                    with_worker_scratch(xt_len + dwc_len, |buf| {
                        let (xt, dwc) = buf.split_at_mut(xt_len);
                        xt.fill(0.0);
                        dwc.fill(0.0);
                        for i in imgs.clone() {
                            avx512::pad_channels_last(
                                &x[i * in_img..(i + 1) * in_img],
                                cin,
                                h,
                                w,
                                k,
                                ldc,
                                xt,
                            );
                            let dyi = &dy[i * out_img..(i + 1) * out_img];
                            // Channel blocks outermost: one block of the image (32
                            // channels, 32 KB at 16x16) stays in L1 across the
                            // output-channel blocks.
                            for c0 in (0..ldc).step_by(2 * avx512::L) {
                                let cvn = ((ldc - c0) / avx512::L).min(2);
                                for (co0, mb) in blocks(cout, avx512::CI_ROWS) {
                                    avx512::wgrad_ci(
                                        mb,
                                        cvn,
                                        k,
                                        xt,
                                        h,
                                        w,
                                        ldc,
                                        c0,
                                        &dyi[co0 * hw..(co0 + mb) * hw],
                                        &mut dwc[co0 * kk * ldc..(co0 + mb) * kk * ldc],
                                    );
                                }
                            }
                        }
                        for (co, row) in pdw.chunks_exact_mut(kc).enumerate() {
                            for ci in 0..cin {
                                for t in 0..kk {
                                    row[ci * kk + t] = dwc[(co * kk + t) * ldc + ci];
                                }
                            }
                        }
                    });
                }
                Algo::Direct512Co => {
                    // dW^T[tap][channel] accumulated image by image, from dy transposed
                    // to [pixel][channel] (channels padded to 16 with zeros).
                    let g1 = PadGeo::new(h, w, k, 1);
                    let xp_len = cin * g1.plane + avx512::SLACK;
                    let ldo = cout.div_ceil(avx512::L) * avx512::L;
                    let len = xp_len + hw * ldo + kc * ldo;
                    with_worker_scratch(len, |buf| {
                        let (xp, rest) = buf.split_at_mut(xp_len);
                        let (dyt, dwt) = rest.split_at_mut(hw * ldo);
                        let dwt = &mut dwt[..kc * ldo];
                        dyt.fill(0.0);
                        dwt.fill(0.0);
                        for i in imgs.clone() {
                            pad_image(&x[i * in_img..(i + 1) * in_img], cin, &g1, xp);
                            let dyi = &dy[i * out_img..(i + 1) * out_img];
                            transpose_dy(dyi, cout, hw, dyt, ldo);
                            avx512::wgrad_cols(xp, g1.taps(cin), h, w, dyt, ldo, dwt);
                        }
                        for (co, row) in pdw.chunks_exact_mut(kc).enumerate() {
                            for (t, d) in row.iter_mut().enumerate() {
                                *d = dwt[t * ldo + co];
                            }
                        }
                    });
                }
                Algo::Direct512 => {
                    // All images of the chunk padded (and dy rows widened to 16 lanes,
                    // zero beyond the width) first, so the kernel keeps its
                    // accumulators in registers across the whole chunk.
                    let g1 = PadGeo::new(h, w, k, 1);
                    let lanes = avx512::L;
                    let xp_len = cin * g1.plane + avx512::SLACK;
                    let xs = cin * (h + k - 1) * k * lanes;
                    let ds = cout * h * lanes;
                    let nimg = imgs.len();
                    // + `lanes` to align the start of `xsh` to 64 bytes.
                    let len = xp_len + nimg * (xs + ds) + lanes;
                    with_worker_scratch(len, |buf| {
                        let (xp, rest) = buf.split_at_mut(xp_len);
                        let al = rest.as_ptr().align_offset(64).min(lanes);
                        let (xsh, dyr) = rest[al..].split_at_mut(nimg * xs);
                        let dyr = &mut dyr[..nimg * ds];
                        dyr.fill(0.0);
                        for (n, i) in imgs.clone().enumerate() {
                            pad_image(&x[i * in_img..(i + 1) * in_img], cin, &g1, xp);
                            shifted_rows(xp, cin, &g1, &mut xsh[n * xs..(n + 1) * xs]);
                            let dyi = &dy[i * out_img..(i + 1) * out_img];
                            let dyn_ = &mut dyr[n * ds..(n + 1) * ds];
                            for (r, row) in dyn_.chunks_exact_mut(lanes).enumerate() {
                                copy_small(&mut row[..w], &dyi[r * w..(r + 1) * w]);
                            }
                        }
                        for (co0, mb) in blocks(cout, avx512::WG_ROWS) {
                            avx512::wgrad_rows(
                                mb,
                                nimg,
                                xsh,
                                xs,
                                g1.taps(cin),
                                h,
                                &dyr[co0 * h * lanes..],
                                ds,
                                &mut pdw[co0 * kc..(co0 + mb) * kc],
                            );
                        }
                    });
                }
                Algo::Direct => {
                    let xp_len = geo.padded_len(cin);
                    let dye_len = cout * geo.qpad;
                    let acc_len = cout * kc * 8;
                    with_worker_scratch(xp_len + dye_len + acc_len, |buf| {
                        let (xp, rest) = buf.split_at_mut(xp_len);
                        let (dye, acc) = rest.split_at_mut(dye_len);
                        acc.fill(0.0);
                        for i in imgs.clone() {
                            pad_image(&x[i * in_img..(i + 1) * in_img], cin, &geo, xp);
                            // dy on the padded-width grid, zero in the gap columns.
                            dye.fill(0.0);
                            let dyi = &dy[i * out_img..(i + 1) * out_img];
                            for co in 0..cout {
                                for oy in 0..h {
                                    copy_small(
                                        &mut dye[co * geo.qpad + oy * geo.wp..][..w],
                                        &dyi[(co * h + oy) * w..][..w],
                                    );
                                }
                            }
                            for (co0, mb) in row_blocks(cout) {
                                avx2::wgrad_rows(
                                    mb,
                                    xp,
                                    geo.taps(cin),
                                    &dye[co0 * geo.qpad..(co0 + mb) * geo.qpad],
                                    geo.qpad,
                                    &mut acc[co0 * kc * 8..(co0 + mb) * kc * 8],
                                );
                            }
                        }
                        for (d, lanes) in pdw.iter_mut().zip(acc.chunks_exact(8)) {
                            *d = hsum8(lanes);
                        }
                    });
                }
            }
        },
        |pdw, dw| match algo {
            Algo::Direct | Algo::Direct512 | Algo::Direct512Co | Algo::Direct512Ci => {
                dw.copy_from_slice(pdw)
            }
            Algo::Gemm if kc > 0 => {
                // [cout][ki][kj][ci] -> [cout][ci][ki][kj]
                let kk = k * k;
                dw.par_chunks_mut(kc)
                    .zip(pdw.par_chunks(kc))
                    .for_each(|(d, p)| {
                        for t in 0..kk {
                            for ci in 0..cin {
                                d[ci * kk + t] = p[t * cin + ci];
                            }
                        }
                    });
            }
            Algo::Gemm => {}
        },
    );
}

/// The batch reduction of every weight gradient (the f32 algorithms and the AMX 1x1 op):
/// the batch split into at most [`MAX_WEIGHT_CHUNKS`] chunks, fixed so that the summation
/// order, hence the result, does not depend on the thread count. `partial(images, pdw)`
/// writes a chunk's weight gradient into `pdw` (`dw.len()` floats, zeroed); the bias
/// gradient `db` is summed here in f32 from `dy`; the partials are added in chunk order and
/// `finish(total, dw)` writes `dw` from the total. Needs `s.batch > 0`.
pub(super) fn chunked_sum(
    s: &ConvShape,
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    partial: impl Fn(Range<usize>, &mut [f32]) + Sync,
    finish: impl FnOnce(&[f32], &mut [f32]),
) {
    let (hw, cout) = (s.hw(), s.cout);
    let chunk = s.batch.div_ceil(MAX_WEIGHT_CHUNKS.min(s.batch));
    let nchunks = s.batch.div_ceil(chunk);
    let part_len = dw.len() + cout;
    with_call_scratch(nchunks * part_len, |parts| {
        parts
            .par_chunks_mut(part_len)
            .enumerate()
            .for_each(|(c, part)| {
                let imgs = c * chunk..((c + 1) * chunk).min(s.batch);
                part.fill(0.0);
                let (pdw, pdb) = part.split_at_mut(part_len - cout);
                for i in imgs.clone() {
                    let dyi = &dy[i * cout * hw..][..cout * hw];
                    for (d, row) in pdb.iter_mut().zip(dyi.chunks_exact(hw)) {
                        *d += sum_f32(row);
                    }
                }
                partial(imgs, pdw);
            });
        // Sum the chunk partials into the first one: in parallel over element ranges, each
        // element in chunk order.
        let (first, rest) = parts.split_at_mut(part_len);
        let rest = &*rest;
        const RANGE: usize = 1 << 14;
        first
            .par_chunks_mut(RANGE)
            .enumerate()
            .for_each(|(r, dst)| {
                for part in rest.chunks_exact(part_len) {
                    add_assign(dst, &part[r * RANGE..r * RANGE + dst.len()]);
                }
            });
        let (pdw, pdb) = first.split_at(part_len - cout);
        db.copy_from_slice(pdb);
        finish(pdw, dw);
    });
}

/// Most chunks the batch is split into by `conv2d_backward_weight` (fixed, so that the
/// summation order, hence the result, does not depend on the thread count).
pub(super) const MAX_WEIGHT_CHUNKS: usize = 16;

avx2_multiversion! {
    /// Sum of a slice with 16 independent accumulators (vectorises; fixed order, so
    /// deterministic).
    pub(super) fn sum_f32(v: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        let mut chunks = v.chunks_exact(16);
        for c in &mut chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x;
            }
        }
        for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
            *a += x;
        }
        let mut n = 16;
        while n > 1 {
            n /= 2;
            for i in 0..n {
                acc[i] += acc[i + n];
            }
        }
        acc[0]
    }
}

/// Sum of 8 lanes in a fixed pairwise order.
fn hsum8(v: &[f32]) -> f32 {
    ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
}
