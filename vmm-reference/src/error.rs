// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reference VMM's errors.

/// Errors of the reference VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM call failed.
    #[error("KVM: {0}")]
    Kvm(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] cpr_memory::Error),
    /// fd preservation.
    #[error(transparent)]
    Fd(#[from] cpr_fd::Error),
    /// KVM state capture or restore.
    #[error(transparent)]
    KvmState(#[from] cpr_kvm::Error),
    /// The state container.
    #[error(transparent)]
    Snapshot(#[from] cpr_snapshot::Error),
    /// A live update.
    #[error(transparent)]
    Update(#[from] cpr_update::Error),
    /// A file or socket operation.
    #[error("{0}")]
    Io(String),
    /// Saved state that cannot be used.
    #[error("{0}")]
    State(String),
    /// A bad command line or configuration.
    #[error("{0}")]
    Config(String),
    /// Loading or running the guest.
    #[error("guest: {0}")]
    Guest(String),
}

/// A `Result` whose error is the VMM's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(format!("{op}: {e}"))
}
