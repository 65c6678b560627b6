// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The control loop: starts or restores the VM, answers monitor commands, and performs
//! live updates (restart in place, reboot through a state file).

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use cpr_fd::{FdKind, FdRegistry};
use cpr_kvm::{monotonic_ns, VcpuState, VmState};
use cpr_memory::{BackendKind, GuestRam, MemoryLayout, MemoryOptions, RegionSpec, UpdateMode};
use cpr_snapshot::prelude::*;
use cpr_snapshot::{save_to_path, Schema, Snapshot, SnapshotWriter};
use serde_json::{json, Map, Value};

use crate::config::{Incoming, MemoryConfig, RunConfig};
use crate::error::{Error, Result};
use crate::guest::{DemoConfig, DemoStatus};
use crate::machine::{Machine, VcpuEvent};
use crate::monitor::{Monitor, MonitorSection, QmpError, Request};
use crate::passthrough::Passthrough;
use crate::serial::{SerialConfig, SerialDevice, SerialSection};
use crate::ControlMsg;

/// Name of the previous image's VM fd, closed by the new image once the guest runs.
const RETIRED_VM: &str = "kvm.retired-vm";

/// How long each side of a transfer waits for the other.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long vCPUs get to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an update waits for the console's and the monitor's reader threads to park:
/// longer than a write can be stuck on a client that does not read.
const HOLD_TIMEOUT: Duration = crate::monitor::WRITE_TIMEOUT.saturating_add(Duration::from_secs(5));
/// Largest guest RAM.
pub const MAX_MEMORY: u64 = 3 << 30;

/// VMM configuration that a restored VM must keep. Section `vmm-config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Versionize)]
pub struct VmmConfigSection {
    /// vCPU count.
    pub vcpus: u32,
    /// `demo` or `linux`.
    pub guest: String,
    /// Serial backend, as on the command line.
    pub serial: String,
}

impl Section for VmmConfigSection {
    const NAME: &'static str = "vmm-config";
}

/// The update in progress. Section `cpr`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Versionize)]
pub struct CprSection {
    /// `restart` or `reboot`.
    pub mode: String,
    /// `CLOCK_MONOTONIC` ns when the last vCPU left `KVM_RUN`.
    pub stop_ns: u64,
    /// Monitor client waiting for the `cpr-save` answer (restart), 0 if none.
    pub client: u64,
    /// That client's command id, as JSON text (empty if none).
    pub reply_id: String,
    /// Whether the guest was running before the update (and must run after it).
    pub was_running: bool,
}

impl Section for CprSection {
    const NAME: &'static str = "cpr";
}

/// The state file schema.
pub fn schema() -> Schema {
    Schema::builder()
        .section::<VmmConfigSection>()
        .section::<MemoryLayout>()
        .section::<VmState>()
        .section::<VcpuState>()
        .section::<SerialSection>()
        .section::<CprSection>()
        .section::<cpr_vfio::LegacyState>()
        .section::<cpr_vfio::IommufdState>()
        .section::<crate::passthrough::ModelSection>()
        .section::<MonitorSection>()
        .next_version()
        .type_version::<MemoryLayout>(2)
        .build()
        .expect("static schema is valid")
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// How the VMM process should end.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `quit`, or a signal.
    Quit,
    /// The state was saved for a reboot; the guest continues in a new process.
    SavedForReboot,
    /// The VM was handed to another process, which runs it now.
    Transferred,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    /// Waiting for `cpr-load`.
    Incoming,
}

/// The VMM.
#[derive(Debug)]
pub struct Vmm {
    config: RunConfig,
    machine: Option<Machine>,
    monitor: Option<Monitor>,
    tx: Sender<ControlMsg>,
    rx: Receiver<ControlMsg>,
    state: RunState,
    paused_at_ns: u64,
    guest: String,
    remove_on_quit: Vec<PathBuf>,
    last_update: Option<Value>,
    /// When this process image started running `Vmm::start`.
    started_ns: u64,
    passthrough: Option<Passthrough>,
}

fn q(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn memory_spec(cfg: &MemoryConfig, size: u64) -> RegionSpec {
    match cfg {
        MemoryConfig::Memfd => RegionSpec::memfd("guest-ram.0", 0, size),
        MemoryConfig::File(p) => RegionSpec::file(p, 0, size),
        MemoryConfig::Dax(p) => RegionSpec::file(p, 0, size).existing(),
        MemoryConfig::Anonymous => RegionSpec::anonymous(0, size),
    }
}

impl Vmm {
    /// Starts the VMM: resumes a VM handed over by exec if there is one, restores one from
    /// `--incoming`, or boots a new one.
    pub fn start(config: RunConfig) -> Result<Vmm> {
        let started_ns = monotonic_ns();
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
                .map_err(|e| Error::Io(format!("signal handler: {e}")))?;
        }
        // Before any thread starts: reclaim edits the environment.
        let handed_over = cpr_fd::reclaim()?;
        let (tx, rx) = channel();
        let mut vmm = Vmm {
            config,
            machine: None,
            monitor: None,
            tx,
            rx,
            state: RunState::Paused,
            paused_at_ns: 0,
            guest: "demo".into(),
            remove_on_quit: Vec::new(),
            last_update: None,
            started_ns,
            passthrough: None,
        };
        match (handed_over, vmm.config.incoming.clone()) {
            (Some(fds), _) => vmm.resume_after_exec(fds)?,
            (None, Some(Incoming::File(path))) => {
                vmm.bind_monitor()?;
                let bytes = read_state_file(&path)?;
                vmm.restore(&bytes, None)?;
            }
            (None, Some(Incoming::Transfer(path))) => vmm.receive_transfer(&path)?,
            (None, Some(Incoming::Defer)) => {
                vmm.bind_monitor()?;
                vmm.state = RunState::Incoming;
                log::info!("waiting for cpr-load on the monitor");
            }
            (None, None) => {
                // Monitor last: once it answers, the VM and its devices exist.
                vmm.boot()?;
                vmm.bind_monitor()?;
            }
        }
        Ok(vmm)
    }

    fn bind_monitor(&mut self) -> Result<()> {
        if let Some(p) = &self.config.monitor {
            self.monitor = Some(Monitor::bind(p, self.tx.clone())?);
        }
        Ok(())
    }

    fn boot(&mut self) -> Result<()> {
        let cfg = &self.config;
        if cfg.memory_size == 0
            || cfg.memory_size > MAX_MEMORY
            || !cfg.memory_size.is_multiple_of(2 << 20)
        {
            return Err(Error::Config(format!(
                "memory size {} must be a multiple of 2 MiB up to 3 GiB",
                cfg.memory_size
            )));
        }
        let ram = GuestRam::builder()
            .region(memory_spec(&cfg.memory, cfg.memory_size))
            .options(MemoryOptions::default())
            .build()?;
        if let MemoryConfig::File(p) = &cfg.memory {
            self.remove_on_quit.push(p.clone());
        }
        let serial_cfg = cfg.serial.clone();
        let mut machine = Machine::create(ram, cfg.vcpus, |irq| {
            SerialDevice::new(&serial_cfg, None, irq)
        })?;
        if let Some(kernel) = &cfg.kernel {
            crate::linux::load(&mut machine, kernel, &cfg.cmdline, cfg.initrd.as_deref())?;
            self.guest = "linux".into();
        } else {
            let demo = DemoConfig {
                span_bytes: cfg.demo_span,
                ..Default::default()
            };
            crate::guest::load(machine.ram.memory(), &demo).map_err(Error::Guest)?;
            machine.boot_demo()?;
        }
        if let Some(dev) = &cfg.vfio_device {
            self.passthrough = Some(Passthrough::open(
                dev,
                cfg.vfio_iommufd,
                cfg.vfio_model.as_deref(),
                &machine.ram,
            )?);
        }
        machine.start(self.tx.clone())?;
        machine.serial.start_input();
        log::info!(
            "booted {} guest: {} MiB {}, {} vCPUs",
            self.guest,
            cfg.memory_size >> 20,
            cfg.memory,
            cfg.vcpus
        );
        self.machine = Some(machine);
        self.state = RunState::Running;
        Ok(())
    }

    /// Resumes the VM an earlier image handed over by exec.
    fn resume_after_exec(&mut self, mut fds: FdRegistry) -> Result<()> {
        let state = fds
            .take("state")
            .ok_or_else(|| Error::State("the previous image handed over no `state` fd".into()))?;
        let mut file = std::fs::File::from(state.into_fd());
        let mut bytes = Vec::new();
        file.rewind()
            .and_then(|_| file.read_to_end(&mut bytes))
            .map_err(|e| Error::Io(format!("read handed-over state: {e}")))?;
        self.monitor = Monitor::from_fds(&mut fds, self.tx.clone())?;
        if self.monitor.is_none() {
            self.bind_monitor()?;
        }
        let retired = fds.take(RETIRED_VM);
        self.restore(&bytes, Some(&mut fds))?;
        if let Some(old_vm) = retired {
            // The guest runs again: now let KVM tear the old VM down, off the control loop.
            std::thread::spawn(move || {
                let t = monotonic_ns();
                drop(old_vm);
                log::debug!("old VM released in {} us", (monotonic_ns() - t) / 1000);
            });
        }
        for e in fds.iter() {
            log::warn!("handed-over fd `{}` was not used", e.name());
        }
        Ok(())
    }

    /// Restores a VM from a state snapshot: memory from `fds` (restart) or paths (reboot).
    fn restore(&mut self, bytes: &[u8], fds: Option<&mut FdRegistry>) -> Result<()> {
        self.restore_with(bytes, fds, None, None)
    }

    /// [`restore`](Self::restore), into a VM built beforehand (`precreated`, transfer), and
    /// with a commit handshake before the vCPUs start (`commit`, transfer).
    fn restore_with(
        &mut self,
        bytes: &[u8],
        mut fds: Option<&mut FdRegistry>,
        precreated: Option<Machine>,
        commit: Option<&UnixStream>,
    ) -> Result<()> {
        // The reference VMM reads every section it wrote; see `schema`.
        let mut phases: Vec<(&str, u64)> = vec![("start", self.started_ns)];
        let schema = schema();
        let mut snap = Snapshot::read_from(bytes, &schema)?;
        let cfg: VmmConfigSection = snap.take(0)?;
        let layout: MemoryLayout = snap.take(0)?;
        let vm_state: VmState = snap.take(0)?;
        let serial_state: SerialSection = snap.take(0)?;
        let cpr: CprSection = snap.take(0)?;
        let carried_input = snap.take_optional::<MonitorSection>(0)?;
        let vcpu_count = cfg.vcpus as usize;
        if vcpu_count == 0 || vcpu_count > crate::machine::MAX_VCPUS {
            return Err(Error::State(format!("state has {vcpu_count} vCPUs")));
        }
        let vcpus = (0..cfg.vcpus)
            .map(|i| snap.take::<VcpuState>(i))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        for s in snap.skipped() {
            log::warn!("skipped unknown section `{}` {}", s.name, s.instance);
        }

        let mut mem_fds: HashMap<String, OwnedFd> = match fds.as_deref_mut() {
            _ if precreated.is_some() => HashMap::new(),
            Some(f) => f
                .take_kind(FdKind::MEMORY)
                .into_iter()
                .map(|e| (e.name().to_string(), e.into_fd()))
                .collect(),
            None => {
                self.check_memory_matches(&layout)?;
                HashMap::new()
            }
        };
        phases.push(("decoded", monotonic_ns()));
        let ram = match &precreated {
            Some(m) if m.ram.layout() != &layout || m.vcpu_count() != vcpu_count => {
                return Err(Error::State(
                    "the transferred state does not match the prepared VM".into(),
                ))
            }
            Some(_) => None,
            None => Some(GuestRam::reattach(
                &layout,
                &mut mem_fds,
                &MemoryOptions::default(),
            )?),
        };
        phases.push(("memory", monotonic_ns()));
        for r in &layout.regions {
            if matches!(r.kind, BackendKind::Tmpfs | BackendKind::Hugetlbfs) {
                self.remove_on_quit.push(PathBuf::from(&r.name));
            }
        }
        let serial_cfg: SerialConfig = match fds {
            // After exec the backend is the one handed over.
            Some(_) => cfg.serial.parse().map_err(Error::State)?,
            // After a reboot, the new command line says where output goes.
            None => self.config.serial.clone(),
        };
        let make_serial = |irq, fds: Option<&mut FdRegistry>| match fds {
            Some(f) => SerialDevice::from_fds(&serial_cfg, f, &serial_state, irq),
            None => SerialDevice::new(&serial_cfg, Some(&serial_state), irq),
        };
        let mut machine = match (precreated, ram) {
            (Some(mut m), _) => {
                m.replace_serial(|irq| make_serial(irq, fds.as_deref_mut()))?;
                m
            }
            (None, Some(ram)) => {
                Machine::create(ram, vcpu_count, |irq| make_serial(irq, fds.as_deref_mut()))?
            }
            (None, None) => return Err(Error::State("no guest memory".into())),
        };
        self.passthrough = match fds {
            Some(f) => Passthrough::take_over(&mut snap, f, &machine.ram)?,
            None if snap.contains::<cpr_vfio::LegacyState>(0)
                || snap.contains::<cpr_vfio::IommufdState>(0) =>
            {
                return Err(Error::State(
                    "the state holds a VFIO device, which cannot survive a process exit".into(),
                ))
            }
            None => None,
        };
        phases.push(("vm-created", monotonic_ns()));
        let elapsed = monotonic_ns().saturating_sub(cpr.stop_ns);
        let refused = machine.restore(&vm_state, &vcpus, elapsed)?;
        phases.push(("state-restored", monotonic_ns()));
        if !refused.is_empty() {
            log::warn!("MSRs the kernel refused to restore: {refused:x?}");
        }
        self.guest = cfg.guest.clone();
        self.config.vcpus = vcpu_count;
        self.config.serial = serial_cfg;
        if let Some(sock) = commit {
            // Tell the old VMM the VM is ready; run it only once it let go for good.
            (&*sock)
                .write_all(b"D")
                .map_err(|e| Error::Io(format!("transfer: {e}")))?;
            let mut c = [0u8; 1];
            match (&*sock).read_exact(&mut c) {
                Ok(()) if c == *b"C" => {}
                _ => {
                    return Err(Error::State(
                        "the old VMM did not commit the transfer; it keeps the guest".into(),
                    ))
                }
            }
            phases.push(("committed", monotonic_ns()));
        }
        if cpr.was_running {
            machine.start(self.tx.clone())?;
            self.state = RunState::Running;
        } else {
            self.state = RunState::Paused;
            self.paused_at_ns = cpr.stop_ns;
        }
        let first = if cpr.was_running {
            machine.wait_first_entry(Duration::from_secs(10))
        } else {
            None
        };
        self.machine = Some(machine);
        let blackout_us = first.map(|f| f.saturating_sub(cpr.stop_ns) / 1000);
        match blackout_us {
            Some(us) => log::info!(
                "cpr {}: guest resumed, blackout {}.{:03} ms",
                cpr.mode,
                us / 1000,
                us % 1000
            ),
            None => log::info!("cpr {}: guest restored (paused)", cpr.mode),
        }
        if let Some(f) = first {
            phases.push(("first-entry", f));
        }
        let phases: Map<String, Value> = phases
            .iter()
            .map(|(k, t)| (k.to_string(), json!(t.saturating_sub(cpr.stop_ns) / 1000)))
            .collect();
        log::info!(
            "cpr {} phases (us after the vCPUs stopped): {}",
            cpr.mode,
            Value::Object(phases.clone())
        );
        let data = json!({"mode": cpr.mode, "status": "completed", "blackout-us": blackout_us, "phases-us": phases});
        self.last_update = Some(data.clone());
        // Console input, only now: until the commit of a transfer the old process may
        // still resume the guest, and the input must be there for it.
        if let Some(m) = &self.machine {
            m.serial.start_input();
        }
        if let Some(m) = &self.monitor {
            if cpr.was_running {
                m.event("RESUME", None);
            }
            m.event("CPR", Some(data.clone()));
            if cpr.client != 0 {
                let id = serde_json::from_str(&cpr.reply_id).ok();
                m.reply(cpr.client, id, Ok(data));
            }
            // Handed-over clients: what they sent during the update runs now, after the
            // answer to `cpr-save`.
            m.start(carried_input);
        }
        Ok(())
    }

    /// The new side of a transfer: waits for the old VMM on `path`, builds the VM from the
    /// memory it sends while the guest still runs there, then restores the rest.
    fn receive_transfer(&mut self, path: &Path) -> Result<()> {
        let listener = crate::unix::listen(path)
            .map_err(|e| Error::Io(format!("bind transfer socket `{}`: {e}", path.display())))?;
        log::info!("waiting for a transfer on {}", path.display());
        let (sock, _) = listener
            .accept()
            .map_err(|e| Error::Io(format!("accept transfer: {e}")))?;
        let _ = std::fs::remove_file(path);
        sock.set_read_timeout(Some(TRANSFER_TIMEOUT))
            .map_err(|e| Error::Io(format!("transfer socket: {e}")))?;
        // Phase 1: memory and configuration, while the guest runs in the old process.
        let mut mem = FdRegistry::receive(&sock)?;
        let prep = recv_blob(&sock)?;
        let schema = schema();
        let mut snap = Snapshot::read_from(prep.as_slice(), &schema)?;
        let cfg: VmmConfigSection = snap.take(0)?;
        let layout: MemoryLayout = snap.take(0)?;
        let mut mem_fds: HashMap<String, OwnedFd> = mem
            .take_kind(FdKind::MEMORY)
            .into_iter()
            .map(|e| (e.name().to_string(), e.into_fd()))
            .collect();
        let ram = GuestRam::reattach(&layout, &mut mem_fds, &MemoryOptions::default())?;
        let machine = Machine::create(ram, cfg.vcpus as usize, |irq| {
            SerialDevice::new(&SerialConfig::Null, None, irq)
        })?;
        log::info!("transfer: VM prepared, {} vCPUs", cfg.vcpus);
        (&sock)
            .write_all(b"R")
            .map_err(|e| Error::Io(format!("transfer: {e}")))?;
        // Phase 2: the old VMM stopped the guest; state and the remaining fds arrive.
        let mut fds = FdRegistry::receive(&sock)?;
        let bytes = recv_blob(&sock)?;
        self.monitor = Monitor::from_fds(&mut fds, self.tx.clone())?;
        if self.monitor.is_none() {
            self.bind_monitor()?;
        }
        let restored = self.restore_with(&bytes, Some(&mut fds), Some(machine), Some(&sock));
        if let Err(e) = &restored {
            let _ = (&sock).write_all(format!("E{e}").as_bytes());
        }
        restored
    }

    /// After a reboot the command line must name the memory the state describes.
    fn check_memory_matches(&self, layout: &MemoryLayout) -> Result<()> {
        let want = match &self.config.memory {
            MemoryConfig::File(p) | MemoryConfig::Dax(p) => p,
            MemoryConfig::Memfd => return Ok(()), // default: take the layout's paths
            MemoryConfig::Anonymous => {
                return Err(Error::Config(
                    "--incoming needs the memory the state was saved with, not anon".into(),
                ))
            }
        };
        match layout.regions.first() {
            Some(r) if Path::new(&r.name) == want.as_path() => Ok(()),
            Some(r) => Err(Error::Config(format!(
                "--memory {} is not the memory of the saved state ({})",
                want.display(),
                r.name
            ))),
            None => Err(Error::State("saved memory layout is empty".into())),
        }
    }

    /// Runs the control loop until `quit`, a signal, or a reboot save.
    pub fn run(mut self) -> Result<Outcome> {
        loop {
            if TERMINATE.load(Ordering::SeqCst) {
                log::info!("terminating on signal");
                self.shutdown();
                return Ok(Outcome::Quit);
            }
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(ControlMsg::Qmp(req)) => {
                    if let Some(outcome) = self.command(req) {
                        return Ok(outcome);
                    }
                }
                Ok(ControlMsg::Vcpu(VcpuEvent::Fatal { index, reason })) => {
                    if let Some(m) = &self.monitor {
                        m.event(
                            "SHUTDOWN",
                            Some(json!({"guest": true, "reason": reason, "vcpu": index})),
                        );
                    }
                    self.shutdown();
                    return Err(Error::Guest(format!("vCPU {index}: {reason}")));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(Outcome::Quit),
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some(m) = &self.machine {
            m.serial.restore_terminal();
        }
        for p in &self.remove_on_quit {
            let _ = std::fs::remove_file(p);
        }
    }

    fn reply(&self, req: &Request, r: std::result::Result<Value, QmpError>) {
        if let Some(m) = &self.monitor {
            m.reply(req.client, req.id.clone(), r);
        }
    }

    fn event(&self, name: &str, data: Option<Value>) {
        if let Some(m) = &self.monitor {
            m.event(name, data);
        }
    }

    fn command(&mut self, req: Request) -> Option<Outcome> {
        log::debug!("qmp: {} {:?}", req.command, req.arguments);
        let result = match req.command.as_str() {
            "query-status" => Ok(self.query_status()),
            "stop" => self.stop(),
            "cont" => self.cont(),
            "quit" => {
                self.reply(&req, Ok(json!({})));
                self.shutdown();
                return Some(Outcome::Quit);
            }
            "cpr-info" => Ok(self.cpr_info()),
            "cpr-save" => match self.cpr_save(&req) {
                Ok(Some(outcome)) => return Some(outcome),
                Ok(None) => return None, // answered already
                Err(e) => Err(e),
            },
            "cpr-load" => self.cpr_load(&req.arguments),
            "x-demo-status" => self.demo_status(),
            "x-vfio-status" => self
                .passthrough
                .as_ref()
                .and_then(Passthrough::model_status)
                .ok_or_else(|| q("no VFIO device on the model kernel")),
            "query-commands" => Ok(json!([
                "query-status",
                "stop",
                "cont",
                "quit",
                "cpr-info",
                "cpr-save",
                "cpr-load",
                "x-demo-status",
                "query-commands"
            ]
            .iter()
            .map(|n| json!({ "name": n }))
            .collect::<Vec<_>>())),
            other => Err(QmpError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            }),
        };
        self.reply(&req, result);
        None
    }

    fn query_status(&self) -> Value {
        let status = match self.state {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Incoming => "inmigrate",
        };
        json!({"status": status, "running": self.state == RunState::Running})
    }

    fn machine(&self) -> std::result::Result<&Machine, QmpError> {
        self.machine
            .as_ref()
            .ok_or_else(|| q("no VM yet: waiting for cpr-load"))
    }

    fn stop(&mut self) -> std::result::Result<Value, QmpError> {
        if self.state == RunState::Running {
            self.paused_at_ns = self.machine()?.pause(PAUSE_TIMEOUT).map_err(q)?;
            self.state = RunState::Paused;
            self.event("STOP", None);
        }
        Ok(json!({}))
    }

    fn cont(&mut self) -> std::result::Result<Value, QmpError> {
        match self.state {
            RunState::Paused => {
                self.machine()?.resume();
                self.state = RunState::Running;
                self.event("RESUME", None);
                Ok(json!({}))
            }
            RunState::Running => Ok(json!({})),
            RunState::Incoming => Err(q("no VM yet: waiting for cpr-load")),
        }
    }

    fn cpr_info(&self) -> Value {
        let Some(m) = &self.machine else {
            return json!({"modes": {}, "reason": "no VM yet: waiting for cpr-load"});
        };
        let layout = m.ram.layout();
        let mut modes = Map::new();
        for mode in UpdateMode::ALL {
            let entry = match (mode, layout.check_mode(mode)) {
                (_, Ok(warnings)) => json!({"supported": true, "warnings": warnings}),
                (_, Err(e)) => json!({"supported": false, "reason": e.to_string()}),
            };
            modes.insert(mode.to_string(), entry);
        }
        let memory: Vec<Value> = layout
            .regions
            .iter()
            .map(|r| json!({"kind": r.kind.as_str(), "name": r.name, "guest-addr": r.guest_addr, "size": r.size, "page-size": r.page_size}))
            .collect();
        let vfio = self.passthrough.as_ref().map(Passthrough::info);
        json!({"modes": modes, "memory": memory, "vcpus": m.vcpu_count(), "last-update": self.last_update, "vfio": vfio})
    }

    fn demo_status(&self) -> std::result::Result<Value, QmpError> {
        let m = self.machine()?;
        let s =
            DemoStatus::read(m.ram.memory()).ok_or_else(|| q("the guest is not the demo guest"))?;
        Ok(json!({
            "counter": s.counter, "generation": s.generation, "lines": s.lines,
            "errors": s.errors, "bad-words": s.bad_words, "faults": s.faults,
            "checksum": s.checksum, "tsc": s.tsc, "tsc-khz": m.tsc_khz(),
            "ticks": &s.ticks[..m.vcpu_count()], "pid": std::process::id(),
            "kvmclock-ns": m.kvmclock_ns(),
        }))
    }

    /// Stops the vCPUs (if running) and encodes the whole VM state.
    fn stop_and_encode(
        &mut self,
        mode: &str,
        waiting: Option<&Request>,
        mut handover: Option<&mut FdRegistry>,
        monitor: Option<&MonitorSection>,
    ) -> Result<(Vec<u8>, bool, u64)> {
        let was_running = self.state == RunState::Running;
        let m = self
            .machine
            .as_ref()
            .ok_or_else(|| Error::State("no VM".into()))?;
        let passthrough = &mut self.passthrough;
        let stop_ns = if was_running {
            m.pause(PAUSE_TIMEOUT)?
        } else {
            self.paused_at_ns
        };
        let encoded = (|| {
            let (vm_state, vcpus) = m.capture()?;
            let schema = schema();
            let mut w = SnapshotWriter::new(
                Vec::with_capacity(64 << 10),
                &schema,
                "vmm-reference",
                env!("CARGO_PKG_VERSION"),
                schema.latest_version(),
            )?;
            w.write_section(
                0,
                &VmmConfigSection {
                    vcpus: m.vcpu_count() as u32,
                    guest: self.guest.clone(),
                    serial: serial_string(&self.config.serial),
                },
            )?;
            w.write_section(0, m.ram.layout())?;
            w.write_section(0, &vm_state)?;
            for (i, v) in vcpus.iter().enumerate() {
                w.write_section(i as u32, v)?;
            }
            w.write_section(0, &m.serial.state())?;
            if let (Some(p), Some(reg)) = (passthrough.as_mut(), handover.as_deref_mut()) {
                p.prepare()?;
                p.hand_over(reg, &mut w)?;
            }
            w.write_section(
                0,
                &CprSection {
                    mode: mode.into(),
                    stop_ns,
                    client: waiting.map_or(0, |r| r.client),
                    reply_id: waiting
                        .and_then(|r| r.id.as_ref())
                        .map(Value::to_string)
                        .unwrap_or_default(),
                    was_running,
                },
            )?;
            if let Some(input) = monitor {
                w.write_section(0, input)?;
            }
            let bytes = w.finish()?;
            // Check that the next image can read what we hand it, before we depend on it.
            Snapshot::read_from(bytes.as_slice(), &schema)?;
            Ok::<_, Error>(bytes)
        })();
        match encoded {
            Ok(bytes) => Ok((bytes, was_running, stop_ns)),
            Err(e) => {
                if let Some(p) = passthrough.as_mut() {
                    if let Err(undo) = p.abandon() {
                        log::error!("VFIO: restoring host addresses failed: {undo}");
                    }
                }
                if was_running {
                    m.resume();
                }
                Err(e)
            }
        }
    }

    fn cpr_save(&mut self, req: &Request) -> std::result::Result<Option<Outcome>, QmpError> {
        let args = &req.arguments;
        for k in args.keys() {
            if !["mode", "path", "binary", "uri"].contains(&k.as_str()) {
                return Err(q(format!("Parameter '{k}' is unexpected")));
            }
        }
        let mode = match args.get("mode") {
            Some(Value::String(s)) => s.parse::<UpdateMode>().map_err(q)?,
            Some(_) => return Err(q("Parameter 'mode' expects a string")),
            None => return Err(q("Parameter 'mode' is missing")),
        };
        let string_arg = |k: &str| match args.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(PathBuf::from(s))),
            Some(_) => Err(q(format!("Parameter '{k}' expects a non-empty string"))),
        };
        let path = string_arg("path")?;
        let binary = string_arg("binary")?;
        let warnings = self.machine()?.ram.check_mode(mode).map_err(q)?;
        if let Some(p) = &self.passthrough {
            match mode {
                UpdateMode::Restart | UpdateMode::Transfer => p.check_restart().map_err(q)?,
                _ => {
                    return Err(q(format!(
                        "{mode} update is not possible: the VFIO device would be reset when this process exits"
                    )))
                }
            }
        }
        match mode {
            UpdateMode::Restart => {
                if path.is_some() {
                    return Err(q("Parameter 'path' is for mode reboot"));
                }
                self.cpr_restart(req, binary).map(|()| None)
            }
            UpdateMode::Reboot => {
                let path = path.ok_or_else(|| q("Parameter 'path' is missing (the state file)"))?;
                if binary.is_some() {
                    return Err(q("Parameter 'binary' is for mode restart"));
                }
                self.cpr_reboot(req, &path, warnings).map(Some)
            }
            UpdateMode::Transfer => {
                let uri = match args.get("uri") {
                    Some(Value::String(s)) => s.clone(),
                    _ => return Err(q("Parameter 'uri' is missing (unix:SOCKET of the new VMM)")),
                };
                let path = uri
                    .strip_prefix("unix:")
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| q(format!("uri `{uri}`: only unix:PATH is supported")))?;
                self.cpr_transfer(req, Path::new(path)).map(Some)
            }
        }
    }

    /// Saves state into a memfd, hands every fd to the new image and execs it. Returns only
    /// on failure, after resuming the guest, with the answer already sent.
    fn cpr_restart(
        &mut self,
        req: &Request,
        binary: Option<PathBuf>,
    ) -> std::result::Result<(), QmpError> {
        let program = match binary {
            Some(b) => b,
            None => std::env::current_exe()
                .map_err(|e| q(format!("cannot find own executable: {e}")))?,
        };
        self.event("CPR", Some(json!({"mode": "restart", "status": "started"})));
        let held = self.hold_input()?;
        let carried = self.carry_monitor(&held);
        let mut reg = FdRegistry::new();
        let (bytes, was_running, stop_ns) =
            match self.stop_and_encode("restart", Some(req), Some(&mut reg), carried.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    self.release_input(held);
                    return Err(q(e));
                }
            };
        if !was_running {
            log::info!("restart of a paused VM: it stays paused");
        }
        let Some(m) = self.machine.as_mut() else {
            self.release_input(held);
            return Err(q("no VM"));
        };
        let failure = (|| -> Result<Error> {
            reg.register(
                "state",
                FdKind::STATE,
                cpr_fd::sealed_memfd("vmm-state", &bytes)?.into(),
                b"",
            )?;
            for (name, fd) in m.ram.memfds() {
                let fd = fd
                    .try_clone_to_owned()
                    .map_err(|e| Error::Io(format!("dup memfd: {e}")))?;
                reg.register(name, FdKind::MEMORY, fd, b"")?;
            }
            m.serial.register_fds(&mut reg)?;
            if let Some(mon) = &self.monitor {
                mon.register_fds(&mut reg)?;
            }
            reg.register(RETIRED_VM, FdKind(0x102), m.retire_vm_fd()?, b"")?;
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            m.serial.restore_terminal();
            let count = reg.len();
            let prepared = reg.prepare()?;
            log::info!(
                "cpr restart: exec {} with {} fds, {} us after the vCPUs stopped",
                program.display(),
                count,
                monotonic_ns().saturating_sub(stop_ns) / 1000
            );
            Ok(prepared.exec(&program, &args).into())
        })()
        .unwrap_or_else(|e| e);
        // Still here: the update failed and the old process carries on.
        drop(reg);
        let e = self.resume_after_failed_update("restart", was_running, &failure);
        self.release_input(held);
        Err(e)
    }

    /// Stops reading console and monitor input for an update and takes what is queued for
    /// the control loop, so that nothing a client sends during the update is lost: the next
    /// image reads or replays it ([`carry_monitor`](Self::carry_monitor)), or this one does
    /// if the update fails ([`release_input`](Self::release_input)).
    fn hold_input(&mut self) -> std::result::Result<Vec<ControlMsg>, QmpError> {
        let not_started = |e: Error| q(format!("update not started: {e}"));
        if let Some(m) = &self.machine {
            m.serial.hold(HOLD_TIMEOUT).map_err(not_started)?;
        }
        if let Some(m) = &self.monitor {
            if let Err(e) = m.hold(HOLD_TIMEOUT) {
                if let Some(m) = &self.machine {
                    m.serial.release();
                }
                return Err(not_started(e));
            }
        }
        Ok(self.rx.try_iter().collect())
    }

    /// The held monitor input, for the next image.
    fn carry_monitor(&self, held: &[ControlMsg]) -> Option<MonitorSection> {
        let m = self.monitor.as_ref()?;
        Some(m.carry(held.iter().filter_map(|msg| match msg {
            ControlMsg::Qmp(r) => Some(r),
            ControlMsg::Vcpu(_) => None,
        })))
    }

    /// The update failed: queues the held messages again, ahead of anything new, and lets
    /// the monitor and the console read again.
    fn release_input(&mut self, held: Vec<ControlMsg>) {
        for msg in held {
            let _ = self.tx.send(msg);
        }
        if let Some(m) = &self.monitor {
            m.release();
        }
        if let Some(m) = &self.machine {
            m.serial.release();
        }
    }

    /// An update failed before the new VMM took over: give VFIO mappings their addresses
    /// back, put the terminal back into raw mode, resume the vCPUs, report.
    fn resume_after_failed_update(
        &mut self,
        mode: &str,
        was_running: bool,
        failure: &dyn std::fmt::Display,
    ) -> QmpError {
        if let Some(p) = self.passthrough.as_mut() {
            if let Err(e) = p.abandon() {
                log::error!("VFIO: restoring host addresses failed: {e}");
            }
        }
        if let Some(m) = self.machine.as_mut() {
            m.serial.reenter_raw_mode();
            if was_running {
                m.resume();
            }
        }
        log::error!("cpr {mode} failed, guest resumed: {failure}");
        self.event(
            "CPR",
            Some(json!({"mode": mode, "status": "failed", "error": failure.to_string()})),
        );
        q(format!(
            "{mode} failed, the guest resumed in the old process: {failure}"
        ))
    }

    fn cpr_reboot(
        &mut self,
        req: &Request,
        path: &Path,
        warnings: Vec<String>,
    ) -> std::result::Result<Outcome, QmpError> {
        for w in &warnings {
            log::warn!("{w}");
        }
        self.event("CPR", Some(json!({"mode": "reboot", "status": "started"})));
        let (bytes, was_running, _) = self
            .stop_and_encode("reboot", None, None, None)
            .map_err(q)?;
        let written = save_to_path(path, |out| {
            std::io::Write::write_all(out, &bytes).map_err(|e| cpr_snapshot::Error::Io {
                offset: 0,
                source: e,
            })
        });
        if let Err(e) = written {
            if was_running {
                if let Some(m) = &self.machine {
                    m.resume();
                }
            }
            self.event(
                "CPR",
                Some(json!({"mode": "reboot", "status": "failed", "error": e.to_string()})),
            );
            return Err(q(format!("saving state failed, the guest resumed: {e}")));
        }
        log::info!(
            "cpr reboot: state saved to {} ({} bytes); exiting",
            path.display(),
            bytes.len()
        );
        self.event(
            "CPR",
            Some(json!({"mode": "reboot", "status": "saved", "path": path})),
        );
        self.reply(req, Ok(json!({"warnings": warnings})));
        if let Some(m) = &self.machine {
            m.serial.restore_terminal();
        }
        Ok(Outcome::SavedForReboot)
    }

    /// The old side of a transfer: hands the memory over while the guest runs, then stops
    /// it, hands everything else over, and lets go once the new VMM restored the VM. Until it
    /// commits, any failure resumes the guest here.
    fn cpr_transfer(
        &mut self,
        req: &Request,
        path: &Path,
    ) -> std::result::Result<Outcome, QmpError> {
        let io = |e: std::io::Error| Error::Io(format!("transfer: {e}"));
        let sock = UnixStream::connect(path)
            .map_err(|e| q(format!("connect to the new VMM at {}: {e}", path.display())))?;
        sock.set_read_timeout(Some(TRANSFER_TIMEOUT)).map_err(q)?;
        sock.set_write_timeout(Some(TRANSFER_TIMEOUT)).map_err(q)?;
        // Phase 1, guest running: memory, so the new VMM builds its VM now.
        (|| -> Result<()> {
            let m = self
                .machine
                .as_ref()
                .ok_or_else(|| Error::State("no VM".into()))?;
            let mut mem = FdRegistry::new();
            for (name, fd) in m.ram.memfds() {
                let fd = fd.try_clone_to_owned().map_err(io)?;
                mem.register(name, FdKind::MEMORY, fd, b"")?;
            }
            mem.send(&sock)?;
            let schema = schema();
            let mut w = SnapshotWriter::new(
                Vec::new(),
                &schema,
                "vmm-reference",
                env!("CARGO_PKG_VERSION"),
                schema.latest_version(),
            )?;
            w.write_section(0, &self.config_section(m))?;
            w.write_section(0, m.ram.layout())?;
            send_blob(&sock, &w.finish()?)?;
            let mut ready = [0u8; 1];
            (&sock).read_exact(&mut ready).map_err(io)?;
            if ready != *b"R" {
                return Err(Error::State("the new VMM did not get ready".into()));
            }
            Ok(())
        })()
        .map_err(|e| q(format!("transfer refused before the guest stopped: {e}")))?;

        // Phase 2: stop, hand over state and the remaining fds, wait for the new VMM.
        self.event(
            "CPR",
            Some(json!({"mode": "transfer", "status": "started"})),
        );
        let held = self.hold_input()?;
        let carried = self.carry_monitor(&held);
        let mut reg = FdRegistry::new();
        let (bytes, was_running, _) =
            match self.stop_and_encode("transfer", Some(req), Some(&mut reg), carried.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    self.release_input(held);
                    return Err(q(e));
                }
            };
        let Some(m) = self.machine.as_ref() else {
            self.release_input(held);
            return Err(q("no VM"));
        };
        let outcome = (|| -> Result<()> {
            m.serial.register_fds(&mut reg)?;
            if let Some(mon) = &self.monitor {
                mon.register_fds(&mut reg)?;
            }
            reg.send(&sock)?;
            send_blob(&sock, &bytes)?;
            let mut answer = [0u8; 1];
            (&sock).read_exact(&mut answer).map_err(io)?;
            if answer != *b"D" {
                let mut why = String::new();
                let _ = (&sock).read_to_string(&mut why);
                return Err(Error::State(format!(
                    "the new VMM could not restore: {why}"
                )));
            }
            // Past this byte the guest belongs to the new VMM: never resume it here.
            (&sock).write_all(b"C").map_err(io)
        })();
        match outcome {
            Ok(()) => {
                log::info!("cpr transfer: the new VMM runs the guest; exiting");
                Ok(Outcome::Transferred)
            }
            Err(e) => {
                drop(reg);
                let e = self.resume_after_failed_update("transfer", was_running, &e);
                self.release_input(held);
                Err(e)
            }
        }
    }

    fn config_section(&self, m: &Machine) -> VmmConfigSection {
        VmmConfigSection {
            vcpus: m.vcpu_count() as u32,
            guest: self.guest.clone(),
            serial: serial_string(&self.config.serial),
        }
    }

    fn cpr_load(&mut self, args: &Map<String, Value>) -> std::result::Result<Value, QmpError> {
        if self.state != RunState::Incoming {
            return Err(q("cpr-load needs a VMM started with --incoming defer"));
        }
        let path = match args.get("path") {
            Some(Value::String(s)) if !s.is_empty() => PathBuf::from(s),
            _ => return Err(q("Parameter 'path' is missing or not a string")),
        };
        let bytes = read_state_file(&path).map_err(q)?;
        self.restore(&bytes, None).map_err(q)?;
        Ok(json!({}))
    }
}

fn serial_string(cfg: &SerialConfig) -> String {
    match cfg {
        SerialConfig::Stdout => "stdout".into(),
        SerialConfig::Null => "null".into(),
        SerialConfig::File(p) => format!("file:{}", p.display()),
        SerialConfig::Unix(p) => format!("unix:{}", p.display()),
    }
}

/// Sends a length-prefixed blob.
fn send_blob(sock: &UnixStream, bytes: &[u8]) -> Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| Error::State("state too large".into()))?;
    (&*sock)
        .write_all(&len.to_le_bytes())
        .and_then(|_| (&*sock).write_all(bytes))
        .map_err(|e| Error::Io(format!("transfer: {e}")))
}

/// Receives a length-prefixed blob, capped at the state schema's limit.
fn recv_blob(sock: &UnixStream) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    (&*sock)
        .read_exact(&mut len)
        .map_err(|e| Error::Io(format!("transfer: {e}")))?;
    let len = u64::from(u32::from_le_bytes(len));
    let limit = schema().limits().max_total;
    if len > limit {
        return Err(Error::State(format!(
            "transferred state of {len} bytes exceeds {limit}"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    (&*sock)
        .read_exact(&mut bytes)
        .map_err(|e| Error::Io(format!("transfer: {e}")))?;
    Ok(bytes)
}

/// Reads a state file, capped at the schema's limit.
fn read_state_file(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Io(format!("open state file `{}`: {e}", path.display())))?;
    let limit = schema().limits().max_total;
    let mut bytes = Vec::new();
    BufReader::new(file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::Io(format!("read state file `{}`: {e}", path.display())))?;
    if bytes.len() as u64 > limit {
        return Err(Error::State(format!(
            "state file `{}` is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

/// `inspect FILE`: the sections of a state file, one per line.
pub fn inspect(path: &Path) -> Result<String> {
    let bytes = read_state_file(path)?;
    let info = cpr_snapshot::inspect(bytes.as_slice(), schema().limits())?;
    Ok(format!("{}: {info}", path.display()))
}
