// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Carrying the registry across `execve`, and taking it back in the new image.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{os, Error, Result};
use crate::registry::{open_fds, FdEntry, FdKind, FdManifest, FdRegistry, MAX_MANIFEST_LEN};
use crate::sys;

/// The environment variable that names the manifest memfd across exec.
pub const MANIFEST_ENV: &str = "CPR_FD_MANIFEST";

const MANIFEST_MEMFD_NAME: &std::ffi::CStr = c"cpr-fd-manifest";

/// A registry ready to exec: its fds and the manifest memfd will survive `execve`, and every
/// other fd of the process will not. Dropping it (or a failed [`exec`](Self::exec)) puts every
/// fd's close-on-exec flag back as it was and discards the manifest.
#[derive(Debug)]
pub struct Prepared<'a> {
    registry: &'a mut FdRegistry,
    manifest: File,
    /// Unregistered fds that lacked close-on-exec, which prepare set.
    guarded: Vec<RawFd>,
}

impl FdRegistry {
    /// Gets ready to exec: writes the manifest (name, fd number, kind, identity, metadata of
    /// every entry) into a sealed memfd, clears close-on-exec on exactly the registered fds
    /// and the manifest, and sets close-on-exec on any other fd that lacked it, so nothing
    /// else leaks into the new image.
    pub fn prepare(&mut self) -> Result<Prepared<'_>> {
        let manifest = FdManifest::of(self, |_, e| e.fd().as_raw_fd())?.encode()?;
        let manifest =
            sys::sealed_memfd(MANIFEST_MEMFD_NAME, &manifest).map_err(os("manifest memfd"))?;
        let mut prepared = Prepared {
            registry: self,
            manifest,
            guarded: Vec::new(),
        };
        // From here on, Drop undoes whatever was done if a step fails.
        let keep: Vec<RawFd> = prepared
            .registry
            .entries
            .iter()
            .map(|e| e.fd().as_raw_fd())
            .chain([prepared.manifest.as_raw_fd()])
            .collect();
        for fd in open_fds()? {
            if fd > 2
                && !keep.contains(&fd)
                && sys::fd_flags(fd).is_some_and(|f| f & libc::FD_CLOEXEC == 0)
            {
                sys::set_cloexec(fd, true).map_err(os("set close-on-exec"))?;
                prepared.guarded.push(fd);
            }
        }
        for fd in keep {
            sys::set_cloexec(fd, false).map_err(os("clear close-on-exec"))?;
        }
        Ok(prepared)
    }
}

impl Prepared<'_> {
    /// The value [`MANIFEST_ENV`] must have in the new image.
    pub fn env_value(&self) -> String {
        self.manifest.as_raw_fd().to_string()
    }

    /// `execve`s `program` with `args` (argv\[1..\]; argv\[0\] is `program`) and the current
    /// environment plus [`MANIFEST_ENV`]. Returns only if exec failed, after putting
    /// everything back: the registry is intact and usable, so the caller can resume the guest.
    pub fn exec(self, program: &Path, args: &[OsString]) -> Error {
        match self.exec_inner(program, args) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    /// [`exec`](Self::exec) of the program this process was started from
    /// ([`startup_executable`]): the path it was started as, so that an updated binary
    /// installed at that path (by rename, as package managers do) is the one that starts.
    /// Not `/proc/self/exe`, which names the replaced file ("... (deleted)") after such an
    /// upgrade, and cannot be executed.
    pub fn exec_self(self, args: &[OsString]) -> Error {
        match startup_executable() {
            Ok(p) => self.exec(&p, args),
            Err(e) => e,
        }
    }

    /// Like [`exec`](Self::exec), of the open file `program` instead of a path
    /// (`fexecve`), with `argv0` as `argv[0]`. It runs exactly that file even if its path
    /// now names another one, e.g. to go back to the binary that was replaced by an upgrade:
    /// open `/proc/self/exe` before the upgrade's exec and keep the fd. `program` must be an
    /// ELF binary (a script would need its fd to survive the exec, which this does not
    /// arrange).
    pub fn exec_fd(self, program: BorrowedFd<'_>, argv0: &OsStr, args: &[OsString]) -> Error {
        let (argv, envp) = match self.exec_strings(argv0, args) {
            Ok(v) => v,
            Err(e) => return e,
        };
        Error::Exec {
            path: PathBuf::from(format!("/proc/self/fd/{}", program.as_raw_fd())),
            source: sys::fexecve(program, &argv, &envp),
        }
    }

    /// argv (with `argv0` first) and the environment with [`MANIFEST_ENV`] set.
    fn exec_strings(
        &self,
        argv0: &OsStr,
        args: &[OsString],
    ) -> Result<(Vec<CString>, Vec<CString>)> {
        let cstr = |s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| Error::NulInArgument(s.to_os_string()))
        };
        let mut argv = vec![cstr(argv0)?];
        for a in args {
            argv.push(cstr(a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if k != MANIFEST_ENV {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                envp.push(cstr(&kv)?);
            }
        }
        envp.push(cstr(OsStr::new(&format!(
            "{MANIFEST_ENV}={}",
            self.env_value()
        )))?);
        Ok((argv, envp))
    }

    fn exec_inner(&self, program: &Path, args: &[OsString]) -> Result<std::convert::Infallible> {
        let path = CString::new(program.as_os_str().as_bytes())
            .map_err(|_| Error::NulInArgument(program.as_os_str().to_os_string()))?;
        let (argv, envp) = self.exec_strings(program.as_os_str(), args)?;
        let source = sys::execve(&path, &argv, &envp);
        Err(Error::Exec {
            path: program.to_path_buf(),
            source,
        })
    }
}

impl Drop for Prepared<'_> {
    fn drop(&mut self) {
        for e in &self.registry.entries {
            let _ = sys::set_cloexec(e.fd().as_raw_fd(), true);
        }
        for fd in &self.guarded {
            let _ = sys::set_cloexec(*fd, false);
        }
        // The manifest memfd (close-on-exec cleared) is closed when `manifest` drops.
    }
}

static STARTUP_EXE: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// The path this program was started from, resolved at the first call (call it early, before
/// the working directory changes: [`reclaim`] does).
///
/// `argv[0]` is resolved as the shell did: against the working directory if it contains a
/// `/`, else through `PATH`. It is kept, not canonicalized, so a symlink that an upgrade
/// repoints is followed at the next exec. It is used only if it named this very executable
/// at start-up (same device and inode as `/proc/self/exe`); otherwise (an `argv[0]` set to
/// something else) the path `/proc/self/exe` named at start-up is used.
pub fn startup_executable() -> Result<PathBuf> {
    STARTUP_EXE
        .get_or_init(resolve_startup_executable)
        .clone()
        .map_err(|reason| Error::Exec {
            path: PathBuf::from("/proc/self/exe"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, reason),
        })
}

fn resolve_startup_executable() -> std::result::Result<PathBuf, String> {
    let exe =
        std::fs::metadata("/proc/self/exe").map_err(|e| format!("stat /proc/self/exe: {e}"))?;
    let same = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            m.dev() == exe.dev() && m.ino() == exe.ino() && m.permissions().mode() & 0o111 != 0
        })
    };
    if let Some(argv0) = std::env::args_os().next().map(PathBuf::from) {
        let candidate = if argv0.as_os_str().as_bytes().contains(&b'/') {
            std::env::current_dir().ok().map(|d| d.join(&argv0))
        } else {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|d| d.join(&argv0))
                    .find(|p| p.is_absolute() && same(p))
            })
        };
        if let Some(p) = candidate.filter(|p| same(p)) {
            return Ok(p);
        }
    }
    let link = std::fs::read_link("/proc/self/exe")
        .map_err(|e| format!("readlink /proc/self/exe: {e}"))?;
    Ok(link)
}

/// Takes back the registry an earlier image prepared, if [`MANIFEST_ENV`] is set; `Ok(None)`
/// if it is not (a normal start).
///
/// Call it early in `main`, before starting threads: it removes the variable from the
/// environment so children do not inherit it. Every fd is checked before any is taken: the
/// manifest must be a sealed cpr-fd memfd no larger than the cap, and each listed fd must be
/// open and be the same file (device, inode, type) that was registered. On success every fd
/// is close-on-exec again and the manifest is closed. On error, the fds that did match are
/// closed so they do not leak; fd numbers that are not what the manifest says are left
/// alone, since they belong to someone else.
pub fn reclaim() -> Result<Option<FdRegistry>> {
    // Resolve it now, while the working directory is still the one we started in.
    let _ = startup_executable();
    let Some(value) = std::env::var_os(MANIFEST_ENV) else {
        return Ok(None);
    };
    std::env::remove_var(MANIFEST_ENV);
    reclaim_value(&value).map(Some)
}

fn reclaim_value(value: &OsStr) -> Result<FdRegistry> {
    let bad = || Error::BadVariable {
        var: MANIFEST_ENV,
        value: value.to_os_string(),
    };
    let text = value.to_str().ok_or_else(bad)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let fd: RawFd = text.parse().map_err(|_| bad())?;
    if fd <= 2 {
        return Err(bad());
    }
    let not_manifest = |reason: crate::error::NotManifest| Error::NotManifest {
        var: MANIFEST_ENV,
        fd,
        reason,
    };
    if sys::fd_flags(fd).is_none() {
        return Err(not_manifest(crate::error::NotManifest::Closed));
    }
    match sys::seals(fd) {
        None => return Err(not_manifest(crate::error::NotManifest::NotMemfd)),
        Some(s) if s != sys::MANIFEST_SEALS => {
            return Err(not_manifest(crate::error::NotManifest::NotSealed(s as u32)))
        }
        Some(_) => {}
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
    if !link.to_string_lossy().starts_with("/memfd:cpr-fd-manifest") {
        return Err(not_manifest(crate::error::NotManifest::WrongName(
            link.to_string_lossy().into_owned(),
        )));
    }
    // SAFETY: fd is open, is a sealed memfd named as ours, and the previous image handed it
    // to us through the variable, which has been removed so nobody else will claim it.
    let manifest = unsafe { File::from_raw_fd(fd) };
    let len = manifest.metadata().map_err(os("fstat manifest"))?.len();
    if len > MAX_MANIFEST_LEN {
        return Err(Error::ManifestTooLarge {
            len,
            max: MAX_MANIFEST_LEN,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    manifest
        .read_exact_at(&mut bytes, 0)
        .map_err(os("read manifest"))?;
    let m = FdManifest::decode(&bytes)?;

    // Check every fd before owning any.
    let mut first_error = None;
    let mut matched = Vec::with_capacity(m.records.len());
    for r in &m.records {
        let err = if r.fd <= 2 || r.fd == fd {
            Some(Error::ManifestInvalid {
                offset: 0,
                problem: crate::error::ManifestProblem::ReservedFd {
                    name: r.name.clone(),
                    fd: r.fd,
                },
            })
        } else {
            match sys::identity_raw(r.fd) {
                Err(_) => Some(Error::FdMissing {
                    name: r.name.clone(),
                    fd: r.fd,
                }),
                Ok(found) if found != r.identity() => Some(Error::IdentityMismatch {
                    name: r.name.clone(),
                    fd: r.fd,
                    expected: r.identity(),
                    found,
                }),
                Ok(_) => None,
            }
        };
        match err {
            None => matched.push(r),
            Some(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut registry = FdRegistry::new();
    for r in matched {
        // SAFETY: the fd is open and is the very file the previous image registered under
        // this name (identity checked above); the manifest hands its ownership to us, and
        // fd numbers are unique in a validated manifest, so nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(r.fd) };
        if let Err(e) = sys::set_cloexec(r.fd, true) {
            first_error.get_or_insert(os("set close-on-exec")(e));
        }
        registry.entries.push(FdEntry::new(
            r.name.clone(),
            FdKind(r.kind),
            r.metadata.clone(),
            owned,
        ));
    }
    match first_error {
        // Dropping `registry` closes the fds that matched: nothing leaks.
        Some(e) => Err(e),
        None => Ok(registry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_variables_are_refused() {
        for v in [
            "",
            "abc",
            "-5",
            "1",
            "2",
            "99999999999999999999",
            "12x",
            " 7",
        ] {
            assert!(
                matches!(reclaim_value(OsStr::new(v)), Err(Error::BadVariable { .. })),
                "{v:?}"
            );
        }
    }

    #[test]
    fn closed_or_foreign_fds_are_not_manifests() {
        // A number far above anything open.
        assert!(matches!(
            reclaim_value(OsStr::new("1000000")),
            Err(Error::NotManifest { .. })
        ));
        // An unrelated open file is refused, and left open.
        let f = File::open("/dev/null").unwrap();
        let n = f.as_raw_fd().to_string();
        assert!(matches!(
            reclaim_value(OsStr::new(&n)),
            Err(Error::NotManifest { .. })
        ));
        assert!(sys::fd_flags(f.as_raw_fd()).is_some());
        // A sealed memfd with the wrong name is refused too.
        let other = sys::sealed_memfd(c"something-else", b"x").unwrap();
        let n = other.as_raw_fd().to_string();
        assert!(matches!(
            reclaim_value(OsStr::new(&n)),
            Err(Error::NotManifest { .. })
        ));
    }

    #[test]
    fn oversized_manifest_is_refused_before_reading() {
        let big = vec![0u8; MAX_MANIFEST_LEN as usize + 1];
        let m = sys::sealed_memfd(MANIFEST_MEMFD_NAME, &big).unwrap();
        let n = m.as_raw_fd().to_string();
        let _ = std::os::fd::IntoRawFd::into_raw_fd(m);
        assert!(matches!(
            reclaim_value(OsStr::new(&n)),
            Err(Error::ManifestTooLarge { .. })
        ));
    }

    #[test]
    fn corrupt_manifest_is_refused() {
        let m = sys::sealed_memfd(MANIFEST_MEMFD_NAME, b"CPR-SNAP but not really").unwrap();
        let n = m.as_raw_fd().to_string();
        // reclaim takes ownership of the manifest fd on this path (and closes it).
        let _ = std::os::fd::IntoRawFd::into_raw_fd(m);
        assert!(matches!(
            reclaim_value(OsStr::new(&n)),
            Err(Error::ManifestInvalid {
                problem: crate::error::ManifestProblem::BadMagic,
                ..
            })
        ));
    }
}
