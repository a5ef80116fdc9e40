//! Where a model comes from for `eval` and `sample`: a run or checkpoint folder (trainer
//! parameters) or an exported kernel blob (the deployed path). Evaluating a source lives in
//! [`crate::eval`], sampling it in [`crate::sample`].

use crate::checkpoint::{self, Checkpoint, Loaded};
use anyhow::{Context, Result};
use clayflow_kernel::{Arch, Model};
use std::path::{Path, PathBuf};

/// A model to evaluate or sample from: trainer parameters, or a kernel blob.
#[derive(Debug)]
pub enum Source {
    /// A checkpoint (from a run folder or a checkpoint folder).
    Checkpoint(Box<Checkpoint>),
    /// An exported kernel blob (the deployed path).
    Blob(Vec<u8>),
}

/// Which checkpoint of a run folder to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The one `BEST` names (the best validation bits/dim), else the latest.
    Best,
    /// The one `LATEST` names (the newest good checkpoint).
    Latest,
}

/// Where a checkpoint opened for `eval`, `sample` or `export` came from.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Its folder.
    pub dir: PathBuf,
    /// Fallbacks taken to find it (worth printing as warnings).
    pub notes: Vec<String>,
    /// One line naming the checkpoint: its folder, which of the run's it is, its step and
    /// its validation bits/dim.
    pub what: String,
}

/// Opens the checkpoint of a run or checkpoint folder `path`: for a run folder, its best
/// checkpoint or its latest ([`Pick`]); a checkpoint folder is used as it is.
pub fn open_checkpoint(path: &Path, pick: Pick) -> Result<(Checkpoint, Origin)> {
    let is_run = path.join(checkpoint::CHECKPOINTS_DIR).is_dir()
        || path.join(checkpoint::LATEST_FILE).is_file()
        || path.join(checkpoint::BEST_FILE).is_file();
    let Loaded {
        checkpoint,
        dir,
        notes,
    } = match pick {
        Pick::Best => checkpoint::load_best_with_notes(path)?,
        Pick::Latest => checkpoint::load_with_notes(path)?,
    };
    let which = match (is_run, pick) {
        (false, _) => "",
        // With a note, BEST was unusable and the latest was used.
        (true, Pick::Best) if notes.is_empty() => ", the run's best",
        (true, _) => ", the run's latest",
    };
    let s = &checkpoint.state;
    let val = s.last_val_bpd.map_or("not validated".to_string(), |v| {
        format!("validation {v:.4} bits/dim")
    });
    let what = format!(
        "checkpoint {}{which} (step {}, {val})",
        dir.display(),
        s.step
    );
    Ok((checkpoint, Origin { dir, notes, what }))
}

impl Source {
    /// Opens `path`: a directory is a run (its latest checkpoint) or a checkpoint folder; a
    /// file is a kernel blob. [`Source::open_pick`] chooses a run's checkpoint.
    pub fn open(path: &Path) -> Result<Source> {
        Ok(Source::open_pick(path, Pick::Latest)?.0)
    }

    /// Opens `path` like [`Source::open`], taking a run's `pick` checkpoint; also says
    /// where a checkpoint came from ([`Origin`]).
    pub fn open_pick(path: &Path, pick: Pick) -> Result<(Source, Option<Origin>)> {
        if path.is_dir() {
            let (c, origin) = open_checkpoint(path, pick)?;
            Ok((Source::Checkpoint(Box::new(c)), Some(origin)))
        } else {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Model::from_blob(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok((Source::Blob(bytes), None))
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
