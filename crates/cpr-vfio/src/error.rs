// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Errors of the VFIO handoff.

/// Errors from VFIO and iommufd handoff.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    #[error("live update refused: device {device}: {reason}")]
    Refused {
        /// The device.
        device: String,
        /// Why.
        reason: Refusal,
    },
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
    State(StateProblem),
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

/// Why a device cannot follow an update.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// An IOAS mapping made by host address: `IOMMU_IOAS_CHANGE_PROCESS` would fail.
    #[error(
        "the IOAS mapping at iova {iova:#x} was made by host address, not by file; \
         IOMMU_IOAS_CHANGE_PROCESS would fail"
    )]
    MappingByAddress {
        /// Its IOVA.
        iova: u64,
    },
    /// The container lacks `VFIO_UPDATE_VADDR`.
    #[error(
        "the VFIO container lacks VFIO_UPDATE_VADDR (Linux 5.12+, type1 IOMMU), so its DMA \
         mappings cannot follow the new process"
    )]
    NoUpdateVaddr,
}

/// What is wrong with a saved device state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateProblem {
    /// A config space larger than any device's.
    #[error("config space of {0} bytes")]
    ConfigTooLarge(usize),
    /// More MSI-X vectors than a device has.
    #[error("{0} MSI-X vectors")]
    TooManyVectors(usize),
    /// A route for a vector the table does not have.
    #[error("route for vector {0} beyond the table")]
    VectorOutOfRange(u32),
    /// A GSI below the MSI range, or used twice.
    #[error("GSI {0} is reserved or used twice")]
    BadGsi(u32),
    /// More routes than KVM takes.
    #[error("{0} routes, more than KVM takes")]
    TooManyRoutes(usize),
}
