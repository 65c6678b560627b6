// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest RAM set-up: create+map and reattach of 1, 4 and 16 GiB memfd regions (should be
//! flat in size: no page is touched), and the cost of prefaulting per GiB.

use std::collections::HashMap;
use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::time::Duration;

use cpr_memory::{GuestRam, MemoryOptions, Prefault, RegionSpec};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const GIB: u64 = 1 << 30;

fn fds_of(ram: &GuestRam) -> HashMap<String, OwnedFd> {
    ram.memfds()
        .into_iter()
        .map(|(n, fd)| (n.to_string(), fd.try_clone_to_owned().unwrap()))
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("memfd");
    for gib in [1u64, 4, 16] {
        g.bench_with_input(
            BenchmarkId::new("create_map", format!("{gib}GiB")),
            &gib,
            |b, &gib| {
                b.iter(|| {
                    GuestRam::builder()
                        .region(RegionSpec::memfd("bench", 0, black_box(gib * GIB)))
                        .build()
                        .unwrap()
                })
            },
        );
        let ram = GuestRam::builder()
            .region(RegionSpec::memfd("bench", 0, gib * GIB))
            .build()
            .unwrap();
        g.bench_with_input(
            BenchmarkId::new("reattach", format!("{gib}GiB")),
            &gib,
            |b, _| {
                b.iter_batched(
                    || fds_of(&ram),
                    |mut fds| {
                        GuestRam::reattach(ram.layout(), &mut fds, &MemoryOptions::default())
                            .unwrap()
                    },
                    criterion::BatchSize::SmallInput,
                )
            },
        );
    }
    g.finish();

    let mut g = c.benchmark_group("prefault");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (name, prefault) in [
        ("populate_write_1GiB", Prefault::PopulateWrite),
        ("map_populate_1GiB", Prefault::MapPopulate),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                GuestRam::builder()
                    .region(RegionSpec::memfd("bench", 0, GIB))
                    .options(MemoryOptions {
                        prefault,
                        ..Default::default()
                    })
                    .build()
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
