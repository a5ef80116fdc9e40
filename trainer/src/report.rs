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

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

// ---------------------------------------------------------------------------
// Atomic writes
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Image grids
// ---------------------------------------------------------------------------

/// Colour of the border between and around the images in a grid.
pub const GRID_PAD_COLOUR: [u8; 3] = [64, 64, 64];

/// Lays out `n` images stored `N x C x H x W` (channel-planar `u8`) in a grid.
///
/// `channels` is 1 (grey, drawn as equal R, G and B) or 3 (RGB planes).
/// Images are placed row-major with `cols` columns (clamped to `n`, so a
/// short batch does not leave a wide empty strip), each upscaled by
/// nearest neighbour by the factor `upscale`, with `pad` pixels of dark grey
/// ([`GRID_PAD_COLOUR`]) between and around them. Unused cells in the last
/// row are dark grey too.
///
/// Image `k` has its top-left pixel at
/// `x = pad + (k % cols) * (width * upscale + pad)`,
/// `y = pad + (k / cols) * (height * upscale + pad)`.
///
/// Errors: [`ReportError::Length`] if `pixels.len() != n * channels * height *
/// width`, [`ReportError::ZeroSize`] if `n`, `height`, `width`, `cols` or
/// `upscale` is zero, [`ReportError::Channels`] for a channel count other
/// than 1 or 3, [`ReportError::TooLarge`] if the grid does not fit a PNG.
#[allow(clippy::too_many_arguments)]
pub fn image_grid(
    pixels: &[u8],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    cols: usize,
    pad: usize,
    upscale: usize,
) -> Result<image::RgbImage, ReportError> {
    if channels != 1 && channels != 3 {
        return Err(ReportError::Channels(channels));
    }
    for (what, v) in [
        ("n", n),
        ("height", height),
        ("width", width),
        ("cols", cols),
        ("upscale", upscale),
    ] {
        if v == 0 {
            return Err(ReportError::ZeroSize { what });
        }
    }
    let expected = n
        .checked_mul(channels)
        .and_then(|v| v.checked_mul(height))
        .and_then(|v| v.checked_mul(width));
    if expected != Some(pixels.len()) {
        return Err(ReportError::Length {
            got: pixels.len(),
            expected: expected.unwrap_or(usize::MAX),
            n,
            channels,
            height,
            width,
        });
    }

    let cols = cols.min(n);
    let rows = n.div_ceil(cols);
    // cell = upscaled image plus the pad to its right / below it.
    let dims = (|| {
        let cell_w = width.checked_mul(upscale)?.checked_add(pad)?;
        let cell_h = height.checked_mul(upscale)?.checked_add(pad)?;
        let grid_w = cols.checked_mul(cell_w)?.checked_add(pad)?;
        let grid_h = rows.checked_mul(cell_h)?.checked_add(pad)?;
        Some((cell_w, cell_h, grid_w, grid_h))
    })();
    let too_large = || ReportError::TooLarge {
        width: cols
            .saturating_mul(width.saturating_mul(upscale).saturating_add(pad))
            .saturating_add(pad),
        height: rows
            .saturating_mul(height.saturating_mul(upscale).saturating_add(pad))
            .saturating_add(pad),
    };
    let (cell_w, cell_h, grid_w, grid_h) = dims.ok_or_else(too_large)?;
    let (Ok(gw32), Ok(gh32)) = (u32::try_from(grid_w), u32::try_from(grid_h)) else {
        return Err(too_large());
    };
    let stride = grid_w.checked_mul(3).ok_or_else(too_large)?;
    let total = stride.checked_mul(grid_h).ok_or_else(too_large)?;
    // Refuse absurd allocations (> 1 GiB) instead of aborting on OOM.
    if total > 1 << 30 {
        return Err(too_large());
    }

    let mut buf = Vec::with_capacity(total);
    for _ in 0..grid_w * grid_h {
        buf.extend_from_slice(&GRID_PAD_COLOUR);
    }

    let plane = height * width;
    let row_bytes = width * upscale * 3;
    let mut line = vec![0u8; row_bytes];
    for k in 0..n {
        let img = &pixels[k * channels * plane..(k + 1) * channels * plane];
        let x0 = pad + (k % cols) * cell_w;
        let y0 = pad + (k / cols) * cell_h;
        for y in 0..height {
            // Build one upscaled output row, then copy it `upscale` times.
            for x in 0..width {
                let src = y * width + x;
                let rgb = if channels == 1 {
                    [img[src]; 3]
                } else {
                    [img[src], img[plane + src], img[2 * plane + src]]
                };
                for dx in 0..upscale {
                    let o = (x * upscale + dx) * 3;
                    line[o..o + 3].copy_from_slice(&rgb);
                }
            }
            for dy in 0..upscale {
                let off = (y0 + y * upscale + dy) * stride + x0 * 3;
                buf[off..off + row_bytes].copy_from_slice(&line);
            }
        }
    }
    image::RgbImage::from_raw(gw32, gh32, buf).ok_or_else(too_large)
}

/// Writes an RGB image as a PNG, atomically (temporary file + rename).
pub fn write_png(path: impl AsRef<Path>, img: &image::RgbImage) -> Result<(), ReportError> {
    use image::ImageEncoder as _;
    let path = path.as_ref();
    write_atomic(path, |w| {
        image::codecs::png::PngEncoder::new(w)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|source| ReportError::Encode {
                path: path.to_path_buf(),
                source,
            })
    })
}

/// [`image_grid`] followed by [`write_png`]: writes the grid as a PNG at
/// `path`, atomically, so a crash never leaves a half-written PNG.
#[allow(clippy::too_many_arguments)]
pub fn write_png_grid(
    path: impl AsRef<Path>,
    pixels: &[u8],
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    cols: usize,
    pad: usize,
    upscale: usize,
) -> Result<(), ReportError> {
    let img = image_grid(pixels, n, channels, height, width, cols, pad, upscale)?;
    write_png(path, &img)
}

// ---------------------------------------------------------------------------
// Metrics log
// ---------------------------------------------------------------------------

/// One line of the metrics log.
///
/// Serialised as one JSON object per line; `None` fields are omitted.
/// Non-finite floats (a diverged loss) are written as the strings `"NaN"`,
/// `"inf"` and `"-inf"` and read back as such, so a log line is always valid
/// JSON and a NaN loss is not silently turned into "no value".
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MetricRecord {
    /// Optimiser steps taken so far.
    pub step: u64,
    /// Epoch (0-based) the step belongs to.
    pub epoch: u64,
    /// Training loss in bits per dimension (usually a running mean since the
    /// previous record).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "float_repr::ser_opt",
        deserialize_with = "float_repr::de_opt"
    )]
    pub train_bpd: Option<f64>,
    /// Validation loss in bits per dimension.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "float_repr::ser_opt",
        deserialize_with = "float_repr::de_opt"
    )]
    pub val_bpd: Option<f64>,
    /// Training throughput.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "float_repr::ser_opt",
        deserialize_with = "float_repr::de_opt"
    )]
    pub images_per_sec: Option<f64>,
    /// Learning rate in effect.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "float_repr::ser_opt",
        deserialize_with = "float_repr::de_opt"
    )]
    pub lr: Option<f64>,
    /// Wall-clock seconds since the run started.
    #[serde(
        serialize_with = "float_repr::ser",
        deserialize_with = "float_repr::de"
    )]
    pub elapsed_secs: f64,
    /// A free-text event ("resumed from step 4000", "checkpoint saved", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

impl MetricRecord {
    /// A record with only `step`, `epoch` and `elapsed_secs` set; fill in the
    /// rest with struct update syntax or field assignment.
    pub fn new(step: u64, epoch: u64, elapsed_secs: f64) -> Self {
        MetricRecord {
            step,
            epoch,
            elapsed_secs,
            ..MetricRecord::default()
        }
    }
}

/// JSON representation of floats that keeps NaN and infinities
/// (`serde_json` would write them as `null`).
mod float_repr {
    use serde::de::{self, Deserializer, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub fn ser<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn ser_opt<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => ser(x, s),
            None => s.serialize_none(),
        }
    }

    struct FloatVisitor;

    impl<'de> Visitor<'de> for FloatVisitor {
        type Value = Option<f64>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a number, null, or one of \"NaN\", \"inf\", \"-inf\"")
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v as f64))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v {
                "NaN" | "nan" => Ok(Some(f64::NAN)),
                "inf" | "+inf" | "Infinity" | "+Infinity" => Ok(Some(f64::INFINITY)),
                "-inf" | "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }

    /// `null` reads as NaN (it is what plain `serde_json` writes for NaN).
    pub fn de<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(d.deserialize_any(FloatVisitor)?.unwrap_or(f64::NAN))
    }

    pub fn de_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        d.deserialize_any(FloatVisitor)
    }
}

/// An append-only JSON-lines metrics log.
///
/// Each [`append`](MetricsLog::append) writes one complete line with a single
/// `write` call straight to the file (no user-space buffering), so a crash
/// loses at most the line being written.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending, creating it if needed (the parent directory
    /// must exist).
    ///
    /// If an earlier run crashed mid-write and left an unparsable last line,
    /// that line is cut off first, so new records do not get glued onto it
    /// (which would turn it into a corrupt line in the middle of the log). A
    /// valid last line that merely lacks its newline gets one.
    ///
    /// If the run resumes from a checkpoint older than the log's tail, call
    /// [`truncate_after_step`] *before* opening the log.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReportError> {
        let path = path.as_ref();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        let bytes = {
            let mut b = Vec::new();
            io::Read::read_to_end(&mut file, &mut b).map_err(io_err(path))?;
            b
        };
        if let Some((start, line)) = last_nonblank_line(&bytes) {
            if serde_json::from_slice::<MetricRecord>(line).is_err() {
                file.set_len(start as u64).map_err(io_err(path))?;
            } else if bytes.last() != Some(&b'\n') {
                io::Seek::seek(&mut file, io::SeekFrom::End(0)).map_err(io_err(path))?;
                file.write_all(b"\n").map_err(io_err(path))?;
            }
        }
        drop(file);
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `record` as one JSON line and flushes it to the OS.
    pub fn append(&mut self, record: &MetricRecord) -> Result<(), ReportError> {
        let mut line = serde_json::to_vec(record).map_err(|source| ReportError::Serialize {
            path: self.path.clone(),
            source,
        })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }

    /// Forces the log's contents to disk (`fsync`); optional, e.g. next to a
    /// checkpoint save.
    pub fn sync(&mut self) -> Result<(), ReportError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn is_blank(line: &[u8]) -> bool {
    // NUL bytes: what a filesystem may leave in a block allocated but never
    // written before a crash.
    line.iter().all(|b| b.is_ascii_whitespace() || *b == 0)
}

/// The byte offset and contents (without newline) of the last non-blank line.
fn last_nonblank_line(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut end = bytes.len();
    loop {
        let start = bytes[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let line = &bytes[start..end];
        if !is_blank(line) {
            return Some((start, line));
        }
        if start == 0 {
            return None;
        }
        end = start - 1;
    }
}

/// Parses a metrics log held in memory: `(raw line, record)` for each
/// record. An unparsable last non-blank line is taken to be
/// a write cut off by a crash and ignored; any other unparsable line is an
/// error. Blank lines are skipped.
fn parse_log<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<Vec<(&'a [u8], MetricRecord)>, ReportError> {
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let last = lines.iter().rposition(|l| !is_blank(l));
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if is_blank(line) {
            continue;
        }
        match serde_json::from_slice::<MetricRecord>(line) {
            Ok(r) => out.push((*line, r)),
            Err(_) if Some(i) == last => {}
            Err(source) => {
                return Err(ReportError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    source,
                })
            }
        }
    }
    Ok(out)
}

/// Reads every record of a metrics log written by [`MetricsLog`].
///
/// A last line that does not parse (a crash mid-write) is ignored; an
/// unparsable line anywhere else is [`ReportError::Corrupt`], naming its line
/// number. A missing file is an [`ReportError::Io`] error.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<MetricRecord>, ReportError> {
    let path = path.as_ref();
    let bytes = fs::read(path).map_err(io_err(path))?;
    Ok(parse_log(path, &bytes)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// Rewrites the metrics log at `path` keeping only the records with
/// `record.step <= step`, for a run that resumes from a checkpoint taken at
/// `step` (older than the log's tail). Returns how many records were kept.
///
/// Kept lines are copied byte for byte; a cut-off last line is dropped. The
/// rewrite is atomic (temporary file + rename); a corrupt line in the middle
/// is an error and leaves the file untouched. A missing file is not an error
/// (nothing to truncate; returns 0). Call this before [`MetricsLog::open`]:
/// an already open log keeps appending to the replaced file.
pub fn truncate_after_step(path: impl AsRef<Path>, step: u64) -> Result<usize, ReportError> {
    let path = path.as_ref();
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(path)(e)),
    };
    let kept: Vec<&[u8]> = parse_log(path, &bytes)?
        .into_iter()
        .filter(|(_, r)| r.step <= step)
        .map(|(line, _)| line)
        .collect();
    write_atomic(path, |w| {
        for line in &kept {
            w.write_all(line).map_err(io_err(path))?;
            w.write_all(b"\n").map_err(io_err(path))?;
        }
        Ok(())
    })?;
    Ok(kept.len())
}

// ---------------------------------------------------------------------------
// Loss curve (SVG)
// ---------------------------------------------------------------------------

const SVG_W: f64 = 800.0;
const SVG_H: f64 = 480.0;
const PLOT_LEFT: f64 = 74.0;
const PLOT_RIGHT: f64 = 24.0;
const PLOT_TOP: f64 = 62.0;
const PLOT_BOTTOM: f64 = 56.0;

const COLOUR_TRAIN_RAW: &str = "#a6c8e6";
const COLOUR_TRAIN_EMA: &str = "#1f5fa8";
const COLOUR_VAL: &str = "#d9480f";
const COLOUR_AXIS: &str = "#333333";
const COLOUR_GRID: &str = "#e6e6e6";
const COLOUR_TEXT: &str = "#222222";

/// Escapes text for use in XML character data and attribute values.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Control characters other than tab/newline are not allowed in XML 1.0.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' && c != '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// About `target` "nice" tick values (1, 2 or 5 times a power of ten apart)
/// within `[lo, hi]`, and their spacing, which is at least `min_step`.
fn nice_ticks(lo: f64, hi: f64, target: usize, min_step: f64) -> (Vec<f64>, f64) {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return (vec![lo], 1.0);
    }
    let rough = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(rough.log10().floor());
    let norm = rough / mag;
    // Thresholds at the geometric midpoints between 1, 2, 5 and 10.
    let step = mag
        * if norm < std::f64::consts::SQRT_2 {
            1.0
        } else if norm < 10f64.sqrt() {
            2.0
        } else if norm < 50f64.sqrt() {
            5.0
        } else {
            10.0
        };
    let step = step.max(min_step);
    let first = (lo / step - 1e-9).ceil();
    let mut ticks = Vec::new();
    for i in 0..100 {
        let v = (first + i as f64) * step;
        if v > hi + step * 1e-9 {
            break;
        }
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
    }
    (ticks, step)
}

/// Decimal places that distinguish ticks `step` apart.
fn decimals_for(step: f64) -> usize {
    (-(step.log10() + 1e-9).floor()).clamp(0.0, 8.0) as usize
}

/// Tick label for the step axis: `500`, `2k`, `12.5k`, `1.5M`. The suffix
/// is chosen from the axis' largest value `max` so all labels agree.
fn format_step_tick(v: f64, step: f64, max: f64) -> String {
    let (div, suffix) = if max >= 1e7 {
        (1e6, "M")
    } else if max >= 1e4 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    if v == 0.0 {
        return "0".to_string();
    }
    format!("{:.*}{suffix}", decimals_for(step / div), v / div)
}

/// Smallest number of training points that get a smoothed curve.
const EMA_MIN_POINTS: usize = 10;

/// Zero-phase exponential moving average of a series' values: an EMA run
/// forward, then backward over the result, so the smoothed curve does not lag
/// behind the fast initial drop of the loss. Each pass starts at its first
/// value. The span adapts to the series length (about 1/60 of the points, at
/// least 3), so the curve looks similar for short and long runs.
fn ema(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let span = (points.len() as f64 / 60.0).max(3.0);
    let alpha = 2.0 / (span + 1.0);
    let pass = |ys: &mut dyn Iterator<Item = &mut f64>| {
        let mut acc: Option<f64> = None;
        for y in ys {
            let v = acc.map_or(*y, |a| a + alpha * (*y - a));
            acc = Some(v);
            *y = v;
        }
    };
    let mut ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    pass(&mut ys.iter_mut());
    pass(&mut ys.iter_mut().rev());
    points.iter().zip(ys).map(|(p, y)| (p.0, y)).collect()
}

/// Keeps, per pixel column, the first, lowest, highest and last points (in
/// their original order), so a long series stays small without losing spikes.
fn decimate(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let col = points[i].0.floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < points.len() && points[j].0.floor() == col {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        let mut keep = [i, lo, hi, j - 1];
        keep.sort_unstable();
        let mut prev = None;
        for k in keep {
            if prev != Some(k) {
                out.push(points[k]);
                prev = Some(k);
            }
        }
        i = j;
    }
    out
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let idx = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The y range to show: from the minimum to the 98th percentile of the
/// points, leaving out the first 2% of the training points (the huge
/// values at initialisation), plus a 6% margin. Points above the range are
/// clipped at the top of the plot.
fn y_range(train: &[(f64, f64)], val: &[(f64, f64)]) -> (f64, f64) {
    let skip = if train.len() >= 10 {
        (train.len() as f64 * 0.02).ceil() as usize
    } else {
        0
    };
    let mut ys: Vec<f64> = train[skip..].iter().chain(val).map(|p| p.1).collect();
    ys.sort_by(f64::total_cmp);
    let lo = ys[0];
    let mut hi = percentile(&ys, 0.98);
    // Always show the latest values, even if the run blew up at the end.
    for s in [train, val] {
        if let Some(&(_, y)) = s.last() {
            hi = hi.max(y);
        }
    }
    let (mut lo, mut hi) = (lo, hi);
    if hi - lo < 1e-9 * lo.abs().max(1.0) {
        let d = (lo.abs() * 0.05).max(0.01);
        lo -= d;
        hi += d;
    }
    let m = (hi - lo) * 0.06;
    (lo - m, hi + m)
}

fn x_range(train: &[(f64, f64)], val: &[(f64, f64)]) -> (f64, f64) {
    let xs = train.iter().chain(val).map(|p| p.0);
    let lo = xs.clone().fold(f64::INFINITY, f64::min);
    let hi = xs.fold(f64::NEG_INFINITY, f64::max);
    if hi > lo {
        (lo, hi)
    } else {
        let d = (lo.abs() * 0.05).max(1.0);
        ((lo - d).max(0.0), hi + d)
    }
}

fn polyline(out: &mut String, points: &[(f64, f64)], colour: &str, width: f64) {
    let _ = write!(
        out,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="{width}" stroke-linejoin="round" stroke-linecap="round" points=""#
    );
    for (i, (x, y)) in points.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{x:.1},{y:.1}");
    }
    out.push_str("\"/>\n");
}

/// Renders the loss curve of a run as a self-contained 800x480 SVG.
///
/// x is the step, y bits/dim. Draws the training series as a thin light line
/// plus its exponential moving average as a thicker darker one, and the
/// validation series as a line with markers; nice axis ticks (1/2/5 x 10^k),
/// axis titles, a legend, `title` (XML-escaped) and, in the top-right corner,
/// the final (and best) validation bits/dim. The y range is robust to the
/// huge losses at initialisation: it spans the minimum to the 98th percentile
/// of the values (leaving out the first 2% of the training points), extended
/// to include the latest values, so early points may run off the top. The
/// smoothed curve is computed from values capped just above that range, so a
/// single spike shows in the raw line without bending the trend.
///
/// Non-finite values are skipped, records are ordered by step, and with no
/// finite point at all the SVG is a frame saying "no data yet". Event records
/// (`event: Some(..)`) appear as small ticks under the x axis whose tooltip is
/// the event text.
pub fn loss_curve_svg(records: &[MetricRecord], title: &str) -> String {
    let mut sorted: Vec<&MetricRecord> = records.iter().collect();
    sorted.sort_by_key(|r| r.step);
    let series = |f: fn(&MetricRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        sorted
            .iter()
            .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.step as f64, v)))
            .collect()
    };
    let train = series(|r| r.train_bpd);
    let val = series(|r| r.val_bpd);

    let pw = SVG_W - PLOT_LEFT - PLOT_RIGHT;
    let ph = SVG_H - PLOT_TOP - PLOT_BOTTOM;
    let (left, top, bottom) = (PLOT_LEFT, PLOT_TOP, PLOT_TOP + ph);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" viewBox="0 0 {SVG_W} {SVG_H}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(title));
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="30" text-anchor="middle" font-size="17" font-weight="bold" fill="{COLOUR_TEXT}">{}</text>"#,
        SVG_W / 2.0,
        xml_escape(title)
    );

    if train.is_empty() && val.is_empty() {
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="{COLOUR_AXIS}"/>"#
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="16" fill="#888888">no data yet</text>"##,
            left + pw / 2.0,
            top + ph / 2.0
        );
        s.push_str("</svg>\n");
        return s;
    }

    let (x0, x1) = x_range(&train, &val);
    let (y0, y1) = y_range(&train, &val);
    // Clamp far-off-plot coordinates so renderers never see astronomically
    // large numbers; the clip path hides them anyway.
    let px = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| (bottom - (y - y0) / (y1 - y0) * ph).clamp(-10.0 * SVG_H, 11.0 * SVG_H);
    let to_px = |pts: &[(f64, f64)]| -> Vec<(f64, f64)> {
        pts.iter().map(|&(x, y)| (px(x), py(y))).collect()
    };

    let _ = writeln!(
        s,
        r#"<defs><clipPath id="clayflow-plot-area"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath></defs>"#
    );

    // Grid lines and tick labels.
    let (xticks, xstep) = nice_ticks(x0, x1, 6, 1.0);
    let (yticks, ystep) = nice_ticks(y0, y1, 5, 0.0);
    let ydec = decimals_for(ystep);
    s.push_str("<g>\n");
    for &t in &xticks {
        let x = px(t);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="{COLOUR_GRID}"/><line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" stroke="{COLOUR_AXIS}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="{COLOUR_TEXT}">{}</text>"#,
            bottom + 5.0,
            bottom + 19.0,
            format_step_tick(t, xstep, x1.abs().max(x0.abs()))
        );
    }
    for &t in &yticks {
        let y = py(t);
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{COLOUR_GRID}"/><line x1="{:.1}" y1="{y:.1}" x2="{left}" y2="{y:.1}" stroke="{COLOUR_AXIS}"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="{COLOUR_TEXT}">{t:.ydec$}</text>"#,
            left + pw,
            left - 5.0,
            left - 8.0,
            y + 4.0,
        );
    }
    s.push_str("</g>\n");
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="{COLOUR_AXIS}"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13" fill="{COLOUR_TEXT}">step</text>"#,
        left + pw / 2.0,
        SVG_H - 14.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle" font-size="13" fill="{COLOUR_TEXT}">bits/dim</text>"#,
        top + ph / 2.0
    );

    // Series lines, clipped to the plot area. Markers are drawn afterwards,
    // unclipped (so a point on the plot's edge shows whole) but only when
    // their centre lies inside the plot.
    let many = |n: usize| n as f64 > 2.0 * pw;
    let _ = writeln!(s, r#"<g clip-path="url(#clayflow-plot-area)">"#);
    let mut legend: Vec<(&str, &str, f64, bool)> = Vec::new();
    let mut markers = String::new();
    let inside = |&(x, y): &(f64, f64)| {
        (left - 0.5..=left + pw + 0.5).contains(&x) && (top - 0.5..=bottom + 0.5).contains(&y)
    };
    if !train.is_empty() {
        let raw = to_px(&train);
        let raw = if many(raw.len()) { decimate(&raw) } else { raw };
        if train.len() >= EMA_MIN_POINTS {
            polyline(&mut s, &raw, COLOUR_TRAIN_RAW, 1.0);
            legend.push(("train", COLOUR_TRAIN_RAW, 1.5, false));
            // Smooth values capped a little above the visible range, so one
            // huge spike (shown by the raw line) does not bend the trend.
            let cap = y1 + 0.25 * (y1 - y0);
            let capped: Vec<(f64, f64)> = train.iter().map(|&(x, y)| (x, y.min(cap))).collect();
            let smooth = to_px(&ema(&capped));
            let smooth = if many(smooth.len()) {
                decimate(&smooth)
            } else {
                smooth
            };
            polyline(&mut s, &smooth, COLOUR_TRAIN_EMA, 2.2);
            legend.push(("train (EMA)", COLOUR_TRAIN_EMA, 2.5, false));
        } else {
            // Too few points to smooth: draw them plainly, with markers.
            polyline(&mut s, &raw, COLOUR_TRAIN_EMA, 1.8);
            for (x, y) in raw.iter().filter(|p| inside(p)) {
                let _ = writeln!(
                    markers,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{COLOUR_TRAIN_EMA}"/>"#
                );
            }
            legend.push(("train", COLOUR_TRAIN_EMA, 1.8, true));
        }
    }
    if !val.is_empty() {
        let pts = to_px(&val);
        let pts = if many(pts.len()) { decimate(&pts) } else { pts };
        polyline(&mut s, &pts, COLOUR_VAL, 1.8);
        if pts.len() <= 150 {
            for (x, y) in pts.iter().filter(|p| inside(p)) {
                let _ = writeln!(
                    markers,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.2" fill="white" stroke="{COLOUR_VAL}" stroke-width="1.8"/>"#
                );
            }
        }
        legend.push(("validation", COLOUR_VAL, 1.8, true));
    }
    s.push_str("</g>\n");
    s.push_str(&markers);

    // Event marks under the x axis.
    for r in &sorted {
        if let Some(ev) = &r.event {
            let x = r.step as f64;
            if x < x0 || x > x1 {
                continue;
            }
            let x = px(x);
            let _ = writeln!(
                s,
                r##"<path d="M{x:.1} {:.1} l-4 7 h8 z" fill="#7a7a7a"><title>step {}: {}</title></path>"##,
                bottom + 1.0,
                r.step,
                xml_escape(ev)
            );
        }
    }

    // Legend, top right inside the plot (loss curves fall to the right).
    let lw = 128.0;
    let lh = 10.0 + 18.0 * legend.len() as f64;
    let lx = left + pw - lw - 10.0;
    let ly = top + 10.0;
    let _ = writeln!(
        s,
        r##"<rect x="{lx:.1}" y="{ly:.1}" width="{lw}" height="{lh}" fill="white" fill-opacity="0.9" stroke="#bbbbbb" rx="3"/>"##
    );
    for (i, (label, colour, width, marker)) in legend.iter().enumerate() {
        let y = ly + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="{width}"/>"#,
            lx + 10.0,
            lx + 38.0
        );
        if *marker {
            let fill = if *colour == COLOUR_VAL {
                "white"
            } else {
                colour
            };
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{y:.1}" r="3.2" fill="{fill}" stroke="{colour}" stroke-width="1.8"/>"#,
                lx + 24.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{COLOUR_TEXT}">{label}</text>"#,
            lx + 46.0,
            y + 4.0
        );
    }

    // Final numbers, top right above the plot.
    let summary = if let Some(&(step, last)) = val.last() {
        let best = val.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let mut t = format!("final val: {last:.4} bits/dim (step {})", step as u64);
        if best < last {
            let _ = write!(t, " \u{b7} best {best:.4}");
        }
        t
    } else {
        let &(step, last) = train.last().expect("train or val is non-empty");
        format!(
            "no validation yet \u{b7} train: {last:.4} bits/dim (step {})",
            step as u64
        )
    };
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="13" fill="{COLOUR_TEXT}">{}</text>"#,
        left + pw,
        top - 10.0,
        xml_escape(&summary)
    );
    s.push_str("</svg>\n");
    s
}

/// Writes [`loss_curve_svg`] to `path`, atomically (temporary file + rename).
pub fn write_loss_svg(
    path: impl AsRef<Path>,
    records: &[MetricRecord],
    title: &str,
) -> Result<(), ReportError> {
    let path = path.as_ref();
    let svg = loss_curve_svg(records, title);
    write_atomic(path, |w| w.write_all(svg.as_bytes()).map_err(io_err(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: [u8; 3] = GRID_PAD_COLOUR;

    fn px(img: &image::RgbImage, x: usize, y: usize) -> [u8; 3] {
        img.get_pixel(x as u32, y as u32).0
    }

    // ---- image grid ----

    #[test]
    fn grid_dimensions() {
        // 5 grey 2x3 images (h=2, w=3), 2 columns, pad 1, upscale 4.
        let pixels = vec![0u8; 5 * 2 * 3];
        let img = image_grid(&pixels, 5, 1, 2, 3, 2, 1, 4).unwrap();
        // width: 2 cells of 3*4 + 3 pads; height: 3 rows of 2*4 + 4 pads.
        assert_eq!(img.dimensions(), (2 * 12 + 3, 3 * 8 + 4));
        // Columns clamp to n.
        let img = image_grid(&pixels, 5, 1, 2, 3, 100, 0, 1).unwrap();
        assert_eq!(img.dimensions(), (15, 2));
    }

    #[test]
    fn grey_pixel_placement_upscaled_and_padded() {
        let (n, h, w, cols, pad, up) = (5, 4, 3, 2, 2, 3);
        let mut pixels = vec![0u8; n * h * w];
        // Image k has value 10 + k at (y=1, x=2) and 200 elsewhere on row 3.
        for k in 0..n {
            pixels[k * h * w + w + 2] = 10 + k as u8;
            for x in 0..w {
                pixels[k * h * w + 3 * w + x] = 200;
            }
        }
        let img = image_grid(&pixels, n, 1, h, w, cols, pad, up).unwrap();
        for k in 0..n {
            let x0 = pad + (k % cols) * (w * up + pad);
            let y0 = pad + (k / cols) * (h * up + pad);
            let v = 10 + k as u8;
            for dy in 0..up {
                for dx in 0..up {
                    assert_eq!(
                        px(&img, x0 + 2 * up + dx, y0 + up + dy),
                        [v; 3],
                        "image {k}"
                    );
                }
            }
            // Neighbouring source pixels are 0 and the blocks do not bleed.
            assert_eq!(px(&img, x0 + 2 * up - 1, y0 + up), [0; 3]);
            assert_eq!(px(&img, x0 + 2 * up, y0 + up - 1), [0; 3]);
            assert_eq!(px(&img, x0 + 2 * up, y0 + 2 * up), [0; 3]);
            // The image's top-left corner is image content, the pixel before it is pad.
            assert_eq!(px(&img, x0, y0), [0; 3]);
            assert_eq!(px(&img, x0 - 1, y0), PAD);
            assert_eq!(px(&img, x0, y0 - 1), PAD);
            // Last upscaled row is the source row 3.
            assert_eq!(px(&img, x0 + w * up - 1, y0 + h * up - 1), [200; 3]);
            assert_eq!(px(&img, x0 + w * up, y0 + h * up - 1), PAD);
            assert_eq!(px(&img, x0, y0 + h * up), PAD);
        }
        // The unused cell (row 2, col 1) is all pad.
        let x0 = pad + (w * up + pad);
        let y0 = pad + 2 * (h * up + pad);
        for y in y0..y0 + h * up {
            for x in x0..x0 + w * up {
                assert_eq!(px(&img, x, y), PAD);
            }
        }
        // Outer border.
        assert_eq!(px(&img, 0, 0), PAD);
        let (gw, gh) = img.dimensions();
        assert_eq!(px(&img, gw as usize - 1, gh as usize - 1), PAD);
    }

    #[test]
    fn rgb_planes_land_in_channels() {
        let (n, h, w) = (2, 2, 2);
        let plane = h * w;
        let mut pixels = vec![0u8; n * 3 * plane];
        for k in 0..n {
            let base = k * 3 * plane;
            // (y=1, x=0): R = 11+k, G = 22+k, B = 33+k.
            pixels[base + 2] = 11 + k as u8;
            pixels[base + plane + 2] = 22 + k as u8;
            pixels[base + 2 * plane + 2] = 33 + k as u8;
            // (y=0, x=1): pure green.
            pixels[base + plane + 1] = 255;
        }
        let (pad, up) = (1, 2);
        let img = image_grid(&pixels, n, 3, h, w, 2, pad, up).unwrap();
        for k in 0..n {
            let x0 = pad + k * (w * up + pad);
            let y0 = pad;
            let k8 = k as u8;
            assert_eq!(px(&img, x0 + 1, y0 + 3), [11 + k8, 22 + k8, 33 + k8]);
            assert_eq!(px(&img, x0 + 2, y0), [0, 255, 0]);
            assert_eq!(px(&img, x0 + 3, y0 + 1), [0, 255, 0]);
            assert_eq!(px(&img, x0, y0), [0, 0, 0]);
        }
    }

    #[test]
    fn grid_errors() {
        let p = vec![0u8; 2 * 3 * 4];
        assert!(matches!(
            image_grid(&p, 2, 1, 3, 2, 2, 1, 1),
            Err(ReportError::Length {
                got: 24,
                expected: 12,
                ..
            })
        ));
        assert!(matches!(
            image_grid(&p[..23], 2, 3, 1, 4, 2, 1, 1),
            Err(ReportError::Length {
                got: 23,
                expected: 24,
                ..
            })
        ));
        assert!(matches!(
            image_grid(&p, 2, 2, 3, 2, 2, 1, 1),
            Err(ReportError::Channels(2))
        ));
        assert!(matches!(
            image_grid(&p, 1, 4, 3, 2, 2, 1, 1),
            Err(ReportError::Channels(4))
        ));
        for (args, what) in [
            ((0, 3, 4, 2, 1), "n"),
            ((2, 0, 4, 2, 1), "height"),
            ((2, 3, 0, 2, 1), "width"),
            ((2, 3, 4, 0, 1), "cols"),
            ((2, 3, 4, 2, 0), "upscale"),
        ] {
            let (n, h, w, c, u) = args;
            match image_grid(&[], n, 1, h, w, c, 0, u) {
                Err(ReportError::ZeroSize { what: got }) => assert_eq!(got, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(matches!(
            image_grid(&[0; 1], 1, 1, 1, 1, 1, usize::MAX, 1),
            Err(ReportError::TooLarge { .. })
        ));
        assert!(matches!(
            image_grid(&[0; 1], 1, 1, 1, 1, 1, 0, 1 << 20),
            Err(ReportError::TooLarge { .. })
        ));
        let msg = image_grid(&p, 2, 1, 3, 2, 2, 1, 1).unwrap_err().to_string();
        assert!(msg.contains("24") && msg.contains("12"), "{msg}");
    }

    #[test]
    fn png_written_atomically_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("samples.png");
        let (n, h, w) = (6, 28, 28);
        let pixels: Vec<u8> = (0..n * h * w).map(|i| (i % 251) as u8).collect();
        write_png_grid(&path, &pixels, n, 1, h, w, 4, 2, 3).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (4 * (84 + 2) + 2, 2 * (84 + 2) + 2));
        let expect = image_grid(&pixels, n, 1, h, w, 4, 2, 3).unwrap();
        assert_eq!(img, expect);
        // Overwrite works and leaves no temporary files behind.
        write_png_grid(&path, &pixels, n, 1, h, w, 3, 0, 1).unwrap();
        assert_eq!(image::open(&path).unwrap().width(), 3 * 28);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn png_io_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("grid.png");
        let err = write_png_grid(&path, &[1, 2, 3, 4], 1, 1, 2, 2, 1, 1, 1).unwrap_err();
        assert!(matches!(err, ReportError::Io { .. }));
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        // Bad arguments fail before touching the file system.
        let path = dir.path().join("bad.png");
        assert!(write_png_grid(&path, &[1, 2, 3], 1, 1, 2, 2, 1, 1, 1).is_err());
        assert!(!path.exists());
    }

    // ---- metrics log ----

    fn sample_records() -> Vec<MetricRecord> {
        vec![
            MetricRecord {
                event: Some("start".into()),
                ..MetricRecord::new(0, 0, 0.0)
            },
            MetricRecord {
                train_bpd: Some(5.25),
                images_per_sec: Some(1234.5),
                lr: Some(1e-3),
                ..MetricRecord::new(100, 0, 12.5)
            },
            MetricRecord {
                train_bpd: Some(2.0),
                val_bpd: Some(2.125),
                ..MetricRecord::new(200, 1, 25.0)
            },
            MetricRecord {
                train_bpd: Some(1.5),
                lr: Some(5e-4),
                event: Some("say \"hi\"\nnewline".into()),
                ..MetricRecord::new(300, 1, 37.5)
            },
        ]
    }

    fn write_log(path: &Path, records: &[MetricRecord]) {
        let mut log = MetricsLog::open(path).unwrap();
        for r in records {
            log.append(r).unwrap();
        }
    }

    #[test]
    fn metrics_round_trip_and_append_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let recs = sample_records();
        write_log(&path, &recs[..2]);
        // Reopening appends rather than truncating.
        write_log(&path, &recs[2..]);
        assert_eq!(read_metrics(&path).unwrap(), recs);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with('\n'));
        // None fields are skipped.
        let first = text.lines().next().unwrap();
        assert!(
            !first.contains("train_bpd") && !first.contains("null"),
            "{first}"
        );
    }

    #[test]
    fn non_finite_values_survive_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let rec = MetricRecord {
            train_bpd: Some(f64::NAN),
            val_bpd: Some(f64::INFINITY),
            lr: Some(f64::NEG_INFINITY),
            ..MetricRecord::new(7, 0, 1.0)
        };
        write_log(&path, &[rec]);
        let back = read_metrics(&path).unwrap();
        assert!(back[0].train_bpd.unwrap().is_nan());
        assert_eq!(back[0].val_bpd, Some(f64::INFINITY));
        assert_eq!(back[0].lr, Some(f64::NEG_INFINITY));
        // Plain JSON nulls and integers are accepted too.
        let r: MetricRecord = serde_json::from_str(
            r#"{"step":1,"epoch":0,"train_bpd":null,"val_bpd":3,"elapsed_secs":2}"#,
        )
        .unwrap();
        assert_eq!(r.train_bpd, None);
        assert_eq!(r.val_bpd, Some(3.0));
        assert_eq!(r.elapsed_secs, 2.0);
    }

    #[test]
    fn truncated_last_line_is_ignored_and_repaired_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let recs = sample_records();
        write_log(&path, &recs[..3]);
        let full = serde_json::to_string(&recs[3]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(f);
        assert_eq!(read_metrics(&path).unwrap(), recs[..3]);

        // Reopening cuts the partial line off so new records stay readable.
        write_log(&path, &recs[3..]);
        assert_eq!(read_metrics(&path).unwrap(), recs);

        // A complete last line that only lacks its newline is kept.
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.trim_end()).unwrap();
        assert_eq!(read_metrics(&path).unwrap(), recs);
        write_log(&path, &recs[..1]);
        assert_eq!(read_metrics(&path).unwrap().len(), 5);

        // Trailing NULs (crash after allocation) and blank lines are tolerated.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"\n\n{\"step\":9,\"ep\0\0\0\0").unwrap();
        drop(f);
        assert_eq!(read_metrics(&path).unwrap().len(), 5);
    }

    #[test]
    fn corrupt_middle_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let recs = sample_records();
        let mut text = String::new();
        for (i, r) in recs.iter().enumerate() {
            if i == 2 {
                text.push_str("{\"step\": oops}\n");
            }
            text.push_str(&serde_json::to_string(r).unwrap());
            text.push('\n');
        }
        fs::write(&path, &text).unwrap();
        let err = read_metrics(&path).unwrap_err();
        assert!(
            matches!(err, ReportError::Corrupt { line: 3, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("line 3") && msg.contains("m.jsonl"), "{msg}");
        // truncate_after_step refuses to rewrite a corrupt log and leaves it alone.
        assert!(truncate_after_step(&path, 1000).is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn read_missing_file_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.jsonl");
        let err = read_metrics(&path).unwrap_err();
        assert!(matches!(err, ReportError::Io { .. }));
        assert!(err.to_string().contains("absent.jsonl"));
        assert_eq!(truncate_after_step(&path, 5).unwrap(), 0);
        assert!(!path.exists());
    }

    #[test]
    fn truncate_after_step_keeps_early_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let recs = sample_records();
        write_log(&path, &recs);
        // Add a cut-off tail too.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\":40").unwrap();
        drop(f);

        assert_eq!(truncate_after_step(&path, 200).unwrap(), 3);
        assert_eq!(read_metrics(&path).unwrap(), recs[..3]);
        assert!(fs::read_to_string(&path).unwrap().ends_with("}\n"));
        // Idempotent, and appending afterwards continues the log.
        assert_eq!(truncate_after_step(&path, 200).unwrap(), 3);
        write_log(&path, &recs[3..]);
        assert_eq!(read_metrics(&path).unwrap(), recs);
        assert_eq!(truncate_after_step(&path, 99).unwrap(), 1);
        assert_eq!(read_metrics(&path).unwrap(), recs[..1]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    // ---- SVG ----

    /// Checks the shape of an SVG: well-formed ends, escaped title, no NaN,
    /// balanced-looking tags.
    fn check_svg(svg: &str, title_escaped: &str) {
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(title_escaped), "title missing: {svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
        // Every open tag is self-closed or closed.
        for tag in ["text", "g", "title", "defs", "clipPath", "path"] {
            let open =
                svg.matches(&format!("<{tag}>")).count() + svg.matches(&format!("<{tag} ")).count();
            let selfclosed = svg
                .split(&format!("<{tag} "))
                .skip(1)
                .filter(|rest| {
                    let end = rest.find('>').unwrap();
                    rest[..end].ends_with('/')
                })
                .count();
            let close = svg.matches(&format!("</{tag}>")).count();
            assert_eq!(open - selfclosed, close, "<{tag}> unbalanced in {svg}");
        }
        // Attribute values never contain raw quotes / ampersands.
        for (i, _) in svg.match_indices('&') {
            let rest = &svg[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| rest.starts_with(e)),
                "bare & at {i}"
            );
        }
    }

    fn synthetic(n: u64) -> Vec<MetricRecord> {
        let mut seed = 12345u64;
        let mut noise = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        let mut out = Vec::new();
        for i in 0..n {
            let step = i * 10;
            let t = step as f64;
            let bpd = 1.05 + 7.0 * (-t / 150.0).exp() + 0.6 * (-t / 3000.0).exp() + 0.04 * noise();
            let mut r = MetricRecord {
                train_bpd: Some(bpd),
                lr: Some(1e-3),
                ..MetricRecord::new(step, step / 2000, t * 0.05)
            };
            if i % 100 == 99 {
                r.val_bpd = Some(1.08 + 0.62 * (-t / 3000.0).exp());
            }
            if i == 600 {
                r.event = Some("resumed from step 6000".into());
            }
            out.push(r);
        }
        out
    }

    #[test]
    fn svg_normal_data() {
        let recs = synthetic(1000);
        let title = "MNIST <realnvp> & \"friends\"";
        let svg = loss_curve_svg(&recs, title);
        check_svg(&svg, "MNIST &lt;realnvp&gt; &amp; &quot;friends&quot;");
        // Raw train, EMA, validation.
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        for needle in ["step", "bits/dim", "train (EMA)", "validation", "final val"] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        // The final validation value is reported.
        let last_val = recs.iter().rev().find_map(|r| r.val_bpd).unwrap();
        assert!(svg.contains(&format!("{last_val:.4}")));
    }

    #[test]
    fn svg_empty_and_single_point() {
        let svg = loss_curve_svg(&[], "empty run");
        check_svg(&svg, "empty run");
        assert!(svg.contains("no data yet"));

        // Records with no loss values (only events) are also "no data".
        let svg = loss_curve_svg(&sample_records()[..1], "events only");
        check_svg(&svg, "events only");
        assert!(svg.contains("no data yet"));

        let one = [MetricRecord {
            train_bpd: Some(3.5),
            ..MetricRecord::new(0, 0, 0.0)
        }];
        let svg = loss_curve_svg(&one, "one");
        check_svg(&svg, "one");
        assert!(svg.contains("<polyline") && svg.contains("<circle"));
        assert!(!svg.contains("no data yet"));

        let one_val = [MetricRecord {
            val_bpd: Some(2.0),
            ..MetricRecord::new(50, 0, 1.0)
        }];
        let svg = loss_curve_svg(&one_val, "one val");
        check_svg(&svg, "one val");
        assert!(svg.contains("<polyline") && svg.contains("2.0000"));
    }

    #[test]
    fn svg_skips_non_finite_values() {
        let mut recs = synthetic(50);
        recs[10].train_bpd = Some(f64::NAN);
        recs[20].train_bpd = Some(f64::INFINITY);
        recs[30].train_bpd = Some(f64::NEG_INFINITY);
        recs[49].val_bpd = Some(f64::NAN);
        recs[40].val_bpd = Some(1.5);
        let svg = loss_curve_svg(&recs, "nan run");
        check_svg(&svg, "nan run");
        assert_eq!(svg.matches("<polyline").count(), 3);
        // The NaN final validation is skipped: the reported value is 1.5.
        assert!(svg.contains("final val: 1.5000"), "{svg}");

        // All values non-finite: no data.
        let bad: Vec<_> = (0..5)
            .map(|i| MetricRecord {
                train_bpd: Some(f64::NAN),
                val_bpd: Some(f64::INFINITY),
                ..MetricRecord::new(i, 0, 0.0)
            })
            .collect();
        let svg = loss_curve_svg(&bad, "all bad");
        check_svg(&svg, "all bad");
        assert!(svg.contains("no data yet"));
    }

    #[test]
    fn svg_long_run_is_decimated_and_extreme_values_are_clamped() {
        let mut recs = synthetic(50_000);
        recs[30_000].train_bpd = Some(1e300);
        let svg = loss_curve_svg(&recs, "long");
        check_svg(&svg, "long");
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
        assert!(!svg.contains("e+") && !svg.contains("e3"));
    }

    #[test]
    fn nice_ticks_are_nice() {
        let (t, step) = nice_ticks(0.0, 10_000.0, 6, 1.0);
        assert_eq!(step, 2000.0);
        assert_eq!(t, vec![0.0, 2000.0, 4000.0, 6000.0, 8000.0, 10_000.0]);
        let (t, step) = nice_ticks(1.213, 1.287, 5, 0.0);
        assert!((step - 0.02).abs() < 1e-12, "{step}");
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|v| (1.213..=1.287).contains(v)));
        assert_eq!(decimals_for(step), 2);
        assert_eq!(format_step_tick(12_500.0, 500.0, 14_000.0), "12.5k");
        assert_eq!(format_step_tick(4_000.0, 2_000.0, 14_000.0), "4k");
        assert_eq!(format_step_tick(4_000.0, 1_000.0, 5_000.0), "4000");
        assert_eq!(format_step_tick(2_000_000.0, 1_000_000.0, 1e7), "2M");
        assert_eq!(format_step_tick(2_500_000.0, 500_000.0, 1e7), "2.5M");
        assert_eq!(format_step_tick(150.0, 50.0, 300.0), "150");
        for (lo, hi) in [(-3.0, 7.0), (0.001, 0.0013), (5.0, 5e6)] {
            let (t, _) = nice_ticks(lo, hi, 5, 0.0);
            assert!((3..=11).contains(&t.len()), "{lo}..{hi}: {t:?}");
        }
        // Steps are whole numbers.
        assert_eq!(nice_ticks(0.0, 1.0, 6, 1.0), (vec![0.0, 1.0], 1.0));
    }

    #[test]
    fn ema_smooths_without_lag() {
        let flat: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, 2.5)).collect();
        assert!(ema(&flat).iter().all(|p| (p.1 - 2.5).abs() < 1e-12));
        // A straight line stays (nearly) on itself away from the ends.
        let line: Vec<(f64, f64)> = (0..600).map(|i| (i as f64, 0.01 * i as f64)).collect();
        let sm = ema(&line);
        for i in 100..500 {
            assert!((sm[i].1 - line[i].1).abs() < 1e-6, "{i}: {:?}", sm[i]);
            assert_eq!(sm[i].0, line[i].0);
        }
        // Alternating noise is damped.
        let zig: Vec<(f64, f64)> = (0..600).map(|i| (i as f64, (i % 2) as f64)).collect();
        let sm = ema(&zig);
        assert!(sm[100..500].iter().all(|p| (p.1 - 0.5).abs() < 0.2));
    }

    #[test]
    fn write_loss_svg_writes_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        write_loss_svg(&path, &synthetic(100), "t").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text, loss_curve_svg(&synthetic(100), "t"));
    }

    /// Writes a sample plot to /tmp/loss.svg for eyeballing:
    /// `cargo test -p clayflow-trainer --lib report::tests::render_sample_svg -- --ignored`
    #[test]
    #[ignore]
    fn render_sample_svg() {
        write_loss_svg(
            "/tmp/loss.svg",
            &synthetic(2000),
            "RealNVP on MNIST (run a1)",
        )
        .unwrap();
        write_loss_svg("/tmp/loss_short.svg", &synthetic(30), "short run").unwrap();
        write_loss_svg("/tmp/loss_one.svg", &synthetic(1), "one point").unwrap();
        let mut long = synthetic(50_000);
        long[30_000].train_bpd = Some(f64::NAN);
        long[30_001].train_bpd = Some(40.0);
        write_loss_svg("/tmp/loss_long.svg", &long, "long run with a spike").unwrap();
        write_loss_svg("/tmp/loss_empty.svg", &[], "empty").unwrap();
        // Rings of growing radius on black, like digits: grey, then RGB.
        let ring = |k: usize, y: usize, x: usize| {
            let d = ((y as f64 - 13.5).powi(2) + (x as f64 - 13.5).powi(2)).sqrt();
            if (d - (3.0 + k as f64 * 0.6)).abs() < 1.5 {
                255
            } else {
                0
            }
        };
        let grey: Vec<u8> = (0..10 * 28 * 28)
            .map(|i| ring(i / 784, (i % 784) / 28, i % 28))
            .collect();
        write_png_grid("/tmp/grid.png", &grey, 10, 1, 28, 28, 4, 2, 3).unwrap();
        let rgb: Vec<u8> = (0..6 * 3 * 28 * 28)
            .map(|i| {
                let (k, c, p) = (i / (3 * 784), (i / 784) % 3, i % 784);
                if c == k % 3 {
                    ring(k, p / 28, p % 28)
                } else {
                    0
                }
            })
            .collect();
        write_png_grid("/tmp/grid_rgb.png", &rgb, 6, 3, 28, 28, 3, 2, 3).unwrap();
    }
}
