//! The CPU backend: im2col + matrixmultiply sgemm, rayon across the batch.
pub mod conv;
