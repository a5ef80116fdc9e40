//! Per-image held-out bits/dim of a checkpoint: the distribution (median, quantiles, worst
//! images) behind the mean that `clayflow eval` prints, and for the worst images where
//! the latent is large (per level) and how large the log-det is.
//! Usage: cargo run --release -p clayflow-trainer --example per_image_bpd -- RUN [N_WORST]

use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::checkpoint;
use clayflow_trainer::data::load_idx_images;
use clayflow_trainer::eval::eval_u;
use clayflow_trainer::model::{bpd, latent_blocks, Flow};
use std::path::Path;
use std::sync::Arc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let run = args.get(1).map(String::as_str).unwrap_or("runs/mnist-glow");
    let worst: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let (ck, dir) = checkpoint::load(Path::new(run))?;
    let arch = ck.model.to_arch()?;
    let ds = load_idx_images(Path::new("data/mnist8k-train-images-idx3-ubyte.gz"))?;
    let (_, val) = ds.split_last(1000)?;
    let mut flow = Flow::new(Arc::new(CpuBackend::default()), arch, &ck.params)?;
    let d = arch.dim();
    let batch = 100;
    let mut scores = Vec::new();
    let mut u = vec![0.0f32; batch * d];
    for start in (0..val.len()).step_by(batch) {
        for k in 0..batch {
            eval_u(&val, start + k, arch.bits, &mut u[k * d..(k + 1) * d])?;
        }
        let stats = flow.forward(&u, batch)?;
        let z = flow.latents()?;
        for k in 0..batch {
            let zk = &z[k * d..(k + 1) * d];
            let per_level: Vec<f64> = latent_blocks(&arch)
                .iter()
                .map(|&(at, n)| {
                    zk[at..at + n]
                        .iter()
                        .map(|v| f64::from(*v).powi(2))
                        .sum::<f64>()
                        / n as f64
                })
                .collect();
            scores.push((bpd(&arch, stats.log_prob[k]), start + k, per_level));
        }
    }
    let mean = scores.iter().map(|s| s.0).sum::<f64>() / scores.len() as f64;
    scores.sort_by(|a, b| a.0.total_cmp(&b.0));
    let q = |f: f64| scores[((scores.len() - 1) as f64 * f) as usize].0;
    println!(
        "{}: mean {mean:.4}, median {:.4}, 90% {:.4}, 99% {:.4}, max {:.4} bits/dim",
        dir.display(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(1.0)
    );
    for (b, i, lv) in scores.iter().rev().take(worst) {
        println!("  image {i}: {b:.3} bits/dim, mean z^2 per level {lv:.3?}");
    }
    Ok(())
}
