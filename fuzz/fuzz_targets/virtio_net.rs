// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A hostile guest driving the reference VMM's virtio-net device: arbitrary set-up of both
//! queues, descriptor tables, rings and frames (`vmm_reference::virtio_net::fuzz_driver`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vmm_reference::virtio_net::fuzz_driver(data);
});
