// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Upgrades and rollbacks between two real builds: this one, and the `next` variant (built
//! once, into its own target directory), whose saved state differs as a release's would:
//! the serial device gains a field (type version 2), a skippable `vmm-stats` section appears,
//! the state version goes from 2 to 3. Every case checks the guest's continuity (counter,
//! memory, timer ticks) and, at the end, the serial log (every line once, in order).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vmm_reference::demo::{
    check_continuity, spawn_transfer_target_with, status, wait_exit, wait_progress, Status, Vm,
};

/// The `next` build of the VMM (built on first use).
fn next_binary() -> &'static Path {
    static NEXT: OnceLock<PathBuf> = OnceLock::new();
    NEXT.get_or_init(|| {
        // CARGO_BIN_EXE is TARGET/debug/vmm-reference: the variant goes to TARGET/next.
        let root = exe().parent().unwrap().parent().unwrap().to_path_buf();
        let target = root.join("next");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["build", "--offline", "--quiet", "-p", "vmm-reference"])
            .args(["--features", "next,fault-injection", "--target-dir"])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo to build the next variant");
        assert!(
            out.status.success(),
            "building the next variant failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("debug").join("vmm-reference")
    })
}

fn build_of(vm: &mut Vm) -> String {
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    info["build"].as_str().unwrap().to_string()
}

fn reads(vm: &mut Vm) -> Value {
    vm.qmp.execute("cpr-info", json!({})).unwrap()["state-versions"]["reads"].clone()
}

fn serial_lines_out(vm: &mut Vm) -> Option<u64> {
    vm.qmp.execute("x-demo-status", json!({})).unwrap()["serial-lines-out"].as_u64()
}

/// Restarts into `binary` and checks the guest went on.
fn restart_into(vm: &mut Vm, binary: &Path, before: &Status) -> (Value, Status) {
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart", "binary": binary}))
        .unwrap_or_else(|e| panic!("restart into {}: {e}", binary.display()));
    let after = wait_progress(&mut vm.qmp, before, 2).unwrap();
    check_continuity(before, &after).unwrap();
    assert_eq!(after.pid, before.pid);
    (r, after)
}

/// The test VM's arguments, allowing updates into `binaries`.
fn args_allowing(dir: &Dir, binaries: &[&Path]) -> Vec<String> {
    let mut a = args(dir, "memfd", 2);
    for b in binaries {
        a.extend([
            "--allow-update-binary".into(),
            b.to_string_lossy().into_owned(),
        ]);
    }
    a
}

/// Transfers to a new process of `target` (socket and log named after `i`), checks the guest
/// went on there, and leaves `vm` driving the new process. Returns `cpr-save`'s answer.
fn transfer_into(
    vm: &mut Vm,
    dir: &Dir,
    i: usize,
    target: &Path,
    before: &Status,
) -> (Value, Status) {
    let sock = dir.p(&format!("x{i}.sock"));
    let mut new =
        spawn_transfer_target_with(target, &sock, &[], &[], &dir.p(&format!("new{i}.log")))
            .unwrap();
    let r = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{}", sock.display())}),
        )
        .unwrap();
    assert_eq!(
        wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap(),
        0
    );
    std::mem::swap(&mut vm.child, &mut new);
    let after = wait_progress(&mut vm.qmp, before, 2).unwrap();
    check_continuity(before, &after).unwrap();
    assert_eq!(after.pid, u64::from(vm.child.id()));
    (r, after)
}

#[test]
fn restart_upgrades_and_rolls_back_between_builds() {
    if !have_kvm() {
        return;
    }
    let (old, next) = (exe(), next_binary().to_path_buf());
    let dir = Dir::new("up-restart");
    let mut vm = start(&dir, &args_allowing(&dir, &[&old, &next]), "vmm.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(2), 2).unwrap();
    assert_eq!(build_of(&mut vm), "0.2.0");
    assert_eq!(
        serial_lines_out(&mut vm),
        None,
        "the old build has no such counter"
    );

    // Upgrade: the old build writes state version 2, which the next one reads.
    let (r, after) = restart_into(&mut vm, &next, &before);
    assert_eq!(r["state-version"], 2, "{r}");
    assert_eq!(build_of(&mut vm), "0.2.0+next");
    assert_eq!(reads(&mut vm), json!([2, 3]));
    let counted = serial_lines_out(&mut vm).unwrap();

    // Within the next build, state version 3: the new field is carried, not reset.
    let (r, after) = restart_into(&mut vm, &next, &after);
    assert_eq!(r["state-version"], 3, "{r}");
    let counted_again = serial_lines_out(&mut vm).unwrap();
    assert!(counted_again > counted, "{counted} -> {counted_again}");

    // Rollback: the next build writes version 2 for the old one (no vmm-stats, serial 1).
    let (r, after) = restart_into(&mut vm, &old, &after);
    assert_eq!(r["state-version"], 2, "{r}");
    assert_eq!(build_of(&mut vm), "0.2.0");
    quit(vm);
    assert_serial_covers(&dir, &after);
}

/// A private install directory: `bin/vmm-reference`, replaced by rename as dpkg does.
struct Install {
    _dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Install {
    fn new(first: &Path) -> Install {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("vmm-reference");
        let i = Install { _dir: dir, bin };
        i.replace_with(first);
        i
    }

    /// Copies `build` beside the installed binary and renames it into place.
    fn replace_with(&self, build: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.bin.with_file_name(".vmm-reference.new");
        std::fs::copy(build, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &self.bin).unwrap();
    }
}

fn start_installed(dir: &Dir, install: &Install, a: &[String], env: &[(&str, &str)]) -> Vm {
    vmm_reference::demo::spawn_env(&install.bin, a, env, &dir.p("qmp.sock"), &dir.p("vmm.log"))
        .unwrap()
}

#[test]
fn a_restart_runs_the_binary_an_upgrade_installed_by_rename() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("up-rename");
    let install = Install::new(&exe());
    let a = args(&dir, "memfd", 1);
    let mut vm = start_installed(&dir, &install, &a, &[]);
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    // The package manager installs the next build over the running one.
    install.replace_with(next_binary());
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert_eq!(r["mode"], "restart", "{r}");
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(build_of(&mut vm), "0.2.0+next");
    // And back: the old build reinstalled, restarted into.
    install.replace_with(&exe());
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    let again = wait_progress(&mut vm.qmp, &after, 2).unwrap();
    check_continuity(&after, &again).unwrap();
    assert_eq!(build_of(&mut vm), "0.2.0");
    quit(vm);
    assert_serial_covers(&dir, &again);
}

/// The upgrade installed by rename cannot restore the state (its restore fails): the new
/// image goes back to the previous binary, although that file's path now names the new one
/// (the running binary was kept open), and the guest runs on in the old build.
#[test]
fn a_failed_upgrade_goes_back_to_the_binary_it_replaced() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("up-fallback");
    let install = Install::new(&exe());
    let a = args(&dir, "memfd", 1);
    let mut vm = start_installed(
        &dir,
        &install,
        &a,
        &[("CPR_UPDATE_FAULT", "restart.new.restore:fail")],
    );
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    install.replace_with(next_binary());
    let e = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap_err();
    let (_, desc) = qmp_error(e);
    assert!(desc.contains("resumed in the previous binary"), "{desc}");
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(
        build_of(&mut vm),
        "0.2.0",
        "the previous build runs the guest"
    );
    let exe_link = std::fs::read_link(format!("/proc/{}/exe", after.pid)).unwrap();
    assert!(
        exe_link.to_string_lossy().ends_with("(deleted)"),
        "it runs the replaced file: {}",
        exe_link.display()
    );
    quit(vm);
}

#[test]
fn transfer_upgrades_and_rolls_back_between_builds() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("up-transfer");
    let mut vm = start(&dir, &args(&dir, "memfd", 2), "old.log");
    let mut before = wait_progress(&mut vm.qmp, &Status::boot(2), 2).unwrap();
    for (i, (target, build, version)) in [
        (next_binary().to_path_buf(), "0.2.0+next", 2),
        (next_binary().to_path_buf(), "0.2.0+next", 3),
        (exe(), "0.2.0", 2),
    ]
    .into_iter()
    .enumerate()
    {
        let (r, after) = transfer_into(&mut vm, &dir, i, &target, &before);
        assert_eq!(r["state-version"], version, "{r}");
        assert_eq!(build_of(&mut vm), build);
        before = after;
    }
    quit(vm);
    assert_serial_covers(&dir, &before);
}

/// The binary a running process executes.
fn exe_of(pid: u64) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

/// Restart and transfer between this (dynamically linked) build and a static glibc build of
/// the same source, which `.ci/run` makes and names in `CPR_TEST_STATIC_VMM`: the handover
/// is the state and the fds, so the libraries must not matter. Skips, saying so, without it.
#[test]
fn updates_between_a_static_and_a_dynamic_build() {
    if !have_kvm() {
        return;
    }
    let Some(static_vmm) = std::env::var_os("CPR_TEST_STATIC_VMM") else {
        eprintln!(
            "SKIPPED: CPR_TEST_STATIC_VMM is not set (.ci/run builds the static VMM and sets it)"
        );
        return;
    };
    let static_vmm = std::fs::canonicalize(static_vmm).unwrap();
    let dynamic = std::fs::canonicalize(exe()).unwrap();
    let dir = Dir::new("up-static");
    let mut vm = start(
        &dir,
        &args_allowing(&dir, &[&dynamic, &static_vmm]),
        "vmm.log",
    );
    let mut before = wait_progress(&mut vm.qmp, &Status::boot(2), 2).unwrap();
    for target in [&static_vmm, &dynamic] {
        let (_, after) = restart_into(&mut vm, target, &before);
        assert_eq!(&exe_of(after.pid), target);
        before = after;
    }
    for (i, target) in [&static_vmm, &dynamic].into_iter().enumerate() {
        let (_, after) = transfer_into(&mut vm, &dir, i, target, &before);
        assert_eq!(&exe_of(after.pid), target);
        before = after;
    }
    quit(vm);
    assert_serial_covers(&dir, &before);
}

#[test]
fn reboot_upgrades_and_rolls_back_with_a_target_version() {
    let Some((dir, base, mut vm, before)) = boot_on_shm("up-reboot", 1, 1) else {
        return;
    };
    let next = next_binary();
    let spawn = |bin: &Path, log: &str| {
        vmm_reference::demo::spawn(bin, &incoming(&dir, &base), &dir.p("qmp.sock"), &dir.p(log))
            .unwrap()
    };
    // Old -> next: version 2.
    save_for_reboot(&mut vm);
    let mut vm = spawn(next, "next-1.log");
    assert_eq!(build_of(&mut vm), "0.2.0+next");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();

    // The next build saves its own version 3 by default: the old build refuses it, clearly,
    // before it maps anything, and the file stays usable.
    let r = save_for_reboot(&mut vm);
    assert_eq!(r["state-version"], 3, "{r}");
    let memory = std::fs::read(&dir.shm).unwrap();
    let out = std::process::Command::new(exe())
        .arg("run")
        .args(incoming(&dir, &base))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("state version 3 is not supported (reader knows versions 2..=2)"),
        "{err}"
    );
    assert!(
        std::fs::read(&dir.shm).unwrap() == memory,
        "guest memory untouched"
    );

    // So the next build restores it, and saves at version 2 for the rollback.
    let mut vm = spawn(next, "next-2.log");
    let again = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    let r = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "reboot", "path": "vm.state", "version": 2}),
        )
        .unwrap();
    assert_eq!(r["state-version"], 2, "{r}");
    assert_eq!(
        wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap(),
        0
    );
    let mut vm = spawn(&exe(), "old-2.log");
    assert_eq!(build_of(&mut vm), "0.2.0");
    let last = wait_progress(&mut vm.qmp, &again, 1).unwrap();
    check_continuity(&again, &last).unwrap();
    quit(vm);
    assert_serial_covers(&dir, &last);
}

/// A binary that reads no state version this build writes is refused while the guest
/// runs: no pause (no STOP event), same process, the guest goes on.
#[test]
fn a_restart_into_a_binary_that_cannot_read_our_state_is_refused_before_the_pause() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("up-refused");
    let future = dir.p("future-vmm");
    script(
        &future,
        r#"[ "$1" = --cpr-state-versions ] && echo '{"app":"vmm-reference","version":"9.0","reads":[9,9],"writes":[9,9]}' && exit 0
exit 1"#,
    );
    let mut a = args(&dir, "memfd", 1);
    a.extend(["--allow-update-binary".into(), dir.s("future-vmm")]);
    a.extend([
        "--allow-update-binary".into(),
        exe().to_string_lossy().into_owned(),
    ]);
    let mut vm = start(&dir, &a, "vmm.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let e = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart", "binary": future}))
        .unwrap_err();
    let (_, desc) = qmp_error(e);
    assert!(
        desc.contains("reads state versions 9..=9, this build writes 2..=2")
            && desc.contains("the guest was not stopped and runs on in this process"),
        "{desc}"
    );
    assert!(
        vm.qmp.events().all(|e| e["event"] != "STOP"),
        "no pause: {:?}",
        vm.qmp.events().collect::<Vec<_>>()
    );
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(after.pid, before.pid);
    let s = status(&mut vm.qmp).unwrap();
    assert!(s.counter > before.counter);
    quit(vm);
}
