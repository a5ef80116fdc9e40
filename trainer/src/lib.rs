//! clayflow trainer: data, training, evaluation, checkpoints, sampling and export.
#![warn(missing_docs)]

pub mod backend;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod invconv;
pub mod model;
pub mod report;
pub mod rng;
pub mod sample;
pub mod source;
pub mod train;
