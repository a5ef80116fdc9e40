//! Criterion benches of the whole flow, for both presets (MNIST and colour):
//!
//! * `kernel/{mnist,color}_{sample,log_prob}_{F32,F16}`: the no_std kernel at batch 1 (one
//!   image, one thread), with f32 and with f16 weights;
//! * `trainer/{mnist,color}_step_batch64`: one training step of the trainer on the CPU
//!   backend at batch 64 (forward, backward, gradient norm, Adam), with rayon's default
//!   thread count (set `RAYON_NUM_THREADS` to choose).
//!
//! `cargo bench --bench train_step` (about 2-3 minutes on 2 cores); build with
//! `RUSTFLAGS="-C target-cpu=native"` to time the kernel's SIMD paths for this CPU, which
//! are chosen by target flags at compile time. Filter with e.g.
//! `cargo bench --bench train_step -- kernel/mnist`.
//!
//! Weights: `init_params` (PyTorch's default init) with every exactly-zero weight (the
//! last conv starts at zero) replaced by a small non-zero value, so no work is skipped and
//! the couplings are not the identity. The amount of arithmetic does not depend on the
//! values, so trained weights would time the same. The per-convolution-shape benches and the
//! FMA peak are in `benches/kernel_conv.rs`.

use clayflow_kernel::{blob_len, scratch_len, write_blob, Arch, DType, Model, COLOR, MNIST};
use clayflow_trainer::backend::{cpu::CpuBackend, AdamStep, Backend};
use clayflow_trainer::model::{init_params, Flow};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::sync::Arc;
use std::time::Duration;

const PRESETS: [(&str, Arch); 2] = [("mnist", MNIST), ("color", COLOR)];

/// `init_params` with the zero weights made small and non-zero.
fn busy_params(arch: &Arch) -> Vec<Vec<f32>> {
    let mut params = init_params(arch, 3);
    for t in &mut params {
        for (i, p) in t.iter_mut().enumerate() {
            if *p == 0.0 {
                *p = ((i % 13) as f32 - 6.0) * 1e-3;
            }
        }
    }
    params
}

fn train_step(c: &mut Criterion) {
    // One sgemm thread per rayon task (see trainer/src/backend/cpu/conv/mod.rs).
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    let batch = 64;
    let mut g = c.benchmark_group("trainer");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(batch as u64));
    for (name, arch) in PRESETS {
        // The colour step is ~9x the MNIST one (a few seconds here): the 10 samples alone
        // take most of a minute, so no longer target time is asked for.
        g.measurement_time(Duration::from_secs(if name == "mnist" { 5 } else { 20 }));
        let backend: Arc<dyn Backend> = Arc::new(CpuBackend::default());
        let mut flow = Flow::new(backend.clone(), arch, &busy_params(&arch)).unwrap();
        let mut grads = flow.zeros_like_params().unwrap();
        let mut m = flow.zeros_like_params().unwrap();
        let mut v = flow.zeros_like_params().unwrap();
        let u: Vec<f32> = (0..batch * arch.dim())
            .map(|i| ((i * 7919) % 256) as f32 / 256.0 + 0.001)
            .collect();
        let mut step = 0u64;
        g.bench_function(format!("{name}_step_batch{batch}"), |b| {
            b.iter(|| {
                flow.forward(&u, batch).unwrap();
                flow.backward(&mut grads).unwrap();
                let norm = backend.sum_squares_all(&grads).unwrap().sqrt();
                step += 1;
                let hp = AdamStep {
                    lr: 1e-5,
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
                    backend.adam(&hp, p, g, m, v).unwrap();
                }
            })
        });
    }
    g.finish();
}

fn kernel(c: &mut Criterion) {
    let mut g = c.benchmark_group("kernel");
    g.throughput(Throughput::Elements(1));
    g.warm_up_time(Duration::from_secs(1));
    for (name, arch) in PRESETS {
        // MNIST: a few ms per image; colour: tens of ms, so fewer samples.
        if name == "mnist" {
            g.sample_size(50).measurement_time(Duration::from_secs(3));
        } else {
            g.sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .measurement_time(Duration::from_secs(4));
        }
        let params: Vec<f32> = busy_params(&arch).concat();
        for dtype in [DType::F32, DType::F16] {
            let mut blob = vec![0u8; blob_len(&arch, dtype)];
            write_blob(&arch, dtype, &params, &mut blob).unwrap();
            let model = Model::from_blob(&blob).unwrap();
            let mut scratch = vec![0.0f32; scratch_len(&arch)];
            let (mut px, mut vals) = (vec![0u8; arch.dim()], vec![0.0f32; arch.dim()]);
            let mut seed = 0;
            g.bench_function(format!("{name}_sample_{dtype:?}"), |b| {
                b.iter(|| {
                    seed += 1;
                    clayflow_kernel::sample(&model, seed, 0.8, &mut scratch, &mut px, &mut vals)
                        .unwrap();
                })
            });
            // Scores the last sample (a realistic image for the model).
            g.bench_function(format!("{name}_log_prob_{dtype:?}"), |b| {
                b.iter(|| clayflow_kernel::log_prob(&model, &px, &mut scratch).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, kernel, train_step);
criterion_main!(benches);
