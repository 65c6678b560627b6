// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![cfg(target_arch = "x86_64")]

//! `VcpuConfig`: a vCPU configured before its state arrives keeps the CPUID it was given
//! when the state agrees, takes the state's when it does not, and captures the same state
//! with the record as without it. Skips, saying so, when /dev/kvm is absent.

mod common;

use cpr_kvm::{
    capture_vcpu, capture_vcpu_with, restore_vcpu_with, ClockPolicy, CpuidEntry, HostCaps,
    VcpuConfig,
};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

fn leaf1(cpuid: &[CpuidEntry]) -> CpuidEntry {
    cpuid.iter().find(|e| e.function == 1).cloned().unwrap()
}

#[test]
fn a_configured_vcpu_captures_and_restores_as_an_unconfigured_one() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();

    let vm = common::bare_vm(&kvm);
    let src = vm.create_vcpu(0).unwrap();
    let known = VcpuConfig::configure(&src, &supported).unwrap();
    assert_eq!(
        known.cpuid.as_ref().unwrap().len(),
        supported.as_slice().len()
    );
    assert_eq!(known.tsc_khz, src.get_tsc_khz().ok().filter(|k| *k != 0));
    let mut regs = src.get_regs().unwrap();
    regs.rax = 0x1234_5678;
    regs.rip = 0xfff0;
    src.set_regs(&regs).unwrap();
    let (read, _) = capture_vcpu(&src, 0, &caps).unwrap();
    let (cached, _) = capture_vcpu_with(&src, 0, &caps, &known).unwrap();
    // Everything but the CPUID is read from KVM either way; the CPUID is the one set.
    assert!(
        VcpuStateNoCpuid::of(&read) == VcpuStateNoCpuid::of(&cached),
        "the same state with and without the record"
    );
    assert_eq!(&cached.cpuid, known.cpuid.as_ref().unwrap());
    // The FPU image taken from XSAVE is the one KVM_GET_FPU reads, for an FPU and SSE state
    // in use (XSTATE_BV bits 0 and 1). (In their reset state XSAVE reports the architectural
    // MXCSR, 0x1f80, where KVM_GET_FPU reads 0; and KVM_SET_FPU does not mark them in use,
    // so XSAVE, which the guest's XRSTOR follows, is the image that counts.)
    let mut xs = src.get_xsave().unwrap();
    {
        let words = &mut xs.region;
        words[0] = 0x027f; // FCW 0x27f, FSW 0
        words[6] = 0x1fa0; // MXCSR
        words[8] = 0x0909_0909; // ST0, first bytes
        words[40 + 12] = 0x0707_0707; // XMM3, first bytes
        words[128] |= 0b11; // XSTATE_BV: x87 and SSE in use
    }
    // SAFETY: a 4 KiB image read from this vCPU, as KVM_SET_XSAVE reads it.
    unsafe { src.set_xsave(&xs) }.unwrap();
    let (read, _) = capture_vcpu(&src, 0, &caps).unwrap();
    let no_xsave = HostCaps {
        xsave: false,
        ..caps.clone()
    };
    let (by_fpu_ioctl, _) = capture_vcpu(&src, 0, &no_xsave).unwrap();
    assert!(by_fpu_ioctl.xsave.is_empty());
    if !read.xsave.is_empty() {
        // KVM_GET_FPU never reports MXCSR (it reads 0); XSAVE does.
        let mut ioctl_fpu = by_fpu_ioctl.fpu.clone();
        ioctl_fpu.mxcsr = read.fpu.mxcsr;
        assert_eq!(read.fpu, ioctl_fpu, "FPU from XSAVE and from KVM_GET_FPU");
        assert_eq!((read.fpu.fcw, read.fpu.mxcsr), (0x27f, 0x1fa0));
        assert_eq!(read.fpu.fpr[..4], [9; 4]);
        assert_eq!(read.fpu.xmm[48..52], [7; 4]);
    }
    assert_eq!(leaf1(&read.cpuid).eax, leaf1(&cached.cpuid).eax);

    // A target configured the same way: the state's CPUID agrees, the record is unchanged,
    // and the registers arrive.
    let vm2 = common::bare_vm(&kvm);
    let dst = vm2.create_vcpu(0).unwrap();
    let mut dst_known = VcpuConfig::configure(&dst, &supported).unwrap();
    let before = dst_known.clone();
    restore_vcpu_with(&dst, &cached, ClockPolicy::Frozen, 0, &mut dst_known).unwrap();
    assert_eq!(dst_known, before);
    assert_eq!(dst.get_regs().unwrap().rax, 0x1234_5678);

    // A state with another CPUID (a different APIC id in leaf 1): it is set, and recorded.
    let mut other = cached.clone();
    for e in other.cpuid.iter_mut().filter(|e| e.function == 1) {
        e.ebx = (e.ebx & 0x00ff_ffff) | (7 << 24);
    }
    let vm3 = common::bare_vm(&kvm);
    let dst3 = vm3.create_vcpu(0).unwrap();
    let mut known3 = VcpuConfig::configure(&dst3, &supported).unwrap();
    restore_vcpu_with(&dst3, &other, ClockPolicy::Frozen, 0, &mut known3).unwrap();
    assert_eq!(known3.cpuid.as_ref(), Some(&other.cpuid));
    let got = dst3.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let got1 = got.as_slice().iter().find(|e| e.function == 1).unwrap();
    assert_eq!(got1.ebx >> 24, 7, "the state's CPUID reached KVM");
}

/// A vCPU state without its CPUID and TSC (which moved between two captures), for
/// comparing captures.
#[derive(Debug, PartialEq)]
struct VcpuStateNoCpuid(cpr_kvm::VcpuState);

impl VcpuStateNoCpuid {
    fn of(s: &cpr_kvm::VcpuState) -> Self {
        let mut s = s.clone();
        s.cpuid.clear();
        s.msrs.retain(|(index, _)| *index != cpr_kvm::MSR_IA32_TSC);
        VcpuStateNoCpuid(s)
    }
}
