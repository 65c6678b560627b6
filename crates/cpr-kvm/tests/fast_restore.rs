// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![cfg(target_arch = "x86_64")]

//! `restore_vcpu_fast`: which ioctls it leaves out, and when it must not. The guest-level
//! check (a restored guest finishes as an uninterrupted one) is in `roundtrip.rs`; this
//! file covers the cases where it falls back to the ioctls. Skips, saying so, when
//! /dev/kvm is absent.

mod common;

use cpr_kvm::kvm_bindings::{kvm_vcpu_events, KVM_MP_STATE_UNINITIALIZED};
use cpr_kvm::{
    capture_vcpu, complete_and_capture, restore_vcpu_fast, ClockPolicy, HostCaps, VcpuConfig,
    VcpuState,
};
use kvm_ioctls::Kvm;

/// A state as a vCPU that ran would have it: the BSP of a fresh VM, with a register set.
fn bsp_state(kvm: &Kvm, caps: &HostCaps) -> VcpuState {
    let vm = common::bare_vm(kvm);
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rax = 0xfeed;
    regs.rip = 0xfff0;
    vcpu.set_regs(&regs).unwrap();
    capture_vcpu(&vcpu, 0, caps).unwrap().0
}

fn events_of(state: &VcpuState) -> kvm_vcpu_events {
    let mut e = kvm_vcpu_events::default();
    let b: &[u8] = &state.events;
    assert_eq!(b.len(), std::mem::size_of::<kvm_vcpu_events>());
    // SAFETY: kvm_vcpu_events is plain old data of exactly this size.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut e as *mut kvm_vcpu_events).cast(), b.len())
    };
    e
}

fn with_events(state: &VcpuState, e: &kvm_vcpu_events) -> VcpuState {
    let mut s = state.clone();
    // SAFETY: reads the bytes of plain old data.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (e as *const kvm_vcpu_events).cast::<u8>(),
            std::mem::size_of::<kvm_vcpu_events>(),
        )
    };
    s.events = bytes.to_vec().into();
    s
}

#[test]
fn registers_and_events_go_with_the_next_run_and_a_capture_sees_them() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    if !caps.sync_regs {
        common::skipped("the host does not sync registers in kvm_run");
        return;
    }
    let state = bsp_state(&kvm, &caps);
    let vm = common::bare_vm(&kvm);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut known = VcpuConfig::default();
    known.read_initial(&vcpu, &caps).unwrap();
    let r =
        restore_vcpu_fast(&mut vcpu, &state, ClockPolicy::Frozen, 0, &mut known, &caps).unwrap();
    for ioctl in [
        "KVM_SET_MP_STATE",
        "KVM_SET_XCRS",
        "KVM_SET_DEBUGREGS",
        "KVM_SET_REGS",
        "KVM_SET_VCPU_EVENTS",
    ] {
        assert!(r.skipped_ioctls.contains(&ioctl), "{ioctl}: {r:?}");
    }
    // Not applied yet: KVM_GET_REGS still reads the fresh vCPU's...
    assert_ne!(vcpu.get_regs().unwrap().rax, 0xfeed);
    // ...and the capture of the pause, which runs the vCPU with immediate exit, applies them.
    let (back, _) = complete_and_capture(&mut vcpu, 0, &caps, &known).unwrap();
    assert_eq!(back.regs, state.regs);
    assert_eq!(back.events, state.events);
    assert_eq!(vcpu.get_regs().unwrap().rax, 0xfeed);
}

#[test]
fn events_the_kernel_would_refuse_are_set_by_ioctl_and_refused_before_any_run() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    let state = bsp_state(&kvm, &caps);
    let mut e = events_of(&state);
    // An exception vector no CPU has.
    e.exception.injected = 1;
    e.exception.nr = 40;
    let bad = with_events(&state, &e);
    let vm = common::bare_vm(&kvm);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut known = VcpuConfig::default();
    let err =
        restore_vcpu_fast(&mut vcpu, &bad, ClockPolicy::Frozen, 0, &mut known, &caps).unwrap_err();
    assert!(err.to_string().contains("KVM_SET_VCPU_EVENTS"), "{err}");
    assert_eq!(
        vcpu.get_kvm_run().kvm_dirty_regs,
        0,
        "nothing left for KVM_RUN"
    );
}

#[test]
fn an_uninitialized_vcpu_gets_its_registers_by_ioctl() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    // An AP that was never started: its KVM_RUN waits for a SIPI without applying the sync
    // area, so its registers must be set now.
    let vm = common::bare_vm(&kvm);
    let _bsp = vm.create_vcpu(0).unwrap();
    let ap = vm.create_vcpu(1).unwrap();
    assert_eq!(
        ap.get_mp_state().unwrap().mp_state,
        KVM_MP_STATE_UNINITIALIZED
    );
    let mut regs = ap.get_regs().unwrap();
    regs.rbx = 0xbeef;
    ap.set_regs(&regs).unwrap();
    let (state, _) = capture_vcpu(&ap, 1, &caps).unwrap();

    let vm = common::bare_vm(&kvm);
    let _bsp = vm.create_vcpu(0).unwrap();
    let mut ap = vm.create_vcpu(1).unwrap();
    let mut known = VcpuConfig::default();
    known.read_initial(&ap, &caps).unwrap();
    let r = restore_vcpu_fast(&mut ap, &state, ClockPolicy::Frozen, 0, &mut known, &caps).unwrap();
    assert!(!r.skipped_ioctls.contains(&"KVM_SET_REGS"), "{r:?}");
    assert!(r.skipped_ioctls.contains(&"KVM_SET_MP_STATE"), "{r:?}");
    assert_eq!(ap.get_regs().unwrap().rbx, 0xbeef);
    assert_eq!(ap.get_kvm_run().kvm_dirty_regs, 0);
}

#[test]
fn a_part_that_differs_from_the_initial_record_is_set() {
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    if !caps.debugregs {
        common::skipped("no KVM_CAP_DEBUGREGS");
        return;
    }
    let vm = common::bare_vm(&kvm);
    let src = vm.create_vcpu(0).unwrap();
    let mut dr = src.get_debug_regs().unwrap();
    dr.db[0] = 0x1234_0000;
    src.set_debug_regs(&dr).unwrap();
    let (state, _) = capture_vcpu(&src, 0, &caps).unwrap();

    let vm = common::bare_vm(&kvm);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut known = VcpuConfig::default();
    known.read_initial(&vcpu, &caps).unwrap();
    let r =
        restore_vcpu_fast(&mut vcpu, &state, ClockPolicy::Frozen, 0, &mut known, &caps).unwrap();
    assert!(!r.skipped_ioctls.contains(&"KVM_SET_DEBUGREGS"), "{r:?}");
    assert_eq!(vcpu.get_debug_regs().unwrap().db[0], 0x1234_0000);
    // Without a record nothing is skipped as already held.
    let vm = common::bare_vm(&kvm);
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let r = restore_vcpu_fast(
        &mut vcpu,
        &state,
        ClockPolicy::Frozen,
        0,
        &mut VcpuConfig::default(),
        &caps,
    )
    .unwrap();
    for ioctl in ["KVM_SET_MP_STATE", "KVM_SET_XCRS", "KVM_SET_DEBUGREGS"] {
        assert!(!r.skipped_ioctls.contains(&ioctl), "{ioctl}: {r:?}");
    }
}
