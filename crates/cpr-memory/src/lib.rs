// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest RAM that outlives the VMM process.
//!
//! A restarted (exec'd) or rebooted VMM maps the same pages instead of copying them: guest
//! RAM lives in a sealed memfd (found again through its fd, inherited across exec or sent
//! over a UNIX socket) or in a file (tmpfs, hugetlbfs, a DAX device), found again by path.
//! [`GuestRam`] builds vm-memory regions over such backings and records a [`MemoryLayout`]
//! that is saved as a cpr-snapshot section and used to [`reattach`](GuestRam::reattach).
//!
//! Set-up touches no page unless prefaulting is asked for, so creating 16 GiB costs about
//! what 1 GiB does. Reattach validates every backing before mapping anything, so a wrong or
//! short backing is a typed error naming the region, never a SIGBUS inside the guest.
//!
//! ```
//! use std::collections::HashMap;
//! use std::os::fd::OwnedFd;
//! use cpr_memory::{GuestRam, MemoryOptions, RegionSpec};
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let ram = GuestRam::builder()
//!     .region(RegionSpec::memfd("guest-ram.0", 0, 64 << 20))
//!     .build()?;
//! ram.memory().write_obj(42u64, GuestAddress(0x2000)).unwrap();
//!
//! // Later, in the new process image, with the fd handed over under its name:
//! let mut fds: HashMap<String, OwnedFd> = ram
//!     .memfds()
//!     .into_iter()
//!     .map(|(name, fd)| (name.to_string(), fd.try_clone_to_owned().unwrap()))
//!     .collect();
//! let again = GuestRam::reattach(ram.layout(), &mut fds, &MemoryOptions::default())?;
//! assert_eq!(again.memory().read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 42);
//! # Ok::<(), cpr_memory::Error>(())
//! ```
#![deny(missing_docs)]

mod adopt;
mod error;
mod layout;
mod ram;
mod stamp;
mod sys;

pub use adopt::{create_memfd, ReattachArgs};
pub use error::{Error, ModeProblem, RegionProblem, Result, StampProblem, Warning};
pub use layout::{BackendKind, MemoryLayout, RegionLayout, UpdateMode};
pub use ram::{GuestRam, GuestRamBuilder, HugePageSize, MemoryOptions, Prefault, RegionSpec};
pub use stamp::{Stamp, StampState, NO_STAMP, STAMP_LEN};

use cpr_snapshot::{TypeEntry, TypeHistory};

/// The cpr-fd whose registry [`GuestRam::register_fds`] and [`GuestRam::reattach_from`]
/// take.
pub use cpr_fd;
/// The vm-memory this crate is built on: use it for `GuestMemoryMmap<B>`, bitmaps and
/// `Bytes`, so the versions agree.
pub use vm_memory;

/// The versioned types this crate saves, for an application's
/// [`SchemaBuilder::types`](cpr_snapshot::SchemaBuilder::types). Declare a state version with
/// `type_version::<MemoryLayout>(2)` when moving from 0.1 to 0.2.
pub fn section_types() -> Vec<TypeEntry> {
    vec![
        TypeEntry::section::<MemoryLayout>(),
        TypeEntry::nested::<RegionLayout>(),
        TypeEntry::nested::<BackendKind>(),
    ]
}

/// How this crate's types changed, release by release.
pub const HISTORY: &[TypeHistory] = &[
    TypeHistory {
        name: "memory-layout",
        version: 1,
        crate_version: "0.1.0",
        change: "regions: guest address, size, kind, backing name, offset, page size, backing size",
    },
    TypeHistory {
        name: "memory-layout",
        version: 2,
        crate_version: "0.2.0",
        change: "stamp_offset: where the stamp page is (NO_STAMP before)",
    },
];
