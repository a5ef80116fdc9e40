//! Criterion benches of the kernel (batch 1, one thread) on the path this build selects
//! (`clayflow_kernel::conv::PATH`, set by the target flags): every convolution shape of the
//! seed presets and of `mnist-glow` with f32 and f16 weights (throughput in FLOP, so
//! criterion prints GFLOP/s), and `sample` / `log_prob` of those three models. Before them it prints one core's measured FMA peak
//! for the path and the 7x7 MNIST convolution's share of it.
//!
//! ```text
//! RUSTFLAGS="-C target-cpu=native" cargo bench --bench kernel_conv --target-dir target-native
//! RUSTFLAGS="-C target-feature=+avx2,+fma,+f16c" cargo bench --bench kernel_conv --target-dir target-avx2
//! cargo bench --bench kernel_conv                       # scalar (the default x86_64 flags)
//! ```
//! `tools/simd-bench.sh` runs the three one after the other.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clayflow_kernel::conv::{Conv, PATH};
use clayflow_kernel::weights::Tensor;
use clayflow_kernel::{scratch_len, Arch, DType, Model, COLOR, MNIST, MNIST_GLOW};
use clayflow_suite::peak::{fma_peak_gflops, PEAK_INSTRUCTION};
use clayflow_suite::{blob, random_params};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// (name, cin, cout, height = width, kernel): the three convolutions of each preset's
/// couplings (channel masks: the CNN sees half the squeezed channels); for `mnist-glow`
/// those of both levels (14x14 and 7x7; the 64 -> 64 1x1 is the middle layer).
const SHAPES: [(&str, usize, usize, usize, usize); 12] = [
    ("mnist_2x8_k5", 2, 8, 14, 5),
    ("mnist_8x64_k7", 8, 64, 14, 7),
    ("mnist_64x4_k3", 64, 4, 14, 3),
    ("colour_6x24_k5", 6, 24, 16, 5),
    ("colour_24x192_k7", 24, 192, 16, 7),
    ("colour_192x12_k3", 192, 12, 16, 3),
    ("glow14_2x64_k3", 2, 64, 14, 3),
    ("glow14_64x64_k1", 64, 64, 14, 1),
    ("glow14_64x4_k3", 64, 4, 14, 3),
    ("glow7_4x64_k3", 4, 64, 7, 3),
    ("glow7_64x64_k1", 64, 64, 7, 1),
    ("glow7_64x8_k3", 64, 8, 7, 3),
];

fn flops(c: &Conv) -> u64 {
    2 * (c.cin * c.cout * c.kernel * c.kernel * c.height * c.width) as u64
}

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 4000.0 - 0.25)
        .collect()
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut b = Vec::with_capacity(values.len() * 4);
    for &v in values {
        match dtype {
            DType::F32 => b.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => b.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
        }
    }
    b
}

/// One shape's buffers.
struct Case {
    conv: Conv,
    x: Vec<f32>,
    w: Vec<u8>,
    b: Vec<u8>,
    out: Vec<f32>,
    dtype: DType,
}

impl Case {
    fn new(cin: usize, cout: usize, hw: usize, kernel: usize, dtype: DType) -> Case {
        let conv = Conv {
            cin,
            cout,
            height: hw,
            width: hw,
            kernel,
        };
        Case {
            conv,
            x: data(cin * hw * hw, 1),
            w: encode(&data(cout * cin * kernel * kernel, 2), dtype),
            b: encode(&data(cout, 3), dtype),
            out: vec![0.0; cout * hw * hw],
            dtype,
        }
    }

    fn run(&mut self) {
        let (w, b) = (
            Tensor::new(self.dtype, &self.w),
            Tensor::new(self.dtype, &self.b),
        );
        self.conv
            .forward(black_box(&self.x), w, b, true, &mut self.out)
            .unwrap();
        black_box(&self.out);
    }
}

/// Best-of GFLOP/s of the 7x7 MNIST conv (f32 weights), for the percent-of-peak line.
fn conv7_gflops() -> f64 {
    let mut c = Case::new(8, 64, 14, 7, DType::F32);
    let f = flops(&c.conv) as f64;
    let mut best = 0f64;
    for _ in 0..7 {
        let t = Instant::now();
        let n = 200;
        for _ in 0..n {
            c.run();
        }
        best = best.max(f * n as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn peak_line(_c: &mut Criterion) {
    let peak = fma_peak_gflops(5, 100);
    let conv = conv7_gflops();
    println!(
        "\nkernel path: {PATH}; one core's peak ({PEAK_INSTRUCTION}): {peak:.1} GFLOP/s; \
         mnist_8x64_k7 f32: {conv:.1} GFLOP/s = {:.1}% of peak\n",
        100.0 * conv / peak
    );
}

fn convs(c: &mut Criterion) {
    let mut g = c.benchmark_group(format!("conv_b1_{PATH}"));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    for (name, cin, cout, hw, k) in SHAPES {
        for dtype in [DType::F32, DType::F16] {
            let mut case = Case::new(cin, cout, hw, k, dtype);
            g.throughput(Throughput::Elements(flops(&case.conv)));
            g.bench_function(format!("{name}_{dtype:?}"), |b| b.iter(|| case.run()));
        }
    }
    g.finish();
}

fn model(arch: &Arch, dtype: DType) -> Vec<u8> {
    // He-like random weights (activations keep their scale), scales near 1; gain 0.3 for
    // the 32 Glow steps, whose random couplings would otherwise push the sample to inf.
    let gain = if arch.glow { 0.3 } else { 1.0 };
    blob(arch, dtype, &random_params(arch, 7, gain, 0.5))
}

fn whole(c: &mut Criterion) {
    let mut g = c.benchmark_group(format!("kernel_b1_{PATH}"));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for (tag, arch) in [
        ("mnist", MNIST),
        ("mnist_glow", MNIST_GLOW),
        ("colour", COLOR),
    ] {
        for dtype in [DType::F32, DType::F16] {
            let bytes = model(&arch, dtype);
            let m = Model::from_blob(&bytes).unwrap();
            let mut scratch = vec![0f32; scratch_len(&arch)];
            let (mut px, mut vals) = (vec![0u8; arch.dim()], vec![0f32; arch.dim()]);
            let mut seed = 0;
            g.bench_function(format!("{tag}_sample_{dtype:?}"), |b| {
                b.iter(|| {
                    seed += 1;
                    clayflow_kernel::sample(&m, seed, 0.8, &mut scratch, &mut px, &mut vals)
                        .unwrap();
                })
            });
            g.bench_function(format!("{tag}_log_prob_{dtype:?}"), |b| {
                b.iter(|| clayflow_kernel::log_prob(&m, black_box(&px), &mut scratch).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, peak_line, convs, whole);
criterion_main!(benches);
