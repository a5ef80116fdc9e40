//! What data-parallel training costs on this machine: for every preset, the time of a
//! training step (forward, backward, all-reduce of the gradients, Adam) and the all-reduce's
//! share of it, at one global batch. Run it once as one process and once under MPI to
//! compare, say, 2 ranks x 1 thread against 1 rank x 2 threads (`tools/data-parallel-bench.sh`
//! runs both and prints one table):
//!
//! ```text
//! cargo build --release -p clayflow-trainer --features mpi --example data_parallel
//! target/release/examples/data_parallel GLOBAL_BATCH STEPS THREADS
//! mpirun -np 2 target/release/examples/data_parallel GLOBAL_BATCH STEPS THREADS
//! target/release/examples/data_parallel GLOBAL_BATCH STEPS THREADS RANKS [PRESET,...]
//! ```
//!
//! The last form runs RANKS in-process ranks (`collective::threads`, no MPI needed: `clayflow
//! train --ranks`), THREADS threads each; `tools/in-process-bench.sh` compares it with one
//! rank.
//!
//! Rank 0 prints one tab-separated row per preset: ranks, threads per rank, global batch,
//! median step ms, median all-reduce ms (after a barrier, so that waiting for the slower
//! rank does not count as the all-reduce's cost; it counts in the step), the all-reduce's share, the bytes each rank
//! all-reduces per step (every gradient, f32) and global images/s. CPU backend.

use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::{AdamStep, Backend};
use clayflow_trainer::collective::{self, Collective};
use clayflow_trainer::config::ModelConfig;
use clayflow_trainer::model::{init_params, Flow};
use std::sync::Arc;
use std::time::Instant;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let global: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(6);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let in_process: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let presets: Vec<String> = args.get(5).map_or_else(
        || {
            ["mnist", "color", "mnist-glow", "color-glow"]
                .map(String::from)
                .to_vec()
        },
        |p| p.split(',').map(String::from).collect(),
    );
    // As `clayflow --threads`: rayon across the batch, matrixmultiply single-threaded.
    std::env::set_var("MATMUL_NUM_THREADS", "1");
    if in_process > 1 {
        collective::threads::run(in_process, threads, |comm| {
            bench(comm, global, steps, threads, &presets)
        })?;
        return Ok(());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global()?;
    bench(
        collective::open()?.as_ref(),
        global,
        steps,
        threads,
        &presets,
    )
}

/// Every preset's step on `comm`, rank 0 printing.
fn bench(
    comm: &dyn Collective,
    global: usize,
    steps: usize,
    threads: usize,
    presets: &[String],
) -> anyhow::Result<()> {
    let (rank, n) = (comm.rank(), comm.size());
    if !global.is_multiple_of(n) {
        anyhow::bail!("the global batch {global} does not split over {n} ranks");
    }
    let batch = global / n;
    let backend: Arc<dyn Backend> = Arc::new(CpuBackend::default());
    if rank == 0 {
        println!("preset\tranks\tthreads\tglobal_batch\tstep_ms\tallreduce_ms\tallreduce_share\tallreduce_bytes\timages_per_s");
    }
    for preset in presets {
        let arch = ModelConfig::preset(preset)?.to_arch()?;
        let mut flow = Flow::new(backend.clone(), arch, &init_params(&arch, 1))?;
        let mut grads = flow.zeros_like_params()?;
        let mut m = flow.zeros_like_params()?;
        let mut v = flow.zeros_like_params()?;
        let trainable = flow.trainable();
        let u: Vec<f32> = (0..batch * arch.dim())
            .map(|i| (((i + rank * 131) * 7919) % 256) as f32 / 256.0 + 0.001)
            .collect();
        let bytes: usize = grads.iter().map(|g| g.len() * 4).sum();
        let (mut step_t, mut reduce_t) = (Vec::new(), Vec::new());
        for step in 0..steps + 1 {
            comm.barrier()?;
            let t0 = Instant::now();
            flow.forward(&u, batch)?;
            flow.backward(&mut grads)?;
            // Waiting for the slower rank is load imbalance, not the all-reduce's cost.
            comm.barrier()?;
            let t1 = Instant::now();
            comm.all_reduce_sum(backend.as_ref(), &mut grads)?;
            let t2 = Instant::now();
            let hp = AdamStep {
                lr: 1e-5,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step: step as u64 + 1,
                grad_scale: 1.0 / n as f32,
            };
            backend.adam_all(&hp, &mut flow.params, &grads, &mut m, &mut v, &trainable)?;
            let t3 = Instant::now();
            // The first step warms caches and allocations.
            if step > 0 {
                step_t.push((t3 - t0).as_secs_f64());
                reduce_t.push((t2 - t1).as_secs_f64());
            }
        }
        // Rank 0's view; the slowest rank decides the step, so take the larger median.
        let mut t = [median(&mut step_t), median(&mut reduce_t)];
        let mut all = vec![0.0; 2 * n];
        all[2 * rank..2 * rank + 2].copy_from_slice(&t);
        comm.all_reduce_sum_f64(&mut all)?;
        for r in 0..n {
            t[0] = t[0].max(all[2 * r]);
            t[1] = t[1].max(all[2 * r + 1]);
        }
        if rank == 0 {
            println!(
                "{preset}\t{n}\t{threads}\t{global}\t{:.1}\t{:.2}\t{:.1}%\t{bytes}\t{:.0}",
                t[0] * 1e3,
                t[1] * 1e3,
                100.0 * t[1] / t[0],
                global as f64 / t[0]
            );
        }
    }
    Ok(())
}
