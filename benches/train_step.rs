//! Criterion benches: one training step of the trainer, and the kernel's sample / log_prob
//! at batch 1 (f32 and f16 weights), on the MNIST preset.
//!
//! `cargo bench --bench train_step` (the step at batch 64 takes a few hundred ms here).

use clayflow_kernel::{blob_len, scratch_len, write_blob, DType, Model, MNIST};
use clayflow_trainer::backend::{cpu::CpuBackend, AdamStep, Backend};
use clayflow_trainer::model::{init_params, Flow};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;

fn train_step(c: &mut Criterion) {
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    let arch = MNIST;
    let batch = 64;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend);
    let mut flow = Flow::new(backend.clone(), arch, &init_params(&arch, 1)).unwrap();
    let mut grads = flow.zeros_like_params().unwrap();
    let mut m = flow.zeros_like_params().unwrap();
    let mut v = flow.zeros_like_params().unwrap();
    let u: Vec<f32> = (0..batch * arch.dim())
        .map(|i| ((i * 7919) % 256) as f32 / 256.0 + 0.001)
        .collect();
    let mut g = c.benchmark_group("trainer");
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch as u64));
    let mut step = 0u64;
    g.bench_function("mnist_step_batch64", |b| {
        b.iter(|| {
            flow.forward(&u, batch).unwrap();
            flow.backward(&mut grads).unwrap();
            step += 1;
            let hp = AdamStep {
                lr: 1e-5,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step,
                grad_scale: 1.0,
            };
            for (((p, g), m), v) in flow.params.iter_mut().zip(&grads).zip(&mut m).zip(&mut v) {
                backend.adam(&hp, p, g, m, v).unwrap();
            }
        })
    });
    g.finish();
}

fn kernel(c: &mut Criterion) {
    let arch = MNIST;
    // Trained-like weights: the initialisation with a non-zero last conv.
    let mut params: Vec<f32> = init_params(&arch, 3).concat();
    for (i, p) in params.iter_mut().enumerate() {
        if *p == 0.0 {
            *p = ((i % 13) as f32 - 6.0) * 1e-3;
        }
    }
    let mut g = c.benchmark_group("kernel");
    g.throughput(Throughput::Elements(1));
    for dtype in [DType::F32, DType::F16] {
        let mut blob = vec![0u8; blob_len(&arch, dtype)];
        write_blob(&arch, dtype, &params, &mut blob).unwrap();
        let model = Model::from_blob(&blob).unwrap();
        let mut scratch = vec![0.0f32; scratch_len(&arch)];
        let (mut px, mut vals) = (vec![0u8; arch.dim()], vec![0.0f32; arch.dim()]);
        let mut seed = 0;
        g.bench_function(format!("mnist_sample_{dtype:?}"), |b| {
            b.iter(|| {
                seed += 1;
                clayflow_kernel::sample(&model, seed, 0.8, &mut scratch, &mut px, &mut vals)
                    .unwrap();
            })
        });
        g.bench_function(format!("mnist_log_prob_{dtype:?}"), |b| {
            b.iter(|| clayflow_kernel::log_prob(&model, &px, &mut scratch).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, train_step, kernel);
criterion_main!(benches);
