//! The affine coupling layer, forward (image -> latent) and inverse (latent -> image).
//!
//! The mask splits the input into a kept half `x_a` and a changed half `x_b`. The CNN reads
//! only `x_a` and gives `(s_raw, t)`; with the log-scale `s = scale * tanh(s_raw)` (the
//! seed's RealNVP) or, in a Glow architecture, [`glow_log_scale`]:
//! `exp(s) = f + (1 - f) sigmoid(s_raw + 2)` with the architecture's floor `f`
//! ([`Arch::scale_floor`]). Glow's sigmoid keeps `exp(s)` below 1, so a coupling never
//! expands and an unusual image cannot be blown up through many couplings; the floor keeps it
//! above `f`, so the *inverse* expands at most `1/f`-fold and an unusual latent cannot be
//! blown up to infinity either (without it, `1/sigmoid` has no bound). A Glow coupling has no
//! `scale` tensor:
//!
//! * forward:  `y_a = x_a`, `y_b = x_b * exp(s) + t`, log-det `+= sum(s)`;
//! * inverse:  `x_a = y_a`, `x_b = (y_b - t) * exp(-s)`, with the *same* bounded `s`.
//!
//! The Jacobian is block triangular (identity on `a`, `diag(exp(s))` on `b`), so its
//! log-determinant is the sum of `s` over the changed elements only. Because `y_a = x_a`
//! the inverse recomputes exactly the forward's `(s, t)`.

use crate::arch::{Arch, Mask};
use crate::conv::{Conv, INTERNAL};
use crate::error::{Buffer, Error};
use crate::weights::{CouplingWeights, Tensor};

/// The scratch a coupling's CNN works in (see [`crate::ScratchLayout`]).
#[derive(Debug)]
pub struct Work<'s> {
    /// CNN input: the kept channels, or the image with changed pixels zeroed.
    pub cnn_in: &'s mut [f32],
    /// First hidden layer, then the `(s_raw, t)` output.
    pub region_a: &'s mut [f32],
    /// Second hidden layer.
    pub region_b: &'s mut [f32],
}

/// The first `needed` elements of a scratch region, or a scratch size error.
pub(crate) fn scratch(buf: &mut [f32], needed: usize) -> Result<&mut [f32], Error> {
    let got = buf.len();
    buf.get_mut(..needed).ok_or(Error::BufferSize {
        buffer: Buffer::Scratch,
        needed,
        got,
    })
}

/// Writes the CNN input of `mask` for the state `x` (flow shape of `arch`) to `input`
/// (`cnn_in * plane` long): for a channel mask the kept channels `p, p + 2, ...` in order,
/// for a checkerboard every channel with the changed pixels zeroed.
pub(crate) fn gather(arch: &Arch, mask: Mask, x: &[f32], input: &mut [f32]) -> Result<(), Error> {
    let (_, _, w) = arch.flow_shape();
    let plane = plane_len(arch)?;
    if mask.is_channel() {
        // Gather the kept channels p, p + 2, ... in order.
        for (dst, src) in input
            .chunks_exact_mut(plane)
            .zip(x.chunks_exact(plane).skip(mask.parity()).step_by(2))
        {
            dst.copy_from_slice(src);
        }
    } else {
        // All channels, changed pixels zeroed: the CNN must not see what it will change.
        for (dst, src) in input.chunks_exact_mut(plane).zip(x.chunks_exact(plane)) {
            let rows = dst.chunks_exact_mut(w).zip(src.chunks_exact(w));
            for (row, (d, s)) in rows.enumerate() {
                d.copy_from_slice(s);
                for v in d.iter_mut().skip(first_changed(mask, row)).step_by(2) {
                    *v = 0.0;
                }
            }
        }
    }
    Ok(())
}

/// Runs the coupling's CNN on the kept half of `x` (flow shape) and returns `(s_raw, t)`
/// planes, `2 * changed` of them, in `work.region_a`.
fn cnn<'w>(
    arch: &Arch,
    cw: &CouplingWeights<'_>,
    x: &[f32],
    work: &'w mut Work<'_>,
) -> Result<&'w [f32], Error> {
    let (_, h, w) = arch.flow_shape();
    let plane = plane_len(arch)?;
    let mask = cw.mask;
    let cin = arch.cnn_in(mask);
    let input = scratch(work.cnn_in, cin.saturating_mul(plane))?;
    gather(arch, mask, x, input)?;
    let run = |j: usize, input: &[f32], out: &mut [f32], relu: bool| -> Result<(), Error> {
        let (cin, cout, k) = arch.conv_shape(mask, j);
        let conv = Conv {
            cin,
            cout,
            height: h,
            width: w,
            kernel: k,
        };
        let out = scratch(out, cout.saturating_mul(plane))?;
        let (wt, b) = match j {
            0 => (cw.conv_w[0], cw.conv_b[0]),
            1 => (cw.conv_w[1], cw.conv_b[1]),
            _ => (cw.conv_w[2], cw.conv_b[2]),
        };
        conv.forward(input, wt, b, relu, out)
    };
    let h0 = arch.hidden[0].saturating_mul(plane);
    let h1 = arch.hidden[1].saturating_mul(plane);
    run(0, input, work.region_a, true)?;
    let a = work.region_a.get(..h0).ok_or(INTERNAL)?;
    run(1, a, work.region_b, true)?;
    let b = work.region_b.get(..h1).ok_or(INTERNAL)?;
    run(2, b, work.region_a, false)?;
    work.region_a
        .get(..arch.changed(mask).saturating_mul(2).saturating_mul(plane))
        .ok_or(INTERNAL)
}

/// How a coupling bounds its log-scale `s` from the CNN's `s_raw`.
#[derive(Clone, Copy, Debug)]
pub enum ScaleFn<'a> {
    /// The seed's RealNVP: `s = scale[j] * tanh(s_raw)` for changed channel `j`, `scale` the
    /// per-changed-channel tensor (a RealNVP coupling's, or the learned prior's).
    Tanh(Tensor<'a>),
    /// Glow's floored sigmoid, [`glow_scale`] with this floor ([`Arch::scale_floor`]).
    Glow {
        /// The floor `f` of `exp(s)`.
        floor: f32,
    },
}

impl<'a> ScaleFn<'a> {
    /// The scale function of a coupling of `arch` with the weights `cw`: Glow's for a Glow
    /// architecture (its couplings have no scale tensor), else `tanh` with `cw.scale`.
    pub fn of(arch: &Arch, cw: &CouplingWeights<'a>) -> ScaleFn<'a> {
        if arch.glow {
            ScaleFn::Glow {
                floor: arch.scale_floor,
            }
        } else {
            ScaleFn::Tanh(cw.scale)
        }
    }
}

/// Applies the affine map of a coupling with `mask` to the changed half of `x` (flow shape of
/// `arch`) in place, with `(s_raw, t)` planes `st` (`2 * changed` planes) and the log-scale
/// bound `scale`; returns the log-det (0 for the inverse).
pub(crate) fn apply(
    arch: &Arch,
    mask: Mask,
    scale: ScaleFn<'_>,
    st: &[f32],
    x: &mut [f32],
    inverse: bool,
) -> Result<f32, Error> {
    let (_, _, w) = arch.flow_shape();
    let plane = plane_len(arch)?;
    let changed = arch.changed(mask);
    let (s_all, t_all) = st
        .split_at_checked(changed.saturating_mul(plane))
        .ok_or(INTERNAL)?;
    let mut log_det = 0.0f32;
    // Glow's scale has no tensor: 1s stand in for it.
    let (mut scales, glow, floor) = match scale {
        ScaleFn::Tanh(t) => (Some(t.iter()), false, 0.0),
        ScaleFn::Glow { floor } => (None, true, floor),
    };
    for (j, (s_plane, t_plane)) in s_all
        .chunks_exact(plane)
        .zip(t_all.chunks_exact(plane))
        .enumerate()
    {
        let scale = match scales.as_mut() {
            Some(it) => it.next().ok_or(INTERNAL)?,
            None => 1.0,
        };
        let ch = mask.changed_channel(j);
        let xp = x.chunks_exact_mut(plane).nth(ch).ok_or(INTERNAL)?;
        // One changed element: bounded log-scale, |s| <= |scale| (tanh) or s < 0 (Glow).
        let mut affine = |xv: &mut f32, sr: f32, t: f32| {
            let (s, e) = if glow {
                glow_scale(sr, floor)
            } else {
                let s = scale * libm::tanhf(sr);
                (s, libm::expf(s))
            };
            if !inverse {
                *xv = *xv * e + t;
                log_det += s;
            } else if glow && floor > 0.0 {
                *xv = (*xv - t) / e;
            } else {
                // Without a floor as before it: exp(-s), bit for bit.
                *xv = (*xv - t) * libm::expf(-s);
            }
        };
        if mask.is_channel() {
            for ((xv, &sr), &t) in xp.iter_mut().zip(s_plane).zip(t_plane) {
                affine(xv, sr, t);
            }
        } else {
            let rows = xp
                .chunks_exact_mut(w)
                .zip(s_plane.chunks_exact(w))
                .zip(t_plane.chunks_exact(w));
            for (row, ((xr, sr), tr)) in rows.enumerate() {
                let skip = first_changed(mask, row);
                let changed_cols = xr.iter_mut().zip(sr).zip(tr).skip(skip).step_by(2);
                for ((xv, &sr), &t) in changed_cols {
                    affine(xv, sr, t);
                }
            }
        }
    }
    Ok(log_det)
}

/// Glow's log-scale with a floor `f` (`0 <= f < 1`, [`Arch::scale_floor`]) and its
/// exponential, `(s, exp(s))` with `exp(s) = f + (1 - f) sigmoid(s_raw + 2)`, so
/// `log f < s < 0` (`f = 0`: Glow's `s = log sigmoid(s_raw + 2)` and `expf(s)`, bit for bit
/// what models before the floor computed).
///
/// With `f > 0`: `a = (1 - f) sigmoid(-x)`, `x = s_raw + 2`, `exp(s) = 1 - a` and
/// `s = log1p(-a)`: one `exp` and one `log1p`, finite for every non-NaN `s_raw`
/// (`sigmoid(-x) = 1 / (1 + exp(x))` is 0 when `exp(x)` overflows, and `a <= 1 - f < 1`).
pub fn glow_scale(s_raw: f32, floor: f32) -> (f32, f32) {
    let x = s_raw + 2.0;
    if floor <= 0.0 {
        let s = log_sigmoid(x);
        return (s, libm::expf(s));
    }
    let a = (1.0 - floor) * sigmoid_neg(x);
    (libm::log1pf(-a), 1.0 - a)
}

/// The log-scale `s` of [`glow_scale`] alone.
pub fn glow_log_scale(s_raw: f32, floor: f32) -> f32 {
    glow_scale(s_raw, floor).0
}

/// For the backward pass: `(exp(s), ds/ds_raw)` of [`glow_scale`], with
/// `ds/ds_raw = (1 - f) sigmoid(x) sigmoid(-x) / exp(s)` (`f = 0`: `1 - exp(s)`). The
/// derivative lies in `[0, (1 - f) / (4 f)]`, finite since `exp(s) >= f`. One `exp` when
/// `f > 0` (the backward pass needs no `s`).
pub fn glow_scale_grad(s_raw: f32, floor: f32) -> (f32, f32) {
    let x = s_raw + 2.0;
    if floor <= 0.0 {
        let e = libm::expf(log_sigmoid(x));
        return (e, 1.0 - e);
    }
    let q = sigmoid_neg(x);
    let a = (1.0 - floor) * q;
    let e = 1.0 - a;
    (e, a * (1.0 - q) / e)
}

/// `sigmoid(-x) = 1 / (1 + exp(x))`: 0 when `exp(x)` overflows, 1 as `x -> -inf`.
fn sigmoid_neg(x: f32) -> f32 {
    1.0 / (1.0 + libm::expf(x))
}

/// `log(sigmoid(x)) = -softplus(-x)`, computed without overflow for any `x`:
/// `min(x, 0) - log1p(exp(-|x|))`.
pub fn log_sigmoid(x: f32) -> f32 {
    let m = if x < 0.0 { x } else { 0.0 };
    m - libm::log1pf(libm::expf(-libm::fabsf(x)))
}

/// Pixels per flow plane; an error instead of 0 (which would make `chunks_exact` panic),
/// though a validated arch never has an empty plane.
fn plane_len(arch: &Arch) -> Result<usize, Error> {
    let (_, _, w) = arch.flow_shape();
    match (arch.plane(), w) {
        (0, _) | (_, 0) => Err(INTERNAL),
        (plane, _) => Ok(plane),
    }
}

/// The first column of `row` that a checkerboard `mask` changes (0 or 1); the changed
/// columns are every second one from there. (For channel masks every column changes.)
fn first_changed(mask: Mask, row: usize) -> usize {
    usize::from(!mask.changes_pixel(row, 0))
}

fn check_x(arch: &Arch, x: &[f32]) -> Result<(), Error> {
    // A validated arch keeps every size product far from overflow.
    arch.validate()?;
    // The squeeze keeps the element count: flow shape C*H*W = image C*H*W.
    let n = arch.dim();
    if x.len() != n {
        return Err(Error::BufferSize {
            buffer: Buffer::Input,
            needed: n,
            got: x.len(),
        });
    }
    Ok(())
}

/// Forward coupling (image -> latent) on `x` (flow shape) in place; returns `sum(s)`.
pub fn forward(
    arch: &Arch,
    cw: &CouplingWeights<'_>,
    x: &mut [f32],
    work: &mut Work<'_>,
) -> Result<f32, Error> {
    check_x(arch, x)?;
    let st = cnn(arch, cw, x, work)?;
    apply(arch, cw.mask, ScaleFn::of(arch, cw), st, x, false)
}

/// Inverse coupling (latent -> image) on `y` (flow shape) in place.
pub fn inverse(
    arch: &Arch,
    cw: &CouplingWeights<'_>,
    y: &mut [f32],
    work: &mut Work<'_>,
) -> Result<(), Error> {
    check_x(arch, y)?;
    let st = cnn(arch, cw, y, work)?;
    apply(arch, cw.mask, ScaleFn::of(arch, cw), st, y, true).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::{glow_log_scale, glow_scale, glow_scale_grad, log_sigmoid};

    /// `log(f + (1 - f) sigmoid(sr + 2))` and its derivative in f64.
    fn reference(sr: f32, f: f32) -> (f64, f64) {
        let (x, f) = (f64::from(sr) + 2.0, f64::from(f));
        let sig = 1.0 / (1.0 + (-x).exp());
        let e = f + (1.0 - f) * sig;
        (e.ln(), (1.0 - f) * sig * (1.0 - sig) / e)
    }

    #[test]
    fn glow_log_scale_matches_the_definition_with_and_without_a_floor() {
        for &f in &[0.0f32, 1.0 / 64.0, 0.0625, 0.5] {
            for &sr in &[-30.0f32, -9.0, -2.5, -0.3, 0.0, 0.4, 3.0, 12.0, 40.0] {
                let s = glow_log_scale(sr, f);
                let (want, dwant) = reference(sr, f);
                assert!(
                    (f64::from(s) - want).abs() < 2e-6 * (1.0 + want.abs()),
                    "f {f}, s_raw {sr}: {s} vs {want}"
                );
                let (e, d) = glow_scale_grad(sr, f);
                assert!(
                    (f64::from(d) - dwant).abs() < 1e-5 * (1.0 + dwant.abs()),
                    "f {f}, s_raw {sr}: ds/ds_raw {d} vs {dwant}"
                );
                // exp(s), from either function, is exp of the returned s.
                assert_eq!(e.to_bits(), glow_scale(sr, f).1.to_bits());
                assert!(
                    (f64::from(e) - want.exp()).abs() < 2e-7,
                    "f {f}, s_raw {sr}: {e}"
                );
            }
        }
    }

    #[test]
    fn the_floor_bounds_the_scale_for_every_input() {
        for &f in &[1.0f32 / 64.0, 0.0625, 0.5] {
            let lo = f.ln();
            for &sr in &[
                f32::NEG_INFINITY,
                -f32::MAX,
                -1e30,
                -200.0,
                -20.0,
                0.0,
                20.0,
                f32::MAX,
                f32::INFINITY,
            ] {
                let s = glow_log_scale(sr, f);
                // The inverse multiplies by exp(-s) <= 1/f (up to the last ulp).
                assert!(s <= 0.0 && s >= lo - 1e-6, "f {f}, s_raw {sr}: s {s}");
                assert!(s.exp() >= f * (1.0 - 1e-6), "f {f}, s_raw {sr}");
                let (e, d) = glow_scale_grad(sr, f);
                assert!(
                    e >= f && d.is_finite() && d >= 0.0,
                    "f {f}, s_raw {sr}: {d}"
                );
            }
        }
        // Without a floor the scale of a very negative s_raw is ~exp(s_raw): unbounded.
        assert!(glow_log_scale(-200.0, 0.0) < -190.0);
    }

    #[test]
    fn a_zero_floor_is_exactly_the_unfloored_sigmoid() {
        for &sr in &[-50.0f32, -3.0, 0.0, 1.5, 30.0] {
            let (s, e) = glow_scale(sr, 0.0);
            assert_eq!(s.to_bits(), log_sigmoid(sr + 2.0).to_bits());
            assert_eq!(e.to_bits(), libm::expf(s).to_bits());
            let (e2, d) = glow_scale_grad(sr, 0.0);
            assert_eq!(
                (e2.to_bits(), d.to_bits()),
                (e.to_bits(), (1.0 - e).to_bits())
            );
        }
    }

    #[test]
    fn log_sigmoid_matches_the_definition_and_never_overflows() {
        for &x in &[-20.0f32, -3.0, -0.5, 0.0, 0.7, 2.0, 9.0, 20.0] {
            let want = -(1.0 + (-f64::from(x)).exp()).ln();
            let got = f64::from(log_sigmoid(x));
            assert!(
                (got - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{x}: {got} vs {want}"
            );
        }
        // The naive ln(1 / (1 + e^-x)) overflows e^-x here; the stable form does not.
        assert_eq!(log_sigmoid(-200.0), -200.0);
        assert_eq!(log_sigmoid(200.0), 0.0);
        assert!(log_sigmoid(f32::MAX).is_finite() && log_sigmoid(-f32::MAX).is_finite());
    }
}
