// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Feeds arbitrary bytes to the transfer protocol's frame reader and both sides' state
//! machines (`cpr_update::protocol::fuzz_reader`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cpr_update::protocol::fuzz_reader(data);
});
