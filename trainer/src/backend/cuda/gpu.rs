//! The real GPU: [`CudaDevice`] implements [`KernelDevice`] with cudarc (driver API and NVRTC,
//! both loaded at run time, so building needs no CUDA toolkit).
//!
//! Every `.cu` module in [`KERNEL_SOURCES`] is compiled once per process and GPU architecture
//! with NVRTC straight to a CUBIN for the device's compute capability (`sm_XY`), so the
//! driver never has to JIT PTX: an NVRTC newer than the driver still works. When NVRTC does
//! not know the device's architecture (a GPU newer than NVRTC), the newest architecture NVRTC
//! supports is compiled to PTX instead and the driver JIT-compiles it.
//!
//! All work goes to one stream, in order, so buffers need no cross-stream events (cudarc's
//! event tracking is switched off).

use super::device::{KernelDevice, LaunchCfg, Param};
use crate::backend::{BackendError, Buffer, Result, Storage};
use cudarc::driver::{result as dres, sys as dsys, CudaContext, CudaFunction, CudaModule};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice};
use cudarc::nvrtc::{result as nres, sys as nsys, Ptx};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// `cuda/kernels/common.cuh`, which every module includes (see [`kernel_source`]).
pub const COMMON_HEADER: &str = include_str!("../../../../cuda/kernels/common.cuh");

/// The kernel modules, `(file name, source)`, embedded at build time. Each starts with
/// `#include "common.cuh"`; [`kernel_source`] gives the text NVRTC compiles.
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    (
        "elementwise.cu",
        include_str!("../../../../cuda/kernels/elementwise.cu"),
    ),
    (
        "coupling.cu",
        include_str!("../../../../cuda/kernels/coupling.cu"),
    ),
    (
        "reduce.cu",
        include_str!("../../../../cuda/kernels/reduce.cu"),
    ),
    ("conv.cu", include_str!("../../../../cuda/kernels/conv.cu")),
    ("glow.cu", include_str!("../../../../cuda/kernels/glow.cu")),
];

/// A module's source as NVRTC compiles it: the `#include "common.cuh"` line replaced by
/// [`COMMON_HEADER`] (NVRTC is given no include path, and the binary must not depend on the
/// source tree at run time).
pub fn kernel_source(src: &str) -> String {
    let mut out = String::with_capacity(src.len() + COMMON_HEADER.len());
    for line in src.lines() {
        if line.trim() == "#include \"common.cuh\"" {
            out.push_str(COMMON_HEADER);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// NVRTC options for `arch` (`"sm_90"`, or `"compute_90"` for PTX). The same options serve
/// the trainer and the NVRTC compile test.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        // Exact division and square root, like the CPU backend; `a*b+c` may fuse into FMA.
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--fmad=true".into(),
    ]
}

/// A module compiled by NVRTC.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The architecture it was compiled for (`sm_90` or `compute_90`).
    pub arch: String,
    /// CUBIN (for `sm_XY`) or NUL-terminated PTX (for `compute_XY`).
    pub image: Vec<u8>,
    /// NVRTC's log (warnings; with `--ptxas-options=-v` in `extra`, registers and spills).
    pub log: String,
}

/// Why NVRTC could not produce a module.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// `libnvrtc` is not on the loader path.
    #[error(
        "NVRTC (libnvrtc.so.12) was not found: install the `nvidia-cuda-nvrtc-cu12` wheel or a \
         CUDA 12 toolkit and put its lib folder on LD_LIBRARY_PATH"
    )]
    Missing,
    /// NVRTC does not accept the architecture.
    #[error("NVRTC {version} cannot compile for {arch}: {log}")]
    Arch {
        /// NVRTC's version.
        version: String,
        /// The architecture.
        arch: String,
        /// NVRTC's message.
        log: String,
    },
    /// The source did not compile.
    #[error("NVRTC failed on {module} for {arch} ({code}):\n{log}")]
    Failed {
        /// Module file name.
        module: String,
        /// The architecture.
        arch: String,
        /// NVRTC's result code.
        code: String,
        /// NVRTC's log.
        log: String,
    },
}

/// True when `libnvrtc` can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: loading the library runs its initialisers; NVRTC's are plain C setup. The
    // handle is dropped right away.
    unsafe { nsys::is_culib_present() }
}

/// NVRTC's version as `"major.minor"`, or "(not found)".
pub fn nvrtc_version() -> String {
    if !nvrtc_present() {
        return "(not found)".into();
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: both pointers point at live i32s.
    let r = unsafe { nsys::nvrtcVersion(&mut major, &mut minor) };
    if r == nsys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        "(unknown version)".into()
    }
}

/// The architectures NVRTC can compile for, as compute capabilities times 10 (`90` for sm_90);
/// empty when NVRTC is missing.
pub fn nvrtc_supported_archs() -> Vec<i32> {
    if !nvrtc_present() {
        return Vec::new();
    }
    let mut n = 0i32;
    // SAFETY: `n` is a live i32.
    if unsafe { nsys::nvrtcGetNumSupportedArchs(&mut n) } != nsys::nvrtcResult::NVRTC_SUCCESS {
        return Vec::new();
    }
    let mut v = vec![0i32; n.max(0) as usize];
    // SAFETY: `v` holds exactly the `n` ints NVRTC writes.
    if unsafe { nsys::nvrtcGetSupportedArchs(v.as_mut_ptr()) } != nsys::nvrtcResult::NVRTC_SUCCESS {
        return Vec::new();
    }
    v
}

/// An NVRTC program, destroyed on drop.
struct Program(nsys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program came from `create_program` and is destroyed only here. A
        // failure to destroy leaks it, which is harmless.
        let _ = unsafe { nres::destroy_program(self.0) };
    }
}

fn program_log(p: &Program) -> String {
    // SAFETY: `p` is a live program.
    match unsafe { nres::get_program_log(p.0) } {
        Ok(raw) => {
            let bytes: Vec<u8> = raw
                .iter()
                .map(|&c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// Compiles one module's `src` for `arch` (`sm_XY` gives a CUBIN, `compute_XY` PTX), with
/// [`nvrtc_options`] plus `extra` options. Errors, never panics, when NVRTC is missing.
pub fn compile_module(
    module: &str,
    src: &str,
    arch: &str,
    extra: &[&str],
) -> std::result::Result<Compiled, CompileError> {
    if !nvrtc_present() {
        return Err(CompileError::Missing);
    }
    let failed = |code: String, log: String| CompileError::Failed {
        module: module.into(),
        arch: arch.into(),
        code,
        log,
    };
    let c_src = CString::new(src).map_err(|_| failed("NUL".into(), "NUL byte in source".into()))?;
    let c_name =
        CString::new(module).map_err(|_| failed("NUL".into(), "NUL byte in name".into()))?;
    let prog = Program(
        nres::create_program(&c_src, Some(&c_name))
            .map_err(|e| failed(format!("{e:?}"), "".into()))?,
    );
    let mut opts = nvrtc_options(arch);
    opts.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: `prog` is live; the options are NUL-free Strings.
    if let Err(e) = unsafe { nres::compile_program(prog.0, &opts) } {
        let log = program_log(&prog);
        if e.0 == nsys::nvrtcResult::NVRTC_ERROR_INVALID_OPTION {
            return Err(CompileError::Arch {
                version: nvrtc_version(),
                arch: arch.into(),
                log,
            });
        }
        return Err(failed(format!("{:?}", e.0), log));
    }
    let log = program_log(&prog);
    let image = if arch.starts_with("sm_") {
        let mut size = 0usize;
        // SAFETY: `prog` compiled; `size` is a live usize.
        let r = unsafe { nsys::nvrtcGetCUBINSize(prog.0, &mut size) };
        if r != nsys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return Err(failed(format!("{r:?}"), "no CUBIN produced".into()));
        }
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds the `size` bytes NVRTC writes.
        let r = unsafe { nsys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) };
        if r != nsys::nvrtcResult::NVRTC_SUCCESS {
            return Err(failed(format!("{r:?}"), "reading the CUBIN".into()));
        }
        buf
    } else {
        // SAFETY: `prog` compiled.
        let raw =
            unsafe { nres::get_ptx(prog.0) }.map_err(|e| failed(format!("{e:?}"), log.clone()))?;
        let mut bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
        if bytes.last() != Some(&0) {
            bytes.push(0);
        }
        bytes
    };
    Ok(Compiled {
        arch: arch.into(),
        image,
        log,
    })
}

/// Compiles every module in [`KERNEL_SOURCES`] for a device of compute capability
/// `(major, minor)`, once per process and capability.
pub fn compiled_modules(cc: (i32, i32)) -> std::result::Result<Arc<Vec<Compiled>>, String> {
    type Cache = Mutex<HashMap<(i32, i32), Arc<Vec<Compiled>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = guard.get(&cc) {
        return Ok(m.clone());
    }
    let want = cc.0 * 10 + cc.1;
    let mut arch = format!("sm_{want}");
    let mut out = Vec::with_capacity(KERNEL_SOURCES.len());
    for (name, src) in KERNEL_SOURCES {
        let src = kernel_source(src);
        let src = src.as_str();
        let compiled = match compile_module(name, src, &arch, &[]) {
            Ok(c) => c,
            Err(CompileError::Arch { version, .. }) if arch.starts_with("sm_") => {
                // A GPU newer than NVRTC: PTX for the newest architecture NVRTC knows that
                // the device can run, JIT-compiled by the driver.
                let best = nvrtc_supported_archs()
                    .into_iter()
                    .filter(|&a| a <= want)
                    .max()
                    .ok_or_else(|| {
                        format!(
                            "NVRTC {version} supports no architecture up to sm_{want}; install a \
                             newer nvidia-cuda-nvrtc-cu12"
                        )
                    })?;
                arch = format!("compute_{best}");
                compile_module(name, src, &arch, &[]).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        out.push(compiled);
    }
    let out = Arc::new(out);
    guard.insert(cc, out.clone());
    Ok(out)
}

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
    /// Opens GPU `ordinal` and loads every kernel module (compiling it with NVRTC on first
    /// use in the process). Errors, never panics, when there is no driver, no such device
    /// or no NVRTC.
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
        if !nvrtc_present() {
            return Err(BackendError::Device(CompileError::Missing.to_string()));
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
        let compiled = compiled_modules(cc).map_err(|e| {
            BackendError::Device(format!(
                "compiling the CUDA kernels for cuda:{ordinal} ({name}, sm_{}{}): {e}",
                cc.0, cc.1
            ))
        })?;
        let mut modules = Vec::new();
        for ((file, _), c) in KERNEL_SOURCES.iter().zip(compiled.iter()) {
            let m = ctx
                .load_module(Ptx::from_binary(c.image.clone()))
                .map_err(|e| driver_err(&format!("loading {file} ({})", c.arch), e))?;
            modules.push((*file, m));
        }
        Ok(CudaDevice {
            label: format!("cuda:{ordinal} {name}"),
            ctx,
            stream,
            ordinal,
            modules,
            functions: Mutex::new(HashMap::new()),
            staging: Mutex::new(Staging::default()),
        })
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
