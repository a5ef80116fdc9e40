//! Profile of one CPU training step (batch 64 by default), per phase and per backend op,
//! optionally measured alternately with PyTorch's step (`tools/reference/bench_step.py`).
//!
//! ```text
//! cargo run --release --example profile_step -- [--arch mnist|color|mnist-glow]
//!     [--couplings N] [--hidden H] [--prior] [--bf16] [--threads 1,2]
//!     [--batch 64] [--steps 20] [--warmup 3] [--rounds 1]
//!     [--pytorch /work/torch-venv/bin/python] [--torch-steps 20] [--cpu-clock]
//! ```
//!
//! `--cpu-clock` (one thread only) times with the thread's CPU time instead of wall time,
//! for comparing two builds on a machine that other jobs are using.
//!
//! Each step is what `clayflow train` does: a batch of dequantized images (MNIST: the
//! bundled 8k digits; colour: fixed pseudo-random pixels, as no colour data set is
//! bundled), forward, backward, gradient-norm clipping and Adam. Every backend call goes
//! through a timing wrapper around `CpuBackend` (the calls are synchronous, so the time
//! around one is its cost), and is attributed to a row: each convolution by direction and
//! shape (with its GFLOP/s), the coupling layers, masks, elementwise ops, Adam.
//!
//! With `--pytorch PYTHON`, each round runs our steps and then PyTorch's
//! (`bench_step.py --threads T`), for every thread count, so both sides see the same machine
//! load (A B A B ...); the last table gives both medians and the ratio per round.

use clayflow_kernel::{alternating_masks, Arch, Mask, Pcg32, COLOR, MNIST, MNIST_GLOW};
use clayflow_trainer::backend::prelude::*;
use clayflow_trainer::backend::{
    cpu::CpuBackend, AdamStep, Buffer, ConvShape, CouplingScale, LuFactors, Result, Shape4,
};
use clayflow_trainer::data::{epoch_order, load_idx_images, Dataset};
use clayflow_trainer::model::{init_params, Flow};
use clayflow_trainer::train::dequantize_batch;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Accumulated cost of one row of the op table.
#[derive(Debug, Default, Clone)]
struct Row {
    secs: f64,
    calls: u64,
    flops: u64,
}

/// Seconds on the chosen clock: wall time, or (`cpu`) this thread's CPU time, which on a
/// busy machine leaves out the time the thread waited for a core (meaningful with one
/// thread only: with more, the other workers' time is not counted).
fn now(cpu: bool) -> f64 {
    if cpu {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the
        // kernel knows.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        if rc == 0 {
            return ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
        }
    }
    EPOCH.with(|e| e.elapsed().as_secs_f64())
}

thread_local! {
    static EPOCH: Instant = Instant::now();
}

/// `CpuBackend` with every call timed and attributed to a named row.
#[derive(Debug, Default)]
struct Timed {
    inner: CpuBackend,
    cpu_clock: bool,
    rows: Mutex<BTreeMap<String, Row>>,
}

impl Timed {
    fn time<T>(&self, key: impl FnOnce() -> String, flops: u64, f: impl FnOnce() -> T) -> T {
        let t0 = now(self.cpu_clock);
        let r = f();
        let dt = now(self.cpu_clock) - t0;
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let row = rows.entry(key()).or_default();
        row.secs += dt;
        row.calls += 1;
        row.flops += flops;
        r
    }

    fn take(&self) -> BTreeMap<String, Row> {
        std::mem::take(&mut *self.rows.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn conv_name(s: &ConvShape) -> String {
    format!(
        "{}->{} k{} {}x{}",
        s.cin, s.cout, s.kernel, s.height, s.width
    )
}

impl Backend for Timed {
    fn name(&self) -> String {
        format!("timed {}", self.inner.name())
    }
}

impl Memory for Timed {
    fn zeros(&self, len: usize) -> Result<Buffer> {
        self.time(
            || "misc: alloc/upload/download".into(),
            0,
            || self.inner.zeros(len),
        )
    }
    fn upload(&self, data: &[f32]) -> Result<Buffer> {
        self.time(
            || "misc: alloc/upload/download".into(),
            0,
            || self.inner.upload(data),
        )
    }
    fn upload_into(&self, data: &[f32], dst: &mut Buffer) -> Result<()> {
        self.time(
            || "misc: alloc/upload/download".into(),
            0,
            || self.inner.upload_into(data, dst),
        )
    }
    fn download(&self, buf: &Buffer) -> Result<Vec<f32>> {
        self.time(
            || "misc: alloc/upload/download".into(),
            0,
            || self.inner.download(buf),
        )
    }
    fn download_all(&self, bufs: &[&Buffer]) -> Result<Vec<Vec<f32>>> {
        self.time(
            || "misc: alloc/upload/download".into(),
            0,
            || self.inner.download_all(bufs),
        )
    }
    fn copy(&self, src: &Buffer, dst: &mut Buffer) -> Result<()> {
        self.time(
            || "misc: copy/fill/axpy".into(),
            0,
            || self.inner.copy(src, dst),
        )
    }
    fn fill(&self, buf: &mut Buffer, value: f32) -> Result<()> {
        self.time(
            || "misc: copy/fill/axpy".into(),
            0,
            || self.inner.fill(buf, value),
        )
    }
    fn axpy(&self, a: f32, x: &Buffer, y: &mut Buffer) -> Result<()> {
        self.time(
            || "misc: copy/fill/axpy".into(),
            0,
            || self.inner.axpy(a, x, y),
        )
    }
    fn sum_squares(&self, x: &Buffer) -> Result<f64> {
        self.time(|| "opt: grad norm".into(), 0, || self.inner.sum_squares(x))
    }
    fn sum_squares_all(&self, xs: &[Buffer]) -> Result<f64> {
        self.time(
            || "opt: grad norm".into(),
            0,
            || self.inner.sum_squares_all(xs),
        )
    }
}

impl Convolution for Timed {
    fn conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || format!("conv fwd    {}", conv_name(s)),
            s.flops(),
            || self.inner.conv_forward(s, x, w, b, relu, y),
        )
    }
    fn conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || format!("conv bwd-dx {}", conv_name(s)),
            s.flops(),
            || self.inner.conv_backward_data(s, dy, w, dx),
        )
    }
    fn net_conv_forward(
        &self,
        s: &ConvShape,
        x: &Buffer,
        w: &Buffer,
        b: &Buffer,
        relu: bool,
        y: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || format!("conv fwd    {}", conv_name(s)),
            s.flops(),
            || self.inner.net_conv_forward(s, x, w, b, relu, y),
        )
    }
    fn net_conv_backward_data(
        &self,
        s: &ConvShape,
        dy: &Buffer,
        w: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || format!("conv bwd-dx {}", conv_name(s)),
            s.flops(),
            || self.inner.net_conv_backward_data(s, dy, w, dx),
        )
    }
    fn net_conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || format!("conv bwd-dw {}", conv_name(s)),
            s.flops(),
            || self.inner.net_conv_backward_weight(s, x, dy, dw, db),
        )
    }
    fn conv_backward_weight(
        &self,
        s: &ConvShape,
        x: &Buffer,
        dy: &Buffer,
        dw: &mut Buffer,
        db: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || format!("conv bwd-dw {}", conv_name(s)),
            s.flops(),
            || self.inner.conv_backward_weight(s, x, dy, dw, db),
        )
    }
    fn relu_backward(&self, y: &Buffer, dy: &mut Buffer) -> Result<()> {
        self.time(|| "relu bwd".into(), 0, || self.inner.relu_backward(y, dy))
    }
}

impl FlowLayers for Timed {
    fn logit_forward(
        &self,
        shape: Shape4,
        alpha: f32,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "logit + squeeze".into(),
            0,
            || self.inner.logit_forward(shape, alpha, x, log_det),
        )
    }
    fn logit_inverse(&self, alpha: f32, x: &mut Buffer) -> Result<()> {
        self.time(
            || "logit + squeeze".into(),
            0,
            || self.inner.logit_inverse(alpha, x),
        )
    }
    fn squeeze(&self, shape: Shape4, inverse: bool, x: &Buffer, y: &mut Buffer) -> Result<()> {
        self.time(
            || "logit + squeeze".into(),
            0,
            || self.inner.squeeze(shape, inverse, x, y),
        )
    }
    fn mask_gather(&self, shape: Shape4, mask: Mask, x: &Buffer, c: &mut Buffer) -> Result<()> {
        self.time(
            || "mask gather/scatter".into(),
            0,
            || self.inner.mask_gather(shape, mask, x, c),
        )
    }
    fn mask_scatter_add(
        &self,
        shape: Shape4,
        mask: Mask,
        d: &Buffer,
        dx: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "mask gather/scatter".into(),
            0,
            || self.inner.mask_scatter_add(shape, mask, d, dx),
        )
    }
    fn coupling_forward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "coupling fwd".into(),
            0,
            || {
                self.inner
                    .coupling_forward(shape, mask, scale, st, x, log_det)
            },
        )
    }
    fn coupling_inverse(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        st: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "coupling inv".into(),
            0,
            || self.inner.coupling_inverse(shape, mask, scale, st, y),
        )
    }
    fn coupling_backward(
        &self,
        shape: Shape4,
        mask: Mask,
        scale: CouplingScale<'_>,
        x: &Buffer,
        st: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_st: &mut Buffer,
        d_scale: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "coupling bwd".into(),
            0,
            || {
                self.inner
                    .coupling_backward(shape, mask, scale, x, st, g_log_det, dy, d_st, d_scale)
            },
        )
    }
    fn actnorm_forward(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        x: &mut Buffer,
        log_det: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "glow: actnorm".into(),
            0,
            || self.inner.actnorm_forward(shape, logs, bias, x, log_det),
        )
    }
    fn actnorm_inverse(
        &self,
        shape: Shape4,
        logs: &Buffer,
        bias: &Buffer,
        y: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "glow: actnorm".into(),
            0,
            || self.inner.actnorm_inverse(shape, logs, bias, y),
        )
    }
    fn actnorm_backward(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &Buffer,
        g_log_det: f32,
        dy: &mut Buffer,
        d_logs: &mut Buffer,
        d_bias: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "glow: actnorm".into(),
            0,
            || {
                self.inner
                    .actnorm_backward(shape, x, logs, g_log_det, dy, d_logs, d_bias)
            },
        )
    }
    fn actnorm_init(
        &self,
        shape: Shape4,
        x: &Buffer,
        logs: &mut Buffer,
        bias: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "glow: actnorm".into(),
            0,
            || self.inner.actnorm_init(shape, x, logs, bias),
        )
    }
    fn invconv_weight(&self, c: usize, lu: LuFactors<'_>, w: &mut Buffer) -> Result<()> {
        self.time(
            || "glow: invconv factors".into(),
            0,
            || self.inner.invconv_weight(c, lu, w),
        )
    }
    fn invconv_inverse(&self, c: usize, lu: LuFactors<'_>, w_inv: &mut Buffer) -> Result<()> {
        self.time(
            || "glow: invconv factors".into(),
            0,
            || self.inner.invconv_inverse(c, lu, w_inv),
        )
    }
    fn invconv_backward(
        &self,
        c: usize,
        lu: LuFactors<'_>,
        d_w: &Buffer,
        g_log_det: f32,
        count: usize,
        d_lower: &mut Buffer,
        d_upper: &mut Buffer,
        d_log_s: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "glow: invconv factors".into(),
            0,
            || {
                self.inner
                    .invconv_backward(c, lu, d_w, g_log_det, count, d_lower, d_upper, d_log_s)
            },
        )
    }
    fn add_log_det(&self, plane: usize, v: &Buffer, log_det: &mut Buffer) -> Result<()> {
        self.time(
            || "glow: invconv factors".into(),
            0,
            || self.inner.add_log_det(plane, v, log_det),
        )
    }
    fn per_image_sum_squares(&self, shape: Shape4, z: &Buffer, acc: &mut Buffer) -> Result<()> {
        self.time(
            || "misc: log p (sum z^2)".into(),
            0,
            || self.inner.per_image_sum_squares(shape, z, acc),
        )
    }
}

impl Optimiser for Timed {
    fn adam_all(
        &self,
        hp: &AdamStep,
        params: &mut [Buffer],
        grads: &[Buffer],
        m: &mut [Buffer],
        v: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()> {
        self.time(
            || "opt: adam".into(),
            0,
            || self.inner.adam_all(hp, params, grads, m, v, trainable),
        )
    }
    fn adam(
        &self,
        hp: &AdamStep,
        param: &mut Buffer,
        grad: &Buffer,
        m: &mut Buffer,
        v: &mut Buffer,
    ) -> Result<()> {
        self.time(
            || "opt: adam".into(),
            0,
            || self.inner.adam(hp, param, grad, m, v),
        )
    }
    fn ema_all(
        &self,
        weight: f32,
        params: &[Buffer],
        avg: &mut [Buffer],
        trainable: &[bool],
    ) -> Result<()> {
        self.time(
            || "opt: weight average".into(),
            0,
            || self.inner.ema_all(weight, params, avg, trainable),
        )
    }
}

/// Command-line options.
#[derive(Debug)]
struct Opts {
    arch: (&'static str, Arch),
    threads: Vec<usize>,
    batch: usize,
    steps: usize,
    warmup: usize,
    rounds: usize,
    pytorch: Option<String>,
    torch_steps: usize,
    cpu_clock: bool,
    /// The backend every call goes to (`--bf16`: bf16 coupling networks).
    inner: CpuBackend,
}

const USAGE: &str = "usage: profile_step [--arch mnist|color|mnist-glow] [--couplings N] \
[--hidden H] [--prior] [--bf16] [--threads 1,2] [--batch 64] \
[--steps 20] [--warmup 3] [--rounds 1] [--pytorch PYTHON] [--torch-steps 20] [--cpu-clock]";

fn parse_args() -> std::result::Result<Opts, String> {
    let mut o = Opts {
        arch: ("mnist", MNIST),
        threads: vec![1, 2],
        batch: 64,
        steps: 20,
        warmup: 3,
        rounds: 1,
        pytorch: None,
        torch_steps: 20,
        cpu_clock: false,
        inner: CpuBackend::default(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--help" || a == "-h" {
            return Err(USAGE.into());
        }
        let mut val = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        let num = |v: String| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{a}: expected a positive integer, got {v:?}"))
        };
        match a.as_str() {
            "--arch" => {
                o.arch = match val()?.as_str() {
                    "mnist" => ("mnist", MNIST),
                    "color" | "colour" => ("color", COLOR),
                    "mnist-glow" => ("mnist-glow", MNIST_GLOW),
                    v => {
                        return Err(format!(
                            "--arch: expected mnist, color or mnist-glow, got {v:?}"
                        ))
                    }
                }
            }
            // Shape overrides, as `clayflow train --couplings N --hidden H,H`.
            "--couplings" => {
                let a = &mut o.arch.1;
                a.couplings = num(val()?)?;
                a.masks = alternating_masks(a.masks[0]);
            }
            "--hidden" => {
                let h = num(val()?)?;
                o.arch.1.hidden = [h, h];
            }
            "--prior" => o.arch.1.prior = true,
            "--bf16" => {
                o.inner = CpuBackend::with_bf16_networks()
                    .ok_or("--bf16: this CPU has no AVX-512 BF16")?
            }
            "--threads" => {
                o.threads = val()?
                    .split(',')
                    .map(|t| num(t.trim().to_string()))
                    .collect::<std::result::Result<_, _>>()?
            }
            "--batch" => o.batch = num(val()?)?,
            "--steps" => o.steps = num(val()?)?,
            "--warmup" => o.warmup = val()?.parse().map_err(|_| "--warmup: expected a number")?,
            "--rounds" => o.rounds = num(val()?)?,
            "--pytorch" => o.pytorch = Some(val()?),
            "--torch-steps" => o.torch_steps = num(val()?)?,
            "--cpu-clock" => o.cpu_clock = true,
            _ => return Err(format!("unknown argument {a:?}\n{USAGE}")),
        }
    }
    if o.cpu_clock && (o.threads != [1] || o.pytorch.is_some()) {
        return Err("--cpu-clock: only with --threads 1 and without --pytorch".into());
    }
    o.arch
        .1
        .validate()
        .map_err(|e| format!("invalid shape: {e}"))?;
    if o.pytorch.is_some() && o.arch.0 != "mnist" {
        return Err("--pytorch: tools/reference/bench_step.py only has the MNIST preset".into());
    }
    Ok(o)
}

/// Images to train on: the bundled MNIST digits, or fixed pseudo-random colour pixels.
fn dataset(name: &str, arch: &Arch) -> std::result::Result<Dataset, String> {
    if name.starts_with("mnist") {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/data/mnist8k-train-images-idx3-ubyte.gz"
        );
        return load_idx_images(std::path::Path::new(path)).map_err(|e| e.to_string());
    }
    let n = 1024;
    let mut rng = Pcg32::new(7);
    let pixels = (0..n * arch.dim())
        .map(|_| (clayflow_kernel::Rng::next_u32(&mut rng) >> 24) as u8)
        .collect();
    Ok(Dataset {
        channels: arch.channels,
        height: arch.height,
        width: arch.width,
        pixels,
        labels: None,
    })
}

/// One profiled run: median phase times and per-step op rows.
#[derive(Debug)]
struct Profile {
    step_ms: Vec<f64>,
    phases_ms: [Vec<f64>; 4],
    rows: BTreeMap<String, Row>,
}

const PHASES: [&str; 4] = ["data", "forward", "backward", "optimiser"];

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

fn profile(o: &Opts, ds: &Dataset) -> std::result::Result<Profile, String> {
    let arch = o.arch.1;
    let timed = Arc::new(Timed {
        inner: o.inner,
        cpu_clock: o.cpu_clock,
        ..Timed::default()
    });
    let backend: Arc<dyn Backend> = timed.clone();
    let e = |e: clayflow_trainer::backend::BackendError| e.to_string();
    let mut flow = Flow::new(backend.clone(), arch, &init_params(&arch, 1)).map_err(e)?;
    let mut grads = flow.zeros_like_params().map_err(e)?;
    let mut m = flow.zeros_like_params().map_err(e)?;
    let mut v = flow.zeros_like_params().map_err(e)?;
    let order = epoch_order(ds.len(), 1, 0);
    let mut u = Vec::new();
    let mut p = Profile {
        step_ms: Vec::new(),
        phases_ms: Default::default(),
        rows: BTreeMap::new(),
    };
    for step in 0..o.warmup + o.steps {
        if step == o.warmup {
            timed.take();
        }
        let t0 = now(o.cpu_clock);
        let b = (step * o.batch) % (ds.len() - o.batch + 1);
        let mut noise = Pcg32::with_stream(0xd1ce, step as u64);
        dequantize_batch(ds, &order[b..b + o.batch], arch.bits, &mut noise, &mut u)
            .map_err(|e| e.to_string())?;
        let t1 = now(o.cpu_clock);
        flow.forward(&u, o.batch).map_err(e)?;
        let t2 = now(o.cpu_clock);
        flow.backward(&mut grads).map_err(e)?;
        let t3 = now(o.cpu_clock);
        let norm = backend.sum_squares_all(&grads).map_err(e)?.sqrt();
        let hp = AdamStep {
            lr: 1e-3 * ((step + 1) as f32 / 100.0).min(1.0),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: step as u64 + 1,
            grad_scale: if norm > 100.0 {
                (100.0 / norm) as f32
            } else {
                1.0
            },
        };
        for (((p, g), m), v) in flow.params.iter_mut().zip(&grads).zip(&mut m).zip(&mut v) {
            backend.adam(&hp, p, g, m, v).map_err(e)?;
        }
        let t4 = now(o.cpu_clock);
        if step >= o.warmup {
            let ms = |a: f64, b: f64| (b - a) * 1e3;
            p.step_ms.push(ms(t0, t4));
            for (k, (a, b)) in [(t0, t1), (t1, t2), (t2, t3), (t3, t4)]
                .into_iter()
                .enumerate()
            {
                p.phases_ms[k].push(ms(a, b));
            }
        }
    }
    p.rows = timed.take();
    Ok(p)
}

fn print_profile(o: &Opts, threads: usize, p: &Profile) {
    let steps = o.steps as f64;
    let step = median(&p.step_ms);
    let total: f64 = p.rows.values().map(|r| r.secs).sum::<f64>() * 1e3 / steps;
    let flops: u64 = p.rows.values().map(|r| r.flops).sum::<u64>() / o.steps as u64;
    println!(
        "\n{} preset, batch {}, {} thread(s){}: step median {:.1} ms ({:.0} img/s, {:.1} GFLOP \
         conv, {:.1} GFLOP/s overall); {} timed steps after {} warm-up",
        o.arch.0,
        o.batch,
        threads,
        if o.cpu_clock {
            " [thread CPU time]"
        } else {
            ""
        },
        step,
        o.batch as f64 / step * 1e3,
        flops as f64 / 1e9,
        flops as f64 / step / 1e6,
        o.steps,
        o.warmup
    );
    let phases: Vec<String> = PHASES
        .iter()
        .zip(&p.phases_ms)
        .map(|(n, v)| format!("{n} {:.1}", median(v)))
        .collect();
    println!("phases, median ms: {}", phases.join(", "));
    println!(
        "{:<34} {:>9} {:>6} {:>6} {:>9}",
        "op (per step)", "ms", "%", "calls", "GFLOP/s"
    );
    let mut rows: Vec<_> = p.rows.iter().collect();
    rows.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
    for (name, r) in rows {
        let ms = r.secs * 1e3 / steps;
        let gf = if r.flops > 0 {
            format!("{:.1}", r.flops as f64 / r.secs / 1e9)
        } else {
            "-".into()
        };
        println!(
            "{:<34} {:>9.2} {:>6.1} {:>6} {:>9}",
            name,
            ms,
            100.0 * ms / step,
            r.calls / o.steps as u64,
            gf
        );
    }
    let mut groups: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    for (name, r) in &p.rows {
        let g = if name.starts_with("conv fwd") {
            "conv forward"
        } else if name.starts_with("conv bwd-dx") {
            "conv backward-data"
        } else if name.starts_with("conv bwd-dw") {
            "conv backward-weight"
        } else if name.starts_with("coupling") {
            "coupling layers"
        } else if name.starts_with("opt:") {
            "optimiser (norm + adam)"
        } else {
            "other elementwise"
        };
        let e = groups.entry(g).or_default();
        e.0 += r.secs;
        e.1 += r.flops;
    }
    println!(
        "{:<34} {:>9} {:>6} {:>6} {:>9}",
        "group (per step)", "ms", "%", "", "GFLOP/s"
    );
    for (g, (secs, fl)) in groups {
        let ms = secs * 1e3 / steps;
        let gf = if fl > 0 {
            format!("{:.1}", fl as f64 / secs / 1e9)
        } else {
            "-".into()
        };
        println!(
            "{:<34} {:>9.2} {:>6.1} {:>6} {:>9}",
            g,
            ms,
            100.0 * ms / step,
            "",
            gf
        );
    }
    // Means here (the op rows are means per step), so the rows add up.
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (data, step) = (mean(&p.phases_ms[0]), mean(&p.step_ms));
    println!(
        "{:<34} {:>9.2} {:>6.1}\n{:<34} {:>9.2} {:>6.1}",
        "data (dequantize, outside backend)",
        data,
        100.0 * data / step,
        "untracked (mean step - ops - data)",
        step - total - data,
        100.0 * (step - total - data) / step
    );
}

/// PyTorch's training step at `threads` threads: (median ms, phase medians as text).
fn pytorch_step(
    python: &str,
    threads: usize,
    o: &Opts,
) -> std::result::Result<(f64, String), String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/reference/bench_step.py");
    let out = Command::new(python)
        .args([
            script,
            "--threads",
            &threads.to_string(),
            "--batch",
            &o.batch.to_string(),
        ])
        .args(["--steps", &o.torch_steps.to_string(), "--warmup", "5"])
        .args(["--eval-iters", "1", "--sample-iters", "1"])
        .output()
        .map_err(|e| format!("could not run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{script} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    let j: serde_json::Value =
        serde_json::from_str(last).map_err(|e| format!("{script}: last line not JSON: {e}"))?;
    let tr = &j["results"][0]["train_step"];
    let ms = tr["median_s"]
        .as_f64()
        .ok_or("bench_step.py JSON has no results[0].train_step.median_s")?
        * 1e3;
    let ph = PHASES
        .iter()
        .map(|n| {
            format!(
                "{n} {:.1}",
                tr["phase_median_ms"][n].as_f64().unwrap_or(f64::NAN)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    Ok((ms, ph))
}

fn run() -> std::result::Result<(), String> {
    let o = parse_args()?;
    // Every sgemm already runs inside a rayon task: keep matrixmultiply's pool out of it.
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    let ds = dataset(o.arch.0, &o.arch.1)?;
    let mut ab: Vec<(usize, usize, f64, f64, String)> = Vec::new();
    for round in 0..o.rounds {
        for &t in &o.threads {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .map_err(|e| e.to_string())?;
            let p = pool.install(|| profile(&o, &ds))?;
            if o.rounds > 1 {
                println!("\n== round {} ==", round + 1);
            }
            print_profile(&o, t, &p);
            if let Some(py) = &o.pytorch {
                let (ms, ph) = pytorch_step(py, t, &o)?;
                println!("PyTorch, {t} thread(s): step median {ms:.1} ms; phases, median ms: {ph}");
                ab.push((round + 1, t, median(&p.step_ms), ms, ph));
            }
        }
    }
    if !ab.is_empty() {
        println!(
            "\nours vs PyTorch, training step, {} batch {}, alternating:",
            o.arch.0, o.batch
        );
        println!(
            "{:>5} {:>7} {:>10} {:>12} {:>16}",
            "round", "threads", "ours ms", "PyTorch ms", "ratio (speed-up)"
        );
        for &(r, t, ours, torch, _) in &ab {
            println!(
                "{r:>5} {t:>7} {ours:>10.1} {torch:>12.1} {:>15.2}x",
                torch / ours
            );
        }
        for &t in &o.threads {
            let rs: Vec<f64> = ab.iter().filter(|a| a.1 == t).map(|a| a.3 / a.2).collect();
            println!(
                "threads {t}: median ratio {:.2}x over {} round(s)",
                median(&rs),
                rs.len()
            );
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("profile_step: {e}");
        std::process::exit(2);
    }
}
