//! Crash-safe file-system helpers: atomic replacement of a file, directory fsync, and an
//! up-front check that an output folder is writable.
//!
//! Every error returned here keeps the original [`io::ErrorKind`] and has a message that
//! names the file or directory involved.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Adds `what` and `path` to an I/O error's message, keeping its kind.
pub(crate) fn with_path(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates (truncating) `path`, writes `bytes` and flushes them to disk with `sync_all`.
/// Does not fsync the parent directory.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path).map_err(|e| with_path(e, "cannot create", path))?;
    f.write_all(bytes)
        .map_err(|e| with_path(e, "cannot write", path))?;
    f.sync_all().map_err(|e| with_path(e, "cannot fsync", path))
}

/// Replaces `path` with `bytes` atomically: readers (and a crash at any point) see either
/// the old contents or the new ones, never a mix or a truncated file.
///
/// Writes `.<name>.tmp-<pid>` in the same directory, fsyncs it, renames it over `path`,
/// then fsyncs the directory so the rename itself is durable.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot write {}: not a file path", path.display()),
        )
    })?;
    let dir = parent_dir(path);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = write_synced(&tmp, bytes).and_then(|()| {
        fs::rename(&tmp, path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot rename {} to {}: {e}", tmp.display(), path.display()),
            )
        })
    });
    if let Err(e) = result {
        // Best effort: do not leave the temporary behind.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(&dir)
}

/// Flushes a directory's entries (new, renamed or removed files) to disk.
///
/// On non-Unix platforms, where a directory cannot be opened as a file, this only checks
/// that `dir` is a directory.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let f = File::open(dir).map_err(|e| with_path(e, "cannot open directory", dir))?;
        f.sync_all()
            .map_err(|e| with_path(e, "cannot fsync directory", dir))
    }
    #[cfg(not(unix))]
    {
        let md = fs::metadata(dir).map_err(|e| with_path(e, "cannot open directory", dir))?;
        if md.is_dir() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ))
        }
    }
}

/// Makes sure `dir` exists and files can be created, written, synced and removed in it,
/// so that a run fails at start rather than at its first checkpoint. Creates `dir` (and
/// its parents) when missing.
pub fn check_writable_dir(dir: &Path) -> io::Result<()> {
    let fail = |e: io::Error, what: &str| {
        io::Error::new(
            e.kind(),
            format!(
                "output directory {} is not writable ({what}): {e}",
                dir.display()
            ),
        )
    };
    fs::create_dir_all(dir).map_err(|e| fail(e, "cannot create it"))?;
    if !fs::metadata(dir)
        .map_err(|e| fail(e, "cannot stat it"))?
        .is_dir()
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("output directory {} is not a directory", dir.display()),
        ));
    }
    let probe = dir.join(format!(".clayflow-write-probe-{}", std::process::id()));
    let written = (|| {
        let mut f = File::create(&probe)?;
        f.write_all(b"clayflow write probe\n")?;
        f.sync_all()
    })();
    let removed = fs::remove_file(&probe);
    written.map_err(|e| fail(e, "cannot write a file in it"))?;
    removed.map_err(|e| fail(e, "cannot remove a file from it"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_write_creates_and_replaces_without_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("LATEST");
        atomic_write(&p, b"step-00000001\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"step-00000001\n");
        atomic_write(&p, b"step-00000002\n").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"step-00000002\n");
        assert_eq!(entries(tmp.path()), vec!["LATEST".to_string()]);
    }

    #[test]
    fn atomic_write_error_names_the_path_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("missing-dir").join("f.txt");
        let err = atomic_write(&p, b"x").unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
        // A directory in the way of the rename.
        let d = tmp.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("inner"), b"keep").unwrap();
        let err = atomic_write(&d, b"x").unwrap_err();
        assert!(err.to_string().contains("cannot rename"), "{err}");
        assert_eq!(entries(tmp.path()), vec!["d".to_string()]);
    }

    #[test]
    fn fsync_dir_works_on_directories() {
        let tmp = tempfile::tempdir().unwrap();
        fsync_dir(tmp.path()).unwrap();
        assert!(fsync_dir(&tmp.path().join("nope")).is_err());
    }

    #[test]
    fn check_writable_dir_creates_missing_dirs_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a").join("b");
        check_writable_dir(&d).unwrap();
        assert!(d.is_dir());
        assert!(entries(&d).is_empty());
        check_writable_dir(&d).unwrap();
    }

    #[test]
    fn check_writable_dir_fails_under_a_regular_file() {
        // Tests may run as root, where permission bits do not stop writes; a path below a
        // regular file can never be created.
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file.txt");
        fs::write(&file, b"not a dir").unwrap();
        let d = file.join("sub");
        let err = check_writable_dir(&d).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&d.display().to_string()), "{msg}");
        assert!(msg.contains("not writable"), "{msg}");
        // The regular file itself is not a usable directory either.
        let err = check_writable_dir(&file).unwrap_err();
        assert!(err.to_string().contains("file.txt"), "{err}");
    }
}
