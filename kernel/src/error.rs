//! The kernel's one error type: small, `Copy`, and specific about what is wrong.

use crate::arch::{TensorKind, COUPLING_TENSORS};
use core::fmt;

const _: () = assert!(COUPLING_TENSORS.len() == 7);

/// Which caller-supplied buffer a size error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Buffer {
    /// The input image or tensor.
    Input,
    /// The output image or tensor.
    Output,
    /// The scratch (work) buffer; size it with [`crate::scratch_len`].
    Scratch,
    /// A weight tensor or the flat parameter vector.
    Weights,
    /// The byte buffer a weight blob is written into; size it with [`crate::blob_len`].
    Blob,
}

/// Which architecture field is out of range (see [`crate::Arch::validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArchField {
    /// Input channels (1..=64).
    Channels,
    /// Input height or width (1..=1024, even when squeezing).
    Size,
    /// Number of couplings (1..=32).
    Couplings,
    /// Number of levels (1..=8, dividing the couplings; every split level needs an even
    /// channel count).
    Levels,
    /// A mask needs at least 2 channels (channel parity) or 2 pixels (checkerboard).
    Mask,
    /// A conv kernel size (odd, 1..=15).
    Kernel,
    /// A hidden width (1..=4096).
    Hidden,
    /// Pixel bit depth (1..=8).
    Bits,
    /// Logit constant alpha (finite, 0 < alpha < 0.5).
    LogitAlpha,
    /// Glow scale floor (0, or with Glow steps a positive f16 value up to 1/2).
    ScaleFloor,
    /// The learned prior ([`crate::Arch::prior`]) needs Glow steps.
    Prior,
    /// The image or the parameter count is too large for this kernel.
    TooLarge,
}

/// Everything that can go wrong in the kernel. Every public function returns it instead of
/// panicking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A caller buffer has the wrong length.
    BufferSize {
        /// Which buffer.
        buffer: Buffer,
        /// The length the operation needs (elements for f32/u8 buffers, bytes for blobs).
        needed: usize,
        /// The length it was given.
        got: usize,
    },
    /// The architecture is not one the kernel supports.
    InvalidArch(ArchField),
    /// A weight blob ends before the data its header announces.
    Truncated {
        /// Bytes the blob needs.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A weight blob has bytes after its checksum.
    TrailingBytes {
        /// Bytes the blob should have.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// The blob does not start with `CLAYFLOW`.
    BadMagic,
    /// The blob's format version is not one this kernel reads.
    UnsupportedVersion(u16),
    /// The blob's weight dtype code is unknown.
    UnknownDtype(u8),
    /// A header field that must hold a fixed value does not (reserved byte, mask code,
    /// header length, parameter count).
    BadHeader(&'static str),
    /// The CRC-32 stored in the blob does not match its contents.
    ChecksumMismatch {
        /// CRC-32 stored in the last four bytes.
        stored: u32,
        /// CRC-32 computed over the blob.
        computed: u32,
    },
    /// A weight is NaN or infinite (or overflows f16 when writing).
    NonFiniteWeight {
        /// Which tensor, counted in blob order over all couplings: coupling `tensor / 7`,
        /// kind `COUPLING_TENSORS[tensor % 7]` (scale, conv 0 weight, conv 0 bias, ...).
        tensor: usize,
        /// Index of the parameter in the flat parameter vector (blob order).
        index: usize,
    },
    /// A weight of a Glow architecture is NaN or infinite (or overflows f16 when writing).
    /// Glow steps have twelve tensors, so the tensor is named by step and kind.
    NonFiniteGlowWeight {
        /// The flow step (0 is nearest the image).
        step: usize,
        /// Which of the step's tensors ([`crate::arch::STEP_TENSORS`]).
        kind: TensorKind,
        /// Index of the parameter in the flat parameter vector (blob order).
        index: usize,
    },
    /// A weight of the learned prior ([`crate::Arch::prior`]) is NaN or infinite. The tensor
    /// is named by level and kind: a split prior's ([`crate::arch::PRIOR_TENSORS`]) at a
    /// level `l < levels - 1`, the top prior's ([`crate::arch::TOP_TENSORS`]) at the last.
    NonFinitePriorWeight {
        /// The level (0 is nearest the image).
        level: usize,
        /// Which of the level's prior tensors.
        kind: TensorKind,
        /// Index of the parameter in the flat parameter vector (blob order).
        index: usize,
    },
    /// An input value is NaN or infinite, or a pixel exceeds the bit depth.
    InvalidInput {
        /// Index of the offending element.
        index: usize,
    },
    /// An argument is out of its documented range.
    InvalidArgument(&'static str),
}

impl fmt::Display for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Buffer::Input => "input",
            Buffer::Output => "output",
            Buffer::Scratch => "scratch",
            Buffer::Weights => "weights",
            Buffer::Blob => "blob",
        })
    }
}

impl fmt::Display for ArchField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArchField::Channels => "channels must be 1..=64",
            ArchField::Size => {
                "height and width must be 1..=1024 (and divisible by 2 for every squeeze)"
            }
            ArchField::Couplings => "couplings must be 1..=32",
            ArchField::Levels => {
                "levels must be 1..=8 and divide the couplings, with an even channel count at every split"
            }
            ArchField::Mask => "a mask needs at least 2 channels or 2 pixels to split",
            ArchField::Kernel => "kernel sizes must be odd and 1..=15",
            ArchField::Hidden => "hidden widths must be 1..=4096",
            ArchField::Bits => "pixel bits must be 1..=8",
            ArchField::LogitAlpha => "logit alpha must be finite with 0 < alpha < 0.5",
            ArchField::ScaleFloor => {
                "the scale floor must be 0, or with Glow steps a value in (0, 1/2] that f16 holds exactly"
            }
            ArchField::Prior => "the learned prior needs Glow steps",
            ArchField::TooLarge => "image or parameter count too large",
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::BufferSize { buffer, needed, got } => {
                write!(f, "{buffer} buffer has length {got}, needs {needed}")
            }
            Error::InvalidArch(field) => write!(f, "invalid architecture: {field}"),
            Error::Truncated { needed, got } => {
                write!(f, "weight blob truncated: needs {needed} bytes, has {got}")
            }
            Error::TrailingBytes { expected, got } => {
                write!(f, "weight blob has {got} bytes, expected exactly {expected}")
            }
            Error::BadMagic => f.write_str("not a clayflow weight blob (magic is not CLAYFLOW)"),
            Error::UnsupportedVersion(v) => {
                write!(f, "weight blob version {v} is not supported (this kernel reads 1, 2 and 3)")
            }
            Error::UnknownDtype(d) => {
                write!(f, "weight blob dtype code {d} is unknown (1 = f32, 2 = f16)")
            }
            Error::BadHeader(what) => write!(f, "weight blob header invalid: {what}"),
            Error::ChecksumMismatch { stored, computed } => write!(
                f,
                "weight blob checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (corrupt file?)"
            ),
            Error::NonFiniteWeight { tensor, index } => {
                // Seven tensors per coupling, in `COUPLING_TENSORS` order.
                let coupling = tensor / 7;
                write!(
                    f,
                    "weight {index} is not finite (NaN, infinite, or beyond f16 range): \
                     tensor {tensor}, coupling {coupling}"
                )?;
                match COUPLING_TENSORS.get(tensor % 7) {
                    Some(kind) => write!(f, " {kind}"),
                    None => Ok(()),
                }
            }
            Error::NonFiniteGlowWeight { step, kind, index } => write!(
                f,
                "weight {index} is not finite (NaN, infinite, or beyond f16 range): \
                 step {step} {kind}"
            ),
            Error::NonFinitePriorWeight { level, kind, index } => write!(
                f,
                "weight {index} is not finite (NaN, infinite, or beyond f16 range): \
                 level {level} {kind}"
            ),
            Error::InvalidInput { index } => {
                write!(f, "input element {index} is not finite or out of range")
            }
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
        }
    }
}
