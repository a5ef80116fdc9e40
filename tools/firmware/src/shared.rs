//! What the firmware and its host twin (`examples/firmware_host.rs`, which includes this
//! file) share: the fixed inputs and the exact text of the result lines, so that the CI can
//! compare the device's lines with the host's byte for byte.
//!
//! `no_std`-clean: only `core`.

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
