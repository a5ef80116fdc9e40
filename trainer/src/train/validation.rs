//! Validation: each rank scores its slice, the sums are added; the best checkpoint, the
//! streaks of rising scores and the early stop.

use super::clock::Clock;
use super::run::Run;
use super::{BestCheckpoint, Progress, RISES_WORTH_A_NOTE};
use crate::checkpoint::{self, TrainState};
use crate::data::Dataset;
use crate::eval::evaluate_sum;
use crate::report::MetricRecord;
use anyhow::Result;
use std::path::Path;

impl Run<'_> {
    /// Scores the validation set and records it in the state and the metrics (with `event`,
    /// if any, on the same line). With a weight average (`--ema`) the average is scored,
    /// and the trained weights too (returned second, and in the metrics beside it). A score
    /// below the best so far is saved at once as the run's `BEST` checkpoint. Says when validation has risen [`RISES_WORTH_A_NOTE`] times
    /// in a row, and stops the run (through `clock`) after [`TrainConfig::early_stop`]
    /// validations in a row without a new best.
    pub(super) fn validate(
        &mut self,
        clock: &Clock,
        val_set: &Dataset,
        event: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<(f64, Option<f64>)> {
        // Each rank scores its slice of the validation set; the sums are added, so every
        // rank sees the same score and takes the same decisions below.
        let (r, n, len) = (self.comm.rank(), self.comm.size(), val_set.len());
        let slice = r * len / n..(r + 1) * len / n;
        let bs = self.cfg.batch_size;
        let scored = self.with_scored_weights(|f| evaluate_sum(f, val_set, slice.clone(), bs))?;
        let averaged = self.ema.is_some();
        let trained = if averaged {
            evaluate_sum(&mut self.flow, val_set, slice, bs)?
        } else {
            0.0
        };
        let mut sum = [scored, trained];
        self.comm.all_reduce_sum_f64(&mut sum)?;
        let v = sum[0] / len as f64;
        let v_trained = averaged.then(|| sum[1] / len as f64);
        let repeat = self.validated_at == Some(self.state.step);
        self.validated_at = Some(self.state.step);
        let improved = record_validation(&mut self.state, v, repeat);
        let elapsed = clock.elapsed();
        let mut rec = MetricRecord::new(self.state.step, self.state.epoch, elapsed);
        rec.val_bpd = Some(v);
        rec.val_trained_bpd = v_trained;
        rec.event = event.map(str::to_string);
        self.record(&rec)?;
        if improved {
            self.write_checkpoint(true)?;
            self.rise_told = false;
        }
        if repeat {
            return Ok((v, v_trained));
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
        Ok((v, v_trained))
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
pub(super) fn best_checkpoint(run_dir: &Path) -> Option<BestCheckpoint> {
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
    use super::super::{state_of, TrainConfig};
    use super::*;
    use crate::config::ModelConfig;

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
}
