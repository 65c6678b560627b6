// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#![cfg(target_arch = "x86_64")]

//! Capture a running vCPU, restore it into a fresh VM in another process, and check that
//! the guest's computation ends as an uninterrupted run does (and that the I/O exit it was
//! stopped at is neither lost nor replayed).
//!
//! Skips, saying so, when /dev/kvm is absent.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpr_kvm::{
    capture_vcpu, capture_vm, complete_and_capture, complete_pending_io, restore_vcpu,
    restore_vcpu_fast, restore_vm, ClockPolicy, HostCaps, VcpuConfig, VcpuState, VmState,
};
use cpr_memory::{GuestRam, MemoryLayout, MemoryOptions, RegionSpec};
use cpr_snapshot::{Schema, Snapshot, SnapshotWriter};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

// A real-mode guest: acc = (3*acc + i) ^ mem[0x3000]; mem[0x3000] = acc, for i in 0..4096;
// reports progress (i) on port 0x10 every 64 iterations and the result on port 0x11, then spins.
std::arch::global_asm!(
    ".pushsection .rodata.cpr_kvm_test_guest,\"a\"",
    ".globl cpr_kvm_test_guest_start",
    ".globl cpr_kvm_test_guest_end",
    ".code16",
    "cpr_kvm_test_guest_start:",
    "xor cx, cx",
    "mov bx, 1",
    "2:",
    "mov ax, bx",
    "shl ax, 1",
    "add ax, bx",
    "add ax, cx",
    "xor ax, word ptr [0x3000]",
    "mov bx, ax",
    "mov word ptr [0x3000], bx",
    "inc cx",
    "test cx, 0x3f",
    "jnz 3f",
    "mov ax, cx",
    "mov dx, 0x10",
    "out dx, ax",
    "3:",
    "cmp cx, 4096",
    "jne 2b",
    "mov ax, bx",
    "mov dx, 0x11",
    "out dx, ax",
    "4:",
    "jmp 4b",
    "cpr_kvm_test_guest_end:",
    ".code64",
    ".popsection",
);

extern "C" {
    static cpr_kvm_test_guest_start: u8;
    static cpr_kvm_test_guest_end: u8;
}

fn guest_code() -> &'static [u8] {
    // SAFETY: both symbols are defined by the global_asm! above in one read-only section,
    // start before end; the bytes between them are immutable for the program's lifetime.
    unsafe {
        common::code_between(
            std::ptr::addr_of!(cpr_kvm_test_guest_start),
            std::ptr::addr_of!(cpr_kvm_test_guest_end),
        )
    }
}

const MEM: u64 = 1 << 20;

fn boot(kvm: &Kvm, vcpu: &VcpuFd, ram: &GuestRam) {
    ram.memory()
        .write_slice(guest_code(), GuestAddress(0x1000))
        .unwrap();
    common::start_real_mode(kvm, vcpu, 0x1000);
}

#[derive(Debug, Default)]
struct Run {
    progress: Vec<u16>,
    result: Option<u16>,
}

/// Runs until the guest reports its result (after which it spins; a HLT would block in the
/// in-kernel irqchip), or until it reports progress `stop_at`.
fn run(vcpu: &mut VcpuFd, out: &mut Run, stop_at: Option<u16>) {
    loop {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut(0x10, data) => {
                let v = u16::from_le_bytes([data[0], data[1]]);
                out.progress.push(v);
                if Some(v) == stop_at {
                    return;
                }
            }
            VcpuExit::IoOut(0x11, data) => {
                out.result = Some(u16::from_le_bytes([data[0], data[1]]));
                return;
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

fn schema() -> Schema {
    Schema::builder()
        .types(cpr_kvm::section_types())
        .types(cpr_memory::section_types())
        .next_version()
        .type_version::<MemoryLayout>(2)
        .build()
        .unwrap()
}

fn shm(tag: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/cpr-kvm-test-{}-{tag}",
        std::process::id()
    ))
}

struct Remove(Vec<PathBuf>);
impl Drop for Remove {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn restore_and_finish(state_path: &Path) -> Run {
    let kvm = Kvm::new().unwrap();
    let bytes = std::fs::read(state_path).unwrap();
    let schema = schema();
    let mut snap = Snapshot::read_from(bytes.as_slice(), &schema).unwrap();
    let layout: MemoryLayout = snap.take(0).unwrap();
    let vm_state: VmState = snap.take(0).unwrap();
    let vcpu_state: VcpuState = snap.take(0).unwrap();
    let ram = GuestRam::reattach(&layout, &mut HashMap::new(), &MemoryOptions::default()).unwrap();
    let (vm, mut vcpu) = common::vm_with_ram(&kvm, &ram);
    restore_vm(&vm, &vm_state, ClockPolicy::Frozen, 0).unwrap();
    let report = if std::env::var_os("CPR_KVM_TEST_FAST").is_some() {
        let caps = HostCaps::probe(&kvm).unwrap();
        let mut known = VcpuConfig::default();
        known.read_initial(&vcpu, &caps).unwrap();
        let r = restore_vcpu_fast(
            &mut vcpu,
            &vcpu_state,
            ClockPolicy::Frozen,
            0,
            &mut known,
            &caps,
        )
        .unwrap();
        assert!(known.initial.is_none(), "the record is consumed");
        println!("SYNC {}", caps.sync_regs);
        r
    } else {
        restore_vcpu(&vcpu, &vcpu_state, ClockPolicy::Frozen, 0).unwrap()
    };
    println!("SKIPPED {:?}", report.skipped_ioctls);
    eprintln!("refused MSRs on restore: {:x?}", report.refused_msrs);
    let mut out = Run::default();
    run(&mut vcpu, &mut out, None);
    out
}

#[test]
fn restored_vcpu_finishes_like_an_uninterrupted_one() {
    if let Ok(state) = std::env::var("CPR_KVM_TEST_STATE") {
        let out = restore_and_finish(Path::new(&state));
        println!("PROGRESS {:?}", out.progress);
        println!("RESULT {}", out.result.unwrap());
        return;
    }
    let Some(kvm) = common::kvm_or_skip() else {
        return;
    };
    let caps = HostCaps::probe(&kvm).unwrap();

    // Reference: one uninterrupted run.
    let ram = GuestRam::builder()
        .region(RegionSpec::memfd("ref", 0, MEM))
        .build()
        .unwrap();
    let (_vm, mut vcpu) = common::vm_with_ram(&kvm, &ram);
    boot(&kvm, &vcpu, &ram);
    let mut reference = Run::default();
    run(&mut vcpu, &mut reference, None);
    let expected = reference.result.expect("reference run finished");
    assert_eq!(reference.progress.len(), 64);

    // Interrupted: stop at the OUT of progress 2048, capture, restore elsewhere.
    let mem_path = shm("mem");
    let state_path = shm("state");
    let _cleanup = Remove(vec![mem_path.clone(), state_path.clone()]);
    let ram = GuestRam::builder()
        .region(RegionSpec::file(&mem_path, 0, MEM))
        .build()
        .unwrap();
    let (vm, mut vcpu) = common::vm_with_ram(&kvm, &ram);
    boot(&kvm, &vcpu, &ram);
    let mut first = Run::default();
    run(&mut vcpu, &mut first, Some(2048));
    // The pause's sequence: I/O completed, then captured (with the registers from kvm_run
    // where the host syncs them). It must capture what the ioctls read.
    let (vcpu_state, report) =
        complete_and_capture(&mut vcpu, 0, &caps, &VcpuConfig::default()).unwrap();
    let (by_ioctls, _) = capture_vcpu(&vcpu, 0, &caps).unwrap();
    eprintln!("host syncs registers in kvm_run: {}", caps.sync_regs);
    let mut a = vcpu_state.clone();
    let mut b = by_ioctls;
    for s in [&mut a, &mut b] {
        s.msrs.retain(|(i, _)| *i != cpr_kvm::MSR_IA32_TSC);
    }
    assert!(
        a == b,
        "the same state through kvm_run as through the ioctls"
    );
    // And a second completion is a no-op: the captured state is the one after the OUT.
    complete_pending_io(&mut vcpu).unwrap();
    eprintln!("refused MSRs on capture: {:x?}", report.refused_msrs);
    assert!(
        vcpu_state.msrs.len() >= 10,
        "{} MSRs captured",
        vcpu_state.msrs.len()
    );
    let vm_state = capture_vm(&vm, true).unwrap();
    let schema = schema();
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "cpr-kvm-test", "1", 1).unwrap();
    w.write_section(0, ram.layout()).unwrap();
    w.write_section(0, &vm_state).unwrap();
    w.write_section(0, &vcpu_state).unwrap();
    std::fs::write(&state_path, w.finish().unwrap()).unwrap();
    drop(vcpu);
    drop(vm);
    drop(ram);

    // Restored by ioctls, then with restore_vcpu_fast (parts skipped or handed to KVM_RUN).
    for fast in [false, true] {
        let mut child = Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "restored_vcpu_finishes_like_an_uninterrupted_one",
                "--nocapture",
            ])
            .env("CPR_KVM_TEST_STATE", &state_path);
        if fast {
            child.env("CPR_KVM_TEST_FAST", "1");
        }
        let text = finish_in(child, expected, &first, &reference);
        let skipped = text
            .lines()
            .find_map(|l| l.strip_prefix("SKIPPED "))
            .unwrap();
        if !fast {
            assert_eq!(skipped, "[]", "restore_vcpu sets every part");
            continue;
        }
        // A real-mode guest that never touched XCR0, the debug registers or its mp_state:
        // all three as a fresh vCPU holds them.
        for ioctl in ["KVM_SET_MP_STATE", "KVM_SET_XCRS", "KVM_SET_DEBUGREGS"] {
            assert!(skipped.contains(ioctl), "{ioctl} in {skipped}");
        }
        let sync = text.lines().any(|l| l == "SYNC true");
        for ioctl in ["KVM_SET_REGS", "KVM_SET_VCPU_EVENTS"] {
            assert_eq!(skipped.contains(ioctl), sync, "{ioctl} in {skipped}");
        }
    }
}

/// Runs the restoring child and checks it finished as the uninterrupted run did; returns its
/// output.
fn finish_in(mut child: Command, expected: u16, first: &Run, reference: &Run) -> String {
    let out = child.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let result: u16 = text
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|r| r.1.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(result, expected, "same result as the uninterrupted run");
    let progress = text
        .lines()
        .find_map(|l| l.split_once("PROGRESS ").map(|r| r.1))
        .unwrap();
    let second: Vec<u16> = progress
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect();
    // No progress report lost or repeated across the hand-over.
    let joined: Vec<u16> = first.progress.iter().chain(&second).copied().collect();
    assert_eq!(joined, reference.progress);
    text
}
