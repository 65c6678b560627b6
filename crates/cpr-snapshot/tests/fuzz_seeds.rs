// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Keeps the fuzz seed corpus current and replays it (and any saved crash inputs) through the
//! same driver the fuzz target uses, so CI checks every input the fuzzer ever tripped on.

use std::path::PathBuf;

use cpr_snapshot::fuzzing::{exercise_reader, seeds};

fn seed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/snapshot_reader")
}

#[test]
fn seed_corpus_is_current() {
    let dir = seed_dir();
    let regen = std::env::var_os("CPR_REGEN_SEEDS").is_some();
    if regen {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seeds() {
        let path = dir.join(&name);
        if regen {
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with CPR_REGEN_SEEDS=1 to create it",
                path.display()
            )
        });
        assert_eq!(stored, bytes, "{name} is stale; run with CPR_REGEN_SEEDS=1");
    }
}

#[test]
fn replay_seeds_and_regressions() {
    let mut n = 0;
    for sub in [
        "../../fuzz/seeds/snapshot_reader",
        "../../fuzz/regressions/snapshot_reader",
    ] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            exercise_reader(&std::fs::read(&path).unwrap());
            n += 1;
        }
    }
    assert!(n >= seeds().len(), "only {n} inputs replayed");
}
