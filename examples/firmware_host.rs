//! Host twin of the Cortex-M4F firmware in `tools/firmware`: the same kernel, blob, seed and
//! inputs on this machine. Its `checksum:`, `digit:` and `score:` lines must equal the
//! firmware's byte for byte (`tools/firmware/ci.sh` compares them).
//!
//! ```text
//! cargo run --release --example firmware_host                  # mnist-glow (the default firmware)
//! cargo run --release --example firmware_host -- --model seed   # the seed's MNIST, f16
//! cargo run --release --example firmware_host -- --model seed --dtype f32
//! cargo run --release --example firmware_host -- --compare      # seed model: f16 vs f32 table
//! cargo run --release --example firmware_host -- --time 20      # host timing table, both models
//! ```

// Shared with the firmware, which uses the parts this program does not (ASCII art, PGM).
#[allow(dead_code)]
#[path = "../tools/firmware/src/shared.rs"]
mod shared;

use clayflow_kernel::{bits_per_dim, image_len, log_prob, sample, scratch_len, Model, MNIST};
use shared::{Results, DIGIT_INDEX, SEED, TEMPERATURE};
use std::process::ExitCode;
use std::time::Instant;

static BLOB_F16: &[u8] = include_bytes!("../tools/firmware/model-f16.cfw");
static BLOB_F32: &[u8] = include_bytes!("../tools/firmware/model-f32.cfw");
static BLOB_GLOW: &[u8] = include_bytes!("../tools/firmware/model-glow-f16.cfw");
static DIGIT: &[u8; image_len(&MNIST)] = include_bytes!("../tools/firmware/digit.bin");

const USAGE: &str =
    "usage: firmware_host [--model glow|seed] [--dtype f16|f32] | --compare | --time N";

/// One run of what the firmware does: the sample's values and pixels, and the results.
struct Run {
    values: Vec<f32>,
    pixels: Vec<u8>,
    results: Results,
    /// Bits/dim of the digit, its negative and uniform noise (`shared::SCORED`).
    scores: [f32; 3],
}

fn run(blob: &[u8]) -> Result<Run, clayflow_kernel::Error> {
    let model = Model::from_blob(blob)?;
    let mut scratch = vec![0f32; scratch_len(model.arch())];
    let d = image_len(model.arch());
    let (mut pixels, mut values) = (vec![0u8; d], vec![0f32; d]);
    sample(
        &model,
        SEED,
        TEMPERATURE,
        &mut scratch,
        &mut pixels,
        &mut values,
    )?;
    let lp = log_prob(&model, DIGIT, &mut scratch)?;
    let mut scores = [bits_per_dim(model.arch(), lp), 0.0, 0.0];
    for (b, image) in scores
        .iter_mut()
        .skip(1)
        .zip([shared::negative(DIGIT), shared::noise()])
    {
        *b = bits_per_dim(model.arch(), log_prob(&model, &image, &mut scratch)?);
    }
    Ok(Run {
        results: Results {
            checksum: shared::fnv1a32(&values),
            log_prob: lp,
            bits_per_dim: scores[0],
        },
        values,
        pixels,
        scores,
    })
}

fn blob(model: &str, dtype: &str) -> Result<&'static [u8], String> {
    match (model, dtype) {
        ("glow", "f16") => Ok(BLOB_GLOW),
        ("glow", _) => Err(format!(
            "--dtype {dtype}: the glow firmware embeds only an f16 blob\n{USAGE}"
        )),
        ("seed", "f16") => Ok(BLOB_F16),
        ("seed", "f32") => Ok(BLOB_F32),
        ("seed", other) => Err(format!("--dtype {other}: expected f16 or f32\n{USAGE}")),
        (other, _) => Err(format!("--model {other}: expected glow or seed\n{USAGE}")),
    }
}

/// The result lines, exactly as the firmware prints them.
fn print_results(model: &str, dtype: &str) -> Result<(), String> {
    let r = run(blob(model, dtype)?).map_err(|e| e.to_string())?;
    let mut s = String::new();
    shared::write_results(&mut s, dtype, &r.results).map_err(|e| e.to_string())?;
    shared::write_scores(&mut s, &r.scores).map_err(|e| e.to_string())?;
    print!("{s}");
    Ok(())
}

/// f16 versus f32 weights: blob size and the change in the sample and in bits/dim.
fn compare() -> Result<(), String> {
    let a = run(BLOB_F16).map_err(|e| e.to_string())?;
    let b = run(BLOB_F32).map_err(|e| e.to_string())?;
    let max_dv = a
        .values
        .iter()
        .zip(&b.values)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let px_diff = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .filter(|(x, y)| x != y)
        .count();
    let max_dp = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| x.abs_diff(y))
        .max()
        .unwrap_or(0);
    println!(
        "| weights | blob bytes | sample checksum | bits/dim of held-out image {DIGIT_INDEX} |"
    );
    println!("|---|---:|---|---:|");
    for (name, blob, r) in [("f16", BLOB_F16, &a), ("f32", BLOB_F32, &b)] {
        println!(
            "| {name} | {} | 0x{:08x} | {} |",
            blob.len(),
            r.results.checksum,
            r.results.bits_per_dim
        );
    }
    println!();
    println!(
        "f16 saves {} bytes of flash ({:.1}%)",
        BLOB_F32.len() - BLOB_F16.len(),
        100.0 * (BLOB_F32.len() - BLOB_F16.len()) as f64 / BLOB_F32.len() as f64
    );
    println!(
        "sample, f16 vs f32: max |value difference| {max_dv:.3e}, {px_diff} of {} pixels differ (max by {max_dp} levels)",
        a.pixels.len()
    );
    println!(
        "bits/dim, f16 - f32: {:+.3e}",
        a.results.bits_per_dim - b.results.bits_per_dim
    );
    Ok(())
}

/// Median and minimum wall time of `n` runs of `f`, in milliseconds.
fn time(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0])
}

/// Host wall time of one sample and one log_prob (f16 blobs of both firmware models), median
/// of `n` runs each, alternating the models.
fn timing(n: usize) -> Result<(), String> {
    println!(
        "| host, 1 thread, batch 1, `{}` path | sample median ms | min ms | log_prob median ms | min ms | runs |",
        clayflow_kernel::conv::PATH
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, blob) in [
        ("mnist-glow (f16)", BLOB_GLOW),
        ("mnist, the seed's (f16)", BLOB_F16),
    ] {
        let model = Model::from_blob(blob).map_err(|e| e.to_string())?;
        let mut scratch = vec![0f32; scratch_len(model.arch())];
        let (mut px, mut v) = ([0u8; 784], [0f32; 784]);
        let mut err = None;
        let s = time(n, || {
            if let Err(e) = sample(&model, SEED, TEMPERATURE, &mut scratch, &mut px, &mut v) {
                err = Some(e);
            }
        });
        let l = time(n, || {
            if let Err(e) = log_prob(&model, DIGIT, &mut scratch) {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e.to_string());
        }
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {n} |",
            s.0, s.1, l.0, l.1
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => print_results("glow", "f16"),
        ["--dtype", d] => print_results("glow", d),
        ["--model", m] => print_results(m, "f16"),
        ["--model", m, "--dtype", d] | ["--dtype", d, "--model", m] => print_results(m, d),
        ["--compare"] => compare(),
        ["--time", n] => match n.parse::<usize>() {
            Ok(n) if n > 0 => timing(n),
            _ => Err(format!(
                "--time {n}: expected a positive number of runs\n{USAGE}"
            )),
        },
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("firmware_host: {e}");
            ExitCode::FAILURE
        }
    }
}
