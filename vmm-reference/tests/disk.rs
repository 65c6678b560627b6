// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! virtio-blk with I/O in flight through every update mode. The demo guest keeps four
//! block requests in flight each generation (the test build's backend makes each take
//! 20 or 100 ms, and the tests pause while some are outstanding), reads every block back, and counts; after every
//! update nothing is lost or done twice: the guest's available index, the device's used
//! index and its completed count agree exactly at a stop, every block read back correct,
//! and the image holds whole, consistent blocks after `quit`.

mod common;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmm_reference::demo::{
    check_continuity, spawn_transfer_target_with, wait_exit, wait_progress, Status,
};
use vmm_reference::qmp_client::QmpClient;

const T: Duration = Duration::from_secs(120);
const DELAY: (&str, &str) = ("CPR_BLK_DELAY_US", "20000");
/// Restart and transfer negotiate for some tens of ms before they pause (the new binary's
/// versions, the new process's VM): requests of 100 ms are still in flight then.
const SLOW: (&str, &str) = ("CPR_BLK_DELAY_US", "100000");

fn with_disk(dir: &Dir, memory: &str) -> Vec<String> {
    let img = dir.p("disk.img");
    if !img.exists() {
        std::fs::File::create(&img)
            .unwrap()
            .set_len(256 << 10)
            .unwrap();
    }
    let mut a = args(dir, memory, 1);
    a.extend(["--disk".into(), dir.s("disk.img")]);
    a
}

fn blk(qmp: &mut QmpClient) -> Value {
    qmp.execute("x-demo-status", json!({})).unwrap()["blk"].clone()
}

/// Waits until the guest has verified `more` more blocks than `from` showed.
fn wait_verified(qmp: &mut QmpClient, from: u64, more: u64) -> Value {
    let t = Instant::now();
    loop {
        let b = blk(qmp);
        assert_eq!(b["errors"], 0, "{b}");
        if b["verified"].as_u64().unwrap() >= from + more {
            return b;
        }
        assert!(t.elapsed() < T, "the guest stopped verifying blocks: {b}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the guest has requests the device has not completed yet: an update right
/// after this pauses with I/O in flight (each request takes 20 ms here).
fn wait_in_flight(qmp: &mut QmpClient) {
    let t = Instant::now();
    loop {
        let completed = blk(qmp)["device-completed"].as_u64().unwrap();
        if u64::from(guest_u16(qmp, 0xA402)) != completed % 65536 {
            return;
        }
        assert!(t.elapsed() < T, "no request in flight");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// At a stop: the requests the guest made available, the device completed and put in the
/// used ring are the same number (mod 2^16 for the ring indices).
fn counters_agree(qmp: &mut QmpClient) {
    qmp.execute("stop", json!({})).unwrap();
    let b = blk(qmp);
    let (avail, used) = (guest_u16(qmp, 0xA402), guest_u16(qmp, 0xA802));
    let completed = b["device-completed"].as_u64().unwrap();
    assert_eq!(
        avail, used,
        "every request offered is completed at the stop: {b}"
    );
    assert_eq!(
        u64::from(used),
        completed % 65536,
        "none twice, none lost: {b}"
    );
    qmp.execute("cont", json!({})).unwrap();
}

/// Every block of the image is whole: all its words from one generation's write.
fn image_is_consistent(dir: &Dir) -> u64 {
    let img = std::fs::File::open(dir.p("disk.img")).unwrap();
    let mut written = 0;
    for b in 0..64u64 {
        let mut buf = vec![0u8; 4096];
        img.read_exact_at(&mut buf, b * 4096).unwrap();
        let w = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap());
        if w(0) == 0 && w(1) == 0 {
            continue; // never written
        }
        let g = w(0) >> 32;
        for i in 0..512 {
            assert_eq!(
                w(i),
                g << 32 | b << 16 | i as u64,
                "block {b} word {i} (generation {g})"
            );
        }
        assert_eq!((g * 4 + b % 4) % 64 % 4, b % 4);
        written += 1;
    }
    written
}

#[test]
fn disk_io_in_flight_survives_restart_and_transfer() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("disk");
    let a = with_disk(&dir, "memfd");
    let mut vm = start_env(&dir, &a, &[SLOW], "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let b0 = wait_verified(&mut vm.qmp, 0, 4);
    assert_eq!(b0["errors"], 0);

    wait_in_flight(&mut vm.qmp);
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert_eq!(r["mode"], "restart");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    let b1 = wait_verified(&mut vm.qmp, b0["verified"].as_u64().unwrap(), 8);
    counters_agree(&mut vm.qmp);

    let mut new =
        spawn_transfer_target_with(&exe(), &dir.p("x.sock"), &[], &[SLOW], &dir.p("new.log"))
            .unwrap();
    let uri = format!("unix:{}", dir.s("x.sock"));
    wait_in_flight(&mut vm.qmp);
    vm.qmp
        .execute("cpr-save", json!({"mode": "transfer", "uri": uri}))
        .unwrap();
    assert_eq!(wait_exit(&mut vm.child, T).unwrap(), 0);
    let later = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    check_continuity(&after, &later).unwrap();
    wait_verified(&mut vm.qmp, b1["verified"].as_u64().unwrap(), 8);
    counters_agree(&mut vm.qmp);
    let drains = logged_after(&dir, "virtio-blk: drained in ");
    eprintln!("virtio-blk drains before the restart and the transfer: {drains:?}");
    vm.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut new, T).unwrap(), 0);
    assert!(image_is_consistent(&dir) > 0);
}

#[test]
fn disk_io_in_flight_survives_a_reboot_and_only_on_the_same_image() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("disk-reboot");
    let a = with_disk(&dir, &dir.shm_arg());
    let mut vm = start_env(&dir, &a, &[DELAY], "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 1).unwrap();
    let b0 = wait_verified(&mut vm.qmp, 0, 4);
    wait_in_flight(&mut vm.qmp);
    save_for_reboot(&mut vm);
    let drains = logged_after(&dir, "virtio-blk: drained in ");
    eprintln!("virtio-blk drain before the reboot save: {drains:?}");
    let base = with_disk(&dir, &dir.shm_arg());

    // Another file at the disk's path: refused, the guest's memory not opened for writing.
    std::fs::rename(dir.p("disk.img"), dir.p("disk.orig")).unwrap();
    std::fs::copy(dir.p("disk.orig"), dir.p("disk.img")).unwrap();
    let out = std::process::Command::new(exe())
        .arg("run")
        .args(incoming(&dir, &base))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not the image"),
        "{err}"
    );
    std::fs::rename(dir.p("disk.orig"), dir.p("disk.img")).unwrap();

    let mut vm = start_env(&dir, &incoming(&dir, &base), &[DELAY], "vmm-2.log");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    wait_verified(&mut vm.qmp, b0["verified"].as_u64().unwrap(), 8);
    counters_agree(&mut vm.qmp);
    quit(vm);
    assert!(image_is_consistent(&dir) > 0);
}

#[test]
fn a_failed_transfer_leaves_the_disk_working_in_the_old_process() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("disk-fail");
    let a = with_disk(&dir, "memfd");
    let mut vm = start_env(&dir, &a, &[DELAY], "vmm-1.log");
    let b0 = wait_verified(&mut vm.qmp, 0, 4);
    failed_transfer(&mut vm, &dir, &[DELAY]);
    wait_verified(&mut vm.qmp, b0["verified"].as_u64().unwrap(), 8);
    counters_agree(&mut vm.qmp);
    quit(vm);
    assert!(image_is_consistent(&dir) > 0);
}
