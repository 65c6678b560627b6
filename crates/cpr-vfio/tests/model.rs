// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The handoff sequence, its abandon path and each refusal, on the in-memory kernel model.

mod common;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use cpr_fd::FdRegistry;
use cpr_snapshot::Blob;
use cpr_vfio::model::Model;
use cpr_vfio::{
    attach_irqfds, Backing, DmaMapping, Error, IommufdDevice, LegacyDevice, MsixEntry, Refusal,
    VectorRoute, VfioDeviceState, VfioKernel,
};

const SYSFS: &str = "/sys/bus/pci/devices/0000:01:00.0";
const MIB: u64 = 1 << 20;

fn mapping(iova: u64, size: u64, vaddr: u64, offset: u64) -> DmaMapping {
    DmaMapping {
        iova,
        size,
        vaddr,
        backing: Backing {
            name: "guest-ram.0".into(),
            offset,
        },
    }
}

fn device(k: &Model) -> LegacyDevice {
    let mut d = LegacyDevice::open(k, Path::new(SYSFS)).unwrap();
    d.map(k, mapping(0, 2 * MIB, 0x7f00_0000_0000, 0)).unwrap();
    d.map(k, mapping(4 * MIB, MIB, 0x7f00_1000_0000, 4 * MIB))
        .unwrap();
    d
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn whole_legacy_handoff_keeps_mappings_without_reset() {
    let k = Model::new(true);
    let mut old = device(&k);
    assert_eq!(
        k.translate(old.container_fd(), 0x1000).unwrap(),
        0x7f00_0000_1000
    );
    old.check_update(&k).unwrap();
    old.invalidate(&k).unwrap();
    let blocked = k.translate(old.container_fd(), 0x1000).unwrap_err();
    assert_eq!(errno(&blocked), libc::EAGAIN, "translation blocked");
    assert!(matches!(
        old.map(&k, mapping(8 * MIB, MIB, 1, 0)),
        Err(Error::Phase(_))
    ));

    // Hand over: fds by name, state as a section.
    let mut reg = FdRegistry::new();
    old.register_fds(&mut reg).unwrap();
    let names: Vec<_> = reg.iter().map(|e| e.name().to_string()).collect();
    assert_eq!(
        names,
        [
            "vfio.container.0000:01:00.0",
            "vfio.group.7",
            "vfio.device.0000:01:00.0"
        ]
    );
    let state = old.state().clone();
    assert!(state.invalidated);
    drop(old); // the old process's objects go away; the kernel objects stay (dups are open)

    let mut new = LegacyDevice::reclaim(&mut reg, state).unwrap();
    assert!(reg.is_empty());
    // The new image maps guest RAM elsewhere.
    let base = 0x5500_0000_0000u64;
    new.complete(&k, |m| {
        (m.backing.name == "guest-ram.0").then_some(base + m.backing.offset)
    })
    .unwrap();
    let c = new.container_fd();
    assert_eq!(k.translate(c, 0x1000).unwrap(), base + 0x1000);
    assert_eq!(k.translate(c, 4 * MIB + 8).unwrap(), base + 4 * MIB + 8);
    assert_eq!(
        k.mapping_count(c).unwrap(),
        2,
        "same mappings, same iova and size"
    );
    assert_eq!(
        k.resets(new.device_fd()).unwrap(),
        0,
        "the device was never reset"
    );
    assert!(matches!(
        new.complete(&k, |_| Some(1)),
        Err(Error::Phase(_))
    ));
}

#[test]
fn abandoned_update_restores_the_old_addresses() {
    let k = Model::new(true);
    let mut d = device(&k);
    d.invalidate(&k).unwrap();
    d.abandon(&k).unwrap();
    assert_eq!(
        k.translate(d.container_fd(), 0x2000).unwrap(),
        0x7f00_0000_2000
    );
    assert!(!d.state().invalidated);
    // And a later update works from there.
    d.invalidate(&k).unwrap();
    d.complete(&k, |m| Some(0x1000_0000 + m.backing.offset))
        .unwrap();
    assert_eq!(k.translate(d.container_fd(), 0).unwrap(), 0x1000_0000);
    d.abandon(&k).unwrap(); // nothing to undo
}

#[test]
fn failed_invalidation_is_rolled_back() {
    let k = Model::new(true);
    let mut d = device(&k);
    k.fail_invalidation_at(2);
    assert!(matches!(d.invalidate(&k), Err(Error::Kernel { .. })));
    assert!(!d.state().invalidated);
    assert_eq!(
        k.translate(d.container_fd(), 0x3000).unwrap(),
        0x7f00_0000_3000,
        "first mapping restored"
    );
    assert_eq!(
        k.translate(d.container_fd(), 4 * MIB).unwrap(),
        0x7f00_1000_0000,
        "second never touched"
    );
    d.invalidate(&k).unwrap();
}

#[test]
fn missing_update_vaddr_is_refused_before_anything_changes() {
    let k = Model::new(false);
    let mut d = device(&k);
    let e = d.check_update(&k).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Refused {
                reason: Refusal::NoUpdateVaddr,
                ..
            }
        ),
        "{e}"
    );
    assert!(d.update_support(&k).restart.is_err());
    assert_eq!(d.update_support(&k).path, "legacy-type1");
    // Invalidating anyway fails in the kernel and leaves the mappings usable.
    assert!(d.invalidate(&k).is_err());
    assert_eq!(k.translate(d.container_fd(), 0).unwrap(), 0x7f00_0000_0000);
}

#[test]
fn unknown_new_address_changes_nothing() {
    let k = Model::new(true);
    let mut d = device(&k);
    d.invalidate(&k).unwrap();
    let e = d
        .complete(&k, |m| (m.iova == 0).then_some(0x9000_0000))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::NoNewAddress {
                iova: 0x40_0000,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        errno(&k.translate(d.container_fd(), 0).unwrap_err()),
        libc::EAGAIN,
        "first not remapped either"
    );
    d.complete(&k, |m| Some(0x9000_0000 + m.iova)).unwrap();
}

#[test]
fn mappings_are_keyed_by_exact_iova_and_size() {
    let k = Model::new(true);
    let mut d = device(&k);
    assert!(matches!(d.unmap(&k, 0, MIB), Err(Error::Mapping { .. })));
    assert!(
        d.map(&k, mapping(MIB, MIB, 1, 0)).is_err(),
        "overlap refused by the kernel"
    );
    assert_eq!(d.mappings().len(), 2, "a refused map is not tracked");
    // The kernel itself insists on the exact range for a VADDR update.
    let c = d.container_fd().try_clone_to_owned().unwrap();
    k.invalidate_vaddr(c.as_fd(), 0, 2 * MIB).unwrap();
    assert!(k.update_vaddr(c.as_fd(), 0, MIB, 5).is_err());
    k.update_vaddr(c.as_fd(), 0, 2 * MIB, 5).unwrap();
    d.unmap(&k, 4 * MIB, MIB).unwrap();
    assert_eq!(k.mapping_count(c.as_fd()).unwrap(), 1);
}

#[test]
fn iommufd_handoff_needs_file_mappings() {
    let k = Model::new(true);
    let ram = cpr_fd::sealed_memfd("ram", &[0u8; 16]).unwrap();
    let mut d = IommufdDevice::open(&k, Path::new(SYSFS)).unwrap();
    d.map_file(
        &k,
        0,
        2 * MIB,
        ram.as_fd(),
        Backing {
            name: "guest-ram.0".into(),
            offset: 0,
        },
    )
    .unwrap();
    d.check_update().unwrap();
    assert_eq!(d.update_support().path, "iommufd");

    let mut reg = FdRegistry::new();
    d.register_fds(&mut reg).unwrap();
    let state = d.state().clone();
    let iommufd: OwnedFd = d.iommufd().try_clone_to_owned().unwrap();
    drop(d);
    let new = IommufdDevice::reclaim(&k, &mut reg, state).unwrap();
    assert_eq!(k.takeovers(iommufd.as_fd()).unwrap(), 1);
    assert_eq!(k.resets(new.device_fd()).unwrap(), 0);

    // A mapping by host address blocks the update, up front and in the kernel.
    let mut d = IommufdDevice::open(&k, Path::new(SYSFS)).unwrap();
    d.map_file(
        &k,
        0,
        MIB,
        ram.as_fd(),
        Backing {
            name: "guest-ram.0".into(),
            offset: 0,
        },
    )
    .unwrap();
    d.map_vaddr(&k, 8 * MIB, MIB, 0x7000_0000).unwrap();
    let e = d.check_update().unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Refused {
                reason: Refusal::MappingByAddress { iova: 0x80_0000 },
                ..
            }
        ),
        "{e}"
    );
    let mut reg = FdRegistry::new();
    d.register_fds(&mut reg).unwrap();
    let e = IommufdDevice::reclaim(&k, &mut reg, d.state().clone()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Kernel {
                op: "IOMMU_IOAS_CHANGE_PROCESS",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn reclaim_names_missing_fds() {
    let k = Model::new(true);
    let d = device(&k);
    let mut reg = FdRegistry::new();
    let e = LegacyDevice::reclaim(&mut reg, d.state().clone()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingFd(n) if n.starts_with("vfio.container")),
        "{e}"
    );
}

#[test]
fn model_state_survives_save_and_load() {
    let k = Model::new(true);
    let d = device(&k);
    let again = Model::load(&k.save()).unwrap();
    assert_eq!(
        again.translate(d.container_fd(), 0x10).unwrap(),
        0x7f00_0000_0010
    );
    assert!(Model::load(b"junk").is_err());
}

fn device_state() -> VfioDeviceState {
    VfioDeviceState {
        name: "0000:01:00.0".into(),
        config: Blob(vec![0x86, 0x80, 0x0d, 0x10]),
        msix: vec![
            MsixEntry {
                addr_lo: 0xfee0_0000,
                addr_hi: 0,
                data: 0x4041,
                control: 0,
            },
            MsixEntry {
                addr_lo: 0xfee0_1000,
                addr_hi: 0,
                data: 0x4042,
                control: 1,
            },
        ],
        routes: vec![
            VectorRoute {
                vector: 0,
                gsi: 24,
                eventfd: "vfio.msix.0".into(),
            },
            VectorRoute {
                vector: 1,
                gsi: 25,
                eventfd: "vfio.msix.1".into(),
            },
        ],
    }
}

#[test]
fn device_state_is_validated() {
    let good = device_state();
    good.validate().unwrap();
    let mut bad = good.clone();
    bad.routes[1].vector = 9;
    assert!(bad.validate().is_err());
    let mut bad = good.clone();
    bad.routes[1].gsi = 24;
    assert!(bad.validate().is_err());
    let mut bad = good.clone();
    bad.routes[0].gsi = 4;
    assert!(bad.validate().is_err(), "IOAPIC GSIs are not for MSI");
    let mut bad = good;
    bad.config = Blob(vec![0; 5000]);
    assert!(bad.validate().is_err());
}

#[test]
fn eventfds_are_reattached_to_a_new_kvm_vm() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        common::skipped("/dev/kvm is not usable here");
        return;
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let state = device_state();
    let fds: HashMap<String, vmm_sys_util::eventfd::EventFd> = state
        .routes
        .iter()
        .map(|r| {
            (
                r.eventfd.clone(),
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            )
        })
        .collect();
    // The eventfds cross the update through cpr-fd under their stable names.
    let mut reg = FdRegistry::new();
    state.register_eventfds(&mut reg, &fds).unwrap();
    assert_eq!(
        reg.get("vfio.msix.1").unwrap().metadata(),
        1u32.to_le_bytes()
    );
    let carried = state.take_eventfds(&mut reg).unwrap();
    assert!(reg.is_empty());
    carried["vfio.msix.0"].write(5).unwrap();
    assert_eq!(
        fds["vfio.msix.0"].read().unwrap(),
        5,
        "the same eventfd object"
    );
    attach_irqfds(&vm, &state, &fds).unwrap();
    // Registered: the same eventfd on the same GSI is refused as busy.
    let e = vm.register_irqfd(&fds["vfio.msix.0"], 24).unwrap_err();
    assert_eq!(e.errno(), libc::EBUSY);
    fds["vfio.msix.1"].write(1).unwrap(); // the kernel consumes it as an MSI
    let mut missing = fds;
    missing.remove("vfio.msix.1");
    let vm2 = kvm.create_vm().unwrap();
    vm2.create_irq_chip().unwrap();
    assert!(matches!(
        attach_irqfds(&vm2, &state, &missing),
        Err(Error::MissingFd(_))
    ));
}
