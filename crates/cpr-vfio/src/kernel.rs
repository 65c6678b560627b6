// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The seam between the handoff logic and the kernel: every VFIO and iommufd operation the
//! handoff needs, on fds. [`crate::RealKernel`] issues the ioctls; [`crate::model::Model`]
//! implements the kernel's rules in memory for tests.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

/// The fds of a device opened through the legacy container interface.
#[derive(Debug)]
pub struct LegacyFds {
    /// `/dev/vfio/vfio`, with the type1 IOMMU set.
    pub container: OwnedFd,
    /// `/dev/vfio/GROUP`, attached to the container.
    pub group: OwnedFd,
    /// The device, from `VFIO_GROUP_GET_DEVICE_FD`.
    pub device: OwnedFd,
    /// IOMMU group number.
    pub group_id: u32,
}

/// The fds of a device opened through iommufd (VFIO cdev).
#[derive(Debug)]
pub struct IommufdFds {
    /// `/dev/iommu`.
    pub iommufd: OwnedFd,
    /// `/dev/vfio/devices/vfioN`, bound to the iommufd and attached to the IOAS.
    pub device: OwnedFd,
    /// The IOAS the device is attached to.
    pub ioas: u32,
}

/// VFIO and iommufd operations used by the handoff.
pub trait VfioKernel: Send + Sync + std::fmt::Debug {
    /// Opens the device at `sysfs` (e.g. `/sys/bus/pci/devices/0000:01:00.0`) through a new
    /// type1v2 container.
    fn open_legacy(&self, sysfs: &Path) -> io::Result<LegacyFds>;
    /// `VFIO_CHECK_EXTENSION` on a container.
    fn check_extension(&self, container: BorrowedFd<'_>, extension: u32) -> io::Result<bool>;
    /// `VFIO_IOMMU_MAP_DMA`, read and write.
    fn map_dma(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()>;
    /// `VFIO_IOMMU_UNMAP_DMA`.
    fn unmap_dma(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()>;
    /// `VFIO_IOMMU_UNMAP_DMA` with `VFIO_DMA_UNMAP_FLAG_VADDR`: forget the host address of a
    /// mapping, keep the mapping and its pinned pages.
    fn invalidate_vaddr(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()>;
    /// `VFIO_IOMMU_MAP_DMA` with `VFIO_DMA_MAP_FLAG_VADDR`: give an invalidated mapping its
    /// new host address (same iova and size).
    fn update_vaddr(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()>;
    /// `VFIO_DEVICE_RESET`.
    fn reset_device(&self, device: BorrowedFd<'_>) -> io::Result<()>;
    /// Opens the device at `sysfs` through its VFIO cdev, bound to a new iommufd and
    /// attached to a new IOAS.
    fn open_iommufd(&self, sysfs: &Path) -> io::Result<IommufdFds>;
    /// `IOMMU_IOAS_MAP_FILE` at a fixed iova.
    fn ioas_map_file(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        file: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()>;
    /// `IOMMU_IOAS_MAP` (by host address) at a fixed iova.
    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        vaddr: u64,
        length: u64,
        iova: u64,
    ) -> io::Result<()>;
    /// `IOMMU_IOAS_UNMAP`.
    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        length: u64,
    ) -> io::Result<()>;
    /// `IOMMU_IOAS_CHANGE_PROCESS`: take over the mappings' mm and locked-memory accounting.
    fn change_process(&self, iommufd: BorrowedFd<'_>) -> io::Result<()>;
}
