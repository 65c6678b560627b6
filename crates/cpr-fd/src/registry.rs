// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The registry of named fds and its manifest encoding.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::error::{os, Error, ManifestProblem, Result};
use crate::sys;

/// Longest fd name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Largest metadata attached to one fd, in bytes.
pub const MAX_METADATA_LEN: usize = 4096;
/// Largest manifest accepted, in bytes (about 4000 fds with full metadata).
pub const MAX_MANIFEST_LEN: u64 = 16 << 20;
/// Most records a manifest may hold.
pub const MAX_RECORDS: u32 = 65536;

/// What an fd is for. The values below 0x100 are this project's; pick your own above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdKind(pub u16);

impl FdKind {
    /// Guest RAM backing (memfd or file).
    pub const MEMORY: FdKind = FdKind(1);
    /// Serial console backend (file, pty, socket).
    pub const CONSOLE: FdKind = FdKind(2);
    /// Monitor listening socket or connection.
    pub const MONITOR: FdKind = FdKind(3);
    /// An eventfd (irqfd, ioeventfd).
    pub const EVENTFD: FdKind = FdKind(4);
    /// VFIO container.
    pub const VFIO_CONTAINER: FdKind = FdKind(5);
    /// VFIO group.
    pub const VFIO_GROUP: FdKind = FdKind(6);
    /// VFIO device.
    pub const VFIO_DEVICE: FdKind = FdKind(7);
    /// iommufd.
    pub const IOMMUFD: FdKind = FdKind(8);
    /// Saved device state (a memfd).
    pub const STATE: FdKind = FdKind(9);
    /// Anything else.
    pub const OTHER: FdKind = FdKind(0xff);
}

/// Identity of an open file: what `fstat` says, enough to tell whether an fd number still
/// refers to the file that was registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdIdentity {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_mode & S_IFMT`.
    pub file_type: u32,
}

impl std::fmt::Display for FdIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.file_type {
            libc::S_IFREG => "file",
            libc::S_IFDIR => "directory",
            libc::S_IFCHR => "char device",
            libc::S_IFBLK => "block device",
            libc::S_IFIFO => "pipe",
            libc::S_IFSOCK => "socket",
            libc::S_IFLNK => "symlink",
            _ => "object",
        };
        write!(f, "{kind} dev {:#x} inode {}", self.dev, self.ino)
    }
}

/// A registered fd.
#[derive(Debug)]
pub struct FdEntry {
    name: String,
    kind: FdKind,
    metadata: Vec<u8>,
    fd: OwnedFd,
}

impl FdEntry {
    pub(crate) fn new(name: String, kind: FdKind, metadata: Vec<u8>, fd: OwnedFd) -> Self {
        FdEntry {
            name,
            kind,
            metadata,
            fd,
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its kind.
    pub fn kind(&self) -> FdKind {
        self.kind
    }
    /// The owner's metadata bytes.
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }
    /// The fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    /// Gives up the entry, returning the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

/// Named fds to carry into the next VMM image, by exec or over a UNIX socket.
///
/// The registry owns its fds. Names are unique. Clearing close-on-exec happens only in
/// [`prepare`](FdRegistry::prepare), never by registering.
#[derive(Debug, Default)]
pub struct FdRegistry {
    pub(crate) entries: Vec<FdEntry>,
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::InvalidName(name.to_string()));
    }
    Ok(())
}

impl FdRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `fd` (an `OwnedFd`, `File`, `UnixStream`, ...: anything `Into<OwnedFd>`)
    /// under `name`. On error the fd is closed, so register a duplicate (`try_clone`) of
    /// anything you still need.
    pub fn register(
        &mut self,
        name: &str,
        kind: FdKind,
        fd: impl Into<OwnedFd>,
        metadata: &[u8],
    ) -> Result<()> {
        let fd = fd.into();
        validate_name(name)?;
        if self.contains(name) {
            return Err(Error::DuplicateName(name.to_string()));
        }
        if metadata.len() > MAX_METADATA_LEN {
            return Err(Error::MetadataTooLarge {
                name: name.to_string(),
                len: metadata.len(),
                max: MAX_METADATA_LEN,
            });
        }
        self.entries.push(FdEntry {
            name: name.to_string(),
            kind,
            metadata: metadata.to_vec(),
            fd,
        });
        Ok(())
    }

    /// Registers a vmm-sys-util `EventFd` under `name` as [`FdKind::EVENTFD`];
    /// `EventFd::try_from(entry)` turns the entry back into one.
    pub fn register_eventfd(
        &mut self,
        name: &str,
        eventfd: vmm_sys_util::eventfd::EventFd,
        metadata: &[u8],
    ) -> Result<()> {
        let fd = crate::convert::eventfd_into_fd(eventfd);
        self.register(name, FdKind::EVENTFD, fd, metadata)
    }

    /// A registry with a duplicate of every fd (same names, kinds and metadata, in order).
    /// The duplicates are close-on-exec.
    pub fn try_clone(&self) -> Result<FdRegistry> {
        let mut out = FdRegistry::new();
        for e in &self.entries {
            let fd = e.fd.try_clone().map_err(os("dup registered fd"))?;
            out.entries.push(FdEntry {
                name: e.name.clone(),
                kind: e.kind,
                metadata: e.metadata.clone(),
                fd,
            });
        }
        Ok(out)
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// The entry registered under `name`.
    pub fn get(&self, name: &str) -> Option<&FdEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Removes and returns the entry registered under `name`.
    pub fn take(&mut self, name: &str) -> Option<FdEntry> {
        let i = self.entries.iter().position(|e| e.name == name)?;
        Some(self.entries.remove(i))
    }

    /// Removes and returns every entry of `kind`, in registration order.
    pub fn take_kind(&mut self, kind: FdKind) -> Vec<FdEntry> {
        let (taken, kept) = std::mem::take(&mut self.entries)
            .into_iter()
            .partition(|e| e.kind == kind);
        self.entries = kept;
        taken
    }

    /// Entries in registration order.
    pub fn iter(&self) -> impl Iterator<Item = &FdEntry> {
        self.entries.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The process's open fds that are neither stdio (0-2) nor in this registry, with what
    /// they point at, so leaks are visible (tests, a debug command).
    pub fn unregistered_open_fds(&self) -> Result<Vec<(RawFd, PathBuf)>> {
        let mine: Vec<RawFd> = self.entries.iter().map(|e| e.fd.as_raw_fd()).collect();
        Ok(open_fds()?
            .into_iter()
            .filter(|fd| *fd > 2 && !mine.contains(fd))
            .map(|fd| {
                let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
                (fd, target)
            })
            .collect())
    }
}

/// Every open fd number of this process.
pub fn open_fds() -> Result<Vec<RawFd>> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(os("list /proc/self/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory fd used for listing is closed now: keep only what is still open.
    Ok(listed
        .into_iter()
        .filter(|fd| sys::fd_flags(*fd).is_some())
        .collect())
}

/// One fd as recorded in a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FdRecord {
    pub name: String,
    /// fd number (exec) or position in the transfer (transfer).
    pub fd: i32,
    pub kind: u16,
    pub dev: u64,
    pub ino: u64,
    pub file_type: u32,
    pub metadata: Vec<u8>,
}

impl FdRecord {
    pub fn identity(&self) -> FdIdentity {
        FdIdentity {
            dev: self.dev,
            ino: self.ino,
            file_type: self.file_type,
        }
    }
}

/// The list of fds handed to the next image, in its own small format (independent of any
/// snapshot encoding), all integers little-endian:
///
/// ```text
/// magic "CPRFDMF1" (8) | format version u16 (1) | record count u32
/// per record: name length u8 | name (UTF-8) | fd i32 | kind u16 | dev u64 | ino u64
///             | file type u32 | metadata length u32 | metadata
/// ```
///
/// A reader refuses another version, a truncated or overlong manifest, invalid or repeated
/// names, repeated fds and oversized metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FdManifest {
    pub records: Vec<FdRecord>,
}

const MANIFEST_MAGIC: &[u8; 8] = b"CPRFDMF1";
const MANIFEST_VERSION: u16 = 1;

impl FdManifest {
    /// Records every entry; `number` gives each its fd field.
    pub fn of(registry: &FdRegistry, number: impl Fn(usize, &FdEntry) -> i32) -> Result<Self> {
        let mut records = Vec::with_capacity(registry.len());
        for (i, e) in registry.entries.iter().enumerate() {
            let id = sys::identity(e.fd()).map_err(os("fstat registered fd"))?;
            records.push(FdRecord {
                name: e.name.clone(),
                fd: number(i, e),
                kind: e.kind.0,
                dev: id.dev,
                ino: id.ino,
                file_type: id.file_type,
                metadata: e.metadata.clone(),
            });
        }
        Ok(FdManifest { records })
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = MANIFEST_MAGIC.to_vec();
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.records.len() as u32).to_le_bytes());
        for r in &self.records {
            // Names are validated at registration: at most MAX_NAME_LEN (< 256) bytes.
            out.push(r.name.len() as u8);
            out.extend_from_slice(r.name.as_bytes());
            out.extend_from_slice(&r.fd.to_le_bytes());
            out.extend_from_slice(&r.kind.to_le_bytes());
            out.extend_from_slice(&r.dev.to_le_bytes());
            out.extend_from_slice(&r.ino.to_le_bytes());
            out.extend_from_slice(&r.file_type.to_le_bytes());
            out.extend_from_slice(&(r.metadata.len() as u32).to_le_bytes());
            out.extend_from_slice(&r.metadata);
        }
        Ok(out)
    }

    /// Decodes and checks names, metadata sizes and fd uniqueness.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut c = Cursor { b: bytes, at: 0 };
        if c.take(8)? != MANIFEST_MAGIC {
            return Err(c.bad(0, ManifestProblem::BadMagic));
        }
        let version = c.u16()?;
        if version != MANIFEST_VERSION {
            return Err(c.bad(8, ManifestProblem::UnsupportedVersion(version)));
        }
        let count = c.u32()?;
        if count > MAX_RECORDS {
            return Err(c.bad(10, ManifestProblem::TooManyRecords(count)));
        }
        let mut records = Vec::with_capacity((count as usize).min(1024));
        let mut names = std::collections::HashSet::new();
        let mut fds = std::collections::HashSet::new();
        for _ in 0..count {
            let at = c.at;
            let n = c.take(1)?[0] as usize;
            let name = String::from_utf8_lossy(c.take(n)?).into_owned();
            if validate_name(&name).is_err() {
                return Err(c.bad(at, ManifestProblem::InvalidName(name)));
            }
            let fd = i32::from_le_bytes(c.array()?);
            let kind = c.u16()?;
            let dev = u64::from_le_bytes(c.array()?);
            let ino = u64::from_le_bytes(c.array()?);
            let file_type = c.u32()?;
            let len = c.u32()? as usize;
            if len > MAX_METADATA_LEN {
                return Err(c.bad(at, ManifestProblem::MetadataTooLarge(name)));
            }
            let metadata = c.take(len)?.to_vec();
            if !names.insert(name.clone()) {
                return Err(c.bad(at, ManifestProblem::DuplicateName(name)));
            }
            if !fds.insert(fd) {
                return Err(c.bad(at, ManifestProblem::DuplicateFd(fd)));
            }
            records.push(FdRecord {
                name,
                fd,
                kind,
                dev,
                ino,
                file_type,
                metadata,
            });
        }
        if c.at != bytes.len() {
            return Err(c.bad(c.at, ManifestProblem::TrailingBytes));
        }
        Ok(FdManifest { records })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bad(&self, offset: usize, problem: ManifestProblem) -> Error {
        Error::ManifestInvalid { offset, problem }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(Error::ManifestInvalid {
                offset: self.at,
                problem: ManifestProblem::Truncated,
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn names_are_unique_and_checked() {
        let mut r = FdRegistry::new();
        r.register("a", FdKind::OTHER, devnull(), b"meta").unwrap();
        assert!(matches!(
            r.register("a", FdKind::OTHER, devnull(), b""),
            Err(Error::DuplicateName(n)) if n == "a"
        ));
        assert!(matches!(
            r.register("", FdKind::OTHER, devnull(), b""),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            r.register("x\n", FdKind::OTHER, devnull(), b""),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            r.register("big", FdKind::OTHER, devnull(), &[0; MAX_METADATA_LEN + 1]),
            Err(Error::MetadataTooLarge { .. })
        ));
        assert_eq!(r.len(), 1);
        assert_eq!(r.get("a").unwrap().metadata(), b"meta");
        assert!(r.take("a").is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn a_clone_has_its_own_fds_for_the_same_files() {
        let mut r = FdRegistry::new();
        r.register("a", FdKind::CONSOLE, devnull(), b"m").unwrap();
        let c = r.try_clone().unwrap();
        let (a, b) = (r.get("a").unwrap(), c.get("a").unwrap());
        assert_ne!(a.fd().as_raw_fd(), b.fd().as_raw_fd());
        assert_eq!(
            sys::identity(a.fd()).unwrap(),
            sys::identity(b.fd()).unwrap()
        );
        assert_eq!((b.kind(), b.metadata()), (FdKind::CONSOLE, &b"m"[..]));
        drop(r);
        assert!(sys::fd_flags(b.fd().as_raw_fd()).is_some(), "still open");
    }

    #[test]
    fn take_kind_keeps_the_rest_in_order() {
        let mut r = FdRegistry::new();
        for (n, k) in [
            ("m0", FdKind::MEMORY),
            ("c", FdKind::CONSOLE),
            ("m1", FdKind::MEMORY),
        ] {
            r.register(n, k, devnull(), b"").unwrap();
        }
        let mem: Vec<_> = r
            .take_kind(FdKind::MEMORY)
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(mem, vec!["m0", "m1"]);
        assert_eq!(r.iter().map(|e| e.name()).collect::<Vec<_>>(), vec!["c"]);
    }

    #[test]
    fn manifest_round_trip_and_validation() {
        let mut r = FdRegistry::new();
        r.register("null", FdKind::CONSOLE, devnull(), &[1, 2, 3])
            .unwrap();
        let m = FdManifest::of(&r, |i, _| 10 + i as i32).unwrap();
        let bytes = m.encode().unwrap();
        assert_eq!(FdManifest::decode(&bytes).unwrap(), m);
        let mut twice = m.clone();
        twice.records.push(m.records[0].clone());
        assert!(matches!(
            FdManifest::decode(&twice.encode().unwrap()),
            Err(Error::ManifestInvalid { problem: ManifestProblem::DuplicateName(n), .. }) if n == "null"
        ));
        assert!(matches!(
            FdManifest::decode(b"garbage"),
            Err(Error::ManifestInvalid {
                problem: ManifestProblem::Truncated,
                offset: 0
            })
        ));
        assert!(matches!(
            FdManifest::decode(b"CPRFDMF2\x01\x00\x00\x00\x00\x00"),
            Err(Error::ManifestInvalid {
                problem: ManifestProblem::BadMagic,
                ..
            })
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            FdManifest::decode(&v2),
            Err(Error::ManifestInvalid {
                problem: ManifestProblem::UnsupportedVersion(2),
                offset: 8
            })
        ));
        // Every cut is refused, and so is a byte more.
        for cut in 0..bytes.len() {
            assert!(FdManifest::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            FdManifest::decode(&longer),
            Err(Error::ManifestInvalid {
                problem: ManifestProblem::TrailingBytes,
                ..
            })
        ));
        let mut same_fd = m.clone();
        let mut other = m.records[0].clone();
        other.name = "other".into();
        same_fd.records.push(other);
        assert!(matches!(
            FdManifest::decode(&same_fd.encode().unwrap()),
            Err(Error::ManifestInvalid {
                problem: ManifestProblem::DuplicateFd(10),
                ..
            })
        ));
        let mut huge_count = bytes.clone();
        huge_count[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FdManifest::decode(&huge_count),
            Err(Error::ManifestInvalid {
                problem: ManifestProblem::TooManyRecords(_),
                ..
            })
        ));
    }

    #[test]
    fn unregistered_fds_are_listed() {
        let r = FdRegistry::new();
        let f = std::fs::File::open("/dev/null").unwrap();
        let listed = r.unregistered_open_fds().unwrap();
        assert!(listed
            .iter()
            .any(|(fd, p)| *fd == f.as_raw_fd() && p.ends_with("null")));
        let mut r = FdRegistry::new();
        let raw = f.as_raw_fd();
        r.register("null", FdKind::OTHER, f, b"").unwrap();
        assert!(!r
            .unregistered_open_fds()
            .unwrap()
            .iter()
            .any(|(fd, _)| *fd == raw));
    }
}
