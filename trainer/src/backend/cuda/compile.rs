//! The kernel images a GPU loads: CUBINs that NVRTC compiles at run time for the device's own
//! architecture, or the PTX shipped inside the binary (`clayflow-cuda-kernels`), which the
//! driver JIT-compiles, when NVRTC is absent.
//!
//! [`kernel_images`] chooses, once per process and compute capability:
//! - NVRTC present: a CUBIN per module for `sm_XY`, so the driver never JITs and an NVRTC
//!   newer than the driver still works. A GPU newer than NVRTC gets PTX for the newest
//!   architecture NVRTC knows instead.
//! - NVRTC absent, or failing: the shipped PTX ([`PTX_ARCH`], made by NVRTC
//!   [`PTX_NVRTC_VERSION`]), which needs a driver of [`PTX_MIN_DRIVER`] or newer.
//! - `CLAYFLOW_CUDA_KERNELS=ptx` forces the shipped PTX and `=nvrtc` forbids it (for checking
//!   either path on a machine that has both).

pub use clayflow_cuda_kernels::{
    nvrtc_options, Module, MODULES, PTX_ARCH, PTX_MIN_DRIVER, PTX_NVRTC_VERSION, PTX_NVRTC_WHEEL,
};
use cudarc::nvrtc::{result as nres, sys as nsys};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

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

/// Where a GPU's kernel images came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// NVRTC at run time, for the device (`sm_XY` CUBIN, or `compute_XY` PTX when NVRTC does
    /// not know the device).
    Nvrtc {
        /// NVRTC's version, `major.minor`.
        version: String,
    },
    /// The PTX shipped in the binary; `why` says why NVRTC was not used.
    Shipped {
        /// Why: NVRTC missing, failing, or not wanted.
        why: String,
    },
}

/// Every module of [`MODULES`] as an image the driver loads, in the same order.
#[derive(Debug)]
pub struct Images {
    /// Where they came from.
    pub origin: Origin,
    /// One per module: CUBIN, or NUL-terminated PTX.
    pub modules: Vec<Compiled>,
}

impl Images {
    /// One line for the device's label, e.g. `NVRTC 12.4, sm_90 CUBIN` or
    /// `shipped PTX compute_70, JIT by the driver (NVRTC not found)`.
    pub fn describe(&self) -> String {
        let arch = self.modules.first().map(|c| c.arch.as_str()).unwrap_or("-");
        match &self.origin {
            Origin::Nvrtc { version } if arch.starts_with("sm_") => {
                format!("NVRTC {version}, {arch} CUBIN")
            }
            Origin::Nvrtc { version } => format!("NVRTC {version}, {arch} PTX JIT by the driver"),
            Origin::Shipped { why } => {
                format!("shipped PTX {arch}, JIT by the driver ({why})")
            }
        }
    }

    /// True when the driver JIT-compiles the shipped PTX.
    pub fn shipped(&self) -> bool {
        matches!(self.origin, Origin::Shipped { .. })
    }
}

/// The shipped PTX of every module, NUL-terminated.
pub fn shipped_images(why: String) -> Images {
    let modules = MODULES
        .iter()
        .map(|m| {
            let mut image = m.ptx.as_bytes().to_vec();
            image.push(0);
            Compiled {
                arch: PTX_ARCH.into(),
                image,
                log: String::new(),
            }
        })
        .collect();
    Images {
        origin: Origin::Shipped { why },
        modules,
    }
}

/// How `CLAYFLOW_CUDA_KERNELS` asks for the kernels: `None` (auto), `Some(true)` shipped PTX
/// only, `Some(false)` NVRTC only.
fn forced_ptx() -> std::result::Result<Option<bool>, String> {
    match std::env::var("CLAYFLOW_CUDA_KERNELS").as_deref() {
        Err(_) | Ok("") | Ok("auto") => Ok(None),
        Ok("ptx") => Ok(Some(true)),
        Ok("nvrtc") => Ok(Some(false)),
        Ok(other) => Err(format!(
            "CLAYFLOW_CUDA_KERNELS={other} is not one of auto, nvrtc, ptx"
        )),
    }
}

/// Compiles every module with NVRTC for compute capability `want` (`90` for sm_90).
fn nvrtc_images(want: i32) -> std::result::Result<Images, String> {
    let mut arch = format!("sm_{want}");
    let mut out = Vec::with_capacity(MODULES.len());
    for m in &MODULES {
        let src = m.nvrtc_source();
        let compiled = match compile_module(m.file, &src, &arch, &[]) {
            Ok(c) => c,
            Err(CompileError::Arch { version, .. }) if arch.starts_with("sm_") => {
                // A GPU newer than NVRTC: PTX for the newest architecture NVRTC knows that
                // the device can run, JIT-compiled by the driver.
                let best = nvrtc_supported_archs()
                    .into_iter()
                    .filter(|&a| a <= want)
                    .max()
                    .ok_or_else(|| {
                        format!("NVRTC {version} supports no architecture up to sm_{want}")
                    })?;
                arch = format!("compute_{best}");
                compile_module(m.file, &src, &arch, &[]).map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        out.push(compiled);
    }
    Ok(Images {
        origin: Origin::Nvrtc {
            version: nvrtc_version(),
        },
        modules: out,
    })
}

/// The kernel images for a device of compute capability `(major, minor)`, chosen as the
/// module documentation says, once per process and capability.
pub fn kernel_images(cc: (i32, i32)) -> std::result::Result<Arc<Images>, String> {
    type Cache = Mutex<HashMap<(i32, i32), Arc<Images>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = guard.get(&cc) {
        return Ok(m.clone());
    }
    let want = cc.0 * 10 + cc.1;
    let ptx_min: i32 = PTX_ARCH
        .trim_start_matches("compute_")
        .parse()
        .unwrap_or(i32::MAX);
    let shipped = |why: String| {
        if want < ptx_min {
            Err(format!(
                "the shipped PTX ({PTX_ARCH}) does not run on sm_{want} ({why}); install NVRTC \
                 (pip install nvidia-cuda-nvrtc-cu12, and put its lib folder on LD_LIBRARY_PATH) \
                 or use --device cpu"
            ))
        } else {
            Ok(shipped_images(why))
        }
    };
    let images = match forced_ptx()? {
        Some(true) => shipped("CLAYFLOW_CUDA_KERNELS=ptx".into())?,
        Some(false) => nvrtc_images(want)
            .map_err(|e| format!("{e} (CLAYFLOW_CUDA_KERNELS=nvrtc forbids the shipped PTX)"))?,
        None if !nvrtc_present() => shipped("NVRTC not found".into())?,
        None => match nvrtc_images(want) {
            Ok(images) => images,
            Err(e) => shipped(format!("NVRTC {} failed: {e}", nvrtc_version()))?,
        },
    };
    let images = Arc::new(images);
    guard.insert(cc, images.clone());
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_images_are_nul_terminated_ptx_for_every_module() {
        let images = shipped_images("test".into());
        assert_eq!(images.modules.len(), MODULES.len());
        for (m, c) in MODULES.iter().zip(&images.modules) {
            assert_eq!(c.arch, PTX_ARCH);
            assert_eq!(c.image.last(), Some(&0), "{}", m.file);
            assert_eq!(
                &c.image[..c.image.len() - 1],
                m.ptx.as_bytes(),
                "{}",
                m.file
            );
            // cuModuleLoadData reads PTX up to the first NUL: there must be no other.
            assert!(!m.ptx.as_bytes().contains(&0), "{}", m.file);
        }
        assert!(images.shipped());
        assert_eq!(
            images.describe(),
            format!("shipped PTX {PTX_ARCH}, JIT by the driver (test)")
        );
    }
}
