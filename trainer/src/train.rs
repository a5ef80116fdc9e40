//! The training loop: Adam with warm-up and gradient-norm clipping on the mean bits/dim,
//! periodic validation and checkpoints, recovery from non-finite steps, and resume.
//!
//! Everything random is a pure function of `(seed, step)` or `(seed, epoch)`: the epoch's
//! shuffle, each step's dequantization noise, the validation noise. A run resumed from a
//! checkpoint therefore takes exactly the steps the uninterrupted run would have taken.
//!
//! Data-parallel training: every rank runs this loop in lockstep through a [`Collective`].
//! The global batch is `batch_size` images on each rank; rank `r` takes images
//! `r * batch_size..(r + 1) * batch_size` of each global batch of the epoch's permutation,
//! with the noise the single-process run would give them, so a run on N ranks takes the
//! steps of one process with a batch N times larger (up to the summation order). Gradients
//! are summed in rank order and scaled by `1 / N` in the update; the loss, the clock and
//! every decision come from collectives, so the ranks never disagree. Rank 0 alone writes
//! metrics, checkpoints and samples; a checkpoint does not depend on the world size.

use crate::backend::{AdamStep, Backend, Buffer};
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::collective::{self, Collective};
use crate::config::ModelConfig;
use crate::data::{epoch_order, Dataset};
use crate::eval::{evaluate_sum, uniform01};
use crate::fsutil;
use crate::model::{init_params, Flow};
use crate::report::{self, MetricRecord, MetricsLog};
use crate::sample::{self, sample_images};
use anyhow::{bail, Context, Result};
use clayflow_kernel::{preprocess::dequantize, Arch, Pcg32};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Restores of the last checkpoint in a row (no new checkpoint in between) before training
/// gives up: each halves the learning rate, so the last ran at 1/32 of the original.
pub const MAX_RESTORES_IN_A_ROW: u32 = 5;

/// Validations in a row, each higher than the one before, after which the run says that
/// validation is rising (a progress note and a metrics event; once until the next best).
pub const RISES_WORTH_A_NOTE: u64 = 3;

/// How to train: model, data handling, optimiser, budget and outputs. Saved as
/// `RUN/train.json` so `--resume` continues with the same settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The architecture.
    pub model: ModelConfig,
    /// Human-readable description of the data.
    pub dataset: String,
    /// Images per step on each rank (the global batch is this times the number of ranks).
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Gradient-norm clipping threshold.
    pub clip_norm: f32,
    /// Adam beta1.
    pub beta1: f32,
    /// Adam beta2.
    pub beta2: f32,
    /// Adam epsilon.
    pub eps: f32,
    /// Stop after this many epochs (if set).
    pub epochs: Option<u64>,
    /// Stop after this many minutes of training (if set).
    pub minutes: Option<f64>,
    /// Stop after this many steps (if set).
    pub max_steps: Option<u64>,
    /// Seed for initialisation, shuffling and noise.
    pub seed: u64,
    /// Save a checkpoint at least this often (seconds), and at every epoch end.
    pub checkpoint_secs: f64,
    /// Also save every this many steps (if set).
    pub checkpoint_steps: Option<u64>,
    /// Checkpoints kept on disk.
    pub keep: usize,
    /// Validate every this many steps (if set), besides every epoch end.
    pub eval_steps: Option<u64>,
    /// Samples in the final grid.
    pub samples: usize,
    /// Sampling temperature for the final grid.
    pub temperature: f32,
    /// Consecutive non-finite steps tolerated before restoring the last checkpoint.
    pub max_bad_steps: u32,
    /// Decay the learning rate after warm-up along a cosine to 5% of its peak at the end of
    /// the run (the end is the step limit, or the time budget: then the schedule follows
    /// wall-clock time and a resumed run is no longer bit-identical to an uninterrupted one).
    #[serde(default)]
    pub cosine_decay: bool,
    /// Testing hook: poison the batch with a NaN at these steps (exercises recovery).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inject_nan_at: Vec<u64>,
    /// The data the run trains on (`None`: the bundled data for the model's shape). Saved
    /// so that `--resume` continues on the same images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Only the first this many training images are used (if set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Images held out (the last ones) for validation.
    #[serde(default = "default_val_split")]
    pub val_split: usize,
    /// Random crops per picture when the data is an image folder (0: one centre crop each).
    #[serde(default = "default_crops_per_image")]
    pub crops_per_image: usize,
    /// Stop once this many validations in a row have not improved on the best (if set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stop: Option<u64>,
}

fn default_val_split() -> usize {
    1000
}

fn default_crops_per_image() -> usize {
    500
}

impl TrainConfig {
    /// Defaults for a model: batch 64, lr 1e-3 with 100 warm-up steps, clip 100, 10 minutes.
    pub fn new(model: ModelConfig, dataset: String) -> TrainConfig {
        TrainConfig {
            model,
            dataset,
            batch_size: 64,
            lr: 1e-3,
            warmup_steps: 100,
            clip_norm: 100.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            epochs: None,
            minutes: Some(10.0),
            max_steps: None,
            seed: 0,
            checkpoint_secs: 60.0,
            checkpoint_steps: None,
            keep: 3,
            eval_steps: None,
            samples: 64,
            temperature: 0.8,
            max_bad_steps: 3,
            inject_nan_at: Vec::new(),
            cosine_decay: true,
            data: None,
            limit: None,
            val_split: default_val_split(),
            crops_per_image: default_crops_per_image(),
            early_stop: None,
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Steps taken in total (including before a resume).
    pub steps: u64,
    /// Final validation bits/dim.
    pub val_bpd: f64,
    /// Validation images scored.
    pub val_images: usize,
    /// Mean training throughput of this session, images/s over all ranks.
    pub images_per_sec: f64,
    /// Ranks that trained (1 for a single process).
    pub world_size: usize,
    /// Images per step over all ranks.
    pub global_batch: usize,
    /// Training seconds in total.
    pub elapsed_secs: f64,
    /// Where the sample grid was written.
    pub samples_png: PathBuf,
    /// Steps skipped as non-finite in total.
    pub nonfinite_skips: u64,
    /// The checkpoint `BEST` names (`None` when it is missing or does not load).
    pub best: Option<BestCheckpoint>,
    /// Why the run stopped before its budget ([`TrainConfig::early_stop`]), if it did.
    pub early_stop: Option<String>,
    /// Samples of the final grid that came out non-finite.
    pub nonfinite_samples: usize,
}

/// The run's best-validation checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct BestCheckpoint {
    /// Its folder.
    pub dir: PathBuf,
    /// Its step.
    pub step: u64,
    /// Its validation bits/dim.
    pub val_bpd: f64,
}

/// Dequantizes images `indices` of `ds` with uniform noise from `rng` into `u`.
pub fn dequantize_batch(
    ds: &Dataset,
    indices: &[usize],
    bits: u32,
    rng: &mut Pcg32,
    u: &mut Vec<f32>,
) -> Result<()> {
    let d = ds.image_len();
    u.resize(indices.len() * d, 0.0);
    for (k, &i) in indices.iter().enumerate() {
        let img = ds.get(i).context("image index out of range")?;
        dequantize(img, bits, |_| uniform01(rng), &mut u[k * d..(k + 1) * d])
            .map_err(|e| anyhow::anyhow!("image {i}: {e}"))?;
    }
    Ok(())
}

/// The optimiser: Adam moments on the backend.
struct Adam {
    m: Vec<Buffer>,
    v: Vec<Buffer>,
}

fn to_host(backend: &dyn Backend, bufs: &[Buffer]) -> Result<Vec<Vec<f32>>> {
    bufs.iter().map(|b| Ok(backend.download(b)?)).collect()
}

fn upload_all(backend: &dyn Backend, host: &[Vec<f32>]) -> Result<Vec<Buffer>> {
    host.iter().map(|h| Ok(backend.upload(h)?)).collect()
}

/// Progress reporting hooks, so the CLI can show a progress bar and tests stay quiet.
pub trait Progress {
    /// Called after every step with the state and the running train bits/dim.
    fn step(
        &mut self,
        state: &TrainState,
        running_bpd: f64,
        images_per_sec: f64,
        fraction_done: f64,
    );
    /// A line worth telling the user (validation results, checkpoints, recoveries).
    fn note(&mut self, line: &str);
}

/// A [`Progress`] that prints nothing.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn step(&mut self, _: &TrainState, _: f64, _: f64, _: f64) {}
    fn note(&mut self, _: &str) {}
}

fn state_of(cfg: &TrainConfig, world_size: usize) -> TrainState {
    TrainState {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: cfg.seed,
        lr: cfg.lr,
        lr_scale: 1.0,
        warmup_steps: cfg.warmup_steps,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        clip_norm: cfg.clip_norm,
        batch_size: cfg.batch_size,
        world_size,
        elapsed_secs: 0.0,
        best_val_bpd: None,
        last_val_bpd: None,
        dataset: cfg.dataset.clone(),
        nonfinite_skips: 0,
        restores: 0,
        val_since_best: 0,
        val_rises: 0,
    }
}

/// How far through the run we are, 0..1: the larger of the step and the time fractions.
fn run_fraction(
    step: u64,
    elapsed: f64,
    total_steps: Option<u64>,
    budget_secs: Option<f64>,
) -> f64 {
    let by_steps = total_steps.map(|t| step as f64 / t.max(1) as f64);
    let by_time = budget_secs.map(|b| elapsed / b.max(1e-9));
    match (by_steps, by_time) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => 0.0,
    }
}

/// Path of the run's metrics log (`metrics.jsonl`) in a run folder.
fn metrics_path(run_dir: &Path) -> PathBuf {
    run_dir.join("metrics.jsonl")
}

/// Path of the saved training configuration in a run folder.
pub fn config_path(run_dir: &Path) -> PathBuf {
    run_dir.join("train.json")
}

/// Reads a run's saved training configuration.
pub fn read_config(run_dir: &Path) -> Result<TrainConfig> {
    let p = config_path(run_dir);
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid training configuration", p.display()))
}

/// Trains (or, with `resume`, continues) the run in `run_dir` on `train`, validating on
/// `val`, as one rank of `comm` (every rank calls this with the same configuration and
/// data). The phases: check the inputs, set up (a new run, or resume one), the steps, and
/// the finish (final validation, checkpoint, samples and plot).
#[allow(clippy::too_many_arguments)]
pub fn train(
    backend: Arc<dyn Backend>,
    comm: &dyn Collective,
    cfg: &TrainConfig,
    train_set: &Dataset,
    val_set: &Dataset,
    run_dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<Outcome> {
    let arch = check_inputs(cfg, comm.size(), train_set, val_set)?;
    let (c, h, w) = train_set.shape();
    collective::check_same(
        comm,
        "the data (channels, height, width, training images, validation images)",
        &[c, h, w, train_set.len(), val_set.len()].map(|v| v as u64),
    )?;
    if comm.rank() == 0 {
        // Fail now, not after an hour, if the run folder cannot be written.
        fsutil::check_writable_dir(run_dir)?;
    }
    let mut run = if resume {
        Run::resume(backend, comm, cfg, arch, run_dir, progress)?
    } else {
        Run::start(backend, comm, cfg, arch, run_dir, train_set, progress)?
    };
    let clock = Clock::new(cfg, comm.size(), train_set, &run.state);
    run.steps(&clock, train_set, val_set, progress)?;
    run.finish(&clock, val_set, progress)
}

/// The architecture, once the configuration and both data sets are known to fit it.
fn check_inputs(
    cfg: &TrainConfig,
    world_size: usize,
    train_set: &Dataset,
    val_set: &Dataset,
) -> Result<Arch> {
    let arch = cfg.model.to_arch()?;
    if cfg.batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    let global = cfg.batch_size * world_size;
    if train_set.len() < global {
        let ranks = if world_size > 1 {
            format!(" ({} on each of {world_size} ranks)", cfg.batch_size)
        } else {
            String::new()
        };
        bail!(
            "the training set has {} images, fewer than one batch of {global}{ranks}; lower \
             --batch-size",
            train_set.len(),
        );
    }
    if val_set.is_empty() {
        bail!("the validation set is empty");
    }
    for (name, ds) in [("training", train_set), ("validation", val_set)] {
        if ds.shape() != (arch.channels, arch.height, arch.width) {
            bail!(
                "the {name} images are {:?} (C, H, W) but the model expects {:?}",
                ds.shape(),
                (arch.channels, arch.height, arch.width)
            );
        }
    }
    if cfg.epochs.is_none() && cfg.minutes.is_none() && cfg.max_steps.is_none() {
        bail!("no stopping rule: give epochs, minutes or max steps");
    }
    if cfg.early_stop == Some(0) {
        bail!("early stopping needs at least 1 validation without improvement (got 0)");
    }
    Ok(arch)
}

/// The run's budget and clock: when it stops, how far through it is.
struct Clock {
    steps_per_epoch: u64,
    total_steps: Option<u64>,
    budget_secs: Option<f64>,
    session_start: Instant,
    elapsed_before: f64,
    start_step: u64,
    /// Set by early stopping: the run is done at the next check.
    stop: Cell<Option<String>>,
}

impl Clock {
    fn new(cfg: &TrainConfig, world_size: usize, train_set: &Dataset, state: &TrainState) -> Clock {
        let steps_per_epoch = (train_set.len() / (cfg.batch_size * world_size)) as u64;
        Clock {
            steps_per_epoch,
            total_steps: [cfg.epochs.map(|e| e * steps_per_epoch), cfg.max_steps]
                .into_iter()
                .flatten()
                .min(),
            budget_secs: cfg.minutes.map(|m| m * 60.0),
            session_start: Instant::now(),
            elapsed_before: state.elapsed_secs,
            start_step: state.step,
            stop: Cell::new(None),
        }
    }

    /// Training seconds of the whole run so far, earlier sessions included.
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.session_start.elapsed().as_secs_f64()
    }

    fn done(&self, step: u64, elapsed: f64) -> bool {
        self.stopped().is_some()
            || self.total_steps.is_some_and(|t| step >= t)
            || self.budget_secs.is_some_and(|b| elapsed >= b)
    }

    /// Why the run was stopped early, if it was.
    fn stopped(&self) -> Option<String> {
        let why = self.stop.take();
        self.stop.set(why.clone());
        why
    }

    fn fraction(&self, step: u64, elapsed: f64) -> f64 {
        run_fraction(step, elapsed, self.total_steps, self.budget_secs)
    }
}

/// Adam's first and second moments on the host, as a checkpoint holds them.
type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// A training run in progress: the model and optimiser on the device, the state that goes
/// into checkpoints, and the metrics log (rank 0's).
struct Run<'a> {
    backend: Arc<dyn Backend>,
    comm: &'a dyn Collective,
    cfg: &'a TrainConfig,
    arch: Arch,
    run_dir: &'a Path,
    metrics_path: PathBuf,
    /// Rank 0 writes the metrics; the other ranks have none.
    metrics: Option<MetricsLog>,
    flow: Flow,
    adam: Adam,
    grads: Vec<Buffer>,
    /// The 1x1 convolutions' permutations and signs are fixed: the optimiser skips them.
    trainable: Vec<bool>,
    state: TrainState,
    /// The state (with `elapsed_secs` zeroed) and folder of the checkpoint this session
    /// saved last: saving the same state again is skipped.
    saved: Option<(TrainState, PathBuf)>,
    /// The step of this session's last validation (a second one at the same step, as at
    /// the finish right after an epoch end, does not count towards the streaks).
    validated_at: Option<u64>,
    /// Whether this session said that validation is rising since the last new best (said
    /// once per such stretch, not at every noisy rise).
    rise_told: bool,
}

/// Rank 0's value of `v` on every rank (a clock, so the ranks take the same decisions).
fn rank0_value(comm: &dyn Collective, v: f64) -> Result<f64> {
    if comm.size() == 1 {
        return Ok(v);
    }
    let mut x = [if comm.rank() == 0 { v } else { 0.0 }];
    comm.all_reduce_sum_f64(&mut x)?;
    Ok(x[0])
}

impl<'a> Run<'a> {
    /// Everything but the parameters, the optimiser moments and the state.
    #[allow(clippy::too_many_arguments)]
    fn with(
        backend: Arc<dyn Backend>,
        comm: &'a dyn Collective,
        cfg: &'a TrainConfig,
        arch: Arch,
        run_dir: &'a Path,
        params: &[Vec<f32>],
        adam_host: Option<Moments>,
        state: TrainState,
    ) -> Result<Run<'a>> {
        let metrics_path = metrics_path(run_dir);
        let metrics = if comm.rank() == 0 {
            Some(MetricsLog::open(&metrics_path)?)
        } else {
            None
        };
        let flow = Flow::new(backend.clone(), arch, params)?;
        let adam = match adam_host {
            Some((m, v)) => Adam {
                m: upload_all(backend.as_ref(), &m)?,
                v: upload_all(backend.as_ref(), &v)?,
            },
            None => Adam {
                m: flow.zeros_like_params()?,
                v: flow.zeros_like_params()?,
            },
        };
        let grads = flow.zeros_like_params()?;
        let trainable = flow.trainable();
        Ok(Run {
            backend,
            comm,
            cfg,
            arch,
            run_dir,
            metrics_path,
            metrics,
            flow,
            adam,
            grads,
            trainable,
            state,
            saved: None,
            validated_at: None,
            rise_told: false,
        })
    }

    fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Images per step over all ranks.
    fn global_batch(&self) -> usize {
        self.cfg.batch_size * self.comm.size()
    }

    /// Gives every rank rank 0's parameters, moments and state.
    fn share_rank0(&mut self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let be = self.backend.as_ref();
        self.comm.broadcast(be, &mut self.flow.params)?;
        self.comm.broadcast(be, &mut self.adam.m)?;
        self.comm.broadcast(be, &mut self.adam.v)?;
        self.state = collective::broadcast_json(self.comm, &self.state)?;
        Ok(())
    }

    /// A new run: writes its configuration, initialises the parameters (and ActNorm from
    /// the first batch), and saves the step-0 checkpoint.
    fn start(
        backend: Arc<dyn Backend>,
        comm: &'a dyn Collective,
        cfg: &'a TrainConfig,
        arch: Arch,
        run_dir: &'a Path,
        train_set: &Dataset,
        progress: &mut dyn Progress,
    ) -> Result<Run<'a>> {
        if comm.rank() == 0 {
            if checkpoint::latest(run_dir)?.is_some() {
                bail!(
                    "{} already holds a run; use --resume to continue it or choose another --out",
                    run_dir.display()
                );
            }
            fsutil::atomic_write(
                &config_path(run_dir),
                serde_json::to_string_pretty(cfg)?.as_bytes(),
            )?;
            let metrics_path = metrics_path(run_dir);
            if metrics_path.exists() {
                std::fs::remove_file(&metrics_path)?;
            }
        }
        let params = init_params(&arch, cfg.seed);
        let state = state_of(cfg, comm.size());
        let mut run = Run::with(backend, comm, cfg, arch, run_dir, &params, None, state)?;
        if arch.glow && run.is_root() {
            // ActNorm's data-dependent initialisation on the first global batch (the one
            // step 0 will see), before the step-0 checkpoint so a resume never redoes it.
            // Rank 0 computes it and shares it below.
            let n = run.global_batch().min(train_set.len()).max(1);
            let idx = &epoch_order(train_set.len(), cfg.seed, 0)[..n];
            let mut noise = Pcg32::with_stream(cfg.seed ^ 0xd1ce, 0);
            let mut u0 = Vec::new();
            dequantize_batch(train_set, idx, arch.bits, &mut noise, &mut u0)?;
            let stats = run.flow.data_init(&u0, n)?;
            progress.note(&format!(
                "ActNorm initialised from {n} images (initial loss {:.4} bits/dim)",
                stats.mean_bpd
            ));
        }
        run.share_rank0()?;
        // Step 0: there is always a last good checkpoint to go back to.
        run.save()?;
        Ok(run)
    }

    /// Continues the run in `run_dir` from its latest checkpoint (metrics after it dropped).
    /// Rank 0 reads it and shares it with the other ranks.
    fn resume(
        backend: Arc<dyn Backend>,
        comm: &'a dyn Collective,
        cfg: &'a TrainConfig,
        arch: Arch,
        run_dir: &'a Path,
        progress: &mut dyn Progress,
    ) -> Result<Run<'a>> {
        if comm.rank() != 0 {
            // Shapes only: the values come from rank 0.
            let params = init_params(&arch, cfg.seed);
            let mut run = Run::with(
                backend,
                comm,
                cfg,
                arch,
                run_dir,
                &params,
                None,
                state_of(cfg, comm.size()),
            )?;
            run.share_rank0()?;
            run.state.world_size = comm.size();
            return Ok(run);
        }
        let loaded = match checkpoint::load_with_notes(run_dir) {
            Ok(l) => l,
            // Killed before its first checkpoint (step 0) was committed: nothing to resume.
            Err(e @ checkpoint::CheckpointError::NotFound { .. }) => bail!(
                "{e}; the run stopped before its first checkpoint was saved: start it again \
                 with the same command, without --resume"
            ),
            Err(e) => return Err(e.into()),
        };
        for n in &loaded.notes {
            progress.note(n);
        }
        checkpoint::check_arch(&loaded.checkpoint, &cfg.model, &loaded.dir)?;
        let c = loaded.checkpoint;
        progress.note(&format!(
            "resuming from {} (step {})",
            loaded.dir.display(),
            c.state.step
        ));
        let was = c.state.world_size;
        if was != comm.size() {
            progress.note(&format!(
                "the run trained on {was} rank(s) (global batch {}); it continues on {} \
                 (global batch {}), so it is no longer the run an unchanged world size would give",
                cfg.batch_size * was,
                comm.size(),
                cfg.batch_size * comm.size()
            ));
        }
        let metrics_path = metrics_path(run_dir);
        if metrics_path.exists() {
            report::truncate_after_step(&metrics_path, c.state.step)?;
        }
        let adam = Some((c.adam_m, c.adam_v));
        let mut run = Run::with(backend, comm, cfg, arch, run_dir, &c.params, adam, c.state)?;
        run.share_rank0()?;
        run.state.world_size = comm.size();
        Ok(run)
    }

    /// Saves a checkpoint of the parameters, the moments and the state, unless this
    /// session saved the same state last (right after an improved validation). Rank 0
    /// writes; the other ranks hold the same values and return `None`.
    fn save(&mut self) -> Result<Option<PathBuf>> {
        if let Some((saved, dir)) = &self.saved {
            if *saved == Self::save_key(&self.state) {
                return Ok(Some(dir.clone()));
            }
        }
        self.write_checkpoint(false)
    }

    /// The state as [`Run::save`] compares it: without the training time.
    fn save_key(state: &TrainState) -> TrainState {
        let mut key = state.clone();
        key.elapsed_secs = 0.0;
        key
    }

    /// Writes a checkpoint (always, on rank 0); with `best`, `BEST` names it too.
    fn write_checkpoint(&mut self, best: bool) -> Result<Option<PathBuf>> {
        if !self.is_root() {
            return Ok(None);
        }
        let key = Self::save_key(&self.state);
        let ck = Checkpoint {
            model: self.cfg.model.clone(),
            params: self.flow.params_host()?,
            adam_m: to_host(self.backend.as_ref(), &self.adam.m)?,
            adam_v: to_host(self.backend.as_ref(), &self.adam.v)?,
            state: self.state.clone(),
        };
        let dir = if best {
            checkpoint::save_best(self.run_dir, &ck, self.cfg.keep)?
        } else {
            checkpoint::save(self.run_dir, &ck, self.cfg.keep)?
        };
        self.saved = Some((key, dir.clone()));
        Ok(Some(dir))
    }

    /// Appends a record to the metrics (rank 0).
    fn record(&mut self, rec: &MetricRecord) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            m.append(rec)?;
        }
        Ok(())
    }

    /// Appends an event line to the metrics and tells the user.
    fn event(&mut self, msg: String, progress: &mut dyn Progress, elapsed: f64) -> Result<()> {
        progress.note(&msg);
        let mut rec = MetricRecord::new(self.state.step, self.state.epoch, elapsed);
        rec.event = Some(msg);
        self.record(&rec)
    }

    /// Goes back to the last checkpoint with half the learning rate, after `max_bad_steps`
    /// non-finite steps in a row; gives up after [`MAX_RESTORES_IN_A_ROW`] such restores.
    fn restore(
        &mut self,
        restores_in_a_row: u32,
        progress: &mut dyn Progress,
        elapsed: f64,
    ) -> Result<()> {
        if restores_in_a_row > MAX_RESTORES_IN_A_ROW {
            bail!(
                "training keeps diverging: {MAX_RESTORES_IN_A_ROW} restores of the last checkpoint with ever lower learning rates did not help (last at step {}); see {}",
                self.state.step,
                self.metrics_path.display()
            );
        }
        let (skips, restores) = (self.state.nonfinite_skips, self.state.restores + 1);
        let lr_scale = self.state.lr_scale * 0.5;
        let mut dir = PathBuf::new();
        if self.is_root() {
            let (c, d) = checkpoint::load(self.run_dir)?;
            self.flow.set_params(&c.params)?;
            self.adam.m = upload_all(self.backend.as_ref(), &c.adam_m)?;
            self.adam.v = upload_all(self.backend.as_ref(), &c.adam_v)?;
            self.state = c.state;
            dir = d;
        }
        self.share_rank0()?;
        self.state.world_size = self.comm.size();
        self.state.nonfinite_skips = skips;
        self.state.restores = restores;
        self.state.lr_scale = lr_scale;
        let msg = format!(
            "{} non-finite steps in a row: restored {} (step {}) and halved the learning rate (x{})",
            self.cfg.max_bad_steps,
            dir.display(),
            self.state.step,
            self.state.lr_scale
        );
        self.event(msg, progress, elapsed)
    }

    /// The learning rate of the current step: warm-up, cosine decay, restore scaling.
    fn lr(&self, clock: &Clock, elapsed: f64) -> f32 {
        let cfg = self.cfg;
        let warm = if cfg.warmup_steps == 0 {
            1.0
        } else {
            ((self.state.step + 1) as f32 / cfg.warmup_steps as f32).min(1.0)
        };
        let decay = if cfg.cosine_decay {
            let f = clock.fraction(self.state.step, elapsed).min(1.0);
            (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())) as f32
        } else {
            1.0
        };
        cfg.lr * self.state.lr_scale * warm * decay
    }

    /// One Adam update of every trainable tensor, gradients clipped to `clip_norm`. The
    /// gradients are the sum over the ranks; `norm` is their mean's norm.
    fn update(&mut self, lr: f32, norm: f64) -> Result<()> {
        let cfg = self.cfg;
        let clip = if norm > f64::from(cfg.clip_norm) {
            f64::from(cfg.clip_norm) / norm
        } else {
            1.0
        };
        let hp = AdamStep {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step: self.state.step + 1,
            // The mean over the ranks (exact for one rank: the scale is unchanged).
            grad_scale: (clip / self.comm.size() as f64) as f32,
        };
        self.backend.adam_all(
            &hp,
            &mut self.flow.params,
            &self.grads,
            &mut self.adam.m,
            &mut self.adam.v,
            &self.trainable,
        )?;
        Ok(())
    }

    /// Scores the validation set and records it in the state and the metrics (with `event`,
    /// if any, on the same line). A score below the best so far is saved at once as the
    /// run's `BEST` checkpoint. Says when validation has risen [`RISES_WORTH_A_NOTE`] times
    /// in a row, and stops the run (through `clock`) after [`TrainConfig::early_stop`]
    /// validations in a row without a new best.
    fn validate(
        &mut self,
        clock: &Clock,
        val_set: &Dataset,
        event: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<f64> {
        // Each rank scores its slice of the validation set; the sums are added, so every
        // rank sees the same score and takes the same decisions below.
        let (r, n, len) = (self.comm.rank(), self.comm.size(), val_set.len());
        let slice = r * len / n..(r + 1) * len / n;
        let mut sum = [evaluate_sum(
            &mut self.flow,
            val_set,
            slice,
            self.cfg.batch_size,
        )?];
        self.comm.all_reduce_sum_f64(&mut sum)?;
        let v = sum[0] / len as f64;
        let repeat = self.validated_at == Some(self.state.step);
        self.validated_at = Some(self.state.step);
        let improved = record_validation(&mut self.state, v, repeat);
        let elapsed = clock.elapsed();
        let mut rec = MetricRecord::new(self.state.step, self.state.epoch, elapsed);
        rec.val_bpd = Some(v);
        rec.event = event.map(str::to_string);
        self.record(&rec)?;
        if improved {
            self.write_checkpoint(true)?;
            self.rise_told = false;
        }
        if repeat {
            return Ok(v);
        }
        let best = self.state.best_val_bpd.unwrap_or(v);
        if self.state.val_rises >= RISES_WORTH_A_NOTE && !self.rise_told {
            self.rise_told = true;
            let msg = format!(
                "validation has risen {} times in a row (now {v:.4} bits/dim; the best, \
                 {best:.4}, was {} validations ago): the model may be overfitting; the best \
                 checkpoint is kept (checkpoints/BEST){}",
                self.state.val_rises,
                self.state.val_since_best,
                if self.cfg.early_stop.is_none() {
                    "; --early-stop N stops such a run"
                } else {
                    ""
                }
            );
            self.event(msg, progress, elapsed)?;
        }
        if let Some(n) = self.cfg.early_stop {
            if self.state.val_since_best >= n {
                let msg = format!(
                    "early stop: {n} validations in a row without improving on the best \
                     ({best:.4} bits/dim)"
                );
                self.event(msg.clone(), progress, elapsed)?;
                clock.stop.set(Some(msg));
            }
        }
        Ok(v)
    }

    /// The steps, until the clock says done: batch, forward, backward, update; non-finite
    /// steps skipped (and the last checkpoint restored when they repeat); validation and
    /// checkpoints when due.
    fn steps(
        &mut self,
        clock: &Clock,
        train_set: &Dataset,
        val_set: &Dataset,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let cfg = self.cfg;
        let bs = cfg.batch_size;
        let (rank, world) = (self.comm.rank(), self.comm.size());
        let global = self.global_batch();
        let spe = clock.steps_per_epoch;
        // Checkpoint timing on rank 0's clock, so that every rank agrees when one is due.
        let mut last_ckpt_at = rank0_value(self.comm, clock.elapsed())?;
        let mut u = Vec::new();
        let mut bad_in_a_row = 0u32;
        let mut running = (0.0f64, 0u64);
        let mut window_start = Instant::now();
        let mut window_images = 0u64;
        let mut order_epoch = u64::MAX;
        let mut order = Vec::new();
        // Each injected NaN fires once: a restore replays the steps after its checkpoint.
        let mut nan_pending = cfg.inject_nan_at.clone();
        // Restores since the last checkpoint saved after good steps; give up when replaying
        // from the same point keeps diverging even at a much lower learning rate.
        let mut restores_in_a_row = 0u32;
        loop {
            let elapsed = rank0_value(self.comm, clock.elapsed())?;
            self.state.elapsed_secs = elapsed;
            if clock.done(self.state.step, elapsed) {
                return Ok(());
            }
            let epoch = self.state.step / spe;
            let b = self.state.step % spe;
            if epoch != order_epoch {
                order = epoch_order(train_set.len(), cfg.seed, epoch);
                order_epoch = epoch;
            }
            // This rank's part of the global batch, with the noise the single-process
            // run gives those images (one noise word per pixel).
            let first = b as usize * global + rank * bs;
            let idx = &order[first..first + bs];
            let mut noise = Pcg32::with_stream(cfg.seed ^ 0xd1ce, self.state.step);
            noise.advance((rank * bs * self.arch.dim()) as u64);
            dequantize_batch(train_set, idx, self.arch.bits, &mut noise, &mut u)?;
            debug_assert_eq!(u.len(), bs * self.arch.dim());
            if let Some(k) = nan_pending.iter().position(|&s| s == self.state.step) {
                nan_pending.swap_remove(k);
                if rank == 0 {
                    u[0] = f32::NAN;
                }
            }
            let stats = self.flow.forward(&u, bs)?;
            // The global loss, and whether any rank's was non-finite: every rank decides
            // the same.
            let finite = stats.mean_bpd.is_finite();
            let mut agree = [
                if finite { stats.mean_bpd } else { 0.0 },
                f64::from(!finite),
            ];
            self.comm.all_reduce_sum_f64(&mut agree)?;
            let loss = if agree[1] > 0.0 {
                f64::NAN
            } else {
                agree[0] / world as f64
            };
            let mut ok = loss.is_finite();
            let mut norm = f64::NAN;
            if ok {
                self.flow.backward(&mut self.grads)?;
                self.comm
                    .all_reduce_sum(self.backend.as_ref(), &mut self.grads)?;
                // The norm of the mean gradient (the grads hold the sum over the ranks).
                norm = self.backend.sum_squares_all(&self.grads)?.sqrt() / world as f64;
                ok = norm.is_finite();
            }
            self.state.epoch = epoch;
            self.state.batch_in_epoch = b;
            if !ok {
                self.state.nonfinite_skips += 1;
                bad_in_a_row += 1;
                let what = if loss.is_finite() { "gradient" } else { "loss" };
                let ranks = if world > 1 && agree[1] > 0.0 {
                    format!(" on {} of {world} ranks", agree[1])
                } else {
                    String::new()
                };
                let msg = format!(
                    "step {}: non-finite {what}{ranks} (loss {loss}, grad norm {norm}); step skipped",
                    self.state.step
                );
                self.event(msg, progress, elapsed)?;
                if bad_in_a_row >= cfg.max_bad_steps {
                    restores_in_a_row += 1;
                    self.restore(restores_in_a_row, progress, elapsed)?;
                    bad_in_a_row = 0;
                } else {
                    // Skip this batch: move on as if the step had been taken.
                    self.state.step += 1;
                }
                continue;
            }
            bad_in_a_row = 0;
            let lr = self.lr(clock, elapsed);
            self.update(lr, norm)?;
            self.state.step += 1;
            running.0 += loss;
            running.1 += 1;
            window_images += global as u64;
            let ips = window_images as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
            let frac = clock.fraction(self.state.step, elapsed);
            let train_bpd = running.0 / running.1.max(1) as f64;
            progress.step(&self.state, train_bpd, ips, frac.min(1.0));
            if self.state.step.is_multiple_of(20) {
                let mut rec = MetricRecord::new(self.state.step, epoch, elapsed);
                rec.train_bpd = Some(train_bpd);
                rec.images_per_sec = Some(ips);
                rec.lr = Some(f64::from(lr));
                self.record(&rec)?;
                running = (0.0, 0);
                window_start = Instant::now();
                window_images = 0;
            }
            let epoch_end = self.state.step.is_multiple_of(spe);
            if epoch_end
                || cfg
                    .eval_steps
                    .is_some_and(|e| self.state.step.is_multiple_of(e))
            {
                let v = self.validate(clock, val_set, None, progress)?;
                progress.note(&format!(
                    "step {} (epoch {}): validation {:.4} bits/dim on {} images",
                    self.state.step,
                    epoch + 1,
                    v,
                    val_set.len()
                ));
            }
            let ckpt_due = epoch_end
                || elapsed - last_ckpt_at >= cfg.checkpoint_secs
                || cfg
                    .checkpoint_steps
                    .is_some_and(|c| self.state.step.is_multiple_of(c));
            if ckpt_due {
                self.state.elapsed_secs = clock.elapsed();
                self.save()?;
                last_ckpt_at = elapsed;
                restores_in_a_row = 0;
            }
        }
    }

    /// Final validation, checkpoint, samples and plot.
    fn finish(
        mut self,
        clock: &Clock,
        val_set: &Dataset,
        progress: &mut dyn Progress,
    ) -> Result<Outcome> {
        let v = self.validate(clock, val_set, Some("finished"), progress)?;
        self.state.elapsed_secs = clock.elapsed();
        // Always written: the last checkpoint holds the run's whole training time.
        self.write_checkpoint(false)?;
        let (cfg, arch) = (self.cfg, self.arch);
        let samples_png = self.run_dir.join("samples.png");
        let mut nonfinite_samples = 0;
        if self.is_root() {
            let n = cfg.samples.max(1);
            let samples = sample_images(&mut self.flow, n, cfg.temperature, cfg.seed)?;
            sample::write_grid(&samples_png, &samples.pixels, n, &arch)?;
            nonfinite_samples = samples.nonfinite.len();
            if let Some(note) = samples.nonfinite_note(n) {
                self.event(format!("samples.png: {note}"), progress, clock.elapsed())?;
            }
            let records = report::read_metrics(&self.metrics_path)?;
            report::write_loss_svg(
                self.run_dir.join("loss.svg"),
                &records,
                &format!("clayflow: {}", cfg.dataset),
            )?;
        }
        // Every rank leaves together (rank 0 last wrote the samples).
        self.comm.barrier()?;
        let session_steps = self.state.step - clock.start_step;
        let secs = clock.session_start.elapsed().as_secs_f64();
        let global = self.global_batch();
        Ok(Outcome {
            steps: self.state.step,
            val_bpd: v,
            val_images: val_set.len(),
            images_per_sec: session_steps as f64 * global as f64 / secs.max(1e-9),
            world_size: self.comm.size(),
            global_batch: global,
            elapsed_secs: self.state.elapsed_secs,
            samples_png,
            nonfinite_skips: self.state.nonfinite_skips,
            best: best_checkpoint(self.run_dir),
            early_stop: clock.stopped(),
            nonfinite_samples,
        })
    }
}

/// Records the validation score `v` in `st`: the latest and best scores and the streaks
/// (validations since the best, rises in a row), which a `repeat` (a second validation at
/// the same step) leaves alone. Returns whether `v` is a new best (finite, and strictly
/// below the old).
fn record_validation(st: &mut TrainState, v: f64, repeat: bool) -> bool {
    let improved = v.is_finite() && st.best_val_bpd.is_none_or(|b| v < b);
    if !repeat {
        st.val_since_best = if improved { 0 } else { st.val_since_best + 1 };
        let rose = st.last_val_bpd.is_some_and(|last| v > last);
        st.val_rises = if rose { st.val_rises + 1 } else { 0 };
    }
    st.last_val_bpd = Some(v);
    if improved {
        st.best_val_bpd = Some(v);
    }
    improved
}

/// The checkpoint a run's `BEST` names, when it exists and loads.
fn best_checkpoint(run_dir: &Path) -> Option<BestCheckpoint> {
    let dir = checkpoint::best(run_dir).ok().flatten()?;
    let c = checkpoint::load_dir(&dir).ok()?;
    Some(BestCheckpoint {
        dir,
        step: c.state.step,
        val_bpd: c.state.last_val_bpd?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_streaks_count_rises_and_validations_since_the_best() {
        let mut st = state_of(
            &TrainConfig::new(ModelConfig::preset("mnist").unwrap(), String::new()),
            1,
        );
        // A non-finite score is never a best, not even the first.
        assert!(!record_validation(&mut st, f64::NAN, false));
        assert_eq!((st.best_val_bpd, st.val_since_best), (None, 1));
        let mut seen = Vec::new();
        // Falls, then overfits: 4.9 is the best; 5.0 is no rise (below 5.2) but no best.
        for v in [5.0, 4.9, 5.1, 5.2, 5.0, 5.3, 5.4, 5.5] {
            let improved = record_validation(&mut st, v, false);
            seen.push((improved, st.val_since_best, st.val_rises));
        }
        assert_eq!(
            seen,
            vec![
                (true, 0, 0),
                (true, 0, 0),
                (false, 1, 1),
                (false, 2, 2),
                (false, 3, 0),
                (false, 4, 1),
                (false, 5, 2),
                (false, 6, 3),
            ]
        );
        assert_eq!(st.best_val_bpd, Some(4.9));
        assert_eq!(st.last_val_bpd, Some(5.5));
        // A repeat at the same step changes the scores but not the streaks.
        assert!(!record_validation(&mut st, 5.6, true));
        assert_eq!((st.val_since_best, st.val_rises), (6, 3));
        // An equal score is not a new best; a lower one resets the count.
        assert!(!record_validation(&mut st, 4.9, false));
        assert_eq!((st.val_since_best, st.val_rises), (7, 0));
        assert!(record_validation(&mut st, 4.8, false));
        assert_eq!((st.val_since_best, st.best_val_bpd), (0, Some(4.8)));
    }

    #[test]
    fn old_train_json_without_early_stop_still_loads() {
        let cfg = TrainConfig::new(ModelConfig::preset("mnist").unwrap(), "d".into());
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(!json.contains("early_stop"), "{json}");
        let back: TrainConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.early_stop, None);
        let mut with = cfg.clone();
        with.early_stop = Some(4);
        let back: TrainConfig =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back.early_stop, Some(4));
    }
}
