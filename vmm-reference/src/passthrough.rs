// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VFIO device kept open and DMA-mapped to guest RAM across restarts, with cpr-vfio.
//!
//! The reference VMM has no PCI bus: the device is opened, its DMA mappings cover guest RAM,
//! and it is carried across a restart without a reset, but the guest does not see it.

use std::path::Path;

use cpr_fd::FdRegistry;
use cpr_memory::{BackendKind, GuestRam};
use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use cpr_vfio::model::Model;
use cpr_vfio::{
    Backing, DmaMapping, IommufdDevice, IommufdState, LegacyDevice, LegacyState, RealKernel,
    VfioKernel,
};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The kernel model's state, when `--vfio-model` stands in for the kernel (tests only).
/// Section `vfio-model-kernel`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct ModelSection {
    /// `Model::save` bytes.
    pub bytes: Blob,
}

impl Section for ModelSection {
    const NAME: &'static str = "vfio-model-kernel";
}

#[derive(Debug)]
enum Dev {
    Legacy(LegacyDevice),
    Iommufd(IommufdDevice),
}

/// The passthrough device.
#[derive(Debug)]
pub struct Passthrough {
    kernel: Box<dyn VfioKernel>,
    model: Option<Model>,
    dev: Dev,
}

fn vfio(e: cpr_vfio::Error) -> Error {
    Error::Guest(format!("VFIO: {e}"))
}

/// Where guest RAM region `name` is mapped in this process, plus `offset` into its backing.
fn host_address(ram: &GuestRam, b: &Backing) -> Option<u64> {
    ram.layout().regions.iter().enumerate().find_map(|(i, r)| {
        let inside = r.name == b.name && b.offset >= r.offset && b.offset < r.offset + r.size;
        inside.then(|| {
            ram.host_range(i)
                .map(|(p, _)| p as u64 + (b.offset - r.offset))
        })?
    })
}

impl Passthrough {
    /// Opens the device at `sysfs` and maps all of guest RAM for DMA (iova = guest address).
    pub fn open(sysfs: &Path, iommufd: bool, model: Option<&str>, ram: &GuestRam) -> Result<Self> {
        let (kernel, model): (Box<dyn VfioKernel>, Option<Model>) = match model {
            Some(kind) => {
                let m = Model::new(kind != "no-update-vaddr");
                (Box::new(m.clone()), Some(m))
            }
            None => (Box::new(RealKernel), None),
        };
        let k = kernel.as_ref();
        let mut dev = if iommufd {
            Dev::Iommufd(IommufdDevice::open(k, sysfs).map_err(vfio)?)
        } else {
            Dev::Legacy(LegacyDevice::open(k, sysfs).map_err(vfio)?)
        };
        for (i, r) in ram.layout().regions.iter().enumerate() {
            let backing = Backing {
                name: r.name.clone(),
                offset: r.offset,
            };
            match &mut dev {
                Dev::Legacy(d) => {
                    let (ptr, _) = ram
                        .host_range(i)
                        .ok_or_else(|| Error::Guest("unmapped region".into()))?;
                    d.map(
                        k,
                        DmaMapping {
                            iova: r.guest_addr,
                            size: r.size,
                            vaddr: ptr as u64,
                            backing,
                        },
                    )
                    .map_err(vfio)?;
                }
                Dev::Iommufd(d) => match ram.region_backing(i) {
                    Some((fd, _)) if r.kind != BackendKind::Anonymous => d
                        .map_file(k, r.guest_addr, r.size, fd, backing)
                        .map_err(vfio)?,
                    _ => {
                        let (ptr, _) = ram
                            .host_range(i)
                            .ok_or_else(|| Error::Guest("unmapped region".into()))?;
                        d.map_vaddr(k, r.guest_addr, r.size, ptr as u64)
                            .map_err(vfio)?
                    }
                },
            }
        }
        log::info!(
            "VFIO device {} open ({}), guest RAM mapped for DMA",
            sysfs.display(),
            if iommufd {
                "iommufd"
            } else {
                "legacy container"
            }
        );
        Ok(Passthrough { kernel, model, dev })
    }

    /// `cpr-info` data.
    pub fn info(&self) -> Value {
        let s = match &self.dev {
            Dev::Legacy(d) => d.update_support(self.kernel.as_ref()),
            Dev::Iommufd(d) => d.update_support(),
        };
        json!({"path": s.path, "restart": s.restart.err(), "transfer": s.transfer.err(), "model-kernel": self.model.is_some()})
    }

    /// Refuses, before anything stops, a restart or transfer the device cannot follow.
    pub fn check_restart(&self) -> Result<()> {
        match &self.dev {
            Dev::Legacy(d) => d.check_update(self.kernel.as_ref()),
            Dev::Iommufd(d) => d.check_update(),
        }
        .map_err(vfio)
    }

    /// Invalidates host addresses (legacy) before the exec.
    pub fn prepare(&mut self) -> Result<()> {
        match &mut self.dev {
            Dev::Legacy(d) => d.invalidate(self.kernel.as_ref()).map_err(vfio),
            Dev::Iommufd(_) => Ok(()),
        }
    }

    /// Undoes [`prepare`](Self::prepare) after a failed exec.
    pub fn abandon(&mut self) -> Result<()> {
        match &mut self.dev {
            Dev::Legacy(d) => d.abandon(self.kernel.as_ref()).map_err(vfio),
            Dev::Iommufd(_) => Ok(()),
        }
    }

    /// Registers the device fds and writes its sections for the next image.
    pub fn hand_over(&self, out: &mut cpr_update::Saver<'_>) -> Result<()> {
        let mut reg = FdRegistry::new();
        match &self.dev {
            Dev::Legacy(d) => {
                d.register_fds(&mut reg).map_err(vfio)?;
                out.write(0, d.state())?;
            }
            Dev::Iommufd(d) => {
                d.register_fds(&mut reg).map_err(vfio)?;
                out.write(0, d.state())?;
            }
        }
        let names: Vec<String> = reg.iter().map(|e| e.name().to_string()).collect();
        for n in names {
            if let Some(e) = reg.take(&n) {
                let (kind, meta) = (e.kind(), e.metadata().to_vec());
                out.register(&n, kind, e.into_fd(), &meta)?;
            }
        }
        if let Some(m) = &self.model {
            out.write(
                0,
                &ModelSection {
                    bytes: Blob(m.save()),
                },
            )?;
        }
        Ok(())
    }

    /// Rebuilds the device in the new image from handed-over fds and saved sections, and
    /// points its mappings at guest RAM as this image mapped it.
    pub fn take_over(
        input: &mut cpr_update::Loader<'_, '_>,
        ram: &GuestRam,
    ) -> Result<Option<Self>> {
        let legacy: Option<LegacyState> = input.take_optional(0)?;
        let iommufd: Option<IommufdState> = input.take_optional(0)?;
        let model: Option<ModelSection> = input.take_optional(0)?;
        if legacy.is_none() && iommufd.is_none() {
            return Ok(None);
        }
        let (kernel, model): (Box<dyn VfioKernel>, Option<Model>) = match model {
            Some(m) => {
                let m = Model::load(&m.bytes).map_err(Error::Snapshot)?;
                (Box::new(m.clone()), Some(m))
            }
            None => (Box::new(RealKernel), None),
        };
        let k = kernel.as_ref();
        let reg = input.fds();
        let dev = match (legacy, iommufd) {
            (Some(state), _) => {
                let mut d = LegacyDevice::reclaim(reg, state).map_err(vfio)?;
                d.complete(k, |m| host_address(ram, &m.backing))
                    .map_err(vfio)?;
                Dev::Legacy(d)
            }
            (None, Some(state)) => {
                Dev::Iommufd(IommufdDevice::reclaim(k, reg, state).map_err(vfio)?)
            }
            (None, None) => return Ok(None),
        };
        log::info!("VFIO device taken over without reset");
        Ok(Some(Passthrough { kernel, model, dev }))
    }

    /// For tests with the model kernel: resets of the device and whether DMA to guest
    /// address 0 translates.
    pub fn model_status(&self) -> Option<Value> {
        let m = self.model.as_ref()?;
        let (dev_fd, map_fd) = match &self.dev {
            Dev::Legacy(d) => (d.device_fd(), d.container_fd()),
            Dev::Iommufd(d) => (d.device_fd(), d.iommufd()),
        };
        Some(json!({
            "resets": m.resets(dev_fd).ok(),
            "translates": m.translate(map_fd, 0).is_ok(),
            "mappings": m.mapping_count(map_fd).ok(),
        }))
    }
}
