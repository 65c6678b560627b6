// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Encode, and decode+verify, of a realistic ~64 KiB device state.

use std::hint::black_box;

use cpr_snapshot::prelude::*;
use cpr_snapshot::{Blob, Schema, Snapshot, SnapshotWriter};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Shaped like a KVM vCPU: general registers, special registers, XSAVE, LAPIC and MSRs.
#[derive(Clone, Debug, State)]
struct Vcpu {
    regs: [u64; 18],
    sregs: Blob,
    xsave: Blob,
    lapic: Blob,
    msrs: Vec<(u32, u64)>,
}
impl Section for Vcpu {
    const NAME: &'static str = "vcpu";
}

/// Shaped like a device with a large buffer (a virtio queue area, a framebuffer slice).
#[derive(Clone, Debug, State)]
struct Device {
    config: [u32; 16],
    buffer: Blob,
}
impl Section for Device {
    const NAME: &'static str = "device";
}

fn state() -> (Vec<Vcpu>, Device) {
    let vcpus = (0..4u64)
        .map(|i| Vcpu {
            regs: [i; 18],
            sregs: Blob(vec![1; 312]),
            xsave: Blob(vec![2; 4096]),
            lapic: Blob(vec![3; 1024]),
            msrs: (0..40).map(|m| (m, u64::from(m) * i)).collect(),
        })
        .collect();
    let device = Device {
        config: [7; 16],
        buffer: Blob(vec![5; 40 << 10]),
    };
    (vcpus, device)
}

fn encode(schema: &Schema, vcpus: &[Vcpu], device: &Device) -> Vec<u8> {
    let mut w = SnapshotWriter::new(Vec::with_capacity(70 << 10), schema, "bench", "1", 1).unwrap();
    for (i, v) in vcpus.iter().enumerate() {
        w.write_section(i as u32, v).unwrap();
    }
    w.write_section(0, device).unwrap();
    w.finish().unwrap()
}

fn bench(c: &mut Criterion) {
    let schema = Schema::builder()
        .section::<Vcpu>()
        .section::<Device>()
        .build()
        .unwrap();
    let (vcpus, device) = state();
    let bytes = encode(&schema, &vcpus, &device);
    eprintln!("snapshot size: {} bytes", bytes.len());

    let mut g = c.benchmark_group("snapshot_64k");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("encode", |b| {
        b.iter(|| encode(&schema, black_box(&vcpus), black_box(&device)))
    });
    g.bench_function("decode_verify", |b| {
        b.iter(|| {
            let mut snap = Snapshot::read_from(black_box(bytes.as_slice()), &schema).unwrap();
            for i in 0..4 {
                black_box(snap.take::<Vcpu>(i).unwrap());
            }
            black_box(snap.take::<Device>(0).unwrap())
        })
    });
    g.bench_function("verify_only", |b| {
        b.iter(|| cpr_snapshot::inspect(black_box(bytes.as_slice()), schema.limits()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
