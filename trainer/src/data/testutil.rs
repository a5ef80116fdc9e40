//! Helpers shared by the data loaders' unit tests: the repository's sample data, scratch
//! files and error assertions.

use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::{DataError, Dataset};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data");

pub(super) fn data(name: &str) -> PathBuf {
    Path::new(DATA).join(name)
}

pub(super) fn mnist_images() -> PathBuf {
    data("mnist8k-train-images-idx3-ubyte.gz")
}

pub(super) fn mnist_labels() -> PathBuf {
    data("mnist8k-train-labels-idx1-ubyte.gz")
}

pub(super) fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    fs::write(&p, bytes).unwrap();
    p
}

/// Asserts the error message names the file and contains `phrase`.
#[track_caller]
pub(super) fn assert_err<T: std::fmt::Debug>(r: Result<T, DataError>, file: &str, phrase: &str) {
    let msg = r.expect_err("expected an error").to_string();
    assert!(msg.contains(file), "message does not name {file}: {msg}");
    assert!(
        msg.to_lowercase().contains(&phrase.to_lowercase()),
        "message lacks {phrase:?}: {msg}"
    );
}

pub(super) fn tiny(n: usize) -> Dataset {
    Dataset {
        channels: 1,
        height: 2,
        width: 2,
        pixels: (0..n * 4).map(|v| v as u8).collect(),
        labels: Some((0..n).map(|v| v as u8).collect()),
    }
}
