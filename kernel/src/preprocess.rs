//! Preprocessing between pixels and the flow's real-valued input.
//!
//! Dequantization: `u = (x + v) / 2^n`, `v` in `[0, 1)` (uniform noise for training, the
//! midpoint `v = 0.5` for deterministic scoring). Logit: `s = a + (1 - 2a) u`,
//! `y = ln s - ln(1 - s)`, with per-element `log|dy/du| = ln(1 - 2a) - ln s - ln(1 - s)`.
//! The inverse goes back through the sigmoid and quantises with `floor(u * 2^n)`, clamped.

use crate::error::{Buffer, Error};

fn same_len(a: usize, b: usize) -> Result<(), Error> {
    if a == b {
        Ok(())
    } else {
        Err(Error::BufferSize {
            buffer: Buffer::Output,
            needed: a,
            got: b,
        })
    }
}

/// `u = (x + v) / 2^bits` with `v = noise(i)` for element `i`; rejects pixels `>= 2^bits`
/// and noise outside `[0, 1)`.
pub fn dequantize(
    pixels: &[u8],
    bits: u32,
    mut noise: impl FnMut(usize) -> f32,
    out: &mut [f32],
) -> Result<(), Error> {
    same_len(pixels.len(), out.len())?;
    if !(1..=8).contains(&bits) {
        return Err(Error::InvalidArgument("pixel bits must be 1..=8"));
    }
    let levels = (1u32 << bits) as f32;
    for (i, (o, &p)) in out.iter_mut().zip(pixels).enumerate() {
        let v = noise(i);
        if u32::from(p) >= 1 << bits || !(0.0..1.0).contains(&v) {
            return Err(Error::InvalidInput { index: i });
        }
        *o = (f32::from(p) + v) / levels;
    }
    Ok(())
}

/// Pixel of `u`: `clamp(floor(u * 2^bits), 0, 2^bits - 1)` (NaN maps to 0).
pub fn quantize_one(u: f32, bits: u32) -> u8 {
    // 2^bits - 1 in f32 (exact for bits <= 8).
    let max = (1u32 << bits.clamp(1, 8)) as f32 - 1.0;
    let v = libm::floorf(u * (max + 1.0));
    // `as` saturates and maps NaN to 0; the clamp keeps the top level in range.
    v.clamp(0.0, max) as u8
}

/// Quantises `u` values to pixels (see [`quantize_one`]).
pub fn quantize(u: &[f32], bits: u32, out: &mut [u8]) -> Result<(), Error> {
    same_len(u.len(), out.len())?;
    for (o, &v) in out.iter_mut().zip(u) {
        *o = quantize_one(v, bits);
    }
    Ok(())
}

/// In place `u -> y = logit(a + (1 - 2a) u)`; returns the summed `log|dy/du|`. Each `u`
/// must be finite and in `[0, 1]`.
pub fn logit_forward(x: &mut [f32], alpha: f32) -> Result<f32, Error> {
    if !(alpha > 0.0 && alpha < 0.5) {
        return Err(Error::InvalidArgument("logit alpha must be in (0, 0.5)"));
    }
    let span = 1.0 - 2.0 * alpha;
    let log_span = libm::logf(span);
    let mut log_det = 0.0f32;
    for (i, v) in x.iter_mut().enumerate() {
        if !(0.0..=1.0).contains(v) {
            return Err(Error::InvalidInput { index: i });
        }
        let s = alpha + span * *v;
        let (ls, l1s) = (libm::logf(s), libm::logf(1.0 - s));
        *v = ls - l1s;
        log_det += log_span - ls - l1s;
    }
    Ok(log_det)
}

/// In place `y -> u = (sigmoid(y) - a) / (1 - 2a)`, the inverse of [`logit_forward`].
pub fn logit_inverse(x: &mut [f32], alpha: f32) -> Result<(), Error> {
    if !(alpha > 0.0 && alpha < 0.5) {
        return Err(Error::InvalidArgument("logit alpha must be in (0, 0.5)"));
    }
    let span = 1.0 - 2.0 * alpha;
    for v in x.iter_mut() {
        let s = 1.0 / (1.0 + libm::expf(-*v));
        *v = (s - alpha) / span;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantize_then_quantize_returns_the_pixels() {
        let pixels: std::vec::Vec<u8> = (0..=255).collect();
        let mut u = std::vec![0.0; 256];
        for v in [0.0, 0.5, 0.999] {
            dequantize(&pixels, 8, |_| v, &mut u).unwrap();
            let mut back = std::vec![0u8; 256];
            quantize(&u, 8, &mut back).unwrap();
            assert_eq!(back, pixels);
        }
        assert_eq!(
            dequantize(&[4], 2, |_| 0.5, &mut u[..1]),
            Err(Error::InvalidInput { index: 0 })
        );
        assert_eq!(
            dequantize(&[1], 8, |_| 1.0, &mut u[..1]),
            Err(Error::InvalidInput { index: 0 })
        );
        assert_eq!(quantize_one(f32::NAN, 8), 0);
        assert_eq!(quantize_one(2.0, 8), 255);
    }

    #[test]
    fn logit_round_trip_and_bad_input() {
        let mut x: std::vec::Vec<f32> = (0..=100).map(|i| i as f32 / 100.0).collect();
        let orig = x.clone();
        logit_forward(&mut x, 0.05).unwrap();
        logit_inverse(&mut x, 0.05).unwrap();
        for (a, b) in x.iter().zip(&orig) {
            // sigmoid(logit(s)) in f32 is within a few ulps of s; dividing by 0.9 keeps it ~1e-6.
            assert!((a - b).abs() < 2e-6, "{a} vs {b}");
        }
        let mut bad = [0.5, f32::NAN];
        assert_eq!(
            logit_forward(&mut bad, 0.05),
            Err(Error::InvalidInput { index: 1 })
        );
        let mut bad = [1.5];
        assert_eq!(
            logit_forward(&mut bad, 0.05),
            Err(Error::InvalidInput { index: 0 })
        );
        assert!(logit_forward(&mut [0.5], 0.5).is_err());
    }
}
