// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![cfg(target_arch = "x86_64")]

//! Guest time across a pause: with `ClockPolicy::Frozen` kvmclock resumes from the value it
//! had at capture (the outage is hidden); with `ClockPolicy::Advance` it includes the outage.

mod common;

use std::time::Duration;

use cpr_kvm::{
    capture_vcpu, capture_vm, restore_vcpu, restore_vm, ClockPolicy, HostCaps, MSR_IA32_TSC,
};
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

fn vm(kvm: &Kvm) -> (VmFd, VcpuFd) {
    let vm = common::bare_vm(kvm);
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(
        &kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap(),
    )
    .unwrap();
    (vm, vcpu)
}

fn tsc(vcpu: &VcpuFd) -> u64 {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
    msrs.as_slice()[0].data
}

#[test]
fn kvmclock_hides_or_shows_the_outage_as_asked() {
    let Ok(kvm) = Kvm::new() else {
        common::skipped("/dev/kvm is not usable here");
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();
    let (old_vm, old_vcpu) = vm(&kvm);
    let (vcpu_state, _) = capture_vcpu(&old_vcpu, 0, &caps).unwrap();
    let vm_state = capture_vm(&old_vm, true).unwrap();
    let saved_clock = old_vm.get_clock().unwrap().clock;
    let saved_tsc = tsc(&old_vcpu);
    let outage = Duration::from_secs(1);
    std::thread::sleep(outage);

    for policy in [ClockPolicy::Frozen, ClockPolicy::Advance] {
        let (new_vm, new_vcpu) = vm(&kvm);
        restore_vm(&new_vm, &vm_state, policy, outage.as_nanos() as u64).unwrap();
        restore_vcpu(&new_vcpu, &vcpu_state, policy, outage.as_nanos() as u64).unwrap();
        let clock = new_vm.get_clock().unwrap().clock;
        let now_tsc = tsc(&new_vcpu);
        if policy == ClockPolicy::Frozen && now_tsc.abs_diff(saved_tsc) > outage.as_nanos() as u64 {
            // KVM offsets the guest TSC on hardware virtualization; some hosts (this
            // project's CI runs on a software hypervisor) pass the host TSC through instead.
            eprintln!("NOTE: this host ignores guest TSC writes; only kvmclock is frozen");
        } else if policy == ClockPolicy::Frozen {
            assert!(now_tsc >= saved_tsc, "TSC ran backwards");
        }
        let advanced = clock.saturating_sub(saved_clock);
        eprintln!(
            "{policy:?}: kvmclock advanced {advanced} ns; TSC saved {saved_tsc} now {now_tsc}"
        );
        assert!(clock >= saved_clock, "{policy:?}: guest time ran backwards");
        match policy {
            ClockPolicy::Frozen => assert!(
                advanced < outage.as_nanos() as u64 / 2,
                "frozen clock advanced {advanced} ns over a {outage:?} outage"
            ),
            ClockPolicy::Advance => assert!(
                advanced >= outage.as_nanos() as u64,
                "advancing clock moved only {advanced} ns over a {outage:?} outage"
            ),
        }
    }
}
