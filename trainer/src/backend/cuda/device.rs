//! The device abstraction under [`super::CudaBackend`]: memory and kernel launches by name.
//!
//! Two implementations: the real GPU (cudarc, `super::gpu::CudaDevice`) and the host
//! simulator in the `clayflow-cuda-sim` crate (`cuda/`), which runs the same `.cu` kernels on
//! the CPU so that `CudaBackend<SimDevice>` is tested on every CI run without a GPU.

use crate::backend::{Buffer, Result};

/// One kernel parameter, in the kernel's parameter order (cuLaunchKernel convention).
#[derive(Clone, Copy, Debug)]
pub enum Param {
    /// A device pointer (`float*` / `const float*`), from `KernelDevice::ptr`/`ptr_mut`.
    Ptr(u64),
    /// `int`
    I32(i32),
    /// `unsigned int`
    U32(u32),
    /// `float`
    F32(f32),
}

/// Launch geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    /// Blocks in the grid (x, y, z).
    pub grid: (u32, u32, u32),
    /// Threads per block (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block in bytes (`extern __shared__`).
    pub shared_bytes: u32,
}

/// What `CudaBackend` needs from a device: memory and kernel launches by name. Implemented by
/// the real GPU (cudarc) and by the host simulator in `cuda/` (tests).
pub trait KernelDevice: Send + Sync + std::fmt::Debug + 'static {
    /// Human-readable name, e.g. "cuda:0 NVIDIA H200" or "cuda-sim (host)".
    fn name(&self) -> String;
    /// A zero-filled buffer of `len` f32.
    fn alloc_zeros(&self, len: usize) -> Result<Buffer>;
    /// A buffer holding a copy of `data` (allocates; for set-up, not for a warm step).
    fn upload(&self, data: &[f32]) -> Result<Buffer>;
    /// Copies `data` into the existing buffer `dst` of the same length (no allocation once
    /// warm: the real GPU stages it in a reused pinned host buffer).
    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()>;
    /// The buffer's contents on the host (one device-to-host copy; synchronises).
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>>;
    /// Device address of a buffer read by a kernel. Error `WrongDevice` if not this device's.
    fn ptr(&self, buf: &Buffer) -> Result<u64>;
    /// Device address of a buffer written by a kernel.
    fn ptr_mut(&self, buf: &mut Buffer) -> Result<u64>;
    /// Launches kernel `name` (an `extern "C" __global__` from cuda/kernels) with `params`.
    fn launch(&self, name: &'static str, cfg: LaunchCfg, params: &[Param]) -> Result<()>;
    /// Waits until all launched work is done.
    fn synchronize(&self) -> Result<()>;
}
