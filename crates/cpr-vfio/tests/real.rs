// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The handoff against the real kernel. Needs a device bound to vfio-pci (or an mdev-free
//! iommufd-capable one) named by `CPR_VFIO_DEVICE=/sys/bus/pci/devices/DDDD:BB:DD.F`, and
//! `/dev/vfio` (and `/dev/iommu` for the iommufd part). Skips, saying why, otherwise; this
//! project's CI host has neither, so this file has not run there.

mod common;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use cpr_memory::{GuestRam, MemoryOptions, RegionSpec};
use cpr_vfio::{Backing, DmaMapping, IommufdDevice, LegacyDevice, RealKernel};

const SIZE: u64 = 4 << 20;

fn device() -> Option<PathBuf> {
    let Some(dev) = std::env::var_os("CPR_VFIO_DEVICE").map(PathBuf::from) else {
        common::skipped(
            "set CPR_VFIO_DEVICE=/sys/bus/pci/devices/... to run against a real device",
        );
        return None;
    };
    if !std::path::Path::new("/dev/vfio/vfio").exists() {
        common::skipped("/dev/vfio/vfio does not exist");
        return None;
    }
    Some(dev)
}

fn ram() -> GuestRam {
    GuestRam::builder()
        .region(RegionSpec::memfd("guest-ram.0", 0, SIZE))
        .build()
        .unwrap()
}

#[test]
fn legacy_container_vaddr_update_on_real_hardware() {
    let Some(sysfs) = device() else { return };
    let k = RealKernel;
    let ram = ram();
    let (ptr, _) = ram.host_range(0).unwrap();
    let mut dev = LegacyDevice::open(&k, &sysfs).unwrap();
    dev.check_update(&k).unwrap();
    dev.map(
        &k,
        DmaMapping {
            iova: 0,
            size: SIZE,
            vaddr: ptr as u64,
            backing: Backing {
                name: "guest-ram.0".into(),
                offset: 0,
            },
        },
    )
    .unwrap();
    // Abandon path.
    dev.invalidate(&k).unwrap();
    dev.abandon(&k).unwrap();
    // Complete path, with the same memfd mapped at a new address (as after exec).
    let mut fds: HashMap<String, OwnedFd> = ram
        .memfds()
        .into_iter()
        .map(|(n, f)| (n.to_string(), f.try_clone_to_owned().unwrap()))
        .collect();
    let again = GuestRam::reattach(ram.layout(), &mut fds, &MemoryOptions::default()).unwrap();
    let (new_ptr, _) = again.host_range(0).unwrap();
    dev.invalidate(&k).unwrap();
    dev.complete(&k, |_| Some(new_ptr as u64)).unwrap();
    dev.unmap(&k, 0, SIZE).unwrap();
}

#[test]
fn iommufd_change_process_on_real_hardware() {
    let Some(sysfs) = device() else { return };
    if !std::path::Path::new("/dev/iommu").exists() {
        common::skipped("/dev/iommu does not exist");
        return;
    }
    let k = RealKernel;
    let ram = ram();
    let mut dev = IommufdDevice::open(&k, &sysfs).unwrap();
    let (fd, offset) = ram.region_backing(0).unwrap();
    dev.map_file(
        &k,
        0,
        SIZE,
        fd,
        Backing {
            name: "guest-ram.0".into(),
            offset,
        },
    )
    .unwrap();
    dev.check_update().unwrap();
    let mut reg = cpr_fd::FdRegistry::new();
    dev.register_fds(&mut reg).unwrap();
    let state = dev.state().clone();
    drop(dev);
    IommufdDevice::reclaim(&k, &mut reg, state).unwrap();
}
