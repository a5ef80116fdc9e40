//! Glow's invertible 1x1 convolution in its LU parametrisation (Kingma & Dhariwal 2018, §3.2).
//!
//! A 1x1 convolution over `C` channels multiplies every pixel's channel vector by one
//! `C x C` matrix `W`. Glow stores `W` factorised as
//!
//! ```text
//! W = P · L · (U + diag(sign ⊙ exp(log_s)))
//! ```
//!
//! with `P` a fixed permutation, `L` unit lower-triangular (its strict lower part learned),
//! `U` strictly upper-triangular (learned), `sign` fixed `±1` and `log_s` learned. Because
//! `det P = ±1`, `det L = 1` and the last factor is triangular,
//! `log|det W| = Σ log_s`: the log-det costs `O(C)` instead of an `O(C³)` determinant, and
//! `W` can never become singular while `log_s` stays finite.
//!
//! Conventions (shared with the checkpoints, which store every parameter as an `f32` tensor):
//!
//! * `perm` (`C` values, integers stored as `f32`): row `r` of `W` is row `perm[r]` of
//!   `M = L · U'`, where `U' = U + diag(sign ⊙ exp(log_s))`; that is `W[r][:] = M[perm[r]][:]`.
//! * `sign` (`C` values): each exactly `+1` or `-1`.
//! * `lower` (`C * C`, row-major): only the strictly-lower entries are used; the others are
//!   ignored (keep them 0).
//! * `upper` (`C * C`, row-major): only the strictly-upper entries are used.
//! * `log_s` (`C` values).
//!
//! The API takes and returns `f32` parameter slices but does all of its arithmetic in `f64`
//! on row-major host buffers; the matrices it returns ([`weight`], [`inverse`]) and the
//! gradients ([`backward`]) are `f64`.

use crate::rng::SplitMix64;
use std::fmt;

/// Borrowed views of one layer's five LU parameters (see the module docs for the layout).
#[derive(Debug, Clone, Copy)]
pub struct LuParams<'a> {
    /// Row permutation: `W[r][:] = M[perm[r]][:]`; `C` integers stored as `f32`.
    pub perm: &'a [f32],
    /// Fixed signs of the diagonal of `U'`; `C` values, each `+1` or `-1`.
    pub sign: &'a [f32],
    /// `C * C` row-major; the strict lower part of the unit lower-triangular `L`.
    pub lower: &'a [f32],
    /// `C * C` row-major; the strict upper part of `U'`.
    pub upper: &'a [f32],
    /// `C` values; the diagonal of `U'` is `sign ⊙ exp(log_s)`.
    pub log_s: &'a [f32],
}

/// Freshly initialised parameters for one layer, as returned by [`init`].
#[derive(Debug, Clone, PartialEq)]
pub struct LuInit {
    /// Row permutation (`C` integers stored as `f32`).
    pub perm: Vec<f32>,
    /// Signs of the diagonal of `U'` (`C` values, each `±1`).
    pub sign: Vec<f32>,
    /// `C * C`, zero outside the strict lower triangle.
    pub lower: Vec<f32>,
    /// `C * C`, zero outside the strict upper triangle.
    pub upper: Vec<f32>,
    /// `C` values, `ln |diag U'|`.
    pub log_s: Vec<f32>,
}

impl LuInit {
    /// Borrows the five buffers as [`LuParams`].
    pub fn params(&self) -> LuParams<'_> {
        LuParams {
            perm: &self.perm,
            sign: &self.sign,
            lower: &self.lower,
            upper: &self.upper,
            log_s: &self.log_s,
        }
    }
}

/// Gradients of a scalar loss with respect to the learned parameters, from [`backward`].
///
/// `perm` and `sign` are fixed and get no gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct LuGrads {
    /// `C * C`, zero outside the strict lower triangle.
    pub d_lower: Vec<f64>,
    /// `C * C`, zero outside the strict upper triangle.
    pub d_upper: Vec<f64>,
    /// `C` values.
    pub d_log_s: Vec<f64>,
}

/// Why an invertible-1x1-convolution routine refused its input.
#[derive(Debug, Clone, PartialEq)]
pub enum InvConvError {
    /// A buffer has the wrong number of elements.
    Length {
        /// Which buffer.
        name: &'static str,
        /// The number of elements it should have.
        expected: usize,
        /// The number it has.
        actual: usize,
    },
    /// `C * C` does not fit in `usize`.
    TooLarge {
        /// The channel count.
        c: usize,
    },
    /// A buffer holds a NaN or an infinity (for `"weight"`/`"inverse"`: the result overflowed).
    NonFinite {
        /// Which buffer.
        name: &'static str,
        /// The flat index of the first offending element.
        index: usize,
    },
    /// A `perm` entry is not an integer in `0..C`.
    PermOutOfRange {
        /// The position in `perm`.
        index: usize,
        /// The stored value.
        value: f32,
    },
    /// A `perm` entry repeats an earlier one, so `perm` is not a permutation.
    PermDuplicate {
        /// The position in `perm` of the repeat.
        index: usize,
        /// The repeated row number.
        value: usize,
    },
    /// A `sign` entry is neither `+1` nor `-1`.
    BadSign {
        /// The position in `sign`.
        index: usize,
        /// The stored value.
        value: f32,
    },
    /// The matrix is (numerically) singular: no usable pivot was left in this column.
    Singular {
        /// The elimination column where it failed.
        column: usize,
    },
}

impl fmt::Display for InvConvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length {
                name,
                expected,
                actual,
            } => write!(
                f,
                "invconv: `{name}` has {actual} elements, expected {expected}"
            ),
            Self::TooLarge { c } => write!(f, "invconv: {c} channels is too many (C*C overflows)"),
            Self::NonFinite { name, index } => {
                write!(f, "invconv: `{name}`[{index}] is not finite")
            }
            Self::PermOutOfRange { index, value } => write!(
                f,
                "invconv: perm[{index}] = {value} is not an integer row index in range"
            ),
            Self::PermDuplicate { index, value } => write!(
                f,
                "invconv: perm[{index}] = {value} repeats an earlier entry (not a permutation)"
            ),
            Self::BadSign { index, value } => {
                write!(f, "invconv: sign[{index}] = {value} is not +1 or -1")
            }
            Self::Singular { column } => {
                write!(
                    f,
                    "invconv: matrix is singular (no pivot in column {column})"
                )
            }
        }
    }
}

impl std::error::Error for InvConvError {}

// ---------------------------------------------------------------------------------------------
// Validated f64 form of the parameters. Every public entry point converts its `f32` input into
// this once; the math below works only on it (and the tests drive it directly in f64, so finite
// differences are not limited by f32 resolution).
// ---------------------------------------------------------------------------------------------

/// The parameters after validation, widened to `f64` and with `perm` as row indices.
#[derive(Debug, Clone)]
struct Core {
    c: usize,
    perm: Vec<usize>,
    sign: Vec<f64>,
    lower: Vec<f64>,
    upper: Vec<f64>,
    log_s: Vec<f64>,
}

/// `c * c`, or [`InvConvError::TooLarge`].
fn square(c: usize) -> Result<usize, InvConvError> {
    c.checked_mul(c).ok_or(InvConvError::TooLarge { c })
}

fn check_len(name: &'static str, len: usize, expected: usize) -> Result<(), InvConvError> {
    if len == expected {
        Ok(())
    } else {
        Err(InvConvError::Length {
            name,
            expected,
            actual: len,
        })
    }
}

fn check_finite_f32(name: &'static str, v: &[f32]) -> Result<(), InvConvError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(InvConvError::NonFinite { name, index }),
        None => Ok(()),
    }
}

fn check_finite_f64(name: &'static str, v: &[f64]) -> Result<(), InvConvError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(InvConvError::NonFinite { name, index }),
        None => Ok(()),
    }
}

/// Checks lengths, finiteness (of every entry, including the ignored triangle halves: a NaN
/// anywhere means a corrupt tensor), that `perm` is a permutation of `0..c` and that every
/// `sign` is `±1`; then widens to `f64`.
fn validate(c: usize, p: &LuParams) -> Result<Core, InvConvError> {
    let cc = square(c)?;
    check_len("perm", p.perm.len(), c)?;
    check_len("sign", p.sign.len(), c)?;
    check_len("lower", p.lower.len(), cc)?;
    check_len("upper", p.upper.len(), cc)?;
    check_len("log_s", p.log_s.len(), c)?;
    check_finite_f32("perm", p.perm)?;
    check_finite_f32("sign", p.sign)?;
    check_finite_f32("lower", p.lower)?;
    check_finite_f32("upper", p.upper)?;
    check_finite_f32("log_s", p.log_s)?;

    let mut seen = vec![false; c];
    let mut perm = Vec::with_capacity(c);
    for (index, &value) in p.perm.iter().enumerate() {
        // Finite was checked above; the value must be a whole number in 0..c.
        if value < 0.0 || value.fract() != 0.0 || f64::from(value) >= c as f64 {
            return Err(InvConvError::PermOutOfRange { index, value });
        }
        let row = value as usize;
        if seen[row] {
            return Err(InvConvError::PermDuplicate { index, value: row });
        }
        seen[row] = true;
        perm.push(row);
    }
    if let Some(index) = p.sign.iter().position(|&s| s != 1.0 && s != -1.0) {
        return Err(InvConvError::BadSign {
            index,
            value: p.sign[index],
        });
    }
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    Ok(Core {
        c,
        perm,
        sign: widen(p.sign),
        lower: widen(p.lower),
        upper: widen(p.upper),
        log_s: widen(p.log_s),
    })
}

impl Core {
    /// `U' = U + diag(sign ⊙ exp(log_s))`, dense, zero below the diagonal.
    fn u_prime(&self) -> Vec<f64> {
        let c = self.c;
        let mut u = vec![0.0; c * c];
        for i in 0..c {
            u[i * c + i] = self.sign[i] * self.log_s[i].exp();
            for j in i + 1..c {
                u[i * c + j] = self.upper[i * c + j];
            }
        }
        u
    }

    /// `L`, dense: ones on the diagonal, the stored strict lower part below, zero above.
    fn l_full(&self) -> Vec<f64> {
        let c = self.c;
        let mut l = vec![0.0; c * c];
        for i in 0..c {
            l[i * c..i * c + i].copy_from_slice(&self.lower[i * c..i * c + i]);
            l[i * c + i] = 1.0;
        }
        l
    }

    /// `W = P · L · U'` (not checked for overflow; see [`weight`]).
    fn weight(&self) -> Vec<f64> {
        let c = self.c;
        let l = self.l_full();
        let u = self.u_prime();
        // M[i][j] = Σ_k L[i][k] U'[k][j]; L[i][k] = 0 for k > i and U'[k][j] = 0 for k > j,
        // so only k ≤ min(i, j) contributes.
        let mut m = vec![0.0; c * c];
        for i in 0..c {
            for j in 0..c {
                m[i * c + j] = (0..=i.min(j)).map(|k| l[i * c + k] * u[k * c + j]).sum();
            }
        }
        // W[r][:] = M[perm[r]][:].
        let mut w = vec![0.0; c * c];
        for (r, &src) in self.perm.iter().enumerate() {
            w[r * c..(r + 1) * c].copy_from_slice(&m[src * c..(src + 1) * c]);
        }
        w
    }

    /// `Σ log_s` (the tests' f64 twin of [`log_det`]).
    #[cfg(test)]
    fn log_det(&self) -> f64 {
        self.log_s.iter().sum()
    }

    /// The chain rule through `W = P · L · U'` (see [`backward`]); `d_w` has length `c * c`.
    fn backward(&self, d_w: &[f64], dlogdet_total: f64) -> LuGrads {
        let c = self.c;
        let l = self.l_full();
        let u = self.u_prime();
        // The permutation only moves rows: W[r] = M[perm[r]] gives dM[perm[r]] = dW[r].
        let mut d_m = vec![0.0; c * c];
        for (r, &dst) in self.perm.iter().enumerate() {
            d_m[dst * c..(dst + 1) * c].copy_from_slice(&d_w[r * c..(r + 1) * c]);
        }
        // M = L U'  ⇒  dL = dM U'^T and dU' = L^T dM; only the learned entries are kept.
        // dL[i][k] = Σ_j dM[i][j] U'[k][j], wanted for k < i; U'[k][j] = 0 for j < k.
        let mut d_lower = vec![0.0; c * c];
        for i in 0..c {
            for k in 0..i {
                d_lower[i * c + k] = (k..c).map(|j| d_m[i * c + j] * u[k * c + j]).sum();
            }
        }
        // dU'[k][j] = Σ_i L[i][k] dM[i][j], wanted for j ≥ k; L[i][k] = 0 for i < k.
        let mut d_upper = vec![0.0; c * c];
        let mut d_log_s = vec![0.0; c];
        for k in 0..c {
            for j in k..c {
                let g: f64 = (k..c).map(|i| l[i * c + k] * d_m[i * c + j]).sum();
                if j == k {
                    // U'[k][k] = sign[k] exp(log_s[k]) ⇒ ∂U'[k][k]/∂log_s[k] = U'[k][k]; the
                    // log-det term count·Σ log_s adds its (pre-scaled) gradient to every entry.
                    d_log_s[k] = g * u[k * c + k] + dlogdet_total;
                } else {
                    d_upper[k * c + j] = g;
                }
            }
        }
        LuGrads {
            d_lower,
            d_upper,
            d_log_s,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Public API.
// ---------------------------------------------------------------------------------------------

/// Initial parameters for `c` channels: a random orthogonal matrix `Q`, factorised into the
/// LU parametrisation (so [`weight`] reproduces `Q` up to `f32` rounding and
/// `Σ log_s ≈ ln|det Q| = 0`).
///
/// `Q` is the orthogonal factor of the Householder QR of a `c x c` standard Gaussian matrix
/// drawn from a seeded splitmix64 + Box–Muller generator, with its columns' signs fixed so
/// that `R` has a positive diagonal (which makes `Q` Haar-distributed). Partial-pivot LU of
/// `Q` then gives `Pₐ Q = L U`; its pivots are `diag U`, so `sign = sgn(diag U)` and
/// `log_s = ln|diag U|`. The same `(c, seed)` always gives the same result; `c = 0` gives
/// empty buffers.
pub fn init(c: usize, seed: u64) -> LuInit {
    let q = random_orthogonal(c, seed);
    // Doolittle LU with partial pivoting on a copy of Q. `a` is overwritten with L (strictly
    // below the diagonal, unit diagonal implied) and U (on and above it); `rows[r]` records
    // which row of Q ended up as row r, i.e. (L U)[r] = Q[rows[r]].
    let mut a = q;
    let mut rows: Vec<usize> = (0..c).collect();
    for k in 0..c {
        // Pivot: the largest |a[i][k]| for i ≥ k. Q is orthogonal (non-singular), so the
        // pivot is non-zero.
        let mut piv = k;
        for i in k + 1..c {
            if a[i * c + k].abs() > a[piv * c + k].abs() {
                piv = i;
            }
        }
        if piv != k {
            for j in 0..c {
                a.swap(k * c + j, piv * c + j);
            }
            rows.swap(k, piv);
        }
        let pivot = a[k * c + k];
        for i in k + 1..c {
            let f = a[i * c + k] / pivot;
            a[i * c + k] = f;
            for j in k + 1..c {
                a[i * c + j] -= f * a[k * c + j];
            }
        }
    }
    // W = Q must satisfy W[r] = M[perm[r]] with M = L U, and M[s] = Q[rows[s]]; so
    // perm[rows[s]] = s (perm is the inverse of `rows`).
    let mut perm = vec![0.0f32; c];
    for (s, &r) in rows.iter().enumerate() {
        perm[r] = s as f32;
    }
    let mut sign = vec![0.0f32; c];
    let mut log_s = vec![0.0f32; c];
    let mut lower = vec![0.0f32; c * c];
    let mut upper = vec![0.0f32; c * c];
    for i in 0..c {
        let d = a[i * c + i];
        sign[i] = if d < 0.0 { -1.0 } else { 1.0 };
        log_s[i] = d.abs().ln() as f32;
        for j in 0..c {
            let v = a[i * c + j] as f32;
            if j < i {
                lower[i * c + j] = v;
            } else if j > i {
                upper[i * c + j] = v;
            }
        }
    }
    LuInit {
        perm,
        sign,
        lower,
        upper,
        log_s,
    }
}

/// `W = P · L · (U + diag(sign ⊙ exp(log_s)))` as a row-major `c x c` `f64` matrix.
///
/// Errors on wrong buffer lengths, any non-finite parameter, a `perm` that is not a
/// permutation of `0..c`, a `sign` that is not `±1`, or a `W` that overflowed (huge `log_s`).
pub fn weight(c: usize, p: &LuParams) -> Result<Vec<f64>, InvConvError> {
    let w = validate(c, p)?.weight();
    check_finite_f64("weight", &w)?;
    Ok(w)
}

/// `W⁻¹` of a row-major `c x c` matrix, by Gauss–Jordan elimination with partial pivoting in
/// `f64`.
///
/// Errors on a wrong length or non-finite input, and with [`InvConvError::Singular`] when the
/// best remaining pivot of some column is at most `c · ε · max|W|` (numerically singular), or
/// the result overflows.
pub fn inverse(c: usize, w: &[f64]) -> Result<Vec<f64>, InvConvError> {
    let cc = square(c)?;
    check_len("w", w.len(), cc)?;
    check_finite_f64("w", w)?;
    let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let tol = c as f64 * f64::EPSILON * scale;
    // Reduce [A | X] with A = W, X = I to [I | W⁻¹] by row operations.
    let mut a = w.to_vec();
    let mut x = vec![0.0; cc];
    for i in 0..c {
        x[i * c + i] = 1.0;
    }
    for k in 0..c {
        let mut piv = k;
        for i in k + 1..c {
            if a[i * c + k].abs() > a[piv * c + k].abs() {
                piv = i;
            }
        }
        let pivot = a[piv * c + k];
        if pivot.abs() <= tol || pivot == 0.0 {
            return Err(InvConvError::Singular { column: k });
        }
        if piv != k {
            for j in 0..c {
                a.swap(k * c + j, piv * c + j);
                x.swap(k * c + j, piv * c + j);
            }
        }
        // Scale the pivot row so that a[k][k] = 1.
        let inv = 1.0 / pivot;
        for j in 0..c {
            a[k * c + j] *= inv;
            x[k * c + j] *= inv;
        }
        // Clear column k from every other row (above and below: Gauss–Jordan).
        for i in 0..c {
            if i == k {
                continue;
            }
            let f = a[i * c + k];
            if f == 0.0 {
                continue;
            }
            for j in 0..c {
                a[i * c + j] -= f * a[k * c + j];
                x[i * c + j] -= f * x[k * c + j];
            }
        }
    }
    check_finite_f64("inverse", &x)?;
    Ok(x)
}

/// `log|det W| = Σ log_s` in `f64` (`det P = ±1`, `det L = 1`, and `U'` is triangular with
/// diagonal `sign ⊙ exp(log_s)`). Per pixel; a layer over `N` images of `H x W` pixels
/// contributes `N · H · W` times this. Does not validate; non-finite input gives a
/// non-finite result.
pub fn log_det(p: &LuParams) -> f64 {
    p.log_s.iter().map(|&x| f64::from(x)).sum()
}

/// Gradients of a scalar loss with respect to `lower`, `upper` and `log_s`.
///
/// `d_w` (`c * c`, row-major) is `∂loss/∂W`; `dlogdet_total` is `∂loss/∂(Σ log_s)` for the
/// layer's whole log-det contribution `count · Σ log_s` (`count = N · H · W`), i.e. already
/// multiplied by `count` and by the loss's sign (e.g. `-count / normaliser` for a negative
/// log-likelihood); it is added to every `d_log_s[i]`.
///
/// With `M = L · U'` and `W[r] = M[perm[r]]`:
/// `dM[perm[r]] = dW[r]`, `d_lower = strict_lower(dM · U'ᵀ)`, `dU' = Lᵀ · dM`,
/// `d_upper = strict_upper(dU')`, `d_log_s[i] = dU'[i][i] · sign[i] · exp(log_s[i]) +
/// dlogdet_total`. `perm` and `sign` are fixed and get none.
///
/// Errors like [`weight`] on bad parameters, and on a wrong-length or non-finite `d_w` or a
/// non-finite `dlogdet_total`.
pub fn backward(
    c: usize,
    p: &LuParams,
    d_w: &[f64],
    dlogdet_total: f64,
) -> Result<LuGrads, InvConvError> {
    let core = validate(c, p)?;
    check_len("d_w", d_w.len(), c * c)?;
    check_finite_f64("d_w", d_w)?;
    check_finite_f64("dlogdet_total", &[dlogdet_total])?;
    Ok(core.backward(d_w, dlogdet_total))
}

// ---------------------------------------------------------------------------------------------
// Random orthogonal matrices (no dependencies: splitmix64 + Box–Muller + Householder QR).
// ---------------------------------------------------------------------------------------------

/// [`SplitMix64`] with a Box–Muller Gaussian on top.
#[derive(Debug)]
struct Rng {
    bits: SplitMix64,
    spare: Option<f64>,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Self {
            bits: SplitMix64::new(seed),
            spare: None,
        }
    }

    fn uniform_open0(&mut self) -> f64 {
        self.bits.uniform_open0()
    }

    /// Standard normal: Box–Muller turns two uniforms `u1, u2` into the two independent
    /// normals `r cos θ` and `r sin θ` with `r = √(-2 ln u1)`, `θ = 2π u2`.
    fn gaussian(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform_open0().ln()).sqrt();
        let theta = std::f64::consts::TAU * self.uniform_open0();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// Householder QR of a row-major `c x c` matrix: returns `(Q, R)` with `A = Q R`, `Q`
/// orthogonal and `R` upper-triangular. Always yields an orthogonal `Q`, even for a
/// rank-deficient `A`.
fn householder_qr(c: usize, a: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut r = a.to_vec();
    let mut vs: Vec<(usize, Vec<f64>)> = Vec::with_capacity(c);
    for k in 0..c {
        // Reflect x = R[k.., k] onto α e₁ with α = -sgn(x₀)‖x‖ (the sign avoids
        // cancellation): H = I - 2 v vᵀ with v = (x - α e₁)/‖x - α e₁‖.
        let norm = (k..c).map(|i| r[i * c + k].powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let x0 = r[k * c + k];
        let alpha = if x0 < 0.0 { norm } else { -norm };
        let mut v: Vec<f64> = (k..c).map(|i| r[i * c + k]).collect();
        v[0] -= alpha;
        let vn = v.iter().map(|t| t * t).sum::<f64>().sqrt();
        if vn == 0.0 {
            continue;
        }
        for t in &mut v {
            *t /= vn;
        }
        apply_reflector(c, k, &v, &mut r);
        vs.push((k, v));
    }
    // Q = H₀ H₁ … ; build it by applying the reflectors to I in reverse order.
    let mut q = vec![0.0; c * c];
    for i in 0..c {
        q[i * c + i] = 1.0;
    }
    for (k, v) in vs.iter().rev() {
        apply_reflector(c, *k, v, &mut q);
    }
    (q, r)
}

/// `A[k.., :] -= 2 v (vᵀ A[k.., :])`: left-multiplies `A` by `I - 2 v vᵀ` acting on rows `k..`.
fn apply_reflector(c: usize, k: usize, v: &[f64], a: &mut [f64]) {
    for j in 0..c {
        let dot: f64 = v
            .iter()
            .enumerate()
            .map(|(t, vt)| vt * a[(k + t) * c + j])
            .sum();
        for (t, vt) in v.iter().enumerate() {
            a[(k + t) * c + j] -= 2.0 * vt * dot;
        }
    }
}

/// A Haar-random `c x c` orthogonal matrix: `Q D` where `G = Q R` is the QR of a Gaussian
/// `G` and `D = diag(sgn R_ii)` (the sign fix makes the distribution exactly Haar).
fn random_orthogonal(c: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let g: Vec<f64> = (0..c * c).map(|_| rng.gaussian()).collect();
    let (mut q, r) = householder_qr(c, &g);
    for j in 0..c {
        if r[j * c + j] < 0.0 {
            for i in 0..c {
                q[i * c + j] = -q[i * c + j];
            }
        }
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(c: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; c * c];
        for i in 0..c {
            for j in 0..c {
                out[i * c + j] = (0..c).map(|k| a[i * c + k] * b[k * c + j]).sum();
            }
        }
        out
    }

    fn transpose(c: usize, a: &[f64]) -> Vec<f64> {
        let mut t = vec![0.0; c * c];
        for i in 0..c {
            for j in 0..c {
                t[j * c + i] = a[i * c + j];
            }
        }
        t
    }

    fn max_dev_from_identity(c: usize, a: &[f64]) -> f64 {
        let mut m = 0.0f64;
        for i in 0..c {
            for j in 0..c {
                let want = if i == j { 1.0 } else { 0.0 };
                m = m.max((a[i * c + j] - want).abs());
            }
        }
        m
    }

    /// Leibniz determinant (sum over all permutations) — independent of any elimination.
    fn det_brute(c: usize, a: &[f64]) -> f64 {
        fn rec(c: usize, a: &[f64], row: usize, used: &mut [bool], sgn: f64) -> f64 {
            if row == c {
                return sgn;
            }
            let mut total = 0.0;
            // The parity of the permutation: each unused column skipped over before `col`
            // in this row is one inversion.
            let mut skipped = 0;
            for col in 0..c {
                if used[col] {
                    continue;
                }
                let s = if skipped % 2 == 0 { sgn } else { -sgn };
                used[col] = true;
                total += a[row * c + col] * rec(c, a, row + 1, used, s);
                used[col] = false;
                skipped += 1;
            }
            total
        }
        rec(c, a, 0, &mut vec![false; c], 1.0)
    }

    /// `ln|det A|` from the diagonal of the Householder `R` (|det Q| = 1).
    fn log_abs_det_qr(c: usize, a: &[f64]) -> f64 {
        let (_, r) = householder_qr(c, a);
        (0..c).map(|i| r[i * c + i].abs().ln()).sum()
    }

    /// Random but well-conditioned parameters (f64 core) for gradient / det tests.
    fn random_core(c: usize, seed: u64) -> Core {
        let mut rng = Rng::new(seed);
        let init = init(c, seed ^ 0xABCD);
        let perm = init.perm.iter().map(|&p| p as usize).collect();
        let sign = (0..c)
            .map(|_| {
                if rng.bits.next_u64() & 1 == 0 {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let mut lower = vec![0.0; c * c];
        let mut upper = vec![0.0; c * c];
        for i in 0..c {
            for j in 0..c {
                let v = 0.4 * rng.gaussian();
                if j < i {
                    lower[i * c + j] = v;
                } else if j > i {
                    upper[i * c + j] = v;
                }
            }
        }
        let log_s = (0..c).map(|_| 0.3 * rng.gaussian()).collect();
        Core {
            c,
            perm,
            sign,
            lower,
            upper,
            log_s,
        }
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn init_is_orthogonal_and_reproducible() {
        for c in [1usize, 2, 3, 4, 8, 12, 48] {
            for seed in [0u64, 1, 42] {
                let a = init(c, seed);
                assert_eq!(a, init(c, seed), "c={c} seed={seed}: not reproducible");
                let w = weight(c, &a.params()).expect("init params are valid");
                let wwt = matmul(c, &w, &transpose(c, &w));
                assert!(
                    max_dev_from_identity(c, &wwt) < 1e-5,
                    "c={c} seed={seed}: W W^T far from I"
                );
                assert!(log_det(&a.params()).abs() < 1e-4, "c={c}: Σlog_s not ≈ 0");
                // Structural conventions of the stored buffers.
                for i in 0..c {
                    assert!(a.sign[i] == 1.0 || a.sign[i] == -1.0);
                    for j in 0..c {
                        if j >= i {
                            assert_eq!(a.lower[i * c + j], 0.0);
                        }
                        if j <= i {
                            assert_eq!(a.upper[i * c + j], 0.0);
                        }
                    }
                }
            }
        }
        assert_ne!(init(4, 1), init(4, 2), "different seeds should differ");
    }

    #[test]
    fn weight_of_init_reproduces_the_orthogonal_matrix() {
        for c in [1usize, 2, 5, 12, 32] {
            let q = random_orthogonal(c, 7);
            assert!(max_dev_from_identity(c, &matmul(c, &q, &transpose(c, &q))) < 1e-12);
            let w = weight(c, &init(c, 7).params()).expect("valid");
            let dev = q
                .iter()
                .zip(&w)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(dev < 1e-5, "c={c}: |W - Q| = {dev}");
        }
    }

    #[test]
    fn init_with_zero_channels_is_empty_and_valid() {
        let a = init(0, 3);
        assert!(a.perm.is_empty() && a.lower.is_empty() && a.log_s.is_empty());
        assert_eq!(weight(0, &a.params()), Ok(vec![]));
        assert_eq!(inverse(0, &[]), Ok(vec![]));
        assert_eq!(log_det(&a.params()), 0.0);
    }

    #[test]
    fn perm_convention_moves_rows_of_m() {
        // L = U = 0 strict parts, so M = diag(1, 2, 3); perm = [2, 0, 1] means
        // W[0] = M[2], W[1] = M[0], W[2] = M[1].
        let log_s = [0.0f32, 2f32.ln(), 3f32.ln()];
        let p = LuParams {
            perm: &[2.0, 0.0, 1.0],
            sign: &[1.0, 1.0, -1.0],
            lower: &[0.0; 9],
            upper: &[0.0; 9],
            log_s: &log_s,
        };
        let w = weight(3, &p).expect("valid");
        let want = [0.0, 0.0, -3.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{w:?}");
        }
    }

    #[test]
    fn inverse_times_w_is_identity() {
        for c in [1usize, 2, 3, 4, 12, 40] {
            let core = random_core(c, 11 + c as u64);
            let w = core.weight();
            let wi = inverse(c, &w).expect("LU-parametrised W is invertible");
            assert!(
                max_dev_from_identity(c, &matmul(c, &wi, &w)) < 1e-10,
                "c={c}"
            );
            assert!(
                max_dev_from_identity(c, &matmul(c, &w, &wi)) < 1e-10,
                "c={c}"
            );
        }
    }

    #[test]
    fn inverse_rejects_singular_and_bad_input() {
        assert!(matches!(
            inverse(2, &[1.0, 2.0, 2.0, 4.0]),
            Err(InvConvError::Singular { .. })
        ));
        assert!(matches!(
            inverse(3, &[0.0; 9]),
            Err(InvConvError::Singular { column: 0 })
        ));
        assert!(matches!(
            inverse(2, &[1.0, 0.0, 0.0]),
            Err(InvConvError::Length { name: "w", .. })
        ));
        assert!(matches!(
            inverse(2, &[1.0, f64::NAN, 0.0, 1.0]),
            Err(InvConvError::NonFinite {
                name: "w",
                index: 1
            })
        ));
        // Tiny but well-conditioned scales are fine (the threshold is relative).
        let wi = inverse(2, &[1e-200, 0.0, 0.0, 2e-200]).expect("diagonal, invertible");
        assert!((wi[0] - 1e200).abs() < 1e186 && (wi[3] - 5e199).abs() < 1e186);
    }

    #[test]
    fn log_det_matches_independent_determinant() {
        for c in [1usize, 2, 3, 4, 5] {
            let core = random_core(c, 100 + c as u64);
            let w = core.weight();
            let det = det_brute(c, &w);
            assert!((core.log_det() - det.abs().ln()).abs() < 1e-10, "c={c}");
            // The sign of det W is Π sign · parity(perm) — just check magnitude via the
            // public f32 path as well.
            let (perm, sign, lower, upper, log_s) = (
                core.perm.iter().map(|&p| p as f32).collect::<Vec<_>>(),
                to_f32(&core.sign),
                to_f32(&core.lower),
                to_f32(&core.upper),
                to_f32(&core.log_s),
            );
            let p = LuParams {
                perm: &perm,
                sign: &sign,
                lower: &lower,
                upper: &upper,
                log_s: &log_s,
            };
            let w32 = weight(c, &p).expect("valid");
            assert!(
                (log_det(&p) - det_brute(c, &w32).abs().ln()).abs() < 1e-9,
                "c={c}"
            );
        }
        for c in [12usize, 30] {
            let core = random_core(c, 200 + c as u64);
            let ld = log_abs_det_qr(c, &core.weight());
            assert!((core.log_det() - ld).abs() < 1e-9, "c={c}");
        }
        // And init: |det| = 1.
        let a = init(4, 5);
        let w = weight(4, &a.params()).expect("valid");
        assert!((det_brute(4, &w).abs() - 1.0).abs() < 1e-5);
    }

    /// f(θ) = Σ A ∘ W(θ) + g · Σ log_s, whose gradient w.r.t. W is A and w.r.t. Σ log_s is g.
    fn loss(core: &Core, a: &[f64], g: f64) -> f64 {
        let w = core.weight();
        w.iter().zip(a).map(|(w, a)| w * a).sum::<f64>() + g * core.log_det()
    }

    #[test]
    fn backward_matches_finite_differences() {
        for c in [1usize, 2, 4, 12] {
            let core = random_core(c, 300 + c as u64);
            let mut rng = Rng::new(999 + c as u64);
            let a: Vec<f64> = (0..c * c).map(|_| rng.gaussian()).collect();
            let g = -1.7;
            let grads = core.backward(&a, g);
            let h = 1e-6;
            let mut worst = 0.0f64;
            let check = |analytic: f64, numeric: f64| {
                let err = (analytic - numeric).abs() / (1.0 + numeric.abs());
                assert!(
                    err < 1e-7,
                    "c={c}: analytic {analytic} vs numeric {numeric}"
                );
                err
            };
            for idx in 0..c * c {
                let (i, j) = (idx / c, idx % c);
                for (which, buf) in [("lower", 0), ("upper", 1)] {
                    let mut plus = core.clone();
                    let mut minus = core.clone();
                    let (pb, mb) = if buf == 0 {
                        (&mut plus.lower, &mut minus.lower)
                    } else {
                        (&mut plus.upper, &mut minus.upper)
                    };
                    pb[idx] += h;
                    mb[idx] -= h;
                    let numeric = (loss(&plus, &a, g) - loss(&minus, &a, g)) / (2.0 * h);
                    let analytic = if buf == 0 {
                        grads.d_lower[idx]
                    } else {
                        grads.d_upper[idx]
                    };
                    let learned = if buf == 0 { j < i } else { j > i };
                    if learned {
                        worst = worst.max(check(analytic, numeric));
                    } else {
                        // Unused entries: the loss does not depend on them, gradient is 0.
                        assert_eq!(analytic, 0.0, "{which}[{i}][{j}]");
                        assert!(numeric.abs() < 1e-12, "{which}[{i}][{j}] affects W");
                    }
                }
            }
            for i in 0..c {
                let mut plus = core.clone();
                let mut minus = core.clone();
                plus.log_s[i] += h;
                minus.log_s[i] -= h;
                let numeric = (loss(&plus, &a, g) - loss(&minus, &a, g)) / (2.0 * h);
                worst = worst.max(check(grads.d_log_s[i], numeric));
            }
            assert!(worst < 1e-7, "c={c}: worst relative error {worst}");

            // The public f32 entry point agrees with the f64 core on the same (rounded) values.
            let perm: Vec<f32> = core.perm.iter().map(|&p| p as f32).collect();
            let (sign, lower, upper, log_s) = (
                to_f32(&core.sign),
                to_f32(&core.lower),
                to_f32(&core.upper),
                to_f32(&core.log_s),
            );
            let p = LuParams {
                perm: &perm,
                sign: &sign,
                lower: &lower,
                upper: &upper,
                log_s: &log_s,
            };
            let public = backward(c, &p, &a, g).expect("valid");
            let core32 = validate(c, &p).expect("valid");
            assert_eq!(public, core32.backward(&a, g));
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        let a = init(3, 1);
        let base = a.params();
        let ok = |p: &LuParams| weight(3, p);
        assert!(ok(&base).is_ok());

        let cases: Vec<(&[f32], InvConvError)> = vec![
            (
                &[0.0, 0.0, 1.0],
                InvConvError::PermDuplicate { index: 1, value: 0 },
            ),
            (
                &[0.0, 3.0, 1.0],
                InvConvError::PermOutOfRange {
                    index: 1,
                    value: 3.0,
                },
            ),
            (
                &[0.0, -1.0, 1.0],
                InvConvError::PermOutOfRange {
                    index: 1,
                    value: -1.0,
                },
            ),
            (
                &[0.5, 1.0, 2.0],
                InvConvError::PermOutOfRange {
                    index: 0,
                    value: 0.5,
                },
            ),
        ];
        for (perm, want) in cases {
            let p = LuParams { perm, ..base };
            assert_eq!(ok(&p), Err(want.clone()));
            assert_eq!(backward(3, &p, &[0.0; 9], 0.0), Err(want));
        }
        let nan_perm = [0.0, f32::NAN, 1.0];
        assert!(matches!(
            ok(&LuParams {
                perm: &nan_perm,
                ..base
            }),
            Err(InvConvError::NonFinite {
                name: "perm",
                index: 1
            })
        ));

        // Wrong lengths, one buffer at a time.
        let short = [0.0f32; 2];
        let long = [0.0f32; 10];
        for name in ["perm", "sign", "lower", "upper", "log_s"] {
            let mut p = base;
            match name {
                "perm" => p.perm = &short,
                "sign" => p.sign = &short,
                "lower" => p.lower = &long,
                "upper" => p.upper = &long,
                _ => p.log_s = &short,
            }
            assert!(
                matches!(ok(&p), Err(InvConvError::Length { name: n, .. }) if n == name),
                "{name}"
            );
        }

        // Non-finite values (including in the ignored triangle half).
        let mut lower = a.lower.clone();
        lower[2] = f32::NAN; // lower[0][2]: above the diagonal, ignored but still rejected.
        assert!(matches!(
            ok(&LuParams {
                lower: &lower,
                ..base
            }),
            Err(InvConvError::NonFinite {
                name: "lower",
                index: 2
            })
        ));
        let mut upper = a.upper.clone();
        upper[1] = f32::INFINITY;
        assert!(matches!(
            ok(&LuParams {
                upper: &upper,
                ..base
            }),
            Err(InvConvError::NonFinite { name: "upper", .. })
        ));
        let log_s = [0.0, f32::NEG_INFINITY, 0.0];
        assert!(matches!(
            ok(&LuParams {
                log_s: &log_s,
                ..base
            }),
            Err(InvConvError::NonFinite { name: "log_s", .. })
        ));
        // Finite but overflowing: exp(1000) = inf.
        let huge = [0.0, 1000.0, 0.0];
        assert!(matches!(
            ok(&LuParams {
                log_s: &huge,
                ..base
            }),
            Err(InvConvError::NonFinite { name: "weight", .. })
        ));
        let sign = [1.0, 0.5, -1.0];
        assert!(matches!(
            ok(&LuParams {
                sign: &sign,
                ..base
            }),
            Err(InvConvError::BadSign { index: 1, .. })
        ));

        // backward-specific checks.
        assert!(matches!(
            backward(3, &base, &[0.0; 8], 0.0),
            Err(InvConvError::Length { name: "d_w", .. })
        ));
        let mut dw = [0.0; 9];
        dw[4] = f64::NAN;
        assert!(matches!(
            backward(3, &base, &dw, 0.0),
            Err(InvConvError::NonFinite {
                name: "d_w",
                index: 4
            })
        ));
        assert!(matches!(
            backward(3, &base, &[0.0; 9], f64::INFINITY),
            Err(InvConvError::NonFinite {
                name: "dlogdet_total",
                ..
            })
        ));
        assert!(matches!(
            weight(usize::MAX, &base),
            Err(InvConvError::TooLarge { .. })
        ));
        // Errors print something useful.
        assert!(InvConvError::Singular { column: 2 }
            .to_string()
            .contains("singular"));
    }

    #[test]
    fn c_equals_one() {
        let a = init(1, 9);
        assert_eq!(a.perm, vec![0.0]);
        assert_eq!(a.log_s, vec![0.0]);
        let w = weight(1, &a.params()).expect("valid");
        assert!((w[0].abs() - 1.0).abs() < 1e-12);
        let p = LuParams {
            perm: &[0.0],
            sign: &[-1.0],
            lower: &[0.0],
            upper: &[0.0],
            log_s: &[0.5],
        };
        let w = weight(1, &p).expect("valid");
        assert!((w[0] + 0.5f64.exp()).abs() < 1e-6);
        assert!((inverse(1, &w).expect("invertible")[0] * w[0] - 1.0).abs() < 1e-12);
        // loss = 2 W + 3 Σlog_s ⇒ dlog_s = 2 · (-e^0.5) + 3.
        let g = backward(1, &p, &[2.0], 3.0).expect("valid");
        assert!((g.d_log_s[0] - (3.0 - 2.0 * f64::from(0.5f32).exp())).abs() < 1e-12);
        assert_eq!(g.d_lower, vec![0.0]);
        assert_eq!(g.d_upper, vec![0.0]);
    }
}
