//! The bounds-checked wrapper of matrixmultiply's sgemm.

/// Highest index touched by a `rows x cols` strided matrix, plus one (0 if empty).
fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `C = A · B + beta · C` with non-negative strides, bounds-checked.
/// `A` is `m x k`, `B` is `k x n`, `C` is `m x n`. When `beta == 0`, `C` is not read.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    assert!(span(m, k, rsa, csa) <= a.len(), "gemm: A out of bounds");
    assert!(span(k, n, rsb, csb) <= b.len(), "gemm: B out of bounds");
    assert!(span(m, n, rsc, csc) <= c.len(), "gemm: C out of bounds");
    assert!(m <= 1 || n == 0 || rsc != 0, "gemm: C rows alias");
    assert!(n <= 1 || m == 0 || csc != 0, "gemm: C columns alias");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above guarantee every element of A, B and C that sgemm
    // addresses lies inside the corresponding slice; all strides are non-negative and
    // fit in isize because the slices do; C's rows and columns have non-zero strides (and
    // every call site passes a dense row- or column-major C, so no two (i, j) alias);
    // `c` is a unique borrow, so it does not overlap `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}
