// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The blackout of every update mode, measured on the real reference VMM with the demo guest,
//! against the machine's floor and, where QEMU 10 is installed, against QEMU's CPR.
//!
//! This bench binary is also the VMM (`blackout run ...` is `vmm-reference run ...`), so
//! what is measured is an optimized build of the reference VMM. For each guest size and page
//! size it measures:
//!
//! - the **floor** (`cpr-floor`): exec in place, `KVM_CREATE_VM`, irqchip, the memory slots,
//!   the vCPUs and their state, each time; and where transfers are measured, a transfer's
//!   floor (`cpr-floor --transfer`): two vCPUs stopped and their state and the VM's read,
//!   sent to another process that built its VM before the pause, restored and entered.
//!   A transfer's ratio is to the latter, every other mode's to the former;
//! - N restarts, N transfers and N reboots: the blackout the VMM reports (last vCPU out to
//!   first vCPU in), the largest pause the guest itself saw between two loop iterations
//!   (TSC), and the phases; for a reboot also the new process's start to the guest running;
//! - with `CPR_BENCH_QEMU=1`, QEMU's `cpr-transfer` and `cpr-reboot` on the same size, from
//!   its own `STOP` and `RESUME` event timestamps (QEMU is installed by
//!   `benches/install-qemu.sh` if missing).
//!
//! Settings (environment): `CPR_BENCH_UPDATES` (default 20), `CPR_BENCH_SIZES` (default
//! `1G,4G,16G,64G`), `CPR_BENCH_HUGE` (`0` to skip huge pages, which are measured up to
//! `CPR_BENCH_HUGE_MAX`, default `4G`), `CPR_BENCH_MODES` (default `restart,transfer,reboot`),
//! `CPR_BENCH_QEMU=1`, `CPR_BENCH_DEVICES=idle|busy` (a virtio-blk disk and, as root, a
//! virtio-net device on a tap in a private network namespace with an echo peer, which the
//! guest leaves alone or keeps busy; `CPR_BENCH_DISK=1` is `busy`), and
//! `CPR_BENCH_QUICK=1` for CI (3 updates, 1 GiB, 4 KiB pages).
//! Results also go to `target/cpr-bench/blackout.jsonl`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_reference::demo::{
    spawn_in, spawn_transfer_target_with, wait_exit, wait_progress, Process, Status, Vm,
};
use vmm_reference::netlab::{EchoPeer, NetNs};
use vmm_reference::qmp_client::QmpClient;

const GIB: u64 = 1 << 30;

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn parse_size(s: &str) -> u64 {
    vmm_reference::config::parse_size(s).unwrap_or_else(|e| panic!("{e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pages {
    Small,
    Huge2M,
}

impl Pages {
    fn name(self) -> &'static str {
        match self {
            Pages::Small => "4K",
            Pages::Huge2M => "2M",
        }
    }
}

#[derive(Debug, Default)]
struct Samples {
    /// VMM-reported blackout, µs.
    blackout: Vec<u64>,
    /// Largest gap the guest saw, µs.
    guest: Vec<u64>,
    /// Reboot: new process start to first entry, µs.
    start_to_run: Vec<u64>,
    /// Phases, µs after the stop.
    phases: BTreeMap<String, Vec<u64>>,
    /// From the `STOP` event's timestamp to the `RESUME` event's, µs (as QEMU is measured).
    events: Vec<u64>,
}

/// A QMP event's timestamp, µs.
fn timestamp_us(ev: &Value) -> u64 {
    ev["timestamp"]["seconds"].as_u64().unwrap_or(0) * 1_000_000
        + ev["timestamp"]["microseconds"].as_u64().unwrap_or(0)
}

/// STOP to RESUME of the update just answered, from the events on `q`.
fn events_us(q: &mut QmpClient) -> Option<u64> {
    let stop = q.wait_event("STOP", Duration::from_secs(10)).ok()?;
    let resume = q.wait_event("RESUME", Duration::from_secs(10)).ok()?;
    Some(timestamp_us(&resume).saturating_sub(timestamp_us(&stop)))
}

fn stats(v: &[u64]) -> Option<(u64, u64, u64)> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let p = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    Some((p(0.5), p(0.9), s[s.len() - 1]))
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

struct Bench {
    exe: PathBuf,
    updates: usize,
    out: std::fs::File,
    /// Our medians to set beside QEMU's, µs, by (mode, size), 4 KiB pages: STOP to RESUME
    /// events for restart and transfer, the whole outage for a reboot.
    ours: BTreeMap<(String, u64), u64>,
    /// `CPR_BENCH_DEVICES`: none, idle or busy.
    devices: Option<String>,
    /// The network for the virtio-net device, where this host can make one.
    lab: Option<(NetNs, EchoPeer)>,
}

const TAP: &str = "cprbench0";

fn wait_lines(q: &mut QmpClient, n: u64) -> Status {
    let s = vmm_reference::demo::status(q).expect("x-demo-status");
    wait_progress(q, &s, n).expect("guest progress")
}

fn gap_us(q: &mut QmpClient) -> u64 {
    q.execute("x-demo-status", json!({}))
        .expect("x-demo-status")["max-gap-us"]
        .as_u64()
        .unwrap_or(0)
}

fn record(samples: &mut Samples, answer: &Value) {
    if let Some(b) = answer["blackout-us"].as_u64() {
        samples.blackout.push(b);
    }
    if let Some(p) = answer["phases-us"].as_object() {
        for (k, v) in p {
            if let Some(v) = v.as_u64() {
                samples.phases.entry(k.clone()).or_default().push(v);
            }
        }
        if let (Some(s), Some(f)) = (p.get("start"), p.get("first-entry")) {
            if let (Some(s), Some(f)) = (s.as_u64(), f.as_u64()) {
                samples.start_to_run.push(f.saturating_sub(s));
            }
        }
    }
}

impl Bench {
    fn vmm_args(&self, dir: &Path, memory: &str, size: u64, pages: Pages) -> Vec<String> {
        let mut a: Vec<String> = [
            "--memory",
            memory,
            "--memory-size",
            &size.to_string(),
            "--vcpus",
            "2",
            "--serial",
            "null",
            "--monitor",
            &dir.join("qmp.sock").to_string_lossy(),
            "--state-dir",
            &dir.to_string_lossy(),
            "--demo-span",
            "16K",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if pages == Pages::Huge2M && memory == "memfd" {
            a.extend(["--huge-pages".into(), "2M".into()]);
        }
        if let Some(devices) = &self.devices {
            // Busy: the guest's virtio-blk driver keeps four requests going all the time,
            // its virtio-net driver two frames a generation. Idle: attached, never set up.
            let img = dir.join("disk.img");
            if !img.exists() {
                std::fs::File::create(&img)
                    .and_then(|f| f.set_len(256 << 10))
                    .expect("disk image");
            }
            a.extend(["--disk".into(), img.to_string_lossy().into_owned()]);
            if self.lab.is_some() {
                a.extend(["--net".into(), format!("tap={TAP}")]);
            }
            if devices == "idle" {
                a.push("--demo-idle-devices".into());
            }
        }
        a
    }

    fn start(&self, dir: &Path, args: &[String], log: &str) -> Vm {
        let ns = self.lab.as_ref().map(|l| &l.0);
        spawn_in(
            ns,
            &self.exe,
            args,
            &[],
            &dir.join("qmp.sock"),
            &dir.join(log),
        )
        .expect("start the VMM")
    }

    /// One update's guest pause: reset the guest's gap, update, let it publish the gap.
    fn restart(&self, size: u64, pages: Pages) -> Samples {
        let dir = tempfile::tempdir().expect("dir");
        let args = self.vmm_args(dir.path(), "memfd", size, pages);
        let mut vm = self.start(dir.path(), &args, "vmm.log");
        wait_progress(&mut vm.qmp, &Status::boot(2), 2).expect("boot");
        let mut s = Samples::default();
        for _ in 0..self.updates {
            vm.qmp
                .execute("x-demo-reset-gap", json!({}))
                .expect("reset");
            wait_lines(&mut vm.qmp, 2);
            vm.qmp.clear_events();
            let r = vm
                .qmp
                .execute("cpr-save", json!({"mode": "restart"}))
                .expect("restart");
            record(&mut s, &r);
            s.events.extend(events_us(&mut vm.qmp));
            wait_lines(&mut vm.qmp, 2);
            s.guest.push(gap_us(&mut vm.qmp));
        }
        let _ = vm.qmp.execute("quit", json!({}));
        let _ = wait_exit(&mut vm.child, Duration::from_secs(60));
        s
    }

    fn transfer(&self, size: u64, pages: Pages) -> Samples {
        let dir = tempfile::tempdir().expect("dir");
        let args = self.vmm_args(dir.path(), "memfd", size, pages);
        let mut vm = self.start(dir.path(), &args, "vmm.log");
        wait_progress(&mut vm.qmp, &Status::boot(2), 2).expect("boot");
        let mut s = Samples::default();
        for i in 0..self.updates {
            vm.qmp
                .execute("x-demo-reset-gap", json!({}))
                .expect("reset");
            wait_lines(&mut vm.qmp, 2);
            let sock = dir.path().join(format!("x{i}.sock"));
            let extra: Vec<&str> = match pages {
                Pages::Huge2M => vec!["--huge-pages", "2M", "--log-level", "warn"],
                Pages::Small => vec!["--log-level", "warn"],
            };
            let mut next = spawn_transfer_target_with(
                &self.exe,
                &sock,
                &extra,
                &[],
                &dir.path().join(format!("new{i}.log")),
            )
            .expect("start the new VMM");
            vm.qmp.clear_events();
            let r = vm
                .qmp
                .execute(
                    "cpr-save",
                    json!({"mode": "transfer", "uri": format!("unix:{}", sock.display())}),
                )
                .expect("transfer");
            record(&mut s, &r);
            s.events.extend(events_us(&mut vm.qmp));
            wait_exit(&mut vm.child, Duration::from_secs(60)).expect("old VMM exits");
            std::mem::swap(&mut vm.child, &mut next);
            wait_lines(&mut vm.qmp, 2);
            s.guest.push(gap_us(&mut vm.qmp));
        }
        let _ = vm.qmp.execute("quit", json!({}));
        let _ = wait_exit(&mut vm.child, Duration::from_secs(60));
        s
    }

    fn reboot(&self, size: u64, pages: Pages, hugetlbfs: Option<&Path>) -> Samples {
        let dir = tempfile::tempdir().expect("dir");
        let shm = match (pages, hugetlbfs) {
            (Pages::Huge2M, Some(h)) => tempfile::tempdir_in(h).expect("hugetlbfs dir"),
            _ => tempfile::tempdir_in("/dev/shm").expect("shm dir"),
        };
        let memory = format!("shm:{}", shm.path().join("ram").display());
        let args = self.vmm_args(dir.path(), &memory, size, pages);
        let mut vm = self.start(dir.path(), &args, "vmm-0.log");
        wait_progress(&mut vm.qmp, &Status::boot(2), 2).expect("boot");
        let mut s = Samples::default();
        for i in 0..self.updates {
            vm.qmp
                .execute("x-demo-reset-gap", json!({}))
                .expect("reset");
            wait_lines(&mut vm.qmp, 2);
            vm.qmp
                .execute("cpr-save", json!({"mode": "reboot", "path": "vm.state"}))
                .expect("save");
            // Blocking, not polled: the next process starts the moment the old one is gone,
            // as a service manager would start it.
            vm.child.wait().expect("old VMM exits");
            let mut a = args.clone();
            a.extend([
                "--incoming".into(),
                dir.path().join("vm.state").to_string_lossy().into(),
            ]);
            vm = self.start(dir.path(), &a, &format!("vmm-{}.log", i + 1));
            let info = vm.qmp.execute("cpr-info", json!({})).expect("cpr-info");
            record(&mut s, &info["last-update"]);
            wait_lines(&mut vm.qmp, 2);
            s.guest.push(gap_us(&mut vm.qmp));
        }
        let _ = vm.qmp.execute("quit", json!({}));
        let _ = wait_exit(&mut vm.child, Duration::from_secs(60));
        s
    }

    /// The medians of `cpr-floor`'s phases over N runs: a restart's floor, or with
    /// `transfer` a transfer's.
    fn floor(&self, size: u64, pages: Pages, transfer: bool) -> BTreeMap<String, u64> {
        let mut all: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for _ in 0..self.updates {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_cpr-floor"));
            cmd.args(["--memory-size", &size.to_string(), "--vcpus", "2"]);
            if transfer {
                cmd.arg("--transfer");
            }
            if pages == Pages::Huge2M {
                cmd.args(["--huge-pages", "2M"]);
            }
            let out = cmd.output().expect("cpr-floor");
            assert!(
                out.status.success(),
                "cpr-floor: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).expect("cpr-floor's JSON");
            for (k, x) in v.as_object().expect("an object") {
                all.entry(k.clone())
                    .or_default()
                    .push(x.as_u64().unwrap_or(0));
            }
        }
        all.into_iter()
            .map(|(k, v)| (k, stats(&v).map_or(0, |s| s.0)))
            .collect()
    }

    fn report(
        &mut self,
        mode: &str,
        size: u64,
        pages: Pages,
        s: &Samples,
        floor: &BTreeMap<String, u64>,
    ) {
        let f = floor.get("total").copied().unwrap_or(0);
        let Some((med, p90, max)) = stats(&s.blackout) else {
            println!(
                "{mode:<9} {:>4} GiB {:>3}: no samples",
                size / GIB,
                pages.name()
            );
            return;
        };
        let guest = stats(&s.guest).map_or(0, |g| g.0);
        let ratio = |v: u64| if f > 0 { v as f64 / f as f64 } else { 0.0 };
        let run = stats(&s.start_to_run).map(|x| x.0);
        print!(
            "{mode:<9} {:>4} GiB {:>3}  n={:<3} blackout median {:>8} ms  p90 {:>8}  max {:>8}  guest-seen {:>8} ms  floor-ratio {:>5.2}",
            size / GIB,
            pages.name(),
            s.blackout.len(),
            ms(med),
            ms(p90),
            ms(max),
            ms(guest),
            ratio(med)
        );
        if let Some(r) = run {
            print!("  start->running {} ms ({:.2}x floor)", ms(r), ratio(r));
        }
        let events = stats(&s.events).map(|x| x.0);
        if let Some(e) = events {
            print!("  STOP->RESUME events {} ms", ms(e));
        }
        println!();
        if pages == Pages::Small {
            let ours = if mode == "reboot" { Some(med) } else { events };
            if let Some(o) = ours {
                self.ours.insert((mode.to_string(), size), o);
            }
        }
        let phases: BTreeMap<&String, u64> = s
            .phases
            .iter()
            .filter_map(|(k, v)| stats(v).map(|x| (k, x.0)))
            .collect();
        let mut order: Vec<(&&String, &u64)> = phases.iter().collect();
        order.sort_by_key(|(_, v)| **v);
        println!(
            "          phases (median us after the stop): {}",
            order
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let line = json!({
            "mode": mode, "size": size, "pages": pages.name(), "n": s.blackout.len(),
            "blackout_us": {"median": med, "p90": p90, "max": max},
            "guest_gap_us_median": guest, "floor_us": floor, "ratio_to_floor": ratio(med),
            "start_to_running_us": run, "phases_us": phases, "events_us_median": events,
        });
        let _ = writeln!(self.out, "{line}");
    }
}

/// Huge pages reserved for the bench; the old pool size is put back when dropped.
struct HugePool {
    old: String,
}

impl HugePool {
    fn reserve(pages: u64) -> Option<HugePool> {
        let path = "/proc/sys/vm/nr_hugepages";
        let old = std::fs::read_to_string(path).ok()?;
        let n: u64 = old.trim().parse().ok()?;
        std::fs::write(path, (n + pages).to_string()).ok()?;
        let now: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        let pool = HugePool { old };
        (now >= n + pages).then_some(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.old.trim());
    }
}

/// A private hugetlbfs mount, unmounted when dropped.
struct HugetlbMount(tempfile::TempDir);

impl HugetlbMount {
    fn new() -> Option<HugetlbMount> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(dir.path())
            .status()
            .ok()?
            .success();
        ok.then_some(HugetlbMount(dir))
    }
}

impl Drop for HugetlbMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if matches!(
        argv.get(1).map(String::as_str),
        Some("run" | "--cpr-state-versions")
    ) {
        use clap::Parser;
        std::process::exit(vmm_reference::main_with(vmm_reference::config::Cli::parse()));
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIPPED: no /dev/kvm");
        return;
    }
    let quick = std::env::var_os("CPR_BENCH_QUICK").is_some();
    let updates: usize = env_or("CPR_BENCH_UPDATES", if quick { "3" } else { "20" })
        .parse()
        .expect("CPR_BENCH_UPDATES");
    let sizes: Vec<u64> = env_or(
        "CPR_BENCH_SIZES",
        if quick { "1G" } else { "1G,4G,16G,64G" },
    )
    .split(',')
    .map(parse_size)
    .collect();
    let modes = env_or("CPR_BENCH_MODES", "restart,transfer,reboot");
    let huge_max = parse_size(&env_or("CPR_BENCH_HUGE_MAX", "4G"));
    let huge = !quick && env_or("CPR_BENCH_HUGE", "1") != "0";
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/cpr-bench");
    let _ = std::fs::create_dir_all(&target);
    let out = std::fs::File::create(target.join("blackout.jsonl")).expect("results file");
    let devices = match std::env::var("CPR_BENCH_DEVICES") {
        Ok(d) if d == "idle" || d == "busy" => Some(d),
        Ok(d) => panic!("CPR_BENCH_DEVICES={d}: idle or busy"),
        Err(_) => std::env::var_os("CPR_BENCH_DISK").map(|_| "busy".to_string()),
    };
    let lab = match devices {
        None => None,
        Some(_) => match vmm_reference::netlab::available() {
            Ok(()) => {
                let ns = NetNs::new().expect("network namespace");
                ns.add_tap(TAP).expect("tap");
                let peer = EchoPeer::start(&ns, TAP).expect("echo peer");
                Some((ns, peer))
            }
            Err(why) => {
                println!("SKIPPED the network device: {why}");
                None
            }
        },
    };
    if let Some(d) = &devices {
        println!(
            "devices: virtio-blk{}, {d}",
            if lab.is_some() { " and virtio-net" } else { "" }
        );
    }
    let mut bench = Bench {
        exe: std::env::current_exe().expect("own path"),
        updates,
        out,
        ours: BTreeMap::new(),
        devices,
        lab,
    };
    println!(
        "blackout: {updates} updates per case, sizes {:?} GiB, 2 vCPUs, demo guest (16 KiB span)",
        sizes.iter().map(|s| s / GIB).collect::<Vec<_>>()
    );
    let mounts = if huge { HugetlbMount::new() } else { None };
    for &size in &sizes {
        let mut cases = vec![Pages::Small];
        if huge && size <= huge_max {
            cases.push(Pages::Huge2M);
        }
        for pages in cases {
            let _pool = match pages {
                Pages::Huge2M => match HugePool::reserve(size / (2 << 20) + 8) {
                    Some(p) => Some(p),
                    None => {
                        println!("SKIPPED {} GiB 2M: cannot reserve huge pages", size / GIB);
                        continue;
                    }
                },
                Pages::Small => None,
            };
            let floor = bench.floor(size, pages, false);
            let transfer_floor = modes
                .split(',')
                .any(|m| m == "transfer")
                .then(|| bench.floor(size, pages, true));
            println!(
                "floor     {:>4} GiB {:>3}  {} ms: exec {} + create-vm {} + irqchip {} + memory-slots {} + vcpus {} + vcpu-state {} (us)",
                size / GIB,
                pages.name(),
                ms(floor["total"]),
                floor["exec"],
                floor["create-vm"],
                floor["irqchip"],
                floor["memory-slots"],
                floor["vcpus"],
                floor["vcpu-state"]
            );
            if let Some(f) = &transfer_floor {
                println!(
                    "floor     {:>4} GiB {:>3}  transfer {} ms: captured {} encoded {} sent {} received {} decoded {} vm-restored {} first-entry {} (us after the stop)",
                    size / GIB,
                    pages.name(),
                    ms(f["total"]),
                    f["captured"],
                    f["encoded"],
                    f["sent"],
                    f["received"],
                    f["decoded"],
                    f["vm-restored"],
                    f["first-entry"]
                );
            }
            for mode in modes.split(',') {
                let s = match mode {
                    "restart" => bench.restart(size, pages),
                    "transfer" => bench.transfer(size, pages),
                    "reboot" if pages == Pages::Huge2M && mounts.is_none() => continue,
                    "reboot" => bench.reboot(size, pages, mounts.as_ref().map(|m| m.0.path())),
                    other => panic!("mode {other}"),
                };
                // A transfer is set against a transfer's floor, the rest against a restart's.
                let f = match (&transfer_floor, mode) {
                    (Some(t), "transfer") => t,
                    _ => &floor,
                };
                bench.report(mode, size, pages, &s, f);
            }
        }
    }
    if std::env::var_os("CPR_BENCH_QEMU").is_some() {
        let theirs = qemu::run(&sizes, updates, &mut bench.out);
        for ((mode, size), q) in &theirs {
            if let Some(o) = bench.ours.get(&(mode.clone(), *size)) {
                let what = if mode == "reboot" {
                    "stop to running"
                } else {
                    "STOP->RESUME events"
                };
                println!(
                    "ours/QEMU {mode:<8} {:>4} GiB  {what}: {} ms / {} ms = {:.2}",
                    size / GIB,
                    ms(*o),
                    ms(*q),
                    *o as f64 / (*q).max(1) as f64
                );
            }
        }
    }
}

/// QEMU's `cpr-transfer` and `cpr-reboot`, measured from its own `STOP` (old process) and
/// `RESUME` (new process) event timestamps.
mod qemu {
    use super::*;

    fn binary() -> Option<PathBuf> {
        let found = |p: &str| Path::new(p).exists().then(|| PathBuf::from(p));
        found("/usr/bin/qemu-system-x86_64").or_else(|| {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("install-qemu.sh");
            println!("installing QEMU with {}", script.display());
            let ok = Command::new("sh")
                .arg(&script)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                found("/usr/bin/qemu-system-x86_64")
            } else {
                None
            }
        })
    }

    fn start(
        qemu: &Path,
        dir: &Path,
        tag: &str,
        memory: &[String],
        extra: &[String],
    ) -> (Process, QmpClient) {
        let sock = dir.join(format!("{tag}.qmp"));
        let log = std::fs::File::create(dir.join(format!("{tag}.log"))).expect("log");
        let mut args: Vec<String> = vec![
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-accel".into(),
            "kvm".into(),
            "-smp".into(),
            "2".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", sock.display()),
        ];
        args.extend_from_slice(memory);
        args.extend_from_slice(extra);
        let child = Command::new(qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start QEMU");
        let child = Process(child);
        let q = QmpClient::connect(&sock, Duration::from_secs(120)).expect("QEMU's QMP");
        (child, q)
    }

    /// Measures QEMU; returns its medians (µs) by (mode, size).
    pub fn run(
        sizes: &[u64],
        updates: usize,
        out: &mut std::fs::File,
    ) -> BTreeMap<(String, u64), u64> {
        let mut medians = BTreeMap::new();
        let Some(qemu) = binary() else {
            println!("SKIPPED QEMU: qemu-system-x86_64 is not installed and could not be");
            return medians;
        };
        let version = Command::new(&qemu)
            .arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        println!("QEMU side by side: {version}");
        for &size in sizes {
            let mb = size >> 20;
            let mut transfer = Vec::new();
            let mut reboot = Vec::new();
            for i in 0..updates {
                let dir = tempfile::tempdir().expect("dir");
                // cpr-transfer: memfd RAM shared, a cpr channel and a main channel.
                let memory: Vec<String> = vec![
                    "-machine".into(),
                    "q35,memory-backend=ram0,aux-ram-share=on".into(),
                    "-object".into(),
                    format!("memory-backend-memfd,id=ram0,size={mb}M,share=on"),
                    "-m".into(),
                    format!("{mb}M"),
                ];
                let (mut old, mut oq) = start(&qemu, dir.path(), "old", &memory, &[]);
                std::thread::sleep(Duration::from_millis(300));
                let cpr = dir.path().join("cpr.sock");
                let main = dir.path().join("main.sock");
                let incoming = vec![
                    "-incoming".into(),
                    format!("unix:{}", main.display()),
                    "-incoming".into(),
                    format!(
                        r#"{{"channel-type":"cpr","addr":{{"transport":"socket","type":"unix","path":"{}"}}}}"#,
                        cpr.display()
                    ),
                ];
                let log = std::fs::File::create(dir.path().join("new.log")).expect("log");
                let new_sock = dir.path().join("new.qmp");
                let mut args: Vec<String> = vec![
                    "-nodefaults".into(),
                    "-display".into(),
                    "none".into(),
                    "-accel".into(),
                    "kvm".into(),
                    "-smp".into(),
                    "2".into(),
                    "-qmp".into(),
                    format!("unix:{},server=on,wait=off", new_sock.display()),
                ];
                args.extend(memory.iter().cloned());
                args.extend(incoming);
                let mut new = Process(
                    Command::new(&qemu)
                        .args(&args)
                        .stdin(Stdio::null())
                        .stdout(log.try_clone().expect("log"))
                        .stderr(log)
                        .spawn()
                        .expect("start the new QEMU"),
                );
                let deadline = Instant::now() + Duration::from_secs(60);
                while !cpr.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                oq.execute("migrate-set-parameters", json!({"mode": "cpr-transfer"}))
                    .expect("mode");
                // The socket's file exists from its bind; until the new QEMU listens, a
                // connect is refused and the migration fails before it stops anything.
                loop {
                    match oq.execute(
                        "migrate",
                        json!({"channels": [
                            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main}},
                            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}}]}),
                    ) {
                        Ok(_) => break,
                        Err(e)
                            if format!("{e:?}").contains("Connection refused")
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("migrate: {e:?}"),
                    }
                }
                let stop = oq
                    .wait_event("STOP", Duration::from_secs(60))
                    .expect("STOP");
                let mut nq =
                    QmpClient::connect(&new_sock, Duration::from_secs(120)).expect("new QMP");
                let resume = nq
                    .wait_event("RESUME", Duration::from_secs(120))
                    .expect("RESUME");
                transfer.push(timestamp_us(&resume).saturating_sub(timestamp_us(&stop)));
                let _ = old.kill();
                let _ = old.wait();
                let _ = nq.execute("quit", json!({}));
                let _ = new.wait();

                // cpr-reboot: file RAM shared, state to a file, a new QEMU loads it.
                let shm = tempfile::tempdir_in("/dev/shm").expect("shm");
                let memory: Vec<String> = vec![
                    "-machine".into(),
                    "q35,memory-backend=ram0,aux-ram-share=on".into(),
                    "-object".into(),
                    format!(
                        "memory-backend-file,id=ram0,size={mb}M,mem-path={},share=on",
                        shm.path().join("ram").display()
                    ),
                    "-m".into(),
                    format!("{mb}M"),
                ];
                let (mut old, mut oq) = start(&qemu, dir.path(), &format!("rold{i}"), &memory, &[]);
                std::thread::sleep(Duration::from_millis(300));
                let state = dir.path().join("vm.state");
                oq.execute("migrate-set-parameters", json!({"mode": "cpr-reboot"}))
                    .expect("mode");
                oq.execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                )
                .expect("caps");
                oq.execute(
                    "migrate",
                    json!({"uri": format!("file:{}", state.display())}),
                )
                .expect("migrate");
                let stop = oq
                    .wait_event("STOP", Duration::from_secs(60))
                    .expect("STOP");
                // Wait for the save to complete, then end the old QEMU.
                loop {
                    let s = oq
                        .execute("query-migrate", json!({}))
                        .expect("query-migrate");
                    if s["status"] == "completed" {
                        break;
                    }
                    assert_ne!(s["status"], "failed", "{s}");
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = oq.execute("quit", json!({}));
                let _ = old.wait();
                let (mut new, mut nq) = start(
                    &qemu,
                    dir.path(),
                    &format!("rnew{i}"),
                    &memory,
                    &["-incoming".into(), "defer".into()],
                );
                nq.execute("migrate-set-parameters", json!({"mode": "cpr-reboot"}))
                    .expect("mode");
                nq.execute(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
                )
                .expect("caps");
                nq.execute(
                    "migrate-incoming",
                    json!({"uri": format!("file:{}", state.display())}),
                )
                .expect("migrate-incoming");
                let resume = match nq.wait_event("RESUME", Duration::from_secs(120)) {
                    Ok(r) => Some(r),
                    Err(_) => {
                        // A VM loaded from a file starts paused in some versions: cont it.
                        let _ = nq.execute("cont", json!({}));
                        nq.wait_event("RESUME", Duration::from_secs(60)).ok()
                    }
                };
                if let Some(resume) = resume {
                    reboot.push(timestamp_us(&resume).saturating_sub(timestamp_us(&stop)));
                }
                let _ = nq.execute("quit", json!({}));
                let _ = new.wait();
            }
            for (mode, v) in [
                ("qemu cpr-transfer", &transfer),
                ("qemu cpr-reboot", &reboot),
            ] {
                if let Some((m, p, x)) = stats(v) {
                    let short = mode.trim_start_matches("qemu cpr-").to_string();
                    medians.insert((short, size), m);
                    println!(
                        "{mode:<17} {:>4} GiB  n={:<3} STOP->RESUME median {:>8} ms  p90 {:>8}  max {:>8}",
                        size / GIB,
                        v.len(),
                        ms(m),
                        ms(p),
                        ms(x)
                    );
                    let _ = writeln!(
                        out,
                        "{}",
                        json!({"mode": mode, "size": size, "n": v.len(), "stop_to_resume_us": {"median": m, "p90": p, "max": x}, "qemu": version})
                    );
                }
            }
        }
        medians
    }
}
