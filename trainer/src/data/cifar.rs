//! CIFAR-10 binary batches: single batch files and the folder that holds them.

use std::fs;
use std::path::{Path, PathBuf};

use super::{read_dir_sorted, DataError, Dataset, CIFAR_RECORD, CIFAR_SIDE, MAX_DATA_BYTES};

fn read_cifar_file(
    path: &Path,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    let io_err = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io_err)?.len();
    let check_len = |len: u64| -> Result<(), DataError> {
        if len == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                reason: "the CIFAR-10 batch file is empty (0 bytes); re-download it".to_string(),
            });
        }
        // (Not `is_multiple_of`: that needs Rust 1.87, the workspace MSRV is 1.85.)
        if len / CIFAR_RECORD as u64 * CIFAR_RECORD as u64 != len {
            return Err(DataError::CifarSize {
                path: path.to_path_buf(),
                len,
            });
        }
        if len > MAX_DATA_BYTES {
            return Err(DataError::TooLarge {
                path: path.to_path_buf(),
                what: format!("{} CIFAR-10 records", len / CIFAR_RECORD as u64),
                bytes: u128::from(len),
                limit: MAX_DATA_BYTES,
            });
        }
        Ok(())
    };
    check_len(len)?;
    let bytes = fs::read(path).map_err(io_err)?;
    // The file may have changed between the size check and the read.
    check_len(bytes.len() as u64)?;
    pixels.reserve(bytes.len() / CIFAR_RECORD * (CIFAR_RECORD - 1));
    labels.reserve(bytes.len() / CIFAR_RECORD);
    for (record, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        let label = rec[0];
        if label > 9 {
            return Err(DataError::CifarLabel {
                path: path.to_path_buf(),
                record,
                label,
            });
        }
        labels.push(label);
        // A record's 3072 pixel bytes are already R plane, G plane, B plane,
        // each 32x32 row-major: exactly one CHW image.
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

/// CIFAR-10 binary batches, concatenated in the order given. Each record is
/// 1 label byte + 3072 pixel bytes (1024 R, 1024 G, 1024 B, each 32x32
/// row-major); each file's size must be a non-zero multiple of 3073.
/// A directory in the list is loaded with [`load_cifar10_dir`].
pub fn load_cifar10(paths: &[PathBuf]) -> Result<Dataset, DataError> {
    if paths.is_empty() {
        return Err(DataError::NoFiles {
            what: "CIFAR-10 batch",
            hint: "pass data_batch_*.bin files or the cifar-10-batches-bin directory",
        });
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for p in paths {
        if p.is_dir() {
            let ds = load_cifar10_dir(p)?;
            pixels.extend_from_slice(&ds.pixels);
            labels.extend_from_slice(ds.labels.as_deref().unwrap_or(&[]));
        } else {
            read_cifar_file(p, &mut pixels, &mut labels)?;
        }
    }
    Ok(Dataset {
        channels: 3,
        height: CIFAR_SIDE,
        width: CIFAR_SIDE,
        pixels,
        labels: Some(labels),
    })
}

/// The CIFAR-10 batch files a directory holds: `data_batch_*.bin` sorted by
/// batch number, or `test_batch.bin` when there are no training batches.
/// Falls back to a `cifar-10-batches-bin` subdirectory (the layout of the
/// extracted official tarball).
pub fn cifar10_batches_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut batches: Vec<(u64, String, PathBuf)> = Vec::new();
    let mut test = None;
    for entry in read_dir_sorted(dir)? {
        let Some(name) = entry.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !entry.is_file() {
            continue;
        }
        if let Some(mid) = name
            .strip_prefix("data_batch_")
            .and_then(|r| r.strip_suffix(".bin"))
        {
            let num = mid.parse::<u64>().unwrap_or(u64::MAX);
            batches.push((num, name.to_string(), entry.clone()));
        } else if name == "test_batch.bin" {
            test = Some(entry.clone());
        }
    }
    batches.sort();
    if !batches.is_empty() {
        return Ok(batches.into_iter().map(|(_, _, p)| p).collect());
    }
    if let Some(t) = test {
        return Ok(vec![t]);
    }
    let sub = dir.join("cifar-10-batches-bin");
    if sub.is_dir() {
        return cifar10_batches_in(&sub);
    }
    Err(DataError::Empty {
        path: dir.to_path_buf(),
        reason: "no data_batch_*.bin or test_batch.bin files in this directory; point at the \
                 extracted cifar-10-batches-bin folder"
            .to_string(),
    })
}

/// Load the CIFAR-10 batches of a directory (see [`cifar10_batches_in`]).
pub fn load_cifar10_dir(dir: &Path) -> Result<Dataset, DataError> {
    let files = cifar10_batches_in(dir)?;
    load_cifar10(&files)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{load_auto, Crop};
    use super::*;
    use tempfile::TempDir;

    #[test]
    fn synthetic_cifar_planes_and_dir_order() {
        let record = |label: u8, base: u8| {
            let mut r = vec![label];
            for c in 0..3u8 {
                r.extend((0..1024).map(|i| base + 10 * c + (i % 7) as u8));
            }
            r
        };
        let dir = TempDir::new().unwrap();
        let mut b1 = record(3, 100);
        b1.extend(record(9, 0));
        write(&dir, "data_batch_2.bin", &record(1, 50));
        write(&dir, "data_batch_1.bin", &b1);
        write(&dir, "test_batch.bin", &record(0, 200));
        write(&dir, "batches.meta.txt", b"airplane\n");

        let ds = load_cifar10_dir(dir.path()).unwrap();
        assert_eq!((ds.len(), ds.shape()), (3, (3, 32, 32)));
        assert_eq!(ds.labels.as_deref(), Some(&[3u8, 9, 1][..]));
        let im = ds.image(0);
        assert_eq!(im[0], 100); // R plane
        assert_eq!(im[1024], 110); // G plane
        assert_eq!(im[2048 + 5], 125); // B plane, pixel 5
        assert_eq!(im[32 * 31 + 31], 100 + (1023 % 7) as u8); // last R pixel
        assert_eq!(ds.image(1)[1024 + 1], 11);
        assert_eq!(ds.image(2)[2048], 70);

        // Explicit list keeps the given order.
        let listed = load_cifar10(&[
            dir.path().join("test_batch.bin"),
            dir.path().join("data_batch_2.bin"),
        ])
        .unwrap();
        assert_eq!(listed.labels.as_deref(), Some(&[0u8, 1][..]));

        // Only a test batch: that one is used.
        let only_test = TempDir::new().unwrap();
        write(&only_test, "test_batch.bin", &record(4, 1));
        let t = load_cifar10_dir(only_test.path()).unwrap();
        assert_eq!(t.labels.as_deref(), Some(&[4u8][..]));

        // Auto-detection picks CIFAR for the directory and for a single file.
        let auto = load_auto(dir.path(), 3, 32, 32, &Crop::Center).unwrap();
        assert_eq!(auto, ds);
        let single = load_auto(
            &dir.path().join("data_batch_2.bin"),
            3,
            32,
            32,
            &Crop::Center,
        )
        .unwrap();
        assert_eq!(single.len(), 1);

        // A label over 9 means this is not CIFAR-10.
        let bad = write(&dir, "bad.bin", &record(42, 0));
        assert_err(load_cifar10(&[bad]), "bad.bin", "label 42");
    }

    #[test]
    fn cifar_bad_sizes() {
        let dir = TempDir::new().unwrap();
        let p = write(&dir, "data_batch_1.bin", &vec![0u8; CIFAR_RECORD + 5]);
        assert_err(
            load_cifar10(&[p]),
            "data_batch_1.bin",
            "not a multiple of the 3073",
        );
        let p = write(&dir, "data_batch_2.bin", b"");
        assert_err(load_cifar10(&[p]), "data_batch_2.bin", "empty");
        assert!(load_cifar10(&[])
            .unwrap_err()
            .to_string()
            .contains("no CIFAR-10"));
        let empty = TempDir::new().unwrap();
        assert_err(
            load_cifar10_dir(empty.path()),
            &empty.path().display().to_string(),
            "data_batch",
        );
    }
}
