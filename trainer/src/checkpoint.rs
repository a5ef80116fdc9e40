//! Checkpoints: crash-safe saving, validated loading and pruning of training state.
//!
//! A run folder `RUN/` holds its checkpoints as
//!
//! ```text
//! RUN/checkpoints/LATEST                          the name of the newest good checkpoint
//! RUN/checkpoints/step-00000500/model.safetensors parameters (f32, PyTorch-loadable)
//! RUN/checkpoints/step-00000500/optimizer.safetensors   Adam m (`m.<name>`) and v (`v.<name>`)
//! RUN/checkpoints/step-00000500/state.json        {"format_version":1,"model":..,"state":..}
//! ```
//!
//! `model.safetensors` carries the metadata `{"format":"clayflow","config":"<ModelConfig
//! JSON>"}`, so `safetensors.torch.load_file` reads it and any reader can rebuild the
//! architecture. Tensor names and shapes come from [`tensor_specs`].
//!
//! Saving writes everything into a hidden `.step-N.tmp/` folder, fsyncs it, renames it into
//! place, fsyncs `checkpoints/`, and only then moves `LATEST`; the last good checkpoint is
//! never modified in place. Loading validates every file and reports problems naming the
//! file (and tensor) at fault; corrupt input never panics. Loading a run folder follows
//! `LATEST` and falls back to the newest checkpoint that loads.
//!
//! One process writes to a run folder at a time.
//!
//! A testing hook, inert unless the environment variable is set:
//! `CLAYFLOW_TEST_CHECKPOINT_PAUSE=<phase>:<ms>` makes [`save`] sleep `ms` milliseconds at
//! one point of the write, so a test can kill the process there deterministically
//! (`trainer/tests/crash_resume.rs`). The phases, in order: `model` (after
//! `model.safetensors` is written into `.step-N.tmp/`, before the other two files), `aside`
//! (re-saving an existing step: after the old `step-N/` was moved to `.step-N.old/`, before
//! the new folder is renamed in), `renamed` (after `.step-N.tmp/` became `step-N/`, before
//! `LATEST` names it).

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, SafeTensorError, TensorView};
use serde::{Deserialize, Serialize};

use crate::config::{tensor_specs, ConfigError, ModelConfig, TensorSpec};
use crate::fsutil::{atomic_write, fsync_dir, write_synced};

/// Version of the `state.json` layout written by this build (and the only one it reads).
pub const FORMAT_VERSION: u64 = 1;
/// Sub-folder of a run folder that holds the checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// File in [`CHECKPOINTS_DIR`] naming the newest good checkpoint.
pub const LATEST_FILE: &str = "LATEST";
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
    /// Batch size.
    pub batch_size: usize,
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
}

/// Everything needed to resume a run or export a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The architecture.
    pub model: ModelConfig,
    /// One vector per [`tensor_specs`] entry, same order and lengths.
    pub params: Vec<Vec<f32>>,
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

/// The folder name of the checkpoint at `step` (`step-00000500`).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-<digits>` folder name.
fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Kinds of entries in a checkpoints folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EntryKind {
    /// `step-N`: a committed checkpoint.
    Step,
    /// `.step-N.old`: a committed checkpoint moved aside while step N was re-saved.
    Aside,
    /// `.step-N.tmp`: an unfinished save.
    Tmp,
    /// `.step-N.del` or `.step-N.old.del`: a checkpoint being deleted (renamed first, so
    /// that a crash halfway through the deletion never leaves a partial `step-N`).
    Trash,
}

fn parse_entry(name: &str) -> Option<(u64, EntryKind)> {
    if let Some(step) = parse_step_name(name) {
        return Some((step, EntryKind::Step));
    }
    let hidden = name.strip_prefix('.')?;
    if let Some(base) = hidden.strip_suffix(".del") {
        let base = base.strip_suffix(".old").unwrap_or(base);
        return parse_step_name(base).map(|s| (s, EntryKind::Trash));
    }
    if let Some(base) = hidden.strip_suffix(".old") {
        return parse_step_name(base).map(|s| (s, EntryKind::Aside));
    }
    if let Some(base) = hidden.strip_suffix(".tmp") {
        return parse_step_name(base).map(|s| (s, EntryKind::Tmp));
    }
    None
}

fn aside_name(name: &str) -> String {
    format!(".{name}.old")
}

fn tmp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Entries of a checkpoints folder: `(step, kind, name, path)`, directories only.
fn list_entries(ckdir: &Path) -> Result<Vec<(u64, EntryKind, String, PathBuf)>, CheckpointError> {
    let rd = match fs::read_dir(ckdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("cannot list {}", ckdir.display()))(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err(format!("cannot list {}", ckdir.display())))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some((step, kind)) = parse_entry(&name) else {
            continue;
        };
        let path = entry.path();
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            out.push((step, kind, name, path));
        }
    }
    Ok(out)
}

/// Checkpoints that may be loaded, best first: newest step first, a committed `step-N`
/// before a `.step-N.old` left by a save interrupted at the wrong moment. Unfinished
/// `.step-N.tmp` folders and half-deleted `.del` folders are never candidates.
fn candidates(ckdir: &Path) -> Result<Vec<(String, PathBuf)>, CheckpointError> {
    let mut v: Vec<_> = list_entries(ckdir)?
        .into_iter()
        .filter(|e| e.1 != EntryKind::Tmp && e.1 != EntryKind::Trash)
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(v.into_iter()
        .map(|(_, _, name, path)| (name, path))
        .collect())
}

/// What `LATEST` says: `Ok(None)` when it does not exist, `Err(note)` when it is unusable.
fn read_latest(ckdir: &Path) -> Result<Option<String>, String> {
    let path = ckdir.join(LATEST_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let name = text.trim();
            if parse_step_name(name).is_some() {
                Ok(Some(name.to_string()))
            } else {
                Err(format!(
                    "{} does not name a checkpoint (it holds {:?})",
                    path.display(),
                    text.chars().take(40).collect::<String>()
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The checkpoint folder a run's `LATEST` names, or when `LATEST` is missing, unreadable or
/// names a missing folder, the newest checkpoint folder present (possibly a `.step-N.old`
/// copy left by an interrupted re-save). `None` when the run has no checkpoints. The folder
/// is not validated; [`load`] does that.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let ckdir = run_dir.join(CHECKPOINTS_DIR);
    if let Ok(Some(name)) = read_latest(&ckdir) {
        let p = ckdir.join(&name);
        if p.is_dir() {
            return Ok(Some(p));
        }
    }
    Ok(candidates(&ckdir)?.into_iter().next().map(|(_, p)| p))
}

// ---------------------------------------------------------------------------------------
// Validation shared by save and load.
// ---------------------------------------------------------------------------------------

/// Checks the state's floating-point fields are usable (JSON cannot hold NaN or infinity,
/// and an infinite learning rate would wreck the run).
fn check_state(s: &TrainState) -> Result<(), String> {
    let f32s = [
        ("lr", s.lr),
        ("lr_scale", s.lr_scale),
        ("beta1", s.beta1),
        ("beta2", s.beta2),
        ("eps", s.eps),
        ("clip_norm", s.clip_norm),
    ];
    for (name, v) in f32s {
        if !v.is_finite() {
            return Err(format!("{name} is {v}, not a finite number"));
        }
    }
    let f64s = [
        ("elapsed_secs", Some(s.elapsed_secs)),
        ("best_val_bpd", s.best_val_bpd),
        ("last_val_bpd", s.last_val_bpd),
    ];
    for (name, v) in f64s {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            return Err(format!("{name} is {v}, not a finite number"));
        }
    }
    Ok(())
}

/// Which values a tensor group may hold.
#[derive(Clone, Copy)]
enum Values {
    /// Finite values.
    Finite,
    /// Finite, non-negative values (Adam's second moment).
    NonNegative,
}

/// The first bad value of `data`, as `(index, value)`.
fn bad_value(data: &[f32], allowed: Values) -> Option<(usize, f32)> {
    data.iter()
        .copied()
        .enumerate()
        .find(|&(_, v)| match allowed {
            Values::Finite => !v.is_finite(),
            Values::NonNegative => !v.is_finite() || v < 0.0,
        })
}

fn describe_bad(index: usize, value: f32, allowed: Values) -> String {
    let want = match allowed {
        Values::Finite => "finite",
        Values::NonNegative => "finite and non-negative",
    };
    format!("value {value} at index {index} (values must be {want})")
}

/// The fields where `a` and `b` differ, as `field a vs b` items.
fn config_diff(a: &ModelConfig, b: &ModelConfig) -> String {
    let mut d = Vec::new();
    let mut field = |name: &str, x: String, y: String| {
        if x != y {
            d.push(format!("{name} {x} vs {y}"));
        }
    };
    field("channels", a.channels.to_string(), b.channels.to_string());
    field("height", a.height.to_string(), b.height.to_string());
    field("width", a.width.to_string(), b.width.to_string());
    field("squeeze", a.squeeze.to_string(), b.squeeze.to_string());
    field(
        "couplings",
        a.masks.len().to_string(),
        b.masks.len().to_string(),
    );
    let n = a.masks.len().min(b.masks.len());
    let masks = |m: &[crate::config::MaskName]| {
        let names: Vec<String> = m
            .iter()
            .map(|m| serde_json::to_value(m).map_or_else(|_| format!("{m:?}"), |v| v.to_string()))
            .map(|s| s.trim_matches('"').to_string())
            .collect();
        format!("[{}]", names.join(", "))
    };
    if a.masks[..n] != b.masks[..n] {
        field("masks", masks(&a.masks), masks(&b.masks));
    }
    field(
        "kernels",
        format!("{:?}", a.kernels),
        format!("{:?}", b.kernels),
    );
    field(
        "hidden",
        format!("{:?}", a.hidden),
        format!("{:?}", b.hidden),
    );
    field("bits", a.bits.to_string(), b.bits.to_string());
    if a.logit_alpha.to_bits() != b.logit_alpha.to_bits() {
        d.push(format!(
            "logit_alpha {} vs {}",
            a.logit_alpha, b.logit_alpha
        ));
    }
    if d.is_empty() {
        "the configurations differ".to_string()
    } else {
        d.join(", ")
    }
}

/// Verifies a checkpoint against the architecture a command asked for. The error names
/// `path` and every differing field, checkpoint value first, e.g. `couplings 8 vs 12,
/// hidden [8, 64] vs [16, 128]`.
pub fn check_arch(
    ckpt: &Checkpoint,
    expected: &ModelConfig,
    path: &Path,
) -> Result<(), CheckpointError> {
    if ckpt.model == *expected {
        Ok(())
    } else {
        Err(CheckpointError::ArchMismatch {
            path: path.to_path_buf(),
            diff: config_diff(&ckpt.model, expected),
        })
    }
}

/// Checks an in-memory checkpoint before it is written; returns the tensor specs.
fn validate_for_save(ckpt: &Checkpoint) -> Result<Vec<TensorSpec>, CheckpointError> {
    let arch = ckpt
        .model
        .to_arch()
        .map_err(|e| CheckpointError::Invalid(format!("model configuration: {e}")))?;
    let specs = tensor_specs(&arch);
    let groups = [
        ("params", "", &ckpt.params, Values::Finite),
        ("adam_m", "m.", &ckpt.adam_m, Values::Finite),
        ("adam_v", "v.", &ckpt.adam_v, Values::NonNegative),
    ];
    for (group, prefix, tensors, allowed) in groups {
        if tensors.len() != specs.len() {
            return Err(CheckpointError::Invalid(format!(
                "{group} has {} tensors, the model has {}",
                tensors.len(),
                specs.len()
            )));
        }
        for (t, s) in tensors.iter().zip(&specs) {
            if t.len() != s.len() {
                return Err(CheckpointError::Invalid(format!(
                    "{group}: tensor {prefix}{} has {} values, its shape {:?} needs {}",
                    s.name,
                    t.len(),
                    s.shape,
                    s.len()
                )));
            }
            if let Some((i, v)) = bad_value(t, allowed) {
                return Err(CheckpointError::Invalid(format!(
                    "{group}: tensor {prefix}{}: {}",
                    s.name,
                    describe_bad(i, v, allowed)
                )));
            }
        }
    }
    check_state(&ckpt.state).map_err(|e| CheckpointError::Invalid(format!("state: {e}")))?;
    Ok(specs)
}

// ---------------------------------------------------------------------------------------
// Encoding.
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct StateFileOut<'a> {
    format_version: u64,
    model: &'a ModelConfig,
    state: &'a TrainState,
}

#[derive(Deserialize)]
struct StateFileIn {
    model: ModelConfig,
    state: TrainState,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file of f32 tensors named `prefix + spec.name`.
fn encode_tensors(
    specs: &[TensorSpec],
    prefix: &str,
    tensors: &[Vec<f32>],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| f32_bytes(t)).collect();
    let mut views = Vec::with_capacity(specs.len());
    for (s, b) in specs.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, s.shape.clone(), b)
            .map_err(|e| CheckpointError::Invalid(format!("tensor {prefix}{}: {e}", s.name)))?;
        views.push((format!("{prefix}{}", s.name), view));
    }
    safetensors::serialize(views, &Some(metadata))
        .map_err(|e| CheckpointError::Invalid(format!("cannot encode safetensors: {e}")))
}

fn model_metadata(model: &ModelConfig) -> Result<HashMap<String, String>, CheckpointError> {
    let config = serde_json::to_string(model)
        .map_err(|e| CheckpointError::Invalid(format!("cannot encode the model config: {e}")))?;
    Ok(HashMap::from([
        ("format".to_string(), METADATA_FORMAT.to_string()),
        ("config".to_string(), config),
    ]))
}

// ---------------------------------------------------------------------------------------
// Saving.
// ---------------------------------------------------------------------------------------

/// Environment variable of the testing hook described in the module documentation.
pub const TEST_PAUSE_ENV: &str = "CLAYFLOW_TEST_CHECKPOINT_PAUSE";

/// The testing hook: sleeps when [`TEST_PAUSE_ENV`] is `<phase>:<ms>` for this `phase`.
/// Does nothing when the variable is unset or does not parse.
fn test_pause(phase: &str) {
    let Some(v) = std::env::var_os(TEST_PAUSE_ENV) else {
        return;
    };
    let v = v.to_string_lossy();
    let Some((at, ms)) = v.split_once(':') else {
        return;
    };
    if at == phase {
        if let Ok(ms) = ms.trim().parse::<u64>() {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

/// Removes a file or folder tree if present.
fn remove_any(path: &Path) -> Result<(), CheckpointError> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("cannot inspect {}", path.display()))(e)),
    };
    let r = if md.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    r.map_err(io_err(format!("cannot remove {}", path.display())))
}

/// Deletes a checkpoint folder so that a crash at any moment leaves either the whole
/// folder under its name or nothing under it: renames it to a hidden `.del` name first
/// (atomic), then removes that. [`prune`] removes what a crash leaves behind.
fn discard(path: &Path) -> Result<(), CheckpointError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return remove_any(path);
    };
    let trash = path.with_file_name(format!(".{}.del", name.trim_start_matches('.')));
    remove_any(&trash)?;
    rename(path, &trash)?;
    remove_any(&trash)
}

fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    fs::rename(from, to).map_err(io_err(format!(
        "cannot rename {} to {}",
        from.display(),
        to.display()
    )))
}

fn io_plain(e: io::Error) -> CheckpointError {
    // fsutil errors already name their path.
    CheckpointError::Io {
        context: "checkpoint I/O".to_string(),
        source: e,
    }
}

/// Saves `ckpt` as `run_dir/checkpoints/step-<step>/`, points `LATEST` at it and removes
/// older checkpoints beyond the newest `keep` (at least 1: the one just saved). Returns the
/// checkpoint's folder.
///
/// The checkpoint is validated first (shapes against [`tensor_specs`], finite values, a
/// finite state) so that an unloadable checkpoint is never written. Files are written into
/// `.step-<step>.tmp/` and fsynced before the folder is renamed into place; re-saving an
/// existing step moves the old folder aside and deletes it only once the new one is
/// committed. Checkpoints with a higher step than this one (left by a run resumed from an
/// earlier checkpoint) are not pruned.
pub fn save(run_dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf, CheckpointError> {
    let specs = validate_for_save(ckpt)?;
    let model_bytes = encode_tensors(&specs, "", &ckpt.params, model_metadata(&ckpt.model)?)?;
    let opt_meta = HashMap::from([
        ("format".to_string(), METADATA_FORMAT.to_string()),
        ("optimizer".to_string(), "adam".to_string()),
    ]);
    let mut opt_views = Vec::with_capacity(2 * specs.len());
    opt_views.extend(ckpt.adam_m.iter().cloned());
    opt_views.extend(ckpt.adam_v.iter().cloned());
    let mut opt_specs = Vec::with_capacity(2 * specs.len());
    for prefix in ["m.", "v."] {
        opt_specs.extend(specs.iter().map(|s| TensorSpec {
            name: format!("{prefix}{}", s.name),
            shape: s.shape.clone(),
        }));
    }
    let opt_bytes = encode_tensors(&opt_specs, "", &opt_views, opt_meta)?;
    let mut state_bytes = serde_json::to_vec_pretty(&StateFileOut {
        format_version: FORMAT_VERSION,
        model: &ckpt.model,
        state: &ckpt.state,
    })
    .map_err(|e| CheckpointError::Invalid(format!("cannot encode the state: {e}")))?;
    state_bytes.push(b'\n');

    let ckdir = run_dir.join(CHECKPOINTS_DIR);
    if !ckdir.is_dir() {
        fs::create_dir_all(&ckdir).map_err(io_err(format!("cannot create {}", ckdir.display())))?;
        fsync_dir(run_dir).map_err(io_plain)?;
    }
    let name = step_dir_name(ckpt.state.step);
    let tmp = ckdir.join(tmp_name(&name));
    remove_any(&tmp)?;
    fs::create_dir(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
    for (file, bytes) in [
        (MODEL_FILE, &model_bytes),
        (OPTIMIZER_FILE, &opt_bytes),
        (STATE_FILE, &state_bytes),
    ] {
        write_synced(&tmp.join(file), bytes).map_err(io_plain)?;
        if file == MODEL_FILE {
            test_pause("model");
        }
    }
    fsync_dir(&tmp).map_err(io_plain)?;

    let dest = ckdir.join(&name);
    let aside = ckdir.join(aside_name(&name));
    let replacing = fs::symlink_metadata(&dest).is_ok();
    if replacing {
        discard(&aside)?;
        rename(&dest, &aside)?;
        test_pause("aside");
    }
    rename(&tmp, &dest)?;
    fsync_dir(&ckdir).map_err(io_plain)?;
    test_pause("renamed");
    atomic_write(&ckdir.join(LATEST_FILE), format!("{name}\n").as_bytes()).map_err(io_plain)?;
    if replacing {
        discard(&aside)?;
    }
    prune(&ckdir, ckpt.state.step, keep).map_err(|e| match e {
        CheckpointError::Io { context, source } => CheckpointError::Io {
            context: format!("saved {}, but pruning failed: {context}", dest.display()),
            source,
        },
        other => other,
    })?;
    Ok(dest)
}

/// Removes committed checkpoints older than `step` beyond the newest `keep - 1`, and
/// leftovers of interrupted saves up to `step`.
fn prune(ckdir: &Path, step: u64, keep: usize) -> Result<(), CheckpointError> {
    let keep_older = keep.max(1) - 1;
    let latest = read_latest(ckdir).ok().flatten();
    let mut entries = list_entries(ckdir)?;
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut older_kept = 0;
    let mut removed = false;
    for (s, kind, name, path) in entries {
        if latest.as_deref() == Some(name.as_str()) {
            continue;
        }
        let remove = match kind {
            EntryKind::Step if s < step => {
                older_kept += 1;
                older_kept > keep_older
            }
            EntryKind::Step => false,
            EntryKind::Aside => s <= step,
            EntryKind::Tmp | EntryKind::Trash => true,
        };
        if remove {
            if matches!(kind, EntryKind::Step | EntryKind::Aside) {
                discard(&path)?;
            } else {
                remove_any(&path)?;
            }
            removed = true;
        }
    }
    // A process killed inside `atomic_write(LATEST)` leaves its temporary file behind.
    let stale_prefix = format!(".{LATEST_FILE}.tmp-");
    for entry in fs::read_dir(ckdir)
        .map_err(io_err(format!("cannot list {}", ckdir.display())))?
        .flatten()
    {
        let stale = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&stale_prefix));
        if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
            remove_any(&entry.path())?;
            removed = true;
        }
    }
    if removed {
        fsync_dir(ckdir).map_err(io_plain)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------------------

/// A loaded checkpoint with the folder it came from and what was skipped to get there.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The checkpoint folder it was read from.
    pub dir: PathBuf,
    /// Human-readable notes on fallbacks taken (empty when `LATEST` or the given
    /// checkpoint folder loaded directly); worth printing as warnings.
    pub notes: Vec<String>,
}

/// Loads a checkpoint. `path` may be a checkpoint folder (`RUN/checkpoints/step-N`), a run
/// folder or its `checkpoints/` folder. For a run, `LATEST` is followed; when it is
/// missing or names a missing or corrupt checkpoint, the newest checkpoint that loads is
/// used instead. Returns the checkpoint and the folder it was read from; use
/// [`load_with_notes`] to learn about fallbacks.
pub fn load(path: &Path) -> Result<(Checkpoint, PathBuf), CheckpointError> {
    let l = load_with_notes(path)?;
    Ok((l.checkpoint, l.dir))
}

/// Like [`load`], also reporting any fallback taken.
pub fn load_with_notes(path: &Path) -> Result<Loaded, CheckpointError> {
    let md = fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::NotFound {
                path: path.to_path_buf(),
                detail: "the path does not exist".to_string(),
            }
        } else {
            io_err(format!("cannot open {}", path.display()))(e)
        }
    })?;
    if !md.is_dir() {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
            detail: "expected a checkpoint folder or a run folder, found a file".to_string(),
        });
    }
    let has_files = [STATE_FILE, MODEL_FILE, OPTIMIZER_FILE]
        .iter()
        .any(|f| path.join(f).exists());
    let is_run = path.join(CHECKPOINTS_DIR).is_dir();
    let step_named = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_entry)
        .is_some();
    // A folder named like a checkpoint but holding nothing is an incomplete checkpoint:
    // load it so the error names the missing file.
    let is_ckpt_dir = has_files || (step_named && !is_run);
    if is_ckpt_dir {
        return Ok(Loaded {
            checkpoint: load_dir(path)?,
            dir: path.to_path_buf(),
            notes: Vec::new(),
        });
    }
    let ckdir = if is_run {
        path.join(CHECKPOINTS_DIR)
    } else if path.join(LATEST_FILE).exists() || !candidates(path)?.is_empty() {
        path.to_path_buf()
    } else {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
            detail: format!(
                "neither a checkpoint folder (no {STATE_FILE}) nor a run folder (no {CHECKPOINTS_DIR}/)"
            ),
        });
    };
    load_run(&ckdir)
}

/// Loads the best checkpoint of a checkpoints folder (see [`load`]).
fn load_run(ckdir: &Path) -> Result<Loaded, CheckpointError> {
    let mut notes = Vec::new();
    let mut tried = HashSet::new();
    match read_latest(ckdir) {
        Ok(Some(name)) => {
            let dir = ckdir.join(&name);
            match load_dir(&dir) {
                Ok(checkpoint) => {
                    return Ok(Loaded {
                        checkpoint,
                        dir,
                        notes,
                    })
                }
                Err(e) => notes.push(format!(
                    "{LATEST_FILE} names {name}, which cannot be used: {e}"
                )),
            }
            tried.insert(name);
        }
        Ok(None) => notes.push(format!("{} is missing", ckdir.join(LATEST_FILE).display())),
        Err(note) => notes.push(note),
    }
    let cands = candidates(ckdir)?;
    for (name, dir) in &cands {
        if tried.contains(name) {
            continue;
        }
        match load_dir(dir) {
            Ok(checkpoint) => {
                notes.push(format!("using {} instead", dir.display()));
                return Ok(Loaded {
                    checkpoint,
                    dir: dir.clone(),
                    notes,
                });
            }
            Err(e) => notes.push(format!("skipped {name}: {e}")),
        }
    }
    if cands.is_empty() && tried.is_empty() {
        Err(CheckpointError::NotFound {
            path: ckdir.to_path_buf(),
            detail: "no step-* checkpoint folders".to_string(),
        })
    } else {
        Err(CheckpointError::NoUsable {
            path: ckdir.to_path_buf(),
            detail: notes.join("; "),
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            io_err(format!("cannot read {}", path.display()))(e)
        }
    })
}

fn describe_st_error(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            "shorter than its 8-byte header length (truncated?)".into()
        }
        SafeTensorError::HeaderTooLarge => "header length is implausibly large (corrupt?)".into(),
        SafeTensorError::InvalidHeaderLength => {
            "header length runs past the end of the file (truncated?)".into()
        }
        SafeTensorError::InvalidHeader => "header is not UTF-8 text (corrupt?)".into(),
        SafeTensorError::InvalidHeaderDeserialization => {
            "header is not valid safetensors JSON (corrupt?)".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not match the file size (truncated or trailing bytes?)".into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name} has invalid data offsets (corrupt?)")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data size does not match its shape and dtype".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows (corrupt?)".into(),
        other => format!("{other:?}"),
    }
}

/// A tensor a file must hold: name, shape and allowed values.
type Expected<'a> = (String, &'a [usize], Values);

/// A safetensors file's `__metadata__` and its tensors.
type TensorFile = (HashMap<String, String>, Vec<Vec<f32>>);

/// Reads `path` as exactly the f32 tensors of `expected` (no more, no fewer). Returns the
/// metadata and the tensors in the order of `expected`.
fn read_tensors(path: &Path, expected: &[Expected<'_>]) -> Result<TensorFile, CheckpointError> {
    let bytes = read_file(path)?;
    let (n, meta): (usize, Metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            CheckpointError::Safetensors {
                path: path.to_path_buf(),
                detail: describe_st_error(&e),
            }
        })?;
    let data = bytes.get(8 + n..).unwrap_or(&[]);
    let tensor_err = |tensor: &str, problem: String| CheckpointError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        problem,
    };
    let mut out = Vec::with_capacity(expected.len());
    for (name, shape, allowed) in expected {
        let info = meta
            .info(name)
            .ok_or_else(|| tensor_err(name, "missing".to_string()))?;
        if info.dtype != Dtype::F32 {
            return Err(tensor_err(
                name,
                format!("dtype {:?}, expected F32", info.dtype),
            ));
        }
        if info.shape.as_slice() != *shape {
            return Err(tensor_err(
                name,
                format!("shape {:?}, expected {:?}", info.shape, shape),
            ));
        }
        let (s, e) = info.data_offsets;
        let raw = data
            .get(s..e)
            .filter(|r| r.len() == shape.iter().product::<usize>() * 4)
            .ok_or_else(|| tensor_err(name, "data offsets out of range".to_string()))?;
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some((i, v)) = bad_value(&values, *allowed) {
            return Err(tensor_err(name, describe_bad(i, v, *allowed)));
        }
        out.push(values);
    }
    if meta.tensors().len() != expected.len() {
        let known: HashSet<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
        let mut extra: Vec<String> = meta
            .tensors()
            .into_keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        extra.sort();
        let first = extra.first().cloned().unwrap_or_default();
        let more = if extra.len() > 1 {
            format!(" ({} more unexpected tensors)", extra.len() - 1)
        } else {
            String::new()
        };
        return Err(tensor_err(
            &first,
            format!("not part of the model (unexpected){more}"),
        ));
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    if let Some(f) = metadata.get("format") {
        if f != METADATA_FORMAT {
            return Err(CheckpointError::Metadata {
                path: path.to_path_buf(),
                detail: format!("format is {f:?}, expected {METADATA_FORMAT:?}"),
            });
        }
    }
    Ok((metadata, out))
}

/// Loads exactly the checkpoint in folder `dir`, validating every file; no fallback.
pub fn load_dir(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    let text = read_file(&state_path)?;
    let json_err = |source| CheckpointError::Json {
        path: state_path.clone(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(json_err)?;
    match value.get("format_version") {
        Some(v) if v.as_u64() == Some(FORMAT_VERSION) => {}
        found => {
            return Err(CheckpointError::FormatVersion {
                path: state_path,
                found: found.map_or_else(|| "missing".to_string(), |v| v.to_string()),
            })
        }
    }
    let file: StateFileIn = serde_json::from_value(value).map_err(json_err)?;
    let arch = file
        .model
        .to_arch()
        .map_err(|source| CheckpointError::Config {
            path: state_path.clone(),
            source,
        })?;
    check_state(&file.state).map_err(|detail| CheckpointError::State {
        path: state_path.clone(),
        detail,
    })?;
    let specs = tensor_specs(&arch);

    let model_path = dir.join(MODEL_FILE);
    let expected: Vec<_> = specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.as_slice(), Values::Finite))
        .collect();
    let (metadata, params) = read_tensors(&model_path, &expected)?;
    if let Some(config) = metadata.get("config") {
        let meta_model: ModelConfig =
            serde_json::from_str(config).map_err(|e| CheckpointError::Metadata {
                path: model_path.clone(),
                detail: format!("config is not a model configuration: {e}"),
            })?;
        if meta_model != file.model {
            return Err(CheckpointError::ConfigMismatch {
                path: model_path,
                state: state_path,
                diff: config_diff(&meta_model, &file.model),
            });
        }
    }

    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut expected = Vec::with_capacity(2 * specs.len());
    for (prefix, allowed) in [("m.", Values::Finite), ("v.", Values::NonNegative)] {
        expected.extend(
            specs
                .iter()
                .map(|s| (format!("{prefix}{}", s.name), s.shape.as_slice(), allowed)),
        );
    }
    let (_, mut moments) = read_tensors(&opt_path, &expected)?;
    let adam_v = moments.split_off(specs.len());
    Ok(Checkpoint {
        model: file.model,
        params,
        adam_m: moments,
        adam_v,
        state: file.state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MaskName;
    use proptest::prelude::*;
    use safetensors::SafeTensors;
    use std::sync::OnceLock;

    /// A 1x4x4 image squeezed to 4x2x2, two small couplings: fast to save and load.
    fn tiny() -> ModelConfig {
        ModelConfig {
            channels: 1,
            height: 4,
            width: 4,
            squeeze: true,
            levels: 1,
            glow: false,
            masks: vec![MaskName::ChannelEven, MaskName::ChannelOdd],
            kernels: [3, 1, 3],
            hidden: [3, 2],
            bits: 8,
            logit_alpha: 0.05,
        }
    }

    /// SplitMix64: deterministic pseudo-random values.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// A finite f32 with arbitrary bits (any sign, exponent, subnormals).
        fn any_finite(&mut self) -> f32 {
            loop {
                let v = f32::from_bits(self.next() as u32);
                if v.is_finite() {
                    return v;
                }
            }
        }
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            epoch: step / 100,
            batch_in_epoch: step % 100,
            seed: 0xDEAD_BEEF_1234_5678,
            lr: 1e-3,
            lr_scale: 0.5,
            warmup_steps: 200,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 100.0,
            batch_size: 64,
            elapsed_secs: 1234.5625,
            best_val_bpd: Some(1.0625),
            last_val_bpd: None,
            dataset: "mnist:/data/mnist \"quoted\" ünïcode".to_string(),
            nonfinite_skips: 3,
            restores: 1,
        }
    }

    fn make(model: ModelConfig, seed: u64, step: u64) -> Checkpoint {
        let specs = tensor_specs(&model.to_arch().unwrap());
        let mut rng = Rng(seed);
        let mut gen = |f: &mut dyn FnMut(&mut Rng) -> f32| -> Vec<Vec<f32>> {
            specs
                .iter()
                .map(|s| (0..s.len()).map(|_| f(&mut rng)).collect())
                .collect()
        };
        let mut params = gen(&mut |r| r.any_finite());
        // Values whose bits must survive exactly.
        params[0][0] = -0.0;
        let n = params[0].len();
        params[0][1 % n] = f32::from_bits(1); // smallest subnormal
        let adam_m = gen(&mut |r| r.unit() - 0.5);
        let adam_v = gen(&mut |r| r.unit() * 1e-3);
        Checkpoint {
            model,
            params,
            adam_m,
            adam_v,
            state: state(step),
        }
    }

    fn bits(v: &[Vec<f32>]) -> Vec<u32> {
        v.iter().flatten().map(|x| x.to_bits()).collect()
    }

    fn assert_same(a: &Checkpoint, b: &Checkpoint) {
        assert_eq!(a.model, b.model);
        assert_eq!(a.state, b.state);
        assert_eq!(bits(&a.params), bits(&b.params));
        assert_eq!(bits(&a.adam_m), bits(&b.adam_m));
        assert_eq!(bits(&a.adam_v), bits(&b.adam_v));
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn latest_text(run: &Path) -> String {
        fs::read_to_string(run.join("checkpoints/LATEST")).unwrap()
    }

    type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

    /// Rewrites a safetensors file after `f` edits its tensors and metadata.
    fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<RawTensor>, &mut HashMap<String, String>)) {
        let bytes = fs::read(path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut md = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut ts: Vec<RawTensor> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        f(&mut ts, &mut md);
        let views: Vec<(String, TensorView)> = ts
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let md = if md.is_empty() { None } else { Some(md) };
        fs::write(path, safetensors::serialize(views, &md).unwrap()).unwrap();
    }

    fn saved_tiny() -> (tempfile::TempDir, PathBuf, Checkpoint) {
        let tmp = tempfile::tempdir().unwrap();
        let c = make(tiny(), 7, 500);
        let dir = save(tmp.path(), &c, 3).unwrap();
        (tmp, dir, c)
    }

    fn load_err(dir: &Path) -> String {
        load(dir).unwrap_err().to_string()
    }

    #[test]
    fn mnist_round_trip_is_bit_exact() {
        let model = ModelConfig::preset("mnist").unwrap();
        let c = make(model, 42, 500);
        let tmp = tempfile::tempdir().unwrap();
        let dir = save(tmp.path(), &c, 3).unwrap();
        assert_eq!(dir, tmp.path().join("checkpoints/step-00000500"));
        assert_eq!(
            names(&dir),
            vec!["model.safetensors", "optimizer.safetensors", "state.json"]
        );
        let (back, from) = load(&dir).unwrap();
        assert_eq!(from, dir);
        assert_same(&c, &back);
        assert_eq!(back, c);
        assert_eq!(
            back.flat_params().len(),
            clayflow_kernel::MNIST.param_count()
        );
    }

    #[test]
    fn tiny_round_trip_flat_params_and_unflatten() {
        let (tmp, dir, c) = saved_tiny();
        let (back, from) = load(tmp.path()).unwrap();
        assert_eq!(from, dir);
        assert_same(&c, &back);
        let flat = back.flat_params();
        assert_eq!(flat.len(), tiny().to_arch().unwrap().param_count());
        assert_eq!(unflatten(&tiny(), &flat).unwrap(), c.params);
        assert!(unflatten(&tiny(), &flat[1..]).is_err());
        // state.json is pretty-printed and versioned.
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\n  \"format_version\": 1,"), "{text}");
        // The checkpoints folder itself is accepted too.
        assert_eq!(load(&tmp.path().join("checkpoints")).unwrap().1, dir);
    }

    #[test]
    fn state_floats_survive_json() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Rng(99);
        let mut c = make(tiny(), 5, 1);
        for i in 0..50 {
            c.state.step = i;
            c.state.lr = rng.any_finite();
            c.state.eps = rng.any_finite();
            c.state.beta2 = 1.0 - rng.unit() * 1e-3;
            c.state.elapsed_secs = f64::from(rng.unit()) * 1e5 + rng.next() as f64 * 1e-20;
            c.state.best_val_bpd = Some(rng.next() as f64 / u64::MAX as f64 * 8.0);
            let dir = save(tmp.path(), &c, 1).unwrap();
            let back = load(&dir).unwrap().0.state;
            assert_eq!(back.lr.to_bits(), c.state.lr.to_bits());
            assert_eq!(back.eps.to_bits(), c.state.eps.to_bits());
            assert_eq!(back.beta2.to_bits(), c.state.beta2.to_bits());
            // f64: exact with serde_json's `float_roundtrip`, else within 2 ulp.
            let ulps = |a: f64, b: f64| (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps(back.elapsed_secs, c.state.elapsed_secs) <= 2);
            assert!(ulps(back.best_val_bpd.unwrap(), c.state.best_val_bpd.unwrap()) <= 2);
        }
    }

    #[test]
    fn model_file_is_readable_by_the_safetensors_crate() {
        let (_tmp, dir, c) = saved_tiny();
        let specs = tensor_specs(&tiny().to_arch().unwrap());
        let bytes = fs::read(dir.join(MODEL_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), specs.len());
        for (s, p) in specs.iter().zip(&c.params) {
            let t = st.tensor(&s.name).unwrap();
            assert_eq!(t.dtype(), Dtype::F32);
            assert_eq!(t.shape(), s.shape.as_slice());
            assert_eq!(t.data(), f32_bytes(p).as_slice());
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().as_ref().unwrap();
        assert_eq!(md["format"], "clayflow");
        let cfg: ModelConfig = serde_json::from_str(&md["config"]).unwrap();
        assert_eq!(cfg, tiny());

        let bytes = fs::read(dir.join(OPTIMIZER_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 2 * specs.len());
        for (i, s) in specs.iter().enumerate() {
            let m = st.tensor(&format!("m.{}", s.name)).unwrap();
            let v = st.tensor(&format!("v.{}", s.name)).unwrap();
            assert_eq!(m.shape(), s.shape.as_slice());
            assert_eq!(v.dtype(), Dtype::F32);
            assert_eq!(m.data(), f32_bytes(&c.adam_m[i]).as_slice());
            assert_eq!(v.data(), f32_bytes(&c.adam_v[i]).as_slice());
        }
    }

    #[test]
    fn latest_is_updated_and_keep_prunes_older() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        assert_eq!(latest(run).unwrap(), None);
        for step in [100, 200, 300] {
            let dir = save(run, &make(tiny(), step, step), 2).unwrap();
            assert_eq!(latest_text(run), format!("step-{step:08}\n"));
            assert_eq!(latest(run).unwrap(), Some(dir));
        }
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000200", "step-00000300"]
        );
        let (c, _) = load(run).unwrap();
        assert_eq!(c.state.step, 300);
        // keep = 0 still keeps the checkpoint just written.
        save(run, &make(tiny(), 1, 400), 0).unwrap();
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000400"]
        );
    }

    #[test]
    fn a_half_deleted_checkpoint_is_never_loaded_and_is_cleaned_up() {
        // What a process killed while pruning leaves behind: the folder was renamed to
        // `.del` (atomic) and then partly removed.
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c = make(tiny(), 1, 100);
        let d = save(run, &c, 3).unwrap();
        let ck = run.join("checkpoints");
        for name in [".step-00000300.del", ".step-00000200.old.del"] {
            let trash = ck.join(name);
            fs::create_dir(&trash).unwrap();
            fs::copy(d.join(MODEL_FILE), trash.join(MODEL_FILE)).unwrap();
        }
        assert_eq!(
            parse_entry(".step-00000300.del"),
            Some((300, EntryKind::Trash))
        );
        assert_eq!(
            parse_entry(".step-00000200.old.del"),
            Some((200, EntryKind::Trash))
        );
        fs::remove_file(ck.join(LATEST_FILE)).unwrap();
        assert_eq!(latest(run).unwrap(), Some(d.clone()));
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d);
        assert_same(&l.checkpoint, &c);
        save(run, &make(tiny(), 2, 200), 3).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000100", "step-00000200"]);
        // Pruning itself goes through `.del`: nothing is left under the old name.
        save(run, &make(tiny(), 3, 300), 1).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000300"]);
    }

    #[test]
    fn a_stale_latest_temporary_is_removed_by_the_next_save() {
        // What a process killed inside atomic_write(LATEST) leaves behind.
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        save(run, &make(tiny(), 1, 100), 3).unwrap();
        let ck = run.join("checkpoints");
        fs::write(ck.join(".LATEST.tmp-999999"), b"step-000").unwrap();
        assert_eq!(load(run).unwrap().0.state.step, 100);
        save(run, &make(tiny(), 2, 200), 3).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000100", "step-00000200"]);
    }

    #[test]
    fn pruning_spares_newer_checkpoints_of_an_earlier_branch() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        save(run, &make(tiny(), 1, 1000), 1).unwrap();
        save(run, &make(tiny(), 2, 400), 1).unwrap();
        save(run, &make(tiny(), 3, 500), 1).unwrap();
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000500", "step-00001000"]
        );
        assert_eq!(load(run).unwrap().0.state.step, 500);
    }

    #[test]
    fn resaving_the_same_step_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        save(run, &make(tiny(), 1, 100), 3).unwrap();
        let first = save(run, &make(tiny(), 2, 200), 3).unwrap();
        let newer = make(tiny(), 3, 200);
        let again = save(run, &newer, 3).unwrap();
        assert_eq!(first, again);
        assert_same(&load(run).unwrap().0, &newer);
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000100", "step-00000200"]
        );
    }

    #[test]
    fn stale_tmp_folders_are_ignored_and_replaced() {
        let (tmp, dir, c) = saved_tiny();
        let ck = tmp.path().join("checkpoints");
        // An interrupted save of a newer step, complete-looking or not, is never loaded.
        let stale = ck.join(".step-00000600.tmp");
        fs::create_dir(&stale).unwrap();
        for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            fs::copy(dir.join(f), stale.join(f)).unwrap();
        }
        fs::remove_file(ck.join(LATEST_FILE)).unwrap();
        let l = load_with_notes(tmp.path()).unwrap();
        assert_eq!(l.dir, dir);
        assert!(
            l.notes.iter().any(|n| n.contains("LATEST")),
            "{:?}",
            l.notes
        );
        assert_eq!(latest(tmp.path()).unwrap(), Some(dir.clone()));
        // A stale tmp of the step being saved is replaced; leftovers are cleaned up.
        fs::create_dir(ck.join(".step-00000700.tmp")).unwrap();
        fs::write(ck.join(".step-00000700.tmp/junk"), b"x").unwrap();
        let mut c7 = c.clone();
        c7.state.step = 700;
        save(tmp.path(), &c7, 5).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000500", "step-00000700"]);
    }

    #[test]
    fn truncated_or_garbage_model_file_is_named() {
        let (_tmp, dir, _) = saved_tiny();
        let p = dir.join(MODEL_FILE);
        let bytes = fs::read(&p).unwrap();
        for cut in [0, 5, 8, 100, bytes.len() - 1] {
            fs::write(&p, &bytes[..cut]).unwrap();
            let e = load_err(&dir);
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains("safetensors"), "{e}");
        }
        fs::write(&p, b"garbage garbage garbage garbage").unwrap();
        assert!(load_err(&dir).contains("model.safetensors"));
        let mut extra = bytes.clone();
        extra.push(0);
        fs::write(&p, &extra).unwrap();
        assert!(load_err(&dir).contains("trailing"));
        fs::remove_file(&p).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("model.safetensors") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn run_load_falls_back_past_a_corrupt_newest_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c1 = make(tiny(), 1, 100);
        let d1 = save(run, &c1, 5).unwrap();
        let d2 = save(run, &make(tiny(), 2, 200), 5).unwrap();
        let p = d2.join(MODEL_FILE);
        let len = fs::metadata(&p).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d1);
        assert_same(&l.checkpoint, &c1);
        let notes = l.notes.join("\n");
        assert!(notes.contains("step-00000200"), "{notes}");
        assert!(notes.contains("model.safetensors"), "{notes}");
        // Naming the corrupt checkpoint itself gives no fallback.
        assert!(load_err(&d2).contains("model.safetensors"));
        // With every checkpoint broken, the error lists why.
        fs::remove_file(d1.join(STATE_FILE)).unwrap();
        let e = load_err(run);
        assert!(e.contains("no usable checkpoint"), "{e}");
        assert!(e.contains("state.json"), "{e}");
    }

    #[test]
    fn run_load_skips_incomplete_dirs_and_bad_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c1 = make(tiny(), 1, 100);
        let d1 = save(run, &c1, 5).unwrap();
        let ck = run.join("checkpoints");
        // A newer folder missing state.json (e.g. copied by hand), LATEST gone.
        let d3 = ck.join("step-00000300");
        fs::create_dir(&d3).unwrap();
        fs::copy(d1.join(MODEL_FILE), d3.join(MODEL_FILE)).unwrap();
        fs::remove_file(ck.join(LATEST_FILE)).unwrap();
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d1);
        assert!(l.notes.iter().any(|n| n.contains("skipped step-00000300")));
        assert!(load_err(&d3).contains("state.json"));
        // LATEST with garbage (or a path escape) is not followed.
        fs::write(ck.join(LATEST_FILE), b"../../etc\n").unwrap();
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d1);
        assert!(
            l.notes[0].contains("does not name a checkpoint"),
            "{:?}",
            l.notes
        );
        // LATEST naming a folder that vanished.
        fs::write(ck.join(LATEST_FILE), b"step-00000900\n").unwrap();
        assert_eq!(load(run).unwrap().1, d1);
        assert_eq!(latest(run).unwrap(), Some(d3));
    }

    #[test]
    fn an_old_copy_moved_aside_is_recovered() {
        // A crash while re-saving step 100, between moving the old copy aside and moving
        // the new one in, leaves `.step-00000100.old` and a LATEST naming a missing folder.
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c = make(tiny(), 1, 100);
        let d = save(run, &c, 5).unwrap();
        let aside = run.join("checkpoints/.step-00000100.old");
        fs::rename(&d, &aside).unwrap();
        let (back, from) = load(run).unwrap();
        assert_eq!(from, aside);
        assert_same(&back, &c);
        // The next save cleans it up.
        save(run, &make(tiny(), 2, 100), 5).unwrap();
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000100"]
        );
    }

    #[test]
    fn non_checkpoint_paths_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let e = load_err(tmp.path());
        assert!(e.contains("neither a checkpoint folder"), "{e}");
        let e = load_err(&tmp.path().join("nope"));
        assert!(e.contains("does not exist"), "{e}");
        fs::create_dir(tmp.path().join("checkpoints")).unwrap();
        assert!(load_err(tmp.path()).contains("no step-* checkpoint"));
        assert_eq!(latest(tmp.path()).unwrap(), None);
    }

    #[test]
    fn state_json_problems_are_reported() {
        let (_tmp, dir, c) = saved_tiny();
        let p = dir.join(STATE_FILE);
        let good = fs::read_to_string(&p).unwrap();
        let check = |text: &str, want: &str| {
            fs::write(&p, text).unwrap();
            let e = load_err(&dir);
            assert!(e.contains("state.json"), "{e}");
            assert!(e.contains(want), "{want:?} not in {e}");
        };
        check("{ not json", "cannot parse");
        check(
            &good.replace("\"format_version\": 1", "\"format_version\": 2"),
            "format_version 2",
        );
        check(
            &good.replace("\"format_version\": 1,", ""),
            "format_version missing",
        );
        check(
            &good.replace("\"step\": 500", "\"stepp\": 500"),
            "missing field `step`",
        );
        let mut bad = c.model.clone();
        bad.masks.clear();
        let v = serde_json::json!({"format_version": 1, "model": bad, "state": c.state});
        check(&v.to_string(), "invalid model configuration");
        check(&good.replace("\"lr\": 0.001", "\"lr\": 1e300"), "lr is inf");
        fs::write(&p, &good).unwrap();
        assert_same(&load(&dir).unwrap().0, &c);
    }

    #[test]
    fn tensor_problems_name_file_and_tensor() {
        let (_tmp, dir, _) = saved_tiny();
        let model = dir.join(MODEL_FILE);
        let opt = dir.join(OPTIMIZER_FILE);
        let orig_model = fs::read(&model).unwrap();
        let orig_opt = fs::read(&opt).unwrap();
        let restore = || {
            fs::write(&model, &orig_model).unwrap();
            fs::write(&opt, &orig_opt).unwrap();
        };
        let check = |want: &[&str]| {
            let e = load_err(&dir);
            for w in want {
                assert!(e.contains(w), "{w:?} not in {e}");
            }
            restore();
        };
        let name = "coupling.1.conv2.weight";

        rewrite(&model, |ts, _| ts.retain(|t| t.0 != name));
        check(&["model.safetensors", name, "missing"]);

        rewrite(&model, |ts, _| {
            ts.push(("extra.bias".into(), Dtype::F32, vec![1], vec![0; 4]))
        });
        check(&["model.safetensors", "extra.bias", "unexpected"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.1 = Dtype::I32;
        });
        check(&["model.safetensors", name, "dtype I32"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.1 = Dtype::F64;
            t.2 = vec![t.3.len() / 8];
        });
        check(&[name, "dtype F64"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.2 = vec![t.3.len() / 4];
        });
        check(&[name, "shape"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        });
        check(&["model.safetensors", name, "NaN at index 1"]);

        rewrite(&model, |_, md| {
            let mut other = tiny();
            other.hidden = [5, 2];
            md.insert("config".into(), serde_json::to_string(&other).unwrap());
        });
        check(&["model.safetensors", "state.json", "hidden [5, 2] vs [3, 2]"]);

        rewrite(&model, |_, md| {
            md.insert("config".into(), "{}".into());
        });
        check(&["model.safetensors", "config is not a model configuration"]);

        rewrite(&model, |_, md| {
            md.insert("format".into(), "other".into());
        });
        check(&["model.safetensors", "format is \"other\""]);

        // Metadata is optional (a file re-saved from PyTorch without it still loads).
        rewrite(&model, |_, md| md.clear());
        load(&dir).unwrap();
        restore();

        rewrite(&opt, |ts, _| ts.retain(|t| t.0 != format!("v.{name}")));
        check(&["optimizer.safetensors", &format!("v.{name}"), "missing"]);

        rewrite(&opt, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == format!("v.{name}")).unwrap();
            t.3[0..4].copy_from_slice(&(-1.0f32).to_le_bytes());
        });
        check(&["optimizer.safetensors", "non-negative"]);

        // The optimizer file of another model.
        rewrite(&opt, |ts, _| {
            for t in ts.iter_mut() {
                t.0 = t.0.replacen("coupling.", "layer.", 1);
            }
        });
        check(&["optimizer.safetensors", "m.coupling.0.scale", "missing"]);
        load(&dir).unwrap();
    }

    #[test]
    fn check_arch_names_both_architectures() {
        let model = ModelConfig::preset("mnist").unwrap();
        let c = Checkpoint {
            model: model.clone(),
            params: Vec::new(),
            adam_m: Vec::new(),
            adam_v: Vec::new(),
            state: state(1),
        };
        let path = Path::new("RUN/checkpoints/step-00000001");
        check_arch(&c, &model, path).unwrap();
        let mut want = model.clone();
        want.masks.truncate(8);
        want.hidden = [16, 128];
        let e = check_arch(&c, &want, path).unwrap_err().to_string();
        assert_eq!(
            e,
            "checkpoint RUN/checkpoints/step-00000001: architecture differs from the \
             requested model: couplings 12 vs 8, hidden [8, 64] vs [16, 128]"
        );
        let mut want = model.clone();
        want.masks[3] = MaskName::CheckerEven;
        want.logit_alpha = 0.1;
        let e = check_arch(&c, &want, path).unwrap_err().to_string();
        assert!(e.contains("masks [channel-even, channel-odd"), "{e}");
        assert!(e.contains("checker-even"), "{e}");
        assert!(e.contains("logit_alpha 0.05 vs 0.1"), "{e}");
    }

    #[test]
    fn save_refuses_inconsistent_checkpoints_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let good = make(tiny(), 1, 10);
        let mut cases = Vec::new();
        let mut c = good.clone();
        c.params.pop();
        cases.push((c, "params has"));
        let mut c = good.clone();
        c.adam_m[2].push(0.0);
        cases.push((c, "m.coupling.0.conv0.bias"));
        let mut c = good.clone();
        c.params[4][0] = f32::INFINITY;
        cases.push((c, "coupling.0.conv1.bias"));
        let mut c = good.clone();
        c.adam_v[0][0] = -1e-9;
        cases.push((c, "v.coupling.0.scale"));
        let mut c = good.clone();
        c.state.lr = f32::NAN;
        cases.push((c, "lr is NaN"));
        let mut c = good.clone();
        c.state.best_val_bpd = Some(f64::INFINITY);
        cases.push((c, "best_val_bpd"));
        let mut c = good.clone();
        c.model.bits = 0;
        cases.push((c, "model configuration"));
        for (c, want) in cases {
            let e = save(&run, &c, 2).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        assert!(!run.exists());
    }

    #[test]
    fn save_into_an_unwritable_place_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file.txt");
        fs::write(&file, b"x").unwrap();
        let e = save(&file.join("sub"), &make(tiny(), 1, 1), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file.txt"), "{e}");
    }

    /// The three files of a saved tiny checkpoint.
    fn base_files() -> &'static [Vec<u8>; 3] {
        static FILES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
        FILES.get_or_init(|| {
            let (_tmp, dir, _) = saved_tiny();
            [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].map(|f| fs::read(dir.join(f)).unwrap())
        })
    }

    #[derive(Clone, Debug)]
    enum Damage {
        Truncate(usize),
        Flip(usize, u8),
        Set(usize, u8),
        Append(Vec<u8>),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            any::<usize>().prop_map(Damage::Truncate),
            (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
            // Header bytes: the first few hundred.
            (0usize..600, any::<u8>()).prop_map(|(i, x)| Damage::Set(i, x)),
            proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn damaged_files_never_panic(
            file in 0usize..3,
            hits in proptest::collection::vec(damage(), 1..4),
        ) {
            let base = base_files();
            let mut bytes = base[file].clone();
            for d in &hits {
                match d {
                    Damage::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
                    Damage::Flip(i, x) if !bytes.is_empty() => {
                        let n = bytes.len();
                        bytes[i % n] ^= x;
                    }
                    Damage::Set(i, x) if *i < bytes.len() => bytes[*i] = *x,
                    Damage::Append(extra) => bytes.extend_from_slice(extra),
                    _ => {}
                }
            }
            let tmp = tempfile::tempdir().unwrap();
            let ck = tmp.path().join("checkpoints");
            let dir = ck.join("step-00000500");
            fs::create_dir_all(&dir).unwrap();
            for (i, f) in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].iter().enumerate() {
                let b = if i == file { &bytes } else { &base[i] };
                fs::write(dir.join(f), b).unwrap();
            }
            fs::write(ck.join(LATEST_FILE), b"step-00000500\n").unwrap();
            match load(&dir) {
                Ok((c, _)) => {
                    // Anything accepted is fully valid.
                    prop_assert!(validate_for_save(&c).is_ok());
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("step-00000500"), "{}", msg);
                }
            }
            let _ = load_with_notes(tmp.path());
        }
    }
}
