//! Squeeze (space-to-depth 2x2) and its exact inverse.
//!
//! `(C, H, W) -> (4C, H/2, W/2)` with output channel `4c + 2dy + dx` holding input pixel
//! `(c, 2i + dy, 2j + dx)` at `(i, j)`: the convention of PyTorch's `pixel_unshuffle(x, 2)`.
//! A permutation, so its log-det is 0.

use crate::conv::INTERNAL;
use crate::error::{Buffer, Error};

fn check(c: usize, h: usize, w: usize, input: usize, out: usize) -> Result<usize, Error> {
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        return Err(Error::InvalidArgument(
            "squeeze needs even height and width",
        ));
    }
    let n = c
        .checked_mul(h)
        .and_then(|v| v.checked_mul(w))
        .ok_or(Error::InvalidArgument("squeeze shape overflows"))?;
    if input != n {
        return Err(Error::BufferSize {
            buffer: Buffer::Input,
            needed: n,
            got: input,
        });
    }
    if out != n {
        return Err(Error::BufferSize {
            buffer: Buffer::Output,
            needed: n,
            got: out,
        });
    }
    Ok(n)
}

/// Squeezes `input` of shape `(c, h, w)` into `out` of shape `(4c, h/2, w/2)`.
pub fn squeeze(c: usize, h: usize, w: usize, input: &[f32], out: &mut [f32]) -> Result<(), Error> {
    if check(c, h, w, input.len(), out.len())? == 0 {
        return Ok(());
    }
    let (h2, w2) = (h / 2, w / 2);
    for (oc, oplane) in out.chunks_exact_mut(h2 * w2).enumerate() {
        let (ch, dy, dx) = (oc / 4, (oc % 4) / 2, oc % 2);
        let iplane = input.get(ch * h * w..(ch + 1) * h * w).ok_or(INTERNAL)?;
        for (i, orow) in oplane.chunks_exact_mut(w2).enumerate() {
            let row = 2 * i + dy;
            let irow = iplane.get(row * w..(row + 1) * w).ok_or(INTERNAL)?;
            for (o, v) in orow.iter_mut().zip(irow.iter().skip(dx).step_by(2)) {
                *o = *v;
            }
        }
    }
    Ok(())
}

/// Inverse of [`squeeze`]: `input` of shape `(4c, h/2, w/2)` into `out` of shape `(c, h, w)`.
pub fn unsqueeze(
    c: usize,
    h: usize,
    w: usize,
    input: &[f32],
    out: &mut [f32],
) -> Result<(), Error> {
    if check(c, h, w, out.len(), input.len())? == 0 {
        return Ok(());
    }
    let (h2, w2) = (h / 2, w / 2);
    for (ic, iplane) in input.chunks_exact(h2 * w2).enumerate() {
        let (ch, dy, dx) = (ic / 4, (ic % 4) / 2, ic % 2);
        let oplane = out.get_mut(ch * h * w..(ch + 1) * h * w).ok_or(INTERNAL)?;
        for (i, irow) in iplane.chunks_exact(w2).enumerate() {
            let row = 2 * i + dy;
            let orow = oplane.get_mut(row * w..(row + 1) * w).ok_or(INTERNAL)?;
            for (o, v) in orow.iter_mut().skip(dx).step_by(2).zip(irow) {
                *o = *v;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pixel_unshuffle_convention() {
        // 1x2x2 image [[a, b], [c, d]] -> 4 channels a, b, c, d.
        let x = [1.0, 2.0, 3.0, 4.0];
        let mut y = [0.0; 4];
        squeeze(1, 2, 2, &x, &mut y).unwrap();
        assert_eq!(y, [1.0, 2.0, 3.0, 4.0]);
        // 1x4x4 with value 10*row + col: channel 1 (dy=0, dx=1) holds odd columns of even rows.
        let x: std::vec::Vec<f32> = (0..16).map(|i| (10 * (i / 4) + i % 4) as f32).collect();
        let mut y = [0.0; 16];
        squeeze(1, 4, 4, &x, &mut y).unwrap();
        assert_eq!(&y[4..8], &[1.0, 3.0, 21.0, 23.0]);
        assert_eq!(&y[8..12], &[10.0, 12.0, 30.0, 32.0]);
    }

    #[test]
    fn unsqueeze_inverts_exactly_and_bad_shapes_error() {
        let x: std::vec::Vec<f32> = (0..3 * 6 * 4).map(|i| i as f32 * 0.5).collect();
        let mut y = std::vec![0.0; x.len()];
        let mut back = std::vec![0.0; x.len()];
        squeeze(3, 6, 4, &x, &mut y).unwrap();
        unsqueeze(3, 6, 4, &y, &mut back).unwrap();
        assert_eq!(x, back);
        assert!(squeeze(3, 5, 4, &x[..60], &mut y[..60]).is_err());
        assert!(squeeze(3, 6, 4, &x[..71], &mut y).is_err());
        assert!(unsqueeze(3, 6, 4, &y, &mut back[..70]).is_err());
    }
}
