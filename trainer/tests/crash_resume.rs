//! Crash safety of `clayflow train`, tested with SIGKILL.
//!
//! One run is trained without interruption; a second run with the same seed and step budget
//! is killed (SIGKILL, via `Child::kill`) again and again and resumed with `--resume` each
//! time. The kills land at seeded random moments and, deterministically, inside each phase
//! of a checkpoint write (the `CLAYFLOW_TEST_CHECKPOINT_PAUSE` hook of
//! `clayflow_trainer::checkpoint` holds the writer there long enough to kill it), including
//! the very first checkpoint of a run. After every kill:
//!
//! - every committed `step-N/` folder on disk loads and holds step N, and the loader never
//!   picks an unfinished `.step-N.tmp/` folder;
//! - `LATEST` never goes back: a checkpoint committed before the kill is still there;
//! - the resumed process reports that it continues from the checkpoint `LATEST` names.
//!
//! At the end the weights and Adam moments equal, bit for bit, those of the uninterrupted
//! run, and so do the step count and the final validation score.
//!
//! The kill schedule's seed is printed; set `CLAYFLOW_CRASH_SEED` to replay or vary it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clayflow_trainer::checkpoint::{self, TEST_PAUSE_ENV};
use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_clayflow");

/// Steps of the run: 5 epochs of 16 batches.
const STEPS: u64 = 80;
/// Checkpoint interval in steps.
const EVERY: u64 = 2;
/// Default seed of the kill schedule.
const DEFAULT_SEED: u64 = 0x00c1_a7f1_0a5e_ed01;
/// Longest any wait for the trainer may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(60);
/// How long the test hook holds a checkpoint write (the test kills the writer long before).
const PAUSE_MS: u64 = 10_000;

/// The kill schedule's random numbers (the trainer's SplitMix64).
struct Rng(clayflow_trainer::rng::SplitMix64);

impl Rng {
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.0.next_u64() % (hi - lo + 1)
    }
}

/// The tiny configuration (2 couplings, hidden 4 and 8, 256 digits, batch 16), seed 11, a
/// step budget (so the cosine schedule is a function of the step alone) and a checkpoint
/// every `EVERY` steps (never by time).
fn fresh_args(out: &Path) -> Vec<String> {
    let out = out.to_str().expect("UTF-8 temp path");
    let steps = STEPS.to_string();
    let every = EVERY.to_string();
    [
        "--threads",
        "2",
        "train",
        "--preset",
        "mnist",
        "--out",
        out,
        "--couplings",
        "2",
        "--hidden",
        "4,8",
        "--limit",
        "256",
        "--val-split",
        "64",
        "--batch-size",
        "16",
        "--steps",
        &steps,
        "--checkpoint-steps",
        &every,
        "--checkpoint-secs",
        "1000000",
        "--samples",
        "1",
        "--seed",
        "11",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `--resume` with nothing else: the run's own settings from train.json.
fn resume_args(run: &Path) -> Vec<String> {
    let run = run.to_str().expect("UTF-8 temp path");
    ["--threads", "2", "train", "--resume", run, "--quiet"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A `clayflow` process whose stderr is collected as it runs.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
    start: Instant,
    what: String,
}

impl Running {
    fn start(args: &[String], pause: Option<&str>) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove(TEST_PAUSE_ENV);
        if let Some(p) = pause {
            cmd.env(TEST_PAUSE_ENV, p);
        }
        let mut child = cmd.spawn().expect("cannot start clayflow");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running {
            child,
            stderr,
            start: Instant::now(),
            what: format!("clayflow {} (pause {pause:?})", args.join(" ")),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Polls `cond` every millisecond until it holds; fails if the process exits first.
    fn wait_until(&mut self, what: &str, mut cond: impl FnMut(&str) -> bool) {
        loop {
            if cond(&self.stderr()) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The stderr thread may still be copying the last lines.
                std::thread::sleep(Duration::from_millis(50));
                if cond(&self.stderr()) {
                    return;
                }
                panic!(
                    "{}: exited ({status}) while waiting for {what}\nstderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            if self.start.elapsed() > LIMIT {
                let _ = self.child.kill();
                panic!(
                    "{}: no {what} within {LIMIT:?}\nstderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILLs the process, which must still be running.
    fn kill(mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "{}: finished before the planned kill\nstderr:\n{}",
            self.what,
            self.stderr()
        );
        // `Child::kill` sends SIGKILL on Unix: no handler, no cleanup, like a crash.
        self.child.kill().expect("kill");
        let status = self.child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "{status}"
        );
    }

    /// Waits for an exit with an error and returns stderr.
    fn failed(mut self) -> String {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(50));
                let err = self.stderr();
                assert!(
                    !status.success(),
                    "{}: should have failed\n{err}",
                    self.what
                );
                assert!(
                    err.contains("error"),
                    "{}: no error message\n{err}",
                    self.what
                );
                return err;
            }
            if self.start.elapsed() > LIMIT {
                let _ = self.child.kill();
                panic!("{}: did not finish within {LIMIT:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a normal exit and returns stderr.
    fn finish(mut self) -> String {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                std::thread::sleep(Duration::from_millis(50));
                let err = self.stderr();
                assert!(status.success(), "{}: {status}\nstderr:\n{err}", self.what);
                return err;
            }
            if self.start.elapsed() > LIMIT {
                let _ = self.child.kill();
                panic!("{}: did not finish within {LIMIT:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn ckdir(run: &Path) -> PathBuf {
    run.join(checkpoint::CHECKPOINTS_DIR)
}

/// The step `LATEST` names, if it exists (it is replaced atomically, so never torn).
fn latest_step(run: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(ckdir(run).join(checkpoint::LATEST_FILE)).ok()?;
    let step = text.trim().strip_prefix("step-")?.parse().ok()?;
    Some(step)
}

/// The names in the checkpoints folder, sorted.
fn entries(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(ckdir(run)) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Checks the run folder after a kill and returns the step a resume must continue from
/// (the one `LATEST` names), or `None` when no checkpoint was ever committed.
fn check_after_kill(run: &Path, committed_before: Option<u64>) -> Option<u64> {
    let names = entries(run);
    // Every committed checkpoint folder is complete and loads.
    for name in &names {
        let Some(digits) = name.strip_prefix("step-") else {
            continue;
        };
        let step: u64 = digits.parse().expect("step folder name");
        let dir = ckdir(run).join(name);
        for f in [
            checkpoint::MODEL_FILE,
            checkpoint::OPTIMIZER_FILE,
            checkpoint::STATE_FILE,
        ] {
            assert!(
                dir.join(f).is_file(),
                "{} lacks {f}: {names:?}",
                dir.display()
            );
        }
        let (c, _) = checkpoint::load(&dir)
            .unwrap_or_else(|e| panic!("{} does not load after a kill: {e}", dir.display()));
        assert_eq!(c.state.step, step, "{}", dir.display());
    }
    let latest = latest_step(run);
    // A checkpoint committed before the kill is never lost.
    if let Some(before) = committed_before {
        assert!(
            latest.is_some_and(|l| l >= before),
            "LATEST went from step {before} to {latest:?}: {names:?}"
        );
    }
    let Some(step) = latest else {
        assert!(
            !names.iter().any(|n| n.starts_with("step-")),
            "a step folder without LATEST: {names:?}"
        );
        assert!(checkpoint::load(run).is_err());
        return None;
    };
    // The loader takes what LATEST names (or its moved-aside copy), never an unfinished
    // `.tmp` folder.
    let loaded = checkpoint::load_with_notes(run)
        .unwrap_or_else(|e| panic!("the run does not load after a kill: {e}\n{names:?}"));
    let from = loaded
        .dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(!from.ends_with(".tmp"), "loaded an unfinished {from}");
    assert_eq!(
        loaded.checkpoint.state.step, step,
        "LATEST names step {step} but the loader took {from} ({:?}); {names:?}",
        loaded.notes
    );
    Some(step)
}

/// Whether `path` exists and was last modified at or after `since` (a leftover of an
/// earlier session is older).
fn written_since(path: &Path, since: std::time::SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= since)
}

/// Whether a re-save of `step` stands between moving the old `step-N/` aside and renaming
/// the new one in: `.step-N.old/` present, `step-N/` absent, and a complete `.step-N.tmp/`
/// written by this session.
fn in_aside_pause(run: &Path, step: u64, since: std::time::SystemTime) -> bool {
    let ck = ckdir(run);
    ck.join(format!(".step-{step:08}.old")).is_dir()
        && !ck.join(format!("step-{step:08}")).exists()
        && written_since(
            &ck.join(format!(".step-{step:08}.tmp"))
                .join(checkpoint::STATE_FILE),
            since,
        )
}

/// The step in the resumed process's `resuming from ... (step N)` line.
fn resumed_step(stderr: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.starts_with("resuming from"))?;
    let at = line.rfind("(step ")? + "(step ".len();
    line[at..].trim_end_matches(')').parse().ok()
}

/// Raw bytes of every tensor of a safetensors file, sorted by name.
fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!v.is_empty());
    v
}

fn state_json(dir: &Path) -> Value {
    let p = dir.join(checkpoint::STATE_FILE);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn latest_dir(run: &Path) -> PathBuf {
    let dir = ckdir(run).join(format!(
        "step-{:08}",
        latest_step(run).expect("LATEST after the run")
    ));
    assert!(dir.is_dir(), "{}", dir.display());
    dir
}

/// How a session is ended.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// At a random moment after LATEST reaches a random step.
    Random,
    /// While `model.safetensors` sits alone in `.step-N.tmp/` (a partial checkpoint).
    DuringWrite,
    /// After `.step-N.tmp/` was renamed to `step-N/`, before LATEST names it.
    BeforeLatest,
    /// Re-saving a step: after the old `step-N/` moved to `.step-N.old/`, before the new
    /// folder is renamed in.
    Aside,
}

#[test]
fn sigkill_at_random_moments_and_mid_checkpoint_then_resume_matches_an_uninterrupted_run() {
    let seed = std::env::var("CLAYFLOW_CRASH_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("crash_resume: kill schedule seed {seed} (set CLAYFLOW_CRASH_SEED to change)");
    let mut rng = Rng(clayflow_trainer::rng::SplitMix64::new(seed));
    let t0 = Instant::now();
    let tmp = TempDir::new().unwrap();
    let reference = tmp.path().join("reference");
    let run = tmp.path().join("killed");

    // The uninterrupted run.
    let start = Instant::now();
    Running::start(&fresh_args(&reference), None).finish();
    let ref_secs = start.elapsed().as_secs_f64();
    // Random kills wait up to about three steps past a checkpoint.
    let step_ms = (ref_secs * 1000.0 / STEPS as f64).max(1.0) as u64;

    // Kill 0: during the very first checkpoint (step 0). Nothing was committed, so
    // --resume has nothing to continue from and says so; the original command starts over.
    let mut p = Running::start(&fresh_args(&run), Some(&format!("model:{PAUSE_MS}")));
    let partial = ckdir(&run)
        .join(".step-00000000.tmp")
        .join("model.safetensors");
    p.wait_until("the step-0 checkpoint write", |_| partial.exists());
    p.kill();
    assert_eq!(check_after_kill(&run, None), None);
    let err = Running::start(&resume_args(&run), None).failed();
    assert!(err.contains("no checkpoint"), "{err}");
    assert!(err.contains("without --resume"), "{err}");
    let mut log = vec![format!(
        "kill 0 (during the step-0 checkpoint): --resume refused ({})",
        err.lines().last().unwrap_or("").trim()
    )];

    let plan = [
        Kill::Random,
        Kill::Random,
        Kill::DuringWrite,
        Kill::Random,
        Kill::BeforeLatest,
        Kill::Aside,
        Kill::Random,
        Kill::Random,
        Kill::DuringWrite,
        Kill::Random,
    ];
    let mut resume_from: Option<u64> = None;
    let mut random_in_write = 0;
    for (i, kill) in plan.iter().enumerate() {
        let k = i + 1;
        let pause = match kill {
            Kill::Random => None,
            Kill::DuringWrite => Some(format!("model:{PAUSE_MS}")),
            Kill::BeforeLatest => Some(format!("renamed:{PAUSE_MS}")),
            Kill::Aside => Some(format!("aside:{PAUSE_MS}")),
        };
        let args = match resume_from {
            None => fresh_args(&run),
            Some(_) => resume_args(&run),
        };
        let session_start = std::time::SystemTime::now();
        let mut p = Running::start(&args, pause.as_deref());
        let from = resume_from.unwrap_or(0);
        if let Some(step) = resume_from {
            p.wait_until("the resume line", |e| resumed_step(e).is_some());
            assert_eq!(
                resumed_step(&p.stderr()),
                Some(step),
                "kill {}: the resumed run does not continue from the last committed checkpoint\n{}",
                k - 1,
                p.stderr()
            );
        }
        // The first checkpoint this session writes.
        let next = from + EVERY;
        let ck = ckdir(&run);
        match kill {
            Kill::Random => {
                // Spread over what is left of the run: up to twice this kill's share of
                // the remaining steps, keeping clear of the end.
                let last = STEPS - 8 * EVERY;
                let share = last.saturating_sub(from) * 2 / (plan.len() - i + 1) as u64;
                let hi = (from + share.max(EVERY)).min(last);
                let target = rng.range((from + EVERY).min(hi), hi);
                p.wait_until("a checkpoint", |_| {
                    latest_step(&run).is_some_and(|s| s >= target)
                });
                std::thread::sleep(Duration::from_millis(rng.range(0, 3 * step_ms)));
            }
            Kill::DuringWrite => {
                // (A partial folder left by an earlier kill does not count.)
                let partial = ck
                    .join(format!(".step-{next:08}.tmp"))
                    .join(checkpoint::MODEL_FILE);
                p.wait_until("a partial checkpoint", |_| {
                    written_since(&partial, session_start)
                });
            }
            Kill::BeforeLatest => {
                // (A folder of that name left by an earlier kill does not count.)
                let dir = ck.join(format!("step-{next:08}"));
                p.wait_until("a renamed checkpoint", |_| {
                    written_since(&dir, session_start)
                });
            }
            Kill::Aside => {
                // The kill before left step-`next` renamed in but not named by LATEST, so
                // this session saves step `next` again.
                assert!(ck.join(format!("step-{next:08}")).is_dir());
                p.wait_until("a checkpoint moved aside", |_| {
                    in_aside_pause(&run, next, session_start)
                });
            }
        }
        let before = latest_step(&run);
        p.kill();
        let names = entries(&run);
        eprintln!("crash_resume: kill {k} ({kill:?}) in a session from step {from}: {names:?}");
        let step = check_after_kill(&run, before).expect("a committed checkpoint");
        let hidden: Vec<&String> = names.iter().filter(|n| n.starts_with(".step")).collect();
        match kill {
            Kill::Random => random_in_write += usize::from(!hidden.is_empty()),
            Kill::DuringWrite => {
                assert!(names.contains(&format!(".step-{next:08}.tmp")), "{names:?}");
                assert_eq!(step, from, "{names:?}");
            }
            Kill::BeforeLatest => {
                assert!(names.contains(&format!("step-{next:08}")), "{names:?}");
                assert_eq!(step, from, "LATEST moved: {names:?}");
            }
            Kill::Aside => {
                assert!(names.contains(&format!(".step-{next:08}.old")), "{names:?}");
                assert!(!names.contains(&format!("step-{next:08}")), "{names:?}");
                assert_eq!(step, from, "LATEST moved: {names:?}");
            }
        }
        log.push(format!(
            "kill {k} ({kill:?}): session from step {from}, killed with LATEST at step {step}; \
             leftovers {hidden:?}"
        ));

        resume_from = Some(step);
    }

    // The end of the run saves its last step twice (in the loop and after the final
    // validation): kill that re-save after the old copy moved aside, so LATEST names a
    // folder that is not there and the resume must use the `.old` copy.
    let session_start = std::time::SystemTime::now();
    let mut p = Running::start(&resume_args(&run), Some(&format!("aside:{PAUSE_MS}")));
    p.wait_until("the resume line", |e| resumed_step(e).is_some());
    assert_eq!(resumed_step(&p.stderr()), resume_from);
    p.wait_until("the final re-save", |_| {
        in_aside_pause(&run, STEPS, session_start)
    });
    p.kill();
    let names = entries(&run);
    assert!(!names.contains(&format!("step-{STEPS:08}")), "{names:?}");
    assert_eq!(check_after_kill(&run, Some(STEPS)), Some(STEPS));
    log.push(format!(
        "kill {} (Aside, final re-save): LATEST names a missing step-{STEPS:08}; leftovers {:?}",
        plan.len() + 1,
        names
            .iter()
            .filter(|n| n.starts_with(".step"))
            .collect::<Vec<_>>()
    ));

    // The last resume finishes the run.
    let p = Running::start(&resume_args(&run), None);
    let err = p.finish();
    assert_eq!(resumed_step(&err), Some(STEPS), "{err}");
    assert!(
        err.contains(&format!(".step-{STEPS:08}.old")),
        "the resume should name the moved-aside copy it used:\n{err}"
    );

    // Bit for bit the uninterrupted run.
    let (a, b) = (latest_dir(&reference), latest_dir(&run));
    assert_eq!(a.file_name(), b.file_name());
    assert_eq!(
        tensors(&a.join(checkpoint::MODEL_FILE)),
        tensors(&b.join(checkpoint::MODEL_FILE)),
        "the final weights differ from the uninterrupted run"
    );
    assert_eq!(
        tensors(&a.join(checkpoint::OPTIMIZER_FILE)),
        tensors(&b.join(checkpoint::OPTIMIZER_FILE)),
        "the final Adam moments differ from the uninterrupted run"
    );
    let (sa, sb) = (&state_json(&a)["state"], &state_json(&b)["state"]);
    for field in [
        "step",
        "epoch",
        "batch_in_epoch",
        "lr_scale",
        "nonfinite_skips",
        "restores",
        "last_val_bpd",
    ] {
        assert_eq!(sa[field], sb[field], "state.{field}");
    }
    assert_eq!(sb["step"], STEPS);
    assert_eq!(
        entries(&run),
        entries(&reference),
        "leftovers after the run"
    );
    // metrics.jsonl: the resumes cut the log back to their checkpoint, so steps never go
    // back; it ends with the finish at the last step (the session killed in the final
    // re-save logged one there too, which is kept like any record up to its checkpoint).
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let recs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let steps: Vec<u64> = recs.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    let last = recs.last().unwrap();
    assert_eq!(
        (last["step"].as_u64(), &last["event"]),
        (Some(STEPS), &Value::from("finished"))
    );
    assert!(
        recs.iter()
            .filter(|r| r["event"] == "finished")
            .all(|r| r["step"] == STEPS),
        "a killed session logged a finish: {text}"
    );

    for l in &log {
        eprintln!("crash_resume: {l}");
    }
    eprintln!(
        "crash_resume: {} SIGKILLs ({} random, {random_in_write} of them during a checkpoint \
         write; {} inside a checkpoint write by the hook), {} resumes; final weights and Adam \
         state bit-identical to the uninterrupted run ({ref_secs:.2} s); test took {:.1} s",
        plan.len() + 2,
        plan.iter().filter(|k| matches!(k, Kill::Random)).count(),
        plan.iter().filter(|k| !matches!(k, Kill::Random)).count() + 2,
        plan.len() + 1,
        t0.elapsed().as_secs_f64()
    );
}
