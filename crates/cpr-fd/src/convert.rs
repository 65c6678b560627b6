// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Conversions between registry entries and the fd types a VMM holds, so no embedder
//! writes `unsafe` to move an fd in or out of a [`FdRegistry`](crate::FdRegistry).
//!
//! In: [`FdRegistry::register`](crate::FdRegistry::register) takes anything that is
//! `Into<OwnedFd>` (`File`, `UnixStream`, `UnixListener`, `TcpStream`, `OwnedFd`, ...);
//! a vmm-sys-util [`EventFd`] goes through [`eventfd_into_fd`] first (or
//! [`register_eventfd`](crate::FdRegistry::register_eventfd)).
//!
//! Out: `OwnedFd::from(entry)` and `File::from(entry)` always work;
//! `EventFd::try_from(entry)` and `UnixStream::try_from(entry)` first check that the fd is
//! an eventfd or a socket, and give the entry back in the error when it is not.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use vmm_sys_util::eventfd::EventFd;

use crate::registry::FdEntry;
use crate::sys;

/// The fd of `eventfd`, owned.
pub fn eventfd_into_fd(eventfd: EventFd) -> OwnedFd {
    let raw = eventfd.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up the EventFd's ownership of this open fd, so it is ours
    // to own and close exactly once.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// An entry is not the type of fd it was converted to. Holds the entry, so nothing is
/// closed: [`into_entry`](Self::into_entry) gives it back.
#[derive(Debug, thiserror::Error)]
#[error("fd `{}` is {found}, not {expected}", .entry.name())]
pub struct WrongFdType {
    entry: FdEntry,
    /// What it was to be.
    pub expected: &'static str,
    /// What it is (`fstat`'s type, or the anonymous inode's name).
    pub found: String,
}

impl WrongFdType {
    /// The entry, unchanged.
    pub fn into_entry(self) -> FdEntry {
        self.entry
    }
}

impl From<FdEntry> for OwnedFd {
    fn from(entry: FdEntry) -> OwnedFd {
        entry.into_fd()
    }
}

impl From<FdEntry> for File {
    fn from(entry: FdEntry) -> File {
        File::from(entry.into_fd())
    }
}

/// What `/proc/self/fd/N` names: `anon_inode:[eventfd]`, `socket:[123]`, a path...
fn link_of(entry: &FdEntry) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", entry.fd().as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

impl TryFrom<FdEntry> for EventFd {
    type Error = WrongFdType;

    fn try_from(entry: FdEntry) -> Result<EventFd, WrongFdType> {
        let link = link_of(&entry);
        if link != "anon_inode:[eventfd]" {
            return Err(WrongFdType {
                entry,
                expected: "an eventfd",
                found: link,
            });
        }
        let raw = entry.into_fd().into_raw_fd();
        // SAFETY: `raw` is an open eventfd (checked above) whose ownership `into_raw_fd`
        // gave up; the EventFd now owns and closes it.
        Ok(unsafe { EventFd::from_raw_fd(raw) })
    }
}

fn check_socket(entry: FdEntry, expected: &'static str) -> Result<OwnedFd, WrongFdType> {
    match sys::identity(entry.fd()) {
        Ok(id) if id.file_type == libc::S_IFSOCK => Ok(entry.into_fd()),
        _ => {
            let found = link_of(&entry);
            Err(WrongFdType {
                entry,
                expected,
                found,
            })
        }
    }
}

impl TryFrom<FdEntry> for UnixStream {
    type Error = WrongFdType;

    /// Checks that the fd is a socket (not which family: a socket of another family fails
    /// its first call instead).
    fn try_from(entry: FdEntry) -> Result<UnixStream, WrongFdType> {
        check_socket(entry, "a socket").map(UnixStream::from)
    }
}

impl TryFrom<FdEntry> for UnixListener {
    type Error = WrongFdType;

    /// Checks that the fd is a socket, as for `UnixStream`.
    fn try_from(entry: FdEntry) -> Result<UnixListener, WrongFdType> {
        check_socket(entry, "a socket").map(UnixListener::from)
    }
}
