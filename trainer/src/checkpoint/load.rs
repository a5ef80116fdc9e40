//! Loading: a checkpoint folder validated file by file, or a run folder through `LATEST`
//! with fallbacks to the newest checkpoint that loads (or through `BEST`, falling back to
//! `LATEST`).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, SafeTensorError};

use crate::config::{tensor_specs, ModelConfig};

use super::format::StateFileIn;
use super::layout::{candidates, parse_entry, read_best, read_latest};
use super::validate::{bad_value, check_state, config_diff, describe_bad, Values};
use super::{
    io_err, Checkpoint, CheckpointError, BEST_FILE, CHECKPOINTS_DIR, FORMAT_VERSION, LATEST_FILE,
    METADATA_FORMAT, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};

/// A loaded checkpoint with the folder it came from and what was skipped to get there.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The checkpoint folder it was read from.
    pub dir: PathBuf,
    /// Human-readable notes on fallbacks taken (empty when `LATEST` or the given
    /// checkpoint folder loaded directly); worth printing as warnings.
    pub notes: Vec<String>,
}

/// Loads a checkpoint. `path` may be a checkpoint folder (`RUN/checkpoints/step-N`), a run
/// folder or its `checkpoints/` folder. For a run, `LATEST` is followed; when it is
/// missing or names a missing or corrupt checkpoint, the newest checkpoint that loads is
/// used instead. Returns the checkpoint and the folder it was read from; use
/// [`load_with_notes`] to learn about fallbacks.
pub fn load(path: &Path) -> Result<(Checkpoint, PathBuf), CheckpointError> {
    let l = load_with_notes(path)?;
    Ok((l.checkpoint, l.dir))
}

/// Like [`load`], also reporting any fallback taken.
pub fn load_with_notes(path: &Path) -> Result<Loaded, CheckpointError> {
    let md = fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::NotFound {
                path: path.to_path_buf(),
                detail: "the path does not exist".to_string(),
            }
        } else {
            io_err(format!("cannot open {}", path.display()))(e)
        }
    })?;
    if !md.is_dir() {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
            detail: "expected a checkpoint folder or a run folder, found a file".to_string(),
        });
    }
    let has_files = [STATE_FILE, MODEL_FILE, OPTIMIZER_FILE]
        .iter()
        .any(|f| path.join(f).exists());
    let is_run = path.join(CHECKPOINTS_DIR).is_dir();
    let step_named = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_entry)
        .is_some();
    // A folder named like a checkpoint but holding nothing is an incomplete checkpoint:
    // load it so the error names the missing file.
    let is_ckpt_dir = has_files || (step_named && !is_run);
    if is_ckpt_dir {
        return Ok(Loaded {
            checkpoint: load_dir(path)?,
            dir: path.to_path_buf(),
            notes: Vec::new(),
        });
    }
    let ckdir = if is_run {
        path.join(CHECKPOINTS_DIR)
    } else if path.join(LATEST_FILE).exists() || !candidates(path)?.is_empty() {
        path.to_path_buf()
    } else {
        return Err(CheckpointError::NotFound {
            path: path.to_path_buf(),
            detail: format!(
                "neither a checkpoint folder (no {STATE_FILE}) nor a run folder (no {CHECKPOINTS_DIR}/)"
            ),
        });
    };
    load_run(&ckdir)
}

/// Like [`load_with_notes`], but a run folder (or its `checkpoints/` folder) gives the
/// checkpoint its `BEST` names: the best validation bits/dim of the run. When `BEST` is
/// missing, unreadable, or names a checkpoint that does not load, the run's latest
/// checkpoint is loaded as [`load_with_notes`] does, with a note saying why. A checkpoint
/// folder is loaded as it is.
pub fn load_best_with_notes(path: &Path) -> Result<Loaded, CheckpointError> {
    let ckdir = if path.join(CHECKPOINTS_DIR).is_dir() {
        path.join(CHECKPOINTS_DIR)
    } else if path.join(BEST_FILE).is_file() || path.join(LATEST_FILE).is_file() {
        path.to_path_buf()
    } else {
        return load_with_notes(path);
    };
    let note = match read_best(&ckdir) {
        Ok(Some(name)) => {
            let dir = ckdir.join(&name);
            match load_dir(&dir) {
                Ok(checkpoint) => {
                    return Ok(Loaded {
                        checkpoint,
                        dir,
                        notes: Vec::new(),
                    })
                }
                Err(e) => format!("{BEST_FILE} names {name}, which cannot be used: {e}"),
            }
        }
        Ok(None) => format!(
            "{} is missing (no validation has been saved as the best yet)",
            ckdir.join(BEST_FILE).display()
        ),
        Err(note) => note,
    };
    let mut loaded = load_run(&ckdir)?;
    loaded
        .notes
        .insert(0, format!("{note}; using the latest checkpoint"));
    Ok(loaded)
}

/// Loads the newest good checkpoint of a checkpoints folder (see [`load`]).
fn load_run(ckdir: &Path) -> Result<Loaded, CheckpointError> {
    let mut notes = Vec::new();
    let mut tried = HashSet::new();
    match read_latest(ckdir) {
        Ok(Some(name)) => {
            let dir = ckdir.join(&name);
            match load_dir(&dir) {
                Ok(checkpoint) => {
                    return Ok(Loaded {
                        checkpoint,
                        dir,
                        notes,
                    })
                }
                Err(e) => notes.push(format!(
                    "{LATEST_FILE} names {name}, which cannot be used: {e}"
                )),
            }
            tried.insert(name);
        }
        Ok(None) => notes.push(format!("{} is missing", ckdir.join(LATEST_FILE).display())),
        Err(note) => notes.push(note),
    }
    let cands = candidates(ckdir)?;
    for (name, dir) in &cands {
        if tried.contains(name) {
            continue;
        }
        match load_dir(dir) {
            Ok(checkpoint) => {
                notes.push(format!("using {} instead", dir.display()));
                return Ok(Loaded {
                    checkpoint,
                    dir: dir.clone(),
                    notes,
                });
            }
            Err(e) => notes.push(format!("skipped {name}: {e}")),
        }
    }
    if cands.is_empty() && tried.is_empty() {
        Err(CheckpointError::NotFound {
            path: ckdir.to_path_buf(),
            detail: "no step-* checkpoint folders".to_string(),
        })
    } else {
        Err(CheckpointError::NoUsable {
            path: ckdir.to_path_buf(),
            detail: notes.join("; "),
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CheckpointError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            io_err(format!("cannot read {}", path.display()))(e)
        }
    })
}

fn describe_st_error(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => {
            "shorter than its 8-byte header length (truncated?)".into()
        }
        SafeTensorError::HeaderTooLarge => "header length is implausibly large (corrupt?)".into(),
        SafeTensorError::InvalidHeaderLength => {
            "header length runs past the end of the file (truncated?)".into()
        }
        SafeTensorError::InvalidHeader => "header is not UTF-8 text (corrupt?)".into(),
        SafeTensorError::InvalidHeaderDeserialization => {
            "header is not valid safetensors JSON (corrupt?)".into()
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            "tensor data does not match the file size (truncated or trailing bytes?)".into()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor {name} has invalid data offsets (corrupt?)")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data size does not match its shape and dtype".into()
        }
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows (corrupt?)".into(),
        other => format!("{other:?}"),
    }
}

/// A tensor a file must hold: name, shape and allowed values.
type Expected<'a> = (String, &'a [usize], Values);

/// A safetensors file's `__metadata__` and its tensors.
type TensorFile = (HashMap<String, String>, Vec<Vec<f32>>);

/// Reads `path` as exactly the f32 tensors of `expected` (no more, no fewer). Returns the
/// metadata and the tensors in the order of `expected`.
fn read_tensors(path: &Path, expected: &[Expected<'_>]) -> Result<TensorFile, CheckpointError> {
    let bytes = read_file(path)?;
    let (n, meta): (usize, Metadata) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            CheckpointError::Safetensors {
                path: path.to_path_buf(),
                detail: describe_st_error(&e),
            }
        })?;
    let data = bytes.get(8 + n..).unwrap_or(&[]);
    let tensor_err = |tensor: &str, problem: String| CheckpointError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        problem,
    };
    let mut out = Vec::with_capacity(expected.len());
    for (name, shape, allowed) in expected {
        let info = meta
            .info(name)
            .ok_or_else(|| tensor_err(name, "missing".to_string()))?;
        if info.dtype != Dtype::F32 {
            return Err(tensor_err(
                name,
                format!("dtype {:?}, expected F32", info.dtype),
            ));
        }
        if info.shape.as_slice() != *shape {
            return Err(tensor_err(
                name,
                format!("shape {:?}, expected {:?}", info.shape, shape),
            ));
        }
        let (s, e) = info.data_offsets;
        let raw = data
            .get(s..e)
            .filter(|r| r.len() == shape.iter().product::<usize>() * 4)
            .ok_or_else(|| tensor_err(name, "data offsets out of range".to_string()))?;
        let values: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some((i, v)) = bad_value(&values, *allowed) {
            return Err(tensor_err(name, describe_bad(i, v, *allowed)));
        }
        out.push(values);
    }
    if meta.tensors().len() != expected.len() {
        let known: HashSet<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
        let mut extra: Vec<String> = meta
            .tensors()
            .into_keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        extra.sort();
        let first = extra.first().cloned().unwrap_or_default();
        let more = if extra.len() > 1 {
            format!(" ({} more unexpected tensors)", extra.len() - 1)
        } else {
            String::new()
        };
        return Err(tensor_err(
            &first,
            format!("not part of the model (unexpected){more}"),
        ));
    }
    let metadata = meta.metadata().clone().unwrap_or_default();
    if let Some(f) = metadata.get("format") {
        if f != METADATA_FORMAT {
            return Err(CheckpointError::Metadata {
                path: path.to_path_buf(),
                detail: format!("format is {f:?}, expected {METADATA_FORMAT:?}"),
            });
        }
    }
    Ok((metadata, out))
}

/// Loads exactly the checkpoint in folder `dir`, validating every file; no fallback.
pub fn load_dir(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    let text = read_file(&state_path)?;
    let json_err = |source| CheckpointError::Json {
        path: state_path.clone(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(&text).map_err(json_err)?;
    match value.get("format_version") {
        Some(v) if v.as_u64() == Some(FORMAT_VERSION) => {}
        found => {
            return Err(CheckpointError::FormatVersion {
                path: state_path,
                found: found.map_or_else(|| "missing".to_string(), |v| v.to_string()),
            })
        }
    }
    let file: StateFileIn = serde_json::from_value(value).map_err(json_err)?;
    let arch = file
        .model
        .to_arch()
        .map_err(|source| CheckpointError::Config {
            path: state_path.clone(),
            source,
        })?;
    check_state(&file.state).map_err(|detail| CheckpointError::State {
        path: state_path.clone(),
        detail,
    })?;
    let specs = tensor_specs(&arch);

    let model_path = dir.join(MODEL_FILE);
    let expected: Vec<_> = specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.as_slice(), Values::Finite))
        .collect();
    let (metadata, params) = read_tensors(&model_path, &expected)?;
    if let Some(config) = metadata.get("config") {
        let meta_model: ModelConfig =
            serde_json::from_str(config).map_err(|e| CheckpointError::Metadata {
                path: model_path.clone(),
                detail: format!("config is not a model configuration: {e}"),
            })?;
        if meta_model != file.model {
            return Err(CheckpointError::ConfigMismatch {
                path: model_path,
                state: state_path,
                diff: config_diff(&meta_model, &file.model),
            });
        }
    }

    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut groups = vec![("m.", Values::Finite), ("v.", Values::NonNegative)];
    if file.state.ema.is_some() {
        groups.push(("w.", Values::Finite));
    }
    let mut expected = Vec::with_capacity(groups.len() * specs.len());
    for (prefix, allowed) in groups {
        expected.extend(
            specs
                .iter()
                .map(|s| (format!("{prefix}{}", s.name), s.shape.as_slice(), allowed)),
        );
    }
    let (_, mut moments) = read_tensors(&opt_path, &expected)?;
    let trained = (file.state.ema.is_some()).then(|| moments.split_off(2 * specs.len()));
    let adam_v = moments.split_off(specs.len());
    Ok(Checkpoint {
        model: file.model,
        params,
        trained,
        adam_m: moments,
        adam_v,
        state: file.state,
    })
}

#[cfg(test)]
mod tests {
    use super::super::layout::{latest, parse_entry, EntryKind};
    use super::super::save::{save, save_best};
    use super::super::testutil::*;
    use super::super::validate::validate_for_save;
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    #[test]
    fn a_half_deleted_checkpoint_is_never_loaded_and_is_cleaned_up() {
        // What a process killed while pruning leaves behind: the folder was renamed to
        // `.del` (atomic) and then partly removed.
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c = make(tiny(), 1, 100);
        let d = save(run, &c, 3).unwrap();
        let ck = run.join("checkpoints");
        for name in [".step-00000300.del", ".step-00000200.old.del"] {
            let trash = ck.join(name);
            fs::create_dir(&trash).unwrap();
            fs::copy(d.join(MODEL_FILE), trash.join(MODEL_FILE)).unwrap();
        }
        assert_eq!(
            parse_entry(".step-00000300.del"),
            Some((300, EntryKind::Trash))
        );
        assert_eq!(
            parse_entry(".step-00000200.old.del"),
            Some((200, EntryKind::Trash))
        );
        fs::remove_file(ck.join(LATEST_FILE)).unwrap();
        assert_eq!(latest(run).unwrap(), Some(d.clone()));
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d);
        assert_same(&l.checkpoint, &c);
        save(run, &make(tiny(), 2, 200), 3).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000100", "step-00000200"]);
        // Pruning itself goes through `.del`: nothing is left under the old name.
        save(run, &make(tiny(), 3, 300), 1).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000300"]);
    }

    #[test]
    fn best_is_followed_and_a_bad_best_falls_back_to_latest_with_a_note() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let ck = run.join("checkpoints");
        // No BEST yet: the latest, with a note.
        save(run, &make(tiny(), 1, 100), 3).unwrap();
        let l = load_best_with_notes(run).unwrap();
        assert_eq!(l.checkpoint.state.step, 100);
        assert!(l.notes[0].contains("BEST is missing"), "{:?}", l.notes);
        let best = make(tiny(), 2, 200);
        let best_dir = save_best(run, &best, 3).unwrap();
        let latest_dir = save(run, &make(tiny(), 3, 300), 3).unwrap();
        // BEST wins over LATEST, from the run folder and from its checkpoints folder.
        for p in [run.to_path_buf(), ck.clone()] {
            let l = load_best_with_notes(&p).unwrap();
            assert_eq!(l.dir, best_dir);
            assert!(l.notes.is_empty(), "{:?}", l.notes);
            assert_same(&l.checkpoint, &best);
        }
        // Plain loading still follows LATEST, and a checkpoint folder is itself.
        assert_eq!(load(run).unwrap().1, latest_dir);
        assert_eq!(load_best_with_notes(&latest_dir).unwrap().dir, latest_dir);
        // Garbage in BEST, a BEST naming a missing folder, a corrupt best checkpoint: the
        // latest checkpoint, and a note saying why.
        let cases: [(&[u8], &str); 3] = [
            (b"../../etc\n", "does not name a checkpoint"),
            (b"step-00000900\n", "step-00000900, which cannot be used"),
            (b"step-00000200\n", "step-00000200, which cannot be used"),
        ];
        fs::write(best_dir.join(MODEL_FILE), b"not safetensors").unwrap();
        for (text, want) in cases {
            fs::write(ck.join(BEST_FILE), text).unwrap();
            let l = load_best_with_notes(run).unwrap();
            assert_eq!(l.dir, latest_dir);
            assert_eq!(l.checkpoint.state.step, 300);
            assert!(
                l.notes[0].contains(want) && l.notes[0].ends_with("using the latest checkpoint"),
                "{want}: {:?}",
                l.notes
            );
        }
        // An unreadable BEST (a folder in its place) never panics either.
        fs::remove_file(ck.join(BEST_FILE)).unwrap();
        fs::create_dir(ck.join(BEST_FILE)).unwrap();
        let l = load_best_with_notes(run).unwrap();
        assert_eq!(l.dir, latest_dir);
        assert!(!l.notes.is_empty());
    }

    #[test]
    fn stale_tmp_folders_are_ignored_and_replaced() {
        let (tmp, dir, c) = saved_tiny();
        let ck = tmp.path().join("checkpoints");
        // An interrupted save of a newer step, complete-looking or not, is never loaded.
        let stale = ck.join(".step-00000600.tmp");
        fs::create_dir(&stale).unwrap();
        for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            fs::copy(dir.join(f), stale.join(f)).unwrap();
        }
        fs::remove_file(ck.join(LATEST_FILE)).unwrap();
        let l = load_with_notes(tmp.path()).unwrap();
        assert_eq!(l.dir, dir);
        assert!(
            l.notes.iter().any(|n| n.contains("LATEST")),
            "{:?}",
            l.notes
        );
        assert_eq!(latest(tmp.path()).unwrap(), Some(dir.clone()));
        // A stale tmp of the step being saved is replaced; leftovers are cleaned up.
        fs::create_dir(ck.join(".step-00000700.tmp")).unwrap();
        fs::write(ck.join(".step-00000700.tmp/junk"), b"x").unwrap();
        let mut c7 = c.clone();
        c7.state.step = 700;
        save(tmp.path(), &c7, 5).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000500", "step-00000700"]);
    }

    #[test]
    fn truncated_or_garbage_model_file_is_named() {
        let (_tmp, dir, _) = saved_tiny();
        let p = dir.join(MODEL_FILE);
        let bytes = fs::read(&p).unwrap();
        for cut in [0, 5, 8, 100, bytes.len() - 1] {
            fs::write(&p, &bytes[..cut]).unwrap();
            let e = load_err(&dir);
            assert!(e.contains(&p.display().to_string()), "{e}");
            assert!(e.contains("safetensors"), "{e}");
        }
        fs::write(&p, b"garbage garbage garbage garbage").unwrap();
        assert!(load_err(&dir).contains("model.safetensors"));
        let mut extra = bytes.clone();
        extra.push(0);
        fs::write(&p, &extra).unwrap();
        assert!(load_err(&dir).contains("trailing"));
        fs::remove_file(&p).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("model.safetensors") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn run_load_falls_back_past_a_corrupt_newest_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c1 = make(tiny(), 1, 100);
        let d1 = save(run, &c1, 5).unwrap();
        let d2 = save(run, &make(tiny(), 2, 200), 5).unwrap();
        let p = d2.join(MODEL_FILE);
        let len = fs::metadata(&p).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d1);
        assert_same(&l.checkpoint, &c1);
        let notes = l.notes.join("\n");
        assert!(notes.contains("step-00000200"), "{notes}");
        assert!(notes.contains("model.safetensors"), "{notes}");
        // Naming the corrupt checkpoint itself gives no fallback.
        assert!(load_err(&d2).contains("model.safetensors"));
        // With every checkpoint broken, the error lists why.
        fs::remove_file(d1.join(STATE_FILE)).unwrap();
        let e = load_err(run);
        assert!(e.contains("no usable checkpoint"), "{e}");
        assert!(e.contains("state.json"), "{e}");
    }

    #[test]
    fn run_load_skips_incomplete_dirs_and_bad_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c1 = make(tiny(), 1, 100);
        let d1 = save(run, &c1, 5).unwrap();
        let ck = run.join("checkpoints");
        // A newer folder missing state.json (e.g. copied by hand), LATEST gone.
        let d3 = ck.join("step-00000300");
        fs::create_dir(&d3).unwrap();
        fs::copy(d1.join(MODEL_FILE), d3.join(MODEL_FILE)).unwrap();
        fs::remove_file(ck.join(LATEST_FILE)).unwrap();
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d1);
        assert!(l.notes.iter().any(|n| n.contains("skipped step-00000300")));
        assert!(load_err(&d3).contains("state.json"));
        // LATEST with garbage (or a path escape) is not followed.
        fs::write(ck.join(LATEST_FILE), b"../../etc\n").unwrap();
        let l = load_with_notes(run).unwrap();
        assert_eq!(l.dir, d1);
        assert!(
            l.notes[0].contains("does not name a checkpoint"),
            "{:?}",
            l.notes
        );
        // LATEST naming a folder that vanished.
        fs::write(ck.join(LATEST_FILE), b"step-00000900\n").unwrap();
        assert_eq!(load(run).unwrap().1, d1);
        assert_eq!(latest(run).unwrap(), Some(d3));
    }

    #[test]
    fn an_old_copy_moved_aside_is_recovered() {
        // A crash while re-saving step 100, between moving the old copy aside and moving
        // the new one in, leaves `.step-00000100.old` and a LATEST naming a missing folder.
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let c = make(tiny(), 1, 100);
        let d = save(run, &c, 5).unwrap();
        let aside = run.join("checkpoints/.step-00000100.old");
        fs::rename(&d, &aside).unwrap();
        let (back, from) = load(run).unwrap();
        assert_eq!(from, aside);
        assert_same(&back, &c);
        // The next save cleans it up.
        save(run, &make(tiny(), 2, 100), 5).unwrap();
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000100"]
        );
    }

    #[test]
    fn non_checkpoint_paths_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let e = load_err(tmp.path());
        assert!(e.contains("neither a checkpoint folder"), "{e}");
        let e = load_err(&tmp.path().join("nope"));
        assert!(e.contains("does not exist"), "{e}");
        fs::create_dir(tmp.path().join("checkpoints")).unwrap();
        assert!(load_err(tmp.path()).contains("no step-* checkpoint"));
        assert_eq!(latest(tmp.path()).unwrap(), None);
    }

    #[test]
    fn state_json_problems_are_reported() {
        let (_tmp, dir, c) = saved_tiny();
        let p = dir.join(STATE_FILE);
        let good = fs::read_to_string(&p).unwrap();
        let check = |text: &str, want: &str| {
            fs::write(&p, text).unwrap();
            let e = load_err(&dir);
            assert!(e.contains("state.json"), "{e}");
            assert!(e.contains(want), "{want:?} not in {e}");
        };
        check("{ not json", "cannot parse");
        check(
            &good.replace("\"format_version\": 1", "\"format_version\": 2"),
            "format_version 2",
        );
        check(
            &good.replace("\"format_version\": 1,", ""),
            "format_version missing",
        );
        check(
            &good.replace("\"step\": 500", "\"stepp\": 500"),
            "missing field `step`",
        );
        let mut bad = c.model.clone();
        bad.masks.clear();
        let v = serde_json::json!({"format_version": 1, "model": bad, "state": c.state});
        check(&v.to_string(), "invalid model configuration");
        check(&good.replace("\"lr\": 0.001", "\"lr\": 1e300"), "lr is inf");
        fs::write(&p, &good).unwrap();
        assert_same(&load(&dir).unwrap().0, &c);
    }

    #[test]
    fn tensor_problems_name_file_and_tensor() {
        let (_tmp, dir, _) = saved_tiny();
        let model = dir.join(MODEL_FILE);
        let opt = dir.join(OPTIMIZER_FILE);
        let orig_model = fs::read(&model).unwrap();
        let orig_opt = fs::read(&opt).unwrap();
        let restore = || {
            fs::write(&model, &orig_model).unwrap();
            fs::write(&opt, &orig_opt).unwrap();
        };
        let check = |want: &[&str]| {
            let e = load_err(&dir);
            for w in want {
                assert!(e.contains(w), "{w:?} not in {e}");
            }
            restore();
        };
        let name = "coupling.1.conv2.weight";

        rewrite(&model, |ts, _| ts.retain(|t| t.0 != name));
        check(&["model.safetensors", name, "missing"]);

        rewrite(&model, |ts, _| {
            ts.push(("extra.bias".into(), Dtype::F32, vec![1], vec![0; 4]))
        });
        check(&["model.safetensors", "extra.bias", "unexpected"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.1 = Dtype::I32;
        });
        check(&["model.safetensors", name, "dtype I32"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.1 = Dtype::F64;
            t.2 = vec![t.3.len() / 8];
        });
        check(&[name, "dtype F64"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.2 = vec![t.3.len() / 4];
        });
        check(&[name, "shape"]);

        rewrite(&model, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == name).unwrap();
            t.3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        });
        check(&["model.safetensors", name, "NaN at index 1"]);

        rewrite(&model, |_, md| {
            let mut other = tiny();
            other.hidden = [5, 2];
            md.insert("config".into(), serde_json::to_string(&other).unwrap());
        });
        check(&["model.safetensors", "state.json", "hidden [5, 2] vs [3, 2]"]);

        rewrite(&model, |_, md| {
            md.insert("config".into(), "{}".into());
        });
        check(&["model.safetensors", "config is not a model configuration"]);

        rewrite(&model, |_, md| {
            md.insert("format".into(), "other".into());
        });
        check(&["model.safetensors", "format is \"other\""]);

        // Metadata is optional (a file re-saved from PyTorch without it still loads).
        rewrite(&model, |_, md| md.clear());
        load(&dir).unwrap();
        restore();

        rewrite(&opt, |ts, _| ts.retain(|t| t.0 != format!("v.{name}")));
        check(&["optimizer.safetensors", &format!("v.{name}"), "missing"]);

        rewrite(&opt, |ts, _| {
            let t = ts.iter_mut().find(|t| t.0 == format!("v.{name}")).unwrap();
            t.3[0..4].copy_from_slice(&(-1.0f32).to_le_bytes());
        });
        check(&["optimizer.safetensors", "non-negative"]);

        // The optimizer file of another model.
        rewrite(&opt, |ts, _| {
            for t in ts.iter_mut() {
                t.0 = t.0.replacen("coupling.", "layer.", 1);
            }
        });
        check(&["optimizer.safetensors", "m.coupling.0.scale", "missing"]);
        load(&dir).unwrap();
    }

    /// The three files of a saved tiny checkpoint.
    fn base_files() -> &'static [Vec<u8>; 3] {
        static FILES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
        FILES.get_or_init(|| {
            let (_tmp, dir, _) = saved_tiny();
            [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].map(|f| fs::read(dir.join(f)).unwrap())
        })
    }

    #[derive(Clone, Debug)]
    enum Damage {
        Truncate(usize),
        Flip(usize, u8),
        Set(usize, u8),
        Append(Vec<u8>),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            any::<usize>().prop_map(Damage::Truncate),
            (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
            // Header bytes: the first few hundred.
            (0usize..600, any::<u8>()).prop_map(|(i, x)| Damage::Set(i, x)),
            proptest::collection::vec(any::<u8>(), 1..16).prop_map(Damage::Append),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        #[test]
        fn damaged_files_never_panic(
            file in 0usize..3,
            hits in proptest::collection::vec(damage(), 1..4),
        ) {
            let base = base_files();
            let mut bytes = base[file].clone();
            for d in &hits {
                match d {
                    Damage::Truncate(n) => bytes.truncate(n % (bytes.len() + 1)),
                    Damage::Flip(i, x) if !bytes.is_empty() => {
                        let n = bytes.len();
                        bytes[i % n] ^= x;
                    }
                    Damage::Set(i, x) if *i < bytes.len() => bytes[*i] = *x,
                    Damage::Append(extra) => bytes.extend_from_slice(extra),
                    _ => {}
                }
            }
            let tmp = tempfile::tempdir().unwrap();
            let ck = tmp.path().join("checkpoints");
            let dir = ck.join("step-00000500");
            fs::create_dir_all(&dir).unwrap();
            for (i, f) in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE].iter().enumerate() {
                let b = if i == file { &bytes } else { &base[i] };
                fs::write(dir.join(f), b).unwrap();
            }
            fs::write(ck.join(LATEST_FILE), b"step-00000500\n").unwrap();
            match load(&dir) {
                Ok((c, _)) => {
                    // Anything accepted is fully valid.
                    prop_assert!(validate_for_save(&c).is_ok());
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(msg.contains("step-00000500"), "{}", msg);
                }
            }
            let _ = load_with_notes(tmp.path());
        }
    }
}
