// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Capturing and restoring a VM with two vCPUs through `cpr-kvm`: the CPU part of every
//! update's blackout. `capture` is the old side's cost (irqchip, PIT, clock and each vCPU's
//! registers, LAPIC, XSAVE, MSRs, events); `restore` is the new side's, into a fresh VM with
//! fresh vCPUs (creating them is measured by `cpr-floor`, not here).

use cpr_kvm::{capture_vcpu, capture_vm, restore_vcpu, restore_vm, ClockPolicy, HostCaps};
use criterion::{criterion_group, criterion_main, Criterion};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

const VCPUS: u64 = 2;

fn vm(kvm: &Kvm) -> (VmFd, Vec<VcpuFd>) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("irqchip");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("pit");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    let vcpus = (0..VCPUS)
        .map(|i| {
            let v = vm.create_vcpu(i).expect("vcpu");
            v.set_cpuid2(&cpuid).expect("set cpuid");
            v
        })
        .collect();
    (vm, vcpus)
}

fn bench(c: &mut Criterion) {
    let kvm = Kvm::new().expect("/dev/kvm");
    let caps = HostCaps::probe(&kvm).expect("caps");
    let (src_vm, src_vcpus) = vm(&kvm);
    let vm_state = capture_vm(&src_vm, true).expect("capture vm");
    let vcpu_states: Vec<_> = src_vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| capture_vcpu(v, i as u32, &caps).expect("capture vcpu").0)
        .collect();

    c.bench_function("capture_vm_2_vcpus", |b| {
        b.iter(|| {
            let s = capture_vm(&src_vm, true).unwrap();
            let v: Vec<_> = src_vcpus
                .iter()
                .enumerate()
                .map(|(i, v)| capture_vcpu(v, i as u32, &caps).unwrap())
                .collect();
            (s, v)
        })
    });

    // What the old side of an update writes into the pause: the VM's and both vCPUs'
    // sections, encoded and checksummed.
    let schema = cpr_snapshot::Schema::builder()
        .types(cpr_kvm::section_types())
        .build()
        .expect("schema");
    c.bench_function("encode_vm_2_vcpus", |b| {
        b.iter(|| {
            let mut w = cpr_snapshot::SnapshotWriter::new(
                Vec::with_capacity(64 << 10),
                &schema,
                "bench",
                "0",
                schema.latest_version(),
            )
            .unwrap();
            w.write_section(0, &vm_state).unwrap();
            for (i, s) in vcpu_states.iter().enumerate() {
                w.write_section(i as u32, s).unwrap();
            }
            w.finish().unwrap()
        })
    });

    let (dst_vm, dst_vcpus) = vm(&kvm);
    c.bench_function("restore_vm_2_vcpus", |b| {
        b.iter(|| {
            restore_vm(&dst_vm, &vm_state, ClockPolicy::Advance, 0).unwrap();
            for (v, s) in dst_vcpus.iter().zip(&vcpu_states) {
                restore_vcpu(v, s, ClockPolicy::Advance, 0).unwrap();
            }
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
