//! The metrics log: one JSON [`MetricRecord`] per line, appended during a run, read back
//! tolerating a torn last line, and cut back to a checkpoint's step on resume.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, write_atomic, ReportError};

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
    /// Validation loss of the trained weights, when `val_bpd` scores their moving average
    /// (`--ema`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "float_repr::ser_opt",
        deserialize_with = "float_repr::de_opt"
    )]
    pub val_trained_bpd: Option<f64>,
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

#[cfg(test)]
mod tests {
    use super::super::testutil::sample_records;
    use super::*;

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
}
