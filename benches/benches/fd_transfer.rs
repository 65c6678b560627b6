// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Sending and receiving a registry of 1000 fds over a UNIX socket pair.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cpr_fd::{FdKind, FdRegistry};
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let mut reg = FdRegistry::new();
    for i in 0..1000 {
        let fd = std::fs::File::open("/dev/null").unwrap();
        reg.register(&format!("fd.{i}"), FdKind::OTHER, fd, &[])
            .unwrap();
    }
    c.bench_function("transfer_1000_fds", |b| {
        // Time send+receive only; close the 1000 received fds outside the measurement, one
        // registry at a time (keeping a batch of them would exhaust the fd limit).
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (a, s) = UnixStream::pair().unwrap();
                let start = Instant::now();
                let got = std::thread::scope(|sc| {
                    sc.spawn(|| reg.send(&a).unwrap());
                    FdRegistry::receive(&s).unwrap()
                });
                total += start.elapsed();
                assert_eq!(got.len(), 1000);
            }
            total
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
