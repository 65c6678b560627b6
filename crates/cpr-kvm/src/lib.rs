// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM vCPU and VM state capture and restore, as versioned cpr-snapshot sections.
//!
//! KVM VM and vCPU fds cannot survive an exec (KVM accepts VM ioctls only from the process
//! that created the VM), so every live-update mode builds a fresh VM and restores into it
//! what the old one held:
//!
//! - per vCPU ([`VcpuState`], section `kvm-vcpu`): CPUID, mp_state, regs, sregs, FPU, XSAVE,
//!   XCRs, debug registers, LAPIC, every MSR of `KVM_GET_MSR_INDEX_LIST` the kernel lets us
//!   read (refusals are reported), pending events, TSC frequency;
//! - per VM ([`VmState`], section `kvm-vm`): PIC master and slave, IOAPIC, PIT2, kvmclock.
//!
//! [`restore_vcpu`] documents the order and why. [`ClockPolicy`] says whether the guest sees
//! the downtime. The [`run`] helpers stop vCPU threads without losing a pending interrupt or
//! replaying an I/O exit.
#![deny(missing_docs)]

mod capture;
mod error;
pub mod run;
mod state;

pub use capture::{
    capture_vcpu, capture_vcpu_with, capture_vm, complete_and_capture, restore_vcpu,
    restore_vcpu_with, restore_vm, ClockPolicy, HostCaps, Report, VcpuConfig, MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
};
pub use error::{Error, Result};
pub use run::{complete_pending_io, monotonic_ns};
pub use state::{blank_states, CpuidEntry, FpuState, VcpuState, VmState, MAX_MSRS};

/// The versioned types this crate saves (sections and the types inside them), for an
/// application's [`SchemaBuilder::types`](cpr_snapshot::SchemaBuilder::types).
pub fn section_types() -> Vec<cpr_snapshot::TypeEntry> {
    use cpr_snapshot::TypeEntry;
    vec![
        TypeEntry::section::<VmState>(),
        TypeEntry::section::<VcpuState>(),
        TypeEntry::nested::<CpuidEntry>(),
        TypeEntry::nested::<FpuState>(),
    ]
}

/// How this crate's types changed, release by release.
pub const HISTORY: &[cpr_snapshot::TypeHistory] = &[cpr_snapshot::TypeHistory {
    name: "kvm-vm, kvm-vcpu",
    version: 1,
    crate_version: "0.1.0",
    change: "first version",
}];
