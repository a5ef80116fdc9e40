//! Model configuration: the kernel's [`Arch`] as a serialisable description, the named
//! presets, and the names and shapes of the parameter tensors (in the kernel's blob order).

use clayflow_kernel::arch::{TensorKind, COUPLING_TENSORS};
use clayflow_kernel::{Arch, Mask, MAX_COUPLINGS};
use serde::{Deserialize, Serialize};

/// A mask kind as written in config and checkpoint files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskName {
    /// Keep even channels.
    ChannelEven,
    /// Keep odd channels.
    ChannelOdd,
    /// Keep pixels with even `row + col`.
    CheckerEven,
    /// Keep pixels with odd `row + col`.
    CheckerOdd,
}

impl From<Mask> for MaskName {
    fn from(m: Mask) -> Self {
        match m {
            Mask::ChannelEven => MaskName::ChannelEven,
            Mask::ChannelOdd => MaskName::ChannelOdd,
            Mask::CheckerEven => MaskName::CheckerEven,
            Mask::CheckerOdd => MaskName::CheckerOdd,
        }
    }
}

impl From<MaskName> for Mask {
    fn from(m: MaskName) -> Self {
        match m {
            MaskName::ChannelEven => Mask::ChannelEven,
            MaskName::ChannelOdd => Mask::ChannelOdd,
            MaskName::CheckerEven => Mask::CheckerEven,
            MaskName::CheckerOdd => Mask::CheckerOdd,
        }
    }
}

/// A serialisable architecture (JSON in config files and checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Image channels.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// One 2x2 squeeze before the couplings.
    pub squeeze: bool,
    /// Scales (levels) of the multi-scale flow; 1 (the default) is the seed's single scale.
    #[serde(default = "one")]
    pub levels: usize,
    /// Glow steps: ActNorm and an invertible 1x1 convolution before every coupling.
    #[serde(default)]
    pub glow: bool,
    /// One mask per coupling, from the image side.
    pub masks: Vec<MaskName>,
    /// Kernel sizes of the three convolutions in each coupling.
    pub kernels: [usize; 3],
    /// Hidden widths of each coupling's CNN.
    pub hidden: [usize; 2],
    /// Pixel bit depth.
    pub bits: u32,
    /// Logit constant.
    pub logit_alpha: f32,
    /// Floor of a Glow coupling's scale (`Arch::scale_floor`); absent in checkpoints
    /// written before it existed, which had none (0).
    #[serde(default)]
    pub scale_floor: f32,
    /// Glow's learned prior (`Arch::prior`); absent in checkpoints written before it
    /// existed, which had none.
    #[serde(default)]
    pub prior: bool,
}

/// An invalid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unknown preset name.
    #[error("unknown model preset {0:?}; choose one of: {names}", names = PRESETS.join(", "))]
    UnknownPreset(String),
    /// Too many or no couplings.
    #[error("a model needs 1..={MAX_COUPLINGS} couplings, this one has {0}")]
    Couplings(usize),
    /// The kernel rejected the architecture.
    #[error("invalid architecture: {0}")]
    Arch(clayflow_kernel::Error),
}

fn one() -> usize {
    1
}

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: [&str; 4] = ["mnist", "color", "mnist-glow", "color-glow"];

impl ModelConfig {
    /// A named preset (`mnist` or `color`).
    pub fn preset(name: &str) -> Result<ModelConfig, ConfigError> {
        match name {
            "mnist" => Ok(ModelConfig::from_arch(&clayflow_kernel::MNIST)),
            "color" | "colour" => Ok(ModelConfig::from_arch(&clayflow_kernel::COLOR)),
            "mnist-glow" => Ok(ModelConfig::from_arch(&clayflow_kernel::MNIST_GLOW)),
            "color-glow" | "colour-glow" => {
                Ok(ModelConfig::from_arch(&clayflow_kernel::COLOR_GLOW))
            }
            other => Err(ConfigError::UnknownPreset(other.to_string())),
        }
    }

    /// The description of an architecture.
    pub fn from_arch(a: &Arch) -> ModelConfig {
        ModelConfig {
            channels: a.channels,
            height: a.height,
            width: a.width,
            squeeze: a.squeeze,
            levels: a.levels,
            glow: a.glow,
            masks: a.active_masks().iter().map(|&m| m.into()).collect(),
            kernels: a.kernels,
            hidden: a.hidden,
            bits: a.bits,
            logit_alpha: a.logit_alpha,
            prior: a.prior,
            scale_floor: a.scale_floor,
        }
    }

    /// The kernel architecture, validated.
    pub fn to_arch(&self) -> Result<Arch, ConfigError> {
        let n = self.masks.len();
        if n == 0 || n > MAX_COUPLINGS {
            return Err(ConfigError::Couplings(n));
        }
        let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
        for (dst, &m) in masks.iter_mut().zip(&self.masks) {
            *dst = m.into();
        }
        let arch = Arch {
            channels: self.channels,
            height: self.height,
            width: self.width,
            squeeze: self.squeeze,
            levels: self.levels,
            glow: self.glow,
            couplings: n,
            masks,
            kernels: self.kernels,
            hidden: self.hidden,
            bits: self.bits,
            logit_alpha: self.logit_alpha,
            prior: self.prior,
            scale_floor: self.scale_floor,
        };
        arch.validate().map_err(ConfigError::Arch)?;
        Ok(arch)
    }
}

/// Name and shape of one parameter tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name in checkpoints, e.g. `coupling.3.conv1.weight`.
    pub name: String,
    /// Shape (PyTorch convention: conv weights `[cout, cin, k, k]`).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Element count.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The checkpoint tensors of a Glow step before its coupling's, in order: ActNorm
/// (`logs`, `bias`), then the LU-parametrised 1x1 convolution `W = P L (U + diag(sign *
/// exp(log_s)))`: the permutation `perm` and `sign` (fixed at initialisation, never trained),
/// `lower` and `upper` (only their strict triangles are used) and `log_s`.
pub const GLOW_CHECKPOINT_TENSORS: [&str; 7] = [
    "actnorm.logs",
    "actnorm.bias",
    "invconv.perm",
    "invconv.sign",
    "invconv.lower",
    "invconv.upper",
    "invconv.log_s",
];

/// Tensors per flow step in the checkpoint: the coupling's 7, plus 7 for a Glow step.
pub fn tensors_per_step(arch: &Arch) -> usize {
    COUPLING_TENSORS.len()
        + if arch.glow {
            GLOW_CHECKPOINT_TENSORS.len()
        } else {
            0
        }
}

/// True for the tensors of `arch` that are state, not trained parameters (the 1x1
/// convolution's permutation and signs, and a Glow coupling's `scale`, which its sigmoid
/// bound does not use): the optimiser leaves them alone and parameter counts skip them.
/// The learned prior's `prior.{l}.scale` is trained: its tanh bound reads it.
pub fn is_fixed(arch: &Arch, name: &str) -> bool {
    name.ends_with(".invconv.perm")
        || name.ends_with(".invconv.sign")
        || (arch.glow && name.starts_with("coupling.") && name.ends_with(".scale"))
}

/// The learned prior's tensors ([`Arch::prior`]), after every step's, in checkpoint and blob
/// order: for each level `l` but the last (state `C x H x W`, `h = C / 2`),
/// `prior.{l}.scale [h]`, `prior.{l}.weight [C, h, 3, 3]` and `prior.{l}.bias [C]` (the
/// split prior's coupling: one 3x3 convolution of the kept channels gives `(s_raw, t)` for
/// the ones that leave); then `top.logs [C]` and `top.bias [C]` of the last level (the top
/// prior, an ActNorm). Empty without the prior.
pub fn prior_specs(arch: &Arch) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    if !arch.prior {
        return out;
    }
    for l in 0..arch.levels.saturating_sub(1) {
        let c = arch.level_shape(l).0;
        let h = c / 2;
        for (name, shape) in [
            ("scale", vec![h]),
            ("weight", vec![c, h, PRIOR_KERNEL, PRIOR_KERNEL]),
            ("bias", vec![c]),
        ] {
            out.push(TensorSpec {
                name: format!("prior.{l}.{name}"),
                shape,
            });
        }
    }
    let c = arch.level_shape(arch.levels.saturating_sub(1)).0;
    for name in ["top.logs", "top.bias"] {
        out.push(TensorSpec {
            name: name.to_string(),
            shape: vec![c],
        });
    }
    out
}

/// Kernel size of the split prior's convolution (Glow's `Conv2dZeros`, 3x3).
pub const PRIOR_KERNEL: usize = 3;

/// Tensors the learned prior adds per split level (`scale`, `weight`, `bias`).
pub const PRIOR_TENSORS_PER_SPLIT: usize = 3;

/// Trained parameters of `arch` (what a model's size is quoted in): the fixed permutation
/// and signs are not counted, and of the 1x1 convolution's `lower` and `upper` only their
/// strict triangles, `C (C - 1) / 2` each, are parameters.
pub fn trainable_params(arch: &Arch) -> usize {
    tensor_specs(arch)
        .iter()
        .filter(|s| !is_fixed(arch, &s.name))
        .map(|s| {
            if s.name.ends_with(".invconv.lower") || s.name.ends_with(".invconv.upper") {
                let c = s.shape.first().copied().unwrap_or(0);
                c * c.saturating_sub(1) / 2
            } else {
                s.len()
            }
        })
        .sum()
}

/// Every parameter tensor of `arch`, in checkpoint order: per step, for a Glow step the
/// [`GLOW_CHECKPOINT_TENSORS`] (`step.{i}.*`), then the coupling's 7 (`coupling.{i}.*`: scale,
/// conv0 weight, conv0 bias, conv1 weight, conv1 bias, conv2 weight, conv2 bias). For the
/// seed's architectures this is the kernel blob's order; a Glow blob stores `W`, `W^-1` and
/// `log|det W|` instead of the LU factors (see `export`). With the learned prior, its
/// tensors ([`prior_specs`]) follow every step's.
pub fn tensor_specs(arch: &Arch) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    for (i, &m) in arch.active_masks().iter().enumerate() {
        let view = arch.step_arch(i);
        let c = view.flow_shape().0;
        if arch.glow {
            for name in GLOW_CHECKPOINT_TENSORS {
                let shape = match name {
                    "invconv.lower" | "invconv.upper" => vec![c, c],
                    _ => vec![c],
                };
                out.push(TensorSpec {
                    name: format!("step.{i}.{name}"),
                    shape,
                });
            }
        }
        for kind in COUPLING_TENSORS {
            let (name, shape) = match kind {
                TensorKind::Scale => (format!("coupling.{i}.scale"), vec![view.changed(m)]),
                TensorKind::ConvWeight(j) => {
                    let (cin, cout, k) = view.conv_shape(m, j);
                    (
                        format!("coupling.{i}.conv{j}.weight"),
                        vec![cout, cin, k, k],
                    )
                }
                TensorKind::ConvBias(j) => (
                    format!("coupling.{i}.conv{j}.bias"),
                    vec![view.conv_shape(m, j).1],
                ),
                _ => continue,
            };
            out.push(TensorSpec { name, shape });
        }
    }
    out.extend(prior_specs(arch));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_json() {
        for name in PRESETS {
            let c = ModelConfig::preset(name).unwrap();
            let json = serde_json::to_string(&c).unwrap();
            let back: ModelConfig = serde_json::from_str(&json).unwrap();
            assert_eq!(back.to_arch().unwrap(), c.to_arch().unwrap());
        }
        assert!(ModelConfig::preset("cifar").is_err());
    }

    #[test]
    fn tensor_specs_cover_every_parameter_in_order() {
        let arch = clayflow_kernel::MNIST;
        let specs = tensor_specs(&arch);
        assert_eq!(specs.len(), 12 * 7);
        assert_eq!(
            specs.iter().map(TensorSpec::len).sum::<usize>(),
            arch.param_count()
        );
        assert_eq!(specs[3].name, "coupling.0.conv1.weight");
        assert_eq!(specs[3].shape, vec![64, 8, 7, 7]);
    }

    #[test]
    fn glow_presets_fit_their_parameter_budgets() {
        let mnist = ModelConfig::preset("mnist-glow")
            .unwrap()
            .to_arch()
            .unwrap();
        let specs = tensor_specs(&mnist);
        assert_eq!(specs.len(), 32 * 14);
        assert_eq!(specs[0].name, "step.0.actnorm.logs");
        assert_eq!(specs[0].shape, vec![4]);
        // Step 16 is the second level's first: 8 channels at 7x7, its CNN sees 4 of them.
        assert_eq!(specs[16 * 14 + 4].name, "step.16.invconv.lower");
        assert_eq!(specs[16 * 14 + 4].shape, vec![8, 8]);
        assert_eq!(specs[16 * 14 + 8].shape, vec![64, 4, 3, 3]);
        let n = trainable_params(&mnist);
        assert!(n <= 350_000, "mnist-glow has {n} parameters");
        // The blob's count less, per step, W, W^-1 and log|det W| (2C^2 + 1) plus the LU
        // factors' C^2 - C + C: 16 steps at C = 4 and 16 at C = 8. (The checkpoint's unused
        // coupling scale is in neither count: the blob has no such tensor.)
        let per_step = |c: usize| 2 * c * c + 1 - c * c;
        assert_eq!(n, mnist.param_count() - 16 * per_step(4) - 16 * per_step(8));
        let color = ModelConfig::preset("color-glow")
            .unwrap()
            .to_arch()
            .unwrap();
        let n = trainable_params(&color);
        assert!(n <= 3_500_000, "color-glow has {n} parameters");
    }

    #[test]
    fn configs_without_levels_or_glow_are_single_scale_realnvp() {
        let mut v = serde_json::to_value(ModelConfig::preset("mnist").unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("levels");
        o.remove("glow");
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        assert_eq!(c.to_arch().unwrap(), clayflow_kernel::MNIST);
    }
}
