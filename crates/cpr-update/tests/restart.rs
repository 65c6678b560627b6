// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The restart sequence for real: this test binary (no libtest harness, so that it can
//! answer `--cpr-state-versions` as a VMM does) runs each case in a child process, which
//! restarts into itself with `execve`.
//!
//! Cases: a successful restart; a new image whose restore fails (it execs back into the
//! previous binary, which resumes the guest); the same through the fault hook; a target
//! that reads no version this build writes (refused before the pause).

mod common;

use std::process::Command;

use common::Toy;
use cpr_update::{
    resume_after_exec, update, BuildInfo, Ids, Incoming, Target, STATE_VERSIONS_FLAG,
};

const CASE: &str = "CPR_UPDATE_TEST_CASE";

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some(STATE_VERSIONS_FLAG) {
        let mut b = Toy::new(false).build_info_for_test();
        if let Ok(v) = std::env::var("TOY_PROBE_READS") {
            let v: u16 = v.parse().unwrap();
            b.reads = v..=v;
        }
        println!("{}", b.to_json());
        return;
    }
    match std::env::var(CASE) {
        Ok(case) => child(&case),
        Err(_) => parent(),
    }
}

trait BuildForTest {
    fn build_info_for_test(&self) -> BuildInfo;
}

impl BuildForTest for Toy {
    fn build_info_for_test(&self) -> BuildInfo {
        cpr_update::Updatable::build_info(self)
    }
}

/// Runs `case` in a child; returns its stdout after checking it succeeded.
fn run(case: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(CASE, case).env_remove(cpr_fd::MANIFEST_ENV);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "case {case} failed:\n{text}\n{err}");
    text
}

fn parent() {
    let ok = run("restart", &[]);
    assert!(
        ok.contains("RESUMED value=9 gen=1 fallback=none ram=guest data"),
        "{ok}"
    );
    assert!(ok.contains("pid-kept"), "{ok}");
    // The exec did not tear the old address space down: a child held it, until the guest
    // ran here.
    assert!(
        ok.contains("holder-alive") && ok.contains("holder-reaped"),
        "{ok}"
    );
    assert!(ok.contains("no-children"), "{ok}");

    let back = run("restart", &[("TOY_FAIL_RESTORE", "1")]);
    assert!(
        back.contains(
            "RESUMED value=9 gen=1 fallback=restoring the device state: the toy's restore failed"
        ),
        "the previous binary resumed the guest and says why: {back}"
    );
    // The failing image let the holder go before going back; nothing is left over.
    assert!(back.contains("holder-alive"), "{back}");
    assert!(back.contains("no-children"), "{back}");

    let fault = run(
        "restart",
        &[("CPR_UPDATE_FAULT", "restart.new.restore:fail")],
    );
    assert!(
        fault.contains("fallback=injected fault at restart.new.restore"),
        "{fault}"
    );

    let refused = run("restart", &[("TOY_PROBE_READS", "9")]);
    assert!(
        refused.contains("REFUSED guest=Running pauses=0"),
        "{refused}"
    );
    assert!(refused.contains("reads state versions 9..=9"), "{refused}");
    println!("restart: 4 cases passed");
}

fn child(case: &str) {
    assert_eq!(case, "restart");
    match cpr_fd::reclaim().unwrap() {
        None => first_image(),
        Some(fds) => next_image(fds),
    }
}

fn first_image() {
    let mut toy = Toy::new(true).with_ram(b"guest data").with_device();
    toy.value = 9;
    std::env::set_var("TOY_PID", std::process::id().to_string());
    let target = Target::Restart {
        program: std::env::current_exe().unwrap(),
        args: vec![],
    };
    let f = update(
        &mut toy,
        &Ids::new_vm().unwrap(),
        target,
        &Default::default(),
    )
    .unwrap_err();
    // Still here: refused or failed.
    println!("REFUSED guest={:?} pauses={} {f}", f.guest, toy.pauses);
}

fn next_image(fds: cpr_fd::FdRegistry) {
    let mut toy = Toy::new(false);
    // Fail once: the previous binary, exec'd back into, inherits no such variable.
    if std::env::var_os("TOY_FAIL_RESTORE").is_some() {
        std::env::remove_var("TOY_FAIL_RESTORE");
        toy.fail = Some("restore");
    }
    // The previous image's address space, still held by a child of this process.
    let holder = fds.get(cpr_update::handover::FD_OLD_MM).map(|e| {
        let pid = i32::from_le_bytes(e.metadata().try_into().unwrap());
        assert_eq!(parent_of(pid), Some(std::process::id() as i32), "our child");
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let ours = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert_ne!(theirs, ours, "it holds the old address space, not this one");
        println!("holder-alive");
        pid
    });
    let r = resume_after_exec(&mut toy, fds, &Incoming::default()).unwrap();
    if let Some(pid) = holder {
        // Released once the guest runs, then reaped: no zombie is left.
        wait_until("the holder to be reaped", || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
        println!("holder-reaped");
    }
    // Whichever image resumed, it has no child left behind.
    wait_until("no child process", || children().is_empty());
    println!("no-children");
    if std::env::var("TOY_PID").unwrap() == std::process::id().to_string() {
        println!("pid-kept");
    }
    println!(
        "RESUMED value={} gen={} fallback={} ram={}",
        toy.value,
        r.ids.generation,
        r.fallback.as_deref().unwrap_or("none"),
        String::from_utf8_lossy(&toy.ram_bytes(10)),
    );
    assert!(toy.running && toy.committed);
    assert_eq!(common::eventfd_count(toy.device.as_ref().unwrap()), 3);
}

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The field after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// This process's children, alive or not yet reaped.
fn children() -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| parent_of(pid) == Some(me))
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 60 s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
