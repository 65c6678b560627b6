// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Atomic replacement of a file on disk.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};

fn path_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Path {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file atomically: `write` fills a new temporary file (mode 0600) in the same
/// directory, which is flushed, fsynced and renamed over `path`, after which the directory
/// is fsynced. Readers of `path` see either the old content or the complete new content;
/// after a crash at any point no partial file stands under `path`. On error the temporary
/// file is removed and `path` is untouched.
///
/// If `path` is a symbolic link the call is refused rather than replacing the link (which a
/// caller who expected the link's target to be written would not notice).
///
/// ```
/// use cpr_snapshot::{save_to_path, Schema, SnapshotWriter};
/// # let dir = std::env::temp_dir().join(format!("cpr-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let schema = Schema::builder().build().unwrap();
/// let path = dir.join("vm.state");
/// save_to_path(&path, |out| {
///     let w = SnapshotWriter::new(out, &schema, "doc", "1", 1)?;
///     w.finish().map(drop)
/// })
/// .unwrap();
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub fn save_to_path<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let file_name = path.file_name().ok_or_else(|| {
        path_err("no file name in", path)(std::io::ErrorKind::InvalidInput.into())
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::Path {
                op: "refusing to replace symbolic link",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::InvalidInput.into(),
            })
        }
        _ => {}
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(path_err("create temporary file", &tmp))?;

    let result = (|| {
        // The umask may only remove bits; make the mode exact anyway.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(path_err("chmod", &tmp))?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        out.flush().map_err(path_err("write", &tmp))?;
        let file = out
            .into_inner()
            .map_err(|e| path_err("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(path_err("fsync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(path_err("rename into place", path))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(path_err("fsync directory", &dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SchemaError;
    use std::os::unix::fs::MetadataExt;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpr-atomic-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_mode_0600_and_replaces() {
        let d = tempdir("replace");
        let p = d.join("state");
        std::fs::write(&p, b"old").unwrap();
        save_to_path(&p, |w| {
            w.write_all(b"new content").map_err(path_err("w", &p))
        })
        .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(entries(&d), vec!["state"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn failure_leaves_old_file_and_no_temporary() {
        let d = tempdir("fail");
        let p = d.join("state");
        std::fs::write(&p, b"old").unwrap();
        let err = save_to_path(&p, |w| {
            w.write_all(b"partial").unwrap();
            Err(Error::Schema(SchemaError::TooManyVersions))
        });
        assert!(matches!(
            err,
            Err(Error::Schema(SchemaError::TooManyVersions))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(entries(&d), vec!["state"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_symlink_at_final_name() {
        let d = tempdir("symlink");
        let target = d.join("target");
        std::fs::write(&target, b"keep").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = save_to_path(&link, |w| w.write_all(b"x").map_err(path_err("w", &link)));
        assert!(matches!(err, Err(Error::Path { op, .. }) if op.contains("symbolic")));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(entries(&d), vec!["link", "target"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_directory_is_a_path_error() {
        let p = Path::new("/nonexistent-cpr-dir/state");
        let err = save_to_path(p, |_| Ok(()));
        assert!(matches!(err, Err(Error::Path { .. })));
    }
}
