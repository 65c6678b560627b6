// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Every CPR mode driven by QEMU 10's command sequence only, as a QEMU user's script sends
//! it (raw QMP): `migrate-set-parameters`, `migrate`, the `MIGRATION`, `STOP` and `RESUME`
//! events, `query-migrate`, `migrate-incoming`, `quit` of the source.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vmm_reference::demo::{
    check_continuity, spawn_transfer_target_with, wait_exit, wait_progress, Status,
};
use vmm_reference::qmp_client::QmpClient;

const T: Duration = Duration::from_secs(60);

/// Waits for `MIGRATION` with `status` (the ones before it are QEMU's `setup`, `active`).
fn wait_migration(qmp: &mut QmpClient, status: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let e = qmp.wait_event("MIGRATION", T).unwrap();
        let s = e["data"]["status"].as_str().unwrap().to_string();
        seen.push(s.clone());
        assert_ne!(s, "failed", "the migration failed: {e}");
        if s == status {
            return seen;
        }
    }
}

fn set_mode(qmp: &mut QmpClient, mode: &str, extra: Value) {
    let mut a = json!({ "mode": mode });
    if let (Some(a), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    assert_eq!(qmp.execute("migrate-set-parameters", a).unwrap(), json!({}));
}

fn status_of(qmp: &mut QmpClient) -> String {
    qmp.execute("query-status", json!({})).unwrap()["status"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn cpr_transfer_as_qemu_drives_it() {
    let Some((dir, mut old, before)) = boot("qemu-transfer", "memfd", 2, 1) else {
        return;
    };
    // QEMU 10: the new VMM listens on the cpr channel and has a monitor of its own.
    let new_mon = dir.p("new-qmp.sock");
    let mut target = spawn_transfer_target_with(
        &exe(),
        &dir.p("cpr.sock"),
        &["--monitor", new_mon.to_str().unwrap()],
        &[],
        &dir.p("new.log"),
    )
    .unwrap();
    set_mode(&mut old.qmp, "cpr-transfer", json!({}));
    let params = old
        .qmp
        .execute("query-migrate-parameters", json!({}))
        .unwrap();
    assert_eq!(params["mode"], "cpr-transfer");
    let channels = json!([
        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": dir.s("main.sock")}},
        {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": dir.s("cpr.sock")}},
    ]);
    // Answered at once; the outcome comes as events.
    assert_eq!(
        old.qmp
            .execute("migrate", json!({ "channels": channels }))
            .unwrap(),
        json!({})
    );
    let seen = wait_migration(&mut old.qmp, "completed");
    assert_eq!(seen, ["setup", "active", "completed"]);
    assert!(
        old.qmp.events().any(|e| e["event"] == "STOP"),
        "STOP on the source"
    );
    let q = old.qmp.execute("query-migrate", json!({})).unwrap();
    assert_eq!(q["status"], "completed", "{q}");
    assert!(q["total-time"].as_u64().is_some(), "{q}");
    // The source waits, guest-less, for the script's `quit`.
    assert_eq!(status_of(&mut old.qmp), "postmigrate");
    assert!(
        old.qmp.execute("cont", json!({})).is_err(),
        "no guest to resume here"
    );

    let mut new = QmpClient::connect(&new_mon, T).unwrap();
    let after = wait_progress(&mut new, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(after.pid, u64::from(target.id()));
    assert_eq!(
        new.execute("query-migrate", json!({})).unwrap()["status"],
        "completed"
    );

    old.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut old.child, T).unwrap(), 0);
    // Quitting the source did not touch the guest.
    let later = wait_progress(&mut new, &after, 1).unwrap();
    check_continuity(&after, &later).unwrap();
    new.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut target, T).unwrap(), 0);
}

#[test]
fn cpr_exec_as_qemu_drives_it() {
    let Some((dir, base, mut vm, before)) = boot_with("qemu-exec", |_| "memfd".into(), 2, 1, &[])
    else {
        return;
    };
    let mut command = vec![exe().to_string_lossy().into_owned(), "run".into()];
    command.extend(base.iter().cloned());
    set_mode(
        &mut vm.qmp,
        "cpr-exec",
        json!({ "cpr-exec-command": command }),
    );
    let uri = format!("file:{}", dir.s("vm.state"));
    assert_eq!(
        vm.qmp.execute("migrate", json!({ "uri": uri })).unwrap(),
        json!({})
    );
    // Same process, same connection: the new image reports the migration completed.
    wait_migration(&mut vm.qmp, "completed");
    let q = vm.qmp.execute("query-migrate", json!({})).unwrap();
    assert_eq!(q["status"], "completed", "{q}");
    assert!(q["downtime"].as_u64().is_some(), "{q}");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(after.pid, before.pid, "exec in place");
    assert!(vm.qmp.events().any(|e| e["event"] == "RESUME"));
    quit(vm);
}

#[test]
fn cpr_reboot_as_qemu_drives_it() {
    let Some((dir, base, mut vm, before)) = boot_on_shm("qemu-reboot", 2, 1) else {
        return;
    };
    // Not set yet: a full migration is refused, with QEMU's error class.
    let e = vm
        .qmp
        .execute("migrate", json!({"uri": "file:vm.state"}))
        .unwrap_err();
    assert_eq!(qmp_error(e).0, "GenericError");
    set_mode(&mut vm.qmp, "cpr-reboot", json!({}));
    let uri = format!("file:{}", dir.s("vm.state"));
    assert_eq!(
        vm.qmp.execute("migrate", json!({ "uri": uri })).unwrap(),
        json!({})
    );
    wait_migration(&mut vm.qmp, "completed");
    assert_eq!(status_of(&mut vm.qmp), "postmigrate");
    assert_eq!(
        vm.qmp.execute("migrate_cancel", json!({})).unwrap(),
        json!({})
    );
    quit(vm);
    assert!(
        dir.shm.exists(),
        "the guest's RAM outlives the source's quit"
    );

    let mut a = base.clone();
    a.extend(["--incoming".into(), "defer".into()]);
    let mut vm = start(&dir, &a, "vmm-2.log");
    assert_eq!(status_of(&mut vm.qmp), "inmigrate");
    set_mode(&mut vm.qmp, "cpr-reboot", json!({}));
    let uri = format!("file:{}", dir.s("vm.state"));
    assert_eq!(
        vm.qmp
            .execute("migrate-incoming", json!({ "uri": uri }))
            .unwrap(),
        json!({})
    );
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(
        vm.qmp.execute("query-migrate", json!({})).unwrap()["status"],
        "completed"
    );
    let names: Vec<Value> = vm
        .qmp
        .execute("query-commands", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    for c in [
        "migrate",
        "migrate-incoming",
        "query-migrate",
        "migrate-set-parameters",
    ] {
        assert!(names.contains(&json!(c)), "{c} in query-commands");
    }
    let _ = Status::boot(2);
    quit(vm);
}
