//! The whole flow: pixels <-> dequantized `u` <-> logit <-> squeeze <-> levels of flow steps
//! <-> `z`.
//!
//! Direction names follow the math: *forward* maps an image to its latent (density
//! evaluation), *inverse* maps a latent to an image (sampling).
//!
//! ## Levels (multi-scale) and Glow steps
//!
//! Forward, after the logit and the optional squeeze, level `l = 0, 1, ..., L-1` runs on a
//! state of shape `(C_l, H_l, W_l)` ([`Arch::level_shape`]):
//!
//! 1. for `l > 0`, a 2x2 squeeze `(C, H, W) -> (4C, H/2, W/2)` (a permutation, log-det 0);
//! 2. its steps in order. A Glow step is ActNorm `y = x exp(logs) + bias` (per channel,
//!    log-det `+= H_l W_l sum(logs)`), then the invertible 1x1 convolution `y = W x` (per
//!    pixel, log-det `+= H_l W_l ln|det W|`), then the affine coupling; a RealNVP step is the
//!    coupling alone. Every step's sizes are the level's ([`Arch::step_arch`]);
//! 3. for `l < L-1`, a split: the **odd** channels `1, 3, 5, ...` leave the flow as level
//!    `l`'s latent, the **even** channels `0, 2, 4, ...` continue to level `l+1` (a
//!    permutation, log-det 0).
//!
//! The latent `z` (image-sized) is `[latent_0 | latent_1 | ... | last level's state]`, each
//! block in its level's `C x H x W` order, and all of it is standard normal. The pass runs in
//! place: the state of level `l` occupies `z[o_l .. o_l + n_l]` with `o_0 = 0`,
//! `n_0 = C*H*W`; a split writes the odd channels to the first half and the even ones to the
//! second, and the next level continues there (`o_{l+1} = o_l + n_l / 2`,
//! `n_{l+1} = n_l / 2`). The inverse undoes every step in reverse order: from the last level
//! to the first, merge (channel `2k` <- state channel `k`, `2k+1` <- latent channel `k`),
//! coupling inverses, `W^-1` (stored in the blob, so no matrix is inverted on the device),
//! ActNorm inverse `x = (y - bias) exp(-logs)`, unsqueeze. With one level and no Glow steps
//! this is exactly the seed's RealNVP, bit for bit.
//!
//! ## The learned prior
//!
//! With [`Arch::prior`], every level `l < L-1` ends (after its steps, before the split) with
//! the split prior, an affine coupling of the odd channels on the even ones through one 3x3
//! convolution ([`crate::prior`]), and the last level ends with the top prior, a per-channel
//! ActNorm. The inverse runs them first in their level: the top ActNorm's inverse before the
//! last level's steps; merge, then the split prior's inverse, before a split level's.

use crate::arch::{image_len, Arch, ScratchLayout};
use crate::base::{log_normal, Normal, Pcg32, Rng};
use crate::conv::{Conv, INTERNAL};
use crate::coupling::{self, Work};
use crate::error::{Buffer, Error};
use crate::preprocess::{dequantize, logit_forward, logit_inverse, quantize};
use crate::prior;
use crate::squeeze::{squeeze, unsqueeze};
use crate::weights::{Model, Tensor};

/// The scratch split into its regions.
struct Regions<'s> {
    state: &'s mut [f32],
    temp: &'s mut [f32],
    work: Work<'s>,
}

fn split<'s>(arch: &Arch, scratch: &'s mut [f32]) -> Result<Regions<'s>, Error> {
    let l = ScratchLayout::of(arch);
    if scratch.len() < l.total() {
        return Err(Error::BufferSize {
            buffer: Buffer::Scratch,
            needed: l.total(),
            got: scratch.len(),
        });
    }
    let (state, rest) = scratch.split_at_mut_checked(l.state).ok_or(INTERNAL)?;
    let (temp, rest) = rest.split_at_mut_checked(l.temp).ok_or(INTERNAL)?;
    let (cnn_in, rest) = rest.split_at_mut_checked(l.cnn_in).ok_or(INTERNAL)?;
    let (region_a, rest) = rest.split_at_mut_checked(l.region_a).ok_or(INTERNAL)?;
    let region_b = rest.get_mut(..l.region_b).ok_or(INTERNAL)?;
    Ok(Regions {
        state,
        temp,
        work: Work {
            cnn_in,
            region_a,
            region_b,
        },
    })
}

fn check_image(arch: &Arch, buffer: Buffer, len: usize) -> Result<(), Error> {
    if len == image_len(arch) {
        Ok(())
    } else {
        Err(Error::BufferSize {
            buffer,
            needed: image_len(arch),
            got: len,
        })
    }
}

/// The first `len` elements of `buf`, or an internal error (the layout sized them).
fn prefix(buf: &mut [f32], len: usize) -> Result<&mut [f32], Error> {
    buf.get_mut(..len).ok_or(INTERNAL)
}

/// A level's plane `H * W`, which `chunks_exact` needs non-zero.
fn level_plane(view: &Arch) -> Result<usize, Error> {
    match view.plane() {
        0 => Err(INTERNAL),
        p => Ok(p),
    }
}

/// ActNorm forward on `x` (`C` planes of `plane`): `y[c] = x[c] exp(logs[c]) + bias[c]`.
/// Its Jacobian is diagonal with `exp(logs[c])` repeated `plane` times per channel, so the
/// log-det is `plane * sum(logs)`. A Glow step's ActNorm, and the learned prior's top one.
fn actnorm_forward(
    logs: Tensor<'_>,
    bias: Tensor<'_>,
    x: &mut [f32],
    plane: usize,
) -> Result<f32, Error> {
    let mut sum = 0.0f32;
    for ((xp, logs), bias) in x.chunks_exact_mut(plane).zip(logs.iter()).zip(bias.iter()) {
        let scale = libm::expf(logs);
        for v in xp {
            *v = *v * scale + bias;
        }
        sum += logs;
    }
    Ok(plane as f32 * sum)
}

/// ActNorm inverse on `y`: `x[c] = (y[c] - bias[c]) exp(-logs[c])`.
fn actnorm_inverse(logs: Tensor<'_>, bias: Tensor<'_>, y: &mut [f32], plane: usize) {
    for ((yp, logs), bias) in y.chunks_exact_mut(plane).zip(logs.iter()).zip(bias.iter()) {
        let scale = libm::expf(-logs);
        for v in yp {
            *v = (*v - bias) * scale;
        }
    }
}

/// The 1x1 convolution `x <- M x` per pixel, `M` a `C x C` row-major matrix (`W` forward,
/// `W^-1` inverse): `out[o, p] = sum_i M[o][i] x[i, p]`, through `temp` (`x.len()` long).
/// It runs on the convolution's 1x1 path ([`Conv::forward_unbiased`]), over the plane as one
/// row.
fn mix(m: Tensor<'_>, x: &mut [f32], temp: &mut [f32], plane: usize) -> Result<(), Error> {
    let temp = prefix(temp, x.len())?;
    let channels = x.len().checked_div(plane).ok_or(INTERNAL)?;
    let conv = Conv {
        cin: channels,
        cout: channels,
        height: 1,
        width: plane,
        kernel: 1,
    };
    conv.forward_unbiased(x, m, temp)?;
    x.copy_from_slice(temp);
    Ok(())
}

/// The split at the end of a level, on the state `x` (`C` planes, `C` even): the odd
/// channels move to the first half (the level's latent), the even ones to the second half
/// (what continues). A permutation: log-det 0.
fn split_off(x: &mut [f32], temp: &mut [f32], plane: usize) -> Result<(), Error> {
    let temp = prefix(temp, x.len())?;
    temp.copy_from_slice(x);
    let half = x.len().checked_div(2).ok_or(INTERNAL)?;
    let (latent, kept) = x.split_at_mut_checked(half).ok_or(INTERNAL)?;
    let channels = temp.chunks_exact(plane);
    for (dst, src) in latent
        .chunks_exact_mut(plane)
        .zip(channels.clone().skip(1).step_by(2))
    {
        dst.copy_from_slice(src);
    }
    for (dst, src) in kept.chunks_exact_mut(plane).zip(channels.step_by(2)) {
        dst.copy_from_slice(src);
    }
    Ok(())
}

/// Inverse of [`split_off`]: channel `2k` <- second-half channel `k` (the continuing state),
/// channel `2k + 1` <- first-half channel `k` (the latent).
fn merge(x: &mut [f32], temp: &mut [f32], plane: usize) -> Result<(), Error> {
    let temp = prefix(temp, x.len())?;
    let half = x.len().checked_div(2).ok_or(INTERNAL)?;
    let (latent, kept) = x.split_at_checked(half).ok_or(INTERNAL)?;
    let mut pairs = temp.chunks_exact_mut(plane);
    for (even, odd) in kept.chunks_exact(plane).zip(latent.chunks_exact(plane)) {
        pairs.next().ok_or(INTERNAL)?.copy_from_slice(even);
        pairs.next().ok_or(INTERNAL)?.copy_from_slice(odd);
    }
    x.copy_from_slice(temp);
    Ok(())
}

/// The 2x2 squeeze that starts level `l > 0`, on its state `x` (shape `(C/4, 2H, 2W)` of the
/// level's `(C, H, W)`), in place through `temp`.
fn level_squeeze(view: &Arch, x: &mut [f32], temp: &mut [f32], undo: bool) -> Result<(), Error> {
    let (c, h, w) = view.flow_shape();
    let (c, h, w) = (c / 4, h.saturating_mul(2), w.saturating_mul(2));
    let temp = prefix(temp, x.len())?;
    if undo {
        unsqueeze(c, h, w, x, temp)?;
    } else {
        squeeze(c, h, w, x, temp)?;
    }
    x.copy_from_slice(temp);
    Ok(())
}

/// Image -> latent on `x` in place, with the scratch already split.
fn run_forward(
    model: &Model<'_>,
    x: &mut [f32],
    temp: &mut [f32],
    work: &mut Work<'_>,
) -> Result<f32, Error> {
    let arch = model.arch();
    let mut log_det = logit_forward(x, arch.logit_alpha)?;
    if arch.squeeze {
        squeeze(arch.channels, arch.height, arch.width, x, temp)?;
        x.copy_from_slice(temp);
    }
    let per_level = arch.steps_per_level();
    // The current level's state: the tail of `x` from `offset`.
    let mut offset = 0usize;
    for l in 0..arch.levels {
        let view = arch.level(l);
        let plane = level_plane(&view)?;
        let state = x
            .get_mut(offset..)
            .and_then(|s| s.get_mut(..view.dim()))
            .ok_or(INTERNAL)?;
        if l > 0 {
            level_squeeze(&view, state, temp, false)?;
        }
        let first = l.checked_mul(per_level).ok_or(INTERNAL)?;
        for i in first..first.saturating_add(per_level) {
            if arch.glow {
                let g = model.glow_step(i)?;
                log_det += actnorm_forward(g.logs, g.bias, state, plane)?;
                mix(g.w, state, temp, plane)?;
                let ld = g.logdet.iter().next().ok_or(INTERNAL)?;
                log_det += plane as f32 * ld;
            }
            let cw = model.coupling(i)?;
            log_det += coupling::forward(&view, &cw, state, work)?;
        }
        if l.saturating_add(1) < arch.levels {
            if arch.prior {
                log_det += prior::forward(&view, &model.prior(l)?, state, work)?;
            }
            split_off(state, temp, plane)?;
            offset = offset.saturating_add(view.dim() / 2);
        } else if arch.prior {
            let top = model.top()?;
            log_det += actnorm_forward(top.logs, top.bias, state, plane)?;
        }
    }
    Ok(log_det)
}

/// Latent -> image on `z` in place (up to the logit), with the scratch already split.
fn run_inverse(
    model: &Model<'_>,
    z: &mut [f32],
    temp: &mut [f32],
    work: &mut Work<'_>,
) -> Result<(), Error> {
    let arch = model.arch();
    let per_level = arch.steps_per_level();
    // Level l's state starts at o_l = n_0 - n_l (each earlier level left half its state).
    for l in (0..arch.levels).rev() {
        let view = arch.level(l);
        let plane = level_plane(&view)?;
        let offset = arch.dim().checked_sub(view.dim()).ok_or(INTERNAL)?;
        let state = z
            .get_mut(offset..)
            .and_then(|s| s.get_mut(..view.dim()))
            .ok_or(INTERNAL)?;
        if l.saturating_add(1) < arch.levels {
            merge(state, temp, plane)?;
            if arch.prior {
                prior::inverse(&view, &model.prior(l)?, state, work)?;
            }
        } else if arch.prior {
            let top = model.top()?;
            actnorm_inverse(top.logs, top.bias, state, plane);
        }
        let first = l.checked_mul(per_level).ok_or(INTERNAL)?;
        for i in (first..first.saturating_add(per_level)).rev() {
            let cw = model.coupling(i)?;
            coupling::inverse(&view, &cw, state, work)?;
            if arch.glow {
                let g = model.glow_step(i)?;
                mix(g.w_inv, state, temp, plane)?;
                actnorm_inverse(g.logs, g.bias, state, plane);
            }
        }
        if l > 0 {
            level_squeeze(&view, state, temp, true)?;
        }
    }
    if arch.squeeze {
        unsqueeze(arch.channels, arch.height, arch.width, z, temp)?;
        z.copy_from_slice(temp);
    }
    Ok(())
}

/// Maps dequantized values `x = u` in `[0, 1]` (image layout `C x H x W`) to the latent `z`
/// (flow layout: the levels' latents then the last level's state, see the module docs) in
/// place. Returns the total log-det `ln|det dz/du|`: logit plus every step's (ActNorm, 1x1
/// conv and coupling).
pub fn forward(model: &Model<'_>, x: &mut [f32], scratch: &mut [f32]) -> Result<f32, Error> {
    check_image(model.arch(), Buffer::Input, x.len())?;
    let r = split(model.arch(), scratch)?;
    let mut work = r.work;
    run_forward(model, x, r.temp, &mut work)
}

/// Maps a latent `z` (flow layout) to dequantized values `u` (image layout) in place: every
/// level from the last to the first (merge, the steps' inverses in reverse order, unsqueeze),
/// the optional unsqueeze, inverse logit.
pub fn inverse(model: &Model<'_>, z: &mut [f32], scratch: &mut [f32]) -> Result<(), Error> {
    let arch = model.arch();
    check_image(arch, Buffer::Input, z.len())?;
    let r = split(arch, scratch)?;
    let mut work = r.work;
    run_inverse(model, z, r.temp, &mut work)?;
    logit_inverse(z, arch.logit_alpha)
}

/// `log p(u)` in nats for dequantized values `u` in `[0, 1]` (image layout).
pub fn log_prob_u(model: &Model<'_>, u: &[f32], scratch: &mut [f32]) -> Result<f32, Error> {
    let arch = model.arch();
    check_image(arch, Buffer::Input, u.len())?;
    let r = split(arch, scratch)?;
    let mut work = r.work;
    let state = r.state.get_mut(..u.len()).ok_or(INTERNAL)?;
    for (i, (s, v)) in state.iter_mut().zip(u).enumerate() {
        if !v.is_finite() {
            return Err(Error::InvalidInput { index: i });
        }
        *s = *v;
    }
    let log_det = run_forward(model, state, r.temp, &mut work)?;
    Ok(log_normal(state) + log_det)
}

/// `log p(u)` in nats of an image of pixels, dequantized at the midpoint `v = 0.5`
/// (deterministic), so `bits_per_dim(arch, log_prob)` is its bits/dim.
pub fn log_prob(model: &Model<'_>, pixels: &[u8], scratch: &mut [f32]) -> Result<f32, Error> {
    let arch = model.arch();
    check_image(arch, Buffer::Input, pixels.len())?;
    let r = split(arch, scratch)?;
    let mut work = r.work;
    let state = r.state.get_mut(..pixels.len()).ok_or(INTERNAL)?;
    dequantize(pixels, arch.bits, |_| 0.5, state)?;
    let log_det = run_forward(model, state, r.temp, &mut work)?;
    Ok(log_normal(state) + log_det)
}

/// Bits per dimension of an image with log-density `log_prob` (nats, of `u`):
/// `-log p(u) / (D ln 2) + n`, where `n` is the pixel bit depth (the dequantization term).
pub fn bits_per_dim(arch: &Arch, log_prob: f32) -> f32 {
    -log_prob / (arch.dim() as f32 * core::f32::consts::LN_2) + arch.bits as f32
}

/// Draws one image: `z ~ N(0, temperature^2 I)` from `rng`, then [`inverse`]. Writes the
/// dequantized values to `values` (in `[0, 1]`) and the quantised pixels to `pixels`.
pub fn sample_with<R: Rng>(
    model: &Model<'_>,
    rng: R,
    temperature: f32,
    scratch: &mut [f32],
    pixels: &mut [u8],
    values: &mut [f32],
) -> Result<(), Error> {
    let arch = *model.arch();
    check_image(&arch, Buffer::Output, pixels.len())?;
    check_image(&arch, Buffer::Output, values.len())?;
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::InvalidArgument(
            "temperature must be finite and >= 0",
        ));
    }
    Normal::new(rng).fill(values, temperature)?;
    inverse(model, values, scratch)?;
    quantize(values, arch.bits, pixels)
}

/// Draws one image with the kernel's PCG32 seeded by `seed` (see [`sample_with`]). The same
/// seed gives a bit-identical image on every target with IEEE f32.
pub fn sample(
    model: &Model<'_>,
    seed: u64,
    temperature: f32,
    scratch: &mut [f32],
    pixels: &mut [u8],
    values: &mut [f32],
) -> Result<(), Error> {
    sample_with(
        model,
        Pcg32::new(seed),
        temperature,
        scratch,
        pixels,
        values,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{alternating_masks, Mask};
    use crate::scratch_len;
    use crate::squeeze::squeeze;
    use crate::testutil::{blob, random_params, MNIST_OR_MINI};
    use crate::weights::DType;
    use std::vec::Vec;

    /// A small model: 1x4x4 squeezed to 4x2x2, or `mask` couplings on 2x4x4 without squeeze.
    fn tiny(squeeze: bool, first: Mask, couplings: usize) -> Arch {
        Arch {
            channels: if squeeze { 1 } else { 2 },
            height: 4,
            width: 4,
            squeeze,
            levels: 1,
            glow: false,
            couplings,
            masks: alternating_masks(first),
            kernels: [3, 1, 3],
            hidden: [4, 6],
            bits: 8,
            logit_alpha: 0.05,
            prior: false,
            scale_floor: 0.0,
        }
    }

    /// log|det| of a dense n x n matrix by Gaussian elimination with partial pivoting (f64).
    fn log_abs_det(mut a: Vec<f64>, n: usize) -> f64 {
        let mut sum = 0.0;
        for col in 0..n {
            let piv = (col..n)
                .max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))
                .unwrap();
            for k in 0..n {
                a.swap(col * n + k, piv * n + k);
            }
            let d = a[col * n + col];
            sum += d.abs().ln();
            for r in col + 1..n {
                let f = a[r * n + col] / d;
                for k in col..n {
                    a[r * n + k] -= f * a[col * n + k];
                }
            }
        }
        sum
    }

    /// log|det J| of the flow's u -> z at `u` from its central-difference Jacobian (f64).
    /// eps 2e-3: truncation error ~eps^2 * |f'''| ~ 1e-5, rounding ~ 1e-7 / eps ~ 5e-5,
    /// relative to entries of order 1..10.
    fn brute_log_det(model: &Model<'_>, u: &[f32], scratch: &mut [f32]) -> f64 {
        let n = u.len();
        let eps = 2e-3f32;
        let mut jac = std::vec![0f64; n * n];
        for j in 0..n {
            let mut plus = u.to_vec();
            let mut minus = u.to_vec();
            plus[j] += eps;
            minus[j] -= eps;
            forward(model, &mut plus, scratch).unwrap();
            forward(model, &mut minus, scratch).unwrap();
            for i in 0..n {
                jac[i * n + j] = (plus[i] as f64 - minus[i] as f64) / (2.0 * eps as f64);
            }
        }
        log_abs_det(jac, n)
    }

    /// The flow's log-det equals log|det J| of the brute-force (central-difference) Jacobian
    /// of u -> z. Covers logit, squeeze and channel and checkerboard couplings together.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "2n+1 full forward passes for each of 3 models: many minutes under Miri; the \
                  same models' paths run in every_coupling_contributes_its_log_det and golden"
    )]
    fn log_det_equals_brute_force_jacobian() {
        for (arch, seed) in [
            (tiny(true, Mask::ChannelEven, 4), 1),
            (tiny(false, Mask::CheckerEven, 3), 2),
            (tiny(false, Mask::ChannelOdd, 2), 3),
        ] {
            let params = random_params(&arch, seed, 1.5);
            let b = blob(&arch, DType::F32, &params);
            let model = Model::from_blob(&b).unwrap();
            let n = arch.dim();
            let mut scratch = std::vec![0f32; scratch_len(&arch)];
            let u: Vec<f32> = (0..n)
                .map(|i| 0.2 + 0.6 * ((i * 7919) % 97) as f32 / 97.0)
                .collect();
            let mut z = u.clone();
            let log_det = forward(&model, &mut z, &mut scratch).unwrap();
            let brute = brute_log_det(&model, &u, &mut scratch);
            // Per-entry relative error ~1e-4 over n = 16..32 dims: a few 1e-3 in the sum.
            assert!(
                (brute - log_det as f64).abs() < 1e-2,
                "{arch:?}: brute {brute} vs flow {log_det}"
            );
        }
    }

    /// Central-difference Jacobian of an elementwise or permuting map `f` at `x` (f64).
    fn jacobian(x: &[f32], eps: f32, f: impl Fn(&mut [f32])) -> Vec<f64> {
        let n = x.len();
        let mut jac = std::vec![0f64; n * n];
        for j in 0..n {
            let (mut p, mut m) = (x.to_vec(), x.to_vec());
            p[j] += eps;
            m[j] -= eps;
            f(&mut p);
            f(&mut m);
            for i in 0..n {
                jac[i * n + j] = (f64::from(p[i]) - f64::from(m[i])) / (2.0 * f64::from(eps));
            }
        }
        jac
    }

    /// The logit's log-det alone equals log|det J|.
    #[test]
    fn logit_log_det_equals_brute_force_jacobian() {
        let u: Vec<f32> = (0..12).map(|i| 0.03 + 0.08 * i as f32).collect();
        for alpha in [0.05f32, 0.2] {
            let mut y = u.clone();
            let ld = crate::preprocess::logit_forward(&mut y, alpha).unwrap();
            let jac = jacobian(&u, 1e-3, |v| {
                crate::preprocess::logit_forward(v, alpha).unwrap();
            });
            let brute = log_abs_det(jac, u.len());
            // Diagonal entries ~1..30 with relative FD error ~1e-4 each.
            assert!(
                (brute - f64::from(ld)).abs() < 5e-3,
                "alpha {alpha}: {brute} vs {ld}"
            );
        }
    }

    /// Squeeze is a permutation: its Jacobian is a 0/1 matrix with one 1 per row and column,
    /// so log|det J| = 0.
    #[test]
    fn squeeze_jacobian_is_a_permutation() {
        let x: Vec<f32> = (0..2 * 4 * 6).map(|i| i as f32).collect();
        let jac = jacobian(&x, 0.5, |v| {
            let mut out = std::vec![0f32; v.len()];
            crate::squeeze::squeeze(2, 4, 6, v, &mut out).unwrap();
            v.copy_from_slice(&out);
        });
        let n = x.len();
        for i in 0..n {
            let row = &jac[i * n..(i + 1) * n];
            assert_eq!(row.iter().filter(|&&v| v == 1.0).count(), 1);
            assert_eq!(row.iter().filter(|&&v| v == 0.0).count(), n - 1);
        }
        assert!(log_abs_det(jac, n).abs() < 1e-12);
    }

    /// Coupling log-dets are not all dropped (the seed's `(1 - mask_type)` bug): with the
    /// logit excluded, the couplings' total matches sum(s) of *every* coupling.
    #[test]
    fn every_coupling_contributes_its_log_det() {
        let arch = tiny(true, Mask::ChannelEven, 2);
        let params = random_params(&arch, 9, 1.5);
        let b = blob(&arch, DType::F32, &params);
        let model = Model::from_blob(&b).unwrap();
        let mut scratch = std::vec![0f32; scratch_len(&arch)];
        let mut x: Vec<f32> = (0..16).map(|i| (i as f32 - 8.0) * 0.2).collect();
        let (_, rest) = scratch.split_at_mut(16);
        let (_, rest) = rest.split_at_mut(16);
        let l = ScratchLayout::of(&arch);
        let (cnn_in, rest) = rest.split_at_mut(l.cnn_in);
        let (region_a, region_b) = rest.split_at_mut(l.region_a);
        let mut work = Work {
            cnn_in,
            region_a,
            region_b,
        };
        let d0 = coupling::forward(&arch, &model.coupling(0).unwrap(), &mut x, &mut work).unwrap();
        let d1 = coupling::forward(&arch, &model.coupling(1).unwrap(), &mut x, &mut work).unwrap();
        assert!(d0.abs() > 1e-3 && d1.abs() > 1e-3, "{d0} {d1}");
        // Inverting coupling 1 then 0 restores x exactly up to rounding.
        coupling::inverse(&arch, &model.coupling(1).unwrap(), &mut x, &mut work).unwrap();
        coupling::inverse(&arch, &model.coupling(0).unwrap(), &mut x, &mut work).unwrap();
        for (i, v) in x.iter().enumerate() {
            assert!((v - (i as f32 - 8.0) * 0.2).abs() < 1e-5);
        }
    }

    /// The MNIST preset natively; its 4x4, 2-coupling miniature under Miri.
    #[test]
    fn mnist_preset_round_trips_and_samples_deterministically() {
        const MNIST: Arch = MNIST_OR_MINI;
        let params = random_params(&MNIST, 5, 1.0);
        for dtype in [DType::F32, DType::F16] {
            let b = blob(&MNIST, dtype, &params);
            let model = Model::from_blob(&b).unwrap();
            let mut scratch = std::vec![0f32; scratch_len(&MNIST)];
            const N: usize = image_len(&MNIST);
            let (mut p1, mut v1) = ([0u8; N], [0f32; N]);
            let (mut p2, mut v2) = ([0u8; N], [0f32; N]);
            sample(&model, 42, 0.8, &mut scratch, &mut p1, &mut v1).unwrap();
            sample(&model, 42, 0.8, &mut scratch, &mut p2, &mut v2).unwrap();
            assert_eq!(v1.map(f32::to_bits), v2.map(f32::to_bits));
            sample(&model, 43, 0.8, &mut scratch, &mut p2, &mut v2).unwrap();
            assert_ne!(p1, p2);
            let lp = log_prob(&model, &p1, &mut scratch).unwrap();
            let bpd = bits_per_dim(&MNIST, lp);
            assert!(bpd.is_finite() && bpd > 0.0, "{bpd}");
            // u -> z -> u
            let mut x: Vec<f32> = (0..N)
                .map(|i| ((i * 37) % 256) as f32 / 256.0 + 0.001)
                .collect();
            let orig = x.clone();
            forward(&model, &mut x, &mut scratch).unwrap();
            inverse(&model, &mut x, &mut scratch).unwrap();
            for (a, e) in x.iter().zip(&orig) {
                assert!((a - e).abs() < 1e-4, "{a} vs {e}");
            }
        }
    }

    #[test]
    fn bad_buffers_and_arguments_are_errors() {
        let arch = tiny(true, Mask::ChannelEven, 2);
        let b = blob(&arch, DType::F32, &random_params(&arch, 1, 1.0));
        let model = Model::from_blob(&b).unwrap();
        let mut scratch = std::vec![0f32; scratch_len(&arch)];
        let (mut p, mut v) = ([0u8; 16], [0f32; 16]);
        let short = scratch.len() - 1;
        assert!(matches!(
            sample(&model, 1, 1.0, &mut scratch[..short], &mut p, &mut v),
            Err(Error::BufferSize {
                buffer: Buffer::Scratch,
                ..
            })
        ));
        assert!(sample(&model, 1, f32::NAN, &mut scratch, &mut p, &mut v).is_err());
        assert!(sample(&model, 1, 1.0, &mut scratch, &mut p[..15], &mut v).is_err());
        assert!(log_prob(&model, &p[..3], &mut scratch).is_err());
        let mut u = [0.5f32; 16];
        u[3] = f32::NAN;
        assert_eq!(
            log_prob_u(&model, &u, &mut scratch),
            Err(Error::InvalidInput { index: 3 })
        );
        u[3] = 1.5;
        assert_eq!(
            log_prob_u(&model, &u, &mut scratch),
            Err(Error::InvalidInput { index: 3 })
        );
    }

    /// Small multi-level architectures: `(name, arch)`. 1x8x8 squeezed to 4x4x4 with 2
    /// levels (4x4x4, then 8x2x2) or 3 levels (then 16x1x1); 2x4x4 unsqueezed with
    /// checkerboard and channel masks over 2 levels (2x4x4, then 4x2x2); each with and
    /// without Glow steps.
    fn multi_level() -> Vec<(&'static str, Arch)> {
        let base = Arch {
            channels: 1,
            height: 8,
            width: 8,
            squeeze: true,
            levels: 2,
            glow: true,
            couplings: 4,
            masks: alternating_masks(Mask::ChannelEven),
            kernels: [3, 1, 3],
            hidden: [4, 6],
            bits: 8,
            logit_alpha: 0.05,
            prior: false,
            scale_floor: crate::GLOW_SCALE_FLOOR,
        };
        let mut checker = Arch {
            channels: 2,
            height: 4,
            width: 4,
            squeeze: false,
            ..base
        };
        checker.masks[..4].copy_from_slice(&[
            Mask::CheckerEven,
            Mask::ChannelOdd,
            Mask::CheckerOdd,
            Mask::ChannelEven,
        ]);
        let three = Arch {
            levels: 3,
            couplings: 6,
            ..base
        };
        let mut v = std::vec![
            ("glow 2 levels", base),
            ("glow 3 levels", three),
            ("glow checker", checker),
        ];
        for (name, a) in [("realnvp 2 levels", base), ("realnvp checker", checker)] {
            v.push((
                name,
                Arch {
                    glow: false,
                    prior: false,
                    scale_floor: 0.0,
                    ..a
                },
            ));
        }
        v.push((
            "glow 1 level",
            Arch {
                levels: 1,
                couplings: 3,
                ..base
            },
        ));
        for (name, a) in &v {
            a.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        v
    }

    /// Input values in (0.2, 0.8), deterministic.
    fn test_u(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| 0.2 + 0.6 * ((i * 7919) % 97) as f32 / 97.0)
            .collect()
    }

    /// The Glow and multi-level log-det equals log|det J| of the brute-force
    /// (central-difference) Jacobian of u -> z: ActNorm, the 1x1 conv (via the stored
    /// `ln|det W|`), squeezes, splits and couplings together.
    #[test]
    #[cfg_attr(miri, ignore = "2n+1 forward passes per model: too slow under Miri")]
    fn glow_multi_level_log_det_equals_brute_force_jacobian() {
        for (seed, (name, arch)) in multi_level().into_iter().enumerate() {
            let (log_det, _) = check_brute(name, &arch, seed as u64 + 20);
            // The Glow terms are really in there: they are not small for these weights.
            std::println!("{name}: log-det {log_det}");
        }
    }

    /// Builds `arch` with random weights (`seed`, scale 1.5) and asserts that its log-det
    /// at `test_u` equals log|det J| of the brute-force Jacobian; returns the log-det and
    /// the weights. n = 32..64 dims with per-entry relative error ~1e-4: a few 1e-3 in
    /// the sum, so the bound is 2e-2.
    fn check_brute(name: &str, arch: &Arch, seed: u64) -> (f32, Vec<f32>) {
        let params = random_params(arch, seed, 1.5);
        let b = blob(arch, DType::F32, &params);
        let model = Model::from_blob(&b).unwrap();
        let mut scratch = std::vec![0f32; scratch_len(arch)];
        let u = test_u(arch.dim());
        let mut z = u.clone();
        let log_det = forward(&model, &mut z, &mut scratch).unwrap();
        let brute = brute_log_det(&model, &u, &mut scratch);
        assert!(
            (brute - log_det as f64).abs() < 2e-2,
            "{name}: brute {brute} vs flow {log_det}"
        );
        (log_det, params)
    }

    /// A naive reference of the multi-level forward pass (plain index arithmetic on Vecs,
    /// the couplings through `coupling::forward` with the level view): the kernel's z
    /// layout [latent_0 | latent_1 | ... | last state] and log-det agree with it.
    #[test]
    fn multi_level_forward_matches_a_naive_reference() {
        // Under Miri: the first multi-level model and the first prior model.
        let n = if cfg!(miri) { 1 } else { 6 };
        let models = multi_level()
            .into_iter()
            .take(n)
            .chain(prior_models().into_iter().take(n));
        for (seed, (name, arch)) in models.enumerate() {
            let params = random_params(&arch, seed as u64 + 40, 1.0);
            let b = blob(&arch, DType::F32, &params);
            let model = Model::from_blob(&b).unwrap();
            let mut scratch = std::vec![0f32; scratch_len(&arch)];
            let u = test_u(arch.dim());
            let mut z = u.clone();
            let log_det = forward(&model, &mut z, &mut scratch).unwrap();

            // Reference.
            let mut x = u.clone();
            let mut ld = crate::preprocess::logit_forward(&mut x, arch.logit_alpha).unwrap();
            if arch.squeeze {
                let mut t = std::vec![0f32; x.len()];
                squeeze(arch.channels, arch.height, arch.width, &x, &mut t).unwrap();
                x = t;
            }
            let l = ScratchLayout::of(&arch);
            let (mut ci, mut ra, mut rb) = (
                std::vec![0f32; l.cnn_in],
                std::vec![0f32; l.region_a],
                std::vec![0f32; l.region_b],
            );
            let mut latents: Vec<f32> = Vec::new();
            let per = arch.steps_per_level();
            for lev in 0..arch.levels {
                let view = arch.level(lev);
                let (c, h, w) = view.flow_shape();
                let p = h * w;
                if lev > 0 {
                    let mut t = std::vec![0f32; x.len()];
                    squeeze(c / 4, 2 * h, 2 * w, &x, &mut t).unwrap();
                    x = t;
                }
                for i in lev * per..(lev + 1) * per {
                    if arch.glow {
                        let g = model.glow_step(i).unwrap();
                        let logs: Vec<f32> = g.logs.iter().collect();
                        let bias: Vec<f32> = g.bias.iter().collect();
                        let wm: Vec<f32> = g.w.iter().collect();
                        for ch in 0..c {
                            for q in 0..p {
                                x[ch * p + q] = x[ch * p + q] * logs[ch].exp() + bias[ch];
                            }
                        }
                        ld += p as f32 * logs.iter().sum::<f32>();
                        let mut y = std::vec![0f32; x.len()];
                        for o in 0..c {
                            for q in 0..p {
                                y[o * p + q] = (0..c).map(|k| wm[o * c + k] * x[k * p + q]).sum();
                            }
                        }
                        x = y;
                        ld += p as f32 * g.logdet.iter().next().unwrap();
                    }
                    let mut work = Work {
                        cnn_in: &mut ci,
                        region_a: &mut ra,
                        region_b: &mut rb,
                    };
                    ld += coupling::forward(&view, &model.coupling(i).unwrap(), &mut x, &mut work)
                        .unwrap();
                }
                if arch.prior && lev + 1 < arch.levels {
                    // Split prior: one 3x3 conv (same padding, bias) of the even channels to
                    // C planes, s_raw then t; odd channel 2j+1 gets x exp(s) + t with
                    // s = scale[j] tanh(s_raw).
                    let pw = model.prior(lev).unwrap();
                    let scale: Vec<f32> = pw.scale.iter().collect();
                    let wt: Vec<f32> = pw.w.iter().collect();
                    let bias: Vec<f32> = pw.b.iter().collect();
                    let half = c / 2;
                    let mut out = std::vec![0f32; c * p];
                    for o in 0..c {
                        for r in 0..h {
                            for q in 0..w {
                                let mut acc = bias[o];
                                for i in 0..half {
                                    for dy in 0..3 {
                                        for dx in 0..3 {
                                            let (y, xx) = (r + dy, q + dx);
                                            if y < 1 || xx < 1 || y > h || xx > w {
                                                continue;
                                            }
                                            let v = x[2 * i * p + (y - 1) * w + (xx - 1)];
                                            acc += wt[((o * half + i) * 3 + dy) * 3 + dx] * v;
                                        }
                                    }
                                }
                                out[o * p + r * w + q] = acc;
                            }
                        }
                    }
                    for j in 0..half {
                        for q in 0..p {
                            let s = scale[j] * out[j * p + q].tanh();
                            let t = out[(half + j) * p + q];
                            let e = &mut x[(2 * j + 1) * p + q];
                            *e = *e * s.exp() + t;
                            ld += s;
                        }
                    }
                }
                if arch.prior && lev + 1 == arch.levels {
                    // Top prior: ActNorm.
                    let top = model.top().unwrap();
                    let logs: Vec<f32> = top.logs.iter().collect();
                    let bias: Vec<f32> = top.bias.iter().collect();
                    for ch in 0..c {
                        for q in 0..p {
                            x[ch * p + q] = x[ch * p + q] * logs[ch].exp() + bias[ch];
                        }
                    }
                    ld += p as f32 * logs.iter().sum::<f32>();
                }
                if lev + 1 < arch.levels {
                    // Odd channels leave, even channels continue.
                    for ch in (1..c).step_by(2) {
                        latents.extend_from_slice(&x[ch * p..(ch + 1) * p]);
                    }
                    x = (0..c)
                        .step_by(2)
                        .flat_map(|ch| x[ch * p..(ch + 1) * p].to_vec())
                        .collect();
                }
            }
            latents.extend_from_slice(&x);
            assert_eq!(latents.len(), z.len());
            for (k, (a, e)) in z.iter().zip(&latents).enumerate() {
                assert!(
                    (a - e).abs() < 1e-4 * (1.0 + e.abs()),
                    "{name} z[{k}]: {a} vs {e}"
                );
            }
            assert!(
                (log_det - ld).abs() < 1e-3 * (1.0 + ld.abs()),
                "{name}: {log_det} vs {ld}"
            );
        }
    }

    /// u -> z -> u and z -> u -> z on every multi-level and Glow model, f32 and f16 blobs
    /// (f16 rounds only the coupling tensors; W and W^-1 stay f32 inverses), and sampling is
    /// deterministic with every pixel in range and a finite log-density.
    #[test]
    fn multi_level_and_glow_models_round_trip() {
        // Under Miri (each pass interpreted): the two-level Glow model only.
        let models = multi_level()
            .into_iter()
            .take(if cfg!(miri) { 1 } else { 6 });
        for (seed, (name, arch)) in models.enumerate() {
            let params = random_params(&arch, seed as u64 + 60, 1.0);
            let dtypes: &[DType] = if cfg!(miri) {
                &[DType::F16]
            } else {
                &[DType::F32, DType::F16]
            };
            for &dtype in dtypes {
                let b = blob(&arch, dtype, &params);
                let model = Model::from_blob(&b).unwrap();
                let mut scratch = std::vec![0f32; scratch_len(&arch)];
                let u = test_u(arch.dim());
                let mut x = u.clone();
                forward(&model, &mut x, &mut scratch).unwrap();
                let z = x.clone();
                inverse(&model, &mut x, &mut scratch).unwrap();
                for (a, e) in x.iter().zip(&u) {
                    assert!((a - e).abs() < 1e-5, "{name} {dtype:?} u: {a} vs {e}");
                }
                let mut y = z.clone();
                inverse(&model, &mut y, &mut scratch).unwrap();
                forward(&model, &mut y, &mut scratch).unwrap();
                for (a, e) in y.iter().zip(&z) {
                    assert!((a - e).abs() < 1e-3, "{name} {dtype:?} z: {a} vs {e}");
                }
                let n = arch.dim();
                let (mut p1, mut v1) = (std::vec![0u8; n], std::vec![0f32; n]);
                let (mut p2, mut v2) = (std::vec![0u8; n], std::vec![0f32; n]);
                sample(&model, 7, 0.9, &mut scratch, &mut p1, &mut v1).unwrap();
                sample(&model, 7, 0.9, &mut scratch, &mut p2, &mut v2).unwrap();
                assert_eq!(p1, p2);
                assert!(v1.iter().zip(&v2).all(|(a, b)| a.to_bits() == b.to_bits()));
                let lp = log_prob(&model, &p1, &mut scratch).unwrap();
                assert!(lp.is_finite(), "{name}: {lp}");
            }
        }
    }

    /// The Glow presets run end to end with their full shapes (random weights).
    #[test]
    #[cfg_attr(miri, ignore = "full-size presets: far too slow under Miri")]
    fn glow_presets_round_trip() {
        for arch in [crate::arch::MNIST_GLOW, crate::arch::COLOR_GLOW] {
            // Gain 0.3: with 24-32 steps, He-scaled random couplings multiply the latent's
            // range by ~e^1.5 per step (|z| ~ 1e4 at gain 1), and the round trip loses
            // digits with it; small CNN outputs keep |s| small as a trained model's are.
            let params = random_params(&arch, 3, 0.3);
            let b = blob(&arch, DType::F16, &params);
            let model = Model::from_blob(&b).unwrap();
            let mut scratch = std::vec![0f32; scratch_len(&arch)];
            let u = test_u(arch.dim());
            let mut x = u.clone();
            let ld = forward(&model, &mut x, &mut scratch).unwrap();
            assert!(ld.is_finite());
            let zmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            inverse(&model, &mut x, &mut scratch).unwrap();
            let err = x
                .iter()
                .zip(&u)
                .fold(0f32, |m, (a, e)| m.max((a - e).abs()));
            std::println!(
                "{}: log-det {ld}, max |z| {zmax}, max u error {err}",
                arch.couplings
            );
            assert!(err < 1e-4, "{err}");
        }
    }

    /// Glow models with the learned prior: 2 and 3 levels squeezed, a 2-level model whose
    /// couplings are all checkerboards (the prior's channel CNN then sizes the scratch), and
    /// one level (only the top prior).
    fn prior_models() -> Vec<(&'static str, Arch)> {
        let with_prior = |a: Arch| Arch { prior: true, ..a };
        let mut v: Vec<(&'static str, Arch)> = multi_level()
            .into_iter()
            .filter(|(_, a)| a.glow)
            .map(|(name, a)| (name, with_prior(a)))
            .collect();
        let mut checker = Arch {
            channels: 2,
            height: 4,
            width: 4,
            squeeze: false,
            ..v[0].1
        };
        checker.masks = alternating_masks(Mask::CheckerEven);
        v.push(("glow checker only", checker));
        for (name, a) in &v {
            assert!(a.prior, "{name}");
            a.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // The checkerboard-only model's couplings need neither the prior's CNN input (the
        // even channels) nor its output (C planes) at its own size: the layout covers them.
        let l = ScratchLayout::of(&checker);
        let (c, h, w) = checker.level_shape(0);
        assert!(l.cnn_in >= c / 2 * h * w && l.region_a >= c * h * w);
        v
    }

    /// The log-det of prior models (random non-zero split and top priors) equals log|det J|
    /// of the brute-force (central-difference) Jacobian of u -> z.
    #[test]
    #[cfg_attr(miri, ignore = "2n+1 forward passes per model: too slow under Miri")]
    fn prior_log_det_equals_brute_force_jacobian() {
        for (seed, (name, arch)) in prior_models().into_iter().enumerate() {
            let (log_det, params) = check_brute(name, &arch, seed as u64 + 80);
            let mut scratch = std::vec![0f32; scratch_len(&arch)];
            let u = test_u(arch.dim());
            // The prior's terms are really in there: without it the log-det differs.
            let bare = Arch {
                prior: false,
                ..arch
            };
            let b0 = blob(&bare, DType::F32, &params[..bare.param_count()]);
            let m0 = Model::from_blob(&b0).unwrap();
            let mut z0 = u.clone();
            let ld0 = forward(&m0, &mut z0, &mut scratch).unwrap();
            assert!((ld0 - log_det).abs() > 1e-2, "{name}: {ld0} vs {log_det}");
            std::println!("{name}: log-det {log_det}, no prior {ld0}");
        }
    }

    /// u -> z -> u and z -> u -> z on prior models with 1, 2 and 3 levels, f32 and f16 blobs
    /// (the prior's tensors stay f32 in both), and sampling is deterministic.
    #[test]
    fn prior_models_round_trip() {
        let models = prior_models()
            .into_iter()
            .take(if cfg!(miri) { 1 } else { 8 });
        for (seed, (name, arch)) in models.enumerate() {
            let params = random_params(&arch, seed as u64 + 90, 1.0);
            for dtype in [DType::F32, DType::F16] {
                let b = blob(&arch, dtype, &params);
                let model = Model::from_blob(&b).unwrap();
                let mut scratch = std::vec![0f32; scratch_len(&arch)];
                let u = test_u(arch.dim());
                let mut x = u.clone();
                let ld = forward(&model, &mut x, &mut scratch).unwrap();
                assert!(ld.is_finite(), "{name} {dtype:?}: {ld}");
                let z = x.clone();
                inverse(&model, &mut x, &mut scratch).unwrap();
                for (a, e) in x.iter().zip(&u) {
                    assert!((a - e).abs() < 1e-5, "{name} {dtype:?} u: {a} vs {e}");
                }
                let mut y = z.clone();
                inverse(&model, &mut y, &mut scratch).unwrap();
                forward(&model, &mut y, &mut scratch).unwrap();
                for (a, e) in y.iter().zip(&z) {
                    assert!(
                        (a - e).abs() < 1e-3 * (1.0 + e.abs()),
                        "{name} {dtype:?} z: {a} vs {e}"
                    );
                }
                let n = arch.dim();
                let (mut p1, mut v1) = (std::vec![0u8; n], std::vec![0f32; n]);
                let (mut p2, mut v2) = (std::vec![0u8; n], std::vec![0f32; n]);
                sample(&model, 7, 0.9, &mut scratch, &mut p1, &mut v1).unwrap();
                sample(&model, 7, 0.9, &mut scratch, &mut p2, &mut v2).unwrap();
                assert!(v1.iter().zip(&v2).all(|(a, b)| a.to_bits() == b.to_bits()));
                let lp = log_prob(&model, &p1, &mut scratch).unwrap();
                assert!(lp.is_finite(), "{name}: {lp}");
            }
        }
    }

    /// With zero prior convolutions and biases and a zero top ActNorm (the prior's start), a
    /// prior model computes bit for bit what the same model without the prior does: z, the
    /// log-det, and the inverse. (The split prior's scale tensor is random: tanh(0) = 0.)
    #[test]
    fn a_zero_prior_is_the_identity() {
        let models = prior_models()
            .into_iter()
            .take(if cfg!(miri) { 1 } else { 8 });
        for (seed, (name, arch)) in models.enumerate() {
            let mut params = random_params(&arch, seed as u64 + 100, 1.0);
            let bare = Arch {
                prior: false,
                ..arch
            };
            let start = bare.param_count();
            assert_eq!(start, arch.prior_offset(0));
            // Zero everything but the split priors' scales.
            let mut at = start;
            for l in 0..arch.levels {
                let view = arch.level(l);
                for &kind in arch.prior_tensors(l) {
                    let n = view.tensor_len(Mask::ChannelEven, kind);
                    if kind != crate::arch::TensorKind::PriorScale {
                        params[at..at + n].fill(0.0);
                    } else {
                        assert!(params[at..at + n].iter().all(|&v| v != 0.0));
                    }
                    at += n;
                }
            }
            assert_eq!(at, arch.param_count());
            for dtype in [DType::F32, DType::F16] {
                let b = blob(&arch, dtype, &params);
                let b0 = blob(&bare, dtype, &params[..start]);
                let (m, m0) = (
                    Model::from_blob(&b).unwrap(),
                    Model::from_blob(&b0).unwrap(),
                );
                let mut scratch = std::vec![0f32; scratch_len(&arch)];
                let u = test_u(arch.dim());
                let (mut z, mut z0) = (u.clone(), u.clone());
                let ld = forward(&m, &mut z, &mut scratch).unwrap();
                let ld0 = forward(&m0, &mut z0, &mut scratch).unwrap();
                assert_eq!(ld.to_bits(), ld0.to_bits(), "{name} {dtype:?}");
                assert!(
                    z.iter().zip(&z0).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} {dtype:?}"
                );
                inverse(&m, &mut z, &mut scratch).unwrap();
                inverse(&m0, &mut z0, &mut scratch).unwrap();
                assert!(
                    z.iter().zip(&z0).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name} {dtype:?}"
                );
            }
        }
    }
}
