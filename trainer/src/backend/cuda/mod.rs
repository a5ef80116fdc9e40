//! The CUDA backend: the flow's ops as custom kernels (`cuda/kernels/*.cu`) launched on a
//! [`KernelDevice`] — the real GPU through cudarc, or the host simulator in tests.

pub mod device;

pub use device::{KernelDevice, LaunchCfg, Param};
