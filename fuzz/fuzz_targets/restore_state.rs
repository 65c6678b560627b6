// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary section contents in a valid state container, through the reference VMM's
//! restore checks up to where it would open memory and create the VM
//! (`vmm_reference::update::fuzzing::restore_state`): semantic validation, not only the
//! container parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm_reference::update::fuzzing::restore_state(data);
});
