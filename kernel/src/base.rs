//! The standard-normal base distribution and a small deterministic PRNG.

use crate::error::Error;

/// `ln(2 pi) / 2`.
const HALF_LN_2PI: f32 = 0.918_938_5;

/// `log N(z; 0, I) = -0.5 * sum(z^2) - (D / 2) ln(2 pi)`.
pub fn log_normal(z: &[f32]) -> f32 {
    let sq: f32 = z.iter().map(|v| v * v).sum();
    -0.5 * sq - z.len() as f32 * HALF_LN_2PI
}

/// A source of uniform 32-bit words. Implement it to plug in your own generator (a
/// hardware RNG, say).
pub trait Rng {
    /// The next uniformly distributed word.
    fn next_u32(&mut self) -> u32;
}

/// PCG32 (XSH-RR, 64-bit state): small, fast on a Cortex-M4, and reproducible everywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pcg32 {
    state: u64,
    inc: u64,
}

impl Pcg32 {
    const MUL: u64 = 6_364_136_223_846_793_005;

    /// A generator from a seed, on stream 0 (the PCG reference seeding).
    pub fn new(seed: u64) -> Pcg32 {
        Pcg32::with_stream(seed, 0)
    }

    /// A generator from a seed and a stream id (distinct streams never overlap).
    pub fn with_stream(seed: u64, stream: u64) -> Pcg32 {
        let mut rng = Pcg32 {
            state: 0,
            inc: (stream << 1) | 1,
        };
        rng.next_u32();
        rng.state = rng.state.wrapping_add(seed);
        rng.next_u32();
        rng
    }

    /// Skips `delta` words in O(log delta) steps: afterwards the generator gives what it
    /// would have given after `delta` calls of [`Rng::next_u32`] (Brown's "random number
    /// generation with arbitrary strides", as in the PCG reference's `pcg32_advance`).
    /// Data-parallel training uses it to start each rank at its own images' noise.
    pub fn advance(&mut self, delta: u64) {
        // The affine step s -> MUL * s + inc, composed with itself by squaring.
        let (mut acc_mult, mut acc_plus) = (1u64, 0u64);
        let (mut cur_mult, mut cur_plus) = (Pcg32::MUL, self.inc);
        let mut d = delta;
        while d > 0 {
            if d & 1 == 1 {
                acc_mult = acc_mult.wrapping_mul(cur_mult);
                acc_plus = acc_plus.wrapping_mul(cur_mult).wrapping_add(cur_plus);
            }
            cur_plus = cur_mult.wrapping_add(1).wrapping_mul(cur_plus);
            cur_mult = cur_mult.wrapping_mul(cur_mult);
            d >>= 1;
        }
        self.state = acc_mult.wrapping_mul(self.state).wrapping_add(acc_plus);
    }
}

impl Rng for Pcg32 {
    fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old.wrapping_mul(Pcg32::MUL).wrapping_add(self.inc);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }
}

/// Uniform in `(-1, 1)` from 23 random bits; every step is exact in f32.
fn uniform_signed<R: Rng>(rng: &mut R) -> f32 {
    let m = (rng.next_u32() >> 9) as f32; // 0 .. 2^23 - 1
    (m + 0.5) * (2.0 / 8_388_608.0) - 1.0
}

/// Standard-normal variates by Marsaglia's polar method: single-precision `logf` and
/// `sqrtf` only (no `sinf`/`cosf`, which fall back to software f64 on an M4F).
#[derive(Clone, Debug)]
pub struct Normal<R> {
    rng: R,
    spare: Option<f32>,
}

impl<R: Rng> Normal<R> {
    /// Wraps a uniform generator.
    pub fn new(rng: R) -> Normal<R> {
        Normal { rng, spare: None }
    }

    /// The next N(0, 1) variate. Errors only if the generator gives 64 unusable pairs in a
    /// row (a broken generator; a good one does so with probability ~1e-43).
    pub fn next_normal(&mut self) -> Result<f32, Error> {
        if let Some(v) = self.spare.take() {
            return Ok(v);
        }
        for _ in 0..64 {
            let u = uniform_signed(&mut self.rng);
            let v = uniform_signed(&mut self.rng);
            let s = u * u + v * v;
            if s < 1.0 && s > 0.0 {
                let f = libm::sqrtf(-2.0 * libm::logf(s) / s);
                self.spare = Some(v * f);
                return Ok(u * f);
            }
        }
        Err(Error::InvalidArgument(
            "random generator gives no usable values",
        ))
    }

    /// Fills `out` with `temperature * N(0, 1)` variates.
    pub fn fill(&mut self, out: &mut [f32], temperature: f32) -> Result<(), Error> {
        for v in out.iter_mut() {
            *v = temperature * self.next_normal()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcg32_matches_the_reference_sequence() {
        // pcg32_srandom(42, 54) from the PCG reference (pcg32-demo) prints these first words.
        let mut rng = Pcg32::with_stream(42, 54);
        let got: [u32; 6] = core::array::from_fn(|_| rng.next_u32());
        assert_eq!(
            got,
            [0xa15c02b7, 0x7b47f409, 0xba1d3330, 0x83d2f293, 0xbfa4784b, 0xcbed606e]
        );
    }

    #[test]
    fn advance_skips_exactly_that_many_words() {
        for delta in [0u64, 1, 2, 3, 7, 64, 1000, 12_345] {
            let mut stepped = Pcg32::with_stream(9, 3);
            for _ in 0..delta {
                stepped.next_u32();
            }
            let mut jumped = Pcg32::with_stream(9, 3);
            jumped.advance(delta);
            assert_eq!(jumped, stepped, "delta {delta}");
            assert_eq!(jumped.next_u32(), stepped.next_u32());
        }
        // A full period (2^64) brings the generator back to where it was.
        let mut r = Pcg32::new(5);
        let start = r;
        r.advance(u64::MAX);
        r.next_u32();
        assert_eq!(r, start);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "200k normals, a statistical test: minutes under Miri; every flow test samples"
    )]
    fn normals_have_unit_moments() {
        let mut n = Normal::new(Pcg32::new(7));
        let k = 200_000;
        let (mut s1, mut s2) = (0f64, 0f64);
        for _ in 0..k {
            let v = n.next_normal().unwrap() as f64;
            s1 += v;
            s2 += v * v;
        }
        let mean = s1 / k as f64;
        let var = s2 / k as f64 - mean * mean;
        // Standard error of the mean is 1/sqrt(k) ~ 0.0022; of the variance ~ sqrt(2/k) ~ 0.0032.
        assert!(mean.abs() < 0.012, "mean {mean}");
        assert!((var - 1.0).abs() < 0.016, "var {var}");
    }

    #[test]
    fn a_broken_generator_is_an_error_not_a_hang() {
        struct Stuck;
        impl Rng for Stuck {
            fn next_u32(&mut self) -> u32 {
                u32::MAX
            }
        }
        assert!(Normal::new(Stuck).next_normal().is_err());
    }

    #[test]
    fn log_normal_of_zero_is_the_normaliser() {
        let z = [0.0f32; 10];
        assert!((log_normal(&z) + 10.0 * 0.918_938_5).abs() < 1e-5);
    }
}
