//! Data-parallel training with in-process ranks (`clayflow train --ranks N`, CPU backend):
//!
//! - two in-process ranks repeat bit for bit, and train the weights one rank trains with
//!   the same global batch to within the bound of `tests/mpi.rs`
//!   (`two_ranks_train_what_one_process_trains`);
//! - a run resumes with its own rank count by default, and on another one with a warning;
//! - an error on one rank ends the job with its message, naming the rank, without a hang;
//! - a batch that does not split among the ranks is refused before training; without
//!   `--ranks` a new run has one rank;
//! - `--flip` mirrors the same images on any rank count, and is saved with the run.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clayflow_testkit::l2_distance;
use clayflow_trainer::checkpoint;
use common::{run_command, Out, BIN};
use tempfile::TempDir;

/// How long any run here may take before it counts as hung.
const LIMIT: Duration = Duration::from_secs(240);

/// A short run of the default model (mnist-glow) on a small data set, two threads.
fn job(out: &Path, batch: usize, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--device",
        "cpu",
        "--threads",
        "2",
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
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The same job continuing `run` (`--resume` instead of `--out`).
fn resume_job(run: &Path, steps: u64, extra: &[&str]) -> Vec<String> {
    let mut a = job(run, 32, steps, extra);
    let at = a.iter().position(|x| x == "--out").unwrap();
    a[at] = "--resume".into();
    a
}

fn clayflow(args: &[String]) -> Out {
    let mut c = Command::new(BIN);
    c.args(args);
    run_command(c, LIMIT)
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

/// The parameters of a run's latest checkpoint, flattened, and its state.
fn weights(run: &Path) -> (Vec<f32>, checkpoint::TrainState) {
    let (c, _) = checkpoint::load(run).unwrap_or_else(|e| panic!("{}: {e}", run.display()));
    (c.params.concat(), c.state)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn two_in_process_ranks_repeat_and_train_what_one_rank_trains() {
    let dir = TempDir::new().unwrap();
    let (a, b, one) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("one"),
    );
    let steps = 12;
    let out = ok(
        clayflow(&job(&a, 32, steps, &["--ranks", "2"])),
        "two ranks",
    );
    assert!(
        out.stderr
            .contains("batch 16 x 2 ranks = 32 (2 in-process ranks), on cpu (1 thread) per rank"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.contains("on 2 ranks (global batch 32)"),
        "{}",
        out.stdout
    );
    ok(
        clayflow(&job(&b, 32, steps, &["--ranks", "2"])),
        "two ranks",
    );
    let out = ok(
        clayflow(&job(&one, 32, steps, &["--ranks", "1"])),
        "one rank",
    );
    assert!(out.stderr.contains("batch 32, on cpu"), "{}", out.stderr);

    let (wa, sa) = weights(&a);
    let (wb, sb) = weights(&b);
    let (w1, s1) = weights(&one);
    let (w0, _) = weights(&one.join("checkpoints").join(checkpoint::step_dir_name(0)));
    assert_eq!((sa.step, sb.step, s1.step), (steps, steps, steps));
    assert_eq!((sa.world_size, sb.world_size, s1.world_size), (2, 2, 1));
    assert!(same_bits(&wa, &wb), "two runs on two ranks differ");
    assert_eq!(
        sa.last_val_bpd.map(f64::to_bits),
        sb.last_val_bpd.map(f64::to_bits)
    );
    // The bound of tests/mpi.rs: 2 gamma_n times the distance travelled, n = 32 x 784.
    let travelled = l2_distance(&w1, &w0);
    let apart = l2_distance(&wa, &w1);
    let bound = 2.0 * 32.0 * 784.0 * f64::from(f32::EPSILON / 2.0) * travelled;
    eprintln!("travelled {travelled:.4e}; two ranks vs one {apart:.4e}; bound {bound:.4e}");
    assert!(travelled > 0.1, "the runs barely trained: {travelled}");
    assert!(
        apart <= bound,
        "two ranks ended {apart:e} from one (bound {bound:e})"
    );
    let (v1, v2) = (s1.last_val_bpd.unwrap(), sa.last_val_bpd.unwrap());
    assert!((v1 - v2).abs() < 1e-4, "validation {v1} vs {v2}");
    // Only rank 0 wrote: its samples and metrics, and train.json with the per-rank batch.
    assert!(a.join("samples.png").is_file() && a.join("metrics.jsonl").is_file());
    let cfg = clayflow_trainer::train::read_config(&a).unwrap();
    assert_eq!(cfg.batch_size, 16);

    // Resumed without --ranks: its own two ranks, no warning; bit for bit the same as the
    // other two-rank run resumed the same way.
    let out = ok(
        clayflow(&resume_job(&a, steps + 3, &[])),
        "resume on its ranks",
    );
    assert!(!out.stderr.contains("rank(s)"), "{}", out.stderr);
    ok(
        clayflow(&resume_job(&b, steps + 3, &[])),
        "resume the other",
    );
    let ((wa, sa), (wb, _)) = (weights(&a), weights(&b));
    assert_eq!((sa.step, sa.world_size), (steps + 3, 2));
    assert!(same_bits(&wa, &wb), "the resumed two-rank runs differ");

    // Resumed on one rank: it goes on, with the change reported.
    let out = ok(
        clayflow(&resume_job(&a, steps + 5, &["--ranks", "1"])),
        "resume on one rank",
    );
    assert!(
        out.stderr.contains("trained on 2 rank(s)"),
        "{}",
        out.stderr
    );
    let (_, s) = weights(&a);
    assert_eq!((s.step, s.world_size), (steps + 5, 1));
}

/// `--flip` mirrors the images at the same positions of each global batch whatever the rank
/// count (two ranks train what one trains, to the bound above), it changes what is
/// trained, it is saved with the run, and giving it again on `--resume` is reported.
#[test]
fn mirroring_follows_the_global_batch_and_is_saved_with_the_run() {
    let dir = TempDir::new().unwrap();
    let (one, two, plain) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("plain"),
    );
    let steps = 12;
    let out = ok(
        clayflow(&job(&one, 32, steps, &["--flip", "--ranks", "1"])),
        "one rank",
    );
    assert!(
        out.stderr
            .contains("validation images (mirrored at random)"),
        "{}",
        out.stderr
    );
    ok(
        clayflow(&job(&two, 32, steps, &["--flip", "--ranks", "2"])),
        "two ranks",
    );
    ok(
        clayflow(&job(&plain, 32, steps, &["--ranks", "1"])),
        "no mirroring",
    );
    assert!(clayflow_trainer::train::read_config(&one).unwrap().flip);
    assert!(!clayflow_trainer::train::read_config(&plain).unwrap().flip);

    let ((w1, _), (w2, _), (wp, _)) = (weights(&one), weights(&two), weights(&plain));
    let (w0, _) = weights(&one.join("checkpoints").join(checkpoint::step_dir_name(0)));
    let travelled = l2_distance(&w1, &w0);
    let bound = 2.0 * 32.0 * 784.0 * f64::from(f32::EPSILON / 2.0) * travelled;
    let (apart, changed) = (l2_distance(&w2, &w1), l2_distance(&wp, &w1));
    eprintln!("travelled {travelled:.4e}; two ranks {apart:.4e}; no flips {changed:.4e}");
    assert!(
        apart <= bound,
        "two ranks ended {apart:e} away (bound {bound:e})"
    );
    assert!(
        changed > 100.0 * bound,
        "mirroring changed the weights by only {changed:e}"
    );

    let out = ok(
        clayflow(&resume_job(&plain, steps + 1, &["--flip"])),
        "resume with --flip",
    );
    assert!(
        out.stderr.contains(
            "--flip is ignored on --resume: the run keeps its saved setting, no mirroring"
        ),
        "{}",
        out.stderr
    );
    assert!(!clayflow_trainer::train::read_config(&plain).unwrap().flip);
}

/// Rank 0 refuses a folder that already holds a run while rank 1 waits for it in a
/// collective: the job ends with rank 0's message, not a hang.
#[test]
fn an_error_on_one_in_process_rank_ends_the_job_with_its_message() {
    let dir = TempDir::new().unwrap();
    let run = dir.path().join("run");
    ok(
        clayflow(&job(&run, 32, 1, &["--ranks", "1"])),
        "the first run",
    );
    let start = Instant::now();
    let out = clayflow(&job(&run, 32, 5, &["--ranks", "2"]));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(1), "{text}");
    assert!(
        out.stderr.contains("error: Error on rank 0 of 2")
            && out.stderr.contains("already holds a run"),
        "{text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        weights(&run).1.step,
        1,
        "the first run's checkpoint changed"
    );
}

#[test]
fn a_batch_that_does_not_split_among_the_ranks_is_refused() {
    let dir = TempDir::new().unwrap();
    let run = dir.path().join("run");
    let out = clayflow(&job(&run, 32, 1, &["--ranks", "3"]));
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("--batch-size 32 does not split evenly among 3 ranks"),
        "{}",
        out.stderr
    );
    assert!(!run.join("train.json").exists());
    // An odd batch on one rank is fine.
    let out = ok(clayflow(&job(&run, 33, 1, &["--ranks", "1"])), "odd batch");
    assert!(out.stderr.contains("batch 33, on cpu"), "{}", out.stderr);
}
