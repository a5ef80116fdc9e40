//! The model architecture: input shape, squeeze, couplings, masks, CNN sizes, preprocessing.
//!
//! Every size the kernel needs (parameter counts, scratch length, blob length) is a `const fn`
//! of an [`Arch`], so firmware can size `static` buffers at compile time.

use crate::error::{ArchField, Error};

/// Most couplings an architecture may have.
pub const MAX_COUPLINGS: usize = 32;

/// Which half of the coupling input is kept (passed through and fed to the CNN).
///
/// Channel masks split on the channel index; checkerboard masks on the pixel position
/// `(row + col) % 2`. The other half is changed by the affine transform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mask {
    /// Keep channels 0, 2, 4, ...; change the odd channels.
    ChannelEven = 0,
    /// Keep channels 1, 3, 5, ...; change the even channels.
    ChannelOdd = 1,
    /// Keep pixels with `(row + col)` even, in every channel; change the others.
    CheckerEven = 2,
    /// Keep pixels with `(row + col)` odd, in every channel; change the others.
    CheckerOdd = 3,
}

impl Mask {
    /// The mask from its blob code (the `repr(u8)` value).
    pub const fn from_code(code: u8) -> Option<Mask> {
        match code {
            0 => Some(Mask::ChannelEven),
            1 => Some(Mask::ChannelOdd),
            2 => Some(Mask::CheckerEven),
            3 => Some(Mask::CheckerOdd),
            _ => None,
        }
    }

    /// True for the channel-parity masks.
    pub const fn is_channel(self) -> bool {
        matches!(self, Mask::ChannelEven | Mask::ChannelOdd)
    }

    /// The parity (0 or 1) of the kept channels or kept pixels.
    pub const fn parity(self) -> usize {
        match self {
            Mask::ChannelEven | Mask::CheckerEven => 0,
            Mask::ChannelOdd | Mask::CheckerOdd => 1,
        }
    }

    /// `(changed, cnn_in)` for an input of `channels` channels: the channels a coupling
    /// changes, and its CNN's input channels. A channel mask keeps `ceil(C/2)` channels for
    /// even parity and `floor(C/2)` for odd; a checkerboard keeps half of every channel, so
    /// all channels are both changed and (masked) CNN input.
    pub const fn split_channels(self, channels: usize) -> (usize, usize) {
        // floor + ceil = channels, so neither sum nor difference is ever formed.
        let (floor, ceil) = (channels / 2, channels.div_ceil(2));
        match self {
            Mask::ChannelEven => (floor, ceil),
            Mask::ChannelOdd => (ceil, floor),
            Mask::CheckerEven | Mask::CheckerOdd => (channels, channels),
        }
    }

    /// The channel that changed channel `j` (the `j`-th `s`/`t` plane) acts on.
    pub const fn changed_channel(self, j: usize) -> usize {
        // Keep parity p, change parity 1 - p. Saturating: an absurd `j` gives an index that
        // no buffer has, which callers turn into an error.
        match self {
            Mask::ChannelEven => j.saturating_mul(2).saturating_add(1),
            Mask::ChannelOdd => j.saturating_mul(2),
            Mask::CheckerEven | Mask::CheckerOdd => j,
        }
    }

    /// True when the coupling changes pixel `(row, col)` of a changed channel (always for
    /// channel masks; the other colour of the board for checkerboards).
    pub const fn changes_pixel(self, row: usize, col: usize) -> bool {
        // `(row ^ col) & 1` is the parity of `row + col` without forming the sum.
        self.is_channel() || (row ^ col) & 1 != self.parity()
    }

    /// The mask of the same kind with the other half kept.
    pub const fn flipped(self) -> Mask {
        match self {
            Mask::ChannelEven => Mask::ChannelOdd,
            Mask::ChannelOdd => Mask::ChannelEven,
            Mask::CheckerEven => Mask::CheckerOdd,
            Mask::CheckerOdd => Mask::CheckerEven,
        }
    }
}

/// A RealNVP architecture. Each coupling's CNN is
/// `conv(k0, cin -> hidden0) -> ReLU -> conv(k1, hidden0 -> hidden1) -> ReLU ->
/// conv(k2, hidden1 -> 2 * changed)`; the output's first `changed` channels are `s_raw`, the
/// last `changed` are `t`. With a channel mask `cin` is the kept channel count; with a
/// checkerboard mask the CNN sees all channels with the changed pixels zeroed.
#[derive(Clone, Copy, Debug)]
pub struct Arch {
    /// Image channels (1 grey, 3 colour).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Apply one 2x2 squeeze (space-to-depth) before the couplings.
    pub squeeze: bool,
    /// Scales of the multi-scale architecture (1: one scale, the seed's). Each level but the
    /// first begins with a squeeze; each level but the last ends with a split that emits
    /// the odd channels as that level's latent and keeps the even channels flowing.
    pub levels: usize,
    /// Glow steps: each coupling is preceded by an ActNorm and an invertible 1x1
    /// convolution (false: couplings only, the seed's RealNVP).
    pub glow: bool,
    /// Number of couplings (flow steps) used, the first `couplings` entries of `masks`;
    /// `couplings / levels` of them per level, in order from the image side.
    pub couplings: usize,
    /// Each coupling's mask, applied in order from image to latent.
    pub masks: [Mask; MAX_COUPLINGS],
    /// Kernel sizes of the three convolutions (odd).
    pub kernels: [usize; 3],
    /// Widths of the two hidden layers.
    pub hidden: [usize; 2],
    /// Pixel bit depth n (pixels are 0..2^n - 1).
    pub bits: u32,
    /// The logit constant a in `y = logit(a + (1 - 2a) u)`.
    pub logit_alpha: f32,
    /// The floor `f` of a Glow coupling's scale, `exp(s) = f + (1 - f) sigmoid(s_raw + 2)`
    /// ([`crate::coupling::glow_log_scale`]): a coupling contracts at most `1/f`-fold, so its
    /// inverse expands at most `1/f`-fold. `0` is Glow's unfloored sigmoid (models before
    /// 2026-12-06); [`GLOW_SCALE_FLOOR`] in the Glow presets. Always `0` without Glow steps.
    pub scale_floor: f32,
    /// Glow's learned prior (needs [`Arch::glow`]): at the end of every level but the last,
    /// before the split, an affine coupling on the channels that leave (the odd ones),
    /// conditioned on those that stay (the even ones) through one 3x3 convolution with the
    /// seed's bounded scale `s = scale * tanh(s_raw)` (Glow's split prior
    /// `N(mu(kept), sigma(kept))` with `sigma = exp(-s)`, `mu = -t exp(-s)`); and after the
    /// last level a per-channel affine (the learned top prior, an ActNorm). Both start as the
    /// identity (zero convolution, zero ActNorm). `false` in models before 2026-12-07.
    pub prior: bool,
}

/// The scale floor of the Glow presets, `1/16`: measured on a trained `mnist-glow`, fewer
/// than 1 in 10,000 of the scales its couplings use on held-out digits lie below it, while
/// without a floor one sampled latent in 5,000 made a coupling's inverse expand 50,000-fold
/// and the next ones overflow to infinity.
pub const GLOW_SCALE_FLOOR: f32 = 0.0625;

/// Two architectures are equal when every field and the *active* masks agree (the unused
/// mask slots past `couplings` are ignored).
impl PartialEq for Arch {
    fn eq(&self, o: &Arch) -> bool {
        self.channels == o.channels
            && self.height == o.height
            && self.width == o.width
            && self.squeeze == o.squeeze
            && self.levels == o.levels
            && self.glow == o.glow
            && self.couplings == o.couplings
            && self.active_masks() == o.active_masks()
            && self.kernels == o.kernels
            && self.hidden == o.hidden
            && self.bits == o.bits
            && self.logit_alpha.to_bits() == o.logit_alpha.to_bits()
            && self.scale_floor.to_bits() == o.scale_floor.to_bits()
            && self.prior == o.prior
    }
}

/// Masks that alternate `first`, flipped, `first`, ... over all [`MAX_COUPLINGS`] slots.
pub const fn alternating_masks(first: Mask) -> [Mask; MAX_COUPLINGS] {
    let mut masks = [first; MAX_COUPLINGS];
    let mut next = first;
    let mut rest: &mut [Mask] = &mut masks;
    while let [slot, tail @ ..] = rest {
        *slot = next;
        next = next.flipped();
        rest = tail;
    }
    masks
}

/// The seed's MNIST model, corrected: 1x28x28 squeezed to 4x14x14, 12 channel-parity
/// couplings alternating even/odd, convs 5x5 -> 7x7 -> 3x3 with widths 4x and 32x the two
/// kept channels (8 and 64). 334,440 parameters.
pub const MNIST: Arch = Arch {
    channels: 1,
    height: 28,
    width: 28,
    squeeze: true,
    levels: 1,
    glow: false,
    couplings: 12,
    masks: alternating_masks(Mask::ChannelEven),
    kernels: [5, 7, 3],
    hidden: [8, 64],
    bits: 8,
    logit_alpha: 0.05,
    prior: false,
    scale_floor: 0.0,
};

/// The seed's colour model, corrected: 3x32x32 squeezed to 12x16x16, 12 channel-parity
/// couplings, convs 5x5 -> 7x7 -> 3x3 with widths 4x and 32x the six kept channels (24 and
/// 192). 3,004,344 parameters.
pub const COLOR: Arch = Arch {
    channels: 3,
    height: 32,
    width: 32,
    squeeze: true,
    levels: 1,
    glow: false,
    couplings: 12,
    masks: alternating_masks(Mask::ChannelEven),
    kernels: [5, 7, 3],
    hidden: [24, 192],
    bits: 8,
    logit_alpha: 0.05,
    prior: false,
    scale_floor: 0.0,
};

/// A Glow-class MNIST model: 1x28x28 squeezed to 4x14x14, 2 levels of 16 steps (ActNorm,
/// invertible 1x1 conv, channel-parity coupling with a 3x3 -> 1x1 -> 3x3 CNN of width 64);
/// the first level splits off 2x14x14 as latent, the second runs on 8x7x7.
pub const MNIST_GLOW: Arch = Arch {
    channels: 1,
    height: 28,
    width: 28,
    squeeze: true,
    levels: 2,
    glow: true,
    couplings: 32,
    masks: alternating_masks(Mask::ChannelEven),
    kernels: [3, 1, 3],
    hidden: [64, 64],
    bits: 8,
    logit_alpha: 0.05,
    prior: false,
    scale_floor: GLOW_SCALE_FLOOR,
};

/// A Glow-class colour model: 3x32x32 squeezed to 12x16x16, 3 levels of 8 steps on
/// 12x16x16, 24x8x8 and 48x4x4 (each split keeps half the channels, each squeeze
/// quadruples them), CNN width 224, with Glow's learned prior (split and top): on the bundled
/// photos it scored better and overfitted more slowly on both seeds measured (`BENCHMARKS.md`
/// section 13).
pub const COLOR_GLOW: Arch = Arch {
    channels: 3,
    height: 32,
    width: 32,
    squeeze: true,
    levels: 3,
    glow: true,
    couplings: 24,
    masks: alternating_masks(Mask::ChannelEven),
    kernels: [3, 1, 3],
    hidden: [224, 224],
    bits: 8,
    logit_alpha: 0.05,
    prior: true,
    scale_floor: GLOW_SCALE_FLOOR,
};

/// Largest image (C*H*W) the kernel accepts.
pub const MAX_DIM: usize = 1 << 22;
/// Largest parameter count the kernel accepts.
pub const MAX_PARAMS: usize = 1 << 28;
/// Largest scratch ([`scratch_len`], f32 elements) the kernel accepts: 1 GiB.
///
/// With [`MAX_DIM`] and [`MAX_PARAMS`] this bounds every size the kernel forms from a valid
/// architecture (a region, a tensor, a blob) below `2^30` bytes, so none of its index or
/// size arithmetic can overflow even where `usize` is 32 bits. Without it, 1024x1024 pixels
/// times a hidden width of 4096 is `2^32` elements, which wraps on a 32-bit target.
pub const MAX_SCRATCH: usize = 1 << 28;

/// Shape of one parameter tensor, in blob order (see `FORMAT.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// Per-changed-channel scale of `tanh(s_raw)`, `[changed]`. Glow steps, whose log-scale
    /// is `log sigmoid(s_raw + 2)`, have none: its length is 0 there ([`Arch::tensor_len`]).
    Scale,
    /// Conv weight `[cout][cin][k][k]` of conv `0..3`.
    ConvWeight(usize),
    /// Conv bias `[cout]` of conv `0..3`.
    ConvBias(usize),
    /// ActNorm log-scale `[C]` (Glow step): `y = x exp(logs) + bias` per channel.
    ActNormLogs,
    /// ActNorm bias `[C]` (Glow step).
    ActNormBias,
    /// Invertible 1x1 convolution `W [C][C]` (Glow step): `y[o] = sum_i W[o][i] x[i]`.
    InvConvWeight,
    /// `W^-1 [C][C]`, computed at export so the device never inverts a matrix.
    InvConvInverse,
    /// `log|det W|` `[1]`, computed at export; the step's log-det adds it once per pixel.
    InvConvLogDet,
    /// Split prior (level `l < levels - 1`, [`Arch::prior`]): the scale of `tanh(s_raw)`,
    /// `[C/2]` (`C` the level's channels).
    PriorScale,
    /// Split prior: the 3x3 convolution's weight `[C][C/2][3][3]` (input: the even channels;
    /// output planes `0..C/2` are `s_raw`, `C/2..C` are `t`).
    PriorWeight,
    /// Split prior: the convolution's bias `[C]`.
    PriorBias,
    /// Top prior (after the last level): the ActNorm log-scale `[C_last]`.
    TopLogs,
    /// Top prior: the ActNorm bias `[C_last]`.
    TopBias,
}

impl core::fmt::Display for TensorKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TensorKind::Scale => f.write_str("scale"),
            TensorKind::ConvWeight(j) => write!(f, "conv {j} weight"),
            TensorKind::ConvBias(j) => write!(f, "conv {j} bias"),
            TensorKind::ActNormLogs => f.write_str("actnorm log-scale"),
            TensorKind::ActNormBias => f.write_str("actnorm bias"),
            TensorKind::InvConvWeight => f.write_str("1x1 conv weight"),
            TensorKind::InvConvInverse => f.write_str("1x1 conv inverse"),
            TensorKind::InvConvLogDet => f.write_str("1x1 conv log-det"),
            TensorKind::PriorScale => f.write_str("prior scale"),
            TensorKind::PriorWeight => f.write_str("prior conv weight"),
            TensorKind::PriorBias => f.write_str("prior conv bias"),
            TensorKind::TopLogs => f.write_str("top prior log-scale"),
            TensorKind::TopBias => f.write_str("top prior bias"),
        }
    }
}

/// The tensors of one coupling, in blob order.
pub const COUPLING_TENSORS: [TensorKind; 7] = [
    TensorKind::Scale,
    TensorKind::ConvWeight(0),
    TensorKind::ConvBias(0),
    TensorKind::ConvWeight(1),
    TensorKind::ConvBias(1),
    TensorKind::ConvWeight(2),
    TensorKind::ConvBias(2),
];

/// The tensors a Glow step has before its coupling's, in blob order.
pub const GLOW_TENSORS: [TensorKind; 5] = [
    TensorKind::ActNormLogs,
    TensorKind::ActNormBias,
    TensorKind::InvConvWeight,
    TensorKind::InvConvInverse,
    TensorKind::InvConvLogDet,
];

/// The tensors of one Glow step in blob order: [`GLOW_TENSORS`] then [`COUPLING_TENSORS`].
pub const STEP_TENSORS: [TensorKind; 12] = [
    TensorKind::ActNormLogs,
    TensorKind::ActNormBias,
    TensorKind::InvConvWeight,
    TensorKind::InvConvInverse,
    TensorKind::InvConvLogDet,
    TensorKind::Scale,
    TensorKind::ConvWeight(0),
    TensorKind::ConvBias(0),
    TensorKind::ConvWeight(1),
    TensorKind::ConvBias(1),
    TensorKind::ConvWeight(2),
    TensorKind::ConvBias(2),
];

/// The tensors of one split prior ([`Arch::prior`], every level but the last), in blob order.
pub const PRIOR_TENSORS: [TensorKind; 3] = [
    TensorKind::PriorScale,
    TensorKind::PriorWeight,
    TensorKind::PriorBias,
];

/// The tensors of the top prior ([`Arch::prior`], after the last level), in blob order.
pub const TOP_TENSORS: [TensorKind; 2] = [TensorKind::TopLogs, TensorKind::TopBias];

/// Kernel size of the split prior's one convolution.
pub const PRIOR_KERNEL: usize = 3;

/// The tensors of one flow step in blob order: [`STEP_TENSORS`] for a Glow architecture,
/// [`COUPLING_TENSORS`] otherwise.
pub const fn step_tensors(glow: bool) -> &'static [TensorKind] {
    if glow {
        &STEP_TENSORS
    } else {
        &COUPLING_TENSORS
    }
}

impl TensorKind {
    /// True for the Glow tensors (ActNorm and the invertible 1x1 convolution), which a blob
    /// always stores as f32; false for the coupling tensors, stored in the blob's dtype, and
    /// for the prior's (f32 too: [`TensorKind::is_f32`] is the storage rule).
    pub const fn is_glow(self) -> bool {
        matches!(
            self,
            TensorKind::ActNormLogs
                | TensorKind::ActNormBias
                | TensorKind::InvConvWeight
                | TensorKind::InvConvInverse
                | TensorKind::InvConvLogDet
        )
    }

    /// True for the learned prior's tensors ([`PRIOR_TENSORS`], [`TOP_TENSORS`]).
    pub const fn is_prior(self) -> bool {
        matches!(
            self,
            TensorKind::PriorScale
                | TensorKind::PriorWeight
                | TensorKind::PriorBias
                | TensorKind::TopLogs
                | TensorKind::TopBias
        )
    }

    /// True for the tensors every blob stores as f32 whatever its dtype: the Glow tensors
    /// ([`TensorKind::is_glow`]) and the prior's ([`TensorKind::is_prior`]). The others (the
    /// coupling tensors) are stored in the blob's dtype.
    pub const fn is_f32(self) -> bool {
        self.is_glow() || self.is_prior()
    }
}

/// Most levels (scales) an architecture may have.
pub const MAX_LEVELS: usize = 8;

impl Arch {
    /// Pixels per image, `C * H * W`.
    pub const fn dim(&self) -> usize {
        self.channels
            .saturating_mul(self.height)
            .saturating_mul(self.width)
    }

    /// `(channels, height, width)` seen by the first level's couplings (after the optional
    /// squeeze); with one level, by every coupling, and the latent's shape.
    pub const fn flow_shape(&self) -> (usize, usize, usize) {
        if self.squeeze {
            (
                self.channels.saturating_mul(4),
                self.height / 2,
                self.width / 2,
            )
        } else {
            (self.channels, self.height, self.width)
        }
    }

    /// Pixels per channel plane in the flow shape.
    pub const fn plane(&self) -> usize {
        let (_, h, w) = self.flow_shape();
        h.saturating_mul(w)
    }

    /// Input channels of a coupling's CNN: the kept channels (channel mask) or all
    /// channels (checkerboard).
    pub const fn cnn_in(&self, mask: Mask) -> usize {
        mask.split_channels(self.flow_shape().0).1
    }

    /// Channels whose values a coupling changes (so also the number of `s` and `t` planes).
    pub const fn changed(&self, mask: Mask) -> usize {
        mask.split_channels(self.flow_shape().0).0
    }

    /// `(cin, cout, k)` of conv `j` (0, 1, 2) in a coupling with this mask.
    pub const fn conv_shape(&self, mask: Mask, j: usize) -> (usize, usize, usize) {
        match j {
            0 => (self.cnn_in(mask), self.hidden[0], self.kernels[0]),
            1 => (self.hidden[0], self.hidden[1], self.kernels[1]),
            _ => (
                self.hidden[1],
                self.changed(mask).saturating_mul(2),
                self.kernels[2],
            ),
        }
    }

    /// Element count of one tensor of a coupling with this mask (at the first level's shape;
    /// use [`Arch::level`] for the others).
    pub const fn tensor_len(&self, mask: Mask, kind: TensorKind) -> usize {
        let c = self.flow_shape().0;
        match kind {
            TensorKind::ActNormLogs | TensorKind::ActNormBias => c,
            TensorKind::InvConvWeight | TensorKind::InvConvInverse => c.saturating_mul(c),
            TensorKind::InvConvLogDet => 1,
            // Glow couplings bound their log-scale with a sigmoid and have no scale tensor
            // (blob version 3; version 2 stored an unused one, see `weights`).
            TensorKind::Scale if self.glow => 0,
            TensorKind::Scale => self.changed(mask),
            TensorKind::ConvWeight(j) => {
                let (cin, cout, k) = self.conv_shape(mask, j);
                cout.saturating_mul(cin).saturating_mul(k).saturating_mul(k)
            }
            TensorKind::ConvBias(j) => self.conv_shape(mask, j).1,
            // The prior's tensors (at a level view's shape; `mask` is not used): the split
            // prior's conv maps the C/2 even channels to C planes (s_raw, t).
            TensorKind::PriorScale => c / 2,
            TensorKind::PriorWeight => c
                .saturating_mul(c / 2)
                .saturating_mul(PRIOR_KERNEL * PRIOR_KERNEL),
            TensorKind::PriorBias | TensorKind::TopLogs | TensorKind::TopBias => c,
        }
    }

    /// Parameters (blob elements) of one flow step with this mask at the first level's
    /// shape: the Glow tensors when [`Arch::glow`], then the coupling's.
    pub const fn coupling_params(&self, mask: Mask) -> usize {
        let mut n = 0usize;
        if self.glow {
            let mut rest: &[TensorKind] = &GLOW_TENSORS;
            while let [kind, tail @ ..] = rest {
                n = n.saturating_add(self.tensor_len(mask, *kind));
                rest = tail;
            }
        }
        let mut rest: &[TensorKind] = &COUPLING_TENSORS;
        while let [kind, tail @ ..] = rest {
            n = n.saturating_add(self.tensor_len(mask, *kind));
            rest = tail;
        }
        n
    }

    /// Total parameter count (the length of the flat parameter vector, in blob order): every
    /// flow step's, then the learned prior's ([`Arch::prior_offset`]).
    pub const fn param_count(&self) -> usize {
        self.prior_offset(self.levels)
    }

    /// The learned prior's tensors at level `l` in blob order: [`PRIOR_TENSORS`] for a level
    /// that splits (`l < levels - 1`), [`TOP_TENSORS`] for the last level, none without
    /// [`Arch::prior`] (or past the last level).
    pub const fn prior_tensors(&self, l: usize) -> &'static [TensorKind] {
        if !self.prior {
            &[]
        } else if l.saturating_add(1) < self.levels {
            &PRIOR_TENSORS
        } else if l.saturating_add(1) == self.levels {
            &TOP_TENSORS
        } else {
            &[]
        }
    }

    /// Parameters of the learned prior at level `l` ([`Arch::prior_tensors`], each at the
    /// level's shape): `C/2 + C * C/2 * 9 + C` for a split level, `2 C` for the last one.
    pub const fn prior_params(&self, l: usize) -> usize {
        let view = self.level(l);
        let mut n = 0usize;
        let mut rest = self.prior_tensors(l);
        while let [kind, tail @ ..] = rest {
            n = n.saturating_add(view.tensor_len(Mask::ChannelEven, *kind));
            rest = tail;
        }
        n
    }

    /// Offset of level `l`'s prior tensors in the flat parameter vector: after every flow
    /// step's tensors and the earlier levels' prior tensors (`l = levels`: the parameter
    /// count).
    pub const fn prior_offset(&self, l: usize) -> usize {
        let mut n = self.coupling_offset(self.couplings);
        if !self.prior {
            return n;
        }
        let mut k = 0usize;
        while k < l && k < MAX_LEVELS {
            n = n.saturating_add(self.prior_params(k));
            k = k.saturating_add(1);
        }
        n
    }

    /// Offset of step `i`'s first parameter in the flat parameter vector.
    pub const fn coupling_offset(&self, i: usize) -> usize {
        let mut n = 0usize;
        let mut k = 0usize;
        let mut rest = self.first_masks(i);
        while let [m, tail @ ..] = rest {
            let view = self.level(self.level_of(k));
            n = n.saturating_add(view.coupling_params(*m));
            rest = tail;
            k = k.saturating_add(1);
        }
        n
    }

    /// Flow steps per level, `couplings / levels` (all of them if `levels` is 0).
    pub const fn steps_per_level(&self) -> usize {
        match self.couplings.checked_div(self.levels) {
            Some(n) => n,
            None => self.couplings,
        }
    }

    /// The level (scale) step `i` belongs to; never past the last level.
    pub const fn level_of(&self, i: usize) -> usize {
        let l = match i.checked_div(self.steps_per_level()) {
            Some(l) => l,
            None => 0,
        };
        let last = self.levels.saturating_sub(1);
        if l < last {
            l
        } else {
            last
        }
    }

    /// `(channels, height, width)` seen by the steps of level `l`: the first level's
    /// [`Arch::flow_shape`], then per level half the channels split off and a squeeze,
    /// `(C, H, W) -> (2C, H/2, W/2)`.
    pub const fn level_shape(&self, l: usize) -> (usize, usize, usize) {
        let (mut c, mut h, mut w) = self.flow_shape();
        let mut k = 0usize;
        while k < l && k < MAX_LEVELS {
            c = (c / 2).saturating_mul(4);
            h /= 2;
            w /= 2;
            k = k.saturating_add(1);
        }
        (c, h, w)
    }

    /// Channels level `l` emits as latent at its split (the odd ones, `floor(C/2)`); 0 for the
    /// last level, whose whole state is latent.
    pub const fn split_channels(&self, l: usize) -> usize {
        if l.saturating_add(1) < self.levels {
            self.level_shape(l).0 / 2
        } else {
            0
        }
    }

    /// Level `l` as a one-level architecture without squeeze: its shape, its steps and masks.
    /// Every per-coupling size function of the view ([`Arch::conv_shape`],
    /// [`Arch::tensor_len`], [`Arch::plane`], ...) is then that level's.
    pub const fn level(&self, l: usize) -> Arch {
        let (channels, height, width) = self.level_shape(l);
        let n = self.steps_per_level();
        let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
        let start = l.saturating_mul(n);
        let mut k = 0usize;
        while k < n && k < MAX_COUPLINGS {
            let src = start.saturating_add(k);
            if src < MAX_COUPLINGS {
                // Both indices are below MAX_COUPLINGS (loop bound and this check); `get` is
                // not yet callable in a const fn.
                #[allow(clippy::indexing_slicing)]
                {
                    masks[k] = self.masks[src];
                }
            }
            k = k.saturating_add(1);
        }
        Arch {
            channels,
            height,
            width,
            squeeze: false,
            levels: 1,
            glow: self.glow,
            couplings: n,
            masks,
            kernels: self.kernels,
            hidden: self.hidden,
            bits: self.bits,
            logit_alpha: self.logit_alpha,
            prior: self.prior,
            scale_floor: self.scale_floor,
        }
    }

    /// The level view ([`Arch::level`]) that step `i` runs in.
    pub const fn step_arch(&self, i: usize) -> Arch {
        self.level(self.level_of(i))
    }

    /// `&masks[..n]`, or all [`MAX_COUPLINGS`] slots when `n` is larger (the `const` size
    /// functions accept unvalidated architectures and must not panic on them).
    pub(crate) const fn first_masks(&self, n: usize) -> &[Mask] {
        match self.masks.split_at_checked(n) {
            Some((head, _)) => head,
            None => &self.masks,
        }
    }

    /// The masks in use, `&masks[..couplings]` (empty if `couplings` is out of range).
    pub fn active_masks(&self) -> &[Mask] {
        self.masks.get(..self.couplings).unwrap_or(&[])
    }

    /// Checks every field is in the supported range, so that all sizes fit and no
    /// operation can overflow.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |f| Err(Error::InvalidArch(f));
        if !(1..=64).contains(&self.channels) {
            return bad(ArchField::Channels);
        }
        if !(1..=MAX_LEVELS).contains(&self.levels)
            || !self.couplings.is_multiple_of(self.levels)
            || self.couplings < self.levels
        {
            return bad(ArchField::Levels);
        }
        // Every squeeze halves the size: one per level after the first, plus the optional one.
        let halvings = self
            .levels
            .saturating_sub(1)
            .saturating_add(usize::from(self.squeeze));
        let size_ok = |s: usize| (1..=1024).contains(&s) && s.is_multiple_of(1 << halvings);
        if !size_ok(self.height) || !size_ok(self.width) {
            return bad(ArchField::Size);
        }
        if !(1..=MAX_COUPLINGS).contains(&self.couplings) {
            return bad(ArchField::Couplings);
        }
        if self
            .kernels
            .iter()
            .any(|&k| k % 2 == 0 || !(1..=15).contains(&k))
        {
            return bad(ArchField::Kernel);
        }
        if self.hidden.iter().any(|&h| !(1..=4096).contains(&h)) {
            return bad(ArchField::Hidden);
        }
        if !(1..=8).contains(&self.bits) {
            return bad(ArchField::Bits);
        }
        let a = self.logit_alpha;
        if !(a.is_finite() && a > 0.0 && a < 0.5) {
            return bad(ArchField::LogitAlpha);
        }
        // +0 (no floor), or with Glow steps a positive floor up to 1/2 that f16 holds exactly
        // (the blob stores it as f16, so it must round-trip).
        let f = self.scale_floor;
        let floor_ok = f.to_bits() == 0
            || (self.glow
                && f.is_finite()
                && f > 0.0
                && f <= 0.5
                && half::f16::from_f32(f).to_f32().to_bits() == f.to_bits());
        if !floor_ok {
            return bad(ArchField::ScaleFloor);
        }
        // The learned prior is Glow's: it needs Glow steps.
        if self.prior && !self.glow {
            return bad(ArchField::Prior);
        }
        if self.dim() > MAX_DIM {
            return bad(ArchField::TooLarge);
        }
        for l in 0..self.levels {
            let view = self.level(l);
            let (c, _, _) = view.flow_shape();
            // A split needs an even channel count: half out as latent, half flowing on.
            if l.saturating_add(1) < self.levels && (c < 2 || !c.is_multiple_of(2)) {
                return bad(ArchField::Levels);
            }
            for &m in view.active_masks() {
                let ok = if m.is_channel() {
                    c >= 2
                } else {
                    view.plane() >= 2
                };
                if !ok {
                    return bad(ArchField::Mask);
                }
            }
        }
        if self.param_count() > MAX_PARAMS || scratch_len(self) > MAX_SCRATCH {
            return bad(ArchField::TooLarge);
        }
        Ok(())
    }
}

/// Sizes of the scratch regions the model needs, in f32 elements, in layout order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchLayout {
    /// The flow state (one image, flow shape).
    pub state: usize,
    /// A second image-sized buffer for squeeze.
    pub temp: usize,
    /// The CNN input (kept channels, or masked image).
    pub cnn_in: usize,
    /// Region A: first hidden layer, later reused for the `(s_raw, t)` output.
    pub region_a: usize,
    /// Region B: second hidden layer.
    pub region_b: usize,
}

impl ScratchLayout {
    /// The layout for an architecture.
    pub const fn of(arch: &Arch) -> ScratchLayout {
        // The first level has the largest planes (a squeeze quarters the plane, a split and
        // squeeze double the channels), but take the maximum over every step to be exact.
        let mut cnn_in = 0usize;
        let mut st = 0usize;
        let mut h0 = 0usize;
        let mut h1 = 0usize;
        let mut k = 0usize;
        let mut rest = arch.first_masks(arch.couplings);
        while let [m, tail @ ..] = rest {
            let m = *m;
            rest = tail;
            let view = arch.step_arch(k);
            k = k.saturating_add(1);
            let plane = view.plane();
            let a = view.cnn_in(m).saturating_mul(plane);
            if a > cnn_in {
                cnn_in = a;
            }
            let b = view.changed(m).saturating_mul(2).saturating_mul(plane);
            if b > st {
                st = b;
            }
            let a = arch.hidden[0].saturating_mul(plane);
            if a > h0 {
                h0 = a;
            }
            let b = arch.hidden[1].saturating_mul(plane);
            if b > h1 {
                h1 = b;
            }
        }
        // The learned prior's split couplings: CNN input the C/2 even channels, output the C
        // planes (s_raw, t), at every level but the last (a checkerboard-only model's
        // couplings need neither size).
        if arch.prior {
            let mut l = 0usize;
            while l.saturating_add(1) < arch.levels && l < MAX_LEVELS {
                let (c, h, w) = arch.level_shape(l);
                let plane = h.saturating_mul(w);
                let a = (c / 2).saturating_mul(plane);
                if a > cnn_in {
                    cnn_in = a;
                }
                let b = c.saturating_mul(plane);
                if b > st {
                    st = b;
                }
                l = l.saturating_add(1);
            }
        }
        ScratchLayout {
            state: arch.dim(),
            temp: arch.dim(),
            cnn_in,
            region_a: if h0 > st { h0 } else { st },
            region_b: h1,
        }
    }

    /// Total length.
    pub const fn total(&self) -> usize {
        self.state
            .saturating_add(self.temp)
            .saturating_add(self.cnn_in)
            .saturating_add(self.region_a)
            .saturating_add(self.region_b)
    }
}

/// f32 elements of scratch that [`crate::sample`] and [`crate::log_prob`] need for `arch`.
///
/// Firmware can write `static mut SCRATCH: [f32; scratch_len(&MNIST)] = [0.0; scratch_len(&MNIST)];`.
pub const fn scratch_len(arch: &Arch) -> usize {
    ScratchLayout::of(arch).total()
}

/// Pixels per image of `arch` (the length of the image buffers).
pub const fn image_len(arch: &Arch) -> usize {
    arch.dim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_the_seed() {
        // 12 x (2 scale + 2*8*25+8 + 8*64*49+64 + 64*4*9+4) = 12 x 27,870
        assert_eq!(MNIST.param_count(), 334_440);
        // 12 x (6 + 6*24*25+24 + 24*192*49+192 + 192*12*9+12) = 12 x 250,362
        assert_eq!(COLOR.param_count(), 3_004_344);
        MNIST.validate().unwrap();
        COLOR.validate().unwrap();
        MNIST_GLOW.validate().unwrap();
        COLOR_GLOW.validate().unwrap();
        // 16 x (2*4 + 2*16 + 1 + 64*2*9+64 + 64*64+64 + 4*64*9+4)
        //   + 16 x (2*8 + 2*64 + 1 + 64*4*9+64 + 64*64+64 + 8*64*9+8), no scale tensors.
        assert_eq!(MNIST_GLOW.param_count(), 304_224);
        assert_eq!(
            MNIST_GLOW.tensor_len(Mask::ChannelEven, TensorKind::Scale),
            0
        );
        assert_eq!(MNIST.tensor_len(Mask::ChannelEven, TensorKind::Scale), 2);
        std::println!(
            "glow params: {} {}",
            MNIST_GLOW.param_count(),
            COLOR_GLOW.param_count()
        );
    }

    #[test]
    fn scratch_fits_a_microcontroller_for_mnist() {
        // 784 + 784 + 2*196 + max(8,4)*196 + 64*196 floats
        assert_eq!(scratch_len(&MNIST), 784 * 2 + 392 + 1568 + 12_544);
        assert!(scratch_len(&MNIST) * 4 < 96 * 1024);
    }

    #[test]
    fn validate_rejects_each_bad_field() {
        type Case = (fn(&mut Arch), ArchField);
        let cases: [Case; 8] = [
            (|a| a.channels = 0, ArchField::Channels),
            (|a| a.height = 27, ArchField::Size),
            (|a| a.couplings = 33, ArchField::Couplings),
            (|a| a.kernels[1] = 4, ArchField::Kernel),
            (|a| a.hidden[0] = 0, ArchField::Hidden),
            (|a| a.bits = 9, ArchField::Bits),
            (|a| a.logit_alpha = f32::NAN, ArchField::LogitAlpha),
            (
                |a| {
                    a.squeeze = false;
                    a.masks[0] = Mask::ChannelEven;
                },
                ArchField::Mask,
            ),
        ];
        for (mutate, field) in cases {
            let mut a = MNIST;
            mutate(&mut a);
            assert_eq!(a.validate(), Err(Error::InvalidArch(field)));
        }
    }

    #[test]
    fn validate_checks_the_scale_floor() {
        assert_eq!(MNIST_GLOW.scale_floor, GLOW_SCALE_FLOOR);
        assert_eq!(MNIST.scale_floor.to_bits(), 0);
        for ok in [0.0f32, 1.0 / 1024.0, 0.0625, 0.5] {
            let a = Arch {
                prior: false,
                scale_floor: ok,
                ..MNIST_GLOW
            };
            assert_eq!(a.validate(), Ok(()), "{ok}");
        }
        // Negative zero, NaN, infinite, above 1/2, negative, not an f16 value.
        for bad in [-0.0f32, f32::NAN, f32::INFINITY, 0.75, -0.0625, 0.1] {
            let a = Arch {
                prior: false,
                scale_floor: bad,
                ..MNIST_GLOW
            };
            let want = Err(Error::InvalidArch(ArchField::ScaleFloor));
            assert_eq!(a.validate(), want, "{bad}");
        }
        // Only Glow couplings have a floor.
        let a = Arch {
            prior: false,
            scale_floor: 0.0625,
            ..MNIST
        };
        assert_eq!(a.validate(), Err(Error::InvalidArch(ArchField::ScaleFloor)));
    }

    #[test]
    fn validate_rejects_a_prior_without_glow() {
        let a = Arch {
            prior: true,
            ..MNIST
        };
        assert_eq!(a.validate(), Err(Error::InvalidArch(ArchField::Prior)));
        assert_eq!(
            Error::InvalidArch(ArchField::Prior).to_string(),
            "invalid architecture: the learned prior needs Glow steps"
        );
        let g = Arch {
            prior: true,
            ..MNIST_GLOW
        };
        assert_eq!(g.validate(), Ok(()));
        // One level: only the top prior.
        let one = Arch { levels: 1, ..g };
        assert_eq!(one.validate(), Ok(()));
        assert_eq!(one.prior_tensors(0), &TOP_TENSORS);
        assert_eq!(one.param_count(), one.prior_offset(0) + 2 * 4);
        // MNIST_GLOW's prior: a split prior on 4x14x14 (2 + 4*2*9 + 4 = 78), the top prior
        // on 8x7x7 (16); the presets keep `prior: false`.
        assert_eq!(g.param_count(), MNIST_GLOW.param_count() + 78 + 16);
        assert_eq!(g.prior_offset(0), MNIST_GLOW.param_count());
        assert_eq!(g.prior_offset(1), MNIST_GLOW.param_count() + 78);
        assert_eq!(g.prior_tensors(0), &PRIOR_TENSORS);
        assert_eq!(g.prior_tensors(2), &[]);
        assert_eq!(MNIST_GLOW.prior_tensors(0), &[]);
        assert_ne!(g, MNIST_GLOW);
        assert!(PRIOR_TENSORS
            .iter()
            .chain(&TOP_TENSORS)
            .all(|k| k.is_prior() && k.is_f32() && !k.is_glow()));
        assert!(STEP_TENSORS.iter().all(|k| !k.is_prior()));
        assert_eq!(TensorKind::PriorWeight.to_string(), "prior conv weight");
        assert_eq!(TensorKind::TopLogs.to_string(), "top prior log-scale");
    }

    #[test]
    fn odd_channel_counts_split_into_ceil_and_floor() {
        let mut a = MNIST;
        a.channels = 3;
        a.squeeze = false;
        assert_eq!(a.cnn_in(Mask::ChannelEven), 2);
        assert_eq!(a.changed(Mask::ChannelEven), 1);
        assert_eq!(a.cnn_in(Mask::ChannelOdd), 1);
        assert_eq!(a.changed(Mask::ChannelOdd), 2);
        assert_eq!(a.cnn_in(Mask::CheckerOdd), 3);
        assert_eq!(a.changed(Mask::CheckerOdd), 3);
    }

    /// The 32-bit overflow `MAX_SCRATCH` closes: 1024x1024 pixels, hidden width 4096 and
    /// 1x1 kernels passed every other limit, yet `4096 * 2^20 = 2^32` scratch elements wrap
    /// a 32-bit `usize` (the coupling's `hidden * plane`).
    #[test]
    fn scratch_over_the_limit_is_too_large() {
        let a = Arch {
            channels: 1,
            height: 1024,
            width: 1024,
            squeeze: false,
            levels: 1,
            glow: false,
            couplings: 1,
            masks: [Mask::CheckerEven; MAX_COUPLINGS],
            kernels: [1, 1, 1],
            hidden: [4096, 4096],
            bits: 8,
            logit_alpha: 0.05,
            prior: false,
            scale_floor: 0.0,
        };
        assert!(a.dim() <= MAX_DIM && a.param_count() <= MAX_PARAMS);
        assert!(scratch_len(&a) > u32::MAX as usize);
        assert_eq!(a.validate(), Err(Error::InvalidArch(ArchField::TooLarge)));
        let fits = Arch {
            hidden: [64, 64],
            ..a
        };
        assert!(scratch_len(&fits) <= MAX_SCRATCH);
        assert_eq!(fits.validate(), Ok(()));
    }

    fn mask() -> impl proptest::strategy::Strategy<Value = Mask> {
        proptest::sample::select(std::vec![
            Mask::ChannelEven,
            Mask::ChannelOdd,
            Mask::CheckerEven,
            Mask::CheckerOdd
        ])
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: if cfg!(miri) { 8 } else { 256 },
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// The `const` size functions take unvalidated architectures (a firmware may call
        /// them on anything): with any field at any value, including `usize::MAX`, they
        /// saturate instead of overflowing (which panics in debug builds).
        #[test]
        fn size_functions_never_overflow(
            channels in proptest::prelude::any::<usize>(),
            height in proptest::prelude::any::<usize>(),
            width in proptest::prelude::any::<usize>(),
            squeeze in proptest::prelude::any::<bool>(),
            levels in proptest::prelude::any::<usize>(),
            glow in proptest::prelude::any::<bool>(),
            prior in proptest::prelude::any::<bool>(),
            couplings in proptest::prelude::any::<usize>(),
            first in mask(),
            kernels in proptest::prelude::any::<[usize; 3]>(),
            hidden in proptest::prelude::any::<[usize; 2]>(),
            j in proptest::prelude::any::<usize>(),
        ) {
            let a = Arch {
                channels,
                height,
                width,
                squeeze,
                levels,
                glow,
                couplings,
                masks: alternating_masks(first),
                kernels,
                hidden,
                bits: 8,
                logit_alpha: 0.05,
                prior,
                scale_floor: if glow { GLOW_SCALE_FLOOR } else { 0.0 },
            };
            let _ = (a.param_count(), scratch_len(&a), image_len(&a), a.coupling_offset(j));
            let _ = (a.prior_offset(j), a.prior_params(j));
            let _ = crate::weights::blob_len(&a, crate::weights::DType::F16);
            let _ = (first.split_channels(channels), first.changed_channel(j));
            let _ = first.changes_pixel(height, width);
            let _ = a.validate();
        }

        /// Extremes the generator rarely hits on its own.
        #[test]
        fn size_functions_saturate_at_usize_max(first in mask(), big in (usize::MAX - 3)..=usize::MAX) {
            let a = Arch {
                channels: big,
                height: big,
                width: big,
                couplings: big,
                kernels: [big; 3],
                hidden: [big; 2],
                masks: alternating_masks(first),
                ..MNIST
            };
            proptest::prop_assert_eq!(scratch_len(&a), usize::MAX);
            proptest::prop_assert_eq!(a.param_count(), usize::MAX);
            let p = Arch { prior: true, glow: true, levels: big, ..a };
            proptest::prop_assert_eq!(scratch_len(&p), usize::MAX);
            proptest::prop_assert_eq!(p.param_count(), usize::MAX);
            let _ = crate::weights::blob_len(&p, crate::weights::DType::F16);
            proptest::prop_assert!(p.validate().is_err());
            let _ = (first.split_channels(big), first.changed_channel(big));
            proptest::prop_assert!(a.validate().is_err());
        }
    }
}
