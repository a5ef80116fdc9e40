//! Glow's learned prior on the batch ([`Arch::prior`]): before each split, a coupling on the
//! channels that leave, conditioned on those that stay through one 3x3 convolution (the split
//! prior); after the last level, an ActNorm (the top prior). Forward, backward and inverse,
//! from the backend's coupling, convolution and ActNorm ops, so every backend runs it.
//!
//! [`Arch::prior`]: clayflow_kernel::Arch::prior

use super::{shape4, size_err, workspace::LevelWs, Flow};
use crate::backend::{Buffer, ConvShape, CouplingScale, Result, Shape4};
use crate::config::{tensors_per_step, PRIOR_KERNEL, PRIOR_TENSORS_PER_SPLIT};
use clayflow_kernel::Mask;

/// The split prior keeps the even channels (those that flow on) and changes the odd ones
/// (the level's latent), as the split sorts them.
const KEEP: Mask = Mask::ChannelEven;

/// `N` consecutive tensors of `t` from `at`, or a size error.
fn tensors<const N: usize>(t: &mut [Buffer], at: usize) -> Result<&mut [Buffer; N]> {
    let got = t.len();
    t.get_mut(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(size_err("learned prior", "grads", at + N, got))
}

impl Flow {
    /// Index of the first prior tensor: they follow every step's.
    fn prior_base(&self) -> usize {
        self.arch.couplings * tensors_per_step(&self.arch)
    }

    /// Index of level `l`'s split prior tensors: `scale`, `weight`, `bias`.
    fn prior_at(&self, l: usize) -> usize {
        self.prior_base() + l * PRIOR_TENSORS_PER_SPLIT
    }

    /// Index of the top prior's `logs` (its `bias` follows).
    fn top_at(&self) -> usize {
        self.prior_at(self.arch.levels - 1)
    }

    fn level_shape4(&self, l: usize, batch: usize) -> Shape4 {
        shape4(batch, self.arch.level_shape(l))
    }

    /// The split prior's convolution at level `l`: the kept half's `C/2` channels to
    /// `(s_raw, t)`, `C` channels.
    fn prior_conv(&self, l: usize, batch: usize) -> ConvShape {
        let (c, h, w) = self.arch.level_shape(l);
        ConvShape {
            batch,
            cin: c / 2,
            cout: c,
            height: h,
            width: w,
            kernel: PRIOR_KERNEL,
        }
    }

    fn prior_scale(&self, l: usize) -> CouplingScale<'_> {
        CouplingScale::Tanh(&self.params[self.prior_at(l)])
    }

    /// `(s_raw, t)` of level `l`'s split prior from the kept channels of `lw.state`, into the
    /// prior cache.
    fn prior_st(&self, l: usize, batch: usize, lw: &mut LevelWs) -> Result<()> {
        let Some(pc) = lw.prior.as_mut() else {
            return Ok(());
        };
        let b = &self.backend;
        let k = self.prior_at(l);
        b.mask_gather(self.level_shape4(l, batch), KEEP, &lw.state, &mut pc.cnn_in)?;
        b.net_conv_forward(
            &self.prior_conv(l, batch),
            &pc.cnn_in,
            &self.params[k + 1],
            &self.params[k + 2],
            false,
            &mut pc.st,
        )
    }

    /// The split prior of level `l` on `lw.state` before the split, keeping its input and
    /// activations; `log_det[i] += sum(s)`. A no-op without the prior.
    pub(super) fn prior_forward(
        &self,
        l: usize,
        batch: usize,
        lw: &mut LevelWs,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let Some(pc) = lw.prior.as_mut() else {
            return Ok(());
        };
        self.backend.copy(&lw.state, &mut pc.x_in)?;
        self.prior_st(l, batch, lw)?;
        let Some(pc) = lw.prior.as_ref() else {
            return Ok(());
        };
        self.backend.coupling_forward(
            self.level_shape4(l, batch),
            KEEP,
            self.prior_scale(l),
            &pc.st,
            &mut lw.state,
            log_det,
        )
    }

    /// Backward of [`Flow::prior_forward`]: `lw.d_state` (the gradient w.r.t. its output)
    /// becomes the gradient w.r.t. its input; writes the prior's gradients into `grads`.
    pub(super) fn prior_backward(
        &self,
        l: usize,
        batch: usize,
        lw: &mut LevelWs,
        g: f32,
        grads: &mut [Buffer],
    ) -> Result<()> {
        let Some(pc) = lw.prior.as_mut() else {
            return Ok(());
        };
        let b = &self.backend;
        let fs = self.level_shape4(l, batch);
        let k = self.prior_at(l);
        let [g_scale, g_w, g_b] = tensors::<3>(grads, k)?;
        b.fill(g_scale, 0.0)?;
        b.coupling_backward(
            fs,
            KEEP,
            self.prior_scale(l),
            &pc.x_in,
            &pc.st,
            -g,
            &mut lw.d_state,
            &mut pc.d_st,
            g_scale,
        )?;
        let s = self.prior_conv(l, batch);
        b.net_conv_backward_weight(&s, &pc.cnn_in, &pc.d_st, g_w, g_b)?;
        b.net_conv_backward_data(&s, &pc.d_st, &self.params[k + 1], &mut pc.d_cnn_in)?;
        b.mask_scatter_add(fs, KEEP, &pc.d_cnn_in, &mut lw.d_state)
    }

    /// The inverse of [`Flow::prior_forward`] on `lw.state` (after the merge).
    pub(super) fn prior_inverse(&self, l: usize, batch: usize, lw: &mut LevelWs) -> Result<()> {
        self.prior_st(l, batch, lw)?;
        let Some(pc) = lw.prior.as_ref() else {
            return Ok(());
        };
        self.backend.coupling_inverse(
            self.level_shape4(l, batch),
            KEEP,
            self.prior_scale(l),
            &pc.st,
            &mut lw.state,
        )
    }

    /// The top prior (an ActNorm) on the last level's `lw.state`, keeping its input;
    /// `log_det[i] += plane * sum(logs)`. A no-op without the prior.
    pub(super) fn top_forward(
        &self,
        batch: usize,
        lw: &mut LevelWs,
        log_det: &mut Buffer,
    ) -> Result<()> {
        let Some(top_in) = lw.top_in.as_mut() else {
            return Ok(());
        };
        let t = self.top_at();
        self.backend.copy(&lw.state, top_in)?;
        self.backend.actnorm_forward(
            self.level_shape4(self.arch.levels - 1, batch),
            &self.params[t],
            &self.params[t + 1],
            &mut lw.state,
            log_det,
        )
    }

    /// Backward of [`Flow::top_forward`], like [`Flow::prior_backward`].
    pub(super) fn top_backward(
        &self,
        batch: usize,
        lw: &mut LevelWs,
        g: f32,
        grads: &mut [Buffer],
    ) -> Result<()> {
        let Some(top_in) = lw.top_in.as_ref() else {
            return Ok(());
        };
        let b = &self.backend;
        let t = self.top_at();
        let [g_logs, g_bias] = tensors::<2>(grads, t)?;
        b.fill(g_logs, 0.0)?;
        b.fill(g_bias, 0.0)?;
        b.actnorm_backward(
            self.level_shape4(self.arch.levels - 1, batch),
            top_in,
            &self.params[t],
            -g,
            &mut lw.d_state,
            g_logs,
            g_bias,
        )
    }

    /// The inverse of [`Flow::top_forward`] on the last level's `lw.state`.
    pub(super) fn top_inverse(&self, batch: usize, lw: &mut LevelWs) -> Result<()> {
        if lw.top_in.is_none() {
            return Ok(());
        }
        let t = self.top_at();
        self.backend.actnorm_inverse(
            self.level_shape4(self.arch.levels - 1, batch),
            &self.params[t],
            &self.params[t + 1],
            &mut lw.state,
        )
    }
}
