//! A run's state on the device and on disk: start, resume, checkpoints, restores after
//! divergence, the learning rate and the Adam update.

use super::average;
use super::clock::Clock;
use super::MAX_RESTORES_IN_A_ROW;
use super::{config_path, dequantize_batch, metrics_path, state_of, Progress, TrainConfig};
use crate::backend::{AdamStep, Backend, Buffer};
use crate::checkpoint::{self, Checkpoint, TrainState};
use crate::collective::{self, Collective};
use crate::data::{epoch_order, Dataset};
use crate::fsutil;
use crate::model::{init_params, Flow};
use crate::report::{self, MetricRecord, MetricsLog};
use anyhow::{bail, Result};
use clayflow_kernel::{Arch, Pcg32};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The optimiser: Adam moments on the backend.
pub(super) struct Adam {
    pub(super) m: Vec<Buffer>,
    pub(super) v: Vec<Buffer>,
}

fn to_host(backend: &dyn Backend, bufs: &[Buffer]) -> Result<Vec<Vec<f32>>> {
    bufs.iter().map(|b| Ok(backend.download(b)?)).collect()
}

fn upload_all(backend: &dyn Backend, host: &[Vec<f32>]) -> Result<Vec<Buffer>> {
    host.iter().map(|h| Ok(backend.upload(h)?)).collect()
}

/// Adam's first and second moments on the host, as a checkpoint holds them.
type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// A training run in progress: the model and optimiser on the device, the state that goes
/// into checkpoints, and the metrics log (rank 0's).
pub(super) struct Run<'a> {
    pub(super) backend: Arc<dyn Backend>,
    pub(super) comm: &'a dyn Collective,
    pub(super) cfg: &'a TrainConfig,
    pub(super) arch: Arch,
    pub(super) run_dir: &'a Path,
    pub(super) metrics_path: PathBuf,
    /// Rank 0 writes the metrics; the other ranks have none.
    pub(super) metrics: Option<MetricsLog>,
    pub(super) flow: Flow,
    pub(super) adam: Adam,
    /// The moving average of the weights (`--ema`), shaped like them.
    pub(super) ema: Option<Vec<Buffer>>,
    pub(super) grads: Vec<Buffer>,
    /// The 1x1 convolutions' permutations and signs are fixed: the optimiser skips them.
    pub(super) trainable: Vec<bool>,
    pub(super) state: TrainState,
    /// The state (with `elapsed_secs` zeroed) and folder of the checkpoint this session
    /// saved last: saving the same state again is skipped.
    pub(super) saved: Option<(TrainState, PathBuf)>,
    /// The step of this session's last validation (a second one at the same step, as at
    /// the finish right after an epoch end, does not count towards the streaks).
    pub(super) validated_at: Option<u64>,
    /// Whether this session said that validation is rising since the last new best (said
    /// once per such stretch, not at every noisy rise).
    pub(super) rise_told: bool,
}

impl<'a> Run<'a> {
    /// A run on `params` (the trained weights), with Adam's moments (zero when `None`) and
    /// the weight average `ema` (a copy of `params` when `None` and the run keeps one).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn with(
        backend: Arc<dyn Backend>,
        comm: &'a dyn Collective,
        cfg: &'a TrainConfig,
        arch: Arch,
        run_dir: &'a Path,
        params: &[Vec<f32>],
        adam_host: Option<Moments>,
        ema: Option<&[Vec<f32>]>,
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
        let ema = match (cfg.ema, ema) {
            (None, _) => None,
            (Some(_), Some(host)) => Some(upload_all(backend.as_ref(), host)?),
            (Some(_), None) => Some(average::copies(backend.as_ref(), &flow.params)?),
        };
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
            ema,
            grads,
            trainable,
            state,
            saved: None,
            validated_at: None,
            rise_told: false,
        })
    }

    pub(super) fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Images per step over all ranks.
    pub(super) fn global_batch(&self) -> usize {
        self.cfg.batch_size * self.comm.size()
    }

    /// Gives every rank rank 0's parameters, moments and state.
    pub(super) fn share_rank0(&mut self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let be = self.backend.as_ref();
        self.comm.broadcast(be, &mut self.flow.params)?;
        self.comm.broadcast(be, &mut self.adam.m)?;
        self.comm.broadcast(be, &mut self.adam.v)?;
        if let Some(ema) = &mut self.ema {
            self.comm.broadcast(be, ema)?;
        }
        self.state = collective::broadcast_json(self.comm, &self.state)?;
        Ok(())
    }

    /// A new run: writes its configuration, initialises the parameters (and ActNorm from
    /// the first batch), and saves the step-0 checkpoint.
    pub(super) fn start(
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
        let mut run = Run::with(
            backend, comm, cfg, arch, run_dir, &params, None, None, state,
        )?;
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
        if let Some(ema) = &mut run.ema {
            // The average starts at the initialised weights (ActNorm's included).
            *ema = average::copies(run.backend.as_ref(), &run.flow.params)?;
        }
        run.share_rank0()?;
        // Step 0: there is always a last good checkpoint to go back to.
        run.save()?;
        Ok(run)
    }

    /// Continues the run in `run_dir` from its latest checkpoint (metrics after it dropped).
    /// Rank 0 reads it and shares it with the other ranks.
    pub(super) fn resume(
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
        let (trained, ema) = split_average(c.params, c.trained);
        let adam = Some((c.adam_m, c.adam_v));
        let ema = ema.as_deref();
        let mut run = Run::with(
            backend, comm, cfg, arch, run_dir, &trained, adam, ema, c.state,
        )?;
        run.share_rank0()?;
        run.state.world_size = comm.size();
        Ok(run)
    }

    /// Saves a checkpoint of the parameters, the moments and the state, unless this
    /// session saved the same state last (right after an improved validation). Rank 0
    /// writes; the other ranks hold the same values and return `None`.
    pub(super) fn save(&mut self) -> Result<Option<PathBuf>> {
        if let Some((saved, dir)) = &self.saved {
            if *saved == Self::save_key(&self.state) {
                return Ok(Some(dir.clone()));
            }
        }
        self.write_checkpoint(false)
    }

    /// The state as [`Run::save`] compares it: without the training time.
    pub(super) fn save_key(state: &TrainState) -> TrainState {
        let mut key = state.clone();
        key.elapsed_secs = 0.0;
        key
    }

    /// Writes a checkpoint (always, on rank 0); with `best`, `BEST` names it too.
    pub(super) fn write_checkpoint(&mut self, best: bool) -> Result<Option<PathBuf>> {
        if !self.is_root() {
            return Ok(None);
        }
        let key = Self::save_key(&self.state);
        // The saved state says whether the model file holds an average, so the loader knows
        // to read the trained weights beside it: set here, where both are written (a
        // resumed checkpoint's own flag may predate this session's settings).
        let mut state = self.state.clone();
        state.ema = self.cfg.ema;
        let trained = self.flow.params_host()?;
        let (params, trained) = match &self.ema {
            Some(ema) => (to_host(self.backend.as_ref(), ema)?, Some(trained)),
            None => (trained, None),
        };
        let ck = Checkpoint {
            model: self.cfg.model.clone(),
            params,
            trained,
            adam_m: to_host(self.backend.as_ref(), &self.adam.m)?,
            adam_v: to_host(self.backend.as_ref(), &self.adam.v)?,
            state,
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
    pub(super) fn record(&mut self, rec: &MetricRecord) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            m.append(rec)?;
        }
        Ok(())
    }

    /// Appends an event line to the metrics and tells the user.
    pub(super) fn event(
        &mut self,
        msg: String,
        progress: &mut dyn Progress,
        elapsed: f64,
    ) -> Result<()> {
        progress.note(&msg);
        let mut rec = MetricRecord::new(self.state.step, self.state.epoch, elapsed);
        rec.event = Some(msg);
        self.record(&rec)
    }

    /// Goes back to the last checkpoint with half the learning rate, after `max_bad_steps`
    /// non-finite steps in a row; gives up after [`MAX_RESTORES_IN_A_ROW`] such restores.
    pub(super) fn restore(
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
            let (trained, ema) = split_average(c.params, c.trained);
            self.flow.set_params(&trained)?;
            self.adam.m = upload_all(self.backend.as_ref(), &c.adam_m)?;
            self.adam.v = upload_all(self.backend.as_ref(), &c.adam_v)?;
            if let Some(avg) = &mut self.ema {
                *avg = match ema {
                    Some(host) => upload_all(self.backend.as_ref(), &host)?,
                    None => average::copies(self.backend.as_ref(), &self.flow.params)?,
                };
            }
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
    pub(super) fn lr(&self, clock: &Clock, elapsed: f64) -> f32 {
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
    pub(super) fn update(&mut self, lr: f32, norm: f64) -> Result<()> {
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
        if let (Some(ema), Some(decay)) = (&mut self.ema, self.cfg.ema) {
            average::update(
                self.backend.as_ref(),
                average::decay_at(decay, self.state.step),
                &self.flow.params,
                ema,
                &self.trainable,
            )?;
        }
        Ok(())
    }

    /// Runs `f` on the model with the weights it is scored and sampled with: the average
    /// when the run keeps one (swapped in, and back out afterwards), else the trained ones.
    pub(super) fn with_scored_weights<T>(
        &mut self,
        f: impl FnOnce(&mut Flow) -> Result<T>,
    ) -> Result<T> {
        let Some(ema) = &mut self.ema else {
            return f(&mut self.flow);
        };
        std::mem::swap(&mut self.flow.params, ema);
        let out = f(&mut self.flow);
        std::mem::swap(&mut self.flow.params, ema);
        out
    }
}

/// A checkpoint's weights as (trained, average): `trained` beside the average in `params`,
/// or `params` alone (no average).
fn split_average(
    params: Vec<Vec<f32>>,
    trained: Option<Vec<Vec<f32>>>,
) -> (Vec<Vec<f32>>, Option<Vec<Vec<f32>>>) {
    match trained {
        Some(t) => (t, Some(params)),
        None => (params, None),
    }
}
