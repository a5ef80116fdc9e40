//! The Python reader and writer printed in `kernel/FORMAT.md` against the kernel: this test
//! runs that very code block (python3, standard library only) on blobs of every format
//! version and kind that the kernel wrote or reads, so the document cannot drift from the
//! code.
//!
//! For each blob, Python's `read` must accept exactly what `Model::from_blob` accepts, and
//! its `write` of what it read must give the same bytes back (blobs whose padding is zero,
//! as the kernel writes them); an older version 2 Glow blob comes back as the version 3 blob
//! of the same weights, which the kernel parses to the same model.

use clayflow_kernel::{Arch, DType, Mask, Model, MAX_COUPLINGS, MNIST_GLOW};
use std::path::PathBuf;
use std::process::Command;

/// The ```python block that follows the "## Python reader and writer" heading.
fn format_md_python() -> String {
    let md = std::fs::read_to_string(root().join("kernel/FORMAT.md")).unwrap();
    let section = md
        .split("## Python reader and writer")
        .nth(1)
        .expect("FORMAT.md has its Python section");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("the section starts with a python block");
    code.to_string()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every weight of `blob`'s model, as bits, Glow tensors first in each step, the learned
/// prior's last.
fn weights(blob: &[u8]) -> Vec<u32> {
    let model = Model::from_blob(blob).unwrap();
    let mut out = Vec::new();
    for i in 0..model.arch().couplings {
        if model.arch().glow {
            for t in model.glow_step(i).unwrap().in_blob_order() {
                out.extend(t.iter().map(f32::to_bits));
            }
        }
        for t in model.coupling(i).unwrap().in_blob_order() {
            out.extend(t.iter().map(f32::to_bits));
        }
    }
    if model.arch().prior {
        for l in 0..model.arch().levels - 1 {
            for t in model.prior(l).unwrap().in_blob_order() {
                out.extend(t.iter().map(f32::to_bits));
            }
        }
        for t in model.top().unwrap().in_blob_order() {
            out.extend(t.iter().map(f32::to_bits));
        }
    }
    out
}

/// Small architectures of every kind the format has: one level (version 1), several levels
/// (version 2), Glow with one and with two levels (version 3), with and without the learned
/// prior, with checkerboard masks and odd widths (f16 padding).
fn kernel_blobs() -> Vec<(String, Vec<u8>)> {
    let mut masks = [Mask::ChannelEven; MAX_COUPLINGS];
    masks[..4].copy_from_slice(&[
        Mask::ChannelEven,
        Mask::CheckerOdd,
        Mask::ChannelOdd,
        Mask::CheckerEven,
    ]);
    let base = Arch {
        channels: 2,
        height: 4,
        width: 4,
        squeeze: false,
        levels: 1,
        glow: false,
        couplings: 4,
        masks,
        kernels: [3, 1, 3],
        hidden: [3, 5],
        bits: 8,
        logit_alpha: 0.05,
        prior: false,
        scale_floor: 0.0,
    };
    let archs = [
        ("v1", base),
        ("v2-levels", Arch { levels: 2, ..base }),
        ("v3-glow-1level", Arch { glow: true, ..base }),
        (
            "v3-glow-2levels",
            Arch {
                glow: true,
                levels: 2,
                ..base
            },
        ),
        ("v3-mnist-glow", MNIST_GLOW),
        (
            "v3-prior-1level",
            Arch {
                glow: true,
                prior: true,
                ..base
            },
        ),
        (
            "v3-prior-2levels",
            Arch {
                glow: true,
                levels: 2,
                prior: true,
                ..base
            },
        ),
    ];
    let mut out = Vec::new();
    for (name, arch) in archs {
        let params = clayflow_suite::random_params(&arch, 3, 1.0, 0.5);
        for (dtype, d) in [(DType::F32, "f32"), (DType::F16, "f16")] {
            out.push((
                format!("{name}-{d}"),
                clayflow_suite::blob(&arch, dtype, &params),
            ));
        }
    }
    out
}

/// The committed blobs: the firmware's, and the fuzz seeds (minus their mode byte), which
/// include version 2 Glow blobs of the older encoding and one with a NaN weight.
fn committed_blobs() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for f in ["model-f16.cfw", "model-f32.cfw", "model-glow-f16.cfw"] {
        out.push((
            format!("firmware-{f}"),
            std::fs::read(root().join("tools/firmware").join(f)).unwrap(),
        ));
    }
    let seeds = root().join("tools/fuzz/seeds/blob");
    let mut names: Vec<_> = std::fs::read_dir(&seeds)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.contains("fixcrc"))
        .collect();
    names.sort();
    for n in names {
        let bytes = std::fs::read(seeds.join(&n)).unwrap();
        out.push((format!("seed-{n}"), bytes[1..].to_vec()));
    }
    out
}

const DRIVER: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
from blob import read, write
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    try:
        arch, dtype, tensors = read(data)
    except ValueError as e:
        print("REJECT", path, e)
        continue
    flat = [v for _, values in tensors for v in values]
    open(path + ".out", "wb").write(write(arch, flat, dtype))
    print("OK", path)
"#;

#[test]
fn the_python_in_format_md_reads_and_writes_like_the_kernel() {
    let dir = std::env::temp_dir().join(format!("clayflow-format-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("blob.py"), format_md_python()).unwrap();
    std::fs::write(dir.join("driver.py"), DRIVER).unwrap();
    let blobs: Vec<(String, Vec<u8>)> = kernel_blobs()
        .into_iter()
        .chain(committed_blobs())
        .collect();
    let mut paths = Vec::new();
    for (name, bytes) in &blobs {
        let p = dir.join(format!("{name}.cfw"));
        std::fs::write(&p, bytes).unwrap();
        paths.push(p);
    }
    let out = Command::new("python3")
        .arg(dir.join("driver.py"))
        .arg(&dir)
        .args(&paths)
        .output()
        .expect("python3 is needed to check FORMAT.md's Python code (the CI image has it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut legacy = 0;
    for ((name, bytes), path) in blobs.iter().zip(&paths) {
        let line = stdout
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
            .unwrap_or_else(|| panic!("no result for {name}:\n{stdout}"));
        let kernel = Model::from_blob(bytes);
        assert_eq!(
            line.starts_with("OK"),
            kernel.is_ok(),
            "{name}: python says {line:?}, the kernel {:?}",
            kernel.map(|_| ())
        );
        let Ok(model) = kernel else { continue };
        let written = std::fs::read(format!("{}.out", path.display())).unwrap();
        if model.version() == 2 && model.arch().glow {
            // The older Glow encoding comes back as version 3 with the same weights.
            legacy += 1;
            let again = Model::from_blob(&written).unwrap();
            assert_eq!(again.version(), 3, "{name}");
            assert_eq!(weights(&written), weights(bytes), "{name}");
            assert!(written.len() < bytes.len(), "{name}");
        } else {
            assert!(
                written == *bytes,
                "{name}: python's write differs from the kernel's blob"
            );
        }
    }
    assert!(legacy >= 2, "the seeds hold {legacy} version 2 Glow blobs");
    // Every version was seen.
    for v in [1u16, 2, 3] {
        assert!(
            blobs
                .iter()
                .any(|(_, b)| Model::from_blob(b).is_ok_and(|m| m.version() == v)),
            "no version {v} blob"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
