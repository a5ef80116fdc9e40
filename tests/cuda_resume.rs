//! Checkpoints are device-agnostic: a run trained by the CUDA backend resumes on the CPU
//! backend and the other way round, and lands where a CPU-only run lands.
//!
//! The CUDA backend here is `CudaBackend<SimDevice>`: the GPU backend's Rust orchestration and
//! the very kernel sources of `cuda/kernels`, run on the CPU by the host simulator. On a real
//! GPU the same property is checked by `tools/gpu-check.sh` (a GPU-trained run scored on both
//! devices and resumed on the CPU).
//!
//! Tolerance: the backends differ in the last bits (summation order, FMA), and Adam's first
//! steps are about `lr * sign(g)`, so the parameters are compared by how far training moved
//! them: `||P_mixed - P_cpu|| <= 1e-4 * ||P_cpu - P_init||` over all tensors, and the
//! validation bits/dim within 1e-6 (relative). Measured (printed with --nocapture): about
//! 2e-7 and 3e-9; a wrong kernel or a lost optimiser state is off by percent.

use clayflow_cuda_sim::SimDevice;
use clayflow_testkit::l2_distance;
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::backend::cuda::CudaBackend;
use clayflow_trainer::backend::prelude::*;
use clayflow_trainer::backend::Backend;
use clayflow_trainer::checkpoint;
use clayflow_trainer::collective::Single;
use clayflow_trainer::config::ModelConfig;
use clayflow_trainer::data::{self, Crop, Dataset};
use clayflow_trainer::model::init_params;
use clayflow_trainer::train::{self, Outcome, Quiet, TrainConfig};
use std::path::Path;
use std::sync::Arc;

const MNIST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/data/mnist8k-train-images-idx3-ubyte.gz"
);

fn cpu() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::default())
}

fn sim() -> Arc<dyn Backend> {
    Arc::new(CudaBackend::new(SimDevice::new()))
}

/// 64 training and 16 validation digits.
fn digits() -> (Dataset, Dataset) {
    let ds = data::load_auto(Path::new(MNIST), 1, 28, 28, &Crop::Center).expect("bundled MNIST");
    let (mut tr, val) = ds.split_last(16).unwrap();
    tr.truncate(64);
    (tr, val)
}

/// The MNIST preset cut to 2 couplings with hidden widths 4 and 8, batch 8: the simulator
/// runs every thread of every block as an OS thread, so the model must be small.
fn config(steps: u64) -> TrainConfig {
    let mut m = ModelConfig::preset("mnist").unwrap();
    m.masks.truncate(2);
    m.hidden = [4, 8];
    let mut cfg = TrainConfig::new(m, "64 bundled MNIST digits".into());
    cfg.batch_size = 8;
    cfg.max_steps = Some(steps);
    cfg.minutes = None;
    cfg.warmup_steps = 2;
    cfg.lr = 3e-3;
    cfg.samples = 1;
    // Runs are extended on resume (3 steps, then 6); a cosine schedule would plan for the
    // first budget and differ from the uninterrupted run by design.
    cfg.cosine_decay = false;
    cfg
}

fn run(be: Arc<dyn Backend>, steps: u64, dir: &Path, resume: bool) -> Outcome {
    let (tr, val) = digits();
    train::train(
        be,
        &Single,
        &config(steps),
        &tr,
        &val,
        dir,
        resume,
        &mut Quiet,
    )
    .expect("training")
}

fn params(dir: &Path) -> Vec<f32> {
    let (ck, _) = checkpoint::load(dir).unwrap();
    ck.params.concat()
}

#[test]
fn a_run_moves_between_the_cuda_and_cpu_backends() {
    // A fresh folder under cargo's per-target scratch space (the suite has no tempfile).
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_resume");
    let _ = std::fs::remove_dir_all(&tmp);
    let (first, total) = (3, 6);
    // Reference: the CPU all the way.
    let ref_dir = tmp.join("cpu");
    let o_ref = run(cpu(), total, &ref_dir, false);
    // CUDA (simulated) first, then the CPU; and the reverse.
    let ab = tmp.join("cuda-then-cpu");
    let o_first = run(sim(), first, &ab, false);
    assert_eq!(o_first.steps, first);
    let o_ab = run(cpu(), total, &ab, true);
    let ba = tmp.join("cpu-then-cuda");
    run(cpu(), first, &ba, false);
    let o_ba = run(sim(), total, &ba, true);
    assert_eq!((o_ab.steps, o_ba.steps), (total, total));

    let p_ref = params(&ref_dir);
    let init = init_params(&config(total).model.to_arch().unwrap(), 0).concat();
    let moved = l2_distance(&p_ref, &init);
    assert!(moved > 1e-3, "training did not move the weights ({moved})");
    for (name, dir, o) in [("cuda->cpu", &ab, &o_ab), ("cpu->cuda", &ba, &o_ba)] {
        let (ck, _) = checkpoint::load(dir).unwrap();
        assert_eq!(ck.state.step, total, "{name}");
        let d = l2_distance(&params(dir), &p_ref) / moved;
        let bpd = (o.val_bpd - o_ref.val_bpd).abs() / o_ref.val_bpd;
        println!(
            "{name}: parameter distance {d:.2e} of the distance moved, validation {:.6} vs \
             CPU-only {:.6} (relative {bpd:.2e})",
            o.val_bpd, o_ref.val_bpd
        );
        assert!(
            d <= 1e-4,
            "{name}: parameters differ by {d:.3e} of the distance moved"
        );
        assert!(
            bpd <= 1e-6,
            "{name}: validation {} vs {}",
            o.val_bpd,
            o_ref.val_bpd
        );
        // The optimiser state travelled too: the Adam moments are there and finite.
        assert!(ck.adam_m.iter().flatten().any(|v| *v != 0.0), "{name}");
        assert!(
            ck.adam_v
                .iter()
                .flatten()
                .all(|v| v.is_finite() && *v >= 0.0),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The gradient norm of a training step: several buffers' sums of squares in one download
/// equal the per-buffer sums added in order (the CPU backend's loop), bit for bit, including
/// empty buffers and sizes of 1 to 18 blocks.
#[test]
fn sum_squares_all_equals_the_per_buffer_sums() {
    let be = CudaBackend::new(SimDevice::new());
    let mut rng = clayflow_kernel::Pcg32::with_stream(3, 4);
    let bufs: Vec<_> = [0usize, 1, 300, 4097, 70_000]
        .iter()
        .map(|&n| {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    use clayflow_kernel::Rng;
                    (rng.next_u32() >> 8) as f32 / 8_388_608.0 - 1.0
                })
                .collect();
            be.upload(&v).unwrap()
        })
        .collect();
    let mut want = 0.0;
    let mut cpu = 0.0;
    for b in &bufs {
        want += be.sum_squares(b).unwrap();
        cpu += CpuBackend::default()
            .sum_squares(
                &CpuBackend::default()
                    .upload(&be.download(b).unwrap())
                    .unwrap(),
            )
            .unwrap();
    }
    assert_eq!(be.sum_squares_all(&bufs).unwrap(), want);
    assert!(((want - cpu) / cpu).abs() < 1e-12, "{want} vs CPU {cpu}");
    assert_eq!(be.sum_squares_all(&[]).unwrap(), 0.0);
}
