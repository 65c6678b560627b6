// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Listening UNIX sockets that only their owner can use, and whose path appears only once
//! they accept connections.
//!
//! A socket file's mode comes from the umask at `bind`, and connecting needs write
//! permission on it, so a socket bound under `umask 000` lets every local user in. [`listen`]
//! sets the mode on the socket before `bind` (Linux applies it to the file `bind` creates,
//! minus the umask, so it is never more open than asked), then sets the exact mode (and
//! group, if one is configured) on the file before anyone can reach it.
//!
//! `bind` creates the socket file and `listen` follows in a second call; a peer that sees
//! the file in between and connects gets `ECONNREFUSED`. Tools (and our tests) wait for the
//! file to appear, so [`listen`] binds under a temporary name in the same directory, starts
//! listening, and then renames the socket into place, which is atomic.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Who may connect to the VMM's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The group that may also connect (mode 0660), or none (mode 0600).
    pub group: Option<u32>,
}

impl Access {
    /// Owner only.
    pub const OWNER: Access = Access { group: None };

    fn mode(self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// A socket with the mode of `access`, bound to `path` and listening.
fn bind_listen(path: &Path, access: Access) -> io::Result<UnixListener> {
    // SAFETY: socket() takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just created this fd for us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // SAFETY: fchmod on our own socket fd, before bind.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), access.mode()) })?;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: bind reads `len` bytes of the sockaddr_un we own, which lives for the call.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    let c = CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let fixed = (|| {
        // The exact mode, whatever the umask removed; then the group.
        // SAFETY: chmod/lchown of the path we just bound, NUL-terminated.
        check(unsafe { libc::chmod(c.as_ptr(), access.mode()) })?;
        if let Some(gid) = access.group {
            // SAFETY: as above; uid -1 keeps the owner.
            check(unsafe { libc::lchown(c.as_ptr(), u32::MAX, gid) })?;
        }
        // SAFETY: listen on our bound socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), 128) })
    })();
    if let Err(e) = fixed {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// The group id of `name` (a group name or a number).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse().ok())?
        })
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no group `{name}`")))
}

/// Longest socket path the kernel accepts (`sun_path` holds 108 bytes with the NUL).
const MAX_PATH: usize = 107;

/// Listens on `path`, reachable by its owner only (and `access.group`). A stale socket at
/// `path` is replaced; anything else there (a regular file, a directory, a symlink) is
/// refused with `AlreadyExists` and left alone.
pub fn listen(path: &Path, access: Access) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Ok(_) | Err(_) => {}
    }
    let Some(tmp) = temp_sibling(path) else {
        // No room for a temporary name: bind in place (the short window remains).
        let _ = std::fs::remove_file(path);
        return bind_listen(path, access);
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = bind_listen(&tmp, access)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// A name in `path`'s directory for this process, or `None` if it would not fit in
/// `sun_path`.
fn temp_sibling(path: &Path) -> Option<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        ".cpr-{:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => PathBuf::from(name),
    };
    (tmp.as_os_str().len() <= MAX_PATH).then_some(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpr-unix-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn the_socket_accepts_as_soon_as_it_exists_and_leaves_no_temporary() {
        let d = dir("ok");
        let p = d.join("s.sock");
        let l = listen(&p, Access::OWNER).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sockets_are_owner_only_or_shared_with_a_group() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = dir("mode");
        let p = d.join("s.sock");
        let _l = listen(&p, Access::OWNER).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let g = d.join("g.sock");
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let _m = listen(&g, Access { group: Some(gid) }).unwrap();
        let m = std::fs::metadata(&g).unwrap();
        assert_eq!((m.permissions().mode() & 0o777, m.gid()), (0o660, gid));
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(group_id("no-such-group-here").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_are_refused() {
        let d = dir("stale");
        let p = d.join("s.sock");
        drop(listen(&p, Access::OWNER).unwrap());
        assert!(UnixStream::connect(&p).is_err(), "stale socket");
        let l = listen(&p, Access::OWNER).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();

        let f = d.join("file");
        std::fs::write(&f, b"keep").unwrap();
        let e = listen(&f, Access::OWNER).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"keep");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_path_too_long_for_a_temporary_still_binds() {
        let d = dir("long");
        // A directory whose name leaves room for "/s" but not for ".cpr-<pid>-<n>".
        let deep = d.join("d".repeat(MAX_PATH - d.as_os_str().len() - 3));
        std::fs::create_dir(&deep).unwrap();
        let p = deep.join("s");
        assert_eq!(p.as_os_str().len(), MAX_PATH);
        assert!(temp_sibling(&p).is_none());
        let l = listen(&p, Access::OWNER).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A watcher that connects the moment the path appears is never refused. (With a plain
    /// `UnixListener::bind` this loop saw about one refusal per thousand tries here.)
    #[test]
    fn a_peer_racing_the_listener_is_never_refused() {
        let d = dir("race");
        for i in 0..2000 {
            let p = d.join(format!("s{i}"));
            let watcher = {
                let p = p.clone();
                std::thread::spawn(move || loop {
                    if p.exists() {
                        return UnixStream::connect(&p).map(drop);
                    }
                    std::hint::spin_loop();
                })
            };
            let l = listen(&p, Access::OWNER).unwrap();
            let r = watcher.join().unwrap();
            assert!(r.is_ok(), "try {i}: {r:?}");
            drop(l);
            std::fs::remove_file(&p).unwrap();
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
