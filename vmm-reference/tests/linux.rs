// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A Linux kernel loaded by linux-loader starts and prints its first console lines through
//! our COM1, and keeps booting across a VMM restart and a transfer to a new process. Needs `CPR_TEST_KERNEL` (a bzImage or
//! vmlinux; `.ci/run` extracts one from Debian's linux-image-cloud-amd64) and /dev/kvm;
//! skips, saying so, otherwise.
//!
//! This host's /dev/kvm emulates guest instructions: decompressing a bzImage alone takes a
//! minute or two, and its emulator cannot run `cmpxchg16b`, so the kernel stops with a KVM
//! emulation failure when it sets up its slab allocator (after the `Memory:` line). Only
//! console lines up to there are awaited, with generous deadlines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_reference::demo::{skipped, spawn_transfer_target, wait_exit};
use vmm_reference::qmp_client::QmpClient;

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 noapic noacpi nokaslr noxsave";

/// The first lines the kernel prints, for our command line and 512 MiB.
fn first_lines() -> Vec<String> {
    vec![
        "Linux version".to_string(),
        format!("Command line: {CMDLINE}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".to_string(),
    ]
}

/// The kernel to test with, or `None` after saying why the test skips.
fn kernel_or_skip() -> Option<PathBuf> {
    let Some(kernel) = std::env::var_os("CPR_TEST_KERNEL").map(PathBuf::from) else {
        skipped("set CPR_TEST_KERNEL to a bzImage or vmlinux to test Linux booting");
        return None;
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        skipped("/dev/kvm is not available");
        return None;
    }
    Some(kernel)
}

struct Guest {
    dir: PathBuf,
    child: Child,
    qmp: QmpClient,
}

impl Guest {
    fn start(tag: &str, kernel: &Path) -> Guest {
        Guest::start_with(tag, kernel, |_| vec![])
    }

    /// [`start`](Self::start) with more arguments, made from the guest's directory.
    fn start_with(tag: &str, kernel: &Path, extra: impl FnOnce(&Path) -> Vec<String>) -> Guest {
        let dir = std::env::temp_dir().join(format!("cpr-linux-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let monitor = dir.join("qmp.sock");
        let log = std::fs::File::create(dir.join("vmm.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vmm-reference"))
            .args(["run", "--memory-size", "512M", "--vcpus", "1"])
            .args(["--cmdline", CMDLINE])
            .arg("--kernel")
            .arg(kernel)
            .arg("--serial")
            .arg(format!("file:{}", dir.join("serial.log").display()))
            .arg("--monitor")
            .arg(&monitor)
            .args(extra(&dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let qmp = QmpClient::connect(&monitor, Duration::from_secs(60)).unwrap();
        Guest { dir, child, qmp }
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("serial.log")).unwrap_or_default()
    }

    /// Waits until the console shows every line of `wanted`; returns the console text.
    fn wait_for(&mut self, wanted: &[String]) -> String {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            let text = self.serial();
            if wanted.iter().all(|w| text.contains(w.as_str())) {
                return text;
            }
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                let log = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
                panic!(
                    "the kernel did not print {wanted:?} in time; serial:\n{text}\nVMM log:\n{log}"
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn kernel_prints_its_first_console_lines() {
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    // With a disk: the kernel is told where its virtio-mmio device is, and says so.
    let mut guest = Guest::start_with("first", &kernel, |dir| {
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        vec!["--disk".into(), img.to_string_lossy().into_owned()]
    });
    let mut wanted = first_lines();
    wanted[1] = format!("Command line: {CMDLINE} virtio_mmio.device=512@0xd0000000:5");
    let text = guest.wait_for(&wanted);
    guest.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(
        wait_exit(&mut guest.child, Duration::from_secs(60)).unwrap(),
        0
    );
    println!(
        "{}",
        text.lines()
            .find(|l| l.contains("Linux version"))
            .unwrap_or_default()
    );
}

/// The ELF vmlinux of `kernel`: itself, or the payload of a bzImage, decompressed into `dir`
/// with the system's tool for its format. `Err` says why there is none.
fn vmlinux(kernel: &Path, dir: &Path) -> Result<PathBuf, String> {
    let data = std::fs::read(kernel).map_err(|e| format!("read {}: {e}", kernel.display()))?;
    if data.starts_with(b"\x7fELF") {
        return Ok(kernel.to_path_buf());
    }
    if data.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err("neither an ELF file nor a bzImage".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let payload = data
        .get(start..start + u32_at(0x24c))
        .ok_or("the bzImage payload lies outside the file")?;
    let tool: &[&str] = match payload {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc"],
        [0x5d, 0, 0, ..] => &["xz", "--format=lzma", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dc"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [b'B', b'Z', b'h', ..] => &["bzip2", "-dc"],
        _ => return Err("the bzImage payload's compression is not known here".into()),
    };
    let compressed = dir.join("payload");
    let out = dir.join("vmlinux");
    std::fs::write(&compressed, payload).map_err(|e| e.to_string())?;
    // Exit codes differ (lz4 complains about the size word the kernel appends); the result
    // is checked instead.
    let _ = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::fs::File::open(&compressed).map_err(|e| e.to_string())?)
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("run {}: {e}", tool[0]))?;
    let mut magic = [0u8; 4];
    use std::io::Read;
    let ok = std::fs::File::open(&out)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF";
    ok.then_some(out)
        .ok_or_else(|| format!("`{}` did not produce an ELF file", tool.join(" ")))
}

/// printk timestamps of the console lines, in order.
fn timestamps(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix('[')?.split_once(']')?.0.trim().parse().ok())
        .collect()
}

#[test]
fn linux_keeps_booting_across_a_restart_and_a_transfer() {
    let Some(kernel) = kernel_or_skip() else {
        return;
    };
    // The ELF vmlinux inside the bzImage: it needs no emulated decompression, so the kernel
    // is reached in seconds. This also runs linux-loader's ELF path.
    let scratch = std::env::temp_dir().join(format!("cpr-vmlinux-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let elf = match vmlinux(&kernel, &scratch) {
        Ok(p) => p,
        Err(why) => {
            skipped(format!("no vmlinux from {}: {why}", kernel.display()));
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    };
    let mut guest = Guest::start("restart", &elf);
    guest.wait_for(&first_lines());
    let before = guest.serial();
    // Here the kernel needs tens of seconds to get from its first lines to `Memory:`; under
    // hardware virtualization it may be past it already, and there is nothing to observe.
    let observable = !before.contains("Memory: ");
    let r = guest
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert_eq!(r["mode"], "restart", "{r}");
    // A few seconds of guest time later, hand the VM to a new process.
    guest.wait_for(&["smpboot: Allowing".to_string()]);
    let sock = guest.dir.join("xfer.sock");
    let mut target = spawn_transfer_target(
        Path::new(env!("CARGO_BIN_EXE_vmm-reference")),
        &sock,
        &guest.dir.join("new.log"),
    )
    .unwrap();
    let t = guest
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{}", sock.display())}),
        )
        .unwrap();
    assert_eq!(t["mode"], "transfer", "{t}");
    assert_eq!(
        wait_exit(&mut guest.child, Duration::from_secs(60)).unwrap(),
        0,
        "the old VMM exits"
    );
    std::mem::swap(&mut guest.child, &mut *target);
    if !observable {
        skipped("the kernel printed `Memory:` before the restart; only checking it still runs");
        let status = guest.qmp.execute("query-status", json!({})).unwrap();
        assert_eq!(status["status"], "running", "{status}");
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    // The kernel carries on from where it was: later boot messages appear, after everything
    // it printed before, with its clock never going back.
    let after = guest.wait_for(&["Memory: ".to_string()]);
    assert!(
        after.starts_with(&before),
        "the console output before the restart is kept"
    );
    let times = timestamps(&after);
    assert!(times.len() > timestamps(&before).len(), "{after}");
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "printk time never goes back:\n{after}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
    println!(
        "restart blackout {} us, transfer blackout {} us; then: {}",
        r["blackout-us"],
        t["blackout-us"],
        after
            .lines()
            .find(|l| l.contains("Memory: "))
            .unwrap_or_default()
    );
}
