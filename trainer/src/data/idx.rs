//! MNIST-style IDX files (raw or gzipped): the header checks, images, labels and the labels
//! file beside an images file.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::{DataError, Dataset, MAX_DATA_BYTES};

/// An opened IDX file, transparently decompressed when gzipped.
struct Input {
    path: PathBuf,
    reader: Box<dyn Read + Send>,
    gz: bool,
    /// File size on disk (meaningful for raw files).
    file_len: u64,
}

impl Input {
    fn open(path: &Path) -> Result<Input, DataError> {
        let io_err = |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        if file_len == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                reason: "the file is empty (0 bytes); re-download it".to_string(),
            });
        }
        let mut sniff = Vec::with_capacity(2);
        (&mut file)
            .take(2)
            .read_to_end(&mut sniff)
            .map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        let gz = sniff == [0x1f, 0x8b];
        let reader: Box<dyn Read + Send> = if gz {
            Box::new(MultiGzDecoder::new(BufReader::new(file)))
        } else {
            Box::new(BufReader::new(file))
        };
        Ok(Input {
            path: path.to_path_buf(),
            reader,
            gz,
            file_len,
        })
    }

    fn err(&self, source: io::Error) -> DataError {
        if self.gz {
            DataError::Gzip {
                path: self.path.clone(),
                source,
            }
        } else {
            DataError::Io {
                path: self.path.clone(),
                source,
            }
        }
    }

    /// Read up to `n` bytes; fewer only at end of data.
    fn read_up_to(&mut self, n: u64) -> Result<Vec<u8>, DataError> {
        let cap = n.min(64 << 20) as usize;
        let mut buf = Vec::with_capacity(cap);
        match (&mut self.reader).take(n).read_to_end(&mut buf) {
            Ok(_) => Ok(buf),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Count the bytes left (up to [`MAX_DATA_BYTES`]).
    fn count_rest(&mut self) -> Result<u64, DataError> {
        match io::copy(
            &mut (&mut self.reader).take(MAX_DATA_BYTES),
            &mut io::sink(),
        ) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Read an unsigned-byte IDX file with `ndims` dimensions; returns the
/// dimensions and the data.
fn read_idx(path: &Path, ndims: u8, what: &'static str) -> Result<(Vec<u64>, Vec<u8>), DataError> {
    let mut input = Input::open(path)?;
    let header_len = 4 + 4 * u64::from(ndims);
    let expected_magic = 0x0800 | u32::from(ndims);

    let head = input.read_up_to(4)?;
    if head.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            reason: "the file decompresses to 0 bytes; re-download it".to_string(),
        });
    }
    if head.len() < 4 {
        return Err(DataError::TruncatedHeader {
            path: path.to_path_buf(),
            needed: header_len,
            found: head.len() as u64,
        });
    }
    let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if head[0] != 0 || head[1] != 0 || head[2] != 0x08 {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            what,
            found: magic,
            expected: expected_magic,
        });
    }
    if head[3] != ndims {
        return Err(DataError::WrongDims {
            path: path.to_path_buf(),
            what,
            found: head[3],
            expected: ndims,
        });
    }

    let dim_bytes = input.read_up_to(4 * u64::from(ndims))?;
    if (dim_bytes.len() as u64) < 4 * u64::from(ndims) {
        return Err(DataError::TruncatedHeader {
            path: path.to_path_buf(),
            needed: header_len,
            found: 4 + dim_bytes.len() as u64,
        });
    }
    let dims: Vec<u64> = dim_bytes
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let describe = match dims.as_slice() {
        [n, rows, cols] => format!("{n} images of {rows}x{cols}"),
        [n] => format!("{n} labels"),
        other => format!("{other:?} bytes"),
    };

    let total = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    let total = match total {
        Some(t) if t <= MAX_DATA_BYTES => t,
        _ => {
            let bytes = dims.iter().map(|&d| u128::from(d)).product::<u128>();
            return Err(DataError::TooLarge {
                path: path.to_path_buf(),
                what: describe,
                bytes,
                limit: MAX_DATA_BYTES,
            });
        }
    };
    if dims[0] == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
            reason: format!("the IDX header says 0 {what}; use a file that holds data"),
        });
    }
    if dims.len() == 3 && (dims[1] == 0 || dims[2] == 0) {
        return Err(DataError::BadHeader {
            path: path.to_path_buf(),
            message: format!(
                "header says {describe}, and images cannot have a zero side; \
                 the file is corrupt, re-download it"
            ),
        });
    }

    if !input.gz {
        let avail = input.file_len.saturating_sub(header_len);
        if avail < total {
            return Err(DataError::Truncated {
                path: path.to_path_buf(),
                what: describe,
                expected: total,
                found: avail,
            });
        }
    }
    let data = input.read_up_to(total)?;
    if (data.len() as u64) < total {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            what: describe,
            expected: total,
            found: data.len() as u64,
        });
    }
    let extra = if input.gz {
        input.count_rest()?
    } else {
        input.file_len - header_len - total
    };
    if extra > 0 {
        return Err(DataError::TrailingData {
            path: path.to_path_buf(),
            what: describe,
            extra,
        });
    }
    Ok((dims, data))
}

/// Read an IDX image file (magic 0x00000803, u8 data, big-endian count, rows,
/// cols), gzipped or raw: gzip is detected by the 1f 8b magic bytes, not by
/// the file name. The official MNIST / Fashion-MNIST files load unchanged.
/// Returns `channels = 1` and no labels.
pub fn load_idx_images(path: &Path) -> Result<Dataset, DataError> {
    let (dims, pixels) = read_idx(path, 3, "images")?;
    Ok(Dataset {
        channels: 1,
        height: dims[1] as usize,
        width: dims[2] as usize,
        pixels,
        labels: None,
    })
}

/// Read an IDX label file (magic 0x00000801), gzipped or raw.
pub fn load_idx_labels(path: &Path) -> Result<Vec<u8>, DataError> {
    let (_, labels) = read_idx(path, 1, "labels")?;
    Ok(labels)
}

/// Images plus optional labels, checking that the counts agree.
pub fn load_idx_pair(images: &Path, labels: Option<&Path>) -> Result<Dataset, DataError> {
    let mut ds = load_idx_images(images)?;
    if let Some(lpath) = labels {
        let l = load_idx_labels(lpath)?;
        if l.len() != ds.len() {
            return Err(DataError::CountMismatch {
                images: images.to_path_buf(),
                labels: lpath.to_path_buf(),
                n_images: ds.len(),
                n_labels: l.len(),
            });
        }
        ds.labels = Some(l);
    }
    Ok(ds)
}

/// The labels file conventionally stored beside an IDX images file:
/// `*images-idx3*` -> `*labels-idx1*` (also `images.idx3` -> `labels.idx1`),
/// when such a file exists.
pub fn idx_labels_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    for (from, to) in [
        ("images-idx3", "labels-idx1"),
        ("images.idx3", "labels.idx1"),
    ] {
        if name.contains(from) {
            let candidate = images.with_file_name(name.replace(from, to));
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Whether a file starts (after gunzip) with an unsigned-byte IDX magic.
pub(super) fn looks_like_idx(path: &Path) -> bool {
    Input::open(path)
        .and_then(|mut i| i.read_up_to(4))
        .is_ok_and(|h| h.len() == 4 && h[0] == 0 && h[1] == 0 && h[2] == 0x08)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::IDX_IMAGES_MAGIC;
    use super::super::IDX_LABELS_MAGIC;
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use proptest::prelude::*;
    use std::fs;
    use std::io::Write;
    use tempfile::TempDir;

    fn idx_bytes(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn gunzip(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        MultiGzDecoder::new(File::open(path).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn real_mnist_loads() {
        let ds = load_idx_pair(&mnist_images(), Some(&mnist_labels())).unwrap();
        assert_eq!((ds.len(), ds.shape()), (8000, (1, 28, 28)));
        assert_eq!(ds.pixels.len(), 8000 * 784);
        let labels = ds.labels.as_ref().unwrap();
        assert_eq!(labels.len(), 8000);
        assert!(labels.iter().all(|&l| l <= 9));
        for digit in 0..=9 {
            assert!(labels.contains(&digit), "digit {digit} missing");
        }
        let mut hist = [0usize; 256];
        for &p in &ds.pixels {
            hist[p as usize] += 1;
        }
        assert!(hist[0] > 0 && hist[255] > 0);
        let mean = ds.pixels.iter().map(|&p| p as f64).sum::<f64>() / ds.pixels.len() as f64;
        assert!((30.0..37.0).contains(&mean), "mean pixel {mean}");
    }

    #[test]
    fn raw_mnist_identical_and_gzip_sniffed_not_named() {
        let gz = load_idx_pair(&mnist_images(), Some(&mnist_labels())).unwrap();
        let dir = TempDir::new().unwrap();
        // Raw bytes under a .gz name, gzip bytes under a plain name.
        let raw_img = write(&dir, "raw-images.gz", &gunzip(&mnist_images()));
        let raw_lab = write(&dir, "raw-labels", &gunzip(&mnist_labels()));
        let raw = load_idx_pair(&raw_img, Some(&raw_lab)).unwrap();
        assert_eq!(raw, gz);
        let renamed = write(&dir, "gz-labels.idx", &fs::read(mnist_labels()).unwrap());
        assert_eq!(load_idx_labels(&renamed).unwrap(), raw.labels.unwrap());
    }

    #[test]
    fn truncated_idx() {
        let dir = TempDir::new().unwrap();
        let raw = idx_bytes(IDX_IMAGES_MAGIC, &[10, 28, 28], &[0; 100]);
        let p = write(&dir, "short-images", &raw);
        assert_err(load_idx_images(&p), "short-images", "truncated");
        let msg = load_idx_images(&p).unwrap_err().to_string();
        assert!(
            msg.contains("10 images of 28x28 (7840 bytes) but only 100 bytes"),
            "{msg}"
        );
        let gz = write(&dir, "short-images.gz", &gzip(&raw));
        assert_err(
            load_idx_images(&gz),
            "short-images.gz",
            "but only 100 bytes",
        );
        // Cut inside the header.
        let p = write(&dir, "stub", &raw[..10]);
        assert_err(load_idx_images(&p), "stub", "truncated");
        // A gzip stream cut in the middle.
        let full = gzip(&idx_bytes(IDX_LABELS_MAGIC, &[5000], &[7; 5000]));
        let p = write(&dir, "cut.gz", &full[..full.len() / 2]);
        assert_err(load_idx_labels(&p), "cut.gz", "gzip");
    }

    #[test]
    fn wrong_idx_magic() {
        let dir = TempDir::new().unwrap();
        let p = write(&dir, "archive.zip", b"PK\x03\x04 not an idx file at all");
        assert_err(load_idx_images(&p), "archive.zip", "magic");
        let p = write(&dir, "floats", &idx_bytes(0x0000_0d03, &[1, 1, 1], &[0; 4]));
        assert_err(load_idx_images(&p), "floats", "data type 0x0d");
    }

    #[test]
    fn wrong_idx_dims() {
        let dir = TempDir::new().unwrap();
        let labels = write(
            &dir,
            "labels-idx1",
            &idx_bytes(IDX_LABELS_MAGIC, &[2], &[1, 2]),
        );
        assert_err(
            load_idx_images(&labels),
            "labels-idx1",
            "looks like a labels file",
        );
        let images = write(&dir, "img3", &idx_bytes(IDX_IMAGES_MAGIC, &[1, 1, 1], &[9]));
        assert_err(load_idx_labels(&images), "img3", "dimension");
        let two = write(&dir, "two-dim", &idx_bytes(0x0000_0802, &[2, 2], &[0; 4]));
        assert_err(load_idx_images(&two), "two-dim", "wrong IDX dimensions");
        let zero = write(
            &dir,
            "zero-side",
            &idx_bytes(IDX_IMAGES_MAGIC, &[3, 0, 28], &[]),
        );
        assert_err(load_idx_images(&zero), "zero-side", "zero side");
    }

    #[test]
    fn idx_too_large_and_trailing() {
        let dir = TempDir::new().unwrap();
        let huge = idx_bytes(IDX_IMAGES_MAGIC, &[u32::MAX, 65536, 65536], &[0; 16]);
        let p = write(&dir, "bomb", &huge);
        assert_err(load_idx_images(&p), "bomb", "limit");
        let p = write(&dir, "bomb.gz", &gzip(&huge));
        assert_err(load_idx_images(&p), "bomb.gz", "limit");
        let p = write(
            &dir,
            "extra",
            &idx_bytes(IDX_LABELS_MAGIC, &[2], &[1, 2, 3]),
        );
        assert_err(load_idx_labels(&p), "extra", "1 unexpected byte(s)");
        let p = write(
            &dir,
            "extra.gz",
            &gzip(&idx_bytes(IDX_LABELS_MAGIC, &[2], &[1, 2, 3])),
        );
        assert_err(load_idx_labels(&p), "extra.gz", "unexpected byte(s)");
        let p = write(&dir, "none", &idx_bytes(IDX_LABELS_MAGIC, &[0], &[]));
        assert_err(load_idx_labels(&p), "none", "0 labels");
    }

    #[test]
    fn empty_and_missing_files() {
        let dir = TempDir::new().unwrap();
        let p = write(&dir, "empty-idx", b"");
        assert_err(load_idx_images(&p), "empty-idx", "empty");
        let p = write(&dir, "empty.gz", &gzip(b""));
        assert_err(load_idx_labels(&p), "empty.gz", "0 bytes");
        let missing = dir.path().join("missing.gz");
        assert_err(load_idx_images(&missing), "missing.gz", "cannot read");
    }

    #[test]
    fn label_count_mismatch() {
        let dir = TempDir::new().unwrap();
        let img = write(
            &dir,
            "imgs",
            &idx_bytes(IDX_IMAGES_MAGIC, &[3, 2, 2], &[0; 12]),
        );
        let lab = write(&dir, "labs", &idx_bytes(IDX_LABELS_MAGIC, &[2], &[0, 1]));
        assert_err(load_idx_pair(&img, Some(&lab)), "imgs", "count mismatch");
        assert_err(load_idx_pair(&img, Some(&lab)), "labs", "2 labels");
        assert_eq!(load_idx_pair(&img, None).unwrap().len(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn idx_roundtrip(n in 1u32..6, h in 1u32..5, w in 1u32..5, zip: bool, fill: u8) {
            let dir = TempDir::new().unwrap();
            let pixels: Vec<u8> =
                (0..n * h * w).map(|i| (i as u8).wrapping_mul(31) ^ fill).collect();
            let labels: Vec<u8> = (0..n).map(|i| i as u8 ^ fill).collect();
            let mut img = idx_bytes(IDX_IMAGES_MAGIC, &[n, h, w], &pixels);
            let mut lab = idx_bytes(IDX_LABELS_MAGIC, &[n], &labels);
            if zip {
                img = gzip(&img);
                lab = gzip(&lab);
            }
            let ip = write(&dir, "i", &img);
            let lp = write(&dir, "l", &lab);
            let ds = load_idx_pair(&ip, Some(&lp)).unwrap();
            prop_assert_eq!(ds.shape(), (1, h as usize, w as usize));
            prop_assert_eq!(ds.pixels, pixels);
            prop_assert_eq!(ds.labels, Some(labels));
        }

        #[test]
        fn idx_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let dir = TempDir::new().unwrap();
            let p = write(&dir, "g", &bytes);
            let _ = load_idx_images(&p);
            let _ = load_idx_labels(&p);
        }
    }
}
