//! What the tests of every crate share: references that are slow and obviously right, in
//! f64. Test-only (a dev-dependency of the kernel, the trainer and the suite; never
//! published).
//!
//! - [`conv`]: the convolution and its two gradients;
//! - [`invert`]: a dense matrix's inverse and `ln|det|`;
//! - [`l2_distance`]: how far apart two weight vectors are.
//!
//! The small random generators stay with their crates: the kernel's `Pcg32` and the trainer's
//! `SplitMix64` are part of what those crates compute.

pub mod conv;

/// `||a - b||_2` in f64 (over the common length), e.g. of two runs' flattened weights.
pub fn l2_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The inverse and `ln|det|` of a dense `n x n` row-major matrix, by Gauss-Jordan
/// elimination with partial pivoting in f64. Panics on a singular matrix.
pub fn invert(a: &[f64], n: usize) -> (Vec<f64>, f64) {
    let mut m = a.to_vec();
    let mut inv = vec![0f64; n * n];
    for k in 0..n {
        inv[k * n + k] = 1.0;
    }
    let mut logdet = 0.0;
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| m[i * n + col].abs().total_cmp(&m[j * n + col].abs()))
            .unwrap();
        for k in 0..n {
            m.swap(col * n + k, piv * n + k);
            inv.swap(col * n + k, piv * n + k);
        }
        let d = m[col * n + col];
        assert!(d != 0.0, "singular matrix");
        logdet += d.abs().ln();
        for k in 0..n {
            m[col * n + k] /= d;
            inv[col * n + k] /= d;
        }
        for r in 0..n {
            if r != col {
                let f = m[r * n + col];
                for k in 0..n {
                    m[r * n + k] -= f * m[col * n + k];
                    inv[r * n + k] -= f * inv[col * n + k];
                }
            }
        }
    }
    (inv, logdet)
}

#[cfg(test)]
mod tests {
    use super::conv::{conv2d_forward_ref, ConvShape};
    use super::invert;

    #[test]
    fn invert_gives_the_inverse_and_log_det() {
        let a = [2.0, 1.0, 0.0, 1.0, 3.0, 1.0, 0.0, 1.0, 4.0];
        let (inv, logdet) = invert(&a, 3);
        for r in 0..3 {
            for c in 0..3 {
                let v: f64 = (0..3).map(|k| a[r * 3 + k] * inv[k * 3 + c]).sum();
                assert!((v - f64::from(u8::from(r == c))).abs() < 1e-12);
            }
        }
        // det = 2 (12 - 1) - 1 (4 - 0) = 18
        assert!((logdet - 18f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn conv_forward_of_a_delta_kernel_is_the_input() {
        let s = ConvShape {
            batch: 1,
            cin: 1,
            cout: 1,
            height: 2,
            width: 3,
            kernel: 3,
        };
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut w = [0f32; 9];
        w[4] = 1.0;
        let y = conv2d_forward_ref(&s, &x, &w, &[0.5], false);
        let want: Vec<f64> = x.iter().map(|&v| f64::from(v) + 0.5).collect();
        assert_eq!(y, want);
    }
}
