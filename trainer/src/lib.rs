//! clayflow trainer: data, training, evaluation, checkpoints, sampling and export.
#![warn(missing_docs)]

pub mod backend;
pub mod data;
