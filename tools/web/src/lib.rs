//! clayflow's kernel as a WebAssembly module for `wasm32-unknown-unknown`: no allocator, no
//! `core::fmt`, no imports. A few `extern "C"` functions over static buffers (the ABI below,
//! used by `www/app.js` and `check.mjs`):
//!
//! | export | what |
//! |---|---|
//! | `cf_blob_reserve(len) -> *mut u8` | drops the loaded model and returns the blob buffer for `len` bytes (null and a message if it is too large) |
//! | `cf_load(len) -> i32` | parses and checks the `len` bytes written there; 0, or -1 and a message |
//! | `cf_sample(seed: u64, temperature: f32) -> i32` | one sample into the pixel and value buffers; 0 or -1 |
//! | `cf_pixels_ptr()`, `cf_values_ptr()` | the last sample: 784 `u8`, 784 `f32` |
//! | `cf_checksum() -> u32` | FNV-1a of the last sample's f32 values (the firmware's checksum) |
//! | `cf_digit_ptr() -> *mut u8` | 784 pixels to score |
//! | `cf_score() -> i32` | `log_prob` of those pixels; 0 or -1 |
//! | `cf_log_prob()`, `cf_bits_per_dim()` | the last score |
//! | `cf_message_ptr()`, `cf_message_len()` | UTF-8 text of the last failure (the kernel's message for a kernel error) |
//! | `cf_check_seed()`, `cf_check_temperature()`, `cf_check_digit_index()`, `cf_check_digit_label()` | the firmware's fixed check inputs (`tools/firmware/src/shared.rs`) |
//!
//! A trap (a bug: the kernel has no panicking paths) surfaces in JavaScript as a
//! `WebAssembly.RuntimeError`.

#![cfg_attr(target_arch = "wasm32", no_std)]

// The firmware's fixed inputs and checksum, one definition for firmware, host and web.
#[allow(dead_code)]
#[path = "../../firmware/src/shared.rs"]
mod shared;

pub mod model;
pub mod text;

#[cfg(target_arch = "wasm32")]
mod abi;

#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
