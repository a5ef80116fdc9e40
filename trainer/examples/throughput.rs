//! Prints the training throughput of a preset on this machine: one row per phase of a step
//! (forward, backward, optimiser) and the whole step, in ms and images/s.
//!
//! `cargo run --release -p clayflow-trainer --example throughput -- [mnist|color] [batch] [steps]`

use clayflow_trainer::backend::{cpu::CpuBackend, AdamStep, Backend};
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
    let arch = ModelConfig::preset(preset)?.to_arch()?;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend);
    let mut flow = Flow::new(backend.clone(), arch, &init_params(&arch, 1))?;
    let mut grads = flow.zeros_like_params()?;
    let mut m = flow.zeros_like_params()?;
    let mut v = flow.zeros_like_params()?;
    let u: Vec<f32> = (0..batch * arch.dim())
        .map(|i| ((i * 7919) % 256) as f32 / 256.0 + 0.001)
        .collect();
    let (mut tf, mut tb, mut to) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..steps + 2 {
        let t0 = Instant::now();
        flow.forward(&u, batch)?;
        let t1 = Instant::now();
        flow.backward(&mut grads)?;
        let t2 = Instant::now();
        let hp = AdamStep {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: step as u64 + 1,
            grad_scale: 1.0,
        };
        let mut sq = 0.0;
        for g in &grads {
            sq += backend.sum_squares(g)?;
        }
        assert!(sq.is_finite());
        for (((p, g), m), v) in flow.params.iter_mut().zip(&grads).zip(&mut m).zip(&mut v) {
            backend.adam(&hp, p, g, m, v)?;
        }
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
    let fl = 2.0
        * arch.plane() as f64
        * arch
            .active_masks()
            .iter()
            .map(|&mk| {
                (0..3)
                    .map(|j| {
                        let (ci, co, k) = arch.conv_shape(mk, j);
                        (ci * co * k * k) as f64
                    })
                    .sum::<f64>()
            })
            .sum::<f64>();
    println!(
        "{preset} preset, batch {batch}, {} threads, median of {steps} steps",
        rayon::current_num_threads()
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
    Ok(())
}
