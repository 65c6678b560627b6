// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Listening UNIX sockets whose path appears only once they accept connections.
//!
//! `bind` creates the socket file and `listen` follows in a second call; a peer that sees
//! the file in between and connects gets `ECONNREFUSED`. Tools (and our tests) wait for the
//! file to appear, so [`listen`] binds under a temporary name in the same directory, starts
//! listening, and then renames the socket into place, which is atomic.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest socket path the kernel accepts (`sun_path` holds 108 bytes with the NUL).
const MAX_PATH: usize = 107;

/// Listens on `path`. A stale socket at `path` is replaced; anything else there (a regular
/// file, a directory, a symlink) is refused with `AlreadyExists` and left alone.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
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
        return UnixListener::bind(path);
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
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
        let l = listen(&p).unwrap();
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
    fn a_stale_socket_is_replaced_and_other_files_are_refused() {
        let d = dir("stale");
        let p = d.join("s.sock");
        drop(listen(&p).unwrap());
        assert!(UnixStream::connect(&p).is_err(), "stale socket");
        let l = listen(&p).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        l.accept().unwrap();

        let f = d.join("file");
        std::fs::write(&f, b"keep").unwrap();
        let e = listen(&f).unwrap_err();
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
        let l = listen(&p).unwrap();
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
            let l = listen(&p).unwrap();
            let r = watcher.join().unwrap();
            assert!(r.is_ok(), "try {i}: {r:?}");
            drop(l);
            std::fs::remove_file(&p).unwrap();
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
