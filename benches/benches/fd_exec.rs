// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! prepare + execve + reclaim latency for 1, 100 and 1000 fds.
//!
//! Criterion cannot time across an exec, so this is a bench binary that prints numbers. Each
//! sample is a child process that opens N fds, registers them, reads CLOCK_MONOTONIC, then
//! prepares and execs itself; the new image reclaims the registry, reads the clock again and
//! prints the difference. The parent reports the median and 90th percentile of 30 samples.

use std::os::fd::OwnedFd;
use std::process::Command;
use std::time::Duration;

use cpr_fd::{reclaim, FdKind, FdRegistry};

fn now_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn main() {
    if let Ok(t0) = std::env::var("CPR_BENCH_T0") {
        // The new image.
        let reg = reclaim().unwrap().unwrap();
        let t1 = now_ns();
        let t0: u128 = t0.parse().unwrap();
        println!("{} {}", reg.len(), t1 - t0);
        return;
    }
    if let Ok(n) = std::env::var("CPR_BENCH_FDS") {
        // The old image.
        let n: usize = n.parse().unwrap();
        let mut reg = FdRegistry::new();
        for i in 0..n {
            let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            reg.register(&format!("fd.{i}"), FdKind::OTHER, fd, &[])
                .unwrap();
        }
        let t0 = now_ns();
        std::env::set_var("CPR_BENCH_T0", t0.to_string());
        let err = reg.prepare().unwrap().exec_self(&[]);
        panic!("exec failed: {err}");
    }
    if std::env::args().any(|a| a == "--list") {
        println!("fd_exec: bench");
        return;
    }
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench targets without --bench: stay quick.
        return;
    }
    println!("prepare + exec + reclaim (30 samples each)");
    for n in [1usize, 100, 1000] {
        let mut samples: Vec<u128> = (0..30)
            .map(|_| {
                let out = Command::new(std::env::current_exe().unwrap())
                    .env("CPR_BENCH_FDS", n.to_string())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8(out.stdout).unwrap();
                let mut it = text.split_whitespace();
                assert_eq!(it.next().unwrap().parse::<usize>().unwrap(), n);
                it.next().unwrap().parse().unwrap()
            })
            .collect();
        samples.sort_unstable();
        let d = |ns: u128| Duration::from_nanos(ns as u64);
        println!(
            "  {n:>5} fds: median {:?}, p90 {:?}, min {:?}",
            d(samples[samples.len() / 2]),
            d(samples[samples.len() * 9 / 10]),
            d(samples[0])
        );
    }
}
