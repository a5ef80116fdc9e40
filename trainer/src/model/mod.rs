//! The flow model on a [`Backend`]: parameters, the batched forward pass (image -> latent,
//! with log-likelihood), its backward pass, and the inverse (latent -> image) for sampling.
//!
//! The math is the kernel's (`clayflow_kernel`), batched: logit, optional squeeze, then each
//! coupling `x_b <- x_b exp(s) + t` with `s = scale * tanh(s_raw)` (Glow:
//! `exp(s) = f + (1 - f) sigmoid(s_raw + 2)`, floor `f`) and `(s_raw, t)` from a three-conv CNN of the kept half.
//! The loss is the mean bits/dim, `-log p(u) / (D ln 2) + bits`, and its gradient flows back
//! through every op.
//!
//! Everything stays on the backend's device: a training step uploads the batch into a
//! buffer that persists across steps and downloads the loss terms once (the per-image sums
//! of squares and log-dets, together); the Glow layers' parameters (ActNorm, the 1x1
//! convolutions' LU factors) are used and differentiated where they live.
//!
//! The model is split by what each part holds: this module has [`Flow`] and its public API,
//! the parameter layout and the small shape helpers; `init.rs` the fresh parameters,
//! `workspace.rs` the per-batch-size buffers, and `forward.rs`, `backward.rs` and
//! `inverse.rs` the three passes.

mod backward;
mod forward;
mod init;
mod inverse;
mod prior;
mod workspace;

pub use init::init_params;

use crate::backend::{
    Backend, BackendError, Buffer, ConvShape, CouplingScale, LuFactors, Result, Shape4,
};
use crate::config::{is_fixed, tensor_specs, tensors_per_step};
use crate::invconv;
use clayflow_kernel::arch::COUPLING_TENSORS;
use clayflow_kernel::{Arch, Mask};
use std::f64::consts::LN_2;
use std::sync::Arc;
use workspace::Workspace;

/// Result of one forward pass over a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchStats {
    /// Per-image `log p(u)` in nats.
    pub log_prob: Vec<f64>,
    /// Mean bits/dim over the batch (the training loss).
    pub mean_bpd: f64,
}

/// A flow model with its parameters on a backend.
#[derive(Debug)]
pub struct Flow {
    backend: Arc<dyn Backend>,
    arch: Arch,
    /// Parameter tensors in checkpoint order (see [`tensor_specs`]).
    pub params: Vec<Buffer>,
    ws: Option<Workspace>,
}

/// Index of the Glow tensors of a step within its `tensors_per_step` slice.
mod slot {
    pub const LOGS: usize = 0;
    pub const BIAS: usize = 1;
    pub const PERM: usize = 2;
    pub const SIGN: usize = 3;
    pub const LOWER: usize = 4;
    pub const UPPER: usize = 5;
    pub const LOG_S: usize = 6;
}

fn size_err(op: &'static str, what: &'static str, expected: usize, got: usize) -> BackendError {
    BackendError::Size {
        op,
        what,
        expected,
        got,
    }
}

fn shape4(batch: usize, (c, h, w): (usize, usize, usize)) -> Shape4 {
    Shape4 {
        batch,
        channels: c,
        height: h,
        width: w,
    }
}

/// The shape of level `l - 1`'s kept half, which the squeeze between levels `l - 1` and `l`
/// maps to level `l`'s state: `(C/2, H, W) -> (2C, H/2, W/2)`.
fn kept_shape(a: &Arch, batch: usize, l: usize) -> Shape4 {
    let (c, h, w) = a.level_shape(l - 1);
    shape4(batch, (c / 2, h, w))
}

/// Split at the end of a level: the odd channels of `state` leave as `latent`, the even ones
/// flow on as `kept`.
fn split(
    b: &dyn Backend,
    fs: Shape4,
    state: &Buffer,
    kept: &mut Buffer,
    latent: &mut Buffer,
) -> Result<()> {
    b.mask_gather(fs, Mask::ChannelOdd, state, latent)?;
    b.mask_gather(fs, Mask::ChannelEven, state, kept)
}

/// Merge, the inverse of [`split`] (and its adjoint, fed gradients): channel `2k` of `state`
/// from `kept[k]`, channel `2k + 1` from `latent[k]`.
fn merge(
    b: &dyn Backend,
    fs: Shape4,
    kept: &Buffer,
    latent: &Buffer,
    state: &mut Buffer,
) -> Result<()> {
    b.fill(state, 0.0)?;
    b.mask_scatter_add(fs, Mask::ChannelOdd, latent, state)?;
    b.mask_scatter_add(fs, Mask::ChannelEven, kept, state)
}

/// A coupling's seven tensors by name (checkpoint order: `scale`, then weight and bias of
/// each of the three convolutions). `T` is `&Buffer` for parameters, `&mut Buffer` for
/// gradients.
struct CouplingTensors<T> {
    scale: T,
    w: [T; 3],
    bias: [T; 3],
}

impl<T> CouplingTensors<T> {
    /// Names the seven tensors, given in checkpoint order.
    fn named([scale, w0, b0, w1, b1, w2, b2]: [T; 7]) -> Self {
        CouplingTensors {
            scale,
            w: [w0, w1, w2],
            bias: [b0, b1, b2],
        }
    }
}

fn seven_err(got: usize) -> BackendError {
    size_err("coupling tensors", "count", COUPLING_TENSORS.len(), got)
}

impl<'a> CouplingTensors<&'a Buffer> {
    fn of(t: &'a [Buffer]) -> Result<Self> {
        let t: &[Buffer; 7] = t.try_into().map_err(|_| seven_err(t.len()))?;
        Ok(Self::named(t.each_ref()))
    }
}

impl<'a> CouplingTensors<&'a mut Buffer> {
    fn of_mut(t: &'a mut [Buffer]) -> Result<Self> {
        let n = t.len();
        let t: &mut [Buffer; 7] = t.try_into().map_err(|_| seven_err(n))?;
        Ok(Self::named(t.each_mut()))
    }
}

/// Per-image `(offset, length)` of each block of the latent `z`: every level's split-off
/// latent, then the last level's state (the kernel's layout).
pub fn latent_blocks(arch: &Arch) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    for l in 0..arch.levels {
        let (c, h, w) = arch.level_shape(l);
        let n = if l + 1 < arch.levels {
            arch.split_channels(l) * h * w
        } else {
            c * h * w
        };
        out.push((at, n));
        at += n;
    }
    out
}

impl Flow {
    /// A model from host parameter tensors (in checkpoint order, shapes from
    /// [`tensor_specs`]).
    pub fn new(backend: Arc<dyn Backend>, arch: Arch, params: &[Vec<f32>]) -> Result<Flow> {
        let specs = tensor_specs(&arch);
        if specs.len() != params.len() {
            return Err(size_err(
                "Flow::new",
                "tensor count",
                specs.len(),
                params.len(),
            ));
        }
        let mut bufs = Vec::with_capacity(params.len());
        for (spec, p) in specs.iter().zip(params) {
            if p.len() != spec.len() {
                return Err(size_err(
                    "Flow::new",
                    "parameter tensor",
                    spec.len(),
                    p.len(),
                ));
            }
            bufs.push(backend.upload(p)?);
        }
        let flow = Flow {
            backend,
            arch,
            params: bufs,
            ws: None,
        };
        if arch.glow {
            // Fail early on factors that do not make an invertible W (bad perm, NaN...).
            for i in 0..arch.couplings {
                flow.invconv_weight(i)?;
            }
        }
        Ok(flow)
    }

    /// The architecture.
    pub fn arch(&self) -> &Arch {
        &self.arch
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The parameters copied to the host, in checkpoint order.
    pub fn params_host(&self) -> Result<Vec<Vec<f32>>> {
        self.params
            .iter()
            .map(|p| self.backend.download(p))
            .collect()
    }

    /// Replaces every parameter from host vectors (same shapes).
    pub fn set_params(&mut self, params: &[Vec<f32>]) -> Result<()> {
        for (dst, src) in self.params.iter_mut().zip(params) {
            let up = self.backend.upload(src)?;
            self.backend.copy(&up, dst)?;
        }
        Ok(())
    }

    /// Zero-filled buffers shaped like the parameters (for gradients and optimiser moments).
    pub fn zeros_like_params(&self) -> Result<Vec<Buffer>> {
        self.params
            .iter()
            .map(|p| self.backend.zeros(p.len()))
            .collect()
    }

    /// Which parameter tensors are trained (false for the 1x1 convolutions' fixed
    /// permutation and signs), in checkpoint order.
    pub fn trainable(&self) -> Vec<bool> {
        tensor_specs(&self.arch)
            .iter()
            .map(|s| !is_fixed(&self.arch, &s.name))
            .collect()
    }

    /// First parameter index of step `i`, and of its coupling's 7 tensors.
    fn step_base(&self, i: usize) -> (usize, usize) {
        let per = tensors_per_step(&self.arch);
        (i * per, i * per + per - COUPLING_TENSORS.len())
    }

    /// Step `i`'s coupling tensors by name.
    fn coupling(&self, i: usize) -> Result<CouplingTensors<&Buffer>> {
        let (_, cb) = self.step_base(i);
        CouplingTensors::of(&self.params[cb..cb + COUPLING_TENSORS.len()])
    }

    /// The LU factors of step `i`'s 1x1 convolution, where they live.
    fn lu(&self, i: usize) -> LuFactors<'_> {
        let (g, _) = self.step_base(i);
        LuFactors {
            perm: &self.params[g + slot::PERM],
            sign: &self.params[g + slot::SIGN],
            lower: &self.params[g + slot::LOWER],
            upper: &self.params[g + slot::UPPER],
            log_s: &self.params[g + slot::LOG_S],
        }
    }

    /// The scale function of step `i`'s coupling: Glow's floored sigmoid, or the seed's tanh
    /// with the step's learned `scale` tensor.
    fn scale(&self, i: usize) -> CouplingScale<'_> {
        if self.arch.glow {
            CouplingScale::Sigmoid {
                floor: self.arch.scale_floor,
            }
        } else {
            CouplingScale::Tanh(&self.params[self.step_base(i).1])
        }
    }

    /// The LU factors of step `i`'s 1x1 convolution, on the host (for checks and export).
    fn lu_host(&self, i: usize) -> Result<[Vec<f32>; 5]> {
        let (g, _) = self.step_base(i);
        let d = |k: usize| self.backend.download(&self.params[g + k]);
        Ok([
            d(slot::PERM)?,
            d(slot::SIGN)?,
            d(slot::LOWER)?,
            d(slot::UPPER)?,
            d(slot::LOG_S)?,
        ])
    }

    /// `W` of step `i` (f64, row-major `out x in`) and `log|det W|`.
    fn invconv_weight(&self, i: usize) -> Result<(Vec<f64>, f64)> {
        let c = self.arch.step_arch(i).flow_shape().0;
        let [perm, sign, lower, upper, log_s] = self.lu_host(i)?;
        let p = invconv::LuParams {
            perm: &perm,
            sign: &sign,
            lower: &lower,
            upper: &upper,
            log_s: &log_s,
        };
        let w = invconv::weight(c, &p)
            .map_err(|e| BackendError::Device(format!("step {i}: 1x1 convolution: {e}")))?;
        Ok((w, invconv::log_det(&p)))
    }

    /// The kernel blob's parameters (flat, blob order): for a Glow step ActNorm, then `W`,
    /// `W^-1` (computed here in f64, so the device never inverts a matrix) and
    /// `log|det W|`, then the coupling's tensors, then the learned prior's; for the seed's
    /// architectures the checkpoint's tensors as they are.
    pub fn blob_params(&self) -> Result<Vec<f32>> {
        let host = self.params_host()?;
        if !self.arch.glow {
            return Ok(host.concat());
        }
        let mut out = Vec::with_capacity(self.arch.param_count());
        for i in 0..self.arch.couplings {
            let (g, cb) = self.step_base(i);
            let c = self.arch.step_arch(i).flow_shape().0;
            let (w, ld) = self.invconv_weight(i)?;
            let w_inv = invconv::inverse(c, &w)
                .map_err(|e| BackendError::Device(format!("step {i}: 1x1 convolution: {e}")))?;
            out.extend_from_slice(&host[g + slot::LOGS]);
            out.extend_from_slice(&host[g + slot::BIAS]);
            out.extend(w.iter().map(|&v| v as f32));
            out.extend(w_inv.iter().map(|&v| v as f32));
            out.push(ld as f32);
            // The coupling's tensors but its `scale` (the first), which the checkpoint keeps
            // and Glow's sigmoid bound never reads: blob version 3 has no such tensor.
            for t in &host[cb + 1..cb + COUPLING_TENSORS.len()] {
                out.extend_from_slice(t);
            }
        }
        // The learned prior's tensors follow, as the checkpoint holds them.
        for t in &host[self.arch.couplings * tensors_per_step(&self.arch)..] {
            out.extend_from_slice(t);
        }
        Ok(out)
    }

    fn conv(view: &Arch, batch: usize, mask: Mask, j: usize) -> ConvShape {
        let (cin, cout, k) = view.conv_shape(mask, j);
        let (_, h, w) = view.flow_shape();
        ConvShape {
            batch,
            cin,
            cout,
            height: h,
            width: w,
            kernel: k,
        }
    }

    /// The bias-free 1x1 convolution of a level as a [`ConvShape`].
    fn conv1x1(&self, l: usize, batch: usize) -> ConvShape {
        let (c, h, w) = self.arch.level_shape(l);
        ConvShape {
            batch,
            cin: c,
            cout: c,
            height: h,
            width: w,
            kernel: 1,
        }
    }
}

fn d_f64(a: &Arch) -> f64 {
    a.dim() as f64
}

/// Bits/dim of an image with log-density `log_prob` (nats, of the dequantized `u`).
pub fn bpd(arch: &Arch, log_prob: f64) -> f64 {
    -log_prob / (d_f64(arch) * LN_2) + f64::from(arch.bits)
}

#[cfg(test)]
pub(crate) mod tests;
