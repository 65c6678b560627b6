// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! QEMU's migration commands, as a QEMU 10 script drives CPR, on top of the native
//! `cpr-save` / `cpr-load`.
//!
//! | QEMU | here |
//! | --- | --- |
//! | `migrate-set-parameters {mode: cpr-exec, cpr-exec-command: [BIN, ARGS..]}`, `migrate {uri}` | restart: exec `BIN ARGS..` (an allowed binary) in place; the state goes in a memfd, the `file:` uri is not written |
//! | `mode: cpr-transfer`, `migrate {channels: [main, cpr]}` or `{uri: "unix:PATH"}` | transfer to the VMM started with `--incoming transfer:PATH` (the `cpr` channel's path, else `main`'s) |
//! | `mode: cpr-reboot`, `migrate {uri: "file:PATH"}` | reboot: the state file `PATH` (in the state directory) |
//! | `migrate-incoming {uri: "file:PATH"}` on a VMM started with `--incoming defer` | `cpr-load` |
//! | `query-migrate`, `migrate_cancel`, `query-migrate-parameters` | as QEMU |
//!
//! As in QEMU, `migrate` answers at once and the outcome comes as `MIGRATION` events
//! (`setup`, `active`, `completed` or `failed`) and in `query-migrate`; `STOP` and `RESUME`
//! surround the pause. After a completed transfer or reboot save this process stays in
//! `postmigrate`, guest-less, until `quit` (a QEMU script quits the source itself); its
//! monitor stays its own (the new process has the one on its command line). A `migrate`
//! runs to its end before the next command is read, so `migrate_cancel` always finds
//! nothing to cancel, and answers `{}` as QEMU does then.

use serde_json::{json, Map, Value};

use crate::monitor::{check_arguments, QmpError, Request};
use crate::vmm::{Outcome, RunState, Vmm};

/// QEMU's `MigMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QemuMode {
    /// A full migration: not supported.
    #[default]
    Normal,
    /// `cpr-reboot`.
    Reboot,
    /// `cpr-transfer`.
    Transfer,
    /// `cpr-exec`.
    Exec,
}

impl QemuMode {
    fn parse(s: &str) -> Option<QemuMode> {
        Some(match s {
            "normal" => QemuMode::Normal,
            "cpr-reboot" => QemuMode::Reboot,
            "cpr-transfer" => QemuMode::Transfer,
            "cpr-exec" => QemuMode::Exec,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            QemuMode::Normal => "normal",
            QemuMode::Reboot => "cpr-reboot",
            QemuMode::Transfer => "cpr-transfer",
            QemuMode::Exec => "cpr-exec",
        }
    }
}

/// What `query-migrate` reports, and the parameters set.
#[derive(Debug, Default)]
pub struct Migration {
    /// `migrate-set-parameters mode`.
    pub mode: QemuMode,
    /// `cpr-exec-command`.
    pub exec_command: Vec<String>,
    /// QEMU's `MigrationStatus` name; `None` before any migration.
    pub status: Option<&'static str>,
    /// `error-desc` of a failed migration.
    pub error: Option<String>,
    /// `total-time`, ms.
    pub total_ms: Option<u64>,
    /// `downtime`, ms.
    pub downtime_ms: Option<u64>,
    /// A `migrate` is saving: the monitor stays with this process.
    pub keep_monitor: bool,
}

fn generic(s: impl Into<String>) -> QmpError {
    QmpError::generic(s)
}

/// The path of a `{transport: socket, type: unix, path}` address.
fn unix_path(addr: &Value) -> Option<String> {
    (addr["transport"] == "socket" && addr["type"] == "unix")
        .then(|| addr["path"].as_str().map(str::to_string))
        .flatten()
}

impl Vmm {
    pub(crate) fn migrate_set_parameters(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        check_arguments(args, &["mode", "cpr-exec-command"])?;
        let mode =
            match args.get("mode") {
                None => None,
                Some(v) => Some(v.as_str().and_then(QemuMode::parse).ok_or_else(|| {
                    generic(format!("Parameter 'mode' does not accept value {v}"))
                })?),
            };
        let command = match args.get("cpr-exec-command") {
            None => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        generic("Parameter 'cpr-exec-command' expects a list of strings")
                    })?,
            ),
            Some(_) => {
                return Err(generic(
                    "Parameter 'cpr-exec-command' expects a list of strings",
                ))
            }
        };
        if let Some(m) = mode {
            self.migration.mode = m;
        }
        if let Some(c) = command {
            self.migration.exec_command = c;
        }
        Ok(json!({}))
    }

    pub(crate) fn query_migrate_parameters(&self) -> Value {
        json!({"mode": self.migration.mode.name(), "cpr-exec-command": self.migration.exec_command})
    }

    pub(crate) fn query_migrate(&self) -> Value {
        let m = &self.migration;
        let Some(status) = m.status else {
            return json!({});
        };
        let mut v = json!({ "status": status });
        if let Some(t) = m.total_ms {
            v["total-time"] = json!(t);
        }
        if let Some(d) = m.downtime_ms {
            v["downtime"] = json!(d);
        }
        if let Some(e) = &m.error {
            v["error-desc"] = json!(e);
        }
        v
    }

    fn migration_status(&mut self, status: &'static str) {
        self.migration.status = Some(status);
        self.event("MIGRATION", Some(json!({ "status": status })));
    }

    /// The new side of any update: QEMU's destination reports the migration completed.
    pub(crate) fn migration_arrived(&mut self, downtime_ms: Option<u64>, failed: Option<&str>) {
        self.migration.downtime_ms = downtime_ms;
        self.migration.total_ms = downtime_ms;
        self.migration.error = failed.map(str::to_string);
        self.migration_status(if failed.is_some() {
            "failed"
        } else {
            "completed"
        });
    }

    /// `migrate`: answered at once; the outcome follows as events.
    pub(crate) fn migrate(&mut self, req: Request) -> Option<Outcome> {
        let native = match self.migrate_arguments(&req.arguments) {
            Ok(n) => n,
            Err(e) => {
                self.reply(req.client, req.id, Err(e));
                return None;
            }
        };
        self.reply(req.client, req.id, Ok(json!({})));
        let start = cpr_update::monotonic_ns();
        self.migration.error = None;
        self.migration.downtime_ms = None;
        self.migration_status("setup");
        self.migration_status("active");
        // Exec in place keeps the connections (same process); a transfer leaves them here.
        self.migration.keep_monitor = self.migration.mode == QemuMode::Transfer;
        let inner = Request {
            client: 0,
            id: None,
            command: "cpr-save".into(),
            arguments: native,
        };
        let r = self.cpr_save_inner(&inner);
        self.migration.keep_monitor = false;
        self.migration.total_ms = Some((cpr_update::monotonic_ns() - start) / 1_000_000);
        match r {
            Err(e) => {
                self.migration.error = Some(e.desc);
                self.migration_status("failed");
                None
            }
            Ok(Some(Outcome::Transferred | Outcome::SavedForReboot)) => {
                self.migration.downtime_ms = self.migration.total_ms;
                self.migration_status("completed");
                // QEMU's source waits, guest-less, for `quit`.
                if let Some(mut m) = self.machine.take() {
                    m.shutdown();
                    std::thread::spawn(move || drop(m));
                }
                self.remove_on_quit.clear();
                self.state = RunState::Postmigrate;
                None
            }
            Ok(other) => other,
        }
    }

    /// `migrate`'s arguments as `cpr-save`'s, for the mode set.
    fn migrate_arguments(&self, args: &Map<String, Value>) -> Result<Map<String, Value>, QmpError> {
        check_arguments(args, &["uri", "channels", "detach", "resume"])?;
        if args.get("resume").is_some_and(|v| v != &json!(false)) {
            return Err(generic("a postcopy resume is not supported"));
        }
        let uri = args.get("uri").and_then(Value::as_str);
        let channels = args.get("channels").and_then(Value::as_array);
        if uri.is_some() == channels.is_some() {
            return Err(generic("need either 'uri' or 'channels' argument"));
        }
        let mut out = Map::new();
        match self.migration.mode {
            QemuMode::Normal => {
                return Err(generic(
                    "this VMM does only CPR migrations: set mode cpr-exec, cpr-transfer or \
                     cpr-reboot with migrate-set-parameters",
                ))
            }
            QemuMode::Reboot => {
                let path = uri
                    .and_then(|u| u.strip_prefix("file:"))
                    .map(|p| p.split(",offset=").next().unwrap_or(p))
                    .ok_or_else(|| generic("cpr-reboot needs uri file:PATH"))?;
                out.insert("mode".into(), json!("reboot"));
                out.insert("path".into(), json!(path));
            }
            QemuMode::Transfer => {
                let path = match (uri, channels) {
                    (Some(u), _) => u.strip_prefix("unix:").map(str::to_string),
                    (None, Some(ch)) => {
                        let find = |t: &str| {
                            ch.iter()
                                .find(|c| c["channel-type"] == t)
                                .and_then(|c| unix_path(&c["addr"]))
                        };
                        find("cpr").or_else(|| find("main"))
                    }
                    (None, None) => None,
                }
                .ok_or_else(|| {
                    generic("cpr-transfer needs a unix socket: uri unix:PATH, or channels")
                })?;
                out.insert("mode".into(), json!("transfer"));
                out.insert("uri".into(), json!(format!("unix:{path}")));
            }
            QemuMode::Exec => {
                if !uri.is_some_and(|u| u.starts_with("file:")) {
                    return Err(generic("cpr-exec needs uri file:PATH"));
                }
                let (bin, rest) = self.migration.exec_command.split_first().ok_or_else(|| {
                    generic("cpr-exec needs cpr-exec-command (migrate-set-parameters)")
                })?;
                out.insert("mode".into(), json!("restart"));
                out.insert("binary".into(), json!(bin));
                out.insert("args".into(), json!(rest));
            }
        }
        Ok(out)
    }

    /// `migrate-incoming {uri: "file:PATH"}`: `cpr-load PATH`.
    pub(crate) fn migrate_incoming(
        &mut self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        check_arguments(args, &["uri", "channels", "exit-on-error"])?;
        let Some(path) = args
            .get("uri")
            .and_then(Value::as_str)
            .and_then(|u| u.strip_prefix("file:"))
        else {
            return Err(generic(
                "migrate-incoming takes uri file:PATH here; for cpr-transfer start the VMM with \
                 --incoming transfer:SOCKET",
            ));
        };
        let mut a = Map::new();
        a.insert("path".into(), json!(path));
        self.cpr_load(&a)
    }
}
