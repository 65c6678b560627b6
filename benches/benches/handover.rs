// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The part of a transfer's blackout that is protocol: from the old side sending `STATE`
//! (a 24 KiB container, about what two vCPUs and the reference VMM's devices make) and its
//! fds, through `RESTORED` and `COMMIT`, to `STARTED`, over a UNIX socket pair between two
//! threads. The hellos, `MEMORY` and `READY` happen before the pause and are not measured.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cpr_fd::{FdKind, FdRegistry};
use cpr_update::protocol::{Channel, Hello, Memory, Message, Role, PROTOCOL_VERSION};
use cpr_update::{BuildInfo, Ids};
use criterion::{criterion_group, criterion_main, Criterion};

const T: Duration = Duration::from_secs(10);
const MAX: u64 = 1 << 26;

fn hello(role: Role) -> Message {
    Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        role,
        pid: std::process::id(),
        build: BuildInfo {
            app: "bench".into(),
            version: "0".into(),
            reads: 2..=2,
            writes: 2..=2,
            features: vec![],
        },
    })
}

fn fds(n: usize) -> FdRegistry {
    let mut reg = FdRegistry::new();
    for i in 0..n {
        let fd = std::fs::File::open("/dev/null").unwrap();
        reg.register(&format!("fd.{i}"), FdKind::OTHER, fd, &[])
            .unwrap();
    }
    reg
}

/// Two channels past `READY`: where the old side pauses the guest.
fn ready() -> (Channel, Channel) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut old = Channel::new(a, Role::Old, MAX);
    let mut new = Channel::new(b, Role::New, MAX);
    old.send(&hello(Role::Old), T).unwrap();
    new.recv("HELLO", T).unwrap();
    new.send(&hello(Role::New), T).unwrap();
    old.recv("HELLO", T).unwrap();
    old.send(
        &Message::Memory(Memory {
            state_version: 2,
            ids: Ids {
                vm: [1; 16],
                state: [2; 16],
                generation: 1,
            },
            container: vec![0; 256],
        }),
        T,
    )
    .unwrap();
    new.recv("MEMORY", T).unwrap();
    new.send(&Message::Ready, T).unwrap();
    old.recv("READY", T).unwrap();
    (old, new)
}

/// The pause window: `STATE` and its fds, then `RESTORED` → `COMMIT` → `STARTED`; or, between
/// builds that decide the owner with the owner word, `STARTED` right away (the claim itself
/// is one compare-and-swap in a shared page, not a message, and is left out).
fn window(c: &mut Criterion, name: &str, owner_word: bool) {
    let state = vec![0x5a_u8; 24 << 10];
    let reg = fds(6);
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut old, mut new) = ready();
                if owner_word {
                    old.use_owner_word();
                    new.use_owner_word();
                }
                let (tx, rx) = std::sync::mpsc::channel();
                let mut start = Instant::now();
                std::thread::scope(|s| {
                    s.spawn(move || {
                        // Waiting in recv, as the new side does, before the clock starts.
                        tx.send(()).unwrap();
                        let Message::State(got) = new.recv("STATE", T).unwrap() else {
                            panic!("not a STATE");
                        };
                        assert_eq!(got.len(), 24 << 10);
                        let got = new.recv_fds(T).unwrap();
                        assert_eq!(got.len(), 6);
                        if !owner_word {
                            new.send(&Message::Restored, T).unwrap();
                            new.recv("COMMIT", T).unwrap();
                        }
                        new.send(&Message::Started, T).unwrap();
                    });
                    rx.recv().unwrap();
                    start = Instant::now();
                    old.send(&Message::State(state.clone()), T).unwrap();
                    old.send_fds(&reg, T).unwrap();
                    if !owner_word {
                        old.recv("RESTORED", T).unwrap();
                        old.send(&Message::Commit, T).unwrap();
                    }
                    old.recv("STARTED", T).unwrap();
                });
                total += start.elapsed();
            }
            total
        })
    });
}

fn bench(c: &mut Criterion) {
    window(c, "pause_window_exchange", false);
    window(c, "pause_window_exchange_owner_word", true);
}

criterion_group!(benches, bench);
criterion_main!(benches);
