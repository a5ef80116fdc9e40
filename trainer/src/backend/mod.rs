//! Compute backends. The model code calls the `Backend` trait; `cpu` implements it.
pub mod cpu;
