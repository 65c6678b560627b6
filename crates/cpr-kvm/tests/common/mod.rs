// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared set-up of the KVM tests.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

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
