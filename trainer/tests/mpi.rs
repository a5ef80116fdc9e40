//! Data-parallel training under MPI (`cargo test -p clayflow-trainer --features mpi --test
//! mpi`; needs Open MPI's `mpirun` on the PATH, as `.ci/run` installs it).
//!
//! - the collective seam's conformance checks, on two ranks;
//! - a rank whose data differs from rank 0's stops both before training;
//! - two ranks with batch 16 train the weights one process trains with batch 32 (to within
//!   the bound derived at [`two_ranks_train_what_one_process_trains`]), and the run resumes
//!   on one process;
//! - killing one rank ends the job within seconds, naming the rank, with the last
//!   checkpoint intact and resumable;
//! - an error on one rank ends the job with its message;
//! - two in-process ranks (`--ranks 2`) train bit for bit what two MPI ranks train.
//!
//! The tests that need MPI inside the test binary run it again under `mpirun`, with
//! [`CHILD_ENV`] naming the test the ranks run.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clayflow_testkit::l2_distance;
use clayflow_trainer::backend::cpu::CpuBackend;
use clayflow_trainer::checkpoint;
use clayflow_trainer::collective::{conformance, Collective, CollectiveError, Mpi};
use common::{mnist, run_command, Out, BIN};
use tempfile::TempDir;

/// Set (to the test's name) in the ranks `mpirun` starts from this test binary.
const CHILD_ENV: &str = "CLAYFLOW_MPI_TEST_CHILD";

/// How long any MPI job here may take before it counts as hung.
const LIMIT: Duration = Duration::from_secs(240);

/// `mpirun -np N` (Open MPI), allowed as root and on more ranks than cores.
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string());
    c
}

/// True in a rank started by [`in_two_ranks`] for `test`.
fn is_child(test: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|t| t == test)
}

/// Runs test `test` of this binary in two MPI ranks and asserts both passed.
fn in_two_ranks(test: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut cmd = mpirun(2);
    cmd.arg(exe)
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, test);
    let out = run_command(cmd, LIMIT);
    assert_eq!(
        out.code,
        Some(0),
        "the two ranks of {test} failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    // Both ranks ran the test (the harness prints one "1 passed" per process).
    assert_eq!(out.stdout.matches("1 passed").count(), 2, "{}", out.stdout);
}

#[test]
fn collective_conformance_on_two_ranks() {
    if is_child("collective_conformance_on_two_ranks") {
        let comm = Mpi::init().expect("MPI");
        assert_eq!(comm.size(), 2);
        conformance::check(&comm, &CpuBackend::default()).unwrap();
        return;
    }
    in_two_ranks("collective_conformance_on_two_ranks");
}

#[test]
fn a_rank_with_other_data_stops_every_rank_before_training() {
    use clayflow_trainer::config::ModelConfig;
    use clayflow_trainer::data::{self, Crop};
    use clayflow_trainer::train::{self, Quiet, TrainConfig};
    use std::sync::Arc;
    if is_child("a_rank_with_other_data_stops_every_rank_before_training") {
        let comm = Mpi::init().expect("MPI");
        let ds = data::load_auto(&mnist(), 1, 28, 28, &Crop::Center).expect("bundled digits");
        let (mut tr, val) = ds.split_last(50).unwrap();
        // Rank 1 has fewer training images than rank 0 (a stale copy, say).
        tr.truncate(if comm.rank() == 1 { 300 } else { 400 });
        let mut cfg = TrainConfig::new(ModelConfig::preset("mnist").unwrap(), "digits".into());
        cfg.minutes = None;
        cfg.max_steps = Some(1);
        cfg.batch_size = 8;
        let dir = TempDir::new().unwrap();
        let err = train::train(
            Arc::new(CpuBackend::default()),
            &comm,
            &cfg,
            &tr,
            &val,
            dir.path(),
            false,
            &mut Quiet,
        )
        .expect_err("different data must stop the run");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("rank 1 differs from rank 0") && msg.contains("300"),
            "{msg}"
        );
        match err.downcast_ref::<CollectiveError>() {
            Some(CollectiveError::Mismatch { rank: 1, .. }) => {}
            other => panic!("expected a mismatch naming rank 1, got {other:?}"),
        }
        // Nothing was written: the check comes before the run folder is touched.
        assert!(checkpoint::latest(dir.path()).unwrap().is_none());
        return;
    }
    in_two_ranks("a_rank_with_other_data_stops_every_rank_before_training");
}

/// The arguments of the short training jobs: the default model (mnist-glow), a small data
/// set, one thread per rank.
fn job(out: &Path, batch: usize, steps: u64) -> Vec<String> {
    let mut a: Vec<String> = [
        "--device",
        "cpu",
        "--threads",
        "1",
        "train",
        "--quiet",
        "--limit",
        "960",
        "--val-split",
        "100",
        "--samples",
        "4",
        "--seed",
        "3",
    ]
    .map(String::from)
    .to_vec();
    a.extend(["--out".into(), out.display().to_string()]);
    a.extend(["--batch-size".into(), batch.to_string()]);
    a.extend(["--steps".into(), steps.to_string()]);
    a
}

fn clayflow(args: &[String]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

fn on_ranks(np: usize, args: &[String]) -> Command {
    let mut c = mpirun(np);
    c.arg(BIN).args(args);
    c
}

fn ok(out: Out, what: &str) -> Out {
    assert_eq!(
        out.code,
        Some(0),
        "{what} failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out
}

/// The parameters of a run's latest checkpoint, flattened, and the checkpoint's step.
fn weights(run: &Path) -> (Vec<f32>, checkpoint::TrainState) {
    let (c, _) = checkpoint::load(run).unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    (c.params.concat(), c.state)
}

/// Two ranks with 16 images each against one process with 32: the same images, noise and
/// initialisation, so the runs differ only in the order f32 sums are taken in.
///
/// The bound. One step's gradient is a sum of per-pixel terms; taken in another order, an
/// f32 sum of n terms moves by at most gamma_n = n u / (1 - n u) times the sum of their
/// magnitudes (u = 2^-24), and by about sqrt(n) u of it for rounding errors of random sign.
/// With n = 32 images x 784 pixels that is 1.5e-3 and 1.7e-5 of the gradient. Adam's update
/// m / (sqrt(v) + eps) is invariant to the gradient's scale, so a relative gradient error
/// delta moves each update by about 2 delta of its size, and after K steps the weights by
/// about 2 delta of the distance they travelled, while the error's feedback through the
/// loss (K lr times its curvature, K = 12, lr <= 2e-3 in warm-up) stays small. Elements
/// whose gradient cancels to near zero have no relative accuracy, but are few, so the
/// bound is on the L2 distance: |w_2 - w_1| <= 2 gamma_n |w_1 - w_0| = 3e-3 of the distance
/// travelled. A rank that took the wrong images, skipped the averaging or lost a gradient
/// tensor misses it by orders of magnitude: the distance is then of the order of
/// |w_1 - w_0| itself.
#[test]
fn two_ranks_train_what_one_process_trains() {
    let dir = TempDir::new().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let steps = 12;
    ok(
        run_command(clayflow(&job(&one, 32, steps)), LIMIT),
        "one process",
    );
    let out = ok(
        run_command(on_ranks(2, &job(&two, 16, steps)), LIMIT),
        "two ranks",
    );
    assert!(
        out.stdout.contains("on 2 ranks (global batch 32)"),
        "{}",
        out.stdout
    );
    let (w1, s1) = weights(&one);
    let (w2, s2) = weights(&two);
    let (w0, s0) = weights(&one.join("checkpoints").join(checkpoint::step_dir_name(0)));
    assert_eq!((s1.step, s2.step, s0.step), (steps, steps, 0));
    assert_eq!((s1.world_size, s2.world_size), (1, 2));
    let travelled = l2_distance(&w1, &w0);
    let apart = l2_distance(&w2, &w1);
    let bound = 2.0 * 32.0 * 784.0 * f64::from(f32::EPSILON / 2.0) * travelled;
    eprintln!("weights travelled {travelled:.4e}; two ranks vs one process {apart:.4e}; bound {bound:.4e}");
    assert!(travelled > 0.1, "the runs barely trained: {travelled}");
    assert!(
        apart <= bound,
        "two ranks ended {apart:e} from one process (bound {bound:e})"
    );
    // Validation agrees to the summation order too.
    let (v1, v2) = (s1.last_val_bpd.unwrap(), s2.last_val_bpd.unwrap());
    assert!((v1 - v2).abs() < 1e-4, "validation {v1} vs {v2}");
    // Only rank 0 wrote: one metrics log, samples from one process.
    assert!(two.join("samples.png").is_file() && two.join("metrics.jsonl").is_file());

    // The two-rank checkpoint resumes as one rank in one process when asked (by default it
    // would resume as 2 in-process ranks, its own world size; `tests/in_process.rs`).
    let mut resume = job(&two, 32, steps + 4);
    let at = resume.iter().position(|a| a == "--out").unwrap();
    resume[at] = "--resume".into();
    resume.extend(["--ranks".to_string(), "1".to_string()]);
    let out = ok(run_command(clayflow(&resume), LIMIT), "resume on one rank");
    assert!(
        out.stderr.contains("trained on 2 rank(s)"),
        "the change of world size is not reported: {}",
        out.stderr
    );
    let (_, s3) = weights(&two);
    assert_eq!((s3.step, s3.world_size), (steps + 4, 1));
}

/// The pid of the rank `rank` of the job writing to `run` (found by its environment).
fn rank_pid(run: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let run = run.display().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let has = |hay: &[u8], s: &str| hay.split(|&b| b == 0).any(|w| w == s.as_bytes());
        if has(&cmdline, &run) && has(&environ, &want) && cmdline.starts_with(BIN.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn killing_a_rank_ends_the_job_and_keeps_the_last_checkpoint() {
    let dir = TempDir::new().unwrap();
    let run = dir.path().join("run");
    let mut args = job(&run, 16, 100_000);
    args.extend(["--checkpoint-steps".into(), "4".into()]);
    let mut child = on_ranks(2, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    let drain = |r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let mut r = r;
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    // Wait for a checkpoint after step 0, so there is training to lose.
    let start = Instant::now();
    let saved = loop {
        if let Some(s) = checkpoint::load(&run).ok().map(|(c, _)| c.state.step) {
            if s >= 8 {
                break s;
            }
        }
        if start.elapsed() > LIMIT || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("no checkpoint after step 8: {}", err.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let pid = rank_pid(&run, 1).expect("rank 1's process");
    let killed = Instant::now();
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -9 {pid}");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the job still runs 30 s after rank 1 was killed: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = killed.elapsed().as_secs_f64();
    let text = format!("{}{}", out.join().unwrap(), err.join().unwrap());
    eprintln!("the job ended {secs:.2} s after rank 1 was killed");
    assert!(!status.success(), "the job reported success:\n{text}");
    assert!(secs < 10.0, "the job took {secs:.1} s to end:\n{text}");
    assert!(
        text.contains("rank 1"),
        "the message names no rank:\n{text}"
    );
    // The last committed checkpoint is intact and the run resumes from it on one process.
    let (c, _) = checkpoint::load(&run).expect("an intact checkpoint");
    assert!(c.state.step >= saved);
    let mut resume = job(&run, 32, c.state.step + 3);
    let at = resume.iter().position(|a| a == "--out").unwrap();
    resume[at] = "--resume".into();
    ok(
        run_command(clayflow(&resume), LIMIT),
        "resume after the kill",
    );
    assert_eq!(weights(&run).1.step, c.state.step + 3);
}

/// An error on one rank (here rank 0 refusing a folder that already holds a run) ends the
/// whole job with a message naming the rank, instead of leaving rank 1 waiting for it.
#[test]
fn an_error_on_one_rank_ends_the_job_with_its_message() {
    let dir = TempDir::new().unwrap();
    let run = dir.path().join("run");
    ok(
        run_command(clayflow(&job(&run, 16, 1)), LIMIT),
        "the first run",
    );
    let start = Instant::now();
    let out = run_command(on_ranks(2, &job(&run, 16, 5)), LIMIT);
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_ne!(out.code, Some(0), "the job reported success:\n{text}");
    assert!(
        text.contains("Error on rank 0 of 2") && text.contains("already holds a run"),
        "{text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "the job took {:?} to end",
        start.elapsed()
    );
    // The first run's checkpoint is untouched.
    assert_eq!(weights(&run).1.step, 1);
}

/// In-process ranks sum in the same order as MPI ranks, and take the same images and noise:
/// `clayflow train --ranks 2 --batch-size 32` in one process ends with the very weights of
/// `mpirun -np 2 clayflow train --batch-size 16`.
#[test]
fn in_process_ranks_train_what_mpi_ranks_train_bit_for_bit() {
    let dir = TempDir::new().unwrap();
    let (mpi, threads) = (dir.path().join("mpi"), dir.path().join("threads"));
    let steps = 12;
    ok(
        run_command(on_ranks(2, &job(&mpi, 16, steps)), LIMIT),
        "two MPI ranks",
    );
    let mut args = job(&threads, 32, steps);
    let at = args.iter().position(|a| a == "--threads").unwrap();
    args[at + 1] = "2".into();
    args.extend(["--ranks".into(), "2".into()]);
    let out = ok(run_command(clayflow(&args), LIMIT), "two in-process ranks");
    assert!(out.stderr.contains("2 in-process ranks"), "{}", out.stderr);
    let ((wm, sm), (wt, st)) = (weights(&mpi), weights(&threads));
    assert_eq!((sm.step, st.step), (steps, steps));
    assert_eq!((sm.world_size, st.world_size), (2, 2));
    assert_eq!(wm.len(), wt.len());
    let differ = wm
        .iter()
        .zip(&wt)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differ, 0, "{differ} of {} weights differ", wm.len());
    assert_eq!(
        sm.last_val_bpd.map(f64::to_bits),
        st.last_val_bpd.map(f64::to_bits)
    );
}
