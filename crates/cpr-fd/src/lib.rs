// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Carrying a VMM's file descriptors into its next image.
//!
//! Guest RAM memfds, the serial console, the monitor connection, eventfds and VFIO fds must
//! outlive the VMM process that opened them. An [`FdRegistry`] holds them under unique names
//! with a kind and a little metadata, and moves them:
//!
//! - **across exec** (restart mode): [`FdRegistry::prepare`] clears close-on-exec on exactly
//!   the registered fds, writes a manifest (name, fd number, kind, identity, metadata) into a
//!   sealed memfd, and [`Prepared::exec`] execs the new image with [`MANIFEST_ENV`] naming
//!   it. If exec fails everything is put back. The new image calls [`reclaim`] at start-up.
//! - **to another process** (transfer mode): [`FdRegistry::send`] and
//!   [`FdRegistry::receive`] over a connected UNIX stream socket with `SCM_RIGHTS`, in chunks
//!   under the kernel's per-message limit.
//!
//! Every fd that arrives is checked against the identity (device, inode, type) recorded when
//! it was registered, so a stale or reused fd number is an error, not someone else's file.
//!
//! ```no_run
//! use std::os::fd::OwnedFd;
//! use cpr_fd::{reclaim, FdKind, FdRegistry};
//!
//! # fn main() -> Result<(), cpr_fd::Error> {
//! // At start-up: did a previous image hand us fds?
//! let mut fds = reclaim()?.unwrap_or_default();
//! if fds.get("console").is_none() {
//!     let console: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
//!     fds.register("console", FdKind::CONSOLE, console, b"")?;
//! }
//! // ... later, to restart in place:
//! let prepared = fds.prepare()?;
//! let err = prepared.exec_self(&[]); // returns only on failure, with fds restored
//! eprintln!("restart failed, resuming: {err}");
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod convert;
mod error;
mod exec;
mod registry;
mod sys;
mod transfer;

pub use convert::{eventfd_into_fd, WrongFdType};
pub use error::{Error, ManifestProblem, NotManifest, Result};
pub use exec::{reclaim, startup_executable, Prepared, MANIFEST_ENV};
pub use registry::{
    open_fds, FdEntry, FdIdentity, FdKind, FdRegistry, MAX_MANIFEST_LEN, MAX_METADATA_LEN,
    MAX_NAME_LEN,
};
pub use transfer::{MAX_FDS_PER_MESSAGE, MAX_TRANSFER_FDS};
/// The vmm-sys-util this crate's `EventFd` conversions are for.
pub use vmm_sys_util;

/// A close-on-exec memfd named `name` holding `data`, sealed against any change (write,
/// resize, further seals): a place for saved state that survives exec once registered.
pub fn sealed_memfd(name: &str, data: &[u8]) -> Result<std::fs::File> {
    let name = std::ffi::CString::new(name).map_err(|_| Error::InvalidName(name.to_string()))?;
    sys::sealed_memfd(&name, data).map_err(error::os("sealed memfd"))
}
