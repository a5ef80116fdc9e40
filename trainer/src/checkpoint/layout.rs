//! The run folder's layout: checkpoint folder names, the leftovers of interrupted saves,
//! the `LATEST` and `BEST` pointers and finding the newest checkpoint.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{io_err, CheckpointError, BEST_FILE, CHECKPOINTS_DIR, LATEST_FILE};

/// The folder name of the checkpoint at `step` (`step-00000500`).
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The step of a `step-<digits>` folder name.
fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Kinds of entries in a checkpoints folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum EntryKind {
    /// `step-N`: a committed checkpoint.
    Step,
    /// `.step-N.old`: a committed checkpoint moved aside while step N was re-saved.
    Aside,
    /// `.step-N.tmp`: an unfinished save.
    Tmp,
    /// `.step-N.del` or `.step-N.old.del`: a checkpoint being deleted (renamed first, so
    /// that a crash halfway through the deletion never leaves a partial `step-N`).
    Trash,
}

pub(super) fn parse_entry(name: &str) -> Option<(u64, EntryKind)> {
    if let Some(step) = parse_step_name(name) {
        return Some((step, EntryKind::Step));
    }
    let hidden = name.strip_prefix('.')?;
    if let Some(base) = hidden.strip_suffix(".del") {
        let base = base.strip_suffix(".old").unwrap_or(base);
        return parse_step_name(base).map(|s| (s, EntryKind::Trash));
    }
    if let Some(base) = hidden.strip_suffix(".old") {
        return parse_step_name(base).map(|s| (s, EntryKind::Aside));
    }
    if let Some(base) = hidden.strip_suffix(".tmp") {
        return parse_step_name(base).map(|s| (s, EntryKind::Tmp));
    }
    None
}

pub(super) fn aside_name(name: &str) -> String {
    format!(".{name}.old")
}

pub(super) fn tmp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// Entries of a checkpoints folder: `(step, kind, name, path)`, directories only.
pub(super) fn list_entries(
    ckdir: &Path,
) -> Result<Vec<(u64, EntryKind, String, PathBuf)>, CheckpointError> {
    let rd = match fs::read_dir(ckdir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("cannot list {}", ckdir.display()))(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err(format!("cannot list {}", ckdir.display())))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some((step, kind)) = parse_entry(&name) else {
            continue;
        };
        let path = entry.path();
        if fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            out.push((step, kind, name, path));
        }
    }
    Ok(out)
}

/// Checkpoints that may be loaded, best first: newest step first, a committed `step-N`
/// before a `.step-N.old` left by a save interrupted at the wrong moment. Unfinished
/// `.step-N.tmp` folders and half-deleted `.del` folders are never candidates.
pub(super) fn candidates(ckdir: &Path) -> Result<Vec<(String, PathBuf)>, CheckpointError> {
    let mut v: Vec<_> = list_entries(ckdir)?
        .into_iter()
        .filter(|e| e.1 != EntryKind::Tmp && e.1 != EntryKind::Trash)
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Ok(v.into_iter()
        .map(|(_, _, name, path)| (name, path))
        .collect())
}

/// What `LATEST` says: `Ok(None)` when it does not exist, `Err(note)` when it is unusable.
pub(super) fn read_latest(ckdir: &Path) -> Result<Option<String>, String> {
    read_pointer(ckdir, LATEST_FILE)
}

/// What `BEST` says: `Ok(None)` when it does not exist, `Err(note)` when it is unusable.
pub(super) fn read_best(ckdir: &Path) -> Result<Option<String>, String> {
    read_pointer(ckdir, BEST_FILE)
}

/// The checkpoint folder name a pointer file (`LATEST`, `BEST`) of `ckdir` holds.
fn read_pointer(ckdir: &Path, file: &str) -> Result<Option<String>, String> {
    let path = ckdir.join(file);
    match fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let name = text.trim();
            if parse_step_name(name).is_some() {
                Ok(Some(name.to_string()))
            } else {
                Err(format!(
                    "{} does not name a checkpoint (it holds {:?})",
                    path.display(),
                    text.chars().take(40).collect::<String>()
                ))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// The checkpoint folder a run's `LATEST` names, or when `LATEST` is missing, unreadable or
/// names a missing folder, the newest checkpoint folder present (possibly a `.step-N.old`
/// copy left by an interrupted re-save). `None` when the run has no checkpoints. The folder
/// is not validated; [`load`](fn@super::load) does that.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    let ckdir = run_dir.join(CHECKPOINTS_DIR);
    if let Ok(Some(name)) = read_latest(&ckdir) {
        let p = ckdir.join(&name);
        if p.is_dir() {
            return Ok(Some(p));
        }
    }
    Ok(candidates(&ckdir)?.into_iter().next().map(|(_, p)| p))
}

/// The checkpoint folder a run's `BEST` names (the best validation bits/dim so far):
/// `Ok(None)` when the run has no `BEST`, `Err(note)` when `BEST` is unreadable, does not
/// name a checkpoint or names a missing folder. The folder is not validated;
/// [`load_best_with_notes`](fn@super::load_best_with_notes) does that.
pub fn best(run_dir: &Path) -> Result<Option<PathBuf>, String> {
    let ckdir = run_dir.join(CHECKPOINTS_DIR);
    match read_best(&ckdir)? {
        None => Ok(None),
        Some(name) => {
            let p = ckdir.join(&name);
            if p.is_dir() {
                Ok(Some(p))
            } else {
                Err(format!(
                    "{} names {name}, which does not exist",
                    ckdir.join(BEST_FILE).display()
                ))
            }
        }
    }
}
