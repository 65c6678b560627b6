// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Device state that must cross the update, and re-attaching interrupts to the new KVM VM.

use std::collections::HashMap;

use cpr_snapshot::prelude::*;
use cpr_snapshot::Blob;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result, StateProblem};

/// Largest PCI config space (PCIe extended).
pub const MAX_CONFIG: usize = 4096;
/// Most MSI-X vectors of a function.
pub const MAX_VECTORS: usize = 2048;
/// First GSI used for MSI routes (0-23 are the IOAPIC's pins).
pub const FIRST_MSI_GSI: u32 = 24;

/// One MSI-X table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, State)]
pub struct MsixEntry {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

/// Which eventfd (by cpr-fd name) signals which vector, through which GSI.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct VectorRoute {
    /// MSI-X vector.
    pub vector: u32,
    /// KVM GSI the irqfd is registered on.
    pub gsi: u32,
    /// Name of the eventfd in the fd registry.
    pub eventfd: String,
}

/// The VMM's view of a passthrough device. Section `vfio-device`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct VfioDeviceState {
    /// Device name (PCI address).
    pub name: String,
    /// Shadow of the PCI config space as the guest sees it.
    pub config: Blob,
    /// MSI-X table.
    pub msix: Vec<MsixEntry>,
    /// Vector routing.
    pub routes: Vec<VectorRoute>,
}

impl Section for VfioDeviceState {
    const NAME: &'static str = "vfio-device";
}

impl VfioDeviceState {
    /// Checks sizes and cross-references, so a corrupt state is refused before use.
    pub fn validate(&self) -> Result<()> {
        if self.config.len() > MAX_CONFIG {
            return Err(Error::State(StateProblem::ConfigTooLarge(
                self.config.len(),
            )));
        }
        if self.msix.len() > MAX_VECTORS {
            return Err(Error::State(StateProblem::TooManyVectors(self.msix.len())));
        }
        let mut gsis = std::collections::HashSet::new();
        for r in &self.routes {
            if r.vector as usize >= self.msix.len() {
                return Err(Error::State(StateProblem::VectorOutOfRange(r.vector)));
            }
            if r.gsi < FIRST_MSI_GSI || !gsis.insert(r.gsi) {
                return Err(Error::State(StateProblem::BadGsi(r.gsi)));
            }
        }
        Ok(())
    }
}

impl VfioDeviceState {
    /// Registers duplicates of the eventfds of every route under their stable names
    /// (`VectorRoute::eventfd`), for the next image.
    pub fn register_eventfds(
        &self,
        reg: &mut cpr_fd::FdRegistry,
        eventfds: &HashMap<String, EventFd>,
    ) -> Result<()> {
        use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
        for r in &self.routes {
            let ev = eventfds
                .get(&r.eventfd)
                .ok_or_else(|| Error::MissingFd(r.eventfd.clone()))?;
            let dup = ev.try_clone().map_err(|e| Error::Kernel {
                op: "dup eventfd",
                source: e,
            })?;
            // SAFETY: into_raw_fd gives up the new duplicate's ownership to the OwnedFd.
            let owned = unsafe { OwnedFd::from_raw_fd(dup.into_raw_fd()) };
            reg.register(
                &r.eventfd,
                cpr_fd::FdKind::EVENTFD,
                owned,
                &r.vector.to_le_bytes(),
            )?;
        }
        Ok(())
    }

    /// Takes the routes' eventfds back from handed-over fds.
    pub fn take_eventfds(&self, reg: &mut cpr_fd::FdRegistry) -> Result<HashMap<String, EventFd>> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let mut out = HashMap::new();
        for r in &self.routes {
            let e = reg
                .take(&r.eventfd)
                .ok_or_else(|| Error::MissingFd(r.eventfd.clone()))?;
            // SAFETY: the registry owned this fd (an eventfd, registered by
            // `register_eventfds` and identity-checked by cpr-fd); into_raw_fd hands the
            // ownership to the EventFd.
            let ev = unsafe { EventFd::from_raw_fd(e.into_fd().into_raw_fd()) };
            out.insert(r.eventfd.clone(), ev);
        }
        Ok(out)
    }
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The in-kernel irqchip's default routes (PIC and IOAPIC), which `KVM_SET_GSI_ROUTING`
/// would otherwise drop.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..24u32 {
        if gsi < 16 && gsi != 2 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_route(gsi, chip, gsi % 8));
        }
        v.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

/// Routes each vector's GSI to its MSI message and registers its eventfd (taken from
/// `eventfds` by name, e.g. handed over by cpr-fd) as an irqfd on the new VM. The device keeps
/// signalling the same eventfds; only the KVM side is rebuilt.
pub fn attach_irqfds(
    vm: &VmFd,
    state: &VfioDeviceState,
    eventfds: &HashMap<String, EventFd>,
) -> Result<()> {
    state.validate()?;
    let mut entries = default_routes();
    for r in &state.routes {
        let m = state.msix[r.vector as usize];
        let mut e = kvm_irq_routing_entry {
            gsi: r.gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = m.addr_lo;
        e.u.msi.address_hi = m.addr_hi;
        e.u.msi.data = m.data;
        entries.push(e);
    }
    for r in &state.routes {
        if !eventfds.contains_key(&r.eventfd) {
            return Err(Error::MissingFd(r.eventfd.clone()));
        }
    }
    let routing = KvmIrqRouting::from_entries(&entries)
        .map_err(|_| Error::State(StateProblem::TooManyRoutes(entries.len())))?;
    vm.set_gsi_routing(&routing).map_err(|source| Error::Kvm {
        op: "KVM_SET_GSI_ROUTING",
        source,
    })?;
    for r in &state.routes {
        vm.register_irqfd(&eventfds[&r.eventfd], r.gsi)
            .map_err(|source| Error::Kvm {
                op: "KVM_IRQFD",
                source,
            })?;
    }
    Ok(())
}
