// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A Linux kernel loaded by linux-loader starts and prints its first console lines through
//! our COM1. Needs `CPR_TEST_KERNEL` (a bzImage or vmlinux; `.ci/run` extracts one from
//! Debian's linux-image-cloud-amd64) and /dev/kvm; skips, saying so, otherwise.
//!
//! This host's /dev/kvm emulates guest instructions: decompressing the kernel alone takes a
//! minute or two, so only the first lines are awaited (generous deadline), not a full boot.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_reference::demo::wait_exit;
use vmm_reference::qmp_client::QmpClient;

#[test]
fn kernel_prints_its_first_console_lines() {
    let Some(kernel) = std::env::var_os("CPR_TEST_KERNEL").map(PathBuf::from) else {
        vmm_reference::demo::skipped(
            "set CPR_TEST_KERNEL to a bzImage or vmlinux to test Linux booting",
        );
        return;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        vmm_reference::demo::skipped("/dev/kvm is not available");
        return;
    }
    let dir = std::env::temp_dir().join(format!("cpr-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let serial = dir.join("serial.log");
    let monitor = dir.join("qmp.sock");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 noapic noacpi nokaslr noxsave";
    let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-reference"))
        .args([
            "run",
            "--memory-size",
            "512M",
            "--vcpus",
            "1",
            "--cmdline",
            cmdline,
        ])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--monitor")
        .arg(&monitor)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut qmp = QmpClient::connect(&monitor, Duration::from_secs(60)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    let wanted = [
        "Linux version".to_string(),
        format!("Command line: {cmdline}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".to_string(),
    ];
    let text = loop {
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        if wanted.iter().all(|w| text.contains(w.as_str())) {
            break text;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("the kernel did not print {wanted:?} in time; serial so far:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    qmp.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)).unwrap(), 0);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        text.lines()
            .find(|l| l.contains("Linux version"))
            .unwrap_or_default()
    );
}
