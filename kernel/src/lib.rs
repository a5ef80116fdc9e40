//! clayflow's kernel: a `no_std`, heap-free RealNVP normalizing flow for constrained devices.
//!
//! It owns the model's math (squeeze, convolution, affine coupling, dequantization and
//! logit, the standard-normal base) and its weight format (a checked, versioned blob read
//! zero-copy from `&[u8]`). All buffers are the caller's, sized by `const fn`s of the
//! architecture, and no public function panics: every failure is an [`Error`].
//!
//! ```
//! use clayflow_kernel::{scratch_len, image_len, MNIST};
//! // A firmware sizes its buffers at compile time:
//! static mut SCRATCH: [f32; scratch_len(&MNIST)] = [0.0; scratch_len(&MNIST)];
//! let pixels = [0u8; image_len(&MNIST)];
//! # let _ = pixels;
//! ```
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
// Unsafe code only in `simd` (raw-pointer vector loads and stores, each with its SAFETY
// argument); the scalar path, which the firmware builds, has none.
#![deny(unsafe_code)]
// No panicking paths outside tests: no unwrap/expect/panic!/unreachable!/todo!/
// unimplemented!, no `[]` indexing or slicing (use `get`, `split_at_checked`, chunks and
// zips), and no unchecked integer arithmetic (sizes come from blob headers; overflow panics
// in debug builds and wraps into wrong-but-"valid" sizes in release). Tests may panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
    )
)]

pub mod arch;
pub mod base;
pub mod buffers;
// conv/ multiplies sizes only after `Conv::check` has formed every product with
// `checked_mul` and matched it to a real slice length, so its index math is bounded by slice
// lengths and cannot overflow; it has no indexing (see its own `deny`).
#[allow(clippy::arithmetic_side_effects)]
pub mod conv;
pub mod coupling;
pub mod error;
pub mod flow;
pub mod preprocess;
pub mod prior;
// The compile-time SIMD convolution paths; present only when the target flags enable one
// (`cfg(clayflow_simd)`, set by build.rs, the one place that predicate is written).
// Like conv/, its index arithmetic runs on sizes `Conv::check` has already bounded.
#[cfg(clayflow_simd)]
#[allow(unsafe_code, clippy::arithmetic_side_effects)]
pub mod simd;
pub mod squeeze;
pub mod weights;

#[cfg(test)]
mod testutil;

pub use arch::{
    alternating_masks, image_len, scratch_len, Arch, Mask, ScratchLayout, COLOR, COLOR_GLOW,
    GLOW_SCALE_FLOOR, GLOW_TENSORS, MAX_COUPLINGS, MAX_LEVELS, MNIST, MNIST_GLOW, PRIOR_KERNEL,
    PRIOR_TENSORS, TOP_TENSORS,
};
pub use base::{Normal, Pcg32, Rng};
pub use buffers::Buffers;
pub use error::Error;
pub use flow::{bits_per_dim, forward, inverse, log_prob, log_prob_u, sample, sample_with};
pub use weights::{
    blob_len, blob_version, round_to_f16_for, write_blob, DType, GlowWeights, Model, PriorWeights,
    TopWeights,
};
