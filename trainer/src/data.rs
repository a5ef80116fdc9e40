//! Dataset loading: MNIST-style IDX files (raw or gzipped), CIFAR-10 binary
//! batches and folders of PNG/JPEG pictures (CelebA-style).
//!
//! Every loader returns a [`Dataset`] of 8-bit images stored channel-planar
//! (`N x C x H x W`, like PyTorch's NCHW). Bad input never panics: every
//! problem is a [`DataError`] whose message names the offending file, what is
//! wrong with it and what to do about it.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageReader};
use rayon::prelude::*;

/// Largest amount of pixel/label data an IDX or CIFAR file may claim (2 GiB);
/// anything larger is treated as a corrupt header or a decompression bomb.
pub const MAX_DATA_BYTES: u64 = 1 << 31;

/// Largest decoded size of one picture of an image folder (512 MiB, the default
/// allocation limit of the `image` crate, which its `into_decoder` path does not apply);
/// a larger header is treated as corrupt or as a decompression bomb.
pub const MAX_PICTURE_BYTES: u64 = 512 << 20;

/// IDX magic number of an unsigned-byte, 3-dimensional (images) file.
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;

/// IDX magic number of an unsigned-byte, 1-dimensional (labels) file.
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Side length of a CIFAR-10 image.
pub const CIFAR_SIDE: usize = 32;

/// Bytes of one CIFAR-10 record: 1 label byte + 3 x 32 x 32 pixel bytes.
pub const CIFAR_RECORD: usize = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE;

/// A set of 8-bit images, stored N x C x H x W row-major (channel-planar,
/// like PyTorch NCHW).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    /// Channels per image (1 = grey, 3 = RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// All pixels, `len() * image_len()` bytes, image after image, each
    /// image channel plane after channel plane, each plane row-major.
    pub pixels: Vec<u8>,
    /// One class label per image, when the source has labels.
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        match self.image_len() {
            0 => 0,
            n => self.pixels.len() / n,
        }
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i` (C x H x W, channel-planar), or `None` when
    /// `i >= len()`.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let n = self.image_len();
        if n == 0 || i >= self.len() {
            return None;
        }
        self.pixels.get(i * n..(i + 1) * n)
    }

    /// The pixels of image `i` (C x H x W, channel-planar).
    ///
    /// # Panics
    ///
    /// Panics when `i >= len()`, like slice indexing; use [`Dataset::get`]
    /// for a checked version.
    pub fn image(&self, i: usize) -> &[u8] {
        match self.get(i) {
            Some(img) => img,
            None => panic!(
                "image index {i} out of range for a dataset of {} images",
                self.len()
            ),
        }
    }

    /// The label of image `i`, when the dataset has labels and `i` is in range.
    pub fn label(&self, i: usize) -> Option<u8> {
        self.labels.as_ref()?.get(i).copied()
    }

    /// Split into (first n - k, last k) — used to keep the last 1,000 images
    /// as the validation split. Labels are split the same way.
    pub fn split_last(self, k: usize) -> Result<(Dataset, Dataset), DataError> {
        let n = self.len();
        if k > n {
            return Err(DataError::Split { len: n, k });
        }
        let cut = (n - k) * self.image_len();
        let mut head = self;
        let tail_pixels = head.pixels.split_off(cut);
        let tail_labels = head.labels.as_mut().map(|l| {
            let at = (n - k).min(l.len());
            l.split_off(at)
        });
        let tail = Dataset {
            channels: head.channels,
            height: head.height,
            width: head.width,
            pixels: tail_pixels,
            labels: tail_labels,
        };
        Ok((head, tail))
    }

    /// Keep only the first `n` images (and labels); no-op when `n >= len()`.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.pixels.truncate(n * self.image_len());
            if let Some(l) = self.labels.as_mut() {
                l.truncate(n);
            }
        }
    }

    /// Pixel-wise shape as `(channels, height, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }
}

/// Everything that can go wrong while loading a dataset. Each message names
/// the file, the problem and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be opened or read.
    #[error("{}: cannot read: {source}; check that the path exists and is readable", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },

    /// A gzip-compressed file could not be decompressed.
    #[error(
        "{}: corrupt or truncated gzip data ({source}); re-download the file \
         (`gzip -t` checks it)",
        .path.display()
    )]
    Gzip {
        /// The compressed file.
        path: PathBuf,
        /// The decompression error.
        source: io::Error,
    },

    /// The file does not start with the expected IDX magic number.
    #[error(
        "{}: wrong IDX magic number 0x{found:08x} (an IDX {what} file starts with \
         0x{expected:08x}); {}",
        .path.display(),
        magic_hint(*.found)
    )]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What the file should hold ("images" or "labels").
        what: &'static str,
        /// The magic number found (first 4 bytes, big-endian).
        found: u32,
        /// The magic number expected.
        expected: u32,
    },

    /// An unsigned-byte IDX file with the wrong number of dimensions.
    #[error(
        "{}: wrong IDX dimensions: the header has {found} dimension(s) but an IDX {what} \
         file has {expected}; {}",
        .path.display(),
        dims_hint(.what, *.found)
    )]
    WrongDims {
        /// The file.
        path: PathBuf,
        /// What the file should hold ("images" or "labels").
        what: &'static str,
        /// Number of dimensions in the header.
        found: u8,
        /// Number of dimensions expected (3 for images, 1 for labels).
        expected: u8,
    },

    /// The file ends inside the IDX header.
    #[error(
        "{}: truncated IDX file: the header needs {needed} bytes but the (decompressed) \
         file holds only {found}; re-download the file",
        .path.display()
    )]
    TruncatedHeader {
        /// The file.
        path: PathBuf,
        /// Header bytes needed.
        needed: u64,
        /// Bytes actually present.
        found: u64,
    },

    /// The file holds less data than its header promises.
    #[error(
        "{}: truncated IDX file: header says {what} ({expected} bytes) but only {found} \
         bytes follow; the download or decompression was cut short, fetch the file again",
        .path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What the header describes, e.g. "8000 images of 28x28".
        what: String,
        /// Data bytes the header promises.
        expected: u64,
        /// Data bytes actually present.
        found: u64,
    },

    /// The file holds more data than its header describes.
    #[error(
        "{}: IDX file has {extra} unexpected byte(s) after the {what} its header describes; \
         the header does not match the data, re-download the file",
        .path.display()
    )]
    TrailingData {
        /// The file.
        path: PathBuf,
        /// What the header describes.
        what: String,
        /// Extra bytes after the data (counted up to [`MAX_DATA_BYTES`]).
        extra: u64,
    },

    /// The header claims an implausibly large amount of data.
    #[error(
        "{}: file claims {what} ({bytes} bytes), over the {limit}-byte limit; the header is \
         corrupt or this is not a dataset file",
        .path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What the header claims.
        what: String,
        /// Claimed size in bytes.
        bytes: u128,
        /// The limit ([`MAX_DATA_BYTES`]).
        limit: u64,
    },

    /// An IDX header that is well-formed but describes unusable data.
    #[error("{}: bad IDX header: {message}", .path.display())]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },

    /// The file or folder holds no images.
    #[error("{}: empty dataset: {reason}", .path.display())]
    Empty {
        /// The file or folder.
        path: PathBuf,
        /// Why it is empty and what to do.
        reason: String,
    },

    /// An image file and a label file disagree on the number of items.
    #[error(
        "{}: image/label count mismatch: {n_images} images but the labels file {} has \
         {n_labels} labels; pass the labels file that belongs to these images \
         (e.g. train-images with train-labels, t10k-images with t10k-labels)",
        .images.display(),
        .labels.display()
    )]
    CountMismatch {
        /// The images file.
        images: PathBuf,
        /// The labels file.
        labels: PathBuf,
        /// Number of images.
        n_images: usize,
        /// Number of labels.
        n_labels: usize,
    },

    /// A CIFAR-10 batch whose size is not a whole number of records.
    #[error(
        "{}: file size {len} bytes is not a multiple of the {record}-byte CIFAR-10 record \
         (1 label byte + 3072 pixel bytes); use the CIFAR-10 binary version \
         (data_batch_N.bin / test_batch.bin) and re-download it if it is truncated",
        .path.display(),
        record = CIFAR_RECORD
    )]
    CifarSize {
        /// The batch file.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },

    /// A CIFAR-10 record with a label outside 0..=9.
    #[error(
        "{}: record {record} has label {label} but CIFAR-10 labels are 0..=9; this is not a \
         CIFAR-10 binary batch (CIFAR-100 uses 3074-byte records and is not supported)",
        .path.display()
    )]
    CifarLabel {
        /// The batch file.
        path: PathBuf,
        /// Index of the record within the file.
        record: usize,
        /// The label byte found.
        label: u8,
    },

    /// A picture could not be decoded.
    #[error("{}: cannot decode image: {message}; replace or remove the file", .path.display())]
    Image {
        /// The picture.
        path: PathBuf,
        /// The decoder's complaint.
        message: String,
    },

    /// The dataset's image shape differs from what the model expects.
    #[error(
        "{}: wrong shape: dataset images are {}x{}x{} (channels x height x width) but the \
         model expects {}x{}x{}; use a dataset with that shape or build the model for \
         {}x{}x{}",
        .path.display(),
        .found.0, .found.1, .found.2,
        .expected.0, .expected.1, .expected.2,
        .found.0, .found.1, .found.2
    )]
    WrongShape {
        /// Where the dataset came from.
        path: PathBuf,
        /// The dataset's (channels, height, width).
        found: (usize, usize, usize),
        /// The model's (channels, height, width).
        expected: (usize, usize, usize),
    },

    /// Invalid loader options (channels, target size, crop settings).
    #[error("{}: invalid options: {message}", .path.display())]
    Config {
        /// The file or folder being loaded.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },

    /// No input files were given.
    #[error("no {what} files given; {hint}")]
    NoFiles {
        /// What kind of files were expected.
        what: &'static str,
        /// What to do.
        hint: &'static str,
    },

    /// [`Dataset::split_last`] was asked for more images than there are.
    #[error(
        "cannot hold out the last {k} images for validation: the dataset has only {len} \
         images; use a smaller validation split or a larger dataset"
    )]
    Split {
        /// Images in the dataset.
        len: usize,
        /// Images requested for the held-out part.
        k: usize,
    },
}

fn magic_hint(found: u32) -> String {
    if found >> 16 != 0 {
        "this is not an IDX file; pass an MNIST-style *-idx3-ubyte / *-idx1-ubyte file \
         (gzipped or not)"
            .to_string()
    } else {
        let ty = (found >> 8) & 0xff;
        format!(
            "IDX data type 0x{ty:02x} is not supported, only unsigned bytes (0x08); \
             convert the file to u8"
        )
    }
}

fn dims_hint(what: &str, found: u8) -> &'static str {
    match (what, found) {
        ("images", 1) => {
            "this looks like a labels file; pass the images file (*-images-idx3-ubyte) here"
        }
        ("labels", 3) => {
            "this looks like an images file; pass the labels file (*-labels-idx1-ubyte) here"
        }
        _ => "check that this is an MNIST-style IDX file of the right kind",
    }
}

// ---------------------------------------------------------------------------
// IDX
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// CIFAR-10
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------

/// How to fit an image folder's pictures to the target size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Crop {
    /// Resize so the picture just covers the target (its short side becomes
    /// the target side), then take the centre. One image per picture.
    Center,
    /// `per_image` random crops of the target size from each picture after
    /// resizing its short side to `scale_to` pixels, deterministic from
    /// `seed` (independent of thread scheduling).
    Random {
        /// Crops taken from each picture.
        per_image: usize,
        /// Short side after resizing; at least the target's short side.
        scale_to: u32,
        /// Seed for the crop positions.
        seed: u64,
    },
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io_err = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err)? {
        out.push(entry.map_err(io_err)?.path());
    }
    out.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(out)
}

fn has_ext(path: &Path, exts: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

const IMAGE_EXTS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The pictures of a folder: every `*.png`, `*.jpg`, `*.jpeg` file
/// (case-insensitive), non-recursive, sorted by file name.
pub fn image_files_in(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    Ok(read_dir_sorted(dir)?
        .into_iter()
        .filter(|p| has_ext(p, &IMAGE_EXTS) && p.is_file())
        .collect())
}

fn decode_image(path: &Path) -> Result<DynamicImage, DataError> {
    let image_err = |e: image::ImageError| DataError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut decoder = reader.into_decoder().map_err(image_err)?;
    // Checked before anything is allocated: a few bytes of header can claim gigabytes.
    if decoder.total_bytes() > MAX_PICTURE_BYTES {
        let (w, h) = decoder.dimensions();
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!(
                "the picture claims {w}x{h} pixels ({} bytes decoded), over the {} MiB limit \
                 per picture (a corrupt header or a decompression bomb?); shrink it",
                decoder.total_bytes(),
                MAX_PICTURE_BYTES >> 20
            ),
        });
    }
    let orientation = decoder.orientation().map_err(image_err)?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(image_err)?;
    img.apply_orientation(orientation);
    if img.width() == 0 || img.height() == 0 {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!("the picture is {}x{} pixels", img.width(), img.height()),
        });
    }
    Ok(img)
}

/// Size after scaling `(w, h)` so that it covers `(tw, th)` and its short
/// side is at least `short`.
fn cover_size(w: u32, h: u32, tw: u32, th: u32, short: u32) -> (u32, u32) {
    let (wf, hf) = (f64::from(w), f64::from(h));
    let s = (f64::from(tw) / wf)
        .max(f64::from(th) / hf)
        .max(f64::from(short) / wf.min(hf));
    let nw = ((wf * s).round() as u32).max(tw);
    let nh = ((hf * s).round() as u32).max(th);
    (nw, nh)
}

/// A decoded picture, converted and resized, ready to be cropped.
enum Fitted {
    Grey(image::GrayImage),
    Rgb(image::RgbImage),
}

impl Fitted {
    /// Copy the `tw x th` window at `(x, y)` into `slot`, channel-planar.
    fn crop_into(&self, slot: &mut [u8], x: u32, y: u32, tw: u32, th: u32) {
        match self {
            Fitted::Grey(grey) => {
                let sub = imageops::crop_imm(grey, x, y, tw, th).to_image();
                slot.copy_from_slice(sub.as_raw());
            }
            Fitted::Rgb(rgb) => {
                let plane = tw as usize * th as usize;
                let sub = imageops::crop_imm(rgb, x, y, tw, th).to_image();
                for (p, px) in sub.as_raw().chunks_exact(3).enumerate() {
                    slot[p] = px[0];
                    slot[plane + p] = px[1];
                    slot[2 * plane + p] = px[2];
                }
            }
        }
    }
}

/// Decode one picture and write its `crops` fitted images into `out`
/// (C x H x W each, back to back).
fn fit_picture(
    path: &Path,
    index: usize,
    channels: usize,
    tw: u32,
    th: u32,
    crop: &Crop,
    out: &mut [u8],
) -> Result<(), DataError> {
    let img = decode_image(path)?;
    let short = match crop {
        Crop::Center => 0,
        Crop::Random { scale_to, .. } => *scale_to,
    };
    let (nw, nh) = cover_size(img.width(), img.height(), tw, th, short);
    let same = (nw, nh) == (img.width(), img.height());
    // A very thin picture scaled to cover the target is enormous (1 x 2^20 pixels covering
    // 32x32 becomes 32 x 2^25): refuse before resizing. `imageops::resize` first resamples
    // vertically into an RGBA f32 buffer (16 bytes a pixel) of width x new height.
    let resized = u64::from(nw)
        .saturating_mul(u64::from(nh))
        .saturating_mul(channels as u64);
    let temp = u64::from(img.width())
        .saturating_mul(u64::from(nh))
        .saturating_mul(16);
    if !same && resized.max(temp) > MAX_PICTURE_BYTES {
        return Err(DataError::Image {
            path: path.to_path_buf(),
            message: format!(
                "fitting the {}x{} picture to {tw}x{th} needs a {nw}x{nh} resize, over the \
                 {} MiB limit per picture (an extreme aspect ratio?); crop or remove it",
                img.width(),
                img.height(),
                MAX_PICTURE_BYTES >> 20
            ),
        });
    }
    let plane = tw as usize * th as usize;
    // Convert first so resizing works on 8-bit channels only.
    let fitted = if channels == 1 {
        let grey = img.to_luma8();
        Fitted::Grey(if same {
            grey
        } else {
            imageops::resize(&grey, nw, nh, FilterType::Triangle)
        })
    } else {
        let rgb = img.to_rgb8();
        Fitted::Rgb(if same {
            rgb
        } else {
            imageops::resize(&rgb, nw, nh, FilterType::Triangle)
        })
    };
    let write = |slot: &mut [u8], x: u32, y: u32| fitted.crop_into(slot, x, y, tw, th);
    let img_len = channels * plane;
    match crop {
        Crop::Center => write(out, (nw - tw) / 2, (nh - th) / 2),
        Crop::Random { seed, .. } => {
            let mut rng = SplitMix64::new(mix(*seed, index as u64));
            for slot in out.chunks_exact_mut(img_len) {
                let x = rng.below(u64::from(nw - tw) + 1) as u32;
                let y = rng.below(u64::from(nh - th) + 1) as u32;
                write(slot, x, y);
            }
        }
    }
    Ok(())
}

/// A folder of PNG/JPEG images (CelebA-style): every `*.png`/`*.jpg`/`*.jpeg`
/// (case-insensitive, sorted by name, non-recursive), converted to `channels`
/// (1 = luma grey, 3 = RGB; alpha is dropped), fitted to `height x width` by
/// `crop` (resizing with a triangle filter). Unreadable or corrupt files are
/// an error naming the file; a folder with no pictures is
/// [`DataError::Empty`]. Decodes in parallel with rayon; the result does not
/// depend on the number of threads. No labels.
pub fn load_image_folder(
    dir: &Path,
    channels: usize,
    height: usize,
    width: usize,
    crop: &Crop,
) -> Result<Dataset, DataError> {
    let cfg = |message: String| DataError::Config {
        path: dir.to_path_buf(),
        message,
    };
    if channels != 1 && channels != 3 {
        return Err(cfg(format!(
            "channels must be 1 (grey) or 3 (RGB), got {channels}"
        )));
    }
    let side = |v: usize, name: &str| -> Result<u32, DataError> {
        match u32::try_from(v) {
            Ok(s) if (1..=1 << 16).contains(&s) => Ok(s),
            _ => Err(cfg(format!(
                "image {name} must be between 1 and 65536 pixels, got {v}"
            ))),
        }
    };
    let th = side(height, "height")?;
    let tw = side(width, "width")?;
    let per_picture = match crop {
        Crop::Center => 1,
        Crop::Random {
            per_image,
            scale_to,
            ..
        } => {
            if *per_image == 0 {
                return Err(cfg(
                    "Crop::Random per_image is 0; ask for at least one crop per picture"
                        .to_string(),
                ));
            }
            if *scale_to > 1 << 14 {
                return Err(cfg(format!(
                    "Crop::Random scale_to {scale_to} is over 16384 pixels; \
                     use a smaller value (a little above the target size)"
                )));
            }
            if *scale_to < tw.min(th) {
                return Err(cfg(format!(
                    "Crop::Random scale_to {scale_to} is smaller than the {height}x{width} \
                     target; use scale_to >= {}",
                    tw.min(th)
                )));
            }
            *per_image
        }
    };

    let files = image_files_in(dir)?;
    if files.is_empty() {
        return Err(DataError::Empty {
            path: dir.to_path_buf(),
            reason: "no images (*.png, *.jpg, *.jpeg) in this folder; point at the folder \
                     that directly holds the pictures"
                .to_string(),
        });
    }
    let img_len = channels * height * width;
    let chunk = per_picture
        .checked_mul(img_len)
        .filter(|c| c.checked_mul(files.len()).is_some())
        .ok_or_else(|| {
            cfg(format!(
                "{} pictures x {per_picture} crops of {channels}x{height}x{width} do not fit \
                 in memory; use fewer crops or a smaller size",
                files.len()
            ))
        })?;
    let mut pixels = vec![0u8; chunk * files.len()];
    let results: Vec<Result<(), DataError>> = pixels
        .par_chunks_mut(chunk)
        .zip(files.par_iter())
        .enumerate()
        .map(|(i, (out, path))| fit_picture(path, i, channels, tw, th, crop, out))
        .collect();
    if let Some(err) = results.into_iter().find_map(Result::err) {
        return Err(err);
    }
    Ok(Dataset {
        channels,
        height,
        width,
        pixels,
        labels: None,
    })
}

// ---------------------------------------------------------------------------
// Auto-detection, shape check, epoch order
// ---------------------------------------------------------------------------

/// Load whatever `path` is, then [`check_shape`] it against
/// `channels x height x width`:
///
/// * a directory holding CIFAR-10 batches (`*.bin`, or a
///   `cifar-10-batches-bin` subfolder) -> [`load_cifar10_dir`];
/// * a directory holding pictures -> [`load_image_folder`] with `crop`;
/// * a directory holding exactly one `*images-idx3*` file -> that IDX file;
/// * a `*.bin` file that is not IDX -> a single CIFAR-10 batch;
/// * any other file -> IDX images, with the labels beside it when the name
///   contains `images-idx3` and the matching `labels-idx1` file exists.
pub fn load_auto(
    path: &Path,
    channels: usize,
    height: usize,
    width: usize,
    crop: &Crop,
) -> Result<Dataset, DataError> {
    let meta = fs::metadata(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let ds = if meta.is_dir() {
        let entries = read_dir_sorted(path)?;
        let has_bin = entries.iter().any(|p| has_ext(p, &["bin"]) && p.is_file());
        if has_bin || path.join("cifar-10-batches-bin").is_dir() {
            load_cifar10_dir(path)?
        } else if entries
            .iter()
            .any(|p| has_ext(p, &IMAGE_EXTS) && p.is_file())
        {
            load_image_folder(path, channels, height, width, crop)?
        } else {
            let idx: Vec<&PathBuf> = entries
                .iter()
                .filter(|p| {
                    p.is_file()
                        && p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.contains("images-idx3") || n.contains("images.idx3"))
                })
                .collect();
            match idx.as_slice() {
                [one] => load_idx_pair(one, idx_labels_beside(one).as_deref())?,
                [] => {
                    return Err(DataError::Empty {
                        path: path.to_path_buf(),
                        reason: "no CIFAR-10 *.bin batches, no *.png/*.jpg/*.jpeg pictures and \
                                 no *-images-idx3-ubyte file in this directory; point at a \
                                 dataset file or folder"
                            .to_string(),
                    })
                }
                many => {
                    let names: Vec<String> = many
                        .iter()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .collect();
                    return Err(DataError::Config {
                        path: path.to_path_buf(),
                        message: format!(
                            "the directory holds several IDX image files ({}); pass the one \
                             to use",
                            names.join(", ")
                        ),
                    });
                }
            }
        }
    } else if has_ext(path, &["bin"]) && !looks_like_idx(path) {
        load_cifar10(&[path.to_path_buf()])?
    } else if has_ext(path, &IMAGE_EXTS) {
        return Err(DataError::Config {
            path: path.to_path_buf(),
            message: "this is a single picture; pass the folder that holds the pictures"
                .to_string(),
        });
    } else {
        load_idx_pair(path, idx_labels_beside(path).as_deref())?
    };
    check_shape(&ds, channels, height, width, path)?;
    Ok(ds)
}

/// Whether a file starts (after gunzip) with an unsigned-byte IDX magic.
fn looks_like_idx(path: &Path) -> bool {
    Input::open(path)
        .and_then(|mut i| i.read_up_to(4))
        .is_ok_and(|h| h.len() == 4 && h[0] == 0 && h[1] == 0 && h[2] == 0x08)
}

/// Check that a dataset matches the shape a model expects; the error names
/// both shapes and what to do.
pub fn check_shape(
    ds: &Dataset,
    channels: usize,
    height: usize,
    width: usize,
    source: &Path,
) -> Result<(), DataError> {
    let expected = (channels, height, width);
    if ds.shape() == expected {
        Ok(())
    } else {
        Err(DataError::WrongShape {
            path: source.to_path_buf(),
            found: ds.shape(),
            expected,
        })
    }
}

/// A shuffled order of `0..n` for one epoch, deterministic from `seed` and
/// `epoch` (its own SplitMix64 generator, so it never changes with library
/// versions). Cut it into mini-batches with `chunks(batch_size)`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(mix(mix(seed, epoch), 0x6570_6f63_6873_6866));
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// Combine two values into one well-mixed seed.
fn mix(a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17));
    r.next_u64()
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast and good enough for
/// shuffling and crop positions.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (Lemire's unbiased multiply-shift); `bound > 0`.
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use proptest::prelude::*;
    use std::io::Write;
    use tempfile::TempDir;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data");

    fn data(name: &str) -> PathBuf {
        Path::new(DATA).join(name)
    }

    fn mnist_images() -> PathBuf {
        data("mnist8k-train-images-idx3-ubyte.gz")
    }

    fn mnist_labels() -> PathBuf {
        data("mnist8k-train-labels-idx1-ubyte.gz")
    }

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

    fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        fs::write(&p, bytes).unwrap();
        p
    }

    /// Asserts the error message names the file and contains `phrase`.
    #[track_caller]
    fn assert_err<T: std::fmt::Debug>(r: Result<T, DataError>, file: &str, phrase: &str) {
        let msg = r.expect_err("expected an error").to_string();
        assert!(msg.contains(file), "message does not name {file}: {msg}");
        assert!(
            msg.to_lowercase().contains(&phrase.to_lowercase()),
            "message lacks {phrase:?}: {msg}"
        );
    }

    fn photo_random(seed: u64) -> Dataset {
        let crop = Crop::Random {
            per_image: 3,
            scale_to: 40,
            seed,
        };
        load_image_folder(&data("photos"), 3, 32, 32, &crop).unwrap()
    }

    fn tiny(n: usize) -> Dataset {
        Dataset {
            channels: 1,
            height: 2,
            width: 2,
            pixels: (0..n * 4).map(|v| v as u8).collect(),
            labels: Some((0..n).map(|v| v as u8).collect()),
        }
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
    fn split_and_truncate() {
        let ds = load_idx_pair(&mnist_images(), Some(&mnist_labels())).unwrap();
        let last = ds.image(7999).to_vec();
        let last_label = ds.label(7999);
        let (train, val) = ds.clone().split_last(1000).unwrap();
        assert_eq!((train.len(), val.len()), (7000, 1000));
        assert_eq!(train.labels.as_ref().unwrap().len(), 7000);
        assert_eq!(val.labels.as_ref().unwrap().len(), 1000);
        assert_eq!(val.image(999), &last[..]);
        assert_eq!(val.label(999), last_label);
        assert_eq!(train.image(0), ds.image(0));
        assert!(val.get(1000).is_none());

        let (all, none) = tiny(3).split_last(0).unwrap();
        assert_eq!((all.len(), none.len()), (3, 0));
        assert!(none.is_empty());
        let msg = tiny(3).split_last(4).unwrap_err().to_string();
        assert!(msg.contains("only 3 images"), "{msg}");

        let mut t = tiny(5);
        t.truncate(2);
        assert_eq!((t.len(), t.labels.as_ref().unwrap().len()), (2, 2));
        t.truncate(10);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get(2), None);
        assert_eq!(t.get(1), Some(&[4u8, 5, 6, 7][..]));
    }

    #[test]
    fn photos_random_crop_count_and_determinism() {
        let a = photo_random(7);
        assert_eq!((a.len(), a.shape()), (15, (3, 32, 32)));
        assert!(a.labels.is_none());
        assert_eq!(a, photo_random(7));
        assert_ne!(a.pixels, photo_random(8).pixels);
        // Crops of one picture differ from each other.
        assert_ne!(a.image(0), a.image(1));
    }

    #[test]
    fn photos_center_crop() {
        let rgb = load_image_folder(&data("photos"), 3, 24, 32, &Crop::Center).unwrap();
        assert_eq!((rgb.len(), rgb.shape()), (5, (3, 24, 32)));
        let grey = load_image_folder(&data("photos"), 1, 16, 16, &Crop::Center).unwrap();
        assert_eq!((grey.len(), grey.shape()), (5, (1, 16, 16)));
        // Not all black: the pictures really were decoded.
        assert!(grey.pixels.iter().map(|&p| p as u64).sum::<u64>() > 5 * 256 * 20);
    }

    #[test]
    fn center_crop_takes_the_middle_and_planes_are_rgb() {
        // 90x20 picture: left third red, middle green, right third blue.
        // Scaled to 36x8, the centre 8x8 comes from source columns 35..55.
        let dir = TempDir::new().unwrap();
        let img = image::RgbImage::from_fn(90, 20, |x, _| match x / 30 {
            0 => image::Rgb([255, 0, 0]),
            1 => image::Rgb([0, 255, 0]),
            _ => image::Rgb([0, 0, 255]),
        });
        img.save(dir.path().join("stripes.PNG")).unwrap();
        let ds = load_image_folder(dir.path(), 3, 8, 8, &Crop::Center).unwrap();
        assert_eq!((ds.len(), ds.shape()), (1, (3, 8, 8)));
        let im = ds.image(0);
        assert!(
            im[..64].iter().all(|&r| r < 10),
            "red plane {:?}",
            &im[..64]
        );
        assert!(im[64..128].iter().all(|&g| g > 245), "green plane");
        assert!(im[128..].iter().all(|&b| b < 10), "blue plane");
        let grey = load_image_folder(dir.path(), 1, 8, 8, &Crop::Center).unwrap();
        // Rec. 709 luma of pure green is about 0.7152 * 255 = 182.
        assert!(grey.pixels.iter().all(|&v| (170..195).contains(&v)));
    }

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
    fn auto_detects_mnist_with_labels_and_photo_folder() {
        let ds = load_auto(&mnist_images(), 1, 28, 28, &Crop::Center).unwrap();
        assert_eq!(ds.len(), 8000);
        assert!(
            ds.labels.is_some(),
            "labels beside the images were not found"
        );
        assert_err(
            load_auto(&mnist_images(), 3, 32, 32, &Crop::Center),
            "mnist8k-train-images-idx3-ubyte.gz",
            "1x28x28",
        );
        let photos = load_auto(&data("photos"), 1, 8, 8, &Crop::Center).unwrap();
        assert_eq!((photos.len(), photos.shape()), (5, (1, 8, 8)));
        assert_err(
            load_auto(&data("photos/coffee.png"), 3, 8, 8, &Crop::Center),
            "coffee.png",
            "single picture",
        );
        let empty = TempDir::new().unwrap();
        assert_err(
            load_auto(empty.path(), 1, 8, 8, &Crop::Center),
            &empty.path().display().to_string(),
            "empty",
        );
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

    #[test]
    fn corrupt_png_named() {
        let dir = TempDir::new().unwrap();
        let noise: Vec<u8> = (0..500u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        write(&dir, "x.png", &noise);
        assert_err(
            load_image_folder(dir.path(), 3, 8, 8, &Crop::Center),
            "x.png",
            "cannot decode",
        );
        // A PNG with a valid signature but cut short.
        let other = TempDir::new().unwrap();
        let mut png = Vec::new();
        image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]))
            .write_to(&mut io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        write(&other, "a_good.png", &png);
        write(&other, "b_cut.png", &png[..png.len() / 2]);
        assert_err(
            load_image_folder(other.path(), 3, 8, 8, &Crop::Center),
            "b_cut.png",
            "decode",
        );
    }

    #[test]
    fn empty_image_folder_and_bad_options() {
        let dir = TempDir::new().unwrap();
        write(&dir, "notes.txt", b"no pictures here");
        let name = dir.path().display().to_string();
        assert_err(
            load_image_folder(dir.path(), 3, 8, 8, &Crop::Center),
            &name,
            "no images",
        );
        assert_err(
            load_image_folder(dir.path(), 3, 8, 8, &Crop::Center),
            &name,
            "empty",
        );
        let photos = data("photos");
        assert_err(
            load_image_folder(&photos, 2, 8, 8, &Crop::Center),
            "photos",
            "channels must be 1",
        );
        assert_err(
            load_image_folder(&photos, 3, 0, 8, &Crop::Center),
            "photos",
            "height",
        );
        let crop = Crop::Random {
            per_image: 1,
            scale_to: 16,
            seed: 0,
        };
        assert_err(
            load_image_folder(&photos, 3, 32, 32, &crop),
            "photos",
            "scale_to",
        );
        let missing = dir.path().join("nope");
        assert_err(
            load_image_folder(&missing, 3, 8, 8, &Crop::Center),
            "nope",
            "cannot read",
        );
    }

    #[test]
    fn check_shape_reports_both_shapes() {
        let ds = tiny(2);
        assert!(check_shape(&ds, 1, 2, 2, Path::new("t.idx")).is_ok());
        assert_err(
            check_shape(&ds, 3, 32, 32, Path::new("t.idx")),
            "t.idx",
            "1x2x2",
        );
        assert_err(
            check_shape(&ds, 3, 32, 32, Path::new("t.idx")),
            "t.idx",
            "3x32x32",
        );
    }

    #[test]
    fn epoch_order_is_deterministic_permutation() {
        let a = epoch_order(1000, 1, 0);
        assert_eq!(a, epoch_order(1000, 1, 0));
        assert_ne!(a, epoch_order(1000, 1, 1));
        assert_ne!(a, epoch_order(1000, 2, 0));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert!(epoch_order(0, 1, 0).is_empty());
        assert_eq!(epoch_order(1, 1, 0), vec![0]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn image_index_out_of_range_panics() {
        tiny(2).image(2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn epoch_order_permutes(n in 0usize..300, seed: u64, epoch in 0u64..5) {
            let mut o = epoch_order(n, seed, epoch);
            o.sort_unstable();
            prop_assert_eq!(o, (0..n).collect::<Vec<_>>());
        }

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
