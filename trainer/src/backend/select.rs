//! Choosing the compute device: `--device auto|cpu|cuda[:N]`.
//!
//! `auto` takes the GPU when the NVIDIA driver loads, reports a device, and the kernels
//! compile with NVRTC; otherwise it says once why and runs on the CPU. `cuda[:N]` insists on
//! the GPU and fails with the reason. Nothing here panics when there is no driver: cudarc's
//! `CudaContext::new` would, so the driver library is probed first (see
//! [`super::cuda::gpu::device_count`]).

use super::cpu::CpuBackend;
use super::cuda::{gpu::CudaDevice, CudaBackend};
use super::Backend;
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

/// Opens GPU `n` with its kernels, as a backend.
pub fn open_cuda(n: usize) -> Result<CudaBackend<CudaDevice>, String> {
    CudaDevice::new(n)
        .map(CudaBackend::new)
        .map_err(|e| match e {
            super::BackendError::Device(m) => m,
            other => other.to_string(),
        })
}

/// Opens the backend for `choice`.
pub fn open(choice: DeviceChoice) -> Result<Opened, NoGpu> {
    match choice {
        DeviceChoice::Cpu => Ok(Opened {
            backend: Arc::new(CpuBackend),
            notice: None,
        }),
        DeviceChoice::Cuda(n) => match open_cuda(n) {
            Ok(b) => Ok(Opened {
                backend: Arc::new(b),
                notice: None,
            }),
            Err(reason) => Err(NoGpu { choice, reason }),
        },
        DeviceChoice::Auto => match open_cuda(0) {
            Ok(b) => Ok(Opened {
                backend: Arc::new(b),
                notice: None,
            }),
            Err(reason) => Ok(Opened {
                backend: Arc::new(CpuBackend),
                notice: Some(format!(
                    "no CUDA device ({}); running on the CPU",
                    short(&reason)
                )),
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
