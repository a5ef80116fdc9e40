//! The buffers a pass runs in, for one batch size: the activation cache kept for the
//! backward pass and the gradient temporaries, their allocation, and the recomposition of
//! the 1x1 convolutions' `W` into them.

use super::Flow;
use crate::backend::{Buffer, Result};

/// Activations of one coupling, kept from the forward pass for the backward pass.
#[derive(Debug)]
pub(super) struct CouplingCache {
    pub(super) x_in: Buffer,
    pub(super) cnn_in: Buffer,
    pub(super) h1: Buffer,
    pub(super) h2: Buffer,
    pub(super) st: Buffer,
}

/// What one flow step keeps: for a Glow step the inputs of its ActNorm and of its 1x1
/// convolution, and the convolution's `W` and `W^-1` (recomposed from the LU factors on the
/// device on every pass); then its coupling's activations.
#[derive(Debug)]
pub(super) struct StepCache {
    pub(super) glow: Option<GlowCache>,
    pub(super) coupling: CouplingCache,
    pub(super) d_st: Buffer,
    pub(super) d_cnn_in: Buffer,
}

#[derive(Debug)]
pub(super) struct GlowCache {
    pub(super) an_in: Buffer,
    pub(super) ic_in: Buffer,
    pub(super) w: Buffer,
    pub(super) w_inv: Buffer,
}

/// Buffers of one level (scale) of the flow: its state and, before a split, the channels
/// that flow on (`kept`, even) and the ones that leave as this level's latent (odd).
#[derive(Debug)]
pub(super) struct LevelWs {
    pub(super) state: Buffer,
    pub(super) temp: Buffer,
    pub(super) d_state: Buffer,
    pub(super) d_temp: Buffer,
    pub(super) kept: Buffer,
    pub(super) latent: Buffer,
    pub(super) d_kept: Buffer,
    pub(super) d_latent: Buffer,
    pub(super) d_h1: Buffer,
    pub(super) d_h2: Buffer,
    /// Zero bias and a bias-gradient sink for the bias-free 1x1 convolution.
    pub(super) zero_bias: Buffer,
    pub(super) d_bias_sink: Buffer,
    pub(super) d_w: Buffer,
    /// The split prior's activations (a level before a split, with [`Arch::prior`]).
    ///
    /// [`Arch::prior`]: clayflow_kernel::Arch::prior
    pub(super) prior: Option<PriorCache>,
    /// The top prior's input (the last level, with the prior).
    pub(super) top_in: Option<Buffer>,
}

/// What the split prior's coupling keeps for the backward pass, and its gradient
/// temporaries: the level state it changes, the kept channels (its convolution's input),
/// the convolution's `(s_raw, t)`.
#[derive(Debug)]
pub(super) struct PriorCache {
    pub(super) x_in: Buffer,
    pub(super) cnn_in: Buffer,
    pub(super) st: Buffer,
    pub(super) d_st: Buffer,
    pub(super) d_cnn_in: Buffer,
}

/// Buffers for one batch size: the activation cache and the gradient temporaries.
#[derive(Debug)]
pub(super) struct Workspace {
    pub(super) batch: usize,
    /// Image-layout buffers for logit and the optional first squeeze; the batch is uploaded
    /// into `image`.
    pub(super) image: Buffer,
    /// Per-image log-det of every layer (f32, accumulated on the device).
    pub(super) log_det: Buffer,
    /// Per-image `sum(z^2)` over every level's latent, as f64 `(hi, lo)` pairs.
    pub(super) sq: Buffer,
    pub(super) levels: Vec<LevelWs>,
    pub(super) steps: Vec<StepCache>,
}

/// Levels `l - 1` and `l`, both mutable (for the transition between them).
pub(super) fn adjacent(levels: &mut [LevelWs], l: usize) -> (&mut LevelWs, &mut LevelWs) {
    let (prev, cur) = levels.split_at_mut(l);
    (&mut prev[l - 1], &mut cur[0])
}

impl Flow {
    pub(super) fn workspace(&mut self, batch: usize) -> Result<Workspace> {
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
                prior: if a.prior && half > 0 {
                    Some(PriorCache {
                        x_in: b.zeros(n)?,
                        cnn_in: b.zeros(half)?,
                        st: b.zeros(n)?,
                        d_st: b.zeros(n)?,
                        d_cnn_in: b.zeros(half)?,
                    })
                } else {
                    None
                },
                top_in: if a.prior && l + 1 == a.levels {
                    Some(b.zeros(n)?)
                } else {
                    None
                },
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
    pub(super) fn refresh_invconv(&self, ws: &mut Workspace, inverse: bool) -> Result<()> {
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
}
