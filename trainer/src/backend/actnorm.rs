//! ActNorm, Glow's per-channel affine layer, on host slices: `y = x exp(logs[c]) + bias[c]`.
//!
//! Its Jacobian is diagonal with `exp(logs[c])` repeated over the `H * W` pixels of channel
//! `c`, so each image's log-det is `H * W * sum(logs)`. These functions are the CPU
//! backend's implementation; the CUDA backend runs the same formulas as kernels
//! (`cuda/kernels/glow.cu`).

use super::Shape4;
use rayon::prelude::*;

/// Forward in place on `x` (`shape`), adding `plane * sum(logs)` to every image's `log_det`.
pub fn forward(shape: Shape4, logs: &[f32], bias: &[f32], x: &mut [f32], log_det: &mut [f32]) {
    let p = shape.plane().max(1);
    x.par_chunks_mut(shape.image_len().max(1)).for_each(|img| {
        for ((plane, &l), &b) in img.chunks_exact_mut(p).zip(logs).zip(bias) {
            let e = l.exp();
            for v in plane {
                *v = *v * e + b;
            }
        }
    });
    let ld = (shape.plane() as f64 * logs.iter().map(|&l| f64::from(l)).sum::<f64>()) as f32;
    for v in log_det {
        *v += ld;
    }
}

/// Inverse in place on `y`: `x = (y - bias[c]) exp(-logs[c])`.
pub fn inverse(shape: Shape4, logs: &[f32], bias: &[f32], y: &mut [f32]) {
    let p = shape.plane().max(1);
    y.par_chunks_mut(shape.image_len().max(1)).for_each(|img| {
        for ((plane, &l), &b) in img.chunks_exact_mut(p).zip(logs).zip(bias) {
            let e = (-l).exp();
            for v in plane {
                *v = (*v - b) * e;
            }
        }
    });
}

/// Backward given the layer's *input* `x`: `dy` (gradient w.r.t. the output) becomes the
/// gradient w.r.t. the input, `dy * exp(logs)`; adds `sum dy x exp(logs)` plus the log-det
/// term `g_log_det * batch * plane` to `d_logs` and `sum dy` to `d_bias`. Sums run per image
/// in parallel and are then added in image order, so the result does not depend on the
/// thread count.
pub fn backward(
    shape: Shape4,
    x: &[f32],
    logs: &[f32],
    g_log_det: f32,
    dy: &mut [f32],
    d_logs: &mut [f32],
    d_bias: &mut [f32],
) {
    let p = shape.plane().max(1);
    let n = shape.image_len().max(1);
    let c = shape.channels;
    let partials: Vec<Vec<(f64, f64)>> = dy
        .par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .map(|(dy, x)| {
            let mut acc = vec![(0.0f64, 0.0f64); c];
            for (((dy, x), &l), a) in dy
                .chunks_exact_mut(p)
                .zip(x.chunks_exact(p))
                .zip(logs)
                .zip(acc.iter_mut())
            {
                let e = l.exp();
                for (g, &xv) in dy.iter_mut().zip(x) {
                    a.0 += f64::from(*g) * f64::from(xv * e);
                    a.1 += f64::from(*g);
                    *g *= e;
                }
            }
            acc
        })
        .collect();
    let mut sums = vec![(0.0f64, 0.0f64); c];
    for part in &partials {
        for (s, v) in sums.iter_mut().zip(part) {
            s.0 += v.0;
            s.1 += v.1;
        }
    }
    let ld = f64::from(g_log_det) * (shape.batch * shape.plane()) as f64;
    for ((dl, db), s) in d_logs.iter_mut().zip(d_bias.iter_mut()).zip(&sums) {
        *dl += (s.0 + ld) as f32;
        *db += s.1 as f32;
    }
}

/// Per-channel mean and standard deviation of `x` over the batch and the pixels, in f64:
/// ActNorm's data-dependent initialisation sets `exp(logs) = 1 / std`, `bias = -mean / std`
/// so the first batch leaves the layer with zero mean and unit variance per channel.
pub fn channel_stats(shape: Shape4, x: &[f32]) -> Vec<(f64, f64)> {
    let p = shape.plane().max(1);
    let mut sums = vec![(0.0f64, 0.0f64); shape.channels];
    for img in x.chunks_exact(shape.image_len().max(1)) {
        for (plane, s) in img.chunks_exact(p).zip(sums.iter_mut()) {
            for &v in plane {
                s.0 += f64::from(v);
                s.1 += f64::from(v) * f64::from(v);
            }
        }
    }
    let n = (shape.batch * shape.plane()).max(1) as f64;
    sums.iter()
        .map(|&(s, q)| {
            let mean = s / n;
            (mean, (q / n - mean * mean).max(0.0).sqrt())
        })
        .collect()
}

/// ActNorm's initial `(logs, bias)` from per-channel `(mean, std)`:
/// `logs = -ln(std + 1e-6)`, `bias = -mean / (std + 1e-6)` (f64, rounded to f32).
pub fn init_from_stats(stats: &[(f64, f64)]) -> (Vec<f32>, Vec<f32>) {
    let logs = stats
        .iter()
        .map(|&(_, sd)| (-(sd + 1e-6).ln()) as f32)
        .collect();
    let bias = stats
        .iter()
        .map(|&(mean, sd)| (-mean / (sd + 1e-6)) as f32)
        .collect();
    (logs, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape4 {
        Shape4 {
            batch: 3,
            channels: 2,
            height: 2,
            width: 3,
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn inverse_undoes_forward_and_log_det_is_plane_times_sum_logs() {
        let s = shape();
        let x = values(s.len(), 7);
        let (logs, bias) = ([0.3f32, -0.7], [0.5f32, -1.25]);
        let mut y = x.clone();
        let mut ld = vec![1.0f32; s.batch];
        forward(s, &logs, &bias, &mut y, &mut ld);
        assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 0.1));
        for v in &ld {
            assert!((v - (1.0 + 6.0 * (0.3 - 0.7))).abs() < 1e-6, "{v}");
        }
        inverse(s, &logs, &bias, &mut y);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// The gradients against central differences of `L = sum(w * y) + g * sum(log_det)`.
    #[test]
    fn backward_matches_finite_differences() {
        let s = shape();
        let x = values(s.len(), 3);
        let w = values(s.len(), 11);
        let g = -0.37f32;
        let loss = |logs: &[f32], bias: &[f32], x: &[f32]| -> f64 {
            let mut y = x.to_vec();
            let mut ld = vec![0.0f32; s.batch];
            forward(s, logs, bias, &mut y, &mut ld);
            let a: f64 = y.iter().zip(&w).map(|(y, w)| f64::from(y * w)).sum();
            a + f64::from(g) * ld.iter().map(|&v| f64::from(v)).sum::<f64>()
        };
        let (logs, bias) = (vec![0.2f32, -0.4], vec![0.1f32, 0.3]);
        let mut dy = w.clone();
        let (mut dl, mut db) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        backward(s, &x, &logs, g, &mut dy, &mut dl, &mut db);
        let eps = 1e-3f32;
        for c in 0..2 {
            let (mut lp, mut lm) = (logs.clone(), logs.clone());
            lp[c] += eps;
            lm[c] -= eps;
            let fd = (loss(&lp, &bias, &x) - loss(&lm, &bias, &x)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(dl[c])).abs() < 2e-3 * (1.0 + fd.abs()),
                "logs {c}"
            );
            let (mut bp, mut bm) = (bias.clone(), bias.clone());
            bp[c] += eps;
            bm[c] -= eps;
            let fd = (loss(&logs, &bp, &x) - loss(&logs, &bm, &x)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(db[c])).abs() < 2e-3 * (1.0 + fd.abs()),
                "bias {c}"
            );
        }
        for k in [0, 5, 17] {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[k] += eps;
            xm[k] -= eps;
            let fd = (loss(&logs, &bias, &xp) - loss(&logs, &bias, &xm)) / (2.0 * f64::from(eps));
            assert!(
                (fd - f64::from(dy[k])).abs() < 2e-3 * (1.0 + fd.abs()),
                "x {k}"
            );
        }
    }

    #[test]
    fn channel_stats_give_mean_and_std() {
        let s = Shape4 {
            batch: 2,
            channels: 2,
            height: 1,
            width: 2,
        };
        // Channel 0: 1, 3, 5, 7; channel 1: 2, 2, 2, 2.
        let x = [1.0, 3.0, 2.0, 2.0, 5.0, 7.0, 2.0, 2.0];
        let st = channel_stats(s, &x);
        assert!((st[0].0 - 4.0).abs() < 1e-12 && (st[0].1 - 5f64.sqrt()).abs() < 1e-12);
        assert!((st[1].0 - 2.0).abs() < 1e-12 && st[1].1.abs() < 1e-12);
    }
}
