// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! An embedder's crate (tests/embedder) builds against these crates with its own
//! `GuestMemoryMmap<AtomicBitmap>`, derived state types and `Persist`, and with no
//! versionize in its manifest or its source.

use std::path::{Path, PathBuf};
use std::process::Command;

fn crate_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/embedder")
}

#[test]
fn the_embedder_crate_names_no_versionize() {
    let dir = crate_dir();
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let deps: Vec<&str> = manifest
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(
        deps.iter().any(|l| l.starts_with("cpr-memory")),
        "{manifest}"
    );
    assert!(
        !deps.iter().any(|l| l.to_lowercase().contains("versionize")),
        "{manifest}"
    );
    let source = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    assert!(source.contains("GuestMemoryMmap<AtomicBitmap>"));
    assert!(source.contains("#[state(since = 2"));
    assert!(!source.to_lowercase().contains("versionize"));
}

#[test]
fn the_embedder_crate_builds() {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("embedder-check");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["check", "--offline", "--quiet", "--manifest-path"])
        .arg(crate_dir().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the embedder crate does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
