//! Saving: the crash-safe write of a checkpoint folder, moving `LATEST` (and `BEST`), and
//! pruning old checkpoints and the leftovers of interrupted saves.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::config::TensorSpec;
use crate::fsutil::{atomic_write, fsync_dir, write_synced};

use super::format::{encode_tensors, model_metadata, StateFileOut};
use super::layout::{
    aside_name, list_entries, read_best, read_latest, step_dir_name, tmp_name, EntryKind,
};
use super::validate::validate_for_save;
use super::{
    io_err, Checkpoint, CheckpointError, BEST_FILE, CHECKPOINTS_DIR, FORMAT_VERSION, LATEST_FILE,
    METADATA_FORMAT, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
};

/// Environment variable of the testing hook described in the module documentation.
pub const TEST_PAUSE_ENV: &str = "CLAYFLOW_TEST_CHECKPOINT_PAUSE";

/// The testing hook: sleeps when [`TEST_PAUSE_ENV`] is `<phase>:<ms>` for this `phase`.
/// Does nothing when the variable is unset or does not parse.
fn test_pause(phase: &str) {
    let Some(v) = std::env::var_os(TEST_PAUSE_ENV) else {
        return;
    };
    let v = v.to_string_lossy();
    let Some((at, ms)) = v.split_once(':') else {
        return;
    };
    if at == phase {
        if let Ok(ms) = ms.trim().parse::<u64>() {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

/// Removes a file or folder tree if present.
fn remove_any(path: &Path) -> Result<(), CheckpointError> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("cannot inspect {}", path.display()))(e)),
    };
    let r = if md.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    r.map_err(io_err(format!("cannot remove {}", path.display())))
}

/// Deletes a checkpoint folder so that a crash at any moment leaves either the whole
/// folder under its name or nothing under it: renames it to a hidden `.del` name first
/// (atomic), then removes that. [`prune`] removes what a crash leaves behind.
fn discard(path: &Path) -> Result<(), CheckpointError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return remove_any(path);
    };
    let trash = path.with_file_name(format!(".{}.del", name.trim_start_matches('.')));
    remove_any(&trash)?;
    rename(path, &trash)?;
    remove_any(&trash)
}

fn rename(from: &Path, to: &Path) -> Result<(), CheckpointError> {
    fs::rename(from, to).map_err(io_err(format!(
        "cannot rename {} to {}",
        from.display(),
        to.display()
    )))
}

fn io_plain(e: io::Error) -> CheckpointError {
    // fsutil errors already name their path.
    CheckpointError::Io {
        context: "checkpoint I/O".to_string(),
        source: e,
    }
}

/// Saves `ckpt` as `run_dir/checkpoints/step-<step>/`, points `LATEST` at it and removes
/// older checkpoints beyond the newest `keep` (at least 1: the one just saved). Returns the
/// checkpoint's folder.
///
/// The checkpoint is validated first (shapes against [`tensor_specs`], finite values, a
/// finite state) so that an unloadable checkpoint is never written. Files are written into
/// `.step-<step>.tmp/` and fsynced before the folder is renamed into place; re-saving an
/// existing step moves the old folder aside and deletes it only once the new one is
/// committed. Checkpoints with a higher step than this one (left by a run resumed from an
/// earlier checkpoint) are not pruned.
///
/// [`tensor_specs`]: crate::config::tensor_specs
pub fn save(run_dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf, CheckpointError> {
    save_marked(run_dir, ckpt, keep, false)
}

/// [`save`], and `BEST` names the checkpoint too: the run's best validation so far. `BEST`
/// is moved (atomically) after the folder is committed and before `LATEST`, so a `LATEST`
/// never names a step newer than the last `BEST` update it implies; pruning never removes
/// the folder `BEST` names.
pub fn save_best(
    run_dir: &Path,
    ckpt: &Checkpoint,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    save_marked(run_dir, ckpt, keep, true)
}

fn save_marked(
    run_dir: &Path,
    ckpt: &Checkpoint,
    keep: usize,
    best: bool,
) -> Result<PathBuf, CheckpointError> {
    let specs = validate_for_save(ckpt)?;
    let model_bytes = encode_tensors(&specs, "", &ckpt.params, model_metadata(&ckpt.model)?)?;
    let opt_meta = HashMap::from([
        ("format".to_string(), METADATA_FORMAT.to_string()),
        ("optimizer".to_string(), "adam".to_string()),
    ]);
    let mut opt_views = Vec::with_capacity(3 * specs.len());
    opt_views.extend(ckpt.adam_m.iter().cloned());
    opt_views.extend(ckpt.adam_v.iter().cloned());
    let mut prefixes = vec!["m.", "v."];
    if let Some(w) = &ckpt.trained {
        opt_views.extend(w.iter().cloned());
        prefixes.push("w.");
    }
    let mut opt_specs = Vec::with_capacity(opt_views.len());
    for prefix in prefixes {
        opt_specs.extend(specs.iter().map(|s| TensorSpec {
            name: format!("{prefix}{}", s.name),
            shape: s.shape.clone(),
        }));
    }
    let opt_bytes = encode_tensors(&opt_specs, "", &opt_views, opt_meta)?;
    let mut state_bytes = serde_json::to_vec_pretty(&StateFileOut {
        format_version: FORMAT_VERSION,
        model: &ckpt.model,
        state: &ckpt.state,
    })
    .map_err(|e| CheckpointError::Invalid(format!("cannot encode the state: {e}")))?;
    state_bytes.push(b'\n');

    let ckdir = run_dir.join(CHECKPOINTS_DIR);
    if !ckdir.is_dir() {
        fs::create_dir_all(&ckdir).map_err(io_err(format!("cannot create {}", ckdir.display())))?;
        fsync_dir(run_dir).map_err(io_plain)?;
    }
    let name = step_dir_name(ckpt.state.step);
    let tmp = ckdir.join(tmp_name(&name));
    remove_any(&tmp)?;
    fs::create_dir(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
    for (file, bytes) in [
        (MODEL_FILE, &model_bytes),
        (OPTIMIZER_FILE, &opt_bytes),
        (STATE_FILE, &state_bytes),
    ] {
        write_synced(&tmp.join(file), bytes).map_err(io_plain)?;
        if file == MODEL_FILE {
            test_pause("model");
        }
    }
    fsync_dir(&tmp).map_err(io_plain)?;

    let dest = ckdir.join(&name);
    let aside = ckdir.join(aside_name(&name));
    let replacing = fs::symlink_metadata(&dest).is_ok();
    if replacing {
        discard(&aside)?;
        rename(&dest, &aside)?;
        test_pause("aside");
    }
    rename(&tmp, &dest)?;
    fsync_dir(&ckdir).map_err(io_plain)?;
    test_pause("renamed");
    if best {
        atomic_write(&ckdir.join(BEST_FILE), format!("{name}\n").as_bytes()).map_err(io_plain)?;
    }
    atomic_write(&ckdir.join(LATEST_FILE), format!("{name}\n").as_bytes()).map_err(io_plain)?;
    if replacing {
        discard(&aside)?;
    }
    prune(&ckdir, ckpt.state.step, keep).map_err(|e| match e {
        CheckpointError::Io { context, source } => CheckpointError::Io {
            context: format!("saved {}, but pruning failed: {context}", dest.display()),
            source,
        },
        other => other,
    })?;
    Ok(dest)
}

/// Removes committed checkpoints older than `step` beyond the newest `keep - 1`, and
/// leftovers of interrupted saves up to `step`. The folders `LATEST` and `BEST` name are
/// never removed (nor counted among the `keep`).
fn prune(ckdir: &Path, step: u64, keep: usize) -> Result<(), CheckpointError> {
    let keep_older = keep.max(1) - 1;
    let latest = read_latest(ckdir).ok().flatten();
    let best = read_best(ckdir).ok().flatten();
    let mut entries = list_entries(ckdir)?;
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut older_kept = 0;
    let mut removed = false;
    for (s, kind, name, path) in entries {
        if latest.as_deref() == Some(name.as_str()) || best.as_deref() == Some(name.as_str()) {
            continue;
        }
        let remove = match kind {
            EntryKind::Step if s < step => {
                older_kept += 1;
                older_kept > keep_older
            }
            EntryKind::Step => false,
            EntryKind::Aside => s <= step,
            EntryKind::Tmp | EntryKind::Trash => true,
        };
        if remove {
            if matches!(kind, EntryKind::Step | EntryKind::Aside) {
                discard(&path)?;
            } else {
                remove_any(&path)?;
            }
            removed = true;
        }
    }
    // A process killed inside `atomic_write(LATEST or BEST)` leaves its temporary file behind.
    let stale_prefixes = [format!(".{LATEST_FILE}.tmp-"), format!(".{BEST_FILE}.tmp-")];
    for entry in fs::read_dir(ckdir)
        .map_err(io_err(format!("cannot list {}", ckdir.display())))?
        .flatten()
    {
        let stale = entry
            .file_name()
            .to_str()
            .is_some_and(|n| stale_prefixes.iter().any(|p| n.starts_with(p.as_str())));
        if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
            remove_any(&entry.path())?;
            removed = true;
        }
    }
    if removed {
        fsync_dir(ckdir).map_err(io_plain)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::format::f32_bytes;
    use super::super::testutil::*;
    use super::super::{latest, load, unflatten, ModelConfig};
    use super::*;
    use crate::config::tensor_specs;
    use safetensors::tensor::Dtype;
    use safetensors::SafeTensors;

    #[test]
    fn mnist_round_trip_is_bit_exact() {
        let model = ModelConfig::preset("mnist").unwrap();
        let c = make(model, 42, 500);
        let tmp = tempfile::tempdir().unwrap();
        let dir = save(tmp.path(), &c, 3).unwrap();
        assert_eq!(dir, tmp.path().join("checkpoints/step-00000500"));
        assert_eq!(
            names(&dir),
            vec!["model.safetensors", "optimizer.safetensors", "state.json"]
        );
        let (back, from) = load(&dir).unwrap();
        assert_eq!(from, dir);
        assert_same(&c, &back);
        assert_eq!(back, c);
        assert_eq!(
            back.flat_params().len(),
            clayflow_kernel::MNIST.param_count()
        );
    }

    #[test]
    fn the_trained_weights_beside_an_average_round_trip_and_must_match_the_state() {
        let model = ModelConfig::preset("mnist").unwrap();
        let mut c = make(model.clone(), 42, 500);
        c.state.ema = Some(0.999);
        c.trained = Some(make(model, 7, 500).params);
        let tmp = tempfile::tempdir().unwrap();
        let dir = save(tmp.path(), &c, 3).unwrap();
        let (back, _) = load(&dir).unwrap();
        assert_same(&c, &back);
        assert_eq!(back, c);
        // The optimizer file holds them as `w.<name>`.
        let bytes = fs::read(dir.join(OPTIMIZER_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 3 * c.params.len());
        let first = &tensor_specs(&c.model.to_arch().unwrap())[0].name;
        assert!(st.tensor(&format!("w.{first}")).is_ok());
        // A state and weights that disagree are refused, and nothing is written.
        let empty = tempfile::tempdir().unwrap();
        let mut lacking = c.clone();
        lacking.trained = None;
        let mut stray = c.clone();
        stray.state.ema = None;
        for bad in [lacking, stray] {
            let err = save(empty.path(), &bad, 3).unwrap_err().to_string();
            assert!(err.contains("weight average"), "{err}");
        }
        assert!(!empty.path().join(CHECKPOINTS_DIR).exists());
        let mut decay = c.clone();
        decay.state.ema = Some(1.0);
        let err = save(empty.path(), &decay, 3).unwrap_err().to_string();
        assert!(err.contains("ema is 1"), "{err}");
    }

    #[test]
    fn tiny_round_trip_flat_params_and_unflatten() {
        let (tmp, dir, c) = saved_tiny();
        let (back, from) = load(tmp.path()).unwrap();
        assert_eq!(from, dir);
        assert_same(&c, &back);
        let flat = back.flat_params();
        assert_eq!(flat.len(), tiny().to_arch().unwrap().param_count());
        assert_eq!(unflatten(&tiny(), &flat).unwrap(), c.params);
        assert!(unflatten(&tiny(), &flat[1..]).is_err());
        // state.json is pretty-printed and versioned.
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\n  \"format_version\": 1,"), "{text}");
        // The checkpoints folder itself is accepted too.
        assert_eq!(load(&tmp.path().join("checkpoints")).unwrap().1, dir);
    }

    #[test]
    fn state_floats_survive_json() {
        let tmp = tempfile::tempdir().unwrap();
        let mut rng = Rng::new(99);
        let mut c = make(tiny(), 5, 1);
        for i in 0..50 {
            c.state.step = i;
            c.state.lr = rng.any_finite();
            c.state.eps = rng.any_finite();
            c.state.beta2 = 1.0 - rng.unit() * 1e-3;
            c.state.elapsed_secs = f64::from(rng.unit()) * 1e5 + rng.next() as f64 * 1e-20;
            c.state.best_val_bpd = Some(rng.next() as f64 / u64::MAX as f64 * 8.0);
            let dir = save(tmp.path(), &c, 1).unwrap();
            let back = load(&dir).unwrap().0.state;
            assert_eq!(back.lr.to_bits(), c.state.lr.to_bits());
            assert_eq!(back.eps.to_bits(), c.state.eps.to_bits());
            assert_eq!(back.beta2.to_bits(), c.state.beta2.to_bits());
            // f64: exact with serde_json's `float_roundtrip`, else within 2 ulp.
            let ulps = |a: f64, b: f64| (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps(back.elapsed_secs, c.state.elapsed_secs) <= 2);
            assert!(ulps(back.best_val_bpd.unwrap(), c.state.best_val_bpd.unwrap()) <= 2);
        }
    }

    #[test]
    fn model_file_is_readable_by_the_safetensors_crate() {
        let (_tmp, dir, c) = saved_tiny();
        let specs = tensor_specs(&tiny().to_arch().unwrap());
        let bytes = fs::read(dir.join(MODEL_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), specs.len());
        for (s, p) in specs.iter().zip(&c.params) {
            let t = st.tensor(&s.name).unwrap();
            assert_eq!(t.dtype(), Dtype::F32);
            assert_eq!(t.shape(), s.shape.as_slice());
            assert_eq!(t.data(), f32_bytes(p).as_slice());
        }
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let md = meta.metadata().as_ref().unwrap();
        assert_eq!(md["format"], "clayflow");
        let cfg: ModelConfig = serde_json::from_str(&md["config"]).unwrap();
        assert_eq!(cfg, tiny());

        let bytes = fs::read(dir.join(OPTIMIZER_FILE)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 2 * specs.len());
        for (i, s) in specs.iter().enumerate() {
            let m = st.tensor(&format!("m.{}", s.name)).unwrap();
            let v = st.tensor(&format!("v.{}", s.name)).unwrap();
            assert_eq!(m.shape(), s.shape.as_slice());
            assert_eq!(v.dtype(), Dtype::F32);
            assert_eq!(m.data(), f32_bytes(&c.adam_m[i]).as_slice());
            assert_eq!(v.data(), f32_bytes(&c.adam_v[i]).as_slice());
        }
    }

    #[test]
    fn latest_is_updated_and_keep_prunes_older() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        assert_eq!(latest(run).unwrap(), None);
        for step in [100, 200, 300] {
            let dir = save(run, &make(tiny(), step, step), 2).unwrap();
            assert_eq!(latest_text(run), format!("step-{step:08}\n"));
            assert_eq!(latest(run).unwrap(), Some(dir));
        }
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000200", "step-00000300"]
        );
        let (c, _) = load(run).unwrap();
        assert_eq!(c.state.step, 300);
        // keep = 0 still keeps the checkpoint just written.
        save(run, &make(tiny(), 1, 400), 0).unwrap();
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000400"]
        );
    }

    #[test]
    fn pruning_never_deletes_the_best_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let ck = run.join("checkpoints");
        save(run, &make(tiny(), 1, 100), 2).unwrap();
        let best = save_best(run, &make(tiny(), 2, 200), 2).unwrap();
        assert_eq!(
            fs::read_to_string(ck.join(BEST_FILE)).unwrap(),
            "step-00000200\n"
        );
        for step in [300, 400, 500, 600] {
            save(run, &make(tiny(), step, step), 2).unwrap();
        }
        // keep = 2: the newest two, and step 200 because BEST names it.
        assert_eq!(
            names(&ck),
            vec![
                "BEST",
                "LATEST",
                "step-00000200",
                "step-00000500",
                "step-00000600"
            ]
        );
        assert_eq!(super::super::best(run).unwrap(), Some(best));
        assert_eq!(latest_text(run), "step-00000600\n");
        // A new best moves BEST; the old best is then pruned like any other checkpoint.
        save_best(run, &make(tiny(), 7, 700), 2).unwrap();
        save(run, &make(tiny(), 8, 800), 2).unwrap();
        assert_eq!(
            names(&ck),
            vec![
                "BEST",
                "LATEST",
                "step-00000600",
                "step-00000700",
                "step-00000800"
            ]
        );
        // keep = 1 with BEST on an older step still keeps both.
        save(run, &make(tiny(), 9, 900), 1).unwrap();
        assert_eq!(
            names(&ck),
            vec!["BEST", "LATEST", "step-00000700", "step-00000900"]
        );
        // A stale BEST temporary (a kill inside its atomic write) is cleaned up.
        fs::write(ck.join(".BEST.tmp-4242"), b"step-").unwrap();
        save(run, &make(tiny(), 10, 1000), 1).unwrap();
        assert!(!ck.join(".BEST.tmp-4242").exists());
    }

    #[test]
    fn a_stale_latest_temporary_is_removed_by_the_next_save() {
        // What a process killed inside atomic_write(LATEST) leaves behind.
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        save(run, &make(tiny(), 1, 100), 3).unwrap();
        let ck = run.join("checkpoints");
        fs::write(ck.join(".LATEST.tmp-999999"), b"step-000").unwrap();
        assert_eq!(load(run).unwrap().0.state.step, 100);
        save(run, &make(tiny(), 2, 200), 3).unwrap();
        assert_eq!(names(&ck), vec!["LATEST", "step-00000100", "step-00000200"]);
    }

    #[test]
    fn pruning_spares_newer_checkpoints_of_an_earlier_branch() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        save(run, &make(tiny(), 1, 1000), 1).unwrap();
        save(run, &make(tiny(), 2, 400), 1).unwrap();
        save(run, &make(tiny(), 3, 500), 1).unwrap();
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000500", "step-00001000"]
        );
        assert_eq!(load(run).unwrap().0.state.step, 500);
    }

    #[test]
    fn resaving_the_same_step_replaces_it() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        save(run, &make(tiny(), 1, 100), 3).unwrap();
        let first = save(run, &make(tiny(), 2, 200), 3).unwrap();
        let newer = make(tiny(), 3, 200);
        let again = save(run, &newer, 3).unwrap();
        assert_eq!(first, again);
        assert_same(&load(run).unwrap().0, &newer);
        assert_eq!(
            names(&run.join("checkpoints")),
            vec!["LATEST", "step-00000100", "step-00000200"]
        );
    }

    #[test]
    fn save_refuses_inconsistent_checkpoints_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let good = make(tiny(), 1, 10);
        let mut cases = Vec::new();
        let mut c = good.clone();
        c.params.pop();
        cases.push((c, "params has"));
        let mut c = good.clone();
        c.adam_m[2].push(0.0);
        cases.push((c, "m.coupling.0.conv0.bias"));
        let mut c = good.clone();
        c.params[4][0] = f32::INFINITY;
        cases.push((c, "coupling.0.conv1.bias"));
        let mut c = good.clone();
        c.adam_v[0][0] = -1e-9;
        cases.push((c, "v.coupling.0.scale"));
        let mut c = good.clone();
        c.state.lr = f32::NAN;
        cases.push((c, "lr is NaN"));
        let mut c = good.clone();
        c.state.best_val_bpd = Some(f64::INFINITY);
        cases.push((c, "best_val_bpd"));
        let mut c = good.clone();
        c.model.bits = 0;
        cases.push((c, "model configuration"));
        for (c, want) in cases {
            let e = save(&run, &c, 2).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e}");
        }
        assert!(!run.exists());
    }

    #[test]
    fn save_into_an_unwritable_place_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file.txt");
        fs::write(&file, b"x").unwrap();
        let e = save(&file.join("sub"), &make(tiny(), 1, 1), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("file.txt"), "{e}");
    }
}
