// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm-reference demo`: boots the demo guest, restarts the VMM in place several times,
//! then reboots it through a state file, and checks after each step that the guest went on
//! as if nothing happened. Also the helpers the end-to-end tests use.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::DemoConfig;
use crate::qmp_client::QmpClient;

/// Generous deadline for guest progress on an emulated, loaded 2-core host.
pub const PROGRESS_DEADLINE: Duration = Duration::from_secs(120);

/// A failed check.
pub type Check<T> = Result<T, String>;

/// The demo guest's status, as `x-demo-status` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Words written.
    pub counter: u64,
    /// Generations.
    pub generation: u64,
    /// Serial lines.
    pub lines: u64,
    /// Verification failures.
    pub errors: u64,
    /// Exceptions.
    pub faults: u64,
    /// Timer interrupts per vCPU.
    pub ticks: Vec<u64>,
    /// Guest TSC at the last line.
    pub tsc: u64,
    /// Host TSC kHz.
    pub tsc_khz: u64,
    /// VMM pid.
    pub pid: u64,
    /// kvmclock read by the VMM (`KVM_GET_CLOCK`), ns.
    pub kvmclock: u64,
    /// The largest gap the guest saw between two loop iterations since the last reset, µs.
    pub max_gap_us: u64,
    /// Disk blocks the guest read back correct (0 without a disk).
    pub blk_verified: u64,
    /// Disk requests that failed or blocks that read back wrong.
    pub blk_errors: u64,
    /// Numbered echoes the guest received (0 without a network device).
    pub net_received: u64,
    /// Echoes received again or out of order.
    pub net_repeats: u64,
    /// Malformed demo frames.
    pub net_bad: u64,
}

impl Status {
    /// The status of a guest that has not started: every count zero.
    pub fn boot(vcpus: usize) -> Status {
        Status {
            counter: 0,
            generation: 0,
            lines: 0,
            errors: 0,
            faults: 0,
            ticks: vec![0; vcpus],
            tsc: 0,
            tsc_khz: 0,
            pid: 0,
            kvmclock: 0,
            max_gap_us: 0,
            blk_verified: 0,
            blk_errors: 0,
            net_received: 0,
            net_repeats: 0,
            net_bad: 0,
        }
    }
}

/// Reads `x-demo-status`.
pub fn status(c: &mut QmpClient) -> Check<Status> {
    let v = c
        .execute("x-demo-status", json!({}))
        .map_err(|e| e.to_string())?;
    let u = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| format!("x-demo-status lacks {k}: {v}"))
    };
    Ok(Status {
        counter: u("counter")?,
        generation: u("generation")?,
        lines: u("lines")?,
        errors: u("errors")?,
        faults: u("faults")?,
        ticks: v["ticks"]
            .as_array()
            .ok_or("no ticks")?
            .iter()
            .map(|t| t.as_u64().unwrap_or(0))
            .collect(),
        tsc: u("tsc")?,
        tsc_khz: v["tsc-khz"].as_u64().unwrap_or(0),
        pid: u("pid")?,
        kvmclock: v["kvmclock-ns"].as_u64().unwrap_or(0),
        max_gap_us: v["max-gap-us"].as_u64().unwrap_or(0),
        blk_verified: v["blk"]["verified"].as_u64().unwrap_or(0),
        blk_errors: v["blk"]["errors"].as_u64().unwrap_or(0),
        net_received: v["net"]["received"].as_u64().unwrap_or(0),
        net_repeats: v["net"]["repeats"].as_u64().unwrap_or(0),
        net_bad: v["net"]["bad"].as_u64().unwrap_or(0),
    })
}

/// Waits until the guest printed `more` lines beyond `from`, went on to a later
/// generation, and every vCPU's timer ticked: everything [`check_continuity`] checks.
/// (A line is printed at the end of a generation, so the next one may not have begun yet
/// when the line count is reached.)
pub fn wait_progress(c: &mut QmpClient, from: &Status, more: u64) -> Check<Status> {
    let start = Instant::now();
    loop {
        let s = status(c)?;
        let ticking = s.ticks.iter().zip(&from.ticks).all(|(a, b)| a > b);
        let went_on = s.generation > from.generation
            && s.counter > from.counter
            && (from.blk_verified == 0 || s.blk_verified > from.blk_verified)
            && (from.net_received == 0 || s.net_received > from.net_received);
        if s.lines >= from.lines + more && ticking && went_on {
            return Ok(s);
        }
        if s.errors != 0 || s.faults != 0 || s.blk_errors != 0 || s.net_repeats + s.net_bad != 0 {
            return Err(format!(
                "guest reports errors={} faults={} disk errors={} repeated frames={} bad \
                 frames={}",
                s.errors, s.faults, s.blk_errors, s.net_repeats, s.net_bad
            ));
        }
        if start.elapsed() > PROGRESS_DEADLINE {
            return Err(format!(
                "no progress within {PROGRESS_DEADLINE:?}: {from:?} -> {s:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks that `after` continues `before`: counter, generation and lines went on, every
/// vCPU's timer still ticks, and the guest found its memory intact.
pub fn check_continuity(before: &Status, after: &Status) -> Check<()> {
    if after.errors != 0 {
        return Err(format!(
            "the guest found its memory changed ({} verification failures)",
            after.errors
        ));
    }
    if after.faults != 0 {
        return Err("the guest took an exception".into());
    }
    if after.blk_errors != 0 {
        return Err(format!(
            "the guest's disk failed it ({} bad requests or blocks)",
            after.blk_errors
        ));
    }
    if after.net_repeats != 0 || after.net_bad != 0 {
        return Err(format!(
            "the guest's network failed it ({} frames repeated, {} malformed)",
            after.net_repeats, after.net_bad
        ));
    }
    if before.net_received > 0 && after.net_received <= before.net_received {
        return Err(format!(
            "the guest's network stopped: {} echoes received, then {}",
            before.net_received, after.net_received
        ));
    }
    if before.blk_verified > 0 && after.blk_verified <= before.blk_verified {
        return Err(format!(
            "the guest's disk stopped: {} blocks verified, then {}",
            before.blk_verified, after.blk_verified
        ));
    }
    if after.counter <= before.counter
        || after.generation <= before.generation
        || after.lines <= before.lines
    {
        return Err(format!(
            "the guest did not continue: {before:?} -> {after:?}"
        ));
    }
    if after.ticks.len() != before.ticks.len()
        || after.ticks.iter().zip(&before.ticks).any(|(a, b)| a <= b)
    {
        return Err(format!(
            "timer interrupts stopped: {:?} -> {:?}",
            before.ticks, after.ticks
        ));
    }
    Ok(())
}

/// Checks serial output: lines `L <n> ...` numbered 1, 2, 3, ... with no gap or repeat.
/// Returns the number of complete lines.
pub fn check_serial(text: &str) -> Check<u64> {
    let mut expect = 1u64;
    let complete = match text.rfind('\n') {
        Some(i) => &text[..i],
        None => "",
    };
    for line in complete.lines() {
        let n: u64 = line
            .strip_prefix("L ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("unexpected serial line {line:?}"))?;
        if n != expect {
            return Err(format!(
                "serial line {n} where {expect} was expected (gap or repeat)"
            ));
        }
        expect += 1;
    }
    Ok(expect - 1)
}

/// A VMM child process with its monitor.
#[derive(Debug)]
pub struct Vm {
    /// The process.
    pub child: Child,
    /// Its monitor.
    pub qmp: QmpClient,
}

impl Drop for Vm {
    /// A VMM left behind by a failed check is killed, not leaked.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `vmm-reference run ARGS` (logging to `log`) and connects to its monitor.
pub fn spawn(exe: &Path, args: &[String], monitor: &Path, log: &Path) -> Check<Vm> {
    spawn_env(exe, args, &[], monitor, log)
}

/// [`spawn`] with extra environment variables (the tests' fault hooks).
pub fn spawn_env(
    exe: &Path,
    args: &[String],
    env: &[(&str, &str)],
    monitor: &Path,
    log: &Path,
) -> Check<Vm> {
    spawn_in(None, exe, args, env, monitor, log)
}

/// [`spawn_env`], in network namespace `ns` if given.
pub fn spawn_in(
    ns: Option<&crate::netlab::NetNs>,
    exe: &Path,
    args: &[String],
    env: &[(&str, &str)],
    monitor: &Path,
    log: &Path,
) -> Check<Vm> {
    let log_file =
        std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err_file = log_file.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    if let Some(ns) = ns {
        ns.command(&mut cmd).map_err(|e| e.to_string())?;
    }
    let mut child = cmd
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", exe.display()))?;
    let qmp = match QmpClient::connect(monitor, Duration::from_secs(60)) {
        Ok(q) => q,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("monitor: {e}\n{log}"));
        }
    };
    Ok(Vm { child, qmp })
}

/// A child process (a VMM; in the blackout benchmark also a QEMU) that is killed and reaped
/// when dropped while still running, so a failed check never leaves one behind running a
/// guest.
#[derive(Debug)]
pub struct Process(pub Child);

impl std::ops::Deref for Process {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Starts `vmm-reference run --incoming transfer:SOCK` (logging to `log`) and waits until it
/// listens.
pub fn spawn_transfer_target(exe: &Path, sock: &Path, log: &Path) -> Check<Process> {
    spawn_transfer_target_with(exe, sock, &[], &[], log)
}

/// [`spawn_transfer_target`] with extra arguments and environment variables.
pub fn spawn_transfer_target_with(
    exe: &Path,
    sock: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> Check<Process> {
    let log = std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let mut child = Command::new(exe)
        .args(["run", "--incoming", &format!("transfer:{}", sock.display())])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", exe.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        if Instant::now() > deadline || child.try_wait().map_err(|e| e.to_string())?.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the new VMM did not listen for the transfer".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Process(child))
}

/// Says that a test skipped, visibly: libtest captures what passing tests print (even
/// through `io::stderr()`), so this writes to a duplicate of fd 2, which shares its file
/// offset and escapes the capture.
pub fn skipped(msg: impl std::fmt::Display) {
    use std::io::Write as _;
    let msg = format!("SKIPPED: {msg}\n");
    match std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        Ok(fd) => {
            let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
        }
        Err(_) => eprint!("{msg}"),
    }
}

/// Waits for a child to exit within `timeout`; returns its exit code.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Check<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(st.code().unwrap_or(-1));
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            return Err(format!("process did not exit within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1000, us % 1000)
}

fn blackout(v: &Value) -> Check<u64> {
    v["blackout-us"]
        .as_u64()
        .ok_or_else(|| format!("no blackout in {v}"))
}

/// A private (0700), unpredictably named directory in `parent`, created exclusively: a
/// local user cannot plant files or symlinks in it beforehand.
pub fn private_dir(parent: &Path, prefix: &str) -> Check<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .map_err(|e| format!("create a directory in {}: {e}", parent.display()))
}

/// Stops `peer` echoing, waits until the guest behind `qmp` has received every echo the
/// peer sent, and checks that they are the same frames (the same count and the same sum of
/// frame numbers, with none repeated); then lets the peer echo again. Returns the guest's
/// `net` status.
pub fn check_echoes(
    qmp: &mut QmpClient,
    peer: &crate::netlab::EchoPeer,
    timeout: Duration,
) -> Check<Value> {
    peer.hold(true);
    let result = (|| {
        let sent = peer.stats();
        let start = Instant::now();
        loop {
            let v = qmp
                .execute("x-demo-status", json!({}))
                .map_err(|e| e.to_string())?["net"]
                .clone();
            let n = |k: &str| v[k].as_u64().unwrap_or(u64::MAX);
            if n("repeats") != 0 || n("bad") != 0 {
                return Err(format!("the guest saw repeated or malformed frames: {v}"));
            }
            if n("received") == sent.sent {
                if n("sum") != sent.sent_sum {
                    return Err(format!("other frames than the peer sent: {sent:?}, {v}"));
                }
                return Ok(v);
            }
            if n("received") > sent.sent || start.elapsed() > timeout {
                return Err(format!(
                    "echoes lost or invented: the peer sent {sent:?}, the guest has {v}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })();
    peer.hold(false);
    result
}

/// The demo's network: a namespace with a tap and an echo peer, or why there is none.
fn net_lab() -> std::result::Result<(crate::netlab::NetNs, crate::netlab::EchoPeer), String> {
    crate::netlab::available()?;
    let ns = crate::netlab::NetNs::new().map_err(|e| format!("network namespace: {e}"))?;
    ns.add_tap(DEMO_TAP).map_err(|e| format!("tap: {e}"))?;
    let peer = crate::netlab::EchoPeer::start(&ns, DEMO_TAP).map_err(|e| format!("peer: {e}"))?;
    Ok((ns, peer))
}

/// The demo's tap, in its own network namespace.
const DEMO_TAP: &str = "cprdemo0";

fn print_net(
    qmp: &mut QmpClient,
    lab: &Option<(crate::netlab::NetNs, crate::netlab::EchoPeer)>,
    when: &str,
) -> Check<()> {
    let Some((_, peer)) = lab else {
        return Ok(());
    };
    let v = check_echoes(qmp, peer, Duration::from_secs(60)).map_err(|e| format!("{when}: {e}"))?;
    println!(
        "network: {} frames sent through the tap, {} echoes received: exactly those the peer sent (number sum {}), none repeated",
        v["sent"], v["received"], v["sum"]
    );
    Ok(())
}

/// Runs the demo.
pub fn run(cfg: &DemoConfig) -> Check<()> {
    let exe = cpr_fd::startup_executable().map_err(|e| e.to_string())?;
    // Sockets, logs and state in a private directory; guest RAM for the reboot in a private
    // directory of /dev/shm.
    let work = match &cfg.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
            private_dir(d, "cpr-demo-")?
        }
        None => private_dir(&std::env::temp_dir(), "cpr-demo-")?,
    };
    let shm = private_dir(Path::new("/dev/shm"), "cpr-demo-")?;
    let result = run_in(cfg, &exe, work.path(), &shm.path().join("guest-ram"));
    if result.is_err() || cfg.work_dir.is_some() {
        println!("work directory kept: {}", work.path().display());
        let _ = work.keep();
    }
    result
}

fn run_in(cfg: &DemoConfig, exe: &Path, dir: &Path, shm: &Path) -> Check<()> {
    let span = cfg.span.to_string();
    let p = |n: &str| dir.join(n);
    let s = |p: PathBuf| p.to_string_lossy().into_owned();

    // A disk for the guest's virtio-blk driver: 64 blocks of 4 KiB it keeps rewriting and
    // reading back, with requests in flight across every update.
    let disk = p("disk.img");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&disk)
        .and_then(|f| f.set_len(256 << 10))
        .map_err(|e| format!("disk image {}: {e}", disk.display()))?;

    // A network for the guest's virtio-net driver, where this host can make one.
    let lab = match net_lab() {
        Ok(lab) => {
            println!("network: tap {DEMO_TAP} in a network namespace of the demo's own, with an echo peer");
            Some(lab)
        }
        Err(why) => {
            println!("network: SKIPPED ({why}); the demo runs without a network device");
            None
        }
    };
    let ns = lab.as_ref().map(|l| &l.0);
    let net_args: Vec<String> = match lab {
        Some(_) => vec!["--net".into(), format!("tap={DEMO_TAP}")],
        None => vec![],
    };

    println!("== restart: exec the VMM in place, {} times", cfg.restarts);
    let monitor = p("qmp-restart.sock");
    let args: Vec<String> = vec![
        "--memory".into(),
        "memfd".into(),
        "--memory-size".into(),
        "1G".into(),
        "--vcpus".into(),
        "2".into(),
        "--serial".into(),
        format!("file:{}", s(p("serial-restart.log"))),
        "--monitor".into(),
        s(monitor.clone()),
        "--demo-span".into(),
        span.clone(),
        "--disk".into(),
        s(disk.clone()),
    ];
    let args = [args, net_args.clone()].concat();
    let mut vm = spawn_in(ns, exe, &args, &[], &monitor, &p("vmm-restart.log"))?;
    let boot = Status::boot(2);
    let mut before = wait_progress(&mut vm.qmp, &boot, 3)?;
    println!(
        "booted demo guest: 1 GiB memfd, 2 vCPUs, pid {}, {} lines, ticks {:?}",
        before.pid, before.lines, before.ticks
    );
    let mut blackouts = Vec::new();
    for i in 1..=cfg.restarts {
        let r = vm
            .qmp
            .execute("cpr-save", json!({"mode": "restart"}))
            .map_err(|e| format!("restart {i}: {e}"))?;
        let b = blackout(&r)?;
        let after = wait_progress(&mut vm.qmp, &before, 2)?;
        check_continuity(&before, &after).map_err(|e| format!("restart {i}: {e}"))?;
        if after.pid != before.pid {
            return Err(format!(
                "restart {i}: pid changed {} -> {}",
                before.pid, after.pid
            ));
        }
        println!(
            "restart {i:>2}: blackout {:>10}  pid {} kept, counter {} -> {}, lines {} -> {}, ticks {:?} -> {:?}, memory verified",
            ms(b), after.pid, before.counter, after.counter, before.lines, after.lines, before.ticks, after.ticks
        );
        blackouts.push(b);
        before = after;
    }

    println!("== transfer: hand the running VM to a new VMM process");
    let sock = p("xfer.sock");
    let mut new_child = spawn_transfer_target(exe, &sock, &p("vmm-transfer.log"))?;
    let r = vm
        .qmp
        .execute(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{}", sock.display())}),
        )
        .map_err(|e| format!("transfer: {e}"))?;
    let transfer_blackout = blackout(&r)?;
    let code = wait_exit(&mut vm.child, Duration::from_secs(30))?;
    if code != 0 {
        return Err(format!("the old VMM exited with {code} after the transfer"));
    }
    let after = wait_progress(&mut vm.qmp, &before, 2)?;
    check_continuity(&before, &after).map_err(|e| format!("transfer: {e}"))?;
    if after.pid == before.pid || after.pid != u64::from(new_child.id()) {
        return Err(format!(
            "transfer: guest not in the new process (pid {} -> {})",
            before.pid, after.pid
        ));
    }
    println!(
        "transfer: blackout {}, pid {} -> {}, counter {} -> {}, lines {} -> {}, ticks {:?} -> {:?}, memory verified, monitor client kept",
        ms(transfer_blackout), before.pid, after.pid, before.counter, after.counter, before.lines, after.lines, before.ticks, after.ticks
    );
    print_net(&mut vm.qmp, &lab, "restarts and transfer")?;
    vm.qmp
        .execute("quit", json!({}))
        .map_err(|e| e.to_string())?;
    wait_exit(&mut new_child, Duration::from_secs(30))?;
    let lines = check_serial(
        &std::fs::read_to_string(p("serial-restart.log")).map_err(|e| e.to_string())?,
    )?;
    println!("serial: {lines} lines numbered 1..{lines}, no gap, no repeat");
    println!(
        "disk: {} blocks written, read back and verified across {} restarts and a transfer, no request lost or repeated",
        after.blk_verified, cfg.restarts
    );

    println!("== reboot: save to a state file, exit, restore in a new process");
    if let Some((_, peer)) = &lab {
        peer.reset();
    }
    let monitor = p("qmp-reboot.sock");
    let state = p("vm.state");
    let args: Vec<String> = vec![
        "--memory".into(),
        format!("shm:{}", shm.display()),
        "--memory-size".into(),
        "1G".into(),
        "--vcpus".into(),
        "2".into(),
        "--serial".into(),
        format!("file:{}", s(p("serial-reboot.log"))),
        "--monitor".into(),
        s(monitor.clone()),
        "--demo-span".into(),
        span,
        "--state-dir".into(),
        s(dir.to_path_buf()),
        "--disk".into(),
        s(disk.clone()),
    ];
    let args = [args, net_args].concat();
    let mut vm = spawn_in(ns, exe, &args, &[], &monitor, &p("vmm-reboot-1.log"))?;
    let before = wait_progress(&mut vm.qmp, &boot, 3)?;
    let info = vm
        .qmp
        .execute("cpr-info", json!({}))
        .map_err(|e| e.to_string())?;
    println!(
        "cpr-info: reboot supported={}, warnings {}",
        info["modes"]["reboot"]["supported"], info["modes"]["reboot"]["warnings"]
    );
    vm.qmp
        .execute("cpr-save", json!({"mode": "reboot", "path": "vm.state"}))
        .map_err(|e| format!("reboot save: {e}"))?;
    let code = wait_exit(&mut vm.child, Duration::from_secs(30))?;
    if code != 0 {
        return Err(format!("the old VMM exited with {code} after saving"));
    }
    print!(
        "{}",
        crate::vmm::inspect(&state).map_err(|e| e.to_string())?
    );
    let mut args2 = args.clone();
    args2.extend(["--incoming".to_string(), s(state.clone())]);
    let mut vm = spawn_in(ns, exe, &args2, &[], &monitor, &p("vmm-reboot-2.log"))?;
    let info = vm
        .qmp
        .execute("cpr-info", json!({}))
        .map_err(|e| e.to_string())?;
    let b = blackout(&info["last-update"])?;
    let after = wait_progress(&mut vm.qmp, &before, 2)?;
    check_continuity(&before, &after).map_err(|e| format!("reboot: {e}"))?;
    println!(
        "reboot: blackout {} (includes process exit and start), pid {} -> {}, counter {} -> {}, lines {} -> {}, ticks {:?} -> {:?}, memory verified",
        ms(b), before.pid, after.pid, before.counter, after.counter, before.lines, after.lines, before.ticks, after.ticks
    );
    print_net(&mut vm.qmp, &lab, "reboot")?;
    vm.qmp
        .execute("quit", json!({}))
        .map_err(|e| e.to_string())?;
    wait_exit(&mut vm.child, Duration::from_secs(30))?;
    let lines =
        check_serial(&std::fs::read_to_string(p("serial-reboot.log")).map_err(|e| e.to_string())?)?;
    println!("serial: {lines} lines numbered 1..{lines}, no gap, no repeat");
    println!(
        "disk: the same image after the reboot, {} blocks verified in all",
        after.blk_verified
    );

    let mut sorted = blackouts;
    sorted.sort_unstable();
    let restarts = match (sorted.first(), sorted.last()) {
        (Some(min), Some(max)) => format!(
            "{} restarts: median {}, min {}, max {}",
            sorted.len(),
            ms(sorted[sorted.len() / 2]),
            ms(*min),
            ms(*max)
        ),
        _ => "no restarts".to_string(),
    };
    println!(
        "== blackout of {restarts}; transfer {}; reboot {}",
        ms(transfer_blackout),
        ms(b)
    );
    println!("demo PASSED: every continuity check held");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_numbering_is_checked() {
        assert_eq!(check_serial("L 1 G 1 T 5\nL 2 G 2 T 9\nL 3 G").unwrap(), 2);
        assert!(check_serial("L 1 G 1\nL 3 G 3\n")
            .unwrap_err()
            .contains("gap"));
        assert!(check_serial("L 1 G 1\nL 1 G 1\n").is_err());
        assert!(check_serial("garbage\n").is_err());
        assert_eq!(check_serial("").unwrap(), 0);
    }

    #[test]
    fn continuity_is_checked() {
        let a = Status {
            counter: 1,
            generation: 1,
            lines: 1,
            ticks: vec![1, 1],
            pid: 1,
            ..Status::boot(2)
        };
        let mut b = Status {
            counter: 2,
            generation: 2,
            lines: 2,
            ticks: vec![2, 2],
            ..a.clone()
        };
        assert!(check_continuity(&a, &b).is_ok());
        b.errors = 1;
        assert!(check_continuity(&a, &b).is_err());
        b.errors = 0;
        b.ticks = vec![2, 1];
        assert!(check_continuity(&a, &b).is_err());
        assert!(check_continuity(&b, &a).is_err());
    }
}
