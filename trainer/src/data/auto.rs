//! Loading whatever a path holds (IDX, CIFAR-10 or a picture folder) and checking the
//! dataset's shape against the model's.

use std::fs;
use std::path::{Path, PathBuf};

use super::cifar::{load_cifar10, load_cifar10_dir};
use super::idx::{idx_labels_beside, load_idx_pair, looks_like_idx};
use super::images::{load_image_folder, Crop, IMAGE_EXTS};
use super::{has_ext, read_dir_sorted, DataError, Dataset};

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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use tempfile::TempDir;

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
}
