// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The reboot sequence with toy VMMs: a state file, a new "process" (another toy) that
//! finds guest RAM by path.

mod common;

use std::fs::File;
use std::path::PathBuf;

use common::{Toy, LIVE};
use cpr_update::{restore_saved, update, Error, Guest, Ids, Incoming, Outcome, Target};

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("cpr-update-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        Dir(d)
    }
    fn file(&self) -> File {
        File::open(&self.0).unwrap()
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A toy whose RAM is a file (the path a reboot finds it by).
fn toy_on_file(d: &Dir, running: bool) -> Toy {
    let path = d.0.join("ram");
    let mut t = Toy::new(running);
    if !path.exists() {
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(common::RAM_SIZE).unwrap();
        t.ram = Some(f);
    }
    t.ram_path = Some(path);
    t
}

fn reboot(dir: &Dir, version: Option<u16>) -> Target {
    Target::Reboot {
        dir: dir.file(),
        name: "vm.state".into(),
        version,
    }
}

#[test]
fn a_state_file_restores_once_into_the_memory_it_came_from() {
    let d = Dir::new("once");
    let mut old = toy_on_file(&d, true);
    old.value = 11;
    let out = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        reboot(&d, None),
        &Default::default(),
    )
    .unwrap();
    assert!(matches!(out, Outcome::Saved { version: 2, .. }), "{out:?}");
    assert_eq!(old.pauses, 1);
    let bytes = std::fs::read(d.0.join("vm.state")).unwrap();

    let mut new = toy_on_file(&d, false);
    let r = restore_saved(&mut new, &bytes, &Incoming::default()).unwrap();
    assert_eq!((new.value, new.running), (11, true));
    assert_eq!(new.stamp(), LIVE);
    assert_eq!(r.report.blackout.unwrap().basis(), "monotonic");

    // The guest ran on; the same file again would restore old CPU state over newer memory.
    let mut again = toy_on_file(&d, false);
    let e = restore_saved(&mut again, &bytes, &Incoming::default()).unwrap_err();
    assert!(e.to_string().contains("stale state"), "{e}");
    assert!(again.discarded && !again.running);
}

#[test]
fn an_older_state_version_can_be_written_and_others_are_refused_up_front() {
    let d = Dir::new("versions");
    let mut old = toy_on_file(&d, true);
    let e = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        reboot(&d, Some(3)),
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e.error, Error::InvalidVersion { requested: 3, .. }),
        "{e}"
    );
    assert_eq!((e.guest, old.pauses), (Guest::Running, 0));
    assert!(!d.0.join("vm.state").exists());

    let out = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        reboot(&d, Some(1)),
        &Default::default(),
    )
    .unwrap();
    assert!(matches!(out, Outcome::Saved { version: 1, .. }));
    let bytes = std::fs::read(d.0.join("vm.state")).unwrap();
    let info = cpr_snapshot::inspect(bytes.as_slice(), &Default::default()).unwrap();
    assert_eq!(info.header.state_version, 1);
}

#[test]
fn a_failed_save_leaves_no_file_and_the_guest_running() {
    let d = Dir::new("failsave");
    let mut old = toy_on_file(&d, true);
    old.fail = Some("save");
    let e = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        reboot(&d, None),
        &Default::default(),
    )
    .unwrap_err();
    assert_eq!((e.guest, old.pauses, old.resumes), (Guest::Running, 1, 1));
    assert!(!d.0.join("vm.state").exists());
    // A guest paused before the update stays paused.
    let mut paused = toy_on_file(&d, false);
    paused.fail = Some("save");
    let e = update(
        &mut paused,
        &Ids::new_vm().unwrap(),
        reboot(&d, None),
        &Default::default(),
    )
    .unwrap_err();
    assert_eq!(
        (e.guest, paused.pauses, paused.resumes),
        (Guest::Paused, 0, 0)
    );
}

#[test]
fn a_state_for_another_mode_is_refused() {
    let d = Dir::new("mode");
    let mut old = toy_on_file(&d, true);
    update(
        &mut old,
        &Ids::new_vm().unwrap(),
        reboot(&d, None),
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(d.0.join("vm.state")).unwrap();
    // Handed to the restart path as if an exec had brought it.
    let mut reg = cpr_fd::FdRegistry::new();
    reg.register(
        cpr_update::handover::FD_STATE,
        cpr_fd::FdKind::STATE,
        cpr_fd::sealed_memfd("s", &bytes).unwrap(),
        b"",
    )
    .unwrap();
    let e = cpr_update::resume_after_exec(&mut toy_on_file(&d, false), reg, &Incoming::default())
        .unwrap_err();
    assert!(
        matches!(e, Error::NotAnUpdate(_)),
        "no handover record: {e}"
    );
    let mut reg = cpr_fd::FdRegistry::new();
    let record = cpr_update::handover::Record {
        attempt: 0,
        argv: vec!["toy".into()],
        error: None,
        exec_ns: 0,
    };
    for (name, bytes) in [
        (cpr_update::handover::FD_STATE, bytes.clone()),
        (cpr_update::handover::FD_HANDOVER, record.encode()),
    ] {
        let fd = cpr_fd::sealed_memfd("s", &bytes).unwrap();
        reg.register(name, cpr_fd::FdKind::STATE, fd, b"").unwrap();
    }
    let mut new = toy_on_file(&d, false);
    let e = cpr_update::resume_after_exec(&mut new, reg, &Incoming::default()).unwrap_err();
    assert!(matches!(e, Error::BadUpdateSection { .. }), "{e}");
    assert!(e.to_string().contains("saved for a reboot update"), "{e}");
    assert!(new.discarded && !new.running);
}
