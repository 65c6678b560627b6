// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replays the `qmp_input` fuzz target's seeds and saved crash inputs, so CI checks them
//! without nightly.

use std::path::PathBuf;

use vmm_reference::monitor::fuzz_input;

#[test]
fn replay_qmp_seeds_and_regressions() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for sub in ["seeds/qmp_input", "regressions/qmp_input"] {
        let Ok(entries) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        for e in entries {
            fuzz_input(&std::fs::read(e.unwrap().path()).unwrap());
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} inputs");
    // The seeds mean what they say.
    let seed = |name: &str| std::fs::read(root.join("seeds/qmp_input").join(name)).unwrap();
    assert_eq!(fuzz_input(&seed("two-commands")), 2);
    assert_eq!(
        fuzz_input(&seed("tricky")),
        1,
        "one good object among garbage"
    );
}
