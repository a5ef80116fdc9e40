//! clayflow's CUDA kernels, as the trainer ships them: the `.cu` sources of this folder
//! and their PTX (`ptx/*.ptx`), both embedded at build time.
//!
//! A GPU machine needs only its driver. Where NVRTC is present the trainer compiles
//! [`Module::nvrtc_source`] to a CUBIN for the device's own architecture; where it is not,
//! the driver JIT-compiles [`Module::ptx`]. The PTX is generated for [`PTX_ARCH`] by NVRTC
//! [`PTX_NVRTC_WHEEL`] (the oldest CUDA 12 NVRTC, so that the PTX ISA is one every CUDA 12
//! driver can JIT: [`PTX_MIN_DRIVER`] and newer). `cuda/ptx.sh` regenerates it, and the
//! test `tests/cuda_nvrtc.rs` fails in CI when the committed copy differs from what NVRTC
//! makes of the sources.
//!
//! This crate holds data only; compiling and loading live in the trainer
//! (`trainer/src/backend/cuda/`), and the CPU simulator that runs the same sources in tests
//! is the `clayflow-cuda-sim` crate (`cuda/`).

/// `common.cuh`: what the modules share (block sums, mask rules, the coupling's scale
/// functions). Each module includes it; NVRTC is given no include path, so
/// [`Module::nvrtc_source`] pastes it in.
pub const COMMON_HEADER: &str = include_str!("../common.cuh");

/// The virtual architecture of the shipped PTX: every GPU from Volta (sm_70: V100, T4, A100,
/// L4, H100, ...) can JIT-compile it.
pub const PTX_ARCH: &str = "compute_70";

/// The NVRTC release that generated the shipped PTX, as `nvrtcVersion` reports it.
pub const PTX_NVRTC_VERSION: &str = "12.0";

/// The PyPI wheel `nvidia-cuda-nvrtc-cu12` of that release (pinned in `cuda/nvrtc-env.sh`).
pub const PTX_NVRTC_WHEEL: &str = "12.0.140";

/// The oldest driver that JIT-compiles the shipped PTX (ISA 8.0, CUDA 12.0): Linux 525.60.13,
/// Windows 527.41.
pub const PTX_MIN_DRIVER: &str = "525.60.13 (Linux) / 527.41 (Windows), i.e. CUDA 12.0";

/// One kernel module: a `.cu` file of this folder.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// File name, e.g. `conv.cu`.
    pub file: &'static str,
    /// The source as written, starting with `#include "common.cuh"`.
    pub source: &'static str,
    /// NVRTC's PTX of [`Module::nvrtc_source`] for [`PTX_ARCH`] (no trailing NUL).
    pub ptx: &'static str,
}

macro_rules! module {
    ($file:literal, $ptx:literal) => {
        Module {
            file: $file,
            source: include_str!(concat!("../", $file)),
            ptx: include_str!(concat!("../ptx/", $ptx)),
        }
    };
}

/// Every kernel module, in load order.
pub const MODULES: [Module; 5] = [
    module!("elementwise.cu", "elementwise.ptx"),
    module!("coupling.cu", "coupling.ptx"),
    module!("reduce.cu", "reduce.ptx"),
    module!("conv.cu", "conv.ptx"),
    module!("glow.cu", "glow.ptx"),
];

impl Module {
    /// The source as NVRTC compiles it: the `#include "common.cuh"` line replaced by
    /// [`COMMON_HEADER`] (the binary must not depend on the source tree at run time).
    pub fn nvrtc_source(&self) -> String {
        let mut out = String::with_capacity(self.source.len() + COMMON_HEADER.len());
        for line in self.source.lines() {
            if line.trim() == "#include \"common.cuh\"" {
                out.push_str(COMMON_HEADER);
            } else {
                out.push_str(line);
            }
            out.push('\n');
        }
        out
    }

    /// The PTX file's name, e.g. `conv.ptx`.
    pub fn ptx_file(&self) -> String {
        let stem = self.file.strip_suffix(".cu").unwrap_or(self.file);
        format!("{stem}.ptx")
    }
}

/// NVRTC options for `arch` (`"sm_90"` gives a CUBIN, `"compute_70"` PTX). One list for the
/// trainer at run time, the shipped PTX and the compile test.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_is_a_cu_file_with_its_ptx() {
        for m in MODULES {
            assert!(m.file.ends_with(".cu"), "{}", m.file);
            assert_eq!(m.ptx_file(), m.file.replace(".cu", ".ptx"));
            let include = |l: &str| l.trim() == "#include \"common.cuh\"";
            assert!(m.source.lines().any(include), "{}", m.file);
            let src = m.nvrtc_source();
            assert!(!src.lines().any(include), "{}", m.file);
            assert!(src.contains(COMMON_HEADER.trim()), "{}", m.file);
        }
    }

    #[test]
    fn ptx_targets_the_shipped_arch() {
        let target = format!(".target {}", PTX_ARCH.replace("compute_", "sm_"));
        let release = format!("release {PTX_NVRTC_VERSION}, V{PTX_NVRTC_WHEEL}");
        for m in MODULES {
            assert!(
                m.ptx.lines().any(|l| l.trim() == target),
                "{}: {target}",
                m.file
            );
            assert!(
                m.ptx.contains(&release),
                "{}: made by NVRTC {release}",
                m.file
            );
            assert!(m.ptx.contains(".version 8.0"), "{}: PTX ISA 8.0", m.file);
        }
    }
}
