//! Times one clayflow workload on the MNIST preset and prints one JSON line: the Rust side of
//! `tools/compare-pytorch.sh` (the PyTorch side is `tools/reference/bench_step.py
//! --workload ...`, which takes the same arguments and prints the same JSON).
//!
//! ```text
//! cargo run --release --example bench_ours -- --workload train --threads 2 --warmup 3 --iters 10
//! ```
//!
//! Workloads (each the path a user of that feature runs):
//! * `train`: one `clayflow train` step at `--batch` (default 64): gather real digits from
//!   the first 7000 of data/mnist8k, dequantise with fresh noise, forward, backward,
//!   gradient norm and clipping at 100, Adam (lr 1e-3 warm-up); trainer `Flow` on the CPU
//!   backend with `--threads` rayon threads.
//! * `eval`: log-likelihood of `--eval-batch` (default 100) held-out digits (midpoint
//!   dequantisation), trainer `Flow::forward` (what `clayflow eval` runs on a checkpoint).
//! * `sample1`: one image with the no_std kernel (`clayflow_kernel::sample`, f32 weights of
//!   tools/firmware/model-f32.cfw), as an edge device draws it; always one thread.
//! * `sample64`: 64 images with the trainer's batched inverse
//!   (`clayflow_trainer::sample::sample_pixels`), the path `clayflow sample --model RUN` takes.
//! * `sample64-kernel`: 64 images with the kernel, one per rayon task (the path
//!   `clayflow sample --model BLOB.cfw` takes).
//!
//! Timed calls exclude start-up; `--warmup` calls run first, untimed.

use clayflow_kernel::{scratch_len, Model, Pcg32, MNIST};
use clayflow_trainer::backend::{cpu::CpuBackend, AdamStep, Backend};
use clayflow_trainer::data::{epoch_order, load_idx_images, Dataset};
use clayflow_trainer::model::{init_params, Flow};
use clayflow_trainer::sample::sample_pixels;
use clayflow_trainer::train::dequantize_batch;
use rayon::prelude::*;
use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn Error>>;

/// The no_std kernel's errors implement `Display` only.
fn kern<T>(r: Result<T, clayflow_kernel::Error>) -> Res<T> {
    r.map_err(|e| format!("kernel: {e}").into())
}

const USAGE: &str = "usage: bench_ours --workload train|eval|sample1|sample64|sample64-kernel \
                     [--threads T] [--warmup W] [--iters N] [--batch B] [--eval-batch B] \
                     [--data IDX_GZ]";

/// Parsed command line.
struct Args {
    workload: String,
    threads: usize,
    warmup: usize,
    iters: usize,
    batch: usize,
    eval_batch: usize,
    data: PathBuf,
}

fn parse() -> Res<Args> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut a = Args {
        workload: String::new(),
        threads: 1,
        warmup: 3,
        iters: 10,
        batch: 64,
        eval_batch: 100,
        data: root.join("data/mnist8k-train-images-idx3-ubyte.gz"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let num = |s: String| -> Res<usize> {
            s.parse()
                .map_err(|_| format!("{flag}: {s:?} is not a whole number\n{USAGE}").into())
        };
        match flag.as_str() {
            "--workload" => a.workload = value()?,
            "--threads" => a.threads = num(value()?)?,
            "--warmup" => a.warmup = num(value()?)?,
            "--iters" => a.iters = num(value()?)?,
            "--batch" => a.batch = num(value()?)?,
            "--eval-batch" => a.eval_batch = num(value()?)?,
            "--data" => a.data = PathBuf::from(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if a.threads == 0 || a.iters == 0 || a.batch == 0 || a.eval_batch == 0 {
        return Err(
            format!("--threads, --iters and the batches must be at least 1\n{USAGE}").into(),
        );
    }
    Ok(a)
}

/// Runs `f` `warmup` times untimed, then `iters` times timed; seconds per call.
fn time(warmup: usize, iters: usize, mut f: impl FnMut() -> Res<()>) -> Res<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn train(a: &Args, ds: &Dataset) -> Res<Vec<f64>> {
    let arch = MNIST;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::default());
    let mut flow = Flow::new(backend.clone(), arch, &init_params(&arch, 0))?;
    let mut grads = flow.zeros_like_params()?;
    let mut m = flow.zeros_like_params()?;
    let mut v = flow.zeros_like_params()?;
    let n_train = ds.len().saturating_sub(1000);
    if n_train < a.batch {
        return Err(format!("{} training images, fewer than one batch", n_train).into());
    }
    let order = epoch_order(n_train, 0, 0);
    let mut u = Vec::new();
    let mut step = 0u64;
    time(a.warmup, a.iters, || {
        let start = (step as usize * a.batch) % (n_train - a.batch + 1);
        let idx = &order[start..start + a.batch];
        let mut noise = Pcg32::with_stream(0xd1ce, step);
        dequantize_batch(ds, idx, arch.bits, &mut noise, &mut u).map_err(|e| e.to_string())?;
        flow.forward(&u, a.batch)?;
        flow.backward(&mut grads)?;
        let norm = backend.sum_squares_all(&grads)?.sqrt();
        step += 1;
        let hp = AdamStep {
            lr: 1e-3 * (step as f32 / 100.0).min(1.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step,
            grad_scale: if norm > 100.0 {
                (100.0 / norm) as f32
            } else {
                1.0
            },
        };
        for (((p, g), m), v) in flow.params.iter_mut().zip(&grads).zip(&mut m).zip(&mut v) {
            backend.adam(&hp, p, g, m, v)?;
        }
        Ok(())
    })
}

fn eval(a: &Args, ds: &Dataset) -> Res<Vec<f64>> {
    let arch = MNIST;
    let mut flow = Flow::new(
        Arc::new(CpuBackend::default()),
        arch,
        &init_params(&arch, 0),
    )?;
    let d = arch.dim();
    let first = ds.len().saturating_sub(a.eval_batch);
    let mut u = vec![0f32; a.eval_batch * d];
    for (k, chunk) in u.chunks_mut(d).enumerate() {
        let img = ds
            .get(first + k)
            .ok_or("not enough images for --eval-batch")?;
        for (o, &p) in chunk.iter_mut().zip(img) {
            *o = (f32::from(p) + 0.5) / 256.0;
        }
    }
    time(a.warmup, a.iters, || {
        flow.forward(&u, a.eval_batch)?;
        Ok(())
    })
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench_ours: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Res<()> {
    let a = parse()?;
    // One sgemm thread per rayon task (see trainer/src/backend/cpu/conv/mod.rs).
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let blob = std::fs::read(root.join("tools/firmware/model-f32.cfw"))?;
    let (times, batch, path) = match a.workload.as_str() {
        "train" => {
            let ds = load_idx_images(&a.data)?;
            (train(&a, &ds)?, a.batch, "trainer Flow, CpuBackend")
        }
        "eval" => {
            let ds = load_idx_images(&a.data)?;
            (
                eval(&a, &ds)?,
                a.eval_batch,
                "trainer Flow::forward, CpuBackend",
            )
        }
        "sample1" => {
            let model = kern(Model::from_blob(&blob))?;
            let d = model.arch().dim();
            let mut scratch = vec![0f32; scratch_len(model.arch())];
            let (mut px, mut vals) = (vec![0u8; d], vec![0f32; d]);
            let mut seed = 0;
            let t = time(a.warmup, a.iters, || {
                seed += 1;
                kern(clayflow_kernel::sample(
                    &model,
                    seed,
                    0.8,
                    &mut scratch,
                    &mut px,
                    &mut vals,
                ))?;
                Ok(())
            })?;
            (t, 1, "kernel sample, f32 weights, 1 thread")
        }
        "sample64" => {
            let mut flow = Flow::new(
                Arc::new(CpuBackend::default()),
                MNIST,
                &init_params(&MNIST, 0),
            )?;
            let mut seed = 0;
            let t = time(a.warmup, a.iters, || {
                seed += 1;
                sample_pixels(&mut flow, 64, 0.8, seed).map_err(|e| e.to_string())?;
                Ok(())
            })?;
            (t, 64, "trainer sample_pixels (batched inverse), CpuBackend")
        }
        "sample64-kernel" => {
            let model = kern(Model::from_blob(&blob))?;
            let d = model.arch().dim();
            let len = scratch_len(model.arch());
            let mut pixels = vec![0u8; 64 * d];
            let mut seed = 0;
            let t = time(a.warmup, a.iters, || {
                seed += 1;
                kern(pixels.par_chunks_mut(d).enumerate().try_for_each_init(
                    || (vec![0f32; len], vec![0f32; d]),
                    |(scratch, values), (i, px)| {
                        clayflow_kernel::sample_with(
                            &model,
                            Pcg32::with_stream(seed, i as u64),
                            0.8,
                            scratch,
                            px,
                            values,
                        )
                    },
                ))?;
                Ok(())
            })?;
            (t, 64, "kernel sample_with, one image per rayon task")
        }
        other => return Err(format!("unknown workload {other:?}\n{USAGE}").into()),
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    };
    let list: Vec<String> = times.iter().map(|t| format!("{t:.6}")).collect();
    println!(
        "{{\"side\":\"clayflow\",\"workload\":\"{}\",\"threads\":{},\"batch\":{},\"path\":\"{}\",\
         \"median_s\":{median:.6},\"times_s\":[{}]}}",
        a.workload,
        a.threads,
        batch,
        path,
        list.join(",")
    );
    Ok(())
}
