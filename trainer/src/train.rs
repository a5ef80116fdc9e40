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
use crate::sample::{self, sample_pixels};
use anyhow::{bail, Context, Result};
use clayflow_kernel::{preprocess::dequantize, Arch, Pcg32};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Restores of the last checkpoint in a row (no new checkpoint in between) before training
/// gives up: each halves the learning rate, so the last ran at 1/32 of the original.
pub const MAX_RESTORES_IN_A_ROW: u32 = 5;

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
    run.finish(&clock, val_set)
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
        }
    }

    /// Training seconds of the whole run so far, earlier sessions included.
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.session_start.elapsed().as_secs_f64()
    }

    fn done(&self, step: u64, elapsed: f64) -> bool {
        self.total_steps.is_some_and(|t| step >= t)
            || self.budget_secs.is_some_and(|b| elapsed >= b)
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

    /// Saves a checkpoint of the parameters, the moments and the state (rank 0; the others
    /// hold the same values).
    fn save(&self) -> Result<Option<PathBuf>> {
        if !self.is_root() {
            return Ok(None);
        }
        let ck = Checkpoint {
            model: self.cfg.model.clone(),
            params: self.flow.params_host()?,
            adam_m: to_host(self.backend.as_ref(), &self.adam.m)?,
            adam_v: to_host(self.backend.as_ref(), &self.adam.v)?,
            state: self.state.clone(),
        };
        Ok(Some(checkpoint::save(self.run_dir, &ck, self.cfg.keep)?))
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
    /// if any, on the same line).
    /// Each rank scores its slice of the validation set; the sums are added.
    fn validate(&mut self, clock: &Clock, val_set: &Dataset, event: Option<&str>) -> Result<f64> {
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
        self.state.last_val_bpd = Some(v);
        self.state.best_val_bpd = Some(self.state.best_val_bpd.map_or(v, |b: f64| b.min(v)));
        let mut rec = MetricRecord::new(self.state.step, self.state.epoch, clock.elapsed());
        rec.val_bpd = Some(v);
        rec.event = event.map(str::to_string);
        self.record(&rec)?;
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
                let v = self.validate(clock, val_set, None)?;
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
    fn finish(mut self, clock: &Clock, val_set: &Dataset) -> Result<Outcome> {
        let v = self.validate(clock, val_set, Some("finished"))?;
        self.state.elapsed_secs = clock.elapsed();
        self.save()?;
        let (cfg, arch) = (self.cfg, self.arch);
        let samples_png = self.run_dir.join("samples.png");
        if self.is_root() {
            let n = cfg.samples.max(1);
            let pixels = sample_pixels(&mut self.flow, n, cfg.temperature, cfg.seed)?;
            sample::write_grid(&samples_png, &pixels, n, &arch)?;
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
        })
    }
}
