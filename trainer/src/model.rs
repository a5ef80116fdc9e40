//! The flow model on a [`Backend`]: parameters, the batched forward pass (image -> latent,
//! with log-likelihood), its backward pass, and the inverse (latent -> image) for sampling.
//!
//! The math is the kernel's (`clayflow_kernel`), batched: logit, optional squeeze, then each
//! coupling `x_b <- x_b exp(s) + t` with `s = scale * tanh(s_raw)` (Glow:
//! `s = log sigmoid(s_raw + 2)`) and `(s_raw, t)` from a three-conv CNN of the kept half.
//! The loss is the mean bits/dim, `-log p(u) / (D ln 2) + bits`, and its gradient flows back
//! through every op.
//!
//! Everything stays on the backend's device: a training step uploads the batch into a
//! buffer that persists across steps and downloads the loss terms once (the per-image sums
//! of squares and log-dets, together); the Glow layers' parameters (ActNorm, the 1x1
//! convolutions' LU factors) are used and differentiated where they live.

use crate::backend::{
    hi_lo, Backend, BackendError, Buffer, ConvShape, CouplingScale, LuFactors, Result, Shape4,
};
use crate::config::{is_fixed, tensor_specs, tensors_per_step};
use crate::invconv;
use clayflow_kernel::arch::COUPLING_TENSORS;
use clayflow_kernel::{Arch, Mask, Pcg32, Rng};
use std::f64::consts::{LN_2, PI};
use std::sync::Arc;

/// Activations of one coupling, kept from the forward pass for the backward pass.
#[derive(Debug)]
struct CouplingCache {
    x_in: Buffer,
    cnn_in: Buffer,
    h1: Buffer,
    h2: Buffer,
    st: Buffer,
}

/// What one flow step keeps: for a Glow step the inputs of its ActNorm and of its 1x1
/// convolution, and the convolution's `W` and `W^-1` (recomposed from the LU factors on the
/// device on every pass); then its coupling's activations.
#[derive(Debug)]
struct StepCache {
    glow: Option<GlowCache>,
    coupling: CouplingCache,
    d_st: Buffer,
    d_cnn_in: Buffer,
}

#[derive(Debug)]
struct GlowCache {
    an_in: Buffer,
    ic_in: Buffer,
    w: Buffer,
    w_inv: Buffer,
}

/// Buffers of one level (scale) of the flow: its state and, before a split, the channels
/// that flow on (`kept`, even) and the ones that leave as this level's latent (odd).
#[derive(Debug)]
struct LevelWs {
    state: Buffer,
    temp: Buffer,
    d_state: Buffer,
    d_temp: Buffer,
    kept: Buffer,
    latent: Buffer,
    d_kept: Buffer,
    d_latent: Buffer,
    d_h1: Buffer,
    d_h2: Buffer,
    /// Zero bias and a bias-gradient sink for the bias-free 1x1 convolution.
    zero_bias: Buffer,
    d_bias_sink: Buffer,
    d_w: Buffer,
}

/// Buffers for one batch size: the activation cache and the gradient temporaries.
#[derive(Debug)]
struct Workspace {
    batch: usize,
    /// Image-layout buffers for logit and the optional first squeeze; the batch is uploaded
    /// into `image`.
    image: Buffer,
    /// Per-image log-det of every layer (f32, accumulated on the device).
    log_det: Buffer,
    /// Per-image `sum(z^2)` over every level's latent, as f64 `(hi, lo)` pairs.
    sq: Buffer,
    levels: Vec<LevelWs>,
    steps: Vec<StepCache>,
}

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

/// PyTorch's default `Conv2d` initialisation bound, `1 / sqrt(fan_in)`.
fn init_bound(fan_in: usize) -> f32 {
    1.0 / (fan_in.max(1) as f32).sqrt()
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

/// Fresh parameters for `arch` (host vectors in checkpoint order): PyTorch-default uniform
/// initialisation for the first two convs, the last conv zero (so every coupling starts as
/// the identity), scales 1; for Glow steps ActNorm as the identity (training replaces it by
/// the data-dependent initialisation, [`Flow::data_init`]) and a random rotation as the 1x1
/// convolution, LU-factorised. Deterministic in `seed`.
pub fn init_params(arch: &Arch, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Pcg32::with_stream(seed, 0x1417);
    let mut uniform = |bound: f32| ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
    let specs = tensor_specs(arch);
    let per = tensors_per_step(arch);
    let mut out = Vec::with_capacity(specs.len());
    for (i, &mask) in arch.active_masks().iter().enumerate() {
        let view = arch.step_arch(i);
        let step = &specs[i * per..(i + 1) * per];
        if arch.glow {
            let c = view.flow_shape().0;
            let lu = invconv::init(
                c,
                seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)),
            );
            out.push(vec![0.0; c]);
            out.push(vec![0.0; c]);
            out.push(lu.perm);
            out.push(lu.sign);
            out.push(lu.lower);
            out.push(lu.upper);
            out.push(lu.log_s);
        }
        for spec in &step[per - COUPLING_TENSORS.len()..] {
            let n = spec.len();
            let name = spec.name.as_str();
            let v: Vec<f32> = if name.ends_with(".scale") {
                vec![1.0; n]
            } else if name.contains(".conv2.") {
                vec![0.0; n]
            } else {
                // weight [cout, cin, k, k] or bias [cout]: fan_in = cin * k * k of the conv.
                let j = if name.contains(".conv0.") { 0 } else { 1 };
                let (cin, _, k) = view.conv_shape(mask, j);
                let b = init_bound(cin * k * k);
                (0..n).map(|_| uniform(b)).collect()
            };
            out.push(v);
        }
    }
    out
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

/// Levels `l - 1` and `l`, both mutable (for the transition between them).
fn adjacent(levels: &mut [LevelWs], l: usize) -> (&mut LevelWs, &mut LevelWs) {
    let (prev, cur) = levels.split_at_mut(l);
    (&mut prev[l - 1], &mut cur[0])
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

impl<'a> CouplingTensors<&'a Buffer> {
    fn of(t: &'a [Buffer]) -> Result<Self> {
        match t {
            [scale, w0, b0, w1, b1, w2, b2] => Ok(CouplingTensors {
                scale,
                w: [w0, w1, w2],
                bias: [b0, b1, b2],
            }),
            _ => Err(size_err(
                "coupling tensors",
                "count",
                COUPLING_TENSORS.len(),
                t.len(),
            )),
        }
    }
}

impl<'a> CouplingTensors<&'a mut Buffer> {
    fn of_mut(t: &'a mut [Buffer]) -> Result<Self> {
        match t {
            [scale, w0, b0, w1, b1, w2, b2] => Ok(CouplingTensors {
                scale,
                w: [w0, w1, w2],
                bias: [b0, b1, b2],
            }),
            _ => Err(size_err(
                "coupling tensors",
                "count",
                COUPLING_TENSORS.len(),
                t.len(),
            )),
        }
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

    /// The scale function of step `i`'s coupling: Glow's sigmoid, or the seed's tanh with the
    /// step's learned `scale` tensor.
    fn scale(&self, i: usize) -> CouplingScale<'_> {
        if self.arch.glow {
            CouplingScale::Sigmoid
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
    /// `log|det W|`, then the coupling's tensors; for the seed's architectures the
    /// checkpoint's tensors as they are.
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

    fn workspace(&mut self, batch: usize) -> Result<Workspace> {
        if let Some(ws) = self.ws.take() {
            if ws.batch == batch {
                return Ok(ws);
            }
        }
        let b = &self.backend;
        let a = &self.arch;
        let d = a.dim();
        let mut levels = Vec::new();
        for l in 0..a.levels {
            let (c, h, w) = a.level_shape(l);
            let n = batch * c * h * w;
            let half = if l + 1 < a.levels { n / 2 } else { 0 };
            let plane = h * w;
            let cc = if a.glow { c } else { 0 };
            levels.push(LevelWs {
                state: b.zeros(n)?,
                temp: b.zeros(n)?,
                d_state: b.zeros(n)?,
                d_temp: b.zeros(n)?,
                kept: b.zeros(half)?,
                latent: b.zeros(half)?,
                d_kept: b.zeros(half)?,
                d_latent: b.zeros(half)?,
                d_h1: b.zeros(batch * a.hidden[0] * plane)?,
                d_h2: b.zeros(batch * a.hidden[1] * plane)?,
                zero_bias: b.zeros(cc)?,
                d_bias_sink: b.zeros(cc)?,
                d_w: b.zeros(cc * cc)?,
            });
        }
        let mut steps = Vec::new();
        for (i, &m) in a.active_masks().iter().enumerate() {
            let view = a.step_arch(i);
            let n = batch * view.dim();
            let plane = view.plane();
            let cin = view.cnn_in(m);
            let st = 2 * view.changed(m);
            let glow = if a.glow {
                let c = view.flow_shape().0;
                Some(GlowCache {
                    an_in: b.zeros(n)?,
                    ic_in: b.zeros(n)?,
                    w: b.zeros(c * c)?,
                    w_inv: b.zeros(c * c)?,
                })
            } else {
                None
            };
            steps.push(StepCache {
                glow,
                coupling: CouplingCache {
                    x_in: b.zeros(n)?,
                    cnn_in: b.zeros(batch * cin * plane)?,
                    h1: b.zeros(batch * a.hidden[0] * plane)?,
                    h2: b.zeros(batch * a.hidden[1] * plane)?,
                    st: b.zeros(batch * st * plane)?,
                },
                d_st: b.zeros(batch * st * plane)?,
                d_cnn_in: b.zeros(batch * cin * plane)?,
            });
        }
        Ok(Workspace {
            batch,
            image: b.zeros(batch * d)?,
            log_det: b.zeros(batch)?,
            sq: b.zeros(2 * batch)?,
            levels,
            steps,
        })
    }

    /// Recomposes every step's `W` (and `W^-1` when `inverse`) from its LU factors into the
    /// workspace, on the backend's device.
    fn refresh_invconv(&self, ws: &mut Workspace, inverse: bool) -> Result<()> {
        for (i, step) in ws.steps.iter_mut().enumerate() {
            let Some(g) = step.glow.as_mut() else {
                continue;
            };
            let c = self.arch.step_arch(i).flow_shape().0;
            self.backend.invconv_weight(c, self.lu(i), &mut g.w)?;
            if inverse {
                self.backend.invconv_inverse(c, self.lu(i), &mut g.w_inv)?;
            }
        }
        Ok(())
    }

    /// Runs the coupling CNN of step `i` on `cache.cnn_in`, filling h1, h2 and st.
    fn cnn_forward(
        &self,
        i: usize,
        mask: Mask,
        batch: usize,
        cache: &mut CouplingCache,
    ) -> Result<()> {
        let p = self.coupling(i)?;
        let view = self.arch.step_arch(i);
        let b = &self.backend;
        b.conv_forward(
            &Self::conv(&view, batch, mask, 0),
            &cache.cnn_in,
            p.w[0],
            p.bias[0],
            true,
            &mut cache.h1,
        )?;
        b.conv_forward(
            &Self::conv(&view, batch, mask, 1),
            &cache.h1,
            p.w[1],
            p.bias[1],
            true,
            &mut cache.h2,
        )?;
        b.conv_forward(
            &Self::conv(&view, batch, mask, 2),
            &cache.h2,
            p.w[2],
            p.bias[2],
            false,
            &mut cache.st,
        )
    }

    /// Forward pass of a batch of dequantized images `u` (host, `batch x C x H x W`, values
    /// in `[0, 1]`), keeping activations for [`Flow::backward`].
    pub fn forward(&mut self, u: &[f32], batch: usize) -> Result<BatchStats> {
        let d = self.arch.dim();
        if u.len() != batch * d {
            return Err(size_err("Flow::forward", "u", batch * d, u.len()));
        }
        let mut ws = self.workspace(batch)?;
        let r = self.forward_in(u, batch, &mut ws, false);
        self.ws = Some(ws);
        r
    }

    /// Glow's data-dependent initialisation: one forward pass over `u` in which every
    /// ActNorm, before it is applied, is set so that its output has zero mean and unit
    /// variance per channel on this batch (`exp(logs) = 1 / (std + 1e-6)`,
    /// `bias = -mean / (std + 1e-6)`). A no-op for architectures without Glow steps.
    pub fn data_init(&mut self, u: &[f32], batch: usize) -> Result<BatchStats> {
        let d = self.arch.dim();
        if u.len() != batch * d {
            return Err(size_err("Flow::data_init", "u", batch * d, u.len()));
        }
        let mut ws = self.workspace(batch)?;
        let r = self.forward_in(u, batch, &mut ws, self.arch.glow);
        self.ws = Some(ws);
        r
    }

    fn forward_in(
        &mut self,
        u: &[f32],
        batch: usize,
        ws: &mut Workspace,
        init_actnorm: bool,
    ) -> Result<BatchStats> {
        let b = self.backend.clone();
        let a = self.arch;
        if a.glow {
            self.refresh_invconv(ws, false)?;
        }
        b.upload_into(u, &mut ws.image)?;
        let img = shape4(batch, (a.channels, a.height, a.width));
        b.logit_forward(img, a.logit_alpha, &mut ws.image, &mut ws.log_det)?;
        if a.squeeze {
            b.squeeze(img, false, &ws.image, &mut ws.levels[0].state)?;
        } else {
            b.copy(&ws.image, &mut ws.levels[0].state)?;
        }
        let n = a.steps_per_level();
        for l in 0..a.levels {
            let fs = shape4(batch, a.level_shape(l));
            if l > 0 {
                let (prev, cur) = adjacent(&mut ws.levels, l);
                b.squeeze(kept_shape(&a, batch, l), false, &prev.kept, &mut cur.state)?;
            }
            for i in l * n..(l + 1) * n {
                let m = a.masks[i];
                let (g, _) = self.step_base(i);
                let lw = &mut ws.levels[l];
                let step = &mut ws.steps[i];
                if let Some(gc) = step.glow.as_mut() {
                    if init_actnorm {
                        let (lo, hi) = self.params.split_at_mut(g + slot::BIAS);
                        b.actnorm_init(fs, &lw.state, &mut lo[g + slot::LOGS], &mut hi[0])?;
                    }
                    b.copy(&lw.state, &mut gc.an_in)?;
                    b.actnorm_forward(
                        fs,
                        &self.params[g + slot::LOGS],
                        &self.params[g + slot::BIAS],
                        &mut lw.state,
                        &mut ws.log_det,
                    )?;
                    b.copy(&lw.state, &mut gc.ic_in)?;
                    b.conv_forward(
                        &self.conv1x1(l, batch),
                        &gc.ic_in,
                        &gc.w,
                        &lw.zero_bias,
                        false,
                        &mut lw.state,
                    )?;
                    // log|det| of the 1x1 convolution: plane * sum(log_s) per image.
                    b.add_log_det(fs.plane(), &self.params[g + slot::LOG_S], &mut ws.log_det)?;
                }
                let cache = &mut step.coupling;
                b.copy(&lw.state, &mut cache.x_in)?;
                b.mask_gather(fs, m, &lw.state, &mut cache.cnn_in)?;
                self.cnn_forward(i, m, batch, cache)?;
                b.coupling_forward(
                    fs,
                    m,
                    self.scale(i),
                    &cache.st,
                    &mut lw.state,
                    &mut ws.log_det,
                )?;
            }
            if l + 1 < a.levels {
                let lw = &mut ws.levels[l];
                split(b.as_ref(), fs, &lw.state, &mut lw.kept, &mut lw.latent)?;
            }
        }
        b.fill(&mut ws.sq, 0.0)?;
        for (l, lw) in ws.levels.iter().enumerate() {
            let z = if l + 1 < a.levels {
                &lw.latent
            } else {
                &lw.state
            };
            let per = z.len() / batch.max(1);
            b.per_image_sum_squares(shape4(batch, (per, 1, 1)), z, &mut ws.sq)?;
        }
        // The step's one download: both loss terms together.
        let host = b.download_all(&[&ws.sq, &ws.log_det])?;
        let (sq, ld) = (hi_lo(&host[0]), &host[1]);
        let dd = d_f64(&a);
        let log_prob: Vec<f64> = sq
            .iter()
            .zip(ld)
            .map(|(s, l)| -0.5 * s - 0.5 * dd * (2.0 * PI).ln() + f64::from(*l))
            .collect();
        let mean_bpd = log_prob.iter().map(|lp| bpd(&a, *lp)).sum::<f64>() / batch.max(1) as f64;
        Ok(BatchStats { log_prob, mean_bpd })
    }

    /// The latents of the last [`Flow::forward`], host, `batch x D` in the kernel's layout
    /// (see [`latent_blocks`]).
    pub fn latents(&self) -> Result<Vec<f32>> {
        let ws = self.ws.as_ref().ok_or(BackendError::Device(
            "latents requested before forward".into(),
        ))?;
        let a = &self.arch;
        let d = a.dim();
        let batch = ws.batch;
        let mut z = vec![0.0f32; batch * d];
        for (l, (&(at, n), lw)) in latent_blocks(a).iter().zip(&ws.levels).enumerate() {
            let src = if l + 1 < a.levels {
                &lw.latent
            } else {
                &lw.state
            };
            let host = self.backend.download(src)?;
            for (k, chunk) in host.chunks_exact(n.max(1)).enumerate().take(batch) {
                z[k * d + at..k * d + at + n].copy_from_slice(chunk);
            }
        }
        Ok(z)
    }

    /// Backward pass of the last [`Flow::forward`]: writes the gradient of the mean bits/dim
    /// into `grads` (shaped like the parameters; overwritten).
    pub fn backward(&mut self, grads: &mut [Buffer]) -> Result<()> {
        let mut ws = self.ws.take().ok_or(BackendError::Device(
            "backward called before forward".into(),
        ))?;
        let r = self.backward_in(&mut ws, grads);
        self.ws = Some(ws);
        r
    }

    fn backward_in(&self, ws: &mut Workspace, grads: &mut [Buffer]) -> Result<()> {
        let b = &self.backend;
        let a = &self.arch;
        let batch = ws.batch;
        if grads.len() != self.params.len() {
            return Err(size_err(
                "Flow::backward",
                "grads",
                self.params.len(),
                grads.len(),
            ));
        }
        // loss = mean_i [ (0.5 |z_i|^2 - log_det_i + const) / (D ln 2) ]
        let g = (1.0 / (batch.max(1) as f64 * d_f64(a) * LN_2)) as f32;
        let n = a.steps_per_level();
        for l in (0..a.levels).rev() {
            let fs = shape4(batch, a.level_shape(l));
            {
                let lw = &mut ws.levels[l];
                if l + 1 < a.levels {
                    // d z_l = g z_l for the latent; the kept half's gradient came back from
                    // level l + 1. Both scatter into this level's state gradient.
                    b.fill(&mut lw.d_latent, 0.0)?;
                    b.axpy(g, &lw.latent, &mut lw.d_latent)?;
                    merge(b.as_ref(), fs, &lw.d_kept, &lw.d_latent, &mut lw.d_state)?;
                } else {
                    b.fill(&mut lw.d_state, 0.0)?;
                    b.axpy(g, &lw.state, &mut lw.d_state)?;
                }
            }
            for i in (l * n..(l + 1) * n).rev() {
                let m = a.masks[i];
                let view = a.step_arch(i);
                let (gb, cb) = self.step_base(i);
                let p = self.coupling(i)?;
                let lw = &mut ws.levels[l];
                let step = &mut ws.steps[i];
                let cache = &step.coupling;
                let d_st = &mut step.d_st;
                {
                    let gr = CouplingTensors::of_mut(&mut grads[cb..cb + COUPLING_TENSORS.len()])?;
                    // Glow's sigmoid scale does not use the `scale` tensor: its gradient
                    // stays 0.
                    b.fill(gr.scale, 0.0)?;
                    b.coupling_backward(
                        fs,
                        m,
                        self.scale(i),
                        &cache.x_in,
                        &cache.st,
                        -g,
                        &mut lw.d_state,
                        d_st,
                        gr.scale,
                    )?;
                    let (s0, s1, s2) = (
                        Self::conv(&view, batch, m, 0),
                        Self::conv(&view, batch, m, 1),
                        Self::conv(&view, batch, m, 2),
                    );
                    let ([gw0, gw1, gw2], [gb0, gb1, gb2]) = (gr.w, gr.bias);
                    b.conv_backward_weight(&s2, &cache.h2, d_st, gw2, gb2)?;
                    b.conv_backward_data(&s2, d_st, p.w[2], &mut lw.d_h2)?;
                    b.relu_backward(&cache.h2, &mut lw.d_h2)?;
                    b.conv_backward_weight(&s1, &cache.h1, &lw.d_h2, gw1, gb1)?;
                    b.conv_backward_data(&s1, &lw.d_h2, p.w[1], &mut lw.d_h1)?;
                    b.relu_backward(&cache.h1, &mut lw.d_h1)?;
                    b.conv_backward_weight(&s0, &cache.cnn_in, &lw.d_h1, gw0, gb0)?;
                    b.conv_backward_data(&s0, &lw.d_h1, p.w[0], &mut step.d_cnn_in)?;
                    b.mask_scatter_add(fs, m, &step.d_cnn_in, &mut lw.d_state)?;
                }
                if let Some(gc) = step.glow.as_ref() {
                    // 1x1 convolution y = W x: dx = W^T dy, dW = sum dy x^T; its log-det
                    // plane * log|det W| = plane * sum(log_s) enters the loss with -g per image.
                    let s = self.conv1x1(l, batch);
                    b.conv_backward_weight(
                        &s,
                        &gc.ic_in,
                        &lw.d_state,
                        &mut lw.d_w,
                        &mut lw.d_bias_sink,
                    )?;
                    b.conv_backward_data(&s, &lw.d_state, &gc.w, &mut lw.d_temp)?;
                    std::mem::swap(&mut lw.d_state, &mut lw.d_temp);
                    let c = view.flow_shape().0;
                    let [d_lower, d_upper, d_log_s] =
                        &mut grads[gb + slot::LOWER..=gb + slot::LOG_S]
                    else {
                        unreachable!()
                    };
                    b.invconv_backward(
                        c,
                        self.lu(i),
                        &lw.d_w,
                        -g,
                        batch * view.plane(),
                        d_lower,
                        d_upper,
                        d_log_s,
                    )?;
                    b.fill(&mut grads[gb + slot::PERM], 0.0)?;
                    b.fill(&mut grads[gb + slot::SIGN], 0.0)?;
                    let (gl, gbias) = {
                        let (lo, hi) = grads.split_at_mut(gb + slot::BIAS);
                        (&mut lo[gb + slot::LOGS], &mut hi[0])
                    };
                    b.fill(gl, 0.0)?;
                    b.fill(gbias, 0.0)?;
                    b.actnorm_backward(
                        fs,
                        &gc.an_in,
                        &self.params[gb + slot::LOGS],
                        -g,
                        &mut lw.d_state,
                        gl,
                        gbias,
                    )?;
                }
            }
            if l > 0 {
                // The squeeze is a permutation: its adjoint is the unsqueeze.
                let (prev, cur) = adjacent(&mut ws.levels, l);
                b.squeeze(
                    kept_shape(a, batch, l),
                    true,
                    &cur.d_state,
                    &mut prev.d_kept,
                )?;
            }
        }
        Ok(())
    }

    /// Maps latents `z` (host, `batch x D` in the kernel's layout, see [`latent_blocks`]) to
    /// dequantized images `u` (host, image layout): every level from the last, merging its
    /// latent back, the steps inverted in reverse order; unsqueeze, inverse logit.
    pub fn inverse(&mut self, z: &[f32], batch: usize) -> Result<Vec<f32>> {
        let d = self.arch.dim();
        if z.len() != batch * d {
            return Err(size_err("Flow::inverse", "z", batch * d, z.len()));
        }
        let mut ws = self.workspace(batch)?;
        let r = self.inverse_in(z, batch, &mut ws);
        self.ws = Some(ws);
        r
    }

    fn inverse_in(&self, z: &[f32], batch: usize, ws: &mut Workspace) -> Result<Vec<f32>> {
        let b = &self.backend;
        let a = &self.arch;
        let d = a.dim();
        if a.glow {
            self.refresh_invconv(ws, true)?;
        }
        for (l, &(at, n)) in latent_blocks(a).iter().enumerate() {
            let mut host = vec![0.0f32; batch * n];
            for (k, chunk) in host.chunks_exact_mut(n.max(1)).enumerate().take(batch) {
                chunk.copy_from_slice(&z[k * d + at..k * d + at + n]);
            }
            let lw = &mut ws.levels[l];
            if l + 1 < a.levels {
                b.upload_into(&host, &mut lw.latent)?;
            } else {
                b.upload_into(&host, &mut lw.state)?;
            }
        }
        let n = a.steps_per_level();
        for l in (0..a.levels).rev() {
            let fs = shape4(batch, a.level_shape(l));
            if l + 1 < a.levels {
                let lw = &mut ws.levels[l];
                merge(b.as_ref(), fs, &lw.kept, &lw.latent, &mut lw.state)?;
            }
            for i in (l * n..(l + 1) * n).rev() {
                let m = a.masks[i];
                let (g, _) = self.step_base(i);
                let lw = &mut ws.levels[l];
                let step = &mut ws.steps[i];
                let cache = &mut step.coupling;
                b.mask_gather(fs, m, &lw.state, &mut cache.cnn_in)?;
                self.cnn_forward(i, m, batch, cache)?;
                b.coupling_inverse(fs, m, self.scale(i), &cache.st, &mut lw.state)?;
                if let Some(gc) = step.glow.as_ref() {
                    b.conv_forward(
                        &self.conv1x1(l, batch),
                        &lw.state,
                        &gc.w_inv,
                        &lw.zero_bias,
                        false,
                        &mut lw.temp,
                    )?;
                    std::mem::swap(&mut lw.state, &mut lw.temp);
                    b.actnorm_inverse(
                        fs,
                        &self.params[g + slot::LOGS],
                        &self.params[g + slot::BIAS],
                        &mut lw.state,
                    )?;
                }
            }
            if l > 0 {
                let (prev, cur) = adjacent(&mut ws.levels, l);
                b.squeeze(kept_shape(a, batch, l), true, &cur.state, &mut prev.kept)?;
            }
        }
        let img = shape4(batch, (a.channels, a.height, a.width));
        if a.squeeze {
            b.squeeze(img, true, &ws.levels[0].state, &mut ws.image)?;
        } else {
            b.copy(&ws.levels[0].state, &mut ws.image)?;
        }
        b.logit_inverse(a.logit_alpha, &mut ws.image)?;
        b.download(&ws.image)
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
pub(crate) mod tests {
    use super::*;
    use crate::backend::actnorm;
    use crate::backend::cpu::CpuBackend;
    use clayflow_kernel::{alternating_masks, blob_len, write_blob, DType, Model};

    pub fn tiny(squeeze: bool, first: Mask, couplings: usize) -> Arch {
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
            hidden: [3, 4],
            bits: 8,
            logit_alpha: 0.05,
        }
    }

    /// A two-level Glow on 1x8x8: squeezed to 4x4x4, two steps, split, squeezed to 8x2x2,
    /// two steps.
    pub fn tiny_glow(levels: usize, glow: bool) -> Arch {
        Arch {
            height: 8,
            width: 8,
            levels,
            glow,
            couplings: 2 * levels,
            ..tiny(true, Mask::ChannelEven, 2)
        }
    }

    /// Initial parameters with the last conv made non-zero, so the couplings do something,
    /// and (Glow) ActNorm and the LU factors moved off their initial values.
    pub fn busy_params(arch: &Arch, seed: u64) -> Vec<Vec<f32>> {
        let mut p = init_params(arch, seed);
        let mut rng = Pcg32::new(seed + 99);
        for (spec, t) in tensor_specs(arch).iter().zip(p.iter_mut()) {
            let glow_spread =
                if spec.name.ends_with(".actnorm.logs") || spec.name.ends_with(".invconv.log_s") {
                    0.2
                } else if spec.name.ends_with(".actnorm.bias")
                    || spec.name.ends_with(".invconv.lower")
                    || spec.name.ends_with(".invconv.upper")
                {
                    0.3
                } else {
                    0.0
                };
            if glow_spread > 0.0 {
                for v in t.iter_mut() {
                    *v += ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * glow_spread;
                }
                continue;
            }
            if spec.name.contains(".conv2.") || spec.name.ends_with(".scale") {
                // conv2 weights ~ U(+-1/sqrt(fan_in)), like the other convs.
                let fan_in: usize = spec.shape.iter().skip(1).product();
                let bound = 1.0 / (fan_in as f32).sqrt();
                for v in t.iter_mut() {
                    *v += ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
                }
            }
        }
        p
    }

    /// A deep Glow in a trained-like state: ActNorm initialised from data, every coupling's
    /// last conv at a tenth of the other convs' scale (random parameters at full scale make
    /// 32 steps overflow f32, which says nothing about the code).
    pub fn settled_flow(arch: Arch, seed: u64) -> Flow {
        let mut p = init_params(&arch, seed);
        let mut rng = Pcg32::new(seed + 7);
        for (spec, t) in tensor_specs(&arch).iter().zip(p.iter_mut()) {
            if spec.name.contains(".conv2.") {
                let fan_in: usize = spec.shape.iter().skip(1).product();
                let bound = 0.1 / (fan_in.max(1) as f32).sqrt();
                for v in t.iter_mut() {
                    *v = ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
                }
            }
        }
        let mut f = flow(arch, &p);
        f.data_init(&batch_u(&arch, 8, seed), 8).unwrap();
        f
    }

    pub fn batch_u(arch: &Arch, batch: usize, seed: u64) -> Vec<f32> {
        let mut rng = Pcg32::new(seed);
        (0..batch * arch.dim())
            .map(|_| (rng.next_u32() >> 8) as f32 / 16_777_216.0)
            .collect()
    }

    fn flow(arch: Arch, params: &[Vec<f32>]) -> Flow {
        Flow::new(Arc::new(CpuBackend), arch, params).unwrap()
    }

    #[test]
    fn forward_and_inverse_match_the_kernel() {
        for arch in [
            tiny(true, Mask::ChannelEven, 3),
            tiny(false, Mask::CheckerOdd, 2),
            tiny_glow(2, true),
            tiny_glow(2, false),
            tiny_glow(1, true),
            clayflow_kernel::MNIST,
            clayflow_kernel::MNIST_GLOW,
        ] {
            let batch = 3;
            let u = batch_u(&arch, batch, 1);
            let mut f = if arch.couplings > 8 && arch.glow {
                settled_flow(arch, 3)
            } else {
                flow(arch, &busy_params(&arch, 3))
            };
            let stats = f.forward(&u, batch).unwrap();
            let flat: Vec<f32> = f.blob_params().unwrap();
            let mut blob = vec![0u8; blob_len(&arch, DType::F32)];
            write_blob(&arch, DType::F32, &flat, &mut blob).unwrap();
            let model = Model::from_blob(&blob).unwrap();
            let mut scratch = vec![0f32; clayflow_kernel::scratch_len(&arch)];
            let d = arch.dim();
            for i in 0..batch {
                let k = clayflow_kernel::log_prob_u(&model, &u[i * d..(i + 1) * d], &mut scratch)
                    .unwrap();
                let t = stats.log_prob[i];
                // Same f32 math in a different summation order: relative 1e-5 of the terms.
                assert!(
                    (f64::from(k) - t).abs() < 1e-5 * (t.abs() + d as f64),
                    "{k} vs {t}"
                );
            }
            // Inverse: kernel and trainer agree on the same latent.
            let z: Vec<f32> = batch_u(&arch, batch, 7)
                .iter()
                .map(|v| (v - 0.5) * 3.0)
                .collect();
            let x = f.inverse(&z, batch).unwrap();
            for i in 0..batch {
                let mut zk = z[i * d..(i + 1) * d].to_vec();
                clayflow_kernel::inverse(&model, &mut zk, &mut scratch).unwrap();
                let diff = zk
                    .iter()
                    .zip(&x[i * d..(i + 1) * d])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-5, "{arch:?} inverse differs by {diff}");
            }
        }
    }

    #[test]
    fn inverse_undoes_forward() {
        for arch in [
            clayflow_kernel::MNIST,
            clayflow_kernel::MNIST_GLOW,
            tiny_glow(2, true),
        ] {
            let mut f = if arch.glow && arch.couplings > 8 {
                settled_flow(arch, 5)
            } else {
                flow(arch, &busy_params(&arch, 5))
            };
            let u = batch_u(&arch, 2, 2);
            f.forward(&u, 2).unwrap();
            let z = f.latents().unwrap();
            let back = f.inverse(&z, 2).unwrap();
            let diff = back
                .iter()
                .zip(&u)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 1e-4,
                "{}x{} levels: {diff}",
                arch.levels,
                arch.couplings
            );
        }
    }

    /// The data-dependent initialisation leaves every ActNorm's output with zero mean and
    /// unit variance per channel on the batch it saw; the untrained flow then maps that
    /// batch to latents of about unit variance.
    #[test]
    fn actnorm_data_init_normalises_the_first_batch() {
        let arch = tiny_glow(2, true);
        let mut f = flow(arch, &init_params(&arch, 1));
        let batch = 16;
        let u = batch_u(&arch, batch, 3);
        f.data_init(&u, batch).unwrap();
        let ws = f.ws.as_ref().unwrap();
        // The input of each step's 1x1 convolution is its ActNorm's output.
        for (i, step) in ws.steps.iter().enumerate() {
            let view = arch.step_arch(i);
            let fs = shape4(batch, view.flow_shape());
            let x = f
                .backend()
                .download(&step.glow.as_ref().unwrap().ic_in)
                .unwrap();
            for (c, (mean, sd)) in actnorm::channel_stats(fs, &x).into_iter().enumerate() {
                assert!(mean.abs() < 1e-4, "step {i} channel {c}: mean {mean}");
                assert!((sd - 1.0).abs() < 1e-3, "step {i} channel {c}: std {sd}");
            }
        }
        let z = f.latents().unwrap();
        let var = z.iter().map(|v| f64::from(v * v)).sum::<f64>() / z.len() as f64;
        assert!((0.5..2.0).contains(&var), "latent variance {var}");
    }

    #[test]
    fn fixed_tensors_get_no_gradient_and_are_not_trainable() {
        let arch = tiny_glow(2, true);
        let mut f = flow(arch, &busy_params(&arch, 2));
        let u = batch_u(&arch, 2, 1);
        f.forward(&u, 2).unwrap();
        let mut grads = f.zeros_like_params().unwrap();
        for g in &mut grads {
            f.backend().fill(g, 1.0).unwrap();
        }
        f.backward(&mut grads).unwrap();
        for ((spec, g), t) in tensor_specs(&arch).iter().zip(&grads).zip(f.trainable()) {
            let g = f.backend().download(g).unwrap();
            assert_eq!(t, !is_fixed(&arch, &spec.name));
            if !t {
                assert!(g.iter().all(|&v| v == 0.0), "{} has a gradient", spec.name);
            }
        }
    }

    /// Gradient check by central differences along a random +-1 direction in each parameter
    /// tensor. The loss (~8 bits/dim) is f32 math summed in f64, so it carries ~1e-6 of
    /// rounding noise; with eps = 1e-3 that is ~5e-4 in the difference quotient. A larger eps
    /// moves pre-activations across ReLU kinks (eps = 1e-2 already gives 5% errors on conv0),
    /// so we keep eps small and accept 1.5e-3 absolute or 2% relative error. Observed errors
    /// on the channel-mask model are ~1e-4 relative; a wrong gradient is off by O(1).
    #[test]
    fn gradients_match_finite_differences() {
        for arch in [
            tiny(true, Mask::ChannelEven, 2),
            tiny(false, Mask::CheckerEven, 2),
            tiny_glow(2, true),
            tiny_glow(2, false),
        ] {
            let params = busy_params(&arch, 11);
            let batch = 2;
            let u = batch_u(&arch, batch, 4);
            let mut f = flow(arch, &params);
            f.forward(&u, batch).unwrap();
            let mut grads = f.zeros_like_params().unwrap();
            f.backward(&mut grads).unwrap();
            let grads: Vec<Vec<f32>> = grads
                .iter()
                .map(|g| f.backend().download(g).unwrap())
                .collect();
            let mut rng = Pcg32::new(21);
            for (k, spec) in tensor_specs(&arch).iter().enumerate() {
                if is_fixed(&arch, &spec.name) {
                    continue;
                }
                let dir: Vec<f32> = (0..spec.len())
                    .map(|_| if rng.next_u32() & 1 == 0 { 1.0 } else { -1.0 })
                    .collect();
                let analytic: f64 = grads[k]
                    .iter()
                    .zip(&dir)
                    .map(|(g, d)| f64::from(g * d))
                    .sum();
                let mut fd_at = |eps: f32| {
                    let mut loss_at = |sign: f32| {
                        let mut p = params.clone();
                        for (v, d) in p[k].iter_mut().zip(&dir) {
                            *v += sign * eps * d;
                        }
                        f.set_params(&p).unwrap();
                        f.forward(&u, batch).unwrap().mean_bpd
                    };
                    (loss_at(1.0) - loss_at(-1.0)) / (2.0 * f64::from(eps))
                };
                // A kink can spoil one step size, rounding noise the smaller one; a wrong
                // gradient fails at both. Noise scales as 1/eps: 1.5e-3 at eps 1e-3.
                let fd = fd_at(1e-3);
                let ok = |fd: f64, abs: f64| {
                    let err = (fd - analytic).abs();
                    err < abs || err < 0.02 * analytic.abs()
                };
                if !ok(fd, 1.5e-3) {
                    let fd2 = fd_at(2.5e-4);
                    assert!(
                        ok(fd2, 6e-3),
                        "{}: analytic {analytic} vs finite differences {fd} (eps 1e-3), {fd2} (eps 2.5e-4)",
                        spec.name
                    );
                }
            }
        }
    }
}
