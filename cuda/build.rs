//! Compiles the CUDA kernels in `kernels/*.cu` for the host with the C++ compiler (C++20) and
//! the shim `sim/shim.h`, plus the grid runner `sim/sim.cpp` and a generated registry of every
//! `extern "C" __global__` kernel (name, parameter types, `__launch_bounds__`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One kernel found in a `.cu` source.
struct KernelDecl {
    name: String,
    params: String,
    max_threads: u32,
}

/// Finds every `extern "C" __global__ [__launch_bounds__(N)] void NAME(PARAMS)` in `src`.
fn parse_kernels(file: &Path, src: &str) -> Vec<KernelDecl> {
    const KEY: &str = "extern \"C\" __global__";
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find(KEY) {
        rest = rest[at + KEY.len()..].trim_start();
        // `void` and `__launch_bounds__(N[, M])` in either order.
        let mut max_threads = 0;
        let mut saw_void = false;
        loop {
            if let Some(r) = rest.strip_prefix("void") {
                saw_void = true;
                rest = r.trim_start();
            } else if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
                let end = r.find(')').expect("unterminated __launch_bounds__");
                max_threads = r[..end]
                    .split(',')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| {
                        panic!("{}: __launch_bounds__ must be a literal", file.display())
                    });
                rest = r[end + 1..].trim_start();
            } else {
                break;
            }
        }
        assert!(saw_void, "{}: kernel must return void", file.display());
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = rest[..name_len].to_string();
        rest = rest[name_len..].trim_start();
        rest = rest
            .strip_prefix('(')
            .unwrap_or_else(|| panic!("{}: kernel {name}: expected '('", file.display()));
        let end = rest.find(')').unwrap_or_else(|| {
            panic!("{}: kernel {name}: unterminated parameters", file.display())
        });
        let params = rest[..end]
            .replace("__restrict__", "")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        rest = &rest[end + 1..];
        out.push(KernelDecl {
            name,
            params,
            max_threads,
        });
    }
    out
}

fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let sim = root.join("sim");
    let shim = sim.join("shim.h");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=sim");

    // The real kernels, then the simulator's self-test kernels (deliberately broken ones).
    let mut sources = cu_files(&root.join("kernels"));
    sources.push(sim.join("selftest.cu"));

    let mut build = cc::Build::new();
    build
        .cpp(true)
        // The simulator runs thousands of threads through the kernels: always optimise.
        .opt_level(2)
        .std("c++20")
        .include(&sim)
        .flag("-pthread")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas")
        .file(sim.join("sim.cpp"));
    let mut decls = String::new();
    let mut table = String::new();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let text = std::fs::read_to_string(src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        for k in parse_kernels(src, &text) {
            writeln!(decls, "extern \"C\" void {}({});", k.name, k.params).unwrap();
            writeln!(table, "    CF_KERNEL({}, {}),", k.name, k.max_threads).unwrap();
        }
        // Each .cu is its own translation unit, with the shim force-included first.
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let wrapper = out.join(format!("{stem}_host.cpp"));
        let body = format!(
            "#include \"{}\"\n#include \"{}\"\n",
            shim.display(),
            src.display()
        );
        std::fs::write(&wrapper, body).expect("write wrapper");
        build.file(&wrapper);
    }
    let registry = out.join("registry.cpp");
    let body = format!(
        "#include \"shim.h\"\n#include \"registry.h\"\n\n{decls}\nnamespace clayflow_sim {{\n\
         const Kernel kKernels[] = {{\n{table}}};\n\
         const std::size_t kKernelCount = sizeof(kKernels) / sizeof(kKernels[0]);\n}}\n"
    );
    std::fs::write(&registry, body).expect("write registry");
    build.file(&registry);
    build.compile("clayflow_cuda_sim");
}
