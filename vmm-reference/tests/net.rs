// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-net with frames in flight through every update mode. Each test makes a network
//! namespace (gone when the test ends), a persistent tap in it and an echo peer on the tap,
//! and runs the reference VMM inside. The demo guest sends two numbered frames each
//! generation (the test build's backend makes sending each take 20 ms, and the tests
//! pause while some are outstanding) and counts the numbered echoes. After every update:
//! the guest never saw a frame twice or malformed; at a stop every frame it offered was
//! sent exactly once; and once the peer stops echoing, the guest has received exactly the
//! frames the peer sent (same count, same sum of numbers): a frame is missing only if the
//! peer was refused sending it. Skips, saying so, without /dev/kvm, root or /dev/net/tun.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmm_reference::demo::{
    check_continuity, spawn_in, spawn_transfer_target_with, wait_exit, wait_progress, Status, Vm,
};
use vmm_reference::netlab::{available, EchoPeer, NetNs};
use vmm_reference::qmp_client::QmpClient;

const T: Duration = Duration::from_secs(120);
const TAP: &str = "cprdemo0";
const DELAY: (&str, &str) = ("CPR_NET_DELAY_US", "20000");
/// Restart and transfer negotiate for some tens of ms before they pause: frames taking
/// 100 ms each to send are still in flight then.
const SLOW: (&str, &str) = ("CPR_NET_DELAY_US", "100000");

struct Lab {
    ns: NetNs,
    peer: EchoPeer,
}

fn lab() -> Option<Lab> {
    if !have_kvm() {
        return None;
    }
    if let Err(why) = available() {
        vmm_reference::demo::skipped(format!("virtio-net on a tap: {why}"));
        return None;
    }
    let ns = NetNs::new().unwrap();
    ns.add_tap(TAP).unwrap();
    let peer = EchoPeer::start(&ns, TAP).unwrap();
    Some(Lab { ns, peer })
}

fn with_net(dir: &Dir, memory: &str) -> Vec<String> {
    let mut a = args(dir, memory, 1);
    a.extend(["--net".into(), format!("tap={TAP}")]);
    a
}

fn start_in(lab: &Lab, dir: &Dir, args: &[String], env: (&str, &str), log: &str) -> Vm {
    spawn_in(
        Some(&lab.ns),
        &exe(),
        args,
        &[env],
        &dir.p("qmp.sock"),
        &dir.p(log),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn net(qmp: &mut QmpClient) -> Value {
    qmp.execute("x-demo-status", json!({})).unwrap()["net"].clone()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// Waits until the guest has received `more` more echoes than `from`.
fn wait_echoes(qmp: &mut QmpClient, from: u64, more: u64) -> Value {
    let t = Instant::now();
    loop {
        let v = net(qmp);
        assert_eq!((n(&v, "repeats"), n(&v, "bad")), (0, 0), "{v}");
        if n(&v, "received") >= from + more {
            return v;
        }
        if t.elapsed() > T {
            let all = qmp.execute("x-demo-status", json!({})).unwrap();
            panic!("the guest stopped receiving echoes: {all}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the guest offered frames the device has not sent yet (sending each takes
/// 20 ms here): an update right after this pauses with frames in flight.
fn wait_in_flight(qmp: &mut QmpClient) {
    let t = Instant::now();
    loop {
        let v = net(qmp);
        let done = n(&v, "device-tx") + n(&v, "device-tx-dropped");
        if u64::from(guest_u16(qmp, 0xD402)) != done % 65536 {
            return;
        }
        assert!(t.elapsed() < T, "no frame in flight");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// At a stop: the frames the guest offered, the device used and counted are the same
/// number, and all went out to the tap.
fn counters_agree(qmp: &mut QmpClient) {
    qmp.execute("stop", json!({})).unwrap();
    let v = net(qmp);
    let (avail, used) = (guest_u16(qmp, 0xD402), guest_u16(qmp, 0xD802));
    assert_eq!(avail, used, "every frame offered is sent at the stop: {v}");
    assert_eq!(n(&v, "sent") % 65536, u64::from(used), "{v}");
    assert_eq!(
        n(&v, "device-tx"),
        n(&v, "sent"),
        "none twice, none dropped: {v}"
    );
    assert_eq!(n(&v, "device-tx-dropped"), 0, "{v}");
    qmp.execute("cont", json!({})).unwrap();
}

fn every_echo_arrived(qmp: &mut QmpClient, peer: &EchoPeer) -> Value {
    vmm_reference::demo::check_echoes(qmp, peer, T).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn frames_in_flight_survive_restart_and_transfer() {
    let Some(lab) = lab() else {
        return;
    };
    let dir = Dir::new("net");
    let a = with_net(&dir, "memfd");
    let mut vm = start_in(&lab, &dir, &a, SLOW, "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let e0 = wait_echoes(&mut vm.qmp, 0, 4);

    wait_in_flight(&mut vm.qmp);
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    let e1 = wait_echoes(&mut vm.qmp, n(&e0, "received"), 4);
    counters_agree(&mut vm.qmp);
    every_echo_arrived(&mut vm.qmp, &lab.peer);

    let mut new =
        spawn_transfer_target_with(&exe(), &dir.p("x.sock"), &[], &[DELAY], &dir.p("new.log"))
            .unwrap();
    let uri = format!("unix:{}", dir.s("x.sock"));
    wait_in_flight(&mut vm.qmp);
    vm.qmp
        .execute("cpr-save", json!({"mode": "transfer", "uri": uri}))
        .unwrap();
    assert_eq!(wait_exit(&mut vm.child, T).unwrap(), 0);
    let later = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    check_continuity(&after, &later).unwrap();
    wait_echoes(&mut vm.qmp, n(&e1, "received"), 4);
    counters_agree(&mut vm.qmp);
    let v = every_echo_arrived(&mut vm.qmp, &lab.peer);
    let s = lab.peer.stats();
    eprintln!("after restart and transfer: guest {v}, peer {s:?}");
    eprintln!(
        "drains: {:?}",
        logged_after(&dir, "virtio-net: drained in ")
    );
    assert_eq!(s.send_errors, 0, "the tap refused nothing: {s:?}");
    vm.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut new, T).unwrap(), 0);
}

#[test]
fn frames_survive_a_reboot_and_only_on_the_same_tap() {
    let Some(lab) = lab() else {
        return;
    };
    let dir = Dir::new("net-reboot");
    let a = with_net(&dir, &dir.shm_arg());
    let mut vm = start_in(&lab, &dir, &a, DELAY, "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let e0 = wait_echoes(&mut vm.qmp, 0, 4);
    wait_in_flight(&mut vm.qmp);
    save_for_reboot(&mut vm);
    let carried = dir.log("vmm-1.log");
    let carried = carried
        .lines()
        .find(|l| l.contains("frames queued in the tap"))
        .unwrap_or_else(|| panic!("no carry line in {carried}"));
    eprintln!("{carried}");

    // Another tap by name: refused before the guest runs.
    lab.ns.add_tap("cprother0").unwrap();
    let mut other = with_net(&dir, &dir.shm_arg());
    let last = other.len() - 1;
    other[last] = "tap=cprother0".into();
    let mut cmd = std::process::Command::new(exe());
    lab.ns.command(&mut cmd).unwrap();
    let out = cmd
        .arg("run")
        .args(incoming(&dir, &other))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("saved on `cprdemo0`"),
        "{err}"
    );

    let mut vm = start_in(&lab, &dir, &incoming(&dir, &a), DELAY, "vmm-2.log");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    wait_echoes(&mut vm.qmp, n(&e0, "received"), 4);
    counters_agree(&mut vm.qmp);
    let v = every_echo_arrived(&mut vm.qmp, &lab.peer);
    eprintln!("after the reboot: guest {v}, peer {:?}", lab.peer.stats());
    quit(vm);
}

#[test]
fn a_failed_transfer_leaves_the_network_working_in_the_old_process() {
    let Some(lab) = lab() else {
        return;
    };
    let dir = Dir::new("net-fail");
    let a = with_net(&dir, "memfd");
    let mut vm = start_in(&lab, &dir, &a, DELAY, "vmm-1.log");
    let e0 = wait_echoes(&mut vm.qmp, 0, 4);
    failed_transfer(&mut vm, &dir, &[DELAY]);
    wait_echoes(&mut vm.qmp, n(&e0, "received"), 4);
    counters_agree(&mut vm.qmp);
    every_echo_arrived(&mut vm.qmp, &lab.peer);
    quit(vm);
}

/// `--net fd=N`: a tap fd the VMM inherits (as a management stack passes one) carries
/// frames, across a restart too; an fd that is not a tap is refused before the guest runs.
#[test]
fn an_inherited_tap_fd_works_and_anything_else_is_refused() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(lab) = lab() else {
        return;
    };
    let dir = Dir::new("net-fd");
    let tap = lab
        .ns
        .run(|| vmm_reference::virtio_net::open_tap(TAP))
        .unwrap()
        .unwrap();
    let not_a_tap = std::fs::File::create(dir.p("plain")).unwrap();
    let spawn = |fd: i32, log: &str| {
        let mut a = args(&dir, "memfd", 1);
        a.extend(["--net".into(), "fd=10".into()]);
        let log = std::fs::File::create(dir.p(log)).unwrap();
        let mut cmd = std::process::Command::new(exe());
        cmd.arg("run").args(&a).stdin(std::process::Stdio::null());
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        // SAFETY: dup2 is async-signal-safe; both fds are open in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 10) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    };
    let out = spawn(not_a_tap.as_raw_fd(), "refused.log")
        .output()
        .unwrap();
    let log = dir.log("refused.log");
    assert!(
        !out.status.success() && log.contains("not an attached tun/tap fd"),
        "{log}"
    );

    // A number nobody passed: whatever the VMM itself has open there is refused and left
    // alone; the VMM says why and exits, it does not crash.
    let mut a = args(&dir, "memfd", 1);
    a.extend(["--net".into(), "fd=3".into()]);
    let out = std::process::Command::new(exe())
        .arg("run")
        .args(&a)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--net fd=3"), "{err}");

    let child = spawn(tap.as_raw_fd(), "vmm-1.log").spawn().unwrap();
    drop(tap);
    let qmp = QmpClient::connect(&dir.p("qmp.sock"), T).unwrap();
    let mut vm = Vm { child, qmp };
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let e0 = wait_echoes(&mut vm.qmp, 0, 4);
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    wait_echoes(&mut vm.qmp, n(&e0, "received"), 4);
    every_echo_arrived(&mut vm.qmp, &lab.peer);
    quit(vm);
}
