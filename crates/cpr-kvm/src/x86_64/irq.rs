// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Keeping the captured IOAPIC consistent with the captured LAPICs.
//!
//! A VMM captures each vCPU's LAPIC (on its vCPU thread, once the vCPU left the guest) before
//! it captures the VM-wide irqchip state. In between, the host may still deliver an interrupt:
//! a device thread raising its irqfd, or KVM's own deferred irqfd injection (for IOAPIC pins
//! that is a work item, run by a kernel worker after the `write` to the eventfd returned).
//! Such an interrupt lands in the old LAPIC after it was captured, so the saved LAPIC does not
//! hold it. For an edge-triggered pin that loses one interrupt, which a device that keeps its
//! own interrupt status raises again after the restore. For a **level-triggered** pin the
//! IOAPIC also sets the entry's remote IRR bit, and only the guest's EOI of that vector clears
//! it. Saved as is, the new VM would have remote IRR set and no LAPIC holding the vector:
//! the guest never EOIs it, and the pin never delivers again.
//!
//! [`reconcile_ioapic`] finds those entries in a captured state and clears their remote IRR, so
//! that the next assertion of the line (the device raising it again, or a line still asserted,
//! which KVM re-injects when the IOAPIC is restored) is delivered.

use kvm_bindings::{kvm_irqchip, kvm_lapic_state, KVM_IRQCHIP_IOAPIC};
use zerocopy::IntoBytes;

use crate::error::{Error, Result};
use crate::state::{from_blob, to_blob, VcpuState, VmState};

/// Where, in a `kvm_irqchip`, the IOAPIC's redirection table starts: the chip union at 8,
/// then `base_address` (8), `ioregsel`, `id`, `irr`, `pad` (4 each).
const REDIRTBL: usize = std::mem::offset_of!(kvm_irqchip, chip)
    + std::mem::offset_of!(kvm_bindings::kvm_ioapic_state, redirtbl);
/// Entries in the table (`KVM_IOAPIC_NUM_PINS`).
const PINS: usize = 24;
// The table lies inside the structure the blob holds.
const _: () = assert!(REDIRTBL + PINS * 8 <= std::mem::size_of::<kvm_irqchip>());

/// Redirection entry bits (Intel 82093AA datasheet, 3.2.4).
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;

/// LAPIC register pages' in-service and interrupt-request registers: eight 32-bit registers,
/// one every 16 bytes.
const LAPIC_ISR: usize = 0x100;
const LAPIC_IRR: usize = 0x200;

/// Whether `vector` is set in the 256-bit LAPIC register array starting at `base`.
fn lapic_bit(regs: &[u8], base: usize, vector: u8) -> bool {
    let at = base + usize::from(vector / 32) * 0x10;
    let word = u32::from_le_bytes([regs[at], regs[at + 1], regs[at + 2], regs[at + 3]]);
    word & (1 << (vector % 32)) != 0
}

/// Clears the remote IRR bit of every level-triggered IOAPIC entry in `vm` whose vector no
/// LAPIC in `vcpus` holds as requested (IRR) or in service (ISR), and returns those pins.
///
/// Call it on a captured state, after the vCPUs' and the VM's captures, before the state is
/// saved: see the module's documentation for the race it repairs. An entry whose vector some
/// LAPIC holds is left alone (that LAPIC's EOI clears it), so is every edge-triggered entry.
/// A state this finds nothing to repair in comes back unchanged.
///
/// # Errors
/// [`Error::BadBlob`] if the IOAPIC or a LAPIC blob has the wrong size, [`Error::WrongChip`]
/// if the IOAPIC blob names another chip; `vm` is then unchanged.
pub fn reconcile_ioapic(vm: &mut VmState, vcpus: &[VcpuState]) -> Result<Vec<u8>> {
    let mut chip: kvm_irqchip = from_blob(&vm.ioapic, "IOAPIC")?;
    if chip.chip_id != KVM_IRQCHIP_IOAPIC {
        return Err(Error::WrongChip {
            what: "IOAPIC",
            found: chip.chip_id,
            expected: KVM_IRQCHIP_IOAPIC,
        });
    }
    let lapics = vcpus
        .iter()
        .map(|v| from_blob::<kvm_lapic_state>(&v.lapic, "LAPIC"))
        .collect::<Result<Vec<_>>>()?;
    let held = |vector: u8| {
        lapics.iter().any(|l| {
            let regs = l.regs.as_bytes();
            lapic_bit(regs, LAPIC_IRR, vector) || lapic_bit(regs, LAPIC_ISR, vector)
        })
    };
    let bytes = chip.as_mut_bytes();
    let mut cleared = Vec::new();
    for pin in 0..PINS {
        let at = REDIRTBL + pin * 8;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[at..at + 8]);
        let mut entry = u64::from_ne_bytes(raw);
        if entry & LEVEL != 0 && entry & REMOTE_IRR != 0 && !held(entry as u8) {
            entry &= !REMOTE_IRR;
            bytes[at..at + 8].copy_from_slice(&entry.to_ne_bytes());
            cleared.push(pin as u8);
        }
    }
    if !cleared.is_empty() {
        vm.ioapic = to_blob(&chip);
    }
    Ok(cleared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::blank_states;
    use cpr_snapshot::Blob;

    /// A captured state with IOAPIC entry `pin` set to `entry`, and one vCPU whose LAPIC has
    /// `irr` and `isr` vectors set.
    fn state(pin: usize, entry: u64, irr: &[u8], isr: &[u8]) -> (VmState, Vec<VcpuState>) {
        let (mut vm, mut vcpus) = blank_states(1);
        let mut chip: kvm_irqchip = from_blob(&vm.ioapic, "IOAPIC").unwrap();
        let at = REDIRTBL + pin * 8;
        chip.as_mut_bytes()[at..at + 8].copy_from_slice(&entry.to_ne_bytes());
        vm.ioapic = to_blob(&chip);
        let mut lapic = kvm_lapic_state::default();
        for (base, vectors) in [(LAPIC_IRR, irr), (LAPIC_ISR, isr)] {
            for &v in vectors {
                let at = base + usize::from(v / 32) * 0x10;
                let r = lapic.regs.as_mut_bytes();
                let word = u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]);
                r[at..at + 4].copy_from_slice(&(word | 1 << (v % 32)).to_le_bytes());
            }
        }
        vcpus[0].lapic = to_blob(&lapic);
        (vm, vcpus)
    }

    fn entry_of(vm: &VmState, pin: usize) -> u64 {
        let at = REDIRTBL + pin * 8;
        u64::from_ne_bytes(vm.ioapic.0[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn the_table_is_where_the_kernel_puts_it() {
        // kvm_irqchip: chip_id, pad, then the union; kvm_ioapic_state: u64, 4 x u32, table.
        assert_eq!(REDIRTBL, 8 + 8 + 4 * 4);
    }

    #[test]
    fn a_level_entry_no_lapic_holds_is_cleared_and_nothing_else() {
        let level_pending = 0x45 | LEVEL | REMOTE_IRR | 0xff << 56;
        let (mut vm, vcpus) = state(5, level_pending, &[0x30], &[0x44]);
        assert_eq!(reconcile_ioapic(&mut vm, &vcpus).unwrap(), vec![5]);
        assert_eq!(entry_of(&vm, 5), level_pending & !REMOTE_IRR);
        // Once repaired, there is nothing left to do.
        let before = vm.ioapic.clone();
        assert!(reconcile_ioapic(&mut vm, &vcpus).unwrap().is_empty());
        assert_eq!(vm.ioapic, before);
    }

    #[test]
    fn an_entry_a_lapic_holds_in_irr_or_isr_is_kept() {
        let entry = 0x45 | LEVEL | REMOTE_IRR;
        for (irr, isr) in [(&[0x45u8][..], &[][..]), (&[][..], &[0x45u8][..])] {
            let (mut vm, vcpus) = state(6, entry, irr, isr);
            let before = vm.ioapic.clone();
            assert!(reconcile_ioapic(&mut vm, &vcpus).unwrap().is_empty());
            assert_eq!(vm.ioapic, before);
        }
        // Any vCPU's LAPIC counts (the entry may target another one).
        let (mut vm, mut vcpus) = state(6, entry, &[], &[]);
        let (_, holding) = state(0, 0, &[0x45], &[]);
        vcpus.push(holding[0].clone());
        assert!(reconcile_ioapic(&mut vm, &vcpus).unwrap().is_empty());
    }

    #[test]
    fn edge_entries_are_never_touched() {
        // Remote IRR has no meaning for an edge-triggered entry; leave whatever is there.
        let (mut vm, vcpus) = state(2, 0x45 | REMOTE_IRR, &[], &[]);
        let before = vm.ioapic.clone();
        assert!(reconcile_ioapic(&mut vm, &vcpus).unwrap().is_empty());
        assert_eq!(vm.ioapic, before);
    }

    #[test]
    fn malformed_blobs_are_refused_and_the_state_is_unchanged() {
        let (mut vm, mut vcpus) = state(5, 0x45 | LEVEL | REMOTE_IRR, &[], &[]);
        let before = vm.ioapic.clone();
        vcpus[0].lapic = Blob(vec![0; 100]);
        assert!(matches!(
            reconcile_ioapic(&mut vm, &vcpus),
            Err(Error::BadBlob { what: "LAPIC", .. })
        ));
        assert_eq!(vm.ioapic, before);
        let (mut vm, vcpus) = state(5, 0x45 | LEVEL | REMOTE_IRR, &[], &[]);
        vm.ioapic = vm.pic_master.clone();
        assert!(matches!(
            reconcile_ioapic(&mut vm, &vcpus),
            Err(Error::WrongChip { .. })
        ));
        vm.ioapic = Blob(vec![1, 2, 3]);
        assert!(matches!(
            reconcile_ioapic(&mut vm, &vcpus),
            Err(Error::BadBlob { what: "IOAPIC", .. })
        ));
    }
}
