// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![doc = include_str!("../README.md")]
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
