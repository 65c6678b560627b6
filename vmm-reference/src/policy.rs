// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the operator allowed at start-up, and the checks of what a monitor client asks for
//! against it.
//!
//! The monitor is privileged (as QEMU's QMP is): a client can stop the guest, save it, or
//! restart the VMM. So a client may exec only a binary the operator listed
//! (`--allow-update-binary`, by default the binary this VMM was started from), which must be
//! owned by root or the VMM's user and writable by nobody else (nor its directory); and it
//! may write or read state files only in the directory named by `--state-dir`, by a plain
//! file name, never through a symbolic link, and never over a file that is not a state file
//! of this VM.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::unix::Access;

/// The operator's decisions.
#[derive(Debug)]
pub struct Policy {
    /// Binaries a restart may exec, as given (lexically normalized).
    pub allowed: Vec<PathBuf>,
    /// The state directory.
    pub state_dir: Option<StateDir>,
    /// Who may connect to the sockets.
    pub access: Access,
}

/// The state directory, opened once at start-up.
#[derive(Debug)]
pub struct StateDir {
    /// As given.
    pub path: PathBuf,
    /// The open directory: files are created and opened relative to it.
    pub dir: File,
}

/// `path` without `.` components and repeated slashes; `..` is kept (and refused by the
/// callers that care).
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != Component::CurDir)
        .collect()
}

/// Checks that `m` (of `what`) is owned by root or us and writable by nobody else.
fn check_owner(what: &Path, m: &std::fs::Metadata, dir: bool) -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != 0 && m.uid() != me {
        return Err(format!(
            "`{}` is owned by uid {}, neither root nor this VMM's user",
            what.display(),
            m.uid()
        ));
    }
    let sticky = dir && m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !sticky {
        return Err(format!(
            "`{}` is writable by group or others (mode {:o})",
            what.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Opens a directory with no symbolic link in its path.
fn open_dir_no_symlinks(path: &Path) -> std::io::Result<File> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: 0x04, // RESOLVE_NO_SYMLINKS
    };
    // SAFETY: openat2 reads the NUL-terminated path and `how` of the given size, both alive
    // for the call, and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

impl Policy {
    /// Resolves the command line's policy options: the default binary, the state directory
    /// (opened now, refused if unsafe), the socket group.
    pub fn from_config(cfg: &RunConfig) -> Result<Policy> {
        let mut allowed: Vec<PathBuf> = cfg
            .allow_update_binary
            .iter()
            .map(|p| normalize(p))
            .collect();
        if allowed.is_empty() {
            allowed.push(normalize(&cpr_fd::startup_executable()?));
        }
        for p in &allowed {
            if !p.is_absolute() {
                return Err(Error::Config(format!(
                    "--allow-update-binary `{}` must be an absolute path",
                    p.display()
                )));
            }
        }
        let state_dir = match &cfg.state_dir {
            None => None,
            Some(p) => {
                let path = normalize(p);
                if !path.is_absolute() {
                    return Err(Error::Config(format!(
                        "--state-dir `{}` must be an absolute path",
                        p.display()
                    )));
                }
                let dir = open_dir_no_symlinks(&path).map_err(|e| {
                    Error::Config(format!(
                        "--state-dir `{}`: {}",
                        path.display(),
                        if e.raw_os_error() == Some(libc::ELOOP) {
                            "a symbolic link is in the path".to_string()
                        } else {
                            e.to_string()
                        }
                    ))
                })?;
                let m = dir
                    .metadata()
                    .map_err(|e| Error::Io(format!("--state-dir: {e}")))?;
                check_owner(&path, &m, false)
                    .map_err(|e| Error::Config(format!("--state-dir: {e}")))?;
                Some(StateDir { path, dir })
            }
        };
        let group = match &cfg.socket_group {
            None => None,
            Some(g) => Some(
                crate::unix::group_id(g)
                    .map_err(|e| Error::Config(format!("--socket-group `{g}`: {e}")))?,
            ),
        };
        Ok(Policy {
            allowed,
            state_dir,
            access: Access { group },
        })
    }

    /// The binary a restart may exec for a client's request (`None`: the default, the first
    /// allowed one), or why not. Checked again at every request: owner and mode of the file
    /// and of its directory.
    pub fn update_binary(&self, requested: Option<&Path>) -> std::result::Result<PathBuf, String> {
        let p = match requested {
            None => self.allowed[0].clone(),
            Some(r) => {
                let r = normalize(r);
                if !self.allowed.contains(&r) {
                    return Err(format!(
                        "`{}` is not an allowed update binary (start the VMM with --allow-update-binary)",
                        r.display()
                    ));
                }
                r
            }
        };
        let m = std::fs::metadata(&p).map_err(|e| format!("`{}`: {e}", p.display()))?;
        if !m.is_file() || m.mode() & 0o111 == 0 {
            return Err(format!("`{}` is not an executable file", p.display()));
        }
        check_owner(&p, &m, false)?;
        if let Some(dir) = p.parent() {
            let d = std::fs::metadata(dir).map_err(|e| format!("`{}`: {e}", dir.display()))?;
            check_owner(dir, &d, true)?;
        }
        Ok(p)
    }

    /// The state directory and file name for a client's `path` (a plain name, or an
    /// absolute path inside the state directory), or why not.
    pub fn state_file(
        &self,
        requested: &str,
    ) -> std::result::Result<(&StateDir, OsString), String> {
        let dir = self.state_dir.as_ref().ok_or_else(|| {
            "no state directory: start the VMM with --state-dir to save or load state files"
                .to_string()
        })?;
        let p = normalize(Path::new(requested));
        let name = match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) if parent.as_os_str().is_empty() || parent == dir.path => {
                name.to_os_string()
            }
            _ => {
                return Err(format!(
                    "`{requested}` is not a file in the state directory {}",
                    dir.path.display()
                ))
            }
        };
        if name.as_bytes().starts_with(b".") {
            return Err(format!(
                "`{requested}`: state file names cannot start with '.'"
            ));
        }
        Ok((dir, name))
    }
}

impl StateDir {
    /// Opens `name` in the directory for reading, not following a symbolic link.
    pub fn open(&self, name: &std::ffi::OsStr) -> std::io::Result<File> {
        let c = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: openat with the directory we own and a NUL-terminated name; returns a new
        // fd or -1.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Reads state file `name`, refusing more than `limit` bytes or a non-regular file.
    pub fn read(&self, name: &std::ffi::OsStr, limit: u64) -> std::result::Result<Vec<u8>, String> {
        let shown = self.path.join(name);
        let f = self.open(name).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => format!(
                "`{}` is a symbolic link, which is not followed",
                shown.display()
            ),
            _ => format!("open `{}`: {e}", shown.display()),
        })?;
        let m = f
            .metadata()
            .map_err(|e| format!("`{}`: {e}", shown.display()))?;
        if !m.is_file() {
            return Err(format!("`{}` is not a regular file", shown.display()));
        }
        let mut bytes = Vec::new();
        (&f).take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("read `{}`: {e}", shown.display()))?;
        if bytes.len() as u64 > limit {
            return Err(format!(
                "`{}` is larger than {limit} bytes",
                shown.display()
            ));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt;

    fn cfg(args: &[&str]) -> RunConfig {
        let mut v = vec!["vmm-reference", "run"];
        v.extend_from_slice(args);
        match crate::config::Cli::try_parse_from(v).unwrap().command {
            Some(crate::config::Command::Run(r)) => *r,
            _ => unreachable!(),
        }
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("cpr-policy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        Tmp(d)
    }

    #[test]
    fn only_allowed_binaries_owned_and_writable_by_us_may_be_execd() {
        let t = tmp("bin");
        let good = t.0.join("vmm");
        std::fs::write(&good, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o755)).unwrap();
        let loose = t.0.join("loose");
        std::fs::write(&loose, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o775)).unwrap();
        let g = good.to_str().unwrap();
        let l = loose.to_str().unwrap();
        let p = Policy::from_config(&cfg(&[
            "--allow-update-binary",
            g,
            "--allow-update-binary",
            l,
        ]))
        .unwrap();
        assert_eq!(p.update_binary(None).unwrap(), good);
        assert_eq!(p.update_binary(Some(&t.0.join("./vmm"))).unwrap(), good);
        let e = p.update_binary(Some(Path::new("/bin/sh"))).unwrap_err();
        assert!(e.contains("not an allowed update binary"), "{e}");
        let e = p.update_binary(Some(&loose)).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        // A directory others can write to lets them swap the binary: refused too.
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = p.update_binary(None).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        // The default is the binary we run.
        let d = Policy::from_config(&cfg(&[])).unwrap();
        assert_eq!(d.allowed, [cpr_fd::startup_executable().unwrap()]);
    }

    #[test]
    fn state_files_stay_in_the_state_directory() {
        let t = tmp("state");
        let dir = t.0.to_str().unwrap().to_string();
        let p = Policy::from_config(&cfg(&["--state-dir", &dir])).unwrap();
        assert_eq!(p.state_file("vm.state").unwrap().1, "vm.state");
        assert_eq!(
            p.state_file(&format!("{dir}/vm.state")).unwrap().1,
            "vm.state"
        );
        for bad in ["/etc/passwd", "../x", "sub/vm.state", ".hidden", "/", ""] {
            assert!(p.state_file(bad).is_err(), "{bad}");
        }
        assert!(Policy::from_config(&cfg(&[]))
            .unwrap()
            .state_file("vm.state")
            .is_err());
        // Reading does not follow a symlink planted in the directory.
        std::os::unix::fs::symlink("/etc/hostname", t.0.join("link")).unwrap();
        let e = p
            .state_dir
            .as_ref()
            .unwrap()
            .read("link".as_ref(), 1 << 20)
            .unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // A state directory reached through a symlink, or writable by others, is refused.
        let link = t.0.join("dirlink");
        std::os::unix::fs::symlink(&t.0, &link).unwrap();
        let e = Policy::from_config(&cfg(&["--state-dir", link.to_str().unwrap()])).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Policy::from_config(&cfg(&["--state-dir", &dir])).unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
    }
}
