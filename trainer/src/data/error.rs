//! [`DataError`], everything that can go wrong while loading a dataset, with the hints its
//! messages give.

use std::io;
use std::path::PathBuf;

use super::CIFAR_RECORD;

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
        /// Extra bytes after the data (counted up to [`MAX_DATA_BYTES`](super::MAX_DATA_BYTES)).
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
        /// The limit ([`MAX_DATA_BYTES`](super::MAX_DATA_BYTES)).
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

    /// [`Dataset::split_last`](super::Dataset::split_last) was asked for more images than
    /// there are.
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
