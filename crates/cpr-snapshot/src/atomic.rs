// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Atomic replacement of a file on disk.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
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

/// The temporary names [`save_in_dir`] uses for `name`: `.NAME.tmp.PID.N`.
fn temp_prefix(name: &OsStr) -> OsString {
    let mut p = OsString::from(".");
    p.push(name);
    p.push(".tmp.");
    p
}

fn cstring(name: &OsStr) -> std::io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

/// Checks a file name for [`save_in_dir`]: one component, not `.` or `..`.
fn check_name(name: &OsStr) -> std::io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a plain file name",
        ));
    }
    Ok(())
}

/// Removes temporary files of `name` in `dir` left by processes that no longer exist (a
/// save killed half-way). Returns how many it removed.
pub fn remove_stale_temporaries(dir: &File, name: &OsStr) -> Result<usize> {
    let dir_path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let prefix = temp_prefix(name);
    let mut removed = 0;
    let entries = std::fs::read_dir(&dir_path).map_err(path_err("list", &dir_path))?;
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let pid: Option<i32> = std::str::from_utf8(rest)
            .ok()
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse().ok());
        let Some(pid) = pid.filter(|p| *p > 0) else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = pid == std::process::id() as i32
            || unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
        if alive {
            continue;
        }
        let c = cstring(&file).map_err(path_err("remove", &dir_path))?;
        // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
        if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } == 0 {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Like [`save_to_path`], for a file `name` in the directory `dir` (an open directory, so
/// nothing about the directory's path can change where the file goes): the temporary file
/// is created in `dir` with `O_EXCL | O_NOFOLLOW` and mode 0600, and renamed over `name`,
/// which must not be a symbolic link. Temporary files of `name` that an earlier save left
/// behind (its process was killed) are removed first.
pub fn save_in_dir<F>(dir: &File, name: &OsStr, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let shown = PathBuf::from(name);
    check_name(name).map_err(path_err("save", &shown))?;
    let _ = remove_stale_temporaries(dir, name);
    let target = cstring(name).map_err(path_err("save", &shown))?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstatat writes a stat for `target` in `dir` into our buffer, not following a
    // final symlink.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            target.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    // SAFETY: initialised by fstatat when it returned 0.
    if r == 0 && unsafe { st.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::Path {
            op: "refusing to replace a non-regular file",
            path: shown,
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    let mut tmp_name = temp_prefix(name);
    tmp_name.push(format!(
        "{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp_shown = PathBuf::from(&tmp_name);
    let tmp = cstring(&tmp_name).map_err(path_err("create temporary file", &tmp_shown))?;
    // SAFETY: openat with a valid directory fd, a NUL-terminated name and flags that create
    // a new file; the result is a new fd or -1.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(path_err("create temporary file", &tmp_shown)(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: openat just returned this fd to us.
    let file = unsafe { File::from_raw_fd(fd) };
    let unlink_tmp = || {
        // SAFETY: unlinkat with a valid directory fd and a NUL-terminated name.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp.as_ptr(), 0) };
    };
    let result = (|| {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(path_err("chmod", &tmp_shown))?;
        let mut out = BufWriter::new(file);
        write(&mut out)?;
        out.flush().map_err(path_err("write", &tmp_shown))?;
        let file = out
            .into_inner()
            .map_err(|e| path_err("write", &tmp_shown)(e.into_error()))?;
        file.sync_all().map_err(path_err("fsync", &tmp_shown))?;
        // SAFETY: renameat within one valid directory fd, both names NUL-terminated.
        let r = unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                tmp.as_ptr(),
                dir.as_raw_fd(),
                target.as_ptr(),
            )
        };
        if r != 0 {
            return Err(path_err("rename into place", &shown)(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    })();
    if let Err(e) = result {
        unlink_tmp();
        return Err(e);
    }
    dir.sync_all().map_err(path_err("fsync directory", &shown))
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

    #[test]
    fn saving_in_a_directory_replaces_atomically_and_cleans_up_after_the_dead() {
        let d = tempdir("in-dir");
        let dir = File::open(&d).unwrap();
        // A temporary left by a killed save (a pid that cannot exist), and one of a
        // running process (ours), which stays.
        std::fs::write(d.join(".vm.state.tmp.2147483600.0"), b"junk").unwrap();
        let ours = format!(".vm.state.tmp.{}.999", std::process::id());
        std::fs::write(d.join(&ours), b"mine").unwrap();
        save_in_dir(&dir, OsStr::new("vm.state"), |w| {
            w.write_all(b"state one").map_err(path_err("w", &d))
        })
        .unwrap();
        assert_eq!(std::fs::read(d.join("vm.state")).unwrap(), b"state one");
        assert_eq!(
            std::fs::metadata(d.join("vm.state")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(entries(&d), vec![ours.clone(), "vm.state".to_string()]);
        // A failed save leaves the old file and no temporary.
        let e = save_in_dir(&dir, OsStr::new("vm.state"), |_| {
            Err(Error::Schema(SchemaError::TooManyVersions))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(d.join("vm.state")).unwrap(), b"state one");
        assert_eq!(entries(&d), vec![ours, "vm.state".to_string()]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn saving_in_a_directory_never_follows_or_replaces_a_symlink() {
        let d = tempdir("in-dir-link");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("vm.state")).unwrap();
        let dir = File::open(&d).unwrap();
        let e = save_in_dir(&dir, OsStr::new("vm.state"), |w| {
            w.write_all(b"x").map_err(path_err("w", &d))
        })
        .unwrap_err();
        assert!(e.to_string().contains("non-regular"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        for bad in ["", ".", "..", "a/b"] {
            assert!(
                save_in_dir(&dir, OsStr::new(bad), |_| Ok(())).is_err(),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
