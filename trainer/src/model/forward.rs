//! The forward pass (image -> latent, with log-likelihood) and Glow's data-dependent
//! initialisation.

use super::{
    bpd, d_f64, kept_shape, latent_blocks, shape4, size_err, slot, split,
    workspace::{adjacent, CouplingCache, Workspace},
    BatchStats, Flow,
};
use crate::backend::{hi_lo, BackendError, Result};
use clayflow_kernel::Mask;
use std::f64::consts::PI;

impl Flow {
    /// Runs the coupling CNN of step `i` on `cache.cnn_in`, filling h1, h2 and st.
    pub(super) fn cnn_forward(
        &self,
        i: usize,
        mask: Mask,
        batch: usize,
        cache: &mut CouplingCache,
    ) -> Result<()> {
        let p = self.coupling(i)?;
        let view = self.arch.step_arch(i);
        let b = &self.backend;
        b.net_conv_forward(
            &Self::conv(&view, batch, mask, 0),
            &cache.cnn_in,
            p.w[0],
            p.bias[0],
            true,
            &mut cache.h1,
        )?;
        b.net_conv_forward(
            &Self::conv(&view, batch, mask, 1),
            &cache.h1,
            p.w[1],
            p.bias[1],
            true,
            &mut cache.h2,
        )?;
        b.net_conv_forward(
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
            let lw = &mut ws.levels[l];
            if l + 1 < a.levels {
                self.prior_forward(l, batch, lw, &mut ws.log_det)?;
                split(b.as_ref(), fs, &lw.state, &mut lw.kept, &mut lw.latent)?;
            } else {
                self.top_forward(batch, lw, &mut ws.log_det)?;
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
}
