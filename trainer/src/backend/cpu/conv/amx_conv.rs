//! The 1x1 convolutions with bf16 operands on AMX ([`amx::gemm`]): each is a matrix
//! product per image over channels and pixels.
//!
//! * forward: `Y_i[cout][hw] = W[cout][cin] · X_i[cin][hw]`, then bias and ReLU;
//! * backward-data: `dX_i[cin][hw] = Wᵀ · dY_i[cout][hw]`;
//! * backward-weight: `dW[cout][cin] = Σ_i dY_i[cout][hw] · X_iᵀ`, reduced over the batch
//!   by `backward_weight`'s `chunked_sum` (fixed chunks in chunk order, so the result does
//!   not depend on the thread count; the bias gradient in f32 from the unrounded `dy`).
//!
//! The weights are packed once per call, the images' operands per image in thread-local
//! scratch.

use rayon::prelude::*;

use super::amx::{self, Packed};
use super::backward_weight::chunked_sum;
use super::scratch::{with_call_scratch, with_worker_scratch};
use super::ConvShape;

/// Whether the 1x1 ops of `s` run here: a 1x1 kernel on a CPU with AMX.
pub(super) fn takes(s: &ConvShape) -> bool {
    s.kernel == 1 && amx::available()
}

/// Forward: `y = relu?(W·x + b)` image by image.
pub(super) fn forward(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32], relu: bool, y: &mut [f32]) {
    let (cin, cout, hw) = (s.cin, s.cout, s.hw());
    if s.batch == 0 || hw == 0 || cout == 0 {
        return;
    }
    let pa = Packed::new(cout, cin);
    let pb = Packed::new(hw, cin);
    with_call_scratch(pa.len(), |ap| {
        amx::pack_a_rows(cout, cin, w, cin, ap);
        let ap = &*ap;
        y.par_chunks_mut(cout * hw)
            .zip(x.par_chunks(cin * hw))
            .for_each(|(yi, xi)| {
                with_worker_scratch(pb.len(), |bp| {
                    amx::pack_b_rows(cin, hw, xi, hw, bp);
                    amx::gemm(cout, hw, ap, pa, bp, pb, 0.0, yi, hw);
                });
                add_bias_relu(yi, hw, b, relu);
            });
    });
}

/// Backward-data: `dx = Wᵀ·dy` image by image.
pub(super) fn backward_data(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    let (cin, cout, hw) = (s.cin, s.cout, s.hw());
    if s.batch == 0 || hw == 0 || cin == 0 {
        return;
    }
    let pa = Packed::new(cin, cout);
    let pb = Packed::new(hw, cout);
    with_call_scratch(pa.len(), |ap| {
        amx::pack_a(cin, cout, |i, j| w[j * cin + i], ap);
        let ap = &*ap;
        dx.par_chunks_mut(cin * hw)
            .zip(dy.par_chunks(cout * hw))
            .for_each(|(dxi, dyi)| {
                with_worker_scratch(pb.len(), |bp| {
                    amx::pack_b_rows(cout, hw, dyi, hw, bp);
                    amx::gemm(cin, hw, ap, pa, bp, pb, 0.0, dxi, hw);
                });
            });
    });
}

/// Backward-weight: `dw = Σ_i dy_i·x_iᵀ` (overwritten) and `db = Σ dy` (f32).
pub(super) fn backward_weight(
    s: &ConvShape,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (cin, cout, hw) = (s.cin, s.cout, s.hw());
    dw.fill(0.0);
    db.fill(0.0);
    if s.batch == 0 || hw == 0 || cout == 0 {
        return;
    }
    let pa = Packed::new(cout, hw);
    let pb = Packed::new(cin, hw);
    chunked_sum(
        s,
        dy,
        dw,
        db,
        |imgs, pdw| {
            if cin == 0 {
                return;
            }
            with_worker_scratch(pa.len() + pb.len(), |buf| {
                let (ap, bp) = buf.split_at_mut(pa.len());
                for i in imgs {
                    let dyi = &dy[i * cout * hw..][..cout * hw];
                    let xi = &x[i * cin * hw..][..cin * hw];
                    amx::pack_a_rows(cout, hw, dyi, hw, ap);
                    amx::pack_b_transposed(hw, cin, xi, hw, bp);
                    amx::gemm(cout, cin, ap, pa, bp, pb, 1.0, pdw, cin);
                }
            });
        },
        |total, dw| dw.copy_from_slice(total),
    );
}

avx2_multiversion! {
    /// `y[c][p] = relu?(y[c][p] + b[c])` for the rows `c` of `y` (`[c][hw]`), with the
    /// same roundings as the f32 kernels' epilogue (the sum, then the bias, then ReLU).
    fn add_bias_relu(y: &mut [f32], hw: usize, b: &[f32], relu: bool) {
        for (row, &bias) in y.chunks_exact_mut(hw).zip(b) {
            if relu {
                for v in row {
                    *v = (*v + bias).max(0.0);
                }
            } else {
                for v in row {
                    *v += bias;
                }
            }
        }
    }
}
