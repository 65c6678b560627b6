// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guests at real sizes: 64 GiB (RAM above 4 GiB, in the same backing at an offset) through
//! restart, transfer and reboot with bytes planted above 4 GiB checked after each; and a
//! guest on 2 MiB huge pages, with the clear refusal first when the host has none. Skips,
//! saying so, without /dev/kvm (and the huge page part without root).

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use serde_json::json;
use vmm_reference::demo::{check_continuity, skipped, wait_progress, Status};
use vmm_reference::qmp_client::QmpClient;

const GIB: u64 = 1 << 30;

/// Guest physical address and offset in the backing file of a spot above 4 GiB: RAM above
/// 3 GiB continues at 4 GiB, at file offset 3 GiB.
const HIGH_GPA: u64 = 40 * GIB + 12345 * 4096;
const HIGH_OFFSET: u64 = HIGH_GPA - GIB;
const PATTERN: &[u8] = b"cpr: memory above 4 GiB, in place";

fn read_high(qmp: &mut QmpClient) -> Vec<u8> {
    let r = qmp
        .execute(
            "x-guest-read",
            json!({"addr": HIGH_GPA, "size": PATTERN.len()}),
        )
        .unwrap();
    let hex = r["data"].as_str().unwrap();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn a_64_gib_guest_keeps_its_memory_above_4_gib_through_every_mode() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("64g");
    let mut base = args(&dir, &dir.shm_arg(), 2);
    let i = base.iter().position(|a| a == "64M").unwrap();
    base[i] = "64G".into();
    let mut vm = start(&dir, &base, "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(2), 2).unwrap();
    // Plant bytes through the backing file; the guest's RAM must show them.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&dir.shm)
        .unwrap();
    assert!(
        file.metadata().unwrap().len() > 64 * GIB - GIB,
        "one backing holds all 64 GiB"
    );
    file.write_all_at(PATTERN, HIGH_OFFSET).unwrap();
    assert_eq!(
        read_high(&mut vm.qmp),
        PATTERN,
        "the file offset is the guest address"
    );

    // Restart.
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert!(r["blackout-us"].as_u64().unwrap() > 0);
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    assert_eq!(read_high(&mut vm.qmp), PATTERN, "after restart");

    // Transfer.
    let memory = dir.shm_arg();
    let state_dir = dir.s("");
    transfer(
        &mut vm,
        &dir,
        &["--memory", &memory, "--state-dir", &state_dir],
    );
    let after2 = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    check_continuity(&after, &after2).unwrap();
    assert_eq!(read_high(&mut vm.qmp), PATTERN, "after transfer");

    // Reboot (the state file, then a new process on the same backing).
    save_for_reboot(&mut vm);
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let after3 = wait_progress(&mut vm.qmp, &after2, 1).unwrap();
    check_continuity(&after2, &after3).unwrap();
    assert_eq!(read_high(&mut vm.qmp), PATTERN, "after reboot");
    quit(vm);
}

/// Sets `/proc/sys/vm/nr_hugepages` and puts the old value back when dropped.
struct HugePool {
    old: String,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePool {
    fn set(pages: u64) -> Option<HugePool> {
        let old = std::fs::read_to_string(NR_HUGEPAGES).ok()?;
        std::fs::write(NR_HUGEPAGES, pages.to_string()).ok()?;
        Some(HugePool {
            old: old.trim().to_string(),
        })
    }
    /// 2 MiB pages neither in use nor reserved by a mapping.
    fn free() -> u64 {
        let read = |f: &str| -> u64 {
            std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{f}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        read("free_hugepages").saturating_sub(read("resv_hugepages"))
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, &self.old);
    }
}

#[test]
fn a_guest_on_huge_pages_survives_restart_and_transfer_and_no_pages_is_a_clear_error() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("huge");
    let mut base = args(&dir, "memfd", 1);
    base.extend(["--huge-pages".into(), "2M".into()]);
    let i = base.iter().position(|a| a == "64M").unwrap();
    base[i] = "128M".into();

    // No free huge pages: refused at start with a clear reason, nothing left running.
    let Some(pool) = HugePool::set(0) else {
        skipped("cannot write /proc/sys/vm/nr_hugepages (not root)");
        return;
    };
    if HugePool::free() == 0 {
        let out = std::process::Command::new(exe())
            .arg("run")
            .args(&base)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("huge page"), "{err}");
    }

    // 64 pages of guest RAM and the stamp page, with room to spare.
    drop(pool);
    let Some(_pool) = HugePool::set(80) else {
        return;
    };
    if HugePool::free() < 66 {
        skipped("the host could not reserve 66 huge pages");
        return;
    }
    let mut vm = start(&dir, &base, "vmm-1.log");
    let before = wait_progress(&mut vm.qmp, &Status::boot(1), 2).unwrap();
    let free_running = HugePool::free();
    assert!(
        free_running <= 80 - 64,
        "the guest is on huge pages ({free_running} free)"
    );
    vm.qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    transfer(&mut vm, &dir, &["--huge-pages", "2M"]);
    let after2 = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    check_continuity(&after, &after2).unwrap();
    // Kept in place, not copied: no more huge pages in use than before.
    assert_eq!(HugePool::free(), free_running, "the same huge pages");
    quit(vm);
}
