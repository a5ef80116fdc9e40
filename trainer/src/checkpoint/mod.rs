//! Checkpoints: crash-safe saving, validated loading and pruning of training state.
//!
//! A run folder `RUN/` holds its checkpoints as
//!
//! ```text
//! RUN/checkpoints/LATEST                          the name of the newest good checkpoint
//! RUN/checkpoints/BEST                            the name of the best-validation checkpoint
//! RUN/checkpoints/step-00000500/model.safetensors parameters (f32, PyTorch-loadable)
//! RUN/checkpoints/step-00000500/optimizer.safetensors   Adam m (`m.<name>`) and v (`v.<name>`)
//!                                                       (and the trained weights `w.<name>`
//!                                                       when the model file holds their
//!                                                       average, `--ema`)
//! RUN/checkpoints/step-00000500/state.json        {"format_version":1,"model":..,"state":..}
//! ```
//!
//! `model.safetensors` carries the metadata `{"format":"clayflow","config":"<ModelConfig
//! JSON>"}`, so `safetensors.torch.load_file` reads it and any reader can rebuild the
//! architecture. Tensor names and shapes come from [`tensor_specs`].
//!
//! Saving writes everything into a hidden `.step-N.tmp/` folder, fsyncs it, renames it into
//! place, fsyncs `checkpoints/`, and only then moves `LATEST`; the last good checkpoint is
//! never modified in place. A checkpoint saved right after a validation that improved on
//! the run's best ([`save_best`]) is also named by `BEST`, written (atomically, like
//! `LATEST`) just before `LATEST`; pruning never removes the folder `BEST` names. Loading
//! validates every file and reports problems naming the file (and tensor) at fault; corrupt
//! input never panics. Loading a run folder follows `LATEST` and falls back to the newest
//! checkpoint that loads; [`load_best_with_notes`] follows `BEST` instead and falls back
//! to `LATEST` with a note.
//!
//! One process writes to a run folder at a time.
//!
//! A testing hook, inert unless the environment variable is set:
//! `CLAYFLOW_TEST_CHECKPOINT_PAUSE=<phase>:<ms>` makes [`save`](fn@save) sleep `ms` milliseconds at
//! one point of the write, so a test can kill the process there deterministically
//! (`trainer/tests/crash_resume.rs`). The phases, in order: `model` (after
//! `model.safetensors` is written into `.step-N.tmp/`, before the other two files), `aside`
//! (re-saving an existing step: after the old `step-N/` was moved to `.step-N.old/`, before
//! the new folder is renamed in), `renamed` (after `.step-N.tmp/` became `step-N/`, before
//! `LATEST` names it).
//!
//! The code is split by job: `layout` (the run folder's names, `LATEST` and [`latest`]),
//! `validate` (the checks shared by save and load, [`check_arch`]), `format` (the on-disk
//! encoding), `save` ([`save`](fn@save) and pruning) and `load` ([`load`](fn@load) and its
//! fallbacks); the types and the error live here and everything public is re-exported here.

use std::fmt::Display;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{tensor_specs, ConfigError, ModelConfig, TensorSpec};

mod format;
mod layout;
mod load;
mod save;
#[cfg(test)]
mod testutil;
mod validate;

pub use layout::{best, latest, step_dir_name};
pub use load::{load, load_best_with_notes, load_dir, load_with_notes, Loaded};
pub use save::{save, save_best, TEST_PAUSE_ENV};
pub use validate::check_arch;

/// Version of the `state.json` layout written by this build (and the only one it reads).
pub const FORMAT_VERSION: u64 = 1;
/// Sub-folder of a run folder that holds the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// File in [`CHECKPOINTS_DIR`] naming the newest good checkpoint.
pub const LATEST_FILE: &str = "LATEST";
/// File in [`CHECKPOINTS_DIR`] naming the checkpoint with the best validation bits/dim.
pub const BEST_FILE: &str = "BEST";
/// Parameters of a checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// Adam moments of a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Loop and optimiser state of a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// Value of the `format` metadata key in the safetensors files.
pub const METADATA_FORMAT: &str = "clayflow";

/// Optimiser and loop state saved next to the weights (JSON).
///
/// Integers and `f32` fields survive a save and load bit for bit. The `f64` fields may come
/// back 1-2 ulp off while `serde_json` is built without its `float_roundtrip` feature (its
/// default number parser is not correctly rounded for 17-digit values).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps taken.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Batches already consumed in the current epoch.
    pub batch_in_epoch: u64,
    /// Seed of the run (shuffling, dequantisation noise).
    pub seed: u64,
    /// Base learning rate.
    pub lr: f32,
    /// Current multiplier of the learning rate (decay, restores after divergence).
    pub lr_scale: f32,
    /// Linear warm-up length in steps.
    pub warmup_steps: u64,
    /// Adam beta1.
    pub beta1: f32,
    /// Adam beta2.
    pub beta2: f32,
    /// Adam epsilon.
    pub eps: f32,
    /// Gradient-norm clipping threshold.
    pub clip_norm: f32,
    /// Images per step on each rank.
    pub batch_size: usize,
    /// Ranks the run trained on last (the global batch is `batch_size * world_size`). The
    /// checkpoint itself does not depend on it: a run resumes on any number of ranks.
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// Training time so far, in seconds.
    pub elapsed_secs: f64,
    /// Best validation bits per dimension seen.
    pub best_val_bpd: Option<f64>,
    /// Latest validation bits per dimension.
    pub last_val_bpd: Option<f64>,
    /// Description of the training data set.
    pub dataset: String,
    /// Steps skipped because the loss or gradient was not finite.
    pub nonfinite_skips: u64,
    /// Times the run was rolled back to a checkpoint after diverging.
    pub restores: u64,
    /// Validations in a row, up to this state, that did not improve on `best_val_bpd`
    /// (what `--early-stop` counts; 0 in checkpoints written before it existed).
    #[serde(default)]
    pub val_since_best: u64,
    /// Validations in a row, up to this state, each higher than the one before.
    #[serde(default)]
    pub val_rises: u64,
    /// The decay of the weight average, when the run keeps one (`--ema`): then the model
    /// file holds the average and the optimizer file the trained weights too (`w.<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f32>,
}

fn one_rank() -> usize {
    1
}

/// Everything needed to resume a run or export a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The architecture.
    pub model: ModelConfig,
    /// One vector per [`tensor_specs`] entry, same order and lengths: the weights to score,
    /// sample and export (the average, when the run keeps one).
    pub params: Vec<Vec<f32>>,
    /// The weights being trained, shaped like `params`, when `params` is their moving
    /// average (`state.ema` is set); `None` when `params` are the trained weights.
    pub trained: Option<Vec<Vec<f32>>>,
    /// Adam first moments, shaped like `params`.
    pub adam_m: Vec<Vec<f32>>,
    /// Adam second moments, shaped like `params`.
    pub adam_v: Vec<Vec<f32>>,
    /// Loop and optimiser state.
    pub state: TrainState,
}

impl Checkpoint {
    /// The parameters concatenated in order: the kernel's flat parameter vector.
    pub fn flat_params(&self) -> Vec<f32> {
        self.params.concat()
    }
}

/// Splits a flat parameter-shaped vector (parameters, gradients, Adam moments) into one
/// vector per tensor of `model`, in [`tensor_specs`] order.
pub fn unflatten(model: &ModelConfig, flat: &[f32]) -> Result<Vec<Vec<f32>>, CheckpointError> {
    let arch = model
        .to_arch()
        .map_err(|e| CheckpointError::Invalid(format!("model configuration: {e}")))?;
    let specs = tensor_specs(&arch);
    let total: usize = specs.iter().map(TensorSpec::len).sum();
    if flat.len() != total {
        return Err(CheckpointError::Invalid(format!(
            "flat vector has {} values, the model has {total} parameters",
            flat.len()
        )));
    }
    let mut rest = flat;
    let mut out = Vec::with_capacity(specs.len());
    for s in &specs {
        let (head, tail) = rest.split_at(s.len());
        out.push(head.to_vec());
        rest = tail;
    }
    Ok(out)
}

/// A checkpoint that cannot be saved, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file of a checkpoint does not exist.
    #[error("{}: file is missing (incomplete checkpoint?)", path.display())]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// The path holds no checkpoint at all.
    #[error("no checkpoint at {}: {detail}", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
        /// Why nothing was found.
        detail: String,
    },
    /// No checkpoint of a run folder could be loaded.
    #[error("no usable checkpoint in {}: {detail}", path.display())]
    NoUsable {
        /// The checkpoints folder.
        path: PathBuf,
        /// Why each candidate was rejected.
        detail: String,
    },
    /// `state.json` is not valid JSON or lacks fields.
    #[error("{}: cannot parse: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// `state.json` has a `format_version` this build does not read.
    #[error(
        "{}: unsupported format_version {found} (this build reads version {FORMAT_VERSION})",
        path.display()
    )]
    FormatVersion {
        /// The file.
        path: PathBuf,
        /// The version found (or `missing`).
        found: String,
    },
    /// The stored model configuration is not a valid architecture.
    #[error("{}: invalid model configuration: {source}", path.display())]
    Config {
        /// The file holding the configuration.
        path: PathBuf,
        /// Why it is invalid.
        #[source]
        source: ConfigError,
    },
    /// The stored training state is unusable.
    #[error("{}: invalid training state: {detail}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A safetensors file cannot be parsed.
    #[error("{}: not a valid safetensors file: {detail}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A safetensors file's metadata is not clayflow's.
    #[error("{}: bad metadata: {detail}", path.display())]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tensor is missing, unexpected, of the wrong shape or dtype, or holds bad values.
    #[error("{}: tensor {tensor}: {problem}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The configuration in `model.safetensors` metadata disagrees with `state.json`.
    #[error(
        "{}: model configuration in the metadata differs from {}: {diff}",
        path.display(),
        state.display()
    )]
    ConfigMismatch {
        /// The safetensors file.
        path: PathBuf,
        /// The state file.
        state: PathBuf,
        /// The differing fields (metadata value first).
        diff: String,
    },
    /// A checkpoint's architecture is not the one requested.
    #[error(
        "checkpoint {}: architecture differs from the requested model: {diff}",
        path.display()
    )]
    ArchMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The differing fields (checkpoint value first).
        diff: String,
    },
    /// An in-memory checkpoint is inconsistent and was not saved.
    #[error("invalid checkpoint: {0}")]
    Invalid(String),
}

fn io_err(context: impl Display) -> impl FnOnce(io::Error) -> CheckpointError {
    move |source| CheckpointError::Io {
        context: context.to_string(),
        source,
    }
}
