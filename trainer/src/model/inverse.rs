//! The inverse pass (latent -> image), for sampling.

use super::{
    kept_shape, latent_blocks, merge, shape4, size_err, slot,
    workspace::{adjacent, Workspace},
    Flow,
};
use crate::backend::Result;

impl Flow {
    /// Maps latents `z` (host, `batch x D` in the kernel's layout, see [`latent_blocks`]) to
    /// dequantized images `u` (host, image layout): every level from the last, merging its
    /// latent back (and the learned prior's inverse), the steps inverted in reverse order;
    /// unsqueeze, inverse logit.
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
            let lw = &mut ws.levels[l];
            if l + 1 < a.levels {
                merge(b.as_ref(), fs, &lw.kept, &lw.latent, &mut lw.state)?;
                self.prior_inverse(l, batch, lw)?;
            } else {
                self.top_inverse(batch, lw)?;
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
