//! Plain, slow, obviously-correct `f64` convolutions ("same" padding, stride 1, odd square
//! kernels, PyTorch's cross-correlation): forward, backward to the data, backward to the
//! weights.
//!
//! Inputs are the same `f32` slices as the fast ops (converted exactly to `f64`); outputs
//! are `Vec<f64>`. Passing element-wise absolute values of the inputs (and `relu =
//! false`) yields `Σ |terms|` for each output, the natural scale for error bounds. Each
//! output's sum runs bias first, then input channel, kernel row, kernel column.

/// A batch of convolutions: `x` is `[batch][cin][height][width]`, `w` is
/// `[cout][cin][kernel][kernel]`, `y` is `[batch][cout][height][width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    /// Images.
    pub batch: usize,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Height of input and output.
    pub height: usize,
    /// Width of input and output.
    pub width: usize,
    /// Kernel size (odd).
    pub kernel: usize,
}

impl ConvShape {
    /// Length of `x`.
    pub fn input_len(&self) -> usize {
        self.batch * self.cin * self.height * self.width
    }
    /// Length of `y`.
    pub fn output_len(&self) -> usize {
        self.batch * self.cout * self.height * self.width
    }
    /// Length of `w`.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.kernel * self.kernel
    }
}

/// Output positions `o` (in `0..len`) whose input position `o + t - pad` is in `0..len`.
fn valid(len: usize, t: usize, pad: usize) -> std::ops::Range<usize> {
    let lo = pad.saturating_sub(t).min(len);
    let hi = (len + pad).saturating_sub(t).min(len).max(lo);
    lo..hi
}

/// Enumerates every multiply-accumulate of the convolution
/// `y[n][co][oy][ox] += w[co][ci][ki][kj] * x[n][ci][oy + ki - pad][ox + kj - pad]`
/// (in-bounds taps only) as runs along `ox`: `f(yi, xi, len, wi)` stands for the MACs
/// between `y[yi + j]` and `x[xi + j]` for `j < len`, with weight `w[wi]` (flat indices).
fn for_each_mac_run(s: &ConvShape, mut f: impl FnMut(usize, usize, usize, usize)) {
    let (h, wd, k, pad) = (s.height, s.width, s.kernel, s.kernel / 2);
    for n in 0..s.batch {
        for co in 0..s.cout {
            for ci in 0..s.cin {
                for ki in 0..k {
                    for kj in 0..k {
                        let wi = ((co * s.cin + ci) * k + ki) * k + kj;
                        let oxs = valid(wd, kj, pad);
                        if oxs.is_empty() {
                            continue;
                        }
                        for oy in valid(h, ki, pad) {
                            let iy = oy + ki - pad;
                            let ix0 = oxs.start + kj - pad;
                            let yi = ((n * s.cout + co) * h + oy) * wd + oxs.start;
                            let xi = ((n * s.cin + ci) * h + iy) * wd + ix0;
                            f(yi, xi, oxs.len(), wi);
                        }
                    }
                }
            }
        }
    }
}

/// `acc[a0 + j] += c * v[v0 + j]` for `j < len`, in f64.
fn axpy(acc: &mut [f64], a0: usize, c: f64, v: &[f32], v0: usize, len: usize) {
    for (a, &x) in acc[a0..a0 + len].iter_mut().zip(&v[v0..v0 + len]) {
        *a += c * f64::from(x);
    }
}

/// `Σ_j a[a0 + j] * b[b0 + j]` for `j < len`, in f64.
fn dot(a: &[f32], a0: usize, b: &[f32], b0: usize, len: usize) -> f64 {
    let pairs = a[a0..a0 + len].iter().zip(&b[b0..b0 + len]);
    pairs.map(|(&p, &q)| f64::from(p) * f64::from(q)).sum()
}

/// Reference of `conv2d_forward`: `y = conv(x, w) + b`, then ReLU if `relu`.
pub fn conv2d_forward_ref(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(w.len(), s.weight_len());
    assert_eq!(b.len(), s.cout);
    let hw = s.height * s.width;
    let mut y: Vec<f64> = (0..s.output_len())
        .map(|i| f64::from(b[(i / hw) % s.cout]))
        .collect();
    for_each_mac_run(s, |yi, xi, len, wi| {
        axpy(&mut y, yi, f64::from(w[wi]), x, xi, len)
    });
    if relu {
        for v in &mut y {
            *v = v.max(0.0);
        }
    }
    y
}

/// Reference of `conv2d_backward_data`: `dx = conv_transpose(dy, w)`.
pub fn conv2d_backward_data_ref(s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f64> {
    assert_eq!(dy.len(), s.output_len());
    assert_eq!(w.len(), s.weight_len());
    let mut dx = vec![0.0f64; s.input_len()];
    for_each_mac_run(s, |yi, xi, len, wi| {
        axpy(&mut dx, xi, f64::from(w[wi]), dy, yi, len)
    });
    dx
}

/// Reference of `conv2d_backward_weight`: returns `(dw, db)`.
pub fn conv2d_backward_weight_ref(s: &ConvShape, x: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(dy.len(), s.output_len());
    let hw = s.height * s.width;
    let mut dw = vec![0.0f64; s.weight_len()];
    let mut db = vec![0.0f64; s.cout];
    for (i, &v) in dy.iter().enumerate() {
        db[(i / hw) % s.cout] += f64::from(v);
    }
    for_each_mac_run(s, |yi, xi, len, wi| dw[wi] += dot(x, xi, dy, yi, len));
    (dw, db)
}
