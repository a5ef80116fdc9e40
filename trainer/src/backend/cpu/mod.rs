//! The CPU backend: convolutions as im2col + `matrixmultiply` sgemm, everything parallel
//! across the batch with rayon. Reductions over the batch are summed in a fixed order, so
//! results do not depend on the thread count.

pub mod conv;

use super::check::{self, check_actnorm, check_adam_all, expect_len};
use super::{
    actnorm, to_hi_lo, AdamStep, Backend, BackendError, Buffer, ConvShape, Convolution,
    CouplingScale, FlowLayers, LuFactors, Memory, Optimiser, Result, Shape4, Storage,
};
use crate::invconv;
use clayflow_kernel::coupling::{glow_scale, glow_scale_grad};
use clayflow_kernel::Mask;
use rayon::prelude::*;

/// Elements per rayon task in elementwise ops.
const CHUNK: usize = 1 << 14;

/// The CPU implementation of [`Backend`]: f32 throughout (`CpuBackend::default()`), or
/// with the coupling networks' convolutions in bf16 ([`CpuBackend::with_bf16_networks`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend {
    /// The networks' convolutions take bf16 operands ([`Convolution::net_conv_forward`]
    /// and its backward ops).
    bf16_nets: bool,
}

impl CpuBackend {
    /// A backend whose coupling networks (and learned prior) convolve with bf16 operands
    /// and f32 accumulation: 1x1 convolutions on AMX-BF16 (forward, backward-data and
    /// weight gradient) where the CPU has it, the others' forward and backward-data with
    /// AVX-512 BF16 on images at most 16 pixels wide (`conv::conv2d_forward_bf16`).
    /// Everything else, the LU 1x1 convolutions that carry the log-det included, stays
    /// f32. `None` when this CPU has no AVX-512 BF16.
    pub fn with_bf16_networks() -> Option<CpuBackend> {
        conv::bf16_available().then_some(CpuBackend { bf16_nets: true })
    }

    /// Whether the networks' convolutions take bf16 operands.
    pub fn bf16_networks(&self) -> bool {
        self.bf16_nets
    }
}

fn host<'a>(op: &'static str, b: &'a Buffer) -> Result<&'a [f32]> {
    match &b.storage {
        Storage::Host(v) => Ok(v),
        _ => Err(BackendError::WrongDevice { op }),
    }
}

fn host_mut<'a>(op: &'static str, b: &'a mut Buffer) -> Result<&'a mut [f32]> {
    match &mut b.storage {
        Storage::Host(v) => Ok(v),
        _ => Err(BackendError::WrongDevice { op }),
    }
}

/// True when position `i` of a `width`-wide plane is changed by `mask`.
#[inline]
fn is_changed(mask: Mask, i: usize, width: usize) -> bool {
    mask.changes_pixel(i / width, i % width)
}

/// A coupling's scale function on host slices (see [`CouplingScale`]).
#[derive(Clone, Copy)]
enum HostScale<'a> {
    Tanh(&'a [f32]),
    Sigmoid(f32),
}

impl<'a> HostScale<'a> {
    fn of(op: &'static str, scale: CouplingScale<'a>) -> Result<HostScale<'a>> {
        Ok(match scale {
            CouplingScale::Tanh(b) => HostScale::Tanh(host(op, b)?),
            CouplingScale::Sigmoid { floor } => HostScale::Sigmoid(floor),
        })
    }

    /// The log-scale `s` of changed channel `j` at raw value `sr`, and `exp(s)`.
    #[inline]
    fn s_exp(self, j: usize, sr: f32) -> (f32, f32) {
        match self {
            HostScale::Tanh(sc) => {
                let s = sc[j] * sr.tanh();
                (s, s.exp())
            }
            HostScale::Sigmoid(floor) => glow_scale(sr, floor),
        }
    }

    /// The inverse's unscaling of `v = y - t` at changed channel `j`, raw value `sr`:
    /// `v / exp(s)` for a floored Glow scale ([`glow_scale`] gives `exp(s)` directly), else
    /// `v * exp(-s)` (the kernel's `coupling::apply` does the same).
    #[inline]
    fn unscale(self, j: usize, sr: f32, v: f32) -> f32 {
        match self {
            HostScale::Sigmoid(floor) if floor > 0.0 => v / glow_scale(sr, floor).1,
            _ => v * (-self.s_exp(j, sr).0).exp(),
        }
    }
}

/// The f64 parameters of an LU-parametrised 1x1 convolution read from host buffers.
fn lu_host<'a>(op: &'static str, lu: &LuFactors<'a>) -> Result<invconv::LuParams<'a>> {
    Ok(invconv::LuParams {
        perm: host(op, lu.perm)?,
        sign: host(op, lu.sign)?,
        lower: host(op, lu.lower)?,
        upper: host(op, lu.upper)?,
        log_s: host(op, lu.log_s)?,
    })
}

fn invconv_err(op: &'static str, e: invconv::InvConvError) -> BackendError {
    BackendError::Device(format!("{op}: 1x1 convolution: {e}"))
}

fn write_f64(dst: &mut [f32], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s as f32;
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        let n = rayon::current_num_threads();
        let bf16 = if self.bf16_nets {
            ", bf16 networks"
        } else {
            ""
        };
        format!("cpu ({n} thread{}{bf16})", if n == 1 { "" } else { "s" })
    }
}

impl Memory for CpuBackend {
    fn zeros(&self, len: usize) -> Result<Buffer> {
        Ok(Buffer {
            storage: Storage::Host(vec![0.0; len]),
        })
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        Ok(Buffer {
            storage: Storage::Host(data.to_vec()),
        })
    }

    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()> {
        let op = "upload_into";
        expect_len(op, "dst", dst, data.len())?;
        host_mut(op, dst)?.copy_from_slice(data);
        Ok(())
    }

    fn download_all(&self, bufs: &[&Buffer]) -> Result<Vec<Vec<f32>>> {
        bufs.iter()
            .map(|b| Ok(host("download_all", b)?.to_vec()))
            .collect()
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        Ok(host("download", buf)?.to_vec())
    }

    fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<()> {
        expect_len("copy", "dst", dst, src.len())?;
        host_mut("copy", dst)?.copy_from_slice(host("copy", src)?);
        Ok(())
    }

    fn fill(&self, buf: &mut Buffer, value: f32) -> Result<()> {
        host_mut("fill", buf)?.fill(value);
        Ok(())
    }

    fn axpy(&self, a: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        expect_len("axpy", "y", y, x.len())?;
        let x = host("axpy", x)?;
        host_mut("axpy", y)?
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, x) in y.iter_mut().zip(x) {
                    *y += a * x;
                }
            });
        Ok(())
    }

    fn sum_squares(&self, x: &Buffer) -> Result<f64> {
        let x = host("sum_squares", x)?;
        let parts: Vec<f64> = x
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
            .collect();
        Ok(parts.iter().sum())
    }

    fn sum_squares_all(&self, xs: &[Buffer]) -> Result<f64> {
        let mut total = 0.0;
        for x in xs {
            total += self.sum_squares(x)?;
        }
        Ok(total)
    }
}

/// The convolution ops on host buffers, in f32 or (`bf16`) with the networks' bf16
/// kernels: the one place the CPU backend calls `conv`.
impl CpuBackend {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        op: &'static str,
        bf16: bool,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        check::conv_forward(s, x, w, b, y)?;
        let f = if bf16 {
            conv::conv2d_forward_bf16
        } else {
            conv::conv2d_forward
        };
        f(
            s,
            host(op, x)?,
            host(op, w)?,
            host(op, b)?,
            relu,
            host_mut(op, y)?,
        );
        Ok(())
    }

    fn backward_data(
        op: &'static str,
        bf16: bool,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        check::conv_backward_data(s, dy, w, dx)?;
        let f = if bf16 {
            conv::conv2d_backward_data_bf16
        } else {
            conv::conv2d_backward_data
        };
        f(s, host(op, dy)?, host(op, w)?, host_mut(op, dx)?);
        Ok(())
    }

    fn backward_weight(
        op: &'static str,
        bf16: bool,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        check::conv_backward_weight(s, x, dy, dw, db)?;
        let f = if bf16 {
            conv::conv2d_backward_weight_bf16
        } else {
            conv::conv2d_backward_weight
        };
        f(
            s,
            host(op, x)?,
            host(op, dy)?,
            host_mut(op, dw)?,
            host_mut(op, db)?,
        );
        Ok(())
    }
}

impl Convolution for CpuBackend {
    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        Self::forward("conv_forward", false, s, x, w, b, relu, y)
    }

    fn conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        Self::backward_data("conv_backward_data", false, s, dy, w, dx)
    }

    fn conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        Self::backward_weight("conv_backward_weight", false, s, x, dy, dw, db)
    }

    fn net_conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        Self::forward("net_conv_forward", self.bf16_nets, s, x, w, b, relu, y)
    }

    fn net_conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        Self::backward_data("net_conv_backward_data", self.bf16_nets, s, dy, w, dx)
    }

    fn net_conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        let op = "net_conv_backward_weight";
        Self::backward_weight(op, self.bf16_nets, s, x, dy, dw, db)
    }

    fn relu_backward(&self, y: &Buffer, dy: &mut Buffer) -> Result<()> {
        expect_len("relu_backward", "dy", dy, y.len())?;
        let y = host("relu_backward", y)?;
        host_mut("relu_backward", dy)?
            .par_chunks_mut(CHUNK)
            .zip(y.par_chunks(CHUNK))
            .for_each(|(d, y)| {
                // A select rather than a conditional store: it vectorises, and a branch
                // here is mispredicted about half the time (ReLU zeroes about half the
                // activations), which made this the third most expensive op of a step.
                for (d, &y) in d.iter_mut().zip(y) {
                    *d = if y <= 0.0 { 0.0 } else { *d };
                }
            });
        Ok(())
    }
}

impl FlowLayers for CpuBackend {
    fn logit_forward(
        &self,
        shape: Shape4,
        alpha: f32,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "logit_forward";
        check::logit_forward(shape, x, log_det)?;
        let n = shape.image_len().max(1);
        let span = 1.0 - 2.0 * alpha;
        let log_span = span.ln();
        host_mut(op, x)?
            .par_chunks_mut(n)
            .zip(host_mut(op, log_det)?.par_iter_mut())
            .for_each(|(img, ld)| {
                let mut acc = 0.0f64;
                for v in img.iter_mut() {
                    let s = alpha + span * *v;
                    let (ls, l1s) = (s.ln(), (1.0 - s).ln());
                    *v = ls - l1s;
                    acc += f64::from(log_span - ls - l1s);
                }
                *ld = acc as f32;
            });
        Ok(())
    }

    fn logit_inverse(&self, alpha: f32, x: &mut Buffer) -> Result<()> {
        let span = 1.0 - 2.0 * alpha;
        host_mut("logit_inverse", x)?
            .par_chunks_mut(CHUNK)
            .for_each(|c| {
                for v in c {
                    let s = 1.0 / (1.0 + (-*v).exp());
                    *v = (s - alpha) / span;
                }
            });
        Ok(())
    }

    fn squeeze(&self, shape: Shape4, inverse: bool, x: &Buffer, y: &mut Buffer) -> Result<()> {
        let op = "squeeze";
        check::squeeze(shape, x, y)?;
        let n = shape.image_len().max(1);
        let (c, h, w) = (shape.channels, shape.height, shape.width);
        let x = host(op, x)?;
        let failed = host_mut(op, y)?
            .par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .map(|(y, x)| {
                if inverse {
                    clayflow_kernel::squeeze::unsqueeze(c, h, w, x, y)
                } else {
                    clayflow_kernel::squeeze::squeeze(c, h, w, x, y)
                }
            })
            .find_any(|r| r.is_err());
        match failed {
            Some(Err(e)) => Err(BackendError::Device(format!("squeeze: {e}"))),
            _ => Ok(()),
        }
    }

    fn mask_gather(
        &self,
        shape: Shape4,
        mask: Mask,
        x: &Buffer,
        cnn_in: &mut Buffer,
    ) -> Result<()> {
        let op = "mask_gather";
        let (_, cin) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::mask_gather(shape, mask, x, cnn_in)?;
        let x = host(op, x)?;
        host_mut(op, cnn_in)?
            .par_chunks_mut((cin * p).max(1))
            .zip(x.par_chunks(shape.image_len().max(1)))
            .for_each(|(dst, src)| {
                if mask.is_channel() {
                    for (d, s) in dst
                        .chunks_exact_mut(p)
                        .zip(src.chunks_exact(p).skip(mask.parity()).step_by(2))
                    {
                        d.copy_from_slice(s);
                    }
                } else {
                    for (d, s) in dst.chunks_exact_mut(p).zip(src.chunks_exact(p)) {
                        for (i, (d, &s)) in d.iter_mut().zip(s).enumerate() {
                            *d = if is_changed(mask, i, shape.width) {
                                0.0
                            } else {
                                s
                            };
                        }
                    }
                }
            });
        Ok(())
    }

    fn mask_scatter_add(
        &self,
        shape: Shape4,
        mask: Mask,
        d_cnn_in: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        let op = "mask_scatter_add";
        let (_, cin) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::mask_scatter_add(shape, mask, d_cnn_in, dx)?;
        let d = host(op, d_cnn_in)?;
        host_mut(op, dx)?
            .par_chunks_mut(shape.image_len().max(1))
            .zip(d.par_chunks((cin * p).max(1)))
            .for_each(|(dx, d)| {
                if mask.is_channel() {
                    for (dx, d) in dx
                        .chunks_exact_mut(p)
                        .skip(mask.parity())
                        .step_by(2)
                        .zip(d.chunks_exact(p))
                    {
                        for (a, b) in dx.iter_mut().zip(d) {
                            *a += b;
                        }
                    }
                } else {
                    for (dx, d) in dx.chunks_exact_mut(p).zip(d.chunks_exact(p)) {
                        for (i, (a, b)) in dx.iter_mut().zip(d).enumerate() {
                            if !is_changed(mask, i, shape.width) {
                                *a += b;
                            }
                        }
                    }
                }
            });
        Ok(())
    }

    fn coupling_forward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_forward";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling(op, shape, mask, ("x", x), st, scale, Some(log_det))?;
        let (st, f) = (host(op, st)?, HostScale::of(op, scale)?);
        host_mut(op, x)?
            .par_chunks_mut(shape.image_len().max(1))
            .zip(st.par_chunks((2 * cc * p).max(1)))
            .zip(host_mut(op, log_det)?.par_iter_mut())
            .for_each(|((x, st), ld)| {
                let (s_all, t_all) = st.split_at(cc * p);
                let mut acc = 0.0f64;
                for j in 0..cc {
                    let ch = mask.changed_channel(j);
                    let xs = &mut x[ch * p..(ch + 1) * p];
                    let (sr, t) = (&s_all[j * p..(j + 1) * p], &t_all[j * p..(j + 1) * p]);
                    for i in 0..p {
                        if !is_changed(mask, i, shape.width) {
                            continue;
                        }
                        let (s, e) = f.s_exp(j, sr[i]);
                        xs[i] = xs[i] * e + t[i];
                        acc += f64::from(s);
                    }
                }
                *ld += acc as f32;
            });
        Ok(())
    }

    fn coupling_inverse(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_inverse";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling(op, shape, mask, ("y", y), st, scale, None)?;
        let (st, f) = (host(op, st)?, HostScale::of(op, scale)?);
        host_mut(op, y)?
            .par_chunks_mut(shape.image_len().max(1))
            .zip(st.par_chunks((2 * cc * p).max(1)))
            .for_each(|(y, st)| {
                let (s_all, t_all) = st.split_at(cc * p);
                for j in 0..cc {
                    let ch = mask.changed_channel(j);
                    let ys = &mut y[ch * p..(ch + 1) * p];
                    let (sr, t) = (&s_all[j * p..(j + 1) * p], &t_all[j * p..(j + 1) * p]);
                    for i in 0..p {
                        if is_changed(mask, i, shape.width) {
                            ys[i] = f.unscale(j, sr[i], ys[i] - t[i]);
                        }
                    }
                }
            });
        Ok(())
    }

    fn coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        x: &Buffer,
        st: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()> {
        let op = "coupling_backward";
        let (cc, _) = mask.split_channels(shape.channels);
        let p = shape.plane();
        check::coupling_backward(shape, mask, scale, x, st, dy, d_st, d_scale)?;
        let (x, st, f) = (host(op, x)?, host(op, st)?, HostScale::of(op, scale)?);
        let n = shape.image_len().max(1);
        let m = (2 * cc * p).max(1);
        // Per-image partial d_scale (tanh only), summed in image order afterwards
        // (deterministic).
        let partials: Vec<Vec<f64>> = host_mut(op, dy)?
            .par_chunks_mut(n)
            .zip(host_mut(op, d_st)?.par_chunks_mut(m))
            .zip(x.par_chunks(n).zip(st.par_chunks(m)))
            .map(|((dy, dst), (x, st))| {
                let s_all = &st[..cc * p];
                let (ds_all, dt_all) = dst.split_at_mut(cc * p);
                let mut dscale = vec![0.0f64; cc];
                for j in 0..cc {
                    let ch = mask.changed_channel(j);
                    let (xs, dys) = (&x[ch * p..(ch + 1) * p], &mut dy[ch * p..(ch + 1) * p]);
                    let sr = &s_all[j * p..(j + 1) * p];
                    let (dsr, dt) = (
                        &mut ds_all[j * p..(j + 1) * p],
                        &mut dt_all[j * p..(j + 1) * p],
                    );
                    let mut acc = 0.0f64;
                    for i in 0..p {
                        if !is_changed(mask, i, shape.width) {
                            // Kept pixel: identity, and (s, t) here are unused.
                            dsr[i] = 0.0;
                            dt[i] = 0.0;
                            continue;
                        }
                        let g = dys[i];
                        // y = x e^s + t:  dL/ds = g x e^s + dL/dlogdet (log-det += s).
                        let e = match f {
                            HostScale::Tanh(sc) => {
                                let th = sr[i].tanh();
                                let e = (sc[j] * th).exp();
                                let ds = g * xs[i] * e + g_log_det;
                                dsr[i] = ds * sc[j] * (1.0 - th * th);
                                acc += f64::from(ds * th);
                                e
                            }
                            HostScale::Sigmoid(floor) => {
                                let (e, dsdr) = glow_scale_grad(sr[i], floor);
                                let ds = g * xs[i] * e + g_log_det;
                                dsr[i] = ds * dsdr;
                                e
                            }
                        };
                        dt[i] = g;
                        dys[i] = g * e;
                    }
                    dscale[j] = acc;
                }
                dscale
            })
            .collect();
        if let HostScale::Tanh(_) = f {
            let ds = host_mut(op, d_scale)?;
            for part in &partials {
                for (d, v) in ds.iter_mut().zip(part) {
                    *d += *v as f32;
                }
            }
        }
        Ok(())
    }

    fn actnorm_forward(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_forward";
        check::actnorm_forward(shape, logs, bias, x, log_det)?;
        actnorm::forward(
            shape,
            host(op, logs)?,
            host(op, bias)?,
            host_mut(op, x)?,
            host_mut(op, log_det)?,
        );
        Ok(())
    }

    fn actnorm_inverse(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_inverse";
        check_actnorm(op, shape, logs, bias, y)?;
        actnorm::inverse(shape, host(op, logs)?, host(op, bias)?, host_mut(op, y)?);
        Ok(())
    }

    fn actnorm_backward(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_logs: &mut Buffer,
        d_bias: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_backward";
        check::actnorm_backward(shape, logs, x, dy, d_logs, d_bias)?;
        actnorm::backward(
            shape,
            host(op, x)?,
            host(op, logs)?,
            g_log_det,
            host_mut(op, dy)?,
            host_mut(op, d_logs)?,
            host_mut(op, d_bias)?,
        );
        Ok(())
    }

    fn actnorm_init(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &mut Buffer,
        bias: &mut Buffer,
    ) -> Result<()> {
        let op = "actnorm_init";
        check_actnorm(op, shape, logs, bias, x)?;
        let stats = actnorm::channel_stats(shape, host(op, x)?);
        let (l, b) = actnorm::init_from_stats(&stats);
        host_mut(op, logs)?.copy_from_slice(&l);
        host_mut(op, bias)?.copy_from_slice(&b);
        Ok(())
    }

    fn invconv_weight(&self, c: usize, lu: LuFactors<'_>, w: &mut Buffer) -> Result<()> {
        let op = "invconv_weight";
        check::invconv(op, c, &lu, "w", w)?;
        let wf = invconv::weight(c, &lu_host(op, &lu)?).map_err(|e| invconv_err(op, e))?;
        write_f64(host_mut(op, w)?, &wf);
        Ok(())
    }

    fn invconv_inverse(&self, c: usize, lu: LuFactors<'_>, w_inv: &mut Buffer) -> Result<()> {
        let op = "invconv_inverse";
        check::invconv(op, c, &lu, "w_inv", w_inv)?;
        let wf = invconv::weight(c, &lu_host(op, &lu)?).map_err(|e| invconv_err(op, e))?;
        let wi = invconv::inverse(c, &wf).map_err(|e| invconv_err(op, e))?;
        write_f64(host_mut(op, w_inv)?, &wi);
        Ok(())
    }

    fn invconv_backward(
        &self,
        c: usize,
        lu: LuFactors<'_>,
        d_w: &Buffer,
        g_log_det: f32,
        count: usize,
        d_lower: &mut Buffer,
        d_upper: &mut Buffer,
        d_log_s: &mut Buffer,
    ) -> Result<()> {
        let op = "invconv_backward";
        check::invconv_backward(c, &lu, d_w, d_lower, d_upper, d_log_s)?;
        let dw: Vec<f64> = host(op, d_w)?.iter().map(|&v| f64::from(v)).collect();
        let total = f64::from(g_log_det) * count as f64;
        let g =
            invconv::backward(c, &lu_host(op, &lu)?, &dw, total).map_err(|e| invconv_err(op, e))?;
        write_f64(host_mut(op, d_lower)?, &g.d_lower);
        write_f64(host_mut(op, d_upper)?, &g.d_upper);
        write_f64(host_mut(op, d_log_s)?, &g.d_log_s);
        Ok(())
    }

    fn add_log_det(&self, plane: usize, v: &Buffer, log_det: &mut Buffer) -> Result<()> {
        let op = "add_log_det";
        let sum: f64 = host(op, v)?.iter().map(|&x| f64::from(x)).sum();
        let ld = (plane as f64 * sum) as f32;
        for d in host_mut(op, log_det)? {
            *d += ld;
        }
        Ok(())
    }

    fn per_image_sum_squares(&self, shape: Shape4, z: &Buffer, acc: &mut Buffer) -> Result<()> {
        let op = "per_image_sum_squares";
        check::per_image_sum_squares(shape, z, acc)?;
        let sums: Vec<f64> = host(op, z)?
            .par_chunks(shape.image_len().max(1))
            .map(|img| img.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
            .collect();
        for (pair, s) in host_mut(op, acc)?.chunks_exact_mut(2).zip(sums) {
            let total = f64::from(pair[0]) + f64::from(pair[1]) + s;
            pair.copy_from_slice(&to_hi_lo(total));
        }
        Ok(())
    }
}

impl Optimiser for CpuBackend {
    fn adam(
        &self,
        hp: &AdamStep,
        param: &mut Buffer,
        grad: &Buffer,
        m: &mut Buffer,
        v: &mut Buffer,
    ) -> Result<()> {
        let op = "adam";
        check::adam(param, grad, m, v)?;
        let t = hp.step.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let step = hp.lr / bc1;
        let g = host(op, grad)?;
        host_mut(op, param)?
            .par_chunks_mut(CHUNK)
            .zip(host_mut(op, m)?.par_chunks_mut(CHUNK))
            .zip(host_mut(op, v)?.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let gi = g[i] * hp.grad_scale;
                    m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * gi;
                    v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * gi * gi;
                    p[i] -= step * m[i] / ((v[i] / bc2).sqrt() + hp.eps);
                }
            });
        Ok(())
    }

    fn adam_all(
        &self,
        hp: &AdamStep,
        params: &mut [Buffer],
        grads: &[Buffer],
        m: &mut [Buffer],
        v: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()> {
        check_adam_all(params, grads, m, v, trainable)?;
        for ((((p, g), m), v), _) in params
            .iter_mut()
            .zip(grads)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .zip(trainable)
            .filter(|t| *t.1)
        {
            self.adam(hp, p, g, m, v)?;
        }
        Ok(())
    }

    fn ema_all(
        &self,
        weight: f32,
        params: &[Buffer],
        avg: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()> {
        let op = "ema_all";
        check::check_ema_all(params, avg, trainable)?;
        for ((p, a), _) in params
            .iter()
            .zip(avg.iter_mut())
            .zip(trainable)
            .filter(|t| *t.1)
        {
            let p = host(op, p)?;
            host_mut(op, a)?
                .par_chunks_mut(CHUNK)
                .zip(p.par_chunks(CHUNK))
                .for_each(|(a, p)| {
                    for (a, p) in a.iter_mut().zip(p) {
                        *a += weight * (p - *a);
                    }
                });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(v: &[f32]) -> Buffer {
        CpuBackend::default().upload(v).unwrap()
    }

    fn get(b: &Buffer) -> Vec<f32> {
        CpuBackend::default().download(b).unwrap()
    }

    /// Glow's scale: the inverse undoes the forward and every `exp(s)` lies in (f, 1), so the
    /// log-dets are negative, and the inverse expands at most `1/f`-fold however negative
    /// `s_raw` is (without the floor it reaches infinity).
    #[test]
    fn sigmoid_coupling_inverts_and_its_inverse_expansion_is_bounded() {
        let shape = Shape4 {
            batch: 2,
            channels: 4,
            height: 3,
            width: 3,
        };
        let mask = Mask::ChannelEven;
        let x0: Vec<f32> = (0..shape.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        let st: Vec<f32> = (0..2 * 2 * 9 * 2)
            .map(|i| (i as f32 * 0.91).cos() * 3.0)
            .collect();
        for floor in [0.0, 0.0625] {
            let f = CouplingScale::Sigmoid { floor };
            let (st, mut x, mut ld) = (buf(&st), buf(&x0), buf(&[0.0, 0.0]));
            CpuBackend::default()
                .coupling_forward(shape, mask, f, &st, &mut x, &mut ld)
                .unwrap();
            assert!(get(&ld).iter().all(|&l| l < 0.0 && l.is_finite()));
            CpuBackend::default()
                .coupling_inverse(shape, mask, f, &st, &mut x)
                .unwrap();
            for (a, b) in get(&x).iter().zip(&x0) {
                assert!((a - b).abs() < 1e-5, "floor {floor}: {a} vs {b}");
            }
        }
        // s_raw = -1e4 everywhere, t = 0: the inverse multiplies the changed half by 1/f.
        let per = 2 * 9;
        let mut wild = vec![0.0f32; 2 * 2 * per];
        for img in wild.chunks_mut(2 * per) {
            img[..per].fill(-1e4);
        }
        let y0 = vec![1.0f32; shape.len()];
        for (floor, want) in [(0.0625f32, 16.0f32), (0.0, f32::INFINITY)] {
            let mut y = buf(&y0);
            let f = CouplingScale::Sigmoid { floor };
            CpuBackend::default()
                .coupling_inverse(shape, mask, f, &buf(&wild), &mut y)
                .unwrap();
            let top = get(&y).iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if want.is_finite() {
                assert!((top - want).abs() < 1e-3 * want, "floor {floor}: {top}");
            } else {
                assert_eq!(top, want, "floor 0 overflows");
            }
        }
    }

    /// Both scale functions' backward against central differences of
    /// `L = sum(w * y) + g * log_det`.
    #[test]
    fn coupling_backward_matches_finite_differences() {
        let shape = Shape4 {
            batch: 1,
            channels: 2,
            height: 2,
            width: 2,
        };
        let mask = Mask::ChannelOdd;
        let x: Vec<f32> = vec![0.3, -0.2, 0.5, 0.1, -0.7, 0.4, 0.2, -0.1];
        let st: Vec<f32> = vec![0.2, -1.0, 0.5, 2.0, 0.1, 0.3, -0.2, 0.4];
        let w: Vec<f32> = (0..8).map(|i| (i as f32 * 1.3).sin()).collect();
        let scale = buf(&[0.8]);
        let g_ld = -0.7f32;
        for f in [
            CouplingScale::Tanh(&scale),
            CouplingScale::Sigmoid { floor: 0.0 },
            CouplingScale::Sigmoid { floor: 0.0625 },
            CouplingScale::Sigmoid { floor: 0.5 },
        ] {
            let loss = |x: &[f32], st: &[f32]| {
                let (mut y, mut ld) = (buf(x), buf(&[0.0]));
                CpuBackend::default()
                    .coupling_forward(shape, mask, f, &buf(st), &mut y, &mut ld)
                    .unwrap();
                let y = get(&y);
                y.iter().zip(&w).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                    + f64::from(g_ld * get(&ld)[0])
            };
            let (mut dy, mut d_st, mut d_scale) = (buf(&w), buf(&[0.0; 8]), buf(&[0.0]));
            CpuBackend::default()
                .coupling_backward(
                    shape,
                    mask,
                    f,
                    &buf(&x),
                    &buf(&st),
                    g_ld,
                    &mut dy,
                    &mut d_st,
                    &mut d_scale,
                )
                .unwrap();
            let (dy, d_st) = (get(&dy), get(&d_st));
            let eps = 1e-3f32;
            for k in 0..8 {
                let (mut a, mut b) = (st.clone(), st.clone());
                a[k] += eps;
                b[k] -= eps;
                let fd = (loss(&x, &a) - loss(&x, &b)) / (2.0 * f64::from(eps));
                assert!((fd - f64::from(d_st[k])).abs() < 1e-3, "{f:?} st[{k}]");
            }
            // The changed channel (0 for ChannelOdd).
            for k in 0..4 {
                let (mut a, mut b) = (x.clone(), x.clone());
                a[k] += eps;
                b[k] -= eps;
                let fd = (loss(&a, &st) - loss(&b, &st)) / (2.0 * f64::from(eps));
                assert!((fd - f64::from(dy[k])).abs() < 1e-3, "{f:?} x[{k}]");
            }
            match f {
                CouplingScale::Sigmoid { .. } => assert_eq!(get(&d_scale), vec![0.0]),
                CouplingScale::Tanh(_) => {
                    let at = |s: f32| {
                        let sc = buf(&[s]);
                        let (mut y, mut ld) = (buf(&x), buf(&[0.0]));
                        CpuBackend::default()
                            .coupling_forward(
                                shape,
                                mask,
                                CouplingScale::Tanh(&sc),
                                &buf(&st),
                                &mut y,
                                &mut ld,
                            )
                            .unwrap();
                        get(&y)
                            .iter()
                            .zip(&w)
                            .map(|(a, b)| f64::from(a * b))
                            .sum::<f64>()
                            + f64::from(g_ld * get(&ld)[0])
                    };
                    let fd = (at(0.8 + eps) - at(0.8 - eps)) / (2.0 * f64::from(eps));
                    assert!((fd - f64::from(get(&d_scale)[0])).abs() < 1e-3, "scale");
                }
            }
        }
    }
}
