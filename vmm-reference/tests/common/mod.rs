// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers of the end-to-end tests: the binary, private directories, starting VMMs, saving
//! for a reboot, checks of the guest and its serial log.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use vmm_reference::demo::{check_serial, spawn_env, wait_exit, wait_progress, Status, Vm};
use vmm_reference::qmp_client::ClientError;

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmm-reference"))
}

pub fn have_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        vmm_reference::demo::skipped("/dev/kvm is not available on this machine");
    }
    ok
}

/// A per-test private directory (sockets, logs, the state directory) and a private
/// directory in /dev/shm for guest RAM; both removed at the end.
pub struct Dir {
    tmp: tempfile::TempDir,
    shm_dir: tempfile::TempDir,
    pub path: PathBuf,
    pub shm: PathBuf,
}

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("cpr-e2e-{tag}-"))
            .tempdir()
            .unwrap();
        let shm_dir = tempfile::Builder::new()
            .prefix(&format!("cpr-e2e-{tag}-"))
            .tempdir_in("/dev/shm")
            .unwrap();
        let path = tmp.path().to_path_buf();
        let shm = shm_dir.path().join("ram");
        Dir {
            tmp,
            shm_dir,
            path,
            shm,
        }
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.p(name).to_string_lossy().into_owned()
    }
    pub fn shm_arg(&self) -> String {
        format!("shm:{}", self.shm.display())
    }
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.p(name)).unwrap_or_default()
    }
}

/// The usual command line: 64 MiB, the test's serial log and monitor, its directory as the
/// state directory.
pub fn args(dir: &Dir, memory: &str, vcpus: u32) -> Vec<String> {
    [
        "--memory",
        memory,
        "--memory-size",
        "64M",
        "--vcpus",
        &vcpus.to_string(),
        "--serial",
        &format!("file:{}", dir.s("serial.log")),
        "--monitor",
        &dir.s("qmp.sock"),
        "--state-dir",
        &dir.s(""),
        "--log-level",
        "debug",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn start(dir: &Dir, args: &[String], log: &str) -> Vm {
    start_env(dir, args, &[], log)
}

pub fn start_env(dir: &Dir, args: &[String], env: &[(&str, &str)], log: &str) -> Vm {
    spawn_env(&exe(), args, env, &dir.p("qmp.sock"), &dir.p(log)).unwrap_or_else(|e| panic!("{e}"))
}

/// Skips (saying so) without /dev/kvm; otherwise starts a VMM with `memory` and `vcpus` and
/// waits until the guest printed `lines` lines.
pub fn boot(tag: &str, memory: &str, vcpus: u32, lines: u64) -> Option<(Dir, Vm, Status)> {
    let (dir, _, vm, before) = boot_with(tag, |_| memory.to_string(), vcpus, lines, &[])?;
    Some((dir, vm, before))
}

/// [`boot`] on the test's `/dev/shm` file, as a reboot needs; also returns the command line,
/// for the next VMM.
pub fn boot_on_shm(tag: &str, vcpus: u32, lines: u64) -> Option<(Dir, Vec<String>, Vm, Status)> {
    boot_with(tag, Dir::shm_arg, vcpus, lines, &[])
}

pub fn boot_with(
    tag: &str,
    memory: impl FnOnce(&Dir) -> String,
    vcpus: u32,
    lines: u64,
    env: &[(&str, &str)],
) -> Option<(Dir, Vec<String>, Vm, Status)> {
    if !have_kvm() {
        return None;
    }
    let dir = Dir::new(tag);
    let base = args(&dir, &memory(&dir), vcpus);
    let mut vm = start_env(&dir, &base, env, "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(vcpus as usize), lines).unwrap();
    Some((dir, base, vm, before))
}

/// `cpr-save` for a reboot into the state directory's `vm.state`; the VMM must then exit 0.
/// Returns the answer.
pub fn save_for_reboot(vm: &mut Vm) -> Value {
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "reboot", "path": "vm.state"}))
        .unwrap();
    assert_eq!(
        wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap(),
        0,
        "the VMM exits after saving for a reboot"
    );
    r
}

/// The command line plus `--incoming` the state file.
pub fn incoming(dir: &Dir, base: &[String]) -> Vec<String> {
    let mut a = base.to_vec();
    a.extend(["--incoming".into(), dir.s("vm.state")]);
    a
}

pub fn quit(mut vm: Vm) {
    vm.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(
        wait_exit(&mut vm.child, Duration::from_secs(60)).unwrap(),
        0
    );
}

pub fn serial_lines(dir: &Dir) -> u64 {
    check_serial(&std::fs::read_to_string(dir.p("serial.log")).unwrap())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Checks the serial log is continuous and holds what the guest printed by `status`. The
/// guest counts a line before it prints it, so the last one may be incomplete when the VM is
/// stopped.
pub fn assert_serial_covers(dir: &Dir, status: &Status) {
    let complete = serial_lines(dir);
    assert!(
        complete + 1 >= status.lines,
        "{complete} complete serial lines, guest printed {}",
        status.lines
    );
}

/// The error class and description of a failed command.
pub fn qmp_error(e: ClientError) -> (String, String) {
    match e {
        ClientError::Qmp { class, desc } => (class, desc),
        other => panic!("not a QMP error: {other}"),
    }
}

/// `/proc/PID/fd` targets of the VMM's own fds, with inode numbers of sockets and anonymous
/// inodes folded, so two images of one VMM can be compared. Stdio, and fds without
/// close-on-exec (inherited from whoever started the VMM, e.g. cargo's jobserver pipe, which
/// a restart rightly does not carry over), are left out.
pub fn fd_kinds(pid: u64) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let fd: u32 = e.file_name().to_string_lossy().parse().unwrap();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if fd <= 2 || flags & libc::O_CLOEXEC as u32 == 0 {
            continue;
        }
        let Ok(t) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = t.to_string_lossy().into_owned();
        let kind = match t.split_once(":[") {
            Some((k, _)) => k.to_string(),
            None => t,
        };
        *m.entry(kind).or_default() += 1;
    }
    m
}

/// Checks that a paused guest does not move for a while, then that `cont` runs it.
pub fn assert_paused_then_runs(vm: &mut Vm, before: &Status) -> Status {
    use vmm_reference::demo::status;
    let st = vm.qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "paused", "{st}");
    let a = status(&mut vm.qmp).unwrap();
    assert_eq!(a.counter, before.counter, "a paused guest does not run");
    // A window in which a running guest writes thousands of words: a paused one, none.
    std::thread::sleep(Duration::from_millis(300));
    let b = status(&mut vm.qmp).unwrap();
    assert_eq!((b.counter, b.lines), (a.counter, a.lines), "still paused");
    vm.qmp.execute("cont", json!({})).unwrap();
    let after = wait_progress(&mut vm.qmp, before, 2).unwrap();
    vmm_reference::demo::check_continuity(before, &after).unwrap();
    after
}

/// An executable script at `path` (mode 0755).
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A transfer to a new VMM started with `args` (and `--incoming transfer:` the test's
/// socket): the old one must exit 0, and `vm` then holds the new process, on the same
/// monitor connection.
pub fn transfer(vm: &mut Vm, dir: &Dir, args: &[&str]) {
    let mut new = vmm_reference::demo::spawn_transfer_target_with(
        &exe(),
        &dir.p("xfer.sock"),
        args,
        &[],
        &dir.p("new.log"),
    )
    .unwrap();
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
    std::mem::swap(&mut vm.child, &mut *new);
}

/// A little-endian u16 of guest memory at `addr` (`x-guest-read`): a ring index.
pub fn guest_u16(qmp: &mut vmm_reference::qmp_client::QmpClient, addr: u64) -> u16 {
    let hex = qmp
        .execute("x-guest-read", json!({"addr": addr, "size": 2}))
        .unwrap()["data"]
        .as_str()
        .unwrap()
        .to_string();
    u16::from_str_radix(&format!("{}{}", &hex[2..4], &hex[0..2]), 16).unwrap()
}

/// What the first VMM logged after `prefix` (e.g. `virtio-net: drained in `) each time.
pub fn logged_after(dir: &Dir, prefix: &str) -> Vec<String> {
    dir.log("vmm-1.log")
        .lines()
        .filter_map(|l| l.split(prefix).nth(1).map(str::to_string))
        .collect()
}

/// A transfer whose new side fails its restore (fault hook): the old VMM must answer with
/// an error and keep the guest. `env` goes to the new side too.
pub fn failed_transfer(vm: &mut Vm, dir: &Dir, env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("CPR_UPDATE_FAULT", "transfer.new.restore:fail"));
    let mut new = vmm_reference::demo::spawn_transfer_target_with(
        &exe(),
        &dir.p("x.sock"),
        &[],
        &env,
        &dir.p("new.log"),
    )
    .unwrap();
    let uri = format!("unix:{}", dir.s("x.sock"));
    let e = vm
        .qmp
        .execute("cpr-save", json!({"mode": "transfer", "uri": uri}));
    assert!(e.is_err(), "the transfer fails");
    let _ = wait_exit(&mut new, Duration::from_secs(120));
}

/// An event's QMP timestamp in µs.
fn event_us(e: &Value) -> u64 {
    let t = &e["timestamp"];
    t["seconds"].as_u64().unwrap() * 1_000_000 + t["microseconds"].as_u64().unwrap()
}

/// Checks that `events` (in the order received) hold one `STOP` and, after it, a `RESUME`,
/// stamped no earlier, whichever process wrote each. Returns the span between the stamps in
/// µs.
pub fn stop_then_resume_in(events: &[Value]) -> u64 {
    let names: Vec<&Value> = events.iter().map(|e| &e["event"]).collect();
    let stops: Vec<usize> = (0..events.len()).filter(|&i| names[i] == "STOP").collect();
    assert_eq!(stops.len(), 1, "one STOP: {names:?}");
    let resume = (stops[0]..events.len())
        .find(|&i| names[i] == "RESUME")
        .unwrap_or_else(|| panic!("a RESUME after the STOP: {names:?}"));
    let (stop, resume) = (event_us(&events[stops[0]]), event_us(&events[resume]));
    assert!(stop <= resume, "STOP at {stop} us, RESUME at {resume} us");
    resume - stop
}

/// Waits for the `RESUME` that ends an update's pause, then checks the events with
/// [`stop_then_resume_in`]. Clear the client's events before the update.
pub fn stop_then_resume(qmp: &mut vmm_reference::qmp_client::QmpClient) -> u64 {
    let resume = qmp.wait_event("RESUME", Duration::from_secs(60)).unwrap();
    let mut seen: Vec<Value> = qmp.events().cloned().collect();
    seen.push(resume);
    stop_then_resume_in(&seen)
}

/// The processes whose parent is `pid` (alive, or exited and not yet reaped).
pub fn children_of(pid: u64) -> Vec<u64> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|child| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                return false;
            };
            // The field after the command name (in parentheses, which may hold spaces).
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split(' ').nth(1))
                .and_then(|p| p.parse::<u64>().ok());
            ppid == Some(pid)
        })
        .collect()
}
