//! Choosing the compute device: `--device auto|cpu|cuda[:N]`.
//!
//! `auto` takes the GPU when the NVIDIA driver loads, reports a device, the kernels load
//! (NVRTC's CUBINs, or the PTX shipped in the binary: [`super::cuda::compile`]), and the GPU
//! passes a self-check ([`verify`]: one tiny forward and backward
//! pass on the GPU and on the CPU, compared); otherwise it says once why and runs on the CPU.
//! `cuda[:N]` insists on the GPU and fails with the reason, the self-check included. Nothing
//! here panics when there is no driver: cudarc's `CudaContext::new` would, so the driver
//! library is probed first (see [`super::cuda::gpu::device_count`]).

use super::cpu::CpuBackend;
use super::cuda::{gpu::CudaDevice, CudaBackend};
use super::Backend;
use crate::config::tensor_specs;
use crate::model::{init_params, Flow};
use clayflow_kernel::{alternating_masks, Arch, Mask, Pcg32, Rng};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// GPU number N (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A `--device` value that is not `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a device: use auto, cpu, cuda or cuda:N with N a GPU number (e.g. cuda:0)")]
pub struct BadDevice(String);

impl FromStr for DeviceChoice {
    type Err = BadDevice;

    fn from_str(s: &str) -> Result<Self, BadDevice> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| BadDevice(s.to_string())),
        }
    }
}

/// The GPU was asked for and cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--device {choice}: cannot use the GPU: {reason}")]
pub struct NoGpu {
    /// What was asked for.
    pub choice: DeviceChoice,
    /// Why not (with what to do).
    pub reason: String,
}

/// A backend and, when `auto` fell back to the CPU, the one-line notice saying why.
#[derive(Debug)]
pub struct Opened {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// `Some("no CUDA device (reason); running on the CPU")` after a fallback.
    pub notice: Option<String>,
}

/// Opens GPU `n` with its kernels, as a backend (without the self-check: see [`open`]).
pub fn open_cuda(n: usize) -> Result<CudaBackend<CudaDevice>, String> {
    CudaDevice::new(n)
        .map(CudaBackend::new)
        .map_err(|e| match e {
            super::BackendError::Device(m) => m,
            other => other.to_string(),
        })
}

/// The self-check's models: a two-level Glow (ActNorm, LU 1x1 convolutions, sigmoid-scaled
/// channel couplings, a split, the learned prior) and a RealNVP with tanh-scaled
/// checkerboard couplings, both tiny, so that every kind of op runs in well under a second
/// on a GPU.
fn check_archs() -> [Arch; 2] {
    let realnvp = Arch {
        channels: 2,
        height: 6,
        width: 6,
        squeeze: false,
        levels: 1,
        glow: false,
        couplings: 2,
        masks: alternating_masks(Mask::CheckerEven),
        kernels: [3, 1, 3],
        hidden: [8, 8],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    };
    let glow = Arch {
        channels: 1,
        height: 8,
        width: 8,
        squeeze: true,
        levels: 2,
        glow: true,
        couplings: 4,
        masks: alternating_masks(Mask::ChannelEven),
        prior: true,
        ..realnvp
    };
    [glow, realnvp]
}

/// Largest relative error the self-check accepts (norm-wise, per gradient tensor; the
/// backends differ only in summation order and FMA, about 1e-6).
const CHECK_TOL: f64 = 1e-4;

/// `||a - b|| / ||b||`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - f64::from(y)).powi(2);
        n += f64::from(y).powi(2);
    }
    if d.is_nan() || a.len() != b.len() {
        return f64::INFINITY;
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

/// Loss and host gradients of one forward and backward pass on `backend`.
fn tiny_step(
    backend: Arc<dyn Backend>,
    arch: Arch,
    params: &[Vec<f32>],
    u: &[f32],
    batch: usize,
) -> Result<(f64, Vec<Vec<f32>>), String> {
    let e = |e: super::BackendError| e.to_string();
    let mut flow = Flow::new(backend.clone(), arch, params).map_err(e)?;
    if arch.glow {
        flow.data_init(u, batch).map_err(e)?;
    }
    let stats = flow.forward(u, batch).map_err(e)?;
    let mut grads = flow.zeros_like_params().map_err(e)?;
    flow.backward(&mut grads).map_err(e)?;
    let host = grads
        .iter()
        .map(|g| backend.download(g))
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    Ok((stats.mean_bpd, host))
}

/// The self-check: one tiny forward and backward pass of each of [`check_archs`] on `gpu` and
/// on the CPU, compared (loss and every gradient tensor within 1e-4, norm-relative). `Err`
/// says what failed or differed.
pub fn verify(gpu: Arc<dyn Backend>) -> Result<(), String> {
    let batch = 4;
    for (k, arch) in check_archs().into_iter().enumerate() {
        let mut params = init_params(&arch, 11 + k as u64);
        let mut rng = Pcg32::new(5 + k as u64);
        // The last convs (and the prior) are zero at initialisation, which would leave most
        // gradients zero.
        for (spec, t) in tensor_specs(&arch).iter().zip(params.iter_mut()) {
            if spec.name.contains(".conv2.")
                || spec.name.starts_with("top.")
                || (spec.name.starts_with("prior.") && !spec.name.ends_with(".scale"))
            {
                for v in t.iter_mut() {
                    *v = ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * 0.1;
                }
            }
        }
        let u: Vec<f32> = (0..batch * arch.dim())
            .map(|_| (rng.next_u32() >> 8) as f32 / 16_777_216.0)
            .collect();
        let what = if arch.glow { "Glow" } else { "RealNVP" };
        let (loss_g, grads_g) = tiny_step(gpu.clone(), arch, &params, &u, batch)
            .map_err(|e| format!("the {what} check step failed on the GPU: {e}"))?;
        let (loss_c, grads_c) =
            tiny_step(Arc::new(CpuBackend::default()), arch, &params, &u, batch)
                .map_err(|e| format!("the {what} check step failed on the CPU: {e}"))?;
        let r = ((loss_g - loss_c) / loss_c).abs();
        if r.is_nan() || r > CHECK_TOL {
            return Err(format!(
                "the GPU's {what} check loss {loss_g} differs from the CPU's {loss_c}"
            ));
        }
        for ((spec, g), c) in tensor_specs(&arch).iter().zip(&grads_g).zip(&grads_c) {
            let r = rel_err(g, c);
            if r > CHECK_TOL {
                return Err(format!(
                    "the GPU's {what} check gradient {} differs from the CPU's (relative \
                     error {r:.1e})",
                    spec.name
                ));
            }
        }
    }
    Ok(())
}

/// Why the GPU was not used: it could not be opened, or it failed the self-check.
enum GpuFailure {
    Unavailable(String),
    Check(String),
}

/// Opens GPU `n` and runs the self-check on it.
fn open_checked(n: usize) -> Result<Arc<dyn Backend>, GpuFailure> {
    let gpu: Arc<dyn Backend> = Arc::new(open_cuda(n).map_err(GpuFailure::Unavailable)?);
    verify(gpu.clone()).map_err(GpuFailure::Check)?;
    Ok(gpu)
}

/// The self-check failure's advice: it is a bug to report.
const CHECK_ADVICE: &str = "this is a bug in clayflow's CUDA kernels or the driver, please \
     report it";

/// Opens the backend for `choice`.
pub fn open(choice: DeviceChoice) -> Result<Opened, NoGpu> {
    open_local(choice, 0)
}

/// Opens the backend for `choice` in a process whose index among the ranks on its machine
/// is `local_rank` (0 outside data-parallel runs): `auto` picks GPU `local_rank`, one GPU
/// per rank.
pub fn open_local(choice: DeviceChoice, local_rank: usize) -> Result<Opened, NoGpu> {
    match choice {
        DeviceChoice::Cpu => Ok(Opened {
            backend: Arc::new(CpuBackend::default()),
            notice: None,
        }),
        DeviceChoice::Cuda(n) => match open_checked(n) {
            Ok(backend) => Ok(Opened {
                backend,
                notice: None,
            }),
            Err(GpuFailure::Unavailable(reason)) => Err(NoGpu { choice, reason }),
            Err(GpuFailure::Check(e)) => Err(NoGpu {
                choice,
                reason: format!(
                    "it failed clayflow's self-check: {e}; {CHECK_ADVICE}; use --device cpu"
                ),
            }),
        },
        DeviceChoice::Auto => match open_checked(local_rank) {
            Ok(backend) => Ok(Opened {
                backend,
                notice: None,
            }),
            Err(failure) => Ok(Opened {
                backend: Arc::new(CpuBackend::default()),
                notice: Some(match failure {
                    GpuFailure::Unavailable(reason) => {
                        format!("no CUDA device ({}); running on the CPU", short(&reason))
                    }
                    GpuFailure::Check(e) => format!(
                        "the GPU failed clayflow's self-check ({e}); running on the CPU; \
                         {CHECK_ADVICE}"
                    ),
                }),
            }),
        },
    }
}

/// The reason without the "use --device cpu" advice, which `auto` has already followed.
fn short(reason: &str) -> String {
    let first = reason.lines().next().unwrap_or(reason);
    first
        .split("; use --device")
        .next()
        .unwrap_or(first)
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_documented_form() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "CUDA:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        for bad in ["cuda:x", "cuda:", "cuda:-1", "tpu", ""] {
            let e = bad.parse::<DeviceChoice>().unwrap_err().to_string();
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn notice_drops_the_advice_auto_already_followed() {
        assert_eq!(
            short("the NVIDIA driver library libcuda.so was not found; use --device cpu or --device auto"),
            "the NVIDIA driver library libcuda.so was not found"
        );
    }
}
