//! Polyak averaging (`--ema DECAY`): an exponential moving average of the trained weights,
//! kept on the backend beside them and updated after every optimiser step,
//!
//! ```text
//! avg <- avg + (1 - d_t) (w - avg),    d_t = min(decay, (1 + t) / (10 + t))
//! ```
//!
//! where `t` counts the updates so far: the ramp (TensorFlow's `ExponentialMovingAverage`
//! with `num_updates`) lets the average forget the initial weights within the first
//! steps, so a short run's average is not pulled back to the start. Validation, the best
//! checkpoint, the samples and the saved model use the average; training continues from the
//! trained weights (saved beside the average, `checkpoint`). Glow's own code averages the
//! weights it evaluates in the same way (`polyak_epochs`).
//!
//! The update is the backend's [`Optimiser::ema_all`](crate::backend::Optimiser::ema_all)
//! (one launch on a GPU for every tensor, like Adam's); ranks hold the same weights, so they
//! hold the same average without communicating.

use crate::backend::{Backend, Buffer, Result};

/// The decay of update `t` (0-based): `decay`, less at the start (see the module).
pub(super) fn decay_at(decay: f32, t: u64) -> f32 {
    let ramp = (1.0 + t as f64) / (10.0 + t as f64);
    decay.min(ramp as f32)
}

/// One update of the average of every trainable tensor with decay `d`:
/// `avg += (1 - d) (w - avg)`. Fixed tensors (the 1x1 convolutions' permutations and signs)
/// never change, so their average stays the copy it started as.
pub(super) fn update(
    backend: &dyn Backend,
    d: f32,
    weights: &[Buffer],
    avg: &mut [Buffer],
    trainable: &[bool],
) -> Result<()> {
    backend.ema_all(1.0 - d, weights, avg, trainable)
}

/// Copies of `weights` on the backend: the average at its start.
pub(super) fn copies(backend: &dyn Backend, weights: &[Buffer]) -> Result<Vec<Buffer>> {
    weights
        .iter()
        .map(|w| {
            let mut c = backend.zeros(w.len())?;
            backend.copy(w, &mut c)?;
            Ok(c)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Memory;

    #[test]
    fn the_decay_ramps_up_to_its_cap() {
        assert_eq!(decay_at(0.999, 0), 0.1);
        assert!((decay_at(0.999, 90) - 0.91).abs() < 1e-6);
        assert_eq!(decay_at(0.999, 1_000_000), 0.999);
        assert_eq!(decay_at(0.5, 100), 0.5);
    }

    #[test]
    fn the_average_moves_toward_the_weights_and_skips_fixed_tensors() {
        let be = CpuBackend::default();
        let weights = vec![be.upload(&[1.0, 3.0]).unwrap(), be.upload(&[5.0]).unwrap()];
        let mut avg = vec![be.upload(&[0.0, 1.0]).unwrap(), be.upload(&[7.0]).unwrap()];
        update(&be, 0.75, &weights, &mut avg, &[true, false]).unwrap();
        // 0 + 0.25 (1 - 0), 1 + 0.25 (3 - 1); the fixed tensor is left alone.
        assert_eq!(be.download(&avg[0]).unwrap(), vec![0.25, 1.5]);
        assert_eq!(be.download(&avg[1]).unwrap(), vec![7.0]);
        // The weights are untouched; repeated updates converge on them.
        assert_eq!(be.download(&weights[0]).unwrap(), vec![1.0, 3.0]);
        for _ in 0..200 {
            update(&be, 0.75, &weights, &mut avg, &[true, false]).unwrap();
        }
        let a = be.download(&avg[0]).unwrap();
        assert!(
            (a[0] - 1.0).abs() < 1e-6 && (a[1] - 3.0).abs() < 1e-6,
            "{a:?}"
        );
        let c = copies(&be, &weights).unwrap();
        assert_eq!(be.download(&c[1]).unwrap(), vec![5.0]);
        // Slices of different lengths are refused.
        assert!(update(&be, 0.75, &weights, &mut avg[..1], &[true, false]).is_err());
        assert!(update(&be, 0.75, &weights, &mut avg, &[true]).is_err());
    }
}
