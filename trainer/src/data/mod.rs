//! Dataset loading: MNIST-style IDX files (raw or gzipped), CIFAR-10 binary
//! batches and folders of PNG/JPEG pictures (CelebA-style).
//!
//! Every loader returns a [`Dataset`] of 8-bit images stored channel-planar
//! (`N x C x H x W`, like PyTorch's NCHW). Bad input never panics: every
//! problem is a [`DataError`] whose message names the offending file, what is
//! wrong with it and what to do about it.
//!
//! The code is split by source: `idx` (MNIST-style IDX files), `cifar` (CIFAR-10 binary
//! batches), `images` (folders of pictures), `auto` (format detection and the shape check),
//! `shuffle` (the epoch order and its generator), `augment` (mirroring) and `error`
//! ([`DataError`]); everything public is re-exported here.

use std::fs;
use std::path::{Path, PathBuf};

mod augment;
mod auto;
mod cifar;
mod error;
mod idx;
mod images;
mod shuffle;
#[cfg(test)]
mod testutil;

pub use augment::{mirror_images, mirrored};
pub use auto::{check_shape, load_auto};
pub use cifar::{cifar10_batches_in, load_cifar10, load_cifar10_dir};
pub use error::DataError;
pub use idx::{idx_labels_beside, load_idx_images, load_idx_labels, load_idx_pair};
pub use images::{image_files_in, load_image_folder, Crop};
pub use shuffle::epoch_order;

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

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

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
    #[should_panic(expected = "out of range")]
    fn image_index_out_of_range_panics() {
        tiny(2).image(2);
    }
}
