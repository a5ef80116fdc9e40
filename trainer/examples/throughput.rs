//! Prints the training throughput of a preset on this machine: one row per phase of a step
//! (forward, backward, optimiser) and the whole step, in ms and images/s.
//!
//! `cargo run --release -p clayflow-trainer --example throughput -- [preset] [batch] [steps] [device]`
//!
//! GFLOP/s counts the convolutions only (coupling networks and Glow's 1x1 conv). On
//! `cuda[:N]` a last line gives the GPU's FP32 peak (`fp32-peak-tflops`).
//!
//! `device` is `cpu` (default), `cuda`, `cuda:N` or `auto`. On a GPU, work is queued
//! asynchronously: each phase ends with a small download, which waits for the queued work,
//! so the phase times are real (the download of one small tensor is included).

use clayflow_trainer::backend::select::{self, DeviceChoice};
use clayflow_trainer::backend::{AdamStep, Backend, Buffer};
use clayflow_trainer::config::ModelConfig;
use clayflow_trainer::model::{init_params, Flow};
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
        std::env::set_var("MATMUL_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map_or("mnist", String::as_str);
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let device: DeviceChoice = args.get(4).map_or(Ok(DeviceChoice::Cpu), |s| s.parse())?;
    let arch = ModelConfig::preset(preset)?.to_arch()?;
    let opened = select::open(device)?;
    if let Some(n) = &opened.notice {
        eprintln!("{n}");
    }
    let backend: Arc<dyn Backend> = opened.backend;
    let mut flow = Flow::new(backend.clone(), arch, &init_params(&arch, 1))?;
    let mut grads = flow.zeros_like_params()?;
    let mut m = flow.zeros_like_params()?;
    let mut v = flow.zeros_like_params()?;
    let u: Vec<f32> = (0..batch * arch.dim())
        .map(|i| ((i * 7919) % 256) as f32 / 256.0 + 0.001)
        .collect();
    // Waits for the device's queued work: downloads the smallest gradient tensor.
    let smallest = (0..grads.len())
        .min_by_key(|&i| grads[i].len())
        .unwrap_or(0);
    let sync = |bufs: &[Buffer]| -> anyhow::Result<()> {
        if let Some(b) = bufs.get(smallest) {
            backend.download(b)?;
        }
        Ok(())
    };
    let (mut tf, mut tb, mut to) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..steps + 2 {
        let t0 = Instant::now();
        flow.forward(&u, batch)?;
        let t1 = Instant::now();
        flow.backward(&mut grads)?;
        sync(&grads)?;
        let t2 = Instant::now();
        let hp = AdamStep {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: step as u64 + 1,
            grad_scale: 1.0,
        };
        let sq = backend.sum_squares_all(&grads)?;
        assert!(sq.is_finite());
        for (((p, g), m), v) in flow.params.iter_mut().zip(&grads).zip(&mut m).zip(&mut v) {
            backend.adam(&hp, p, g, m, v)?;
        }
        sync(&m)?;
        let t3 = Instant::now();
        if step >= 2 {
            tf.push((t1 - t0).as_secs_f64());
            tb.push((t2 - t1).as_secs_f64());
            to.push((t3 - t2).as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, b, o) = (med(&mut tf), med(&mut tb), med(&mut to));
    // Floating-point operations of the convolutions per image, forward (an FMA counts 2): the
    // coupling networks' three convs and, for Glow, the invertible 1x1 conv, each at the
    // plane of the level its step runs in. Backward is twice that (data and weight grads).
    let fl: f64 = arch
        .active_masks()
        .iter()
        .enumerate()
        .map(|(i, &mk)| {
            let view = arch.step_arch(i);
            let net: usize = (0..3)
                .map(|j| {
                    let (ci, co, k) = view.conv_shape(mk, j);
                    ci * co * k * k
                })
                .sum();
            let c = view.flow_shape().0;
            let mix = if arch.glow { c * c } else { 0 };
            2.0 * view.plane() as f64 * (net + mix) as f64
        })
        .sum();
    println!(
        "{preset} preset, batch {batch}, on {}, median of {steps} steps",
        backend.name()
    );
    println!(
        "{:<10} {:>9} {:>10} {:>9}",
        "phase", "ms", "images/s", "GFLOP/s"
    );
    println!(
        "{:<10} {:>9.1} {:>10.0} {:>9.1}",
        "forward",
        f * 1e3,
        batch as f64 / f,
        fl * batch as f64 / f / 1e9
    );
    println!(
        "{:<10} {:>9.1} {:>10.0} {:>9.1}",
        "backward",
        b * 1e3,
        batch as f64 / b,
        2.0 * fl * batch as f64 / b / 1e9
    );
    println!("{:<10} {:>9.1}", "optimiser", o * 1e3);
    let s = f + b + o;
    println!(
        "{:<10} {:>9.1} {:>10.0} {:>9.1}",
        "step",
        s * 1e3,
        batch as f64 / s,
        3.0 * fl * batch as f64 / s / 1e9
    );
    if let DeviceChoice::Cuda(n) = device {
        match clayflow_trainer::backend::cuda::gpu::fp32_peak_tflops(n) {
            Ok(p) => println!("fp32-peak-tflops {p:.1}"),
            Err(e) => println!("fp32-peak-tflops unknown ({e})"),
        }
    }
    Ok(())
}
