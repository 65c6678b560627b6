// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Under a service manager: the notify messages, and `vmm-reference update` in every mode.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use vmm_reference::demo::{check_continuity, spawn_transfer_target_with, wait_exit, wait_progress};
use vmm_reference::qmp_client::QmpClient;

const T: Duration = Duration::from_secs(60);

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notify message within the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn a_notify_service_follows_the_guest_to_the_new_process() {
    if !have_kvm() {
        return;
    }
    let dir = Dir::new("notify");
    let sock = UnixDatagram::bind(dir.p("notify.sock")).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let env = [("NOTIFY_SOCKET", dir.s("notify.sock"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut old = start_env(&dir, &args(&dir, "memfd", 1), &env, "old.log");
    assert_eq!(recv(&sock), "READY=1", "ready once the monitor answers");
    let before = wait_progress(&mut old.qmp, &vmm_reference::demo::Status::boot(1), 1).unwrap();

    let mut new =
        spawn_transfer_target_with(&exe(), &dir.p("x.sock"), &[], &env, &dir.p("new.log")).unwrap();
    let uri = format!("unix:{}", dir.s("x.sock"));
    old.qmp
        .execute("cpr-save", json!({"mode": "transfer", "uri": uri}))
        .unwrap();
    // In this order: the new process names itself the main one, then the old one says it
    // goes (it sends that only after the new process told it the guest runs).
    assert_eq!(recv(&sock), format!("MAINPID={}\nREADY=1", new.id()));
    assert!(
        recv(&sock).starts_with("STATUS="),
        "the old process's last word"
    );
    assert_eq!(wait_exit(&mut old.child, T).unwrap(), 0);
    let after = wait_progress(&mut old.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    old.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut new, T).unwrap(), 0);
}

/// `vmm-reference update ARGS`: exit code, stdout, stderr.
fn update(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(exe())
        .arg("update")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn update_restarts_and_transfers_and_refuses_with_the_guest_still_running() {
    let Some((dir, mut vm, before)) = boot("update-cmd", "memfd", 1, 1) else {
        return;
    };
    let mon = dir.s("qmp.sock");

    // Refused: a binary the VMM was not allowed to run. Non-zero, why, where the guest is.
    let (code, _, err) = update(&[
        "--monitor",
        &mon,
        "--mode",
        "restart",
        "--binary",
        "/bin/true",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not an allowed update binary"), "{err}");
    assert!(
        err.contains("runs in the old process") || err.contains("still runs"),
        "{err}"
    );
    let still = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &still).unwrap();

    // Restart, phases as JSON lines.
    let (code, out, err) = update(&["--monitor", &mon, "--mode", "restart", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "completed", "{out}");
    assert!(last["blackout-us"].as_u64().is_some(), "{out}");
    assert!(lines.iter().any(|l| l["event"] == "STOP"), "{out}");
    let after = wait_progress(&mut vm.qmp, &still, 1).unwrap();
    check_continuity(&still, &after).unwrap();
    assert_eq!(after.pid, before.pid);

    // Transfer: `update` starts the new process itself, which goes on after it exits.
    // With umask 000: the new process's log is created owner-only all the same.
    let new_log = dir.s("new.log");
    let out = Command::new("sh")
        .args(["-c", "umask 000 && exec \"$0\" \"$@\""])
        .arg(exe())
        .args([
            "update",
            "--monitor",
            &mon,
            "--mode",
            "transfer",
            "--new-log",
            &new_log,
        ])
        .output()
        .unwrap();
    let (code, out, err) = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&new_log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the new VMM's log");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("transfer completed"), "{out}");
    assert_eq!(wait_exit(&mut vm.child, T).unwrap(), 0, "the old VMM exits");
    let later = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    check_continuity(&after, &later).unwrap();
    assert_ne!(later.pid, after.pid);
    vm.qmp.execute("quit", json!({})).unwrap();
    let t = std::time::Instant::now();
    while std::path::Path::new(&format!("/proc/{}", later.pid)).exists() {
        assert!(t.elapsed() < T, "the new VMM quits");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn update_saves_for_a_reboot_and_says_how_to_go_on() {
    let Some((dir, base, mut vm, before)) = boot_on_shm("update-reboot", 1, 1) else {
        return;
    };
    let mon = dir.s("qmp.sock");
    // Without --state: a usage error before anything is asked of the VMM.
    let (code, _, err) = update(&["--monitor", &mon, "--mode", "reboot"]);
    assert_eq!(code, 2, "{err}");
    let (code, out, err) = update(&["--monitor", &mon, "--mode", "reboot", "--state", "vm.state"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("--incoming"), "{out}");
    assert_eq!(wait_exit(&mut vm.child, T).unwrap(), 0);
    let mut vm = start(&dir, &incoming(&dir, &base), "vmm-2.log");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    // A monitor that is not there: non-zero, saying so.
    let (code, _, err) = update(&["--monitor", &dir.s("none.sock"), "--mode", "restart"]);
    assert_eq!(code, 1);
    assert!(err.contains("none.sock"), "{err}");
    let _ = QmpClient::connect;
    quit(vm);
}

#[test]
fn the_human_monitor_runs_the_seed_commands_from_a_script() {
    let Some((dir, mut vm, before)) = boot("hmp-pipe", "memfd", 1, 1) else {
        return;
    };
    use std::io::Write;
    let mut child = Command::new(exe())
        .args(["monitor", &dir.s("qmp.sock")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = "info status\ncprinfo\nfly away\ncprsave unused restart\ninfo status\nstop\n\
                  info status\ncont\nquit\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let want = [
        "VM status: running",
        "\"restart\"",
        "Error: unknown command: 'fly'",
        "restart done: blackout",
        "VM status: paused",
    ];
    let mut at = 0;
    for w in want {
        let i = text[at..]
            .find(w)
            .unwrap_or_else(|| panic!("`{w}` after byte {at} in:\n{text}"));
        at += i + w.len();
    }
    assert_eq!(
        wait_exit(&mut vm.child, T).unwrap(),
        0,
        "quit from the monitor"
    );
    let _ = before;
}

/// A pty pair: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two fds into the ints; null name, termios and winsize are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and owned by nothing else.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

#[test]
fn on_a_terminal_the_human_monitor_prompts_edits_and_remembers() {
    let Some((dir, _vm, _)) = boot("hmp-pty", "memfd", 1, 1) else {
        return;
    };
    use std::io::{Read, Write};
    let (mut master, slave) = openpty();
    let mut child = Command::new(exe())
        .args(["monitor", &dir.s("qmp.sock")])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    // Reads what the terminal shows until `want` appears `times` times.
    let mut shown = String::new();
    let mut read_until = |master: &mut std::fs::File, want: &str, times: usize| {
        let t = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        while shown.matches(want).count() < times {
            assert!(t.elapsed() < T, "`{want}` x{times} not shown:\n{shown}");
            let n = master.read(&mut buf).unwrap();
            shown.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    read_until(&mut master, "(cpr) ", 1);
    // Typed with a mistake fixed by backspace.
    master.write_all(b"info statux\x7fs\r").unwrap();
    read_until(&mut master, "VM status: running", 1);
    // Up arrow: the same command again, from the history.
    master.write_all(b"\x1b[A\r").unwrap();
    read_until(&mut master, "VM status: running", 2);
    master.write_all(b"quit\r").unwrap();
    assert_eq!(wait_exit(&mut child, T).unwrap(), 0);
}

#[test]
fn a_pty_console_stays_the_same_terminal_across_restart_and_transfer() {
    if !have_kvm() {
        return;
    }
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = Dir::new("pty");
    let mut a = args(&dir, "memfd", 1);
    let i = a.iter().position(|s| s == "--serial").unwrap();
    a[i + 1] = "pty".into();
    let mut vm = start(&dir, &a, "vmm.log");
    let log = dir.log("vmm.log");
    let path = log
        .split("char device redirected to ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("the pty's path is printed:\n{log}"))
        .to_string();
    assert!(path.starts_with("/dev/pts/"), "{path}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the console is the owner's alone");
    let mut tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&path)
        .unwrap();
    let mut text = String::new();
    // Reads the console until it shows `n` complete lines.
    let mut lines_until = |tty: &mut std::fs::File, n: u64| {
        let t = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            let complete = vmm_reference::demo::check_serial(&text).unwrap();
            if complete >= n {
                return complete;
            }
            assert!(t.elapsed() < T, "{n} lines on the pty:\n{text}");
            match tty.read(&mut buf) {
                Ok(k) => text.push_str(&String::from_utf8_lossy(&buf[..k])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("pty: {e}"),
            }
        }
    };
    let first = lines_until(&mut tty, 1);
    let before = wait_progress(&mut vm.qmp, &vmm_reference::demo::Status::boot(1), 1).unwrap();
    let r = vm
        .qmp
        .execute("cpr-save", json!({"mode": "restart"}))
        .unwrap();
    assert_eq!(r["mode"], "restart");
    let after = wait_progress(&mut vm.qmp, &before, 1).unwrap();
    check_continuity(&before, &after).unwrap();
    // The same terminal, numbered lines without a gap or a repeat.
    let second = lines_until(&mut tty, after.lines);
    assert!(second > first);

    let mut new =
        spawn_transfer_target_with(&exe(), &dir.p("x.sock"), &[], &[], &dir.p("new.log")).unwrap();
    let uri = format!("unix:{}", dir.s("x.sock"));
    vm.qmp
        .execute("cpr-save", json!({"mode": "transfer", "uri": uri}))
        .unwrap();
    assert_eq!(wait_exit(&mut vm.child, T).unwrap(), 0);
    let later = wait_progress(&mut vm.qmp, &after, 1).unwrap();
    lines_until(&mut tty, later.lines);
    assert!(
        dir.log("new.log").contains(&path),
        "the new process kept {path}"
    );
    vm.qmp.execute("quit", json!({})).unwrap();
    assert_eq!(wait_exit(&mut new, T).unwrap(), 0);
}
