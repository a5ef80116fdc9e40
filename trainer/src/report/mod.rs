//! The run's human-facing outputs: sample grids as PNG, the JSON-lines
//! metrics log, and an SVG loss curve.
//!
//! * [`image_grid`] / [`write_png_grid`] lay out a batch of `N x C x H x W`
//!   `u8` images (grey or RGB, channel-planar) in a padded grid, upscaled by
//!   nearest neighbour so 28x28 digits are visible.
//! * [`MetricsLog`] appends one [`MetricRecord`] per line (JSON lines) to a
//!   log file; [`read_metrics`] reads it back, tolerating a last line cut off
//!   by a crash; [`truncate_after_step`] drops the records after a checkpoint
//!   a run resumes from.
//! * [`loss_curve_svg`] / [`write_loss_svg`] draw bits/dim against step as a
//!   self-contained SVG (no external fonts, CSS or scripts).
//!
//! Every file written here (PNG, SVG, a rewritten log) is written to a
//! temporary name in the same directory and renamed into place, so a crash
//! never leaves a half-written file under the final name. Parent directories
//! are not created.
//!
//! The code is split by output: `grid` (PNG sample grids), `metrics` (the metrics log) and
//! `svg` (the loss curve); this module holds [`ReportError`] and the atomic write they share,
//! and re-exports everything public.

use std::io;
use std::path::{Path, PathBuf};

mod grid;
mod metrics;
mod svg;
#[cfg(test)]
mod testutil;

pub use grid::{image_grid, write_png, write_png_grid, GRID_PAD_COLOUR};
pub use metrics::{read_metrics, truncate_after_step, MetricRecord, MetricsLog};
pub use svg::{loss_curve_svg, write_loss_svg};

/// Everything that can go wrong while writing or reading the run's reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The pixel buffer length does not match the stated image shape.
    #[error(
        "image grid: pixel buffer has {got} bytes but {n} x {channels} x {height} x {width} \
         images need {expected}"
    )]
    Length {
        /// Bytes in the buffer.
        got: usize,
        /// Bytes the shape needs (`n * channels * height * width`).
        expected: usize,
        /// Number of images.
        n: usize,
        /// Channels per image.
        channels: usize,
        /// Image height.
        height: usize,
        /// Image width.
        width: usize,
    },

    /// A size that must be positive was zero.
    #[error("image grid: {what} must be at least 1, got 0")]
    ZeroSize {
        /// Which argument (`n`, `height`, `width`, `cols` or `upscale`).
        what: &'static str,
    },

    /// Only grey (1) and RGB (3) images can be drawn.
    #[error("image grid: unsupported channel count {0} (expected 1 for grey or 3 for RGB)")]
    Channels(usize),

    /// The grid would be too large to allocate or to store in a PNG.
    #[error("image grid: the grid would be {width} x {height} pixels, which is too large")]
    TooLarge {
        /// Grid width in pixels (saturated).
        width: usize,
        /// Grid height in pixels (saturated).
        height: usize,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },

    /// The PNG encoder failed.
    #[error("{}: cannot encode PNG: {source}", .path.display())]
    Encode {
        /// The PNG being written.
        path: PathBuf,
        /// The encoder's error.
        source: image::ImageError,
    },

    /// A metrics record could not be serialised.
    #[error("{}: cannot serialise metrics record: {source}", .path.display())]
    Serialize {
        /// The metrics log.
        path: PathBuf,
        /// The serialiser's error.
        source: serde_json::Error,
    },

    /// A line of the metrics log, other than the last, is not a valid record.
    #[error(
        "{}: line {line}: corrupt metrics record ({source}); fix or delete that line",
        .path.display()
    )]
    Corrupt {
        /// The metrics log.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// The parse error.
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `path` by calling `write` on a temporary file next to it, syncing it
/// and renaming it over `path`. On any error the temporary file is removed and
/// `path` is untouched. Errors name `path`, not the temporary name.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), ReportError>,
) -> Result<(), ReportError> {
    let mut bytes = Vec::new();
    write(&mut bytes)?;
    crate::fsutil::atomic_write(path, &bytes).map_err(io_err(path))
}
