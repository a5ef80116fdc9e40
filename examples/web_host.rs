//! Host twin of the web page's WebAssembly module (`tools/web/`): the same kernel on the
//! same blob, seed, temperature and held-out digit as `tools/web/check.mjs` runs in Node.
//! Its lines must equal the module's byte for byte (`tools/web/ci.sh` compares them).
//!
//! ```text
//! cargo run --release --example web_host -- tools/firmware/model-glow-f16.cfw
//! ```
//!
//! (The native side of the speed comparison is `tools/web/examples/native_speed.rs`.)
//!
//! The result lines: the firmware's `checksum:` and `digit:` lines (`shared::write_results`),
//! then the kernel's error message for two damaged copies of the blob (one byte flipped in
//! the middle, the last 100 bytes cut), which the module must report in the same words.

// Shared with the firmware and the web module (seed, temperature, digit, checksum, lines).
#[allow(dead_code)]
#[path = "../tools/firmware/src/shared.rs"]
mod shared;

use clayflow_kernel::{bits_per_dim, image_len, log_prob, sample, scratch_len, DType, Model};
use shared::{Results, SEED, TEMPERATURE};
use std::process::ExitCode;

static DIGIT: &[u8; 784] = include_bytes!("../tools/firmware/digit.bin");

const USAGE: &str = "usage: web_host BLOB";

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::F32 => "f32",
    }
}

/// The two damaged copies of `blob` that `check.mjs` makes too, with their labels.
fn damaged(blob: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut flipped = blob.to_vec();
    let at = blob.len() / 2;
    if let Some(b) = flipped.get_mut(at) {
        *b ^= 0x40;
    }
    let cut = blob.get(..blob.len().saturating_sub(100)).unwrap_or(&[]);
    vec![
        (format!("byte {at} xor 0x40"), flipped),
        ("last 100 bytes cut".to_string(), cut.to_vec()),
    ]
}

/// The result lines (see the module docs).
fn results(blob: &[u8]) -> Result<String, String> {
    let model = Model::from_blob(blob).map_err(|e| e.to_string())?;
    let arch = model.arch();
    let mut scratch = vec![0f32; scratch_len(arch)];
    let d = image_len(arch);
    let (mut pixels, mut values) = (vec![0u8; d], vec![0f32; d]);
    sample(
        &model,
        SEED,
        TEMPERATURE,
        &mut scratch,
        &mut pixels,
        &mut values,
    )
    .map_err(|e| e.to_string())?;
    let lp = log_prob(&model, DIGIT, &mut scratch).map_err(|e| e.to_string())?;
    let r = Results {
        checksum: shared::fnv1a32(&values),
        log_prob: lp,
        bits_per_dim: bits_per_dim(arch, lp),
    };
    let mut s = String::new();
    shared::write_results(&mut s, dtype_name(model.dtype()), &r).map_err(|e| e.to_string())?;
    for (label, bad) in damaged(blob) {
        match Model::from_blob(&bad) {
            Ok(_) => return Err(format!("the damaged blob ({label}) parsed")),
            Err(e) => s.push_str(&format!("error ({label}): {e}\n")),
        }
    }
    Ok(s)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        [path] => std::fs::read(path)
            .map_err(|e| format!("{path}: {e}"))
            .and_then(|b| results(&b)),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(s) => {
            print!("{s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("web_host: {e}");
            ExitCode::FAILURE
        }
    }
}
