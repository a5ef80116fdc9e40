//! The CUDA backend: the flow's ops as custom kernels (`cuda/kernels/*.cu`) launched on a
//! [`KernelDevice`] — the real GPU through cudarc ([`gpu::CudaDevice`]), or the host simulator
//! of the `clayflow-cuda-sim` crate in tests, which runs the very same kernel sources and this
//! very same orchestration on the CPU.
//!
//! Every launch follows `cuda/KERNELS.md` (signatures, launch geometry, scratch buffers); the
//! comments at each launch name the kernel and the formula. Sizes are checked here, before
//! any launch: a kernel never sees a wrong length, an element count of 2^31 or more, or an
//! empty grid.
//!
//! The ops are grouped as the [`Backend`]'s op-group traits: `Memory` in `memory.rs`,
//! `Convolution` in `conv.rs`, `FlowLayers` in `flow_layers.rs` and `Optimiser` in
//! `optimiser.rs`; this module holds the backend itself and the launch helpers they share.

pub mod compile;
mod conv;
pub mod device;
mod flow_layers;
pub mod gpu;
mod memory;
mod optimiser;

pub use device::{KernelDevice, LaunchCfg, Param};

use super::{Backend, BackendError, Buffer, CouplingScale, LuFactors, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// Threads per block of the elementwise and per-image kernels.
const BLOCK: u32 = 256;

/// Largest grid y / z dimension.
const MAX_GRID_YZ: usize = 65_535;

/// [`Backend`] on a [`KernelDevice`].
#[derive(Debug)]
pub struct CudaBackend<D: KernelDevice> {
    dev: D,
    /// Scratch buffers by (purpose, exact length), reused across calls. Kernels write every
    /// element they later read, so stale contents never matter.
    scratch: Mutex<HashMap<(&'static str, usize), Buffer>>,
    /// Task tables of the multi-tensor kernels by purpose: the u64 words and the device
    /// buffer holding them. A training run passes the same parameter, gradient and moment
    /// buffers every step, so the table is uploaded once and reused.
    tables: Mutex<HashMap<&'static str, (Vec<u64>, Buffer)>>,
}

/// An `int` kernel parameter from a size, or an error when it does not fit.
fn int(op: &'static str, what: &str, v: usize) -> Result<Param> {
    i32::try_from(v).map(Param::I32).map_err(|_| {
        BackendError::Device(format!(
            "{op}: {what} = {v} is too large for the CUDA kernels (limit 2^31 - 1); use a \
             smaller batch"
        ))
    })
}

/// The "EW launch" of KERNELS.md: 256 threads, `min(ceil(n / 256), 4096)` blocks.
fn ew(n: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (n.div_ceil(BLOCK as usize).min(4096) as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

/// One block of 256 threads per image.
fn per_image(batch: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (batch as u32, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    }
}

impl<D: KernelDevice> CudaBackend<D> {
    /// A backend on `dev`.
    pub fn new(dev: D) -> Self {
        CudaBackend {
            dev,
            scratch: Mutex::new(HashMap::new()),
            tables: Mutex::new(HashMap::new()),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// A scratch buffer of exactly `len` floats for `purpose` (contents unspecified).
    fn take_scratch(&self, purpose: &'static str, len: usize) -> Result<Buffer> {
        let cached = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(purpose, len));
        match cached {
            Some(b) => Ok(b),
            None => self.dev.alloc_zeros(len),
        }
    }

    fn put_scratch(&self, purpose: &'static str, buf: Buffer) {
        let len = buf.len();
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((purpose, len), buf);
    }

    /// The device address of a task table holding `words` for `purpose`: the cached one when
    /// the words are unchanged, else a new upload (u64 words as pairs of f32 bit patterns,
    /// little-endian, which no kernel treats as floats).
    fn task_table(&self, purpose: &'static str, words: Vec<u64>) -> Result<u64> {
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached, buf)) = tables.get(purpose) {
            if *cached == words {
                return self.dev.ptr(buf);
            }
        }
        let bits: Vec<f32> = words
            .iter()
            .flat_map(|&w| [f32::from_bits(w as u32), f32::from_bits((w >> 32) as u32)])
            .collect();
        let buf = self.dev.upload(&bits)?;
        let ptr = self.dev.ptr(&buf)?;
        tables.insert(purpose, (words, buf));
        Ok(ptr)
    }

    /// The `scale` pointer of a coupling kernel: the learned scale (tanh) or null (Glow's
    /// sigmoid reads none).
    fn scale_ptr(&self, scale: CouplingScale<'_>) -> Result<Param> {
        Ok(Param::Ptr(match scale {
            CouplingScale::Tanh(b) => self.dev.ptr(b)?,
            CouplingScale::Sigmoid { .. } => 0,
        }))
    }

    /// The five factor pointers, in the invconv kernels' parameter order.
    fn lu_ptrs(&self, lu: &LuFactors<'_>) -> Result<[Param; 5]> {
        Ok([
            Param::Ptr(self.dev.ptr(lu.perm)?),
            Param::Ptr(self.dev.ptr(lu.sign)?),
            Param::Ptr(self.dev.ptr(lu.lower)?),
            Param::Ptr(self.dev.ptr(lu.upper)?),
            Param::Ptr(self.dev.ptr(lu.log_s)?),
        ])
    }

    /// Launches an elementwise kernel over `n` elements (skipped when `n == 0`).
    fn launch_ew(&self, name: &'static str, n: usize, params: &[Param]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.dev.launch(name, ew(n), params)
    }
}

impl<D: KernelDevice> Backend for CudaBackend<D> {
    fn name(&self) -> String {
        self.dev.name()
    }
}
