//! The weight blob: one versioned little-endian binary holding the architecture and every
//! parameter, f32 or f16, checked by CRC-32. `kernel/FORMAT.md` specifies it.
//!
//! Version 1 holds the seed's one-level RealNVP architectures; version 2 adds the number of
//! levels and the Glow flag in two formerly reserved header bytes (18 and 19); version 3 is
//! version 2 for Glow models without the coupling `scale` tensor that Glow's sigmoid bound
//! never reads. The writer picks the one version that describes the architecture
//! ([`blob_version`]), so every seed blob is byte-identical to what earlier kernels wrote.
//! The reader also takes the older Glow encoding (version 2 with the Glow flag) and skips
//! its unused `scale` tensors. Glow tensors (ActNorm, the
//! invertible 1x1 convolution, its inverse and log-det) are always stored as f32, even in
//! f16 blobs: `W` and `W^-1` must stay each other's inverse to f32 precision for the flow to
//! invert exactly. So are the learned prior's tensors (flag bit 1, [`FLAG_PRIOR`], version 3
//! only), which follow every flow step's: per split level its scale, 3x3 conv weight and bias,
//! then the top prior's ActNorm log-scale and bias.
//!
//! Parsing is zero-copy: a [`Model`] borrows the blob and decodes weights as it reads them.
//!
//! Size arithmetic here never overflows: header offsets are constants below 100, sizes
//! derived from the architecture are saturating `const fn`s (a saturated size is larger
//! than any real slice, so it fails a length check), and offsets into the blob are only
//! formed through `get(at..)` on slices whose lengths bound them.
//!
//! The code is split by job: `format` (the constants, [`DType`] and the size arithmetic),
//! `crc` ([`crc32`]), `tensor` (views of the tensors inside a blob), `read` ([`Model`], the
//! parser) and `write` ([`write_blob`] and the f16 rounding); everything public is
//! re-exported here.

mod crc;
mod format;
mod read;
mod tensor;
#[cfg(test)]
mod testutil;
mod write;

pub use crc::crc32;
pub use format::{
    blob_len, blob_version, header_len, stored_dtype, DType, FLAG_GLOW, FLAG_PRIOR, MAGIC, VERSION,
    VERSION_2, VERSION_3,
};
pub use read::Model;
pub use tensor::{CouplingWeights, GlowWeights, PriorWeights, Tensor, TensorIter, TopWeights};
pub use write::{round_to_f16, round_to_f16_for, write_blob};
