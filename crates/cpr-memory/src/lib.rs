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

mod error;
mod layout;
mod ram;
mod sys;

pub use error::{Error, Result};
pub use layout::{BackendKind, MemoryLayout, RegionLayout, UpdateMode};
pub use ram::{GuestRam, GuestRamBuilder, HugePageSize, MemoryOptions, Prefault, RegionSpec};
