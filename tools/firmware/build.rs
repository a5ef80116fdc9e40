//! Puts the linker script's memory map (`ld/memory.x`, or `ld/memory-4mib.x` with the
//! `qemu-4mib` feature) where `cortex-m-rt`'s `link.x` finds it. (They live in `ld/`, not in
//! the crate root: the linker looks for `memory.x` in its working directory, the crate root,
//! before the search path, so a root `memory.x` would always win.)

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = if env::var_os("CARGO_FEATURE_QEMU_4MIB").is_some() {
        "ld/memory-4mib.x"
    } else {
        "ld/memory.x"
    };
    fs::copy(source, out.join("memory.x")).expect("copy the memory map into OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=ld/memory.x");
    println!("cargo:rerun-if-changed=ld/memory-4mib.x");
    println!("cargo:rerun-if-changed=model-f16.cfw");
    println!("cargo:rerun-if-changed=model-f32.cfw");
    println!("cargo:rerun-if-changed=model-glow-f16.cfw");
    println!("cargo:rerun-if-changed=digit.bin");
}
