// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of the VFIO handoff.

/// Errors from VFIO and iommufd handoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A kernel call failed.
    #[error("{op}: {source}")]
    Kernel {
        /// The ioctl or operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An update is not possible with this device set-up; nothing was changed.
    #[error("live update refused: {0}")]
    Refused(String),
    /// A DMA mapping request is inconsistent with the tracked mappings.
    #[error("DMA mapping iova {iova:#x} size {size:#x}: {reason}")]
    Mapping {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The operation does not fit the handoff's current phase.
    #[error("{0}")]
    Phase(&'static str),
    /// An fd the saved state names was not handed over.
    #[error("fd `{0}` was not handed over")]
    MissingFd(String),
    /// No new host address is known for a mapping after the update.
    #[error("no new host address for the mapping at iova {iova:#x} (backing `{backing}`)")]
    NoNewAddress {
        /// IOVA.
        iova: u64,
        /// Its backing's name.
        backing: String,
    },
    /// Saved device state that does not fit.
    #[error("device state: {0}")]
    State(String),
    /// fd registry.
    #[error(transparent)]
    Fd(#[from] cpr_fd::Error),
    /// KVM interrupt routing.
    #[error("KVM {op}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kernel(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Kernel { op, source }
}
