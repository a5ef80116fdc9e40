//! The GPU backend trains every preset on the device: `CudaBackend<SimDevice>` (the GPU
//! backend's Rust orchestration and the very kernel sources of `cuda/kernels`, run on the CPU
//! by the host simulator) against `CpuBackend`.
//!
//! - Glow's ops (ActNorm forward / inverse / backward / data-dependent initialisation, the
//!   LU-parametrised 1x1 convolution's `W`, `W^-1` and gradients, the log-det) against the CPU
//!   backend, through the `Backend` trait.
//! - For each of the four presets (`mnist`, `mnist-glow`, `color`, `color-glow`, small
//!   batches: the simulator is slow), training steps exactly as `train/steps.rs` takes them
//!   (forward, backward, gradient norm, Adam on the trainable tensors): the loss and every
//!   gradient tensor against the CPU (norm-relative error <= 1e-4, the criterion), and
//!   the simulator's counts of one warm step: at most 2 device-to-host copies (the loss terms
//!   and the gradient norm's partial sums), at most 1 host-to-device copy (the batch), no
//!   device allocation. Counts and errors are printed (`--nocapture`).
//!
//! Tolerances for the single ops: 2e-6 relative to the largest CPU value for elementwise
//! math (the same f32 formulas; libm may round an ulp differently), 1e-5 for the per-channel
//! sums and the 1x1 convolution's f64 math rounded to f32 (the sums run in another order).

use clayflow_cuda_sim::{Counts, SimDevice};
use clayflow_kernel::{Arch, Pcg32, Rng};
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::cuda::{CudaBackend, KernelDevice, LaunchCfg, Param};
use clayflow_trainer::backend::{select, AdamStep, Backend, Buffer, LuFactors, Shape4};
use clayflow_trainer::config::{tensor_specs, ModelConfig};
use clayflow_trainer::invconv;
use clayflow_trainer::model::{init_params, Flow};
use std::sync::Arc;

fn rand_vec(rng: &mut Pcg32, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| lo + (hi - lo) * ((rng.next_u32() >> 8) as f32 / 16_777_216.0))
        .collect()
}

/// Asserts `got` matches `want` within `tol` times the largest |want|.
#[track_caller]
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= tol * scale,
            "{what}: element {i} is {g} but the CPU gives {w} (|diff| {d} > {tol} x {scale})"
        );
    }
}

/// `||a - b|| / ||b||` (2-norm).
fn rel_norm(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += (f64::from(x) - f64::from(y)).powi(2);
        n += f64::from(y).powi(2);
    }
    d.sqrt() / n.sqrt().max(1e-30)
}

/// Runs `f` on the simulated CUDA backend and on the CPU and compares every returned tensor.
#[track_caller]
fn both(what: &str, tol: f32, f: impl Fn(&dyn Backend) -> Vec<Vec<f32>>) {
    let sim = CudaBackend::new(SimDevice::new());
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
fn actnorm_ops_match_cpu() {
    let mut rng = Pcg32::new(31);
    let s = |batch, channels, height, width| Shape4 {
        batch,
        channels,
        height,
        width,
    };
    // Channel counts of the presets' levels, odd sizes, one image, and a batch large enough
    // for several images per reduction chunk.
    for shape in [
        s(3, 4, 14, 14),
        s(2, 12, 16, 16),
        s(1, 5, 3, 7),
        s(40, 2, 4, 4),
        s(2, 48, 4, 4),
    ] {
        let c = shape.channels;
        let x = rand_vec(&mut rng, shape.len(), -2.0, 3.0);
        let logs = rand_vec(&mut rng, c, -0.5, 0.5);
        let bias = rand_vec(&mut rng, c, -1.0, 1.0);
        let dy0 = rand_vec(&mut rng, shape.len(), -1.0, 1.0);
        let ld0 = rand_vec(&mut rng, shape.batch, -3.0, 3.0);
        let (dl0, db0) = (
            rand_vec(&mut rng, c, -1.0, 1.0),
            rand_vec(&mut rng, c, -1.0, 1.0),
        );
        both(&format!("ActNorm forward/inverse {shape:?}"), 2e-6, |b| {
            let (lb, bb) = (up(b, &logs), up(b, &bias));
            let mut y = up(b, &x);
            let mut ld = up(b, &ld0);
            b.actnorm_forward(shape, &lb, &bb, &mut y, &mut ld).unwrap();
            let fwd = down(b, &y);
            b.actnorm_inverse(shape, &lb, &bb, &mut y).unwrap();
            vec![fwd, down(b, &ld), down(b, &y)]
        });
        both(&format!("ActNorm backward/init {shape:?}"), 1e-5, |b| {
            let (xb, lb) = (up(b, &x), up(b, &logs));
            let (mut dy, mut dl, mut db) = (up(b, &dy0), up(b, &dl0), up(b, &db0));
            b.actnorm_backward(shape, &xb, &lb, -0.3, &mut dy, &mut dl, &mut db)
                .unwrap();
            let (mut il, mut ib) = (up(b, &vec![f32::NAN; c]), up(b, &vec![f32::NAN; c]));
            b.actnorm_init(shape, &xb, &mut il, &mut ib).unwrap();
            vec![
                down(b, &dy),
                down(b, &dl),
                down(b, &db),
                down(b, &il),
                down(b, &ib),
            ]
        });
    }
}

/// The 1x1 convolution's factors: a random rotation's LU factors moved off it, so that every
/// factor matters.
fn lu_params(c: usize, seed: u64) -> [Vec<f32>; 5] {
    let mut lu = invconv::init(c, seed);
    let mut rng = Pcg32::new(seed + 1);
    for (i, (l, u)) in lu.lower.iter_mut().zip(lu.upper.iter_mut()).enumerate() {
        let (r, k) = (i / c, i % c);
        let d = ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * 0.3;
        if k < r {
            *l += d;
        } else if k > r {
            *u += d;
        }
    }
    for v in &mut lu.log_s {
        *v += ((rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0) * 0.2;
    }
    [lu.perm, lu.sign, lu.lower, lu.upper, lu.log_s]
}

#[test]
fn invconv_ops_match_cpu() {
    let mut rng = Pcg32::new(41);
    // The presets' channel counts (4, 8; 12, 24, 48) and a few odd ones.
    for c in [1usize, 3, 4, 8, 12, 24, 48] {
        let f = lu_params(c, 100 + c as u64);
        let dw = rand_vec(&mut rng, c * c, -1.0, 1.0);
        let ld0 = rand_vec(&mut rng, 3, -1.0, 1.0);
        both(&format!("invconv c={c}"), 1e-5, |b| {
            let bufs: Vec<Buffer> = f.iter().map(|v| up(b, v)).collect();
            let lu = LuFactors {
                perm: &bufs[0],
                sign: &bufs[1],
                lower: &bufs[2],
                upper: &bufs[3],
                log_s: &bufs[4],
            };
            let (mut w, mut wi) = (b.zeros(c * c).unwrap(), b.zeros(c * c).unwrap());
            b.invconv_weight(c, lu, &mut w).unwrap();
            b.invconv_inverse(c, lu, &mut wi).unwrap();
            let nan = vec![f32::NAN; c * c];
            let (mut dl, mut du, mut ds) = (up(b, &nan), up(b, &nan), up(b, &nan[..c]));
            b.invconv_backward(c, lu, &up(b, &dw), -0.01, 196, &mut dl, &mut du, &mut ds)
                .unwrap();
            let mut ld = up(b, &ld0);
            b.add_log_det(49, lu.log_s, &mut ld).unwrap();
            vec![
                down(b, &w),
                down(b, &wi),
                down(b, &dl),
                down(b, &du),
                down(b, &ds),
                down(b, &ld),
            ]
        });
    }
}

/// A preset's parameters in a trained-like state: every coupling's last conv (zero at
/// initialisation, which would zero most gradients) at a tenth of the other convs' scale,
/// RealNVP's scales moved off 1 (random parameters at full scale make 32 Glow steps overflow
/// f32, which says nothing about the code).
fn settled_params(arch: &Arch, seed: u64) -> Vec<Vec<f32>> {
    let mut p = init_params(arch, seed);
    let mut rng = Pcg32::new(seed + 7);
    for (spec, t) in tensor_specs(arch).iter().zip(p.iter_mut()) {
        let u = |rng: &mut Pcg32| (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0;
        if spec.name.contains(".conv2.") {
            let fan_in: usize = spec.shape.iter().skip(1).product::<usize>().max(1);
            let bound = 0.1 / (fan_in as f32).sqrt();
            for v in t.iter_mut() {
                *v = u(&mut rng) * bound;
            }
        } else if spec.name.ends_with(".scale") && !arch.glow {
            for v in t.iter_mut() {
                *v += u(&mut rng) * 0.2;
            }
        }
    }
    p
}

/// A model with its optimiser, stepped as `train/steps.rs` steps it (forward, backward, the
/// gradient norm with `sum_squares_all`, `adam_all` on the trainable tensors, and the weight
/// average's `ema_all` as with `--ema`, counted with the rest; `tests/cuda_parity.rs` checks
/// its values).
struct Trainer {
    backend: Arc<dyn Backend>,
    flow: Flow,
    grads: Vec<Buffer>,
    m: Vec<Buffer>,
    v: Vec<Buffer>,
    avg: Vec<Buffer>,
    trainable: Vec<bool>,
    step: u64,
}

impl Trainer {
    fn new(backend: Arc<dyn Backend>, arch: Arch, params: &[Vec<f32>], init: &[f32]) -> Self {
        let mut flow = Flow::new(backend.clone(), arch, params).unwrap();
        if arch.glow {
            flow.data_init(init, init.len() / arch.dim()).unwrap();
        }
        let avg = flow
            .params
            .iter()
            .map(|p| {
                let mut a = backend.zeros(p.len()).unwrap();
                backend.copy(p, &mut a).unwrap();
                a
            })
            .collect();
        Trainer {
            avg,
            grads: flow.zeros_like_params().unwrap(),
            m: flow.zeros_like_params().unwrap(),
            v: flow.zeros_like_params().unwrap(),
            trainable: flow.trainable(),
            backend,
            flow,
            step: 0,
        }
    }

    /// One step: the loss, the gradients (on the host, for the comparison, fetched before
    /// Adam and outside the counted part of the caller) and the gradient norm.
    fn step(&mut self, u: &[f32], batch: usize) -> (f64, f64) {
        let b = self.backend.clone();
        let stats = self.flow.forward(u, batch).unwrap();
        self.flow.backward(&mut self.grads).unwrap();
        let norm = b.sum_squares_all(&self.grads).unwrap().sqrt();
        self.step += 1;
        let clip = 100.0f64;
        let hp = AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: self.step,
            grad_scale: if norm > clip {
                (clip / norm) as f32
            } else {
                1.0
            },
        };
        b.adam_all(
            &hp,
            &mut self.flow.params,
            &self.grads,
            &mut self.m,
            &mut self.v,
            &self.trainable,
        )
        .unwrap();
        b.ema_all(0.1, &self.flow.params, &mut self.avg, &self.trainable)
            .unwrap();
        (stats.mean_bpd, norm)
    }

    fn grads_host(&self) -> Vec<Vec<f32>> {
        self.grads
            .iter()
            .map(|g| self.backend.download(g).unwrap())
            .collect()
    }
}

/// For one preset: two training steps on the simulator and on the CPU. The first step's loss
/// and gradients are compared; the second (warm) step's transfers, synchronisations,
/// allocations and launches are counted. Returns the counts and the worst gradient error.
fn preset_on_the_device(preset: &str, batch: usize) -> (Counts, f64) {
    let arch = ModelConfig::preset(preset).unwrap().to_arch().unwrap();
    let params = settled_params(&arch, 3);
    let mut rng = Pcg32::new(17);
    let n = batch * arch.dim();
    let batches: Vec<Vec<f32>> = (0..3).map(|_| rand_vec(&mut rng, n, 0.0, 1.0)).collect();
    let sim = Arc::new(CudaBackend::new(SimDevice::new()));
    let mut on_sim = Trainer::new(sim.clone(), arch, &params, &batches[0]);
    let mut on_cpu = Trainer::new(Arc::new(CpuBackend::default()), arch, &params, &batches[0]);

    let (loss_sim, norm_sim) = on_sim.step(&batches[1], batch);
    let (loss_cpu, norm_cpu) = on_cpu.step(&batches[1], batch);
    let loss_rel = ((loss_sim - loss_cpu) / loss_cpu).abs();
    assert!(
        loss_rel <= 1e-6,
        "{preset}: loss {loss_sim} vs CPU {loss_cpu}"
    );
    assert!(
        ((norm_sim - norm_cpu) / norm_cpu).abs() <= 1e-4,
        "{preset}: gradient norm {norm_sim} vs CPU {norm_cpu}"
    );
    let (gs, gc) = (on_sim.grads_host(), on_cpu.grads_host());
    let mut worst = (0.0f64, String::new());
    for ((spec, a), b) in tensor_specs(&arch).iter().zip(&gs).zip(&gc) {
        assert!(
            a.iter().all(|v| v.is_finite()),
            "{preset}: non-finite gradient in {}",
            spec.name
        );
        let r = rel_norm(a, b);
        if r > worst.0 {
            worst = (r, spec.name.clone());
        }
        assert!(
            r <= 1e-4,
            "{preset}: gradient {} relative error {r:.3e}",
            spec.name
        );
    }

    // The warm step, counted.
    let before = sim.device().counts();
    let (loss2_sim, _) = on_sim.step(&batches[2], batch);
    let counts = sim.device().counts() - before;
    let (loss2_cpu, _) = on_cpu.step(&batches[2], batch);
    assert!(
        ((loss2_sim - loss2_cpu) / loss2_cpu).abs() <= 1e-5,
        "{preset}: second-step loss {loss2_sim} vs CPU {loss2_cpu}"
    );
    println!(
        "{preset} (batch {batch}): per warm step {} D2H, {} H2D, {} syncs, {} allocations, \
         {} launches; loss rel. error {loss_rel:.1e}; worst gradient rel. error {:.2e} ({})",
        counts.d2h, counts.h2d, counts.syncs, counts.allocs, counts.launches, worst.0, worst.1
    );
    (counts, worst.0)
}

#[track_caller]
fn assert_bounded(preset: &str, c: Counts) {
    assert!(
        c.d2h <= 2,
        "{preset}: {} device-to-host copies per step",
        c.d2h
    );
    assert!(
        c.h2d <= 1,
        "{preset}: {} host-to-device copies per step",
        c.h2d
    );
    assert_eq!(c.allocs, 0, "{preset}: device allocations in a warm step");
}

#[test]
fn mnist_trains_on_the_device() {
    let (c, _) = preset_on_the_device("mnist", 2);
    assert_bounded("mnist", c);
}

#[test]
fn mnist_glow_trains_on_the_device() {
    let (c, _) = preset_on_the_device("mnist-glow", 2);
    assert_bounded("mnist-glow", c);
}

#[test]
fn color_trains_on_the_device() {
    let (c, _) = preset_on_the_device("color", 1);
    assert_bounded("color", c);
}

#[test]
fn color_glow_trains_on_the_device() {
    let (c, _) = preset_on_the_device("color-glow", 2);
    assert_bounded("color-glow", c);
}

/// A simulator with one broken kernel launch: `cf_logit_forward` gets a wrong `alpha`, the
/// kind of bug a mis-launched or miscompiled kernel makes.
#[derive(Debug)]
struct BrokenDevice(SimDevice);

impl KernelDevice for BrokenDevice {
    fn name(&self) -> String {
        "broken cuda-sim".into()
    }
    fn alloc_zeros(&self, len: usize) -> clayflow_trainer::backend::Result<Buffer> {
        self.0.alloc_zeros(len)
    }
    fn upload(&self, data: &[f32]) -> clayflow_trainer::backend::Result<Buffer> {
        self.0.upload(data)
    }
    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> clayflow_trainer::backend::Result<()> {
        self.0.upload_into(data, dst)
    }
    fn download(&self, buf: &Buffer) -> clayflow_trainer::backend::Result<Vec<f32>> {
        self.0.download(buf)
    }
    fn ptr(&self, buf: &Buffer) -> clayflow_trainer::backend::Result<u64> {
        self.0.ptr(buf)
    }
    fn ptr_mut(&self, buf: &mut Buffer) -> clayflow_trainer::backend::Result<u64> {
        self.0.ptr_mut(buf)
    }
    fn launch(
        &self,
        name: &'static str,
        cfg: LaunchCfg,
        params: &[Param],
    ) -> clayflow_trainer::backend::Result<()> {
        let mut p = params.to_vec();
        if name == "cf_logit_forward" {
            // alpha 0.05 -> 0.06
            p[1] = Param::F32(0.06);
        }
        self.0.launch(name, cfg, &p)
    }
    fn synchronize(&self) -> clayflow_trainer::backend::Result<()> {
        self.0.synchronize()
    }
}

/// `--device auto|cuda` trusts a GPU only after `select::verify` (one tiny forward and
/// backward on the GPU and the CPU, compared): the simulated GPU passes, one with a wrong
/// kernel is caught.
#[test]
fn the_self_check_passes_the_simulator_and_catches_a_wrong_kernel() {
    let t0 = std::time::Instant::now();
    select::verify(Arc::new(CudaBackend::new(SimDevice::new()))).unwrap();
    println!(
        "self-check on the simulator: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let e = select::verify(Arc::new(CudaBackend::new(BrokenDevice(SimDevice::new())))).unwrap_err();
    assert!(e.contains("differs from the CPU"), "{e}");
}
