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
//!
//! The code is split by job: `clock` (the budget, and the clock every rank shares), `run`
//! (a run's state on the device: start, resume, checkpoints, restores, the learning rate and
//! the update), `steps` (the step loop and the finish) and `validation` (scoring, the best
//! checkpoint, the streaks and the early stop).

use crate::backend::Backend;
use crate::checkpoint::TrainState;
use crate::collective::{self, Collective};
use crate::config::ModelConfig;
use crate::data::Dataset;
use crate::eval::uniform01;
use crate::fsutil;
use anyhow::{bail, Context, Result};
use clayflow_kernel::{preprocess::dequantize, Arch, Pcg32};
use clock::Clock;
use run::Run;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod average;
mod clock;
mod run;
mod steps;
mod validation;

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
    /// Mirror each training image left to right with probability 1/2 (augmentation for
    /// photos; validation images are never mirrored).
    #[serde(default)]
    pub flip: bool,
    /// Keep an exponential moving average of the weights with this decay (Polyak
    /// averaging, `average.rs`): validation, the best checkpoint, the samples and the saved
    /// model use the average; training continues from the trained weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f32>,
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
            flip: false,
            ema: None,
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// Steps taken in total (including before a resume).
    pub steps: u64,
    /// Final validation bits/dim (of the weight average, when the run keeps one).
    pub val_bpd: f64,
    /// Final validation bits/dim of the trained weights, when `val_bpd` scores their
    /// average (`--ema`).
    pub val_trained_bpd: Option<f64>,
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

/// What a validation line adds when it scored a weight average: the trained weights'
/// score (`--ema`); empty without an average.
pub fn trained_note(v_trained: Option<f64>) -> String {
    v_trained
        .map(|t| format!(" (weight average; the trained weights {t:.4})"))
        .unwrap_or_default()
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
        ema: cfg.ema,
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
    if let Some(d) = cfg.ema {
        if !(d > 0.0 && d < 1.0) {
            bail!("the weight average's decay must be between 0 and 1 (got {d}); 0.999 is usual");
        }
    }
    Ok(arch)
}

#[cfg(test)]
mod tests {
    use super::*;

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
