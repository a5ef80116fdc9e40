//! The bodies of clayflow's fuzz targets (the `fuzz_targets/*.rs` binaries only call these)
//! and the input layouts the seed builder (`examples/make_seeds.rs`) writes.
//!
//! Every target takes a first *mode byte* that steers it (which file, which options), then
//! the payload. A target returns normally for every input, `Ok` or `Err` from the code
//! under test; it panics (a libFuzzer crash) when the code under test panics or when a
//! result breaks an invariant checked here (an accepted blob that does not round-trip, an
//! error message that does not name the file, ...).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clayflow_kernel::weights::crc32;
use clayflow_kernel::{blob_len, image_len, log_prob, sample, scratch_len, write_blob, Model};
use clayflow_trainer::checkpoint::{self, Checkpoint, TrainState};
use clayflow_trainer::config::{tensor_specs, MaskName, ModelConfig};
use clayflow_trainer::data::{self, Crop};

/// Largest `plane x parameters` (about the multiply-adds of one pass through the flow) for
/// which the blob target still runs a sample and a log_prob on an accepted blob. Bigger
/// models (e.g. the MNIST preset, 65.5 M) are only parsed and round-tripped, so that one
/// execution stays under about a millisecond.
pub const MAC_BUDGET: usize = 1 << 19;

/// A per-process scratch folder on tmpfs (`/dev/shm` when present), for the targets whose
/// code under test reads files.
pub fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("clayflow-fuzz-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create the fuzz work folder");
        dir
    })
}

/// A fresh empty sub-folder `name` of [`work_dir`].
fn fresh_dir(name: &str) -> PathBuf {
    let d = work_dir().join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("create a fuzz sub-folder");
    d
}

/// Gzip-compresses `bytes` (fast level).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// Overwrites the last 4 bytes of `blob` with the CRC-32 of the bytes before them.
pub fn fix_crc(blob: &mut [u8]) {
    if blob.len() >= 4 {
        let n = blob.len() - 4;
        let crc = crc32(&blob[..n]);
        blob[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

// -----------------------------------------------------------------------------------------
// (a) weight blob
// -----------------------------------------------------------------------------------------

/// Blob mode bit: rewrite the trailing CRC before parsing, so mutations get past the
/// checksum and reach the architecture, length and weight checks and the flow itself.
pub const BLOB_FIX_CRC: u8 = 1;

/// Blob target. Input: mode byte, then the blob. Mode bit 0: [`BLOB_FIX_CRC`]; bits 1-7:
/// the sampling temperature in sixteenths.
pub fn blob(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let mut owned;
    let blob: &[u8] = if mode & BLOB_FIX_CRC != 0 {
        owned = body.to_vec();
        fix_crc(&mut owned);
        &owned
    } else {
        body
    };
    match Model::from_blob(blob) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(model) => check_model(&model, blob, mode),
    }
}

fn check_model(model: &Model<'_>, blob: &[u8], mode: u8) {
    let arch = *model.arch();
    assert_eq!(arch.validate(), Ok(()), "accepted an invalid architecture");
    // A version 2 Glow blob (the older encoding) is longer by its unused `scale` tensors.
    let legacy = model.version() == 2 && arch.glow;
    if legacy {
        assert!(blob.len() > blob_len(&arch, model.dtype()));
    } else {
        assert_eq!(blob.len(), blob_len(&arch, model.dtype()));
    }

    // Every weight is reachable through `glow_step` (Glow models) and `coupling`, finite,
    // and the count matches.
    let mut params = Vec::with_capacity(arch.param_count());
    for i in 0..arch.couplings {
        match model.glow_step(i) {
            Ok(g) => {
                assert!(arch.glow, "Glow tensors in a model without Glow steps");
                for t in g.in_blob_order() {
                    params.extend(t.iter());
                }
            }
            Err(e) => assert!(!arch.glow, "Glow step {i} of an accepted blob: {e}"),
        }
        let c = model.coupling(i).expect("coupling of an accepted blob");
        for t in [
            c.scale,
            c.conv_w[0],
            c.conv_b[0],
            c.conv_w[1],
            c.conv_b[1],
            c.conv_w[2],
            c.conv_b[2],
        ] {
            params.extend(t.iter());
        }
    }
    // The learned prior's tensors follow every step's: each split level's, then the top's.
    for l in 0..arch.levels.saturating_sub(1) {
        match model.prior(l) {
            Ok(p) => {
                assert!(arch.prior, "prior tensors in a model without the prior");
                for t in p.in_blob_order() {
                    params.extend(t.iter());
                }
            }
            Err(e) => assert!(!arch.prior, "split prior {l} of an accepted blob: {e}"),
        }
    }
    match model.top() {
        Ok(t) => {
            assert!(arch.prior, "a top prior in a model without the prior");
            for t in t.in_blob_order() {
                params.extend(t.iter());
            }
        }
        Err(e) => assert!(!arch.prior, "top prior of an accepted blob: {e}"),
    }
    assert_eq!(params.len(), arch.param_count());
    assert!(
        params.iter().all(|v| v.is_finite()),
        "accepted a non-finite weight"
    );
    assert!(model.coupling(arch.couplings).is_err());
    assert!(model.glow_step(arch.couplings).is_err());

    // Writing the parsed model back gives a blob that parses to the same model, bit for bit.
    let mut out = vec![0u8; blob_len(&arch, model.dtype())];
    let n = write_blob(&arch, model.dtype(), &params, &mut out).expect("re-write an accepted blob");
    assert_eq!(n, out.len());
    let again = Model::from_blob(&out).expect("re-parse a re-written blob");
    assert_eq!(again.arch(), model.arch());
    assert_eq!(again.dtype(), model.dtype());
    // The same format version: the writer picks the one the reader demands. (Not byte for
    // byte: the reader accepts non-zero padding, the writer writes zeros.) A version 2 Glow
    // blob (the older encoding, with unused `scale` tensors) is re-written as version 3:
    // the same header but the version and the parameter count.
    if legacy {
        assert_eq!(again.version(), 3);
        assert_eq!(out[10..36], blob[10..36], "re-written header differs");
    } else {
        assert_eq!(out[..40], blob[..40], "re-written header differs");
    }
    for i in 0..arch.couplings {
        let (a, b) = (model.coupling(i).unwrap(), again.coupling(i).unwrap());
        assert_eq!(a.mask, b.mask);
        let bits = |t: clayflow_kernel::weights::Tensor<'_>| -> Vec<u32> {
            t.iter().map(f32::to_bits).collect()
        };
        assert_eq!(bits(a.scale), bits(b.scale));
        for j in 0..3 {
            assert_eq!(bits(a.conv_w[j]), bits(b.conv_w[j]));
            assert_eq!(bits(a.conv_b[j]), bits(b.conv_b[j]));
        }
    }

    // Sample and log_prob with the blob's own architecture, when it is cheap enough.
    if arch.plane().saturating_mul(arch.param_count()) > MAC_BUDGET {
        return;
    }
    let d = image_len(&arch);
    let mut scratch = vec![0.0f32; scratch_len(&arch)];
    let mut pixels = vec![0u8; d];
    let mut values = vec![0.0f32; d];
    let temperature = f32::from(mode >> 1) / 16.0;
    let seed = u64::from(crc32(blob));
    sample(
        model,
        seed,
        temperature,
        &mut scratch,
        &mut pixels,
        &mut values,
    )
    .expect("sample with correctly sized buffers");
    let top = (1u32 << arch.bits) - 1;
    assert!(
        pixels.iter().all(|&p| u32::from(p) <= top),
        "sampled pixel out of range"
    );
    // Score a pixel pattern taken from the blob's own bytes (in range for `bits`).
    let img: Vec<u8> = (0..d)
        .map(|i| (u32::from(blob[i % blob.len()]) & top) as u8)
        .collect();
    log_prob(model, &img, &mut scratch).expect("log_prob of an in-range image");
    // A wrong-size image is an error, not a panic.
    assert!(log_prob(model, &img[..d - 1], &mut scratch).is_err());
}

// -----------------------------------------------------------------------------------------
// (b) IDX
// -----------------------------------------------------------------------------------------

/// IDX mode bit: read as a labels file (1 dimension) instead of an images file.
pub const IDX_LABELS: u8 = 1;
/// IDX mode bit: gzip the payload before writing it (the fuzzer mutates the plain IDX
/// bytes; the reader's gzip path decodes them).
pub const IDX_GZIP: u8 = 2;

/// IDX target. Input: mode byte ([`IDX_LABELS`], [`IDX_GZIP`]), then the file's bytes.
pub fn idx(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let dir = fresh_dir("idx");
    let path = dir.join("fuzz-idx-ubyte");
    let bytes = if mode & IDX_GZIP != 0 {
        gzip(body)
    } else {
        body.to_vec()
    };
    fs::write(&path, &bytes).expect("write the fuzz file");
    let name = path.display().to_string();
    // The reader sniffs gzip by its magic bytes; only for plain files does the size of
    // what it read follow from the file's size.
    let plain = !bytes.starts_with(&[0x1f, 0x8b]);
    if mode & IDX_LABELS != 0 {
        match data::load_idx_labels(&path) {
            Ok(labels) => {
                assert!(!labels.is_empty());
                if plain {
                    assert_eq!(labels.len() + 8, body.len());
                }
            }
            Err(e) => assert!(
                e.to_string().contains(&name),
                "error does not name the file: {e}"
            ),
        }
    } else {
        match data::load_idx_images(&path) {
            Ok(ds) => {
                let (c, h, w) = ds.shape();
                assert_eq!((c, ds.image_len()), (1, h * w));
                assert!(!ds.is_empty() && h > 0 && w > 0);
                if plain {
                    assert_eq!(ds.len() * h * w + 16, body.len());
                }
                assert_eq!(ds.get(ds.len() - 1).map(<[u8]>::len), Some(h * w));
                assert!(ds.get(ds.len()).is_none());
            }
            Err(e) => assert!(
                e.to_string().contains(&name),
                "error does not name the file: {e}"
            ),
        }
    }
}

// -----------------------------------------------------------------------------------------
// (c) CIFAR-10
// -----------------------------------------------------------------------------------------

/// Bytes of one CIFAR-10 record (label + 3x32x32 pixels).
pub const CIFAR_RECORD: usize = 3073;

/// CIFAR target. Input: mode byte (bit 0: load the folder with
/// [`data::load_cifar10_dir`] instead of the file), then the batch file's bytes.
pub fn cifar(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let dir = fresh_dir("cifar");
    let path = dir.join("data_batch_1.bin");
    fs::write(&path, body).expect("write the fuzz file");
    let result = if mode & 1 != 0 {
        data::load_cifar10_dir(&dir)
    } else {
        data::load_cifar10(std::slice::from_ref(&path))
    };
    match result {
        Ok(ds) => {
            assert_eq!(ds.shape(), (3, 32, 32));
            assert_eq!(body.len() % CIFAR_RECORD, 0);
            assert_eq!(ds.len(), body.len() / CIFAR_RECORD);
            for i in 0..ds.len() {
                assert!(ds.label(i).is_some_and(|l| l <= 9));
                assert_eq!(
                    ds.image(i),
                    &body[i * CIFAR_RECORD + 1..(i + 1) * CIFAR_RECORD]
                );
            }
        }
        Err(e) => {
            let name = path.display().to_string();
            assert!(
                e.to_string().contains(&name),
                "error does not name the file: {e}"
            );
        }
    }
}

// -----------------------------------------------------------------------------------------
// (d) image folder
// -----------------------------------------------------------------------------------------

/// Bytes of options before the picture in an image-folder input.
pub const IMAGE_OPTION_BYTES: usize = 4;

/// Image-folder target. Input: 4 option bytes, then the picture (PNG or JPEG bytes; the
/// loader sniffs the format). Option byte 0: bit 0 channels (0: grey, 1: RGB), bit 1 crop
/// (0: centre, 1: two random crops), bit 2 file extension (`.png` / `.jpg`); byte 1:
/// target height `1 + b % 32`; byte 2: target width `1 + b % 32`; byte 3: random-crop
/// `scale_to` above the target's long side, `b % 32`.
pub fn image_folder(data: &[u8]) {
    if data.len() < IMAGE_OPTION_BYTES {
        return;
    }
    let (opt, picture) = data.split_at(IMAGE_OPTION_BYTES);
    let channels = if opt[0] & 1 != 0 { 3 } else { 1 };
    let height = 1 + usize::from(opt[1] % 32);
    let width = 1 + usize::from(opt[2] % 32);
    let crop = if opt[0] & 2 != 0 {
        Crop::Random {
            per_image: 2,
            scale_to: (height.max(width) + usize::from(opt[3] % 32)) as u32,
            seed: u64::from(opt[3]),
        }
    } else {
        Crop::Center
    };
    let dir = fresh_dir("images");
    let file = dir.join(if opt[0] & 4 != 0 { "p.jpg" } else { "p.png" });
    fs::write(&file, picture).expect("write the fuzz file");
    match data::load_image_folder(&dir, channels, height, width, &crop) {
        Ok(ds) => {
            let per = if matches!(crop, Crop::Center) { 1 } else { 2 };
            assert_eq!(ds.len(), per);
            assert_eq!(ds.shape(), (channels, height, width));
            assert_eq!(ds.image(per - 1).len(), channels * height * width);
        }
        Err(e) => {
            let name = file.display().to_string();
            assert!(
                e.to_string().contains(&name),
                "error does not name the file: {e}"
            );
        }
    }
}

// -----------------------------------------------------------------------------------------
// (e) checkpoint
// -----------------------------------------------------------------------------------------

/// The three files of a checkpoint folder, in checkpoint-input order.
pub const CHECKPOINT_FILES: [&str; 3] = [
    checkpoint::STATE_FILE,
    checkpoint::MODEL_FILE,
    checkpoint::OPTIMIZER_FILE,
];

/// The small architecture of the baseline checkpoint: 1x4x4 squeezed to 4x2x2, one
/// coupling of each mask kind.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        channels: 1,
        height: 4,
        width: 4,
        squeeze: true,
        levels: 1,
        glow: false,
        masks: vec![
            MaskName::ChannelEven,
            MaskName::ChannelOdd,
            MaskName::CheckerEven,
            MaskName::CheckerOdd,
        ],
        kernels: [3, 1, 3],
        hidden: [3, 2],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    }
}

/// A valid checkpoint of [`tiny_config`] with deterministic non-trivial values.
pub fn tiny_checkpoint() -> Checkpoint {
    let model = tiny_config();
    let arch = model.to_arch().expect("tiny config is valid");
    let specs = tensor_specs(&arch);
    let mut x = 0x2545_f491_u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let mut fill = |abs: bool| -> Vec<Vec<f32>> {
        specs
            .iter()
            .map(|s| {
                (0..s.shape.iter().product::<usize>())
                    .map(|_| if abs { next().abs() * 1e-3 } else { next() })
                    .collect()
            })
            .collect()
    };
    let params = fill(false);
    let adam_m = fill(false);
    let adam_v = fill(true);
    Checkpoint {
        model,
        params,
        adam_m,
        adam_v,
        trained: None,
        state: TrainState {
            step: 7,
            epoch: 1,
            batch_in_epoch: 3,
            seed: 42,
            lr: 1e-3,
            lr_scale: 0.5,
            warmup_steps: 10,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 100.0,
            batch_size: 4,
            world_size: 1,
            elapsed_secs: 1.25,
            best_val_bpd: Some(5.5),
            last_val_bpd: Some(5.75),
            dataset: "fuzz".to_string(),
            nonfinite_skips: 0,
            restores: 0,
            val_since_best: 0,
            val_rises: 0,
            ema: None,
        },
    }
}

/// The bytes of the baseline checkpoint's three files ([`CHECKPOINT_FILES`] order), saved
/// once per process with the trainer's own `checkpoint::save`.
pub fn baseline_files() -> &'static [Vec<u8>; 3] {
    static FILES: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    FILES.get_or_init(|| {
        let run = fresh_dir("baseline");
        let dir = checkpoint::save(&run, &tiny_checkpoint(), 1).expect("save the baseline");
        CHECKPOINT_FILES.map(|f| fs::read(dir.join(f)).expect("read the baseline"))
    })
}

/// Checkpoint mode (mode byte % 4) that frames all three files in the payload: a u32 LE
/// length of `state.json`, a u32 LE length of `model.safetensors`, the three files'
/// bytes back to back (the optimizer file takes the rest). Modes 0, 1, 2 replace only the
/// file `CHECKPOINT_FILES[mode]` with the payload and take the others from
/// [`baseline_files`].
pub const CHECKPOINT_ALL: u8 = 3;

/// Frames three files for [`CHECKPOINT_ALL`].
pub fn frame_checkpoint(files: &[Vec<u8>; 3]) -> Vec<u8> {
    let mut out = vec![CHECKPOINT_ALL];
    out.extend((files[0].len() as u32).to_le_bytes());
    out.extend((files[1].len() as u32).to_le_bytes());
    for f in files {
        out.extend_from_slice(f);
    }
    out
}

fn unframe(body: &[u8]) -> [Vec<u8>; 3] {
    let len = |at: usize| -> usize {
        body.get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (a, b) = (len(0), len(4));
    let rest = body.get(8..).unwrap_or(&[]);
    let a = a.min(rest.len());
    let (state, rest) = rest.split_at(a);
    let b = b.min(rest.len());
    let (model, opt) = rest.split_at(b);
    [state.to_vec(), model.to_vec(), opt.to_vec()]
}

/// Checkpoint target. Input: mode byte (see [`CHECKPOINT_ALL`]), then the payload. Writes
/// the checkpoint folder `step-00000007/` and loads it with `checkpoint::load`.
pub fn checkpoint(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let files = match mode % 4 {
        CHECKPOINT_ALL => unframe(body),
        m => {
            let mut f = baseline_files().clone();
            f[usize::from(m)] = body.to_vec();
            f
        }
    };
    let dir = fresh_dir("ckpt").join("step-00000007");
    fs::create_dir_all(&dir).expect("create the checkpoint folder");
    for (name, bytes) in CHECKPOINT_FILES.iter().zip(&files) {
        fs::write(dir.join(name), bytes).expect("write a checkpoint file");
    }
    match checkpoint::load(&dir) {
        Ok((ck, from)) => {
            assert_eq!(from, dir);
            let arch = ck
                .model
                .to_arch()
                .expect("a loaded checkpoint has a valid config");
            let specs = tensor_specs(&arch);
            for set in [&ck.params, &ck.adam_m, &ck.adam_v] {
                assert_eq!(set.len(), specs.len());
                for (t, s) in set.iter().zip(&specs) {
                    assert_eq!(t.len(), s.shape.iter().product::<usize>());
                    assert!(t.iter().all(|v| v.is_finite()));
                }
            }
            assert!(ck.adam_v.iter().flatten().all(|&v| v >= 0.0));
            assert_eq!(ck.flat_params().len(), arch.param_count());
        }
        Err(e) => {
            let name = dir.display().to_string();
            assert!(
                e.to_string().contains(&name),
                "error does not name the folder: {e}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// The committed blob seeds (versions 1, 2 and 3; Glow, including the older version 2
    /// Glow encoding, and multi-level) run through the
    /// blob target without a failed invariant.
    #[test]
    fn blob_seeds_pass_the_target() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/blob");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).expect("seeds/blob") {
            let bytes = std::fs::read(entry.expect("seed entry").path()).expect("read a seed");
            super::blob(&bytes);
            n += 1;
        }
        assert!(n >= 20, "only {n} blob seeds");
    }
}
