// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! End-to-end tests of the real `vmm-reference` binary against `/dev/kvm`, through its QMP
//! monitor and serial output. Each test skips, saying so, when /dev/kvm is absent.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use vmm_reference::demo::{
    check_continuity, spawn_transfer_target, status, wait_exit, wait_progress, Status, Vm,
};
use vmm_reference::qmp_client::{ClientError, QmpClient};

fn boot_status(vcpus: usize) -> Status {
    Status::boot(vcpus)
}

#[test]
fn restart_keeps_the_guest_the_client_and_no_stray_fd() {
    let Some((dir, mut vm, before)) = boot("restart", "memfd", 2, 2) else {
        return;
    };
    let fds_before = fd_kinds(before.pid);
    let mut prev = before.clone();
    for i in 0..2 {
        vm.qmp.clear_events();
        // The same client connection sends cpr-save, gets its answer from the new image.
        let r = vm
            .qmp
            .execute("cpr-save", json!({"mode": "restart"}))
            .unwrap();
        assert_eq!(r["mode"], "restart");
        let blackout = r["blackout-us"].as_u64().unwrap();
        assert!(blackout > 0, "restart {i}: {r}");
        stop_then_resume(&mut vm.qmp);
        let after = wait_progress(&mut vm.qmp, &prev, 2).unwrap();
        check_continuity(&prev, &after).unwrap_or_else(|e| panic!("restart {i}: {e}"));
        assert_eq!(after.pid, before.pid, "exec in place keeps the pid");
        let status = vm.qmp.execute("query-status", json!({})).unwrap();
        assert_eq!(status, json!({"status": "running", "running": true}));
        prev = after;
    }
    // The new image closes the old VM's fd on a background thread once the guest runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = fd_kinds(before.pid);
    while now != fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now = fd_kinds(before.pid);
    }
    assert_eq!(
        now, fds_before,
        "the same kinds and numbers of fds after restart"
    );
    // The child that held the old image's address space across each exec is gone and
    // reaped once the guest ran (the old VM's closer thread leaves none either).
    while !children_of(before.pid).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        children_of(before.pid),
        Vec::<u64>::new(),
        "no child process left"
    );
    quit(vm);
    assert_serial_covers(&dir, &prev);
}

/// The next answer (not an event) on `qmp`.
fn next_answer(qmp: &mut QmpClient) -> serde_json::Value {
    next_answer_keeping(qmp, &mut Vec::new())
}

/// The next answer on `qmp`, adding the events before it to `events`.
fn next_answer_keeping(
    qmp: &mut QmpClient,
    events: &mut Vec<serde_json::Value>,
) -> serde_json::Value {
    loop {
        let m = qmp.read_message().unwrap();
        if m.get("event").is_none() {
            return m;
        }
        events.push(m);
    }
}

/// Sends `cpr-save` with `arguments` followed, in the same write, by two more commands and
/// the first half of a third; sends the second half once `cpr-save` is answered. Checks
/// that all three follow that answer, in order, answered; returns the `cpr-save` answer and
/// the events that came before it.
fn cpr_save_with_commands_in_flight(
    qmp: &mut QmpClient,
    arguments: serde_json::Value,
) -> (serde_json::Value, Vec<serde_json::Value>) {
    let batch = format!(
        "{}{}{}",
        json!({"execute": "cpr-save", "arguments": arguments, "id": "save"}),
        json!({"execute": "cpr-info", "id": "info"}),
        json!({"execute": "no-such-command", "id": "bad"}),
    );
    qmp.send_raw(batch.as_bytes()).unwrap();
    qmp.send_raw(br#"{"execute": "query-status", "#).unwrap();
    let mut events = Vec::new();
    let save = next_answer_keeping(qmp, &mut events);
    assert_eq!(
        save["id"], "save",
        "the cpr-save answer comes first: {save}"
    );
    qmp.send_raw(br#""id": "status"}"#).unwrap();
    let info = next_answer(qmp);
    assert_eq!(info["id"], "info", "{info}");
    assert!(info["return"]["modes"].is_object(), "{info}");
    let bad = next_answer(qmp);
    assert_eq!(bad["id"], "bad", "{bad}");
    assert_eq!(bad["error"]["class"], "CommandNotFound", "{bad}");
    let status = next_answer(qmp);
    assert_eq!(status["id"], "status", "{status}");
    assert_eq!(status["return"]["status"], "running", "{status}");
    (save, events)
}

#[test]
fn commands_sent_during_a_restart_are_answered_in_order() {
    // The first restart fails after the pause (the fault hook), the second succeeds.
    let Some((dir, _, mut vm, before)) = boot_with(
        "in-flight",
        |_| "memfd".into(),
        1,
        1,
        &[("CPR_UPDATE_FAULT", "restart.old.before-exec:fail")],
    ) else {
        return;
    };
    // The restart fails: the old image answers them itself, in order.
    let (save, events) = cpr_save_with_commands_in_flight(&mut vm.qmp, json!({"mode": "restart"}));
    assert!(
        save["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("resumed in this process"),
        "{save}"
    );
    // Stopped and resumed in this process: both events, in order, before the answer.
    stop_then_resume_in(&events);
    // Read and queued by the old image before it stopped: replayed by the new one.
    let (save, events) = cpr_save_with_commands_in_flight(&mut vm.qmp, json!({"mode": "restart"}));
    assert_eq!(save["return"]["mode"], "restart", "{save}");
    // The STOP this image stamped, written by the next one before its RESUME.
    stop_then_resume_in(&events);
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert_eq!(info["last-update"]["mode"], "restart", "{info}");
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);
    assert_serial_covers(&dir, &after);
}

#[test]
fn failed_exec_leaves_the_guest_running_in_the_old_process() {
    let Some((dir, _, mut vm, before)) = boot_with(
        "badexec",
        |_| "memfd".into(),
        1,
        1,
        &[("CPR_UPDATE_FAULT", "restart.old.before-exec:fail")],
    ) else {
        return;
    };
    let fds_before = fd_kinds(before.pid);
    let err = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap_err();
    let (class, desc) = qmp_error(err);
    assert_eq!(class, "GenericError");
    assert!(
        desc.contains("resumed in this process") && desc.contains("restart.old.before-exec"),
        "{desc}"
    );
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(after.pid, before.pid);
    assert_eq!(
        fd_kinds(before.pid),
        fds_before,
        "nothing left over from the failed attempt"
    );
    quit(vm);
    serial_lines(&dir);
}

#[test]
fn reboot_restores_in_a_new_process_and_hides_the_downtime() {
    let Some((dir, base, mut vm, before)) = boot_on_shm("reboot", 2, 2) else {
        return;
    };
    let t0 = Instant::now();
    let r = save_for_reboot(&mut vm);
    assert!(r["warnings"][0].as_str().unwrap().contains("kexec"), "{r}");
    let frozen = status_from_file_check(&dir);
    // A deliberate outage: the guest must not see it.
    let gap = Duration::from_secs(2);
    std::thread::sleep(gap);
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert_eq!(info["last-update"]["mode"], "reboot");
    assert!(info["last-update"]["blackout-us"].as_u64().unwrap() >= gap.as_micros() as u64);
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    let wall = t0.elapsed();
    check_continuity(&before, &after).unwrap();
    assert_ne!(after.pid, before.pid);
    assert!(frozen);
    // Guest time (kvmclock): never backwards, and the outage is hidden, so it advanced by
    // less than the wall time minus most of the outage. (This host passes its TSC through
    // to guests, so the guest TSC cannot be frozen here; see cpr-kvm's README.)
    assert!(
        after.kvmclock > before.kvmclock,
        "guest time never runs backwards"
    );
    assert!(after.tsc > before.tsc, "guest TSC never runs backwards");
    let guest_ms = (after.kvmclock - before.kvmclock) / 1_000_000;
    let visible_limit = wall.saturating_sub(gap / 2).as_millis() as u64;
    assert!(
        guest_ms < visible_limit,
        "guest saw {guest_ms} ms pass in {} ms of wall time with a {} ms outage",
        wall.as_millis(),
        gap.as_millis()
    );
    quit(vm);
    assert!(!dir.shm.exists(), "quit removes the guest RAM file");
    assert_serial_covers(&dir, &after);
}

/// The state file is complete and names every section (as `inspect` shows).
fn status_from_file_check(dir: &Dir) -> bool {
    let out = std::process::Command::new(exe())
        .arg("inspect")
        .arg(dir.p("vm.state"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success()
        && [
            "vmm-config",
            "memory-layout",
            "kvm-vm",
            "kvm-vcpu",
            "serial",
            "cpr",
        ]
        .iter()
        .all(|s| text.contains(s))
}

#[test]
fn corrupt_or_truncated_state_is_refused_and_memory_left_untouched() {
    let Some((dir, base, mut vm, _)) = boot_on_shm("corrupt", 1, 1) else {
        return;
    };
    save_for_reboot(&mut vm);
    let good = std::fs::read(dir.p("vm.state")).unwrap();
    let memory_before = std::fs::read(&dir.shm).unwrap();

    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    for (name, bytes, expect) in [
        ("truncated", good[..good.len() / 3].to_vec(), "truncated"),
        ("flipped", flipped, "checksum mismatch"),
        ("empty", Vec::new(), "truncated"),
    ] {
        let path = dir.p(name);
        std::fs::write(&path, &bytes).unwrap();
        let mut a = base.clone();
        a.extend(["--incoming".into(), path.to_string_lossy().into_owned()]);
        let out = std::process::Command::new(exe())
            .arg("run")
            .args(&a)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: the new process must fail");
        assert!(stderr.contains(expect), "{name}: unclear message: {stderr}");
        assert_eq!(
            std::fs::read(&dir.shm).unwrap(),
            memory_before,
            "{name}: guest memory untouched"
        );
    }
    // The intact file still restores the guest afterwards.
    let vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let mut vm = vm;
    let s = status(&mut vm.qmp).unwrap();
    wait_progress(&mut vm.qmp, &s, 1).unwrap();
    quit(vm);
}

#[test]
fn anonymous_memory_refuses_every_update_and_keeps_running() {
    let Some((dir, mut vm, before)) = boot("anon", "anon", 1, 1) else {
        return;
    };
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    for mode in ["restart", "reboot", "transfer"] {
        assert_eq!(info["modes"][mode]["supported"], false, "{info}");
    }
    for args in [
        json!({"mode": "restart"}),
        json!({"mode": "reboot", "path": "st"}),
    ] {
        match vm.qmp.execute("cpr-save", args).unwrap_err() {
            ClientError::Qmp { desc, .. } => assert!(desc.contains("volatile"), "{desc}"),
            e => panic!("{e}"),
        }
    }
    assert!(!dir.p("st").exists());
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);
}

#[test]
fn malformed_monitor_input_gets_qmp_errors_and_the_vm_keeps_running() {
    let Some((dir, mut vm, before)) = boot("qmp", "memfd", 1, 1) else {
        return;
    };

    // A second client that has not negotiated.
    let mut raw = QmpClient::connect_raw(&dir.p("qmp.sock"), Duration::from_secs(10)).unwrap();
    assert!(raw.read_message().unwrap().get("QMP").is_some());
    raw.send_raw(b"{\"execute\": \"query-status\"}\n").unwrap();
    let m = raw.read_message().unwrap();
    assert_eq!(m["error"]["class"], "CommandNotFound", "{m}");
    raw.send_raw(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    assert_eq!(raw.read_message().unwrap()["return"], json!({}));
    for (input, class, words) in [
        (&b"{\"execute\": \"query-status\" garbage}\n"[..], "GenericError", "JSON parse error"),
        (b"[1, 2]\n", "GenericError", "must be a JSON object"),
        (b"{\"execute\": \"no-such-command\", \"id\": 7}\n", "CommandNotFound", "no-such-command"),
        (b"{\"execute\": \"cpr-save\", \"arguments\": {\"mode\": \"sideways\"}}\n", "GenericError", "unknown mode"),
        (b"{\"execute\": \"cpr-save\", \"arguments\": {\"mode\": 5}}\n", "GenericError", "expects a string"),
        (b"{\"execute\": \"cpr-save\", \"arguments\": {\"mode\": \"reboot\", \"path\": \"/tmp/x\"}}\n", "GenericError", "memfd"),
        (b"{\"execute\": \"cpr-save\", \"arguments\": {\"mode\": \"restart\", \"bogus\": 1}}\n", "GenericError", "bogus"),
        (b"{\"execute\": \"query-status\", \"arguments\": {\"x\": 1}}\n", "GenericError", "Parameter 'x' is unexpected"),
        (b"{\"execute\": \"stop\", \"arguments\": {\"x\": 1}}\n", "GenericError", "Parameter 'x' is unexpected"),
        (b"{\"execute\": \"cont\", \"arguments\": {\"x\": 1}}\n", "GenericError", "Parameter 'x' is unexpected"),
        (b"{\"execute\": \"cpr-info\", \"arguments\": {\"x\": 1}}\n", "GenericError", "Parameter 'x' is unexpected"),
        (b"{\"execute\": \"query-commands\", \"arguments\": {\"x\": 1}}\n", "GenericError", "Parameter 'x' is unexpected"),
        (b"{\"execute\": \"cpr-save\", \"arguments\": {\"mode\": \"restart\", \"path\": \"x\"}}\n", "GenericError", "not for mode restart"),
        (b"{\"execute\": \"cpr-load\", \"arguments\": {\"path\": \"/tmp/x\"}}\n", "GenericError", "--incoming defer"),
        (b"{\"execute\": \"stop\", \"arguments\": 3}\n", "GenericError", "arguments"),
        (b"{\"no-execute\": 1}\n", "GenericError", "execute"),
        (b"nonsense\n", "GenericError", "JSON parse error"),
    ] {
        raw.send_raw(input).unwrap();
        let mut m = raw.read_message().unwrap();
        while m.get("error").is_none() {
            m = raw.read_message().unwrap();
        }
        assert_eq!(m["error"]["class"], class, "{}: {m}", String::from_utf8_lossy(input));
        let desc = m["error"]["desc"].as_str().unwrap();
        assert!(desc.contains(words), "{}: {desc}", String::from_utf8_lossy(input));
    }
    // An id is echoed on errors too.
    raw.send_raw(b"{\"execute\": \"nope\", \"id\": \"abc\"}")
        .unwrap();
    assert_eq!(raw.read_message().unwrap()["id"], "abc");

    // stop / cont with events, and the guest went on throughout.
    vm.qmp.execute("stop", json!({})).unwrap();
    assert_eq!(
        vm.qmp.execute("query-status", json!({})).unwrap()["status"],
        "paused"
    );
    vm.qmp.wait_event("STOP", Duration::from_secs(10)).unwrap();
    vm.qmp.execute("cont", json!({})).unwrap();
    vm.qmp
        .wait_event("RESUME", Duration::from_secs(10))
        .unwrap();
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);
}

#[test]
fn deferred_incoming_waits_for_cpr_load() {
    let Some((dir, base, mut vm, before)) = boot_on_shm("defer", 1, 1) else {
        return;
    };
    save_for_reboot(&mut vm);
    let mut a = base.clone();
    a.extend(["--incoming".into(), "defer".into()]);
    let mut vm = start(&dir, &a, "vmm-2.log");
    assert_eq!(
        vm.qmp.execute("query-status", json!({})).unwrap()["status"],
        "inmigrate"
    );
    assert!(vm.qmp.execute("x-demo-status", json!({})).is_err());
    let e = vm
        .qmp
        .execute("cpr-load", json!({"path": "missing"}))
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    // Only the state directory: not /etc/shadow, whose bytes never appear in an answer.
    let e = vm
        .qmp
        .execute("cpr-load", json!({"path": "/etc/shadow"}))
        .unwrap_err();
    assert!(
        e.to_string().contains("not a file in the state directory"),
        "{e}"
    );
    std::fs::write(dir.p("secret"), b"SECRET:x:1:2:3::\n").unwrap();
    let e = vm
        .qmp
        .execute("cpr-load", json!({"path": "secret"}))
        .unwrap_err();
    assert!(
        e.to_string().contains("bad magic") && !e.to_string().contains("SECRET"),
        "{e}"
    );
    vm.qmp
        .execute("cpr-load", json!({"path": "vm.state"}))
        .unwrap();
    assert_eq!(
        vm.qmp.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);
}

#[test]
fn inspect_reports_bad_files_clearly() {
    let dir = Dir::new("inspect");
    std::fs::write(dir.p("junk"), b"not a snapshot at all").unwrap();
    let out = std::process::Command::new(exe())
        .arg("inspect")
        .arg(dir.p("junk"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));
    let out = std::process::Command::new(exe())
        .arg("inspect")
        .arg(dir.p("absent"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent"));
    let _ = Path::new("");
}

fn vfio_args(dir: &Dir, memory: &str, extra: &[&str]) -> Vec<String> {
    let mut a = args(dir, memory, 1);
    a.extend(
        ["--vfio-device", "/sys/bus/pci/devices/0000:01:00.0"]
            .iter()
            .map(|s| s.to_string()),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn vfio_device_follows_a_restart_without_reset() {
    if !have_kvm() {
        return;
    }
    for (tag, extra) in [
        ("vfio-legacy", &["--vfio-model", "full"][..]),
        (
            "vfio-iommufd",
            &["--vfio-model", "full", "--vfio-iommufd"][..],
        ),
    ] {
        let dir = Dir::new(tag);
        let mut vm = start_env(
            &dir,
            &vfio_args(&dir, "memfd", extra),
            &[("CPR_UPDATE_FAULT", "restart.old.before-exec:fail")],
            "vmm.log",
        );
        let before = wait_progress(&mut vm.qmp, &boot_status(1), 1).unwrap();
        let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
        assert!(info["vfio"]["restart"].is_null(), "{tag}: {info}");
        let s = vm.qmp.execute("x-vfio-status", json!({})).unwrap();
        assert_eq!(
            s,
            json!({"resets": 0, "translates": true, "mappings": 1}),
            "{tag}"
        );

        // A failed exec gives the old host addresses back.
        assert!(vm
            .qmp
            .execute("cpr-save", json!({"mode": "restart"}))
            .is_err());
        let s = vm.qmp.execute("x-vfio-status", json!({})).unwrap();
        assert_eq!(
            s["translates"], true,
            "{tag}: abandoned update restored the addresses"
        );

        vm.qmp
            .execute("cpr-save", json!({"mode": "restart"}))
            .unwrap();
        let s = vm.qmp.execute("x-vfio-status", json!({})).unwrap();
        assert_eq!(
            s,
            json!({"resets": 0, "translates": true, "mappings": 1}),
            "{tag}: after restart"
        );
        let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
        check_continuity(&before, &after).unwrap();

        // Reboot would close the device: refused, guest running.
        let e = vm
            .qmp
            .execute("cpr-save", json!({"mode": "reboot", "path": "st"}))
            .unwrap_err();
        assert!(
            e.to_string().contains("VFIO") || e.to_string().contains("memfd"),
            "{tag}: {e}"
        );

        // Transfer to a new process keeps the device too.
        let mut new_child =
            spawn_transfer_target(&exe(), &dir.p("xfer.sock"), &dir.p("new.log")).unwrap();
        vm.qmp
            .execute(
                "cpr-save",
                json!({"mode": "transfer", "uri": format!("unix:{}", dir.s("xfer.sock"))}),
            )
            .unwrap();
        assert_eq!(
            wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap(),
            0
        );
        let s = vm.qmp.execute("x-vfio-status", json!({})).unwrap();
        assert_eq!(
            s,
            json!({"resets": 0, "translates": true, "mappings": 1}),
            "{tag}: after transfer"
        );
        let moved = wait_progress(&mut vm.qmp, &after, 1).unwrap();
        assert_eq!(moved.pid, u64::from(new_child.id()));
        vm.qmp.execute("quit", json!({})).unwrap();
        assert_eq!(
            wait_exit(&mut new_child, Duration::from_secs(60)).unwrap(),
            0
        );
    }
}

#[test]
fn vfio_refusals_are_reported_and_the_guest_keeps_running() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("vfio-refuse");
    let mut vm = start(
        &dir,
        &vfio_args(&dir, "memfd", &["--vfio-model", "no-update-vaddr"]),
        "vmm.log",
    );
    let before = wait_progress(&mut vm.qmp, &boot_status(1), 1).unwrap();
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert!(
        info["vfio"]["restart"]
            .as_str()
            .unwrap()
            .contains("VFIO_UPDATE_VADDR"),
        "{info}"
    );
    let e = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap_err();
    assert!(e.to_string().contains("VFIO_UPDATE_VADDR"), "{e}");
    assert_eq!(
        vm.qmp.execute("x-vfio-status", json!({})).unwrap()["translates"],
        true
    );
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);

    // iommufd with anonymous memory: mapped by address, so no handoff.
    let dir = Dir::new("vfio-refuse-anon");
    let mut vm = start(
        &dir,
        &vfio_args(&dir, "anon", &["--vfio-model", "full", "--vfio-iommufd"]),
        "vmm.log",
    );
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert!(
        info["vfio"]["restart"]
            .as_str()
            .unwrap()
            .contains("not by file"),
        "{info}"
    );
    quit(vm);

    // Without /dev/vfio the real kernel path fails at start with a clear message.
    if !Path::new("/dev/vfio/vfio").exists() {
        let dir = Dir::new("vfio-real");
        let out = std::process::Command::new(exe())
            .arg("run")
            .args(vfio_args(&dir, "memfd", &[]))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("VFIO") && err.contains("open"), "{err}");
    }
}

#[test]
fn transfer_hands_the_guest_and_the_client_to_a_new_process() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("transfer");
    let mut old = start(&dir, &args(&dir, "memfd", 2), "old.log");
    let before = wait_progress(&mut old.qmp, &boot_status(2), 2).unwrap();
    let mut new_child =
        spawn_transfer_target(&exe(), &dir.p("xfer.sock"), &dir.p("new.log")).unwrap();
    // Commands sent behind cpr-save are answered by the new process, in order.
    let (save, events) = cpr_save_with_commands_in_flight(
        &mut old.qmp,
        json!({"mode": "transfer", "uri": format!("unix:{}", dir.s("xfer.sock"))}),
    );
    let r = save.get("return").unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.p("new.log")).unwrap_or_default();
        panic!("cpr-save: {save}\nthe new VMM's log:\n{log}")
    });
    assert_eq!(r["mode"], "transfer");
    assert!(r["blackout-us"].as_u64().unwrap() > 0);
    // The old process stamped STOP; the new one wrote it (carried), then its RESUME.
    stop_then_resume_in(&events);
    assert_eq!(
        wait_exit(&mut old.child, Duration::from_secs(60)).unwrap(),
        0,
        "the old VMM exits"
    );
    // Same client connection, now served by the new process.
    let after = wait_progress(&mut old.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_ne!(after.pid, before.pid);
    assert_eq!(after.pid, u64::from(new_child.id()));
    old.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(
        wait_exit(&mut new_child, Duration::from_secs(60)).unwrap(),
        0
    );
    assert_serial_covers(&dir, &after);
}

#[test]
fn failed_transfers_leave_the_guest_in_the_old_process() {
    let Some((dir, mut vm, before)) = boot("transfer-fail", "memfd", 1, 1) else {
        return;
    };

    // Nobody listening.
    let e = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{}", dir.s("nobody.sock"))}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("connect"), "{e}");
    let e = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": "tcp:1.2.3.4:5"}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("unix:"), "{e}");

    // A peer that takes everything, then refuses to restore.
    let listener = std::os::unix::net::UnixListener::bind(dir.p("peer.sock")).unwrap();
    let peer = std::thread::spawn(move || {
        use cpr_update::protocol::{Channel, Hello, Message, Role, PROTOCOL_VERSION};
        let (s, _) = listener.accept().unwrap();
        let t = Duration::from_secs(60);
        let mut ch = Channel::new(s, Role::New, 64 << 20);
        let Message::Hello(h) = ch.recv("HELLO", t).unwrap() else {
            unreachable!()
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            role: Role::New,
            pid: std::process::id(),
            build: h.build,
        };
        ch.send(&Message::Hello(hello), t).unwrap();
        ch.recv("MEMORY", t).unwrap();
        let mem = ch.recv_fds(t).unwrap();
        assert!(mem.get("guest-ram").is_some());
        ch.send(&Message::Ready, t).unwrap();
        ch.recv("STATE", t).unwrap();
        let rest = ch.recv_fds(t).unwrap();
        assert!(rest.get("monitor.listener").is_some());
        assert!(ch.abort("no thanks"));
    });
    vm.qmp.clear_events();
    let e = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{}", dir.s("peer.sock"))}),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("no thanks") && e.to_string().contains("resumed"),
        "{e}"
    );
    peer.join().unwrap();
    // Stopped, then resumed here: both events, in that order.
    stop_then_resume(&mut vm.qmp);
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(after.pid, before.pid);
    quit(vm);
}

/// termios of a terminal fd: whether canonical mode and echo are on.
fn cooked(fd: i32) -> bool {
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: tcgetattr fills the termios we pass.
    assert_eq!(unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) }, 0);
    // SAFETY: initialised by tcgetattr.
    let t = unsafe { t.assume_init() };
    t.c_lflag & (libc::ICANON | libc::ECHO) == (libc::ICANON | libc::ECHO)
}

#[test]
fn a_terminal_is_raw_while_running_and_restored_across_restart_and_exit() {
    if !have_kvm() {
        return;
    }
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds; the other arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds were just opened for us.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    use std::os::fd::AsRawFd;
    assert!(cooked(slave.as_raw_fd()), "a new pty starts cooked");
    let dir = Dir::new("tty");
    let mut a = args(&dir, "memfd", 1);
    // Serial on stdout (the log file), stdin on the terminal.
    let i = a.iter().position(|x| x == "--serial").unwrap();
    a[i + 1] = "stdout".into();
    let log = std::fs::File::create(dir.p("vmm.log")).unwrap();
    let child = std::process::Command::new(exe())
        .arg("run")
        .args(&a)
        .stdin(std::fs::File::from(slave.try_clone().unwrap()))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let qmp = QmpClient::connect(&dir.p("qmp.sock"), Duration::from_secs(60)).unwrap();
    let mut vm = Vm { child, qmp };
    let before = wait_progress(&mut vm.qmp, &boot_status(1), 1).unwrap();
    assert!(!cooked(slave.as_raw_fd()), "raw while the VMM runs");
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    wait_progress(&mut vm.qmp, &before, 1).unwrap();
    assert!(!cooked(slave.as_raw_fd()), "raw again in the new image");
    quit(vm);
    assert!(cooked(slave.as_raw_fd()), "restored when the VMM exits");
    drop(master);
}

#[test]
fn serial_socket_client_keeps_reading_across_restart() {
    if !have_kvm() {
        return;
    }
    use std::io::Read;
    let dir = Dir::new("serial-sock");
    let mut a = args(&dir, "memfd", 1);
    let i = a.iter().position(|x| x == "--serial").unwrap();
    a[i + 1] = format!("unix:{}", dir.s("serial.sock"));
    let mut vm = start(&dir, &a, "vmm.log");
    let mut console = std::os::unix::net::UnixStream::connect(dir.p("serial.sock")).unwrap();
    console
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut text = String::new();
    let read_lines = |console: &mut std::os::unix::net::UnixStream, text: &mut String, n: usize| {
        let mut buf = [0u8; 256];
        while text.matches('\n').count() < n {
            let got = console.read(&mut buf).unwrap();
            assert!(got > 0, "console closed");
            text.push_str(&String::from_utf8_lossy(&buf[..got]));
        }
    };
    read_lines(&mut console, &mut text, 2);
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    let seen = text.matches('\n').count();
    read_lines(&mut console, &mut text, seen + 3);
    // The console connected mid-stream: its first line may start anywhere, so check that
    // the complete lines after the first are consecutive.
    let numbers: Vec<u64> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.strip_prefix("L ")?.split(' ').next()?.parse().ok())
        .collect();
    assert!(numbers.len() >= 3, "{text}");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or repeat across restart: {text}"
    );
    quit(vm);
}

/// An update of a paused guest, in every mode: it stays paused in the new image, and `cont`
/// runs it. (It used to stay frozen for good: no vCPU thread was started.)
#[test]
fn a_paused_guest_stays_paused_across_every_update_and_cont_runs_it() {
    let Some((dir, base, mut vm, before)) = boot_on_shm("paused", 2, 1) else {
        return;
    };
    vm.qmp.execute("stop", json!({})).unwrap();
    let before = status(&mut vm.qmp).unwrap_or(before);
    // Restart.
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert_eq!(
        (r["was-running"].clone(), r["blackout-us"].clone()),
        (json!(false), json!(null)),
        "{r}"
    );
    let before = assert_paused_then_runs(&mut vm, &before);
    // Transfer (the new process is given the same memory).
    vm.qmp.execute("stop", json!({})).unwrap();
    let before = status(&mut vm.qmp).unwrap_or(before);
    let mut new_child = vmm_reference::demo::spawn_transfer_target_with(
        &exe(),
        &dir.p("xfer.sock"),
        &["--memory", &dir.shm_arg(), "--state-dir", &dir.s("")],
        &[],
        &dir.p("new.log"),
    )
    .unwrap();
    let r = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{}", dir.s("xfer.sock"))}),
        )
        .unwrap();
    assert_eq!(r["was-running"], false, "{r}");
    assert_eq!(
        wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap(),
        0
    );
    std::mem::swap(&mut vm.child, &mut new_child);
    let before = assert_paused_then_runs(&mut vm, &before);
    // Reboot.
    vm.qmp.execute("stop", json!({})).unwrap();
    let before = status(&mut vm.qmp).unwrap_or(before);
    save_for_reboot(&mut vm);
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert_eq!(info["last-update"]["was-running"], false, "{info}");
    let after = assert_paused_then_runs(&mut vm, &before);
    // And it can still be stopped and updated again.
    vm.qmp.execute("stop", json!({})).unwrap();
    vm.qmp.execute("cont", json!({})).unwrap();
    wait_progress(&mut vm.qmp, &after, 1).unwrap();
    quit(vm);
}

/// `quit` stops the vCPUs before the VM goes: no "triple fault", nothing logged as an error.
#[test]
fn quit_of_a_running_guest_is_clean() {
    let Some((dir, vm, _)) = boot("quit", "memfd", 2, 2) else {
        return;
    };
    quit(vm);
    let log = dir.log("vmm-1.log");
    assert!(
        !log.contains("triple fault") && !log.contains(" ERROR "),
        "the log after quit:\n{log}"
    );
}

/// `--cpr-state-versions` says what this build reads and writes, as JSON.
#[test]
fn the_binary_tells_which_state_versions_it_reads() {
    let out = std::process::Command::new(exe())
        .arg("--cpr-state-versions")
        .output()
        .unwrap();
    assert!(out.status.success());
    let b = cpr_update::BuildInfo::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(b.app, "vmm-reference");
    assert_eq!(b.reads, 2..=2);
    assert!(b.has_feature("fallback"));
}

#[test]
fn the_guest_sees_at_least_the_blackout_the_vmm_reports() {
    let Some((dir, mut vm, before)) = boot("gap", "memfd", 1, 2) else {
        return;
    };
    let _ = dir;
    vm.qmp.execute("x-demo-reset-gap", json!({})).unwrap();
    // The guest forgets at its next line and publishes the new maximum at the one after.
    let reset = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    let blackout = r["blackout-us"].as_u64().unwrap();
    vm.qmp
        .wait_event("RESUME", Duration::from_secs(10))
        .unwrap();
    let after = wait_progress(&mut vm.qmp, &reset, 2).unwrap();
    // With the guest clock advanced over the pause, the guest's own TSC spans it: its
    // largest gap between two loop iterations holds the whole blackout (and, on a loaded
    // host, maybe more).
    assert!(
        after.max_gap_us * 10 >= blackout * 9,
        "guest gap {} us, blackout {blackout} us",
        after.max_gap_us
    );
    quit(vm);
}
