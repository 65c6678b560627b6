// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `cpr-floor`: what any restart of a KVM VMM must pay on this host, measured the way the
//! reference VMM does it but with nothing else around: exec of a small binary in place (this
//! one, from `execve` to its `main`),
//! `KVM_CREATE_VM`, registering the guest's memory (a memfd of the same size and page size,
//! mapped shared) with KVM, the in-kernel irqchip and PIT, creating the vCPUs, and setting
//! their state (a full restore of what a fresh vCPU holds). The memory slots come before the
//! irqchip: in the other order the first slot also waits for the kernel, several
//! milliseconds on this host (`--irqchip-first` measures that order).
//!
//! ```text
//! cpr-floor [--memory-size BYTES] [--vcpus N] [--huge-pages 2M] [--irqchip-first]
//! cpr-floor --transfer [--memory-size BYTES] [--vcpus N] [--huge-pages 2M] [--state-fds N]
//! ```
//!
//! Prints one JSON line of microseconds: `exec`, `create-vm`, `irqchip`, `memory-slots`,
//! `vcpus`, `vcpu-state`, and `total`. With `--transfer` it measures a transfer's floor
//! instead, the pause of handing a running guest to another process ([`transfer`]).

mod transfer;

use std::os::unix::process::CommandExt;
use std::time::Instant;

use cpr_memory::{GuestRam, HugePageSize, RegionSpec};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

fn monotonic_ns() -> u64 {
    cpr_kvm::monotonic_ns()
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn us(d: std::time::Duration) -> u64 {
    d.as_micros() as u64
}

/// Guest memory as the VMM has it: a memfd (RAM above 3 GiB at 4 GiB, same backing).
fn build_ram(size: u64, huge: Option<HugePageSize>) -> GuestRam {
    let mut b = GuestRam::builder();
    let pieces: Vec<(u64, u64, u64)> = if size <= 3 << 30 {
        vec![(0, size, 0)]
    } else {
        vec![(0, 3 << 30, 0), (4 << 30, size - (3 << 30), 3 << 30)]
    };
    for (addr, len, off) in &pieces {
        let s = RegionSpec::memfd("guest-ram", *addr, *len).offset(*off);
        b = b.region(match huge {
            Some(h) => s.huge_pages(h),
            None => s,
        });
    }
    b.build().expect("guest memory")
}

/// Registers every region of `ram` with `vm` as a memory slot.
fn register_slots(vm: &VmFd, ram: &GuestRam) {
    for (slot, r) in ram.layout().regions.iter().enumerate() {
        let (ptr, len) = ram.host_range(slot).expect("mapped");
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.guest_addr,
            memory_size: len as u64,
            userspace_addr: ptr as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `ram`, which every caller drops after the VM.
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    }
}

/// The TSS and identity map, the in-kernel irqchip and the PIT, as the VMM sets them up.
fn create_irqchip(vm: &VmFd) {
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    vm.set_identity_map_address(0xfffb_c000)
        .expect("KVM_SET_IDENTITY_MAP_ADDR");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("KVM_CREATE_PIT2");
}

fn main() {
    // Read first, so that the exec's measure ends where the second image starts.
    let started = monotonic_ns();
    let vcpus: u64 = arg("--vcpus")
        .map(|s| s.parse().expect("a count"))
        .unwrap_or(2);
    let state_fds: usize = arg("--state-fds")
        .map(|s| s.parse().expect("a count"))
        .unwrap_or(0);
    if let Some(path) = arg("--transfer-new") {
        return transfer::new_side(&path, vcpus, state_fds);
    }
    let size: u64 = arg("--memory-size")
        .map(|s| s.parse().expect("a size in bytes"))
        .unwrap_or(1 << 30);
    let huge = arg("--huge-pages").map(|s| match s.as_str() {
        "2M" => HugePageSize::Size2M,
        "1G" => HugePageSize::Size1G,
        other => panic!("huge pages {other}"),
    });
    if std::env::args().any(|a| a == "--transfer") {
        return transfer::old_side(build_ram(size, huge), vcpus, state_fds);
    }
    // First image: exec itself in place, as a restart does, and measure in the second.
    let exec_us = match arg("--after-exec") {
        Some(t0) => started.saturating_sub(t0.parse().expect("a time")) / 1000,
        None => {
            let err = std::process::Command::new(std::env::current_exe().expect("own path"))
                .args(std::env::args().skip(1))
                .arg("--after-exec")
                .arg(monotonic_ns().to_string())
                .exec();
            panic!("exec: {err}");
        }
    };
    let ram = build_ram(size, huge);

    let t = Instant::now();
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let create_vm = us(t.elapsed());

    let slots = || {
        let t = Instant::now();
        register_slots(&vm, &ram);
        us(t.elapsed())
    };
    let irqchip = || {
        let t = Instant::now();
        create_irqchip(&vm);
        us(t.elapsed())
    };
    let (memory_slots, irqchip) = if std::env::args().any(|a| a == "--irqchip-first") {
        let i = irqchip();
        (slots(), i)
    } else {
        let m = slots();
        (m, irqchip())
    };

    let t = Instant::now();
    let fds: Vec<_> = (0..vcpus)
        .map(|i| vm.create_vcpu(i).expect("KVM_CREATE_VCPU"))
        .collect();
    let create_vcpus = us(t.elapsed());

    // A fresh vCPU's full state, captured beforehand (not timed), then restored.
    let caps = cpr_kvm::HostCaps::probe(&kvm).expect("caps");
    let states: Vec<_> = fds
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let cpuid = kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .expect("cpuid");
            v.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
            cpr_kvm::capture_vcpu(v, i as u32, &caps)
                .expect("capture")
                .0
        })
        .collect();
    let t = Instant::now();
    for (v, s) in fds.iter().zip(&states) {
        cpr_kvm::restore_vcpu(v, s, cpr_kvm::ClockPolicy::Frozen, 0).expect("restore");
    }
    let vcpu_state = us(t.elapsed());

    let total = exec_us + create_vm + irqchip + memory_slots + create_vcpus + vcpu_state;
    println!(
        "{{\"exec\":{exec_us},\"create-vm\":{create_vm},\"irqchip\":{irqchip},\"memory-slots\":{memory_slots},\"vcpus\":{create_vcpus},\"vcpu-state\":{vcpu_state},\"total\":{total}}}"
    );
    drop(fds);
    drop(vm);
    drop(ram);
}
