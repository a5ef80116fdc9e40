//! Every CUDA source in `cuda/kernels/` compiles with NVRTC to a CUBIN for sm_80 (A100) and
//! sm_90 (H100/H200), with ptxas reporting no register spills for any kernel. Prints a table of
//! registers per kernel. The PTX shipped in the binary (`cuda/kernels/ptx/`) holds every kernel
//! and is exactly what the pinned NVRTC makes of today's sources (`cuda/ptx.sh` regenerates
//! it).
//!
//! Compiled through the trainer's own `compile_module` (same options as at run time).
//! NVRTC is loaded at run time (cudarc `dynamic-loading`): `cuda/ci.sh` installs the pinned
//! PyPI wheel `nvidia-cuda-nvrtc-cu12` and puts its lib folder on `LD_LIBRARY_PATH`. Without
//! NVRTC the test fails when `CLAYFLOW_REQUIRE_NVRTC=1` or `CI` is set, and otherwise says
//! loudly that the check did not run.

use clayflow_trainer::backend::cuda::compile::{
    compile_module, nvrtc_options, nvrtc_present, nvrtc_version, MODULES, PTX_ARCH,
    PTX_NVRTC_VERSION,
};
use std::path::{Path, PathBuf};

/// Real architectures compiled for (CUBIN needs a real `sm_XX`, not `compute_XX`).
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// ptxas' report for one kernel.
#[derive(Debug, Default, Clone)]
struct Usage {
    name: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses ptxas `-v` output: "Compiling entry function 'NAME' for 'sm_90'", then "N bytes
/// stack frame, N bytes spill stores, N bytes spill loads", then "Used N registers, ...".
fn parse_log(log: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Usage {
                name,
                ..Usage::default()
            });
        } else if let Some(u) = out.last_mut() {
            if line.contains("spill stores") {
                u.stack = number_before(line, "bytes stack frame").unwrap_or(u32::MAX);
                u.spill_stores = number_before(line, "bytes spill stores").unwrap_or(u32::MAX);
                u.spill_loads = number_before(line, "bytes spill loads").unwrap_or(u32::MAX);
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = number_before(line, "registers").unwrap_or(u32::MAX);
                u.smem = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// `extern "C" __global__` kernel names and their `__launch_bounds__` thread limit.
fn kernels_in(src: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for part in src.split("extern \"C\" __global__").skip(1) {
        let mut rest = part.trim_start();
        let mut bound = 0;
        loop {
            if let Some(r) = rest.strip_prefix("void") {
                rest = r.trim_start();
            } else if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
                let end = r.find(')').unwrap_or(0);
                bound = r[..end]
                    .split(',')
                    .next()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                rest = r[end + 1..].trim_start();
            } else {
                break;
            }
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push((name, bound));
    }
    out
}

/// Compiles `src` for `arch` exactly as the trainer does (`compile_module`, i.e. the
/// trainer's `nvrtc_options`), plus `--ptxas-options=-v`; returns (log, CUBIN size).
fn compile(name: &str, src: &str, arch: &str) -> Result<(String, usize), String> {
    compile_module(name, src, arch, &["--ptxas-options=-v"])
        .map(|c| (c.log, c.image.len()))
        .map_err(|e| e.to_string())
}

fn required() -> bool {
    let set = |k: &str| {
        std::env::var(k)
            .map(|v| !v.is_empty() && v != "0" && v != "false")
            .unwrap_or(false)
    };
    set("CLAYFLOW_REQUIRE_NVRTC") || set("CI")
}

/// The `.cu` files of `cuda/kernels/`.
fn sources() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .expect("cuda/kernels")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/kernels")
}

/// Fails (CI, `CLAYFLOW_REQUIRE_NVRTC=1`) or warns loudly that a check needing NVRTC did not run.
fn nvrtc_missing(check: &str) -> bool {
    if nvrtc_present() {
        return false;
    }
    let msg = format!(
        "NVRTC (libnvrtc.so.12) not found: run cuda/ci.sh, or put the lib folder of the pip wheel \
         nvidia-cuda-nvrtc-cu12 on LD_LIBRARY_PATH (`source cuda/nvrtc-env.sh`). {check} did NOT \
         run"
    );
    if required() {
        panic!("{msg}");
    }
    eprintln!("WARNING: {msg}.");
    true
}

#[test]
fn every_cu_file_is_a_shipped_module() {
    let files: Vec<String> = sources()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    let mut modules: Vec<String> = MODULES.iter().map(|m| m.file.to_string()).collect();
    modules.sort();
    assert_eq!(
        files, modules,
        "cuda/kernels/*.cu against clayflow_cuda_kernels::MODULES"
    );
    let ptx: Vec<String> = MODULES.iter().map(|m| m.ptx_file()).collect();
    for f in &ptx {
        assert!(
            kernels_dir().join("ptx").join(f).is_file(),
            "missing ptx/{f}"
        );
    }
}

#[test]
fn shipped_ptx_defines_every_kernel() {
    for m in &MODULES {
        let kernels = kernels_in(&m.nvrtc_source());
        assert!(!kernels.is_empty(), "{}", m.file);
        for (name, _) in kernels {
            let entry = format!(".entry {name}(");
            assert!(
                m.ptx
                    .lines()
                    .any(|l| l.contains(".visible") && l.contains(&entry)),
                "{}: the shipped PTX has no `.visible .entry {name}`: run cuda/ptx.sh",
                m.file
            );
        }
    }
}

#[test]
fn nvrtc_env_pins_the_ptx_compiler() {
    let env =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda/nvrtc-env.sh"))
            .expect("cuda/nvrtc-env.sh");
    let pin = format!(
        "CLAYFLOW_PTX_NVRTC_VERSION={}",
        clayflow_trainer::backend::cuda::compile::PTX_NVRTC_WHEEL
    );
    assert!(
        env.lines().any(|l| l.trim() == pin),
        "cuda/nvrtc-env.sh must pin {pin}, the NVRTC that makes the shipped PTX"
    );
}

/// The committed PTX equals what the pinned old NVRTC makes of the sources today. That NVRTC
/// is another library than the current one this process loads, so the comparison runs in a
/// child process (this test binary, [`ptx_compare_in_child`]) with `CLAYFLOW_PTX_NVRTC_LIB`
/// (set by `cuda/nvrtc-env.sh`) first on its loader path.
#[test]
fn shipped_ptx_is_up_to_date() {
    let Some(lib) = std::env::var_os("CLAYFLOW_PTX_NVRTC_LIB") else {
        let msg = "CLAYFLOW_PTX_NVRTC_LIB is not set (`source cuda/nvrtc-env.sh` installs the \
                   PTX's NVRTC and sets it)";
        if required() {
            panic!("{msg}");
        }
        eprintln!("WARNING: {msg}. The shipped-PTX staleness check did NOT run.");
        return;
    };
    let path = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(lib)];
    paths.extend(std::env::split_paths(&path));
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "ptx_compare_in_child",
            "--ignored",
            "--nocapture",
        ])
        .env(
            "LD_LIBRARY_PATH",
            std::env::join_paths(paths).expect("paths"),
        )
        .env("CLAYFLOW_PTX_CHILD", "1")
        .output()
        .expect("run the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{text}");
    assert!(out.status.success(), "the PTX comparison failed (above)");
    assert!(text.contains("1 passed"), "the child ran no comparison");
}

/// Run by [`shipped_ptx_is_up_to_date`]: compiles every module for `PTX_ARCH` with the NVRTC
/// on the loader path, which must be the PTX's release, and compares with the committed PTX.
/// With `CLAYFLOW_BLESS_PTX=1` (what `cuda/ptx.sh` sets) it writes the files instead.
#[test]
#[ignore = "run by shipped_ptx_is_up_to_date in a child process with the PTX's NVRTC"]
fn ptx_compare_in_child() {
    assert!(
        std::env::var_os("CLAYFLOW_PTX_CHILD").is_some(),
        "run shipped_ptx_is_up_to_date instead"
    );
    assert!(nvrtc_present(), "the PTX's NVRTC did not load");
    let version = nvrtc_version();
    assert_eq!(
        version, PTX_NVRTC_VERSION,
        "NVRTC {version} loaded, but the shipped PTX is made by NVRTC {PTX_NVRTC_VERSION}"
    );
    let bless = std::env::var("CLAYFLOW_BLESS_PTX").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for m in &MODULES {
        let c = compile_module(m.file, &m.nvrtc_source(), PTX_ARCH, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let ptx = c.image.strip_suffix(&[0]).unwrap_or(&c.image);
        if ptx != m.ptx.as_bytes() {
            let path = kernels_dir().join("ptx").join(m.ptx_file());
            if bless {
                std::fs::write(&path, ptx).expect("write ptx");
                eprintln!("wrote {}", path.display());
            } else {
                stale.push(m.ptx_file());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "cuda/kernels/ptx/{{{}}} differ from what NVRTC {PTX_NVRTC_VERSION} makes of the \
         sources: run `bash cuda/ptx.sh` and commit the result",
        stale.join(",")
    );
    eprintln!(
        "shipped PTX: {} modules equal NVRTC {version}'s {PTX_ARCH} output",
        MODULES.len()
    );
}

#[test]
fn ptxas_log_parser_reads_usage_and_spills() {
    let log = "ptxas info    : Compiling entry function 'cf_a' for 'sm_90'\n\
               ptxas info    : Function properties for cf_a\n\
               ptxas         .     24 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads\n\
               ptxas info    : Used 64 registers, used 1 barriers, 2048 bytes smem\n\
               ptxas info    : Compiling entry function 'cf_b' for 'sm_90'\n\
               ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
               ptxas info    : Used 10 registers, used 0 barriers, 376 bytes cmem[0]\n";
    let u = parse_log(log);
    assert_eq!(u.len(), 2);
    assert_eq!(
        (
            u[0].registers,
            u[0].spill_stores,
            u[0].spill_loads,
            u[0].smem
        ),
        (64, 24, 32, 2048)
    );
    assert_eq!(
        (u[1].name.as_str(), u[1].registers, u[1].spill_stores),
        ("cf_b", 10, 0)
    );
    let k = kernels_in(
        "extern \"C\" __global__ void __launch_bounds__(128, 4)\n cf_x(int a) {}\n\
         extern \"C\" __global__ __launch_bounds__(64) void cf_z() {}\n\
         extern \"C\" __global__ void cf_y(int a) {}",
    );
    assert_eq!(
        k,
        vec![
            ("cf_x".to_string(), 128),
            ("cf_z".to_string(), 64),
            ("cf_y".to_string(), 0)
        ]
    );
}

#[test]
fn kernels_compile_with_nvrtc_without_spills() {
    if nvrtc_missing("The NVRTC compile check") {
        return;
    }
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for m in &MODULES {
        // With common.cuh pasted in, exactly as the trainer hands it to NVRTC.
        let src = m.nvrtc_source();
        let file = m.file.to_string();
        let expected = kernels_in(&src);
        for arch in ARCHS {
            match compile(&file, &src, arch) {
                Err(log) => failures.push(format!("{file} {arch}: compile failed: {log}")),
                Ok((log, cubin)) => {
                    if cubin == 0 {
                        failures.push(format!("{file} {arch}: empty CUBIN"));
                    }
                    let usage = parse_log(&log);
                    for (name, bound) in &expected {
                        match usage.iter().find(|u| &u.name == name) {
                            None => failures
                                .push(format!("{file} {arch}: no ptxas report for {name}:\n{log}")),
                            Some(u) => {
                                if u.spill_stores != 0 || u.spill_loads != 0 {
                                    failures.push(format!(
                                        "{name} {arch}: {} bytes spill stores, {} bytes spill \
                                         loads",
                                        u.spill_stores, u.spill_loads
                                    ));
                                }
                                let threads = if *bound == 0 { 1024 } else { *bound };
                                if u.registers == u32::MAX || u.registers * threads > 65536 {
                                    failures.push(format!(
                                        "{name} {arch}: {} registers x {threads} threads exceed \
                                         the 64K register file",
                                        u.registers
                                    ));
                                }
                                rows.push((file.clone(), name.clone(), arch, u.clone()));
                            }
                        }
                    }
                }
            }
        }
    }
    println!(
        "NVRTC options: {:?} --ptxas-options=-v",
        nvrtc_options("sm_XX")
    );
    println!(
        "{:<16} {:<28} {:>5} {:>5} {:>6} {:>6} {:>6}",
        "file", "kernel", "arch", "regs", "stack", "spill", "smem"
    );
    for (file, name, arch, u) in &rows {
        println!(
            "{:<16} {:<28} {:>5} {:>5} {:>6} {:>6} {:>6}",
            file,
            name,
            arch.trim_start_matches("sm_"),
            u.registers,
            u.stack,
            u.spill_stores + u.spill_loads,
            u.smem
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(rows.len() >= 2 * 40, "expected every kernel for both archs");
}
