// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm-reference`: see `vmm-reference --help`.

use clap::Parser;

fn main() {
    std::process::exit(vmm_reference::main_with(vmm_reference::config::Cli::parse()));
}
