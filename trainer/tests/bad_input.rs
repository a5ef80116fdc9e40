//! The trainer rows of the bad-input table (RELIABILITY.md): one test per class of bad
//! input, each asserting that the error names the file and the problem (and, where it
//! matters, that nothing was started or written). Most go through the `clayflow` binary,
//! where a user sees the message; the rest through the library calls the binary makes.
//!
//! The weight-blob classes are in `kernel/tests/bad_input.rs`; `blob_errors_reach_the_user`
//! here checks that the CLI passes them on.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clayflow_kernel::weights::crc32;
use clayflow_kernel::{alternating_masks, blob_len, write_blob, Arch, DType, Mask};
use clayflow_trainer::checkpoint;
use clayflow_trainer::data::{self, Crop};
use common::{mnist, run, Out};
use tempfile::TempDir;

/// The tiny model of the CLI tests (2 couplings, hidden 4 and 8) on 256 digits.
const TINY: &[&str] = &[
    "--hidden",
    "4,8",
    "--couplings",
    "2",
    "--limit",
    "256",
    "--val-split",
    "64",
    "--batch-size",
    "16",
    "--samples",
    "1",
    "--quiet",
    // The tests pin the seed's preset: their expected shapes and messages are its.
    "--preset",
    "mnist",
];

/// Runs a command that must fail; its stderr must hold an `error:` line containing every
/// one of `words`. Returns stderr.
fn fails(cwd: &Path, args: &[&str], words: &[&str]) -> String {
    let out = run(cwd, args);
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "clayflow {} should fail (got {:?})\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.code,
        out.stdout,
        out.stderr
    );
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line:\n{}", out.stderr));
    for w in words {
        assert!(line.contains(w), "{w:?} not in {line:?}");
    }
    assert!(
        !out.stderr.contains("panicked"),
        "a panic instead of an error:\n{}",
        out.stderr
    );
    out.stderr
}

/// `clayflow train --data DATA` with the tiny model must fail naming `words`, before any
/// training (no checkpoint folder).
fn train_fails_on(cwd: &Path, data: &Path, words: &[&str]) -> String {
    let mut args = vec![
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        "run",
        "--steps",
        "1000000",
    ];
    args.extend_from_slice(TINY);
    let err = fails(cwd, &args, words);
    assert!(
        !cwd.join("run").join("checkpoints").exists(),
        "training started on {}",
        data.display()
    );
    err
}

/// The message of a library error, which must contain every one of `words`.
fn lib_err<T: std::fmt::Debug, E: std::fmt::Display>(r: Result<T, E>, words: &[&str]) -> String {
    let msg = r.expect_err("should be rejected").to_string();
    for w in words {
        assert!(msg.contains(w), "{w:?} not in {msg:?}");
    }
    msg
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// An unsigned-byte IDX file: magic, big-endian dimensions, data.
fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = magic.to_be_bytes().to_vec();
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

const IDX3: u32 = 0x0000_0803;
const IDX1: u32 = 0x0000_0801;
const CIFAR_RECORD: usize = 3073;

fn load(path: &Path) -> Result<data::Dataset, data::DataError> {
    data::load_auto(path, 1, 28, 28, &Crop::Center)
}

// ---------------------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------------------

#[test]
fn idx_wrong_magic_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let zip = write(
        t,
        "digits.idx",
        b"PK\x03\x04 this is a zip archive, not IDX",
    );
    lib_err(
        load(&zip),
        &["digits.idx", "wrong IDX magic", "not an IDX file"],
    );
    let floats = write(t, "floats.idx", &idx(0x0000_0d03, &[1, 28, 28], &[0; 3136]));
    lib_err(
        load(&floats),
        &["floats.idx", "data type 0x0d", "only unsigned bytes"],
    );
    train_fails_on(t, &zip, &["digits.idx", "wrong IDX magic"]);
}

#[test]
fn idx_wrong_dimensions_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // A labels file where the images belong.
    let labels = write(t, "train-labels.idx", &idx(IDX1, &[3], &[1, 2, 3]));
    lib_err(
        load(&labels),
        &[
            "train-labels.idx",
            "wrong IDX dimensions",
            "looks like a labels file",
        ],
    );
    // 14x14 digits for the 28x28 model.
    let small = write(t, "small.idx", &idx(IDX3, &[400, 14, 14], &[9; 400 * 196]));
    lib_err(
        load(&small),
        &["small.idx", "wrong shape", "1x14x14", "1x28x28"],
    );
    train_fails_on(
        t,
        &small,
        &["small.idx", "wrong shape", "1x14x14", "1x28x28"],
    );
    // A zero side.
    let flat = write(t, "flat.idx", &idx(IDX3, &[5, 0, 28], &[]));
    lib_err(load(&flat), &["flat.idx", "zero side"]);
}

#[test]
fn idx_truncated_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let full = idx(IDX3, &[10, 28, 28], &[7; 7840]);
    let cut = write(t, "cut.idx", &full[..1000]);
    lib_err(
        load(&cut),
        &[
            "cut.idx",
            "truncated IDX file",
            "10 images of 28x28 (7840 bytes)",
            "984 bytes",
        ],
    );
    let header = write(t, "header.idx", &full[..9]);
    lib_err(
        load(&header),
        &["header.idx", "truncated IDX file", "header needs 16"],
    );
    // Cut inside the gzip stream, and a complete gzip of a cut file.
    let gz = std::fs::read(mnist()).unwrap();
    let cut_gz = write(t, "cut.gz", &gz[..gz.len() / 2]);
    lib_err(load(&cut_gz), &["cut.gz", "corrupt or truncated gzip"]);
    let short_gz = write(t, "short.gz", &gzip(&full[..5000]));
    lib_err(load(&short_gz), &["short.gz", "truncated IDX file"]);
    train_fails_on(t, &cut, &["cut.idx", "truncated IDX file"]);
}

#[test]
fn idx_empty_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let zero = write(t, "zero.idx", b"");
    lib_err(load(&zero), &["zero.idx", "empty", "0 bytes"]);
    let empty_gz = write(t, "empty.gz", &gzip(b""));
    lib_err(load(&empty_gz), &["empty.gz", "empty", "0 bytes"]);
    let none = write(t, "none.idx", &idx(IDX3, &[0, 28, 28], &[]));
    lib_err(load(&none), &["none.idx", "empty", "0 images"]);
    train_fails_on(t, &zero, &["zero.idx", "empty"]);
    let missing = t.join("missing.idx");
    let err = train_fails_on(t, &missing, &["missing.idx", "cannot read", "No such file"]);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // Too few images to train on is named too (with what to do).
    let three = write(t, "three.idx", &idx(IDX3, &[3, 28, 28], &[1; 3 * 784]));
    train_fails_on(t, &three, &["fewer than one batch", "--batch-size"]);
}

// ---------------------------------------------------------------------------------------
// CIFAR-10
// ---------------------------------------------------------------------------------------

/// `n` CIFAR-10 records with labels `label(i)`.
fn cifar(n: usize, label: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(n * CIFAR_RECORD);
    for i in 0..n {
        b.push(label(i));
        b.extend((0..CIFAR_RECORD - 1).map(|k| (k * 7 + i) as u8));
    }
    b
}

fn load_rgb(path: &Path) -> Result<data::Dataset, data::DataError> {
    data::load_auto(path, 3, 32, 32, &Crop::Center)
}

#[test]
fn cifar_wrong_magic_is_named() {
    // CIFAR-10 batches have no magic number; what identifies them is 3073-byte records
    // whose first byte is a label 0..=9. A label byte of 37 means another file format.
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = write(
        t,
        "data_batch_1.bin",
        &cifar(4, |i| if i == 2 { 37 } else { 3 }),
    );
    lib_err(
        load_rgb(&p),
        &[
            "data_batch_1.bin",
            "record 2 has label 37",
            "not a CIFAR-10 binary batch",
        ],
    );
    train_fails_on(t, &p, &["data_batch_1.bin", "label 37"]);
}

#[test]
fn cifar_wrong_dimensions_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // CIFAR-100 records are 3074 bytes (two label bytes).
    let c100: Vec<u8> = (0..5 * 3074).map(|i| (i % 10) as u8).collect();
    let p = write(t, "c100.bin", &c100);
    lib_err(
        load_rgb(&p),
        &[
            "c100.bin",
            "not a multiple of the 3073-byte CIFAR-10 record",
        ],
    );
    // Valid CIFAR-10 for the 1x28x28 model.
    let ok = write(t, "colour.bin", &cifar(10, |i| (i % 10) as u8));
    lib_err(
        load(&ok),
        &["colour.bin", "wrong shape", "3x32x32", "1x28x28"],
    );
    train_fails_on(t, &ok, &["colour.bin", "wrong shape", "3x32x32", "1x28x28"]);
}

#[test]
fn cifar_truncated_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let full = cifar(3, |_| 1);
    let p = write(t, "data_batch_2.bin", &full[..full.len() - 100]);
    lib_err(
        load_rgb(&p),
        &[
            "data_batch_2.bin",
            "9119 bytes",
            "not a multiple",
            "truncated",
        ],
    );
    // In a CIFAR folder, the one bad batch is named.
    let dir = t.join("cifar-10-batches-bin");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "data_batch_1.bin", &full);
    write(&dir, "data_batch_2.bin", &full[..CIFAR_RECORD + 10]);
    lib_err(load_rgb(&dir), &["data_batch_2.bin", "not a multiple"]);
}

#[test]
fn cifar_empty_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let p = write(t, "data_batch_1.bin", b"");
    lib_err(load_rgb(&p), &["data_batch_1.bin", "empty", "0 bytes"]);
    let dir = t.join("cifar");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "readme.txt", b"the batches were not extracted");
    lib_err(
        load_rgb(&dir),
        &["cifar", "empty dataset", "no CIFAR-10 *.bin"],
    );
    let mut args = vec!["train", "--preset", "color", "--data"];
    args.push(p.to_str().unwrap());
    args.extend_from_slice(&["--out", "run", "--steps", "5", "--quiet"]);
    fails(t, &args, &["data_batch_1.bin", "empty"]);
    assert!(!t.join("run/checkpoints").exists());
}

// ---------------------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------------------

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn photos(path: &Path) -> Result<data::Dataset, data::DataError> {
    data::load_auto(path, 3, 16, 16, &Crop::Center)
}

#[test]
fn unreadable_images_are_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let good = png(20, 20);
    // Random bytes named .png.
    let d = t.join("noise");
    std::fs::create_dir(&d).unwrap();
    write(&d, "a.png", &good);
    let noise: Vec<u8> = (0u32..3000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    write(&d, "b.png", &noise);
    lib_err(
        photos(&d),
        &["b.png", "cannot decode image", "replace or remove"],
    );
    // A PNG cut in half.
    let d = t.join("cut");
    std::fs::create_dir(&d).unwrap();
    write(&d, "a.png", &good);
    write(&d, "c.png", &good[..good.len() / 2]);
    lib_err(photos(&d), &["c.png", "cannot decode image"]);
    // Text named .jpg, through the CLI.
    let d = t.join("text");
    std::fs::create_dir(&d).unwrap();
    write(&d, "a.png", &good);
    write(&d, "notes.jpg", b"shopping list: eggs, flour");
    lib_err(photos(&d), &["notes.jpg", "cannot decode image"]);
    let cfg = t.join("rgb16.json");
    std::fs::write(&cfg, rgb16_config()).unwrap();
    fails(
        t,
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            d.to_str().unwrap(),
            "--out",
            "run",
            "--steps",
            "1000000",
            "--quiet",
        ],
        &["notes.jpg", "cannot decode image"],
    );
    assert!(!t.join("run/checkpoints").exists());
}

/// A 3x16x16 model configuration: the colour preset with 2 small couplings.
fn rgb16_config() -> String {
    let mut m =
        serde_json::to_value(clayflow_trainer::config::ModelConfig::preset("color").unwrap())
            .unwrap();
    m["height"] = 16.into();
    m["width"] = 16.into();
    m["masks"] = serde_json::json!(["checker-even", "checker-odd"]);
    m["hidden"] = serde_json::json!([4, 8]);
    m.to_string()
}

/// A PNG whose header claims `w x h` pixels (with a valid chunk CRC) but holds the pixel
/// data of a 1x1 picture.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut b = png(1, 1);
    // Signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), ... CRC after 13
    // data bytes.
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&b[12..29]);
    b[29..33].copy_from_slice(&crc.to_be_bytes());
    b
}

#[test]
fn wrong_size_images_are_fitted_or_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // Pictures of any size are resized to cover the target and centre-cropped: odd sizes,
    // smaller than the target, or extremely thin, all give exactly one 3x16x16 image each.
    let d = t.join("mixed");
    std::fs::create_dir(&d).unwrap();
    for (i, (w, h)) in [(1, 1), (3, 500), (500, 3), (40, 30), (16, 16), (7, 9)]
        .iter()
        .enumerate()
    {
        write(&d, &format!("{i}.png"), &png(*w, *h));
    }
    let ds = photos(&d).expect("odd picture sizes are fitted");
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.shape(), (3, 16, 16));
    // A header claiming a gigantic picture (a decompression bomb) is refused, naming the
    // file, without trying to allocate it.
    let d = t.join("bomb");
    std::fs::create_dir(&d).unwrap();
    write(&d, "a.png", &png(20, 20));
    write(&d, "huge.png", &png_claiming(60_000, 60_000));
    let start = Instant::now();
    lib_err(
        photos(&d),
        &[
            "huge.png",
            "claims 60000x60000 pixels",
            "limit",
            "decompression bomb",
        ],
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    // A header claiming more pixels than it holds.
    let d = t.join("short");
    std::fs::create_dir(&d).unwrap();
    write(&d, "liar.png", &png_claiming(64, 64));
    lib_err(photos(&d), &["liar.png", "cannot decode image"]);
}

// ---------------------------------------------------------------------------------------
// Checkpoints, training, output folders, blobs
// ---------------------------------------------------------------------------------------

/// Trains the tiny model for `steps` steps into `out` (with `extra` flags).
fn train_ok(cwd: &Path, out: &str, steps: &str, extra: &[&str]) -> Out {
    let mut args = vec!["train", "--out", out, "--steps", steps];
    // `--hidden` in `extra` replaces the tiny model's.
    let skip = if extra.contains(&"--hidden") { 2 } else { 0 };
    args.extend_from_slice(&TINY[skip..]);
    args.extend_from_slice(extra);
    let o = run(cwd, &args);
    assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);
    o
}

#[test]
fn checkpoint_from_another_architecture_is_named() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    train_ok(t, "a", "2", &[]);
    train_ok(t, "b", "2", &["--hidden", "4,6"]);
    let b_model = std::fs::read(t.join("b/checkpoints/step-00000002/model.safetensors")).unwrap();
    // Run b's folder with run a's checkpoints: --resume names both architectures and
    // changes nothing.
    let ck_b = t.join("b/checkpoints");
    std::fs::remove_dir_all(&ck_b).unwrap();
    copy_dir(&t.join("a/checkpoints"), &ck_b);
    let latest_before = std::fs::read(ck_b.join("LATEST")).unwrap();
    fails(
        t,
        &["train", "--resume", "b", "--steps", "4", "--quiet"],
        &[
            "architecture differs",
            "hidden [4, 8] vs [4, 6]",
            "step-00000002",
        ],
    );
    assert_eq!(std::fs::read(ck_b.join("LATEST")).unwrap(), latest_before);
    // One checkpoint holding the other run's model file: the first tensor whose shape
    // differs from what state.json's architecture needs is named.
    let mixed = t.join("mixed/step-00000002");
    copy_dir(&t.join("a/checkpoints/step-00000002"), &mixed);
    std::fs::write(mixed.join("model.safetensors"), &b_model).unwrap();
    lib_err(
        checkpoint::load(&mixed),
        &[
            "model.safetensors",
            "tensor coupling.0.conv1.weight",
            "shape [6, 4, 7, 7], expected [8, 4, 7, 7]",
        ],
    );
    fails(
        t,
        &[
            "export",
            "--model",
            mixed.to_str().unwrap(),
            "--out",
            "m.blob",
        ],
        &["model.safetensors", "coupling.0.conv1.weight", "shape"],
    );
    assert!(!t.join("m.blob").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn nan_in_a_batch_is_named_and_training_recovers() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    // One poisoned batch is skipped; three in a row restore the last checkpoint.
    let o = train_ok(
        t,
        "run",
        "10",
        &[
            // One rank: the message of a run of several names the ranks that failed.
            "--ranks",
            "1",
            "--inject-nan-at",
            "2,5,6,7",
            "--checkpoint-steps",
            "4",
            "--minutes",
            "1",
        ],
    );
    assert!(
        o.stderr.contains("step 2: non-finite loss (loss NaN"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("step skipped"), "{}", o.stderr);
    assert!(
        o.stderr.contains("3 non-finite steps in a row: restored")
            && o.stderr.contains("step-00000004")
            && o.stderr.contains("halved the learning rate"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.contains("trained 10 steps"), "{}", o.stdout);
    assert!(
        o.stdout.contains("4 non-finite steps were skipped"),
        "{}",
        o.stdout
    );
    let (c, _) = checkpoint::load(&t.join("run")).unwrap();
    assert_eq!(c.state.step, 10);
    assert!(c.params.iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn unwritable_output_folder_fails_before_training() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let slow = ["--steps", "1000000"];
    // A read-only folder. Root ignores permission bits, so as root use a folder of
    // /proc, where nobody can create files.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let ro = if root {
        PathBuf::from("/proc/self/clayflow-run")
    } else {
        let d = t.join("read-only");
        std::fs::create_dir(&d).unwrap();
        let mut perm = std::fs::metadata(&d).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o555);
        std::fs::set_permissions(&d, perm).unwrap();
        d.join("run")
    };
    let ro = ro.to_str().unwrap().to_string();
    for out in [ro.as_str(), "file.txt/run"] {
        std::fs::write(t.join("file.txt"), b"a regular file").unwrap();
        let mut args = vec!["train", "--out", out];
        args.extend_from_slice(TINY);
        args.extend_from_slice(&slow);
        let start = Instant::now();
        fails(t, &args, &["output directory", out, "not writable"]);
        assert!(start.elapsed() < Duration::from_secs(20));
    }
    // The run folder is writable but its checkpoints/ is a file: the step-0 checkpoint
    // fails, before the first training step.
    std::fs::create_dir(t.join("run")).unwrap();
    std::fs::write(t.join("run/checkpoints"), b"in the way").unwrap();
    let mut args = vec!["train", "--out", "run"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&slow);
    let err = fails(t, &args, &["run/checkpoints", "Not a directory"]);
    // Each cause is printed once (the error types embed their source in their message).
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
    assert!(!t.join("run/metrics.jsonl").exists());
    // An export to an unwritable place fails naming it, and writes nothing.
    train_ok(t, "good", "1", &[]);
    fails(
        t,
        &["export", "--model", "good", "--out", "file.txt/m.blob"],
        &["file.txt"],
    );
    assert_eq!(
        std::fs::read(t.join("file.txt")).unwrap(),
        b"a regular file"
    );
}

/// A tiny 1x28x28 blob written by the kernel.
fn tiny_blob() -> Vec<u8> {
    let arch = Arch {
        channels: 1,
        height: 28,
        width: 28,
        squeeze: true,
        levels: 1,
        glow: false,
        couplings: 2,
        masks: alternating_masks(Mask::ChannelEven),
        kernels: [3, 3, 3],
        hidden: [4, 8],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    };
    let params: Vec<f32> = (0..arch.param_count())
        .map(|i| ((i % 13) as f32 - 6.0) * 1e-3)
        .collect();
    let mut b = vec![0u8; blob_len(&arch, DType::F32)];
    write_blob(&arch, DType::F32, &params, &mut b).unwrap();
    b
}

#[test]
fn blob_errors_reach_the_user() {
    let tmp = TempDir::new().unwrap();
    let t = tmp.path();
    let good = tiny_blob();
    let n = good.len();
    let fix_crc = |b: &mut Vec<u8>| {
        let crc = crc32(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&crc.to_le_bytes());
    };
    let mut version = good.clone();
    version[8] = 9;
    fix_crc(&mut version);
    let mut nan = good.clone();
    let last = n - 8;
    nan[last..last + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    fix_crc(&mut nan);
    let mut shape = good.clone();
    shape[26] = 5;
    fix_crc(&mut shape);
    let cases: [(&str, Vec<u8>, &[&str]); 5] = [
        ("good.blob", good.clone(), &[]),
        ("cut.blob", good[..n / 2].to_vec(), &["truncated"]),
        ("png.blob", png(2, 2), &["magic"]),
        ("v9.blob", version, &["version 9", "not supported"]),
        ("nan.blob", nan, &["not finite"]),
    ];
    for (name, bytes, words) in &cases {
        std::fs::write(t.join(name), bytes).unwrap();
        if words.is_empty() {
            let o = run(
                t,
                &["sample", "--model", name, "--n", "1", "--out", "ok.png"],
            );
            assert_eq!(o.code, Some(0), "{}", o.stderr);
            continue;
        }
        let mut want = vec![*name];
        want.extend_from_slice(words);
        fails(t, &["eval", "--model", name, "--last", "16"], &want);
        fails(
            t,
            &["sample", "--model", name, "--n", "1", "--out", "s.png"],
            &want,
        );
    }
    std::fs::write(t.join("shape.blob"), &shape).unwrap();
    fails(
        t,
        &["eval", "--model", "shape.blob"],
        &["shape.blob", "wrong shapes"],
    );
    assert!(!t.join("s.png").exists());
}
