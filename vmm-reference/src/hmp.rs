// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `vmm-reference monitor SOCKET`: a human monitor. Typed lines become QMP commands on the
//! VMM's monitor socket, with the seed design's names:
//!
//! | typed | QMP |
//! | --- | --- |
//! | `info status` | `query-status` |
//! | `cprinfo` | `cpr-info` |
//! | `cprsave FILE reboot` | `cpr-save {mode: reboot, path: FILE}` |
//! | `cprsave FILE restart` | `cpr-save {mode: restart}` (the state goes in a memfd; FILE is not written) |
//! | `cprsave SOCKET transfer` | `cpr-save {mode: transfer, uri: unix:SOCKET}` |
//! | `cprload FILE` | `cpr-load {path: FILE}` |
//! | `stop`, `cont`, `quit` | the same |
//!
//! On a terminal, lines are edited and kept in a history (rustyline); otherwise they are
//! read from standard input one by one, so a script can pipe commands in. Events the VMM
//! sends are shown as they come, before the next prompt.

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::qmp_client::{ClientError, QmpClient};

/// What a typed line asks for.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A QMP command and its arguments.
    Qmp(&'static str, Value),
    /// `help`.
    Help,
    /// Nothing to do (an empty line).
    Empty,
}

const HELP: &str = "commands: info status | cprinfo | cprsave FILE reboot|restart | \
cprsave SOCKET transfer | cprload FILE | stop | cont | quit | help";

/// Parses one typed line.
pub fn parse(line: &str) -> Result<Line, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    Ok(match words.as_slice() {
        [] => Line::Empty,
        ["help" | "?"] => Line::Help,
        ["info", "status"] => Line::Qmp("query-status", json!({})),
        ["info", what] => return Err(format!("info {what}: only `info status` is known")),
        ["cprinfo"] => Line::Qmp("cpr-info", json!({})),
        ["cprsave", file, "reboot"] => {
            Line::Qmp("cpr-save", json!({"mode": "reboot", "path": file}))
        }
        ["cprsave", _, "restart"] => Line::Qmp("cpr-save", json!({"mode": "restart"})),
        ["cprsave", sock, "transfer"] => Line::Qmp(
            "cpr-save",
            json!({"mode": "transfer", "uri": format!("unix:{sock}")}),
        ),
        ["cprsave", ..] => {
            return Err("usage: cprsave FILE reboot|restart, cprsave SOCKET transfer".into())
        }
        ["cprload", file] => Line::Qmp("cpr-load", json!({ "path": file })),
        ["stop"] => Line::Qmp("stop", json!({})),
        ["cont" | "c"] => Line::Qmp("cont", json!({})),
        ["quit" | "q"] => Line::Qmp("quit", json!({})),
        [cmd, ..] => return Err(format!("unknown command: '{cmd}' ({HELP})")),
    })
}

/// How an answer reads.
fn show(command: &str, r: &Value) -> String {
    match command {
        "query-status" => format!("VM status: {}", r["status"].as_str().unwrap_or("?")),
        "cpr-save" if r["blackout-us"].is_u64() => {
            let us = r["blackout-us"].as_u64().unwrap_or(0);
            format!(
                "{} done: blackout {}.{:03} ms",
                r["mode"].as_str().unwrap_or("update"),
                us / 1000,
                us % 1000
            )
        }
        _ if r == &json!({}) => String::new(),
        _ => serde_json::to_string_pretty(r).unwrap_or_default(),
    }
}

fn show_event(e: &Value) {
    let name = e["event"].as_str().unwrap_or("?");
    match e.get("data") {
        Some(d) => println!("[event {name}] {d}"),
        None => println!("[event {name}]"),
    }
}

/// Runs the monitor on `socket`; the process exit code.
pub fn run(socket: &Path) -> i32 {
    let mut qmp = match QmpClient::connect(socket, Duration::from_secs(10)) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("vmm-reference monitor: {}: {e}", socket.display());
            return 1;
        }
    };
    let _ = qmp.set_timeout(Duration::from_secs(300));
    let interactive = rustyline::DefaultEditor::new()
        .ok()
        .filter(|_| std::io::IsTerminal::is_terminal(&std::io::stdin()));
    let mut editor = interactive;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        let line = match editor.as_mut() {
            Some(ed) => match ed.readline("(cpr) ") {
                Ok(l) => {
                    let _ = ed.add_history_entry(l.as_str());
                    l
                }
                Err(_) => return 0, // Ctrl-D, Ctrl-C
            },
            None => match lines.next() {
                Some(Ok(l)) => l,
                _ => return 0,
            },
        };
        let (command, args) = match parse(&line) {
            Ok(Line::Qmp(c, a)) => (c, a),
            Ok(Line::Help) => {
                println!("{HELP}");
                continue;
            }
            Ok(Line::Empty) => continue,
            Err(e) => {
                println!("Error: {e}");
                continue;
            }
        };
        match qmp.execute_watching(command, args, show_event) {
            Ok(r) => {
                let text = show(command, &r);
                if !text.is_empty() {
                    println!("{text}");
                }
                if command == "quit" {
                    return 0;
                }
            }
            Err(ClientError::Qmp { desc, .. }) => println!("Error: {desc}"),
            Err(e) => {
                // A reboot save ends the VMM; so does quit.
                println!("the monitor connection ended: {e}");
                return if command == "cpr-save" { 0 } else { 1 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines_become_qmp() {
        assert_eq!(
            parse("info status").unwrap(),
            Line::Qmp("query-status", json!({}))
        );
        assert_eq!(
            parse("  cprsave /tmp/vm.state reboot ").unwrap(),
            Line::Qmp(
                "cpr-save",
                json!({"mode": "reboot", "path": "/tmp/vm.state"})
            )
        );
        assert_eq!(
            parse("cprsave /run/x.sock transfer").unwrap(),
            Line::Qmp(
                "cpr-save",
                json!({"mode": "transfer", "uri": "unix:/run/x.sock"})
            )
        );
        assert_eq!(
            parse("cprsave f restart").unwrap(),
            Line::Qmp("cpr-save", json!({"mode": "restart"}))
        );
        assert_eq!(
            parse("cprload vm.state").unwrap(),
            Line::Qmp("cpr-load", json!({"path": "vm.state"}))
        );
        assert_eq!(parse("").unwrap(), Line::Empty);
        assert!(parse("cprsave f sideways").is_err());
        assert!(parse("info cpus").is_err());
        assert!(parse("reboot-host now")
            .unwrap_err()
            .contains("unknown command"));
    }
}
