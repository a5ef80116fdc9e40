//! The run's budget and clock, and the clock value every rank agrees on.

use super::TrainConfig;
use crate::checkpoint::TrainState;
use crate::collective::Collective;
use crate::data::Dataset;
use anyhow::Result;
use std::cell::Cell;
use std::time::Instant;

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

/// The run's budget and clock: when it stops, how far through it is.
pub(super) struct Clock {
    pub(super) steps_per_epoch: u64,
    pub(super) total_steps: Option<u64>,
    pub(super) budget_secs: Option<f64>,
    pub(super) session_start: Instant,
    pub(super) elapsed_before: f64,
    pub(super) start_step: u64,
    /// Set by early stopping: the run is done at the next check.
    pub(super) stop: Cell<Option<String>>,
}

impl Clock {
    pub(super) fn new(
        cfg: &TrainConfig,
        world_size: usize,
        train_set: &Dataset,
        state: &TrainState,
    ) -> Clock {
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
    pub(super) fn elapsed(&self) -> f64 {
        self.elapsed_before + self.session_start.elapsed().as_secs_f64()
    }

    pub(super) fn done(&self, step: u64, elapsed: f64) -> bool {
        self.stopped().is_some()
            || self.total_steps.is_some_and(|t| step >= t)
            || self.budget_secs.is_some_and(|b| elapsed >= b)
    }

    /// Why the run was stopped early, if it was.
    pub(super) fn stopped(&self) -> Option<String> {
        let why = self.stop.take();
        self.stop.set(why.clone());
        why
    }

    pub(super) fn fraction(&self, step: u64, elapsed: f64) -> f64 {
        run_fraction(step, elapsed, self.total_steps, self.budget_secs)
    }
}

/// Rank 0's value of `v` on every rank (a clock, so the ranks take the same decisions).
pub(super) fn rank0_value(comm: &dyn Collective, v: f64) -> Result<f64> {
    if comm.size() == 1 {
        return Ok(v);
    }
    let mut x = [if comm.rank() == 0 { v } else { 0.0 }];
    comm.all_reduce_sum_f64(&mut x)?;
    Ok(x[0])
}
