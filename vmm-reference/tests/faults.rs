// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Faults at every step of every update mode, on either side: the process fails the step
//! (`fail`) or is killed there (`kill`), through cpr-update's fault hook. Each case ends
//! with the guest running in exactly one process, or, for the two cases nothing can catch
//! (a restart's new image killed during its restore; a transfer's new process killed after
//! the commit), with the documented outcome: no process runs the guest.

mod common;

use std::process::Child;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use vmm_reference::demo::{
    check_continuity, spawn_transfer_target_with, status, wait_exit, wait_progress, Status, Vm,
};
use vmm_reference::qmp_client::ClientError;

const FAULT: &str = "CPR_UPDATE_FAULT";
const WITHOUT_FEATURES: &str = "CPR_UPDATE_TEST_WITHOUT_FEATURES";

/// Where the guest ended up.
#[derive(Debug, PartialEq, Eq)]
enum Owner {
    Old,
    New,
    Nobody,
}

/// Whether the process ended by a signal (the `kill` action) rather than exiting.
fn killed(child: &mut Child) -> bool {
    let st = child.wait().unwrap();
    st.code().is_none()
}

/// A transfer with faults on the old side (`old_env`) and the new side (`new_env`); returns
/// where the guest runs, checked against the guest itself.
/// `legacy`: both builds run as ones from before the owner word (`RESTORED` and `COMMIT`
/// decide the owner).
fn transfer_with(
    tag: &str,
    old_fault: Option<&str>,
    new_fault: Option<&str>,
    legacy: bool,
) -> Option<Owner> {
    let legacy_env = legacy.then_some((WITHOUT_FEATURES, "cpr.owner-word"));
    let old_env: Vec<(&str, &str)> = old_fault
        .map(|f| (FAULT, f))
        .into_iter()
        .chain(legacy_env)
        .collect();
    let (dir, _, mut vm, before) = boot_with(tag, |_| "memfd".into(), 1, 1, &old_env)?;
    let new_env: Vec<(&str, &str)> = new_fault
        .map(|f| (FAULT, f))
        .into_iter()
        .chain(legacy_env)
        .collect();
    let mut new = spawn_transfer_target_with(
        &exe(),
        &dir.p("xfer.sock"),
        &["--log-level", "debug"],
        &new_env,
        &dir.p("new.log"),
    )
    .unwrap();
    let old_pid = u64::from(vm.child.id());
    let new_pid = u64::from(new.id());
    let answer = vm.qmp.execute(
        "cpr-save",
        json!({"mode": "transfer", "uri": format!("unix:{}", dir.s("xfer.sock"))}),
    );
    let logs = || {
        format!(
            "old:\n{}\nnew:\n{}",
            dir.log("vmm-1.log"),
            dir.log("new.log")
        )
    };
    let old_alive = vm.child.try_wait().unwrap().is_none();
    let owner = match &answer {
        Err(ClientError::Qmp { desc, .. }) => {
            // Before the pause the guest was not stopped; after it, it resumed.
            assert!(
                desc.contains("resumed in this process")
                    || desc.contains("was not stopped and runs on in this process"),
                "{desc}\n{}",
                logs()
            );
            Owner::Old
        }
        Ok(r) => {
            assert_eq!(r["mode"], "transfer", "{r}");
            Owner::New
        }
        Err(ClientError::Io(_)) => Owner::Nobody,
    };
    match owner {
        Owner::Old => {
            assert!(old_alive, "{}", logs());
            // The new process gave up (or was killed) and is gone.
            wait_exit(&mut new, Duration::from_secs(60)).unwrap();
            let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
            check_continuity(&before, &after).unwrap();
            assert_eq!(after.pid, old_pid);
            quit(vm);
        }
        Owner::New => {
            let code = wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap();
            if !old_fault.is_some_and(|f| f.ends_with(":kill")) {
                assert_eq!(code, 0, "the old process exits cleanly after a transfer");
            }
            let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
            check_continuity(&before, &after).unwrap();
            assert_eq!(after.pid, new_pid, "{}", logs());
            std::mem::swap(&mut vm.child, &mut new);
            let _ = new.try_wait();
            quit(vm);
        }
        Owner::Nobody => {
            // Neither runs it: both processes end.
            wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap();
            let _ = wait_exit(&mut new, Duration::from_secs(60));
        }
    }
    Some(owner)
}

/// Runs each case and checks where the guest ended up.
fn transfer_cases(cases: &[(Option<&str>, Option<&str>)], legacy: bool, expect: Owner) {
    for &(old, new) in cases {
        let point = old.or(new).unwrap().replace([':', '.'], "-");
        let tag = format!("xf{}-{point}", if legacy { "l" } else { "" });
        let Some(owner) = transfer_with(&tag, old, new, legacy) else {
            return;
        };
        assert_eq!(
            owner, expect,
            "old fault {old:?}, new fault {new:?}, legacy {legacy}"
        );
    }
}

#[test]
fn transfer_failures_before_the_claim_leave_the_guest_in_the_old_process() {
    transfer_cases(
        &[
            (Some("transfer.old.before-ready:fail"), None),
            (None, Some("transfer.new.before-ready:fail")),
            (None, Some("transfer.new.before-ready:kill")),
            (None, Some("transfer.new.restore:fail")),
            (None, Some("transfer.new.restore:kill")),
            (Some("transfer.old.before-state:fail"), None),
            (None, Some("transfer.new.before-claim:fail")),
            (None, Some("transfer.new.before-claim:kill")),
            // Killed with the word claimed but before it marked the memory as its own: the
            // old process sees the mark untouched and the new one dead, and takes the
            // guest back.
            (None, Some("transfer.new.claimed:kill")),
        ],
        false,
        Owner::Old,
    );
}

#[test]
fn an_old_process_killed_once_the_state_is_sent_leaves_the_guest_to_the_new_one() {
    // The new side needs no word from it: it claims the owner word and runs the guest.
    transfer_cases(
        &[(Some("transfer.old.after-state:kill"), None)],
        false,
        Owner::New,
    );
}

/// Builds from before the owner word: the same guarantees with `RESTORED` and `COMMIT`.
#[test]
fn legacy_transfer_failures_before_the_commit_leave_the_guest_in_the_old_process() {
    transfer_cases(
        &[
            (Some("transfer.old.before-ready:fail"), None),
            (None, Some("transfer.new.restore:kill")),
            (Some("transfer.old.before-commit:fail"), None),
            (None, Some("transfer.new.before-commit:fail")),
            (None, Some("transfer.new.before-commit:kill")),
            // Killed with the COMMIT read but before it marked the memory as its own.
            (None, Some("transfer.new.commit-received:kill")),
        ],
        true,
        Owner::Old,
    );
}

#[test]
fn a_legacy_old_process_killed_at_the_commit_leaves_the_guest_to_the_new_one() {
    // Killed before sending COMMIT: the new process sees it die without aborting, after
    // the pause, and takes the guest over. Killed after: the new one has the COMMIT.
    transfer_cases(
        &[
            (Some("transfer.old.before-commit:kill"), None),
            (Some("transfer.old.after-commit:kill"), None),
        ],
        true,
        Owner::New,
    );
}

/// The documented uncatchable case: the new process killed once it owns the guest (after
/// its commit hook). The old one has let go (it sees the new one's mark on the memory), so
/// no process runs the guest. With and without the owner word.
#[test]
fn a_new_process_killed_after_the_commit_loses_the_guest_as_documented() {
    for legacy in [false, true] {
        transfer_cases(
            &[(None, Some("transfer.new.after-commit:kill"))],
            legacy,
            Owner::Nobody,
        );
    }
}

fn restart_with(tag: &str, fault: &str) -> Option<(Dir, Vm, Status, Result<Value, ClientError>)> {
    let (dir, _, mut vm, before) = boot_with(tag, |_| "memfd".into(), 1, 1, &[(FAULT, fault)])?;
    let r = vm.qmp.execute("cpr-save", json!({"mode": "restart"}));
    Some((dir, vm, before, r))
}

/// The new image cannot restore: it execs back into the previous binary, which resumes the
/// guest (same process) and says why.
#[test]
fn a_restart_whose_new_image_fails_its_restore_goes_back_to_the_previous_binary() {
    let Some((dir, mut vm, before, r)) = restart_with("rs-new-fail", "restart.new.restore:fail")
    else {
        return;
    };
    let (_, desc) = qmp_error(r.unwrap_err());
    assert!(
        desc.contains("the new binary could not restore")
            && desc.contains("injected fault at restart.new.restore")
            && desc.contains("resumed in the previous binary"),
        "{desc}"
    );
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(after.pid, before.pid);
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert_eq!(info["last-update"]["status"], "failed", "{info}");
    // And a later restart works.
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    wait_progress(&mut vm.qmp, &after, 1).unwrap();
    quit(vm);
    assert!(dir.log("vmm-1.log").contains("back to the previous binary"));
}

/// Failing just before the exec: nothing left the process, the guest resumes there.
#[test]
fn a_restart_that_fails_before_the_exec_resumes_the_guest() {
    let Some((_dir, mut vm, before, r)) =
        restart_with("rs-old-fail", "restart.old.before-exec:fail")
    else {
        return;
    };
    let (_, desc) = qmp_error(r.unwrap_err());
    assert!(desc.contains("resumed in this process"), "{desc}");
    let after = wait_progress(&mut vm.qmp, &before, 2).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);
}

/// The other documented uncatchable case: the new image dies hard during its restore,
/// before it can exec back. The process (same pid) ends; the guest with it.
#[test]
fn a_restart_whose_new_image_is_killed_loses_the_guest_as_documented() {
    let Some((_dir, mut vm, _, r)) = restart_with("rs-new-kill", "restart.new.restore:kill") else {
        return;
    };
    assert!(matches!(r, Err(ClientError::Io(_))), "{r:?}");
    assert!(killed(&mut vm.child));
}

/// Reboot: a save that fails leaves no state file and the guest running; one killed half-way
/// leaves no state file either (only a temporary, removed by the next save), and guest
/// memory intact; a new process that fails its restore leaves the file usable.
#[test]
fn reboot_faults_leave_no_partial_state_and_no_guest_lost() {
    let Some((dir, base, mut vm, before)) = boot_with(
        "rb-fail",
        Dir::shm_arg,
        1,
        1,
        &[(FAULT, "reboot.old.before-rename:fail")],
    ) else {
        return;
    };
    let e = vm
        .qmp
        .execute("cpr-save", json!({"mode": "reboot", "path": "vm.state"}))
        .unwrap_err();
    assert!(e.to_string().contains("resumed in this process"), "{e}");
    assert!(!dir.p("vm.state").exists());
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    quit(vm);

    // Killed with the state written under its temporary name.
    let mut vm = start_env(
        &dir,
        &base,
        &[(FAULT, "reboot.old.before-rename:kill")],
        "vmm-2.log",
    );
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "reboot", "path": "vm.state"}));
    assert!(r.is_err());
    assert!(killed(&mut vm.child));
    assert!(
        !dir.p("vm.state").exists(),
        "no state file under the final name"
    );
    let temps: Vec<String> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".vm.state.tmp."))
        .collect();
    assert_eq!(temps.len(), 1, "the killed save's temporary: {temps:?}");
    assert!(dir.shm.exists(), "guest memory is still there");
    drop(before);
    let _ = after;

    // The next VMM on the same memory saves: the dead save's temporary goes.
    let _ = std::fs::remove_file(&dir.shm);
    let mut vm = start(&dir, &base, "vmm-3.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    save_for_reboot(&mut vm);
    let names: Vec<String> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vm.state"))
        .collect();
    assert_eq!(names, ["vm.state"], "the stale temporary was removed");

    // A new process whose restore fails exits non-zero; the file still restores.
    let out = std::process::Command::new(exe())
        .arg("run")
        .args(incoming(&dir, &base))
        .env(FAULT, "reboot.new.restore:fail")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("injected fault at reboot.new.restore"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-4.log");
    let s = status(&mut vm.qmp).unwrap();
    assert!(s.counter >= before.counter);
    wait_progress(&mut vm.qmp, &before, 1).unwrap();
    quit(vm);
}
