//! Emits the kernel's SIMD cfg, the one place its predicate is written: `clayflow_simd` when
//! the target features enable one of the SIMD convolution paths (`src/simd/`), plus
//! `clayflow_simd = "avx512" | "avx2" | "neon"` naming it. x86/x86_64 with AVX-512F takes
//! `avx512`, else with AVX2 and FMA `avx2`; little-endian aarch64 with NEON `neon`; every
//! other target (the Cortex-M4F firmware, wasm32) builds the scalar path only.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!(
        "cargo::rustc-check-cfg=cfg(clayflow_simd, values(none(), \"avx512\", \"avx2\", \"neon\"))"
    );
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let arch = var("CARGO_CFG_TARGET_ARCH");
    let features = var("CARGO_CFG_TARGET_FEATURE");
    let has = |f: &str| features.split(',').any(|x| x == f);
    let path = match arch.as_str() {
        "x86" | "x86_64" if has("avx512f") => Some("avx512"),
        "x86" | "x86_64" if has("avx2") && has("fma") => Some("avx2"),
        "aarch64" if has("neon") && var("CARGO_CFG_TARGET_ENDIAN") == "little" => Some("neon"),
        _ => None,
    };
    if let Some(path) = path {
        println!("cargo::rustc-cfg=clayflow_simd");
        println!("cargo::rustc-cfg=clayflow_simd=\"{path}\"");
    }
}
