// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Registry transfer over a UNIX socket: 1000 fds between two processes, and every way a
//! transfer can be cut short or lie.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::thread;

use cpr_fd::{Error, FdKind, FdRegistry};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const STAGE: &str = "CPR_FD_TRANSFER_STAGE";

/// `n` files with distinct inodes, each holding its index.
fn files(n: usize, tag: &str) -> FdRegistry {
    let dir = std::env::temp_dir().join(format!("cpr-fd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut reg = FdRegistry::new();
    for i in 0..n {
        let path = dir.join(i.to_string());
        let f = std::fs::File::create_new(&path).unwrap();
        f.write_all_at(&(i as u32).to_le_bytes(), 0).unwrap();
        reg.register(
            &format!("file.{i}"),
            FdKind(0x100),
            f,
            &(i as u32).to_le_bytes(),
        )
        .unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
    reg
}

fn check_files(reg: &FdRegistry, n: usize) {
    assert_eq!(reg.len(), n);
    for (i, e) in reg.iter().enumerate() {
        assert_eq!(e.name(), format!("file.{i}"));
        assert_eq!(e.kind(), FdKind(0x100));
        assert_eq!(e.metadata(), (i as u32).to_le_bytes());
        let f = std::fs::File::from(e.fd().try_clone_to_owned().unwrap());
        let mut v = [0u8; 4];
        f.read_exact_at(&mut v, 0).unwrap();
        assert_eq!(
            u32::from_le_bytes(v) as usize,
            i,
            "{} has its own content",
            e.name()
        );
    }
}

#[test]
fn thousand_fds_between_two_processes() {
    if let Ok(path) = std::env::var(STAGE) {
        // The receiving process.
        let mut sock = UnixStream::connect(&path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
        let reg = FdRegistry::receive(&sock).unwrap();
        check_files(&reg, 1000);
        sock.write_all(b"ok").unwrap();
        println!("RECEIVED {}", reg.len());
        return;
    }
    let reg = files(1000, "thousand");
    let path = std::env::temp_dir().join(format!("cpr-fd-sock-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "thousand_fds_between_two_processes",
            "--nocapture",
        ])
        .env(STAGE, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut sock, _) = listener.accept().unwrap();
    std::fs::remove_file(&path).unwrap();
    reg.send(&sock).unwrap();
    let mut ack = [0u8; 2];
    sock.read_exact(&mut ack).unwrap();
    assert_eq!(&ack, b"ok");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("RECEIVED 1000"));
    // The sender still holds its fds (it can resume the guest if the receiver refuses).
    check_files(&reg, 1000);
}

#[test]
fn in_process_round_trip_keeps_order_and_metadata() {
    let reg = files(300, "order");
    let (a, b) = UnixStream::pair().unwrap();
    let t = thread::spawn(move || FdRegistry::receive(&b));
    reg.send(&a).unwrap();
    let got = t.join().unwrap().unwrap();
    check_files(&got, 300);
    for e in got.iter() {
        // SAFETY: F_GETFD only reads descriptor flags.
        let flags = unsafe { libc::fcntl(e.fd().as_raw_fd(), libc::F_GETFD) };
        assert!(
            flags & libc::FD_CLOEXEC != 0,
            "received fds are close-on-exec"
        );
    }
    // An empty registry goes through too.
    let (a, b) = UnixStream::pair().unwrap();
    FdRegistry::new().send(&a).unwrap();
    assert!(FdRegistry::receive(&b).unwrap().is_empty());
}

#[test]
fn a_prefix_goes_before_the_registry_and_the_fds_still_arrive() {
    let reg = files(300, "prefix");
    let prefix: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let (a, b) = UnixStream::pair().unwrap();
    let want = prefix.clone();
    let t = thread::spawn(move || {
        // The receiver reads the prefix with plain reads, as a protocol reads its own frame.
        let mut got = vec![0u8; want.len()];
        (&b).read_exact(&mut got).unwrap();
        assert_eq!(got, want, "the prefix arrives whole and first");
        FdRegistry::receive(&b)
    });
    // In two pieces, as a protocol sends its frame header and the payload it borrows.
    reg.send_after(&a, &[&prefix[..7], &prefix[7..]]).unwrap();
    let got = t.join().unwrap().unwrap();
    check_files(&got, 300);
    // The same bytes as a separate write of the prefix and then `send`.
    assert_eq!(
        header_and_manifest(&reg),
        {
            let (a, mut b) = UnixStream::pair().unwrap();
            reg.send_after(&a, &[b"xyz"]).unwrap();
            drop(a);
            let mut p = [0u8; 3];
            b.read_exact(&mut p).unwrap();
            assert_eq!(&p, b"xyz");
            read_header_and_manifest(&mut b)
        },
        "the prefix changes nothing after it"
    );
}

/// The bytes `send` writes before the fds: header and manifest.
fn header_and_manifest(reg: &FdRegistry) -> Vec<u8> {
    let (a, mut b) = UnixStream::pair().unwrap();
    reg.send(&a).unwrap();
    drop(a);
    read_header_and_manifest(&mut b)
}

/// Reads a registry's header and manifest from `b`.
fn read_header_and_manifest(b: &mut UnixStream) -> Vec<u8> {
    let mut head = [0u8; 16];
    b.read_exact(&mut head).unwrap();
    let len = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
    let mut manifest = vec![0u8; len];
    b.read_exact(&mut manifest).unwrap();
    [head.to_vec(), manifest].concat()
}

fn receive_after(bytes: &[u8], then: impl FnOnce(&UnixStream) + Send + 'static) -> Error {
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(bytes).unwrap();
    let t = thread::spawn(move || {
        then(&a);
        drop(a);
    });
    let e = FdRegistry::receive(&b).unwrap_err();
    t.join().unwrap();
    e
}

#[test]
fn short_reads_are_reported() {
    let reg = files(3, "short");
    let full = header_and_manifest(&reg);
    assert!(matches!(
        receive_after(&full[..10], |_| {}),
        Error::TransferTruncated("header")
    ));
    assert!(matches!(
        receive_after(&full[..40], |_| {}),
        Error::TransferTruncated("manifest")
    ));
    assert!(matches!(
        receive_after(&full, |_| {}),
        Error::TransferTruncated("fd chunk")
    ));
    // A chunk header cut in half after its fds.
    let fds: Vec<RawFd> = reg.iter().map(|e| e.fd().as_raw_fd()).collect();
    let e = receive_after(&full, move |s| {
        s.send_with_fds(&[&[0u8, 0, 0][..]], &fds).unwrap();
    });
    assert!(matches!(e, Error::TransferTruncated("fd chunk")), "{e}");
}

#[test]
fn lies_are_refused() {
    let reg = files(3, "lies");
    let full = header_and_manifest(&reg);
    let mut bad = full.clone();
    bad[0] = b'X';
    assert!(matches!(
        receive_after(&bad, |_| {}),
        Error::BadTransferHeader
    ));
    let mut huge = full.clone();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        receive_after(&huge, |_| {}),
        Error::TooManyFds { .. }
    ));
    let mut big_manifest = full.clone();
    big_manifest[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        receive_after(&big_manifest, |_| {}),
        Error::ManifestTooLarge { .. }
    ));
    let mut count = full.clone();
    count[8] = 2;
    assert!(matches!(
        receive_after(&count, |_| {}),
        Error::ManifestInvalid {
            problem: cpr_fd::ManifestProblem::CountMismatch { .. },
            ..
        }
    ));

    // A chunk with fewer fds than announced.
    let two: Vec<RawFd> = reg.iter().take(2).map(|e| e.fd().as_raw_fd()).collect();
    let e = receive_after(&full, move |s| {
        let mut data = [0u8; 8];
        data[4] = 3;
        s.send_with_fds(&[&data[..]], &two).unwrap();
    });
    assert!(
        matches!(
            e,
            Error::ChunkMismatch {
                chunk: 0,
                expected: 3,
                received: 2
            }
        ),
        "{e}"
    );

    // The right number of fds, but not the files the manifest describes.
    let other = files(3, "other");
    let wrong: Vec<RawFd> = other.iter().map(|e| e.fd().as_raw_fd()).collect();
    let e = receive_after(&full, move |s| {
        let mut data = [0u8; 8];
        data[4] = 3;
        s.send_with_fds(&[&data[..]], &wrong).unwrap();
        drop(other);
    });
    assert!(
        matches!(&e, Error::IdentityMismatch { name, .. } if name == "file.0"),
        "{e}"
    );
}

#[test]
fn truncated_control_message_is_detected() {
    if std::env::var(STAGE).as_deref() == Ok("ctrunc") {
        // In a child process: a low fd limit makes the kernel drop fds (MSG_CTRUNC).
        let reg = files(200, "ctrunc");
        let (a, b) = UnixStream::pair().unwrap();
        let limit = libc::rlimit {
            rlim_cur: 300,
            rlim_max: 300,
        };
        // SAFETY: setrlimit reads the struct we pass; lowering our own limit is allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        // The sender keeps its 200 fds open while the receiver needs 200 more numbers.
        let got = thread::scope(|s| {
            s.spawn(|| reg.send(&a));
            FdRegistry::receive(&b)
        });
        let e = match got {
            Ok(r) => panic!("received {} fds despite the fd limit", r.len()),
            Err(e) => e,
        };
        assert!(matches!(e, Error::ControlTruncated { chunk: 0 }), "{e}");
        let open = cpr_fd::open_fds().unwrap().len();
        assert!(
            open < 260,
            "fds received before the error are closed ({open} open)"
        );
        println!("CTRUNC DETECTED");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "truncated_control_message_is_detected",
            "--nocapture",
        ])
        .env(STAGE, "ctrunc")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("CTRUNC DETECTED"), "{text}");
}
