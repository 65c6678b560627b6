// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replays the `qmp_input` fuzz target's seeds and saved crash inputs, so CI checks them
//! without nightly.

use std::path::PathBuf;

use vmm_reference::monitor::fuzz_input;

/// Feeds `f` every seed and saved crash input of fuzz target `target`; how many.
fn replay(target: &str, mut f: impl FnMut(&[u8])) -> usize {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for sub in ["seeds", "regressions"] {
        for e in std::fs::read_dir(root.join(sub).join(target))
            .into_iter()
            .flatten()
        {
            f(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
    }
    n
}

/// Seed `name` of `target` is `seed`: written with `CPR_REGEN_SEEDS=1`, checked otherwise.
fn seed_is_current(target: &str, name: &str, seed: &[u8]) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let path = dir.join(name);
    if std::env::var_os("CPR_REGEN_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, seed).unwrap();
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        seed,
        "regenerate with CPR_REGEN_SEEDS=1"
    );
}

#[test]
fn replay_qmp_seeds_and_regressions() {
    let n = replay("qmp_input", |d| {
        fuzz_input(d);
    });
    assert!(n >= 4, "only {n} inputs");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    // The seeds mean what they say.
    let seed = |name: &str| std::fs::read(root.join("seeds/qmp_input").join(name)).unwrap();
    assert_eq!(fuzz_input(&seed("two-commands")), 2);
    assert_eq!(
        fuzz_input(&seed("tricky")),
        1,
        "one good object among garbage"
    );
}

fn restore_seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/restore_state")
}

/// The `restore_state` seeds are written by this test (`CPR_REGEN_SEEDS=1`) and must be
/// current: the valid one passes every check of the restore, each variant fails its own.
#[test]
fn restore_seeds_are_current_and_mean_what_they_say() {
    use vmm_reference::update::fuzzing::{restore_state, seeds};
    let dir = restore_seed_dir();
    let regen = std::env::var_os("CPR_REGEN_SEEDS").is_some();
    if regen {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seeds() {
        let path = dir.join(&name);
        if regen {
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run with CPR_REGEN_SEEDS=1", path.display()));
        assert_eq!(stored, bytes, "{name} is stale; run with CPR_REGEN_SEEDS=1");
        let r = restore_state(&bytes);
        match name.as_str() {
            "valid" => assert_eq!(r.unwrap().vcpus, 2),
            "one-vcpu-section" => assert!(r.unwrap_err().contains("vCPU sections [0]")),
            "region-at-4g" => assert!(r.unwrap_err().contains("guest address")),
            "other-file" => assert!(r.unwrap_err().contains("memory backend")),
            other => panic!("unexpected seed {other}"),
        }
    }
}

#[test]
fn replay_restore_and_protocol_regressions() {
    replay("restore_state", |d| {
        let _ = vmm_reference::update::fuzzing::restore_state(d);
    });
    replay("protocol_reader", cpr_update::protocol::fuzz_reader);
}

/// The `virtio_blk` seed: one read request, well formed (written by this test with
/// `CPR_REGEN_SEEDS=1`, checked otherwise), and every seed and regression replayed.
#[test]
fn virtio_blk_seeds_are_current_and_replay() {
    use vmm_reference::virtio_blk::fuzz_driver;
    let mut seed = vec![0u8; 16 + 0x4011];
    seed[0] = 15; // queue size 16
    seed[2..4].copy_from_slice(&0x1000u16.to_le_bytes());
    seed[4..6].copy_from_slice(&0x2000u16.to_le_bytes());
    seed[6..8].copy_from_slice(&0x3000u16.to_le_bytes());
    seed[8..10].copy_from_slice(&1u16.to_le_bytes());
    let mem = &mut seed[16..];
    let mut desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16| {
        let d = 0x1000 + i * 16;
        mem[d..d + 8].copy_from_slice(&addr.to_le_bytes());
        mem[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
        mem[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
        mem[d + 14..d + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(0, 0x4000, 16, 1, 1);
    desc(1, 0x5000, 512, 3, 2);
    desc(2, 0x4010, 1, 2, 0);
    assert_eq!(fuzz_driver(&seed), 1, "the seed is one request served");
    seed_is_current("virtio_blk", "one-read", &seed);
    replay("virtio_blk", |d| {
        fuzz_driver(d);
    });
    // Garbage of every short length.
    for n in 0..64 {
        fuzz_driver(&vec![0xa5; n]);
    }
}

/// The `virtio_net` seed: one frame to send and one receive buffer, well formed (written
/// by this test with `CPR_REGEN_SEEDS=1`, checked otherwise), and every seed and regression
/// replayed.
#[test]
fn virtio_net_seeds_are_current_and_replay() {
    use vmm_reference::virtio_net::fuzz_driver;
    let mut seed = vec![0u8; 16 + 0x8800];
    seed[0] = 1; // transmit available index
    seed[1] = 3; // receive queue of 8
    seed[2..4].copy_from_slice(&0x5000u16.to_le_bytes());
    seed[4..6].copy_from_slice(&0x6000u16.to_le_bytes());
    seed[6..8].copy_from_slice(&0x7000u16.to_le_bytes());
    seed[8] = 3; // transmit queue of 8
    seed[9..11].copy_from_slice(&0x1000u16.to_le_bytes());
    seed[11..13].copy_from_slice(&0x2000u16.to_le_bytes());
    seed[13..15].copy_from_slice(&0x3000u16.to_le_bytes());
    let mem = &mut seed[16..];
    let mut desc = |at: usize, addr: u64, len: u32, flags: u16| {
        mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
    };
    desc(0x1000, 0x4000, 72, 0);
    desc(0x5000, 0x8000, 2048, 2);
    mem[0x6002] = 1; // receive available index
    for (i, b) in [0xffu8; 6].iter().enumerate() {
        mem[0x4000 + 12 + i] = *b;
    }
    assert_eq!(
        fuzz_driver(&seed),
        2,
        "the seed is one frame sent, one received"
    );
    seed_is_current("virtio_net", "one-each-way", &seed);
    replay("virtio_net", |d| {
        fuzz_driver(d);
    });
    for n in 0..64 {
        fuzz_driver(&vec![0xa5; n]);
    }
}
