// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared set-up of the KVM tests.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

/// `/dev/kvm`, or `None` after saying that the test skips.
#[allow(dead_code)]
pub fn kvm_or_skip() -> Option<Kvm> {
    match Kvm::new() {
        Ok(k) => Some(k),
        Err(e) => {
            skipped(format!("/dev/kvm is not usable here ({e})"));
            None
        }
    }
}

/// A VM with the in-kernel irqchip and PIT, as the state capture expects.
pub fn bare_vm(kvm: &Kvm) -> VmFd {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .unwrap();
    vm
}

/// Says that a test skipped, visibly: libtest captures what passing tests print (even
/// through `io::stderr()`), so this writes to a duplicate of fd 2, which shares its file
/// offset and escapes the capture.
pub fn skipped(msg: impl std::fmt::Display) {
    use std::io::Write as _;
    let msg = format!("SKIPPED: {msg}\n");
    match std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        Ok(fd) => {
            let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
        }
        Err(_) => eprint!("{msg}"),
    }
}

/// A VM with the in-kernel irqchip whose only memory slot is `ram`'s region 0 at guest
/// address 0, and one vCPU. (Not every test binary uses it.)
#[allow(dead_code)]
pub fn vm_with_ram(kvm: &Kvm, ram: &cpr_memory::GuestRam) -> (VmFd, kvm_ioctls::VcpuFd) {
    let vm = bare_vm(kvm);
    let (ptr, len) = ram.host_range(0).unwrap();
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: ptr as u64,
        flags: 0,
    };
    // SAFETY: the region maps memory owned by `ram`, which outlives the VM in every test.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (vm, vcpu)
}

/// Puts a fresh vCPU in real mode at `rip` (code segment 0), with the host's CPUID.
#[allow(dead_code)]
pub fn start_real_mode(kvm: &Kvm, vcpu: &kvm_ioctls::VcpuFd, rip: u64) {
    vcpu.set_cpuid2(
        &kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap(),
    )
    .unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
}

/// The bytes from `start` up to `end`: a test guest's code between two `global_asm!` labels.
///
/// # Safety
/// Both must point into one read-only section, `start` not after `end`, with the bytes
/// between them never changing.
#[allow(dead_code)]
pub unsafe fn code_between(start: *const u8, end: *const u8) -> &'static [u8] {
    // SAFETY: the caller guarantees one immutable, 'static range.
    unsafe { std::slice::from_raw_parts(start, end.offset_from(start) as usize) }
}
