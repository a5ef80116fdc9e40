//! Builds the fuzz seed corpora from real files.
//!
//! ```text
//! cargo run --release --example make_seeds -- seeds            # small set (committed)
//! cargo run --release --example make_seeds -- corpus --full    # plus the big real files
//! ```
//!
//! Run from `tools/fuzz`. Sources: the bundled MNIST IDX files and photos under `data/`,
//! blobs written by the kernel's own `write_blob` for small architectures, a checkpoint
//! saved by the trainer's `checkpoint::save`, and (with `--full`) the trained MNIST run at
//! `$CLAYFLOW_RUN` (default `/work/main/runs/mnist`): its f16/f32 blobs and a checkpoint.
//! Every file is the target's input: mode byte(s) first (see `src/lib.rs`).
//!
//! The blob seeds `glow-v2-*` are not made here: they are the `glow-sq1x4x4-l2` seeds as
//! kernels before blob version 3 wrote them (Glow in version 2, with the couplings' unused
//! `scale` tensors), kept so the fuzzer keeps exercising the reader's older encoding.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use clayflow_fuzz::{
    baseline_files, fix_crc, frame_checkpoint, gzip, BLOB_FIX_CRC, CHECKPOINT_FILES, CIFAR_RECORD,
    IDX_GZIP, IDX_LABELS,
};
use clayflow_kernel::arch::{alternating_masks, Arch, Mask, MAX_COUPLINGS};
use clayflow_kernel::{blob_len, write_blob, DType};
use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("create corpus folder");
    fs::write(d.join(name), bytes).expect("write seed");
}

fn with_mode(mode: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(body);
    v
}

/// Deterministic small weights (xorshift), scales near 1.
fn params(arch: &Arch, seed: u32) -> Vec<f32> {
    let mut x = seed | 1;
    (0..arch.param_count())
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

fn blob(arch: &Arch, dtype: DType, p: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; blob_len(arch, dtype)];
    write_blob(arch, dtype, p, &mut out).expect("write a seed blob");
    out
}

fn small_archs() -> Vec<(&'static str, Arch)> {
    let base = Arch {
        channels: 1,
        height: 4,
        width: 4,
        squeeze: true,
        levels: 1,
        glow: false,
        couplings: 2,
        masks: alternating_masks(Mask::ChannelEven),
        kernels: [3, 1, 3],
        hidden: [3, 2],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    };
    let mut checker = base;
    checker.channels = 2;
    checker.squeeze = false;
    checker.height = 3;
    checker.width = 5;
    checker.couplings = 3;
    checker.masks = [Mask::CheckerEven; MAX_COUPLINGS];
    checker.masks[1] = Mask::CheckerOdd;
    checker.masks[2] = Mask::ChannelOdd;
    checker.kernels = [1, 3, 5];
    checker.hidden = [1, 3];
    checker.bits = 5;
    checker.logit_alpha = 0.01;
    let mut color = base;
    color.channels = 3;
    color.height = 2;
    color.width = 6;
    color.couplings = 1;
    color.masks[0] = Mask::ChannelOdd;
    color.kernels = [1, 1, 1];
    color.hidden = [5, 1];
    color.bits = 1;
    color.logit_alpha = 0.25;
    // Version 3: two levels (4x2x2, then 8x1x1) with Glow steps; version 2: two levels
    // without.
    let mut glow = base;
    glow.levels = 2;
    glow.glow = true;
    glow.couplings = 4;
    // Version 3 with the learned prior (flag bit 1): a split prior, a top prior.
    let mut prior = glow;
    prior.prior = true;
    let mut multi = checker;
    multi.height = 4;
    multi.width = 4;
    multi.levels = 3;
    multi.couplings = 3;
    multi.masks[1] = Mask::ChannelOdd;
    multi.masks[2] = Mask::ChannelEven;
    vec![
        ("sq1x4x4", base),
        ("chk2x3x5", checker),
        ("rgb3x2x6", color),
        ("glow-sq1x4x4-l2", glow),
        ("glow-prior-sq1x4x4-l2", prior),
        ("multi-chk2x4x4-l3", multi),
    ]
}

fn blob_seeds(out: &Path, full: bool, run: &Path) {
    for (name, arch) in small_archs() {
        let p = params(&arch, 7);
        for (dt, dname) in [(DType::F32, "f32"), (DType::F16, "f16")] {
            let b = blob(&arch, dt, &p);
            put(
                out,
                "blob",
                &format!("{name}-{dt_name}", dt_name = dname),
                &with_mode(0, &b),
            );
            put(
                out,
                "blob",
                &format!("{name}-{dname}-fixcrc-t16"),
                &with_mode(BLOB_FIX_CRC | 32, &b),
            );
        }
    }
    // A weight made NaN with a valid CRC: reaches the finiteness scan.
    let (_, arch) = small_archs()[0];
    let mut b = blob(&arch, DType::F32, &params(&arch, 9));
    let at = b.len() - 8;
    b[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    fix_crc(&mut b);
    put(out, "blob", "sq1x4x4-nan", &with_mode(0, &b));
    if full {
        for f in ["model-f16.cfw", "model-f32.cfw"] {
            let b = fs::read(run.join(f)).expect("read a trained blob (set CLAYFLOW_RUN)");
            // The real header alone (truncated blob) is a small, realistic seed too.
            put(
                out,
                "blob",
                &format!("mnist-{f}-header"),
                &with_mode(0, &b[..52]),
            );
            put(out, "blob", &format!("mnist-{f}"), &with_mode(0, &b));
        }
    }
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    flate2::read::MultiGzDecoder::new(fs::File::open(path).expect("open MNIST"))
        .read_to_end(&mut v)
        .expect("gunzip MNIST");
    v
}

/// An IDX images file of the first `n` images of a decompressed IDX3 file.
fn idx_images(full: &[u8], n: u32) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    v.extend(n.to_be_bytes());
    v.extend_from_slice(&full[8..16]);
    v.extend_from_slice(&full[16..16 + n as usize * 784]);
    v
}

fn idx_labels(full: &[u8], n: u32) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend(n.to_be_bytes());
    v.extend_from_slice(&full[8..8 + n as usize]);
    v
}

fn idx_seeds(out: &Path, full: bool, data: &Path) {
    let img_gz = data.join("mnist8k-train-images-idx3-ubyte.gz");
    let lab_gz = data.join("mnist8k-train-labels-idx1-ubyte.gz");
    let images = gunzip(&img_gz);
    let labels = gunzip(&lab_gz);
    let three = idx_images(&images, 3);
    put(out, "idx", "images3-raw", &with_mode(0, &three));
    put(
        out,
        "idx",
        "images1-via-gzip",
        &with_mode(IDX_GZIP, &idx_images(&images, 1)),
    );
    put(
        out,
        "idx",
        "images2-gz-bytes",
        &with_mode(0, &gzip(&idx_images(&images, 2))),
    );
    put(
        out,
        "idx",
        "labels20-raw",
        &with_mode(IDX_LABELS, &idx_labels(&labels, 20)),
    );
    put(
        out,
        "idx",
        "labels20-via-gzip",
        &with_mode(IDX_LABELS | IDX_GZIP, &idx_labels(&labels, 20)),
    );
    if full {
        put(
            out,
            "idx",
            "mnist8k-images-gz",
            &with_mode(0, &fs::read(&img_gz).unwrap()),
        );
        put(
            out,
            "idx",
            "mnist8k-labels-gz",
            &with_mode(IDX_LABELS, &fs::read(&lab_gz).unwrap()),
        );
        put(
            out,
            "idx",
            "images100-raw",
            &with_mode(0, &idx_images(&images, 100)),
        );
    }
}

fn photo(data: &Path, name: &str) -> DynamicImage {
    image::open(data.join("photos").join(name)).expect("decode a bundled photo")
}

/// A CIFAR-10 record: label, then the 32x32 R, G, B planes of the photo.
fn cifar_record(img: &DynamicImage, label: u8) -> Vec<u8> {
    let rgb = img.resize_exact(32, 32, FilterType::Triangle).to_rgb8();
    let mut rec = vec![label];
    for c in 0..3 {
        rec.extend(rgb.pixels().map(|p| p.0[c]));
    }
    assert_eq!(rec.len(), CIFAR_RECORD);
    rec
}

fn cifar_seeds(out: &Path, data: &Path) {
    let astro = cifar_record(&photo(data, "astronaut.png"), 3);
    let mut two = cifar_record(&photo(data, "rocket.jpg"), 0);
    two.extend(cifar_record(&photo(data, "coffee.png"), 9));
    put(out, "cifar", "astronaut-1rec", &with_mode(0, &astro));
    put(out, "cifar", "rocket-coffee-2rec-dir", &with_mode(1, &two));
}

fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut v = std::io::Cursor::new(Vec::new());
    img.write_to(&mut v, fmt).expect("encode a seed picture");
    v.into_inner()
}

fn image_seeds(out: &Path, full: bool, data: &Path) {
    // Options: [flags (1 RGB, 2 random crops, 4 .jpg), height-1, width-1, scale_to extra].
    let astro = photo(data, "astronaut.png").thumbnail(24, 24);
    let rocket = photo(data, "rocket.jpg").thumbnail(20, 30);
    let retina = photo(data, "retina.jpg").thumbnail(16, 16).grayscale();
    let coffee = photo(data, "coffee.png")
        .resize_exact(9, 7, FilterType::Triangle)
        .to_rgba8();
    let seeds: [(&str, [u8; 4], Vec<u8>); 4] = [
        (
            "astronaut-png-rgb-center",
            [1, 15, 15, 0],
            encode(&astro, ImageFormat::Png),
        ),
        (
            "rocket-jpg-grey-random",
            [2 | 4, 7, 7, 5],
            encode(&rocket, ImageFormat::Jpeg),
        ),
        (
            "retina-png-grey-center",
            [0, 11, 5, 0],
            encode(&retina, ImageFormat::Png),
        ),
        (
            "coffee-rgba-png-rgb-random",
            [1 | 2, 6, 8, 3],
            encode(&DynamicImage::ImageRgba8(coffee), ImageFormat::Png),
        ),
    ];
    for (name, opt, bytes) in seeds {
        let mut v = opt.to_vec();
        v.extend(bytes);
        put(out, "image_folder", name, &v);
    }
    if full {
        for (i, f) in [
            "astronaut.png",
            "coffee.png",
            "hubble_deep_field.jpg",
            "retina.jpg",
            "rocket.jpg",
        ]
        .iter()
        .enumerate()
        {
            let mut v = vec![(i as u8) & 3, 27, 27, 4];
            v.extend(fs::read(data.join("photos").join(f)).unwrap());
            put(out, "image_folder", &format!("full-{f}"), &v);
        }
    }
}

fn checkpoint_seeds(out: &Path, full: bool, run: &Path) {
    let base = baseline_files();
    for (m, name) in CHECKPOINT_FILES.iter().enumerate() {
        put(
            out,
            "checkpoint",
            &format!("tiny-{name}"),
            &with_mode(m as u8, &base[m]),
        );
    }
    put(out, "checkpoint", "tiny-all", &frame_checkpoint(base));
    let real = run.join("checkpoints/step-00002834");
    if let Ok(state) = fs::read(real.join("state.json")) {
        // A real state.json (MNIST architecture) with the tiny tensors: an arch mismatch.
        put(out, "checkpoint", "mnist-state.json", &with_mode(0, &state));
        if full {
            let files = CHECKPOINT_FILES.map(|f| fs::read(real.join(f)).unwrap());
            put(out, "checkpoint", "mnist-all", &frame_checkpoint(&files));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(args.first().map_or("seeds", String::as_str));
    let full = args.iter().any(|a| a == "--full");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = repo.join("data");
    let run = PathBuf::from(
        std::env::var("CLAYFLOW_RUN").unwrap_or_else(|_| "/work/main/runs/mnist".to_string()),
    );
    blob_seeds(&out, full, &run);
    idx_seeds(&out, full, &data);
    cifar_seeds(&out, &data);
    image_seeds(&out, full, &data);
    checkpoint_seeds(&out, full, &run);
    println!("seeds written to {}", out.display());
}
