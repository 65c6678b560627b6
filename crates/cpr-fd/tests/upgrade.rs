// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Exec across a package upgrade: the binary a process was started from is replaced by a
//! rename (as dpkg, rpm and `install` do) while it runs.
//!
//! Each test copies this test binary twice into a temporary directory (`vmm`, the installed
//! one, and `vmm.new`, the upgrade), runs the installed copy as a child, and the child
//! renames the upgrade over itself before it execs.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cpr_fd::{reclaim, startup_executable, FdRegistry, MANIFEST_ENV};

const STAGE: &str = "CPR_FD_UPGRADE_STAGE";

fn test_args(test: &str) -> Vec<OsString> {
    ["--exact", test, "--nocapture", "--test-threads=1"]
        .iter()
        .map(OsString::from)
        .collect()
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// A directory with two copies of this test binary; removed on drop.
struct Install(PathBuf);

impl Install {
    fn new(tag: &str) -> Install {
        let d = std::env::temp_dir().join(format!("cpr-fd-upgrade-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        let me = std::env::current_exe().unwrap();
        std::fs::copy(&me, d.join("vmm")).unwrap();
        std::fs::copy(&me, d.join("vmm.new")).unwrap();
        Install(d)
    }
    fn run(&self, test: &str, env: &[(&str, String)]) -> String {
        let mut cmd = Command::new(self.0.join("vmm"));
        cmd.args(test_args(test))
            .env(STAGE, "upgrade")
            .env("CPR_FD_UPGRADE_DIR", &self.0)
            .env_remove(MANIFEST_ENV);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        text
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn var(k: &str) -> String {
    std::env::var(k).unwrap()
}

/// Replaces the installed binary by the upgrade, by rename.
fn upgrade() {
    let d = PathBuf::from(var("CPR_FD_UPGRADE_DIR"));
    std::fs::rename(d.join("vmm.new"), d.join("vmm")).unwrap();
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    assert!(
        exe.to_string_lossy().ends_with(" (deleted)"),
        "/proc/self/exe now names the replaced file: {}",
        exe.display()
    );
}

#[test]
fn exec_self_starts_the_upgrade_installed_by_rename() {
    const NAME: &str = "exec_self_starts_the_upgrade_installed_by_rename";
    match std::env::var(STAGE).ok().as_deref() {
        None => {
            let install = Install::new("self");
            let upgrade_ino = ino(&install.0.join("vmm.new"));
            let out = install.run(NAME, &[("CPR_FD_EXPECT_INO", upgrade_ino.to_string())]);
            assert!(out.contains("RAN THE UPGRADE"), "{out}");
        }
        Some("upgrade") => {
            let started = startup_executable().unwrap();
            assert_eq!(
                started,
                PathBuf::from(var("CPR_FD_UPGRADE_DIR")).join("vmm")
            );
            upgrade();
            std::env::set_var(STAGE, "after");
            let mut reg = FdRegistry::new();
            let err = reg.prepare().unwrap().exec_self(&test_args(NAME));
            panic!("exec_self failed: {err}");
        }
        Some("after") => {
            assert!(reclaim().unwrap().is_some());
            let now = std::fs::metadata("/proc/self/exe").unwrap().ino();
            assert_eq!(now.to_string(), var("CPR_FD_EXPECT_INO"));
            println!("RAN THE UPGRADE");
        }
        Some(other) => panic!("stage {other}"),
    }
}

#[test]
fn exec_fd_goes_back_to_the_replaced_binary() {
    const NAME: &str = "exec_fd_goes_back_to_the_replaced_binary";
    match std::env::var(STAGE).ok().as_deref() {
        None => {
            let install = Install::new("fd");
            let old_ino = ino(&install.0.join("vmm"));
            let out = install.run(NAME, &[("CPR_FD_EXPECT_INO", old_ino.to_string())]);
            assert!(out.contains("RAN THE REPLACED BINARY"), "{out}");
        }
        Some("upgrade") => {
            // Kept before the upgrade: the running binary, whatever its path names later.
            let me = std::fs::File::open("/proc/self/exe").unwrap();
            upgrade();
            std::env::set_var(STAGE, "after");
            let mut reg = FdRegistry::new();
            let err = reg.prepare().unwrap().exec_fd(
                me.as_fd(),
                std::ffi::OsStr::new("vmm"),
                &test_args(NAME),
            );
            panic!("exec_fd failed: {err}");
        }
        Some("after") => {
            assert!(reclaim().unwrap().is_some());
            let now = std::fs::metadata("/proc/self/exe").unwrap().ino();
            assert_eq!(now.to_string(), var("CPR_FD_EXPECT_INO"));
            println!("RAN THE REPLACED BINARY");
        }
        Some(other) => panic!("stage {other}"),
    }
}
