// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Real `execve` of this test binary: registered fds arrive with their identity, nothing
//! else leaks, a failed exec leaves everything usable, and bad hand-offs are refused.
//!
//! Each test re-runs itself in a child process (`--exact NAME`) with `CPR_FD_STAGE` set, so
//! the child is single-threaded and can exec in place without disturbing other tests.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use cpr_fd::{reclaim, Error, FdKind, FdRegistry, MANIFEST_ENV};
use vmm_sys_util::eventfd::EventFd;

const STAGE: &str = "CPR_FD_STAGE";

fn test_args(test: &str) -> Vec<OsString> {
    ["--exact", test, "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect()
}

/// Runs `test` again in a child process at `stage`; returns its combined output after
/// asserting it succeeded.
fn run_stage(test: &str, stage: &str, env: &[(&str, String)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(test_args(test))
        .env(STAGE, stage)
        .env_remove(MANIFEST_ENV);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "stage {stage} failed:\n{text}");
    text
}

/// Re-execs this process image (same pid) into `stage` of `test`.
fn exec_stage(test: &str, stage: &str) -> ! {
    let err = Command::new(std::env::current_exe().unwrap())
        .args(test_args(test))
        .env(STAGE, stage)
        .exec();
    panic!("exec failed: {err}");
}

fn cloexec(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads descriptor flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert!(flags >= 0, "fd {fd} is not open");
    flags & libc::FD_CLOEXEC != 0
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads descriptor flags; a closed fd gives EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// An fd without close-on-exec that nobody registered: it must not survive exec.
fn stray_fd() -> RawFd {
    let f = std::fs::File::open("/dev/null").unwrap();
    // SAFETY: dup returns a new fd (without close-on-exec) or -1; we own the result.
    let fd = unsafe { libc::dup(f.as_raw_fd()) };
    assert!(fd > 2);
    fd
}

fn identity(fd: impl AsFd) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap());
    let m = f.metadata().unwrap();
    (m.dev(), m.ino())
}

fn eventfd_owned(ev: EventFd) -> OwnedFd {
    use std::os::fd::IntoRawFd;
    // SAFETY: into_raw_fd gives up the EventFd's ownership of its fd to us.
    unsafe { OwnedFd::from_raw_fd(ev.into_raw_fd()) }
}

/// A registry with an eventfd holding 7, one end of a socket pair with "hello" waiting on
/// the other, a pipe, and a temporary file.
fn sample_registry() -> (FdRegistry, BTreeMap<String, (u64, u64)>) {
    let mut reg = FdRegistry::new();
    let mut ids = BTreeMap::new();
    let ev = EventFd::new(0).unwrap();
    ev.write(7).unwrap();
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(b"hello").unwrap();
    let (pr, pw) = std::io::pipe().unwrap();
    let path = std::env::temp_dir().join(format!("cpr-fd-exec-{}", std::process::id()));
    let file = std::fs::File::create_new(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let items: Vec<(&str, FdKind, OwnedFd)> = vec![
        ("irq.0", FdKind::EVENTFD, eventfd_owned(ev)),
        ("monitor", FdKind::MONITOR, b.into()),
        ("pipe.read", FdKind::OTHER, pr.into()),
        ("pipe.write", FdKind::OTHER, pw.into()),
        ("state", FdKind::STATE, file.into()),
    ];
    for (i, (name, kind, fd)) in items.into_iter().enumerate() {
        ids.insert(name.to_string(), identity(&fd));
        reg.register(name, kind, fd, &[i as u8, 0xab]).unwrap();
    }
    drop(a); // "hello" stays queued on the socket
    (reg, ids)
}

fn encode_ids(ids: &BTreeMap<String, (u64, u64)>) -> String {
    ids.iter()
        .map(|(n, (d, i))| format!("{n}={d}:{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn check_reclaimed(reg: &mut FdRegistry) {
    assert!(std::env::var_os(MANIFEST_ENV).is_none(), "variable removed");
    let expected = std::env::var("CPR_FD_IDS").unwrap();
    let mut n = 0;
    for item in expected.split(',') {
        let (name, id) = item.split_once('=').unwrap();
        let e = reg.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let (d, i) = identity(e.fd());
        assert_eq!(format!("{d}:{i}"), id, "{name} is the same file");
        assert!(cloexec(e.fd().as_raw_fd()), "{name} is close-on-exec again");
        assert_eq!(e.metadata()[1], 0xab);
        n += 1;
    }
    assert_eq!(n, reg.len());
    assert_eq!(reg.get("irq.0").unwrap().kind(), FdKind::EVENTFD);
    // The objects, not just their numbers, came through.
    let ev = std::fs::File::from(reg.take("irq.0").unwrap().into_fd());
    let mut v = [0u8; 8];
    (&ev).read_exact(&mut v).unwrap();
    assert_eq!(u64::from_ne_bytes(v), 7);
    let mut sock = UnixStream::from(reg.take("monitor").unwrap().into_fd());
    let mut hello = [0u8; 5];
    sock.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hello");
    let leaks = reg.unregistered_open_fds().unwrap();
    // Only the two fds taken out above are open beyond the registry.
    let leaks: Vec<_> = leaks
        .into_iter()
        .filter(|(fd, _)| *fd != ev.as_raw_fd() && *fd != sock.as_raw_fd())
        .collect();
    assert!(leaks.is_empty(), "unexpected fds after exec: {leaks:?}");
}

#[test]
fn registered_fds_survive_exec_and_nothing_else_does() {
    const TEST: &str = "registered_fds_survive_exec_and_nothing_else_does";
    match std::env::var(STAGE).as_deref() {
        Ok("before") => {
            let (mut reg, ids) = sample_registry();
            let stray = stray_fd();
            assert!(!cloexec(stray));
            std::env::set_var("CPR_FD_IDS", encode_ids(&ids));
            std::env::set_var(STAGE, "after");
            println!("pid {}", std::process::id());
            let prepared = reg.prepare().unwrap();
            let err = prepared.exec_self(&test_args(TEST));
            panic!("exec failed: {err}");
        }
        Ok("after") => {
            println!("pid {}", std::process::id());
            let mut reg = reclaim().unwrap().expect("a manifest was handed over");
            check_reclaimed(&mut reg);
            println!("RECLAIMED OK");
        }
        _ => {
            let out = run_stage(TEST, "before", &[]);
            assert!(out.contains("RECLAIMED OK"), "{out}");
            let pids: Vec<&str> = out
                .lines()
                .filter_map(|l| l.split_once("pid ").map(|p| p.1))
                .collect();
            assert_eq!(pids.len(), 2, "{out}");
            assert_eq!(pids[0], pids[1], "exec in place keeps the pid");
        }
    }
}

#[test]
fn failed_exec_leaves_everything_usable() {
    const TEST: &str = "failed_exec_leaves_everything_usable";
    match std::env::var(STAGE).as_deref() {
        Ok("before") => {
            let (mut reg, ids) = sample_registry();
            let stray = stray_fd();
            let manifest_fd;
            {
                let prepared = reg.prepare().unwrap();
                manifest_fd = prepared.env_value().parse::<RawFd>().unwrap();
                assert!(!cloexec(manifest_fd));
                assert!(cloexec(stray), "prepare guards unregistered fds");
                let err = prepared.exec(std::path::Path::new("/nonexistent/vmm"), &[]);
                assert!(
                    matches!(&err, Error::Exec { source, .. } if source.raw_os_error() == Some(libc::ENOENT)),
                    "{err}"
                );
            }
            for e in reg.iter() {
                assert!(
                    cloexec(e.fd().as_raw_fd()),
                    "{} is close-on-exec again",
                    e.name()
                );
            }
            assert!(!cloexec(stray), "the stray fd's flags are restored");
            assert!(!is_open(manifest_fd), "the manifest is discarded");
            assert_eq!(reg.len(), 5);
            // Everything still works: a second attempt succeeds.
            // SAFETY: stray is ours and not used afterwards.
            drop(unsafe { OwnedFd::from_raw_fd(stray) });
            std::env::set_var("CPR_FD_IDS", encode_ids(&ids));
            std::env::set_var(STAGE, "after");
            let err = reg.prepare().unwrap().exec_self(&test_args(TEST));
            panic!("exec failed: {err}");
        }
        Ok("after") => {
            let mut reg = reclaim().unwrap().unwrap();
            check_reclaimed(&mut reg);
            println!("RETRY OK");
        }
        _ => {
            let out = run_stage(TEST, "before", &[]);
            assert!(out.contains("RETRY OK"), "{out}");
        }
    }
}

#[test]
fn reclaim_refuses_bad_handoffs() {
    const TEST: &str = "reclaim_refuses_bad_handoffs";
    let stage = std::env::var(STAGE);
    match stage.as_deref() {
        // Before exec: damage the hand-off in one way.
        Ok(s @ ("missing" | "mismatch")) => {
            let (mut reg, _) = sample_registry();
            let target = reg.get("pipe.read").unwrap().fd().as_raw_fd();
            let prepared = reg.prepare().unwrap();
            let null = std::fs::File::open("/dev/null").unwrap();
            // SAFETY: deliberately breaks the registry's fd right before exec; the process
            // image is replaced (or the test panics) before the registry would use it.
            unsafe {
                if s == "missing" {
                    libc::close(target);
                } else {
                    libc::dup2(null.as_raw_fd(), target);
                }
            }
            std::env::set_var(STAGE, format!("after-{s}"));
            std::env::set_var("CPR_FD_TARGET", target.to_string());
            let err = prepared.exec_self(&test_args(TEST));
            panic!("exec failed: {err}");
        }
        Ok("foreign") => {
            let stray = stray_fd();
            std::env::set_var(MANIFEST_ENV, stray.to_string());
            std::env::set_var("CPR_FD_TARGET", stray.to_string());
            exec_stage(TEST, "after-foreign");
        }
        // After exec: reclaim must refuse, name the problem, and leak nothing.
        Ok("after-missing") => {
            let e = reclaim().unwrap_err();
            assert!(
                matches!(&e, Error::FdMissing { name, .. } if name == "pipe.read"),
                "{e}"
            );
            let leftover: Vec<_> = cpr_fd::open_fds()
                .unwrap()
                .into_iter()
                .filter(|f| *f > 2)
                .collect();
            assert!(
                leftover.is_empty(),
                "matched fds are closed on error: {leftover:?}"
            );
            println!("REFUSED: {e}");
        }
        Ok("after-mismatch") => {
            let e = reclaim().unwrap_err();
            assert!(
                matches!(&e, Error::IdentityMismatch { name, .. } if name == "pipe.read"),
                "{e}"
            );
            let target: RawFd = std::env::var("CPR_FD_TARGET").unwrap().parse().unwrap();
            let leftover: Vec<_> = cpr_fd::open_fds()
                .unwrap()
                .into_iter()
                .filter(|f| *f > 2)
                .collect();
            assert_eq!(
                leftover,
                vec![target],
                "only the foreign file is left, untouched"
            );
            println!("REFUSED: {e}");
        }
        Ok("after-foreign") => {
            let e = reclaim().unwrap_err();
            assert!(matches!(e, Error::NotManifest { .. }), "{e}");
            let target: RawFd = std::env::var("CPR_FD_TARGET").unwrap().parse().unwrap();
            assert!(is_open(target), "a foreign fd is not closed");
            assert!(std::env::var_os(MANIFEST_ENV).is_none());
            println!("REFUSED: {e}");
        }
        Ok("garbage") => {
            let e = reclaim().unwrap_err();
            assert!(matches!(e, Error::BadVariable { .. }), "{e}");
            assert!(std::env::var_os(MANIFEST_ENV).is_none());
            println!("REFUSED: {e}");
        }
        Ok(other) => panic!("unknown stage {other}"),
        Err(_) => {
            for s in ["missing", "mismatch", "foreign"] {
                let out = run_stage(TEST, s, &[]);
                assert!(out.contains("REFUSED"), "{s}: {out}");
            }
            let out = run_stage(TEST, "garbage", &[(MANIFEST_ENV, "not-a-number".into())]);
            assert!(out.contains("REFUSED"), "{out}");
        }
    }
}

#[test]
fn no_variable_means_no_registry() {
    if std::env::var_os(MANIFEST_ENV).is_none() {
        assert!(reclaim().unwrap().is_none());
    }
}
