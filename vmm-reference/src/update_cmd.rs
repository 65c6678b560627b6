// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm-reference update`: one command to update a running VMM through its monitor.
//!
//! It checks the new binary first (`--cpr-state-versions`), starts the new process itself
//! for a transfer (in a private directory, in its own process group so that a terminal's
//! Ctrl-C does not reach it, inheriting `NOTIFY_SOCKET`), sends `cpr-save`, prints each
//! event as it comes (text, or JSON lines with `--json`) and the outcome. It exits 0 when
//! the guest runs (or is saved) on the other side, 1 when the update was refused or failed
//! (saying where the guest runs now, as `query-status` tells), 2 on a usage error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::UpdateArgs;
use crate::qmp_client::QmpClient;

const TIMEOUT: Duration = Duration::from_secs(120);

struct Out {
    json: bool,
}

impl Out {
    fn event(&self, e: &Value) {
        if self.json {
            println!("{}", json!({"event": e["event"], "data": e["data"]}));
            return;
        }
        let name = e["event"].as_str().unwrap_or("?");
        let data = &e["data"];
        match name {
            "STOP" => println!("update: guest paused"),
            "RESUME" => println!("update: guest runs"),
            "CPR" => match data["status"].as_str() {
                Some("started") => println!(
                    "update: {} started, state version {}",
                    data["mode"].as_str().unwrap_or("?"),
                    data["state-version"]
                ),
                Some(s) => println!("update: {s}"),
                None => {}
            },
            _ => {}
        }
    }

    fn done(&self, mode: &str, r: &Value) {
        if self.json {
            let mut v = r.clone();
            v["status"] = json!("completed");
            v["mode"] = json!(mode);
            println!("{v}");
            return;
        }
        let blackout = r["blackout-us"]
            .as_u64()
            .map_or("not measured".into(), |us| {
                format!("{}.{:03} ms", us / 1000, us % 1000)
            });
        println!("update: {mode} completed, blackout {blackout}");
        if let Some(p) = r["phases-us"].as_object() {
            let phases: Vec<String> = p.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("update: phases (us after the pause): {}", phases.join(", "));
        }
    }

    fn failed(&self, why: &str, guest: &str) -> i32 {
        if self.json {
            println!(
                "{}",
                json!({"status": "failed", "error": why, "guest": guest})
            );
        }
        eprintln!("vmm-reference update: {why}; {guest}");
        1
    }
}

/// Runs `update`; the process exit code.
pub fn run(a: &UpdateArgs) -> i32 {
    let out = Out { json: a.json };
    let mut qmp = match QmpClient::connect(&a.monitor, Duration::from_secs(10)) {
        Ok(q) => q,
        Err(e) => {
            let why = format!("cannot reach the monitor at {}: {e}", a.monitor.display());
            return out.failed(&why, "nothing was changed");
        }
    };
    let _ = qmp.set_timeout(TIMEOUT);
    // The new binary reads what the running VMM writes? Asked before anything stops (the
    // VMM asks again; this says so early and by name).
    // (A restart's binary is checked by the VMM itself, which runs only one it allows.)
    let binary = match (&a.binary, a.mode.as_str()) {
        (Some(b), "transfer") => Some(b.clone()),
        (None, "transfer") => std::env::current_exe().ok(),
        _ => None,
    };
    if let Some(b) = &binary {
        match cpr_update::probe(b, Duration::from_secs(30)) {
            Ok(info) if !a.json => {
                println!("update: {} is {} {}", b.display(), info.app, info.version)
            }
            Ok(_) => {}
            Err(e) => return out.failed(&e.to_string(), "nothing was changed"),
        }
    }
    let mut target = None;
    let args = match a.mode.as_str() {
        "restart" => match &a.binary {
            Some(b) => json!({"mode": "restart", "binary": b}),
            None => json!({"mode": "restart"}),
        },
        "reboot" => json!({"mode": "reboot", "path": a.state}),
        _ => {
            let bin = binary
                .clone()
                .unwrap_or_else(|| PathBuf::from("vmm-reference"));
            match start_target(&bin, a.new_log.as_deref()) {
                Ok((dir, child, sock)) => {
                    let uri = format!("unix:{}", sock.display());
                    target = Some((dir, child));
                    json!({"mode": "transfer", "uri": uri})
                }
                Err(e) => return out.failed(&e, "nothing was changed"),
            }
        }
    };
    let r = qmp.execute_watching("cpr-save", args, |e| out.event(e));
    match r {
        Ok(r) => {
            if a.mode == "reboot" {
                let state = a.state.as_deref().unwrap_or("?");
                if a.json {
                    out.done("reboot", &r);
                } else {
                    println!(
                        "update: state saved ({} bytes, state version {}); the VMM exits. Start \
                         the new one with its command line and `--incoming {state}` (a path in \
                         its state directory)",
                        r["bytes"], r["state-version"]
                    );
                }
            } else {
                out.done(&a.mode, &r);
            }
            // The new process runs on by itself; its directory held only the socket.
            drop(target);
            0
        }
        Err(e) => {
            if let Some((_, mut child)) = target {
                let _ = child.kill();
                let _ = child.wait();
            }
            let guest = match qmp.execute("query-status", json!({})) {
                Ok(s) => format!(
                    "the guest still runs in the old process ({})",
                    s["status"].as_str().unwrap_or("?")
                ),
                Err(_) => "the old VMM does not answer: check where the guest runs".into(),
            };
            out.failed(&format!("{} refused or failed: {e}", a.mode), &guest)
        }
    }
}

/// Starts `bin run --incoming transfer:SOCK` in a private directory; returns when it
/// listens.
fn start_target(
    bin: &Path,
    log: Option<&Path>,
) -> Result<(tempfile::TempDir, std::process::Child, PathBuf), String> {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::Builder::new()
        .prefix("cpr-update-")
        .tempdir()
        .map_err(|e| format!("private directory: {e}"))?;
    let sock = dir.path().join("transfer.sock");
    let (stdout, stderr) = match log {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            // Owner-only whatever the umask; a symbolic link there is not followed.
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let g = f.try_clone().map_err(|e| e.to_string())?;
            (Stdio::from(f), Stdio::from(g))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--incoming")
        .arg(format!("transfer:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("start {}: {e}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sock.exists() {
        let gone = child.try_wait().ok().flatten();
        if gone.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the new VMM ({}) did not start listening",
                bin.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((dir, child, sock))
}
