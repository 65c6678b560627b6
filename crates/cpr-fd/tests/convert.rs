// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Moving the fd types a VMM holds into and out of a registry, without `unsafe`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use cpr_fd::vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use cpr_fd::{FdKind, FdRegistry};

#[test]
fn an_eventfd_goes_in_and_comes_out_the_same_eventfd() {
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    evt.write(5).unwrap();
    let mut reg = FdRegistry::new();
    reg.register_eventfd("irq.0", evt, b"gsi=5").unwrap();
    let e = reg.take("irq.0").unwrap();
    assert_eq!(e.kind(), FdKind::EVENTFD);
    assert_eq!(e.metadata(), b"gsi=5");
    let back = EventFd::try_from(e).unwrap();
    // The counter written before it went in: the very same kernel object.
    assert_eq!(back.read().unwrap(), 5);
}

#[test]
fn a_file_is_not_taken_for_an_eventfd_and_is_given_back_open() {
    let f = File::open("/proc/self/status").unwrap();
    let mut reg = FdRegistry::new();
    reg.register("status", FdKind::OTHER, f, b"").unwrap();
    let e = reg.take("status").unwrap();
    let fd_no = e.fd().as_raw_fd();
    let err = EventFd::try_from(e).unwrap_err();
    assert_eq!(err.expected, "an eventfd");
    assert!(err.to_string().contains("`status`"), "{err}");
    // Nothing was closed: the entry comes back with the same open fd.
    let e = err.into_entry();
    assert_eq!(e.fd().as_raw_fd(), fd_no);
    let mut text = String::new();
    File::from(e).read_to_string(&mut text).unwrap();
    assert!(text.contains("Name:"));
    // And a file is not a socket either.
    let f = File::open("/proc/self/status").unwrap();
    reg.register("status", FdKind::OTHER, f, b"").unwrap();
    let err = UnixStream::try_from(reg.take("status").unwrap()).unwrap_err();
    assert_eq!(err.expected, "a socket");
}

#[test]
fn streams_and_files_go_in_as_they_are() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let mut reg = FdRegistry::new();
    reg.register("console", FdKind::CONSOLE, a, b"").unwrap();
    let mut a = UnixStream::try_from(reg.take("console").unwrap()).unwrap();
    a.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // An eventfd is not a socket.
    reg.register_eventfd("e", EventFd::new(0).unwrap(), b"")
        .unwrap();
    let err = UnixStream::try_from(reg.take("e").unwrap()).unwrap_err();
    assert!(err.found.contains("eventfd"), "{}", err.found);

    // OwnedFd out, any Into<OwnedFd> in.
    let e = err.into_entry();
    let fd: OwnedFd = e.into();
    assert!(fd.as_fd().as_raw_fd() >= 0);
    reg.register("again", FdKind::EVENTFD, fd, b"").unwrap();
    assert!(EventFd::try_from(reg.take("again").unwrap()).is_ok());
}
