//! Training-time augmentation: left-right mirroring of dequantized images.
//!
//! Which images are mirrored is a pure function of `(seed, step, position in the global
//! batch)`, like everything random in training, so a run on N ranks mirrors the images that
//! the one-process run mirrors, and a resumed run the ones the uninterrupted run would.

use super::shuffle::mix;

/// Whether the image at position `pos` of step `step`'s global batch is mirrored: a fair
/// coin from `seed`.
pub fn mirrored(seed: u64, step: u64, pos: usize) -> bool {
    mix(mix(seed ^ 0x6d69_7272_6f72, step), pos as u64) >> 63 == 1
}

/// Mirrors left to right each image `k` of `batch` (images of `channels x height x width`,
/// channel-planar, row-major) for which `flip(k)` holds. A trailing partial image is left
/// alone.
pub fn mirror_images(
    batch: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    mut flip: impl FnMut(usize) -> bool,
) {
    let d = channels * height * width;
    if d == 0 {
        return;
    }
    for (k, image) in batch.chunks_exact_mut(d).enumerate() {
        if flip(k) {
            image.chunks_exact_mut(width).for_each(<[f32]>::reverse);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirroring_reverses_every_row_of_every_channel_of_the_chosen_images() {
        let (c, h, w) = (3, 4, 5);
        let d = c * h * w;
        let orig: Vec<f32> = (0..3 * d).map(|i| i as f32).collect();
        let mut b = orig.clone();
        mirror_images(&mut b, c, h, w, |k| k == 1);
        assert_eq!(b[..d], orig[..d]);
        assert_eq!(b[2 * d..], orig[2 * d..]);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let at = |x: usize| d + (ch * h + y) * w + x;
                    assert_eq!(b[at(x)], orig[at(w - 1 - x)]);
                }
            }
        }
        mirror_images(&mut b, c, h, w, |k| k == 1);
        assert_eq!(b, orig, "mirroring twice is the identity");
        // No images, or an empty shape: nothing happens and nothing panics.
        mirror_images(&mut [], c, h, w, |_| true);
        mirror_images(&mut b, 0, h, w, |_| true);
        assert_eq!(b, orig);
    }

    #[test]
    fn the_coin_is_fair_and_depends_on_seed_step_and_position() {
        let heads = (0..10_000).filter(|&p| mirrored(7, 3, p)).count();
        assert!((4_800..=5_200).contains(&heads), "{heads} of 10,000");
        let heads = (0..10_000u64).filter(|&s| mirrored(7, s, 0)).count();
        assert!((4_800..=5_200).contains(&heads), "{heads} of 10,000");
        let coins = |seed, step| {
            (0..1_000)
                .map(|p| mirrored(seed, step, p))
                .collect::<Vec<_>>()
        };
        let base = coins(7, 3);
        assert_eq!(base, coins(7, 3));
        for other in [coins(8, 3), coins(7, 4)] {
            let agree = base.iter().zip(&other).filter(|(a, b)| a == b).count();
            assert!((400..=600).contains(&agree), "{agree} of 1,000 agree");
        }
    }
}
