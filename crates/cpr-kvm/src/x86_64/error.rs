// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of KVM state capture and restore.

/// Errors from capturing or restoring KVM state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved blob has the wrong size for the kernel structure it holds.
    #[error("saved {what} is {found} bytes, the kernel structure is {expected}")]
    BadBlob {
        /// The structure.
        what: &'static str,
        /// Bytes found.
        found: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A saved table has more entries than the kernel takes.
    #[error("saved {what} has {found} entries, at most {max} are allowed")]
    TooMany {
        /// The table.
        what: &'static str,
        /// Entries found.
        found: usize,
        /// The limit.
        max: usize,
    },
    /// A saved irqchip holds another chip than its field says.
    #[error("saved {what} holds chip {found}, expected {expected}")]
    WrongChip {
        /// Which field.
        what: &'static str,
        /// The chip id found.
        found: u32,
        /// The chip id expected.
        expected: u32,
    },
    /// Installing the vCPU kick signal handler, or sending the kick, failed.
    #[error("{op}: {source}")]
    Signal {
        /// What was done.
        op: &'static str,
        /// The errno.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// vCPUs did not park before the deadline.
    #[error("{parked} of {total} vCPUs parked within {waited_ms} ms")]
    PauseTimeout {
        /// vCPUs parked.
        parked: usize,
        /// vCPUs expected.
        total: usize,
        /// How long it waited.
        waited_ms: u128,
    },
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
