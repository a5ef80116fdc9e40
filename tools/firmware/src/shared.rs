//! What the firmware and its host twin (`examples/firmware_host.rs`, which includes this
//! file) share: the fixed inputs, the two non-digit inputs the firmware scores, and the exact
//! text of the result lines, so that the CI can compare the device's lines with the host's
//! byte for byte.
//!
//! `no_std`-clean: only `core` and the kernel.

use clayflow_kernel::{Pcg32, Rng};
use core::fmt::{self, Write};

/// Seed of the kernel's PCG32 for the sampled digit.
pub const SEED: u64 = 2026;

/// Sampling temperature (the trainer's default for its sample grid).
pub const TEMPERATURE: f32 = 0.8;

/// Index of the embedded real digit (`digit.bin`) in `data/mnist8k-train-images-idx3-ubyte.gz`:
/// the first image of the held-out part (the last 1000 of the 8000 images).
pub const DIGIT_INDEX: usize = 7000;

/// Label of that digit in `data/mnist8k-train-labels-idx1-ubyte.gz`.
pub const DIGIT_LABEL: u8 = 9;

/// Image side of the MNIST preset.
pub const SIDE: usize = 28;

/// Pixels of one image.
pub const PIXELS: usize = SIDE * SIDE;

/// Seed of the kernel's PCG32 for the uniform-noise image ([`noise`]).
pub const NOISE_SEED: u64 = 7;

/// The digit's photographic negative, `255 - p`: the same strokes, white on black turned
/// black on white, which no MNIST digit looks like.
pub fn negative(digit: &[u8; PIXELS]) -> [u8; PIXELS] {
    digit.map(|p| 255 - p)
}

/// Uniform noise: every pixel the top byte of the next PCG32 output (seed [`NOISE_SEED`]).
pub fn noise() -> [u8; PIXELS] {
    let mut rng = Pcg32::new(NOISE_SEED);
    core::array::from_fn(|_| rng.next_u32().to_be_bytes()[0])
}

/// The inputs the firmware scores, in the order of its `score:` lines: the held-out digit
/// and two that are not digits. A flow's exact likelihood is an anomaly score: the digit
/// must come out clearly lowest in bits/dim.
pub const SCORED: [&str; 3] = ["digit", "negative", "noise"];

/// File the firmware writes on the host (in QEMU's working directory) through semihosting.
pub const PGM_NAME: &str = "clayflow-sample.pgm";

/// Header of the binary (P5) PGM of one `SIDE x SIDE` 8-bit image.
pub const PGM_HEADER: &[u8] = b"P5\n28 28\n255\n";

/// FNV-1a (32 bit) over the little-endian bytes of the f32 bit patterns of `values`: a
/// checksum that any single-bit difference in the sampled floats changes.
pub fn fnv1a32(values: &[f32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// Grey ramp of the ASCII art, dark to bright.
const RAMP: &[u8] = b" .:-=+*#%@";

/// The ASCII-art character of a pixel `0..=255`.
pub fn shade(pixel: u8) -> char {
    let i = usize::from(pixel) * RAMP.len() / 256;
    RAMP.get(i).copied().map_or('?', char::from)
}

/// Writes `pixels` (`SIDE x SIDE`, row-major) as ASCII art, two characters per pixel so the
/// digit keeps its aspect ratio in a terminal.
pub fn write_ascii(out: &mut impl Write, pixels: &[u8]) -> fmt::Result {
    for row in pixels.chunks(SIDE) {
        for &p in row {
            let c = shade(p);
            out.write_char(c)?;
            out.write_char(c)?;
        }
        out.write_char('\n')?;
    }
    Ok(())
}

/// The results that must agree bit for bit between device and host.
#[derive(Clone, Copy, Debug)]
pub struct Results {
    /// [`fnv1a32`] of the sample's f32 values (before quantisation).
    pub checksum: u32,
    /// `log p(u)` of the embedded digit in nats.
    pub log_prob: f32,
    /// Its bits per dimension.
    pub bits_per_dim: f32,
}

/// Writes the `score:` lines: bits/dim of each of [`SCORED`] (`bpd` in that order), with
/// their bit patterns, identical on device and host.
pub fn write_scores(out: &mut impl Write, bpd: &[f32; 3]) -> fmt::Result {
    for (name, b) in SCORED.iter().zip(bpd) {
        writeln!(out, "score: {name:<8} {b} bits/dim (0x{:08x})", b.to_bits())?;
    }
    Ok(())
}

/// Writes the result lines (`checksum:` and `digit:`), identical on device and host.
pub fn write_results(out: &mut impl Write, dtype: &str, r: &Results) -> fmt::Result {
    writeln!(
        out,
        "checksum: 0x{:08x} ({dtype} weights, seed {SEED}, temperature {TEMPERATURE}, FNV-1a over the f32 sample)",
        r.checksum
    )?;
    writeln!(
        out,
        "digit: held-out image {DIGIT_INDEX} (label {DIGIT_LABEL}): log_prob {} nats (0x{:08x}), {} bits/dim (0x{:08x})",
        r.log_prob,
        r.log_prob.to_bits(),
        r.bits_per_dim,
        r.bits_per_dim.to_bits()
    )
}
