// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![doc = include_str!("../README.md")]
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
