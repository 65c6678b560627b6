// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes (with `CPR_REGEN_SEEDS=1`) and checks the `protocol_reader` fuzz seeds: the frames
//! of a whole transfer as either side receives them, and some that must be refused.

use std::path::PathBuf;

use cpr_update::protocol::{
    fuzz_reader, read_message, Hello, Memory, Message, Role, PROTOCOL_VERSION,
};
use cpr_update::{BuildInfo, Ids};

fn frames(msgs: &[Message]) -> Vec<u8> {
    msgs.iter().flat_map(Message::encode).collect()
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let build = BuildInfo {
        app: "vmm-reference".into(),
        version: "0.2.0".into(),
        reads: 2..=3,
        writes: 2..=3,
        features: vec!["fallback".into()],
    };
    let hello = |role| {
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            role,
            pid: 42,
            build: build.clone(),
        })
    };
    let memory = Message::Memory(Memory {
        state_version: 2,
        ids: Ids {
            vm: [1; 16],
            state: [2; 16],
            generation: 3,
        },
        container: b"CPR-SNAP".to_vec(),
    });
    vec![
        (
            "to-new-side",
            frames(&[
                hello(Role::Old),
                memory,
                Message::State(vec![0; 64]),
                Message::Commit,
            ]),
        ),
        (
            "to-old-side",
            frames(&[
                hello(Role::New),
                Message::Ready,
                Message::Restored,
                Message::Started,
            ]),
        ),
        (
            "abort",
            frames(&[hello(Role::New), Message::Abort("no".into())]),
        ),
        ("out-of-order", frames(&[Message::Commit, Message::Ready])),
    ]
}

#[test]
fn protocol_seeds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/protocol_reader");
    let regen = std::env::var_os("CPR_REGEN_SEEDS").is_some();
    if regen {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in seeds() {
        let path = dir.join(name);
        if regen {
            std::fs::write(&path, &bytes).unwrap();
        }
        let stored = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run with CPR_REGEN_SEEDS=1", path.display()));
        assert_eq!(stored, bytes, "{name} is stale; run with CPR_REGEN_SEEDS=1");
        fuzz_reader(&bytes);
        // Every seed starts with a frame that parses.
        assert!(
            read_message(&mut bytes.as_slice(), 1 << 20).is_ok(),
            "{name}"
        );
    }
}
