//! The native side of the browser-vs-native speed comparison: samples per second at batch 1
//! on one thread, same kernel, blob, seeds and temperature as the page's `bench` and
//! `check.mjs --time` (seeds `SEED..SEED + n` after one untimed sample).
//!
//! ```text
//! cd tools/web
//! cargo run --release --example native_speed -- ../firmware/model-glow-f16.cfw 200
//! RUSTFLAGS="-C target-cpu=native" cargo run --release --example native_speed \
//!     --target-dir target-native -- ../firmware/model-glow-f16.cfw 200   # the SIMD path
//! ```

#[allow(dead_code)]
#[path = "../../firmware/src/shared.rs"]
mod shared;

use clayflow_kernel::{image_len, sample, scratch_len, Model};
use shared::{SEED, TEMPERATURE};
use std::process::ExitCode;
use std::time::Instant;

fn run(path: &str, n: u64) -> Result<String, String> {
    let blob = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let model = Model::from_blob(&blob).map_err(|e| format!("{path}: {e}"))?;
    let arch = model.arch();
    let mut scratch = vec![0f32; scratch_len(arch)];
    let d = image_len(arch);
    let (mut pixels, mut values) = (vec![0u8; d], vec![0f32; d]);
    // One untimed sample first, as the browser's and Node's measurements do. Its checksum
    // is the CI check's: equal to the module's on the scalar path, different on a SIMD path
    // (fused multiply-adds).
    sample(
        &model,
        SEED,
        TEMPERATURE,
        &mut scratch,
        &mut pixels,
        &mut values,
    )
    .map_err(|e| e.to_string())?;
    let checksum = shared::fnv1a32(&values);
    let mut draw = |seed| {
        sample(
            &model,
            seed,
            TEMPERATURE,
            &mut scratch,
            &mut pixels,
            &mut values,
        )
        .map_err(|e| e.to_string())
    };
    let t = Instant::now();
    for seed in SEED..SEED + n {
        draw(seed)?;
    }
    let s = t.elapsed().as_secs_f64();
    Ok(format!(
        "native ({} path): {n} samples (batch 1, one thread) in {s:.3} s: {:.1} samples/s, {:.2} ms per sample; checksum of seed {SEED}: 0x{checksum:08x}",
        clayflow_kernel::conv::PATH,
        n as f64 / s,
        s * 1e3 / n as f64
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [path, n] => match n.parse::<u64>() {
            Ok(n) if n > 0 => run(path, n),
            _ => Err(format!("{n}: expected a positive number of samples")),
        },
        _ => Err("usage: native_speed BLOB N".to_string()),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("native_speed: {e}");
            ExitCode::FAILURE
        }
    }
}
