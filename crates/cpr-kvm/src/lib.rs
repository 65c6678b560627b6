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
//!
//! # Architectures
//!
//! x86_64 only, for now. On any other target the crate builds and is empty (this
//! paragraph is all it has), so a workspace that also targets aarch64 or riscv64 keeps
//! building; nothing here pretends to capture another architecture's vCPU state. The
//! kvm-ioctls and kvm-bindings it is built on are re-exported ([`kvm_ioctls`],
//! [`kvm_bindings`]) so an embedder uses the same versions.
#![deny(missing_docs)]
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
