//! The step loop (batch, forward, backward, all-reduce, update; non-finite steps skipped
//! and the last checkpoint restored when they repeat; validation and checkpoints when due)
//! and the finish (final validation, checkpoint, samples and plot).

use super::clock::{rank0_value, Clock};
use super::run::Run;
use super::validation::best_checkpoint;
use super::{dequantize_batch, trained_note, Outcome, Progress};
use crate::data::{epoch_order, mirror_images, mirrored, Dataset};
use crate::report::{self, MetricRecord};
use crate::sample::{self, sample_images};
use anyhow::Result;
use clayflow_kernel::Pcg32;
use std::time::Instant;

impl Run<'_> {
    /// The steps, until the clock says done: batch, forward, backward, update; non-finite
    /// steps skipped (and the last checkpoint restored when they repeat); validation and
    /// checkpoints when due.
    pub(super) fn steps(
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
            if cfg.flip {
                let (c, h, w) = (self.arch.channels, self.arch.height, self.arch.width);
                let step = self.state.step;
                mirror_images(&mut u, c, h, w, |k| mirrored(cfg.seed, step, rank * bs + k));
            }
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
                let (v, v_trained) = self.validate(clock, val_set, None, progress)?;
                let trained = trained_note(v_trained);
                progress.note(&format!(
                    "step {} (epoch {}): validation {:.4} bits/dim on {} images{trained}",
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
    pub(super) fn finish(
        mut self,
        clock: &Clock,
        val_set: &Dataset,
        progress: &mut dyn Progress,
    ) -> Result<Outcome> {
        let (v, v_trained) = self.validate(clock, val_set, Some("finished"), progress)?;
        self.state.elapsed_secs = clock.elapsed();
        // Always written: the last checkpoint holds the run's whole training time.
        self.write_checkpoint(false)?;
        let (cfg, arch) = (self.cfg, self.arch);
        let samples_png = self.run_dir.join("samples.png");
        let mut nonfinite_samples = 0;
        if self.is_root() {
            let n = cfg.samples.max(1);
            let samples =
                self.with_scored_weights(|f| sample_images(f, n, cfg.temperature, cfg.seed))?;
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
            val_trained_bpd: v_trained,
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
