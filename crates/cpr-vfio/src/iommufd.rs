// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Handoff of a device attached to an iommufd IOAS: guest RAM is mapped by file
//! (`IOMMU_IOAS_MAP_FILE`), so the mappings do not depend on host addresses, and the new
//! process takes the accounting over with `IOMMU_IOAS_CHANGE_PROCESS` (Linux 6.13).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::prelude::*;

use crate::error::{kernel, Error, Result};
use crate::kernel::VfioKernel;
use crate::legacy::Backing;

/// A tracked IOAS mapping.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub struct IoasMapping {
    /// Device address.
    pub iova: u64,
    /// Length.
    pub length: u64,
    /// The file it was mapped from, or `None` if it was mapped by host address.
    pub backing: Option<Backing>,
}

/// What crosses the update for an iommufd device. Section `vfio-iommufd`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct IommufdState {
    /// Device name (PCI address).
    pub device: String,
    /// IOAS id.
    pub ioas: u32,
    /// Every mapping.
    pub mappings: Vec<IoasMapping>,
}

impl Section for IommufdState {
    const NAME: &'static str = "vfio-iommufd";
}

/// A VFIO cdev device attached to an iommufd IOAS.
#[derive(Debug)]
pub struct IommufdDevice {
    iommufd: OwnedFd,
    device: OwnedFd,
    state: IommufdState,
}

fn fd_names(device: &str) -> [String; 2] {
    [format!("iommufd.{device}"), format!("vfio.cdev.{device}")]
}

impl IommufdDevice {
    /// Opens the device at `sysfs` through its VFIO cdev and a new iommufd.
    pub fn open(k: &dyn VfioKernel, sysfs: &Path) -> Result<Self> {
        let fds = k
            .open_iommufd(sysfs)
            .map_err(kernel("open VFIO cdev with iommufd"))?;
        let device = sysfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(IommufdDevice {
            iommufd: fds.iommufd,
            device: fds.device,
            state: IommufdState {
                device,
                ioas: fds.ioas,
                mappings: Vec::new(),
            },
        })
    }

    /// The iommufd.
    pub fn iommufd(&self) -> BorrowedFd<'_> {
        self.iommufd.as_fd()
    }

    /// The device fd.
    pub fn device_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// Maps `length` bytes of `file` from `backing.offset` at `iova`.
    pub fn map_file(
        &mut self,
        k: &dyn VfioKernel,
        iova: u64,
        length: u64,
        file: BorrowedFd<'_>,
        backing: Backing,
    ) -> Result<()> {
        k.ioas_map_file(
            self.iommufd.as_fd(),
            self.state.ioas,
            file,
            backing.offset,
            length,
            iova,
        )
        .map_err(kernel("IOMMU_IOAS_MAP_FILE"))?;
        self.state.mappings.push(IoasMapping {
            iova,
            length,
            backing: Some(backing),
        });
        Ok(())
    }

    /// Maps host memory by address (such a mapping prevents a handoff).
    pub fn map_vaddr(
        &mut self,
        k: &dyn VfioKernel,
        iova: u64,
        length: u64,
        vaddr: u64,
    ) -> Result<()> {
        k.ioas_map(self.iommufd.as_fd(), self.state.ioas, vaddr, length, iova)
            .map_err(kernel("IOMMU_IOAS_MAP"))?;
        self.state.mappings.push(IoasMapping {
            iova,
            length,
            backing: None,
        });
        Ok(())
    }

    /// Checks, before anything is stopped, that every mapping is file-based, which
    /// `IOMMU_IOAS_CHANGE_PROCESS` requires.
    pub fn check_update(&self) -> Result<()> {
        if let Some(m) = self.state.mappings.iter().find(|m| m.backing.is_none()) {
            return Err(Error::Refused {
                device: self.state.device.clone(),
                reason: crate::error::Refusal::MappingByAddress { iova: m.iova },
            });
        }
        Ok(())
    }

    /// Registers duplicates of the iommufd and device fds under stable names.
    pub fn register_fds(&self, reg: &mut FdRegistry) -> Result<()> {
        let [i, d] = fd_names(&self.state.device);
        reg.register(
            &i,
            FdKind::IOMMUFD,
            self.iommufd.try_clone().map_err(kernel("dup iommufd"))?,
            b"",
        )?;
        reg.register(
            &d,
            FdKind::VFIO_DEVICE,
            self.device.try_clone().map_err(kernel("dup device fd"))?,
            b"",
        )?;
        Ok(())
    }

    /// The state to save.
    pub fn state(&self) -> &IommufdState {
        &self.state
    }

    /// Rebuilds the device in the new image from the inherited fds and takes over the
    /// mappings' accounting (`IOMMU_IOAS_CHANGE_PROCESS`).
    pub fn reclaim(k: &dyn VfioKernel, reg: &mut FdRegistry, state: IommufdState) -> Result<Self> {
        let [i, d] = fd_names(&state.device);
        let mut take = |n: &str| {
            reg.take(n)
                .map(|e| e.into_fd())
                .ok_or_else(|| Error::MissingFd(n.to_string()))
        };
        let dev = IommufdDevice {
            iommufd: take(&i)?,
            device: take(&d)?,
            state,
        };
        k.change_process(dev.iommufd.as_fd())
            .map_err(kernel("IOMMU_IOAS_CHANGE_PROCESS"))?;
        Ok(dev)
    }
}
