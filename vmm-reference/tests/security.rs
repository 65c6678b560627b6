// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What a hostile state file, a local user or a slow client can make the VMM do: nothing
//! beyond a clear refusal. Each test sets up the attack the way it was found to work before,
//! and checks that the victim (a file's content, the guest, other clients) is untouched.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use cpr_kvm::{VcpuState, VmState};
use cpr_memory::MemoryLayout;
use cpr_snapshot::{Snapshot, SnapshotWriter};
use cpr_update::UpdateSection;
use serde_json::json;
use vmm_reference::demo::{check_continuity, status, wait_exit, wait_progress};
use vmm_reference::qmp_client::QmpClient;
use vmm_reference::serial::SerialSection;
use vmm_reference::update::VmmConfigSection;

fn hash(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap_or_default();
    cpr_snapshot::crc64(&b) ^ b.len() as u64
}

/// A state file's sections, decoded.
struct Parts {
    cfg: VmmConfigSection,
    layout: MemoryLayout,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    serial: SerialSection,
    update: UpdateSection,
}

fn decode(bytes: &[u8]) -> Parts {
    let schema = vmm_reference::update::schema();
    let mut s = Snapshot::read_from(bytes, &schema).unwrap();
    let vcpus = s
        .instances::<VcpuState>()
        .into_iter()
        .map(|i| s.take(i).unwrap())
        .collect();
    Parts {
        cfg: s.take(0).unwrap(),
        layout: s.take(0).unwrap(),
        vm: s.take(0).unwrap(),
        vcpus,
        serial: s.take(0).unwrap(),
        update: s.take(0).unwrap(),
    }
}

/// Encodes `p` again, with a valid checksum: what an attacker who can write the file makes.
fn encode(p: &Parts) -> Vec<u8> {
    let schema = vmm_reference::update::schema();
    let mut w = SnapshotWriter::new(Vec::new(), &schema, "vmm-reference", "0.2.0", 2).unwrap();
    w.write_section(0, &p.cfg).unwrap();
    w.write_section(0, &p.layout).unwrap();
    w.write_section(0, &p.vm).unwrap();
    for (i, v) in p.vcpus.iter().enumerate() {
        w.write_section(i as u32, v).unwrap();
    }
    w.write_section(0, &p.serial).unwrap();
    w.write_section(0, &p.update).unwrap();
    w.finish().unwrap()
}

/// Runs `vmm-reference run ARGS --incoming FILE`, which must fail; returns its stderr.
fn refused(args: &[String], file: &Path) -> String {
    let out = std::process::Command::new(exe())
        .arg("run")
        .args(args)
        .arg("--incoming")
        .arg(file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the restore must be refused:\n{err}");
    err
}

#[test]
fn a_crafted_state_cannot_choose_host_files_or_a_memory_map() {
    let Some((dir, base, mut vm, _)) = boot_on_shm("crafted", 2, 1) else {
        return;
    };
    save_for_reboot(&mut vm);
    let good = std::fs::read(dir.p("vm.state")).unwrap();
    // The victims: another tmpfs file, and the guest's own memory.
    let victim = dir.shm.with_file_name("victim");
    std::fs::write(&victim, vec![0x5a; 64 << 20]).unwrap();
    let linkdir = dir.p("linkdir");
    std::os::unix::fs::symlink(dir.shm.parent().unwrap(), &linkdir).unwrap();
    let (victim_hash, memory_hash) = (hash(&victim), hash(&dir.shm));
    let victim_s = victim.to_string_lossy().into_owned();

    type Edit = Box<dyn Fn(&mut Parts)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "another file",
            Box::new({
                let v = victim_s.clone();
                move |p: &mut Parts| p.layout.regions[0].name = v.clone()
            }),
            "the backing is",
        ),
        (
            "another file, configured",
            Box::new({
                let v = victim_s.clone();
                move |p: &mut Parts| {
                    p.layout.regions[0].name = v.clone();
                    p.cfg.memory = format!("shm:{v}");
                }
            }),
            "memory backend",
        ),
        (
            "a second region",
            Box::new({
                let v = victim_s.clone();
                move |p: &mut Parts| {
                    let mut r = p.layout.regions[0].clone();
                    r.guest_addr = 64 << 20;
                    r.name = v.clone();
                    p.layout.regions.push(r);
                }
            }),
            "2 memory regions",
        ),
        (
            "a symlinked directory",
            Box::new({
                let l = linkdir.join("ram").to_string_lossy().into_owned();
                move |p: &mut Parts| p.layout.regions[0].name = l.clone()
            }),
            "the backing is",
        ),
        (
            "a relative path",
            Box::new(|p: &mut Parts| p.layout.regions[0].name = "ram".into()),
            "the backing is",
        ),
        (
            "a region beyond the memory map",
            Box::new(|p: &mut Parts| p.layout.regions[0].guest_addr = 4 << 30),
            "the guest address is 0x100000000",
        ),
        (
            "a smaller region",
            Box::new(|p: &mut Parts| p.layout.regions[0].size = 1 << 20),
            "the size is 1048576",
        ),
        (
            "no stamp",
            Box::new(|p: &mut Parts| p.layout.stamp_offset = cpr_memory::NO_STAMP),
            "no stamp",
        ),
        (
            "one vCPU with two vCPU sections",
            Box::new(|p: &mut Parts| p.cfg.vcpus = 1),
            "vCPUs: 1 in the state, --vcpus 2",
        ),
        (
            "two vCPUs, one section",
            Box::new(|p: &mut Parts| {
                p.vcpus.pop();
            }),
            "vCPU sections [0] for 2 vCPUs",
        ),
    ];
    for (what, edit, expect) in cases {
        let mut p = decode(&good);
        edit(&mut p);
        let file = dir.p("crafted.state");
        std::fs::write(&file, encode(&p)).unwrap();
        let err = refused(&base, &file);
        assert!(err.contains(expect), "{what}: unclear refusal:\n{err}");
        assert_eq!(hash(&victim), victim_hash, "{what}: the victim changed");
        assert_eq!(hash(&dir.shm), memory_hash, "{what}: guest memory changed");
    }
    // vCPUs and size left to the state: a one-vCPU state with two sections is still refused.
    let mut p = decode(&good);
    p.cfg.vcpus = 1;
    std::fs::write(dir.p("crafted.state"), encode(&p)).unwrap();
    let no_vcpus: Vec<String> = {
        let mut a = base.clone();
        let i = a.iter().position(|x| x == "--vcpus").unwrap();
        a.drain(i..i + 2);
        a
    };
    let err = refused(&no_vcpus, &dir.p("crafted.state"));
    assert!(err.contains("vCPU sections [0, 1] for 1 vCPUs"), "{err}");
    // A symlink on the command line itself (with a state that agrees) is refused too, not
    // followed.
    let linked = linkdir.join("ram").to_string_lossy().into_owned();
    let mut via_link = base.clone();
    let i = via_link.iter().position(|x| x == "--memory").unwrap();
    via_link[i + 1] = format!("shm:{linked}");
    let mut p = decode(&good);
    p.cfg.memory = format!("shm:{linked}");
    p.layout.regions[0].name = linked;
    std::fs::write(dir.p("crafted.state"), encode(&p)).unwrap();
    let err = refused(&via_link, &dir.p("crafted.state"));
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(hash(&dir.shm), memory_hash);
    // The untouched file still restores.
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let s = status(&mut vm.qmp).unwrap();
    wait_progress(&mut vm.qmp, &s, 1).unwrap();
    quit(vm);
}

#[test]
fn a_command_line_that_disagrees_with_the_state_is_refused_naming_each_difference() {
    let Some((dir, base, mut vm, _)) = boot_on_shm("mismatch", 2, 1) else {
        return;
    };
    save_for_reboot(&mut vm);
    let mut a = base.clone();
    let i = a.iter().position(|x| x == "--memory-size").unwrap();
    a[i + 1] = "128M".into();
    let i = a.iter().position(|x| x == "--vcpus").unwrap();
    a[i + 1] = "1".into();
    let err = refused(&a, &dir.p("vm.state"));
    assert!(
        err.contains("memory size: 67108864 in the state, --memory-size 134217728")
            && err.contains("vCPUs: 2 in the state, --vcpus 1"),
        "{err}"
    );
    // Left out, the saved values apply.
    let lean: Vec<String> = base
        .chunks(2)
        .filter(|kv| kv[0] != "--memory-size" && kv[0] != "--vcpus")
        .flatten()
        .cloned()
        .collect();
    let mut vm = start(&dir, &incoming(&dir, &lean), "vmm-2.log");
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    assert_eq!(info["vcpus"], 2);
    quit(vm);
}

/// A state restores at most once: after the guest ran on, restoring the same file again
/// would put old CPU state over newer memory. Refused, with the memory unchanged.
#[test]
fn a_second_restore_of_the_same_state_is_refused_and_memory_is_unchanged() {
    let Some((dir, base, mut vm, _)) = boot_on_shm("replay", 1, 1) else {
        return;
    };
    save_for_reboot(&mut vm);
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let s = status(&mut vm.qmp).unwrap();
    wait_progress(&mut vm.qmp, &s, 2).unwrap();
    // The VMM dies (its memory file stays); someone restores the old file again.
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    let memory = hash(&dir.shm);
    let err = refused(&base, &dir.p("vm.state"));
    assert!(err.contains("stale state"), "{err}");
    assert_eq!(hash(&dir.shm), memory, "guest memory unchanged");
}

/// Saved on this boot, restored "after a host reboot" (a faked boot id): the blackout comes
/// from the real-time clock and says so; a guest clock that advances moves by about the
/// outage; the guest runs on.
#[test]
fn a_restore_on_another_boot_uses_real_time() {
    let Some((dir, mut base, mut vm, before)) = boot_on_shm("bootid", 1, 1) else {
        return;
    };
    let kvmclock_before = before.kvmclock;
    save_for_reboot(&mut vm);
    let outage = Duration::from_secs(2);
    std::thread::sleep(outage);
    base.extend(["--guest-clock".into(), "advance".into()]);
    let mut vm = start_env(
        &dir,
        &incoming(&dir, &base),
        &[(
            "CPR_UPDATE_TEST_BOOT_ID",
            "00000000-0000-0000-0000-00000000b007",
        )],
        "vmm-2.log",
    );
    let info = vm.qmp.execute("cpr-info", json!({})).unwrap();
    let last = &info["last-update"];
    assert_eq!(last["blackout-basis"], "realtime", "{info}");
    assert!(
        last["blackout-us"].as_u64().unwrap() >= outage.as_micros() as u64,
        "{info}"
    );
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    let advanced = after.kvmclock.saturating_sub(kvmclock_before);
    assert!(
        advanced >= outage.as_nanos() as u64,
        "the guest clock shows the outage: +{advanced} ns"
    );
    quit(vm);
}

/// Runs `args` as user `nobody`; returns whether it succeeded.
fn as_nobody(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Under `umask 000`, in a directory everyone can enter, the monitor and serial sockets are
/// still 0600: another user cannot connect (before, `nobody` connected and made root exec
/// its own script).
#[test]
fn another_user_cannot_reach_the_sockets_whatever_the_umask() {
    if !have_kvm() {
        return;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        vmm_reference::demo::skipped("switching to another user needs root");
        return;
    }
    let dir = Dir::new("umask");
    let open = dir.p("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (mon, ser) = (open.join("qmp.sock"), open.join("serial.sock"));
    let mut a = args(&dir, "memfd", 1);
    let i = a.iter().position(|x| x == "--monitor").unwrap();
    a[i + 1] = mon.to_string_lossy().into_owned();
    let i = a.iter().position(|x| x == "--serial").unwrap();
    a[i + 1] = format!("unix:{}", ser.display());
    let log = std::fs::File::create(dir.p("vmm.log")).unwrap();
    let mut cmd = std::process::Command::new(exe());
    cmd.arg("run")
        .args(&a)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: umask is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let qmp = QmpClient::connect(&mon, Duration::from_secs(60)).unwrap();
    let mut vm = vmm_reference::demo::Vm { child, qmp };
    for s in [&mon, &ser] {
        let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", s.display());
        let connect = format!(
            "import socket,sys; socket.socket(socket.AF_UNIX).connect({:?})",
            s.to_string_lossy()
        );
        assert!(
            !as_nobody("python3", &["-c", &connect]),
            "nobody connected to {}",
            s.display()
        );
    }
    // The check itself works: root (this test) connects.
    let _c = std::os::unix::net::UnixStream::connect(&ser).unwrap();
    vm.qmp.execute("query-status", json!({})).unwrap();
    quit(vm);
}

/// A client may exec only a binary the operator allowed, and only one nobody else can
/// write; state files go only into the state directory, never through a symlink, never
/// over a file that is not a state file of this VM. The guest runs on, never stopped.
#[test]
fn clients_cannot_exec_other_binaries_or_write_outside_the_state_directory() {
    let Some((dir, _, mut vm, before)) = boot_with("policy", Dir::shm_arg, 1, 1, &[]) else {
        return;
    };
    let victim = dir.p("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.p("link.state")).unwrap();
    std::fs::write(dir.p("other.state"), b"not a state file").unwrap();
    for (args, expect) in [
        (
            json!({"mode": "restart", "binary": "/bin/true"}),
            "not an allowed update binary",
        ),
        (
            json!({"mode": "restart", "binary": victim}),
            "not an allowed update binary",
        ),
        (
            json!({"mode": "reboot", "path": "/etc/hostname"}),
            "not a file in the state directory",
        ),
        (
            json!({"mode": "reboot", "path": "../victim"}),
            "not a file in the state directory",
        ),
        (
            json!({"mode": "reboot", "path": "link.state"}),
            "symbolic link",
        ),
        (
            json!({"mode": "reboot", "path": "other.state"}),
            "not a state file of this VM",
        ),
    ] {
        let (_, desc) = qmp_error(vm.qmp.execute("cpr-save", args.clone()).unwrap_err());
        assert!(desc.contains(expect), "{args}: {desc}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(
        std::fs::read(dir.p("other.state")).unwrap(),
        b"not a state file"
    );
    assert!(
        vm.qmp.events().all(|e| e["event"] != "STOP"),
        "never paused"
    );
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    quit(vm);

    // An allowed binary that others can write to is refused as well.
    let dir = Dir::new("policy-bin");
    let bin = dir.p("vmm-reference");
    std::fs::copy(exe(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o775)).unwrap();
    let mut a = args(&dir, "memfd", 1);
    a.extend(["--allow-update-binary".into(), dir.s("vmm-reference")]);
    let mut vm = start(&dir, &a, "vmm.log");
    let (_, desc) = qmp_error(
        vm.qmp
            .execute("cpr-save", json!({"mode": "restart", "binary": bin}))
            .unwrap_err(),
    );
    assert!(desc.contains("writable by group or others"), "{desc}");
    quit(vm);
}

/// The demo's files go into a directory it creates privately: symlinks planted where it
/// used to put them (a predictable /tmp path) are not followed.
#[test]
fn the_demo_does_not_follow_planted_symlinks() {
    if !have_kvm() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let victim = work.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    for name in [
        "vmm-restart.log",
        "serial-restart.log",
        "qmp-restart.sock",
        "vm.state",
    ] {
        std::os::unix::fs::symlink(&victim, work.path().join(name)).unwrap();
    }
    let out = std::process::Command::new(exe())
        .args(["demo", "--restarts", "1", "--work-dir"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}

/// Three clients that never read their answers, and a thousand connections beyond the
/// limit: another client's commands are answered promptly, and a restart carries only the
/// clients the monitor has.
#[test]
fn slow_and_surplus_clients_do_not_stall_the_others() {
    let Some((dir, mut vm, before)) = boot("slow-clients", "memfd", 1, 1) else {
        return;
    };
    let sock = dir.p("qmp.sock");
    // Three clients that flood bad input and never read the error answers.
    let mut stuck = Vec::new();
    for _ in 0..3 {
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_nonblocking(true).unwrap();
        stuck.push(s);
    }
    let junk = b"x\n".repeat(65536);
    for s in &stuck {
        let _ = std::io::Write::write(&mut &*s, &junk);
    }
    // A thousand more connections: all but the limit are refused with an error.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
            idle.push(s);
        }
    }
    let mut times = Vec::new();
    for _ in 0..21 {
        for s in &stuck {
            let _ = std::io::Write::write(&mut &*s, &junk);
        }
        let t = Instant::now();
        vm.qmp.execute("query-status", json!({})).unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    assert!(
        median < Duration::from_millis(50),
        "median {median:?} of {times:?}"
    );
    // The monitor has at most its limit of clients; an update carries those.
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert_eq!(r["mode"], "restart");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    let fds = fd_kinds(after.pid);
    let sockets = fds.get("socket").copied().unwrap_or(0);
    assert!(
        sockets <= 16 + 4,
        "{sockets} sockets after the restart: {fds:?}"
    );
    drop((stuck, idle));
    quit(vm);
    let _ = wait_exit;
}
