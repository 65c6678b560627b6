// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![cfg(target_arch = "x86_64")]

//! A level-triggered interrupt that the in-kernel IOAPIC delivers after the vCPU's LAPIC
//! was captured but before the VM-wide state was (the order a VMM captures in, with device
//! threads still raising their lines) leaves the saved IOAPIC waiting for an EOI that the
//! saved LAPIC can never send. Restored as is, the pin delivers nothing more.
//! `reconcile_ioapic` repairs the captured state, and after it the pin delivers again.
//!
//! The kernel does the delivering here: the host raises the line with `KVM_IRQ_LINE`
//! between the two captures, which is the race made deterministic. Skips, saying so, when
//! /dev/kvm is absent.

mod common;

use cpr_kvm::{
    capture_vcpu, capture_vm, reconcile_ioapic, restore_vcpu, restore_vm, ClockPolicy, HostCaps,
    VcpuState, VmState,
};
use cpr_memory::{GuestRam, RegionSpec};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// The pin, and the vector the guest programmed for it.
const PIN: u32 = 5;
const VECTOR: u8 = 0x45;
/// Redirection entry bits.
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
/// The table's place in a `kvm_irqchip`'s bytes (chip id, pad, base address, four u32s).
const REDIRTBL: usize = 32;

fn entry(vm: &VmState, pin: u32) -> u64 {
    let at = REDIRTBL + pin as usize * 8;
    u64::from_ne_bytes(vm.ioapic.0[at..at + 8].try_into().unwrap())
}

/// Whether the LAPIC register page `regs` has `vector` requested (IRR).
fn requested(regs: &[u8], vector: u8) -> bool {
    let at = 0x200 + usize::from(vector / 32) * 0x10;
    u32::from_le_bytes(regs[at..at + 4].try_into().unwrap()) & (1 << (vector % 32)) != 0
}

fn lapic_requests(vcpu: &VcpuFd, vector: u8) -> bool {
    let lapic = vcpu.get_lapic().unwrap();
    let regs: Vec<u8> = lapic.regs.iter().map(|&b| b as u8).collect();
    requested(&regs, vector)
}

/// The line pulsed, as an irqfd without a resample fd raises it.
fn pulse(vm: &VmFd) {
    vm.set_irq_line(PIN, true).unwrap();
    vm.set_irq_line(PIN, false).unwrap();
}

/// A fresh VM restored from `vm_state` and `vcpu_state`: does the pin, pulsed, reach the
/// vCPU's LAPIC?
fn pin_delivers_after_restore(
    kvm: &Kvm,
    ram: &GuestRam,
    vm_state: &VmState,
    vcpu_state: &VcpuState,
) -> bool {
    let (vm, vcpu) = common::vm_with_ram(kvm, ram);
    restore_vm(&vm, vm_state, ClockPolicy::Frozen, 0).unwrap();
    restore_vcpu(&vcpu, vcpu_state, ClockPolicy::Frozen, 0).unwrap();
    assert!(
        !lapic_requests(&vcpu, VECTOR),
        "nothing requested before the pulse"
    );
    pulse(&vm);
    lapic_requests(&vcpu, VECTOR)
}

#[test]
fn a_level_interrupt_delivered_between_the_captures_does_not_block_its_pin() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("ioapic-test", 0, 1 << 20))
        .build()
        .unwrap();
    let (vm, vcpu) = common::vm_with_ram(&kvm, &ram);
    common::start_real_mode(&kvm, &vcpu, 0x1000);

    // What a guest's set-up leaves: the LAPIC software-enabled, pin 5 level-triggered and
    // unmasked, to vector 0x45 on APIC id 0.
    let mut lapic = vcpu.get_lapic().unwrap();
    lapic.regs[0xf0] = 0xff_u8 as std::os::raw::c_char;
    lapic.regs[0xf1] = 0x01;
    vcpu.set_lapic(&lapic).unwrap();
    let mut setup = capture_vm(&vm, true).unwrap();
    let at = REDIRTBL + PIN as usize * 8;
    setup.ioapic.0[at..at + 8].copy_from_slice(&(u64::from(VECTOR) | LEVEL).to_ne_bytes());
    restore_vm(&vm, &setup, ClockPolicy::Frozen, 0).unwrap();

    // The race: LAPIC captured, then the line raised and delivered, then the VM captured.
    let (early, _) = capture_vcpu(&vcpu, 0, &caps).unwrap();
    pulse(&vm);
    assert!(lapic_requests(&vcpu, VECTOR), "the kernel delivered it");
    let (late, _) = capture_vcpu(&vcpu, 0, &caps).unwrap();
    let vm_state = capture_vm(&vm, true).unwrap();
    assert_eq!(
        entry(&vm_state, PIN) & (REMOTE_IRR | LEVEL),
        REMOTE_IRR | LEVEL,
        "the saved IOAPIC waits for an EOI"
    );
    assert!(!requested(&early.lapic.0, VECTOR));
    assert!(requested(&late.lapic.0, VECTOR));

    // As captured, the pin is dead in the new VM: the vector is in no LAPIC, so no EOI.
    assert!(!pin_delivers_after_restore(&kvm, &ram, &vm_state, &early));

    // Repaired, it delivers again.
    let mut repaired = vm_state.clone();
    assert_eq!(
        reconcile_ioapic(&mut repaired, std::slice::from_ref(&early)).unwrap(),
        vec![PIN as u8]
    );
    assert_eq!(entry(&repaired, PIN), entry(&vm_state, PIN) & !REMOTE_IRR);
    assert!(pin_delivers_after_restore(&kvm, &ram, &repaired, &early));

    // Control: a LAPIC captured after the delivery holds the vector, and its EOI will
    // clear remote IRR; nothing is repaired.
    let mut kept = vm_state.clone();
    assert!(reconcile_ioapic(&mut kept, std::slice::from_ref(&late))
        .unwrap()
        .is_empty());
    assert_eq!(kept.ioapic, vm_state.ioapic);
}
