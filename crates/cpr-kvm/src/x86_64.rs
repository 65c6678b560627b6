// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Everything of the crate, on x86_64.

pub(crate) mod capture;
pub(crate) mod error;
pub(crate) mod irq;
pub mod run;
pub(crate) mod state;

/// The kvm-bindings this crate is built on.
pub use kvm_bindings;
/// The kvm-ioctls this crate is built on.
pub use kvm_ioctls;

pub use capture::{
    capture_vcpu, capture_vcpu_with, capture_vm, complete_and_capture, restore_vcpu,
    restore_vcpu_fast, restore_vcpu_with, restore_vm, ClockPolicy, HostCaps, InitialState, Report,
    VcpuConfig, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE,
};
pub use error::{Error, Result};
pub use irq::reconcile_ioapic;
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
