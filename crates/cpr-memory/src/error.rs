// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of guest memory set-up and reattach.

use std::path::PathBuf;

use crate::layout::{BackendKind, UpdateMode};

/// Errors from creating, reattaching or checking guest memory. Region errors carry the
/// region's index in the layout and its backing name (fd name or path).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A region description is unusable (zero size, misaligned, address overflow).
    #[error("region {index} (`{name}`): {reason}")]
    InvalidRegion {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// What is wrong.
        reason: RegionProblem,
    },
    /// Two regions overlap in guest physical address space.
    #[error("regions {first} and {second} overlap at guest address {addr:#x}")]
    Overlap {
        /// Lower region index.
        first: usize,
        /// Higher region index.
        second: usize,
        /// Start of the overlap.
        addr: u64,
    },
    /// Two regions name the same backing fd or file.
    #[error("regions {first} and {second} both use backing `{name}`")]
    DuplicateBacking {
        /// First region index.
        first: usize,
        /// Second region index.
        second: usize,
        /// The shared name.
        name: String,
    },
    /// A system call on a region's backing failed.
    #[error("region {index} (`{name}`): {op}: {source}")]
    Os {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A backing file or fd to reattach is not there.
    #[error("region {index}: backing `{name}` is missing")]
    MissingBacking {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
    },
    /// The backing is not of the kind the layout recorded.
    #[error(
        "region {index} (`{name}`): backing is {}, {} expected",
        found.map_or("neither a regular file nor a DAX device", BackendKind::as_str),
        expected.map_or("a memfd, a regular file or a DAX device", BackendKind::as_str)
    )]
    WrongKind {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// The kind the layout recorded; `None` when any memory backing would do.
        expected: Option<BackendKind>,
        /// The kind found; `None` for something no memory can be mapped from (a pipe, a
        /// directory, a character device other than DAX).
        found: Option<BackendKind>,
    },
    /// The backing is smaller than offset + size: mapping it would SIGBUS later.
    #[error("region {index} (`{name}`): backing has {have} bytes, needs offset + size = {need}")]
    TooSmall {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// The backing's page size differs from the layout's.
    #[error("region {index} (`{name}`): page size {found} differs from the layout's {expected}")]
    PageSizeMismatch {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Page size in the layout.
        expected: u64,
        /// Page size found.
        found: u64,
    },
    /// A sealed memfd has another size than the one recorded when it was sealed.
    #[error(
        "region {index} (`{name}`): sealed memfd has {found} bytes, layout recorded {expected}"
    )]
    SealedSizeMismatch {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Size recorded.
        expected: u64,
        /// Size found.
        found: u64,
    },
    /// A memfd is not sealed against shrinking and growing.
    #[error("region {index} (`{name}`): memfd is not sealed against resizing (seals {seals:#x})")]
    NotSealed {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Seals found.
        seals: u32,
    },
    /// vm-memory refused the regions.
    #[error("guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestRegionCollectionError),
    /// The memory layout cannot support an update mode.
    #[error("{mode} update is not possible: region {index} (`{name}`) {reason}")]
    ModeUnsupported {
        /// The mode asked for.
        mode: UpdateMode,
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Why.
        reason: ModeProblem,
    },
    /// The layout has no region.
    #[error("guest memory layout has no region")]
    Empty,
    /// The host has too few free huge pages for a backing.
    #[error(
        "region {index} (`{name}`): needs {needed} free huge pages of {page_size} bytes, the host \
         has {available} (raise /proc/sys/vm/nr_hugepages or use 4 KiB pages)"
    )]
    NoHugePages {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Huge page size.
        page_size: u64,
        /// Pages needed.
        needed: u64,
        /// Pages free and not reserved.
        available: u64,
    },
    /// The layout has no stamp page, or the memory is anonymous.
    #[error("guest memory has no stamp page")]
    NoStamp,
    /// [`GuestRam::adopt`](crate::GuestRam::adopt) got another number of names than the
    /// memory has regions.
    #[error("the memory has {regions} regions but {names} names were given")]
    NameCount {
        /// Regions in the memory.
        regions: usize,
        /// Names given.
        names: usize,
    },
    /// Registering a backing's fd failed.
    #[error(transparent)]
    Fd(#[from] cpr_fd::Error),
    /// A backing path is not usable.
    #[error("path `{path}`: {reason}")]
    BadPath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
}

/// What is wrong with a region.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegionProblem {
    /// Its size is zero.
    #[error("size is zero")]
    ZeroSize,
    /// Its page size is not a power of two of at least 4096.
    #[error("page size {0} is not a power of two >= 4096")]
    BadPageSize(u64),
    /// A size, address or offset is not a multiple of the page size.
    #[error("{what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Misaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size.
        page_size: u64,
    },
    /// The guest address or the backing offset plus the size overflows.
    #[error("address or offset plus size overflows")]
    Overflow,
    /// The size does not fit this process's address space.
    #[error("size does not fit the address space")]
    TooLarge,
    /// It shares a backing with another region but not its kind or options.
    #[error("shares its backing with region {0} but not its kind or options")]
    SharedBackingMismatch(usize),
    /// It overlaps another region in their shared backing.
    #[error("overlaps region {0} in their shared backing")]
    OverlapsInBacking(usize),
    /// A memfd name that memfd_create refuses.
    #[error("memfd name must be 1 to 249 bytes without '/' or NUL")]
    BadMemfdName,
    /// `MAP_NORESERVE` asked for huge pages, which would SIGBUS when the pool runs out.
    #[error("MAP_NORESERVE with huge pages would SIGBUS when the pool runs out")]
    HugeNoReserve,
    /// A private (copy-on-write) file mapping: the guest's writes never reach the file.
    #[error("is a private mapping of its file, so the guest's writes never reach it")]
    PrivateMapping,
    /// Its path names another file than the one mapped.
    #[error("the path names another file than the one mapped")]
    NotTheMappedFile,
    /// Anonymous memory, which nothing can reattach.
    #[error("anonymous memory does not survive; there is nothing to reattach")]
    Anonymous,
    /// The stamp page is misplaced.
    #[error("stamp at offset {offset:#x}: {problem}")]
    Stamp {
        /// Its offset in the backing.
        offset: u64,
        /// What is wrong.
        problem: StampProblem,
    },
}

/// What is wrong with where the stamp page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StampProblem {
    /// Not on a page boundary.
    #[error("not on a page boundary")]
    Misaligned,
    /// Past the end of the backing.
    #[error("beyond the end of the backing")]
    BeyondBacking,
    /// Inside a region's guest memory.
    #[error("inside guest memory")]
    InsideGuestMemory,
    /// In anonymous memory.
    #[error("in anonymous memory")]
    Anonymous,
}

/// Why an update mode cannot keep a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModeProblem {
    /// Anonymous memory is lost when the process execs or exits.
    #[error(
        "is anonymous (volatile) memory, which is lost when the process execs or exits; start \
         the VM with memfd or file-backed memory"
    )]
    Anonymous,
    /// A memfd has no path a new process could open after the old one exits.
    #[error(
        "is a memfd, which has no path a new process could open after the old one exits; use a \
         file in /dev/shm or a DAX device for reboot"
    )]
    MemfdForReboot,
}

/// Something an operator should know about a mode that works.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Warning {
    /// A tmpfs or hugetlbfs file outlives the VMM's exit but not a host kexec.
    #[error(
        "region {index} (`{name}`) is {kind}: it survives the VMM exiting, but not a real host \
         kexec (use a DAX device for that)"
    )]
    LostOnKexec {
        /// Region index.
        index: usize,
        /// Backing name.
        name: String,
        /// Its kind.
        kind: crate::layout::BackendKind,
    },
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
