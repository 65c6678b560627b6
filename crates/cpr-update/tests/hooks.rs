// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The test hooks, which read the process environment: one test, its steps in order.

mod common;

use std::fs::File;

use common::Toy;
use cpr_update::clock::TEST_BOOT_ID_ENV;
use cpr_update::fault::FAULT_ENV;
use cpr_update::{restore_saved, update, Error, Guest, Ids, Incoming, Target};

#[test]
fn fake_boot_ids_and_injected_faults() {
    let d = std::env::temp_dir().join(format!("cpr-update-hooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    let ram = d.join("ram");
    let f = File::create_new(&ram).unwrap();
    f.set_len(common::RAM_SIZE).unwrap();
    let toy = |running| {
        let mut t = Toy::new(running);
        t.ram = Some(File::options().read(true).write(true).open(&ram).unwrap());
        t.ram_path = Some(ram.clone());
        t
    };
    let target = || Target::Reboot {
        dir: File::open(&d).unwrap(),
        name: "vm.state".into(),
        version: None,
    };

    // A fault before the rename: no state file, no temporary, the guest runs on.
    std::env::set_var(FAULT_ENV, "reboot.old.before-rename:fail");
    let mut old = toy(true);
    let e = update(
        &mut old,
        &Ids::new_vm().unwrap(),
        target(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("injected fault at reboot.old.before-rename"),
        "{e}"
    );
    assert_eq!(e.guest, Guest::Running);
    assert!(std::env::var_os(FAULT_ENV).is_none(), "a fault fires once");
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ram"], "no state file and no temporary");

    // Saved on this boot, restored "after a host reboot" (another boot id): the monotonic
    // stop time means nothing there, real time is used, and said so.
    update(
        &mut old,
        &Ids::new_vm().unwrap(),
        target(),
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(d.join("vm.state")).unwrap();
    std::env::set_var(TEST_BOOT_ID_ENV, "11111111-2222-3333-4444-555555555555");
    let mut new = toy(false);
    let r = restore_saved(&mut new, &bytes, &Incoming::default()).unwrap();
    std::env::remove_var(TEST_BOOT_ID_ENV);
    let b = r.report.blackout.unwrap();
    assert_eq!(b.basis(), "realtime");
    assert!(b.ns().unwrap() < 60_000_000_000, "{b:?}");
    assert!(r
        .report
        .phases
        .iter()
        .any(|p| p.since_stop.basis() == "realtime"));

    // A fault in the new process's restore: the VMM's work is discarded.
    update(&mut new, &r.ids, target(), &Default::default()).unwrap();
    let bytes = std::fs::read(d.join("vm.state")).unwrap();
    std::env::set_var(FAULT_ENV, "reboot.new.restore:fail");
    let mut failing = toy(false);
    let e = restore_saved(&mut failing, &bytes, &Incoming::default()).unwrap_err();
    assert!(matches!(e, Error::Fault("reboot.new.restore")), "{e}");
    assert!(failing.discarded && !failing.running);
    std::fs::remove_dir_all(&d).unwrap();
}
