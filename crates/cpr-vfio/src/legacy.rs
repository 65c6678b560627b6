// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Handoff of a device opened through a legacy VFIO container (type1 IOMMU).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use cpr_fd::{FdKind, FdRegistry};
use cpr_snapshot::prelude::*;
use vfio_bindings::bindings::vfio::VFIO_UPDATE_VADDR;

use crate::error::{kernel, Error, Result};
use crate::kernel::VfioKernel;

/// Where a mapping's memory comes from: the name of the fd backing it (as registered with
/// cpr-fd, e.g. a cpr-memory region's memfd) and the offset in it. After an update the new
/// host address is found from this, wherever the new image mapped that fd.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub struct Backing {
    /// fd name.
    pub name: String,
    /// Offset of the mapping's first byte in the fd.
    pub offset: u64,
}

/// A tracked DMA mapping.
#[derive(Clone, Debug, PartialEq, Eq, State)]
pub struct DmaMapping {
    /// Device address.
    pub iova: u64,
    /// Length.
    pub size: u64,
    /// Host address in the process that mapped it (meaningless after exec).
    pub vaddr: u64,
    /// The file backing it.
    pub backing: Backing,
}

/// What crosses the update for a legacy container. Section `vfio-container`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct LegacyState {
    /// Device name (PCI address).
    pub device: String,
    /// IOMMU group number.
    pub group_id: u32,
    /// Every DMA mapping.
    pub mappings: Vec<DmaMapping>,
    /// Whether the host addresses are invalidated (an update is under way).
    pub invalidated: bool,
}

impl Section for LegacyState {
    const NAME: &'static str = "vfio-container";
}

/// A VFIO device behind a type1 container, with its DMA mappings tracked for handoff.
#[derive(Debug)]
pub struct LegacyDevice {
    container: OwnedFd,
    group: OwnedFd,
    device: OwnedFd,
    state: LegacyState,
}

fn fd_names(device: &str, group_id: u32) -> [String; 3] {
    [
        format!("vfio.container.{device}"),
        format!("vfio.group.{group_id}"),
        format!("vfio.device.{device}"),
    ]
}

impl LegacyDevice {
    /// Opens the device at `sysfs` (e.g. `/sys/bus/pci/devices/0000:01:00.0`).
    pub fn open(k: &dyn VfioKernel, sysfs: &Path) -> Result<Self> {
        let fds = k.open_legacy(sysfs).map_err(kernel("open VFIO device"))?;
        let device = sysfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(LegacyDevice {
            container: fds.container,
            group: fds.group,
            device: fds.device,
            state: LegacyState {
                device,
                group_id: fds.group_id,
                mappings: Vec::new(),
                invalidated: false,
            },
        })
    }

    /// The device fd.
    pub fn device_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// The container fd.
    pub fn container_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.container.as_fd()
    }

    /// The tracked mappings.
    pub fn mappings(&self) -> &[DmaMapping] {
        &self.state.mappings
    }

    /// Maps guest memory for DMA and tracks it.
    pub fn map(&mut self, k: &dyn VfioKernel, m: DmaMapping) -> Result<()> {
        if self.state.invalidated {
            return Err(Error::Phase("cannot map while an update is under way"));
        }
        k.map_dma(self.container.as_fd(), m.iova, m.size, m.vaddr)
            .map_err(kernel("VFIO_IOMMU_MAP_DMA"))?;
        self.state.mappings.push(m);
        Ok(())
    }

    /// Unmaps a tracked mapping (exact iova and size).
    pub fn unmap(&mut self, k: &dyn VfioKernel, iova: u64, size: u64) -> Result<()> {
        let pos = self
            .state
            .mappings
            .iter()
            .position(|m| m.iova == iova && m.size == size)
            .ok_or(Error::Mapping {
                iova,
                size,
                reason: "is not a tracked mapping",
            })?;
        k.unmap_dma(self.container.as_fd(), iova, size)
            .map_err(kernel("VFIO_IOMMU_UNMAP_DMA"))?;
        self.state.mappings.remove(pos);
        Ok(())
    }

    /// Checks, before anything is stopped, that the container can hand its mappings over:
    /// it needs `VFIO_UPDATE_VADDR` (Linux 5.12). Mediated devices cannot be handed over.
    pub fn check_update(&self, k: &dyn VfioKernel) -> Result<()> {
        let ok = k
            .check_extension(self.container.as_fd(), VFIO_UPDATE_VADDR)
            .map_err(kernel("VFIO_CHECK_EXTENSION"))?;
        if !ok {
            return Err(Error::Refused {
                device: self.state.device.clone(),
                reason: crate::error::Refusal::NoUpdateVaddr,
            });
        }
        Ok(())
    }

    /// Invalidates every mapping's host address (the old process's addresses mean nothing
    /// after exec). If one fails, those already invalidated get their address back and the
    /// error is returned: the device is as before.
    pub fn invalidate(&mut self, k: &dyn VfioKernel) -> Result<()> {
        if self.state.invalidated {
            return Err(Error::Phase("host addresses are already invalidated"));
        }
        for (i, m) in self.state.mappings.iter().enumerate() {
            if let Err(e) = k.invalidate_vaddr(self.container.as_fd(), m.iova, m.size) {
                for done in &self.state.mappings[..i] {
                    let _ =
                        k.update_vaddr(self.container.as_fd(), done.iova, done.size, done.vaddr);
                }
                return Err(Error::Kernel {
                    op: "VFIO_IOMMU_UNMAP_DMA(VADDR)",
                    source: e,
                });
            }
        }
        self.state.invalidated = true;
        Ok(())
    }

    /// The update was abandoned (exec failed, the new process refused): give every mapping
    /// its old host address back and carry on.
    pub fn abandon(&mut self, k: &dyn VfioKernel) -> Result<()> {
        if !self.state.invalidated {
            return Ok(());
        }
        for m in &self.state.mappings {
            k.update_vaddr(self.container.as_fd(), m.iova, m.size, m.vaddr)
                .map_err(kernel("VFIO_IOMMU_MAP_DMA(VADDR)"))?;
        }
        self.state.invalidated = false;
        Ok(())
    }

    /// Registers duplicates of the container, group and device fds under stable names.
    pub fn register_fds(&self, reg: &mut FdRegistry) -> Result<()> {
        let names = fd_names(&self.state.device, self.state.group_id);
        let kinds = [
            FdKind::VFIO_CONTAINER,
            FdKind::VFIO_GROUP,
            FdKind::VFIO_DEVICE,
        ];
        for ((name, kind), fd) in
            names
                .iter()
                .zip(kinds)
                .zip([&self.container, &self.group, &self.device])
        {
            let dup = fd.try_clone().map_err(kernel("dup VFIO fd"))?;
            reg.register(name, kind, dup, b"")?;
        }
        Ok(())
    }

    /// The state to save (normally after [`invalidate`](Self::invalidate)).
    pub fn state(&self) -> &LegacyState {
        &self.state
    }

    /// Rebuilds the device in the new image from the inherited fds, without resetting it.
    pub fn reclaim(reg: &mut FdRegistry, state: LegacyState) -> Result<Self> {
        let [c, g, d] = fd_names(&state.device, state.group_id);
        let mut take = |n: &str| {
            reg.take(n)
                .map(|e| e.into_fd())
                .ok_or_else(|| Error::MissingFd(n.to_string()))
        };
        Ok(LegacyDevice {
            container: take(&c)?,
            group: take(&g)?,
            device: take(&d)?,
            state,
        })
    }

    /// Gives every mapping its new host address (same iova and size), found by `new_vaddr`
    /// from the mapping's backing. Checks that every address is known before changing any.
    pub fn complete(
        &mut self,
        k: &dyn VfioKernel,
        new_vaddr: impl Fn(&DmaMapping) -> Option<u64>,
    ) -> Result<()> {
        if !self.state.invalidated {
            return Err(Error::Phase("no update is under way"));
        }
        let addrs = self
            .state
            .mappings
            .iter()
            .map(|m| {
                new_vaddr(m).ok_or_else(|| Error::NoNewAddress {
                    iova: m.iova,
                    backing: m.backing.name.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (m, vaddr) in self.state.mappings.iter_mut().zip(addrs) {
            k.update_vaddr(self.container.as_fd(), m.iova, m.size, vaddr)
                .map_err(kernel("VFIO_IOMMU_MAP_DMA(VADDR)"))?;
            m.vaddr = vaddr;
        }
        self.state.invalidated = false;
        Ok(())
    }
}
