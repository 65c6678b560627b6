// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Reference VMM (in progress). Until the VMM exists, see `cpr-snapshot`'s `demo` example.

fn main() {
    eprintln!("vmm-reference is not built yet; run `cargo run -p cpr-snapshot --example demo`");
    std::process::exit(2);
}
