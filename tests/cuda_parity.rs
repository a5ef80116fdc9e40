//! The CUDA kernels (`cuda/kernels/*.cu`), executed on the CPU by the `clayflow-cuda-sim`
//! simulator, against the CPU backend on small random problems, including sizes that cut
//! every tile and channel block ragged.
//!
//! Part 1 launches each kernel directly with the launch configuration `cuda/KERNELS.md`
//! prescribes (the `Launcher` below is a plain transcription of that document), so a kernel
//! bug and a KERNELS.md formula bug both show up here.
//!
//! Tolerances (relative to the largest magnitude in the CPU result, per output tensor):
//! - data movement (copy, fill, squeeze, mask gather/scatter, ReLU backward): exact;
//! - elementwise arithmetic and transcendentals (axpy, logit, coupling, Adam): 2e-6 — the
//!   host build evaluates the same f32 formulas as the CPU backend, the libm calls may round
//!   differently by an ulp;
//! - convolutions: 2e-5 — the kernels sum the k*k*cin (or batch*h*w) products in a different
//!   order than the CPU's GEMM/direct code; f32 rounding of sums of ~1e3 terms of mixed sign
//!   is ~1e-6 relative to the largest output, so 2e-5 leaves 20x margin while any indexing
//!   mistake gives O(1) errors;
//! - f64 reductions (sum of squares, log-dets): 1e-9 relative for the f64 results, 2e-6 for
//!   log-dets stored as f32.

use clayflow_cuda_sim::{Schedule, SimDevice};
use clayflow_kernel::{Mask, Pcg32, Rng};
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::cuda::{KernelDevice, LaunchCfg, Param};
use clayflow_trainer::backend::prelude::*;
use clayflow_trainer::backend::{
    hi_lo, AdamStep, Backend, Buffer, ConvShape, CouplingScale, Shape4,
};

const MASKS: [Mask; 4] = [
    Mask::ChannelEven,
    Mask::ChannelOdd,
    Mask::CheckerEven,
    Mask::CheckerOdd,
];

fn rand_vec(rng: &mut Pcg32, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| lo + (hi - lo) * ((rng.next_u32() >> 8) as f32 / 16_777_216.0))
        .collect()
}

/// Asserts `got` matches `want` within `tol` times the largest |want| (at least 1e-30).
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let mut worst = (0.0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // A NaN difference counts as infinitely wrong.
        let d = if (g - w).is_nan() {
            f32::INFINITY
        } else {
            (g - w).abs()
        };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    assert!(
        worst.0 <= tol * scale,
        "{what}: element {} is {} but the CPU gives {} (|diff| {} > {tol} x {scale})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0
    );
}

fn cpu_buf(v: &[f32]) -> Buffer {
    CpuBackend::default().upload(v).unwrap()
}

fn host(b: &Buffer) -> Vec<f32> {
    CpuBackend::default().download(b).unwrap()
}

/// Launches kernels with the configurations of cuda/KERNELS.md.
struct Launcher {
    dev: SimDevice,
}

fn ew(n: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (n.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

fn per_image(batch: usize) -> LaunchCfg {
    LaunchCfg {
        grid: (batch as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    }
}

fn i(v: usize) -> Param {
    Param::I32(i32::try_from(v).unwrap())
}

fn tco(m: usize) -> usize {
    if m <= 4 {
        4
    } else if m <= 8 {
        8
    } else {
        16
    }
}

fn variant(prefix: &str, m: usize) -> &'static str {
    match (prefix, tco(m)) {
        ("fwd", 4) => "cf_conv_fwd_c4",
        ("fwd", 8) => "cf_conv_fwd_c8",
        ("fwd", _) => "cf_conv_fwd_c16",
        ("data", 4) => "cf_conv_bwd_data_c4",
        ("data", 8) => "cf_conv_bwd_data_c8",
        ("data", _) => "cf_conv_bwd_data_c16",
        (_, 4) => "cf_conv_bwd_weight_c4",
        (_, 8) => "cf_conv_bwd_weight_c8",
        _ => "cf_conv_bwd_weight_c16",
    }
}

impl Launcher {
    fn new() -> Launcher {
        Launcher {
            dev: SimDevice::new(),
        }
    }

    fn p(&self, b: &Buffer) -> Param {
        Param::Ptr(self.dev.ptr(b).unwrap())
    }

    fn pm(&self, b: &mut Buffer) -> Param {
        Param::Ptr(self.dev.ptr_mut(b).unwrap())
    }

    fn go(&self, name: &'static str, cfg: LaunchCfg, params: &[Param]) {
        self.dev
            .launch(name, cfg, params)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    fn conv_cfg(s: &ConvShape, m: usize) -> (LaunchCfg, usize) {
        let t = tco(m);
        let ts = 15 + s.kernel;
        let cic = (12288 / (ts * ts + s.kernel * s.kernel * t)).min(8);
        assert!(cic >= 1);
        let tiles = s.width.div_ceil(16) * s.height.div_ceil(16);
        let cfg = LaunchCfg {
            grid: (tiles as u32, m.div_ceil(t) as u32, s.batch as u32),
            block: (16, 8, 1),
            shared_bytes: (4 * cic * (ts * ts + s.kernel * s.kernel * t)) as u32,
        };
        (cfg, cic)
    }

    fn conv_forward(&self, s: &ConvShape, x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
        let (x, w, b) = (cpu_buf(x), cpu_buf(w), cpu_buf(b));
        let mut y = cpu_buf(&vec![f32::NAN; s.output_len()]);
        let (cfg, cic) = Self::conv_cfg(s, s.cout);
        let params = [
            i(s.batch),
            i(s.cin),
            i(s.cout),
            i(s.height),
            i(s.width),
            i(s.kernel),
            i(cic),
            self.p(&x),
            self.p(&w),
            self.p(&b),
            i(usize::from(relu)),
            self.pm(&mut y),
        ];
        self.go(variant("fwd", s.cout), cfg, &params);
        host(&y)
    }

    fn conv_backward_data(&self, s: &ConvShape, dy: &[f32], w: &[f32]) -> Vec<f32> {
        let (dy, w) = (cpu_buf(dy), cpu_buf(w));
        let mut dx = cpu_buf(&vec![f32::NAN; s.input_len()]);
        let (cfg, cic) = Self::conv_cfg(s, s.cin);
        let params = [
            i(s.batch),
            i(s.cin),
            i(s.cout),
            i(s.height),
            i(s.width),
            i(s.kernel),
            i(cic),
            self.p(&dy),
            self.p(&w),
            self.pm(&mut dx),
        ];
        self.go(variant("data", s.cin), cfg, &params);
        host(&dx)
    }

    fn conv_backward_weight(&self, s: &ConvShape, x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (x, dy) = (cpu_buf(x), cpu_buf(dy));
        let kk = s.kernel * s.kernel;
        let t = tco(s.cout);
        let cit = s.cin.min(16).min(256 / kk);
        let gx = s.cin.div_ceil(cit);
        let gy = s.cout.div_ceil(t);
        let n0 = 264usize.div_ceil(gx * gy).clamp(1, s.batch);
        let ipc = s.batch.div_ceil(n0);
        let nchunks = s.batch.div_ceil(ipc);
        let wlen = s.weight_len();
        let mut part = cpu_buf(&vec![f32::NAN; nchunks * (wlen + s.cout)]);
        let ts = 15 + s.kernel;
        let cfg = LaunchCfg {
            grid: (gx as u32, gy as u32, nchunks as u32),
            block: (256, 1, 1),
            shared_bytes: (4 * (cit * ts * ts + 256 * t)) as u32,
        };
        let params = [
            i(s.batch),
            i(s.cin),
            i(s.cout),
            i(s.height),
            i(s.width),
            i(s.kernel),
            i(cit),
            i(ipc),
            self.p(&x),
            self.p(&dy),
            self.pm(&mut part),
        ];
        self.go(variant("wgrad", s.cout), cfg, &params);
        let mut dw = cpu_buf(&vec![f32::NAN; wlen]);
        let mut db = cpu_buf(&vec![f32::NAN; s.cout]);
        let cfg = LaunchCfg {
            grid: ((wlen + s.cout).div_ceil(256) as u32, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        let params = [
            i(nchunks),
            i(wlen),
            i(s.cout),
            self.p(&part),
            self.pm(&mut dw),
            self.pm(&mut db),
        ];
        self.go("cf_conv_bwd_weight_reduce", cfg, &params);
        (host(&dw), host(&db))
    }

    /// (hi, lo) pairs summed in f64, in order.
    fn hi_lo(v: &[f32]) -> Vec<f64> {
        v.chunks_exact(2)
            .map(|p| f64::from(p[0]) + f64::from(p[1]))
            .collect()
    }

    fn sum_squares(&self, x: &[f32]) -> f64 {
        let n = x.len();
        let g = n.div_ceil(4096).clamp(1, 1024);
        let x = cpu_buf(x);
        let mut part = cpu_buf(&vec![f32::NAN; 2 * g]);
        let cfg = LaunchCfg {
            grid: (g as u32, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        self.go(
            "cf_sum_squares_partial",
            cfg,
            &[i(n), self.p(&x), self.pm(&mut part)],
        );
        Self::hi_lo(&host(&part)).iter().sum()
    }

    /// Image n's sum of squares added to the running total `(hi, lo)` = (0.5, 0).
    fn per_image_sum_squares(&self, shape: Shape4, z: &[f32]) -> Vec<f64> {
        let z = cpu_buf(z);
        let start: Vec<f32> = (0..2 * shape.batch)
            .map(|k| if k % 2 == 0 { 0.5 } else { 0.0 })
            .collect();
        let mut part = cpu_buf(&start);
        self.go(
            "cf_per_image_sum_squares",
            per_image(shape.batch),
            &[i(shape.image_len()), self.p(&z), self.pm(&mut part)],
        );
        Self::hi_lo(&host(&part))
    }
}

/// Convolution shapes: every TCO variant, ragged tiles (sizes not multiples of 16, two tiles
/// per dimension), input-channel counts that leave partial cic/cit blocks, all preset kernel
/// sizes, and the presets' own layer shapes at a small batch.
fn conv_shapes() -> Vec<ConvShape> {
    let s = |batch, cin, cout, height, width, kernel| ConvShape {
        batch,
        cin,
        cout,
        height,
        width,
        kernel,
    };
    vec![
        s(2, 3, 3, 7, 9, 3),
        s(1, 5, 7, 17, 18, 5),
        s(2, 9, 13, 5, 6, 7),
        s(1, 17, 20, 11, 19, 3),
        s(3, 2, 8, 14, 14, 5),   // MNIST conv0
        s(2, 8, 64, 14, 14, 7),  // MNIST conv1
        s(2, 64, 4, 14, 14, 3),  // MNIST conv2
        s(1, 6, 24, 16, 16, 5),  // colour conv0
        s(1, 24, 12, 16, 16, 3), // colour conv2 (narrowed input)
        s(2, 4, 5, 3, 4, 1),
        s(1, 3, 6, 9, 7, 15),
        s(1, 1, 1, 1, 1, 3),
    ]
}

#[test]
fn conv_forward_matches_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(1);
    for s in conv_shapes() {
        let bound = 1.0 / ((s.cin * s.kernel * s.kernel) as f32).sqrt();
        let x = rand_vec(&mut rng, s.input_len(), -1.0, 1.0);
        let w = rand_vec(&mut rng, s.weight_len(), -bound, bound);
        let b = rand_vec(&mut rng, s.cout, -0.5, 0.5);
        for relu in [false, true] {
            let got = l.conv_forward(&s, &x, &w, &b, relu);
            let mut want = cpu_buf(&vec![0.0; s.output_len()]);
            CpuBackend::default()
                .conv_forward(
                    &s,
                    &cpu_buf(&x),
                    &cpu_buf(&w),
                    &cpu_buf(&b),
                    relu,
                    &mut want,
                )
                .unwrap();
            assert_close(
                &format!("conv_forward {s:?} relu {relu}"),
                &got,
                &host(&want),
                2e-5,
            );
        }
    }
}

#[test]
fn conv_backward_data_matches_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(2);
    for s in conv_shapes() {
        let dy = rand_vec(&mut rng, s.output_len(), -1.0, 1.0);
        let w = rand_vec(&mut rng, s.weight_len(), -0.3, 0.3);
        let got = l.conv_backward_data(&s, &dy, &w);
        let mut want = cpu_buf(&vec![0.0; s.input_len()]);
        CpuBackend::default()
            .conv_backward_data(&s, &cpu_buf(&dy), &cpu_buf(&w), &mut want)
            .unwrap();
        assert_close(
            &format!("conv_backward_data {s:?}"),
            &got,
            &host(&want),
            2e-5,
        );
    }
}

#[test]
fn conv_backward_weight_matches_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(3);
    let mut shapes = conv_shapes();
    // A batch large enough for several images per chunk.
    shapes.push(ConvShape {
        batch: 40,
        cin: 2,
        cout: 3,
        height: 4,
        width: 5,
        kernel: 3,
    });
    for s in shapes {
        let x = rand_vec(&mut rng, s.input_len(), -1.0, 1.0);
        let dy = rand_vec(&mut rng, s.output_len(), -1.0, 1.0);
        let (dw, db) = l.conv_backward_weight(&s, &x, &dy);
        let mut want_w = cpu_buf(&vec![0.0; s.weight_len()]);
        let mut want_b = cpu_buf(&vec![0.0; s.cout]);
        CpuBackend::default()
            .conv_backward_weight(&s, &cpu_buf(&x), &cpu_buf(&dy), &mut want_w, &mut want_b)
            .unwrap();
        assert_close(&format!("conv dw {s:?}"), &dw, &host(&want_w), 2e-5);
        assert_close(&format!("conv db {s:?}"), &db, &host(&want_b), 2e-5);
    }
}

/// The same kernels with the block's threads running concurrently instead of in shuffled
/// turns (a different interleaving; results must not change).
#[test]
fn conv_results_do_not_depend_on_the_thread_schedule() {
    let shuffled = Launcher::new();
    let concurrent = Launcher {
        dev: SimDevice::with_schedule(Schedule::Concurrent),
    };
    let other_seed = Launcher {
        dev: SimDevice::with_schedule(Schedule::Shuffled { seed: 77 }),
    };
    let mut rng = Pcg32::new(4);
    let s = ConvShape {
        batch: 2,
        cin: 9,
        cout: 13,
        height: 17,
        width: 6,
        kernel: 5,
    };
    let x = rand_vec(&mut rng, s.input_len(), -1.0, 1.0);
    let w = rand_vec(&mut rng, s.weight_len(), -0.3, 0.3);
    let b = rand_vec(&mut rng, s.cout, -0.5, 0.5);
    let dy = rand_vec(&mut rng, s.output_len(), -1.0, 1.0);
    let y = shuffled.conv_forward(&s, &x, &w, &b, true);
    let dx = shuffled.conv_backward_data(&s, &dy, &w);
    let dwb = shuffled.conv_backward_weight(&s, &x, &dy);
    for l in [&concurrent, &other_seed] {
        assert_eq!(y, l.conv_forward(&s, &x, &w, &b, true));
        assert_eq!(dx, l.conv_backward_data(&s, &dy, &w));
        assert_eq!(dwb, l.conv_backward_weight(&s, &x, &dy));
    }
}

fn shapes4() -> Vec<Shape4> {
    let s = |batch, channels, height, width| Shape4 {
        batch,
        channels,
        height,
        width,
    };
    vec![
        s(2, 4, 14, 14),
        s(3, 5, 6, 4),
        s(1, 12, 16, 16),
        s(2, 1, 2, 2),
        s(1, 3, 20, 18),
    ]
}

#[test]
fn elementwise_ops_match_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(5);
    // 1_050_000 > 4096 * 256: the capped grid makes threads loop (grid-stride).
    for n in [1usize, 255, 256, 257, 5000, 1_050_000] {
        let x = rand_vec(&mut rng, n, -2.0, 2.0);
        let y0 = rand_vec(&mut rng, n, -2.0, 2.0);
        let xb = cpu_buf(&x);

        let mut y = cpu_buf(&y0);
        l.go("cf_fill", ew(n), &[i(n), Param::F32(0.25), l.pm(&mut y)]);
        assert!(host(&y).iter().all(|&v| v == 0.25), "fill n={n}");

        let mut y = cpu_buf(&y0);
        l.go("cf_copy", ew(n), &[i(n), l.p(&xb), l.pm(&mut y)]);
        assert_eq!(host(&y), x, "copy n={n}");

        let mut y = cpu_buf(&y0);
        l.go(
            "cf_axpy",
            ew(n),
            &[i(n), Param::F32(-0.7), l.p(&xb), l.pm(&mut y)],
        );
        let mut want = cpu_buf(&y0);
        CpuBackend::default().axpy(-0.7, &xb, &mut want).unwrap();
        assert_close(&format!("axpy n={n}"), &host(&y), &host(&want), 2e-6);

        let mut dy = cpu_buf(&y0);
        l.go("cf_relu_backward", ew(n), &[i(n), l.p(&xb), l.pm(&mut dy)]);
        let mut want = cpu_buf(&y0);
        CpuBackend::default().relu_backward(&xb, &mut want).unwrap();
        assert_eq!(host(&dy), host(&want), "relu_backward n={n}");

        let got = l.sum_squares(&x);
        let want = CpuBackend::default().sum_squares(&xb).unwrap();
        assert!(
            (got - want).abs() <= 1e-9 * want,
            "sum_squares n={n}: {got} vs {want}"
        );
    }
}

#[test]
fn adam_matches_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(6);
    let n = 3001;
    let p0 = rand_vec(&mut rng, n, -1.0, 1.0);
    let g = rand_vec(&mut rng, n, -1.0, 1.0);
    let m0 = rand_vec(&mut rng, n, -0.1, 0.1);
    let v0 = rand_vec(&mut rng, n, 0.0, 0.01);
    for step in [1u64, 7, 1000] {
        let hp = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step,
            grad_scale: 0.8,
        };
        let (mut pc, mut mc, mut vc) = (cpu_buf(&p0), cpu_buf(&m0), cpu_buf(&v0));
        CpuBackend::default()
            .adam(&hp, &mut pc, &cpu_buf(&g), &mut mc, &mut vc)
            .unwrap();
        // Host-side constants exactly as KERNELS.md prescribes (f32, like the CPU backend).
        let t = hp.step.max(1) as i32;
        let bc1 = 1.0 - hp.beta1.powi(t);
        let bc2 = 1.0 - hp.beta2.powi(t);
        let (mut p, mut m, mut v, gb) = (cpu_buf(&p0), cpu_buf(&m0), cpu_buf(&v0), cpu_buf(&g));
        let params = [
            i(n),
            Param::F32(hp.lr / bc1),
            Param::F32(hp.beta1),
            Param::F32(hp.beta2),
            Param::F32(hp.eps),
            Param::F32(bc2),
            Param::F32(hp.grad_scale),
            l.pm(&mut p),
            l.p(&gb),
            l.pm(&mut m),
            l.pm(&mut v),
        ];
        l.go("cf_adam", ew(n), &params);
        assert_close("adam param", &host(&p), &host(&pc), 2e-6);
        assert_close("adam m", &host(&m), &host(&mc), 2e-6);
        assert_close("adam v", &host(&v), &host(&vc), 2e-6);
    }
}

#[test]
fn logit_squeeze_and_per_image_sums_match_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(7);
    for shape in shapes4() {
        let n = shape.len();
        let u = rand_vec(&mut rng, n, 0.0, 1.0);
        // logit forward (in place, log-det overwritten)
        let mut x = cpu_buf(&u);
        let mut ld = cpu_buf(&vec![f32::NAN; shape.batch]);
        l.go(
            "cf_logit_forward",
            per_image(shape.batch),
            &[
                i(shape.image_len()),
                Param::F32(0.05),
                l.pm(&mut x),
                l.pm(&mut ld),
            ],
        );
        let mut xc = cpu_buf(&u);
        let mut ldc = cpu_buf(&vec![7.0; shape.batch]);
        CpuBackend::default()
            .logit_forward(shape, 0.05, &mut xc, &mut ldc)
            .unwrap();
        assert_close("logit_forward x", &host(&x), &host(&xc), 2e-6);
        assert_close("logit_forward log_det", &host(&ld), &host(&ldc), 2e-6);
        // logit inverse
        let z = rand_vec(&mut rng, n, -6.0, 6.0);
        let mut x = cpu_buf(&z);
        l.go(
            "cf_logit_inverse",
            ew(n),
            &[i(n), Param::F32(0.05), l.pm(&mut x)],
        );
        let mut xc = cpu_buf(&z);
        CpuBackend::default().logit_inverse(0.05, &mut xc).unwrap();
        assert_close("logit_inverse", &host(&x), &host(&xc), 2e-6);
        // per-image sum of squares
        let got = l.per_image_sum_squares(shape, &z);
        let mut acc = cpu_buf(
            &(0..2 * shape.batch)
                .map(|k| if k % 2 == 0 { 0.5 } else { 0.0 })
                .collect::<Vec<f32>>(),
        );
        CpuBackend::default()
            .per_image_sum_squares(shape, &cpu_buf(&z), &mut acc)
            .unwrap();
        let want = hi_lo(&host(&acc));
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-9 * w,
                "per-image sum of squares {g} vs {w}"
            );
        }
        // squeeze and its inverse (needs even sides)
        if shape.height % 2 == 0 && shape.width % 2 == 0 {
            for inverse in [false, true] {
                let xb = cpu_buf(&z);
                let mut y = cpu_buf(&vec![f32::NAN; n]);
                let params = [
                    i(shape.batch),
                    i(shape.channels),
                    i(shape.height),
                    i(shape.width),
                    i(usize::from(inverse)),
                    l.p(&xb),
                    l.pm(&mut y),
                ];
                l.go("cf_squeeze", ew(n), &params);
                let mut yc = cpu_buf(&vec![0.0; n]);
                CpuBackend::default()
                    .squeeze(shape, inverse, &xb, &mut yc)
                    .unwrap();
                assert_eq!(host(&y), host(&yc), "squeeze {shape:?} inverse {inverse}");
            }
        }
    }
}

#[test]
fn mask_gather_and_scatter_match_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(8);
    for shape in shapes4() {
        for mask in MASKS {
            let (_, cin) = mask.split_channels(shape.channels);
            let m = shape.batch * cin * shape.plane();
            let x = cpu_buf(&rand_vec(&mut rng, shape.len(), -1.0, 1.0));
            let geo = [
                i(shape.batch),
                i(shape.channels),
                i(shape.height),
                i(shape.width),
                i(mask as usize),
            ];
            let mut got = cpu_buf(&vec![f32::NAN; m]);
            let mut params = geo.to_vec();
            params.extend([l.p(&x), l.pm(&mut got)]);
            if m > 0 {
                l.go("cf_mask_gather", ew(m), &params);
            }
            let mut want = cpu_buf(&vec![0.0; m]);
            CpuBackend::default()
                .mask_gather(shape, mask, &x, &mut want)
                .unwrap();
            assert_eq!(host(&got), host(&want), "mask_gather {shape:?} {mask:?}");

            let d = cpu_buf(&rand_vec(&mut rng, m, -1.0, 1.0));
            let dx0 = rand_vec(&mut rng, shape.len(), -1.0, 1.0);
            let mut got = cpu_buf(&dx0);
            let mut params = geo.to_vec();
            params.extend([l.p(&d), l.pm(&mut got)]);
            if m > 0 {
                l.go("cf_mask_scatter_add", ew(m), &params);
            }
            let mut want = cpu_buf(&dx0);
            CpuBackend::default()
                .mask_scatter_add(shape, mask, &d, &mut want)
                .unwrap();
            assert_eq!(
                host(&got),
                host(&want),
                "mask_scatter_add {shape:?} {mask:?}"
            );
        }
    }
}

#[test]
fn coupling_forward_inverse_backward_match_cpu() {
    let l = Launcher::new();
    let mut rng = Pcg32::new(9);
    for shape in shapes4() {
        for mask in MASKS {
            let (cc, _) = mask.split_channels(shape.channels);
            if cc == 0 {
                continue;
            }
            let p = shape.plane();
            let st = cpu_buf(&rand_vec(&mut rng, shape.batch * 2 * cc * p, -2.0, 2.0));
            let scale = cpu_buf(&rand_vec(&mut rng, cc, 0.5, 1.5));
            let x0 = rand_vec(&mut rng, shape.len(), -2.0, 2.0);
            let ld0 = rand_vec(&mut rng, shape.batch, -1.0, 1.0);
            // Both scale functions; the sigmoid's kernels get null `scale` and partial-sum
            // pointers, which they must not touch (the simulator would crash).
            // Glow with and without its floor (st in [-2, 2]: the floor of 1/2 bites).
            for (mode, floor) in [(0, 0.0f32), (1, 0.0), (1, 0.5)] {
                let f = if mode == 0 {
                    CouplingScale::Tanh(&scale)
                } else {
                    CouplingScale::Sigmoid { floor }
                };
                let scale_p = if mode == 0 {
                    l.p(&scale)
                } else {
                    Param::Ptr(0)
                };
                let geo = [
                    i(shape.channels),
                    i(shape.height),
                    i(shape.width),
                    i(mask as usize),
                    i(mode),
                    Param::F32(floor),
                ];
                let what = format!("{shape:?} {mask:?} mode {mode} floor {floor}");

                // forward: x in place, log_det accumulated
                let (mut x, mut ld) = (cpu_buf(&x0), cpu_buf(&ld0));
                let mut params = geo.to_vec();
                params.extend([l.p(&st), scale_p, l.pm(&mut x), l.pm(&mut ld)]);
                l.go("cf_coupling_forward", per_image(shape.batch), &params);
                let (mut xc, mut ldc) = (cpu_buf(&x0), cpu_buf(&ld0));
                CpuBackend::default()
                    .coupling_forward(shape, mask, f, &st, &mut xc, &mut ldc)
                    .unwrap();
                assert_close(
                    &format!("coupling_forward x {what}"),
                    &host(&x),
                    &host(&xc),
                    2e-6,
                );
                assert_close(
                    &format!("coupling_forward ld {what}"),
                    &host(&ld),
                    &host(&ldc),
                    2e-6,
                );

                // inverse
                let mut y = cpu_buf(&host(&xc));
                let mut params = vec![i(shape.batch)];
                params.extend(geo);
                params.extend([l.p(&st), scale_p, l.pm(&mut y)]);
                l.go("cf_coupling_inverse", ew(shape.batch * cc * p), &params);
                let mut yc = cpu_buf(&host(&xc));
                CpuBackend::default()
                    .coupling_inverse(shape, mask, f, &st, &mut yc)
                    .unwrap();
                assert_close(
                    &format!("coupling_inverse {what}"),
                    &host(&y),
                    &host(&yc),
                    2e-6,
                );
                assert_close(
                    &format!("coupling_inverse undoes forward {what}"),
                    &host(&y),
                    &x0,
                    2e-5,
                );

                // backward: dy in place, d_st written, d_scale accumulated (two passes, tanh)
                let dy0 = rand_vec(&mut rng, shape.len(), -1.0, 1.0);
                let ds0 = rand_vec(&mut rng, cc, -1.0, 1.0);
                let x0b = cpu_buf(&x0);
                let (mut dy, mut dst, mut part) = (
                    cpu_buf(&dy0),
                    cpu_buf(&vec![f32::NAN; shape.batch * 2 * cc * p]),
                    cpu_buf(&vec![f32::NAN; shape.batch * cc]),
                );
                let part_p = if mode == 0 {
                    l.pm(&mut part)
                } else {
                    Param::Ptr(0)
                };
                let mut params = geo.to_vec();
                params.extend([
                    Param::F32(-0.3),
                    l.p(&x0b),
                    l.p(&st),
                    scale_p,
                    l.pm(&mut dy),
                    l.pm(&mut dst),
                    part_p,
                ]);
                l.go("cf_coupling_backward", per_image(shape.batch), &params);
                let mut ds = cpu_buf(&ds0);
                if mode == 0 {
                    let cfg = LaunchCfg {
                        grid: (cc.div_ceil(256) as u32, 1, 1),
                        block: (256, 1, 1),
                        shared_bytes: 0,
                    };
                    l.go(
                        "cf_col_sum_add",
                        cfg,
                        &[i(shape.batch), i(cc), l.p(&part), l.pm(&mut ds)],
                    );
                }
                let (mut dyc, mut dstc, mut dsc) = (
                    cpu_buf(&dy0),
                    cpu_buf(&vec![0.0; shape.batch * 2 * cc * p]),
                    cpu_buf(&ds0),
                );
                CpuBackend::default()
                    .coupling_backward(
                        shape, mask, f, &x0b, &st, -0.3, &mut dyc, &mut dstc, &mut dsc,
                    )
                    .unwrap();
                assert_close(
                    &format!("coupling_backward dy {what}"),
                    &host(&dy),
                    &host(&dyc),
                    2e-6,
                );
                assert_close(
                    &format!("coupling_backward d_st {what}"),
                    &host(&dst),
                    &host(&dstc),
                    2e-6,
                );
                assert_close(
                    &format!("coupling_backward d_scale {what}"),
                    &host(&ds),
                    &host(&dsc),
                    2e-6,
                );
                if mode == 1 {
                    assert_eq!(host(&dsc), ds0, "the sigmoid scale leaves d_scale alone");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Part 2: the trainer's CudaBackend<SimDevice> (its Rust orchestration + these kernels)
// against CpuBackend through the Backend trait, then whole training steps of the model.
// ---------------------------------------------------------------------------------------

use clayflow_kernel::{Arch, COLOR, MNIST};
use clayflow_trainer::backend::cuda::CudaBackend;
use clayflow_trainer::config::tensor_specs;
use clayflow_trainer::model::{init_params, Flow};
use std::sync::Arc;

fn sim_backend() -> CudaBackend<SimDevice> {
    CudaBackend::new(SimDevice::new())
}

/// Runs `f` on the simulated CUDA backend and on the CPU backend and compares every returned
/// tensor with `assert_close(tol)`.
#[track_caller]
fn both(what: &str, tol: f32, f: impl Fn(&dyn Backend) -> Vec<Vec<f32>>) {
    let sim = sim_backend();
    let got = f(&sim);
    let want = f(&CpuBackend::default());
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("{what} (output {k})"), g, w, tol);
    }
}

fn up(b: &dyn Backend, v: &[f32]) -> Buffer {
    b.upload(v).unwrap()
}

fn down(b: &dyn Backend, x: &Buffer) -> Vec<f32> {
    b.download(x).unwrap()
}

#[test]
fn backend_convolutions_match_cpu() {
    let mut rng = Pcg32::new(11);
    for s in [
        conv_shapes()[1],
        conv_shapes()[2],
        conv_shapes()[5],
        conv_shapes()[6],
        conv_shapes()[10],
    ] {
        let x = rand_vec(&mut rng, s.input_len(), -1.0, 1.0);
        let w = rand_vec(&mut rng, s.weight_len(), -0.3, 0.3);
        let bias = rand_vec(&mut rng, s.cout, -0.5, 0.5);
        let dy = rand_vec(&mut rng, s.output_len(), -1.0, 1.0);
        both(&format!("Backend conv {s:?}"), 2e-5, |b| {
            let (xb, wb, bb, dyb) = (up(b, &x), up(b, &w), up(b, &bias), up(b, &dy));
            let mut y = b.zeros(s.output_len()).unwrap();
            b.conv_forward(&s, &xb, &wb, &bb, true, &mut y).unwrap();
            let mut dx = b.zeros(s.input_len()).unwrap();
            b.conv_backward_data(&s, &dyb, &wb, &mut dx).unwrap();
            let mut dw = up(b, &vec![9.0; s.weight_len()]);
            let mut db = up(b, &vec![9.0; s.cout]);
            b.conv_backward_weight(&s, &xb, &dyb, &mut dw, &mut db)
                .unwrap();
            vec![down(b, &y), down(b, &dx), down(b, &dw), down(b, &db)]
        });
    }
}

/// Convolutions that run as implicit GEMMs over the batch's pixels (every 1x1 convolution,
/// images of at most 64 pixels, and weight gradients the tiled kernel would run with most
/// threads idle): the Glow presets' shapes (color-glow's 224 -> 224 coupling layer at each
/// level's 16x16, 8x8 and 4x4 images and its 3x3 layers at 8x8 and 4x4, mnist-glow's 64 -> 64
/// and 3x3 layers at 14x14 and 7x7, the invertible 1x1 convolutions) and ragged sizes around
/// the 16- and 64-row tiles and the 16-deep reduction steps.
#[test]
fn backend_gemm_convolutions_match_cpu() {
    let mut rng = Pcg32::new(14);
    let s = |batch, cin, cout, height, width, kernel| ConvShape {
        batch,
        cin,
        cout,
        height,
        width,
        kernel,
    };
    for s in [
        s(1, 224, 224, 16, 16, 1),
        s(2, 224, 224, 8, 8, 1),
        s(3, 224, 224, 4, 4, 1),
        s(2, 64, 64, 14, 14, 1),
        s(2, 64, 64, 7, 7, 1),
        s(5, 4, 4, 14, 14, 1),
        s(3, 48, 48, 4, 4, 1),
        s(2, 17, 70, 5, 3, 1),
        s(1, 3, 1, 2, 2, 1),
        s(1, 6, 224, 16, 16, 3),
        s(2, 12, 224, 8, 8, 3),
        s(2, 224, 24, 8, 8, 3),
        s(3, 24, 224, 4, 4, 3),
        s(2, 224, 48, 4, 4, 3),
        s(2, 4, 64, 7, 7, 3),
        s(2, 64, 8, 7, 7, 3),
        s(2, 2, 64, 14, 14, 3),
        s(3, 5, 9, 3, 5, 5),
    ] {
        let bound = 1.0 / ((s.cin * s.kernel * s.kernel) as f32).sqrt();
        let x = rand_vec(&mut rng, s.input_len(), -1.0, 1.0);
        let w = rand_vec(&mut rng, s.weight_len(), -bound, bound);
        let bias = rand_vec(&mut rng, s.cout, -0.5, 0.5);
        let dy = rand_vec(&mut rng, s.output_len(), -1.0, 1.0);
        both(&format!("Backend GEMM conv {s:?}"), 2e-5, |b| {
            let (xb, wb, bb, dyb) = (up(b, &x), up(b, &w), up(b, &bias), up(b, &dy));
            let mut out = Vec::new();
            for relu in [false, true] {
                let mut y = up(b, &vec![f32::NAN; s.output_len()]);
                b.conv_forward(&s, &xb, &wb, &bb, relu, &mut y).unwrap();
                out.push(down(b, &y));
            }
            let mut dx = up(b, &vec![f32::NAN; s.input_len()]);
            b.conv_backward_data(&s, &dyb, &wb, &mut dx).unwrap();
            let mut dw = up(b, &vec![f32::NAN; s.weight_len()]);
            let mut db = up(b, &vec![f32::NAN; s.cout]);
            b.conv_backward_weight(&s, &xb, &dyb, &mut dw, &mut db)
                .unwrap();
            out.extend([down(b, &dx), down(b, &dw), down(b, &db)]);
            out
        });
    }
}

#[test]
fn backend_elementwise_reductions_adam_and_the_weight_average_match_cpu() {
    let mut rng = Pcg32::new(12);
    for n in [1usize, 300, 5000] {
        let x = rand_vec(&mut rng, n, -2.0, 2.0);
        let y0 = rand_vec(&mut rng, n, -2.0, 2.0);
        let g = rand_vec(&mut rng, n, -1.0, 1.0);
        both(&format!("Backend elementwise n={n}"), 2e-6, |b| {
            let xb = up(b, &x);
            let mut y = up(b, &y0);
            b.axpy(0.3, &xb, &mut y).unwrap();
            let a = down(b, &y);
            b.relu_backward(&xb, &mut y).unwrap();
            let r = down(b, &y);
            b.copy(&xb, &mut y).unwrap();
            let c = down(b, &y);
            b.fill(&mut y, -1.5).unwrap();
            let f = down(b, &y);
            let ss = b.sum_squares(&xb).unwrap();
            let (mut p, mut m, mut v) = (up(b, &x), b.zeros(n).unwrap(), b.zeros(n).unwrap());
            let gb = up(b, &g);
            for step in 1..=3 {
                let hp = AdamStep {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    step,
                    grad_scale: 0.5,
                };
                b.adam(&hp, &mut p, &gb, &mut m, &mut v).unwrap();
            }
            // The multi-tensor forms: Adam on three tensors (one skipped) and the sum of
            // squares of several buffers, each in one launch on the device.
            let mut ps: Vec<Buffer> = [&x, &y0, &g].iter().map(|t| up(b, t)).collect();
            let gs: Vec<Buffer> = [&g, &x, &y0].iter().map(|t| up(b, t)).collect();
            let mut ms: Vec<Buffer> = (0..3).map(|_| b.zeros(n).unwrap()).collect();
            let mut vs: Vec<Buffer> = (0..3).map(|_| b.zeros(n).unwrap()).collect();
            for step in 1..=2 {
                let hp = AdamStep {
                    lr: 1e-2,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    step,
                    grad_scale: 0.7,
                };
                b.adam_all(&hp, &mut ps, &gs, &mut ms, &mut vs, &[true, false, true])
                    .unwrap();
            }
            let all = b.sum_squares_all(&gs).unwrap();
            // The weight average on the same tensors (the second skipped), in one launch.
            let mut avg: Vec<Buffer> = [&y0, &g, &x].iter().map(|t| up(b, t)).collect();
            for weight in [0.3, 0.05] {
                b.ema_all(weight, &ps, &mut avg, &[true, false, true])
                    .unwrap();
            }
            let mut out = vec![
                a,
                r,
                c,
                f,
                vec![ss as f32, all as f32],
                down(b, &p),
                down(b, &m),
                down(b, &v),
            ];
            for k in 0..3 {
                out.extend([down(b, &ps[k]), down(b, &ms[k]), down(b, &vs[k])]);
            }
            out.extend(avg.iter().map(|a| down(b, a)));
            out
        });
    }
}

#[test]
fn backend_flow_ops_match_cpu() {
    let mut rng = Pcg32::new(13);
    for shape in shapes4() {
        let n = shape.len();
        let u = rand_vec(&mut rng, n, 0.0, 1.0);
        let z = rand_vec(&mut rng, n, -3.0, 3.0);
        both(&format!("Backend logit/squeeze {shape:?}"), 2e-6, |b| {
            let mut x = up(b, &u);
            let mut ld = b.zeros(shape.batch).unwrap();
            b.logit_forward(shape, 0.05, &mut x, &mut ld).unwrap();
            let mut out = vec![down(b, &x), down(b, &ld)];
            let mut zi = up(b, &z);
            b.logit_inverse(0.05, &mut zi).unwrap();
            out.push(down(b, &zi));
            let mut acc = b.zeros(2 * shape.batch).unwrap();
            b.per_image_sum_squares(shape, &up(b, &z), &mut acc)
                .unwrap();
            b.per_image_sum_squares(shape, &up(b, &u), &mut acc)
                .unwrap();
            out.push(hi_lo(&down(b, &acc)).iter().map(|&v| v as f32).collect());
            if shape.height % 2 == 0 && shape.width % 2 == 0 {
                let mut y = b.zeros(n).unwrap();
                b.squeeze(shape, false, &up(b, &z), &mut y).unwrap();
                let mut back = b.zeros(n).unwrap();
                b.squeeze(shape, true, &y, &mut back).unwrap();
                out.push(down(b, &y));
                out.push(down(b, &back));
            }
            out
        });
        for mask in MASKS {
            let (cc, cin) = mask.split_channels(shape.channels);
            let p = shape.plane();
            let x0 = rand_vec(&mut rng, n, -2.0, 2.0);
            let st = rand_vec(&mut rng, shape.batch * 2 * cc * p, -2.0, 2.0);
            let scale = rand_vec(&mut rng, cc, 0.5, 1.5);
            let dy0 = rand_vec(&mut rng, n, -1.0, 1.0);
            let dcnn = rand_vec(&mut rng, shape.batch * cin * p, -1.0, 1.0);
            both(
                &format!("Backend coupling/mask {shape:?} {mask:?}"),
                2e-6,
                |b| {
                    let xb = up(b, &x0);
                    let mut cnn_in = b.zeros(shape.batch * cin * p).unwrap();
                    b.mask_gather(shape, mask, &xb, &mut cnn_in).unwrap();
                    let mut dx = up(b, &dy0);
                    b.mask_scatter_add(shape, mask, &up(b, &dcnn), &mut dx)
                        .unwrap();
                    let (stb, scb) = (up(b, &st), up(b, &scale));
                    let mut out = vec![down(b, &cnn_in), down(b, &dx)];
                    for f in [
                        CouplingScale::Tanh(&scb),
                        CouplingScale::Sigmoid { floor: 0.0 },
                        CouplingScale::Sigmoid { floor: 0.0625 },
                    ] {
                        let mut y = up(b, &x0);
                        let mut ld = up(b, &vec![0.5; shape.batch]);
                        b.coupling_forward(shape, mask, f, &stb, &mut y, &mut ld)
                            .unwrap();
                        let fwd = down(b, &y);
                        b.coupling_inverse(shape, mask, f, &stb, &mut y).unwrap();
                        let mut dy = up(b, &dy0);
                        let mut dst = b.zeros(shape.batch * 2 * cc * p).unwrap();
                        let mut dscale = up(b, &vec![0.25; cc]);
                        b.coupling_backward(
                            shape,
                            mask,
                            f,
                            &xb,
                            &stb,
                            -0.7,
                            &mut dy,
                            &mut dst,
                            &mut dscale,
                        )
                        .unwrap();
                        out.extend([
                            fwd,
                            down(b, &ld),
                            down(b, &y),
                            down(b, &dy),
                            down(b, &dst),
                            down(b, &dscale),
                        ]);
                    }
                    out
                },
            );
        }
    }
}

#[test]
fn backend_rejects_bad_buffers_with_errors() {
    let b = sim_backend();
    let s = conv_shapes()[0];
    let x = b.zeros(s.input_len()).unwrap();
    let w = b.zeros(s.weight_len()).unwrap();
    let bias = b.zeros(s.cout).unwrap();
    let mut y = b.zeros(s.output_len() + 1).unwrap();
    let e = b
        .conv_forward(&s, &x, &w, &bias, false, &mut y)
        .unwrap_err();
    assert!(e.to_string().contains("expected"), "{e}");
    let even = ConvShape { kernel: 4, ..s };
    let mut y = b.zeros(s.output_len()).unwrap();
    assert!(b
        .conv_forward(
            &even,
            &x,
            &b.zeros(even.weight_len()).unwrap(),
            &bias,
            false,
            &mut y
        )
        .is_err());
}

/// Initial parameters with the last conv and the scales perturbed, so that every coupling
/// does something (the default init makes them identities with zero gradients for conv0/1).
fn busy_params(arch: &Arch, seed: u64) -> Vec<Vec<f32>> {
    let mut p = init_params(arch, seed);
    let mut rng = Pcg32::new(seed + 99);
    for (spec, t) in tensor_specs(arch).iter().zip(p.iter_mut()) {
        if spec.name.contains(".conv2.") || spec.name.ends_with(".scale") {
            let fan_in: usize = spec.shape.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f32).sqrt();
            for v in t.iter_mut() {
                *v += ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * bound;
            }
        }
    }
    p
}

/// `||a - b|| / ||b||` (2-norm), the GPU parity measure.
fn rel_norm(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - f64::from(y)).powi(2);
        n += f64::from(y).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

/// One training step's results: per-image log-probs, the loss, every gradient tensor, the
/// parameters after one Adam step, and the inverse of a latent batch.
struct Step {
    log_prob: Vec<f64>,
    loss: f64,
    grads: Vec<Vec<f32>>,
    updated: Vec<Vec<f32>>,
    inverse: Vec<f32>,
}

fn train_step(backend: Arc<dyn Backend>, arch: Arch, params: &[Vec<f32>], batch: usize) -> Step {
    let mut rng = Pcg32::new(21);
    let u = rand_vec(&mut rng, batch * arch.dim(), 0.0, 1.0);
    let z = rand_vec(&mut rng, batch * arch.dim(), -2.0, 2.0);
    let mut f = Flow::new(backend.clone(), arch, params).unwrap();
    let stats = f.forward(&u, batch).unwrap();
    let mut grads = f.zeros_like_params().unwrap();
    f.backward(&mut grads).unwrap();
    let host_grads: Vec<Vec<f32>> = grads.iter().map(|g| backend.download(g).unwrap()).collect();
    let mut m = f.zeros_like_params().unwrap();
    let mut v = f.zeros_like_params().unwrap();
    let hp = AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        step: 1,
        grad_scale: 1.0,
    };
    for (k, g) in grads.iter().enumerate() {
        backend
            .adam(&hp, &mut f.params[k], g, &mut m[k], &mut v[k])
            .unwrap();
    }
    let updated = f.params_host().unwrap();
    let inverse = f.inverse(&z, batch).unwrap();
    Step {
        log_prob: stats.log_prob,
        loss: stats.mean_bpd,
        grads: host_grads,
        updated,
        inverse,
    }
}

/// Whole training steps (forward, loss, backward, Adam, and the inverse) of the model on the
/// simulated CUDA backend against the CPU: the loss and per-image log-probs to 1e-6 relative,
/// every gradient tensor to 1e-4 norm-relative (the GPU criterion; observed ~1e-6),
/// the Adam-updated parameters and the inverse to 1e-5 norm-relative.
#[test]
fn training_step_matches_cpu() {
    let checker = Arch {
        channels: 2,
        height: 6,
        width: 6,
        squeeze: false,
        levels: 1,
        glow: false,
        couplings: 3,
        masks: clayflow_kernel::alternating_masks(Mask::CheckerEven),
        kernels: [3, 1, 3],
        hidden: [3, 4],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    };
    let cases = [
        ("MNIST preset, 12 couplings", MNIST, 2),
        (
            "colour preset, 2 couplings",
            Arch {
                couplings: 2,
                ..COLOR
            },
            1,
        ),
        ("checkerboard", checker, 3),
        (
            "two-level Glow (ActNorm, 1x1 convolution, split)",
            Arch {
                channels: 1,
                height: 8,
                width: 8,
                squeeze: true,
                levels: 2,
                glow: true,
                couplings: 4,
                masks: clayflow_kernel::alternating_masks(Mask::ChannelEven),
                ..checker
            },
            2,
        ),
    ];
    for (what, arch, batch) in cases {
        let params = busy_params(&arch, 5);
        let sim = train_step(Arc::new(sim_backend()), arch, &params, batch);
        let cpu = train_step(Arc::new(CpuBackend::default()), arch, &params, batch);
        assert!(
            (sim.loss - cpu.loss).abs() <= 1e-6 * cpu.loss.abs(),
            "{what}: loss {} vs CPU {}",
            sim.loss,
            cpu.loss
        );
        for (a, b) in sim.log_prob.iter().zip(&cpu.log_prob) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{what}: log p {a} vs CPU {b}"
            );
        }
        let specs = tensor_specs(&arch);
        let mut worst = 0.0f64;
        for (k, spec) in specs.iter().enumerate() {
            assert!(
                sim.grads[k].iter().all(|v| v.is_finite()),
                "{what}: non-finite gradient in {}",
                spec.name
            );
            let r = rel_norm(&sim.grads[k], &cpu.grads[k]);
            worst = worst.max(r);
            assert!(
                r <= 1e-4,
                "{what}: gradient {} relative error {r:.3e}",
                spec.name
            );
            let r = rel_norm(&sim.updated[k], &cpu.updated[k]);
            assert!(
                r <= 1e-5,
                "{what}: updated {} relative error {r:.3e}",
                spec.name
            );
        }
        let r = rel_norm(&sim.inverse, &cpu.inverse);
        assert!(r <= 1e-5, "{what}: inverse relative error {r:.3e}");
        println!(
            "{what}: loss {:.6} bits/dim, worst gradient rel. error {worst:.2e}",
            cpu.loss
        );
    }
}
