//! Deterministic shuffling: the epoch order of the training set and the seed mixing behind
//! it and the random crop positions ([`SplitMix64`] streams).

use crate::rng::SplitMix64;

/// A shuffled order of `0..n` for one epoch, deterministic from `seed` and
/// `epoch` (its own SplitMix64 generator, so it never changes with library
/// versions). Cut it into mini-batches with `chunks(batch_size)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(mix(mix(seed, epoch), 0x6570_6f63_6873_6866));
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Combine two values into one well-mixed seed.
pub(super) fn mix(a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17));
    r.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn epoch_order_is_deterministic_permutation() {
        let a = epoch_order(1000, 1, 0);
        assert_eq!(a, epoch_order(1000, 1, 0));
        assert_ne!(a, epoch_order(1000, 1, 1));
        assert_ne!(a, epoch_order(1000, 2, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert!(epoch_order(0, 1, 0).is_empty());
        assert_eq!(epoch_order(1, 1, 0), vec![0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn epoch_order_permutes(n in 0usize..300, seed: u64, epoch in 0u64..5) {
            let mut o = epoch_order(n, seed, epoch);
            o.sort_unstable();
            prop_assert_eq!(o, (0..n).collect::<Vec<_>>());
        }
    }
}
