//! The real GPU: [`CudaDevice`] implements [`KernelDevice`] with cudarc (the driver API, and
//! NVRTC when present, both loaded at run time, so building needs no CUDA toolkit and running
//! needs only the driver). The kernels it loads come from [`super::compile::kernel_images`]:
//! NVRTC's CUBINs for the device, or the PTX shipped in the binary.
//!
//! All work goes to one stream, in order, so buffers need no cross-stream events (cudarc's
//! event tracking is switched off).

use super::compile::{
    kernel_images, shipped_images, Images, MODULES, PTX_MIN_DRIVER, PTX_NVRTC_VERSION,
};
use super::device::{KernelDevice, LaunchCfg, Param};
use crate::backend::{BackendError, Buffer, Result, Storage};
use cudarc::driver::{result as dres, sys as dsys, CudaContext, CudaFunction, CudaModule};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice};
use cudarc::nvrtc::Ptx;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// `NAME (description)` of a driver error.
fn driver_text(e: &dres::DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name} ({text})")
}

/// What a kernel fault means and what to do about it. Launches are asynchronous, so the
/// fault may surface at a later call than the kernel that caused it.
pub const KERNEL_BUG_HINT: &str = "; this is a kernel bug in clayflow (a fault inside a CUDA \
     kernel): rerun with CUDA_LAUNCH_BLOCKING=1 to make the failing kernel report itself, \
     please report it with that output and the command line, and use --device cpu meanwhile";

fn driver_err(what: &str, e: dres::DriverError) -> BackendError {
    let hint = match e.0 {
        dsys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => "; lower --batch-size or free GPU memory",
        dsys::cudaError_enum::CUDA_ERROR_NO_DEVICE
        | dsys::cudaError_enum::CUDA_ERROR_INVALID_DEVICE => {
            "; check `nvidia-smi` and the N in --device cuda:N, or use --device cpu"
        }
        dsys::cudaError_enum::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | dsys::cudaError_enum::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            "; update the NVIDIA driver, or use --device cpu"
        }
        dsys::cudaError_enum::CUDA_ERROR_LAUNCH_FAILED
        | dsys::cudaError_enum::CUDA_ERROR_ILLEGAL_ADDRESS
        | dsys::cudaError_enum::CUDA_ERROR_MISALIGNED_ADDRESS
        | dsys::cudaError_enum::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | dsys::cudaError_enum::CUDA_ERROR_INVALID_ADDRESS_SPACE
        | dsys::cudaError_enum::CUDA_ERROR_INVALID_PC
        | dsys::cudaError_enum::CUDA_ERROR_HARDWARE_STACK_ERROR
        | dsys::cudaError_enum::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
        | dsys::cudaError_enum::CUDA_ERROR_LAUNCH_TIMEOUT
        | dsys::cudaError_enum::CUDA_ERROR_ASSERT => KERNEL_BUG_HINT,
        _ => "; use --device cpu to train on the CPU",
    };
    BackendError::Device(format!("CUDA {what}: {}{hint}", driver_text(&e)))
}

/// A module that the driver would not load; for the shipped PTX, says which driver it needs.
fn load_err(file: &str, arch: &str, images: &Images, e: dres::DriverError) -> BackendError {
    let err = driver_err(&format!("loading {file} ({arch})"), e);
    if !images.shipped() {
        return err;
    }
    BackendError::Device(format!(
        "{err}. The shipped PTX (made by NVRTC {PTX_NVRTC_VERSION}) needs an NVIDIA driver \
         {PTX_MIN_DRIVER} or newer: update the driver, or install NVRTC \
         (pip install nvidia-cuda-nvrtc-cu12, with its lib folder on LD_LIBRARY_PATH) so that \
         the kernels are compiled for this GPU instead"
    ))
}

/// Finds why no GPU can be used, without panicking: `Ok(count)` when the driver loads and
/// reports `count` devices.
pub fn device_count() -> std::result::Result<usize, String> {
    // SAFETY: loading libcuda runs the driver's initialisers (as any CUDA program does); the
    // handle is dropped right away.
    if !unsafe { dsys::is_culib_present() } {
        return Err("the NVIDIA driver library libcuda.so was not found".into());
    }
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n.max(0) as usize),
        Ok(Err(e)) => Err(format!(
            "the CUDA driver reports no usable device: {}",
            driver_text(&e)
        )),
        Err(_) => Err("the CUDA driver library could not be used (it panicked on load)".into()),
    }
}

/// FP32 lanes (CUDA cores) per SM of compute capability `cc`, from NVIDIA's tables
/// (Volta, Turing, A100: 64; GA10x, Ada, Hopper, Blackwell: 128).
pub fn fp32_lanes_per_sm(cc: (i32, i32)) -> u32 {
    match cc {
        (6, 0) | (7, _) | (8, 0) => 64,
        _ => 128,
    }
}

/// The FP32 peak of GPU `ordinal` in TFLOP/s (an FMA counts 2): SMs x lanes x 2 x the
/// boost clock the driver reports. For the conv throughput's share of peak in
/// `tools/gpu-check.sh`.
pub fn fp32_peak_tflops(ordinal: usize) -> std::result::Result<f64, String> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(format!("cuda:{ordinal} does not exist ({count} device(s))"));
    }
    let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
        .map_err(|_| "cudarc panicked opening the device".to_string())?
        .map_err(|e| driver_text(&e))?;
    let attr = |a| ctx.attribute(a).map_err(|e| driver_text(&e));
    let sms = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let khz = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)?;
    let cc = ctx.compute_capability().map_err(|e| driver_text(&e))?;
    Ok(f64::from(sms) * f64::from(fp32_lanes_per_sm(cc)) * 2.0 * f64::from(khz) * 1e3 / 1e12)
}

/// GPU memory of a [`Buffer`] (`Storage::Cuda`).
#[derive(Debug)]
pub struct CudaMem {
    /// Device ordinal the memory lives on.
    ordinal: usize,
    /// Number of f32s.
    len: usize,
    /// The allocation; `None` for an empty buffer (the driver does not allocate 0 bytes).
    slice: Option<CudaSlice<f32>>,
}

impl CudaMem {
    /// Number of f32s.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The GPU the memory lives on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The allocation (`None` when empty), for collectives that work on device memory in
    /// place (NCCL).
    pub fn slice_mut(&mut self) -> Option<&mut CudaSlice<f32>> {
        self.slice.as_mut()
    }
}

/// Page-locked host memory reused for transfers, one buffer per transfer length (a training
/// run moves the same few lengths every step: the batch in, the loss terms and the gradient
/// norm's partial sums out), so a warm step allocates none.
#[derive(Debug, Default)]
struct Staging {
    /// Write-combined buffers for uploads, each with the event recorded after its last copy
    /// (the host must not overwrite it before that copy has read it).
    up: HashMap<usize, (PinnedHostSlice<f32>, Option<CudaEvent>)>,
    /// Cached buffers for downloads (the host reads them, so not write-combined).
    down: HashMap<usize, PinnedHostSlice<f32>>,
}

/// The real GPU, through cudarc.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    label: String,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
    staging: Mutex<Staging>,
}

impl CudaDevice {
    /// Opens GPU `ordinal` and loads every kernel module (compiled by NVRTC on first use in
    /// the process, or the shipped PTX). Errors, never panics, when there is no driver, no
    /// such device, or a driver too old for the shipped PTX where NVRTC is absent.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let count = device_count()
            .map_err(|e| BackendError::Device(format!("{e}; use --device cpu or --device auto")))?;
        if ordinal >= count {
            return Err(BackendError::Device(format!(
                "cuda:{ordinal} does not exist: the driver reports {count} device(s){}",
                if count == 0 {
                    "; use --device cpu or --device auto".to_string()
                } else {
                    format!("; pick --device cuda:0..{}", count - 1)
                }
            )));
        }
        match std::panic::catch_unwind(|| Self::open(ordinal)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(BackendError::Device(format!(
                    "opening cuda:{ordinal} failed inside cudarc: {msg}; use --device cpu"
                )))
            }
        }
    }

    fn wrap(&self, len: usize, slice: Option<CudaSlice<f32>>) -> Buffer {
        Buffer {
            storage: Storage::Cuda(CudaMem {
                ordinal: self.ordinal,
                len,
                slice,
            }),
        }
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("context creation", e))?;
        // SAFETY: every buffer and launch uses the one stream below, so the per-buffer
        // cross-stream events cudarc would record are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Self::keep_freed_memory(&ctx);
        let name = ctx.name().map_err(|e| driver_err("device query", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| driver_err("device query", e))?;
        let images = kernel_images(cc).map_err(|e| {
            BackendError::Device(format!(
                "preparing the CUDA kernels for cuda:{ordinal} ({name}, sm_{}{}): {e}",
                cc.0, cc.1
            ))
        })?;
        let (images, modules) = match Self::load(&ctx, &images) {
            Ok(modules) => (images, modules),
            // An NVRTC newer than the driver can make PTX the driver cannot JIT: the shipped
            // PTX is older, so try it before giving up.
            Err(e) if !images.shipped() => {
                let shipped = shipped_images(format!("the driver refused NVRTC's: {e}"));
                match Self::load(&ctx, &shipped) {
                    Ok(modules) => (Arc::new(shipped), modules),
                    Err(_) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(CudaDevice {
            label: format!("cuda:{ordinal} {name} [{}]", images.describe()),
            ctx,
            stream,
            ordinal,
            modules,
            functions: Mutex::new(HashMap::new()),
            staging: Mutex::new(Staging::default()),
        })
    }

    /// Loads every module of `images` into `ctx`.
    fn load(
        ctx: &Arc<CudaContext>,
        images: &Images,
    ) -> Result<Vec<(&'static str, Arc<CudaModule>)>> {
        let mut modules = Vec::new();
        for (m, c) in MODULES.iter().zip(images.modules.iter()) {
            let loaded = ctx
                .load_module(Ptx::from_binary(c.image.clone()))
                .map_err(|e| load_err(m.file, &c.arch, images, e))?;
            modules.push((m.file, loaded));
        }
        Ok(modules)
    }

    /// Keeps freed device memory in the stream-ordered pool instead of returning it to the
    /// driver at every synchronisation (the default release threshold is 0), so buffers freed
    /// and allocated again between steps cost no driver calls. Best effort: a device without
    /// memory pools simply keeps the default.
    fn keep_freed_memory(ctx: &CudaContext) {
        if !ctx.has_async_alloc() {
            return;
        }
        // SAFETY: `cu_device` is the context's own device handle; the pool returned for it is
        // owned by the driver and stays valid for the process. The attribute value is a live
        // u64, which is what CU_MEMPOOL_ATTR_RELEASE_THRESHOLD takes.
        unsafe {
            if let Ok(pool) = dres::device::get_default_mem_pool(ctx.cu_device()) {
                let mut threshold: u64 = u64::MAX;
                let _ = dsys::cuMemPoolSetAttribute(
                    pool,
                    dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast::<c_void>(),
                );
            }
        }
    }

    /// Page-locked host memory of `len` floats (`flags` as for `cuMemHostAlloc`).
    fn pinned(&self, len: usize, flags: u32) -> Result<PinnedHostSlice<f32>> {
        // SAFETY: the memory is uninitialised; every user writes (upload) or copies into
        // (download) all `len` floats before reading them.
        unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len, flags) }
            .map_err(|e| driver_err(&format!("allocating {len} floats of pinned host memory"), e))
    }

    fn mem<'a>(&self, op: &'static str, b: &'a Buffer) -> Result<&'a CudaMem> {
        match &b.storage {
            Storage::Cuda(m) if m.ordinal == self.ordinal => Ok(m),
            _ => Err(BackendError::WrongDevice { op }),
        }
    }

    /// The kernel `name`, looked up in the loaded modules on first use.
    fn function(&self, name: &'static str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        for (_, m) in &self.modules {
            if let Ok(f) = m.load_function(name) {
                cache.insert(name, f.clone());
                return Ok(f);
            }
        }
        Err(BackendError::Device(format!(
            "kernel {name} is in none of the compiled CUDA modules ({}): the backend and \
             cuda/kernels disagree, a clayflow bug; use --device cpu",
            self.modules
                .iter()
                .map(|(f, _)| *f)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

impl KernelDevice for CudaDevice {
    fn name(&self) -> String {
        self.label.clone()
    }

    fn alloc_zeros(&self, len: usize) -> Result<Buffer> {
        let slice = if len == 0 {
            None
        } else {
            Some(
                self.stream
                    .alloc_zeros::<f32>(len)
                    .map_err(|e| driver_err(&format!("allocating {len} floats"), e))?,
            )
        };
        Ok(self.wrap(len, slice))
    }

    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        let slice = if data.is_empty() {
            None
        } else {
            Some(
                self.stream
                    .clone_htod(data)
                    .map_err(|e| driver_err(&format!("uploading {} floats", data.len()), e))?,
            )
        };
        Ok(self.wrap(data.len(), slice))
    }

    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()> {
        let n = data.len();
        let m = match &mut dst.storage {
            Storage::Cuda(m) if m.ordinal == self.ordinal => m,
            _ => return Err(BackendError::WrongDevice { op: "upload_into" }),
        };
        if m.len != n {
            return Err(BackendError::Size {
                op: "upload_into",
                what: "dst",
                expected: n,
                got: m.len,
            });
        }
        let Some(slice) = &mut m.slice else {
            return Ok(());
        };
        let err = |e| driver_err(&format!("uploading {n} floats"), e);
        let mut st = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let (host, done) = match st.up.entry(n) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                v.insert((self.pinned(n, dsys::CU_MEMHOSTALLOC_WRITECOMBINED)?, None))
            }
        };
        if let Some(ev) = done {
            // The previous upload through this buffer must have been read first.
            ev.synchronize().map_err(err)?;
        }
        host.as_mut_slice().map_err(err)?.copy_from_slice(data);
        self.stream.memcpy_htod(host, slice).map_err(err)?;
        let ev = match done.take() {
            Some(ev) => ev,
            None => self.ctx.new_event(None).map_err(err)?,
        };
        ev.record(&self.stream).map_err(err)?;
        *done = Some(ev);
        Ok(())
    }

    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        let Some(s) = &self.mem("download", buf)?.slice else {
            return Ok(Vec::new());
        };
        let n = s.len();
        let err = |e| driver_err(&format!("downloading {n} floats"), e);
        let mut st = self.staging.lock().unwrap_or_else(|p| p.into_inner());
        let host = match st.down.entry(n) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.pinned(n, 0)?),
        };
        self.stream.memcpy_dtoh(s, host).map_err(err)?;
        self.synchronize()?;
        Ok(host.as_slice().map_err(err)?.to_vec())
    }

    fn ptr(&self, buf: &Buffer) -> Result<u64> {
        Ok(match &self.mem("kernel argument", buf)?.slice {
            Some(s) => s.device_ptr(&self.stream).0,
            None => 0,
        })
    }

    fn ptr_mut(&self, buf: &mut Buffer) -> Result<u64> {
        match &mut buf.storage {
            Storage::Cuda(m) if m.ordinal == self.ordinal => Ok(match &mut m.slice {
                Some(s) => s.device_ptr_mut(&self.stream).0,
                None => 0,
            }),
            _ => Err(BackendError::WrongDevice {
                op: "kernel argument",
            }),
        }
    }

    fn launch(&self, name: &'static str, cfg: LaunchCfg, params: &[Param]) -> Result<()> {
        let f = self.function(name)?;
        // cuLaunchKernel reads each parameter through a pointer to its value: keep the values
        // in a Vec that outlives the call, then point at them.
        #[derive(Clone, Copy)]
        #[repr(C)]
        union Value {
            p: u64,
            i: i32,
            u: u32,
            f: f32,
        }
        let mut values: Vec<Value> = params
            .iter()
            .map(|p| match *p {
                Param::Ptr(p) => Value { p },
                Param::I32(i) => Value { i },
                Param::U32(u) => Value { u },
                Param::F32(f) => Value { f },
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| (v as *mut Value).cast::<c_void>())
            .collect();
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        // SAFETY: `f` is a live function of a module this device holds; `ptrs` has one
        // pointer per kernel parameter (the caller passes them in the kernel's order, as
        // cuda/KERNELS.md documents), each to a value of the parameter's size at offset 0 of
        // its union (little-endian, so an i32/u32/f32 occupies the first four bytes);
        // `values` and `ptrs` live until the call returns, after which the driver has copied
        // the parameters. Pointers come from this device's buffers via `ptr`/`ptr_mut`.
        unsafe {
            dres::launch_kernel(
                f.cu_function(),
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                self.stream.cu_stream(),
                &mut ptrs,
            )
        }
        .map_err(|e| driver_err(&format!("launching {name} {cfg:?}"), e))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("synchronize", e))
    }
}

#[cfg(test)]
mod tests {
    use super::fp32_lanes_per_sm;

    #[test]
    fn fp32_peak_of_known_gpus() {
        // (cc, SMs, boost MHz, NVIDIA's datasheet FP32 TFLOP/s)
        for (cc, sms, mhz, sheet) in [
            ((9, 0), 132, 1980, 66.9), // H100 SXM
            ((8, 0), 108, 1410, 19.5), // A100
            ((8, 9), 58, 2040, 30.3),  // L4 (datasheet 30.3)
            ((7, 0), 80, 1530, 15.7),  // V100 SXM2
        ] {
            let peak = f64::from(sms * fp32_lanes_per_sm(cc)) * 2.0 * f64::from(mhz) * 1e6 / 1e12;
            assert!(
                (peak - sheet).abs() / sheet < 0.01,
                "{cc:?}: {peak} vs {sheet}"
            );
        }
    }
}
