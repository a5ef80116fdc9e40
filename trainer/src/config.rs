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

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: [&str; 2] = ["mnist", "color"];

impl ModelConfig {
    /// A named preset (`mnist` or `color`).
    pub fn preset(name: &str) -> Result<ModelConfig, ConfigError> {
        match name {
            "mnist" => Ok(ModelConfig::from_arch(&clayflow_kernel::MNIST)),
            "color" | "colour" => Ok(ModelConfig::from_arch(&clayflow_kernel::COLOR)),
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
            masks: a.active_masks().iter().map(|&m| m.into()).collect(),
            kernels: a.kernels,
            hidden: a.hidden,
            bits: a.bits,
            logit_alpha: a.logit_alpha,
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
            levels: 1,
            glow: false,
            couplings: n,
            masks,
            kernels: self.kernels,
            hidden: self.hidden,
            bits: self.bits,
            logit_alpha: self.logit_alpha,
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

/// Every parameter tensor of `arch`, in the kernel blob's order (7 per coupling: scale,
/// conv0 weight, conv0 bias, conv1 weight, conv1 bias, conv2 weight, conv2 bias).
pub fn tensor_specs(arch: &Arch) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    for (i, &m) in arch.active_masks().iter().enumerate() {
        for kind in COUPLING_TENSORS {
            let (name, shape) = match kind {
                TensorKind::Scale => (format!("coupling.{i}.scale"), vec![arch.changed(m)]),
                TensorKind::ConvWeight(j) => {
                    let (cin, cout, k) = arch.conv_shape(m, j);
                    (
                        format!("coupling.{i}.conv{j}.weight"),
                        vec![cout, cin, k, k],
                    )
                }
                TensorKind::ConvBias(j) => (
                    format!("coupling.{i}.conv{j}.bias"),
                    vec![arch.conv_shape(m, j).1],
                ),
            };
            out.push(TensorSpec { name, shape });
        }
    }
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
}
