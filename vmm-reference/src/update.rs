// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! This VMM's part of a live update: its sections and schema, the cpr-update hooks
//! ([`Pausable`] and [`Updatable`] for [`Vmm`]), `cpr-save`, and what the new side does
//! once the guest is its own. The sequence itself (order, undo, protocol, timing) is
//! cpr-update's.
//!
//! A restore trusts nothing the state says about the host: guest memory paths come from this
//! process's command line (or the fds handed over), and the saved memory map, memory size,
//! vCPU count and backend must be what the command line gives, each difference named; the
//! memory must carry the stamp of this very state; the vCPU sections must be exactly one per
//! vCPU.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr_fd::FdKind;
use cpr_kvm::{ClockPolicy, VcpuState, VmState};
use cpr_memory::{BackendKind, GuestRam, MemoryLayout, MemoryOptions, Stamp, StampState};
use cpr_snapshot::prelude::*;
use cpr_snapshot::{Schema, Snapshot};
use cpr_update::{
    BoxError, BuildInfo, Failure, Guest, Loader, Mode, Outcome as UpdateOutcome, Pausable,
    Progress, Resumed, Saver, Target, Timeouts, Updatable,
};
use serde_json::{json, Map, Value};

use crate::config::{GuestClock, MemoryConfig};
use crate::error::{Error, Result};
use crate::machine::Machine;
use crate::monitor::{check_arguments, Monitor, MonitorSection, QmpError, Request};
use crate::passthrough::Passthrough;
use crate::serial::{SerialArgs, SerialConfig, SerialDevice, SerialSection};
use crate::vmm::{Outcome, RunState, Vmm, HOLD_TIMEOUT, PAUSE_TIMEOUT};
use cpr_snapshot::Persist;

/// Name of the previous image's VM fd, closed by the new image once the guest runs.
const RETIRED_VM: &str = "kvm.retired-vm";
/// Name of the disk image's fd.
const DISK_FD: &str = "disk.image";
/// Name of the network device's tap fd.
const NET_FD: &str = "net.tap";

/// A device's backend fd: handed over as `name` (restart, transfer: `carries`), or opened
/// from the new command line by `open` (reboot).
fn backend(
    input: &mut Loader<'_, '_>,
    carries: bool,
    name: &str,
    open: impl FnOnce() -> std::result::Result<std::fs::File, BoxError>,
) -> std::result::Result<std::fs::File, BoxError> {
    if !carries {
        return open();
    }
    let fd = input.fds().take(name);
    Ok(std::fs::File::from(fd.ok_or_else(|| {
        format!("the fd `{name}` was not handed over")
    })?))
}

/// This application's name in states and hellos.
pub const APP: &str = "vmm-reference";

/// This build's version: the package's, marked for the `next` variant.
pub const VERSION: &str = if cfg!(feature = "next") {
    concat!(env!("CARGO_PKG_VERSION"), "+next")
} else {
    env!("CARGO_PKG_VERSION")
};

/// VMM configuration a restored VM keeps. Section `vmm-config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct VmmConfigSection {
    /// vCPU count.
    pub vcpus: u32,
    /// `demo` or `linux`.
    pub guest: String,
    /// Serial backend, as on the command line.
    pub serial: String,
    /// Memory backend, as on the command line (version 2).
    #[state(since = 2, default = "default_string")]
    pub memory: String,
    /// Guest RAM size (version 2).
    #[state(since = 2, default = "default_u64")]
    pub memory_size: u64,
    /// Huge page size of a memfd backend, 0 for none (version 2).
    #[state(since = 2, default = "default_u64")]
    pub huge_pages: u64,
}

impl VmmConfigSection {
    fn default_string(_: u16) -> String {
        String::new()
    }
    fn default_u64(_: u16) -> u64 {
        0
    }
}

impl Section for VmmConfigSection {
    const NAME: &'static str = "vmm-config";
}

/// The monitor client waiting for the answer to the command that started the update.
/// Section `qmp-reply`.
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct ReplySection {
    /// The client.
    pub client: u64,
    /// Its command id, as JSON text (empty if none).
    pub id: String,
}

impl Section for ReplySection {
    const NAME: &'static str = "qmp-reply";
}

/// What a `next` build adds: statistics an older build can do without. Section
/// `vmm-stats`, skippable, from state version 3.
#[cfg(feature = "next")]
#[derive(Clone, Debug, Default, PartialEq, Eq, State)]
pub struct StatsSection {
    /// Updates this guest went through in `next` builds.
    pub updates: u64,
}

#[cfg(feature = "next")]
impl Section for StatsSection {
    const NAME: &'static str = "vmm-stats";
    const SKIPPABLE: bool = true;
}

/// The state schema.
///
/// - state version 1: written by 0.1.0; no longer read (its update section is gone).
/// - state version 2: this release: `cpr-update` and `qmp-reply` replace `cpr`;
///   `vmm-config` 2 (memory backend and size), `memory-layout` 2 (stamp), `monitor` 2
///   (carried output).
/// - state version 3 (the `next` build only): `serial` 2 (a counter of lines the guest
///   printed) and the skippable `vmm-stats` section.
pub fn schema() -> Schema {
    let b = Schema::builder()
        .section::<VmmConfigSection>()
        .types(cpr_memory::section_types())
        .types(cpr_kvm::section_types())
        .section::<SerialSection>()
        .types(cpr_vfio::section_types())
        .section::<crate::passthrough::ModelSection>()
        .section::<MonitorSection>()
        .nested::<crate::monitor::CarriedInput>()
        .nested::<crate::monitor::CarriedOutput>()
        .next_version()
        .oldest_version(2)
        .type_version::<VmmConfigSection>(2)
        .type_version::<MemoryLayout>(2)
        .type_version::<MonitorSection>(2)
        .types(cpr_update::section_types())
        .section::<ReplySection>()
        .section::<crate::virtio_blk::BlkSection>()
        .nested::<crate::virtio_blk::QueueSection>()
        .section::<crate::virtio_net::NetSection>();
    #[cfg(feature = "next")]
    let b = b
        .next_version()
        .type_version::<SerialSection>(2)
        .section::<StatsSection>();
    b.build().expect("static schema is valid")
}

/// This build as an update sees it.
pub fn build_info(schema: &Schema) -> BuildInfo {
    BuildInfo::new(APP, VERSION, schema)
        .with_feature("fallback")
        .with_feature("take-over")
}

/// Reads a state file named on the command line, capped at the schema's limit.
pub fn read_state_file(path: &Path, schema: &Schema) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Io(format!("open state file `{}`: {e}", path.display())))?;
    cpr_update::read_state(std::io::BufReader::new(file), schema.limits().max_total)
        .map_err(|e| Error::Io(format!("state file `{}`: {e}", path.display())))
}

fn memory_mode(mode: Mode) -> cpr_memory::UpdateMode {
    match mode {
        Mode::Restart => cpr_memory::UpdateMode::Restart,
        Mode::Transfer => cpr_memory::UpdateMode::Transfer,
        Mode::Reboot => cpr_memory::UpdateMode::Reboot,
    }
}

fn q(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn serial_string(cfg: &SerialConfig) -> String {
    match cfg {
        SerialConfig::Stdout => "stdout".into(),
        SerialConfig::Null => "null".into(),
        SerialConfig::File(p) => format!("file:{}", p.display()),
        SerialConfig::Unix(p) => format!("unix:{}", p.display()),
        SerialConfig::Pty => "pty".into(),
    }
}

/// What the command line and a state agree a restored machine is.
#[derive(Debug)]
pub struct Plan {
    /// The memory backend (the command line's).
    pub backend: MemoryConfig,
    /// Guest RAM size.
    pub size: u64,
    /// Huge pages of a memfd backend.
    pub huge: Option<cpr_memory::HugePageSize>,
    /// vCPUs.
    pub vcpus: usize,
}

/// Checks a state's configuration and memory layout against the command line before
/// anything is opened: the memory backend, its size, the vCPU count, and the exact memory
/// map the command line gives, with a stamp. Every difference is named; the command line may
/// leave size and vCPUs out (then the saved ones apply).
pub fn plan(
    cfg: &crate::config::RunConfig,
    saved: &VmmConfigSection,
    layout: &MemoryLayout,
    mode: Mode,
) -> std::result::Result<Plan, String> {
    let mut diffs = Vec::new();
    // A state cannot choose a host file: the backend is the command line's. (Memory carried
    // by fd needs no path; the default memfd backend stands for it.)
    let backend = cfg.memory.clone();
    if saved.memory != backend.to_string() {
        diffs.push(format!(
            "memory backend: `{}` in the state, `--memory {backend}` on the command line{}",
            saved.memory,
            if mode == Mode::Transfer {
                " (start the new VMM with the same --memory)"
            } else {
                ""
            }
        ));
    }
    let size = cfg.memory_size.unwrap_or(saved.memory_size);
    if cfg.memory_size.is_some_and(|s| s != saved.memory_size) {
        diffs.push(format!(
            "memory size: {} in the state, --memory-size {size} on the command line",
            saved.memory_size
        ));
    }
    let vcpus = cfg.vcpus.unwrap_or(saved.vcpus as usize);
    if cfg.vcpus.is_some_and(|v| v != saved.vcpus as usize) {
        diffs.push(format!(
            "vCPUs: {} in the state, --vcpus {vcpus} on the command line",
            saved.vcpus
        ));
    }
    let huge = match (cfg.huge_pages, saved.huge_pages) {
        (Some(h), s) if h.0.bytes() != s && mode == Mode::Reboot => {
            diffs.push(format!(
                "huge pages: {s} in the state, {} on the command line",
                h.0.bytes()
            ));
            Some(h.0)
        }
        (Some(h), _) => Some(h.0),
        (None, 0) => None,
        (None, s) if s == 1 << 30 => Some(cpr_memory::HugePageSize::Size1G),
        (None, s) if s == 2 << 20 => Some(cpr_memory::HugePageSize::Size2M),
        (None, s) => {
            diffs.push(format!("huge pages of {s} bytes"));
            None
        }
    };
    if vcpus == 0 || vcpus > crate::machine::MAX_VCPUS {
        diffs.push(format!(
            "{vcpus} vCPUs (1 to {})",
            crate::machine::MAX_VCPUS
        ));
    }
    if let Err(e) = crate::memory::check_size(size, huge) {
        diffs.push(e);
    }
    if !diffs.is_empty() {
        return Err(format!(
            "the state does not match this command line: {}",
            diffs.join("; ")
        ));
    }
    let expected = crate::memory::specs(&backend, size, huge);
    let diffs = crate::memory::differences(layout, &expected);
    if !diffs.is_empty() {
        return Err(format!(
            "the state's memory map is not the one this command line gives: {}",
            diffs.join("; ")
        ));
    }
    if !layout.has_stamp() {
        return Err(
            "the state's memory layout has no stamp, so its memory cannot be verified".into(),
        );
    }
    Ok(Plan {
        backend,
        size,
        huge,
        vcpus,
    })
}

/// The vCPU sections must be exactly one per vCPU, instances 0 to n-1.
pub fn check_vcpu_sections(instances: &[u32], vcpus: usize) -> std::result::Result<(), String> {
    if instances.len() != vcpus || instances.iter().enumerate().any(|(i, &n)| n != i as u32) {
        return Err(format!(
            "the state has vCPU sections {instances:?} for {vcpus} vCPUs"
        ));
    }
    Ok(())
}

/// Decodes and checks a reboot state against `cfg` as the restore does, up to the point where
/// it would open memory and create the VM (for the `restore_state` fuzz target).
pub fn check_state(
    bytes: &[u8],
    cfg: &crate::config::RunConfig,
) -> std::result::Result<Plan, String> {
    let schema = schema();
    let e = |e: cpr_snapshot::Error| e.to_string();
    let mut snap = Snapshot::read_from(bytes, &schema).map_err(e)?;
    let update: cpr_update::UpdateSection = snap.take(0).map_err(e)?;
    update.info(Mode::Reboot).map_err(|e| e.to_string())?;
    let saved: VmmConfigSection = snap.take(0).map_err(e)?;
    let layout: MemoryLayout = snap.take(0).map_err(e)?;
    let plan = plan(cfg, &saved, &layout, Mode::Reboot)?;
    let vm: VmState = snap.take(0).map_err(e)?;
    vm.validate().map_err(|e| e.to_string())?;
    let instances = snap.instances::<VcpuState>();
    check_vcpu_sections(&instances, plan.vcpus)?;
    for i in instances {
        snap.take::<VcpuState>(i)
            .map_err(e)?
            .validate()
            .map_err(|e| e.to_string())?;
    }
    let serial: SerialSection = snap.take(0).map_err(e)?;
    crate::serial::check_state(&serial).map_err(|e| e.to_string())?;
    Ok(plan)
}

impl Vmm {
    pub(crate) fn memory_warnings(&self, mode: Mode) -> Vec<String> {
        self.machine
            .as_ref()
            .and_then(|m| m.ram.check_mode(memory_mode(mode)).ok())
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn config_section(&self, m: &Machine) -> VmmConfigSection {
        let layout = m.ram.layout();
        VmmConfigSection {
            vcpus: m.vcpu_count() as u32,
            guest: self.guest.clone(),
            serial: serial_string(&self.config.serial),
            memory: self.config.memory.to_string(),
            memory_size: layout.total_size(),
            huge_pages: match layout.regions.first() {
                Some(r) if r.kind == BackendKind::Memfd && r.page_size > 4096 => r.page_size,
                _ => 0,
            },
        }
    }

    /// `cpr-save`: parses the request, runs the update, answers (or leaves the answer to
    /// the next image).
    pub(crate) fn cpr_save(&mut self, req: Request) -> Option<Outcome> {
        match self.cpr_save_inner(&req) {
            Ok(outcome) => outcome,
            Err(e) => {
                self.reply(req.client, req.id, Err(e));
                None
            }
        }
    }

    pub(crate) fn cpr_save_inner(
        &mut self,
        req: &Request,
    ) -> std::result::Result<Option<Outcome>, QmpError> {
        let args = &req.arguments;
        check_arguments(args, &["mode", "path", "binary", "args", "uri", "version"])?;
        let mode: Mode = match args.get("mode") {
            Some(Value::String(s)) => s.parse().map_err(q)?,
            Some(_) => return Err(q("Parameter 'mode' expects a string")),
            None => return Err(q("Parameter 'mode' is missing")),
        };
        let string = |k: &str| match args.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(q(format!("Parameter '{k}' expects a non-empty string"))),
        };
        let only = |allowed: &[&str]| {
            for k in args.keys() {
                if k != "mode" && !allowed.contains(&k.as_str()) {
                    return Err(q(format!("Parameter '{k}' is not for mode {mode}")));
                }
            }
            Ok(())
        };
        self.machine()?;
        let target = match mode {
            Mode::Restart => {
                only(&["binary", "args"])?;
                let program = self
                    .policy
                    .update_binary(string("binary")?.as_deref().map(Path::new))
                    .map_err(q)?;
                let argv = match args.get("args") {
                    None => std::env::args_os().skip(1).collect(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| v.as_str().map(std::ffi::OsString::from))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| q("Parameter 'args' expects a list of strings"))?,
                    Some(_) => return Err(q("Parameter 'args' expects a list of strings")),
                };
                Target::Restart {
                    program,
                    args: argv,
                }
            }
            Mode::Transfer => {
                only(&["uri"])?;
                let uri = string("uri")?
                    .ok_or_else(|| q("Parameter 'uri' is missing (unix:SOCKET of the new VMM)"))?;
                let path = uri
                    .strip_prefix("unix:")
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| q(format!("uri `{uri}`: only unix:PATH is supported")))?;
                let stream = std::os::unix::net::UnixStream::connect(path)
                    .map_err(|e| q(format!("connect to the new VMM at {path}: {e}")))?;
                Target::Transfer(stream)
            }
            Mode::Reboot => {
                only(&["path", "version"])?;
                let path = string("path")?
                    .ok_or_else(|| q("Parameter 'path' is missing (the state file)"))?;
                let version = match args.get("version") {
                    None => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|v| u16::try_from(v).ok())
                            .ok_or_else(|| q("Parameter 'version' expects a state version"))?,
                    ),
                };
                // Check the mode first: a memfd guest cannot reboot, whatever the path.
                cpr_update::Updatable::check(self, mode).map_err(q)?;
                let (dir, name) = self.policy.state_file(&path).map_err(q)?;
                self.check_replaceable(dir, &name).map_err(q)?;
                let dir = dir
                    .dir
                    .try_clone()
                    .map_err(|e| q(format!("state directory: {e}")))?;
                Target::Reboot { dir, name, version }
            }
        };
        self.waiting = Some(ReplySection {
            client: req.client,
            id: req.id.as_ref().map(Value::to_string).unwrap_or_default(),
        });
        let ids = self.ids;
        self.updating = Some(mode);
        let result = cpr_update::update(self, &ids, target, &Timeouts::default());
        self.updating = None;
        self.waiting = None;
        match result {
            Ok(UpdateOutcome::Transferred { started }) => {
                crate::notify::send("STATUS=the guest runs in the new VMM process; exiting");
                log::info!(
                    "cpr transfer: the new VMM owns the guest{}; exiting",
                    if started {
                        " and runs it"
                    } else {
                        " (it did not confirm it runs)"
                    }
                );
                Ok(Some(Outcome::Transferred))
            }
            Ok(UpdateOutcome::Saved { bytes, version }) => {
                let warnings = self.memory_warnings(mode);
                for w in &warnings {
                    log::warn!("{w}");
                }
                log::info!(
                    "cpr reboot: state saved ({bytes} bytes, state version {version}); exiting"
                );
                self.event(
                    "CPR",
                    Some(json!({"mode": "reboot", "status": "saved", "path": args.get("path")})),
                );
                self.reply(
                    req.client,
                    req.id.clone(),
                    Ok(json!({"warnings": warnings, "bytes": bytes, "state-version": version})),
                );
                if let Some(m) = &mut self.monitor {
                    m.flush_for(Duration::from_secs(2));
                }
                if let Some(m) = &self.machine {
                    m.serial.restore_terminal();
                }
                Ok(Some(Outcome::SavedForReboot))
            }
            Err(f) => Err(q(format!("{mode} failed: {}", describe(&f)))),
        }
    }

    /// A reboot's state file may replace only a state file of this VM that this build can
    /// read.
    fn check_replaceable(
        &self,
        dir: &crate::policy::StateDir,
        name: &std::ffi::OsStr,
    ) -> std::result::Result<(), String> {
        let shown = dir.path.join(name);
        let bytes = match dir.read(name, self.schema.limits().max_total) {
            Err(_)
                if dir
                    .open(name)
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
            Ok(b) => b,
        };
        let refuse = || {
            format!(
                "`{}` exists and is not a state file of this VM; remove it or choose another name",
                shown.display()
            )
        };
        let mut snap = Snapshot::read_from(bytes.as_slice(), &self.schema).map_err(|_| refuse())?;
        let u: cpr_update::UpdateSection = snap.take(0).map_err(|_| refuse())?;
        if u.vm_id.as_ref() != self.ids.vm {
            return Err(refuse());
        }
        Ok(())
    }

    /// The new side: the guest is ours and runs (or stays paused). Answers the client that
    /// asked for the update, starts the monitor and the console, closes the old VM.
    pub(crate) fn after_update(&mut self, r: Resumed) -> Result<()> {
        self.ids = r.ids;
        self.update_count += 1;
        let report = &r.report;
        if !report.was_running {
            if let Some(m) = self.machine.as_mut() {
                if !m.started() {
                    self.paused_at_ns = m.start_paused(PAUSE_TIMEOUT)?;
                }
            }
            self.state = RunState::Paused;
        }
        let phases: Map<String, Value> = report
            .phases
            .iter()
            .map(|p| (p.name.clone(), json!(p.since_stop.ns().map(|n| n / 1000))))
            .collect();
        let blackout = report.blackout.and_then(|b| b.ns()).map(|n| n / 1000);
        let status = if r.fallback.is_some() {
            "failed"
        } else {
            "completed"
        };
        let mut data = json!({
            "mode": report.mode.as_str(), "status": status, "blackout-us": blackout,
            "blackout-basis": report.blackout.map(|b| b.basis()),
            "phases-us": phases, "state-version": report.state_version,
            "from": format!("{} {}", r.source.app_name, r.source.app_version),
            "was-running": report.was_running, "took-over": r.took_over,
        });
        if let Some(e) = &r.fallback {
            data["error"] = json!(e);
        }
        match blackout {
            Some(us) => log::info!(
                "cpr {}: guest resumed, blackout {}.{:03} ms ({})",
                report.mode,
                us / 1000,
                us % 1000,
                report.blackout.map_or("", |b| b.basis())
            ),
            None => log::info!("cpr {}: guest restored (paused)", report.mode),
        }
        log::info!(
            "cpr {} phases (us after the vCPUs stopped): {}",
            report.mode,
            Value::Object(phases)
        );
        for name in &r.unused_fds {
            log::warn!("handed-over fd `{name}` was not used");
        }
        self.last_update = Some(data.clone());
        self.migration_arrived(blackout.map(|us| us / 1000), r.fallback.as_deref());
        if let Some(m) = &self.machine {
            m.serial.start_input();
        }
        let reply = self.arrived.reply.take();
        let carried = self.arrived.monitor.take();
        if let Some(m) = &mut self.monitor {
            m.event("CPR", Some(data.clone()));
            if let Some(reply) = reply.filter(|r| r.client != 0) {
                // No id (the usual case) is no JSON to parse: a parse error would also make
                // serde_json run its CPU feature detection (~60 µs of emulated CPUID here)
                // before the answer goes out.
                let id = if reply.id.is_empty() {
                    None
                } else {
                    serde_json::from_str(&reply.id).ok()
                };
                let answer = match &r.fallback {
                    None => Ok(data),
                    Some(e) => Err(q(format!(
                        "restart failed: the new binary could not restore the state ({e}); the \
                         guest resumed in the previous binary"
                    ))),
                };
                m.reply(reply.client, id, answer);
            }
            drop(carried);
            // Handed-over clients: what they sent during the update runs now, after the
            // answer to `cpr-save`.
            m.start();
            m.flush_for(Duration::ZERO);
        }
        // After the answer: joining the unused spares waits for their threads to wake.
        if let Some(m) = &self.machine {
            m.close_spare_workers();
        }
        if let Some(old_vm) = self.arrived.retired_vm.take() {
            // The guest runs again: now let KVM tear the old VM down, off the control loop.
            std::thread::spawn(move || {
                let t = cpr_update::monotonic_ns();
                drop(old_vm);
                log::debug!(
                    "old VM released in {} us",
                    (cpr_update::monotonic_ns() - t) / 1000
                );
            });
        }
        Ok(())
    }
}

/// A failure as the operator reads it: what went wrong and where the guest is now.
fn describe(f: &Failure) -> String {
    let guest = match &f.guest {
        Guest::Running if f.stopped => "the guest resumed in this process".to_string(),
        Guest::Running => "the guest was not stopped and runs on in this process".to_string(),
        Guest::Paused => "the guest stays paused in this process".to_string(),
        Guest::NotResumed(e) => {
            format!("the guest is paused in this process and did not resume: {e}")
        }
    };
    format!("{}; {guest}", f.error)
}

impl Pausable for Vmm {
    fn is_running(&self) -> bool {
        self.state == RunState::Running
    }

    fn pause(&mut self) -> std::result::Result<u64, BoxError> {
        let ns = self.machine.as_ref().ok_or("no VM")?.pause(PAUSE_TIMEOUT)?;
        self.state = RunState::Paused;
        self.paused_at_ns = ns;
        self.stop_event(ns);
        Ok(ns)
    }

    fn resume(&mut self) -> std::result::Result<(), BoxError> {
        let m = self.machine.as_mut().ok_or("no VM")?;
        if m.started() {
            m.resume();
        } else {
            m.start()?;
        }
        self.state = RunState::Running;
        self.resume_event();
        Ok(())
    }

    fn first_entry(&self, timeout: Duration) -> Option<u64> {
        self.machine.as_ref()?.wait_first_entry(timeout)
    }
}

impl Updatable for Vmm {
    fn build_info(&self) -> BuildInfo {
        build_info(&self.schema)
    }

    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn check(&self, mode: Mode) -> std::result::Result<(), BoxError> {
        let m = self
            .machine
            .as_ref()
            .ok_or("no VM yet: waiting for cpr-load")?;
        m.ram.check_mode(memory_mode(mode))?;
        if let Some(p) = &self.passthrough {
            match mode {
                Mode::Restart | Mode::Transfer => p.check_restart()?,
                Mode::Reboot => {
                    return Err("the VFIO device would be reset when this process exits".into())
                }
            }
        }
        Ok(())
    }

    fn hold_input(&mut self) -> std::result::Result<(), BoxError> {
        if let Some(m) = &self.machine {
            m.serial.hold(HOLD_TIMEOUT)?;
        }
        Ok(())
    }

    fn release_input(&mut self) {
        if let Some(m) = &self.machine {
            m.serial.release();
        }
    }

    fn save_memory(&mut self, out: &mut Saver<'_>) -> std::result::Result<(), BoxError> {
        let m = self.machine.as_ref().ok_or("no VM")?;
        out.write(0, &self.config_section(m))?;
        out.write(0, m.ram.layout())?;
        let ids = *out.ids();
        if m.ram.layout().has_stamp() {
            m.ram
                .write_stamp(&Stamp::saved(ids.vm, ids.state, ids.generation))?;
        }
        if out.carries_fds() {
            for (name, fd) in m.ram.memfds() {
                out.register(name, FdKind::MEMORY, fd.try_clone_to_owned()?, b"")?;
            }
        }
        self.saving = Some(ids);
        Ok(())
    }

    fn save(&mut self, out: &mut Saver<'_>) -> std::result::Result<(), BoxError> {
        let m = self.machine.as_ref().ok_or("no VM")?;
        let (vm_state, vcpus) = m.capture()?;
        out.write(0, &vm_state)?;
        for (i, v) in vcpus.iter().enumerate() {
            out.write(i as u32, v)?;
        }
        out.write(0, &m.serial.save())?;
        if let Some(b) = m.blk() {
            if !out.can_write::<crate::virtio_blk::BlkSection>() {
                return Err(format!(
                    "state version {} has no virtio-blk device: the target build cannot take \
                     this disk",
                    out.target_version()
                )
                .into());
            }
            out.write(0, &b.save()?)?;
            log::info!(
                "virtio-blk: drained in {} us ({} requests in flight completed)",
                m.last_drain().as_micros(),
                b.last_drained()
            );
            if out.carries_fds() {
                out.register(DISK_FD, FdKind(0x103), b.image_fd()?, b"")?;
            }
        }
        if let Some(n) = m.net() {
            if !out.can_write::<crate::virtio_net::NetSection>() {
                return Err(format!(
                    "state version {} has no virtio-net device: the target build cannot take \
                     this network device",
                    out.target_version()
                )
                .into());
            }
            log::info!(
                "virtio-net: drained in {} us ({} frames in flight sent)",
                m.last_drain().as_micros(),
                n.last_drained()
            );
            if !out.carries_fds() {
                // The tap's queue ends with this process: what is queued goes in the state.
                let held = n.hold_queued();
                log::info!("virtio-net: {held} frames queued in the tap carried in the state");
            }
            out.write(0, &n.save())?;
            if out.carries_fds() {
                out.register(NET_FD, FdKind(0x104), n.tap_fd()?, b"")?;
            }
        }
        #[cfg(feature = "next")]
        if out.can_write::<StatsSection>() {
            out.write(
                0,
                &StatsSection {
                    updates: self.update_count + 1,
                },
            )?;
        }
        if !out.carries_fds() {
            return Ok(());
        }
        let mut fds: Vec<(String, FdKind, OwnedFd, Vec<u8>)> = Vec::new();
        let mut collect = |n: &str, k: FdKind, fd: OwnedFd, meta: &[u8]| -> Result<()> {
            fds.push((n.to_string(), k, fd, meta.to_vec()));
            Ok(())
        };
        m.serial.register_fds(&mut collect)?;
        // A QEMU-style `migrate` leaves the monitor with this process, as QEMU's source
        // keeps its own.
        if let Some(mon) = self
            .monitor
            .as_ref()
            .filter(|_| !self.migration.keep_monitor)
        {
            // Every state version this build writes has `monitor` 2, which carries the
            // pending output (a test holds the schema to it).
            mon.register_fds(&mut collect)?;
            out.write(0, &mon.carry())?;
        }
        collect(RETIRED_VM, FdKind(0x102), m.retire_vm_fd()?, b"")?;
        for (n, k, fd, meta) in fds {
            out.register(&n, k, fd, &meta)?;
        }
        if let Some(p) = self.passthrough.as_mut() {
            p.prepare()?;
            p.hand_over(out)?;
        }
        if let Some(w) = &self.waiting {
            out.write(0, w)?;
        }
        if out.mode() == Mode::Restart {
            if let Some(m) = &self.machine {
                m.serial.restore_terminal();
            }
        }
        Ok(())
    }

    fn abandon(&mut self) {
        if let Some(p) = self.passthrough.as_mut() {
            if let Err(e) = p.abandon() {
                log::error!("VFIO: restoring host addresses failed: {e}");
            }
        }
        if let Some(m) = self.machine.as_mut() {
            m.serial.reenter_raw_mode();
            if m.ram.layout().has_stamp() {
                let _ = m
                    .ram
                    .write_stamp(&Stamp::live(self.ids.vm, self.ids.generation));
            }
        }
        self.saving = None;
    }

    fn prepare(&mut self, input: &mut Loader<'_, '_>) -> std::result::Result<(), BoxError> {
        let cfg: VmmConfigSection = input.take(0)?;
        let layout: MemoryLayout = input.take(0)?;
        let plan = plan(&self.config, &cfg, &layout, input.mode())?;
        self.arrived.by_transfer = input.mode() == Mode::Transfer;
        let vcpus = plan.vcpus;
        self.ids = *input.ids();
        let mut fds: HashMap<String, OwnedFd> = input
            .fds()
            .take_kind(FdKind::MEMORY)
            .into_iter()
            .map(|e| (e.name().to_string(), e.into_fd()))
            .collect();
        // Before anything is mapped writable: is this the memory this state was saved from,
        // and not run since?
        if !layout.has_stamp() {
            return Err(
                "the state's memory layout has no stamp, so its memory cannot be verified".into(),
            );
        }
        let want = input.ids().state;
        match layout.read_stamp(&fds)? {
            Some(s) if s.holds(&want) => {}
            Some(s) if s.state == StampState::Live => {
                return Err(
                    "stale state: the guest ran on this memory after the state was saved \
                            (a state restores at most once)"
                        .into(),
                )
            }
            Some(s) => {
                return Err(format!(
                    "the memory holds another saved state (generation {}), not this one",
                    s.generation
                )
                .into())
            }
            None => {
                return Err(
                    "the memory has no stamp: it is not the memory this state was saved from"
                        .into(),
                )
            }
        }
        let ram = GuestRam::reattach(&layout, &mut fds, &MemoryOptions::default())?;
        input.mark("memory");
        for r in &layout.regions {
            if matches!(r.kind, BackendKind::Tmpfs | BackendKind::Hugetlbfs)
                && !self.remove_on_quit.contains(&PathBuf::from(&r.name))
            {
                self.remove_on_quit.push(PathBuf::from(&r.name));
            }
        }
        let access = self.policy.access;
        let mut machine = Machine::create(
            ram,
            vcpus,
            self.events.clone(),
            input.mode() == Mode::Transfer,
            |irq| SerialDevice::new(&SerialConfig::Null, None, irq, access),
            &mut |name| input.mark(name),
        )?;
        // vCPU threads wait at the gate: for a transfer this is before the pause, and so is
        // reading what the fresh vCPUs hold (a restart's or reboot's would cost as much
        // inside the blackout as the restore then saves).
        if input.mode() == Mode::Transfer {
            machine.read_initial_vcpu_state()?;
            machine.start_spare_workers()?;
        }
        machine.spawn_at_gate(input.mode() == Mode::Transfer)?;
        input.mark("vm-created");
        self.guest = cfg.guest;
        self.arrived.serial = cfg.serial;
        self.machine = Some(machine);
        Ok(())
    }

    fn restore(&mut self, input: &mut Loader<'_, '_>) -> std::result::Result<(), BoxError> {
        let mode = input.mode();
        let count = self.machine.as_ref().ok_or("no VM")?.vcpu_count();
        let vm_state: VmState = input.take(0)?;
        let instances = input.instances::<VcpuState>();
        if instances != (0..count as u32).collect::<Vec<_>>() {
            return Err(
                format!("the state has vCPU sections {instances:?} for {count} vCPUs").into(),
            );
        }
        let vcpus = instances
            .iter()
            .map(|&i| input.take::<VcpuState>(i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let (policy, elapsed) = match self.config.guest_clock {
            GuestClock::Frozen => (ClockPolicy::Frozen, 0),
            GuestClock::Advance => (ClockPolicy::Advance, input.elapsed().ns().unwrap_or(0)),
        };
        // The vCPU threads restore their state while this thread restores the devices. The
        // devices, the UART among them, hold their interrupt lines until every LAPIC is set
        // (`end_restore` releases them), so that no interrupt lands in a LAPIC that
        // `KVM_SET_LAPIC` then overwrites. What the UART re-raises as it is restored (a
        // pending THR/RDA interrupt) thus reaches the guest even when the old VM received
        // it only after its LAPICs were captured.
        self.machine
            .as_mut()
            .ok_or("no VM")?
            .begin_restore(&vm_state, vcpus, policy, elapsed)?;
        let serial_state: SerialSection = input.take(0)?;
        #[cfg(feature = "next")]
        if let Some(s) = input.take_optional::<StatsSection>(0)? {
            self.update_count = s.updates.saturating_sub(1);
        }
        let carries = mode != Mode::Reboot;
        let access = self.policy.access;
        // Restart and transfer keep the old image's console (its fds); a reboot opens the
        // command line's.
        let serial_cfg: SerialConfig = if carries {
            self.arrived.serial.parse().map_err(Error::State)?
        } else {
            self.config.serial.clone()
        };
        let m = self.machine.as_mut().ok_or("no VM")?;
        let fds = if carries { Some(input.fds()) } else { None };
        m.replace_serial(|irq| {
            let args = SerialArgs {
                config: &serial_cfg,
                fds,
                irq,
                access,
            };
            SerialDevice::restore(args, &serial_state)
        })?;
        self.config.serial = serial_cfg;
        if let Some(state) = input.take_optional::<crate::virtio_blk::BlkSection>(0)? {
            // Restart and transfer: the image fd came along. Reboot: the command line's path,
            // which must name the very file the state was saved with.
            let image = backend(input, carries, DISK_FD, || {
                let disk = self.config.disk.as_ref().ok_or(
                    "the state has a virtio-blk disk: start with --disk and the same image",
                )?;
                Ok(crate::virtio_blk::open_image(&disk.path, state.read_only)?)
            })?;
            let m = self.machine.as_ref().ok_or("no VM")?;
            let blk = crate::virtio_blk::Blk::restore(&state, image, m.ram.memory().clone())?
                .with_delay(crate::virtio_blk::test_delay());
            m.attach_blk(blk)?;
            input.mark("disk");
        } else if !carries && self.config.disk.is_some() {
            return Err("--disk given, but the state has no disk".into());
        }
        if let Some(state) = input.take_optional::<crate::virtio_net::NetSection>(0)? {
            // Restart and transfer: the tap fd came along. Reboot: the command line's tap,
            // which must be the interface the state was saved on.
            let tap = backend(input, carries, NET_FD, || {
                let net = self.config.net.as_ref().ok_or(
                    "the state has a virtio-net device: start with --net and the same tap",
                )?;
                if net.mac.is_some_and(|mac| mac[..] != state.mac[..]) {
                    return Err("--net mac= differs from the MAC the guest was given".into());
                }
                Ok(crate::vmm::open_net_backend(net)?)
            })?;
            let m = self.machine.as_ref().ok_or("no VM")?;
            let net = crate::virtio_net::Net::restore(&state, tap, m.ram.memory().clone())?
                .with_delay(crate::virtio_net::test_delay());
            m.attach_net(net)?;
            input.mark("net");
        } else if !carries && self.config.net.is_some() {
            return Err("--net given, but the state has no network device".into());
        }
        if carries {
            let carried = input.take_optional::<MonitorSection>(0)?;
            let max = self.config.max_clients;
            self.monitor = Monitor::from_fds(input.fds(), carried, max)?;
            if self.monitor.is_none() {
                self.bind_monitor()?;
            }
            self.arrived.monitor_from_fds = true;
            self.arrived.reply = input.take_optional::<ReplySection>(0)?;
            self.arrived.retired_vm = input.fds().take(RETIRED_VM).map(|e| e.into_fd());
        }
        let m = self.machine.as_ref().ok_or("no VM")?;
        self.passthrough = if carries {
            Passthrough::take_over(input, &m.ram)?
        } else if input.contains::<cpr_vfio::LegacyState>(0)
            || input.contains::<cpr_vfio::IommufdState>(0)
        {
            return Err(
                "the state holds a VFIO device, which cannot survive a process exit".into(),
            );
        } else {
            None
        };
        let m = self.machine.as_mut().ok_or("no VM")?;
        let refused = m.end_restore()?;
        if !refused.is_empty() {
            log::warn!("MSRs the kernel refused to restore: {refused:x?}");
        }
        input.mark("state-restored");
        for s in input.skipped() {
            log::warn!("skipped unknown section `{}` {}", s.name, s.instance);
        }
        Ok(())
    }

    fn commit(&mut self) -> std::result::Result<(), BoxError> {
        if let Some(m) = &self.machine {
            if m.ram.layout().has_stamp() {
                // Ours now: the state that brought it is spent.
                m.ram
                    .write_stamp(&Stamp::live(self.ids.vm, self.ids.generation))?;
            }
        }
        if self.arrived.by_transfer {
            // Before the old process hears that the guest runs here, and so before it exits.
            crate::notify::send(&format!("MAINPID={}\nREADY=1", std::process::id()));
        }
        Ok(())
    }

    fn discard(&mut self) {
        if let Some(mut m) = self.machine.take() {
            m.shutdown();
        }
        self.passthrough = None;
        if self.arrived.monitor_from_fds {
            self.monitor = None;
        }
        self.arrived = Default::default();
    }

    fn peer_took_over(&self) -> Option<bool> {
        let saving = self.saving?;
        let s = self.machine.as_ref()?.ram.read_stamp().ok()??;
        Some(!s.holds(&saving.state))
    }

    fn progress(&mut self, event: Progress<'_>) {
        match event {
            Progress::Negotiated {
                mode,
                version,
                target,
            } => {
                log::info!(
                    "cpr {mode}: writing state version {version} for {}",
                    target.map_or("a later build".to_string(), |t| format!(
                        "{} {}",
                        t.app, t.version
                    ))
                );
                self.event("CPR", Some(json!({"mode": mode.as_str(), "status": "started", "state-version": version})));
            }
            Progress::Executing { program } => {
                // No flush of the monitor here: its pending output went into the state, and
                // the next image writes it. Writing it now as well would send it twice, and
                // a client that does not read held the exec (the guest paused) 100 ms.
                log::info!("cpr restart: exec {}", program.display());
            }
            Progress::Failed { error, guest } => {
                log::error!("cpr update failed: {error} ({guest:?})");
                self.event(
                    "CPR",
                    Some(json!({"status": "failed", "error": error.to_string()})),
                );
            }
            Progress::FallingBack { error } => {
                log::error!(
                    "cpr restart: cannot restore here ({error}); back to the previous binary"
                );
            }
            Progress::TookOver => {
                log::warn!(
                    "cpr transfer: the old process died after the pause; taking the guest over"
                );
            }
            other => log::debug!("cpr: {other:?}"),
        }
    }
}

/// The `restore_state` fuzz target's driver: arbitrary section payloads in a valid container,
/// through the restore's checks ([`check_state`]).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// What a selector byte frames: section name and version (at state version 2).
    pub const SECTIONS: &[(&str, u16)] = &[
        ("vmm-config", 2),
        ("memory-layout", 2),
        ("kvm-vm", 1),
        ("kvm-vcpu", 1),
        ("serial", 1),
        ("cpr-update", 1),
        ("qmp-reply", 1),
        ("monitor", 2),
        ("unknown-extra", 1),
    ];

    /// The command line the states are checked against.
    pub fn command_line() -> crate::config::RunConfig {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from([
            "vmm-reference",
            "run",
            "--memory",
            "shm:/dev/shm/cpr-fuzz/ram",
            "--memory-size",
            "64M",
            "--vcpus",
            "2",
        ])
        .expect("a valid command line");
        match cli.command {
            Some(crate::config::Command::Run(r)) => *r,
            _ => unreachable!("run"),
        }
    }

    /// The input format: repeated `selector u8, length u16, payload`; a truncated last piece
    /// is dropped.
    pub fn encode(pieces: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (sel, p) in pieces {
            out.push(*sel);
            out.extend_from_slice(&(p.len().min(u16::MAX as usize) as u16).to_le_bytes());
            out.extend_from_slice(&p[..p.len().min(u16::MAX as usize)]);
        }
        out
    }

    /// Frames `data` (see [`encode`]) and runs the restore's checks on it.
    pub fn restore_state(data: &[u8]) -> std::result::Result<Plan, String> {
        let mut rest = data;
        let mut owned: Vec<(&str, u32, u16, Vec<u8>)> = Vec::new();
        let mut vcpu = 0u32;
        while rest.len() >= 3 && owned.len() < 32 {
            let sel = rest[0] as usize % SECTIONS.len();
            let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
            rest = &rest[3..];
            let take = len.min(rest.len());
            let (payload, tail) = rest.split_at(take);
            rest = tail;
            let (name, version) = SECTIONS[sel];
            let instance = if name == "kvm-vcpu" {
                vcpu += 1;
                vcpu - 1
            } else {
                0
            };
            if owned
                .iter()
                .any(|(n, i, _, _)| *n == name && *i == instance)
            {
                continue;
            }
            owned.push((name, instance, version, payload.to_vec()));
        }
        let sections: Vec<cpr_snapshot::fuzzing::RawSection<'_>> = owned
            .iter()
            .map(|(n, i, v, p)| {
                (
                    *n,
                    *i,
                    *v,
                    *n == "monitor" || *n == "unknown-extra",
                    p.as_slice(),
                )
            })
            .collect();
        let bytes = cpr_snapshot::fuzzing::container(APP, VERSION, 2, &sections);
        check_state(&bytes, &command_line())
    }

    /// Seeds: a state that passes every check, and variants that fail each one.
    pub fn seeds() -> Vec<(String, Vec<u8>)> {
        let schema = schema();
        let payload = |w: &dyn Fn(&mut cpr_snapshot::SnapshotWriter<'_, Vec<u8>>)| {
            let mut wr =
                cpr_snapshot::SnapshotWriter::new(Vec::new(), &schema, APP, VERSION, 2).unwrap();
            w(&mut wr);
            let bytes = wr.finish().unwrap();
            let info = cpr_snapshot::inspect(bytes.as_slice(), schema.limits()).unwrap();
            let s = &info.sections[0];
            bytes[s.payload_offset as usize..s.payload_offset as usize + s.len as usize].to_vec()
        };
        let cfg = VmmConfigSection {
            vcpus: 2,
            guest: "demo".into(),
            serial: "null".into(),
            memory: "shm:/dev/shm/cpr-fuzz/ram".into(),
            memory_size: 64 << 20,
            huge_pages: 0,
        };
        let layout = MemoryLayout {
            regions: vec![cpr_memory::RegionLayout {
                guest_addr: 0,
                size: 64 << 20,
                kind: BackendKind::Tmpfs,
                name: "/dev/shm/cpr-fuzz/ram".into(),
                offset: 0,
                page_size: 4096,
                backing_size: (64 << 20) + 4096,
            }],
            stamp_offset: 64 << 20,
        };
        let (vm, vcpus) = cpr_kvm::blank_states(2);
        let update = cpr_update::UpdateSection {
            mode: 3,
            vm_id: cpr_snapshot::Blob(vec![1; 16]),
            state_id: cpr_snapshot::Blob(vec![2; 16]),
            generation: 1,
            ..Default::default()
        };
        let good = vec![
            (0u8, payload(&|w| w.write_section(0, &cfg).unwrap())),
            (1, payload(&|w| w.write_section(0, &layout).unwrap())),
            (2, payload(&|w| w.write_section(0, &vm).unwrap())),
            (3, payload(&|w| w.write_section(0, &vcpus[0]).unwrap())),
            (3, payload(&|w| w.write_section(1, &vcpus[1]).unwrap())),
            (
                4,
                payload(&|w| w.write_section(0, &SerialSection::default()).unwrap()),
            ),
            (5, payload(&|w| w.write_section(0, &update).unwrap())),
        ];
        let mut out = vec![("valid".to_string(), encode(&good))];
        let mut one_vcpu = good.clone();
        one_vcpu.remove(4);
        out.push(("one-vcpu-section".into(), encode(&one_vcpu)));
        let mut big = good.clone();
        big[1] = (
            1,
            payload(&|w| {
                let mut l = layout.clone();
                l.regions[0].guest_addr = 4 << 30;
                w.write_section(0, &l).unwrap()
            }),
        );
        out.push(("region-at-4g".into(), encode(&big)));
        let mut other = good;
        other[0] = (
            0,
            payload(&|w| {
                let mut c = cfg.clone();
                c.memory = "shm:/etc/shadow".into();
                w.write_section(0, &c).unwrap()
            }),
        );
        out.push(("other-file".into(), encode(&other)));
        out
    }
}
