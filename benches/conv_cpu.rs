//! Criterion benches of the CPU convolutions (forward, backward-data, backward-weight) on
//! the model's conv shapes at batch 64: the MNIST preset (14x14) and the colour preset
//! (16x16). Throughput is reported in FLOP/s ("elements" = floating-point operations).
//!
//! `cargo bench --bench conv_cpu` (set `RAYON_NUM_THREADS` to vary the thread count).

use clayflow_trainer::backend::cpu::conv::{
    conv2d_backward_data, conv2d_backward_weight, conv2d_forward, ConvShape,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// (name, cin, cout, height = width, kernel)
const SHAPES: [(&str, usize, usize, usize, usize); 6] = [
    ("mnist_2x8_k5", 2, 8, 14, 5),
    ("mnist_8x64_k7", 8, 64, 14, 7),
    ("mnist_64x4_k3", 64, 4, 14, 3),
    ("colour_6x24_k5", 6, 24, 16, 5),
    ("colour_24x192_k7", 24, 192, 16, 7),
    ("colour_192x12_k3", 192, 12, 16, 3),
];

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn convs(c: &mut Criterion) {
    // sgemm already runs inside rayon tasks; keep matrixmultiply's own pool out of it.
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    let batch = 64;
    for (name, cin, cout, hw, kernel) in SHAPES {
        let s = ConvShape {
            batch,
            cin,
            cout,
            height: hw,
            width: hw,
            kernel,
        };
        let x = data(s.input_len(), 1);
        let w = data(s.weight_len(), 2);
        let b = data(s.cout, 3);
        let dy = data(s.output_len(), 4);
        let mut y = vec![0.0; s.output_len()];
        let mut dx = vec![0.0; s.input_len()];
        let mut dw = vec![0.0; s.weight_len()];
        let mut db = vec![0.0; s.cout];

        let mut g = c.benchmark_group(format!("conv_{name}_b{batch}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(s.flops()));
        g.bench_function("forward_relu", |bch| {
            bch.iter(|| conv2d_forward(&s, &x, &w, &b, true, &mut y))
        });
        g.bench_function("backward_data", |bch| {
            bch.iter(|| conv2d_backward_data(&s, &dy, &w, &mut dx))
        });
        g.bench_function("backward_weight", |bch| {
            bch.iter(|| conv2d_backward_weight(&s, &x, &dy, &mut dw, &mut db))
        });
        g.finish();
    }
}

criterion_group!(benches, convs);
criterion_main!(benches);
