//! The training loop: Adam with warm-up and gradient-norm clipping on the mean bits/dim,
//! periodic validation and checkpoints, recovery from non-finite steps, and resume.
//!
//! Everything random is a pure function of `(seed, step)` or `(seed, epoch)`: the epoch's
//! shuffle, each step's dequantization noise, the validation noise. A run resumed from a
//! checkpoint therefore takes exactly the steps the uninterrupted run would have taken.

use crate::backend::{AdamStep, Backend, Buffer};
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::config::ModelConfig;
use crate::data::{epoch_order, Dataset};
use crate::fsutil;
use crate::model::{bpd, init_params, Flow};
use crate::report::{self, MetricRecord, MetricsLog};
use anyhow::{bail, Context, Result};
use clayflow_kernel::{preprocess::dequantize, Pcg32, Rng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Seed of the fixed dequantization noise used for every validation / evaluation score, so
/// scores are comparable across runs, checkpoints, and the kernel.
pub const EVAL_NOISE_SEED: u64 = 0x5eed_e7a1;

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
    /// Images per step.
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
    /// Mean training throughput of this session, images/s.
    pub images_per_sec: f64,
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

/// Uniform in `[0, 1)` with 24 bits.
fn uniform01(rng: &mut Pcg32) -> f32 {
    (rng.next_u32() >> 8) as f32 / 16_777_216.0
}

/// The fixed evaluation noise of image `i` (see [`EVAL_NOISE_SEED`]).
pub fn eval_noise(i: usize) -> Pcg32 {
    Pcg32::with_stream(EVAL_NOISE_SEED, i as u64)
}

/// Dequantizes image `i` with its fixed evaluation noise.
pub fn eval_u(ds: &Dataset, i: usize, bits: u32, out: &mut [f32]) -> Result<()> {
    let img = ds.get(i).context("image index out of range")?;
    let mut rng = eval_noise(i);
    dequantize(img, bits, |_| uniform01(&mut rng), out)
        .map_err(|e| anyhow::anyhow!("image {i}: {e}"))
}

/// Mean bits/dim of `flow` on `ds` with the fixed evaluation noise, in batches of `batch`
/// (the last batch padded by repeating images; padding is not scored).
pub fn evaluate(flow: &mut Flow, ds: &Dataset, batch: usize) -> Result<f64> {
    let d = ds.image_len();
    let arch = *flow.arch();
    if ds.is_empty() {
        bail!("cannot evaluate on an empty data set");
    }
    let mut total = 0.0;
    let mut u = vec![0.0f32; batch * d];
    let mut start = 0;
    while start < ds.len() {
        let n = batch.min(ds.len() - start);
        for k in 0..batch {
            let i = start + k.min(n - 1);
            eval_u(ds, i, arch.bits, &mut u[k * d..(k + 1) * d])?;
        }
        let stats = flow.forward(&u, batch)?;
        total += stats.log_prob[..n]
            .iter()
            .map(|lp| bpd(&arch, *lp))
            .sum::<f64>();
        start += n;
    }
    Ok(total / ds.len() as f64)
}

/// Draws `n` samples from `flow` at `temperature` (latents from the kernel's generator
/// seeded with `seed`, one stream per image) and returns the quantised pixels.
pub fn sample_pixels(flow: &mut Flow, n: usize, temperature: f32, seed: u64) -> Result<Vec<u8>> {
    let arch = *flow.arch();
    let d = arch.dim();
    let mut z = vec![0.0f32; n * d];
    for (i, chunk) in z.chunks_mut(d).enumerate() {
        let mut normal = clayflow_kernel::Normal::new(Pcg32::with_stream(seed, i as u64));
        normal
            .fill(chunk, temperature)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let u = flow.inverse(&z, n)?;
    let mut pixels = vec![0u8; u.len()];
    clayflow_kernel::preprocess::quantize(&u, arch.bits, &mut pixels)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(pixels)
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

fn state_of(cfg: &TrainConfig) -> TrainState {
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
/// `val`.
pub fn train(
    backend: Arc<dyn Backend>,
    cfg: &TrainConfig,
    train_set: &Dataset,
    val_set: &Dataset,
    run_dir: &Path,
    resume: bool,
    progress: &mut dyn Progress,
) -> Result<Outcome> {
    let arch = cfg.model.to_arch()?;
    if cfg.batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    if train_set.len() < cfg.batch_size {
        bail!(
            "the training set has {} images, fewer than one batch of {}; lower --batch-size",
            train_set.len(),
            cfg.batch_size
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
    // Fail now, not after an hour, if the run folder cannot be written.
    fsutil::check_writable_dir(run_dir)?;
    let metrics_path = run_dir.join("metrics.jsonl");

    let (params, adam_host, mut state) = if resume {
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
        if metrics_path.exists() {
            report::truncate_after_step(&metrics_path, c.state.step)?;
        }
        (c.params, Some((c.adam_m, c.adam_v)), c.state)
    } else {
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
        if metrics_path.exists() {
            std::fs::remove_file(&metrics_path)?;
        }
        (init_params(&arch, cfg.seed), None, state_of(cfg))
    };
    let mut metrics = MetricsLog::open(&metrics_path)?;
    let mut flow = Flow::new(backend.clone(), arch, &params)?;
    let mut adam = match adam_host {
        Some((m, v)) => Adam {
            m: upload_all(backend.as_ref(), &m)?,
            v: upload_all(backend.as_ref(), &v)?,
        },
        None => Adam {
            m: flow.zeros_like_params()?,
            v: flow.zeros_like_params()?,
        },
    };
    let mut grads = flow.zeros_like_params()?;
    // The 1x1 convolutions' permutations and signs are fixed: the optimiser skips them.
    let trainable = flow.trainable();

    let save = |flow: &Flow, adam: &Adam, state: &TrainState| -> Result<PathBuf> {
        let ck = Checkpoint {
            model: cfg.model.clone(),
            params: flow.params_host()?,
            adam_m: to_host(backend.as_ref(), &adam.m)?,
            adam_v: to_host(backend.as_ref(), &adam.v)?,
            state: state.clone(),
        };
        Ok(checkpoint::save(run_dir, &ck, cfg.keep)?)
    };
    if !resume {
        if arch.glow {
            // ActNorm's data-dependent initialisation on the first training batch (the one
            // step 0 will see), before the step-0 checkpoint so a resume never redoes it.
            let n = cfg.batch_size.min(train_set.len()).max(1);
            let idx = &epoch_order(train_set.len(), cfg.seed, 0)[..n];
            let mut noise = Pcg32::with_stream(cfg.seed ^ 0xd1ce, 0);
            let mut u0 = Vec::new();
            dequantize_batch(train_set, idx, arch.bits, &mut noise, &mut u0)?;
            let stats = flow.data_init(&u0, n)?;
            progress.note(&format!(
                "ActNorm initialised from {n} images (initial loss {:.4} bits/dim)",
                stats.mean_bpd
            ));
        }
        // Step 0: there is always a last good checkpoint to go back to.
        save(&flow, &adam, &state)?;
    }

    let bs = cfg.batch_size;
    let steps_per_epoch = (train_set.len() / bs) as u64;
    let total_steps = [cfg.epochs.map(|e| e * steps_per_epoch), cfg.max_steps]
        .into_iter()
        .flatten()
        .min();
    let budget_secs = cfg.minutes.map(|m| m * 60.0);
    let session_start = Instant::now();
    let elapsed_before = state.elapsed_secs;
    let start_step = state.step;
    let mut last_ckpt = Instant::now();
    let mut u = Vec::new();
    let mut bad_in_a_row = 0u32;
    let mut running = (0.0f64, 0u64);
    let mut window_start = Instant::now();
    let mut window_images = 0u64;
    let mut order_epoch = u64::MAX;
    let mut order = Vec::new();
    let d = arch.dim();
    // Each injected NaN fires once: a restore replays the steps after its checkpoint.
    let mut nan_pending = cfg.inject_nan_at.clone();
    // Restores since the last checkpoint saved after good steps; give up when replaying
    // from the same point keeps diverging even at a much lower learning rate.
    let mut restores_in_a_row = 0u32;

    loop {
        let elapsed = elapsed_before + session_start.elapsed().as_secs_f64();
        state.elapsed_secs = elapsed;
        let done_steps = total_steps.is_some_and(|t| state.step >= t);
        let done_time = budget_secs.is_some_and(|b| elapsed >= b);
        if done_steps || done_time {
            break;
        }
        let epoch = state.step / steps_per_epoch;
        let b = state.step % steps_per_epoch;
        if epoch != order_epoch {
            order = epoch_order(train_set.len(), cfg.seed, epoch);
            order_epoch = epoch;
        }
        let idx = &order[(b as usize) * bs..(b as usize + 1) * bs];
        let mut noise = Pcg32::with_stream(cfg.seed ^ 0xd1ce, state.step);
        dequantize_batch(train_set, idx, arch.bits, &mut noise, &mut u)?;
        debug_assert_eq!(u.len(), bs * d);
        if let Some(k) = nan_pending.iter().position(|&s| s == state.step) {
            nan_pending.swap_remove(k);
            u[0] = f32::NAN;
        }
        let stats = flow.forward(&u, bs)?;
        let mut ok = stats.mean_bpd.is_finite();
        let mut norm = f64::NAN;
        if ok {
            flow.backward(&mut grads)?;
            norm = backend.sum_squares_all(&grads)?.sqrt();
            ok = norm.is_finite();
        }
        state.epoch = epoch;
        state.batch_in_epoch = b;
        if !ok {
            state.nonfinite_skips += 1;
            bad_in_a_row += 1;
            let msg = format!(
                "step {}: non-finite {} (loss {}, grad norm {}); step skipped",
                state.step,
                if stats.mean_bpd.is_finite() {
                    "gradient"
                } else {
                    "loss"
                },
                stats.mean_bpd,
                norm
            );
            progress.note(&msg);
            let mut rec = MetricRecord::new(state.step, epoch, elapsed);
            rec.event = Some(msg);
            metrics.append(&rec)?;
            if bad_in_a_row >= cfg.max_bad_steps {
                restores_in_a_row += 1;
                if restores_in_a_row > MAX_RESTORES_IN_A_ROW {
                    bail!(
                        "training keeps diverging: {MAX_RESTORES_IN_A_ROW} restores of the last checkpoint with ever lower learning rates did not help (last at step {}); see {}",
                        state.step,
                        metrics_path.display()
                    );
                }
                let (c, dir) = checkpoint::load(run_dir)?;
                flow.set_params(&c.params)?;
                adam.m = upload_all(backend.as_ref(), &c.adam_m)?;
                adam.v = upload_all(backend.as_ref(), &c.adam_v)?;
                let (skips, restores) = (state.nonfinite_skips, state.restores + 1);
                let lr_scale = state.lr_scale * 0.5;
                state = c.state;
                state.nonfinite_skips = skips;
                state.restores = restores;
                state.lr_scale = lr_scale;
                bad_in_a_row = 0;
                let msg = format!(
                    "{} non-finite steps in a row: restored {} (step {}) and halved the learning rate (x{})",
                    cfg.max_bad_steps,
                    dir.display(),
                    state.step,
                    state.lr_scale
                );
                progress.note(&msg);
                let mut rec = MetricRecord::new(state.step, state.epoch, elapsed);
                rec.event = Some(msg);
                metrics.append(&rec)?;
                continue;
            }
            // Skip this batch: move on as if the step had been taken.
            state.step += 1;
            continue;
        }
        bad_in_a_row = 0;
        let warm = if cfg.warmup_steps == 0 {
            1.0
        } else {
            ((state.step + 1) as f32 / cfg.warmup_steps as f32).min(1.0)
        };
        let decay = if cfg.cosine_decay {
            let f = run_fraction(state.step, elapsed, total_steps, budget_secs).min(1.0);
            (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * f).cos())) as f32
        } else {
            1.0
        };
        let lr = cfg.lr * state.lr_scale * warm * decay;
        let hp = AdamStep {
            lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            step: state.step + 1,
            grad_scale: if norm > f64::from(cfg.clip_norm) {
                (f64::from(cfg.clip_norm) / norm) as f32
            } else {
                1.0
            },
        };
        backend.adam_all(
            &hp,
            &mut flow.params,
            &grads,
            &mut adam.m,
            &mut adam.v,
            &trainable,
        )?;
        state.step += 1;
        running.0 += stats.mean_bpd;
        running.1 += 1;
        window_images += bs as u64;
        let ips = window_images as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
        let frac = run_fraction(state.step, elapsed, total_steps, budget_secs);
        progress.step(
            &state,
            running.0 / running.1.max(1) as f64,
            ips,
            frac.min(1.0),
        );
        if state.step % 20 == 0 {
            let mut rec = MetricRecord::new(state.step, epoch, elapsed);
            rec.train_bpd = Some(running.0 / running.1.max(1) as f64);
            rec.images_per_sec = Some(ips);
            rec.lr = Some(f64::from(lr));
            metrics.append(&rec)?;
            running = (0.0, 0);
            window_start = Instant::now();
            window_images = 0;
        }
        let epoch_end = state.step % steps_per_epoch == 0;
        let eval_due = epoch_end || cfg.eval_steps.is_some_and(|e| state.step % e == 0);
        if eval_due {
            let v = evaluate(&mut flow, val_set, bs)?;
            state.last_val_bpd = Some(v);
            state.best_val_bpd = Some(state.best_val_bpd.map_or(v, |b: f64| b.min(v)));
            let mut rec = MetricRecord::new(
                state.step,
                epoch,
                elapsed_before + session_start.elapsed().as_secs_f64(),
            );
            rec.val_bpd = Some(v);
            metrics.append(&rec)?;
            progress.note(&format!(
                "step {} (epoch {}): validation {:.4} bits/dim on {} images",
                state.step,
                epoch + 1,
                v,
                val_set.len()
            ));
        }
        let ckpt_due = epoch_end
            || last_ckpt.elapsed().as_secs_f64() >= cfg.checkpoint_secs
            || cfg.checkpoint_steps.is_some_and(|c| state.step % c == 0);
        if ckpt_due {
            state.elapsed_secs = elapsed_before + session_start.elapsed().as_secs_f64();
            save(&flow, &adam, &state)?;
            last_ckpt = Instant::now();
            restores_in_a_row = 0;
        }
    }

    // Final validation, checkpoint, samples and plot.
    let v = evaluate(&mut flow, val_set, bs)?;
    state.last_val_bpd = Some(v);
    state.best_val_bpd = Some(state.best_val_bpd.map_or(v, |b: f64| b.min(v)));
    state.elapsed_secs = elapsed_before + session_start.elapsed().as_secs_f64();
    let mut rec = MetricRecord::new(state.step, state.epoch, state.elapsed_secs);
    rec.val_bpd = Some(v);
    rec.event = Some("finished".into());
    metrics.append(&rec)?;
    save(&flow, &adam, &state)?;
    let n = cfg.samples.max(1);
    let pixels = sample_pixels(&mut flow, n, cfg.temperature, cfg.seed)?;
    let samples_png = run_dir.join("samples.png");
    let cols = (n as f64).sqrt().ceil() as usize;
    let upscale = if arch.height <= 32 { 3 } else { 1 };
    report::write_png_grid(
        &samples_png,
        &pixels,
        n,
        arch.channels,
        arch.height,
        arch.width,
        cols,
        2,
        upscale,
    )?;
    let records = report::read_metrics(&metrics_path)?;
    report::write_loss_svg(
        run_dir.join("loss.svg"),
        &records,
        &format!("clayflow: {}", cfg.dataset),
    )?;
    let session_steps = state.step - start_step;
    let secs = session_start.elapsed().as_secs_f64();
    Ok(Outcome {
        steps: state.step,
        val_bpd: v,
        val_images: val_set.len(),
        images_per_sec: session_steps as f64 * bs as f64 / secs.max(1e-9),
        elapsed_secs: state.elapsed_secs,
        samples_png,
        nonfinite_skips: state.nonfinite_skips,
    })
}
