// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A hostile guest driving the reference VMM's virtio-blk device: arbitrary queue set-up,
//! descriptor tables, rings and request headers (`vmm_reference::virtio_blk::fuzz_driver`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm_reference::virtio_blk::fuzz_driver(data);
});
