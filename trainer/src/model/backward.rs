//! The backward pass: the gradient of the mean bits/dim through every op.

use super::{
    d_f64, kept_shape, merge, shape4, size_err, slot,
    workspace::{adjacent, Workspace},
    CouplingTensors, Flow,
};
use crate::backend::{BackendError, Buffer, Result};
use clayflow_kernel::arch::COUPLING_TENSORS;
use std::f64::consts::LN_2;

impl Flow {
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
                    self.prior_backward(l, batch, lw, g, grads)?;
                } else {
                    b.fill(&mut lw.d_state, 0.0)?;
                    b.axpy(g, &lw.state, &mut lw.d_state)?;
                    self.top_backward(batch, lw, g, grads)?;
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
                    b.net_conv_backward_weight(&s2, &cache.h2, d_st, gw2, gb2)?;
                    b.net_conv_backward_data(&s2, d_st, p.w[2], &mut lw.d_h2)?;
                    b.relu_backward(&cache.h2, &mut lw.d_h2)?;
                    b.net_conv_backward_weight(&s1, &cache.h1, &lw.d_h2, gw1, gb1)?;
                    b.net_conv_backward_data(&s1, &lw.d_h2, p.w[1], &mut lw.d_h1)?;
                    b.relu_backward(&cache.h1, &mut lw.d_h1)?;
                    b.net_conv_backward_weight(&s0, &cache.cnn_in, &lw.d_h1, gw0, gb0)?;
                    b.net_conv_backward_data(&s0, &lw.d_h1, p.w[0], &mut step.d_cnn_in)?;
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
}
