//! Puts the linker script's memory map (`memory.x`, or `memory-4mib.x` with the `qemu-4mib`
//! feature) where `cortex-m-rt`'s `link.x` finds it.

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = if env::var_os("CARGO_FEATURE_QEMU_4MIB").is_some() {
        "memory-4mib.x"
    } else {
        "memory.x"
    };
    fs::copy(source, out.join("memory.x")).expect("copy the memory map into OUT_DIR");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=memory-4mib.x");
    println!("cargo:rerun-if-changed=model-f16.cfw");
    println!("cargo:rerun-if-changed=model-f32.cfw");
    println!("cargo:rerun-if-changed=digit.bin");
}
