//! Squeeze (space-to-depth 2x2) and its exact inverse.
//!
//! `(C, H, W) -> (4C, H/2, W/2)` with output channel `4c + 2dy + dx` holding input pixel
//! `(c, 2i + dy, 2j + dx)` at `(i, j)`: the convention of PyTorch's `pixel_unshuffle(x, 2)`.
//! A permutation, so its log-det is 0.

use crate::error::{Buffer, Error};

/// Checks the shape and lengths; returns `(h * w, w)` (input plane and row lengths), both
/// non-zero, or `None` when there is nothing to move (`c * h * w == 0`).
fn check(
    c: usize,
    h: usize,
    w: usize,
    input: usize,
    out: usize,
) -> Result<Option<(usize, usize)>, Error> {
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        return Err(Error::InvalidArgument(
            "squeeze needs even height and width",
        ));
    }
    let plane = h
        .checked_mul(w)
        .ok_or(Error::InvalidArgument("squeeze shape overflows"))?;
    let n = c
        .checked_mul(plane)
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
    // n > 0 means c, h, w > 0, and h, w are even, so h, w >= 2: every chunk length below
    // (plane, plane / 4, w, w / 2) is non-zero, as `chunks_exact` requires.
    Ok((n > 0).then_some((plane, w)))
}

/// Squeezes `input` of shape `(c, h, w)` into `out` of shape `(4c, h/2, w/2)`.
pub fn squeeze(c: usize, h: usize, w: usize, input: &[f32], out: &mut [f32]) -> Result<(), Error> {
    let Some((plane, w)) = check(c, h, w, input.len(), out.len())? else {
        return Ok(());
    };
    // Input channel `ch` becomes the four output planes `4ch .. 4ch + 4`.
    for (iplane, group) in input.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
        for (sub, oplane) in group.chunks_exact_mut(plane / 4).enumerate() {
            let (dy, dx) = (sub / 2, sub % 2);
            let rows = iplane.chunks_exact(w).skip(dy).step_by(2);
            for (orow, irow) in oplane.chunks_exact_mut(w / 2).zip(rows) {
                for (o, v) in orow.iter_mut().zip(irow.iter().skip(dx).step_by(2)) {
                    *o = *v;
                }
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
    let Some((plane, w)) = check(c, h, w, out.len(), input.len())? else {
        return Ok(());
    };
    for (oplane, group) in out.chunks_exact_mut(plane).zip(input.chunks_exact(plane)) {
        for (sub, iplane) in group.chunks_exact(plane / 4).enumerate() {
            let (dy, dx) = (sub / 2, sub % 2);
            let rows = oplane.chunks_exact_mut(w).skip(dy).step_by(2);
            for (orow, irow) in rows.zip(iplane.chunks_exact(w / 2)) {
                for (o, v) in orow.iter_mut().skip(dx).step_by(2).zip(irow) {
                    *o = *v;
                }
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
