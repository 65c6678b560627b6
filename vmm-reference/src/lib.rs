// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reference VMM: a small KVM VMM that composes cpr-snapshot, cpr-memory, cpr-fd and
//! cpr-kvm, and proves that a guest survives a VMM restart (exec in place) and a reboot
//! (state file, new process) with its memory, CPU state, interrupts and console intact.
#![deny(missing_docs)]

pub mod config;
pub mod demo;
pub mod error;
pub mod gate;
pub mod guest;
pub mod hmp;
pub mod linux;
pub mod machine;
pub mod memory;
pub mod monitor;
pub mod netlab;
pub mod notify;
pub mod passthrough;
pub mod policy;
pub mod qemu;
pub mod qmp_client;
pub mod serial;
pub mod unix;
pub mod update;
pub mod update_cmd;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_net;
pub mod vmm;

/// Runs the command line; returns the process exit code.
pub fn main_with(cli: config::Cli) -> i32 {
    let env = env_logger::Env::default().default_filter_or(cli.log_level.as_str());
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_micros()
        .try_init();
    if cli.cpr_state_versions {
        println!("{}", update::build_info(&update::schema()).to_json());
        return 0;
    }
    let Some(command) = cli.command else {
        eprintln!("vmm-reference: a command is needed (run, demo, inspect); see --help");
        return 2;
    };
    match command {
        config::Command::Run(cfg) => match vmm::Vmm::start(*cfg).and_then(vmm::Vmm::run) {
            Ok(_) => 0,
            Err(e) => {
                // Once, without log decoration: this is the process's answer.
                eprintln!("vmm-reference: {e}");
                1
            }
        },
        config::Command::Demo(cfg) => match demo::run(&cfg) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("demo FAILED: {e}");
                1
            }
        },
        config::Command::Update(args) => update_cmd::run(&args),
        config::Command::Monitor { socket } => hmp::run(&socket),
        config::Command::Inspect { file } => match vmm::inspect(&file) {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(e) => {
                eprintln!("vmm-reference: {e}");
                1
            }
        },
    }
}
