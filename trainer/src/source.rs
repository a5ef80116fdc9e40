//! Where a model comes from for `eval` and `sample`: a run or checkpoint folder (trainer
//! parameters) or an exported kernel blob (the deployed path). Evaluating a source lives in
//! [`crate::eval`], sampling it in [`crate::sample`].

use crate::checkpoint::{self, Checkpoint};
use anyhow::{Context, Result};
use clayflow_kernel::{Arch, Model};
use std::path::Path;

/// A model to evaluate or sample from: trainer parameters, or a kernel blob.
#[derive(Debug)]
pub enum Source {
    /// A checkpoint (from a run folder or a checkpoint folder).
    Checkpoint(Box<Checkpoint>),
    /// An exported kernel blob (the deployed path).
    Blob(Vec<u8>),
}

impl Source {
    /// Opens `path`: a directory is a run or checkpoint; a file is a kernel blob.
    pub fn open(path: &Path) -> Result<Source> {
        if path.is_dir() {
            let (c, _) = checkpoint::load(path)?;
            Ok(Source::Checkpoint(Box::new(c)))
        } else {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Model::from_blob(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok(Source::Blob(bytes))
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Result<Arch> {
        match self {
            Source::Checkpoint(c) => Ok(c.model.to_arch()?),
            Source::Blob(b) => Ok(*Model::from_blob(b)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .arch()),
        }
    }
}
