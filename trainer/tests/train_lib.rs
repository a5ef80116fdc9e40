//! Library-level tests of training and export: `train::train` with the `Quiet` progress on a
//! tiny model, and `export::verify` / `export::export` on what it trained.

use std::path::Path;
use std::sync::Arc;

use clayflow_kernel::{DType, Model};
use clayflow_trainer::backend::{cpu::CpuBackend, Backend};
use clayflow_trainer::checkpoint;
use clayflow_trainer::collective::Single;
use clayflow_trainer::config::ModelConfig;
use clayflow_trainer::data::{self, Crop, Dataset};
use clayflow_trainer::eval;
use clayflow_trainer::export;
use clayflow_trainer::report;
use clayflow_trainer::source::Source;
use clayflow_trainer::train::{self, Outcome, Quiet, TrainConfig};
use tempfile::TempDir;

const MNIST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/mnist8k-train-images-idx3-ubyte.gz"
);

fn backend() -> Arc<dyn Backend> {
    Arc::new(CpuBackend::default())
}

/// 256 training and 64 validation digits (the last 64 of the bundled 8,000).
fn digits() -> (Dataset, Dataset) {
    let ds = data::load_auto(Path::new(MNIST), 1, 28, 28, &Crop::Center).expect("bundled MNIST");
    assert_eq!(ds.len(), 8000);
    let (mut tr, val) = ds.split_last(64).unwrap();
    tr.truncate(256);
    (tr, val)
}

/// The MNIST architecture cut down to 2 couplings with hidden widths 4 and 8.
fn tiny_model() -> ModelConfig {
    let mut m = ModelConfig::preset("mnist").unwrap();
    m.masks.truncate(2);
    m.hidden = [4, 8];
    m.to_arch().expect("a valid tiny architecture");
    m
}

fn tiny_config(steps: u64) -> TrainConfig {
    let mut cfg = TrainConfig::new(tiny_model(), "256 bundled MNIST digits".into());
    cfg.batch_size = 16;
    cfg.max_steps = Some(steps);
    cfg.minutes = None;
    cfg.checkpoint_steps = Some(4);
    cfg.samples = 4;
    cfg
}

fn train_run(cfg: &TrainConfig, dir: &Path, resume: bool) -> anyhow::Result<Outcome> {
    let (tr, val) = digits();
    train::train(backend(), &Single, cfg, &tr, &val, dir, resume, &mut Quiet)
}

#[test]
fn train_reports_its_outcome() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    let cfg = tiny_config(12);
    let o = train_run(&cfg, &dir, false).expect("training");
    assert_eq!(o.steps, 12);
    assert_eq!(o.val_images, 64);
    assert_eq!(o.nonfinite_skips, 0);
    assert!(
        o.val_bpd.is_finite() && o.val_bpd > 0.5 && o.val_bpd < 16.0,
        "{}",
        o.val_bpd
    );
    assert!(o.images_per_sec.is_finite() && o.images_per_sec > 0.0);
    assert!(o.elapsed_secs > 0.0 && o.elapsed_secs < 60.0);
    assert_eq!(o.samples_png, dir.join("samples.png"));
    assert!(o.samples_png.is_file());

    // The reported score is the score of the saved model on the same images.
    let (_, val) = digits();
    let src = Source::open(&dir).unwrap();
    let again = src.evaluate(backend(), &val, cfg.batch_size).unwrap();
    assert!(
        (again - o.val_bpd).abs() < 1e-9,
        "outcome {} vs re-evaluated {again}",
        o.val_bpd
    );

    // The saved configuration and state match.
    assert_eq!(train::read_config(&dir).unwrap(), cfg);
    let (ck, ck_dir) = checkpoint::load(&dir).unwrap();
    assert_eq!(ck_dir.file_name().unwrap(), "step-00000012");
    assert_eq!(ck.state.step, 12);
    assert_eq!(ck.state.last_val_bpd, Some(o.val_bpd));
    assert_eq!(ck.model, cfg.model);
    let recs = report::read_metrics(dir.join("metrics.jsonl")).unwrap();
    let last = recs.last().unwrap();
    assert_eq!((last.step, last.val_bpd), (12, Some(o.val_bpd)));

    // Training moved the weights away from the initialisation and lowered the loss.
    let init = clayflow_trainer::model::init_params(&cfg.model.to_arch().unwrap(), cfg.seed);
    assert_ne!(init, ck.params);
    let mut flow =
        clayflow_trainer::model::Flow::new(backend(), cfg.model.to_arch().unwrap(), &init).unwrap();
    let before = eval::evaluate(&mut flow, &val, 16).unwrap();
    assert!(
        o.val_bpd < before,
        "12 steps did not improve validation: {before} -> {}",
        o.val_bpd
    );
}

#[test]
fn train_resumes_and_counts_skipped_steps() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    let mut cfg = tiny_config(6);
    cfg.inject_nan_at = vec![2];
    let o = train_run(&cfg, &dir, false).unwrap();
    assert_eq!((o.steps, o.nonfinite_skips), (6, 1));
    // Starting over in the same folder is refused...
    let err = train_run(&cfg, &dir, false).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // ...resuming continues the step count and keeps the skip count.
    cfg.max_steps = Some(10);
    let o = train_run(&cfg, &dir, true).unwrap();
    assert_eq!((o.steps, o.nonfinite_skips), (10, 1));
    let recs = report::read_metrics(dir.join("metrics.jsonl")).unwrap();
    let finished: Vec<u64> = recs
        .iter()
        .filter(|r| r.event.as_deref() == Some("finished"))
        .map(|r| r.step)
        .collect();
    assert_eq!(finished, vec![6, 10]);
    assert!(recs
        .iter()
        .any(|r| r.step == 2 && r.event.as_deref().is_some_and(|e| e.contains("non-finite"))));
}

#[test]
fn train_rejects_bad_settings_before_writing() {
    let tmp = TempDir::new().unwrap();
    let (tr, val) = digits();
    let dir = tmp.path().join("run");
    let mut cfg = tiny_config(4);
    cfg.batch_size = 257;
    let err = train::train(backend(), &Single, &cfg, &tr, &val, &dir, false, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--batch-size"), "{err}");
    let mut cfg = tiny_config(4);
    cfg.model = ModelConfig::preset("color").unwrap();
    let err = train::train(backend(), &Single, &cfg, &tr, &val, &dir, false, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model expects (3, 32, 32)"), "{err}");
    assert!(!dir.exists(), "a run folder was created for a rejected run");
}

#[test]
fn export_verify_agrees_for_f32_and_f16() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    train_run(&tiny_config(12), &dir, false).unwrap();
    let (ck, _) = checkpoint::load(&dir).unwrap();
    let (_, val) = digits();
    let mut lens = Vec::new();
    for dtype in [DType::F32, DType::F16] {
        let (arch, blob) = export::encode(&ck, dtype).unwrap();
        assert_eq!(arch, ck.model.to_arch().unwrap());
        let ag = export::verify(backend(), &blob, &ck.params, &val, 64).unwrap();
        assert_eq!(ag.images, 64);
        assert!(ag.max_bpd_diff < 1e-3, "{dtype:?}: {ag:?}");
        assert!(
            ag.max_sample_diff <= export::MAX_SAMPLE_DIFF,
            "{dtype:?}: {ag:?}"
        );
        assert!(ag.kernel_bpd.is_finite() && ag.kernel_bpd > 0.5, "{ag:?}");
        if dtype == DType::F32 {
            // The f32 blob scores the validation set as training reported it.
            assert!(
                (ag.kernel_bpd - ck.state.last_val_bpd.unwrap()).abs() < 1e-3,
                "{ag:?} vs {:?}",
                ck.state.last_val_bpd
            );
        }

        // export() writes exactly the verified bytes.
        let out = tmp.path().join(format!("m-{dtype:?}.blob"));
        let ag2 = export::export(backend(), &dir, &out, dtype, &val).unwrap();
        assert_eq!(ag2, ag);
        assert_eq!(std::fs::read(&out).unwrap(), blob);
        assert_eq!(Model::from_blob(&blob).unwrap().dtype(), dtype);
        lens.push(blob.len());
    }
    assert!(lens[1] < lens[0], "{lens:?}");
}

#[test]
fn export_verify_catches_a_mismatch() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    train_run(&tiny_config(4), &dir, false).unwrap();
    let (ck, _) = checkpoint::load(&dir).unwrap();
    let (_, val) = digits();
    let (_, blob) = export::encode(&ck, DType::F32).unwrap();
    // The trainer side holds different weights than the blob: verify must notice.
    let mut wrong = ck.params.clone();
    for (spec, t) in clayflow_trainer::config::tensor_specs(&ck.model.to_arch().unwrap())
        .iter()
        .zip(&mut wrong)
    {
        if spec.name.ends_with("conv2.bias") {
            t.iter_mut().for_each(|v| *v += 0.5);
        }
    }
    let ag = export::verify(backend(), &blob, &wrong, &val, 16).unwrap();
    assert!(ag.max_bpd_diff > 1e-3, "{ag:?}");
}

/// `early_stop`: the run stops after that many validations in a row without a new best,
/// and the best checkpoint outlives pruning. With a learning rate of 0 the parameters never
/// change, so every validation equals the first (the best): validations at steps 2 (the
/// best), 4 and 6 (two without improvement) stop the run at step 6 of 40.
#[test]
fn early_stop_stops_and_the_best_checkpoint_survives_pruning() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    let mut cfg = tiny_config(40);
    cfg.lr = 0.0;
    cfg.eval_steps = Some(2);
    cfg.early_stop = Some(2);
    cfg.checkpoint_steps = Some(1);
    cfg.keep = 1;
    let out = train_run(&cfg, &dir, false).unwrap();
    assert_eq!(out.steps, 6);
    let why = out.early_stop.expect("stopped early");
    assert!(why.contains("2 validations in a row"), "{why}");
    let best = out.best.expect("a best checkpoint");
    assert_eq!(best.step, 2);
    assert_eq!(best.dir, dir.join("checkpoints/step-00000002"));
    assert_eq!(Some(best.val_bpd), Some(out.val_bpd));
    // keep = 1: only the latest and the best are left.
    let mut names: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["BEST", "LATEST", "step-00000002", "step-00000006"]);
    let loaded = checkpoint::load_best_with_notes(&dir).unwrap();
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    assert_eq!(loaded.checkpoint.state.step, 2);
    assert_eq!(checkpoint::load(&dir).unwrap().0.state.step, 6);
    let events: Vec<String> = report::read_metrics(dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| r.event)
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("early stop: 2 validations")),
        "{events:?}"
    );
    // Without early stopping the same run takes its whole budget.
    cfg.early_stop = None;
    let out = train_run(&cfg, &tmp.path().join("full"), false).unwrap();
    assert_eq!((out.steps, out.early_stop), (40, None));
}

/// `BEST` names the checkpoint of the lowest validation (the first of equal ones), and the
/// outcome reports it.
#[test]
fn the_best_checkpoint_is_the_one_of_the_lowest_validation() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    let mut cfg = tiny_config(12);
    cfg.lr = 1e-2;
    cfg.eval_steps = Some(4);
    let out = train_run(&cfg, &dir, false).unwrap();
    let best = out.best.expect("a best checkpoint");
    let records = report::read_metrics(dir.join("metrics.jsonl")).unwrap();
    let vals: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| r.val_bpd.map(|v| (r.step, v)))
        .collect();
    // The best is the lowest validation, at its step.
    let &(step, v) = vals
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("validations");
    assert_eq!((best.step, best.val_bpd), (step, v), "{vals:?}");
    assert_eq!(
        checkpoint::best(&dir).unwrap(),
        Some(dir.join(format!("checkpoints/step-{step:08}")))
    );
}

/// Sampling tells which images came out non-finite, on the trainer and on the kernel path:
/// none for a trained model; every one once a coupling network's output bias is NaN (a
/// stand-in for an inverse that overflows: the pixels come out NaN, drawn black).
#[test]
fn sampling_reports_the_images_whose_inverse_is_not_finite() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("run");
    train_run(&tiny_config(4), &dir, false).unwrap();
    let (mut ck, _) = checkpoint::load(&dir).unwrap();
    let n = 16;
    let healthy = Source::Checkpoint(Box::new(ck.clone()))
        .sample(backend(), n, 1.0, 3)
        .unwrap();
    assert_eq!(healthy.pixels.len(), n * 28 * 28);
    assert!(healthy.nonfinite.is_empty(), "{:?}", healthy.nonfinite);
    assert_eq!(healthy.nonfinite_note(n), None);

    let specs = clayflow_trainer::config::tensor_specs(&ck.model.to_arch().unwrap());
    let last_bias = specs
        .iter()
        .rposition(|s| s.name.starts_with("coupling.") && s.name.ends_with(".bias"))
        .unwrap();
    ck.params[last_bias].iter_mut().for_each(|v| *v = f32::NAN);
    let s = Source::Checkpoint(Box::new(ck))
        .sample(backend(), n, 1.0, 3)
        .unwrap();
    assert_eq!(s.pixels.len(), n * 28 * 28);
    assert_eq!(s.nonfinite, (0..n).collect::<Vec<_>>());
    let note = s.nonfinite_note(n).unwrap();
    assert!(
        note.starts_with("16 of 16 samples had non-finite pixels"),
        "{note}"
    );
}

#[test]
fn a_weight_average_is_scored_saved_and_resumed_like_the_uninterrupted_run() {
    let tmp = TempDir::new().unwrap();
    let mut cfg = tiny_config(12);
    cfg.ema = Some(0.9);
    // A schedule that does not depend on the step limit, which the resume below changes.
    cfg.cosine_decay = false;
    let whole = tmp.path().join("whole");
    let o = train_run(&cfg, &whole, false).unwrap();
    let (ck, _) = checkpoint::load(&whole).unwrap();
    assert_eq!(ck.state.ema, Some(0.9));
    let trained = ck
        .trained
        .clone()
        .expect("the trained weights beside the average");
    assert_ne!(trained, ck.params, "the average is the trained weights");

    // The outcome scores the average (the model file) and the trained weights beside it.
    let (_, val) = digits();
    let arch = cfg.model.to_arch().unwrap();
    let score = |w: &[Vec<f32>]| {
        let mut f = clayflow_trainer::model::Flow::new(backend(), arch, w).unwrap();
        eval::evaluate(&mut f, &val, 16).unwrap()
    };
    assert!((score(&ck.params) - o.val_bpd).abs() < 1e-9, "{o:?}");
    let t = o
        .val_trained_bpd
        .expect("the trained weights are scored too");
    assert!((score(&trained) - t).abs() < 1e-9, "{o:?}");
    assert_ne!(t, o.val_bpd);
    let recs = report::read_metrics(whole.join("metrics.jsonl")).unwrap();
    let last = recs.last().unwrap();
    assert_eq!(
        (last.val_bpd, last.val_trained_bpd),
        (Some(o.val_bpd), Some(t))
    );

    // Stopped at step 6 and resumed, the run ends where the uninterrupted one did.
    let split = tmp.path().join("split");
    cfg.max_steps = Some(6);
    train_run(&cfg, &split, false).unwrap();
    cfg.max_steps = Some(12);
    train_run(&cfg, &split, true).unwrap();
    let (again, _) = checkpoint::load(&split).unwrap();
    assert_eq!(again.state.step, 12);
    assert_eq!(again.trained, ck.trained);
    assert_eq!(again.params, ck.params);
}
