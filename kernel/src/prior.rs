//! Glow's learned prior ([`Arch::prior`]) as flow layers.
//!
//! * **Split prior**, at the end of every level `l < L-1` (before the split): an affine
//!   coupling with mask [`Mask::ChannelEven`] on the level's state `(C, H, W)`, `h = C/2`.
//!   Its CNN is one 3x3 convolution ([`PRIOR_KERNEL`], "same" padding, bias, no ReLU) from
//!   the even channels (`h` planes) to `C` planes, `s_raw` (`0..h`) then `t` (`h..C`). Changed
//!   channel `j` is state channel `2j + 1`, with the seed's bounded scale
//!   `s = scale[j] * tanh(s_raw)` ([`ScaleFn::Tanh`]): forward `x = x exp(s) + t`, log-det
//!   `+= s`; inverse `x = (x - t) exp(-s)`. The odd channels are the ones the split then
//!   emits as the level's latent, so this is Glow's conditional prior
//!   `N(mu(even), sigma(even))` on them, with `sigma = exp(-s)`, `mu = -t exp(-s)`.
//! * **Top prior**, after the last level's steps: a per-channel ActNorm (in `flow.rs`).
//!
//! Both are the identity when their weights are 0.

use crate::arch::{Arch, Mask, PRIOR_KERNEL};
use crate::conv::{Conv, INTERNAL};
use crate::coupling::{apply, gather, scratch, ScaleFn, Work};
use crate::error::Error;
use crate::weights::PriorWeights;

/// The split prior's `(s_raw, t)` planes (`C` of them, in `work.region_a`) for the state `x`
/// of the level view `view` (shape `(C, H, W)`, `C` even).
fn cnn<'w>(
    view: &Arch,
    pw: &PriorWeights<'_>,
    x: &[f32],
    work: &'w mut Work<'_>,
) -> Result<&'w [f32], Error> {
    let (c, h, w) = view.flow_shape();
    if c < 2 || !c.is_multiple_of(2) || x.len() != view.dim() {
        return Err(INTERNAL);
    }
    let plane = view.plane();
    let half = c / 2;
    let input = scratch(work.cnn_in, half.saturating_mul(plane))?;
    gather(view, Mask::ChannelEven, x, input)?;
    let out = scratch(work.region_a, c.saturating_mul(plane))?;
    let conv = Conv {
        cin: half,
        cout: c,
        height: h,
        width: w,
        kernel: PRIOR_KERNEL,
    };
    conv.forward(input, pw.w, pw.b, false, out)?;
    Ok(out)
}

/// The split prior forward (image -> latent) on the state `x` of level view `view`, in
/// place; returns its log-det `sum(s)`.
pub(crate) fn forward(
    view: &Arch,
    pw: &PriorWeights<'_>,
    x: &mut [f32],
    work: &mut Work<'_>,
) -> Result<f32, Error> {
    let st = cnn(view, pw, x, work)?;
    apply(
        view,
        Mask::ChannelEven,
        ScaleFn::Tanh(pw.scale),
        st,
        x,
        false,
    )
}

/// The split prior inverse (latent -> image) on the state `y` of level view `view`, in place.
/// The even channels, which the CNN reads, are the forward's, so `(s_raw, t)` are too.
pub(crate) fn inverse(
    view: &Arch,
    pw: &PriorWeights<'_>,
    y: &mut [f32],
    work: &mut Work<'_>,
) -> Result<(), Error> {
    let st = cnn(view, pw, y, work)?;
    apply(
        view,
        Mask::ChannelEven,
        ScaleFn::Tanh(pw.scale),
        st,
        y,
        true,
    )
    .map(|_| ())
}
