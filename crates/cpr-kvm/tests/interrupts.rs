// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![cfg(target_arch = "x86_64")]

//! An interrupt that is pending when the state is captured (raised while the guest has
//! interrupts disabled) is delivered exactly once after the state is restored into a fresh
//! VM: it lives in the in-kernel irqchip's state, which `capture_vm` saves.
//!
//! Skips, saying so, when /dev/kvm is absent.

mod common;

use cpr_kvm::{
    capture_vcpu, capture_vm, complete_pending_io, restore_vcpu, restore_vm, ClockPolicy, HostCaps,
};
use cpr_memory::{GuestRam, RegionSpec};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

/// Where the guest counts its interrupts.
const COUNT_ADDR: u64 = 0x500;
/// Where the guest code is loaded.
const CODE_ADDR: u64 = 0x1000;
/// The line the host raises (PIC master input 3, vector 0x23).
const IRQ: u32 = 3;
/// Where the handler is: right after the two-byte jump over it.
const HANDLER_ADDR: u64 = CODE_ADDR + 2;

// A real-mode guest. With interrupts disabled it installs an interrupt handler for vector
// 0x23, programs the PIC master (vectors from 0x20, only IRQ 3 unmasked) and says "ready" on
// port 0x10; the host raises IRQ 3. The guest then stops at port 0x12 with the interrupt still
// pending (the host captures there), enables interrupts for a short loop, and reports how
// many interrupts it took on port 0x11.
std::arch::global_asm!(
    ".pushsection .rodata.cpr_kvm_irq_guest,\"a\"",
    ".globl cpr_kvm_irq_guest_start",
    ".globl cpr_kvm_irq_guest_end",
    ".code16",
    "cpr_kvm_irq_guest_start:",
    "jmp 6f",
    // The handler, at a fixed place (CODE_ADDR + 2) the set-up below can name.
    "inc word ptr [0x500]",
    "push ax",
    "mov al, 0x20",
    "out 0x20, al",
    "pop ax",
    "iret",
    "6:",
    "cli",
    "xor ax, ax",
    "mov ds, ax",
    "mov word ptr [0x8c], 0x1002",
    "mov word ptr [0x8e], 0",
    "mov word ptr [0x500], 0",
    "mov al, 0x11",
    "out 0x20, al",
    "mov al, 0x20",
    "out 0x21, al",
    "mov al, 0x04",
    "out 0x21, al",
    "mov al, 0x01",
    "out 0x21, al",
    "mov al, 0xf7",
    "out 0x21, al",
    "mov dx, 0x10",
    "out dx, al",
    "mov dx, 0x12",
    "out dx, al",
    "sti",
    // A window of a few thousand instructions: a hypervisor that injects interrupts only
    // when it enters the guest (as this project's CI host does) may run a shorter one
    // without an entry.
    "mov cx, 0x2000",
    "7:",
    "loop 7b",
    "cli",
    "mov ax, word ptr [0x500]",
    "mov dx, 0x11",
    "out dx, ax",
    "4:",
    "jmp 4b",
    "cpr_kvm_irq_guest_end:",
    ".code64",
    ".popsection",
);

extern "C" {
    static cpr_kvm_irq_guest_start: u8;
    static cpr_kvm_irq_guest_end: u8;
}

fn guest_code() -> &'static [u8] {
    // SAFETY: both symbols are defined by the global_asm! above in one read-only section,
    // start before end; the bytes between them are immutable for the program's lifetime.
    unsafe {
        common::code_between(
            std::ptr::addr_of!(cpr_kvm_irq_guest_start),
            std::ptr::addr_of!(cpr_kvm_irq_guest_end),
        )
    }
}

/// Runs until the guest's next exit, which must be a write to `port`; returns the value.
fn run_to(vcpu: &mut VcpuFd, port: u16) -> u16 {
    match vcpu.run().unwrap() {
        VcpuExit::IoOut(p, data) if p == port => {
            let mut v = [0u8; 2];
            let n = data.len().min(2);
            v[..n].copy_from_slice(&data[..n]);
            u16::from_le_bytes(v)
        }
        other => panic!("unexpected exit {other:?} while waiting for port {port:#x}"),
    }
}

#[test]
fn an_interrupt_pending_at_capture_is_delivered_once_after_restore() {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            common::skipped(format!("/dev/kvm is not usable here ({e})"));
            return;
        }
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("irq-test", 0, 1 << 20))
        .build()
        .unwrap();
    let code = guest_code();
    assert_eq!(code[0], 0xeb, "a short jump over the handler");
    assert_eq!(
        code[2..4],
        [0xff, 0x06],
        "the handler starts with `inc word ptr [..]`"
    );
    assert_eq!(HANDLER_ADDR, 0x1002, "the address the guest installs");
    ram.memory()
        .write_slice(code, GuestAddress(CODE_ADDR))
        .unwrap();

    // The first VM: raise the line while the guest has interrupts disabled, capture.
    let (vm, mut vcpu) = common::vm_with_ram(&kvm, &ram);
    common::start_real_mode(&kvm, &vcpu, CODE_ADDR);
    run_to(&mut vcpu, 0x10);
    vm.set_irq_line(IRQ, true).unwrap();
    vm.set_irq_line(IRQ, false).unwrap();
    run_to(&mut vcpu, 0x12);
    complete_pending_io(&mut vcpu).unwrap();
    let (vcpu_state, _) = capture_vcpu(&vcpu, 0, &caps).unwrap();
    let vm_state = capture_vm(&vm, true).unwrap();
    drop(vcpu);
    drop(vm);

    // A fresh VM with the captured state takes the interrupt, once.
    let (vm, mut vcpu) = common::vm_with_ram(&kvm, &ram);
    restore_vm(&vm, &vm_state, ClockPolicy::Frozen, 0).unwrap();
    restore_vcpu(&vcpu, &vcpu_state, ClockPolicy::Frozen, 0).unwrap();
    assert_eq!(
        run_to(&mut vcpu, 0x11),
        1,
        "the pending interrupt was delivered once"
    );
    drop(vcpu);
    drop(vm);

    // Control: without the VM-wide state (the irqchip) the interrupt is gone, so the
    // check above depends on what restore_vm carries.
    ram.memory()
        .write_obj(0u16, GuestAddress(COUNT_ADDR))
        .unwrap();
    let (_vm, mut vcpu) = common::vm_with_ram(&kvm, &ram);
    restore_vcpu(&vcpu, &vcpu_state, ClockPolicy::Frozen, 0).unwrap();
    assert_eq!(
        run_to(&mut vcpu, 0x11),
        0,
        "nothing pending in a fresh irqchip"
    );
}
